//! Build script. Without the `cuda` feature it does nothing: the crate builds with no CUDA toolkit.
//! With `cuda`, it will compile kernels/*.cu with nvcc to cubins (sm_80, sm_90a) and PTX, embed them
//! and print each kernel's registers and spills; that arrives with the CUDA backend (issue 5).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
}

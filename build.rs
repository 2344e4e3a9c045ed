//! Build script. Without the `cuda` feature it does nothing: the crate builds with no CUDA toolkit.
//!
//! With `cuda`, every kernels/*.cu is compiled by nvcc into a fatbin holding cubins for sm_80 (A100)
//! and sm_90a (H100/H200) and PTX for compute_80 (a JIT fallback for newer cards); the fatbins are
//! embedded in the binary (`$OUT_DIR/kernels.rs`). ptxas reports each kernel's registers, shared
//! memory and spills; the report is embedded too (`roentgen cuda-info` prints it), printed here when
//! ROENTGEN_PTXAS_VERBOSE=1, and a kernel that spills fails the build unless it is listed, with a
//! reason, in kernels/spills-allowed.txt.
//!
//! ROENTGEN_CUDA_ARCHS (e.g. `sm_90a`, or `sm_80,sm_90a`) replaces that target list with cubins for
//! exactly the named targets, no PTX and no -lineinfo: scripts/gpu-bundle.sh builds with `sm_90a`
//! so that the binaries carried to the H100/H200 machine stay small (a device call carries 64 MiB).
//!
//! Typed launches: build/kernel_params.rs writes `$OUT_DIR/kernel_params.rs`, one struct per kernel
//! from its signature, which the backend launches (src/backend/cuda/launch.rs).
//!
//! nvcc is found through $NVCC, then $CUDA_HOME/bin or $CUDA_PATH/bin, then the pinned pip toolchain
//! that scripts/install-cuda-toolchain.sh puts in .cuda-toolchain/, then $PATH.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "build/kernel_params.rs"]
mod kernel_params;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=ROENTGEN_PTXAS_VERBOSE");
    println!("cargo:rerun-if-env-changed=ROENTGEN_CUDA_ARCHS");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    #[cfg(feature = "cuda-emu")]
    build_emulated_device();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    kernel_params::generate(Path::new("kernels"), &out_dir.join("kernel_params.rs"));
    let nvcc = find_nvcc().unwrap_or_else(|| {
        panic!(
            "\n\nthe `cuda` feature needs nvcc (CUDA 12.8 or newer, for sm_90a) and none was found.\n\
             Install the pinned compiler (no GPU or driver needed): scripts/install-cuda-toolchain.sh\n\
             or point NVCC at an nvcc binary, or CUDA_HOME at a CUDA toolkit.\n\n"
        )
    });
    let include = nvcc.parent().and_then(Path::parent).map(|p| p.join("include"));
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/: cannot read")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for e in std::fs::read_dir("kernels").unwrap().flatten() {
        println!("cargo:rerun-if-changed={}", e.path().display());
    }
    let allowed = std::fs::read_to_string("kernels/spills-allowed.txt").unwrap_or_default();
    let allowed: Vec<&str> = allowed
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let verbose = std::env::var("ROENTGEN_PTXAS_VERBOSE").is_ok_and(|v| v == "1");
    // The default targets (sm_80 and sm_90a cubins, compute_80 PTX, with -lineinfo for profilers),
    // or only the cubins that ROENTGEN_CUDA_ARCHS names (see the top of this file).
    let archs = std::env::var("ROENTGEN_CUDA_ARCHS").ok().filter(|v| !v.trim().is_empty());
    let gencodes: Vec<String> = match &archs {
        None => vec![
            "-gencode=arch=compute_80,code=sm_80".into(),
            "-gencode=arch=compute_90a,code=sm_90a".into(),
            "-gencode=arch=compute_80,code=compute_80".into(),
        ],
        Some(list) => list.split(',').map(|a| gencode_for(a.trim())).collect(),
    };

    // MODULES is a static, not a const: a const's bytes are copied into every place that uses it.
    let mut modules =
        String::from("/// (module name, fatbin) for every kernels/*.cu.\npub static MODULES: &[(&str, &[u8])] = &[\n");
    let mut report = String::new();
    let mut spills = Vec::new();
    for src in &sources {
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let fatbin = out_dir.join(format!("{stem}.fatbin"));
        let mut cmd = Command::new(&nvcc);
        cmd.arg("-fatbin").arg("-O3").arg("-std=c++17");
        if archs.is_none() {
            cmd.arg("-lineinfo");
        }
        cmd.arg("-Xptxas").arg("-v").args(&gencodes).arg("-Ikernels");
        if let Some(inc) = &include {
            if inc.is_dir() {
                cmd.arg(format!("-I{}", inc.display()));
            }
        }
        cmd.arg("-o").arg(&fatbin).arg(src);
        let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            panic!("\n\nnvcc failed on {}:\n{log}\n", src.display());
        }
        for k in parse_ptxas(&log) {
            let line = format!(
                "{:<44} {:<7} {:>3} regs {:>6} B smem {:>4} B stack  spills {}/{} B",
                k.name, k.arch, k.regs, k.smem, k.stack, k.spill_stores, k.spill_loads
            );
            if verbose {
                println!("cargo:warning={line}");
            }
            if (k.spill_stores > 0 || k.spill_loads > 0) && !allowed.iter().any(|a| k.name.contains(a)) {
                spills.push(line.clone());
            }
            report.push_str(&line);
            report.push('\n');
        }
        modules.push_str(&format!("    ({stem:?}, include_bytes!({:?})),\n", fatbin.display().to_string()));
    }
    modules.push_str("];\n");
    if !spills.is_empty() {
        panic!(
            "\n\nthese kernels spill registers (fix them, or list the kernel with a reason in \
             kernels/spills-allowed.txt):\n{}\n",
            spills.join("\n")
        );
    }
    modules.push_str(&format!(
        "/// ptxas's report: one line per kernel and architecture.\npub const PTXAS_REPORT: &str = {report:?};\n"
    ));
    let targets = match &archs {
        None => "sm_80 and sm_90a, with compute_80 PTX".to_string(),
        Some(list) => format!("{} only (ROENTGEN_CUDA_ARCHS), no PTX", list.trim()),
    };
    modules.push_str(&format!("/// What the fatbins hold.\npub const TARGETS: &str = {targets:?};\n"));
    modules.push_str(&format!(
        "/// The nvcc that compiled the kernels.\npub const NVCC: &str = {:?};\n",
        nvcc.display().to_string()
    ));
    std::fs::write(out_dir.join("kernels.rs"), modules).unwrap();
}

/// `sm_90a` → `-gencode=arch=compute_90a,code=sm_90a`: a cubin for that target (the `-gencode`
/// form, since `-arch=sm_90a` also ran a plain sm_90 pass that rejects sm_90a-only instructions).
fn gencode_for(arch: &str) -> String {
    let n = arch.strip_prefix("sm_").unwrap_or("");
    let digits = n.trim_end_matches(|c: char| c.is_ascii_lowercase());
    if digits.len() < 2 || !digits.chars().all(|c| c.is_ascii_digit()) || n.len() > digits.len() + 1 {
        panic!("\n\nROENTGEN_CUDA_ARCHS: '{arch}' is not a target like sm_90a or sm_80 (comma-separated)\n\n");
    }
    format!("-gencode=arch=compute_{n},code=sm_{n}")
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = |p: PathBuf| p.is_file().then_some(p);
    if let Some(p) = std::env::var_os("NVCC") {
        return exe(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var).and_then(|h| exe(PathBuf::from(h).join("bin/nvcc"))) {
            return Some(p);
        }
    }
    if let Ok(rd) = std::fs::read_dir(".cuda-toolchain/venv/lib") {
        for e in rd.flatten() {
            if let Some(p) = exe(e.path().join("site-packages/nvidia/cu13/bin/nvcc")) {
                return std::fs::canonicalize(p).ok();
            }
        }
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|d| exe(d.join("nvcc")))
}

struct PtxasKernel {
    name: String,
    arch: String,
    regs: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

/// Parses `-Xptxas -v` output: "Compiling entry function 'k' for 'sm_80'", then "N bytes stack
/// frame, S bytes spill stores, L bytes spill loads", then "Used R registers, ... B bytes smem".
fn parse_ptxas(log: &str) -> Vec<PtxasKernel> {
    let num_before = |line: &str, unit: &str| -> u32 {
        line.find(unit).and_then(|i| line[..i].split_whitespace().last().and_then(|w| w.parse().ok())).unwrap_or(0)
    };
    let mut out: Vec<PtxasKernel> = Vec::new();
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + 26..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            let arch = rest.split("for '").nth(1).and_then(|s| s.split('\'').next()).unwrap_or("").to_string();
            out.push(PtxasKernel { name, arch, regs: 0, smem: 0, stack: 0, spill_stores: 0, spill_loads: 0 });
        } else if let Some(k) = out.last_mut() {
            if line.contains("spill stores") {
                k.stack = num_before(line, "bytes stack frame");
                k.spill_stores = num_before(line, "bytes spill stores");
                k.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                k.regs = num_before(line, "registers");
                k.smem = num_before(line, "bytes smem");
            }
        }
    }
    out
}

/// Feature `cuda-emu`: the kernels compiled for the CPU emulation (kernels/emu: emu.h, registry.h,
/// device.cpp) into a static library that src/backend/cuda/emu.rs calls, so the CUDA backend runs
/// without a GPU. The same flags as tests/kernel_emu.rs: IEEE f32 without contraction.
#[cfg(feature = "cuda-emu")]
fn build_emulated_device() {
    println!("cargo:rerun-if-changed=kernels/emu");
    cc::Build::new()
        .cpp(true)
        .file("kernels/emu/device.cpp")
        .include("kernels/emu")
        .flag("-std=c++17")
        .flag("-pthread")
        .flag("-fno-strict-aliasing")
        .flag("-ffp-contract=off")
        .flag("-Wno-unknown-pragmas")
        .opt_level(2)
        .debug(false)
        .warnings(false)
        .compile("roentgen_emu");
}

//! The kernels' CPU emulation (kernels/emu/emu.h: threads as fibers with real __syncthreads /
//! warp-shuffle / mma.sync semantics) tested on its own by tests/kernel_emu/run.cpp: self-tests,
//! Philox known answers, and negative cases that pass only when the emulator reports a planted
//! error. The kernels themselves run through the Rust backend on the emulated device in
//! tests/cuda.rs (`--features cuda-emu`), which also runs on real GPUs.
//!
//! Needs a C++17 compiler: $CXX, else g++. Without one it prints "SKIPPED: no g++" and passes, unless
//! ROENTGEN_REQUIRE_EMU is set. EMU_JOBS (default 2) cases run at once; a filter substring can be
//! given through ROENTGEN_EMU_FILTER.

use std::path::Path;
use std::process::Command;

#[test]
fn cuda_kernels_on_the_cpu_emulation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests").join("kernel_emu");
    let required = std::env::var_os("ROENTGEN_REQUIRE_EMU").is_some();
    let cxx = std::env::var("CXX").ok().filter(|s| !s.trim().is_empty()).unwrap_or_else(|| "g++".to_string());

    if !cfg!(target_os = "linux") {
        println!("SKIPPED: the kernel emulation needs Linux (fibers, guard pages, fork)");
        assert!(!required, "ROENTGEN_REQUIRE_EMU is set but the kernel emulation needs Linux");
        return;
    }
    let found = Command::new(&cxx).arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        println!(
            "SKIPPED: no g++ (C++ compiler `{cxx}` not found; set CXX): the CUDA kernels' CPU emulation did not run"
        );
        assert!(!required, "ROENTGEN_REQUIRE_EMU is set but there is no C++ compiler (`{cxx}`)");
        return;
    }

    let tmp = tempfile::tempdir().expect("temporary directory");
    let exe = tmp.path().join("kernel_emu");
    let t0 = std::time::Instant::now();
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O2", "-pthread", "-fno-strict-aliasing", "-ffp-contract=off", "-Wno-unknown-pragmas"])
        .arg("-I")
        .arg(root.join("kernels").join("emu"))
        .arg(dir.join("run.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running {cxx}: {e}"));
    assert!(
        out.status.success(),
        "compiling tests/kernel_emu/run.cpp with {cxx} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("compiled tests/kernel_emu/run.cpp with {cxx} in {:.1}s", t0.elapsed().as_secs_f64());

    let mut run = Command::new(&exe);
    if let Ok(f) = std::env::var("ROENTGEN_EMU_FILTER") {
        run.arg(f);
    }
    let out = run.output().unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kernel emulation failed ({}): see the FAILED lines above", out.status);
    assert!(stdout.contains("kernel emulation:"), "the kernel emulation printed no summary");
}

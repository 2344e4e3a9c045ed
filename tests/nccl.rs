//! NCCL's loader (issue 17; the `nccl` feature). cudarc looks for libnccl.so, .so.13, .so.12, …
//! but not libnccl.so.2, the name NCCL's packages install; roentgen finds it itself. Here, with no
//! GPU: the library is found in a Python environment's site-packages (where the PyPI
//! nvidia-nccl wheel that PyTorch depends on puts it), loaded, its entry points resolved and its
//! version read; a wrong explicit path is refused naming it. Where no NCCL is installed the test
//! says so and passes, unless ROENTGEN_REQUIRE_NCCL is set (as `.ci/run` sets it, after
//! installing the wheel into .cuda-toolchain/venv).

#[cfg(feature = "nccl")]
#[test]
fn nccl_is_found_in_site_packages_and_loads() {
    use roentgen::backend::cuda::nccl;
    // The environments this repository makes: the CUDA toolchain's (CI) or the fixtures'.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let venv = [".cuda-toolchain/venv", ".venv-fixtures"].iter().map(|v| root.join(v)).find(|v| nccl_in(v).is_some());
    let Some(venv) = venv else {
        assert!(
            std::env::var_os("ROENTGEN_REQUIRE_NCCL").is_none(),
            "ROENTGEN_REQUIRE_NCCL is set but no nvidia-nccl wheel is installed in .cuda-toolchain/venv"
        );
        println!("SKIPPED: no NCCL in .cuda-toolchain/venv or .venv-fixtures (pip install nvidia-nccl-cu13)");
        return;
    };
    // One test in this binary: the environment is ours to change.
    std::env::remove_var(nccl::ENV_PATH);
    std::env::set_var("VIRTUAL_ENV", &venv);
    let dirs = nccl::search_folders();
    let site = nccl_in(&venv).unwrap();
    assert!(dirs.contains(&site), "{} not among {dirs:?}", site.display());
    let found = nccl::find_library().unwrap();
    println!("found {}", found.display());
    assert!(found.ends_with("libnccl.so.2"), "{}", found.display());
    let lib = nccl::NcclLib::load_from(&found).unwrap();
    println!("NCCL version code {}", lib.version());
    assert!(lib.version() >= 21800, "{}", lib.version());

    std::env::set_var(nccl::ENV_PATH, root.join("no-such-libnccl.so.2"));
    let err = nccl::find_library().unwrap_err().to_string();
    assert!(err.contains("ROENTGEN_NCCL=") && err.contains("no-such-libnccl.so.2"), "{err}");
    // A file that is not NCCL is refused naming it.
    let not_nccl = root.join("Cargo.toml");
    let err = format!("{:#}", nccl::NcclLib::load_from(&not_nccl).err().unwrap());
    assert!(err.contains("Cargo.toml"), "{err}");
}

/// The nvidia/nccl/lib folder of a venv's site-packages, if libnccl.so.2 is there.
#[cfg(feature = "nccl")]
fn nccl_in(venv: &std::path::Path) -> Option<std::path::PathBuf> {
    let lib = venv.join("lib");
    std::fs::read_dir(&lib)
        .ok()?
        .flatten()
        .map(|e| e.path().join("site-packages/nvidia/nccl/lib"))
        .find(|d| d.join("libnccl.so.2").is_file())
}

//! `roentgen cuda-info`: the kernels' ptxas report as the binary embeds it, and a plain answer about
//! the device (here, usually: no driver).

mod common;
use common::*;

#[test]
fn cuda_info_reports_every_kernel_for_both_architectures() {
    let (code, out, err) = run_cli(&["cuda-info", "--json"], None);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}{err}"));
    if !cfg!(feature = "cuda") {
        assert_eq!(code, 1, "a build without CUDA must say so with exit 1");
        assert_eq!(v["cuda_build"], false);
        return;
    }
    assert_eq!(code, 0, "{err}");
    assert_eq!(v["cuda_build"], true);
    let kernels = v["kernels"].as_array().expect("kernels");
    let has = |name: &str, arch: &str| kernels.iter().any(|k| k["name"] == name && k["arch"] == arch);
    // One kernel of each module, on both architectures (the report is parsed, not empty).
    for name in [
        "conv2d_igemm_bf16",
        "attention_fwd_bf16_d160",
        "gn_forward_apply",
        "ew_to_bf16",
        "opt_adamw",
        "rand_philox_normal",
        "linear_bias_grad",
    ] {
        for arch in ["sm_80", "sm_90a"] {
            assert!(has(name, arch), "{name} for {arch} missing from cuda-info");
        }
    }
    // build.rs fails on spills unless allowed in kernels/spills-allowed.txt (which lists none).
    let spilling: Vec<_> =
        kernels.iter().filter(|k| k["spill_store_bytes"] != 0 || k["spill_load_bytes"] != 0).collect();
    assert!(spilling.is_empty(), "spilling kernels: {spilling:?}");
    assert!(v["device"].is_object() || v["device_error"].is_string(), "no device and no reason: {v}");
}

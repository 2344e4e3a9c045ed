//! The typed-launch generator (build/kernel_params.rs, run by build.rs) on the real kernels and on
//! planted mismatches: what it refuses fails the build, so these cases prove the refusals happen.

#[path = "../build/kernel_params.rs"]
mod kernel_params;

use std::path::{Path, PathBuf};

fn scratch(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("roentgen-kernel-params-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (file, text) in files {
        std::fs::write(dir.join(file), text).unwrap();
    }
    dir
}

/// Generates from the kernels in `dir` into a scratch file (never beside the sources).
fn generate(dir: &Path) -> std::thread::Result<String> {
    let out = std::env::temp_dir().join(format!(
        "roentgen-kernel-params-{}-{}.rs",
        std::process::id(),
        dir.file_name().unwrap().to_string_lossy()
    ));
    let code = std::panic::catch_unwind(|| kernel_params::generate(dir, &out))
        .map(|()| std::fs::read_to_string(&out).unwrap());
    let _ = std::fs::remove_file(&out);
    // Only the scratch folders this test writes (never the repository's kernels/, even when the
    // checkout itself lives under the temp dir, as CI's clean clones may).
    if dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("roentgen-kernel-params-")) {
        let _ = std::fs::remove_dir_all(dir);
    }
    code
}

fn panic_text(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

#[test]
fn every_kernel_of_the_real_sources_gets_a_typed_struct() {
    let code = generate(Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels").as_path()).expect("generation fails");
    let sources: String = std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "cu"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    let entry_points = sources.matches("extern \"C\" __global__").count();
    let structs = code.matches("impl Kernel for ").count();
    // A bucketed kernel (`NAME_bf16_d##H`, and its numbered versions `NAME_bf16_vN_d##H`) is a
    // method of its f32 twin's struct.
    let bucketed = code.matches(") -> Bf16Bucket<Self>").count();
    assert_eq!(structs + bucketed, entry_points, "one struct (or bf16 instance) per kernel");
    assert!(code.contains("pub fn bf16_v2(self, head_bucket: usize) -> Bf16Bucket<Self>"));
    // Fields keep the kernel's names and map the C types.
    assert!(code.contains(
        "pub(crate) struct EwAdd {\n    pub out: u64,\n    pub a: u64,\n    pub b: u64,\n    pub n: i32,\n}"
    ));
    assert!(code.contains("impl From<Conv2dIgemmF32> for Conv2dIgemmBf16"));
}

#[test]
fn a_precision_variant_with_other_parameters_is_refused() {
    let dir = scratch(
        "variant",
        &[("k.cu", "extern \"C\" __global__ void scale_f32(float* x, int n) {}\nextern \"C\" __global__ void scale_bf16(float* x, float n) {}\n")],
    );
    let e = panic_text(generate(&dir).unwrap_err());
    assert!(e.contains("kernel scale_bf16: parameters differ from scale_f32's"), "{e}");
    // The same pair with matching parameters (bf16 pointee allowed) converts.
    let dir = scratch(
        "variant-ok",
        &[("k.cu", "extern \"C\" __global__ void scale_f32(float* x, int n) {}\nextern \"C\" __global__ void scale_bf16(__nv_bfloat16* x, int n) {}\n")],
    );
    assert!(generate(&dir).unwrap().contains("impl From<ScaleF32> for ScaleBf16"));
}

/// A numbered version (`NAME_v3`) converts from its version 1 when it takes the same parameters;
/// one with other parameters is a kernel of its own (no conversion, no refusal).
#[test]
fn a_numbered_version_converts_from_version_one_when_its_parameters_match() {
    let same = "extern \"C\" __global__ void mm_f32(float* x, int n) {}\n\
                extern \"C\" __global__ void mm_bf16_v3(__nv_bfloat16* x, int n) {}\n\
                extern \"C\" __global__ void nrm(float* x, int n) {}\n\
                extern \"C\" __global__ void nrm_v2(float* x, double* m, int n) {}\n";
    let code = generate(&scratch("versions", &[("k.cu", same)])).unwrap();
    assert!(code.contains("impl From<MmF32> for MmBf16V3"), "{code}");
    assert!(code.contains("impl Kernel for NrmV2"));
    assert!(!code.contains("for NrmV2 {\n    fn from"), "{code}");
}

#[test]
fn a_parameter_type_without_a_launch_mapping_is_refused() {
    let dir =
        scratch("type", &[("k.cu", "extern \"C\" __global__ void __launch_bounds__(256) f(float* x, double s) {}\n")]);
    let e = panic_text(generate(&dir).unwrap_err());
    assert!(e.contains("kernels/k.cu: kernel f: parameter s: type \"double\" has no launch mapping"), "{e}");
}

#[test]
fn a_bucketed_kernel_must_match_its_f32_twin() {
    let twin = "extern \"C\" __global__ void att_f32(float* o, int n) {}\n";
    let bucket = "#define I(H) extern \"C\" __global__ void att_bf16_d##H(float* o, int m) {}\n";
    let dir = scratch("bucket", &[("k.cu", &format!("{twin}{bucket}"))]);
    let e = panic_text(generate(&dir).unwrap_err());
    assert!(e.contains("kernel att_bf16_d##H: parameters differ from att_f32's"), "{e}");
}

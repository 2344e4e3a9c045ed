//! `roentgen export`: a pipeline copied to f16 loads, samples like the original (exactly, for weights
//! that are f16 values),
//! is half the size, leaves training state behind, and refuses to overwrite silently.

mod common;
use common::*;

fn dir_bytes(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .flatten()
        .map(|e| if e.path().is_dir() { dir_bytes(&e.path()) } else { e.metadata().unwrap().len() })
        .sum()
}

fn sample_image(pipe: &std::path::Path, dir: &std::path::Path, tag: &str) -> Vec<f32> {
    let dump = dir.join(format!("{tag}.safetensors"));
    let args = sample_16px_args(pipe, "4", dir.join(tag)).opt("--prompt", "Small right pleural effusion.");
    args.opt("--seed", "5").opt("--dump", &dump).run_ok();
    read_f32(&dump, "image").1
}

#[test]
fn export_to_f16_samples_like_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let fixture_pipe = assemble_pipeline("pipe-a", dir.path());
    let want = sample_image(&fixture_pipe, dir.path(), "fixture");
    // An f32 copy first (the fixture's own files are partly f16): it must sample bit-identically.
    let pipe = dir.path().join("f32");
    export_args(&fixture_pipe, &pipe).with(&["--dtype", "f32"]).run_ok();
    assert_eq!(sample_image(&pipe, dir.path(), "f32copy"), want, "an f32 export must sample bit-identically");
    std::fs::create_dir_all(pipe.join("training_state")).unwrap();
    std::fs::write(pipe.join("training_state/trainer.json"), "{}").unwrap();
    let out = dir.path().join("exported");
    let (stdout, _) = export_args(&pipe, &out).run_ok();
    assert!(stdout.contains("unet") && stdout.contains("wrote"), "{stdout}");
    assert!(!out.join("training_state").exists());
    // every float tensor is f16 now
    let st_bytes = std::fs::read(out.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    assert!(st.iter().all(|(_, v)| v.dtype() == safetensors::Dtype::F16));
    let (a, b) = (dir_bytes(&pipe.join("unet")), dir_bytes(&out.join("unet")));
    println!("unet: {a} bytes → {b} bytes");
    assert!(b * 10 < a * 6, "f16 U-Net is not about half the size: {a} → {b}");
    let got = sample_image(&out, dir.path(), "f16");
    // The fixture's weights are f16 values (the generator stores them so), so rounding them to f16
    // is exact and the f16 export must sample bit-identically; a wrong conversion (bytes, order,
    // names) would not.
    assert_eq!(got, want, "the f16 export changed the image");
    // refuses to overwrite; --overwrite replaces
    let (code, _, err) = export_args(&pipe, &out).run();
    assert_eq!(code, 1);
    assert!(err.contains("--overwrite"), "{err}");
    export_args(&pipe, &out).with(&["--overwrite", "--dtype", "f32"]).run_ok();
    assert_eq!(dir_bytes(&out.join("unet")), a, "--overwrite did not replace the f16 export");
}

#[test]
fn export_refuses_a_folder_that_is_not_a_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = export_args(dir.path(), &dir.path().join("x")).run();
    assert_eq!(code, 1);
    assert!(err.contains("model_index.json"), "{err}");
}

/// A pipeline whose model_index.json names a safety checker and feature extractor it does not have
/// (SD v1.4's, as training checkpoints copy it) exports with those set to [null, null] and
/// `requires_safety_checker: false`, diffusers' form for a pipeline saved without them.
#[test]
fn export_nulls_components_that_are_not_shipped() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    std::fs::copy(sd14_config().join("model_index.json"), pipe.join("model_index.json")).unwrap();
    let out = dir.path().join("exported");
    export_args(&pipe, &out).run_ok();
    let src: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pipe.join("model_index.json")).unwrap()).unwrap();
    assert_eq!(src["safety_checker"][1], "StableDiffusionSafetyChecker", "the input must name a safety checker");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model_index.json")).unwrap()).unwrap();
    for comp in ["safety_checker", "feature_extractor"] {
        assert_eq!(v[comp], serde_json::json!([null, null]), "{comp}: {v}");
    }
    assert_eq!(v["requires_safety_checker"], false);
    for comp in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        assert_eq!(v[comp], src[comp], "{comp} must be kept as it was");
    }
    // and it still samples
    sample_image(&out, dir.path(), "nulled");
}

//! The bundled phantom demo model (weights/phantom-demo, issue 7): `sample` uses it when no
//! `--model` is given, and its images show the finding and the side their prompt asks for, as
//! measured by `eval phantom` (the phantom's own geometry).

mod common;
use common::*;

fn demo_dir() -> std::path::PathBuf {
    root().join("weights/phantom-demo")
}

#[test]
fn sample_without_model_uses_the_bundled_demo() {
    assert!(demo_dir().join("model_index.json").is_file(), "weights/phantom-demo is missing");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let args = CliArgs::new(&["sample", "--prompt", "Large left pleural effusion.", "--seed", "3", "--steps", "20"]);
    let (code, stdout, err) = args.opt("--out", &out).with(&["--gray", "--json"]).run();
    assert_eq!(code, 0, "sample without --model failed: {err}");
    assert!(err.contains("bundled phantom demo") && err.contains("not a medical model"), "no note on stderr: {err}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).expect("--json summary");
    let files = summary["files"].as_array().expect("files in the summary");
    assert_eq!(files.len(), 1, "{stdout}");
    let img = image::open(files[0].as_str().unwrap()).expect("a readable PNG").to_luma8();
    // The demo's default size: the U-Net's sample_size × the VAE's scale factor.
    assert_eq!(img.dimensions(), (64, 64));
    let px: Vec<f64> = img.pixels().map(|p| p.0[0] as f64).collect();
    let mean = px.iter().sum::<f64>() / px.len() as f64;
    let var = px.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / px.len() as f64;
    assert!(var.sqrt() > 10.0, "a flat image (std {:.1})", var.sqrt());
}

/// Left and right are where the model is most easily wrong: ask for each side's large effusion and
/// pneumothorax and measure where the finding appears.
#[test]
fn demo_follows_laterality() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    let lines = [
        "Large left pleural effusion.",
        "Large right pleural effusion.",
        "Large left pneumothorax.",
        "Large right pneumothorax.",
    ];
    std::fs::write(&prompts, lines.join("\n")).unwrap();
    let samples = dir.path().join("samples");
    let args = CliArgs::new(&["sample"]).opt("--model", demo_dir()).opt("--prompts", &prompts);
    let args = args.with(&["--num-images", "6", "--batch-size", "12", "--seed", "11", "--scheduler", "dpm++2m"]);
    let (code, _, err) = args.with(&["--steps", "25", "--gray"]).opt("--out", format!("{}/", samples.display())).run();
    assert_eq!(code, 0, "sample failed: {err}");
    let (code, stdout, err) =
        run_cli(&["eval", "phantom", "--images", samples.to_str().unwrap(), "--reference-count", "0", "--json"], None);
    assert_eq!(code, 0, "eval phantom failed: {err}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for class in ["effusion-left", "effusion-right", "pneumothorax-left", "pneumothorax-right"] {
        let c = &v["classes"][class];
        assert_eq!(c["images"].as_u64(), Some(6), "{class}: {c}");
        let side = c["side"].as_f64().unwrap();
        assert!(
            side >= MIN_SIDE,
            "{class}: the requested side in {:.0}% of images (want ≥ {:.0}%)",
            side * 100.0,
            MIN_SIDE * 100.0
        );
    }
}

/// At least 4 of 6 images with the finding on the requested side, per class (chance, for a finding
/// drawn on a random side when shown at all, is under 50%).
const MIN_SIDE: f64 = 4.0 / 6.0;

/// diffusers' StableDiffusionPipeline loads the bundled folder as shipped and, from the same initial
/// latents, samples what roentgen samples (reference: tests/fixtures/generate.py, part "demo").
#[test]
fn demo_samples_as_diffusers_does() {
    let io = fixture("demo/io-demo.safetensors");
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("demo/run.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (shape, lat) = read_f32(&io, "latents_in");
    let lf = dir.path().join("latents.safetensors");
    write_f32(&lf, "latents", &shape, &lat);
    let dump = dir.path().join("dump.safetensors");
    let size = run["size"].as_u64().unwrap().to_string();
    let steps = run["steps"].as_u64().unwrap().to_string();
    let guidance = run["guidance"].as_f64().unwrap().to_string();
    let mut args = CliArgs::new(&["sample"]).opt("--model", demo_dir());
    for p in run["prompts"].as_array().unwrap() {
        args = args.opt("--prompt", p.as_str().unwrap());
    }
    let args = args.with(&["--height", &size, "--width", &size, "--steps", &steps, "--guidance", &guidance]);
    args.opt("--out", dir.path().join("png/")).opt("--latents-in", &lf).opt("--dump", &dump).run_ok();
    let ((got_shape, got), (want_shape, want)) = (read_f32(&dump, "image"), read_f32(&io, "image"));
    assert_eq!(got_shape, want_shape);
    let max_err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("demo: image max |ours - diffusers| = {max_err:.2e} (bar {PIPELINE_ABS:.0e})");
    assert!(max_err <= PIPELINE_ABS, "demo image differs from diffusers by {max_err}");
    assert_close("demo image", &got, &want, PIPELINE_ABS);
}

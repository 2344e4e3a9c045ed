//! End to end: `roentgen sample` against diffusers' StableDiffusionPipeline on small pipelines saved
//! with save_pretrained (tests/fixtures/generate.py), PNDM, DPM-Solver++ 2M Karras and Euler
//! ancestral, guidance 4.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

fn runs(name: &str) -> Vec<Value> {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("runs.json")).unwrap()).unwrap()
}

fn cli_name(class: Option<&str>) -> Option<&'static str> {
    class.map(|c| match c {
        "DPMSolverMultistepScheduler" => "dpm++2m",
        "EulerAncestralDiscreteScheduler" => "euler-a",
        other => panic!("unexpected scheduler {other}"),
    })
}

/// `roentgen sample` of `pipe` as diffusers sampled `run`: its prompts and negative prompt, image
/// count, size and steps, at guidance 4, `batch_size` images per U-Net batch.
fn diffusers_run_args(pipe: &Path, run: &Value, batch_size: usize) -> CliArgs {
    let mut args = CliArgs::new(&["sample"]).opt("--model", pipe);
    for p in run["prompts"].as_array().unwrap() {
        args = args.opt("--prompt", p.as_str().unwrap());
    }
    if let Some(n) = run["negative"].as_str() {
        args = args.opt("--negative-prompt", n);
    }
    let num = |k: &str| run[k].as_u64().unwrap().to_string();
    let args = args.opt("--num-images", num("num_images")).opt("--height", num("height")).opt("--width", num("width"));
    args.opt("--steps", num("steps")).with(&["--guidance", "4"]).opt("--batch-size", batch_size.to_string())
}

fn check_run(pipe_name: &str, run: &Value, batch_size: usize) {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline(pipe_name, dir.path());
    let rname = run["name"].as_str().unwrap();
    let io = pipe.join(format!("io-{rname}.safetensors"));
    let out_dir = dir.path().join("out");
    let dump = dir.path().join("dump.safetensors");
    let num = |k: &str| run[k].as_u64().unwrap().to_string();
    let mut args = diffusers_run_args(&pipe, run, batch_size);
    if let Some(s) = cli_name(run["scheduler"].as_str()) {
        args = args.opt("--scheduler", s);
    }
    if run["karras"].as_bool() == Some(true) {
        args.push("--karras-sigmas".into());
    }
    match run["seed"].as_u64() {
        Some(seed) => args = args.opt("--seed", seed.to_string()),
        None => {
            let (shape, lat) = read_f32(&io, "latents_in");
            let f = dir.path().join("latents.safetensors");
            write_f32(&f, "latents", &shape, &lat);
            args = args.opt("--latents-in", &f);
        }
    }
    let (stdout, _) = args.opt("--out", &out_dir).opt("--dump", &dump).with(&["--json"]).run_ok();
    let what = format!("{pipe_name}/{rname} (batch size {batch_size})");
    let (shape, got) = read_f32(&dump, "image");
    let (want_shape, want) = read_f32(&io, "image");
    assert_eq!(shape, want_shape);
    let max_err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("{what}: image max |ours - diffusers| = {max_err:.2e} (bar {PIPELINE_ABS:.0e})");
    assert!(max_err <= PIPELINE_ABS, "{what}: image error {max_err}");
    assert_close(
        &format!("{what} final latents"),
        &read_f32(&dump, "latents").1,
        &read_f32(&io, "latents").1,
        PIPELINE_ABS,
    );
    assert_close(
        &format!("{what} prompt_embeds"),
        &read_f32(&dump, "prompt_embeds").1,
        &read_f32(&io, "prompt_embeds").1,
        F32_PARITY,
    );

    // PNGs: one per image, 8-bit RGB, with the settings in text chunks.
    let summary: Value = serde_json::from_str(&stdout).unwrap();
    let files = summary["files"].as_array().unwrap();
    assert_eq!(files.len(), shape[0]);
    let (color, w, h, px, text) =
        roentgen::io::images::read_png(std::path::Path::new(files[0].as_str().unwrap())).unwrap();
    assert_eq!((color, w as usize, h as usize), (png::ColorType::Rgb, shape[3], shape[2]));
    let expect0 = (want[0] * 255.0).round() as u8; // channel 0 of pixel (0, 0) of image 0
    assert!((px[0] as i32 - expect0 as i32).abs() <= 1);
    let get = |k: &str| text.iter().find(|(kk, _)| kk == k).map(|(_, v)| v.clone()).unwrap_or_default();
    assert_eq!(get("prompt"), run["prompts"][0].as_str().unwrap());
    assert_eq!(get("steps"), num("steps"));
    assert!(!get("scheduler").is_empty() && !get("model").is_empty());
    // What drew the initial noise is recorded: the seed, or the --latents-in file (and then no
    // seed unless Euler ancestral drew its step noise from it).
    let from_file = !get("latents_in").is_empty();
    assert!(from_file || !get("seed").is_empty(), "{text:?}");
    if from_file && get("scheduler") != "euler-a" {
        assert!(get("seed").is_empty(), "a seed that drew nothing is recorded: {text:?}");
    }
}

/// One test per diffusers run: the test's name, the pipeline fixture, the run's index in that
/// fixture's runs.json and the --batch-size to sample with.
macro_rules! diffusers_run_tests {
    ($($(#[doc = $doc:literal])* $name:ident: $pipe:literal, $run:literal, $batch:literal;)*) => {$(
        $(#[doc = $doc])*
        #[test]
        fn $name() {
            check_run($pipe, &runs($pipe)[$run], $batch);
        }
    )*};
}

diffusers_run_tests! {
    sample_matches_diffusers_pndm_sd14_scheduler: "pipe-a", 0, 4;
    /// --batch-size bounds the U-Net batch; results must not change.
    sample_matches_diffusers_pndm_in_chunks: "pipe-a", 0, 3;
    sample_matches_diffusers_dpm_solver_karras_odd_latent_size: "pipe-b", 0, 2;
    /// No latents given: the initial noise and the ancestral noise both come from the seeded
    /// torch-compatible generator.
    sample_with_seed_matches_diffusers_euler_ancestral: "pipe-b", 1, 1;
}

#[test]
fn sample_with_a_bert_text_encoder_matches_diffusers() {
    // The paper's domain-encoder setting: a BERT-family text encoder with the attention mask on.
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("pipe-bert");
    copy_dir(&fixture("pipe-bert"), &pipe);
    let run: Value = serde_json::from_str(&std::fs::read_to_string(pipe.join("run.json")).unwrap()).unwrap();
    let io = pipe.join("io.safetensors");
    let (shape, lat) = read_f32(&io, "latents_in");
    let lf = dir.path().join("latents.safetensors");
    write_f32(&lf, "latents", &shape, &lat);
    let dump = dir.path().join("dump.safetensors");
    let out = dir.path().join("out");
    run["negative"].as_str().expect("pipe-bert's run.json has a negative prompt");
    let args = diffusers_run_args(&pipe, &run, 3).opt("--latents-in", &lf).opt("--dump", &dump);
    args.opt("--out", &out).run_ok();
    assert_close(
        "pipe-bert prompt_embeds",
        &read_f32(&dump, "prompt_embeds").1,
        &read_f32(&io, "prompt_embeds").1,
        F32_PARITY,
    );
    let (got, want) = (read_f32(&dump, "image").1, read_f32(&io, "image").1);
    let max_err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("pipe-bert: image max |ours - diffusers| = {max_err:.2e}");
    assert!(max_err <= PIPELINE_ABS, "{max_err}");
}

/// A long-lived process (a server, a loop over checkpoints) samples again and again from one
/// loaded pipeline: every call frees the pools it allocated, so after 50 calls the backend holds
/// exactly what loading the pipeline allocated, and the 50th call's images equal the first's.
#[test]
fn fifty_samples_from_one_loaded_pipeline_hold_memory_flat() {
    use roentgen::backend::{cpu::CpuBackend, Backend};
    use roentgen::sample::pipeline::{Pipeline, SampleRequest};
    let dir = tempfile::tempdir().unwrap();
    let pipe_dir = assemble_pipeline("pipe-a", dir.path());
    let mut b = CpuBackend::new();
    let pipe = Pipeline::load(&mut b, &pipe_dir, None).unwrap();
    let held = |b: &CpuBackend| -> usize { b.pool_sizes().iter().map(|(_, bytes)| bytes).sum() };
    let loaded = held(&b);
    let req = SampleRequest {
        prompts: vec!["Large left pleural effusion.".into(), "Enlarged cardiac silhouette.".into()],
        negative_prompt: None,
        num_images_per_prompt: 1,
        batch_size: 2,
        seed: 11,
        rng_variant: Default::default(),
        height: 16,
        width: 16,
        steps: 2,
        guidance: 4.0,
        scheduler: None,
        scheduler_options: Default::default(),
        latents_in: None,
        init_image: None,
    };
    let sample = |b: &mut CpuBackend| pipe.generate(b, &req, &mut |_, _| Ok(()), &mut |_| {}).unwrap().images;
    let first = sample(&mut b);
    let after_one = held(&b);
    let mut last = Vec::new();
    for _ in 1..50 {
        last = sample(&mut b);
    }
    let after_fifty = held(&b);
    assert_eq!(after_one, loaded, "one sample left {} bytes of pools behind", after_one as i64 - loaded as i64);
    assert_eq!(after_fifty, loaded, "50 samples left {} bytes of pools behind", after_fifty as i64 - loaded as i64);
    assert_eq!(first, last, "the same request gave other images on its 50th call");
}

//! `roentgen train` and `train-step` end to end: the loss falls on a small synthetic dataset,
//! resume is exact, checkpoints load in `sample`, `train-step` agrees with PyTorch, bad input is
//! refused clearly.

mod common;
use common::*;
use roentgen::models::Component;
use std::path::Path;

/// A small training run (batch 2, seed 3) of `steps` steps, with the flags a test adds.
fn train_args(pipe: &Path, data: &Path, out: &Path, steps: &str, extra: &[&str]) -> CliArgs {
    small_train_args(pipe, data, out).opt("--batch-size", "2").opt("--steps", steps).opt("--seed", "3").with(extra)
}

fn losses(out: &Path) -> Vec<f64> {
    jsonl_field(&out.join("train_log.jsonl"), "loss")
}

#[test]
fn training_lowers_the_loss_and_its_checkpoint_samples() {
    let (dir, pipe, data) = pipe_a_and_dataset(12);
    let out = dir.path().join("run");
    let (stdout, _) = train_args(&pipe, &data, &out, "60", &["--cache-latents", "--checkpoint-every", "30"]).run_ok();
    let l = losses(&out);
    assert_eq!(l.len(), 60);
    let first: f64 = l[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = l[50..].iter().sum::<f64>() / 10.0;
    println!("mean loss of steps 1-10: {first:.4}, of steps 51-60: {last:.4}");
    assert!(last < 0.9 * first, "the loss did not fall: {first} → {last}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let ckpt = v["checkpoint"].as_str().unwrap();
    assert!(ckpt.ends_with("checkpoint-60"));
    assert!(out.join("checkpoint-30/unet/diffusion_pytorch_model.safetensors").is_file());
    // The checkpoint is a pipeline folder: sample from it.
    let png = dir.path().join("s.png");
    let sample = sample_16px_args(Path::new(ckpt), "3", &png).opt("--prompt", "Large left pleural effusion.");
    sample.opt("--seed", "1").run_ok();
    assert!(png.is_file());
}

/// A pipeline whose U-Net is an inpainting one (9 input channels) learns from random masks: the
/// loss falls, and its checkpoint inpaints with `sample --init-image --mask`.
#[test]
fn training_an_inpainting_unet_lowers_the_loss_and_its_checkpoint_inpaints() {
    let (dir, pipe, data) = pipe_a_and_dataset(12);
    std::fs::remove_dir_all(pipe.join("unet")).unwrap();
    copy_dir(&fixture("inpaint/unet-9ch"), &pipe.join("unet"));
    let out = dir.path().join("run");
    let (_, err) = train_args(&pipe, &data, &out, "60", &["--cache-latents"]).run_ok();
    assert!(err.contains("inpainting one"), "the run does not say it trains an inpainting U-Net: {err}");
    let l = losses(&out);
    let first: f64 = l[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = l[50..].iter().sum::<f64>() / 10.0;
    println!("inpainting U-Net: mean loss of steps 1-10: {first:.4}, of steps 51-60: {last:.4}");
    assert!(last < 0.9 * first, "the loss did not fall: {first} → {last}");
    let png = dir.path().join("inpainted.png");
    sample_16px_args(&out.join("checkpoint-60"), "3", &png)
        .opt("--prompt", "Large left pleural effusion.")
        .opt("--init-image", fixture("img2img/rgb-16x16.png"))
        .opt("--mask", fixture("inpaint/mask-16x16.png"))
        .opt("--seed", "1")
        .run_ok();
    assert!(png.is_file());
}

#[test]
fn resumed_training_reproduces_the_uninterrupted_run_exactly() {
    let (dir, pipe, data) = pipe_a_and_dataset(5);
    let (a, bdir) = (dir.path().join("a"), dir.path().join("b"));
    let every_3_accum_2 = ["--checkpoint-every", "3", "--grad-accum", "2"];
    train_args(&pipe, &data, &a, "6", &every_3_accum_2).run_ok();
    train_args(&pipe, &data, &bdir, "3", &every_3_accum_2).run_ok();
    train_args(&pipe, &data, &bdir, "6", &every_3_accum_2).with(&["--resume"]).run_ok();
    let (la, lb) = (losses(&a), losses(&bdir));
    println!("uninterrupted {la:?}\nresumed       {lb:?}");
    assert_eq!(la.len(), 6);
    assert_eq!(la, lb, "losses differ after resume");
    for comp in ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"] {
        let fa = std::fs::read(a.join("checkpoint-6").join(comp)).unwrap();
        let fb = std::fs::read(bdir.join("checkpoint-6").join(comp)).unwrap();
        assert!(fa == fb, "{comp} differs between the uninterrupted and the resumed run");
    }
}

#[test]
fn train_step_matches_the_first_pytorch_step() {
    // The first of gen_train10's steps, from a pipeline folder holding the same models.
    let dir = tempfile::tempdir().unwrap();
    let pipe = train_step_pipeline(dir.path().join("pipe"));
    let io = fixture("train10/io.safetensors");
    let batch = dir.path().join("batch.safetensors");
    write_f32_tensors(&batch, &train10_first_batch());
    let out = dir.path().join("stepped");
    let (stdout, _) = train_step_args(&pipe, &batch, &out).opt("--lr", "1e-3").run_ok();
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let (loss, norm) = (v["loss"].as_f64().unwrap() as f32, v["grad_norm"].as_f64().unwrap() as f32);
    let (wl, wn) = (read_f32(&io, "losses").1[0], read_f32(&io, "grad_norms").1[0]);
    println!("train-step: loss {loss} (PyTorch {wl}), grad norm {norm} (PyTorch {wn})");
    assert!((loss - wl).abs() <= F32_PARITY * wl.max(1.0) && (norm - wn).abs() <= F32_PARITY * wn.max(1.0));
    assert!(out.join("unet/diffusion_pytorch_model.safetensors").is_file() && out.join("model_index.json").is_file());
    // refuses to overwrite silently
    let (code, _, err) = train_step_args(&pipe, &batch, &out).run();
    assert_eq!(code, 1);
    assert!(err.contains("--overwrite"), "{err}");
}

/// `train-step` on an inpainting U-Net's batch file (with `mask` and `masked_latents`) takes
/// PyTorch's first step of generate_train_inpaint.py; a file with only one of them is refused.
#[test]
fn train_step_of_an_inpainting_unet_matches_the_first_pytorch_step() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = train_step_pipeline_with(dir.path().join("pipe"), "inpaint/unet-9ch");
    let io = fixture("train-inpaint/io.safetensors");
    let batch = dir.path().join("batch.safetensors");
    write_f32_tensors(&batch, &train_inpaint_first_batch());
    let (stdout, _) = train_step_args(&pipe, &batch, &dir.path().join("stepped")).opt("--lr", "1e-3").run_ok();
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let (loss, norm) = (v["loss"].as_f64().unwrap() as f32, v["grad_norm"].as_f64().unwrap() as f32);
    let (wl, wn) = (read_f32(&io, "losses").1[0], read_f32(&io, "grad_norms").1[0]);
    println!("inpainting train-step: loss {loss} (PyTorch {wl}), grad norm {norm} (PyTorch {wn})");
    assert!((loss - wl).abs() <= F32_PARITY * wl.max(1.0) && (norm - wn).abs() <= F32_PARITY * wn.max(1.0));
    let half: Vec<_> = train_inpaint_first_batch().into_iter().filter(|(n, _, _)| n != "masked_latents").collect();
    write_f32_tensors(&batch, &half);
    train_step_args(&pipe, &batch, &dir.path().join("o2")).expect_error(&["needs both 'mask' and 'masked_latents'"]);
}

#[test]
fn bad_training_input_is_refused_clearly() {
    let (dir, pipe, data) = pipe_a_and_dataset(4);
    let out = dir.path().join("o");
    // resolution not a multiple of 8
    let (code, _, err) = train_args(&pipe, &data, &out, "1", &[]).set("--resolution", "12").run();
    assert!(code == 1 && err.contains("--resolution 12"), "{err}");
    // caption dropout outside [0, 1]
    let (code, _, err) = train_args(&pipe, &data, &out, "1", &["--uncond-prob", "1.5"]).run();
    assert!(code == 1 && err.contains("--uncond-prob 1.5"), "{err}");
    // missing image: fail by default, skip on request
    let bad = dir.path().join("data/bad.jsonl");
    std::fs::write(
        &bad,
        format!(
            "{}{{\"image\": \"img/missing.png\", \"text\": \"No acute process.\"}}\n",
            std::fs::read_to_string(&data).unwrap()
        ),
    )
    .unwrap();
    let (code, _, err) = train_args(&pipe, &bad, &out, "1", &[]).run();
    assert!(code == 1 && err.contains("missing.png") && err.contains("--on-bad-image skip"), "{err}");
    let (code, _, err) = train_args(&pipe, &bad, &out, "1", &["--on-bad-image", "skip"]).run();
    assert!(code == 0 && err.contains("skipping 1"), "{err}");
    // the output now exists: refused without --resume/--overwrite
    let (code, _, err) = train_args(&pipe, &data, &out, "1", &[]).run();
    assert!(code == 1 && err.contains("--resume") && err.contains("--overwrite"), "{err}");
    // empty text, unreadable image, malformed row
    let m = dir.path().join("data/m.jsonl");
    std::fs::write(&m, "{\"image\": \"img/0.png\", \"text\": \"  \"}\n").unwrap();
    let (code, _, err) = train_args(&pipe, &m, &dir.path().join("o2"), "1", &[]).run();
    assert!(code == 1 && err.contains("m.jsonl:1") && err.contains("empty text"), "{err}");
    std::fs::write(dir.path().join("data/img/junk.png"), b"not a png").unwrap();
    std::fs::write(&m, "{\"image\": \"img/junk.png\", \"text\": \"Small effusion.\"}\n").unwrap();
    let (code, _, err) = train_args(&pipe, &m, &dir.path().join("o3"), "1", &[]).run();
    assert!(code == 1 && err.contains("junk.png"), "{err}");
    std::fs::write(&m, "{\"picture\": \"img/0.png\"}\n").unwrap();
    let (code, _, err) = train_args(&pipe, &m, &dir.path().join("o4"), "1", &[]).run();
    assert!(code == 1 && err.contains("m.jsonl:1") && err.contains("\"image\""), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn ema_follows_diffusers_decay_and_samples() {
    let (dir, pipe, data) = pipe_a_and_dataset(4);
    let out = dir.path().join("run");
    train_args(&pipe, &data, &out, "3", &["--ema", "--checkpoint-every", "1"]).run_ok();
    let w = |k: usize| read_all(&out.join(format!("checkpoint-{k}/unet/diffusion_pytorch_model.safetensors")));
    let ema3 = read_all(&out.join("checkpoint-3/unet_ema/diffusion_pytorch_model.safetensors"));
    let (w1, w2, w3) = (w(1), w(2), w(3));
    // diffusers EMAModel: decay 0 at the first step, then min(0.9999, (1 + t) / (10 + t)).
    let (d2, d3) = (2.0f32 / 11.0, 3.0f32 / 12.0);
    let mut worst = 0f32;
    for (((n, a), (_, b)), ((_, c), (_, e))) in w1.iter().zip(&w2).zip(w3.iter().zip(&ema3)) {
        for i in 0..a.len() {
            let mut m = a[i];
            m -= (1.0 - d2) * (m - b[i]);
            m -= (1.0 - d3) * (m - c[i]);
            worst = worst.max((m - e[i]).abs());
        }
        assert!(worst < 1e-5, "{n}: EMA off by {worst}");
    }
    println!("EMA after 3 steps: max deviation from the formula {worst:.1e}");
    let png = dir.path().join("e.png");
    let ckpt = out.join("checkpoint-3");
    sample_16px_args(&ckpt, "2", &png).with(&["--ema"]).opt("--prompt", "x ray").run_ok();
}

#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let (dir, pipe, data) = pipe_a_and_dataset(4);
    let out = dir.path().join("run");
    let a = train_args(&pipe, &data, &out, "10", &["--checkpoint-every", "1", "--max-grad-norm", "0"]);
    let (code, _, err) = a.set("--lr", "1e30").run();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("stopping") && err.contains("the last checkpoint,") && err.contains("is intact"), "{err}");
    assert!(!err.contains("panicked"));
    // Step 1 ran with finite gradients; its checkpoint is complete and loadable.
    let ck = out.join("checkpoint-1");
    assert!(
        ck.join("unet/diffusion_pytorch_model.safetensors").is_file()
            && ck.join("training_state/trainer.json").is_file()
    );
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name().to_string_lossy().starts_with(".tmp")
                || e.file_name().to_string_lossy().contains("roentgen-tmp")
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary folders left behind");
}

#[test]
fn train_vae_from_scratch_lowers_the_reconstruction_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = synthetic_dataset(&dir.path().join("data"), 6);
    let out = dir.path().join("vae-run");
    let cfg = fixture("vae-a/config.json");
    let a = train_vae_args(&cfg, &data, &out).with(&["--resolution", "16", "--batch-size", "2", "--steps", "40"]);
    let (stdout, _) = a.with(&["--lr", "2e-3", "--log-every", "1", "--kl-weight", "1e-4"]).run_ok();
    let rec: Vec<f64> = std::fs::read_to_string(out.join("train_vae_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["rec_loss"].as_f64().unwrap())
        .collect();
    let (first, last) = (rec[..5].iter().sum::<f64>() / 5.0, rec[35..].iter().sum::<f64>() / 5.0);
    println!("VAE reconstruction MSE: steps 1-5 {first:.4}, steps 36-40 {last:.4}");
    assert!(last < 0.5 * first, "{first} → {last}");
    let ck: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let mut b = roentgen::backend::cpu::CpuBackend::new();
    roentgen::models::vae::AutoencoderKL::load(&mut b, Path::new(ck["checkpoint"].as_str().unwrap()), None).unwrap();
}

#[test]
fn training_against_a_frozen_bert_encoder_with_a_random_unet() {
    // The paper's "Text Encoders" rows: a domain BERT replaces CLIP, frozen; the U-Net is trained
    // from scratch with cross-attention sized for the encoder (16 here, vs pipe-a's 8).
    let (dir, pipe, data) = pipe_a_and_dataset(4);
    let te = dir.path().join("bert-encoder");
    copy_dir(&fixture("pipe-bert/text_encoder"), &te);
    copy_dir(&fixture("pipe-bert/tokenizer"), &te);
    let out = dir.path().join("run");
    let extra = ["--text-encoder", te.to_str().unwrap(), "--freeze-text-encoder", "--unet-init", "random"];
    let (stdout, _) = train_args(&pipe, &data, &out, "3", &extra).run_ok();
    let ck = out.join("checkpoint-3");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("model_index.json")).unwrap()).unwrap();
    assert_eq!(index["text_encoder"][1], "BertModel");
    assert_eq!(index["tokenizer"][1], "BertTokenizer");
    let unet_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ck.join("unet/config.json")).unwrap()).unwrap();
    assert_eq!(unet_cfg["cross_attention_dim"], 16);
    // Frozen: the saved encoder equals the one we started from.
    let mut b = roentgen::backend::cpu::CpuBackend::new();
    let (orig, _) = roentgen::models::text::TextEncoder::load(&mut b, &te, None).unwrap();
    let (saved, _) = roentgen::models::text::TextEncoder::load(&mut b, &ck.join("text_encoder"), None).unwrap();
    use roentgen::backend::Backend;
    for (e1, e2) in orig.table().entries().iter().zip(saved.table().entries()) {
        let t = |tab: &roentgen::tensor::Layout, e: &roentgen::tensor::LayoutEntry| {
            roentgen::tensor::Tensor::new(tab.pool(), e.offset, e.shape)
        };
        assert_eq!(
            b.download(&t(orig.table(), e1)).unwrap(),
            b.download(&t(saved.table(), e2)).unwrap(),
            "{} changed",
            e1.name
        );
    }
    assert!(stdout.contains("checkpoint-3"));
    let png = dir.path().join("b.png");
    sample_16px_args(&ck, "2", &png).opt("--prompt", "Large left pleural effusion.").run_ok();
    // Without --unet-init random the sizes cannot match: refused with the way out.
    let (code, _, err) = train_args(&pipe, &data, &dir.path().join("o2"), "1", &[]).opt("--text-encoder", &te).run();
    assert!(code == 1 && err.contains("--unet-init random"), "{err}");
}

#[test]
fn uncond_prob_one_trains_on_the_empty_prompt_only() {
    // With --uncond-prob 1 every caption is dropped, so two manifests that differ only in their
    // texts must give identical weights; without dropout they must not.
    let (dir, pipe, data) = pipe_a_and_dataset(4);
    let other = dir.path().join("data/other.jsonl");
    let text = std::fs::read_to_string(&data).unwrap();
    let swapped: String = text
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["text"] = serde_json::Value::from("Large right pneumothorax with mediastinal shift.");
            format!("{v}\n")
        })
        .collect();
    std::fs::write(&other, swapped).unwrap();
    let weights = |manifest: &Path, tag: &str, prob: &str| {
        let out = dir.path().join(tag);
        train_args(&pipe, manifest, &out, "2", &["--uncond-prob", prob]).run_ok();
        read_all(&out.join("checkpoint-2/unet/diffusion_pytorch_model.safetensors"))
    };
    assert!(weights(&data, "a1", "1") == weights(&other, "b1", "1"), "captions leaked through --uncond-prob 1");
    assert!(weights(&data, "a0", "0") != weights(&other, "b0", "0"), "captions had no effect without dropout");
}

/// Randomness keyed by the sample (scheme 2): `--grad-accum 2` at batch 2 draws the same samples,
/// latents, timesteps, dropout and noise as batch 4, so the two runs differ only in the order of
/// the gradient's sums — the losses agree to f32 rounding, the weights after three AdamW steps
/// within 1e-5 (measured 9.5e-7; Adam divides by √v, which magnifies rounding in near-zero
/// gradients, so the bar is absolute on weights of size ~0.1–1, not bitwise). Under scheme 1 the
/// noise stream was per micro-batch, and this failed. The scheme is recorded in every checkpoint.
#[test]
fn grad_accum_draws_what_a_larger_batch_draws() {
    let (dir, pipe, data) = pipe_a_and_dataset(6);
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        small_train_args(&pipe, &data, &out).opt("--steps", "3").with(&["--uncond-prob", "0.3"]).with(extra).run_ok();
        out
    };
    let big = run("big", &["--batch-size", "4", "--seed", "5"]);
    let accum = run("accum", &["--batch-size", "2", "--grad-accum", "2", "--seed", "5"]);
    let (lb, la) = (losses(&big), losses(&accum));
    println!("losses batch 4 {lb:?}, grad-accum 2 {la:?}");
    for (a, b) in lb.iter().zip(&la) {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1.0), "loss {a} vs {b}");
    }
    let w = |out: &Path| read_all(&out.join("checkpoint-3/unet/diffusion_pytorch_model.safetensors"));
    let (wb, wa) = (w(&big), w(&accum));
    let worst = wb
        .iter()
        .zip(&wa)
        .flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    println!("weights after 3 steps: max |batch 4 − grad-accum 2| = {worst:.2e}");
    assert!(worst <= 1e-5, "{worst}");
    // A different seed changes them (the comparison can fail).
    let other = run("other", &["--batch-size", "4", "--seed", "6"]);
    assert_ne!(losses(&other), lb);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(big.join("checkpoint-3/training_state/trainer.json")).unwrap())
            .unwrap();
    assert_eq!(state["rng_scheme"], 2, "{state}");
}

/// A checkpoint of the earlier randomness scheme (no "rng_scheme" recorded) is not resumed as if
/// it were this one: refused with the reason, continued (with a warning) under
/// --allow-changed-settings.
#[test]
fn resuming_a_checkpoint_of_another_randomness_scheme_is_refused() {
    let (dir, pipe, data) = pipe_a_and_dataset(4);
    let out = dir.path().join("run");
    train_args(&pipe, &data, &out, "1", &[]).run_ok();
    let state_path = out.join("checkpoint-1/training_state/trainer.json");
    let mut state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state.as_object_mut().unwrap().remove("rng_scheme");
    std::fs::write(&state_path, serde_json::to_string(&state).unwrap()).unwrap();
    train_args(&pipe, &data, &out, "2", &["--resume"]).expect_error(&["randomness scheme 2 (checkpoint: 1"]);
    let (_, err) = train_args(&pipe, &data, &out, "2", &["--resume", "--allow-changed-settings"]).run_ok();
    assert!(err.contains("resuming with a changed setting: randomness scheme 2"), "{err}");
}

/// `train --gradient-checkpointing` recomputes each U-Net block's internals in the backward: on
/// the CPU the same arithmetic in the same order, so the same losses to the last bit.
#[test]
fn gradient_checkpointing_trains_the_same_steps() {
    let (dir, pipe, data) = pipe_a_and_dataset(4);
    let (kept, recomputed) = (dir.path().join("kept"), dir.path().join("recomputed"));
    train_args(&pipe, &data, &kept, "3", &[]).run_ok();
    train_args(&pipe, &data, &recomputed, "3", &["--gradient-checkpointing"]).run_ok();
    let (a, b) = (losses(&kept), losses(&recomputed));
    assert_eq!(a.len(), 3);
    assert_eq!(a, b, "losses keeping every activation vs recomputing");
}

/// `bench train-step --plan-only` lists what a real training step allocates, pool for pool: the
/// CPU backend's pools after loading pipe-a and building its trainer, in both modes.
#[test]
fn training_memory_plan_lists_what_the_trainer_allocates() {
    use roentgen::backend::Backend;
    use roentgen::train::{MicroBatchShape, OptimOptions, PredictionType, Trainer};
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let (stdout, _) = CliArgs::new(&["bench", "train-step", "--plan-only", "--json"])
        .opt("--model", &pipe)
        .with(&["--batch", "3", "--height", "48", "--width", "32"])
        .run_ok();
    let plan: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let cfg = pipe.join("scheduler/scheduler_config.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    let alphas = roentgen::sample::schedulers::training_alphas_cumprod(&json, &cfg).unwrap();
    for (mode, key) in [(false, "keeping_bytes"), (true, "recomputing_bytes")] {
        let mut b = roentgen::backend::cpu::CpuBackend::new();
        let (unet, _) = roentgen::models::unet::UNet::load(&mut b, &pipe.join("unet"), None).unwrap();
        let text = roentgen::models::text::TextEncoder::load(&mut b, &pipe.join("text_encoder"), None).unwrap().0;
        let opts = OptimOptions { gradient_checkpointing: mode, ..OptimOptions::default() };
        // pipe-a's VAE halves the image (two blocks): 48×32 px are 24×16 latents.
        let shape = MicroBatchShape { size: 3, h: 24, w: 16, seq: 77 };
        Trainer::new(&mut b, &unet, &text, opts, alphas.clone(), PredictionType::Epsilon, shape).unwrap();
        let want: Vec<(String, u64)> = b.pool_sizes().into_iter().map(|(l, n)| (l, n as u64)).collect();
        let got: Vec<(String, u64)> = plan["pools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["label"].as_str().unwrap().to_string(), p[key].as_u64().unwrap()))
            .collect();
        assert_eq!(got, want, "{key}");
    }
    let (keeping, recomputing) =
        (plan["total_keeping_bytes"].as_u64().unwrap(), plan["total_recomputing_bytes"].as_u64().unwrap());
    println!("pipe-a, batch 3 at 48×32 px: {keeping} B keeping every activation, {recomputing} B recomputing");
    assert!(recomputing < keeping);
}

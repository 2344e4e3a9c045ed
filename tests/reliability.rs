//! Nothing lost, nothing silent (issue 20): each case reproduces what a hostile week of use found —
//! data lost to a kill or a second run, outputs replacing what they should not, wrong results with
//! exit 0, panics on sizes — and checks that it now ends with a clear message or succeeds correctly.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A small training run (batch 1, seed 5) of `steps` steps, with the flags a test adds.
fn train_args(pipe: &Path, data: &Path, out: &Path, steps: usize, extra: &[&str]) -> CliArgs {
    let base = small_train_args(pipe, data, out).opt("--batch-size", "1").opt("--seed", "5");
    base.opt("--steps", steps.to_string()).with(extra)
}

fn sample_args(out: &Path, extra: &[&str]) -> CliArgs {
    let base = CliArgs::new(&["sample", "--prompt", "Left pleural effusion.", "--steps", "3", "--seed", "11"]);
    base.opt("--out", out).with(extra)
}

fn log_steps(path: &Path) -> Vec<u64> {
    jsonl_field(path, "step").into_iter().map(|s| s as u64).collect()
}

// 1. A corrupt image passes the header check and must not kill the run at draw time.
#[test]
fn an_image_that_fails_to_decode_while_training_is_skipped_or_named() {
    let (dir, pipe, data) = pipe_a_and_dataset(4);
    // A PNG cut after its header: image_dimensions reads it, decoding fails.
    let img = dir.path().join("data/img/1.png");
    let bytes = std::fs::read(&img).unwrap();
    std::fs::write(&img, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("skip");
    let (_, err) = train_args(&pipe, &data, &out, 4, &["--on-bad-image", "skip"]).run_ok();
    assert!(err.contains("1.png") && err.contains("replaced"), "{err}");
    assert_eq!(log_steps(&out.join("train_log.jsonl")), vec![1, 2, 3, 4]);
    // Without skip: the file and its manifest line are named, and nothing panics.
    let line = train_args(&pipe, &data, &dir.path().join("fail"), 4, &[]).expect_error(&["1.png", "train.jsonl:2"]);
    assert!(line.contains("--on-bad-image skip"), "{line}");
    // --verify-images finds it before any work.
    let line = train_args(&pipe, &data, &dir.path().join("verify"), 4, &["--verify-images"]).expect_error(&["1.png"]);
    assert!(line.contains("1 unreadable"), "{line}");
    assert!(!dir.path().join("verify/train_log.jsonl").exists(), "work started before the check");
}

// 2. Images are written as they are made; --skip-existing resumes a batch job with the same images.
#[test]
fn sample_writes_each_image_when_decoded_and_skip_existing_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    // 12 steps: long enough to see the first image long before the last
    let args = sample_args(&out, &["--num-images", "6", "--batch-size", "1"]).set("--steps", "12");
    let t0 = Instant::now();
    let mut child =
        Command::new(roentgen_bin()).args(args.iter()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let first = out.join("11-0000.png");
    let mut first_at = None;
    let status = loop {
        if first_at.is_none() && first.is_file() {
            first_at = Some(t0.elapsed());
        }
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let total = t0.elapsed();
    assert!(status.success());
    let first_at = first_at.expect("the first image was never seen before the run ended");
    println!("first image after {first_at:?} of {total:?}");
    // Six groups of one image: the first is written after about a sixth of the denoising.
    assert!(first_at.as_secs_f64() < 0.75 * total.as_secs_f64(), "first image at {first_at:?} of {total:?}");
    let names: Vec<PathBuf> = (0..6).map(|i| out.join(format!("11-{i:04}.png"))).collect();
    let before: Vec<Vec<u8>> = names.iter().map(|p| std::fs::read(p).unwrap()).collect();
    // Lose two images, resume: only they are computed, and they come out the same.
    std::fs::remove_file(&names[1]).unwrap();
    std::fs::remove_file(&names[4]).unwrap();
    let (_, err) = args.with(&["--skip-existing"]).run_ok();
    assert!(err.contains("sampling 2 image(s) (4 already written)"), "{err}");
    for (p, b) in names.iter().zip(&before) {
        assert_eq!(&std::fs::read(p).unwrap(), b, "{} differs after resuming", p.display());
    }
}

// 2 (Euler ancestral): its noise spans the whole batch; skipped images must not change the others.
#[test]
fn skip_existing_with_euler_ancestral_reproduces_the_missing_images() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a");
    let args = sample_args(&out, &["--num-images", "3", "--scheduler", "euler-a"]);
    args.run_ok();
    let p = out.join("11-0001.png");
    let before = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    args.with(&["--skip-existing"]).run_ok();
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

// 3. Two runs into one folder: the second is refused and names the holder; a kill frees the lock.
#[test]
fn a_second_training_run_into_a_locked_folder_is_refused() {
    let (dir, pipe, data) = pipe_a_and_dataset(2);
    let out = dir.path().join("run");
    let mut first = Command::new(roentgen_bin())
        .args(train_args(&pipe, &data, &out, 100_000, &["--checkpoint-every", "1"]).iter())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first run has written a checkpoint (it holds the lock by then).
    let t0 = Instant::now();
    while !out.join("checkpoint-1/training_state/trainer.json").is_file() {
        assert!(t0.elapsed() < Duration::from_secs(120), "the first run wrote no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    let line = train_args(&pipe, &data, &out, 3, &["--resume"]).expect_error(&["in use by another roentgen run"]);
    assert!(line.contains(&format!("pid {}", first.id())), "{line}");
    first.kill().unwrap();
    first.wait().unwrap();
    // The killed run's lock is gone with it: resume works (with more steps than the checkpoint's).
    resume_args(&pipe, &data, &out).run_ok();
}

/// A resume of `out` that runs one step past its newest checkpoint.
fn resume_args(pipe: &Path, data: &Path, out: &Path) -> CliArgs {
    let newest = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("checkpoint-")?.parse::<usize>().ok())
        .max()
        .unwrap();
    train_args(pipe, data, out, newest + 1, &["--resume", "--checkpoint-every", "1"])
}

// 4, 5. Leftover temporaries are cleaned; a torn log line and repeated steps are cut on resume.
#[test]
fn resume_cleans_leftovers_and_repairs_the_log() {
    let (dir, pipe, data) = pipe_a_and_dataset(2);
    let out = dir.path().join("run");
    train_args(&pipe, &data, &out, 2, &["--checkpoint-every", "1"]).run_ok();
    // What a kill -9 leaves: a temporary checkpoint (today's and an older version's names), a
    // torn log line, and logged steps past the newest checkpoint.
    std::fs::create_dir_all(out.join(".checkpoint-3.roentgen-tmp-999999999/unet")).unwrap();
    std::fs::create_dir_all(out.join(".tmp-checkpoint-3-999999999/unet")).unwrap();
    std::fs::remove_dir_all(out.join("checkpoint-2")).unwrap();
    let log = out.join("train_log.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("{\"step\": 3, \"loss\": 0.1");
    std::fs::write(&log, text).unwrap();
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 3);
    let (_, err) = train_args(&pipe, &data, &out, 3, &["--resume", "--checkpoint-every", "1"]).run_ok();
    assert!(err.contains("left by an interrupted run"), "{err}");
    let names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.contains("tmp")), "leftovers remain: {names:?}");
    assert_eq!(log_steps(&log), vec![1, 2, 3], "the log repeats or lost steps");
}

// 6. An output path that is not a regular file is never replaced, and is refused before the work.
#[test]
fn outputs_never_replace_a_fifo_or_an_earlier_image() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let png = dir.path().join("x.png");
    let line = sample_args(&png, &[]).opt("--dump", &fifo).expect_error(&["--dump", "a FIFO"]);
    assert!(line.contains("refusing to replace"), "{line}");
    assert!(!png.exists(), "the work ran before the output was checked");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO was replaced");
    // 14. A seed already used: the earlier image stays unless --overwrite.
    sample_args(&png, &[]).run_ok();
    let first = std::fs::read(&png).unwrap();
    sample_args(&png, &["--guidance", "7"]).expect_error(&["x.png", "--overwrite"]);
    assert_eq!(std::fs::read(&png).unwrap(), first);
    sample_args(&png, &["--guidance", "7", "--overwrite"]).run_ok();
    assert_ne!(std::fs::read(&png).unwrap(), first);
    // A FIFO as --prompts is named as such (not "no such file"), without blocking on it.
    let a = CliArgs::new(&["sample", "--steps", "1"]).opt("--prompts", &fifo).opt("--out", dir.path().join("y.png"));
    a.expect_error(&["--prompts", "a FIFO"]);
}

// 7. --checkpoints-total-limit keeps the newest; checkpoints hold only the pipeline's own files.
#[test]
fn checkpoint_retention_and_only_the_pipelines_files() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    std::fs::write(pipe.join("stray-notes.bin"), vec![7u8; 4096]).unwrap();
    let data = synthetic_dataset(&dir.path().join("data"), 2);
    let out = dir.path().join("run");
    train_args(&pipe, &data, &out, 4, &["--checkpoint-every", "1", "--checkpoints-total-limit", "2"]).run_ok();
    let mut ckpts: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    ckpts.sort();
    assert_eq!(ckpts, vec!["checkpoint-3", "checkpoint-4"]);
    let ck = out.join("checkpoint-4");
    assert!(!ck.join("stray-notes.bin").exists(), "a stray file of the source was copied");
    for comp in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        assert!(ck.join(comp).is_dir(), "{comp}/ missing from the checkpoint");
    }
    train_args(&pipe, &data, &dir.path().join("z"), 1, &["--checkpoints-total-limit", "0"])
        .expect_error(&["--checkpoints-total-limit 0"]);
}

// 8. Resume with changed settings is refused with the differences, unless allowed.
#[test]
fn resume_with_changed_settings_is_refused_unless_allowed() {
    let (dir, pipe, data) = pipe_a_and_dataset(2);
    let out = dir.path().join("run");
    train_args(&pipe, &data, &out, 1, &["--ema"]).run_ok();
    let changed = train_args(&pipe, &data, &out, 2, &["--resume"]).set("--lr", "2e-3").set("--seed", "6");
    let line = changed.expect_error(&["--lr 0.002", "--seed 6", "--ema", "--allow-changed-settings"]);
    assert!(line.contains("checkpoint: 5") || line.contains("(checkpoint: 5)"), "{line}");
    let (_, err) = changed.with(&["--allow-changed-settings"]).run_ok();
    assert!(err.contains("resuming with a changed setting"), "{err}");
}

// 9. A broken VAE is an error naming the stage or the field, never a black PNG with exit 0.
#[test]
fn a_broken_vae_is_named_not_a_black_image() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let cfg_path = pipe.join("vae/config.json");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let mut zero = cfg.clone();
    zero["scaling_factor"] = 0.0.into();
    std::fs::write(&cfg_path, zero.to_string()).unwrap();
    let a = sample_16px_args(&pipe, "2", dir.path().join("b.png")).with(&["--prompt", "Effusion.", "--seed", "1"]);
    a.expect_error(&["vae/config.json", "scaling_factor"]);
    // NaN weights in the decoder: the decoded image is named as the stage that went non-finite.
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let wpath = pipe.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&wpath).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut entries: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.iter().map(|(n, v)| (n.to_string(), v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    let e = entries.iter_mut().find(|e| e.0.starts_with("decoder.conv_out.weight")).expect("decoder.conv_out.weight");
    let nan = f32::NAN.to_le_bytes();
    match e.1 {
        safetensors::Dtype::F32 => e.3[..4].copy_from_slice(&nan),
        safetensors::Dtype::F16 => e.3[..2].copy_from_slice(&half::f16::NAN.to_le_bytes()),
        d => panic!("unexpected dtype {d:?}"),
    }
    let views: Vec<_> = entries
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&wpath, safetensors::serialize(views, None).unwrap()).unwrap();
    a.expect_error(&["VAE decoder's output", "non-finite"]);
    assert!(!dir.path().join("b.png").exists(), "a broken image was written");
}

// 10. Optimizer and loss flags are validated up front and named.
#[test]
fn optimizer_flags_are_validated_before_any_work() {
    let (dir, pipe, data) = pipe_a_and_dataset(2);
    for (flag, value) in [
        ("--lr", "-1"),
        ("--lr", "NaN"),
        ("--adam-beta1", "-0.1"),
        ("--adam-beta2", "1.5"),
        ("--adam-eps", "0"),
        ("--weight-decay", "-1"),
        ("--max-grad-norm", "NaN"),
        ("--max-grad-norm", "-2"),
        ("--ema-decay", "1.5"),
    ] {
        let out = dir.path().join(format!("o{flag}{value}"));
        let arg = format!("{flag}={value}");
        let mut a = train_args(&pipe, &data, &out, 1, &[&arg]);
        if flag == "--lr" {
            a = a.without("--lr");
        }
        if flag == "--ema-decay" {
            a.push("--ema".into());
        }
        a.expect_error(&[flag]);
        assert!(!out.join("train_log.jsonl").exists(), "{flag} {value}: training started");
    }
    let vae = train_vae_args(&pipe.join("vae/config.json"), &data, &dir.path().join("v"));
    vae.with(&["--kl-weight=-1", "--resolution", "16"]).expect_error(&["--kl-weight -1"]);
    // train-step --lr NaN used to write an all-NaN U-Net with exit 0.
    let o = dir.path().join("ts");
    train_step_args(&pipe, Path::new("x.safetensors"), &o).opt("--lr", "NaN").expect_error(&["--lr NaN"]);
    assert!(!o.exists());
}

// 15. Sizes from flags are bounded before anything is allocated.
#[test]
fn huge_sizes_from_flags_end_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    sample_args(&out, &["--num-images", "9223372036854775808"]).expect_error(&["--num-images", "split the job"]);
    sample_args(&out, &["--num-images", "100000000000"]).expect_error(&["--num-images"]);
    let phantom = CliArgs::new(&["phantom", "--count", "18446744073709551615"]).opt("--out", dir.path().join("p"));
    phantom.expect_error(&["--count 18446744073709551615"]);
    let bench = CliArgs::new(&["bench", "unet", "--random-weights", "--iters", "18446744073709551615"]);
    bench.opt("--model", fixture("pipe-a")).expect_error(&["--iters"]);
    CliArgs::new(&["--threads", "100000", "inspect", "x"]).expect_error(&["--threads 100000"]);
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let data = synthetic_dataset(&dir.path().join("data"), 2);
    train_args(&pipe, &data, &dir.path().join("g"), 1, &["--grad-accum", "18446744073709551615"])
        .expect_error(&["--grad-accum"]);
    // train-step with a batch of 0 examples
    let batch = dir.path().join("b0.safetensors");
    write_f32(&batch, "latents", &[0, 4, 2, 2], &[]);
    train_step_args(&pipe, &batch, &dir.path().join("ts")).expect_error(&["b0.safetensors", "latents"]);
}

// 15. `inspect … | head`: a closed pipe ends the program quietly, not with a panic.
#[test]
fn a_closed_stdout_pipe_is_not_a_panic() {
    let mut child = Command::new(roentgen_bin())
        .args(["inspect", fixture("pipe-a").to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

// 14. What was really used is recorded: no clock seed for a --latents-in run, all settings, and an
// A1111-style `parameters` chunk.
#[test]
fn png_metadata_records_what_was_used() {
    let dir = tempfile::tempdir().unwrap();
    let lat = dir.path().join("init.safetensors");
    // The demo model samples 64×64 images: 16×16 latents.
    let values: Vec<f32> = (0..4 * 16 * 16).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    write_f32(&lat, "latents", &[1, 4, 16, 16], &values);
    let out = dir.path().join("o");
    let a = CliArgs::new(&["sample", "--prompt", "Left pleural effusion.", "--steps", "2"]).opt("--latents-in", &lat);
    let (_, err) = a.opt("--out", &out).with(&["--karras-sigmas", "--scheduler", "euler"]).run_ok();
    let png = out.join("init-0000.png");
    assert!(png.is_file(), "expected the name to come from the latents file: {err}");
    let (_, _, _, _, text) = roentgen::io::images::read_png(&png).unwrap();
    let get = |k: &str| text.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    assert_eq!(get("seed"), None, "a seed that drew nothing is recorded");
    assert_eq!(get("latents_in").as_deref(), lat.to_str());
    assert_eq!(get("karras_sigmas").as_deref(), Some("true"));
    assert_eq!(get("scheduler").as_deref(), Some("euler"));
    let params = get("parameters").expect("A1111 parameters chunk");
    assert!(params.starts_with("Left pleural effusion.\nSteps: 2, Sampler: Euler Karras, CFG scale: 4"), "{params}");
}

// 17. A device or FIFO given as an input is named as such (it was "no such file", or a hang).
#[test]
fn a_device_or_fifo_input_is_named_not_missing() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let f = fifo.to_str().unwrap();
    let out = dir.path().join("o.png");
    let a =
        CliArgs::new(&["sample", "--steps", "1", "--prompt", "Effusion.", "--model", "/dev/zero"]).opt("--out", &out);
    a.expect_error(&["/dev/zero", "a device", "not a folder"]);
    a.set("--model", f).expect_error(&["fifo", "a FIFO", "not a folder"]);
    sample_args(&out, &["--latents-in", f]).expect_error(&["fifo", "a FIFO", "not a regular file"]);
    CliArgs::new(&["inspect", "/dev/zero"]).expect_error(&["/dev/zero", "a device"]);
}

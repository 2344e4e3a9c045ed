//! Nothing lost, nothing silent (issue 20): each case reproduces what a hostile week of use found —
//! data lost to a kill or a second run, outputs replacing what they should not, wrong results with
//! exit 0, panics on sizes — and checks that it now ends with a clear message or succeeds correctly.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn train_args(pipe: &Path, data: &Path, out: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "train",
        "--model",
        pipe.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--resolution",
        "16",
        "--batch-size",
        "1",
        "--lr",
        "1e-3",
        "--log-every",
        "1",
        "--seed",
        "5",
        "--steps",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push(steps.to_string());
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn run(args: &[String]) -> (i32, String, String) {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run_cli(&a, None)
}

fn expect_error(args: &[String], needles: &[&str]) -> String {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    expect_cli_error(&a, needles)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn sample_args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = strings(&["sample", "--prompt", "Left pleural effusion.", "--steps", "3", "--seed", "11", "--out"]);
    v.push(out.to_str().unwrap().to_string());
    v.extend(strings(extra));
    v
}

fn log_steps(path: &Path) -> Vec<u64> {
    jsonl_field(path, "step").into_iter().map(|s| s as u64).collect()
}

// 1. A corrupt image passes the header check and must not kill the run at draw time.
#[test]
fn an_image_that_fails_to_decode_while_training_is_skipped_or_named() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let data = synthetic_dataset(&dir.path().join("data"), 4);
    // A PNG cut after its header: image_dimensions reads it, decoding fails.
    let img = dir.path().join("data/img/1.png");
    let bytes = std::fs::read(&img).unwrap();
    std::fs::write(&img, &bytes[..bytes.len() / 2]).unwrap();
    let out = dir.path().join("skip");
    let (code, _, err) = run(&train_args(&pipe, &data, &out, 4, &["--on-bad-image", "skip"]));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("1.png") && err.contains("replaced"), "{err}");
    assert_eq!(log_steps(&out.join("train_log.jsonl")), vec![1, 2, 3, 4]);
    // Without skip: the file and its manifest line are named, and nothing panics.
    let line = expect_error(&train_args(&pipe, &data, &dir.path().join("fail"), 4, &[]), &["1.png", "train.jsonl:2"]);
    assert!(line.contains("--on-bad-image skip"), "{line}");
    // --verify-images finds it before any work.
    let line = expect_error(&train_args(&pipe, &data, &dir.path().join("verify"), 4, &["--verify-images"]), &["1.png"]);
    assert!(line.contains("1 unreadable"), "{line}");
    assert!(!dir.path().join("verify/train_log.jsonl").exists(), "work started before the check");
}

// 2. Images are written as they are made; --skip-existing resumes a batch job with the same images.
#[test]
fn sample_writes_each_image_when_decoded_and_skip_existing_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    let mut args = sample_args(&out, &["--num-images", "6", "--batch-size", "1"]);
    args[4] = "12".into(); // steps: long enough to see the first image long before the last
    let t0 = Instant::now();
    let mut child =
        Command::new(roentgen_bin()).args(&args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
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
    let mut again = args.clone();
    again.push("--skip-existing".into());
    let (code, _, err) = run(&again);
    assert_eq!(code, 0, "{err}");
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
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    let p = out.join("11-0001.png");
    let before = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    let mut again = args.clone();
    again.push("--skip-existing".into());
    let (code, _, err) = run(&again);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

// 3. Two runs into one folder: the second is refused and names the holder; a kill frees the lock.
#[test]
fn a_second_training_run_into_a_locked_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let data = synthetic_dataset(&dir.path().join("data"), 2);
    let out = dir.path().join("run");
    let mut first = Command::new(roentgen_bin())
        .args(train_args(&pipe, &data, &out, 100_000, &["--checkpoint-every", "1"]))
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
    let line = expect_error(&train_args(&pipe, &data, &out, 3, &["--resume"]), &["in use by another roentgen run"]);
    assert!(line.contains(&format!("pid {}", first.id())), "{line}");
    first.kill().unwrap();
    first.wait().unwrap();
    // The killed run's lock is gone with it: resume works (with more steps than the checkpoint's).
    let (code, _, err) = run(&resume_args(&pipe, &data, &out));
    assert_eq!(code, 0, "{err}");
}

/// A resume of `out` that runs one step past its newest checkpoint.
fn resume_args(pipe: &Path, data: &Path, out: &Path) -> Vec<String> {
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
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let data = synthetic_dataset(&dir.path().join("data"), 2);
    let out = dir.path().join("run");
    let (code, _, err) = run(&train_args(&pipe, &data, &out, 2, &["--checkpoint-every", "1"]));
    assert_eq!(code, 0, "{err}");
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
    let (code, _, err) = run(&train_args(&pipe, &data, &out, 3, &["--resume", "--checkpoint-every", "1"]));
    assert_eq!(code, 0, "{err}");
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
    let line = expect_error(&sample_args(&png, &["--dump", fifo.to_str().unwrap()]), &["--dump", "a FIFO"]);
    assert!(line.contains("refusing to replace"), "{line}");
    assert!(!png.exists(), "the work ran before the output was checked");
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo(), "the FIFO was replaced");
    // 14. A seed already used: the earlier image stays unless --overwrite.
    let (code, _, err) = run(&sample_args(&png, &[]));
    assert_eq!(code, 0, "{err}");
    let first = std::fs::read(&png).unwrap();
    expect_error(&sample_args(&png, &["--guidance", "7"]), &["x.png", "--overwrite"]);
    assert_eq!(std::fs::read(&png).unwrap(), first);
    let (code, _, err) = run(&sample_args(&png, &["--guidance", "7", "--overwrite"]));
    assert_eq!(code, 0, "{err}");
    assert_ne!(std::fs::read(&png).unwrap(), first);
    // A FIFO as --prompts is named as such (not "no such file"), without blocking on it.
    let mut a = strings(&["sample", "--steps", "1", "--prompts", fifo.to_str().unwrap(), "--out"]);
    a.push(dir.path().join("y.png").to_str().unwrap().into());
    expect_error(&a, &["--prompts", "a FIFO"]);
}

// 7. --checkpoints-total-limit keeps the newest; checkpoints hold only the pipeline's own files.
#[test]
fn checkpoint_retention_and_only_the_pipelines_files() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    std::fs::write(pipe.join("stray-notes.bin"), vec![7u8; 4096]).unwrap();
    let data = synthetic_dataset(&dir.path().join("data"), 2);
    let out = dir.path().join("run");
    let (code, _, err) =
        run(&train_args(&pipe, &data, &out, 4, &["--checkpoint-every", "1", "--checkpoints-total-limit", "2"]));
    assert_eq!(code, 0, "{err}");
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
    expect_error(
        &train_args(&pipe, &data, &dir.path().join("z"), 1, &["--checkpoints-total-limit", "0"]),
        &["--checkpoints-total-limit 0"],
    );
}

// 8. Resume with changed settings is refused with the differences, unless allowed.
#[test]
fn resume_with_changed_settings_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let data = synthetic_dataset(&dir.path().join("data"), 2);
    let out = dir.path().join("run");
    let (code, _, err) = run(&train_args(&pipe, &data, &out, 1, &["--ema"]));
    assert_eq!(code, 0, "{err}");
    let mut changed = train_args(&pipe, &data, &out, 2, &["--resume"]);
    let i = changed.iter().position(|x| x == "1e-3").unwrap();
    changed[i] = "2e-3".into();
    let i = changed.iter().position(|x| x == "--seed").unwrap();
    changed[i + 1] = "6".into();
    let line = expect_error(&changed, &["--lr 0.002", "--seed 6", "--ema", "--allow-changed-settings"]);
    assert!(line.contains("checkpoint: 5") || line.contains("(checkpoint: 5)"), "{line}");
    changed.push("--allow-changed-settings".into());
    let (code, _, err) = run(&changed);
    assert_eq!(code, 0, "{err}");
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
    let mut a = strings(&["sample", "--model", pipe.to_str().unwrap(), "--height", "16", "--width", "16"]);
    a.extend(strings(&["--steps", "2", "--prompt", "Effusion.", "--seed", "1", "--out"]));
    a.push(dir.path().join("b.png").to_str().unwrap().into());
    expect_error(&a, &["vae/config.json", "scaling_factor"]);
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
    expect_error(&a, &["VAE decoder's output", "non-finite"]);
    assert!(!dir.path().join("b.png").exists(), "a broken image was written");
}

// 10. Optimizer and loss flags are validated up front and named.
#[test]
fn optimizer_flags_are_validated_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let data = synthetic_dataset(&dir.path().join("data"), 2);
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
            let i = a.iter().position(|x| x == "1e-3").unwrap();
            a.drain(i - 1..=i);
        }
        if flag == "--ema-decay" {
            a.push("--ema".into());
        }
        expect_error(&a, &[flag]);
        assert!(!out.join("train_log.jsonl").exists(), "{flag} {value}: training started");
    }
    let vae = strings(&["train-vae", "--config", pipe.join("vae/config.json").to_str().unwrap(), "--data"]);
    let mut a = vae.clone();
    a.extend([data.to_str().unwrap().to_string(), "--output".into(), dir.path().join("v").to_str().unwrap().into()]);
    a.extend(strings(&["--kl-weight=-1", "--resolution", "16"]));
    expect_error(&a, &["--kl-weight -1"]);
    // train-step --lr NaN used to write an all-NaN U-Net with exit 0.
    let mut a = strings(&["train-step", "--model", pipe.to_str().unwrap(), "--batch", "x.safetensors", "--output"]);
    let o = dir.path().join("ts");
    a.extend([o.to_str().unwrap().to_string(), "--lr".into(), "NaN".into()]);
    expect_error(&a, &["--lr NaN"]);
    assert!(!o.exists());
}

// 15. Sizes from flags are bounded before anything is allocated.
#[test]
fn huge_sizes_from_flags_end_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("s");
    expect_error(&sample_args(&out, &["--num-images", "9223372036854775808"]), &["--num-images", "split the job"]);
    expect_error(&sample_args(&out, &["--num-images", "100000000000"]), &["--num-images"]);
    let mut a = strings(&["phantom", "--count", "18446744073709551615", "--out"]);
    a.push(dir.path().join("p").to_str().unwrap().into());
    expect_error(&a, &["--count 18446744073709551615"]);
    let mut a = strings(&["bench", "unet", "--random-weights", "--iters", "18446744073709551615", "--model"]);
    a.push(fixture("pipe-a").to_str().unwrap().into());
    expect_error(&a, &["--iters"]);
    expect_error(&strings(&["--threads", "100000", "inspect", "x"]), &["--threads 100000"]);
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let data = synthetic_dataset(&dir.path().join("data"), 2);
    expect_error(
        &train_args(&pipe, &data, &dir.path().join("g"), 1, &["--grad-accum", "18446744073709551615"]),
        &["--grad-accum"],
    );
    // train-step with a batch of 0 examples
    let batch = dir.path().join("b0.safetensors");
    write_f32(&batch, "latents", &[0, 4, 2, 2], &[]);
    let mut a = strings(&["train-step", "--model", pipe.to_str().unwrap(), "--batch", batch.to_str().unwrap()]);
    a.extend(["--output".into(), dir.path().join("ts").to_str().unwrap().into()]);
    expect_error(&a, &["b0.safetensors", "latents"]);
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
    let a = strings(&["sample", "--prompt", "Left pleural effusion.", "--steps", "2", "--latents-in"])
        .into_iter()
        .chain([lat.to_str().unwrap().to_string(), "--out".into(), out.to_str().unwrap().into()])
        .chain(strings(&["--karras-sigmas", "--scheduler", "euler"]))
        .collect::<Vec<_>>();
    let (code, _, err) = run(&a);
    assert_eq!(code, 0, "{err}");
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
    let mut a = strings(&["sample", "--steps", "1", "--prompt", "Effusion.", "--model", "/dev/zero", "--out"]);
    a.push(out.to_str().unwrap().into());
    expect_error(&a, &["/dev/zero", "a device", "not a folder"]);
    a[6] = f.into();
    expect_error(&a, &["fifo", "a FIFO", "not a folder"]);
    expect_error(&sample_args(&out, &["--latents-in", f]), &["fifo", "a FIFO", "not a regular file"]);
    expect_error(&strings(&["inspect", "/dev/zero"]), &["/dev/zero", "a device"]);
}

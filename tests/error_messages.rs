//! Issue 20, item 17 ("unclear errors"): bad input to every subcommand, one row per case, each with
//! the needles its `error:` line must contain — the file, flag, tensor or field the user must fix.
//! Rows marked `fixed` failed on the binary before that fix (a first line that did not name what to
//! fix, or exit 0 having done something silently wrong); the others are regression guards.
//! Permission cases (a read-only output folder) are left out: these tests may run as root.

mod common;

use common::{
    assemble_pipeline, copy_dir, expect_cli_error, sample_16px_args, train10_first_batch, train_step_args,
    train_step_pipeline, write_f32_tensors,
};
use std::path::PathBuf;

/// The folder every row works in: a pipe-a pipeline, a train-step pipeline and its batch, and the
/// malformed inputs the rows point at.
struct Setup {
    dir: tempfile::TempDir,
    pipe: PathBuf,
    step_pipe: PathBuf,
}

impl Setup {
    fn path(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }
}

/// train-step's batch from the train10 fixture, with `edit` applied to (name, shape, values).
fn write_batch(s: &Setup, file: &str, edit: impl Fn(&str, &mut Vec<f32>)) {
    let mut named = train10_first_batch();
    for (name, _, v) in &mut named {
        edit(name, v);
    }
    write_f32_tensors(&s.dir.path().join(file), &named);
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pipe = assemble_pipeline("pipe-a", d);
    // A pipeline for train-step, as tests/cuda.rs assembles it.
    let step_pipe = train_step_pipeline(d.join("step-pipe"));
    // A pipeline whose merges.txt is empty (a truncated download).
    let empty_merges = d.join("empty-merges");
    copy_dir(&pipe, &empty_merges);
    std::fs::write(empty_merges.join("tokenizer/merges.txt"), "").unwrap();

    std::fs::create_dir(d.join("emptydir")).unwrap();
    std::fs::write(d.join("empty.txt"), "").unwrap();
    std::fs::write(d.join("blank.txt"), "\n  \n").unwrap();
    std::fs::write(d.join("a-file"), "not a folder").unwrap();
    std::fs::write(d.join("bad.jsonl"), "{\"image\": \"a.png\", \"text\": \"x\"}\nnot json\n").unwrap();
    std::fs::write(d.join("nokey.jsonl"), "{\"img\": \"a.png\", \"text\": \"x\"}\n").unwrap();
    // pipe-a: 16×16 px is 8×8 latents (VAE scale factor 2).
    let n = 4 * 8 * 8;
    let mut nan = vec![0.5f32; n];
    nan[3] = f32::NAN;
    write_f32_tensors(&d.join("latents-nan.safetensors"), &[("latents", vec![1, 4, 8, 8], nan)]);
    write_f32_tensors(&d.join("latents-misnamed.safetensors"), &[("noise", vec![1, 4, 8, 8], vec![0.0; n])]);
    write_f32_tensors(&d.join("latents-5d.safetensors"), &[("latents", vec![1, 1, 4, 8, 8], vec![0.0; n])]);
    let s = Setup { dir, pipe, step_pipe };
    write_batch(&s, "batch-t5000.safetensors", |name, v| {
        if name == "timesteps" {
            v.iter_mut().for_each(|t| *t = 5000.0)
        }
    });
    write_batch(&s, "batch-tneg.safetensors", |name, v| {
        if name == "timesteps" {
            v[0] = -1.0
        }
    });
    write_batch(&s, "batch-ids.safetensors", |name, v| {
        if name == "input_ids" {
            v[1] = 1e9
        }
    });
    write_batch(&s, "batch-latnan.safetensors", |name, v| {
        if name == "latents" {
            v[5] = f32::NAN
        }
    });
    write_batch(&s, "batch-noiseinf.safetensors", |name, v| {
        if name == "noise" {
            v[0] = f32::INFINITY
        }
    });
    let no_noise: Vec<_> = train10_first_batch().into_iter().filter(|(name, _, _)| name != "noise").collect();
    write_f32_tensors(&s.dir.path().join("batch-nonoise.safetensors"), &no_noise);
    s
}

/// One row: the arguments, the needles of the error line, and whether a fix of this item made it
/// pass (it failed before).
struct Row {
    name: &'static str,
    args: Vec<String>,
    needles: Vec<String>,
    fixed: bool,
}

fn rows(s: &Setup) -> Vec<Row> {
    let p = |rel: &str| s.path(rel);
    let pipe = s.pipe.display().to_string();
    let sample = |extra: &[&str]| -> Vec<String> { sample_16px_args(&s.pipe, "2", p("out") + "/").with(extra).into() };
    let train_step = |batch: &str| -> Vec<String> {
        // Each row its own --output: a row that succeeds on an older binary must not fail the next.
        let d = s.dir.path();
        train_step_args(&s.step_pipe, &d.join(batch), &d.join(format!("stepped-{batch}"))).into()
    };
    let v = |a: &[&str]| -> Vec<String> { a.iter().map(|x| x.to_string()).collect() };
    let row = |name, args, needles: &[&str], fixed| Row { name, args, needles: v(needles), fixed };
    vec![
        // ---- sample
        row(
            "sample --latents-in with a NaN names the file and tensor (was: the U-Net's output is non-finite)",
            sample(&["--prompt", "x", "--latents-in", &p("latents-nan.safetensors")]),
            &["latents-nan.safetensors", "'latents'", "non-finite"],
            true,
        ),
        row(
            "sample --prompts with an empty file names it (was: no prompt given)",
            sample(&["--prompts", &p("empty.txt")]),
            &["--prompts", "empty.txt", "no prompt"],
            true,
        ),
        row(
            "sample --prompts with only blank lines names it",
            sample(&["--prompts", &p("blank.txt")]),
            &["--prompts", "blank.txt"],
            true,
        ),
        row(
            "sample --timestep-spacing foo names the flag (was: the scheduler config's field)",
            sample(&["--prompt", "x", "--timestep-spacing", "foo"]),
            &["--timestep-spacing", "foo", "trailing"],
            true,
        ),
        row(
            "sample with an empty merges.txt names it (was: exit 0, letter-by-letter tokens)",
            sample_16px_args(&s.dir.path().join("empty-merges"), "2", p("out") + "/").opt("--prompt", "x").into(),
            &["merges.txt", "empty"],
            true,
        ),
        row(
            "sample --latents-in without a 'latents' tensor",
            sample(&["--prompt", "x", "--latents-in", &p("latents-misnamed.safetensors")]),
            &["latents-misnamed.safetensors", "'latents'"],
            false,
        ),
        row(
            "sample --latents-in of rank 5",
            sample(&["--prompt", "x", "--latents-in", &p("latents-5d.safetensors")]),
            &["latents-5d.safetensors", "shape"],
            false,
        ),
        row("sample --guidance nan", sample(&["--prompt", "x", "--guidance", "nan"]), &["--guidance"], false),
        row(
            "sample --dump into a missing folder",
            sample(&["--prompt", "x", "--dump", &p("nodir/d.safetensors")]),
            &["--dump", "nodir"],
            false,
        ),
        // ---- tokenize
        row(
            "tokenize --input a folder (was: line 1 is not valid UTF-8 text)",
            v(&["tokenize", "--model", &pipe, "--input", &p("emptydir")]),
            &["--input", "emptydir", "folder"],
            true,
        ),
        row(
            "tokenize --input a missing file names the flag",
            v(&["tokenize", "--model", &pipe, "--input", &p("nope.txt")]),
            &["--input", "nope.txt"],
            true,
        ),
        row(
            "tokenize with an empty merges.txt (was: exit 0)",
            v(&["tokenize", "--model", &p("empty-merges"), "--prompt", "x"]),
            &["merges.txt", "empty"],
            true,
        ),
        row(
            "tokenize --model a file",
            v(&["tokenize", "--model", &p("a-file"), "--prompt", "x"]),
            &["a-file", "not a folder"],
            false,
        ),
        // ---- encode-text
        row(
            "encode-text --out in a missing folder, before the work (was: a temporary's name)",
            v(&["encode-text", "--model", &pipe, "--prompt", "x", "--out", &p("nodir/x.safetensors")]),
            &["--out", "nodir/x.safetensors", "does not exist"],
            true,
        ),
        row(
            "encode-text --model a text encoder folder without --tokenizer says to give --tokenizer",
            v(&[
                "encode-text",
                "--model",
                &format!("{pipe}/text_encoder"),
                "--prompt",
                "x",
                "--out",
                &p("e.safetensors"),
            ]),
            &["--model", "--tokenizer", "text_encoder"],
            true,
        ),
        row(
            "encode-text --tokenizer an empty folder names the flag",
            v(&[
                "encode-text",
                "--model",
                &format!("{pipe}/text_encoder"),
                "--tokenizer",
                &p("emptydir"),
                "--prompt",
                "x",
                "--out",
                &p("e.safetensors"),
            ]),
            &["--tokenizer", "emptydir"],
            true,
        ),
        // ---- train-step
        row(
            "train-step timesteps out of range name the batch file and tensor",
            train_step("batch-t5000.safetensors"),
            &["batch-t5000.safetensors", "'timesteps'", "5000"],
            true,
        ),
        row(
            "train-step timestep -1 is refused (was: exit 0)",
            train_step("batch-tneg.safetensors"),
            &["batch-tneg.safetensors", "'timesteps'", "-1"],
            true,
        ),
        row(
            "train-step input_ids beyond the vocabulary name the batch file and tensor",
            train_step("batch-ids.safetensors"),
            &["batch-ids.safetensors", "'input_ids'", "vocabulary"],
            true,
        ),
        row(
            "train-step NaN latents name the batch file and tensor (was: the loss is NaN)",
            train_step("batch-latnan.safetensors"),
            &["batch-latnan.safetensors", "'latents'", "non-finite"],
            true,
        ),
        row(
            "train-step inf noise names the batch file and tensor",
            train_step("batch-noiseinf.safetensors"),
            &["batch-noiseinf.safetensors", "'noise'", "non-finite"],
            true,
        ),
        row(
            "train-step batch without noise",
            train_step("batch-nonoise.safetensors"),
            &["batch-nonoise.safetensors", "'noise'"],
            false,
        ),
        row(
            "train-step --batch a folder (passes since 82f76a8; before it: cannot map: No such device)",
            train_step("emptydir"),
            &["emptydir", "folder"],
            false,
        ),
        // ---- phantom
        row(
            "phantom --out a file names the flag (was: cannot create folder: File exists)",
            v(&["phantom", "--out", &p("a-file"), "--count", "1", "--size", "32"]),
            &["--out", "a-file", "not a folder"],
            true,
        ),
        row("phantom --size 8", v(&["phantom", "--out", &p("ph"), "--count", "1", "--size", "8"]), &["--size"], false),
        // ---- inspect
        row(
            "inspect an empty folder (was: exit 0, class unknown)",
            v(&["inspect", &p("emptydir")]),
            &["emptydir", "pipeline folder", "component folder"],
            true,
        ),
        row("inspect a missing path", v(&["inspect", &p("nope")]), &["nope", "no such"], false),
        // ---- train / train-vae
        row(
            "train --data with a line that is not JSON",
            v(&["train", "--model", &pipe, "--data", &p("bad.jsonl"), "--output", &p("run"), "--resolution", "16"]),
            &["bad.jsonl:2"],
            false,
        ),
        row(
            "train --data without an image field",
            v(&["train", "--model", &pipe, "--data", &p("nokey.jsonl"), "--output", &p("run"), "--resolution", "16"]),
            &["nokey.jsonl:1", "image"],
            false,
        ),
        row(
            "train --uncond-prob nan",
            v(&["train", "--model", &pipe, "--data", &p("nokey.jsonl"), "--output", &p("run"), "--uncond-prob", "nan"]),
            &["--uncond-prob"],
            false,
        ),
        row(
            "train-vae --config a folder",
            v(&["train-vae", "--config", &p("emptydir"), "--data", &p("nokey.jsonl"), "--output", &p("run")]),
            &["emptydir"],
            false,
        ),
        // ---- export, bench, eval, prepare
        row(
            "export --ema without unet_ema/",
            v(&["export", "--model", &pipe, "--out", &p("exported"), "--ema"]),
            &["--ema", "unet_ema"],
            false,
        ),
        row(
            "bench unet --height not a multiple of the VAE factor",
            v(&["bench", "unet", "--model", &pipe, "--height", "15", "--width", "16"]),
            &["--height"],
            false,
        ),
        row(
            "eval ms-ssim --manifest with a line that is not JSON",
            v(&["eval", "ms-ssim", "--manifest", &p("bad.jsonl")]),
            &["bad.jsonl:2"],
            false,
        ),
        row(
            "eval phantom --images an empty folder",
            v(&["eval", "phantom", "--images", &p("emptydir")]),
            &["emptydir", "no PNG"],
            false,
        ),
        row(
            "prepare iu-xray --reports a missing path",
            v(&["prepare", "iu-xray", "--reports", &p("nope"), "--out", &p("m.jsonl")]),
            &["--reports", "nope"],
            false,
        ),
        row(
            "prepare mimic --root a file",
            v(&["prepare", "mimic", "--root", &p("a-file"), "--out", &p("m.jsonl")]),
            &["--root", "a-file"],
            false,
        ),
    ]
}

#[test]
fn every_error_line_names_what_to_fix() {
    let s = setup();
    let rows = rows(&s);
    let mut failed = Vec::new();
    // Failing rows are collected and reported together below, without a panic message each.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for r in &rows {
        let args: Vec<&str> = r.args.iter().map(String::as_str).collect();
        let needles: Vec<&str> = r.needles.iter().map(String::as_str).collect();
        // Each row on its own, so that one report lists every failing row.
        let res = std::panic::catch_unwind(|| expect_cli_error(&args, &needles));
        if let Err(e) = res {
            let msg = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
            failed.push(format!("{}{}: {}", if r.fixed { "[fixed] " } else { "" }, r.name, msg.unwrap_or_default()));
        }
    }
    std::panic::set_hook(hook);
    // Nothing was written where the error said no.
    assert!(!s.dir.path().join("nodir").exists(), "an output folder was created");
    assert!(failed.is_empty(), "{} of {} rows failed:\n{}", failed.len(), rows.len(), failed.join("\n"));
}

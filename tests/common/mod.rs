//! Shared test helpers: fixture paths, safetensors reads, and the parity tolerances (kept here, in
//! one place, as ARCHITECTURE.md asks).
#![allow(dead_code)]

pub mod seeded;

use std::path::{Path, PathBuf};

/// CPU vs PyTorch in f32: max |a − b| ≤ F32_PARITY · max(1, max |b|).
pub const F32_PARITY: f32 = 1e-4;

/// The repository root: where the test binary was built, or $ROENTGEN_ROOT (test binaries copied to
/// another machine by scripts/gpu-bundle.sh run against that machine's checkout).
pub fn root() -> PathBuf {
    std::env::var_os("ROENTGEN_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The `roentgen` binary under test: cargo's, or $ROENTGEN_BIN.
pub fn roentgen_bin() -> PathBuf {
    std::env::var_os("ROENTGEN_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_roentgen")))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests").join("fixtures").join(rel)
}

pub fn sd14_config() -> PathBuf {
    root().join("weights").join("sd-v1-4-config")
}

/// Reads one tensor of a fixture file as f32 (F32 or I64 on disk).
pub fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
    let data = match t.dtype() {
        safetensors::Dtype::F32 => {
            t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
        }
        safetensors::Dtype::I64 => {
            t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect()
        }
        d => panic!("{name}: unexpected dtype {d:?}"),
    };
    (t.shape().to_vec(), data)
}

/// Every tensor of a safetensors file of f32, by name, sorted by name.
pub fn read_all(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st
        .iter()
        .map(|(n, t)| {
            (n.to_string(), t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

pub fn read_ids(path: &Path, name: &str) -> (Vec<usize>, Vec<u32>) {
    let (shape, v) = read_f32(path, name);
    (shape, v.into_iter().map(|x| x as u32).collect())
}

/// Prints how many of `total` cases differ from the reference (with `detail` on what the cases
/// cover) and fails showing the first five of `bad`.
pub fn assert_no_mismatches(what: &str, total: usize, detail: &str, bad: &[String]) {
    println!("{what}: {total} cases ({detail}), {} mismatches", bad.len());
    assert!(
        bad.is_empty(),
        "{what}: {} of {total} cases differ from the reference, e.g.\n{}",
        bad.len(),
        bad[..bad.len().min(5)].join("\n")
    );
}

/// Asserts the f32 parity bar and prints the error seen, so a passing run still shows the margin.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: {} values, reference has {}", got.len(), want.len());
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    let (mut max_err, mut at) = (0f32, 0);
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let e = (a - b).abs();
        if e > max_err || e.is_nan() {
            max_err = e;
            at = i;
        }
    }
    println!("{what}: max |ours - reference| = {max_err:.3e} (bar {:.1e}, scale {scale:.3})", rel * scale);
    assert!(
        max_err <= rel * scale,
        "{what}: max error {max_err:e} at index {at} (ours {}, reference {}) exceeds {:e}",
        got[at],
        want[at],
        rel * scale
    );
    // Guard against a vacuous comparison: the reference must not be constant.
    let first = want[0];
    assert!(want.iter().any(|&x| x != first), "{what}: reference tensor is constant");
}

/// Runs the roentgen binary; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(roentgen_bin())
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn roentgen");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs the binary from `cwd` (not the checkout), as a user runs it from their own folder; returns
/// (exit code, stdout, stderr).
pub fn run_cli_in(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(roentgen_bin())
        .args(args)
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("spawn roentgen");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// One numeric field of every line of a JSONL log (each line must parse: a torn line fails here).
pub fn jsonl_field(path: &Path, field: &str) -> Vec<f64> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: line {l:?}: {e}", path.display()));
            v[field].as_f64().unwrap_or_else(|| panic!("{}: no number {field:?} in {l}", path.display()))
        })
        .collect()
}

/// Runs the CLI expecting a clear failure: exit 1, no panic, and an `error:` line that contains
/// every needle (the file, flag or field a user must be told). Returns that line.
pub fn expect_cli_error(args: &[&str], needles: &[&str]) -> String {
    let (code, out, err) = run_cli(args, None);
    assert_eq!(code, 1, "expected exit 1 for {args:?}; stdout {out}; stderr {err}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_else(|| panic!("no error line: {err}"));
    for n in needles {
        assert!(line.contains(n), "error line lacks {n:?}: {line}");
    }
    println!("{args:?}\n  → {line}");
    line.to_string()
}

/// A `roentgen` command line, built word by word. It derefs to its words (a `Vec<String>`), so a
/// test can still look at them, change them or append to them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CliArgs(pub Vec<String>);

impl CliArgs {
    /// Starts a command line with these words: the subcommand (and any words that follow it).
    pub fn new(words: &[&str]) -> CliArgs {
        CliArgs(words.iter().map(|w| w.to_string()).collect())
    }

    /// Appends `flag value`; the value may be a path.
    pub fn opt(mut self, flag: &str, value: impl AsRef<std::ffi::OsStr>) -> CliArgs {
        let value = value.as_ref().to_str().unwrap_or_else(|| panic!("{flag}: not UTF-8: {:?}", value.as_ref()));
        self.0.extend([flag.to_string(), value.to_string()]);
        self
    }

    /// Appends words as they are: switches (`--ema`) or `--flag value` pairs written out.
    pub fn with(mut self, words: &[&str]) -> CliArgs {
        self.0.extend(words.iter().map(|w| w.to_string()));
        self
    }

    /// Puts these words first, before the subcommand (global flags such as `--device cuda`).
    pub fn globals(mut self, words: &[&str]) -> CliArgs {
        self.0.splice(0..0, words.iter().map(|w| w.to_string()));
        self
    }

    /// Replaces the value that follows `flag` (which must be there).
    pub fn set(mut self, flag: &str, value: &str) -> CliArgs {
        let i = self.position_of(flag);
        self.0[i + 1] = value.to_string();
        self
    }

    /// Removes `flag` and the value that follows it (which must be there).
    pub fn without(mut self, flag: &str) -> CliArgs {
        let i = self.position_of(flag);
        self.0.drain(i..=i + 1);
        self
    }

    fn position_of(&self, flag: &str) -> usize {
        self.0.iter().position(|w| w == flag).unwrap_or_else(|| panic!("{flag} is not in {:?}", self.0))
    }

    /// The words as `&str`s, as `run_cli` and `expect_cli_error` take them.
    pub fn strs(&self) -> Vec<&str> {
        self.0.iter().map(String::as_str).collect()
    }

    /// Runs the binary (stdin closed); returns (exit code, stdout, stderr).
    pub fn run(&self) -> (i32, String, String) {
        run_cli(&self.strs(), None)
    }

    /// Runs the binary and asserts that it exits 0 (the failure shows the command line and its
    /// stderr); returns (stdout, stderr).
    pub fn run_ok(&self) -> (String, String) {
        let (code, out, err) = self.run();
        assert_eq!(code, 0, "roentgen {} failed:\n{err}", self.0.join(" "));
        (out, err)
    }

    /// `expect_cli_error` for this command line: exit 1, no panic, an error line with every needle.
    pub fn expect_error(&self, needles: &[&str]) -> String {
        expect_cli_error(&self.strs(), needles)
    }
}

impl std::ops::Deref for CliArgs {
    type Target = Vec<String>;
    fn deref(&self) -> &Vec<String> {
        &self.0
    }
}

impl std::ops::DerefMut for CliArgs {
    fn deref_mut(&mut self) -> &mut Vec<String> {
        &mut self.0
    }
}

impl From<CliArgs> for Vec<String> {
    fn from(a: CliArgs) -> Vec<String> {
        a.0
    }
}

/// `roentgen train` of `pipe` on the `data` manifest into `out`, on 16 px images at --lr 1e-3,
/// logging every step: what the small training runs share. Tests add --batch-size, --steps,
/// --seed and the flags they test.
pub fn small_train_args(pipe: &Path, data: &Path, out: &Path) -> CliArgs {
    CliArgs::new(&["train"]).opt("--model", pipe).opt("--data", data).opt("--output", out).with(&[
        "--resolution",
        "16",
        "--lr",
        "1e-3",
        "--log-every",
        "1",
    ])
}

/// `roentgen train-vae` of the VAE `config` on the `data` manifest into `out`.
pub fn train_vae_args(config: &Path, data: &Path, out: &Path) -> CliArgs {
    CliArgs::new(&["train-vae"]).opt("--config", config).opt("--data", data).opt("--output", out)
}

/// `roentgen train-step` of `pipe` on the `batch` file, writing the stepped pipeline to `out`.
pub fn train_step_args(pipe: &Path, batch: &Path, out: &Path) -> CliArgs {
    CliArgs::new(&["train-step"]).opt("--model", pipe).opt("--batch", batch).opt("--output", out)
}

/// `roentgen sample` of `model`: 16×16 px in `steps` steps, into `out` (tests add the prompt).
pub fn sample_16px_args(model: &Path, steps: &str, out: impl AsRef<std::ffi::OsStr>) -> CliArgs {
    CliArgs::new(&["sample"])
        .opt("--model", model)
        .with(&["--height", "16", "--width", "16", "--steps", steps])
        .opt("--out", out)
}

/// `roentgen encode-text` of one prompt with `model`, into `out`.
pub fn encode_text_args(model: &Path, prompt: &str, out: &Path) -> CliArgs {
    CliArgs::new(&["encode-text"]).opt("--model", model).opt("--prompt", prompt).opt("--out", out)
}

/// `roentgen export` of `model` into `out` (tests add --dtype, --overwrite).
pub fn export_args(model: &Path, out: &Path) -> CliArgs {
    CliArgs::new(&["export"]).opt("--model", model).opt("--out", out)
}

/// Copies a folder (non-recursive files and one level of subfolders) into a new temp dir.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &dst.join(e.file_name()));
        } else {
            std::fs::copy(&p, dst.join(e.file_name())).unwrap();
        }
    }
}

/// tests/fixtures/param_counts.json: the real SD v1.4 components' parameter counts and FLOP,
/// counted by PyTorch (generate.py).
pub fn reference_counts() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("param_counts.json")).unwrap()).unwrap()
}

/// (n, c, h, w) → (n, h, w, c): PyTorch fixtures are NCHW, the engine is channels-last.
pub fn nchw_to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (nchw, nhwc) in nchw_nhwc_indices(n, c, h, w) {
        out[nhwc] = x[nchw];
    }
    out
}

/// (n, h, w, c) → (n, c, h, w).
pub fn nhwc_to_nchw(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for (nchw, nhwc) in nchw_nhwc_indices(n, c, h, w) {
        out[nchw] = x[nhwc];
    }
    out
}

/// Every element's (NCHW index, NHWC index) in a tensor of n × c × h × w.
fn nchw_nhwc_indices(n: usize, c: usize, h: usize, w: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n * c * h * w).map(move |i| {
        let (xx, y, ch, b) = (i % w, (i / w) % h, (i / (w * h)) % c, i / (w * h * c));
        (i, ((b * h + y) * w + xx) * c + ch)
    })
}

/// End to end (`roentgen sample` vs `StableDiffusionPipeline`, f32): the decoded image, in [0, 1],
/// within this absolute error; the final latents and embeddings within it relative to max(1, max|b|).
/// Looser than F32_PARITY because errors compound over the denoising steps.
pub const PIPELINE_ABS: f32 = 1e-3;

/// A sampling pipeline folder: a fixture pipe-* folder completed with the tiny text encoder and the
/// SD v1.4 tokenizer (removed from the fixtures to keep them small; see generate.py).
pub fn assemble_pipeline(name: &str, dst: &Path) -> PathBuf {
    let pipe = dst.join(name);
    copy_dir(&fixture(name), &pipe);
    copy_dir(&fixture("tiny-text-pipeline/text_encoder"), &pipe.join("text_encoder"));
    copy_dir(&sd14_config().join("tokenizer"), &pipe.join("tokenizer"));
    pipe
}

/// Writes one f32 tensor to a safetensors file.
pub fn write_f32(path: &Path, name: &str, shape: &[usize], data: &[f32]) {
    write_f32_tensors(path, &[(name, shape.to_vec(), data.to_vec())]);
}

/// Writes f32 tensors (name, shape, values) to one safetensors file.
pub fn write_f32_tensors<N: AsRef<str>>(path: &Path, tensors: &[(N, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> =
        tensors.iter().map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect()).collect();
    let views: Vec<_> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap();
            (n.as_ref().to_string(), view)
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// A pipeline folder for `train-step` at `pipe`: the grads fixture's U-Net, the train10 text
/// encoder, pipe-a's VAE and model_index.json, SD v1.4's scheduler and tokenizer.
pub fn train_step_pipeline(pipe: PathBuf) -> PathBuf {
    train_step_pipeline_with(pipe, "grads/unet")
}

/// [`train_step_pipeline`] with the U-Net of fixture folder `unet`.
pub fn train_step_pipeline_with(pipe: PathBuf, unet: &str) -> PathBuf {
    copy_dir(&fixture(unet), &pipe.join("unet"));
    copy_dir(&fixture("train10/text_encoder"), &pipe.join("text_encoder"));
    copy_dir(&fixture("pipe-a/vae"), &pipe.join("vae"));
    copy_dir(&sd14_config().join("scheduler"), &pipe.join("scheduler"));
    copy_dir(&sd14_config().join("tokenizer"), &pipe.join("tokenizer"));
    std::fs::copy(fixture("pipe-a/model_index.json"), pipe.join("model_index.json")).unwrap();
    pipe
}

/// The first batch of the train10 fixture (PyTorch's first training step) as train-step reads it:
/// (name, shape, values) of latents, noise, input_ids and timesteps.
pub fn train10_first_batch() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    first_batch("train10/io.safetensors", &["latents", "noise", "input_ids", "timesteps"])
}

/// The first batch of the train-inpaint fixture: train10's tensors and the inpainting U-Net's mask
/// and masked latents.
pub fn train_inpaint_first_batch() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let names = ["latents", "noise", "input_ids", "timesteps", "mask", "masked_latents"];
    first_batch("train-inpaint/io.safetensors", &names)
}

fn first_batch(io: &str, names: &[&str]) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let io = fixture(io);
    names
        .iter()
        .map(|name| {
            let (shape, v) = read_f32(&io, &format!("b0.{name}"));
            (name.to_string(), shape, v)
        })
        .collect()
}

/// A temporary folder holding pipe-a (`assemble_pipeline`) and a `synthetic_dataset` of `n` images
/// in data/: (the folder, the pipeline, the dataset's manifest).
pub fn pipe_a_and_dataset(n: usize) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pipe = assemble_pipeline("pipe-a", dir.path());
    let data = synthetic_dataset(&dir.path().join("data"), n);
    (dir, pipe, data)
}

/// 16×16 gray images whose content follows the text: a bright left or right half, or a bright
/// disc; with a JSONL manifest. Deterministic.
pub fn synthetic_dataset(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut manifest = String::new();
    for i in 0..n {
        let kind = i % 3;
        let img = image::GrayImage::from_fn(16, 16, |x, y| {
            let v = match kind {
                0 => {
                    if x < 8 {
                        220
                    } else {
                        30
                    }
                }
                1 => {
                    if x >= 8 {
                        220
                    } else {
                        30
                    }
                }
                _ => {
                    if (x as i32 - 8).pow(2) + (y as i32 - 8).pow(2) < 20 {
                        230
                    } else {
                        20
                    }
                }
            };
            image::Luma([(v + (i as u32 * 7 + x + y) % 11) as u8])
        });
        let p = dir.join(format!("img/{i}.png"));
        img.save(&p).unwrap();
        let text =
            ["Large left pleural effusion.", "Large right pleural effusion.", "Rounded opacity in the mid lung."][kind];
        manifest.push_str(&format!("{{\"image\": \"img/{i}.png\", \"text\": \"{text}\"}}\n"));
    }
    let m = dir.join("train.jsonl");
    std::fs::write(&m, manifest).unwrap();
    m
}

/// Every resnet of the grads fixture's U-Net on `b`, as `ResnetBlock2D::forward` runs it (the time
/// embedding and the shortcut added in the convolutions' epilogues) and as the separate layers
/// compute it (conv, add_bias_rows, conv, add), on random inputs: (resnets run, output values
/// whose bits differ between the two).
#[allow(dead_code)]
pub fn resnet_fusion_mismatches(b: &mut dyn roentgen::backend::Backend) -> anyhow::Result<(usize, usize)> {
    use roentgen::models::unet::UNet;
    use roentgen::models::Component;
    use roentgen::nn::{Cx, Fmap};
    use roentgen::ops::elementwise::BiasRowsParams;
    use roentgen::tensor::Arena;
    let (unet, _) = UNet::load(b, &fixture("grads/unet"), None)?;
    let p = &unet.params;
    let resnets: Vec<_> = p
        .down
        .iter()
        .flat_map(|d| &d.resnets)
        .chain(&p.mid_resnets)
        .chain(p.up.iter().flat_map(|u| &u.resnets))
        .collect();
    let mut rng = roentgen::rng::splitmix::SplitMix64::new(0xF05E);
    let (batch, h, w, cap) = (2, 5, 6, 1 << 20);
    let mut differ = 0;
    for res in &resnets {
        let pool = b.alloc(cap, "test.arena")?;
        let mut arena = Arena::new(pool, cap);
        let proj = res.time_emb_proj.as_ref().expect("a U-Net resnet projects the time embedding");
        let x = Fmap::alloc(&mut arena, batch, h, w, res.conv1.c_in)?;
        let temb = arena.alloc([batch, proj.in_f])?;
        b.upload(&x.t, &(0..x.numel()).map(|_| rng.next_normal()).collect::<Vec<_>>())?;
        b.upload(&temb, &(0..temb.numel()).map(|_| rng.next_normal()).collect::<Vec<_>>())?;
        let bd: &dyn roentgen::backend::Backend = b;
        let mut cx = Cx::new(bd, &mut arena);
        let fused = res.forward(&mut cx, &x, Some(&temb))?;
        let n1 = res.norm1.apply_saved(&mut cx, &x, true)?;
        let h1 = res.conv1.apply(&mut cx, &n1.out)?;
        let t = proj.apply(&mut cx, &temb, batch)?;
        let h1t = Fmap::alloc(cx.arena, batch, h, w, h1.c)?;
        let rows = BiasRowsParams { batch, rows: h * w, channels: h1.c };
        bd.add_bias_rows_forward(&rows, &h1t.t, &h1.t, &t)?;
        let n2 = res.norm2.apply_saved(&mut cx, &h1t, true)?;
        let h2 = res.conv2.apply(&mut cx, &n2.out)?;
        let shortcut = match &res.conv_shortcut {
            Some(c) => c.apply(&mut cx, &x)?,
            None => x,
        };
        let unfused = Fmap::alloc(cx.arena, batch, h, w, h2.c)?;
        bd.add_forward(&unfused.t, &shortcut.t, &h2.t, unfused.numel())?;
        let (a, u) = (bd.download(&fused.t)?, bd.download(&unfused.t)?);
        differ += a.iter().zip(&u).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    }
    Ok((resnets.len(), differ))
}

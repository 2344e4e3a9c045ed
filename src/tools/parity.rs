//! `roentgen parity`: roentgen against the user's own diffusers/transformers on the user's own
//! model and machine, stage by stage. The reference side is scripts/parity.py (carried inside the
//! binary, written to a temporary folder and run with the user's Python); each of our stages then
//! takes the reference's inputs where a stage has inputs (the U-Net the reference's text
//! embeddings), so an error belongs to its stage, not to the ones before it.
//!
//! Tolerances (ARCHITECTURE.md, "Parity discipline"): in f32, max |ours − reference| ≤
//! 1e-4 · max(1, max |reference|) per tensor, the whole image (many steps, errors compound)
//! within 1e-3 absolute; in bf16, a relative L2 error ≤ 2e-2 (the image too). Token ids must be
//! equal.

use crate::backend::Backend;
use crate::rng::torch::TorchGenerator;
use crate::sample::pipeline::{Pipeline, SampleRequest};
use crate::sample::schedulers::{self, SchedulerKind, SchedulerOptions};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The reference script, as shipped.
pub const SCRIPT: &str = include_str!("../../scripts/parity.py");

/// f32: max |a − b| ≤ this · max(1, max |b|).
pub const F32_REL: f64 = 1e-4;
/// f32, the whole image in [0, 1]: max |a − b| ≤ this.
pub const F32_IMAGE_ABS: f64 = 1e-3;
/// bf16: ‖a − b‖ / ‖b‖ ≤ this.
pub const BF16_REL_L2: f64 = 2e-2;

pub struct ParityOptions {
    pub model: PathBuf,
    /// The configs of a single-file model.
    pub config: Option<PathBuf>,
    pub python: PathBuf,
    pub prompts: Vec<String>,
    pub seed: u64,
    pub steps: usize,
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub guidance: f32,
    pub timesteps: Vec<usize>,
    /// "cpu" or "cuda", and "f32" or "bf16": what the reference runs on.
    pub device: String,
    pub precision: String,
}

/// One stage's comparison.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StageResult {
    pub stage: String,
    pub shape: Vec<usize>,
    pub max_abs: f64,
    /// max |a − b| / max(1, max |b|).
    pub max_rel: f64,
    pub rel_l2: f64,
    /// Which number is held to the tolerance ("max_rel", "max_abs", "rel_l2", "mismatches").
    pub metric: &'static str,
    pub tolerance: f64,
    pub pass: bool,
}

fn compare(
    stage: &str,
    shape: Vec<usize>,
    ours: &[f32],
    reference: &[f32],
    bf16: bool,
    image: bool,
) -> Result<StageResult> {
    if ours.len() != reference.len() {
        bail!("stage {stage}: {} values here, {} in the reference", ours.len(), reference.len());
    }
    let (mut max_abs, mut max_ref, mut d2, mut r2) = (0f64, 0f64, 0f64, 0f64);
    for (&a, &b) in ours.iter().zip(reference) {
        let (a, b) = (a as f64, b as f64);
        let d = (a - b).abs();
        // A NaN anywhere fails the stage.
        max_abs = if d.is_nan() { f64::INFINITY } else { max_abs.max(d) };
        max_ref = max_ref.max(b.abs());
        d2 += d * d;
        r2 += b * b;
    }
    let max_rel = max_abs / max_ref.max(1.0);
    let rel_l2 = if r2 > 0.0 { (d2 / r2).sqrt() } else { d2.sqrt() };
    let (metric, tolerance, value) = if bf16 {
        ("rel_l2", BF16_REL_L2, rel_l2)
    } else if image {
        ("max_abs", F32_IMAGE_ABS, max_abs)
    } else {
        ("max_rel", F32_REL, max_rel)
    };
    Ok(StageResult {
        stage: stage.into(),
        shape,
        max_abs,
        max_rel,
        rel_l2,
        metric,
        tolerance,
        pass: value <= tolerance,
    })
}

/// The reference's tensors: name → (shape, values as f32 or ids as f32).
type Reference = HashMap<String, (Vec<usize>, Vec<f32>)>;

fn read_reference(path: &Path) -> Result<(Reference, String)> {
    let bytes =
        std::fs::read(path).with_context(|| format!("{}: the reference script wrote nothing", path.display()))?;
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let versions = meta.metadata().as_ref().and_then(|m| m.get("versions").cloned()).unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut out = HashMap::new();
    for (name, v) in st.tensors() {
        let d = v.data();
        let values: Vec<f32> = match v.dtype() {
            safetensors::Dtype::F32 => d.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
            safetensors::Dtype::F64 => d.chunks(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            safetensors::Dtype::I64 => d.chunks(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            other => bail!("{}: tensor '{name}' has dtype {other:?}", path.display()),
        };
        out.insert(name, (v.shape().to_vec(), values));
    }
    Ok((out, versions))
}

/// Whether `python` can run the reference (torch, diffusers, transformers, safetensors); the
/// versions it reports, or what to install.
pub fn check_python(python: &Path) -> Result<String> {
    let probe = "import torch, diffusers, transformers, safetensors; \
                 print(f'torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}')";
    let out = std::process::Command::new(python).args(["-c", probe]).output();
    match out {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
        Ok(o) => bail!(
            "--python {}: cannot import the reference libraries ({}); install them with \
             `{} -m pip install torch diffusers transformers safetensors`, or pass --python with an environment that has them",
            python.display(),
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("").trim(),
            python.display()
        ),
        Err(e) => bail!(
            "--python {}: cannot run it ({e}); roentgen parity needs a Python with torch, diffusers and transformers \
             (pass --python PATH)",
            python.display()
        ),
    }
}

/// Runs the reference script, then every stage here; returns the stages and the reference's
/// library versions.
pub fn run(b: &mut dyn Backend, pipe: &Pipeline, o: &ParityOptions) -> Result<(Vec<StageResult>, String)> {
    let f = pipe.vae_scale_factor();
    // diffusers' default size: the U-Net's sample_size (64 latent pixels without one) × f.
    let [sh, sw] = pipe.unet.config.sample_size.unwrap_or([64, 64]);
    let (height, width) = (o.height.unwrap_or(sh * f), o.width.unwrap_or(sw * f));
    if height % f != 0 || width % f != 0 {
        bail!("--height {height} --width {width}: both must be multiples of {f} (the VAE's scale factor)");
    }
    let (lh, lw) = (height / f, width / f);
    let kinds: Vec<SchedulerKind> = SchedulerKind::ALL.to_vec();
    let tmp_guard = TempDir::new()?;
    let tmp = tmp_guard.0.clone();
    let script = tmp.join("parity.py");
    std::fs::write(&script, SCRIPT)?;
    let inputs = json!({
        "prompts": o.prompts, "seed": o.seed, "height": height, "width": width, "steps": o.steps,
        "guidance": o.guidance, "timesteps": o.timesteps,
        "schedulers": kinds.iter().map(|k| k.class_name()).collect::<Vec<_>>(),
    });
    std::fs::write(tmp.join("inputs.json"), serde_json::to_vec_pretty(&inputs)?)?;
    let ref_path = tmp.join("reference.safetensors");
    crate::diag::progress(format!("running the reference ({}) …", o.python.display()));
    let mut cmd = std::process::Command::new(&o.python);
    cmd.arg(&script)
        .arg("--model")
        .arg(&o.model)
        .arg("--inputs")
        .arg(tmp.join("inputs.json"))
        .arg("--out")
        .arg(&ref_path);
    cmd.args(["--device", &o.device, "--precision", &o.precision]);
    if let Some(c) = &o.config {
        cmd.arg("--config").arg(c);
    }
    let status = cmd.status().with_context(|| format!("--python {}: cannot run it", o.python.display()))?;
    if !status.success() {
        bail!("the reference script failed ({status}); its error is above");
    }
    let (r, versions) = read_reference(&ref_path)?;
    drop(tmp_guard);
    let get = |name: &str| r.get(name).with_context(|| format!("the reference has no '{name}'"));
    let bf16 = o.precision == "bf16";
    let mut results = Vec::new();
    crate::diag::progress("running roentgen's stages …");

    // Tokens: equal or not.
    let ids: Vec<f32> = pipe.token_ids(&o.prompts).iter().map(|&i| i as f32).collect();
    let (ids_shape, ref_ids) = get("ids")?;
    let mismatches = ids.iter().zip(ref_ids).filter(|(a, b)| a != b).count() + ids.len().abs_diff(ref_ids.len());
    results.push(StageResult {
        stage: "token ids".into(),
        shape: ids_shape.clone(),
        max_abs: mismatches as f64,
        max_rel: 0.0,
        rel_l2: 0.0,
        metric: "mismatches",
        tolerance: 0.0,
        pass: mismatches == 0,
    });
    // Text embeddings.
    let (emb_shape, ref_emb) = get("embeds")?;
    let emb = pipe.text_embeddings(b, &o.prompts)?;
    results.push(compare("text embeddings", emb_shape.clone(), &emb, ref_emb, bf16, false)?);
    // One U-Net call per timestep, on the reference's latents and first prompt's embeddings.
    let (_, latents) = get("latents")?;
    let row = emb_shape[1] * emb_shape[2];
    for &t in &o.timesteps {
        let (shape, want) = get(&format!("unet_t{t}"))?;
        let got = pipe.unet_prediction(b, latents, lh, lw, t as f32, &ref_emb[..row])?;
        results.push(compare(&format!("U-Net, t = {t}"), shape.clone(), &got, want, bf16, false)?);
    }
    // VAE decode.
    let sf = pipe.vae.config.scaling_factor;
    let z: Vec<f32> = latents.iter().map(|x| x / sf).collect();
    let (shape, want) = get("vae")?;
    results.push(compare("VAE decode", shape.clone(), &pipe.vae_decode_raw(b, &z, lh, lw)?, want, bf16, false)?);
    // Each scheduler's trajectory with the model replaced by 0.5 · scaled input.
    for k in &kinds {
        let name = k.class_name();
        let mut s = schedulers::from_config(
            Some(*k),
            &pipe.scheduler_config,
            &pipe.scheduler_config_path,
            &SchedulerOptions::default(),
        )?;
        s.set_timesteps(o.steps)?;
        let mut g = TorchGenerator::new(o.seed);
        let sigma0 = s.init_noise_sigma();
        let mut x: Vec<f32> = latents.iter().map(|v| v * sigma0).collect();
        for i in 0..s.timesteps().len() {
            let mut xin = x.clone();
            s.scale_model_input(&mut xin, i);
            let eps: Vec<f32> = xin.iter().map(|v| 0.5 * v).collect();
            x = s.step(&eps, i, &x, &mut g)?;
        }
        let (_, want_ts) = get(&format!("timesteps_{name}"))?;
        let ts: Vec<f32> = s.timesteps().iter().map(|&t| t as f32).collect();
        let mut r = compare(
            &format!("{} ({} steps)", k.cli_name(), o.steps),
            get(&format!("sched_{name}"))?.0.clone(),
            &x,
            &get(&format!("sched_{name}"))?.1,
            false,
            false,
        )?;
        if ts != *want_ts {
            r.pass = false;
            r.stage += " — timesteps differ";
        }
        results.push(r);
    }
    // The whole pipeline from the seed.
    let req = SampleRequest {
        prompts: o.prompts.clone(),
        negative_prompt: None,
        num_images_per_prompt: 1,
        batch_size: o.prompts.len(),
        seed: o.seed,
        rng_variant: Default::default(),
        height,
        width,
        steps: o.steps,
        guidance: o.guidance,
        scheduler: None,
        scheduler_options: SchedulerOptions::default(),
        latents_in: None,
        init_image: None,
    };
    pipe.validate(&req)?;
    let out = pipe.generate(b, &req, &mut |_, _| Ok(()), &mut |w| crate::diag::warn(w))?;
    let (shape, want) = get("image")?;
    results.push(compare(
        &format!("image ({} steps, guidance {})", o.steps, o.guidance),
        shape.clone(),
        &out.images,
        want,
        bf16,
        true,
    )?);
    Ok((results, versions))
}

/// A scratch folder for the script, its inputs and its output, removed on every way out.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let d = std::env::temp_dir().join(format!("roentgen-parity-{}", std::process::id()));
        std::fs::create_dir_all(&d).with_context(|| format!("{}: cannot create", d.display()))?;
        Ok(TempDir(d))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The table `roentgen parity` prints.
pub fn render_table(results: &[StageResult]) -> String {
    let mut s =
        format!("{:<34} {:>10} {:>10} {:>10} {:>22}  {}\n", "stage", "max abs", "max rel", "rel L2", "tolerance", "");
    for r in results {
        let tol = if r.metric == "mismatches" {
            "equal".to_string()
        } else {
            format!("{} ≤ {:.0e}", r.metric, r.tolerance)
        };
        s += &format!(
            "{:<34} {:>10.2e} {:>10.2e} {:>10.2e} {:>22}  {}\n",
            r.stage,
            r.max_abs,
            r.max_rel,
            r.rel_l2,
            tol,
            if r.pass { "pass" } else { "FAIL" }
        );
    }
    s
}

pub fn to_json(results: &[StageResult], versions: &str) -> Value {
    json!({"reference": serde_json::from_str::<Value>(versions).unwrap_or(Value::Null), "stages": results,
           "pass": results.iter().all(|r| r.pass)})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand: reference [2, -4], ours [2, -4.0006]: max abs 6e-4, max rel 6e-4 / 4 = 1.5e-4
    /// (fails 1e-4), rel L2 6e-4 / √20; as an image, 6e-4 ≤ 1e-3 passes; a NaN fails everything.
    #[test]
    fn tolerances_are_applied_as_written() {
        let r = compare("x", vec![2], &[2.0, -4.0006], &[2.0, -4.0], false, false).unwrap();
        // (−4.0006 is −4.00059986… in f32.)
        assert!((r.max_abs - 6e-4).abs() < 1e-6 && (r.max_rel - 1.5e-4).abs() < 1e-6 && !r.pass);
        assert!((r.rel_l2 - 6e-4 / 20f64.sqrt()).abs() < 1e-6);
        assert!(compare("x", vec![2], &[2.0, -4.0006], &[2.0, -4.0], false, true).unwrap().pass);
        assert!(compare("x", vec![2], &[2.0, -4.0006], &[2.0, -4.0], true, false).unwrap().pass);
        assert!(!compare("x", vec![2], &[f32::NAN, -4.0], &[2.0, -4.0], true, true).unwrap().pass);
        assert!(compare("x", vec![2], &[1.0], &[2.0, -4.0], false, false).is_err());
    }
}

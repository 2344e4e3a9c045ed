//! Noise schedulers (diffusers semantics): PNDM, DDIM, Euler, Euler ancestral, DPM-Solver++ 2M.
//!
//! Each is configured from a diffusers `scheduler_config.json` exactly as
//! `<Class>.from_config(config)` would be (class defaults for absent fields, fields of other
//! scheduler classes ignored), and steps like diffusers 0.42.1: the scalar coefficients with the
//! dtypes diffusers uses (float32 tensors for ᾱ/σ, float64 numpy for timesteps and interpolated
//! sigmas) and the elementwise updates in f32 in diffusers' operation order. The parity tests
//! (`tests/schedulers.rs`) replay diffusers runs step by step.
//!
//! Usage, as in diffusers' denoising loop:
//! ```no_run
//! # use roentgen::schedulers::*; use roentgen::torch_rng::TorchGenerator;
//! # fn unet(_: &[f32], _: f64) -> Vec<f32> { unimplemented!() }
//! # fn main() -> anyhow::Result<()> {
//! let mut s = load(std::path::Path::new("weights/sd-v1-4-config"), Some(SchedulerKind::Euler), &SchedulerOptions::default())?;
//! s.set_timesteps(25)?;
//! let mut gen = TorchGenerator::new(42);
//! let mut latents = gen.randn(1 * 4 * 64 * 64);
//! latents.iter_mut().for_each(|x| *x *= s.init_noise_sigma());
//! for (i, &t) in s.timesteps().to_vec().iter().enumerate() {
//!     let mut input = latents.clone();
//!     s.scale_model_input(&mut input, i);
//!     let noise_pred = unet(&input, t);
//!     latents = s.step(&noise_pred, i, &latents, &mut gen)?;
//! }
//! # Ok(()) }
//! ```
//! Samples are flat f32 slices in any layout: every update is elementwise, except Euler ancestral's
//! noise, which is drawn in the slice's order and so matches torch for NCHW order.

mod config;
pub mod ddim;
pub mod dpm_solver;
pub mod euler;
pub mod euler_ancestral;
pub mod pndm;
pub mod schedule;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use crate::torch_rng::TorchGenerator;
pub use schedule::{PredictionType, TimestepSpacing};

/// The schedulers roentgen implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Pndm,
    Ddim,
    Euler,
    EulerAncestral,
    DpmSolverMultistep,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 5] = [
        SchedulerKind::Pndm,
        SchedulerKind::Ddim,
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmSolverMultistep,
    ];

    /// The CLI name: `pndm`, `ddim`, `euler`, `euler-a`, `dpm++2m`.
    pub fn cli_name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmSolverMultistep => "dpm++2m",
        }
    }

    /// The diffusers class (`_class_name` in a scheduler config).
    pub fn class_name(self) -> &'static str {
        match self {
            SchedulerKind::Pndm => "PNDMScheduler",
            SchedulerKind::Ddim => "DDIMScheduler",
            SchedulerKind::Euler => "EulerDiscreteScheduler",
            SchedulerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SchedulerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.cli_name())
    }
}

impl FromStr for SchedulerKind {
    type Err = anyhow::Error;
    /// CLI names (case-insensitive, a few common spellings) and diffusers class names.
    fn from_str(s: &str) -> Result<SchedulerKind> {
        if let Some(k) = SchedulerKind::ALL.iter().find(|k| k.class_name() == s) {
            return Ok(*k);
        }
        Ok(match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "pndm" | "plms" => SchedulerKind::Pndm,
            "ddim" => SchedulerKind::Ddim,
            "euler" => SchedulerKind::Euler,
            "euler-a" | "euler-ancestral" | "eulera" => SchedulerKind::EulerAncestral,
            "dpm++2m" | "dpmpp2m" | "dpm++-2m" | "dpm-solver++" | "dpmsolver++" | "dpm-solver-multistep" => {
                SchedulerKind::DpmSolverMultistep
            }
            _ => bail!(
                "unknown scheduler {s:?} (expected one of: pndm, ddim, euler, euler-a, dpm++2m, or a diffusers class name: {})",
                SchedulerKind::ALL.map(|k| k.class_name()).join(", ")
            ),
        })
    }
}

/// Settings that override the config (as keyword arguments to diffusers' `from_config` do).
#[derive(Clone, Debug, Default)]
pub struct SchedulerOptions {
    /// `use_karras_sigmas` (Euler and DPM-Solver++ only; an error for the others).
    pub karras_sigmas: Option<bool>,
    /// `timestep_spacing`: `"leading"`, `"trailing"` or `"linspace"`.
    pub timestep_spacing: Option<String>,
    /// Any other config fields, applied last.
    pub overrides: Map<String, Value>,
}

/// A diffusers noise scheduler. Call [`Scheduler::set_timesteps`] first; then, for each
/// `i in 0..timesteps().len()`: scale the model input, run the model at `timesteps()[i]`, and
/// [`Scheduler::step`] with the same `i`. Steps must be taken in order (PNDM and DPM-Solver keep a
/// history of model outputs; Euler ancestral draws from the generator).
pub trait Scheduler: Send {
    fn kind(&self) -> SchedulerKind;

    /// Builds the schedule for `num_inference_steps` (resets any multistep history). Errors when the
    /// count is 0 or above `num_train_timesteps`.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// diffusers' `scheduler.timesteps`: one per model call (PNDM with Runge–Kutta steps makes more
    /// calls than inference steps). Integral except for Euler with Karras sigmas.
    fn timesteps(&self) -> &[f64];

    /// The standard deviation of the initial noise: initial latents are `randn · init_noise_sigma`.
    fn init_noise_sigma(&self) -> f32;

    /// diffusers' `scheduler.sigmas` for the sigma-parametrised schedulers (Euler, Euler ancestral,
    /// DPM-Solver: one per timestep plus the final one); empty for PNDM and DDIM.
    fn sigmas(&self) -> &[f32] {
        &[]
    }

    /// diffusers' `scale_model_input`, in place (identity for PNDM, DDIM and DPM-Solver; divides by
    /// `sqrt(σ² + 1)` for the Euler family). `step_index < timesteps().len()` (panics otherwise).
    fn scale_model_input(&self, sample: &mut [f32], step_index: usize);

    /// One denoising step: the previous (less noisy) sample from the model output at
    /// `timesteps()[step_index]`. `generator` is used by Euler ancestral only, which draws
    /// `sample.len()` normals from it, as diffusers' `randn_tensor` does with a CPU generator.
    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        generator: &mut TorchGenerator,
    ) -> Result<Vec<f32>>;
}

/// Builds a scheduler from a parsed `scheduler_config.json`. `kind: None` takes the config's
/// `_class_name`; `path` is only used in error messages.
pub fn from_config(
    kind: Option<SchedulerKind>,
    config: &Value,
    path: &Path,
    opts: &SchedulerOptions,
) -> Result<Box<dyn Scheduler>> {
    let kind = match kind {
        Some(k) => k,
        None => match config.get("_class_name") {
            Some(Value::String(name)) => SchedulerKind::from_str(name)
                .with_context(|| format!("{}: _class_name: unsupported scheduler class {name:?}", path.display()))?,
            Some(v) => bail!("{}: _class_name: expected a string, got {v}", path.display()),
            None => bail!("{}: no _class_name, and no scheduler was chosen", path.display()),
        },
    };
    let mut overrides = Map::new();
    if let Some(k) = opts.karras_sigmas {
        if !matches!(kind, SchedulerKind::Euler | SchedulerKind::DpmSolverMultistep) && k {
            bail!(
                "Karras sigmas (use_karras_sigmas) are not supported by {} (only euler and dpm++2m)",
                kind.class_name()
            );
        }
        overrides.insert("use_karras_sigmas".into(), Value::Bool(k));
    }
    if let Some(s) = &opts.timestep_spacing {
        overrides.insert("timestep_spacing".into(), Value::String(s.clone()));
    }
    overrides.extend(opts.overrides.iter().map(|(k, v)| (k.clone(), v.clone())));
    let cfg = config::Config::new(config, &overrides, path, kind.class_name())?;
    debug_assert_eq!(cfg.class(), kind.class_name());
    Ok(match kind {
        SchedulerKind::Pndm => Box::new(pndm::Pndm::from_config(&cfg)?),
        SchedulerKind::Ddim => Box::new(ddim::Ddim::from_config(&cfg)?),
        SchedulerKind::Euler => Box::new(euler::Euler::from_config(&cfg)?),
        SchedulerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestral::from_config(&cfg)?),
        SchedulerKind::DpmSolverMultistep => Box::new(dpm_solver::DpmSolverMultistep::from_config(&cfg)?),
    })
}

/// The training ᾱ table (`alphas_cumprod`, float32 as diffusers computes it) of a scheduler config:
/// `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule` and `rescale_betas_zero_snr`
/// (without the 2⁻²⁴ floor that the Euler and DPM-Solver schedulers add), as DDPM/DDIM hold it.
/// Training (`add_noise`) uses this table.
pub fn training_alphas_cumprod(config: &Value, path: &Path) -> Result<Vec<f32>> {
    let cfg = config::Config::new(config, &Map::new(), path, "DDPMScheduler")?;
    Ok(schedule::TrainSchedule::from_config(&cfg, true, false)?.alphas_cumprod)
}

/// Finds the scheduler config: `path` may be the JSON file itself, a scheduler folder holding
/// `scheduler_config.json`, or a pipeline folder with `scheduler/scheduler_config.json`.
pub fn config_path(path: &Path) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    for rel in ["scheduler/scheduler_config.json", "scheduler_config.json"] {
        let p = path.join(rel);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{}: no scheduler_config.json (looked in the folder and in scheduler/)", path.display())
}

/// Reads the scheduler config at or under `path` (see [`config_path`]) and builds the scheduler.
pub fn load(path: &Path, kind: Option<SchedulerKind>, opts: &SchedulerOptions) -> Result<Box<dyn Scheduler>> {
    let file = config_path(path)?;
    let text = std::fs::read_to_string(&file).with_context(|| format!("{}: cannot read", file.display()))?;
    let config: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", file.display()))?;
    from_config(kind, &config, &file, opts)
}

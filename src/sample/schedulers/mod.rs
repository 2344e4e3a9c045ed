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
//! # use roentgen::sample::schedulers::*; use roentgen::rng::torch::TorchGenerator;
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

use crate::rng::torch::TorchGenerator;
use config::Config;
use schedule::TrainSchedule;
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

    /// AUTOMATIC1111's sampler name (its infotext and API's `sampler_name`), "Karras" appended
    /// with Karras sigmas.
    pub fn a1111_name(self, karras: bool) -> String {
        let base = match self {
            SchedulerKind::Pndm => "PNDM",
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerAncestral => "Euler a",
            SchedulerKind::DpmSolverMultistep => "DPM++ 2M",
        };
        if karras {
            format!("{base} Karras")
        } else {
            base.to_string()
        }
    }

    /// The scheduler and Karras flag of an AUTOMATIC1111 `sampler_name` (its names for the five,
    /// "PLMS" for PNDM's, with or without " Karras"), case-insensitive.
    pub fn from_a1111(name: &str) -> Option<(SchedulerKind, bool)> {
        let lower = name.trim().to_ascii_lowercase();
        let (base, karras) = match lower.strip_suffix(" karras") {
            Some(b) => (b.to_string(), true),
            None => (lower, false),
        };
        let kind = match base.as_str() {
            "pndm" | "plms" => SchedulerKind::Pndm,
            "ddim" => SchedulerKind::Ddim,
            "euler" => SchedulerKind::Euler,
            "euler a" => SchedulerKind::EulerAncestral,
            "dpm++ 2m" => SchedulerKind::DpmSolverMultistep,
            _ => return None,
        };
        Some((kind, karras))
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
///
/// What the five schedulers share (the training table, the fields every one reads alike, the
/// timesteps and sigmas, the checks of every call, the input scaling) lives here, once; what each
/// does differently is its [`Method`]: how it builds its schedule and how it takes a step.
pub struct Scheduler {
    kind: SchedulerKind,
    common: Common,
    method: Box<dyn Method>,
}

/// The state every scheduler holds alike: its configuration and the schedule `set_timesteps`
/// built.
pub(crate) struct Common {
    pub(crate) train: TrainSchedule,
    pub(crate) prediction: PredictionType,
    pub(crate) spacing: TimestepSpacing,
    pub(crate) steps_offset: i64,
    /// `n` of the last `set_timesteps` (0 before the first).
    pub(crate) num_inference_steps: usize,
    /// diffusers' `scheduler.timesteps`, one per model call.
    pub(crate) timesteps: Vec<f64>,
    /// diffusers' `scheduler.sigmas` (sigma-parametrised schedulers only; empty for PNDM and DDIM).
    pub(crate) sigmas: Vec<f32>,
    pub(crate) init_noise_sigma: f32,
}

impl Common {
    /// Reads the fields all five read the same way. Where they differ is this table: whether the
    /// class has `rescale_betas_zero_snr`, whether it floors the last ᾱ at 2⁻²⁴ (the
    /// sigma-parametrised ones do, as σ would be infinite with zero SNR), its default spacing, and
    /// the prediction types it accepts.
    fn from_config(cfg: &Config, kind: SchedulerKind) -> Result<Common> {
        use PredictionType::{Epsilon, Sample, VPrediction};
        use TimestepSpacing::{Leading, Linspace};
        type Predictions = &'static [(&'static str, PredictionType)];
        const EPS_V: Predictions = &[("epsilon", Epsilon), ("v_prediction", VPrediction)];
        const EPS_SAMPLE_V: Predictions = &[("epsilon", Epsilon), ("sample", Sample), ("v_prediction", VPrediction)];
        const EULER: Predictions =
            &[("epsilon", Epsilon), ("v_prediction", VPrediction), ("sample", Sample), ("original_sample", Sample)];
        let (has_rescale, zero_snr_floor, default_spacing, predictions) = match kind {
            SchedulerKind::Pndm => (false, false, Leading, EPS_V),
            SchedulerKind::Ddim => (true, false, Leading, EPS_SAMPLE_V),
            SchedulerKind::Euler => (true, true, Linspace, EULER),
            // diffusers raises NotImplementedError for `sample` at the first step; we refuse it here.
            SchedulerKind::EulerAncestral => (true, true, Linspace, EPS_V),
            SchedulerKind::DpmSolverMultistep => (true, true, Linspace, EPS_SAMPLE_V),
        };
        let train = TrainSchedule::from_config(cfg, has_rescale, zero_snr_floor)?;
        Ok(Common {
            steps_offset: schedule::steps_offset(cfg, &train)?,
            spacing: cfg.choice("timestep_spacing", default_spacing, &schedule::SPACINGS)?,
            prediction: schedule::prediction_type(cfg, predictions)?,
            train,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            init_noise_sigma: 1.0,
        })
    }
}

/// How one scheduler builds its schedule and takes a step; everything else is [`Scheduler`]'s.
pub(crate) trait Method: Send {
    /// Fills `c.timesteps` (and `c.sigmas`, `c.init_noise_sigma` where the method has them) for
    /// `c.num_inference_steps` steps, and resets any multistep history.
    fn set_timesteps(&mut self, c: &mut Common) -> Result<()>;

    /// The previous sample; the input is checked (sizes, the index within the schedule).
    fn step(&mut self, c: &Common, s: StepInput, generator: &mut TorchGenerator) -> Result<Vec<f32>>;

    /// The first step will be `timesteps[begin]` (img2img). Methods whose history counts steps
    /// start it there; the others index by the step alone.
    fn set_begin_index(&mut self, _begin: usize) {}
}

/// One step's input: the model output at `timesteps()[index]` and the sample it was run on.
pub(crate) struct StepInput<'a> {
    pub(crate) model_output: &'a [f32],
    pub(crate) index: usize,
    pub(crate) sample: &'a [f32],
}

impl Scheduler {
    pub fn kind(&self) -> SchedulerKind {
        self.kind
    }

    /// Builds the schedule for `num_inference_steps` (resets any multistep history). Errors when the
    /// count is 0 or above `num_train_timesteps`.
    pub fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let class = self.kind.class_name();
        schedule::check_steps(class, num_inference_steps, self.common.train.num_train_timesteps)?;
        self.common.num_inference_steps = num_inference_steps;
        self.method.set_timesteps(&mut self.common)
    }

    /// diffusers' `scheduler.timesteps`: one per model call (PNDM with Runge–Kutta steps makes more
    /// calls than inference steps). Integral except for Euler with Karras sigmas.
    pub fn timesteps(&self) -> &[f64] {
        &self.common.timesteps
    }

    /// The standard deviation of the initial noise: initial latents are `randn · init_noise_sigma`.
    pub fn init_noise_sigma(&self) -> f32 {
        self.common.init_noise_sigma
    }

    /// diffusers' `scheduler.sigmas` for the sigma-parametrised schedulers (Euler, Euler ancestral,
    /// DPM-Solver: one per timestep plus the final one); empty for PNDM and DDIM.
    pub fn sigmas(&self) -> &[f32] {
        &self.common.sigmas
    }

    /// diffusers' `scale_model_input`, in place: divides by `sqrt(σ² + 1)` for the Euler family,
    /// the identity for the others. `step_index < timesteps().len()` (panics otherwise).
    pub fn scale_model_input(&self, sample: &mut [f32], step_index: usize) {
        if matches!(self.kind, SchedulerKind::Euler | SchedulerKind::EulerAncestral) {
            let d = (self.common.sigmas[step_index].powi(2) + 1.0).sqrt();
            sample.iter_mut().for_each(|x| *x /= d);
        }
    }

    /// img2img: the denoising starts at `timesteps()[begin]` (diffusers' `set_begin_index`, which
    /// its img2img pipeline calls with t_start · order; every order here is 1). Call after
    /// `set_timesteps`; multistep histories start empty there, as in diffusers.
    pub fn set_begin_index(&mut self, begin: usize) -> Result<()> {
        let n = self.common.timesteps.len();
        if begin >= n {
            anyhow::bail!("{}: begin index {begin} is past the {n} timesteps", self.kind.class_name());
        }
        self.method.set_begin_index(begin);
        Ok(())
    }

    /// diffusers' `add_noise(original, noise, timesteps[step_index])` with the begin index set: the
    /// forward process to that step's noise level, in f32 as diffusers computes it. PNDM and
    /// DDIM: √ᾱ_t · x + √(1 − ᾱ_t) · ε; Euler and Euler ancestral: x + ε · σ; DPM-Solver:
    /// α · x + σ_t · ε with α = 1/√(σ² + 1), σ_t = σ · α.
    pub fn add_noise(&self, original: &[f32], noise: &[f32], step_index: usize) -> Result<Vec<f32>> {
        let c = &self.common;
        anyhow::ensure!(
            original.len() == noise.len(),
            "add_noise: {} samples, {} noise values",
            original.len(),
            noise.len()
        );
        anyhow::ensure!(step_index < c.timesteps.len(), "add_noise: step {step_index} of {}", c.timesteps.len());
        let (a, s) = match self.kind {
            SchedulerKind::Pndm | SchedulerKind::Ddim => {
                let t = c.timesteps[step_index] as usize;
                let ac = *c.train.alphas_cumprod.get(t).context("add_noise: timestep outside the training schedule")?;
                (ac.sqrt(), (1.0 - ac).sqrt())
            }
            SchedulerKind::Euler | SchedulerKind::EulerAncestral => (1.0, c.sigmas[step_index]),
            SchedulerKind::DpmSolverMultistep => {
                let sigma = c.sigmas[step_index];
                let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
                (alpha, sigma * alpha)
            }
        };
        // Two products and a sum, each rounded (torch's separate kernels; no fused multiply-add).
        Ok(if a == 1.0 {
            original.iter().zip(noise).map(|(&x, &e)| x + e * s).collect()
        } else {
            original.iter().zip(noise).map(|(&x, &e)| a * x + s * e).collect()
        })
    }

    /// One denoising step: the previous (less noisy) sample from the model output at
    /// `timesteps()[step_index]`. `generator` is used by Euler ancestral only, which draws
    /// `sample.len()` normals from it, as diffusers' `randn_tensor` does with a CPU generator.
    pub fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        generator: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        let class = self.kind.class_name();
        schedule::check_step_args(class, model_output, sample, step_index, self.common.timesteps.len())?;
        let input = StepInput { model_output, index: step_index, sample };
        self.method.step(&self.common, input, generator)
    }
}

/// Builds a scheduler from a parsed `scheduler_config.json`. `kind: None` takes the config's
/// `_class_name`; `path` is only used in error messages.
pub fn from_config(
    kind: Option<SchedulerKind>,
    config: &Value,
    path: &Path,
    opts: &SchedulerOptions,
) -> Result<Scheduler> {
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
    let mut common = Common::from_config(&cfg, kind)?;
    let method: Box<dyn Method> = match kind {
        SchedulerKind::Pndm => Box::new(pndm::Pndm::from_config(&cfg, &mut common)?),
        SchedulerKind::Ddim => Box::new(ddim::Ddim::from_config(&cfg, &mut common)?),
        SchedulerKind::Euler => Box::new(euler::Euler::from_config(&cfg, &mut common)?),
        SchedulerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestral::from_config(&mut common)),
        SchedulerKind::DpmSolverMultistep => Box::new(dpm_solver::DpmSolverMultistep::from_config(&cfg, &mut common)?),
    };
    Ok(Scheduler { kind, common, method })
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
pub fn load(path: &Path, kind: Option<SchedulerKind>, opts: &SchedulerOptions) -> Result<Scheduler> {
    let file = config_path(path)?;
    let text = std::fs::read_to_string(&file).with_context(|| format!("{}: cannot read", file.display()))?;
    let config: Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", file.display()))?;
    from_config(kind, &config, &file, opts)
}

//! `EulerDiscreteScheduler` (Karras et al. 2022, Algorithm 2 with s_churn = 0, i.e. the
//! deterministic Euler sampler), as diffusers 0.42.1 runs it, and the sigma/timestep tables it
//! shares with the ancestral variant.
//!
//! Notes on matching diffusers:
//! - Timesteps are float32 (they can be fractional with Karras sigmas) and the class default
//!   spacing is `linspace`, so SD v1.x's `steps_offset: 1` has no effect unless the spacing is
//!   `leading`.
//! - Sigmas: the f32 training sigmas `sqrt((1-ᾱ)/ᾱ)` are interpolated at the timesteps by
//!   `np.interp` in f64; Karras sigmas are then built (in f64) between the *interpolated* first and
//!   last sigma (or `sigma_min`/`sigma_max` from the config) and their timesteps recovered by
//!   `_sigma_to_t`; the table is stored as f32 with a final 0 (or σ_min with
//!   `final_sigmas_type: sigma_min`).
//! - `init_noise_sigma` is the largest sigma for `linspace`/`trailing` spacing but
//!   `sqrt(σ_max² + 1)` for `leading`.
//! - diffusers finds its step index by looking the first timestep up in the list (taking the second
//!   match if it occurs twice); here the caller passes the step index, which is the same for every
//!   schedule without a repeated first timestep.

use anyhow::Result;
use serde_json::Value;

use super::config::Config;
use super::schedule::{
    karras_sigmas, np_arange, np_interp, np_linspace, np_round, sigma_to_t, PredictionType, TimestepSpacing,
};
use super::{Common, Method, StepInput};
use crate::rng::torch::TorchGenerator;

/// The float32 timesteps of Euler-family schedulers for `n` steps.
pub(crate) fn euler_timesteps(spacing: TimestepSpacing, train: usize, n: usize, steps_offset: i64) -> Vec<f32> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (train - 1) as f64, n).iter().rev().map(|&x| x as f32).collect(),
        TimestepSpacing::Leading => {
            let ratio = train / n;
            (0..n).rev().map(|i| (i * ratio) as f32 + steps_offset as f32).collect()
        }
        TimestepSpacing::Trailing => {
            np_arange(train as f64, 0.0, -(train as f64 / n as f64)).iter().map(|&x| np_round(x) as f32 - 1.0).collect()
        }
    }
}

/// `init_noise_sigma` of the Euler family: σ_max, or `sqrt(σ_max² + 1)` with `leading` spacing.
pub(crate) fn euler_init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        _ => max,
    }
}

/// The denoised estimate x₀ for the Euler family, elementwise as diffusers writes it.
#[inline]
pub(crate) fn euler_x0(prediction: PredictionType, sigma: f32, x: f32, m: f32) -> f32 {
    match prediction {
        PredictionType::Epsilon => x - sigma * m,
        PredictionType::VPrediction => m * (-sigma / (sigma * sigma + 1.0).sqrt()) + x / (sigma * sigma + 1.0),
        PredictionType::Sample => m,
    }
}

pub(crate) struct Euler {
    karras: bool,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    final_sigma_min: bool,
}

impl Euler {
    /// Before set_timesteps, diffusers' sigmas are the full training table (plus a 0).
    fn initial_sigmas(c: &mut Common) {
        c.sigmas = c.train.descending_sigmas_and_zero();
        c.init_noise_sigma = euler_init_noise_sigma(&c.sigmas, c.spacing);
    }

    /// Without Karras sigmas, and with a final sigma of 0: Euler ancestral's schedule.
    pub(crate) fn plain(c: &mut Common) -> Euler {
        Euler::initial_sigmas(c);
        Euler { karras: false, sigma_min: None, sigma_max: None, final_sigma_min: false }
    }

    pub(crate) fn from_config(cfg: &Config, c: &mut Common) -> Result<Euler> {
        cfg.require_default("interpolation_type", &Value::from("linear"), "linear")?;
        cfg.require_default("use_exponential_sigmas", &Value::Bool(false), "false")?;
        cfg.require_default("use_beta_sigmas", &Value::Bool(false), "false")?;
        cfg.require_default("timestep_type", &Value::from("discrete"), "discrete")?;
        Euler::initial_sigmas(c);
        Ok(Euler {
            final_sigma_min: cfg.choice("final_sigmas_type", false, &[("zero", false), ("sigma_min", true)])?,
            karras: cfg.bool("use_karras_sigmas", false)?,
            sigma_min: cfg.opt_f64("sigma_min")?,
            sigma_max: cfg.opt_f64("sigma_max")?,
        })
    }
}

impl Method for Euler {
    fn set_timesteps(&mut self, c: &mut Common) -> Result<()> {
        let (train, n) = (c.train.num_train_timesteps, c.num_inference_steps);
        let ts = euler_timesteps(c.spacing, train, n, c.steps_offset);
        let table = c.train.sigmas();
        let mut sigmas: Vec<f64> = ts.iter().map(|&t| np_interp(t as f64, &table)).collect();
        let timesteps: Vec<f32> = if self.karras {
            let log_sigmas: Vec<f32> = table.iter().map(|s| s.ln()).collect();
            let lo = self.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = self.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras_sigmas(lo, hi, n);
            sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32).collect()
        } else {
            ts
        };
        let last = c.train.final_sigma(self.final_sigma_min);
        c.sigmas = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        c.timesteps = timesteps.iter().map(|&t| t as f64).collect();
        c.init_noise_sigma = euler_init_noise_sigma(&c.sigmas, c.spacing);
        Ok(())
    }

    fn step(&mut self, c: &Common, s: StepInput, _generator: &mut TorchGenerator) -> Result<Vec<f32>> {
        let StepInput { model_output, index: step_index, sample } = s;
        let sigma = c.sigmas[step_index];
        // s_churn = 0: gamma = 0, sigma_hat = sigma * (0 + 1), and no noise is drawn.
        let sigma_hat = sigma * 1.0;
        let dt = c.sigmas[step_index + 1] - sigma_hat;
        Ok(sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| {
                let x0 = euler_x0(c.prediction, sigma_hat, x, m);
                let derivative = (x - x0) / sigma_hat;
                x + derivative * dt
            })
            .collect())
    }
}

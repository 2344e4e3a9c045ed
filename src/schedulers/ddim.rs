//! `DDIMScheduler` (Song et al. 2021) with η = 0 (deterministic), as diffusers 0.42.1 runs it.
//!
//! Notes on matching diffusers:
//! - The class defaults are `clip_sample: true` and `set_alpha_to_one: true`, unlike PNDM's. SD v1.x
//!   configs set both to false explicitly, but a config written by `PNDMScheduler.save_config` has
//!   no `clip_sample` (not a PNDM field), so DDIM on it clips x̂₀ to ±clip_sample_range; and a
//!   loaded PNDM's `config` lists the fields it defaulted in `_use_default_values`, which DDIM then
//!   takes from its own defaults (see config.rs). With clipping, a sampling run is far more
//!   sensitive to rounding: clipped x̂₀ no longer cancels the model output's error, so on the
//!   small test pipelines a 1e-7 relative change of the U-Net output grows ~20× in the first step
//!   and ~1.5× a step after (diffusers against itself); end-to-end DDIM parity there is only
//!   meaningful without clipping or over few steps.
//! - The previous timestep is always `t - T/n` (even with `trailing` or `linspace` spacing, where
//!   the listed timesteps are not `T/n` apart): diffusers does that, so we do too.
//! - `thresholding` (dynamic thresholding) is not implemented and is refused.

use anyhow::Result;
use serde_json::Value;

use super::config::Config;
use super::schedule::{
    check_step_args, check_steps, np_arange, np_linspace, np_round, prediction_type, PredictionType, TimestepSpacing,
    TrainSchedule, SPACINGS,
};
use super::{Scheduler, SchedulerKind};
use crate::torch_rng::TorchGenerator;

pub struct Ddim {
    train: TrainSchedule,
    final_alpha_cumprod: f32,
    clip_sample: Option<f32>,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    num_inference_steps: usize,
    timesteps_i: Vec<i64>,
    timesteps: Vec<f64>,
}

impl Ddim {
    pub(crate) fn from_config(cfg: &Config) -> Result<Ddim> {
        let train = TrainSchedule::from_config(cfg, true, false)?;
        let steps_offset = super::schedule::steps_offset(cfg, &train)?;
        cfg.require_default("thresholding", &Value::Bool(false), "false")?;
        let clip_range = cfg.f64("clip_sample_range", 1.0)? as f32;
        Ok(Ddim {
            final_alpha_cumprod: if cfg.bool("set_alpha_to_one", true)? { 1.0 } else { train.alphas_cumprod[0] },
            train,
            clip_sample: if cfg.bool("clip_sample", true)? { Some(clip_range) } else { None },
            prediction: prediction_type(
                cfg,
                &[
                    ("epsilon", PredictionType::Epsilon),
                    ("sample", PredictionType::Sample),
                    ("v_prediction", PredictionType::VPrediction),
                ],
            )?,
            spacing: cfg.choice("timestep_spacing", TimestepSpacing::Leading, &SPACINGS)?,
            steps_offset,
            num_inference_steps: 0,
            timesteps_i: Vec::new(),
            timesteps: Vec::new(),
        })
    }
}

impl Scheduler for Ddim {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let train = self.train.num_train_timesteps;
        check_steps("DDIMScheduler", n, train)?;
        self.timesteps_i = match self.spacing {
            TimestepSpacing::Linspace => {
                np_linspace(0.0, (train - 1) as f64, n).iter().rev().map(|&x| np_round(x) as i64).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = train / n;
                (0..n).rev().map(|i| (i * ratio) as i64 + self.steps_offset).collect()
            }
            TimestepSpacing::Trailing => np_arange(train as f64, 0.0, -(train as f64 / n as f64))
                .iter()
                .map(|&x| np_round(x) as i64 - 1)
                .collect(),
        };
        self.timesteps = self.timesteps_i.iter().map(|&t| t as f64).collect();
        self.num_inference_steps = n;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn scale_model_input(&self, _sample: &mut [f32], _step_index: usize) {}

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        _generator: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        check_step_args("DDIMScheduler", model_output, sample, step_index, self.timesteps_i.len())?;
        let t = self.timesteps_i[step_index];
        let prev_t = t - (self.train.num_train_timesteps / self.num_inference_steps) as i64;
        let a_t = self.train.alpha_cumprod(t)?;
        let a_prev = if prev_t >= 0 { self.train.alpha_cumprod(prev_t)? } else { self.final_alpha_cumprod };
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        // η = 0: std_dev_t = 0, so the direction coefficient is sqrt(1 - ᾱ_prev - 0).
        let dir_coeff = (1.0 - a_prev - 0.0f32).sqrt();
        let sa_prev = a_prev.sqrt();
        Ok(sample
            .iter()
            .zip(model_output)
            .map(|(&x, &m)| {
                let (mut x0, eps) = match self.prediction {
                    PredictionType::Epsilon => ((x - sb * m) / sa, m),
                    PredictionType::Sample => (m, (x - sa * m) / sb),
                    PredictionType::VPrediction => (sa * x - sb * m, sa * m + sb * x),
                };
                if let Some(r) = self.clip_sample {
                    // torch.clamp(min, max) = min(max(x, lo), hi) (no panic on odd ranges).
                    x0 = x0.max(-r).min(r);
                }
                sa_prev * x0 + dir_coeff * eps
            })
            .collect())
    }
}

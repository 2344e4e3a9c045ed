//! `EulerAncestralDiscreteScheduler` ("euler-a", k-diffusion's `sample_euler_ancestral`, η = 1), as
//! diffusers 0.42.1 runs it.
//!
//! Each step moves deterministically to σ_down and adds `noise · σ_up`, with `noise` drawn by
//! `randn_tensor(model_output.shape, generator=generator)`, i.e. one `torch.randn` of the whole
//! sample on the CPU generator, in NCHW order. [`TorchGenerator::randn`] reproduces that draw bit for
//! bit, so a run seeded like a diffusers run with `generator=torch.Generator().manual_seed(seed)`
//! (latents first, then one draw per step, the last step included even though σ_up = 0 there)
//! follows the same path. The draw depends only on the number of elements, so any layout works
//! as long as the caller's elements are in NCHW order (transpose NHWC samples before and after).
//!
//! Differences from the deterministic Euler scheduler that diffusers has: no Karras sigmas, no
//! `final_sigmas_type` (the last sigma is always 0), and `prediction_type: sample` is refused (diffusers
//! raises NotImplementedError at the first step).

use anyhow::Result;

use super::config::Config;
use super::euler::{euler_init_noise_sigma, euler_timesteps, euler_x0, scale_by_sigma};
use super::schedule::{
    check_step_args, check_steps, np_interp, prediction_type, PredictionType, TimestepSpacing, TrainSchedule, SPACINGS,
};
use super::{Scheduler, SchedulerKind};
use crate::torch_rng::TorchGenerator;

pub struct EulerAncestral {
    train: TrainSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: i64,
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    init_noise_sigma: f32,
}

impl EulerAncestral {
    pub(crate) fn from_config(cfg: &Config) -> Result<EulerAncestral> {
        let train = TrainSchedule::from_config(cfg, true, true)?;
        let steps_offset = super::schedule::steps_offset(cfg, &train)?;
        let spacing = cfg.choice("timestep_spacing", TimestepSpacing::Linspace, &SPACINGS)?;
        let mut sigmas = train.sigmas();
        sigmas.reverse();
        sigmas.push(0.0);
        Ok(EulerAncestral {
            prediction: prediction_type(
                cfg,
                &[("epsilon", PredictionType::Epsilon), ("v_prediction", PredictionType::VPrediction)],
            )?,
            steps_offset,
            init_noise_sigma: euler_init_noise_sigma(&sigmas, spacing),
            spacing,
            sigmas,
            timesteps: Vec::new(),
            train,
        })
    }
}

impl Scheduler for EulerAncestral {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let train = self.train.num_train_timesteps;
        check_steps("EulerAncestralDiscreteScheduler", n, train)?;
        let ts = euler_timesteps(self.spacing, train, n, self.steps_offset);
        let table = self.train.sigmas();
        self.sigmas = ts.iter().map(|&t| np_interp(t as f64, &table) as f32).chain([0.0]).collect();
        self.timesteps = ts.iter().map(|&t| t as f64).collect();
        self.init_noise_sigma = euler_init_noise_sigma(&self.sigmas, self.spacing);
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &mut [f32], step_index: usize) {
        scale_by_sigma(sample, self.sigmas[step_index]);
    }

    fn step(
        &mut self,
        model_output: &[f32],
        step_index: usize,
        sample: &[f32],
        generator: &mut TorchGenerator,
    ) -> Result<Vec<f32>> {
        check_step_args("EulerAncestralDiscreteScheduler", model_output, sample, step_index, self.timesteps.len())?;
        let sigma = self.sigmas[step_index];
        let (from, to) = (sigma, self.sigmas[step_index + 1]);
        let (from2, to2) = (from * from, to * to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let noise = generator.randn(sample.len());
        Ok(sample
            .iter()
            .zip(model_output)
            .zip(&noise)
            .map(|((&x, &m), &z)| {
                let x0 = euler_x0(self.prediction, sigma, x, m);
                let derivative = (x - x0) / sigma;
                let prev = x + derivative * dt;
                prev + z * sigma_up
            })
            .collect())
    }
}

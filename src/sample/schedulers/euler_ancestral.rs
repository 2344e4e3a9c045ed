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

use super::euler::{euler_x0, Euler};
use super::{Common, Method, StepInput};
use crate::rng::torch::TorchGenerator;

/// No settings of its own: the step is fixed (η = 1), and the schedule is Euler's without
/// Karras sigmas and with a final sigma of 0.
pub(crate) struct EulerAncestral {
    schedule: Euler,
}

impl EulerAncestral {
    pub(crate) fn from_config(c: &mut Common) -> EulerAncestral {
        EulerAncestral { schedule: Euler::plain(c) }
    }
}

impl Method for EulerAncestral {
    fn set_timesteps(&mut self, c: &mut Common) -> Result<()> {
        self.schedule.set_timesteps(c)
    }

    fn step(&mut self, c: &Common, s: StepInput, generator: &mut TorchGenerator) -> Result<Vec<f32>> {
        let StepInput { model_output, index: step_index, sample } = s;
        let sigma = c.sigmas[step_index];
        let (from, to) = (sigma, c.sigmas[step_index + 1]);
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
                let x0 = euler_x0(c.prediction, sigma, x, m);
                let derivative = (x - x0) / sigma;
                let prev = x + derivative * dt;
                prev + z * sigma_up
            })
            .collect())
    }
}

//! The training noise's use: DDPM's forward process (diffusers' `add_noise`) and the loss target,
//! in place. Kernels: kernels/random.cu (`rand_ddpm_add_noise`; the Philox normals themselves are
//! `Backend::randn`).

use crate::backend::{check_disjoint, check_len};
use crate::tensor::Tensor;
use anyhow::Result;
use rayon::prelude::*;

/// One sample of `n` values at one timestep: x ← √ᾱ·x + √(1−ᾱ)·noise; with `v_prediction`,
/// noise ← √ᾱ·noise − √(1−ᾱ)·x₀ (the velocity target), else the noise stays the target.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AddNoiseParams {
    pub n: usize,
    pub sqrt_alpha: f32,
    pub sqrt_one_minus_alpha: f32,
    pub v_prediction: bool,
}

impl AddNoiseParams {
    /// What every backend checks: both tensors hold n values and do not overlap (both are written).
    pub fn check(&self, x: &Tensor, noise: &Tensor) -> Result<()> {
        check_len("ddpm_add_noise x", x, self.n)?;
        check_len("ddpm_add_noise noise", noise, self.n)?;
        check_disjoint("ddpm_add_noise", &[x, noise], &[])
    }

    /// The CPU reference, in f32 as diffusers, on checked slices.
    pub fn cpu_apply(&self, [x, noise]: [&mut [f32]; 2]) {
        let (sa, s1a, n) = (self.sqrt_alpha, self.sqrt_one_minus_alpha, self.n);
        x[..n].par_iter_mut().zip(noise[..n].par_iter_mut()).for_each(|(x, e)| {
            let x0 = *x;
            *x = sa * x0 + s1a * *e;
            if self.v_prediction {
                *e = sa * *e - s1a * x0;
            }
        });
    }
}

/// `n` standard normals of the Philox stream (`seed`, `stream`): kernels/random.cu
/// `rand_philox_normal`, whose CPU reference is [`philox_normals`](crate::rng::philox::philox_normals)
/// (the same values, bit for bit, on any backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RandnParams {
    pub n: usize,
    pub seed: u64,
    pub stream: u64,
}

impl RandnParams {
    pub fn check(&self, out: &Tensor) -> Result<()> {
        check_len("randn out", out, self.n)
    }

    pub fn cpu_fill(&self, out: &mut [f32]) {
        crate::rng::philox::philox_normals(&mut out[..self.n], self.seed, self.stream);
    }
}

/// The training noise on a backend, drawn where the model runs.
pub trait RandomOps {
    /// out[i] = element i of the standard-normal stream (`seed`, `stream`), i < n: Philox4x32-10
    /// through Box–Muller (src/rng/philox.rs `philox_normals`, which is the CPU implementation). Every
    /// backend draws the same values, so a training run's noise does not depend on the device.
    fn randn(&self, out: &Tensor, n: usize, seed: u64, stream: u64) -> Result<()>;

    /// DDPM's forward process in place, for one sample of n values (diffusers' `add_noise` and the
    /// loss target, f32): x ← √ᾱ·x + √(1−ᾱ)·noise; with `v_prediction`, noise ← √ᾱ·noise − √(1−ᾱ)·x₀
    /// (the velocity), else the noise is left as the target.
    fn ddpm_add_noise(&self, p: &AddNoiseParams, x: &Tensor, noise: &Tensor) -> Result<()>;
}

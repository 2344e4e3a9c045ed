//! The optimizer step (torch.optim.AdamW) over flat memory. Kernels: kernels/optim.cu (`opt_adamw`;
//! the loss and gradient-norm reductions there are still Backend methods of their own).

use crate::backend::{check_disjoint, check_len};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// One AdamW step over `n` values: decoupled weight decay p ← p − lr·wd·p, bias-corrected
/// moments, eps added to the bias-corrected √v̂ (torch.optim.AdamW, single-tensor path). `step`
/// counts from 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWParams {
    pub n: usize,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: usize,
}

/// The step's constants, computed once per step in f64 and cast to f32 where they meet the tensors
/// (torch's scalars are Python floats): both backends apply exactly these.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    /// 1 − lr·wd, the decoupled weight decay's factor.
    pub decay: f32,
    /// √(1 − β2^t), the second moment's bias correction.
    pub bc2_sqrt: f32,
    /// lr / (1 − β1^t).
    pub step_size: f32,
}

impl AdamWParams {
    pub fn scalars(&self) -> AdamWScalars {
        let bc1 = 1.0 - (self.beta1 as f64).powi(self.step as i32);
        AdamWScalars {
            decay: (1.0 - self.lr as f64 * self.weight_decay as f64) as f32,
            bc2_sqrt: (1.0 - (self.beta2 as f64).powi(self.step as i32)).sqrt() as f32,
            step_size: (self.lr as f64 / bc1) as f32,
        }
    }

    /// What every backend checks: the step counts from 1, the tensors hold n values, and the
    /// updated ones (param, m, v) overlap each other and the gradient nowhere.
    pub fn check(&self, param: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor) -> Result<()> {
        ensure!(self.step >= 1, "adamw: step counts from 1");
        check_len("adamw param", param, self.n)?;
        check_len("adamw grad", grad, self.n)?;
        check_len("adamw m", m, self.n)?;
        check_len("adamw v", v, self.n)?;
        check_disjoint("adamw", &[param, m, v], &[grad])
    }

    /// The CPU reference, on checked slices `[param, m, v]` and the gradient: p *= decay; m, v
    /// updated; denom = √v / bc2_sqrt + eps; p −= step_size · m / denom.
    pub fn cpu_step(&self, [p, m, v]: [&mut [f32]; 3], g: &[f32]) {
        let n = self.n;
        let AdamWScalars { decay, bc2_sqrt, step_size } = self.scalars();
        let (beta1, beta2, eps) = (self.beta1, self.beta2, self.eps);
        p[..n].par_iter_mut().zip(g[..n].par_iter()).zip(m[..n].par_iter_mut().zip(v[..n].par_iter_mut())).for_each(
            |((p, &g), (m, v))| {
                *p *= decay;
                *m = *m + (g - *m) * (1.0 - beta1);
                *v = *v * beta2 + g * g * (1.0 - beta2);
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p -= step_size * *m / denom;
            },
        );
    }
}

/// The training reductions over `n` elements (kernels/optim.cu `opt_mse_partial`,
/// `opt_sum_squares_partial`, `opt_sum_finalize`): the mean-squared-error loss with its gradient,
/// and the sum of squares (for gradient-norm clipping). Both sum in f64 in a fixed order, so a
/// resumed run reproduces an uninterrupted one exactly.
#[derive(Clone, Copy, Debug)]
pub struct Reduction {
    pub n: usize,
}

impl Reduction {
    /// `loss[0] = mean((pred − target)²)`, `dpred = 2(pred − target)/n` (written).
    pub fn check_mse(&self, dpred: &Tensor, loss: &Tensor, pred: &Tensor, target: &Tensor) -> Result<()> {
        check_len("mse dpred", dpred, self.n)?;
        check_len("mse pred", pred, self.n)?;
        check_len("mse target", target, self.n)?;
        check_len("mse loss", loss, 1)?;
        check_disjoint("mse", &[dpred, loss], &[pred, target])
    }

    /// `out[0] = Σ x²`.
    pub fn check_sum_squares(&self, out: &Tensor, x: &Tensor) -> Result<()> {
        check_len("sum_squares x", x, self.n)?;
        check_len("sum_squares out", out, 1)?;
        check_disjoint("sum_squares", &[out], &[x])
    }

    /// Writes the gradient into `dpred` and returns the loss.
    pub fn cpu_mse(&self, dpred: &mut [f32], pred: &[f32], target: &[f32]) -> f32 {
        let n = self.n;
        let sum = det_sum(n, |i| ((pred[i] - target[i]) as f64).powi(2));
        dpred[..n].par_iter_mut().zip(pred[..n].par_iter().zip(target[..n].par_iter())).for_each(|(d, (&p, &t))| {
            *d = 2.0 * (p - t) / n as f32;
        });
        (sum / n as f64) as f32
    }

    pub fn cpu_sum_squares(&self, x: &[f32]) -> f32 {
        det_sum(self.n, |i| (x[i] as f64) * (x[i] as f64)) as f32
    }
}

/// Σ f(i) over 0..n in f64, deterministically: fixed chunks summed in parallel, partial sums added
/// in order (rayon's adaptive `sum` splits by timing, which would make results vary in the last
/// bits between runs, and resumed training must reproduce an uninterrupted run exactly).
pub(crate) fn det_sum(n: usize, f: impl Fn(usize) -> f64 + Sync) -> f64 {
    const CHUNK: usize = 1 << 14;
    let parts: Vec<f64> =
        (0..n.div_ceil(CHUNK)).into_par_iter().map(|c| (c * CHUNK..((c + 1) * CHUNK).min(n)).map(&f).sum()).collect();
    parts.iter().sum()
}

/// The training reductions (loss, gradient norm) and the optimizer step on a backend.
pub trait OptimOps {
    /// Mean squared error: loss[0] = mean((pred − target)²); dpred = 2 (pred − target) / n (written).
    fn mse_loss(&self, dpred: &Tensor, loss: &Tensor, pred: &Tensor, target: &Tensor, n: usize) -> Result<()>;

    /// out[0] = Σ x² over n elements (accumulated in f64), for gradient-norm clipping.
    fn sum_squares(&self, out: &Tensor, x: &Tensor, n: usize) -> Result<()>;

    /// One AdamW step over flat memory (torch.optim.AdamW semantics: decoupled weight decay
    /// p ← p − lr·wd·p, bias-corrected moments, eps added to the bias-corrected √v̂).
    fn adamw_step(&self, p: &AdamWParams, param: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor) -> Result<()>;
}

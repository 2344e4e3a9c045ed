//! Backward passes of the CPU reference, on slices. Every function ACCUMULATES into the gradients it
//! is given (see the `Backend` trait). Statistics are recomputed in f64 where forward did.

use crate::backend::Activation;
use rayon::prelude::*;

pub fn activation(dinp: &mut [f32], dout: &[f32], inp: &[f32], act: Activation, n: usize) {
    let d: fn(f32) -> f32 = match act {
        Activation::QuickGelu => |x| {
            let s = 1.0 / (1.0 + (-1.702 * x).exp());
            s + x * 1.702 * s * (1.0 - s)
        },
        Activation::Gelu => |x| {
            let x = x as f64;
            let cdf = 0.5 * (1.0 + libm::erf(x / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            (cdf + x * pdf) as f32
        },
        Activation::GeluTanh => |x| {
            let x = x as f64;
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let u = c * (x + 0.044715 * x * x * x);
            let t = u.tanh();
            (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)) as f32
        },
        Activation::Silu => |x| {
            let s = 1.0 / (1.0 + (-x).exp());
            s * (1.0 + x * (1.0 - s))
        },
    };
    dinp[..n].par_iter_mut().zip(dout[..n].par_iter().zip(inp[..n].par_iter())).for_each(|(di, (&g, &x))| {
        *di += g * d(x);
    });
}

/// Σ f(i) over 0..n in f64, deterministically: fixed chunks summed in parallel, partial sums added
/// in order (rayon's adaptive `sum` splits by timing, which would make results vary in the last
/// bits between runs, and resumed training must reproduce an uninterrupted run exactly).
pub fn det_sum(n: usize, f: impl Fn(usize) -> f64 + Sync) -> f64 {
    const CHUNK: usize = 1 << 14;
    let parts: Vec<f64> =
        (0..n.div_ceil(CHUNK)).into_par_iter().map(|c| (c * CHUNK..((c + 1) * CHUNK).min(n)).map(&f).sum()).collect();
    parts.iter().sum()
}

pub fn mse(dpred: &mut [f32], pred: &[f32], target: &[f32], n: usize) -> f32 {
    let sum = det_sum(n, |i| ((pred[i] - target[i]) as f64).powi(2));
    dpred[..n].par_iter_mut().zip(pred[..n].par_iter().zip(target[..n].par_iter())).for_each(|(d, (&p, &t))| {
        *d = 2.0 * (p - t) / n as f32;
    });
    (sum / n as f64) as f32
}

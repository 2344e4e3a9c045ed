//! Normalisations. Layer norm (`torch.nn.LayerNorm` over the last dimension: the text encoders',
//! the transformer blocks'); group norm (`torch.nn.GroupNorm` over channels-last activations),
//! optionally followed by SiLU as the U-Net's and the VAE's resnets apply it; batch norm at
//! inference (`torch.nn.BatchNorm2d` in eval mode, optionally followed by ReLU: the evaluation
//! networks') and in training (batch statistics, running statistics, backward: the classifier
//! trained from scratch). Kernels: kernels/norm.cu (`ln_*`, `gn_*`, `bn_*`).

use crate::backend::cpu::vmath;
use crate::backend::{check_disjoint, check_len, check_lens};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// One layer norm: `rows` vectors of `cols` values, each normalised, then `weight · x̂ + bias`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerNormParams {
    pub rows: usize,
    pub cols: usize,
    pub eps: f32,
}

/// The tensors of a norm's forward call (layer norm: `out`, `inp` (rows, cols), the per-row `mean`
/// and `rstd` (rows) that the backward reads, `weight` and `bias` (cols); group norm: `out`, `inp`
/// (batch, hw, channels), `mean` and `rstd` (batch, groups), `weight` and `bias` (channels)).
pub struct NormForward<'a> {
    pub out: &'a Tensor,
    pub mean: &'a Tensor,
    pub rstd: &'a Tensor,
    pub inp: &'a Tensor,
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
}

/// The tensors of a backward call: the gradients `dinp`, `dweight`, `dbias` (accumulated into),
/// `dout`, and the forward's input, weight and saved statistics.
pub struct LayerNormBackward<'a> {
    pub dinp: &'a Tensor,
    pub dweight: &'a Tensor,
    pub dbias: &'a Tensor,
    pub dout: &'a Tensor,
    pub inp: &'a Tensor,
    pub weight: &'a Tensor,
    pub mean: &'a Tensor,
    pub rstd: &'a Tensor,
}

impl LayerNormParams {
    /// What every backend checks before a forward: the tensors hold what the shapes need, and no
    /// output overlaps another or an input.
    pub fn check_forward(&self, t: &NormForward) -> Result<()> {
        let (rows, cols) = (self.rows, self.cols);
        check_len("layer_norm out", t.out, rows * cols)?;
        check_len("layer_norm inp", t.inp, rows * cols)?;
        check_len("layer_norm mean", t.mean, rows)?;
        check_len("layer_norm rstd", t.rstd, rows)?;
        check_len("layer_norm weight", t.weight, cols)?;
        check_len("layer_norm bias", t.bias, cols)?;
        check_disjoint("layer_norm", &[t.out, t.mean, t.rstd], &[t.inp, t.weight, t.bias])
    }

    /// As [`LayerNormParams::check_forward`], for a backward.
    pub fn check_backward(&self, t: &LayerNormBackward) -> Result<()> {
        let (rows, cols) = (self.rows, self.cols);
        check_len("layer_norm_backward dinp", t.dinp, rows * cols)?;
        check_len("layer_norm_backward dout", t.dout, rows * cols)?;
        check_len("layer_norm_backward inp", t.inp, rows * cols)?;
        check_len("layer_norm_backward weight", t.weight, cols)?;
        check_len("layer_norm_backward dweight", t.dweight, cols)?;
        check_len("layer_norm_backward dbias", t.dbias, cols)?;
        check_len("layer_norm_backward mean", t.mean, rows)?;
        check_len("layer_norm_backward rstd", t.rstd, rows)?;
        check_disjoint("layer_norm_backward", &[t.dinp, t.dweight, t.dbias], &[t.dout, t.inp, t.weight, t.mean, t.rstd])
    }

    /// The CPU reference of the forward, on checked slices: `[out, mean, rstd]`, `[inp, weight,
    /// bias]`. Two passes in f64 for each row's statistics: the reference for the f32/bf16 kernels.
    pub fn cpu_forward(&self, [o, m, r]: [&mut [f32]; 3], [x, w, b]: [&[f32]; 3]) {
        let (rows, cols) = (self.rows, self.cols);
        o[..rows * cols]
            .par_chunks_mut(cols)
            .zip(x[..rows * cols].par_chunks(cols))
            .zip(m[..rows].par_iter_mut().zip(r[..rows].par_iter_mut()))
            .for_each(|((o, x), (m, r))| {
                let mu = x.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
                let var = x.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / cols as f64;
                let rs = 1.0 / (var + self.eps as f64).sqrt();
                for c in 0..cols {
                    o[c] = ((x[c] as f64 - mu) * rs) as f32 * w[c] + b[c];
                }
                *m = mu as f32;
                *r = rs as f32;
            });
    }

    /// The CPU reference of the backward, on checked slices: `[dinp, dweight, dbias]` (accumulated
    /// into), `[dout, inp, weight, mean, rstd]`.
    pub fn cpu_backward(&self, [dinp, dweight, dbias]: [&mut [f32]; 3], ins: [&[f32]; 5]) {
        let [dout, inp, weight, mean, rstd] = ins;
        let (rows, cols) = (self.rows, self.cols);
        dinp[..rows * cols].par_chunks_mut(cols).enumerate().for_each(|(r, di)| {
            let (x, dy) = (&inp[r * cols..(r + 1) * cols], &dout[r * cols..(r + 1) * cols]);
            let (mu, rs) = (mean[r] as f64, rstd[r] as f64);
            let (mut m1, mut m2) = (0f64, 0f64);
            for c in 0..cols {
                let xhat = (x[c] as f64 - mu) * rs;
                let g = dy[c] as f64 * weight[c] as f64;
                m1 += g;
                m2 += g * xhat;
            }
            m1 /= cols as f64;
            m2 /= cols as f64;
            for c in 0..cols {
                let xhat = (x[c] as f64 - mu) * rs;
                let g = dy[c] as f64 * weight[c] as f64;
                di[c] += ((g - m1 - xhat * m2) * rs) as f32;
            }
        });
        dweight[..cols].par_iter_mut().zip(dbias[..cols].par_iter_mut()).enumerate().for_each(|(c, (dw, db))| {
            let (mut sw, mut sb) = (0f64, 0f64);
            for r in 0..rows {
                let xhat = (inp[r * cols + c] as f64 - mean[r] as f64) * rstd[r] as f64;
                sw += dout[r * cols + c] as f64 * xhat;
                sb += dout[r * cols + c] as f64;
            }
            *dw += sw as f32;
            *db += sb as f32;
        });
    }
}

/// One group norm: `batch` images of `hw` positions × `channels`, normalised over each of
/// `groups` groups of channels per image, then `weight · x̂ + bias` per channel (and SiLU).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupNormParams {
    pub batch: usize,
    pub hw: usize,
    pub channels: usize,
    pub groups: usize,
    pub eps: f32,
    /// SiLU after the affine map, fused (the backward recomputes it from the saved statistics).
    pub silu: bool,
}

/// The tensors of a backward call: the gradients `dinp`, `dweight`, `dbias` (accumulated into),
/// `dout`, and the forward's inputs and saved statistics.
pub struct GroupNormBackward<'a> {
    pub dinp: &'a Tensor,
    pub dweight: &'a Tensor,
    pub dbias: &'a Tensor,
    pub dout: &'a Tensor,
    pub inp: &'a Tensor,
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub mean: &'a Tensor,
    pub rstd: &'a Tensor,
}

/// Per-channel sums over the pixels of one NHWC image `xs` (pixels × c) in f64 — of x, or of
/// (x − centre)² — by fixed blocks of pixels in parallel, the blocks' sums added in order: the
/// activation is read once, contiguously (one task per group would read every cache line once per
/// group), and the result does not depend on the thread count.
fn pixel_sums(xs: &[f32], c: usize, centre: Option<&[f64]>) -> Vec<f64> {
    const BLOCK: usize = 1024; // pixels
    let blocks: Vec<Vec<f64>> = xs
        .par_chunks(BLOCK * c)
        .map(|blk| {
            let mut acc = vec![0f64; c];
            vmath::add_column_sums(&mut acc, blk, centre);
            acc
        })
        .collect();
    let mut sums = vec![0f64; c];
    for b in &blocks {
        sums.iter_mut().zip(b).for_each(|(s, &v)| *s += v);
    }
    sums
}

impl GroupNormParams {
    pub fn channels_per_group(&self) -> usize {
        self.channels / self.groups
    }

    /// Elements of the activation (batch · hw · channels).
    pub fn elements(&self) -> usize {
        self.batch * self.hw * self.channels
    }

    /// "batch×hw×channels/groups" (+ " silu"): what the speed of a kernel depends on, the key of
    /// autotuned versions (backend/cuda/autotune.rs).
    pub fn shape_key(&self) -> String {
        let silu = if self.silu { " silu" } else { "" };
        format!("{}x{}x{}/{}{silu}", self.batch, self.hw, self.channels, self.groups)
    }

    fn check_groups(&self) -> Result<()> {
        ensure!(
            self.groups > 0 && self.channels % self.groups == 0,
            "group_norm: {} channels not divisible into {} groups",
            self.channels,
            self.groups
        );
        Ok(())
    }

    /// What every backend checks before a forward: the groups divide the channels, every tensor
    /// holds what the shapes need, and no output overlaps another or an input.
    pub fn check_forward(&self, t: &NormForward) -> Result<()> {
        self.check_groups()?;
        let (n, bg, c) = (self.elements(), self.batch * self.groups, self.channels);
        check_len("group_norm out", t.out, n)?;
        check_len("group_norm inp", t.inp, n)?;
        check_len("group_norm mean", t.mean, bg)?;
        check_len("group_norm rstd", t.rstd, bg)?;
        check_len("group_norm weight", t.weight, c)?;
        check_len("group_norm bias", t.bias, c)?;
        check_disjoint("group_norm", &[t.out, t.mean, t.rstd], &[t.inp, t.weight, t.bias])
    }

    /// As [`GroupNormParams::check_forward`], for a backward.
    pub fn check_backward(&self, t: &GroupNormBackward) -> Result<()> {
        self.check_groups()?;
        let (n, bg, c) = (self.elements(), self.batch * self.groups, self.channels);
        check_len("group_norm_backward dinp", t.dinp, n)?;
        check_len("group_norm_backward dout", t.dout, n)?;
        check_len("group_norm_backward inp", t.inp, n)?;
        check_len("group_norm_backward weight", t.weight, c)?;
        check_len("group_norm_backward bias", t.bias, c)?;
        check_len("group_norm_backward dweight", t.dweight, c)?;
        check_len("group_norm_backward dbias", t.dbias, c)?;
        check_len("group_norm_backward mean", t.mean, bg)?;
        check_len("group_norm_backward rstd", t.rstd, bg)?;
        check_disjoint(
            "group_norm_backward",
            &[t.dinp, t.dweight, t.dbias],
            &[t.dout, t.inp, t.weight, t.bias, t.mean, t.rstd],
        )
    }

    /// The CPU reference of the forward, on checked slices: `[out, mean, rstd]`, `[inp, weight,
    /// bias]`. Statistics in f64, two passes (mean, then squared deviations) as PyTorch's CPU
    /// kernel reaches the same values; then the affine map.
    pub fn cpu_forward(&self, [o, m, r]: [&mut [f32]; 3], [x, w, bi]: [&[f32]; 3]) {
        let (hw, c, groups) = (self.hw, self.channels, self.groups);
        let (cpg, n) = (self.channels_per_group(), self.elements());
        let count = (hw * cpg) as f64;
        let mut stats: Vec<(f64, f64)> = Vec::with_capacity(self.batch * groups);
        for xs in x[..n].chunks(hw * c) {
            let group_sums = |sums: Vec<f64>| sums.chunks(cpg).map(|s| s.iter().sum::<f64>()).collect::<Vec<f64>>();
            let mean: Vec<f64> = group_sums(pixel_sums(xs, c, None)).iter().map(|s| s / count).collect();
            let centre: Vec<f64> = (0..c).map(|ch| mean[ch / cpg]).collect();
            let var = group_sums(pixel_sums(xs, c, Some(&centre)));
            stats.extend(mean.iter().zip(&var).map(|(&mu, &v)| (mu, 1.0 / (v / count + self.eps as f64).sqrt())));
        }
        for (i, &(mu, rs)) in stats.iter().enumerate() {
            m[i] = mu as f32;
            r[i] = rs as f32;
        }
        o[..n].par_chunks_mut(c).zip(x[..n].par_chunks(c)).enumerate().for_each(|(row, (o, x))| {
            let b = row / hw;
            vmath::group_norm_row(o, x, &stats[b * groups..(b + 1) * groups], [w, bi], self.silu);
        });
    }

    /// The CPU reference of the backward, on checked slices: `[dinp, dweight, dbias]` (accumulated
    /// into), `[dout, inp, weight, bias, mean, rstd]`. Per (image, group) reductions in f64, then
    /// per element.
    pub fn cpu_backward(&self, [dinp, dweight, dbias]: [&mut [f32]; 3], ins: [&[f32]; 6]) {
        let [dout, inp, weight, bias, mean, rstd] = ins;
        let (batch, hw, c, groups) = (self.batch, self.hw, self.channels, self.groups);
        let (cpg, n) = (self.channels_per_group(), self.elements());
        // dy: the gradient at the affine output (through SiLU when fused).
        let dy: Vec<f32> = (0..n)
            .into_par_iter()
            .map(|i| {
                if !self.silu {
                    return dout[i];
                }
                let (b, ch) = (i / (hw * c), i % c);
                let g = b * groups + ch / cpg;
                let y = ((inp[i] as f64 - mean[g] as f64) * rstd[g] as f64) as f32 * weight[ch] + bias[ch];
                let s = 1.0 / (1.0 + (-y).exp());
                dout[i] * s * (1.0 + y * (1.0 - s))
            })
            .collect();
        let xhat = |i: usize| -> f64 {
            let (b, ch) = (i / (hw * c), i % c);
            let g = b * groups + ch / cpg;
            (inp[i] as f64 - mean[g] as f64) * rstd[g] as f64
        };
        // Per (batch, group): mean of dxhat and of dxhat·xhat.
        let stats: Vec<(f64, f64)> = (0..batch * groups)
            .into_par_iter()
            .map(|bg| {
                let (b, g) = (bg / groups, bg % groups);
                let (mut m1, mut m2) = (0f64, 0f64);
                for p in 0..hw {
                    for ch in g * cpg..(g + 1) * cpg {
                        let i = (b * hw + p) * c + ch;
                        let dxh = dy[i] as f64 * weight[ch] as f64;
                        m1 += dxh;
                        m2 += dxh * xhat(i);
                    }
                }
                let cnt = (hw * cpg) as f64;
                (m1 / cnt, m2 / cnt)
            })
            .collect();
        dinp[..n].par_chunks_mut(c).enumerate().for_each(|(row, di)| {
            let b = row / hw;
            for ch in 0..c {
                let i = row * c + ch;
                let g = b * groups + ch / cpg;
                let (m1, m2) = stats[g];
                let dxh = dy[i] as f64 * weight[ch] as f64;
                di[ch] += ((dxh - m1 - xhat(i) * m2) * rstd[g] as f64) as f32;
            }
        });
        dweight[..c].par_iter_mut().zip(dbias[..c].par_iter_mut()).enumerate().for_each(|(ch, (dw, db))| {
            let (mut sw, mut sb) = (0f64, 0f64);
            for row in 0..batch * hw {
                let i = row * c + ch;
                sw += dy[i] as f64 * xhat(i);
                sb += dy[i] as f64;
            }
            *dw += sw as f32;
            *db += sb as f32;
        });
    }
}

/// Batch norm at inference, as `rows` positions × `channels`: out = x · scale + shift per channel,
/// then ReLU when `relu` (the evaluation networks' norm → act pairs). `scale` and `shift` are the
/// running statistics folded once at load by [`BatchNormParams::fold`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchNormParams {
    pub rows: usize,
    pub channels: usize,
    pub relu: bool,
}

/// The tensors of a batch norm call: `out` and `inp` (rows, channels), the folded `scale` and
/// `shift` (channels).
#[derive(Clone, Copy)]
pub struct BatchNormForward<'a> {
    pub out: &'a Tensor,
    pub inp: &'a Tensor,
    pub scale: &'a Tensor,
    pub shift: &'a Tensor,
}

impl BatchNormParams {
    /// (scale, shift) = (γ / √(var + ε), β − mean · scale), in f64 then rounded, as PyTorch's CPU
    /// kernel folds the running statistics before its single multiply-add.
    pub fn fold(gamma: &[f32], beta: &[f32], mean: &[f32], var: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
        let scale: Vec<f32> =
            gamma.iter().zip(var).map(|(g, v)| (*g as f64 / (*v as f64 + eps).sqrt()) as f32).collect();
        let shift = beta.iter().zip(mean).zip(&scale).map(|((b, m), s)| b - m * s).collect();
        (scale, shift)
    }

    pub fn check_forward(&self, t: &BatchNormForward) -> Result<()> {
        let (n, c) = (self.rows * self.channels, self.channels);
        check_lens(
            "batch_norm",
            &[("out", t.out, n), ("inp", t.inp, n), ("scale", t.scale, c), ("shift", t.shift, c)],
        )?;
        check_disjoint("batch_norm", &[t.out], &[t.inp, t.scale, t.shift])
    }

    /// The CPU reference: a multiply and an add in f32 per element (not fused), then ReLU.
    pub fn cpu_forward(&self, out: &mut [f32], [x, scale, shift]: [&[f32]; 3]) {
        let c = self.channels;
        let n = self.rows * c;
        out[..n].par_chunks_mut(c).zip(x[..n].par_chunks(c)).for_each(|(o, x)| {
            for k in 0..c {
                let y = x[k] * scale[k] + shift[k];
                o[k] = if self.relu { y.max(0.0) } else { y };
            }
        });
    }
}

/// Batch norm in training mode, as `F.batch_norm(x, running_mean, running_var, weight, bias,
/// training=True, momentum, eps)` on `rows` positions × `channels`, then ReLU when `relu` (the
/// DenseNet's norm → act pairs). The forward is two calls: [`NormOps::batch_norm_stats`] (the
/// batch's statistics, the running statistics' update, and the batch's (scale, shift)), then the
/// inference [`NormOps::batch_norm_forward`] with that (scale, shift), as PyTorch's CPU kernel
/// applies `x · (invstd · γ) + (β − mean · invstd · γ)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormTrainParams {
    pub rows: usize,
    pub channels: usize,
    pub eps: f32,
    /// The running statistics' update weight (PyTorch's `momentum`, 0.1 by default).
    pub momentum: f32,
    pub relu: bool,
}

/// The tensors of [`NormOps::batch_norm_stats`]: `inp` (rows, channels), `weight` and `bias`; the
/// running statistics, updated in place; and per channel, written: the batch `mean` and `rstd`
/// (1 / √(biased variance + ε), what the backward reads) and the folded `scale` and `shift`.
#[derive(Clone, Copy)]
pub struct BatchNormStats<'a> {
    pub inp: &'a Tensor,
    pub weight: &'a Tensor,
    pub bias: &'a Tensor,
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    pub mean: &'a Tensor,
    pub rstd: &'a Tensor,
    pub scale: &'a Tensor,
    pub shift: &'a Tensor,
}

/// The tensors of [`NormOps::batch_norm_backward`]: the gradients `dinp` (rows, channels),
/// `dweight` and `dbias` (accumulated into); `dout`; the forward's `inp`, its output `out` after
/// the ReLU (read only when `relu`: where it is 0 no gradient passes), the saved `mean` and `rstd`,
/// and `weight`.
#[derive(Clone, Copy)]
pub struct BatchNormBackward<'a> {
    pub dinp: &'a Tensor,
    pub dweight: &'a Tensor,
    pub dbias: &'a Tensor,
    pub dout: &'a Tensor,
    pub inp: &'a Tensor,
    pub out: &'a Tensor,
    pub mean: &'a Tensor,
    pub rstd: &'a Tensor,
    pub weight: &'a Tensor,
}

/// Rows per partial sum of the CPU reference (the chunks are summed in order, so the result does
/// not depend on the thread count).
const BN_CHUNK_ROWS: usize = 256;

impl BatchNormTrainParams {
    fn check_rows(&self, what: &str) -> Result<()> {
        ensure!(
            self.rows >= 2,
            "{what}: {} value(s) per channel; training statistics need more than 1 (PyTorch refuses too)",
            self.rows
        );
        Ok(())
    }

    pub fn check_stats(&self, t: &BatchNormStats) -> Result<()> {
        self.check_rows("batch_norm_stats")?;
        let (n, c) = (self.rows * self.channels, self.channels);
        check_lens(
            "batch_norm_stats",
            &[
                ("inp", t.inp, n),
                ("weight", t.weight, c),
                ("bias", t.bias, c),
                ("running_mean", t.running_mean, c),
                ("running_var", t.running_var, c),
                ("mean", t.mean, c),
                ("rstd", t.rstd, c),
                ("scale", t.scale, c),
                ("shift", t.shift, c),
            ],
        )?;
        check_disjoint(
            "batch_norm_stats",
            &[t.running_mean, t.running_var, t.mean, t.rstd, t.scale, t.shift],
            &[t.inp, t.weight, t.bias],
        )
    }

    pub fn check_backward(&self, t: &BatchNormBackward) -> Result<()> {
        self.check_rows("batch_norm_backward")?;
        let (n, c) = (self.rows * self.channels, self.channels);
        check_lens(
            "batch_norm_backward",
            &[
                ("dinp", t.dinp, n),
                ("dweight", t.dweight, c),
                ("dbias", t.dbias, c),
                ("dout", t.dout, n),
                ("inp", t.inp, n),
                ("out", t.out, n),
                ("mean", t.mean, c),
                ("rstd", t.rstd, c),
                ("weight", t.weight, c),
            ],
        )?;
        check_disjoint(
            "batch_norm_backward",
            &[t.dinp, t.dweight, t.dbias],
            &[t.dout, t.inp, t.out, t.mean, t.rstd, t.weight],
        )
    }

    /// Per channel, two f64 column sums of `f(row, channel)` over all rows: partial sums by
    /// chunks of [`BN_CHUNK_ROWS`] rows (in parallel), then the chunks in order.
    fn column_sums(&self, f: impl Fn(usize, usize) -> (f64, f64) + Sync) -> Vec<(f64, f64)> {
        let c = self.channels;
        let chunks: Vec<Vec<(f64, f64)>> = (0..self.rows.div_ceil(BN_CHUNK_ROWS))
            .into_par_iter()
            .map(|k| {
                let mut acc = vec![(0f64, 0f64); c];
                for r in k * BN_CHUNK_ROWS..((k + 1) * BN_CHUNK_ROWS).min(self.rows) {
                    for (ch, a) in acc.iter_mut().enumerate() {
                        let (u, v) = f(r, ch);
                        a.0 += u;
                        a.1 += v;
                    }
                }
                acc
            })
            .collect();
        let mut total = vec![(0f64, 0f64); c];
        for part in &chunks {
            total.iter_mut().zip(part).for_each(|(t, p)| {
                t.0 += p.0;
                t.1 += p.1;
            });
        }
        total
    }

    /// The CPU reference of the statistics: Σx and Σx² per channel in f64 (one pass; f64 keeps
    /// E[x²] − mean² exact enough for f32 data); the biased variance normalises, the unbiased
    /// (× n / (n − 1)) updates `running_var`. rstd is rounded once from f64; scale = weight · rstd
    /// and shift = bias − mean · scale in f32; the running updates in f64, rounded once.
    pub fn cpu_stats(&self, [rm, rv, mean, rstd, scale, shift]: [&mut [f32]; 6], [x, w, b]: [&[f32]; 3]) {
        let c = self.channels;
        let sums = self.column_sums(|r, ch| {
            let v = x[r * c + ch] as f64;
            (v, v * v)
        });
        let (n, m) = (self.rows as f64, self.momentum as f64);
        for (ch, &(s, s2)) in sums.iter().enumerate() {
            let mu = s / n;
            let var = (s2 / n - mu * mu).max(0.0);
            mean[ch] = mu as f32;
            rstd[ch] = (1.0 / (var + self.eps as f64).sqrt()) as f32;
            scale[ch] = w[ch] * rstd[ch];
            shift[ch] = b[ch] - mean[ch] * scale[ch];
            rm[ch] = ((1.0 - m) * rm[ch] as f64 + m * mu) as f32;
            rv[ch] = ((1.0 - m) * rv[ch] as f64 + m * var * n / (n - 1.0)) as f32;
        }
    }

    /// The CPU reference of the backward, with g = dout (× [out > 0] when `relu`) and x̂ = (x −
    /// mean) · rstd: dweight += Σ g·x̂, dbias += Σ g, dinp += weight · rstd · (g − Σg / n − x̂ · Σg·x̂ / n)
    /// (f64, rounded once).
    pub fn cpu_backward(&self, [dinp, dw, db]: [&mut [f32]; 3], [dout, x, out, mean, rstd, w]: [&[f32]; 6]) {
        let c = self.channels;
        let g = |i: usize| if self.relu && out[i] <= 0.0 { 0.0 } else { dout[i] as f64 };
        let xhat = |i: usize, ch: usize| (x[i] as f64 - mean[ch] as f64) * rstd[ch] as f64;
        let sums = self.column_sums(|r, ch| {
            let i = r * c + ch;
            let gi = g(i);
            (gi, gi * xhat(i, ch))
        });
        let n = self.rows as f64;
        for (ch, &(sg, sgx)) in sums.iter().enumerate() {
            dw[ch] += sgx as f32;
            db[ch] += sg as f32;
        }
        dinp[..self.rows * c].par_chunks_mut(c).enumerate().for_each(|(r, d)| {
            for (ch, d) in d.iter_mut().enumerate() {
                let i = r * c + ch;
                let (sg, sgx) = sums[ch];
                let v = w[ch] as f64 * rstd[ch] as f64 * (g(i) - sg / n - xhat(i, ch) * sgx / n);
                *d = (*d as f64 + v) as f32;
            }
        });
    }
}

/// The layer, group and batch norms on a backend.
pub trait NormOps {
    /// Layer norm over the last dimension: out, mean (rows), rstd (rows), inp (rows, cols).
    fn layer_norm_forward(&self, p: &LayerNormParams, t: &NormForward) -> Result<()>;

    /// Group norm on channels-last tensors, statistics over (hw, c / groups) per (batch, group),
    /// optionally followed by SiLU (the resnet's norm → act pair, fused). inp/out (batch, hw, c),
    /// mean/rstd (batch, groups).
    fn group_norm_forward(&self, p: &GroupNormParams, t: &NormForward) -> Result<()>;

    /// Of `layer_norm_forward`, from the saved mean and rstd.
    fn layer_norm_backward(&self, p: &LayerNormParams, t: &LayerNormBackward) -> Result<()>;

    /// Of `group_norm_forward` (with its SiLU when `silu`, recomputed from the saved statistics).
    fn group_norm_backward(&self, p: &GroupNormParams, t: &GroupNormBackward) -> Result<()>;

    /// Inference batch norm (and ReLU) on (rows, channels): the evaluation networks', and the
    /// application step of a training forward.
    fn batch_norm_forward(&self, p: &BatchNormParams, t: &BatchNormForward) -> Result<()>;

    /// A training forward's statistics: the batch's mean and rstd, the running statistics'
    /// update, and the (scale, shift) that `batch_norm_forward` then applies.
    fn batch_norm_stats(&self, p: &BatchNormTrainParams, t: &BatchNormStats) -> Result<()>;

    /// Of a training batch norm (and its ReLU), from the saved statistics.
    fn batch_norm_backward(&self, p: &BatchNormTrainParams, t: &BatchNormBackward) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::ops::test_support::cpu_pool;

    /// The checks live here, so every backend refuses a bad call with an error that names the
    /// tensor; the CPU backend used to panic on an overlap and did not check weight or bias.
    #[test]
    fn a_bad_group_norm_call_is_refused_naming_the_tensor() {
        let (b, t) = cpu_pool(128);
        let p = GroupNormParams { batch: 1, hw: 4, channels: 8, groups: 2, eps: 1e-5, silu: true };
        let (out, mean, rstd, inp, weight, bias) = (t(0, 32), t(32, 2), t(34, 2), t(36, 32), t(68, 8), t(76, 8));
        let x: Vec<f32> = (0..32).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
        b.upload(&inp, &x).unwrap();
        b.upload(&weight, &[0.5, 1.0, 1.5, 2.0, -1.0, 0.25, 0.75, 1.25]).unwrap();
        let good = NormForward { out: &out, mean: &mean, rstd: &rstd, inp: &inp, weight: &weight, bias: &bias };
        b.group_norm_forward(&p, &good).unwrap();
        let m = b.download(&mean).unwrap();
        let want = x[..32].chunks(8).flat_map(|r| r[..4].to_vec()).map(|v| v as f64).sum::<f64>() / 16.0;
        assert!((m[0] as f64 - want).abs() < 1e-6, "mean of group 0: {} vs {want}", m[0]);

        let err = |p: &GroupNormParams, t: &NormForward| format!("{:#}", b.group_norm_forward(p, t).unwrap_err());
        let short = t(68, 7);
        assert!(err(&p, &NormForward { weight: &short, ..good }).contains("group_norm weight"));
        assert!(err(&GroupNormParams { groups: 3, ..p }, &good).contains("not divisible into 3 groups"));
        let overlapping = t(40, 32);
        assert!(err(&p, &NormForward { out: &overlapping, ..good }).contains("overlaps input"));
    }
}

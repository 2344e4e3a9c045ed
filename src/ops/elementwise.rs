//! The operations of kernels/elementwise.cu that carry shapes: nearest-neighbour resizing (the
//! U-Net's and the VAE's upsamplers), the text encoders' token + position embedding and the
//! U-Net's timestep embedding, bias rows, channel concatenation and GEGLU. (The plain
//! elementwise operations — add, scale, activations — are still Backend methods of their own.)

use super::gelu;
use crate::backend::Activation;
use crate::backend::{check_disjoint, check_len};
use crate::tensor::Tensor;
use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

/// Nearest-neighbour resize of channels-last maps, (batch, in_h, in_w, channels) → (batch, out_h,
/// out_w, channels), source index floor(o · in / out) as PyTorch's `interpolate(mode="nearest")`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UpsampleParams {
    pub batch: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_h: usize,
    pub out_w: usize,
    pub channels: usize,
}

impl UpsampleParams {
    pub fn in_elements(&self) -> usize {
        self.batch * self.in_h * self.in_w * self.channels
    }

    pub fn out_elements(&self) -> usize {
        self.batch * self.out_h * self.out_w * self.channels
    }

    /// The source pixel of output row `oy` and column `ox`. PyTorch: scale = in / out in f32,
    /// source = min(floor(dst · scale), in − 1).
    fn source(&self, oy: usize, ox: usize) -> (usize, usize) {
        let (sy, sx) = (self.in_h as f32 / self.out_h as f32, self.in_w as f32 / self.out_w as f32);
        (((oy as f32 * sy).floor() as usize).min(self.in_h - 1), ((ox as f32 * sx).floor() as usize).min(self.in_w - 1))
    }

    fn check_input(&self, what: &str) -> Result<()> {
        let UpsampleParams { in_h, in_w, out_h, out_w, .. } = *self;
        ensure!(
            self.out_elements() == 0 || (in_h > 0 && in_w > 0),
            "{what}: empty input {in_h}×{in_w} for an output of {out_h}×{out_w}"
        );
        Ok(())
    }

    /// What every backend checks before a forward.
    pub fn check_forward(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        self.check_input("upsample")?;
        check_len("upsample out", out, self.out_elements())?;
        check_len("upsample inp", inp, self.in_elements())?;
        check_disjoint("upsample", &[out], &[inp])
    }

    /// What every backend checks before a backward.
    pub fn check_backward(&self, dinp: &Tensor, dout: &Tensor) -> Result<()> {
        self.check_input("upsample_backward")?;
        check_len("upsample_backward dinp", dinp, self.in_elements())?;
        check_len("upsample_backward dout", dout, self.out_elements())?;
        check_disjoint("upsample_backward", &[dinp], &[dout])
    }

    /// The CPU reference of the forward, on checked slices: each output pixel copies its source.
    pub fn cpu_forward(&self, out: &mut [f32], inp: &[f32]) {
        let UpsampleParams { in_h, in_w, out_h, out_w, channels: c, .. } = *self;
        out[..self.out_elements()].par_chunks_mut(c).enumerate().for_each(|(row, o)| {
            let (b, rem) = (row / (out_h * out_w), row % (out_h * out_w));
            let (iy, ix) = self.source(rem / out_w, rem % out_w);
            o.copy_from_slice(&inp[((b * in_h + iy) * in_w + ix) * c..][..c]);
        });
    }

    /// The CPU reference of the backward (accumulated into `dinp`): each input pixel sums the
    /// gradients of its copies, one task per image (its input receives only its own output's).
    pub fn cpu_backward(&self, dinp: &mut [f32], dout: &[f32]) {
        let UpsampleParams { in_h, in_w, out_h, out_w, channels: c, .. } = *self;
        if self.out_elements() == 0 {
            return;
        }
        dinp[..self.in_elements()].par_chunks_mut(in_h * in_w * c).enumerate().for_each(|(b, di)| {
            for oy in 0..out_h {
                for ox in 0..out_w {
                    let (iy, ix) = self.source(oy, ox);
                    let src = &dout[((b * out_h + oy) * out_w + ox) * c..][..c];
                    let dst = &mut di[(iy * in_w + ix) * c..][..c];
                    for t in 0..c {
                        dst[t] += src[t];
                    }
                }
            }
        });
    }
}

/// Token + position embedding: out[b, t] = wte[ids[b, t]] + wpe[t], for `batch` sequences of
/// `seq` tokens of `dim` values; wte (vocab, dim), wpe (positions, dim).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EmbeddingParams {
    pub batch: usize,
    pub seq: usize,
    pub dim: usize,
}

/// The tensors of an embedding forward: the output and the two tables, with the token ids.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingForward<'a> {
    pub out: &'a Tensor,
    pub ids: &'a [u32],
    pub wte: &'a Tensor,
    pub wpe: &'a Tensor,
}

/// The tensors of an embedding backward: the tables' gradients, the output gradient, the ids.
#[derive(Clone, Copy, Debug)]
pub struct EmbeddingBackward<'a> {
    pub dwte: &'a Tensor,
    pub dwpe: &'a Tensor,
    pub dout: &'a Tensor,
    pub ids: &'a [u32],
}

impl EmbeddingParams {
    /// The ids and the tables' sizes: as many ids as tokens, every id inside the vocabulary, no
    /// more tokens than positions.
    fn check_ids(&self, what: &str, ids: &[u32], wte: &Tensor, wpe: &Tensor) -> Result<()> {
        let EmbeddingParams { batch, seq, dim } = *self;
        ensure!(ids.len() == batch * seq, "{what}: {} ids for batch {batch} × seq {seq}", ids.len());
        ensure!(dim > 0, "{what}: dimension 0");
        let (vocab, positions) = (wte.numel() / dim, wpe.numel() / dim);
        ensure!(seq <= positions, "{what}: sequence of {seq} tokens exceeds the {positions} positions");
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("{what}: token id {bad} is outside the vocabulary of {vocab}");
        }
        Ok(())
    }

    /// What every backend checks before a forward.
    pub fn check_forward(&self, t: &EmbeddingForward) -> Result<()> {
        let EmbeddingForward { out, ids, wte, wpe } = *t;
        self.check_ids("embedding", ids, wte, wpe)?;
        check_len("embedding out", out, self.batch * self.seq * self.dim)?;
        check_disjoint("embedding", &[out], &[wte, wpe])
    }

    /// What every backend checks before a backward (the gradients have the tables' shapes).
    pub fn check_backward(&self, t: &EmbeddingBackward) -> Result<()> {
        let EmbeddingBackward { dwte, dwpe, dout, ids } = *t;
        self.check_ids("embedding_backward", ids, dwte, dwpe)?;
        check_len("embedding_backward dout", dout, self.batch * self.seq * self.dim)?;
        check_disjoint("embedding_backward", &[dwte, dwpe], &[dout])
    }

    /// The CPU reference of the forward, on checked slices.
    pub fn cpu_forward(&self, out: &mut [f32], ids: &[u32], [wte, wpe]: [&[f32]; 2]) {
        let EmbeddingParams { batch, seq, dim } = *self;
        out[..batch * seq * dim].par_chunks_mut(dim).enumerate().for_each(|(row, o)| {
            let (id, t) = (ids[row] as usize, row % seq);
            let (e, p) = (&wte[id * dim..(id + 1) * dim], &wpe[t * dim..(t + 1) * dim]);
            for c in 0..dim {
                o[c] = e[c] + p[c];
            }
        });
    }

    /// The CPU reference of the backward (accumulated into the tables' gradients), serial over
    /// rows: the same token id may appear in several rows, and its sum keeps the rows' order.
    pub fn cpu_backward(&self, [dwte, dwpe]: [&mut [f32]; 2], dout: &[f32], ids: &[u32]) {
        let EmbeddingParams { batch, seq, dim } = *self;
        for row in 0..batch * seq {
            let (id, t) = (ids[row] as usize, row % seq);
            let g = &dout[row * dim..(row + 1) * dim];
            dwte[id * dim..(id + 1) * dim].iter_mut().zip(g).for_each(|(x, y)| *x += y);
            dwpe[t * dim..(t + 1) * dim].iter_mut().zip(g).for_each(|(x, y)| *x += y);
        }
    }
}

/// A per-sample channel vector added at every position: out[b, r, :] = inp[b, r, :] + bias[b, :]
/// for `batch` samples of `rows` positions × `channels` (the resnets' time embedding, BERT's
/// token-type row).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BiasRowsParams {
    pub batch: usize,
    pub rows: usize,
    pub channels: usize,
}

impl BiasRowsParams {
    fn elements(&self) -> usize {
        self.batch * self.rows * self.channels
    }

    /// What every backend checks before a forward.
    pub fn check_forward(&self, out: &Tensor, inp: &Tensor, bias: &Tensor) -> Result<()> {
        check_len("add_bias_rows out", out, self.elements())?;
        check_len("add_bias_rows inp", inp, self.elements())?;
        check_len("add_bias_rows bias", bias, self.batch * self.channels)?;
        check_disjoint("add_bias_rows", &[out], &[inp, bias])
    }

    /// What every backend checks before a backward.
    pub fn check_backward(&self, dbias: &Tensor, dout: &Tensor) -> Result<()> {
        check_len("add_bias_rows_backward dbias", dbias, self.batch * self.channels)?;
        check_len("add_bias_rows_backward dout", dout, self.elements())?;
        check_disjoint("add_bias_rows_backward", &[dbias], &[dout])
    }

    /// The CPU reference of the forward, on checked slices.
    pub fn cpu_forward(&self, out: &mut [f32], [x, bias]: [&[f32]; 2]) {
        let (rows, c) = (self.rows, self.channels);
        out[..self.elements()].par_chunks_mut(c).zip(x.par_chunks(c)).enumerate().for_each(|(r, (o, x))| {
            let bv = &bias[(r / rows) * c..][..c];
            for i in 0..c {
                o[i] = x[i] + bv[i];
            }
        });
    }

    /// The CPU reference of the backward (accumulated into dbias): each sample's column sums of
    /// dout, in f64.
    pub fn cpu_backward(&self, dbias: &mut [f32], dout: &[f32]) {
        let (rows, c) = (self.rows, self.channels);
        dbias[..self.batch * c].par_chunks_mut(c).enumerate().for_each(|(b, db)| {
            for (ch, d) in db.iter_mut().enumerate() {
                let s: f64 = (0..rows).map(|r| dout[(b * rows + r) * c + ch] as f64).sum();
                *d += s as f32;
            }
        });
    }
}

/// Channel concatenation of two channels-last maps of `rows` positions: out = [a | b], with
/// `a_channels` and `b_channels` (the U-Net's skip connections).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConcatParams {
    pub rows: usize,
    pub a_channels: usize,
    pub b_channels: usize,
}

impl ConcatParams {
    fn width(&self) -> usize {
        self.a_channels + self.b_channels
    }

    /// What every backend checks before a forward.
    pub fn check_forward(&self, out: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
        check_len("concat out", out, self.rows * self.width())?;
        check_len("concat a", a, self.rows * self.a_channels)?;
        check_len("concat b", b, self.rows * self.b_channels)?;
        check_disjoint("concat", &[out], &[a, b])
    }

    /// What every backend checks before a backward.
    pub fn check_backward(&self, da: &Tensor, db: &Tensor, dout: &Tensor) -> Result<()> {
        check_len("concat_backward da", da, self.rows * self.a_channels)?;
        check_len("concat_backward db", db, self.rows * self.b_channels)?;
        check_len("concat_backward dout", dout, self.rows * self.width())?;
        check_disjoint("concat_backward", &[da, db], &[dout])
    }

    /// The CPU reference of the forward, on checked slices.
    pub fn cpu_forward(&self, out: &mut [f32], [a, b]: [&[f32]; 2]) {
        let (ca, cb) = (self.a_channels, self.b_channels);
        out[..self.rows * self.width()].par_chunks_mut(ca + cb).enumerate().for_each(|(r, o)| {
            o[..ca].copy_from_slice(&a[r * ca..(r + 1) * ca]);
            o[ca..].copy_from_slice(&b[r * cb..(r + 1) * cb]);
        });
    }

    /// The CPU reference of the backward (accumulated into da and db): dout split by channels.
    pub fn cpu_backward(&self, [da, db]: [&mut [f32]; 2], dout: &[f32]) {
        let (rows, ca, cb) = (self.rows, self.a_channels, self.b_channels);
        da[..rows * ca].par_chunks_mut(ca).zip(db[..rows * cb].par_chunks_mut(cb)).enumerate().for_each(
            |(r, (a, b))| {
                let g = &dout[r * (ca + cb)..(r + 1) * (ca + cb)];
                a.iter_mut().zip(&g[..ca]).for_each(|(x, y)| *x += y);
                b.iter_mut().zip(&g[ca..]).for_each(|(x, y)| *x += y);
            },
        );
    }
}

/// GEGLU over `rows` vectors: inp (rows, 2·inner) = [x | gate] → out (rows, inner) = x · gelu(gate),
/// the exact erf GELU (the U-Net's feed-forward).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GegluParams {
    pub rows: usize,
    pub inner: usize,
}

impl GegluParams {
    /// What every backend checks before a forward.
    pub fn check_forward(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        check_len("geglu out", out, self.rows * self.inner)?;
        check_len("geglu inp", inp, self.rows * 2 * self.inner)?;
        check_disjoint("geglu", &[out], &[inp])
    }

    /// What every backend checks before a backward.
    pub fn check_backward(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor) -> Result<()> {
        check_len("geglu_backward dinp", dinp, self.rows * 2 * self.inner)?;
        check_len("geglu_backward dout", dout, self.rows * self.inner)?;
        check_len("geglu_backward inp", inp, self.rows * 2 * self.inner)?;
        check_disjoint("geglu_backward", &[dinp], &[dout, inp])
    }

    /// The CPU reference of the forward, on checked slices.
    pub fn cpu_forward(&self, out: &mut [f32], inp: &[f32]) {
        let inner = self.inner;
        out[..self.rows * inner].par_chunks_mut(inner).zip(inp.par_chunks(2 * inner)).for_each(|(o, x)| {
            for i in 0..inner {
                o[i] = x[i] * gelu(x[inner + i]);
            }
        });
    }

    /// The CPU reference of the backward (accumulated into dinp), the gate's derivative in f64.
    pub fn cpu_backward(&self, dinp: &mut [f32], [dout, inp]: [&[f32]; 2]) {
        let inner = self.inner;
        dinp[..self.rows * 2 * inner].par_chunks_mut(2 * inner).enumerate().for_each(|(r, di)| {
            let x = &inp[r * 2 * inner..(r + 1) * 2 * inner];
            let g = &dout[r * inner..(r + 1) * inner];
            for i in 0..inner {
                let gate = x[inner + i] as f64;
                let cdf = 0.5 * (1.0 + libm::erf(gate / std::f64::consts::SQRT_2));
                let pdf = (-0.5 * gate * gate).exp() / (2.0 * std::f64::consts::PI).sqrt();
                di[i] += g[i] * gelu(x[inner + i]);
                di[inner + i] += (g[i] as f64 * x[i] as f64 * (cdf + gate * pdf)) as f32;
            }
        });
    }
}

/// diffusers' `get_timestep_embedding` (scale 1, max_period 10000) of `batch` timesteps into
/// (batch, dim), in f32.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimestepEmbeddingParams {
    pub batch: usize,
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
}

impl TimestepEmbeddingParams {
    /// What every backend checks.
    pub fn check(&self, out: &Tensor, timesteps: &Tensor) -> Result<()> {
        check_len("timestep_embedding out", out, self.batch * self.dim)?;
        check_len("timestep_embedding timesteps", timesteps, self.batch)?;
        check_disjoint("timestep_embedding", &[out], &[timesteps])
    }

    /// The CPU reference, on checked slices.
    pub fn cpu_forward(&self, out: &mut [f32], timesteps: &[f32]) {
        let TimestepEmbeddingParams { batch, dim, flip_sin_to_cos, freq_shift } = *self;
        for (row, &t) in out[..batch * dim].chunks_mut(dim.max(1)).zip(&timesteps[..batch]) {
            row.copy_from_slice(&timestep_embedding(t, dim, flip_sin_to_cos, freq_shift));
        }
    }
}

/// diffusers' `get_timestep_embedding` (scale 1, max_period 10000) of one timestep, computed in f32
/// as torch does (the CPU reference of
/// `Backend::timestep_embedding`; kernels/elementwise.cu `ew_timestep_embedding` is the same on the
/// GPU).
pub fn timestep_embedding(t: f32, dim: usize, flip_sin_to_cos: bool, freq_shift: f32) -> Vec<f32> {
    let half = dim / 2;
    let log_period = -(10000f64.ln()) as f32;
    let mut sin = Vec::with_capacity(half);
    let mut cos = Vec::with_capacity(half);
    for i in 0..half {
        let exponent = log_period * i as f32 / (half as f32 - freq_shift);
        let arg = t * exponent.exp();
        sin.push(arg.sin());
        cos.push(arg.cos());
    }
    let (first, second) = if flip_sin_to_cos { (cos, sin) } else { (sin, cos) };
    let mut emb = first;
    emb.extend(second);
    emb.resize(dim, 0.0); // odd dims are zero-padded
    emb
}

/// The pointwise operations over the first `n` elements of their tensors (kernels/elementwise.cu
/// `ew_activation_fwd`/`_bwd`, `ew_add`, `ew_accumulate`, `ew_scale`, `ew_lerp`): the checks both
/// backends run (every tensor holds `n` elements; outputs overlap nothing) and the CPU references.
#[derive(Clone, Copy, Debug)]
pub struct Pointwise {
    pub n: usize,
}

impl Pointwise {
    fn check(&self, what: &str, outs: &[(&str, &Tensor)], ins: &[(&str, &Tensor)]) -> Result<()> {
        for (name, t) in outs.iter().chain(ins) {
            check_len(&format!("{what} {name}"), t, self.n)?;
        }
        let (o, i): (Vec<&Tensor>, Vec<&Tensor>) =
            (outs.iter().map(|x| x.1).collect(), ins.iter().map(|x| x.1).collect());
        check_disjoint(what, &o, &i)
    }

    pub fn check_activation_forward(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        self.check("activation", &[("out", out)], &[("inp", inp)])
    }

    pub fn check_activation_backward(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor) -> Result<()> {
        self.check("activation_backward", &[("dinp", dinp)], &[("dout", dout), ("inp", inp)])
    }

    pub fn check_add(&self, out: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
        self.check("add", &[("out", out)], &[("a", a), ("b", b)])
    }

    /// `dst += src` (dst is read and written).
    pub fn check_accumulate(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        self.check("accumulate", &[("dst", dst)], &[("src", src)])
    }

    /// `t *= s` in place.
    pub fn check_scale(&self, t: &Tensor) -> Result<()> {
        self.check("scale", &[("t", t)], &[])
    }

    /// `dst -= w · (dst − src)` in place (an EMA update).
    pub fn check_lerp(&self, dst: &Tensor, src: &Tensor) -> Result<()> {
        self.check("lerp", &[("dst", dst)], &[("src", src)])
    }

    pub fn cpu_activation_forward(&self, out: &mut [f32], inp: &[f32], act: Activation) {
        let f: fn(f32) -> f32 = match act {
            Activation::QuickGelu => |x| x / (1.0 + (-1.702 * x).exp()),
            Activation::Gelu => gelu,
            Activation::GeluTanh => |x| {
                let x = x as f64;
                let c = (2.0 / std::f64::consts::PI).sqrt();
                (0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())) as f32
            },
            Activation::Silu => super::silu,
        };
        let n = self.n;
        out[..n].par_iter_mut().zip(inp[..n].par_iter()).for_each(|(o, &x)| *o = f(x));
    }

    /// Accumulates `dout · act'(inp)` into `dinp`.
    pub fn cpu_activation_backward(&self, dinp: &mut [f32], dout: &[f32], inp: &[f32], act: Activation) {
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
        let n = self.n;
        dinp[..n].par_iter_mut().zip(dout[..n].par_iter().zip(inp[..n].par_iter())).for_each(|(di, (&g, &x))| {
            *di += g * d(x);
        });
    }

    pub fn cpu_add(&self, out: &mut [f32], a: &[f32], b: &[f32]) {
        let n = self.n;
        out[..n].par_iter_mut().zip(a[..n].par_iter().zip(b[..n].par_iter())).for_each(|(o, (a, b))| *o = a + b);
    }

    pub fn cpu_accumulate(&self, dst: &mut [f32], src: &[f32]) {
        dst[..self.n].par_iter_mut().zip(src[..self.n].par_iter()).for_each(|(d, x)| *d += x);
    }

    pub fn cpu_scale(&self, t: &mut [f32], s: f32) {
        t[..self.n].par_iter_mut().for_each(|x| *x *= s);
    }

    pub fn cpu_lerp(&self, dst: &mut [f32], src: &[f32], w: f32) {
        dst[..self.n].par_iter_mut().zip(src[..self.n].par_iter()).for_each(|(d, &x)| *d -= w * (*d - x));
    }
}

/// The elementwise and data-movement operations on a backend. The backward passes ACCUMULATE
/// into every gradient they write, as llm.c does, so residual and skip paths need no special
/// casing; callers zero gradients first.
pub trait ElementwiseOps {
    /// out[b, t, :] = wte[ids[b·seq + t], :] + wpe[t, :]; out (batch, seq, dim), wte (vocab, dim),
    /// wpe (max_positions ≥ seq, dim). Ids are checked against the vocabulary.
    fn embedding_forward(&self, p: &EmbeddingParams, t: &EmbeddingForward) -> Result<()>;

    /// out = act(inp), n elements.
    fn activation_forward(&self, out: &Tensor, inp: &Tensor, act: Activation, n: usize) -> Result<()>;

    /// out = a + b, n elements (residual connections).
    fn add_forward(&self, out: &Tensor, a: &Tensor, b: &Tensor, n: usize) -> Result<()>;

    /// Nearest-neighbour resize, channels-last: inp (batch, ih, iw, c) → out (batch, oh, ow, c),
    /// source index floor(o · in / out) as PyTorch's `interpolate(mode="nearest")`.
    fn upsample_nearest_forward(&self, p: &UpsampleParams, out: &Tensor, inp: &Tensor) -> Result<()>;

    /// out[b, r, :] = inp[b, r, :] + bias[b, :]: a per-sample channel vector added at every position
    /// (the resnet's time embedding). inp/out (batch, rows, c), bias (batch, c).
    fn add_bias_rows_forward(&self, p: &BiasRowsParams, out: &Tensor, inp: &Tensor, bias: &Tensor) -> Result<()>;

    /// Channel concatenation, channels-last: out (rows, ca + cb) = [a (rows, ca) | b (rows, cb)]
    /// (the U-Net's skip connections, `torch.cat([h, skip], dim=1)` in NCHW).
    fn concat_channels_forward(&self, p: &ConcatParams, out: &Tensor, a: &Tensor, b: &Tensor) -> Result<()>;

    /// diffusers' `get_timestep_embedding` (scale 1, max_period 10000) in f32: out (batch, dim),
    /// row b = [sin | cos] (or [cos | sin] with `flip_sin_to_cos`) of timesteps[b] · exp(−ln(10000)
    /// · i / (dim/2 − freq_shift)), i < dim/2, zero-padded for an odd dim; timesteps (batch).
    fn timestep_embedding(&self, p: &TimestepEmbeddingParams, out: &Tensor, timesteps: &Tensor) -> Result<()>;

    /// GEGLU: inp (rows, 2·inner) = [x | gate] → out (rows, inner) = x · gelu(gate) (exact erf gelu).
    fn geglu_forward(&self, p: &GegluParams, out: &Tensor, inp: &Tensor) -> Result<()>;

    /// t = 0.
    fn zero(&self, t: &Tensor) -> Result<()>;

    /// dst += src, n elements.
    fn accumulate(&self, dst: &Tensor, src: &Tensor, n: usize) -> Result<()>;

    /// t *= s, n elements.
    fn scale(&self, t: &Tensor, s: f32, n: usize) -> Result<()>;

    /// dst += w · (src − dst), n elements (an exponential moving average's update).
    fn lerp(&self, dst: &Tensor, src: &Tensor, n: usize, w: f32) -> Result<()>;

    /// Of `activation_forward`: dinp += dout · act'(inp).
    fn activation_backward(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor, act: Activation, n: usize) -> Result<()>;

    /// Of `upsample_nearest_forward`: each input position sums the gradients of its copies.
    fn upsample_nearest_backward(&self, p: &UpsampleParams, dinp: &Tensor, dout: &Tensor) -> Result<()>;

    /// Of `add_bias_rows_forward`, the bias part: dbias[b, :] += Σ_r dout[b, r, :].
    fn add_bias_rows_backward(&self, p: &BiasRowsParams, dbias: &Tensor, dout: &Tensor) -> Result<()>;

    /// Of `concat_channels_forward`: da += dout[:, :ca], db += dout[:, ca:].
    fn concat_channels_backward(&self, p: &ConcatParams, da: &Tensor, db: &Tensor, dout: &Tensor) -> Result<()>;

    /// Of `geglu_forward`.
    fn geglu_backward(&self, p: &GegluParams, dinp: &Tensor, dout: &Tensor, inp: &Tensor) -> Result<()>;

    /// Of `embedding_forward`: dwte[ids] += dout rows, dwpe[t] += dout rows.
    fn embedding_backward(&self, p: &EmbeddingParams, t: &EmbeddingBackward) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::ops::optim::OptimOps;
    use crate::ops::test_support::cpu_pool;

    /// The backward checks the ids as the forward does (the CPU backend used to index past the
    /// table with an id outside the vocabulary, a panic, and checked no length).
    #[test]
    fn embedding_backward_refuses_an_id_outside_the_vocabulary() {
        let (b, t) = cpu_pool(64);
        let p = EmbeddingParams { batch: 1, seq: 2, dim: 4 };
        // vocab 3 (12 values), positions 2 (8 values), dout 2 tokens × 4
        let (dwte, dwpe, dout) = (t(0, 12), t(12, 8), t(20, 8));
        b.upload(&dout, &[0.5, -1.0, 2.0, 0.25, 1.5, 0.75, -0.5, 3.0]).unwrap();
        b.embedding_backward(&p, &EmbeddingBackward { dwte: &dwte, dwpe: &dwpe, dout: &dout, ids: &[2, 0] }).unwrap();
        let te = b.download(&dwte).unwrap();
        assert_eq!(&te[8..12], &[0.5, -1.0, 2.0, 0.25], "token 2 receives row 0's gradient");
        assert_eq!(&te[0..4], &[1.5, 0.75, -0.5, 3.0], "token 0 receives row 1's gradient");
        let e = b
            .embedding_backward(&p, &EmbeddingBackward { dwte: &dwte, dwpe: &dwpe, dout: &dout, ids: &[1, 3] })
            .unwrap_err()
            .to_string();
        assert!(e.contains("token id 3 is outside the vocabulary of 3"), "{e}");
        let e = b
            .embedding_backward(&p, &EmbeddingBackward { dwte: &dwte, dwpe: &dwpe, dout: &t(20, 7), ids: &[1, 2] })
            .unwrap_err()
            .to_string();
        assert!(e.contains("embedding_backward dout"), "{e}");
    }

    /// The backward checks `dout` as the CUDA backend did (the CPU one sliced past a short one).
    #[test]
    fn geglu_backward_refuses_a_short_dout() {
        let (b, t) = cpu_pool(64);
        let p = GegluParams { rows: 2, inner: 3 };
        let (dinp, dout, inp) = (t(0, 12), t(12, 6), t(18, 12));
        b.upload(&inp, &[0.5, -1.0, 2.0, 0.25, 1.5, -0.75, 1.0, 0.5, -2.0, 0.3, -0.2, 0.9]).unwrap();
        b.upload(&dout, &[1.0, -0.5, 0.25, 2.0, 0.75, -1.5]).unwrap();
        b.geglu_backward(&p, &dinp, &dout, &inp).unwrap();
        let short = t(12, 5);
        let e = b.geglu_backward(&p, &dinp, &short, &inp).unwrap_err().to_string();
        assert!(e.contains("geglu_backward dout"), "{e}");
    }

    /// The shared checks now guard the CPU's pointwise backward and reductions too (it checked
    /// only `dinp`, `dpred`, or nothing, and sliced past a short input or summed a short one).
    #[test]
    fn cpu_pointwise_and_reductions_refuse_short_and_overlapping_tensors() {
        let (b, t) = cpu_pool(64);
        let (dinp, dout, inp) = (t(0, 8), t(8, 8), t(16, 8));
        b.upload(&dout, &[1.0, -0.5, 0.25, 2.0, 0.75, -1.5, 0.1, 0.3]).unwrap();
        b.upload(&inp, &[0.5, -1.0, 2.0, 0.25, 1.5, -0.75, 1.0, 0.5]).unwrap();
        b.activation_backward(&dinp, &dout, &inp, Activation::Silu, 8).unwrap();
        let e = b.activation_backward(&dinp, &t(8, 7), &inp, Activation::Silu, 8).unwrap_err().to_string();
        assert!(e.contains("activation_backward dout"), "{e}");
        let e = b.activation_backward(&dinp, &dout, &t(16, 3), Activation::Silu, 8).unwrap_err().to_string();
        assert!(e.contains("activation_backward inp"), "{e}");
        let e = b.activation_backward(&t(4, 8), &dout, &inp, Activation::Silu, 8).unwrap_err().to_string();
        assert!(e.contains("activation_backward") && e.contains("overlap"), "{e}");
        let (loss, sum) = (t(24, 1), t(25, 1));
        b.sum_squares(&sum, &inp, 8).unwrap();
        let e = b.sum_squares(&sum, &t(16, 5), 8).unwrap_err().to_string();
        assert!(e.contains("sum_squares x"), "{e}");
        let e = b.mse_loss(&dinp, &loss, &t(8, 6), &inp, 8).unwrap_err().to_string();
        assert!(e.contains("mse pred"), "{e}");
    }
}

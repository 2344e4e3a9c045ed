//! Every `Backend` operation except linear, conv2d, attention and the norms (linear.rs, conv.rs,
//! attention.rs, norm.rs): the elementwise and data-movement operations (kernels/elementwise.cu),
//! the loss, sum of squares and AdamW step (kernels/optim.cu), and the training noise
//! (kernels/random.cu); with the launch helpers the norms share. Each `<op>_impl` has the trait
//! method's signature, runs the checks of its op in src/ops (the ones the CPU backend runs) or,
//! for the plain ops, its own, computes the grid and launches. All of these run in f32 (with f64 statistics and reductions where the CPU uses
//! f64) in both precision modes; none uses atomics, so their results are deterministic.
//!
//! Index range: the kernels take sizes as i32 and index elements in 32 bits (pointer offsets in 64),
//! so every element count must stay below 2^31; `to_i32` checks it with a plain error.
//!
//! Workspaces (reused, grown only when too small): slot 0 holds the per-block partial sums and
//! per-group statistics of group norm and the partials of the loss/sum-of-squares reductions; slot
//! 1 the per-chunk column sums of the norms' dweight/dbias and of `add_bias_rows_backward`. The
//! u32 upload slot 0 carries token ids (embedding forward) or the rows grouped by id (backward).

use super::launch::*;
use super::{nonempty_i32, to_i32, CudaBackend};
use crate::backend::Activation;
use crate::backend::{ElementwiseOps, OptimOps, RandomOps};
use crate::ops::activation_dtype;
use crate::ops::elementwise::TimestepEmbeddingParams;
use crate::ops::elementwise::{BiasRowsParams, ConcatParams, GegluParams};
use crate::ops::elementwise::{EmbeddingBackward, EmbeddingForward, EmbeddingParams, Pointwise, UpsampleParams};
use crate::ops::optim::{AdamWParams, AdamWScalars, Reduction};
use crate::ops::random::{AddNoiseParams, RandnParams};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Result};

/// Threads per block of the 1-D kernels.
pub(super) const BLOCK: u32 = 256;
/// Most blocks of a 1-D grid-stride launch (2M threads: several waves on any current GPU).
pub(super) const MAX_GRID: usize = 8192;
/// Column sums (dweight/dbias, bias rows): rows per chunk aimed at, and most chunks.
pub(super) const COL_CHUNK_ROWS: usize = 256;
pub(super) const COL_MAX_CHUNKS: usize = 256;

/// The 1-D grid-stride launch shape for n elements.
fn grid1(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(BLOCK as usize).clamp(1, MAX_GRID) as u32, 1, 1)
}

/// The activation code of kernels/elementwise.cu `ew_act`.
fn act_code(act: Activation) -> i32 {
    match act {
        Activation::QuickGelu => 0,
        Activation::Gelu => 1,
        Activation::GeluTanh => 2,
        Activation::Silu => 3,
    }
}

/// (chunks, rows per chunk) splitting `rows` rows into chunks of about `target` rows, at most
/// `max_chunks` of them (rows ≥ 1).
pub(super) fn chunking(rows: usize, target: usize, max_chunks: usize) -> (usize, usize) {
    let mut per = target.max(1);
    let mut chunks = rows.div_ceil(per);
    if chunks > max_chunks {
        per = rows.div_ceil(max_chunks);
        chunks = rows.div_ceil(per);
    }
    (chunks, per)
}

/// The address of f64 element `index` of a workspace (an f32 workspace holding f64 arrays).
pub(super) fn f64_at(base: u64, index: usize) -> u64 {
    base + 8 * index as u64
}

impl CudaBackend {
    /// A one-dimensional launch over `n` elements, `BLOCK` threads a block.
    pub(super) fn ops_launch1(&self, n: usize, k: impl Kernel) -> Result<()> {
        self.launch(k, grid1(n), (BLOCK, 1, 1), 0)
    }

    /// `ops_launch1` of the f32 kernel `k`, or of its bf16 twin `B` (same arguments, the
    /// activations' pointers then to bf16) when the call's activations are bf16.
    pub(super) fn ops_launch1_act<K: Kernel, B: Kernel + From<K>>(&self, dtype: DType, n: usize, k: K) -> Result<()> {
        self.launch_act::<K, B>(dtype, k, grid1(n), (BLOCK, 1, 1), 0)
    }

    /// An f64 workspace of `n` values in slot `slot`.
    pub(super) fn ops_workspace_f64(&self, slot: usize, n: usize) -> Result<u64> {
        let p = self.workspace(slot, 2 * n.max(1))?;
        ensure!(p % 8 == 0, "CUDA workspace {p:#x} is not 8-byte aligned");
        Ok(p)
    }
}

impl ElementwiseOps for CudaBackend {
    fn embedding_forward(&self, p: &EmbeddingParams, t: &EmbeddingForward) -> Result<()> {
        p.check_forward(t)?;
        let EmbeddingForward { out, ids, wte, wpe } = *t;
        let EmbeddingParams { batch, seq, dim } = *p;
        let n = batch * seq * dim;
        let Some(_) = nonempty_i32("embedding", n)? else { return Ok(()) };
        let ids_d = self.upload_u32(0, ids)?;
        self.ops_launch1(
            n,
            EwEmbeddingFwd {
                out: self.dptr(out),
                ids: ids_d,
                wte: self.dptr(wte),
                wpe: self.dptr(wpe),
                batch: batch as i32,
                seq: seq as i32,
                dim: dim as i32,
            },
        )
    }

    fn activation_forward(&self, out: &Tensor, inp: &Tensor, act: Activation, n: usize) -> Result<()> {
        Pointwise { n }.check_activation_forward(out, inp)?;
        let dt = activation_dtype("activation", &[("out", out), ("inp", inp)])?;
        let Some(ni) = nonempty_i32("activation", n)? else { return Ok(()) };
        let k = EwActivationFwd { out: self.act_ptr(out), inp: self.act_ptr(inp), n: ni, act: act_code(act) };
        self.ops_launch1_act::<_, EwActivationFwdBf16>(dt, n, k)
    }

    fn add_forward(&self, out: &Tensor, a: &Tensor, b: &Tensor, n: usize) -> Result<()> {
        Pointwise { n }.check_add(out, a, b)?;
        let dt = activation_dtype("add", &[("out", out), ("a", a), ("b", b)])?;
        let Some(ni) = nonempty_i32("add", n)? else { return Ok(()) };
        let k = EwAdd { out: self.act_ptr(out), a: self.act_ptr(a), b: self.act_ptr(b), n: ni };
        self.ops_launch1_act::<_, EwAddBf16>(dt, n, k)
    }

    fn upsample_nearest_forward(&self, p: &UpsampleParams, out: &Tensor, inp: &Tensor) -> Result<()> {
        p.check_forward(out, inp)?;
        let UpsampleParams { batch, in_h: ih, in_w: iw, out_h: oh, out_w: ow, channels: c } = *p;
        let (n_out, n_in) = (p.out_elements(), p.in_elements());
        to_i32("upsample out", n_out)?;
        to_i32("upsample inp", n_in)?;
        if n_out == 0 {
            return Ok(());
        }
        // PyTorch: scale = in / out in f32 (the CPU computes the same).
        let (sy, sx) = (ih as f32 / oh as f32, iw as f32 / ow as f32);
        let dt = activation_dtype("upsample_nearest", &[("out", out), ("inp", inp)])?;
        self.ops_launch1_act::<_, EwUpsampleFwdBf16>(
            dt,
            n_out,
            EwUpsampleFwd {
                out: self.act_ptr(out),
                inp: self.act_ptr(inp),
                batch: batch as i32,
                ih: ih as i32,
                iw: iw as i32,
                oh: oh as i32,
                ow: ow as i32,
                c: c as i32,
                sy,
                sx,
            },
        )
    }

    fn add_bias_rows_forward(&self, p: &BiasRowsParams, out: &Tensor, inp: &Tensor, bias: &Tensor) -> Result<()> {
        p.check_forward(out, inp, bias)?;
        let BiasRowsParams { batch, rows, channels: c } = *p;
        let n = batch * rows * c;
        let Some(_) = nonempty_i32("add_bias_rows", n)? else { return Ok(()) };
        let dt = activation_dtype("add_bias_rows", &[("out", out), ("inp", inp)])?;
        self.ops_launch1_act::<_, EwAddBiasRowsBf16>(
            dt,
            n,
            EwAddBiasRows {
                out: self.act_ptr(out),
                inp: self.act_ptr(inp),
                bias: self.dptr(bias),
                batch: batch as i32,
                rows: rows as i32,
                c: c as i32,
            },
        )
    }

    fn concat_channels_forward(&self, p: &ConcatParams, out: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
        p.check_forward(out, a, b)?;
        let ConcatParams { rows, a_channels: ca, b_channels: cb } = *p;
        let n = rows * (ca + cb);
        let Some(_) = nonempty_i32("concat", n)? else { return Ok(()) };
        let dt = activation_dtype("concat", &[("out", out), ("a", a), ("b", b)])?;
        self.ops_launch1_act::<_, EwConcatFwdBf16>(
            dt,
            n,
            EwConcatFwd {
                out: self.act_ptr(out),
                a: self.act_ptr(a),
                b: self.act_ptr(b),
                rows: rows as i32,
                ca: ca as i32,
                cb: cb as i32,
            },
        )
    }

    fn timestep_embedding(&self, p: &TimestepEmbeddingParams, out: &Tensor, timesteps: &Tensor) -> Result<()> {
        p.check(out, timesteps)?;
        let TimestepEmbeddingParams { batch, dim, flip_sin_to_cos, freq_shift } = *p;
        let n = batch * dim;
        let Some(_) = nonempty_i32("timestep_embedding", n)? else { return Ok(()) };
        let log_period = -(10000f64.ln()) as f32;
        // The timesteps are f32 (`Arena::alloc_f32`); the embedding is an activation.
        let dt = activation_dtype("timestep_embedding", &[("out", out)])?;
        self.ops_launch1_act::<_, EwTimestepEmbeddingBf16>(
            dt,
            n,
            EwTimestepEmbedding {
                out: self.act_ptr(out),
                t: self.dptr(timesteps),
                batch: batch as i32,
                dim: dim as i32,
                flip: flip_sin_to_cos as i32,
                freq_shift,
                log_period,
            },
        )
    }

    fn geglu_forward(&self, p: &GegluParams, out: &Tensor, inp: &Tensor) -> Result<()> {
        p.check_forward(out, inp)?;
        let GegluParams { rows, inner } = *p;
        let n = rows * inner;
        let Some(_) = nonempty_i32("geglu inp", 2 * n)? else { return Ok(()) };
        let dt = activation_dtype("geglu", &[("out", out), ("inp", inp)])?;
        let k = EwGegluFwd { out: self.act_ptr(out), inp: self.act_ptr(inp), rows: rows as i32, inner: inner as i32 };
        self.ops_launch1_act::<_, EwGegluFwdBf16>(dt, n, k)
    }

    fn zero(&self, t: &Tensor) -> Result<()> {
        self.params_written(t);
        let n = t.numel();
        let Some(ni) = nonempty_i32("zero", n)? else { return Ok(()) };
        let dt = activation_dtype("zero", &[("t", t)])?;
        self.ops_launch1_act::<_, EwZeroBf16>(dt, n, EwZero { t: self.act_ptr(t), n: ni })
    }

    fn accumulate(&self, dst: &Tensor, src: &Tensor, n: usize) -> Result<()> {
        self.params_written(dst);
        Pointwise { n }.check_accumulate(dst, src)?;
        let Some(ni) = nonempty_i32("accumulate", n)? else { return Ok(()) };
        let dt = activation_dtype("accumulate", &[("dst", dst), ("src", src)])?;
        self.ops_launch1_act::<_, EwAccumulateBf16>(
            dt,
            n,
            EwAccumulate { dst: self.act_ptr(dst), src: self.act_ptr(src), n: ni },
        )
    }

    fn scale(&self, t: &Tensor, s: f32, n: usize) -> Result<()> {
        self.params_written(t);
        Pointwise { n }.check_scale(t)?;
        let Some(ni) = nonempty_i32("scale", n)? else { return Ok(()) };
        self.ops_launch1(n, EwScale { t: self.dptr(t), s, n: ni })
    }

    fn lerp(&self, dst: &Tensor, src: &Tensor, n: usize, w: f32) -> Result<()> {
        self.params_written(dst);
        Pointwise { n }.check_lerp(dst, src)?;
        let Some(ni) = nonempty_i32("lerp", n)? else { return Ok(()) };
        self.ops_launch1(n, EwLerp { dst: self.dptr(dst), src: self.dptr(src), n: ni, w })
    }

    fn activation_backward(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor, act: Activation, n: usize) -> Result<()> {
        Pointwise { n }.check_activation_backward(dinp, dout, inp)?;
        let Some(ni) = nonempty_i32("activation_backward", n)? else { return Ok(()) };
        self.ops_launch1(
            n,
            EwActivationBwd {
                dinp: self.dptr(dinp),
                dout: self.dptr(dout),
                inp: self.dptr(inp),
                n: ni,
                act: act_code(act),
            },
        )
    }

    fn upsample_nearest_backward(&self, p: &UpsampleParams, dinp: &Tensor, dout: &Tensor) -> Result<()> {
        p.check_backward(dinp, dout)?;
        let UpsampleParams { batch, in_h: ih, in_w: iw, out_h: oh, out_w: ow, channels: c } = *p;
        let (n_in, n_out) = (p.in_elements(), p.out_elements());
        to_i32("upsample_backward dinp", n_in)?;
        to_i32("upsample_backward dout", n_out)?;
        if n_in == 0 || n_out == 0 {
            return Ok(());
        }
        let (sy, sx) = (ih as f32 / oh as f32, iw as f32 / ow as f32);
        // One thread per input element, gathering its copies in the CPU's order (no atomics).
        self.ops_launch1(
            n_in,
            EwUpsampleBwd {
                dinp: self.dptr(dinp),
                dout: self.dptr(dout),
                batch: batch as i32,
                ih: ih as i32,
                iw: iw as i32,
                oh: oh as i32,
                ow: ow as i32,
                c: c as i32,
                sy,
                sx,
            },
        )
    }

    fn add_bias_rows_backward(&self, p: &BiasRowsParams, dbias: &Tensor, dout: &Tensor) -> Result<()> {
        p.check_backward(dbias, dout)?;
        let BiasRowsParams { batch, rows, channels: c } = *p;
        to_i32("add_bias_rows_backward", batch * rows * c)?;
        if batch * rows * c == 0 {
            return Ok(()); // nothing to add
        }
        ensure!(batch <= 65535, "add_bias_rows_backward: batch {batch} exceeds the grid's 65535");
        let (chunks, rpc) = chunking(rows, COL_CHUNK_ROWS, COL_MAX_CHUNKS);
        let part = self.ops_workspace_f64(1, batch * chunks * c)?;
        self.launch(
            EwBiasRowsBwdPartial {
                part,
                dout: self.dptr(dout),
                rows: rows as i32,
                c: c as i32,
                rows_per_chunk: rpc as i32,
            },
            (c.div_ceil(32) as u32, chunks as u32, batch as u32),
            (32, 8, 1),
            0,
        )?;
        self.ops_launch1(
            batch * c,
            EwBiasRowsBwdFinalize {
                dbias: self.dptr(dbias),
                part,
                batch: batch as i32,
                c: c as i32,
                chunks: chunks as i32,
            },
        )
    }

    fn concat_channels_backward(&self, p: &ConcatParams, da: &Tensor, db: &Tensor, dout: &Tensor) -> Result<()> {
        p.check_backward(da, db, dout)?;
        let ConcatParams { rows, a_channels: ca, b_channels: cb } = *p;
        let n = rows * (ca + cb);
        let Some(_) = nonempty_i32("concat_backward", n)? else { return Ok(()) };
        self.ops_launch1(
            n,
            EwConcatBwd {
                da: self.dptr(da),
                db: self.dptr(db),
                dout: self.dptr(dout),
                rows: rows as i32,
                ca: ca as i32,
                cb: cb as i32,
            },
        )
    }

    fn geglu_backward(&self, p: &GegluParams, dinp: &Tensor, dout: &Tensor, inp: &Tensor) -> Result<()> {
        p.check_backward(dinp, dout, inp)?;
        let GegluParams { rows, inner } = *p;
        let n = rows * inner;
        let Some(_) = nonempty_i32("geglu_backward", 2 * n)? else { return Ok(()) };
        self.ops_launch1(
            n,
            EwGegluBwd {
                dinp: self.dptr(dinp),
                dout: self.dptr(dout),
                inp: self.dptr(inp),
                rows: rows as i32,
                inner: inner as i32,
            },
        )
    }

    /// Without atomics: the rows are grouped by token id here (a stable sort keeps each id's rows
    /// ascending), uploaded as [distinct ids | starts | rows], and each destination row of dwte and
    /// dwpe is summed by one thread per element in the CPU's row order.
    fn embedding_backward(&self, p: &EmbeddingParams, t: &EmbeddingBackward) -> Result<()> {
        p.check_backward(t)?;
        let EmbeddingBackward { dwte, dwpe, dout, ids } = *t;
        let EmbeddingParams { batch, seq, dim } = *p;
        let rows = batch * seq;
        to_i32("embedding_backward", rows * dim)?;
        if rows == 0 {
            return Ok(());
        }
        let mut order: Vec<u32> = (0..rows as u32).collect();
        order.sort_by_key(|&r| ids[r as usize]);
        let mut uniq: Vec<u32> = Vec::new();
        let mut starts: Vec<u32> = Vec::new();
        for (k, &r) in order.iter().enumerate() {
            let id = ids[r as usize];
            if uniq.last() != Some(&id) {
                uniq.push(id);
                starts.push(k as u32);
            }
        }
        starts.push(rows as u32);
        let u = uniq.len();
        let mut buf = uniq;
        buf.extend_from_slice(&starts);
        buf.extend_from_slice(&order);
        let base = self.upload_u32(0, &buf)?;
        let (uniq_d, starts_d, order_d) = (base, base + 4 * u as u64, base + 4 * (2 * u + 1) as u64);
        let items = u + seq;
        self.launch(
            EwEmbeddingBwd {
                dwte: self.dptr(dwte),
                dwpe: self.dptr(dwpe),
                dout: self.dptr(dout),
                uniq: uniq_d,
                starts: starts_d,
                order: order_d,
                n_unique: u as i32,
                batch: batch as i32,
                seq: seq as i32,
                dim: dim as i32,
            },
            (dim.div_ceil(128).min(MAX_GRID) as u32, items.min(65535) as u32, 1),
            (128, 1, 1),
            0,
        )
    }
}

impl OptimOps for CudaBackend {
    /// loss[0] = mean((pred − target)²) (f64 sum, deterministic), dpred = 2(pred − target)/n
    /// (written).
    fn mse_loss(&self, dpred: &Tensor, loss: &Tensor, pred: &Tensor, target: &Tensor, n: usize) -> Result<()> {
        Reduction { n }.check_mse(dpred, loss, pred, target)?;
        let ni = to_i32("mse", n)?;
        let parts = n.div_ceil(BLOCK as usize * 8).clamp(1, 1024);
        let partial = self.ops_workspace_f64(0, parts)?;
        self.launch(
            OptMsePartial { dpred: self.dptr(dpred), partial, pred: self.dptr(pred), target: self.dptr(target), n: ni },
            (parts as u32, 1, 1),
            (BLOCK, 1, 1),
            0,
        )?;
        self.launch(
            OptSumFinalize { out: self.dptr(loss), partial, parts: parts as i32, n: ni, mean: 1 },
            (1, 1, 1),
            (BLOCK, 1, 1),
            0,
        )
    }

    /// out[0] = Σ x² over n elements (f64, deterministic), rounded to f32.
    fn sum_squares(&self, out: &Tensor, x: &Tensor, n: usize) -> Result<()> {
        Reduction { n }.check_sum_squares(out, x)?;
        let ni = to_i32("sum_squares", n)?;
        let parts = n.div_ceil(BLOCK as usize * 8).clamp(1, 1024);
        let partial = self.ops_workspace_f64(0, parts)?;
        self.launch(OptSumSquaresPartial { partial, x: self.dptr(x), n: ni }, (parts as u32, 1, 1), (BLOCK, 1, 1), 0)?;
        self.launch(
            OptSumFinalize { out: self.dptr(out), partial, parts: parts as i32, n: ni, mean: 0 },
            (1, 1, 1),
            (BLOCK, 1, 1),
            0,
        )
    }

    /// torch.optim.AdamW, with the scalars computed exactly as the CPU reference (ops/optim.rs
    /// `AdamWParams`): f64, then rounded to f32.
    fn adamw_step(&self, p: &AdamWParams, param: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor) -> Result<()> {
        p.check(param, grad, m, v)?;
        let AdamWParams { n, beta1, beta2, eps, .. } = *p;
        let Some(ni) = nonempty_i32("adamw", n)? else { return Ok(()) };
        let AdamWScalars { decay, bc2_sqrt, step_size } = p.scalars();
        // The bf16 copy of a parameter pool is updated in the same pass (fresh when the step
        // covers the whole pool, as the optimizer's steps do).
        let copy = self.param_copy_for_update(param, n)?;
        self.ops_launch1(
            n,
            OptAdamw {
                param: self.dptr(param),
                copy,
                grad: self.dptr(grad),
                m: self.dptr(m),
                v: self.dptr(v),
                n: ni,
                decay,
                beta2,
                one_minus_beta1: 1.0 - beta1,
                one_minus_beta2: 1.0 - beta2,
                bc2_sqrt,
                step_size,
                eps,
            },
        )
    }
}

impl RandomOps for CudaBackend {
    /// kernels/random.cu `rand_philox_normal`: one thread per group of four elements.
    fn randn(&self, out: &Tensor, n: usize, seed: u64, stream: u64) -> Result<()> {
        RandnParams { n, seed, stream }.check(out)?;
        let Some(ni) = nonempty_i32("randn", n)? else { return Ok(()) };
        // u32 halves travel in the i32 argument slots bit for bit (the kernel takes unsigned int).
        let half = |v: u64, hi: bool| (if hi { v >> 32 } else { v & 0xFFFF_FFFF }) as u32 as i32;
        self.ops_launch1(
            n.div_ceil(4),
            RandPhiloxNormal {
                out: self.dptr(out),
                n: ni,
                seed_lo: half(seed, false) as u32,
                seed_hi: half(seed, true) as u32,
                stream_lo: half(stream, false) as u32,
                stream_hi: half(stream, true) as u32,
            },
        )
    }

    fn ddpm_add_noise(&self, p: &AddNoiseParams, x: &Tensor, noise: &Tensor) -> Result<()> {
        p.check(x, noise)?;
        let AddNoiseParams { n, sqrt_alpha, sqrt_one_minus_alpha, v_prediction } = *p;
        let Some(ni) = nonempty_i32("ddpm_add_noise", n)? else { return Ok(()) };
        self.ops_launch1(
            n,
            RandDdpmAddNoise {
                x: self.dptr(x),
                noise: self.dptr(noise),
                n: ni,
                sqrt_alpha,
                sqrt_one_minus_alpha,
                v_prediction: v_prediction as i32,
            },
        )
    }
}

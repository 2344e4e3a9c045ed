//! Fused attention (kernels/attention.cu): flash-style forward and backward, one kernel family for
//! `attention_*` (optional causal mask) and `masked_attention_*` (a key mask), as the CPU reference's
//! (src/ops/attention.rs `AttentionParams::cpu_forward` / `cpu_backward`) serves both.
//!
//! Paths: `use_bf16()` selects the tensor-core kernels `attention_*_bf16_d<H>` (H = head_dim rounded
//! up to a multiple of 16, one instantiation per bucket); otherwise the exact f32 SIMT kernels
//! `attention_*_f32`. Both hold head_dim 1..=160. The bf16 forward has versions 2 and 3
//! (kernels/attention_v2.cu, `attention_fwd_bf16_v{2,3}_d<D>`, D = head_dim rounded up to 8, up to
//! 96), chosen as versions.rs says; version 2 gives version 1's results bit for bit, version 3 up
//! to the bf16 rounding of the probabilities.
//!
//! Wider heads (the VAE's mid-block attention: one head of 512) take the materialised path
//! (`wide_forward` / `wide_backward`): per (batch, head) pair, S = Q·Kᵀ through cuBLAS into a
//! workspace, `attention_wide_softmax` (P and the log-sum-exp, in place) and O = P·V through cuBLAS;
//! backward D = rowsum(dO ∘ O) (`attention_bwd_delta`), S and dP = dO·Vᵀ through cuBLAS,
//! `attention_wide_bwd_ds` (P and dS = P ∘ (dP − D) · scale, in place), then dV += Pᵀ·dO,
//! dK += dSᵀ·Q, dQ += dS·K through cuBLAS (accumulating, beta = 1). Key masks and causal masks are
//! honoured as in the flash kernels. The GEMMs are those of linear layers (`CudaBackend::gemm`):
//! exact f32 (CUBLAS_COMPUTE_32F) in f32 precision, CUBLAS_COMPUTE_32F_FAST_16BF (operands rounded
//! to bf16 on tensor cores, f32 accumulation) in bf16 precision; the softmax and dS kernels are f32
//! in both. The score matrices are processed in chunks of rows of the flattened (pair, query) space
//! (`wide_chunks`): at most `attention_workspace_limit()` elements (default 32 Mi = 128 MiB) per
//! matrix, so ≤ 128 MiB in forward and ≤ 256 MiB in backward (S/P and dP/dS); a 512×512 VAE image
//! (4096 tokens, 64 MiB per pair) is one pair per chunk.
//!
//! Workspace slots within one call: 0 = D (backward, both paths); 1 = S/P and 2 = dP/dS (materialised
//! path). The u32 upload slot 0 holds the key mask.
//!
//! Backward is three launches on the stream, deterministic (no atomics): `attention_bwd_delta`
//! (D = rowsum(dO ∘ O) into workspace slot 0), then the query-side kernel (dq, one block per query
//! tile) and the key-side kernel (dk, dv, one block per key tile); each block is the only writer of
//! the gradient rows it owns, so it accumulates with a plain `+=`. The price: S and dP are computed by
//! both kernels (7 matrix products instead of FlashAttention-2's 5 with atomicAdd on dq).
//!
//! The shared-memory sizes below mirror the tile layouts documented above each kernel in
//! attention.cu; a change to one must be made in the other.

use super::autotune::TunableOp;
use super::bridge::Role;
use super::device::Gemm;
use super::launch::*;
use super::CudaBackend;
use crate::backend::{AttentionOps, ElementwiseOps};
use crate::ops::attention::{AttentionBackward, AttentionForward, AttentionParams};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Result};

/// The largest head_dim the flash kernels hold (the f32 kernels keep 160 / 32 = 5 columns per lane;
/// the largest bf16 bucket is 160); wider heads take the materialised path.
const MAX_HEAD_DIM: usize = 160;
/// Workspace slots (see the module docs).
const WS_DELTA: usize = 0;
const WS_P: usize = 1;
const WS_DP: usize = 2;
/// Threads per block of the materialised path's kernels (attention_wide_*).
const WIDE_THREADS: u32 = 256;
/// Default most elements of one score matrix chunk of the materialised path (128 MiB of f32).
pub(crate) const WIDE_WORKSPACE_ELEMS: usize = 32 << 20;
/// Threads per block of every attention kernel but the delta kernel (4 warps).
const THREADS: u32 = 128;
/// Rows (queries or keys) per block: f32 kernels 4 warps × 4 rows, bf16 kernels 4 warps × 16 rows.
const F32_BLOCK_ROWS: usize = 16;
const BF16_BLOCK_ROWS: usize = 64;
/// (row, head) items per block of `attention_bwd_delta` (8 warps of 256 threads, one warp each).
const DELTA_ITEMS_PER_BLOCK: usize = 8;
/// The bf16 forward's version 2: 8 warps × 16 query rows per block, head-dim buckets up to 96.
const V2_THREADS: u32 = 256;
const V2_BLOCK_ROWS: usize = 128;
const V2_MAX_BUCKET: usize = 96;

/// Q rows [16][hd] + K tile [32][hd+1] + V tile [32][hd], f32 (attention_fwd_f32).
fn f32_fwd_smem(hd: usize) -> usize {
    (16 * hd + 32 * (hd + 1) + 32 * hd) * 4
}

/// Two [16][hd] row blocks + two [32][hd+1] tiles, f32 (attention_bwd_dq_f32, attention_bwd_dkdv_f32).
fn f32_bwd_smem(hd: usize) -> usize {
    (2 * 16 * hd + 2 * 32 * (hd + 1)) * 4
}

/// The bf16 kernels' head-dim bucket: head_dim rounded up to the mma k-step of 16 (16, 32, …, 160).
fn bf16_bucket(hd: usize) -> usize {
    hd.div_ceil(16) * 16
}

/// attn_fwd_bf16<H>: Q [64][H+8] + K [64][H+8] + Vᵀ [H][64+8] bf16, then the tile's two words of
/// allowed-key bits.
fn bf16_fwd_smem(h: usize) -> usize {
    let s = h + 8;
    (64 * s + 64 * s + h * (64 + 8)) * 2 + 2 * 4
}

/// Version 2's head-dim bucket: head_dim rounded up to 8 (8, 16, …, 96).
fn v2_bucket(hd: usize) -> usize {
    hd.div_ceil(8) * 8
}

/// attn_v2::forward<D> (kernels/attention_v2.cu): bf16 K and V tiles [2 buffers][2][64][H + 8]
/// (H = D rounded up to 16), allowed-key bits [2 buffers][2] u32, then the f32 staging
/// [2 stages][2][64][hd4] (hd4 = head_dim rounded up to 4).
fn bf16_fwd_v2_smem(d: usize, hd: usize) -> usize {
    let s = d.div_ceil(16) * 16 + 8;
    2 * 2 * 64 * s * 2 + 2 * 2 * 4 + 2 * 2 * 64 * hd.div_ceil(4) * 4 * 4
}

/// attn_bwd_dq_bf16<H>: Q, dO [64][H+8] + K, V [BN][H+8] bf16, then BN int key flags;
/// BN = AbDq<H>::BN.
fn bf16_dq_smem(h: usize) -> usize {
    let s = h + 8;
    let bn = if h <= 64 { 64 } else { 32 };
    (2 * 64 * s + 2 * bn * s) * 2 + bn * 4
}

/// attn_bwd_dkdv_bf16<H>: K, V [64][H+8] + Q, dO [BMQ][H+8] bf16, then lse and D for BMQ queries
/// (f32); BMQ = AbDkdv<H>::BMQ.
fn bf16_dkdv_smem(h: usize) -> usize {
    let s = h + 8;
    let bmq = if h <= 64 {
        64
    } else if h <= 128 {
        32
    } else {
        16
    };
    (2 * 64 * s + 2 * bmq * s) * 2 + 2 * bmq * 4
}

/// The problem's dimensions, validated for the kernels' int parameters and grid limits.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    q_len: usize,
    kv_len: usize,
    heads: usize,
    hd: usize,
}

impl Dims {
    fn of(p: &AttentionParams) -> Dims {
        Dims { batch: p.batch, q_len: p.q_len, kv_len: p.kv_len, heads: p.heads, hd: p.head_dim }
    }

    /// The kernels' own limits, past the checks every backend makes (`AttentionParams::check_*`).
    fn check(self, what: &str) -> Result<Dims> {
        let Dims { batch, q_len, kv_len, heads, hd } = self;
        ensure!(
            hd > MAX_HEAD_DIM || batch * heads <= 65535,
            "{what}: batch {batch} × heads {heads} exceeds the grid's y limit (65535)"
        );
        let max = i32::MAX as usize;
        ensure!(
            q_len <= max && kv_len <= max && batch * q_len * heads <= max && batch * kv_len <= max,
            "{what}: sequence lengths (q_len {q_len}, kv_len {kv_len}, batch {batch}, heads {heads}) exceed the kernels' 32-bit indices"
        );
        Ok(self)
    }

    fn width(self) -> usize {
        self.heads * self.hd
    }

    /// Whether the materialised path serves these dimensions (head_dim above the flash kernels').
    fn wide(self) -> bool {
        self.hd > MAX_HEAD_DIM
    }

    /// (q_len, kv_len, heads, hd) as the kernels' i32 parameters (`check` bounded them).
    fn ints(self) -> (i32, i32, i32, i32) {
        (self.q_len as i32, self.kv_len as i32, self.heads as i32, self.hd as i32)
    }
}

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}

/// Query rows [i0, i1) of pair (b, h) inside a chunk of the materialised path; their scores start at
/// row `ws_row` of the chunk's workspace (kv_len elements per row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seg {
    b: usize,
    h: usize,
    i0: usize,
    i1: usize,
    ws_row: usize,
}

/// Rows [row0, row0 + nrows) of the flattened (pair, query) row space R = (b·heads + h)·q_len + i,
/// and the pieces of pairs they cover.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Chunk {
    row0: usize,
    nrows: usize,
    segs: Vec<Seg>,
}

/// Splits the batch·heads·q_len rows into chunks of at most `limit / kv_len` rows (at least one), so
/// that a chunk's score matrix has at most `limit` elements (one row may exceed it). Returns the
/// rows per chunk (the workspace size is that × kv_len) and the chunks.
fn wide_chunks(batch: usize, heads: usize, q_len: usize, kv_len: usize, limit: usize) -> (usize, Vec<Chunk>) {
    let total = batch * heads * q_len;
    if total == 0 {
        return (0, Vec::new());
    }
    let per = (limit / kv_len.max(1)).clamp(1, total);
    let mut chunks = Vec::with_capacity(total.div_ceil(per));
    for row0 in (0..total).step_by(per) {
        let end = (row0 + per).min(total);
        let mut segs = Vec::new();
        for pair in row0 / q_len..=(end - 1) / q_len {
            let i0 = row0.max(pair * q_len) - pair * q_len;
            let i1 = end.min((pair + 1) * q_len) - pair * q_len;
            segs.push(Seg { b: pair / heads, h: pair % heads, i0, i1, ws_row: pair * q_len + i0 - row0 });
        }
        chunks.push(Chunk { row0, nrows: end - row0, segs });
    }
    (per, chunks)
}

/// The profile label of the materialised path's GEMMs.
const WIDE_GEMM: &str = "cublas_gemm (attention, head_dim > 160)";

/// An i32 kernel argument of the materialised path.
fn wide_int(what: &str, v: usize) -> Result<i32> {
    ensure!(v <= i32::MAX as usize, "attention: {what} = {v} exceeds the kernels' 32-bit indices");
    Ok(v as i32)
}

impl CudaBackend {
    /// Launches an attention kernel with 128 threads and `smem` bytes of dynamic shared memory.
    fn attn_launch(&self, k: impl Kernel, grid: (u32, u32, u32), smem: usize) -> Result<()> {
        self.launch(k, grid, (THREADS, 1, 1), smem as u32)
    }

    /// The materialised forward (head_dim > 160): per chunk, S = Q·Kᵀ per pair piece (cuBLAS), the
    /// row softmax writing P in place and the lse, then O = P·V per piece (cuBLAS).
    /// `mask`: the key mask's device address (0: none).
    fn wide_forward(&self, p: &AttentionParams, t: &AttentionForward, d: Dims, mask: u64) -> Result<()> {
        let AttentionForward { out, lse, q, k, v, .. } = *t;
        let (scale, causal) = (p.scale, p.causal);
        let w = d.width();
        let (per, chunks) = wide_chunks(d.batch, d.heads, d.q_len, d.kv_len, self.attention_workspace_limit());
        let s_ws = self.workspace(WS_P, per * d.kv_len)?;
        if d.kv_len == 0 {
            // No keys: every output row is 0 (the kernel below writes lse = -inf), as the flash path.
            self.zero(&Tensor { shape: [d.batch * d.q_len * w].into(), ..*out })?;
        }
        let (pq, pk, pv, po) = (self.dptr(q), self.dptr(k), self.dptr(v), self.dptr(out));
        let at = |base: u64, elems: usize| base + 4 * elems as u64;
        for c in &chunks {
            for g in &c.segs {
                // Sᵀ (kv_len × n, col-major, ld kv_len) = K_p (col-major Kᵀ, transposed) · Qᵀ_p.
                let qoff = (g.b * d.q_len + g.i0) * w + g.h * d.hd;
                let koff = g.b * d.kv_len * w + g.h * d.hd;
                self.gemm_for(
                    WIDE_GEMM,
                    Gemm {
                        ta: true,
                        m: d.kv_len,
                        n: g.i1 - g.i0,
                        k: d.hd,
                        a: at(pk, koff),
                        lda: w,
                        b: at(pq, qoff),
                        ldb: w,
                        c: at(s_ws, g.ws_row * d.kv_len),
                        ldc: d.kv_len,
                        ..Gemm::UNIT
                    },
                )?;
            }
            self.launch(
                AttentionWideSoftmax {
                    s: s_ws,
                    lse: self.dptr(lse),
                    key_mask: mask,
                    row0: wide_int("row", c.row0)?,
                    q_len: wide_int("q_len", d.q_len)?,
                    kv_len: wide_int("kv_len", d.kv_len)?,
                    heads: wide_int("heads", d.heads)?,
                    scale,
                    causal: causal as i32,
                },
                (c.nrows as u32, 1, 1),
                (WIDE_THREADS, 1, 1),
                0,
            )?;
            if d.kv_len == 0 {
                continue;
            }
            for g in &c.segs {
                // Oᵀ_p (hd × n, ld w) = Vᵀ_p (hd × kv_len, ld w) · Pᵀ (kv_len × n, ld kv_len).
                let qoff = (g.b * d.q_len + g.i0) * w + g.h * d.hd;
                let koff = g.b * d.kv_len * w + g.h * d.hd;
                self.gemm_for(
                    WIDE_GEMM,
                    Gemm {
                        m: d.hd,
                        n: g.i1 - g.i0,
                        k: d.kv_len,
                        a: at(pv, koff),
                        lda: w,
                        b: at(s_ws, g.ws_row * d.kv_len),
                        ldb: d.kv_len,
                        c: at(po, qoff),
                        ldc: w,
                        ..Gemm::UNIT
                    },
                )?;
            }
        }
        Ok(())
    }

    /// The materialised backward (head_dim > 160), after D: per chunk, S = Q·Kᵀ and dP = dO·Vᵀ per
    /// piece (cuBLAS), P and dS in place, then dV += Pᵀ·dO, dK += dSᵀ·Q, dQ += dS·K (cuBLAS, beta 1).
    fn wide_backward(
        &self,
        p: &AttentionParams,
        t: &AttentionBackward,
        d: Dims,
        mask: u64,
        scratch: WideScratch,
    ) -> Result<()> {
        let AttentionBackward { dq, dk, dv, dout, forward: AttentionForward { q, k, v, lse, .. } } = *t;
        let (scale, causal) = (p.scale, p.causal);
        let WideScratch { delta, p: p_ws, ds: ds_ws, chunks } = scratch;
        let w = d.width();
        let (pq, pk, pv, pdo) = (self.dptr(q), self.dptr(k), self.dptr(v), self.dptr(dout));
        let (pdq, pdk, pdv) = (self.dptr(dq), self.dptr(dk), self.dptr(dv));
        let at = |base: u64, elems: usize| base + 4 * elems as u64;
        for c in chunks {
            for g in &c.segs {
                let (n, qoff, koff) =
                    (g.i1 - g.i0, (g.b * d.q_len + g.i0) * w + g.h * d.hd, g.b * d.kv_len * w + g.h * d.hd);
                let ws = g.ws_row * d.kv_len;
                // Sᵀ = K_p · Qᵀ_p and dPᵀ = V_p · dOᵀ_p (kv_len × n, ld kv_len), as in the forward.
                self.gemm_for(
                    WIDE_GEMM,
                    Gemm {
                        ta: true,
                        m: d.kv_len,
                        n,
                        k: d.hd,
                        a: at(pk, koff),
                        lda: w,
                        b: at(pq, qoff),
                        ldb: w,
                        c: at(p_ws, ws),
                        ldc: d.kv_len,
                        ..Gemm::UNIT
                    },
                )?;
                self.gemm_for(
                    WIDE_GEMM,
                    Gemm {
                        ta: true,
                        m: d.kv_len,
                        n,
                        k: d.hd,
                        a: at(pv, koff),
                        lda: w,
                        b: at(pdo, qoff),
                        ldb: w,
                        c: at(ds_ws, ws),
                        ldc: d.kv_len,
                        ..Gemm::UNIT
                    },
                )?;
            }
            self.launch(
                AttentionWideBwdDs {
                    p: p_ws,
                    ds: ds_ws,
                    lse: self.dptr(lse),
                    delta,
                    key_mask: mask,
                    row0: wide_int("row", c.row0)?,
                    q_len: wide_int("q_len", d.q_len)?,
                    kv_len: wide_int("kv_len", d.kv_len)?,
                    heads: wide_int("heads", d.heads)?,
                    scale,
                    causal: causal as i32,
                },
                (c.nrows as u32, 1, 1),
                (WIDE_THREADS, 1, 1),
                0,
            )?;
            for g in &c.segs {
                let (n, qoff, koff) =
                    (g.i1 - g.i0, (g.b * d.q_len + g.i0) * w + g.h * d.hd, g.b * d.kv_len * w + g.h * d.hd);
                let ws = g.ws_row * d.kv_len;
                // dVᵀ_p (hd × kv_len, ld w) += dOᵀ_p (hd × n, ld w) · P (n × kv_len: Pᵀ col-major, transposed).
                self.gemm_for(
                    WIDE_GEMM,
                    Gemm {
                        tb: true,
                        m: d.hd,
                        n: d.kv_len,
                        k: n,
                        a: at(pdo, qoff),
                        lda: w,
                        b: at(p_ws, ws),
                        ldb: d.kv_len,
                        beta: 1.0,
                        c: at(pdv, koff),
                        ldc: w,
                        ..Gemm::UNIT
                    },
                )?;
                // dKᵀ_p += Qᵀ_p · dS.
                self.gemm_for(
                    WIDE_GEMM,
                    Gemm {
                        tb: true,
                        m: d.hd,
                        n: d.kv_len,
                        k: n,
                        a: at(pq, qoff),
                        lda: w,
                        b: at(ds_ws, ws),
                        ldb: d.kv_len,
                        beta: 1.0,
                        c: at(pdk, koff),
                        ldc: w,
                        ..Gemm::UNIT
                    },
                )?;
                // dQᵀ_p (hd × n, ld w) += Kᵀ_p (hd × kv_len, ld w) · dSᵀ (kv_len × n, ld kv_len).
                self.gemm_for(
                    WIDE_GEMM,
                    Gemm {
                        m: d.hd,
                        n,
                        k: d.kv_len,
                        a: at(pk, koff),
                        lda: w,
                        b: at(ds_ws, ws),
                        ldb: d.kv_len,
                        beta: 1.0,
                        c: at(pdq, qoff),
                        ldc: w,
                        ..Gemm::UNIT
                    },
                )?;
            }
        }
        Ok(())
    }
}

impl AttentionOps for CudaBackend {
    /// bf16 activations (out, q, k, v; the log-sum-exp stays f32) go through the bf16 bridge
    /// (bridge.rs) until the kernels load bf16 operands themselves.
    fn attention_forward(&self, p: &AttentionParams, t: &AttentionForward) -> Result<()> {
        p.check_forward(t)?;
        let acts = [(t.out, Role::Out), (t.q, Role::In), (t.k, Role::In), (t.v, Role::In)];
        if acts.iter().any(|(a, _)| a.dtype == DType::BF16) {
            return self.bridged(&acts, |v| {
                self.attention_forward(p, &AttentionForward { out: &v[0], q: &v[1], k: &v[2], v: &v[3], ..*t })
            });
        }
        let AttentionForward { out, lse, q, k, v, key_mask } = *t;
        let (scale, causal) = (p.scale, p.causal);
        let d = Dims::of(p).check("attention")?;
        if d.batch * d.heads * d.q_len == 0 {
            return Ok(());
        }
        let mask = match key_mask {
            Some(m) => self.upload_u32(0, m)?,
            None => 0,
        };
        if d.wide() {
            return self.wide_forward(p, t, d, mask);
        }
        let (q_len, kv_len, heads, hd) = d.ints();
        let causal = causal as i32;
        let (out, lse, q, k, v) = (self.dptr(out), self.dptr(lse), self.dptr(q), self.dptr(k), self.dptr(v));
        let key_mask = mask;
        let args = AttentionFwdF32 { out, lse, q, k, v, key_mask, q_len, kv_len, heads, hd, scale, causal };
        let bh = (d.batch * d.heads) as u32;
        if self.use_bf16() {
            let v2 = v2_bucket(d.hd);
            let version = if v2 <= V2_MAX_BUCKET { self.kernel_version(TunableOp::Attention(*p)) } else { 1 };
            if version >= 2 {
                // Versions 2 and 3 share a launch (kernels/attention_v2.cu).
                let kernel = if version == 3 { args.bf16_v3(v2) } else { args.bf16_v2(v2) };
                let grid = (blocks(d.q_len, V2_BLOCK_ROWS), bh, 1);
                return self.launch(kernel, grid, (V2_THREADS, 1, 1), bf16_fwd_v2_smem(v2, d.hd) as u32);
            }
            let h = bf16_bucket(d.hd);
            let grid = (blocks(d.q_len, BF16_BLOCK_ROWS), bh, 1);
            self.attn_launch(args.bf16(h), grid, bf16_fwd_smem(h))
        } else {
            let grid = (blocks(d.q_len, F32_BLOCK_ROWS), bh, 1);
            self.attn_launch(args, grid, f32_fwd_smem(d.hd))
        }
    }

    fn attention_backward(&self, p: &AttentionParams, t: &AttentionBackward) -> Result<()> {
        p.check_backward(t)?;
        let AttentionBackward { dq, dk, dv, dout, forward: AttentionForward { q, k, v, out, lse, key_mask } } = *t;
        let (scale, causal) = (p.scale, p.causal);
        let d = Dims::of(p).check("attention_backward")?;
        if d.batch * d.heads * d.q_len * d.kv_len == 0 {
            return Ok(()); // no query/key pair: nothing to accumulate
        }
        // Scratch first (growing it or uploading synchronises the stream), then the launches.
        let rows = d.batch * d.q_len;
        let delta = self.workspace(WS_DELTA, rows * d.heads)?;
        let mask = match key_mask {
            Some(m) => self.upload_u32(0, m)?,
            None => 0,
        };
        // The materialised path's score workspaces (before any launch: growing one synchronises).
        let wide = if d.wide() {
            let (per, chunks) = wide_chunks(d.batch, d.heads, d.q_len, d.kv_len, self.attention_workspace_limit());
            Some((self.workspace(WS_P, per * d.kv_len)?, self.workspace(WS_DP, per * d.kv_len)?, chunks))
        } else {
            None
        };
        self.launch(
            AttentionBwdDelta {
                delta,
                dout: self.dptr(dout),
                out: self.dptr(out),
                rows: rows as i32,
                heads: d.heads as i32,
                hd: d.hd as i32,
            },
            (blocks(rows * d.heads, DELTA_ITEMS_PER_BLOCK), 1, 1),
            (32 * DELTA_ITEMS_PER_BLOCK as u32, 1, 1),
            0,
        )?;
        if let Some((p_ws, ds_ws, chunks)) = wide {
            let scratch = WideScratch { delta, p: p_ws, ds: ds_ws, chunks: &chunks };
            return self.wide_backward(p, t, d, mask, scratch);
        }
        let (q, k, v, dout, lse) = (self.dptr(q), self.dptr(k), self.dptr(v), self.dptr(dout), self.dptr(lse));
        let (q_len, kv_len, heads, hd) = d.ints();
        let (causal, key_mask) = (causal as i32, mask);
        let dq = AttentionBwdDqF32 {
            dq: self.dptr(dq),
            dout,
            q,
            k,
            v,
            lse,
            delta,
            key_mask,
            q_len,
            kv_len,
            heads,
            hd,
            scale,
            causal,
        };
        let (dk, dv) = (self.dptr(dk), self.dptr(dv));
        let dkdv = AttentionBwdDkdvF32 {
            dk,
            dv,
            dout,
            q,
            k,
            v,
            lse,
            delta,
            key_mask,
            q_len,
            kv_len,
            heads,
            hd,
            scale,
            causal,
        };
        let bh = (d.batch * d.heads) as u32;
        if self.use_bf16() {
            let h = bf16_bucket(d.hd);
            let grid_q = (blocks(d.q_len, BF16_BLOCK_ROWS), bh, 1);
            let grid_k = (blocks(d.kv_len, BF16_BLOCK_ROWS), bh, 1);
            self.attn_launch(dq.bf16(h), grid_q, bf16_dq_smem(h))?;
            self.attn_launch(dkdv.bf16(h), grid_k, bf16_dkdv_smem(h))
        } else {
            let grid_q = (blocks(d.q_len, F32_BLOCK_ROWS), bh, 1);
            let grid_k = (blocks(d.kv_len, F32_BLOCK_ROWS), bh, 1);
            self.attn_launch(dq, grid_q, f32_bwd_smem(d.hd))?;
            self.attn_launch(dkdv, grid_k, f32_bwd_smem(d.hd))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The opt-in limits: sm_80 allows 163 KiB of dynamic shared memory per block, sm_90 227 KiB.
    #[test]
    fn attention_shared_memory_fits_sm80_for_every_bucket() {
        for h in (16..=MAX_HEAD_DIM).step_by(16) {
            for s in [bf16_fwd_smem(h), bf16_dq_smem(h), bf16_dkdv_smem(h)] {
                assert!(s <= 163 * 1024, "bucket {h}: {s} B");
            }
        }
        assert!(f32_bwd_smem(MAX_HEAD_DIM) <= 163 * 1024 && f32_fwd_smem(MAX_HEAD_DIM) <= 163 * 1024);
        for hd in 1..=V2_MAX_BUCKET {
            let s = bf16_fwd_v2_smem(v2_bucket(hd), hd);
            assert!(s <= 163 * 1024, "version 2, head dim {hd}: {s} B");
        }
        // The sizes the kernel's header states: 68 KiB at head dim 40, 148 KiB at 96.
        assert_eq!(bf16_fwd_v2_smem(40, 40), 68 * 1024 + 16);
        assert_eq!(bf16_fwd_v2_smem(96, 96), 148 * 1024 + 16);
        assert_eq!((v2_bucket(40), v2_bucket(33), v2_bucket(8), v2_bucket(1)), (40, 40, 8, 8));
        assert_eq!(bf16_bucket(40), 48);
        assert_eq!(bf16_bucket(8), 16);
        assert_eq!(bf16_bucket(160), 160);
    }

    /// The chunks of the materialised path partition the (pair, query) rows in order, each within
    /// the limit (unless one row exceeds it), and each piece maps to its own workspace rows.
    #[test]
    fn wide_chunks_partition_the_rows() {
        for &(batch, heads, q_len, kv_len, limit) in &[
            (1, 1, 4096, 4096, WIDE_WORKSPACE_ELEMS), // 512×512 VAE: one pair per chunk
            (2, 1, 4096, 4096, WIDE_WORKSPACE_ELEMS),
            (1, 1, 8192, 8192, WIDE_WORKSPACE_ELEMS), // a pair split over two chunks
            (2, 3, 7, 5, 5 * 10),                     // chunks across pairs and splitting them
            (2, 3, 7, 5, 1),                          // a row per chunk
            (3, 2, 16, 16, 1 << 20),                  // everything in one chunk
            (1, 2, 5, 0, 64),                         // no keys
        ] {
            let (per, chunks) = wide_chunks(batch, heads, q_len, kv_len, limit);
            let total = batch * heads * q_len;
            assert!(per >= 1 && (per * kv_len <= limit || per == 1), "{per} rows of {kv_len} over {limit}");
            let mut next = 0;
            for c in &chunks {
                assert_eq!(c.row0, next);
                assert!(c.nrows >= 1 && c.nrows <= per);
                let mut ws = 0;
                for g in &c.segs {
                    assert_eq!(g.ws_row, ws);
                    assert!(g.i0 < g.i1 && g.i1 <= q_len && g.b < batch && g.h < heads);
                    assert_eq!((g.b * heads + g.h) * q_len + g.i0, c.row0 + ws);
                    ws += g.i1 - g.i0;
                }
                assert_eq!(ws, c.nrows);
                next += c.nrows;
            }
            assert_eq!(next, total);
        }
        assert_eq!(wide_chunks(1, 1, 4096, 4096, WIDE_WORKSPACE_ELEMS).1.len(), 1);
        assert_eq!(wide_chunks(1, 1, 8192, 8192, WIDE_WORKSPACE_ELEMS).1.len(), 2);
        assert_eq!(wide_chunks(0, 1, 5, 5, 10), (0, Vec::new()));
    }
}

/// The materialised backward's workspaces: D (from attention_bwd_delta), the P and dS score
/// chunks, and the chunking of the (batch·head, query) pairs.
struct WideScratch<'a> {
    delta: u64,
    p: u64,
    ds: u64,
    chunks: &'a [Chunk],
}

//! Multi-head scaled dot-product attention on token-major tensors, with a causal mask (CLIP's text
//! encoder) and/or a key mask (BERT's padding). Kernels: kernels/attention.cu (flash kernels up to
//! head dim 160, a materialised path above it).

use crate::backend::cpu::gemm::{self, Mat, PackedB, SharedMut};
use crate::backend::cpu::{scratch, vmath};
use crate::backend::{check_disjoint, check_key_mask, check_lens};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// One attention: q (batch, q_len, heads · head_dim), k and v (batch, kv_len, heads · head_dim),
/// softmax(q kᵀ · scale) v per head. `causal` masks key j > query i (q_len == kv_len).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionParams {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub causal: bool,
}

/// The tensors of a forward call: `out` like q, `lse` (batch, q_len, heads) the log-sum-exp of
/// each softmax row (saved for the backward), and the inputs. `key_mask` (batch, kv_len), if any:
/// 1 for a key that takes part, 0 for padding; every sequence keeps at least one key.
#[derive(Clone, Copy)]
pub struct AttentionForward<'a> {
    pub out: &'a Tensor,
    pub lse: &'a Tensor,
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub key_mask: Option<&'a [u32]>,
}

/// The tensors of a backward call: the gradients (accumulated into), `dout`, and the forward call
/// it differentiates (its inputs, output, saved log-sum-exp and key mask are what it reads).
pub struct AttentionBackward<'a> {
    pub dq: &'a Tensor,
    pub dk: &'a Tensor,
    pub dv: &'a Tensor,
    pub dout: &'a Tensor,
    pub forward: AttentionForward<'a>,
}

impl AttentionParams {
    /// Elements of one token: heads · head_dim.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    /// QKᵀ and PV: two products of q_len × kv_len × head_dim per (batch, head), ×2 for the
    /// multiply-adds. Counted over every key, masked or not: the shapes set a dense kernel's work.
    pub fn forward_flops(&self) -> usize {
        4 * self.batch * self.heads * self.q_len * self.kv_len * self.head_dim
    }

    /// The recomputed QKᵀ, then dV, dP, dQ and dK: five products.
    pub fn backward_flops(&self) -> usize {
        self.forward_flops() / 2 * 5
    }

    fn check_dims(&self, what: &str, key_mask: Option<&[u32]>) -> Result<()> {
        let (q_len, kv_len) = (self.q_len, self.kv_len);
        ensure!(self.head_dim >= 1, "{what}: head_dim 0");
        ensure!(
            !self.causal || q_len == kv_len,
            "{what}: causal attention needs q_len == kv_len ({q_len} vs {kv_len})"
        );
        if let Some(m) = key_mask {
            check_key_mask(what, m, self.batch, kv_len)?;
        }
        Ok(())
    }

    /// The element counts of a query-side tensor (q, out, dq, dout), a key-side one (k, v, dk, dv) and
    /// the log-sum-exp.
    fn lens(&self) -> (usize, usize, usize) {
        let (b, w) = (self.batch, self.width());
        (b * self.q_len * w, b * self.kv_len * w, b * self.q_len * self.heads)
    }

    /// What every backend checks before a forward: the dimensions, the key mask, the tensors'
    /// lengths, and that no output overlaps another or an input.
    pub fn check_forward(&self, t: &AttentionForward) -> Result<()> {
        let what = if t.key_mask.is_some() { "masked attention" } else { "attention" };
        self.check_dims(what, t.key_mask)?;
        let (q, kv, lse) = self.lens();
        check_lens(what, &[("out", t.out, q), ("q", t.q, q), ("k", t.k, kv), ("v", t.v, kv), ("lse", t.lse, lse)])?;
        check_disjoint(what, &[t.out, t.lse], &[t.q, t.k, t.v])
    }

    /// As [`AttentionParams::check_forward`], for a backward.
    pub fn check_backward(&self, t: &AttentionBackward) -> Result<()> {
        let f = &t.forward;
        let what = if f.key_mask.is_some() { "masked_attention_backward" } else { "attention_backward" };
        self.check_dims(what, f.key_mask)?;
        let (q, kv, lse) = self.lens();
        let grads = [("dq", t.dq, q), ("dk", t.dk, kv), ("dv", t.dv, kv), ("dout", t.dout, q)];
        let forward = [("q", f.q, q), ("k", f.k, kv), ("v", f.v, kv), ("out", f.out, q), ("lse", f.lse, lse)];
        check_lens(what, &grads)?;
        check_lens(what, &forward)?;
        check_disjoint(what, &[t.dq, t.dk, t.dv], &[t.dout, f.q, f.k, f.v, f.out, f.lse])
    }

    /// Whether query i of batch b attends to key j.
    fn allowed(&self, key_mask: Option<&[u32]>, b: usize, i: usize, j: usize) -> bool {
        key_mask.is_none_or(|m| m[b * self.kv_len + j] != 0) && (!self.causal || j <= i)
    }

    /// One softmax row in place, unnormalised: query `i` of batch `b`'s scores become
    /// exp(score · scale − max), 0 for keys that take no part (key mask 0, or after the query when
    /// causal). Returns (max, sum, keys taking part).
    fn scale_and_exp_row(&self, s: &mut [f32], key_mask: Option<&[u32]>, b: usize, i: usize) -> (f32, f32, usize) {
        let masked = key_mask.is_some() || self.causal;
        if !masked {
            // Every key: vectorised passes (see vmath).
            let max = vmath::scaled_max(s, self.scale);
            return (max, vmath::exp_scaled_sum(s, self.scale, max), s.len());
        }
        let mut max = f32::NEG_INFINITY;
        let mut kept = 0;
        for (j, x) in s.iter_mut().enumerate() {
            if masked && !self.allowed(key_mask, b, i, j) {
                *x = f32::NEG_INFINITY;
            } else {
                *x *= self.scale;
                max = max.max(*x);
                kept += 1;
            }
        }
        let mut sum = 0f32;
        if kept > 0 {
            for x in s.iter_mut() {
                *x = vmath::exp(*x - max); // exp(−inf) = 0 for the keys left out
                sum += *x;
            }
        }
        (max, sum, kept)
    }

    /// The CPU reference of the forward, on checked slices `[out, lse]`, `[q, k, v]`: one task per
    /// (batch, block of QUERY_BLOCK queries), every head in turn: S = Q·Kᵀ and O = P·V are matrix
    /// products (so the scores of a block stay in L2), the softmax between them per row. A key takes part when the key mask (if
    /// any) is nonzero and, when causal, it is not after the query; the others get probability 0,
    /// which equals transformers' additive dtype-minimum mask (their probabilities underflow to
    /// exactly 0). A row left with no key gets 0 and lse −inf (an empty sum), as PyTorch's
    /// softmax·V over zero keys and the CUDA kernels give, not 0·(1/0) = NaN.
    pub fn cpu_forward(&self, [out, lse]: [&mut [f32]; 2], [q, k, v]: [&[f32]; 3], key_mask: Option<&[u32]>) {
        let AttentionParams { batch, q_len, kv_len, heads, head_dim: hd, .. } = *self;
        let w = self.width();
        if kv_len == 0 {
            out[..batch * q_len * w].fill(0.0);
            lse[..batch * q_len * heads].fill(f32::NEG_INFINITY);
            return;
        }
        let per_batch = out[..batch * q_len * w]
            .par_chunks_mut(q_len * w)
            .zip(lse[..batch * q_len * heads].par_chunks_mut(q_len * heads));
        per_batch.enumerate().for_each(|(b, (out_b, lse_b))| {
            // Each head's Kᵀ and V packed once for all its query blocks (packing per block cost
            // more than the products: a 64-query block does only 2 · 64 FLOP per packed value).
            let packed: Vec<(PackedB, PackedB)> = (0..heads)
                .map(|h| {
                    let kt = Mat { data: &k[b * kv_len * w + h * hd..], row_stride: 1, col_stride: w };
                    let vm = Mat { data: &v[b * kv_len * w + h * hd..], row_stride: w, col_stride: 1 };
                    (PackedB::in_scratch(hd, kv_len, kt, false), PackedB::in_scratch(kv_len, hd, vm, false))
                })
                .collect();
            let blocks = out_b.par_chunks_mut(QUERY_BLOCK * w).zip(lse_b.par_chunks_mut(QUERY_BLOCK * heads));
            blocks.enumerate().for_each(|(blk, (o, l))| {
                scratch::with_buffer(QUERY_BLOCK * (kv_len + hd), |buf| {
                    let (scores, o_head) = buf.split_at_mut(QUERY_BLOCK * kv_len);
                    let (i0, n) = (blk * QUERY_BLOCK, o.len() / w);
                    for h in 0..heads {
                        let qm = Mat { data: &q[(b * q_len + i0) * w + h * hd..], row_stride: w, col_stride: 1 };
                        let (kt, vm) = &packed[h];
                        let s = &mut scores[..n * kv_len];
                        gemm::sgemm_packed(n, qm, kt, s, 0.0, false);
                        let mut inv = [0f32; QUERY_BLOCK];
                        for (r, row) in s.chunks_mut(kv_len).enumerate() {
                            let (max, sum, kept) = self.scale_and_exp_row(row, key_mask, b, i0 + r);
                            inv[r] = if kept == 0 { 0.0 } else { 1.0 / sum };
                            l[r * heads + h] = max + sum.ln();
                        }
                        let pm = Mat { data: s, row_stride: kv_len, col_stride: 1 };
                        gemm::sgemm_packed(n, pm, vm, &mut o_head[..n * hd], 0.0, false);
                        for r in 0..n {
                            let dst = &mut o[r * w + h * hd..][..hd];
                            dst.iter_mut().zip(&o_head[r * hd..][..hd]).for_each(|(d, x)| *d = x * inv[r]);
                        }
                    }
                })
            });
            packed.into_iter().for_each(|(kt, vm)| {
                kt.recycle();
                vm.recycle();
            });
        });
    }

    /// The CPU reference of the backward, on checked slices `[dq, dk, dv]` (accumulated into),
    /// `[dout, q, k, v, out, lse]`: one task per (batch, head), by blocks of queries, the softmax
    /// rows recomputed from the saved log-sum-exp; every step a matrix product: S = Q·Kᵀ,
    /// dP = dO·Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)) · scale, dV += Pᵀ·dO, dQ = dS·K, dK += dSᵀ·Q.
    pub fn cpu_backward(&self, [dq, dk, dv]: [&mut [f32]; 3], ins: [&[f32]; 6], key_mask: Option<&[u32]>) {
        let [dout, q, k, v, out, lse] = ins;
        let AttentionParams { batch, q_len, kv_len, heads, head_dim: hd, scale, .. } = *self;
        let w = self.width();
        let masked = key_mask.is_some() || self.causal;
        if kv_len == 0 {
            return; // no keys: the output is a constant 0, every gradient 0
        }
        let (dq, dk, dv) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
        (0..batch * heads).into_par_iter().for_each(|bh| {
            let (b, h) = (bh / heads, bh % heads);
            let kv0 = b * kv_len * w + h * hd;
            // Kᵀ, Vᵀ and K packed once for every query block of this head.
            let kt = PackedB::in_scratch(hd, kv_len, Mat { data: &k[kv0..], row_stride: 1, col_stride: w }, false);
            let km = PackedB::in_scratch(kv_len, hd, Mat { data: &k[kv0..], row_stride: w, col_stride: 1 }, false);
            let vt = PackedB::in_scratch(hd, kv_len, Mat { data: &v[kv0..], row_stride: 1, col_stride: w }, false);
            let (blk, kvh) = (QUERY_BLOCK * kv_len, kv_len * hd);
            scratch::with_buffer(2 * blk + 2 * kvh + QUERY_BLOCK * hd, |buf| {
                let (p, rest) = buf.split_at_mut(blk);
                let (dp, rest) = rest.split_at_mut(blk);
                let (dk_h, rest) = rest.split_at_mut(kvh);
                let (dv_h, dq_blk) = rest.split_at_mut(kvh);
                // dK and dV accumulate over the query blocks (P, dP and dQ are written before read).
                dk_h.fill(0.0);
                dv_h.fill(0.0);
                for i0 in (0..q_len).step_by(QUERY_BLOCK) {
                    let n = QUERY_BLOCK.min(q_len - i0);
                    let q0 = (b * q_len + i0) * w + h * hd;
                    let qm = Mat { data: &q[q0..], row_stride: w, col_stride: 1 };
                    let dom = Mat { data: &dout[q0..], row_stride: w, col_stride: 1 };
                    let (p, dp) = (&mut p[..n * kv_len], &mut dp[..n * kv_len]);
                    gemm::sgemm_packed(n, qm, &kt, p, 0.0, false);
                    gemm::sgemm_packed(n, dom, &vt, dp, 0.0, false);
                    for (r, (pr, dpr)) in p.chunks_mut(kv_len).zip(dp.chunks_mut(kv_len)).enumerate() {
                        let (i, row) = (i0 + r, (b * q_len + i0 + r));
                        let l = lse[row * heads + h];
                        // D_i = dO_i · O_i = Σ_j P_ij dP_ij (excluded keys have P = 0)
                        let (doi, oi) = (&dout[row * w + h * hd..][..hd], &out[row * w + h * hd..][..hd]);
                        let d: f32 = doi.iter().zip(oi).map(|(a, b)| a * b).sum();
                        if masked {
                            for (j, x) in pr.iter_mut().enumerate() {
                                *x = if self.allowed(key_mask, b, i, j) { vmath::exp(*x * scale - l) } else { 0.0 };
                            }
                        } else {
                            vmath::exp_scaled_sum(pr, scale, l);
                        }
                        for (x, g) in pr.iter().zip(dpr.iter_mut()) {
                            *g = x * (*g - d) * scale; // dS
                        }
                    }
                    let pt = Mat { data: p, row_stride: 1, col_stride: kv_len };
                    let dst = Mat { data: dp, row_stride: 1, col_stride: kv_len };
                    let ds = Mat { data: dp, row_stride: kv_len, col_stride: 1 };
                    gemm::sgemm(kv_len, n, hd, pt, dom, dv_h, 1.0);
                    gemm::sgemm(kv_len, n, hd, dst, qm, dk_h, 1.0);
                    gemm::sgemm_packed(n, ds, &km, &mut dq_blk[..n * hd], 0.0, false);
                    // SAFETY: this task is the only writer of head h of batch b in dq, dk and dv, and
                    // the slices hold every index written (checked lengths).
                    unsafe { add_rows(dq.at(q0), w, &dq_blk[..n * hd], hd) };
                }
                unsafe {
                    add_rows(dk.at(kv0), w, dk_h, hd);
                    add_rows(dv.at(kv0), w, dv_h, hd);
                }
            });
            [kt, km, vt].into_iter().for_each(PackedB::recycle);
        });
    }
}

/// Queries per task of the CPU attention: a multiple of the AVX-512 kernel's 12 rows (64 left
/// a third of a tile idle in every product), and the block's scores (48 × 4,096 keys × 4 B =
/// 768 KiB at SD's 512² self-attention) stay in a 1 MiB L2.
const QUERY_BLOCK: usize = 48;

/// dst rows (stride `dst_stride`) += src rows (contiguous, `width` each).
///
/// # Safety
/// dst must be valid for writes of every row, and no other thread may write them.
unsafe fn add_rows(dst: *mut f32, dst_stride: usize, src: &[f32], width: usize) {
    for (r, s) in src.chunks(width).enumerate() {
        let d = std::slice::from_raw_parts_mut(dst.add(r * dst_stride), width);
        d.iter_mut().zip(s).for_each(|(d, s)| *d += s);
    }
}

/// Multi-head attention on a backend.
pub trait AttentionOps {
    /// Multi-head scaled dot-product attention (ops/attention.rs): causal (CLIP) and/or over a
    /// key padding mask (BERT); lse, the log-sum-exp of each softmax row, is saved for backward.
    fn attention_forward(&self, p: &AttentionParams, t: &AttentionForward) -> Result<()>;

    /// Of `attention_forward`, recomputing the softmax from the saved log-sum-exp.
    fn attention_backward(&self, p: &AttentionParams, t: &AttentionBackward) -> Result<()>;
}

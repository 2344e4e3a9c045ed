//! Multi-head scaled dot-product attention on token-major tensors, with a causal mask (CLIP's text
//! encoder) and/or a key mask (BERT's padding). Kernels: kernels/attention.cu (flash kernels up to
//! head dim 160, a materialised path above it).

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

/// A pointer shared by tasks that write disjoint elements (each task owns a set of (batch, head)
/// columns of a strided tensor, which slices cannot express).
#[derive(Clone, Copy)]
struct SharedMut(pub *mut f32);
// SAFETY: only used where each task writes a disjoint set of elements (documented at each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Through a method, so closures capture the Send + Sync wrapper and not the bare pointer.
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: offsets stay within the tensor (checked by the caller's length checks).
        unsafe { self.0.add(offset) }
    }
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

    /// The CPU reference of the forward, on checked slices `[out, lse]`, `[q, k, v]`: one task per
    /// (batch, query row), every head of that row. A key takes part when the key mask (if any) is
    /// nonzero and, when causal, it is not after the query; the others are skipped, which equals
    /// transformers' additive dtype-minimum mask (their probabilities underflow to exactly 0). A
    /// row left with no key gets 0 and lse −inf (an empty sum), as PyTorch's softmax·V over zero
    /// keys and the CUDA kernels give, not 0·(1/0) = NaN.
    pub fn cpu_forward(&self, [out, lse]: [&mut [f32]; 2], [q, k, v]: [&[f32]; 3], key_mask: Option<&[u32]>) {
        let AttentionParams { batch, q_len, kv_len, heads, head_dim: hd, scale, .. } = *self;
        let w = self.width();
        out[..batch * q_len * w]
            .par_chunks_mut(w)
            .zip(lse[..batch * q_len * heads].par_chunks_mut(heads))
            .enumerate()
            .for_each_init(
                || (vec![0f32; kv_len], Vec::with_capacity(kv_len)),
                |(scores, keys), (row, (o, l))| {
                    let (b, i) = (row / q_len, row % q_len);
                    keys.clear();
                    keys.extend((0..kv_len).filter(|&j| self.allowed(key_mask, b, i, j)));
                    for h in 0..heads {
                        let qh = &q[row * w + h * hd..][..hd];
                        let mut max = f32::NEG_INFINITY;
                        for (n, &j) in keys.iter().enumerate() {
                            let kh = &k[(b * kv_len + j) * w + h * hd..][..hd];
                            scores[n] = qh.iter().zip(kh).map(|(a, b)| a * b).sum::<f32>() * scale;
                            max = max.max(scores[n]);
                        }
                        let mut sum = 0f32;
                        for s in &mut scores[..keys.len()] {
                            *s = (*s - max).exp();
                            sum += *s;
                        }
                        let oh = &mut o[h * hd..(h + 1) * hd];
                        oh.fill(0.0);
                        for (n, &j) in keys.iter().enumerate() {
                            let vh = &v[(b * kv_len + j) * w + h * hd..][..hd];
                            for d in 0..hd {
                                oh[d] += scores[n] * vh[d];
                            }
                        }
                        let inv = if keys.is_empty() { 0.0 } else { 1.0 / sum };
                        oh.iter_mut().for_each(|x| *x *= inv);
                        l[h] = max + sum.ln();
                    }
                },
            );
    }

    /// The CPU reference of the backward, on checked slices `[dq, dk, dv]` (accumulated into),
    /// `[dout, q, k, v, out, lse]`: per (batch, head), the softmax rows recomputed from the saved
    /// log-sum-exp.
    pub fn cpu_backward(&self, [dq, dk, dv]: [&mut [f32]; 3], ins: [&[f32]; 6], key_mask: Option<&[u32]>) {
        let [dout, q, k, v, out, lse] = ins;
        let AttentionParams { batch, q_len, kv_len, heads, head_dim: hd, scale, .. } = *self;
        let w = self.width();
        let (dq, dk, dv) = (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
        (0..batch * heads).into_par_iter().for_each(|bh| {
            let (b, h) = (bh / heads, bh % heads);
            let mut p = vec![0f32; kv_len];
            let mut dp = vec![0f32; kv_len];
            let mut keys = Vec::with_capacity(kv_len);
            for i in 0..q_len {
                let row = b * q_len + i;
                keys.clear();
                keys.extend((0..kv_len).filter(|&j| self.allowed(key_mask, b, i, j)));
                let qi = &q[row * w + h * hd..][..hd];
                let doi = &dout[row * w + h * hd..][..hd];
                let oi = &out[row * w + h * hd..][..hd];
                let l = lse[row * heads + h];
                // D_i = dO_i · O_i = Σ_j P_ij dP_ij (excluded keys have P = 0)
                let d: f32 = doi.iter().zip(oi).map(|(a, b)| a * b).sum();
                for (n, &j) in keys.iter().enumerate() {
                    let kj = &k[(b * kv_len + j) * w + h * hd..][..hd];
                    let vj = &v[(b * kv_len + j) * w + h * hd..][..hd];
                    let s: f32 = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                    p[n] = (s - l).exp();
                    dp[n] = doi.iter().zip(vj).map(|(a, b)| a * b).sum();
                }
                // SAFETY: this task is the only writer of head h of batch b in dq, dk and dv, and
                // the slices hold every index written (checked lengths).
                unsafe {
                    let dqi = std::slice::from_raw_parts_mut(dq.at(row * w + h * hd), hd);
                    for (n, &j) in keys.iter().enumerate() {
                        let ds = p[n] * (dp[n] - d) * scale;
                        let base = (b * kv_len + j) * w + h * hd;
                        let kj = &k[base..][..hd];
                        let dkj = std::slice::from_raw_parts_mut(dk.at(base), hd);
                        let dvj = std::slice::from_raw_parts_mut(dv.at(base), hd);
                        for t in 0..hd {
                            dqi[t] += ds * kj[t];
                            dkj[t] += ds * qi[t];
                            dvj[t] += p[n] * doi[t];
                        }
                    }
                }
            }
        });
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

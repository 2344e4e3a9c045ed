//! Fused attention (kernels/attention.cu): flash-style forward and backward, one kernel family for
//! `attention_*` (optional causal mask) and `masked_attention_*` (a key mask), as the CPU reference's
//! `backward::attention_forward` / `backward::attention` serve both.
//!
//! Paths: `use_bf16()` selects the tensor-core kernels `attention_*_bf16_d<H>` (H = head_dim rounded
//! up to a multiple of 16, one instantiation per bucket); otherwise the exact f32 SIMT kernels
//! `attention_*_f32`. Any head_dim in 1..=160.
//!
//! Backward is three launches on the stream, deterministic (no atomics): `attention_bwd_delta`
//! (D = rowsum(dO ∘ O) into workspace slot 0), then the query-side kernel (dq, one block per query
//! tile) and the key-side kernel (dk, dv, one block per key tile); each block is the only writer of
//! the gradient rows it owns, so it accumulates with a plain `+=`. The price: S and dP are computed by
//! both kernels (7 matrix products instead of FlashAttention-2's 5 with atomicAdd on dq).
//!
//! The shared-memory sizes below mirror the tile layouts documented above each kernel in
//! attention.cu; a change to one must be made in the other.

use super::{check_len, Arg, CudaBackend};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};

/// The largest head_dim the kernels hold (the f32 kernels keep 160 / 32 = 5 columns per lane; the
/// largest bf16 bucket is 160).
const MAX_HEAD_DIM: usize = 160;
/// Threads per block of every attention kernel but the delta kernel (4 warps).
const THREADS: u32 = 128;
/// Rows (queries or keys) per block: f32 kernels 4 warps × 4 rows, bf16 kernels 4 warps × 16 rows.
const F32_BLOCK_ROWS: usize = 16;
const BF16_BLOCK_ROWS: usize = 64;
/// (row, head) items per block of `attention_bwd_delta` (8 warps of 256 threads, one warp each).
const DELTA_ITEMS_PER_BLOCK: usize = 8;
/// Above this, a kernel must opt in to more dynamic shared memory.
const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;

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

/// attn_fwd_bf16<H>: Q [64][H+8] + K [64][H+8] + Vᵀ [H][64+8] bf16, then 64 int key flags.
fn bf16_fwd_smem(h: usize) -> usize {
    let s = h + 8;
    (64 * s + 64 * s + h * (64 + 8)) * 2 + 64 * 4
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
    fn check(self, what: &str, causal: bool) -> Result<Dims> {
        let Dims { batch, q_len, kv_len, heads, hd } = self;
        ensure!(
            (1..=MAX_HEAD_DIM).contains(&hd),
            "{what}: head_dim {hd} is not supported by the CUDA attention kernels (1..={MAX_HEAD_DIM})"
        );
        ensure!(!causal || q_len == kv_len, "{what}: causal attention needs q_len == kv_len ({q_len} vs {kv_len})");
        ensure!(batch * heads <= 65535, "{what}: batch {batch} × heads {heads} exceeds the grid's y limit (65535)");
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

    fn ints(self) -> [Arg; 4] {
        [Arg::I(self.q_len as i32), Arg::I(self.kv_len as i32), Arg::I(self.heads as i32), Arg::I(self.hd as i32)]
    }
}

/// As the CPU backend: the mask covers every key of every sequence, and each sequence keeps a key.
fn check_key_mask(what: &str, key_mask: &[u32], batch: usize, kv_len: usize) -> Result<()> {
    ensure!(
        key_mask.len() == batch * kv_len,
        "{what}: attention mask has {} entries for batch {batch} × {kv_len} keys",
        key_mask.len()
    );
    if let Some(b) = (0..batch).find(|&b| key_mask[b * kv_len..(b + 1) * kv_len].iter().all(|&m| m == 0)) {
        anyhow::bail!("{what}: attention mask: sequence {b} masks every key");
    }
    Ok(())
}

fn blocks(n: usize, per: usize) -> u32 {
    n.div_ceil(per) as u32
}

impl CudaBackend {
    /// Launches an attention kernel with 128 threads, opting in to large dynamic shared memory.
    fn attn_launch(&self, kernel: &str, grid: (u32, u32, u32), smem: usize, args: &[Arg]) -> Result<()> {
        let smem = smem as u32;
        if smem as usize > DEFAULT_SMEM_LIMIT {
            self.set_max_dynamic_shared(kernel, smem)?;
        }
        self.launch(kernel, grid, (THREADS, 1, 1), smem, args)
    }

    #[allow(clippy::too_many_arguments)]
    fn attn_forward(
        &self,
        what: &str,
        out: &Tensor,
        lse: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_mask: Option<&[u32]>,
        d: Dims,
        scale: f32,
        causal: bool,
    ) -> Result<()> {
        let d = d.check(what, causal)?;
        let w = d.width();
        if let Some(m) = key_mask {
            check_key_mask(what, m, d.batch, d.kv_len)?;
        }
        check_len(&format!("{what} out"), out, d.batch * d.q_len * w)?;
        check_len(&format!("{what} q"), q, d.batch * d.q_len * w)?;
        check_len(&format!("{what} k"), k, d.batch * d.kv_len * w)?;
        check_len(&format!("{what} v"), v, d.batch * d.kv_len * w)?;
        check_len(&format!("{what} lse"), lse, d.batch * d.q_len * d.heads)?;
        if d.batch * d.heads * d.q_len == 0 {
            return Ok(());
        }
        let mask = match key_mask {
            Some(m) => self.upload_u32(0, m)?,
            None => 0,
        };
        let mut args = vec![
            Arg::P(self.dptr(out)),
            Arg::P(self.dptr(lse)),
            Arg::P(self.dptr(q)),
            Arg::P(self.dptr(k)),
            Arg::P(self.dptr(v)),
            Arg::P(mask),
        ];
        args.extend(d.ints());
        args.extend([Arg::F(scale), Arg::I(causal as i32)]);
        let bh = (d.batch * d.heads) as u32;
        if self.use_bf16() {
            let h = bf16_bucket(d.hd);
            let grid = (blocks(d.q_len, BF16_BLOCK_ROWS), bh, 1);
            self.attn_launch(&format!("attention_fwd_bf16_d{h}"), grid, bf16_fwd_smem(h), &args)
        } else {
            let grid = (blocks(d.q_len, F32_BLOCK_ROWS), bh, 1);
            self.attn_launch("attention_fwd_f32", grid, f32_fwd_smem(d.hd), &args)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attn_backward(
        &self,
        what: &str,
        dq: &Tensor,
        dk: &Tensor,
        dv: &Tensor,
        dout: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        key_mask: Option<&[u32]>,
        d: Dims,
        scale: f32,
        causal: bool,
    ) -> Result<()> {
        let d = d.check(what, causal)?;
        let w = d.width();
        if let Some(m) = key_mask {
            check_key_mask(what, m, d.batch, d.kv_len)?;
        }
        check_len(&format!("{what} dq"), dq, d.batch * d.q_len * w)?;
        check_len(&format!("{what} dk"), dk, d.batch * d.kv_len * w)?;
        check_len(&format!("{what} dv"), dv, d.batch * d.kv_len * w)?;
        check_len(&format!("{what} dout"), dout, d.batch * d.q_len * w)?;
        check_len(&format!("{what} q"), q, d.batch * d.q_len * w)?;
        check_len(&format!("{what} k"), k, d.batch * d.kv_len * w)?;
        check_len(&format!("{what} v"), v, d.batch * d.kv_len * w)?;
        check_len(&format!("{what} out"), out, d.batch * d.q_len * w)?;
        check_len(&format!("{what} lse"), lse, d.batch * d.q_len * d.heads)?;
        if d.batch * d.heads * d.q_len * d.kv_len == 0 {
            return Ok(()); // no query/key pair: nothing to accumulate
        }
        // Scratch first (growing it or uploading synchronises the stream), then the three launches.
        let rows = d.batch * d.q_len;
        let delta = self.workspace(0, rows * d.heads)?;
        let mask = match key_mask {
            Some(m) => self.upload_u32(0, m)?,
            None => 0,
        };
        self.launch(
            "attention_bwd_delta",
            (blocks(rows * d.heads, DELTA_ITEMS_PER_BLOCK), 1, 1),
            (32 * DELTA_ITEMS_PER_BLOCK as u32, 1, 1),
            0,
            &[
                Arg::P(delta),
                Arg::P(self.dptr(dout)),
                Arg::P(self.dptr(out)),
                Arg::I(rows as i32),
                Arg::I(d.heads as i32),
                Arg::I(d.hd as i32),
            ],
        )?;
        let (pq, pk, pv, pdo, plse) = (self.dptr(q), self.dptr(k), self.dptr(v), self.dptr(dout), self.dptr(lse));
        let tail = |args: &mut Vec<Arg>| {
            args.extend(d.ints());
            args.extend([Arg::F(scale), Arg::I(causal as i32)]);
        };
        let mut dq_args = vec![
            Arg::P(self.dptr(dq)),
            Arg::P(pdo),
            Arg::P(pq),
            Arg::P(pk),
            Arg::P(pv),
            Arg::P(plse),
            Arg::P(delta),
            Arg::P(mask),
        ];
        tail(&mut dq_args);
        let mut dkdv_args = vec![
            Arg::P(self.dptr(dk)),
            Arg::P(self.dptr(dv)),
            Arg::P(pdo),
            Arg::P(pq),
            Arg::P(pk),
            Arg::P(pv),
            Arg::P(plse),
            Arg::P(delta),
            Arg::P(mask),
        ];
        tail(&mut dkdv_args);
        let bh = (d.batch * d.heads) as u32;
        if self.use_bf16() {
            let h = bf16_bucket(d.hd);
            let grid_q = (blocks(d.q_len, BF16_BLOCK_ROWS), bh, 1);
            let grid_k = (blocks(d.kv_len, BF16_BLOCK_ROWS), bh, 1);
            self.attn_launch(&format!("attention_bwd_dq_bf16_d{h}"), grid_q, bf16_dq_smem(h), &dq_args)?;
            self.attn_launch(&format!("attention_bwd_dkdv_bf16_d{h}"), grid_k, bf16_dkdv_smem(h), &dkdv_args)
        } else {
            let grid_q = (blocks(d.q_len, F32_BLOCK_ROWS), bh, 1);
            let grid_k = (blocks(d.kv_len, F32_BLOCK_ROWS), bh, 1);
            self.attn_launch("attention_bwd_dq_f32", grid_q, f32_bwd_smem(d.hd), &dq_args)?;
            self.attn_launch("attention_bwd_dkdv_f32", grid_k, f32_bwd_smem(d.hd), &dkdv_args)
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_forward_impl(
        &self,
        out: &Tensor,
        lse: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        batch: usize,
        q_len: usize,
        kv_len: usize,
        heads: usize,
        head_dim: usize,
        scale: f32,
        causal: bool,
    ) -> Result<()> {
        let d = Dims { batch, q_len, kv_len, heads, hd: head_dim };
        self.attn_forward("attention", out, lse, q, k, v, None, d, scale, causal)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_backward_impl(
        &self,
        dq: &Tensor,
        dk: &Tensor,
        dv: &Tensor,
        dout: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        batch: usize,
        q_len: usize,
        kv_len: usize,
        heads: usize,
        head_dim: usize,
        scale: f32,
        causal: bool,
    ) -> Result<()> {
        let d = Dims { batch, q_len, kv_len, heads, hd: head_dim };
        self.attn_backward("attention_backward", dq, dk, dv, dout, q, k, v, out, lse, None, d, scale, causal)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn masked_attention_forward_impl(
        &self,
        out: &Tensor,
        lse: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        key_mask: &[u32],
        batch: usize,
        q_len: usize,
        kv_len: usize,
        heads: usize,
        head_dim: usize,
        scale: f32,
    ) -> Result<()> {
        let d = Dims { batch, q_len, kv_len, heads, hd: head_dim };
        self.attn_forward("masked attention", out, lse, q, k, v, Some(key_mask), d, scale, false)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn masked_attention_backward_impl(
        &self,
        dq: &Tensor,
        dk: &Tensor,
        dv: &Tensor,
        dout: &Tensor,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        key_mask: &[u32],
        batch: usize,
        q_len: usize,
        kv_len: usize,
        heads: usize,
        head_dim: usize,
        scale: f32,
    ) -> Result<()> {
        let d = Dims { batch, q_len, kv_len, heads, hd: head_dim };
        self.attn_backward(
            "masked_attention_backward",
            dq,
            dk,
            dv,
            dout,
            q,
            k,
            v,
            out,
            lse,
            Some(key_mask),
            d,
            scale,
            false,
        )
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
        assert_eq!(bf16_bucket(40), 48);
        assert_eq!(bf16_bucket(8), 16);
        assert_eq!(bf16_bucket(160), 160);
    }
}

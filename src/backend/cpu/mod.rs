//! The CPU reference backend: f32 everywhere, plain loops a reader can check against the paper or
//! PyTorch, rayon for threads, and matrix products through our packed SGEMM (see `gemm.rs`).

pub mod gemm;
pub mod scratch;
pub mod vmath;
mod weights;

use super::{Activation, Backend};
use crate::backend::{AttentionOps, ConvOps, ElementwiseOps, LinearOps, NormOps, OptimOps, PoolOps, RandomOps};
use crate::ops::attention::{AttentionBackward, AttentionForward, AttentionParams};
use crate::ops::conv::{Conv2dBackward, Conv2dForward, Conv2dParams, Im2colParams};
use crate::ops::elementwise::TimestepEmbeddingParams;
use crate::ops::elementwise::{BiasRowsParams, ConcatParams, GegluParams};
use crate::ops::elementwise::{EmbeddingBackward, EmbeddingForward, EmbeddingParams, Pointwise, UpsampleParams};
use crate::ops::linear::{LinearBackward, LinearForward, LinearParams, WeightedBackward};
use crate::ops::norm::{
    BatchNormBackward, BatchNormForward, BatchNormParams, BatchNormStats, BatchNormTrainParams, GroupNormBackward,
    GroupNormParams, LayerNormBackward, LayerNormParams, NormForward,
};
use crate::ops::optim::{AdamWParams, Reduction};
use crate::ops::pool::Pool2dParams;
use crate::ops::random::{AddNoiseParams, RandnParams};
use crate::tensor::{PoolId, Tensor};
use anyhow::{ensure, Result};
use gemm::{BSource, Mat, PackedB};
use rayon::prelude::*;
use weights::{PoolWrites, WeightCache, WeightKey};

/// One allocation: an anonymous memory map (zero pages, page-aligned, transparent huge pages
/// requested so that multi-GiB parameter pools do not cost a page fault per 4 KiB). Operations
/// take `&self` and hand out a mutable view of the output and shared views of the inputs at once
/// through the raw pointer; every operation checks that its output does not overlap its inputs
/// before doing so (`CpuBackend::views`).
struct CpuPool {
    ptr: *mut f32,
    len: usize,
    label: String,
    /// None once freed (`Backend::free`): the pages are unmapped.
    map: Option<memmap2::MmapMut>,
    /// Advanced by every mutable view: the kept packed weights check it.
    writes: PoolWrites,
    /// A file mapped copy-on-write (`map_file_pool`), not anonymous memory.
    file_backed: bool,
}

impl CpuPool {
    /// Lets the OS drop the resident pages wholly inside tensor `t` of a file-backed pool that was
    /// never written: they hold nothing but the file's bytes, and a later read maps them from the
    /// file (the page cache) again. Called once a weight is kept packed, so that a sampler holds
    /// the packed copy, not both (3.3 GB less resident for SD v1.4's U-Net).
    fn drop_file_pages(&self, t: &Tensor) {
        let Some(map) = &self.map else { return };
        if !self.file_backed || !self.writes.never_written() {
            return;
        }
        const PAGE: usize = 4096;
        let start = self.ptr as usize + t.offset * 4 - map.as_ptr() as usize;
        let (from, to) = (start.next_multiple_of(PAGE), (start + t.numel() * 4) / PAGE * PAGE);
        if to > from {
            // SAFETY: a private file mapping whose pages were never written (no mutable view of the
            // pool was ever taken, so none is a copy-on-write copy): dropping them loses nothing.
            #[cfg(unix)]
            let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from) };
        }
    }
}

#[derive(Default)]
pub struct CpuBackend {
    pools: Vec<CpuPool>,
    /// Packed copies of the weights of Linear and Conv2d forwards, while unchanged.
    weights: WeightCache,
}

impl CpuBackend {
    pub fn new() -> CpuBackend {
        CpuBackend::default()
    }

    /// Registers a mapping holding `len` values from `ptr` as a new pool.
    fn add_pool(&mut self, map: memmap2::MmapMut, ptr: *mut f32, len: usize, label: &str, file_backed: bool) -> PoolId {
        let (writes, label, map) = (PoolWrites::default(), label.to_string(), Some(map));
        self.pools.push(CpuPool { ptr, len, label, map, writes, file_backed });
        PoolId(self.pools.len() - 1)
    }

    fn pool(&self, t: &Tensor) -> &CpuPool {
        let p = self
            .pools
            .get(t.pool.0)
            .unwrap_or_else(|| panic!("tensor {t:?} refers to a pool this backend does not own"));
        assert!(p.map.is_some(), "tensor {t:?} refers to pool '{}', which was freed", p.label);
        // The CPU reference computes on f32 activations only (its arenas are never bf16).
        assert!(t.dtype == crate::tensor::DType::F32, "tensor {t:?}: the CPU backend stores f32 tensors only");
        assert!(t.end() <= p.len, "tensor {t:?} runs past the end of pool '{}' ({} elements)", p.label, p.len);
        p
    }

    fn view(&self, t: &Tensor) -> &[f32] {
        let p = self.pool(t);
        // SAFETY: in bounds (checked in `pool`); no mutable view of these elements exists while an
        // operation runs because `views` checks that outputs and inputs are disjoint.
        unsafe { std::slice::from_raw_parts(p.ptr.add(t.offset), t.numel()) }
    }

    #[allow(clippy::mut_from_ref)]
    fn view_mut(&self, t: &Tensor) -> &mut [f32] {
        let p = self.pool(t);
        p.writes.bump();
        // SAFETY: as in `view`; callers obtain it only through `views`, which rejects overlap.
        unsafe { std::slice::from_raw_parts_mut(p.ptr.add(t.offset), t.numel()) }
    }

    /// Runs `f` with a layer's weight `b` (the forward GEMM's B, k × n: a Linear's Wᵀ, a Conv2d's
    /// tap-major Wᵀ) packed: kept between calls while the weight's pool is not written (see
    /// `weights.rs`). `taps` tells a convolution's order of B's rows from a Linear's (1).
    fn with_packed_weight<R>(
        &self,
        t: &Tensor,
        b: BSource,
        (k, n, taps): (usize, usize, usize),
        f: impl FnOnce(&PackedB) -> R,
    ) -> R {
        let key = WeightKey { pool: t.pool.0, offset: t.offset, k, n, taps };
        let pool = self.pool(t);
        let (r, packed_now) = self.weights.with_packed(&pool.writes, key, b, f);
        if packed_now {
            pool.drop_file_pages(t);
        }
        r
    }

    /// A weighted layer's backward (linear, conv2d) as slices: the gradients `dinp`, `dweight`,
    /// `dbias` mutable, then `[dout, inp, weight]`. The op's `check_backward` must have run: it
    /// checks that the gradients are disjoint from each other and from the inputs.
    fn weighted_grad_views(&self, t: &WeightedBackward) -> WeightedGradViews<'_> {
        // A weight with a gradient is being trained: keep no packed copy of its pool, not even
        // between the forwards of accumulated micro-batches, which leave it unwritten.
        self.weights.mark_trained(&self.pool(t.weight).writes, t.weight.pool.0);
        let ins = [t.dout, t.inp, t.weight].map(|x| self.view(x));
        (t.dinp.map(|d| self.view_mut(d)), self.view_mut(t.dweight), t.dbias.map(|d| self.view_mut(d)), ins)
    }

    /// Mutable views of `outs` and shared views of `ins`, after checking that no output overlaps
    /// another output or any input (an overlap is a bug in the caller, hence a panic).
    fn views<const O: usize, const I: usize>(
        &self,
        outs: [&Tensor; O],
        ins: [&Tensor; I],
    ) -> ([&mut [f32]; O], [&[f32]; I]) {
        for (i, o) in outs.iter().enumerate() {
            for o2 in &outs[i + 1..] {
                assert!(!o.overlaps(o2), "output tensors overlap: {o:?} and {o2:?}");
            }
            for x in &ins {
                assert!(!o.overlaps(x), "output {o:?} overlaps input {x:?}");
            }
        }
        (outs.map(|t| self.view_mut(t)), ins.map(|t| self.view(t)))
    }
}

/// (dinp, dweight, dbias, [dout, inp, weight]) of a weighted layer's backward, as slices.
type WeightedGradViews<'a> = (Option<&'a mut [f32]>, &'a mut [f32], Option<&'a mut [f32]>, [&'a [f32]; 3]);

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn alloc(&mut self, len: usize, label: &str) -> Result<PoolId> {
        let bytes = len.checked_mul(4).filter(|&b| b < isize::MAX as usize);
        let bytes =
            bytes.ok_or_else(|| anyhow::anyhow!("cannot allocate pool '{label}': {len} elements is too many"))?;
        let mut map = memmap2::MmapMut::map_anon(bytes.max(1))
            .map_err(|e| anyhow::anyhow!("cannot allocate pool '{label}': {} MiB of host memory ({e})", bytes >> 20))?;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage); // a hint; without it the pool still works
        let ptr = map.as_mut_ptr() as *mut f32;
        Ok(self.add_pool(map, ptr, len, label, false))
    }

    fn map_file_pool(
        &mut self,
        path: &std::path::Path,
        offset: usize,
        len: usize,
        label: &str,
    ) -> Result<Option<PoolId>> {
        if std::env::var("ROENTGEN_CPU_MAP_WEIGHTS").is_ok_and(|v| v == "off") {
            return Ok(None);
        }
        let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: cannot open ({e})", path.display()))?;
        // SAFETY: a private (copy-on-write) mapping: our writes never reach the file. Another
        // process changing the file under us changes the numbers read, as with any mapped file.
        let mut map = unsafe { memmap2::MmapOptions::new().map_copy(&file) }
            .map_err(|e| anyhow::anyhow!("{}: cannot map ({e})", path.display()))?;
        ensure!(
            offset % 4 == 0 && offset + len * 4 <= map.len(),
            "{}: {len} f32 values from byte {offset} do not fit in its {} bytes",
            path.display(),
            map.len()
        );
        // Read ahead in the background (a hint).
        #[cfg(unix)]
        let _ = map.advise(memmap2::Advice::WillNeed);
        // SAFETY: in bounds (checked above); the mapping is page-aligned and offset a multiple of 4.
        let ptr = unsafe { map.as_mut_ptr().add(offset) } as *mut f32;
        Ok(Some(self.add_pool(map, ptr, len, label, true)))
    }

    fn free(&mut self, pool: PoolId) -> Result<()> {
        let p = self.pools.get_mut(pool.0).ok_or_else(|| anyhow::anyhow!("free: no pool {}", pool.0))?;
        ensure!(p.map.is_some(), "free: pool '{}' was already freed", p.label);
        p.map = None;
        p.ptr = std::ptr::null_mut();
        self.weights.forget_pool(pool.0);
        Ok(())
    }

    fn pool_sizes(&self) -> Vec<(String, usize)> {
        self.pools.iter().filter(|p| p.map.is_some()).map(|p| (p.label.clone(), p.len * 4)).collect()
    }

    fn mark_frozen(&self, pool: PoolId) {
        if let Some(p) = self.pools.get(pool.0) {
            p.writes.frozen.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn upload(&self, dst: &Tensor, src: &[f32]) -> Result<()> {
        ensure!(src.len() == dst.numel(), "upload of {} elements into a tensor of {}", src.len(), dst.numel());
        let ([d], []) = self.views([dst], []);
        d.copy_from_slice(src);
        Ok(())
    }

    fn download(&self, src: &Tensor) -> Result<Vec<f32>> {
        Ok(self.view(src).to_vec())
    }
}

impl LinearOps for CpuBackend {
    fn linear_forward(&self, p: &LinearParams, t: &LinearForward) -> Result<()> {
        p.check_forward(t)?;
        let ([out], [x, w]) = self.views([t.out], [t.inp, t.weight]);
        let (k, n) = (p.in_features, p.out_features);
        let wt = Mat { data: w, row_stride: 1, col_stride: k };
        self.with_packed_weight(t.weight, wt.into(), (k, n, 1), |w| {
            p.cpu_forward(out, x, w, t.bias.map(|b| self.view(b)), t.residual.map(|r| self.view(r)))
        });
        Ok(())
    }

    fn linear_backward(&self, p: &LinearParams, t: &LinearBackward) -> Result<()> {
        p.check_backward(t)?;
        let (dinp, dweight, dbias, ins) = self.weighted_grad_views(t);
        p.cpu_backward(dinp, dweight, dbias, ins);
        Ok(())
    }
}

impl ConvOps for CpuBackend {
    fn conv2d_forward(&self, p: &Conv2dParams, t: &Conv2dForward) -> Result<()> {
        p.check_forward(t)?;
        let ([out], [x, w]) = self.views([t.out], [t.inp, t.weight]);
        let (k, n, taps) = (p.patch_len(), p.c_out, p.kernel * p.kernel);
        self.with_packed_weight(t.weight, p.weight_as_b(w), (k, n, taps), |w| {
            p.cpu_forward(out, x, w, t.bias.map(|b| self.view(b)))
        });
        if t.batch_bias.is_some() || t.residual.is_some() {
            let ([out], _) = self.views::<1, 0>([t.out], []);
            p.cpu_epilogue(out, t.batch_bias.map(|b| self.view(b)), t.residual.map(|r| self.view(r)));
        }
        Ok(())
    }

    fn conv2d_backward(&self, p: &Conv2dParams, t: &Conv2dBackward) -> Result<()> {
        p.check_backward(t)?;
        let (dinp, dweight, dbias, ins) = self.weighted_grad_views(t);
        p.cpu_backward(dinp, dweight, dbias, ins);
        Ok(())
    }

    fn im2col_forward(&self, p: &Im2colParams, out: &Tensor, inp: &Tensor) -> Result<()> {
        p.check_forward(out, inp)?;
        let ([out], [inp]) = self.views([out], [inp]);
        p.cpu_forward(out, inp);
        Ok(())
    }
}

impl NormOps for CpuBackend {
    fn layer_norm_forward(&self, p: &LayerNormParams, t: &NormForward) -> Result<()> {
        p.check_forward(t)?;
        let (outs, ins) = self.views([t.out, t.mean, t.rstd], [t.inp, t.weight, t.bias]);
        p.cpu_forward(outs, ins);
        Ok(())
    }

    fn group_norm_forward(&self, p: &GroupNormParams, t: &NormForward) -> Result<()> {
        p.check_forward(t)?;
        let (outs, ins) = self.views([t.out, t.mean, t.rstd], [t.inp, t.weight, t.bias]);
        p.cpu_forward(outs, ins);
        Ok(())
    }

    fn layer_norm_backward(&self, p: &LayerNormParams, t: &LayerNormBackward) -> Result<()> {
        p.check_backward(t)?;
        let (outs, ins) = self.views([t.dinp, t.dweight, t.dbias], [t.dout, t.inp, t.weight, t.mean, t.rstd]);
        p.cpu_backward(outs, ins);
        Ok(())
    }

    fn group_norm_backward(&self, p: &GroupNormParams, t: &GroupNormBackward) -> Result<()> {
        p.check_backward(t)?;
        let (outs, ins) = self.views([t.dinp, t.dweight, t.dbias], [t.dout, t.inp, t.weight, t.bias, t.mean, t.rstd]);
        p.cpu_backward(outs, ins);
        Ok(())
    }

    fn batch_norm_forward(&self, p: &BatchNormParams, t: &BatchNormForward) -> Result<()> {
        p.check_forward(t)?;
        let ([out], ins) = self.views([t.out], [t.inp, t.scale, t.shift]);
        p.cpu_forward(out, ins);
        Ok(())
    }

    fn batch_norm_stats(&self, p: &BatchNormTrainParams, t: &BatchNormStats) -> Result<()> {
        p.check_stats(t)?;
        let outs = [t.running_mean, t.running_var, t.mean, t.rstd, t.scale, t.shift];
        let (outs, ins) = self.views(outs, [t.inp, t.weight, t.bias]);
        p.cpu_stats(outs, ins);
        Ok(())
    }

    fn batch_norm_backward(&self, p: &BatchNormTrainParams, t: &BatchNormBackward) -> Result<()> {
        p.check_backward(t)?;
        let (outs, ins) = self.views([t.dinp, t.dweight, t.dbias], [t.dout, t.inp, t.out, t.mean, t.rstd, t.weight]);
        p.cpu_backward(outs, ins);
        Ok(())
    }
}

impl PoolOps for CpuBackend {
    fn pool2d_forward(&self, p: &Pool2dParams, out: &Tensor, inp: &Tensor) -> Result<()> {
        p.check_forward(out, inp)?;
        let ([out], [inp]) = self.views([out], [inp]);
        p.cpu_forward(out, inp);
        Ok(())
    }

    fn pool2d_backward(&self, p: &Pool2dParams, dinp: &Tensor, dout: &Tensor, inp: &Tensor) -> Result<()> {
        p.check_backward(dinp, dout, inp)?;
        let ([dinp], [dout, inp]) = self.views([dinp], [dout, inp]);
        p.cpu_backward(dinp, dout, inp);
        Ok(())
    }
}

impl AttentionOps for CpuBackend {
    fn attention_forward(&self, p: &AttentionParams, t: &AttentionForward) -> Result<()> {
        p.check_forward(t)?;
        let (outs, ins) = self.views([t.out, t.lse], [t.q, t.k, t.v]);
        p.cpu_forward(outs, ins, t.key_mask);
        Ok(())
    }

    fn attention_backward(&self, p: &AttentionParams, t: &AttentionBackward) -> Result<()> {
        p.check_backward(t)?;
        let f = &t.forward;
        let (outs, ins) = self.views([t.dq, t.dk, t.dv], [t.dout, f.q, f.k, f.v, f.out, f.lse]);
        p.cpu_backward(outs, ins, f.key_mask);
        Ok(())
    }
}

impl ElementwiseOps for CpuBackend {
    fn embedding_forward(&self, p: &EmbeddingParams, t: &EmbeddingForward) -> Result<()> {
        p.check_forward(t)?;
        let ([o], tables) = self.views([t.out], [t.wte, t.wpe]);
        p.cpu_forward(o, t.ids, tables);
        Ok(())
    }

    fn activation_forward(&self, out: &Tensor, inp: &Tensor, act: Activation, n: usize) -> Result<()> {
        let p = Pointwise { n };
        p.check_activation_forward(out, inp)?;
        let ([o], [x]) = self.views([out], [inp]);
        p.cpu_activation_forward(o, x, act);
        Ok(())
    }

    fn add_forward(&self, out: &Tensor, a: &Tensor, b: &Tensor, n: usize) -> Result<()> {
        let p = Pointwise { n };
        p.check_add(out, a, b)?;
        let ([o], [a, b]) = self.views([out], [a, b]);
        p.cpu_add(o, a, b);
        Ok(())
    }

    fn upsample_nearest_forward(&self, p: &UpsampleParams, out: &Tensor, inp: &Tensor) -> Result<()> {
        p.check_forward(out, inp)?;
        let ([o], [x]) = self.views([out], [inp]);
        p.cpu_forward(o, x);
        Ok(())
    }

    fn add_bias_rows_forward(&self, p: &BiasRowsParams, out: &Tensor, inp: &Tensor, bias: &Tensor) -> Result<()> {
        p.check_forward(out, inp, bias)?;
        let ([o], ins) = self.views([out], [inp, bias]);
        p.cpu_forward(o, ins);
        Ok(())
    }

    fn concat_channels_forward(&self, p: &ConcatParams, out: &Tensor, a: &Tensor, b: &Tensor) -> Result<()> {
        p.check_forward(out, a, b)?;
        let ([o], ins) = self.views([out], [a, b]);
        p.cpu_forward(o, ins);
        Ok(())
    }

    fn timestep_embedding(&self, p: &TimestepEmbeddingParams, out: &Tensor, timesteps: &Tensor) -> Result<()> {
        p.check(out, timesteps)?;
        let ([o], [t]) = self.views([out], [timesteps]);
        p.cpu_forward(o, t);
        Ok(())
    }

    fn geglu_forward(&self, p: &GegluParams, out: &Tensor, inp: &Tensor) -> Result<()> {
        p.check_forward(out, inp)?;
        let ([o], [x]) = self.views([out], [inp]);
        p.cpu_forward(o, x);
        Ok(())
    }

    fn zero(&self, t: &Tensor) -> Result<()> {
        let ([o], []) = self.views([t], []);
        o.par_iter_mut().for_each(|x| *x = 0.0);
        Ok(())
    }

    fn accumulate(&self, dst: &Tensor, src: &Tensor, n: usize) -> Result<()> {
        let p = Pointwise { n };
        p.check_accumulate(dst, src)?;
        let ([d], [x]) = self.views([dst], [src]);
        p.cpu_accumulate(d, x);
        Ok(())
    }

    fn scale(&self, t: &Tensor, s: f32, n: usize) -> Result<()> {
        let p = Pointwise { n };
        p.check_scale(t)?;
        let ([o], []) = self.views([t], []);
        p.cpu_scale(o, s);
        Ok(())
    }

    fn lerp(&self, dst: &Tensor, src: &Tensor, n: usize, w: f32) -> Result<()> {
        let p = Pointwise { n };
        p.check_lerp(dst, src)?;
        let ([d], [x]) = self.views([dst], [src]);
        p.cpu_lerp(d, x, w);
        Ok(())
    }

    fn activation_backward(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor, act: Activation, n: usize) -> Result<()> {
        let p = Pointwise { n };
        p.check_activation_backward(dinp, dout, inp)?;
        let ([di], [dy, x]) = self.views([dinp], [dout, inp]);
        p.cpu_activation_backward(di, dy, x, act);
        Ok(())
    }

    fn upsample_nearest_backward(&self, p: &UpsampleParams, dinp: &Tensor, dout: &Tensor) -> Result<()> {
        p.check_backward(dinp, dout)?;
        let ([di], [dy]) = self.views([dinp], [dout]);
        p.cpu_backward(di, dy);
        Ok(())
    }

    fn add_bias_rows_backward(&self, p: &BiasRowsParams, dbias: &Tensor, dout: &Tensor) -> Result<()> {
        p.check_backward(dbias, dout)?;
        let ([db], [dy]) = self.views([dbias], [dout]);
        p.cpu_backward(db, dy);
        Ok(())
    }

    fn concat_channels_backward(&self, p: &ConcatParams, da: &Tensor, db: &Tensor, dout: &Tensor) -> Result<()> {
        p.check_backward(da, db, dout)?;
        let (grads, [dy]) = self.views([da, db], [dout]);
        p.cpu_backward(grads, dy);
        Ok(())
    }

    fn geglu_backward(&self, p: &GegluParams, dinp: &Tensor, dout: &Tensor, inp: &Tensor) -> Result<()> {
        p.check_backward(dinp, dout, inp)?;
        let ([di], ins) = self.views([dinp], [dout, inp]);
        p.cpu_backward(di, ins);
        Ok(())
    }

    fn embedding_backward(&self, p: &EmbeddingParams, t: &EmbeddingBackward) -> Result<()> {
        p.check_backward(t)?;
        let (grads, [dy]) = self.views([t.dwte, t.dwpe], [t.dout]);
        p.cpu_backward(grads, dy, t.ids);
        Ok(())
    }
}

impl OptimOps for CpuBackend {
    fn mse_loss(&self, dpred: &Tensor, loss: &Tensor, pred: &Tensor, target: &Tensor, n: usize) -> Result<()> {
        let r = Reduction { n };
        r.check_mse(dpred, loss, pred, target)?;
        let ([d, l], [p, t]) = self.views([dpred, loss], [pred, target]);
        l[0] = r.cpu_mse(d, p, t);
        Ok(())
    }

    fn sum_squares(&self, out: &Tensor, x: &Tensor, n: usize) -> Result<()> {
        let r = Reduction { n };
        r.check_sum_squares(out, x)?;
        let ([o], [x]) = self.views([out], [x]);
        o[0] = r.cpu_sum_squares(x);
        Ok(())
    }

    fn adamw_step(&self, p: &AdamWParams, param: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor) -> Result<()> {
        p.check(param, grad, m, v)?;
        let (state, [g]) = self.views([param, m, v], [grad]);
        p.cpu_step(state, g);
        Ok(())
    }
}

impl RandomOps for CpuBackend {
    fn randn(&self, out: &Tensor, n: usize, seed: u64, stream: u64) -> Result<()> {
        let p = RandnParams { n, seed, stream };
        p.check(out)?;
        let ([o], []) = self.views([out], []);
        p.cpu_fill(o);
        Ok(())
    }

    fn ddpm_add_noise(&self, p: &AddNoiseParams, x: &Tensor, noise: &Tensor) -> Result<()> {
        p.check(x, noise)?;
        let (both, []) = self.views([x, noise], []);
        p.cpu_apply(both);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::splitmix::SplitMix64;
    use crate::tensor::Layout;

    fn randn(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.next_normal()).collect()
    }

    /// A file mapped as a pool reads the file's values from the offset on; writing to the pool
    /// changes the pool and never the file.
    #[test]
    fn a_mapped_file_pool_reads_the_file_and_writes_copies() {
        let mut rng = SplitMix64::new(5);
        let values = randn(&mut rng, 1000);
        let mut bytes = vec![7u8; 12]; // a header of 12 bytes before the values
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        std::fs::write(&path, &bytes).unwrap();
        let mut b = CpuBackend::new();
        let pool = b.map_file_pool(&path, 12, 1000, "mapped").unwrap().expect("the CPU backend maps files");
        let whole = Tensor::new(pool, 0, [1000].into());
        assert_eq!(b.download(&whole).unwrap(), values);
        let part = Tensor::new(pool, 100, [50].into());
        b.upload(&part, &vec![1.5; 50]).unwrap();
        let got = b.download(&whole).unwrap();
        assert!(got[100..150].iter().all(|&v| v == 1.5) && got[..100] == values[..100] && got[150..] == values[150..]);
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "the write reached the file");
        assert!(b.map_file_pool(&path, 12, 1001, "too long").is_err());
        b.free(pool).unwrap();
    }

    /// A Linear weight in a mapped file pool, frozen: once kept packed its pages may be dropped
    /// (`drop_file_pages`), and reading it again gives the file's values; in a pool written before
    /// (a copy-on-write page holds the write), nothing is dropped and the written values stay.
    #[test]
    fn dropping_a_packed_file_weight_loses_nothing() {
        use crate::ops::linear::{LinearForward, LinearParams};
        let (rows, i, o) = (8, 64, 64); // a 16 KiB weight: whole pages inside it
        let mut rng = SplitMix64::new(9);
        let (w, x) = (randn(&mut rng, o * i), randn(&mut rng, rows * i));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.bin");
        std::fs::write(&path, w.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        for written in [false, true] {
            let mut b = CpuBackend::new();
            let pool = b.map_file_pool(&path, 0, o * i, "mapped").unwrap().unwrap();
            let tw = Tensor::new(pool, 0, [o, i].into());
            let mut want_w = w.clone();
            if written {
                want_w[1000..3000].iter_mut().for_each(|v| *v = 0.25);
                b.upload(&tw, &want_w).unwrap();
            }
            b.mark_frozen(pool);
            let (acts, _) =
                crate::models::allocate(&mut b, "acts", |l| (l.tensor("x", [rows, i]), l.tensor("out", [rows, o])))
                    .unwrap();
            let (tx, tout) = acts;
            b.upload(&tx, &x).unwrap();
            let p = LinearParams { rows, in_features: i, out_features: o };
            for _ in 0..2 {
                b.linear_forward(&p, &LinearForward { out: &tout, inp: &tx, weight: &tw, bias: None, residual: None })
                    .unwrap();
            }
            assert_eq!(b.download(&tw).unwrap(), want_w, "written {written}: the weight's values changed");
            let got = b.download(&tout).unwrap();
            for r in 0..rows {
                for j in 0..o {
                    let want: f64 = (0..i).map(|k| x[r * i + k] as f64 * want_w[j * i + k] as f64).sum();
                    assert!((got[r * o + j] as f64 - want).abs() < 1e-3, "written {written}: out[{r}][{j}]");
                }
            }
        }
    }

    /// Non-causal cross-attention (q_len ≠ kv_len, as the U-Net's text attention) against the
    /// softmax(QKᵀ·scale)V formula evaluated in f64, including the saved log-sum-exp.
    #[test]
    fn attention_matches_f64_formula_cross_and_causal() {
        for &(batch, q_len, kv_len, heads, hd, causal) in &[
            (2usize, 5usize, 7usize, 3usize, 8usize, false),
            (1, 6, 6, 2, 40, true),
            (2, 150, 77, 2, 8, false),
            (1, 130, 130, 1, 8, true),
        ] {
            let w = heads * hd;
            let mut rng = SplitMix64::new(3);
            let (q, k, v) = (
                randn(&mut rng, batch * q_len * w),
                randn(&mut rng, batch * kv_len * w),
                randn(&mut rng, batch * kv_len * w),
            );
            let mut b = CpuBackend::new();
            let build = |l: &mut Layout| {
                (
                    l.tensor("q", [batch * q_len * w]),
                    l.tensor("k", [batch * kv_len * w]),
                    l.tensor("v", [batch * kv_len * w]),
                    l.tensor("o", [batch * q_len * w]),
                    l.tensor("lse", [batch * q_len * heads]),
                )
            };
            let ((tq, tk, tv, to, tl), _) = crate::models::allocate(&mut b, "t", build).unwrap();
            b.upload(&tq, &q).unwrap();
            b.upload(&tk, &k).unwrap();
            b.upload(&tv, &v).unwrap();
            let scale = 1.0 / (hd as f32).sqrt();
            let p = AttentionParams { batch, q_len, kv_len, heads, head_dim: hd, scale, causal };
            b.attention_forward(&p, &AttentionForward { out: &to, lse: &tl, q: &tq, k: &tk, v: &tv, key_mask: None })
                .unwrap();
            let (o, lse) = (b.download(&to).unwrap(), b.download(&tl).unwrap());
            let mut max_err = 0f64;
            for bi in 0..batch {
                for i in 0..q_len {
                    for h in 0..heads {
                        let keys = if causal { i + 1 } else { kv_len };
                        let s: Vec<f64> = (0..keys)
                            .map(|j| {
                                (0..hd)
                                    .map(|d| {
                                        q[(bi * q_len + i) * w + h * hd + d] as f64
                                            * k[(bi * kv_len + j) * w + h * hd + d] as f64
                                    })
                                    .sum::<f64>()
                                    * scale as f64
                            })
                            .collect();
                        let z: f64 = s.iter().map(|x| x.exp()).sum();
                        max_err = max_err.max((lse[(bi * q_len + i) * heads + h] as f64 - z.ln()).abs());
                        for d in 0..hd {
                            let want: f64 =
                                (0..keys).map(|j| s[j].exp() / z * v[(bi * kv_len + j) * w + h * hd + d] as f64).sum();
                            max_err = max_err.max((o[(bi * q_len + i) * w + h * hd + d] as f64 - want).abs());
                        }
                    }
                }
            }
            assert!(max_err < 1e-5, "attention (causal {causal}): max error {max_err:e}");
        }
    }

    /// No keys: every output is 0 and every log-sum-exp −inf (the outputs held NaN before the call;
    /// the old code wrote 0·(1/0) = NaN).
    #[test]
    fn attention_over_no_keys_is_zero_with_minus_infinite_lse() {
        let mut b = CpuBackend::new();
        let (batch, q_len, heads, hd) = (2, 3, 2, 4);
        let (n, rows) = (batch * q_len * heads * hd, batch * q_len * heads);
        let pool = b.alloc(2 * n + rows + 1, "t").unwrap();
        let t = |offset, len| Tensor::new(pool, offset, crate::tensor::Shape::new(&[len]));
        let (out, lse, q, kv) = (t(0, n), t(n, rows), t(n + rows, n), t(2 * n + rows, 1));
        b.upload(&q, &randn(&mut SplitMix64::new(5), n)).unwrap();
        b.upload(&out, &vec![f32::NAN; n]).unwrap();
        let p = AttentionParams { batch, q_len, kv_len: 0, heads, head_dim: hd, scale: 0.5, causal: false };
        b.attention_forward(&p, &AttentionForward { out: &out, lse: &lse, q: &q, k: &kv, v: &kv, key_mask: None })
            .unwrap();
        assert!(b.download(&out).unwrap().iter().all(|&x| x == 0.0), "outputs over no keys must be 0");
        assert!(b.download(&lse).unwrap().iter().all(|&x| x == f32::NEG_INFINITY), "lse over no keys must be -inf");
    }

    /// A linear layer's residual summed in its forward (the transformers' fused residual
    /// connections) is the unfused layer then `add_forward`, to the bit, with and without a bias;
    /// and a residual overlapping the output is refused.
    #[test]
    fn linear_residual_equals_the_separate_add() {
        let (rows, i, o) = (37, 48, 24);
        let mut rng = SplitMix64::new(11);
        let mut b = CpuBackend::new();
        let sizes = [rows * i, o * i, o, rows * o, rows * o, rows * o, rows * o];
        let pool = b.alloc(sizes.iter().sum(), "t").unwrap();
        let mut at = 0;
        let [x, w, bias, res, fused, plain, sum] = sizes.map(|n| {
            let t = Tensor::new(pool, at, crate::tensor::Shape::new(&[n]));
            at += n;
            t
        });
        for t in [&x, &w, &bias, &res] {
            b.upload(t, &randn(&mut rng, t.numel())).unwrap();
        }
        let p = LinearParams { rows, in_features: i, out_features: o };
        for with_bias in [Some(&bias), None] {
            let t = LinearForward { out: &fused, inp: &x, weight: &w, bias: with_bias, residual: Some(&res) };
            b.linear_forward(&p, &t).unwrap();
            b.linear_forward(&p, &LinearForward { out: &plain, residual: None, ..t }).unwrap();
            b.add_forward(&sum, &plain, &res, rows * o).unwrap();
            let (got, want) = (b.download(&fused).unwrap(), b.download(&sum).unwrap());
            let differ = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
            assert_eq!(differ, 0, "bias {}: {differ} of {} outputs differ", with_bias.is_some(), got.len());
        }
        let overlapping = Tensor::new(pool, fused.offset + 1, fused.shape);
        let t = LinearForward { out: &fused, inp: &x, weight: &w, bias: None, residual: Some(&overlapping) };
        assert!(b.linear_forward(&p, &t).is_err(), "a residual overlapping the output must be refused");
    }

    #[test]
    fn overlapping_output_and_input_is_refused() {
        let mut b = CpuBackend::new();
        let pool = b.alloc(64, "t").unwrap();
        let t = |o, n| Tensor::new(pool, o, crate::tensor::Shape::new(&[n]));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            b.add_forward(&t(0, 32), &t(16, 32), &t(32, 32), 32).unwrap();
        }));
        assert!(r.is_err(), "an output overlapping an input must be refused");
    }
}

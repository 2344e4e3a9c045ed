//! bf16 copies of parameter pools (`Backend::mark_params`), in bf16 precision only: the f32 pool
//! stays the master copy (what AdamW updates, what checkpoints save); the copy, element for element
//! beside it, is what the tensor-core convolutions read, so their weights cross memory in half the
//! bytes and are rounded once instead of at every tile load.
//!
//! A copy is allocated when the pool is declared (model load: never inside a denoising loop or a
//! training step; text encoders, which have no convolution, declare none), refreshed lazily (one
//! `ew_to_bf16` pass over the pool before the next read) after an upload, zero, accumulate, scale
//! or lerp into the pool, and written by
//! `opt_adamw` in the same pass as the f32 weights. Captured CUDA graphs read copies as they were:
//! writing a parameter pool that has a copy drops every graph (the next calls run directly and
//! capture again), and a capture that fails restores the copies' state (graph.rs).
//!
//! Convolution weights permuted once (issue 18): the implicit GEMMs read a conv weight in a
//! permuted layout (conv.rs), which used to be written into the workspace from the copy before
//! every call: for SD's U-Net ≈0.7 GB of bf16 reads and writes per evaluation, ≈0.3 ms of an
//! H100's bandwidth per denoising step (estimate). The copy of a pool declared frozen
//! (`Backend::mark_frozen`: sampling, evaluation, inference benchmarks) now keeps each
//! permutation it served, made again only when the copy's values have changed since (its
//! generation: an upload into the pool). Other pools keep none: a model being trained changes
//! every step, so the saving would be nil and the memory (a second bf16 copy of the conv weights)
//! would come on top of the training peak; an AdamW step on a frozen pool unfreezes it, frees its
//! permutations and drops the graphs, which may read them. Permutations are made outside graph
//! capture only (a capture may not allocate); a capture that finds none runs the per-call permute,
//! which the graph then replays.

use super::launch::*;
use super::CudaBackend;
use crate::tensor::{PoolId, Tensor};
use anyhow::Result;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

pub(crate) struct ParamCopy {
    /// The copy's device address.
    pub(crate) ptr: Cell<u64>,
    /// Elements (as the f32 pool).
    pub(crate) len: usize,
    /// The f32 pool was written since the copy was last made.
    stale: Cell<bool>,
    /// Counts the changes of the copy's values (refreshes, AdamW steps).
    generation: Cell<u64>,
    /// Declared frozen (`Backend::mark_frozen`), and not updated by AdamW since: permutations
    /// are kept (see the top of this file).
    frozen: Cell<bool>,
    /// The conv-weight permutations made from this copy.
    permuted: RefCell<HashMap<Layout, Permuted>>,
}

/// One permutation of a weight in a copy: the tensor's offset in its pool, its element count,
/// and conv.rs's (c_in, taps, strides [co, ci, t]).
pub(crate) type Layout = (usize, usize, usize, usize, [usize; 3]);

struct Permuted {
    ptr: u64,
    bytes: usize,
    /// The copy's generation it was made from.
    generation: u64,
}

impl ParamCopy {
    /// Frees the permutations; returns the bytes freed.
    fn free_permuted(&self, b: &CudaBackend) -> usize {
        let mut freed = 0;
        for (_, p) in self.permuted.borrow_mut().drain() {
            let _ = b.dev.free(p.ptr);
            freed += p.bytes;
        }
        freed
    }

    /// The device bytes this copy holds: the copy and its permutations.
    pub(crate) fn bytes(&self) -> (usize, usize) {
        (self.len * 2, self.permuted.borrow().values().map(|p| p.bytes).sum())
    }
}

impl CudaBackend {
    pub(crate) fn mark_params_impl(&mut self, pool: PoolId) -> Result<()> {
        if !self.use_bf16() || self.param_copies.borrow().contains_key(&pool.0) {
            return Ok(());
        }
        let (len, label) = {
            let pools = self.pools.borrow();
            let p = pools
                .get(pool.0)
                .ok_or_else(|| anyhow::anyhow!("mark_params: pool {pool:?} is not one of this backend's"))?;
            (p.len, p.label.clone())
        };
        let ptr = self.raw_alloc(len * 2, &format!("bf16 copy of '{label}'"))?;
        self.param_copies.borrow_mut().insert(
            pool.0,
            ParamCopy {
                ptr: Cell::new(ptr),
                len,
                stale: Cell::new(true),
                generation: Cell::new(0),
                frozen: Cell::new(false),
                permuted: RefCell::new(HashMap::new()),
            },
        );
        Ok(())
    }

    /// `Backend::mark_frozen`: the pool's copy (if it has one) keeps its permutations from now on.
    pub(crate) fn mark_frozen_impl(&self, pool: PoolId) {
        if let Some(c) = self.param_copies.borrow().get(&pool.0) {
            c.frozen.set(true);
        }
    }

    /// Frees pool `pool`'s copy and its permutations, if it has one (the pool is being freed);
    /// returns the bytes freed.
    pub(crate) fn free_param_copy(&self, pool: PoolId) -> Result<usize> {
        let Some(copy) = self.param_copies.borrow_mut().remove(&pool.0) else { return Ok(0) };
        let freed = copy.free_permuted(self) + copy.len * 2;
        super::driver(self.dev.free(copy.ptr.get()), "free")?;
        Ok(freed)
    }

    /// Frees every copy and permutation (the backend is dropped).
    pub(crate) fn free_param_copies(&self) {
        for c in self.param_copies.borrow().values() {
            c.free_permuted(self);
            let _ = self.dev.free(c.ptr.get());
        }
    }

    /// The permutation `layout` of weight `t` (in a parameter pool with a copy, which `param_bf16`
    /// has just made current), kept from an earlier call when the copy has not changed since,
    /// else made now by `permute(destination)`. None where none is kept: no copy, a pool not
    /// frozen, or a miss during graph capture (which may not allocate).
    pub(crate) fn permuted_param(
        &self,
        t: &Tensor,
        layout: Layout,
        bytes: usize,
        permute: impl FnOnce(u64) -> Result<()>,
    ) -> Result<Option<u64>> {
        let copies = self.param_copies.borrow();
        let Some(copy) = copies.get(&t.pool.0) else { return Ok(None) };
        if !copy.frozen.get() {
            return Ok(None);
        }
        let generation = copy.generation.get();
        let existing = copy.permuted.borrow().get(&layout).map(|p| (p.ptr, p.generation));
        match existing {
            Some((ptr, made)) if made == generation => Ok(Some(ptr)),
            _ if self.capturing.get() => Ok(None),
            Some((ptr, _)) => {
                permute(ptr)?;
                copy.permuted.borrow_mut().get_mut(&layout).expect("present").generation = generation;
                Ok(Some(ptr))
            }
            None => {
                let ptr = self.raw_alloc(bytes, "a permuted conv weight")?;
                permute(ptr)?;
                copy.permuted.borrow_mut().insert(layout, Permuted { ptr, bytes: bytes.max(4), generation });
                Ok(Some(ptr))
            }
        }
    }

    /// Called by every operation that writes `t` outside AdamW: a parameter pool's copy is then
    /// stale, and graphs that read it are dropped.
    pub(crate) fn params_written(&self, t: &Tensor) {
        let had_copy = match self.param_copies.borrow().get(&t.pool.0) {
            Some(c) => {
                c.stale.set(true);
                true
            }
            None => false,
        };
        if had_copy && !self.capturing.get() {
            self.clear_graphs_impl();
        }
    }

    /// The address of `t`'s bf16 copy when `t` lies in a parameter pool (refreshing it first if
    /// the pool was written since), else None.
    pub(crate) fn param_bf16(&self, t: &Tensor) -> Result<Option<u64>> {
        let (ptr, len) = match self.param_copies.borrow().get(&t.pool.0) {
            Some(c) => (c.ptr.get(), c.len),
            None => return Ok(None),
        };
        let base = self.dptr(&Tensor::new(t.pool, 0, [len].into()));
        if self.param_copies.borrow().get(&t.pool.0).is_some_and(|c| c.stale.get()) {
            let n = super::to_i32("bf16 copy of a parameter pool", len)?;
            self.launch(
                EwToBf16 { out: ptr, r#in: base, n },
                (len.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
                (256, 1, 1),
                0,
            )?;
            if let Some(c) = self.param_copies.borrow().get(&t.pool.0) {
                c.stale.set(false);
                c.generation.set(c.generation.get() + 1);
            }
        }
        Ok(Some(ptr + 2 * t.offset as u64))
    }

    /// For `opt_adamw`: the address of the copy of `param`'s n elements (0: no copy). A step over
    /// the whole pool leaves the copy fresh; a partial one leaves its state as it was. An update
    /// of a frozen pool unfreezes it, frees its permutations (none is kept from then on) and drops
    /// the graphs, which may read them.
    pub(crate) fn param_copy_for_update(&self, param: &Tensor, n: usize) -> Result<u64> {
        let copies = self.param_copies.borrow();
        let Some(c) = copies.get(&param.pool.0) else { return Ok(0) };
        if param.offset == 0 && n == c.len {
            c.stale.set(false);
        }
        c.generation.set(c.generation.get() + 1);
        if c.frozen.replace(false) && !c.permuted.borrow().is_empty() {
            anyhow::ensure!(
                !self.capturing.get(),
                "AdamW on a parameter pool with permuted conv weights while capturing a graph"
            );
            self.clear_graphs_impl();
            self.synchronize()?; // queued convolutions may still read them
            let freed = c.free_permuted(self);
            self.allocated_bytes.set(self.allocated_bytes.get().saturating_sub(freed));
        }
        Ok(c.ptr.get() + 2 * param.offset as u64)
    }

    /// The copies' staleness, saved before a capture (whose queued refreshes do not run).
    pub(crate) fn param_staleness(&self) -> Vec<(usize, bool)> {
        self.param_copies.borrow().iter().map(|(k, c)| (*k, c.stale.get())).collect()
    }

    /// Puts back what `param_staleness` saved (a failed capture ran none of its refreshes).
    pub(crate) fn restore_param_staleness(&self, saved: &[(usize, bool)]) {
        let copies = self.param_copies.borrow();
        for (k, s) in saved {
            if let Some(c) = copies.get(k) {
                c.stale.set(*s);
            }
        }
    }
}

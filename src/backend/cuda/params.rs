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

use super::launch::*;
use super::CudaBackend;
use crate::tensor::{PoolId, Tensor};
use anyhow::Result;
use std::cell::Cell;

pub(crate) struct ParamCopy {
    /// The copy's device address.
    pub(crate) ptr: Cell<u64>,
    /// Elements (as the f32 pool).
    pub(crate) len: usize,
    /// The f32 pool was written since the copy was last made.
    stale: Cell<bool>,
}

impl CudaBackend {
    pub(crate) fn mark_params_impl(&mut self, pool: PoolId) -> Result<()> {
        if !self.use_bf16() || self.param_copies.borrow().contains_key(&pool.0) {
            return Ok(());
        }
        let p = self
            .pools
            .get(pool.0)
            .ok_or_else(|| anyhow::anyhow!("mark_params: pool {pool:?} is not one of this backend's"))?;
        let (len, label) = (p.len, p.label.clone());
        let ptr = self.raw_alloc(len * 2, &format!("bf16 copy of '{label}'"))?;
        self.param_copies.borrow_mut().insert(pool.0, ParamCopy { ptr: Cell::new(ptr), len, stale: Cell::new(true) });
        Ok(())
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
        let base = self.dptr(&Tensor { pool: t.pool, offset: 0, shape: [len].into() });
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
            }
        }
        Ok(Some(ptr + 2 * t.offset as u64))
    }

    /// For `opt_adamw`: the address of the copy of `param`'s n elements (0: no copy). A step over
    /// the whole pool leaves the copy fresh; a partial one leaves its state as it was.
    pub(crate) fn param_copy_for_update(&self, param: &Tensor, n: usize) -> u64 {
        match self.param_copies.borrow().get(&param.pool.0) {
            Some(c) => {
                if param.offset == 0 && n == c.len {
                    c.stale.set(false);
                }
                c.ptr.get() + 2 * param.offset as u64
            }
            None => 0,
        }
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

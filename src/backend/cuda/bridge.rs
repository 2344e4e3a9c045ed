//! The bf16 bridge (issue 18, bf16 activations): an operation whose kernels read and write f32
//! only — the convolutions and attention, until their operand loads take bf16 themselves — runs on
//! bf16 activations through f32 scratch. Each bf16 tensor it reads is widened into a bridge pool
//! (exactly: every bf16 value is an f32 value), the f32 operation runs on those views, and each
//! bf16 tensor it writes is rounded back once (nearest even). So its results are those of the f32
//! operation on the same values, rounded as a native bf16 kernel's store would round them.
//!
//! What it costs: per element read 2 + 4 bytes more than the f32 kernel alone, per element
//! written 4 + 2, and a launch per tensor each way; it exists so that models can keep their
//! activations in bf16 (half the arena) before every kernel loads bf16, not for speed. The
//! scratch holds one call's tensors, grown on first use (outside graph capture, as every scratch).

use super::launch::*;
use super::{to_i32, CudaBackend, SLOTS};
use crate::tensor::{DType, PoolId, Tensor};
use anyhow::Result;

/// How an operation uses a tensor it is given through the bridge.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Read only: widened before.
    In,
    /// Overwritten: rounded back after (its old values are not read, so not widened).
    Out,
}

impl CudaBackend {
    /// Runs `f` on f32 views of `tensors`: f32 tensors as they are, bf16 ones through bridge
    /// pools (widened when read, rounded back when written; see the top of the file).
    pub(crate) fn bridged(&self, tensors: &[(&Tensor, Role)], f: impl FnOnce(&[Tensor]) -> Result<()>) -> Result<()> {
        let mut views = Vec::with_capacity(tensors.len());
        let mut slot = 0;
        for &(t, role) in tensors {
            if t.dtype != DType::BF16 {
                views.push(*t);
                continue;
            }
            anyhow::ensure!(slot < SLOTS, "bf16 bridge: more than {SLOTS} bf16 tensors in one call");
            let view = Tensor::new(self.bridge_pool(slot, t.numel())?, 0, t.shape);
            slot += 1;
            if role == Role::In {
                let n = to_i32("bf16 bridge", t.numel())?;
                self.convert(EwWidenBf16 { out: self.dptr(&view), r#in: self.act_ptr(t), n }, t.numel())?;
            }
            views.push(view);
        }
        f(&views)?;
        for (&(t, role), view) in tensors.iter().zip(&views) {
            if t.dtype == DType::BF16 && role == Role::Out {
                let n = to_i32("bf16 bridge", t.numel())?;
                self.convert(EwToBf16 { out: self.act_ptr(t), r#in: self.dptr(view), n }, t.numel())?;
            }
        }
        Ok(())
    }

    /// One conversion pass over `n` elements.
    fn convert(&self, k: impl Kernel, n: usize) -> Result<()> {
        self.launch(k, (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1), (256, 1, 1), 0)
    }

    /// Bridge pool `slot`: its scratch grown to at least `len` f32 elements, the pool pointed at it.
    fn bridge_pool(&self, slot: usize, len: usize) -> Result<PoolId> {
        let ptr = self.scratch(&self.bridge_scratch, slot, len * 4, "bf16 bridge scratch")?;
        let len = self.bridge_scratch.borrow()[slot].bytes / 4;
        let mut ids = self.bridge_pools.borrow_mut();
        let mut pools = self.pools.borrow_mut();
        let id = *ids[slot].get_or_insert_with(|| {
            pools.push(super::DevPool { ptr, len, label: format!("bf16 bridge {slot}") });
            PoolId(pools.len() - 1)
        });
        pools[id.0].ptr = ptr;
        pools[id.0].len = len;
        Ok(id)
    }
}

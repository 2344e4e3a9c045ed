//! Weights kept packed between calls. The forward GEMM of every Linear and Conv2d layer reads its
//! weight as B, packed into the micro-kernel's panels; packing reads the weight and writes a copy
//! (for SD v1.4's U-Net 3.3 GB each way per call, a fifth of a 256² step on a 2-core machine), so
//! weights that do not change between calls — sampling, evaluation — are packed once and kept.
//!
//! Validity: every mutable view of a pool advances the pool's write count (`PoolWrites`), and a
//! packed copy is used only while the count is the one it was packed at. A weight is kept packed
//! on its second use at the same count (on its first in a pool declared frozen by
//! `Backend::mark_frozen`, as the sampler does: one packing pass saved, 3.3 GB for the U-Net); a pool whose weights get a gradient (a backward through
//! the layer), or are found written between two uses, is marked trained, its copies dropped, and
//! nothing of it is kept again: in training, memory stays at one copy of the weights.
//! A copy costs the weight's size again (3.3 GB for SD v1.4's U-Net at f32); set
//! `ROENTGEN_CPU_WEIGHT_CACHE=off` to pack per call instead.

use super::gemm::{self, BSource, PackedB};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// A pool's write count, and whether it was seen written between two uses of one weight.
#[derive(Default)]
pub(super) struct PoolWrites {
    count: AtomicU64,
    trained: AtomicBool,
    /// Declared unchanging (`Backend::mark_frozen`): keep from the first use.
    pub(super) frozen: AtomicBool,
}

impl PoolWrites {
    /// Called for every mutable view of the pool (before the write it allows).
    pub(super) fn bump(&self) {
        self.count.fetch_add(1, Relaxed);
    }

    /// Whether the pool was never written (no mutable view was ever taken).
    pub(super) fn never_written(&self) -> bool {
        self.count.load(Relaxed) == 0
    }
}

/// A weight: its pool, where it starts, the product's shape (B is k × n) and the order of B's rows
/// (a convolution's `taps`; 1 for a Linear).
#[derive(Clone, Copy, Hash, PartialEq, Eq)]
pub(super) struct WeightKey {
    pub pool: usize,
    pub offset: usize,
    pub k: usize,
    pub n: usize,
    pub taps: usize,
}

enum Entry {
    /// Used once at this write count, not packed yet.
    Seen(u64),
    Packed(u64, Arc<PackedB>),
}

pub(super) struct WeightCache {
    enabled: bool,
    entries: Mutex<HashMap<WeightKey, Entry>>,
}

impl Default for WeightCache {
    fn default() -> WeightCache {
        let enabled = std::env::var("ROENTGEN_CPU_WEIGHT_CACHE").map_or(true, |v| v != "off");
        WeightCache { enabled, entries: Mutex::default() }
    }
}

impl WeightCache {
    /// Runs `f` with the weight `b` (k × n, as `key` says) packed: the kept copy when it is still
    /// valid, else packed now (and kept, on its second use at an unchanged write count).
    /// Also says whether this call made the kept copy.
    pub(super) fn with_packed<R>(
        &self,
        writes: &PoolWrites,
        key: WeightKey,
        b: BSource,
        f: impl FnOnce(&PackedB) -> R,
    ) -> (R, bool) {
        match self.kept(writes, key, b) {
            Some((packed, now)) => (f(&packed), now),
            None => (gemm::with_packed_b(key.k, key.n, b, true, f), false),
        }
    }

    /// The kept copy of the weight, packing it now if this is its second use unchanged (its first,
    /// in a frozen pool), and whether it was packed now; None when it is to be packed per call.
    fn kept(&self, writes: &PoolWrites, key: WeightKey, b: BSource) -> Option<(Arc<PackedB>, bool)> {
        if !self.enabled || writes.trained.load(Relaxed) {
            return None;
        }
        let now = writes.count.load(Relaxed);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let keep_now = match entries.get(&key) {
            Some(Entry::Packed(at, p)) if *at == now => return Some((p.clone(), false)),
            Some(Entry::Seen(at)) if *at == now => true,
            Some(_) => {
                // Written since its last use: a pool being trained. Keep nothing of it.
                writes.trained.store(true, Relaxed);
                entries.retain(|k, _| k.pool != key.pool);
                return None;
            }
            None => writes.frozen.load(Relaxed),
        };
        if !keep_now {
            entries.insert(key, Entry::Seen(now));
            return None;
        }
        let p = Arc::new(PackedB::new(key.k, key.n, b, true));
        entries.insert(key, Entry::Packed(now, p.clone()));
        Some((p, true))
    }

    /// Keeps nothing of this pool from now on (its weights get gradients: a training run).
    pub(super) fn mark_trained(&self, writes: &PoolWrites, pool: usize) {
        if !writes.trained.swap(true, Relaxed) {
            self.forget_pool(pool);
        }
    }

    /// Drops the copies of a freed pool's weights.
    pub(super) fn forget_pool(&self, pool: usize) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| k.pool != pool);
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::cpu::CpuBackend;
    use crate::backend::{Backend, LinearOps};
    use crate::ops::linear::{LinearBackward, LinearForward, LinearParams};
    use crate::rng::splitmix::SplitMix64;
    use crate::tensor::Tensor;

    /// out = x · wᵀ in f64, x (rows × i), w (o × i).
    fn reference(x: &[f32], w: &[f32], (rows, i, o): (usize, usize, usize)) -> Vec<f32> {
        let mut out = vec![0f32; rows * o];
        for r in 0..rows {
            for j in 0..o {
                out[r * o + j] = (0..i).map(|p| x[r * i + p] as f64 * w[j * i + p] as f64).sum::<f64>() as f32;
            }
        }
        out
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    }

    /// A Linear layer on a backend: its weight alone in a "params" pool, its input (uploaded) and
    /// output in an "acts" pool.
    struct Layer {
        weight: Tensor,
        inp: Tensor,
        out: Tensor,
        p: LinearParams,
    }

    impl Layer {
        fn forward(&self, b: &CpuBackend) -> Vec<f32> {
            let t = LinearForward { out: &self.out, inp: &self.inp, weight: &self.weight, bias: None, residual: None };
            b.linear_forward(&self.p, &t).unwrap();
            b.download(&self.out).unwrap()
        }
    }

    fn linear_layer(x: &[f32], (rows, i, o): (usize, usize, usize)) -> (CpuBackend, Layer) {
        let mut b = CpuBackend::new();
        let (weight, _) = crate::models::allocate(&mut b, "params", |l| l.tensor("w", [o, i])).unwrap();
        let ((inp, out), _) =
            crate::models::allocate(&mut b, "acts", |l| (l.tensor("x", [rows, i]), l.tensor("out", [rows, o])))
                .unwrap();
        b.upload(&inp, x).unwrap();
        (b, Layer { weight, inp, out, p: LinearParams { rows, in_features: i, out_features: o } })
    }

    /// The kept copy is used from the second call on, and a write to the weight's pool (an
    /// optimizer step, a reload) is seen at the next call: the result follows the new weight.
    #[test]
    fn kept_weights_follow_writes_to_their_pool() {
        let (rows, i, o) = (37, 70, 45);
        let mut rng = SplitMix64::new(11);
        let mut randn = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_normal()).collect() };
        let (x, w1, w2) = (randn(rows * i), randn(o * i), randn(o * i));
        let (b, layer) = linear_layer(&x, (rows, i, o));
        let tw = layer.weight;
        let forward = |b: &CpuBackend| layer.forward(b);
        b.upload(&tw, &w1).unwrap();
        let want1 = reference(&x, &w1, (rows, i, o));
        for call in 0..3 {
            let got = forward(&b);
            assert!(max_diff(&got, &want1) < 1e-4, "call {call} with the first weight: {}", max_diff(&got, &want1));
        }
        assert!(
            b.weights.entries.lock().unwrap().values().any(|e| matches!(e, super::Entry::Packed(..))),
            "never kept"
        );
        b.upload(&tw, &w2).unwrap();
        let got = forward(&b);
        let want2 = reference(&x, &w2, (rows, i, o));
        assert!(max_diff(&got, &want2) < 1e-4, "after the weight changed: off by {}", max_diff(&got, &want2));
        assert!(b.weights.entries.lock().unwrap().is_empty(), "a written pool's copies were kept");
    }

    /// A frozen pool's weight is kept from its first use; a write to it is still seen.
    #[test]
    fn a_frozen_pool_keeps_from_the_first_use() {
        let (rows, i, o) = (9, 33, 40);
        let mut rng = SplitMix64::new(13);
        let mut randn = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_normal()).collect() };
        let (x, w1, w2) = (randn(rows * i), randn(o * i), randn(o * i));
        let (b, layer) = linear_layer(&x, (rows, i, o));
        let tw = layer.weight;
        b.upload(&tw, &w1).unwrap();
        b.mark_frozen(tw.pool);
        let forward = |b: &CpuBackend| layer.forward(b);
        let got = forward(&b);
        assert!(max_diff(&got, &reference(&x, &w1, (rows, i, o))) < 1e-4);
        assert!(
            b.weights.entries.lock().unwrap().values().any(|e| matches!(e, super::Entry::Packed(..))),
            "not kept at the first use"
        );
        b.upload(&tw, &w2).unwrap();
        let got = forward(&b);
        assert!(max_diff(&got, &reference(&x, &w2, (rows, i, o))) < 1e-4, "the write after freezing was missed");
    }

    /// A backward through the layer marks its weights trained: forwards after it (the next
    /// micro-batch of an accumulated step, the weights unwritten) keep no copy.
    #[test]
    fn a_backward_marks_the_weights_trained() {
        let (rows, i, o) = (5, 8, 6);
        let mut rng = SplitMix64::new(12);
        let mut randn = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_normal()).collect() };
        let mut b = CpuBackend::new();
        // Gradients in a pool of their own, as the trainer keeps them: the backward does not
        // write the weights' pool.
        let (tw, _) = crate::models::allocate(&mut b, "params", |l| l.tensor("w", [o, i])).unwrap();
        let (tdw, _) = crate::models::allocate(&mut b, "grads", |l| l.tensor("dw", [o, i])).unwrap();
        let ((tx, tout), _) =
            crate::models::allocate(&mut b, "acts", |l| (l.tensor("x", [rows, i]), l.tensor("out", [rows, o])))
                .unwrap();
        b.upload(&tw, &randn(o * i)).unwrap();
        b.upload(&tx, &randn(rows * i)).unwrap();
        b.upload(&tout, &randn(rows * o)).unwrap();
        let p = LinearParams { rows, in_features: i, out_features: o };
        let forward = |b: &CpuBackend| {
            b.linear_forward(&p, &LinearForward { out: &tout, inp: &tx, weight: &tw, bias: None, residual: None })
                .unwrap()
        };
        forward(&b);
        let back = LinearBackward { dinp: None, dweight: &tdw, dbias: None, dout: &tout, inp: &tx, weight: &tw };
        b.linear_backward(&p, &back).unwrap();
        for _ in 0..3 {
            forward(&b);
        }
        assert!(b.weights.entries.lock().unwrap().is_empty(), "a trained pool's weight was kept");
    }
}

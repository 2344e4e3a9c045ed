//! `roentgen bench train-step --plan-only`: the memory of one training step from the planning
//! backend (`backend::plan`). The models, their gradients, the AdamW moments and the activation
//! arenas are allocated on it exactly as `Trainer::new` allocates them on a real backend, so the
//! sizes are the real run's, keeping every activation and recomputing block internals
//! (`--gradient-checkpointing`); nothing is loaded, allocated or run, so it answers "does batch
//! 32 at 512² fit in 80 GB?" on any machine from the configs alone.

use super::bench::{train_setup, BenchOptions, TrainSetup, Weights};
use crate::backend::plan::PlanBackend;
use crate::backend::Backend;
use crate::train::{OptimOptions, PredictionType, Trainer};
use anyhow::Result;
use serde::Serialize;

/// One pool of the step in both modes.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedPool {
    pub label: String,
    pub keeping_bytes: u64,
    pub recomputing_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrainingMemoryPlan {
    pub shape: String,
    pub pools: Vec<PlannedPool>,
    /// Every pool, keeping every activation for the backward (the default).
    pub total_keeping_bytes: u64,
    /// Every pool, recomputing each U-Net block's internals (`--gradient-checkpointing`).
    pub total_recomputing_bytes: u64,
    /// What a device backend holds on top, which the plan does not see.
    pub not_counted: &'static str,
}

const NOT_COUNTED: &str = "the backend's own memory: on CUDA in bf16 a bf16 copy of the U-Net's parameters \
                           (2 bytes each), convolution and GEMM workspaces, cuBLASLt and CUDA context memory; \
                           `bench train-step` on the device reports them in peak_device_bytes";

/// The pools of a joint U-Net + text-encoder training step (`bench train-step`'s) at `o`'s model,
/// batch and image size.
pub fn plan(o: &BenchOptions) -> Result<TrainingMemoryPlan> {
    let keeping = pools(o, false)?;
    let recomputing = pools(o, true)?;
    // The same pools in the same order in both modes: only the U-Net arena's size differs.
    let pools: Vec<PlannedPool> = keeping
        .iter()
        .zip(&recomputing)
        .map(|((label, k), (_, r))| PlannedPool {
            label: label.clone(),
            keeping_bytes: *k as u64,
            recomputing_bytes: *r as u64,
        })
        .collect();
    let shape = format!("batch {} × {}×{} px, 77 caption tokens, AdamW, f32 weights", o.batch, o.height, o.width);
    Ok(TrainingMemoryPlan {
        shape,
        total_keeping_bytes: pools.iter().map(|p| p.keeping_bytes).sum(),
        total_recomputing_bytes: pools.iter().map(|p| p.recomputing_bytes).sum(),
        pools,
        not_counted: NOT_COUNTED,
    })
}

/// (label, bytes) of every pool `Trainer::new` allocates, after the models', on the planning backend.
fn pools(o: &BenchOptions, recompute: bool) -> Result<Vec<(String, usize)>> {
    let mut plan = PlanBackend::new();
    let TrainSetup { unet, text, alphas, shape } = train_setup(&mut plan, o, Weights::Unfilled)?;
    let opts = OptimOptions { gradient_checkpointing: recompute, ..OptimOptions::default() };
    Trainer::new(&mut plan, &unet, &text, opts, alphas, PredictionType::Epsilon, shape)?;
    Ok(plan.pool_sizes())
}

impl TrainingMemoryPlan {
    pub fn render(&self) -> String {
        let gib = |b: u64| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64);
        let mut s = format!(
            "training step memory, U-Net and text encoder (planning pass; nothing loaded, allocated or run): {}\n  {:<28} {:>14} {:>14}\n",
            self.shape, "pool", "keeping", "recomputing"
        );
        for p in &self.pools {
            s += &format!("  {:<28} {:>14} {:>14}\n", p.label, gib(p.keeping_bytes), gib(p.recomputing_bytes));
        }
        s += &format!(
            "  {:<28} {:>14} {:>14}\n  (recomputing: --gradient-checkpointing.) Not counted: {}.",
            "total",
            gib(self.total_keeping_bytes),
            gib(self.total_recomputing_bytes),
            self.not_counted
        );
        s
    }
}

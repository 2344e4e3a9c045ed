//! A backend that computes nothing: forward passes run on it to learn how much activation memory
//! they need (see `tensor::Arena`), with every shape check of the real run still made by the model
//! code itself.

use super::{Activation, Backend};
use crate::backend::{AttentionOps, ConvOps, ElementwiseOps, LinearOps, NormOps, OptimOps, PoolOps, RandomOps};
use crate::ops::attention::{AttentionBackward, AttentionForward, AttentionParams};
use crate::ops::conv::{Conv2dBackward, Conv2dForward, Conv2dParams, Im2colParams};
use crate::ops::elementwise::TimestepEmbeddingParams;
use crate::ops::elementwise::{BiasRowsParams, ConcatParams, GegluParams};
use crate::ops::elementwise::{EmbeddingBackward, EmbeddingForward, EmbeddingParams, UpsampleParams};
use crate::ops::linear::{LinearBackward, LinearForward, LinearGroupBackward, LinearGroupForward, LinearParams};
use crate::ops::norm::{
    BatchNormBackward, BatchNormForward, BatchNormParams, BatchNormStats, BatchNormTrainParams, GroupNormBackward,
    GroupNormParams, LayerNormBackward, LayerNormParams, NormForward,
};
use crate::ops::optim::AdamWParams;
use crate::ops::pool::Pool2dParams;
use crate::ops::random::AddNoiseParams;
use crate::tensor::{PoolId, Tensor};
use anyhow::Result;

/// Counts the floating-point work of what runs on it (2 per multiply-add of the matrix products,
/// convolutions and attention; elementwise work is not counted), so benchmarks can report achieved
/// FLOP/s from the shapes.
/// It also lists the pools allocated on it (`pool_sizes`): models, optimizer state and arenas
/// allocated on a `PlanBackend` give the memory a real run would take, without taking it.
#[derive(Default)]
pub struct PlanBackend {
    /// FLOP of convolutions, linear layers, attention.
    flops: [std::cell::Cell<u64>; 3],
    /// (label, f32 elements) of every `alloc`.
    pools: Vec<(String, usize)>,
}

impl PlanBackend {
    pub fn new() -> PlanBackend {
        PlanBackend::default()
    }

    pub fn flops(&self) -> u64 {
        self.flops.iter().map(|c| c.get()).sum()
    }

    /// (convolutions, linear layers, attention) FLOP.
    pub fn flops_by_kind(&self) -> [u64; 3] {
        [self.flops[0].get(), self.flops[1].get(), self.flops[2].get()]
    }

    fn count(&self, kind: usize, f: usize) {
        self.flops[kind].set(self.flops[kind].get() + f as u64);
    }
}

impl Backend for PlanBackend {
    fn name(&self) -> String {
        "plan".into()
    }
    fn alloc(&mut self, len: usize, label: &str) -> Result<PoolId> {
        self.pools.push((label.to_string(), len));
        Ok(PoolId::UNBOUND)
    }
    fn free(&mut self, _pool: PoolId) -> Result<()> {
        Ok(())
    }
    fn pool_sizes(&self) -> Vec<(String, usize)> {
        self.pools.iter().map(|(label, len)| (label.clone(), len * 4)).collect()
    }
    fn upload(&self, _dst: &Tensor, _src: &[f32]) -> Result<()> {
        Ok(())
    }
    fn download(&self, src: &Tensor) -> Result<Vec<f32>> {
        Ok(vec![0.0; src.numel()])
    }
}

impl LinearOps for PlanBackend {
    fn linear_forward(&self, p: &LinearParams, _: &LinearForward) -> Result<()> {
        self.count(1, p.flops());
        Ok(())
    }

    fn linear_group_forward(&self, p: &LinearParams, group: usize, _: &LinearGroupForward) -> Result<()> {
        self.count(1, p.flops() * group);
        Ok(())
    }

    fn linear_group_backward(&self, p: &LinearParams, group: usize, t: &LinearGroupBackward) -> Result<()> {
        self.count(1, p.flops() * group * (1 + t.dinp.is_some() as usize));
        Ok(())
    }

    fn linear_backward(&self, p: &LinearParams, t: &LinearBackward) -> Result<()> {
        self.count(1, p.flops() * (1 + t.dinp.is_some() as usize));
        Ok(())
    }
}

impl ConvOps for PlanBackend {
    fn conv2d_forward(&self, p: &Conv2dParams, _: &Conv2dForward) -> Result<()> {
        self.count(0, p.flops());
        Ok(())
    }

    fn conv2d_backward(&self, p: &Conv2dParams, t: &Conv2dBackward) -> Result<()> {
        // The weight gradient, and the input gradient when wanted: one forward's work each.
        self.count(0, p.flops() * (1 + t.dinp.is_some() as usize));
        Ok(())
    }

    fn im2col_forward(&self, _: &Im2colParams, _: &Tensor, _: &Tensor) -> Result<()> {
        Ok(())
    }
}

impl NormOps for PlanBackend {
    fn layer_norm_forward(&self, _: &LayerNormParams, _: &NormForward) -> Result<()> {
        Ok(())
    }

    fn group_norm_forward(&self, _: &GroupNormParams, _: &NormForward) -> Result<()> {
        Ok(())
    }

    fn layer_norm_backward(&self, _: &LayerNormParams, _: &LayerNormBackward) -> Result<()> {
        Ok(())
    }

    fn group_norm_backward(&self, _: &GroupNormParams, _: &GroupNormBackward) -> Result<()> {
        Ok(())
    }

    fn batch_norm_forward(&self, _: &BatchNormParams, _: &BatchNormForward) -> Result<()> {
        Ok(())
    }

    fn batch_norm_stats(&self, _: &BatchNormTrainParams, _: &BatchNormStats) -> Result<()> {
        Ok(())
    }

    fn batch_norm_backward(&self, _: &BatchNormTrainParams, _: &BatchNormBackward) -> Result<()> {
        Ok(())
    }
}

impl PoolOps for PlanBackend {
    fn pool2d_forward(&self, _: &Pool2dParams, _: &Tensor, _: &Tensor) -> Result<()> {
        Ok(())
    }

    fn pool2d_backward(&self, _: &Pool2dParams, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<()> {
        Ok(())
    }
}

impl AttentionOps for PlanBackend {
    fn attention_forward(&self, p: &AttentionParams, _: &AttentionForward) -> Result<()> {
        self.count(2, p.forward_flops());
        Ok(())
    }

    fn attention_backward(&self, p: &AttentionParams, _: &AttentionBackward) -> Result<()> {
        self.count(2, p.backward_flops());
        Ok(())
    }
}

impl ElementwiseOps for PlanBackend {
    fn embedding_forward(&self, _: &EmbeddingParams, _: &EmbeddingForward) -> Result<()> {
        Ok(())
    }

    fn activation_forward(&self, _: &Tensor, _: &Tensor, _: Activation, _: usize) -> Result<()> {
        Ok(())
    }

    fn add_forward(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: usize) -> Result<()> {
        Ok(())
    }

    fn upsample_nearest_forward(&self, _p: &UpsampleParams, _out: &Tensor, _inp: &Tensor) -> Result<()> {
        Ok(())
    }

    fn add_bias_rows_forward(&self, _p: &BiasRowsParams, _out: &Tensor, _inp: &Tensor, _bias: &Tensor) -> Result<()> {
        Ok(())
    }

    fn concat_channels_forward(&self, _p: &ConcatParams, _out: &Tensor, _a: &Tensor, _b: &Tensor) -> Result<()> {
        Ok(())
    }

    fn timestep_embedding(&self, _: &TimestepEmbeddingParams, _: &Tensor, _: &Tensor) -> Result<()> {
        Ok(())
    }

    fn geglu_forward(&self, _p: &GegluParams, _out: &Tensor, _inp: &Tensor) -> Result<()> {
        Ok(())
    }

    fn zero(&self, _: &Tensor) -> Result<()> {
        Ok(())
    }

    fn accumulate(&self, _: &Tensor, _: &Tensor, _: usize) -> Result<()> {
        Ok(())
    }

    fn scale(&self, _: &Tensor, _: f32, _: usize) -> Result<()> {
        Ok(())
    }

    fn lerp(&self, _: &Tensor, _: &Tensor, _: usize, _: f32) -> Result<()> {
        Ok(())
    }

    fn activation_backward(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: Activation, _: usize) -> Result<()> {
        Ok(())
    }

    fn upsample_nearest_backward(&self, _p: &UpsampleParams, _dinp: &Tensor, _dout: &Tensor) -> Result<()> {
        Ok(())
    }

    fn add_bias_rows_backward(&self, _p: &BiasRowsParams, _dbias: &Tensor, _dout: &Tensor) -> Result<()> {
        Ok(())
    }

    fn concat_channels_backward(&self, _p: &ConcatParams, _da: &Tensor, _db: &Tensor, _dout: &Tensor) -> Result<()> {
        Ok(())
    }

    fn geglu_backward(&self, _p: &GegluParams, _dinp: &Tensor, _dout: &Tensor, _inp: &Tensor) -> Result<()> {
        Ok(())
    }

    fn embedding_backward(&self, _: &EmbeddingParams, _: &EmbeddingBackward) -> Result<()> {
        Ok(())
    }
}

impl OptimOps for PlanBackend {
    fn mse_loss(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor, _: usize) -> Result<()> {
        Ok(())
    }

    fn sum_squares(&self, _: &Tensor, _: &Tensor, _: usize) -> Result<()> {
        Ok(())
    }

    fn adamw_step(&self, _: &AdamWParams, _: &Tensor, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<()> {
        Ok(())
    }
}

impl RandomOps for PlanBackend {
    fn randn(&self, _: &Tensor, _: usize, _: u64, _: u64) -> Result<()> {
        Ok(())
    }

    fn ddpm_add_noise(&self, _: &AddNoiseParams, _: &Tensor, _: &Tensor) -> Result<()> {
        Ok(())
    }
}

//! A backend that computes nothing: forward passes run on it to learn how much activation memory
//! they need (see `tensor::Arena`), with every shape check of the real run still made by the model
//! code itself.

use super::{Activation, Backend};
use crate::tensor::{PoolId, Tensor};
use anyhow::Result;

#[derive(Default)]
pub struct PlanBackend;

impl Backend for PlanBackend {
    fn name(&self) -> String {
        "plan".into()
    }
    fn alloc(&mut self, _len: usize, _label: &str) -> Result<PoolId> {
        Ok(PoolId::UNBOUND)
    }
    fn pool_sizes(&self) -> Vec<(String, usize)> {
        Vec::new()
    }
    fn upload(&self, _dst: &Tensor, _src: &[f32]) -> Result<()> {
        Ok(())
    }
    fn download(&self, src: &Tensor) -> Result<Vec<f32>> {
        Ok(vec![0.0; src.numel()])
    }
    fn embedding_forward(
        &self,
        _: &Tensor,
        _: &[u32],
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        Ok(())
    }
    fn layer_norm_forward(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: usize,
        _: f32,
    ) -> Result<()> {
        Ok(())
    }
    fn linear_forward(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        Ok(())
    }
    fn attention_forward(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: f32,
        _: bool,
    ) -> Result<()> {
        Ok(())
    }
    fn activation_forward(&self, _: &Tensor, _: &Tensor, _: Activation, _: usize) -> Result<()> {
        Ok(())
    }
    fn add_forward(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: usize) -> Result<()> {
        Ok(())
    }
    fn conv2d_forward(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: Option<&Tensor>,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: [usize; 4],
    ) -> Result<()> {
        Ok(())
    }
    fn group_norm_forward(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: f32,
        _: bool,
    ) -> Result<()> {
        Ok(())
    }
    fn upsample_nearest_forward(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<()> {
        Ok(())
    }
    fn add_bias_rows_forward(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn concat_channels_forward(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: usize, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
    fn geglu_forward(&self, _: &Tensor, _: &Tensor, _: usize, _: usize) -> Result<()> {
        Ok(())
    }
}

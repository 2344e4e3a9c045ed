//! Layers: parameter handles plus a forward that calls the backend (and, with the training issue,
//! a backward). Each layer registers its parameters under diffusers'/transformers' names, so the
//! parameter table is built from the config and matches checkpoint files without a rename table.

use crate::backend::Backend;
use crate::tensor::{Layout, Tensor};
use anyhow::Result;

/// `torch.nn.Linear`: weight (out_f, in_f), optional bias (out_f).
#[derive(Clone, Copy, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub in_f: usize,
    pub out_f: usize,
}

impl Linear {
    pub fn layout(l: &mut Layout, prefix: &str, in_f: usize, out_f: usize, bias: bool) -> Linear {
        let weight = l.tensor(format!("{prefix}.weight"), [out_f, in_f]);
        let bias = bias.then(|| l.tensor(format!("{prefix}.bias"), [out_f]));
        Linear { weight, bias, in_f, out_f }
    }

    /// out (rows, out_f) = inp (rows, in_f) · Wᵀ + b.
    pub fn forward(&self, b: &dyn Backend, out: &Tensor, inp: &Tensor, rows: usize) -> Result<()> {
        b.linear_forward(out, inp, &self.weight, self.bias.as_ref(), rows, self.in_f, self.out_f)
    }
}

/// `torch.nn.LayerNorm` over the last dimension, with affine weight and bias.
#[derive(Clone, Copy, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub dim: usize,
    pub eps: f32,
}

/// What a layer norm's forward saves for its backward.
#[derive(Clone, Copy, Debug)]
pub struct LayerNormActs {
    pub out: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
}

impl LayerNorm {
    pub fn layout(l: &mut Layout, prefix: &str, dim: usize, eps: f32) -> LayerNorm {
        let weight = l.tensor(format!("{prefix}.weight"), [dim]);
        let bias = l.tensor(format!("{prefix}.bias"), [dim]);
        LayerNorm { weight, bias, dim, eps }
    }

    pub fn acts_layout(l: &mut Layout, prefix: &str, rows: usize, dim: usize) -> LayerNormActs {
        LayerNormActs {
            out: l.tensor(format!("{prefix}.out"), [rows, dim]),
            mean: l.tensor(format!("{prefix}.mean"), [rows]),
            rstd: l.tensor(format!("{prefix}.rstd"), [rows]),
        }
    }

    pub fn forward(&self, b: &dyn Backend, acts: &LayerNormActs, inp: &Tensor, rows: usize) -> Result<()> {
        b.layer_norm_forward(&acts.out, &acts.mean, &acts.rstd, inp, &self.weight, &self.bias, rows, self.dim, self.eps)
    }
}

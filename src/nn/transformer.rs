//! One transformer encoder layer for every transformer in the crate: CLIP's text tower (pre-LN,
//! causal), BERT (post-LN, with the tokenizer's key mask) and CLIP's image tower (pre-LN, no mask;
//! the FID feature network) are the same layer — self-attention and a two-layer MLP, each with a
//! residual connection and a layer norm — and differ only in where the norm stands, in the
//! checkpoint names and in the mask. The forward takes its activations from the arena and returns
//! them; the backward reads them.

use super::{apply_group, backward_group, zeros, zeros_group, Cx, LayerNorm, LayerNormActs, Linear};
use crate::backend::Activation;
use crate::ops::attention::{AttentionBackward, AttentionForward, AttentionParams};
use crate::tensor::{Layout, Tensor};
use anyhow::{ensure, Result};
use std::path::Path;

/// Where a layer's norms stand relative to its residual connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormPlacement {
    /// x + f(LN(x)) for each sublayer f (CLIP; the model ends with a final norm).
    Pre,
    /// LN(x + f(x)) for each sublayer f (BERT, the original Transformer).
    Post,
}

/// A layer's checkpoint names, relative to the layer's prefix.
#[derive(Clone, Copy, Debug)]
pub struct LayerNames {
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub attn_out: &'static str,
    pub attn_norm: &'static str,
    pub fc1: &'static str,
    pub fc2: &'static str,
    pub mlp_norm: &'static str,
}

/// The shape of one layer.
#[derive(Clone, Copy, Debug)]
pub struct LayerShape {
    pub dim: usize,
    pub mlp_dim: usize,
    pub heads: usize,
    pub eps: f32,
    pub act: Activation,
    pub norm: NormPlacement,
    /// Each token attends only to itself and earlier tokens (CLIP's text encoder).
    pub causal: bool,
}

impl LayerShape {
    pub fn head_dim(&self) -> usize {
        self.dim / self.heads
    }

    /// Refuses a config (at `path`) whose width does not split into its heads; the fields are
    /// named as transformers names them in both text encoders' configs.
    pub fn check(&self, path: &Path) -> Result<()> {
        ensure!(
            self.dim % self.heads == 0,
            "{}: field \"hidden_size\" ({}) is not divisible by \"num_attention_heads\" ({})",
            path.display(),
            self.dim,
            self.heads
        );
        Ok(())
    }
}

/// The sequences a layer runs on: `batch` sequences of `seq` tokens, with the tokenizer's attention
/// mask (batch · seq, nonzero = a real token) when the model uses one.
#[derive(Clone, Copy, Debug)]
pub struct Tokens<'a> {
    pub batch: usize,
    pub seq: usize,
    pub key_mask: Option<&'a [u32]>,
}

impl Tokens<'_> {
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

/// One encoder layer's parameters (or, laid out in a gradient pool, their gradients).
#[derive(Clone, Copy, Debug)]
pub struct TransformerLayer {
    pub shape: LayerShape,
    /// The attention sublayer's norm: before it (pre-LN) or after its residual sum (post-LN).
    pub attn_norm: LayerNorm,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub attn_out: Linear,
    /// The MLP sublayer's norm, placed as `attn_norm`.
    pub mlp_norm: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

/// What one layer's forward writes (and its backward reads); rows = batch · seq.
#[derive(Clone, Debug)]
pub struct LayerActs {
    pub attn_norm: LayerNormActs,
    pub q: Tensor,    // (rows, C)
    pub k: Tensor,    // (rows, C)
    pub v: Tensor,    // (rows, C)
    pub attn: Tensor, // (rows, C) heads concatenated
    pub lse: Tensor,  // (rows, heads)
    /// x + attn_out(attn), the sum in the projection's epilogue.
    pub residual1: Tensor,
    pub mlp_norm: LayerNormActs,
    pub fc1: Tensor, // (rows, mlp_dim)
    pub act: Tensor, // (rows, mlp_dim)
    /// fc2(act) + the MLP's skip (residual1 pre-LN, the MLP's input post-LN), summed in fc2's
    /// epilogue.
    pub residual2: Tensor,
}

impl TransformerLayer {
    /// Lays the parameters out in the order of the layer's own module (norm first pre-LN, after
    /// its sublayer post-LN), so that a pool's offsets — and anything saved by offset, such as
    /// optimizer state — stay those of the model's checkpoints.
    pub fn layout(l: &mut Layout, prefix: &str, names: &LayerNames, shape: LayerShape) -> TransformerLayer {
        let (d, f, eps) = (shape.dim, shape.mlp_dim, shape.eps);
        let linear = |l: &mut Layout, name: &str, i, o| Linear::layout(l, &format!("{prefix}.{name}"), i, o, true);
        let norm = |l: &mut Layout, name: &str| LayerNorm::layout(l, &format!("{prefix}.{name}"), d, eps);
        let pre = shape.norm == NormPlacement::Pre;
        let attn_norm = pre.then(|| norm(l, names.attn_norm));
        let (q, k, v, attn_out) = (
            linear(l, names.q, d, d),
            linear(l, names.k, d, d),
            linear(l, names.v, d, d),
            linear(l, names.attn_out, d, d),
        );
        let attn_norm = attn_norm.unwrap_or_else(|| norm(l, names.attn_norm));
        let mlp_norm = pre.then(|| norm(l, names.mlp_norm));
        let (fc1, fc2) = (linear(l, names.fc1, d, f), linear(l, names.fc2, f, d));
        let mlp_norm = mlp_norm.unwrap_or_else(|| norm(l, names.mlp_norm));
        TransformerLayer { shape, attn_norm, q, k, v, attn_out, mlp_norm, fc1, fc2 }
    }

    fn attention(&self, tokens: &Tokens) -> AttentionParams {
        let LayerShape { dim, heads, causal, .. } = self.shape;
        let head_dim = dim / heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        AttentionParams { batch: tokens.batch, q_len: tokens.seq, kv_len: tokens.seq, heads, head_dim, scale, causal }
    }

    /// Runs the layer on `x` (rows, C), every activation taken from the arena and returned (the
    /// backward reads them); the output is `self.output(..)` of them.
    pub fn forward(&self, cx: &mut Cx, x: &Tensor, tokens: &Tokens) -> Result<LayerActs> {
        let b = cx.b;
        let LayerShape { dim: d, mlp_dim: f, heads, act, norm, .. } = self.shape;
        let (rows, pre) = (tokens.rows(), norm == NormPlacement::Pre);
        let pre_norm = if pre { Some(self.attn_norm.apply(cx, x, rows)?) } else { None };
        let attn_in = pre_norm.map_or(*x, |n| n.out);
        let [q, k, v] = apply_group(cx, [&self.q, &self.k, &self.v], &attn_in, rows)?;
        let (attn, lse) = (cx.arena.alloc([rows, d])?, cx.arena.alloc_f32([rows, heads])?);
        let fwd = AttentionForward { out: &attn, lse: &lse, q: &q, k: &k, v: &v, key_mask: tokens.key_mask };
        b.attention_forward(&self.attention(tokens), &fwd)?;
        let residual1 = self.attn_out.apply_residual(cx, &attn, rows, Some(x))?;
        // Both placements normalise residual1 into the MLP's input.
        let mid_norm = if pre { &self.mlp_norm } else { &self.attn_norm };
        let mlp_in = mid_norm.apply(cx, &residual1, rows)?;
        let fc1 = self.fc1.apply(cx, &mlp_in.out, rows)?;
        let act_out = cx.arena.alloc([rows, f])?;
        b.activation_forward(&act_out, &fc1, act, rows * f)?;
        // The MLP's residual adds residual1 (pre-LN) or the MLP's input (post-LN).
        let skip = if pre { &residual1 } else { &mlp_in.out };
        let residual2 = self.fc2.apply_residual(cx, &act_out, rows, Some(skip))?;
        let (attn_norm, mlp_norm) = match pre_norm {
            Some(n) => (n, mlp_in),
            None => (mlp_in, self.mlp_norm.apply(cx, &residual2, rows)?),
        };
        Ok(LayerActs { attn_norm, q, k, v, attn, lse, residual1, mlp_norm, fc1, act: act_out, residual2 })
    }

    /// The MLP's input: residual1 normalised.
    fn mlp_input(&self, a: &LayerActs) -> Tensor {
        match self.shape.norm {
            NormPlacement::Pre => a.mlp_norm.out,
            NormPlacement::Post => a.attn_norm.out,
        }
    }

    /// The layer's output in `a`.
    pub fn output(&self, a: &LayerActs) -> Tensor {
        match self.shape.norm {
            NormPlacement::Pre => a.residual2,
            NormPlacement::Post => a.mlp_norm.out,
        }
    }

    /// The backward pass of `forward` (on input `x`, whose activations `a` it reads): accumulates
    /// the parameter gradients into `g` and returns the gradient of `x`, a new arena tensor, for
    /// the gradient `dout` of the output. Its temporaries stay in the arena (the caller releases).
    pub fn backward(
        &self,
        cx: &mut Cx,
        g: &TransformerLayer,
        a: &LayerActs,
        x: &Tensor,
        dout: &Tensor,
        tokens: &Tokens,
    ) -> Result<Tensor> {
        let b = cx.b;
        let LayerShape { dim: d, mlp_dim: f, act, norm, .. } = self.shape;
        let (rows, pre) = (tokens.rows(), norm == NormPlacement::Pre);
        // residual2 = skip + fc2(act(fc1(mlp_in))), mlp_in = LN(residual1), skip = residual1
        // (pre-LN) or mlp_in (post-LN, which normalises residual2 into the output).
        let dres2 = if pre {
            *dout
        } else {
            let dres2 = zeros(cx, [rows, d])?;
            self.mlp_norm.backward(&g.mlp_norm, b, &dres2, dout, &a.residual2, &a.mlp_norm)?;
            dres2
        };
        // Pre-LN: the residual path carries dres2 to residual1; post-LN: to mlp_in.
        let dskip = zeros(cx, [rows, d])?;
        b.accumulate(&dskip, &dres2, rows * d)?;
        let dact = zeros(cx, [rows, f])?;
        self.fc2.backward(&g.fc2, b, Some(&dact), &dres2, &a.act, rows)?;
        let dfc1 = zeros(cx, [rows, f])?;
        b.activation_backward(&dfc1, &dact, &a.fc1, act, rows * f)?;
        let dmlp_in = if pre { zeros(cx, [rows, d])? } else { dskip };
        self.fc1.backward(&g.fc1, b, Some(&dmlp_in), &dfc1, &self.mlp_input(a), rows)?;
        let dres1 = if pre {
            self.mlp_norm.backward(&g.mlp_norm, b, &dskip, &dmlp_in, &a.residual1, &a.mlp_norm)?;
            dskip
        } else {
            let dres1 = zeros(cx, [rows, d])?;
            self.attn_norm.backward(&g.attn_norm, b, &dres1, &dmlp_in, &a.residual1, &a.attn_norm)?;
            dres1
        };
        // residual1 = x + attn_out(attention(q, k, v)), q, k, v projected from attn_in (LN(x)
        // pre-LN, x post-LN).
        let dx = zeros(cx, [rows, d])?;
        b.accumulate(&dx, &dres1, rows * d)?;
        let dattn = zeros(cx, [rows, d])?;
        self.attn_out.backward(&g.attn_out, b, Some(&dattn), &dres1, &a.attn, rows)?;
        let [dq, dk, dv] = zeros_group(cx, rows, d)?;
        let forward =
            AttentionForward { out: &a.attn, lse: &a.lse, q: &a.q, k: &a.k, v: &a.v, key_mask: tokens.key_mask };
        let grads = AttentionBackward { dq: &dq, dk: &dk, dv: &dv, dout: &dattn, forward };
        b.attention_backward(&self.attention(tokens), &grads)?;
        let (dattn_in, attn_in) = if pre { (zeros(cx, [rows, d])?, a.attn_norm.out) } else { (dx, *x) };
        let (qkv, gqkv) = ([&self.q, &self.k, &self.v], [&g.q, &g.k, &g.v]);
        backward_group(b, qkv, gqkv, Some(&dattn_in), [&dq, &dk, &dv], &attn_in, rows)?;
        if pre {
            self.attn_norm.backward(&g.attn_norm, b, &dx, &dattn_in, x, &a.attn_norm)?;
        }
        Ok(dx)
    }
}

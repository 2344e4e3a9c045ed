//! diffusers' attention layers: `Attention` (self or cross), `BasicTransformerBlock`,
//! `Transformer2DModel` (the U-Net's spatial transformer) and the VAE's single-head
//! `Attention` with group norm and residual.

use super::{add, Fmap, GroupNorm, LayerNorm, Linear};
use crate::backend::Backend;
use crate::tensor::{Arena, Layout, Tensor};
use anyhow::Result;

/// Multi-head attention: q from `x`, k and v from the context (cross) or from `x` (self).
#[derive(Clone, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
    pub head_dim: usize,
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    pub fn layout(
        l: &mut Layout,
        prefix: &str,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
    ) -> Attention {
        let inner = heads * head_dim;
        Attention {
            to_q: Linear::layout(l, &format!("{prefix}.to_q"), query_dim, inner, qkv_bias),
            to_k: Linear::layout(l, &format!("{prefix}.to_k"), context_dim, inner, qkv_bias),
            to_v: Linear::layout(l, &format!("{prefix}.to_v"), context_dim, inner, qkv_bias),
            to_out: Linear::layout(l, &format!("{prefix}.to_out.0"), inner, query_dim, true),
            heads,
            head_dim,
        }
    }

    /// x (batch · seq, query_dim); `context` (batch · ctx_len, context_dim, ctx_len) for cross
    /// attention. Returns (batch · seq, query_dim) after the output projection.
    pub fn forward(
        &self,
        b: &dyn Backend,
        arena: &mut Arena,
        x: &Tensor,
        batch: usize,
        seq: usize,
        context: Option<(&Tensor, usize)>,
    ) -> Result<Tensor> {
        let (ctx, kv_len) = context.unwrap_or((x, seq));
        let q = self.to_q.apply(b, arena, x, batch * seq)?;
        let k = self.to_k.apply(b, arena, ctx, batch * kv_len)?;
        let v = self.to_v.apply(b, arena, ctx, batch * kv_len)?;
        let o = arena.alloc([batch * seq, self.heads * self.head_dim])?;
        let lse = arena.alloc([batch * seq, self.heads])?;
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        b.attention_forward(&o, &lse, &q, &k, &v, batch, seq, kv_len, self.heads, self.head_dim, scale, false)?;
        self.to_out.apply(b, arena, &o, batch * seq)
    }
}

/// Self-attention, cross-attention and a GEGLU feed-forward, each pre-LN with a residual.
#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    /// ff.net.0.proj: dim → 2 · inner (value and gate of GEGLU)
    pub ff_proj: Linear,
    /// ff.net.2: inner → dim
    pub ff_out: Linear,
}

impl BasicTransformerBlock {
    pub fn layout(l: &mut Layout, prefix: &str, dim: usize, heads: usize, head_dim: usize, context_dim: usize) -> Self {
        let inner_ff = 4 * dim;
        BasicTransformerBlock {
            norm1: LayerNorm::layout(l, &format!("{prefix}.norm1"), dim, 1e-5),
            attn1: Attention::layout(l, &format!("{prefix}.attn1"), dim, dim, heads, head_dim, false),
            norm2: LayerNorm::layout(l, &format!("{prefix}.norm2"), dim, 1e-5),
            attn2: Attention::layout(l, &format!("{prefix}.attn2"), dim, context_dim, heads, head_dim, false),
            norm3: LayerNorm::layout(l, &format!("{prefix}.norm3"), dim, 1e-5),
            ff_proj: Linear::layout(l, &format!("{prefix}.ff.net.0.proj"), dim, 2 * inner_ff, true),
            ff_out: Linear::layout(l, &format!("{prefix}.ff.net.2"), inner_ff, dim, true),
        }
    }

    pub fn forward(
        &self,
        b: &dyn Backend,
        arena: &mut Arena,
        x: &Tensor,
        batch: usize,
        seq: usize,
        context: (&Tensor, usize),
    ) -> Result<Tensor> {
        let rows = batch * seq;
        let n = self.norm1.apply(b, arena, x, rows)?;
        let a = self.attn1.forward(b, arena, &n, batch, seq, None)?;
        let x = add(b, arena, x, &a)?;
        let n = self.norm2.apply(b, arena, &x, rows)?;
        let a = self.attn2.forward(b, arena, &n, batch, seq, Some(context))?;
        let x = add(b, arena, &x, &a)?;
        let n = self.norm3.apply(b, arena, &x, rows)?;
        let f = self.ff_proj.apply(b, arena, &n, rows)?;
        let inner = self.ff_out.in_f;
        let g = arena.alloc([rows, inner])?;
        b.geglu_forward(&g, &f, rows, inner)?;
        let f = self.ff_out.apply(b, arena, &g, rows)?;
        add(b, arena, &x, &f)
    }
}

/// The U-Net's spatial transformer: group norm, projection in (1×1 conv, or linear with
/// `use_linear_projection`), transformer blocks over the h·w tokens, projection out, residual.
#[derive(Clone, Debug)]
pub struct Transformer2D {
    pub norm: GroupNorm,
    pub proj_in: Linear,
    pub blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Linear,
}

impl Transformer2D {
    #[allow(clippy::too_many_arguments)]
    pub fn layout(
        l: &mut Layout,
        prefix: &str,
        channels: usize,
        heads: usize,
        head_dim: usize,
        layers: usize,
        context_dim: usize,
        groups: usize,
        linear_projection: bool,
    ) -> Transformer2D {
        let inner = heads * head_dim;
        let proj = |l: &mut Layout, name: &str, i: usize, o: usize| {
            let p = format!("{prefix}.{name}");
            if linear_projection {
                Linear::layout(l, &p, i, o, true)
            } else {
                Linear::layout_conv1x1(l, &p, i, o)
            }
        };
        let norm = GroupNorm::layout(l, &format!("{prefix}.norm"), channels, groups, 1e-6);
        let proj_in = proj(l, "proj_in", channels, inner);
        let blocks = (0..layers)
            .map(|i| {
                BasicTransformerBlock::layout(
                    l,
                    &format!("{prefix}.transformer_blocks.{i}"),
                    inner,
                    heads,
                    head_dim,
                    context_dim,
                )
            })
            .collect();
        let proj_out = proj(l, "proj_out", inner, channels);
        Transformer2D { norm, proj_in, blocks, proj_out }
    }

    /// `context`: the text embeddings (batch · ctx_len, context_dim) and ctx_len.
    pub fn forward(&self, b: &dyn Backend, arena: &mut Arena, x: &Fmap, context: (&Tensor, usize)) -> Result<Fmap> {
        let out = Fmap::alloc(arena, x.batch, x.h, x.w, x.c)?;
        let mark = arena.mark();
        let seq = x.h * x.w;
        let n = self.norm.apply(b, arena, x, false)?;
        let mut h = self.proj_in.apply(b, arena, &n.t, x.rows())?;
        for block in &self.blocks {
            h = block.forward(b, arena, &h, x.batch, seq, context)?;
        }
        let p = self.proj_out.apply(b, arena, &h, x.rows())?;
        b.add_forward(&out.t, &p, &x.t, out.numel())?;
        arena.release(mark);
        Ok(out)
    }
}

/// The VAE's mid-block attention: group norm, one head over all h·w positions with q/k/v biases,
/// output projection, residual.
#[derive(Clone, Debug)]
pub struct VaeAttention {
    pub group_norm: GroupNorm,
    pub attn: Attention,
}

impl VaeAttention {
    pub fn layout(l: &mut Layout, prefix: &str, channels: usize, groups: usize, eps: f32) -> VaeAttention {
        VaeAttention {
            group_norm: GroupNorm::layout(l, &format!("{prefix}.group_norm"), channels, groups, eps),
            attn: Attention::layout(l, prefix, channels, channels, 1, channels, true),
        }
    }

    pub fn forward(&self, b: &dyn Backend, arena: &mut Arena, x: &Fmap) -> Result<Fmap> {
        let out = Fmap::alloc(arena, x.batch, x.h, x.w, x.c)?;
        let mark = arena.mark();
        let n = self.group_norm.apply(b, arena, x, false)?;
        let a = self.attn.forward(b, arena, &n.t, x.batch, x.h * x.w, None)?;
        b.add_forward(&out.t, &a, &x.t, out.numel())?;
        arena.release(mark);
        Ok(out)
    }
}

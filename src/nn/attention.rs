//! diffusers' attention layers: `Attention` (self or cross), `BasicTransformerBlock`,
//! `Transformer2DModel` (the U-Net's spatial transformer) and the VAE's single-head
//! `Attention` with group norm and residual.

use super::{
    apply_group, backward_group, zeros, zeros_group, zeros_like, Cx, Fmap, GroupNorm, GroupNormOut, LayerNorm,
    LayerNormActs, Linear,
};
use crate::ops::attention::{AttentionBackward, AttentionForward, AttentionParams};
use crate::ops::elementwise::GegluParams;
use crate::tensor::{Layout, Tensor};
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
    /// attention. Returns (batch · seq, query_dim) after the output projection, written and
    /// summed as `proj` says.
    pub fn forward_saved(
        &self,
        cx: &mut Cx,
        x: &Tensor,
        batch: usize,
        seq: usize,
        context: Option<(&Tensor, usize)>,
        proj: ProjectionOut,
    ) -> Result<AttentionSaved> {
        let b = cx.b;
        let (ctx, kv_len) = context.unwrap_or((x, seq));
        // Projections of one input in one call where their weights allow (`apply_group`).
        let [q, k, v] = match context {
            None => apply_group(cx, [&self.to_q, &self.to_k, &self.to_v], x, batch * seq)?,
            Some(_) => {
                let q = self.to_q.apply(cx, x, batch * seq)?;
                let [k, v] = apply_group(cx, [&self.to_k, &self.to_v], ctx, batch * kv_len)?;
                [q, k, v]
            }
        };
        let o = cx.arena.alloc([batch * seq, self.heads * self.head_dim])?;
        let lse = cx.arena.alloc_f32([batch * seq, self.heads])?;
        let t = AttentionForward { out: &o, lse: &lse, q: &q, k: &k, v: &v, key_mask: None };
        b.attention_forward(&self.params(batch, seq, kv_len), &t)?;
        let out = match proj.into {
            Some(out) => *out,
            None => cx.arena.alloc([batch * seq, self.to_out.out_f])?,
        };
        self.to_out.forward_into(b, &out, &o, batch * seq, proj.residual)?;
        Ok(AttentionSaved { x: *x, ctx: *ctx, batch, seq, kv_len, q, k, v, o, lse, out })
    }

    /// The attention of `batch` sequences of `seq` queries over `kv_len` keys (no mask: the
    /// U-Net attends to every position and every text token).
    fn params(&self, batch: usize, seq: usize, kv_len: usize) -> AttentionParams {
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        AttentionParams { batch, q_len: seq, kv_len, heads: self.heads, head_dim: self.head_dim, scale, causal: false }
    }

    /// Accumulates into `g`, `dx` and (cross attention) `dctx`.
    pub fn backward(
        &self,
        g: &Attention,
        cx: &mut Cx,
        s: &AttentionSaved,
        dout: &Tensor,
        dx: &Tensor,
        dctx: Option<&Tensor>,
    ) -> Result<()> {
        let b = cx.b;
        let mark = cx.arena.mark();
        let (rows, kv_rows, inner) = (s.batch * s.seq, s.batch * s.kv_len, self.heads * self.head_dim);
        let d_o = zeros(cx, [rows, inner])?;
        self.to_out.backward(&g.to_out, b, Some(&d_o), dout, &s.o, rows)?;
        // The projections' gradients as their forward ran them (`apply_group`): q, k and v of
        // one input together, else q alone and k, v of the text together.
        // (Self-attention has no context gradient: its k and v gradients go to dx.)
        let [dq, dk, dv] = match dctx {
            None => zeros_group(cx, rows, inner)?,
            Some(_) => {
                let [dq] = zeros_group(cx, rows, inner)?;
                let [dk, dv] = zeros_group(cx, kv_rows, inner)?;
                [dq, dk, dv]
            }
        };
        let forward = AttentionForward { out: &s.o, lse: &s.lse, q: &s.q, k: &s.k, v: &s.v, key_mask: None };
        let t = AttentionBackward { dq: &dq, dk: &dk, dv: &dv, dout: &d_o, forward };
        b.attention_backward(&self.params(s.batch, s.seq, s.kv_len), &t)?;
        let (qkv, gqkv) = ([&self.to_q, &self.to_k, &self.to_v], [&g.to_q, &g.to_k, &g.to_v]);
        match dctx {
            None => backward_group(b, qkv, gqkv, Some(dx), [&dq, &dk, &dv], &s.x, rows)?,
            Some(dctx) => {
                self.to_q.backward(&g.to_q, b, Some(dx), &dq, &s.x, rows)?;
                backward_group(b, [qkv[1], qkv[2]], [gqkv[1], gqkv[2]], Some(dctx), [&dk, &dv], &s.ctx, kv_rows)?;
            }
        }
        cx.arena.release_all_to(mark);
        Ok(())
    }
}

/// Where an attention layer's output projection writes, and what it adds there.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProjectionOut<'a> {
    /// The caller's output tensor (else a new arena tensor).
    pub into: Option<&'a Tensor>,
    /// A residual connection (shaped as the output) summed in the projection's epilogue.
    pub residual: Option<&'a Tensor>,
}

/// What an attention layer's backward reads.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSaved {
    pub x: Tensor,
    /// The keys' and values' source: the context for cross attention, else `x`.
    pub ctx: Tensor,
    pub batch: usize,
    pub seq: usize,
    pub kv_len: usize,
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub o: Tensor,
    pub lse: Tensor,
    pub out: Tensor,
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

    pub fn forward_saved(
        &self,
        cx: &mut Cx,
        x: &Tensor,
        batch: usize,
        seq: usize,
        context: (&Tensor, usize),
    ) -> Result<BlockSaved> {
        let b = cx.b;
        let rows = batch * seq;
        let ln1 = self.norm1.apply(cx, x, rows)?;
        // Each residual connection is summed in the epilogue of the product before it.
        let residual = |r| ProjectionOut { into: None, residual: Some(r) };
        let a1 = self.attn1.forward_saved(cx, &ln1.out, batch, seq, None, residual(x))?;
        let x1 = a1.out;
        let ln2 = self.norm2.apply(cx, &x1, rows)?;
        let a2 = self.attn2.forward_saved(cx, &ln2.out, batch, seq, Some(context), residual(&x1))?;
        let x2 = a2.out;
        let ln3 = self.norm3.apply(cx, &x2, rows)?;
        let f = self.ff_proj.apply(cx, &ln3.out, rows)?;
        let inner = self.ff_out.in_f;
        let g = cx.arena.alloc([rows, inner])?;
        b.geglu_forward(&GegluParams { rows, inner }, &g, &f)?;
        let out = self.ff_out.apply_residual(cx, &g, rows, Some(&x2))?;
        Ok(BlockSaved { x: *x, rows, ln1, a1, x1, ln2, a2, x2, ln3, f, g, out })
    }

    /// Accumulates into `gr`, `dx` and `dctx`.
    pub fn backward(
        &self,
        gr: &BasicTransformerBlock,
        cx: &mut Cx,
        s: &BlockSaved,
        dout: &Tensor,
        dx: &Tensor,
        dctx: &Tensor,
    ) -> Result<()> {
        let b = cx.b;
        let mark = cx.arena.mark();
        let (rows, d) = (s.rows, self.ff_out.out_f);
        let inner = self.ff_out.in_f;
        // out = x2 + ff(ln3(x2))
        let dx2 = zeros(cx, [rows, d])?;
        b.accumulate(&dx2, dout, rows * d)?;
        let dg = zeros(cx, [rows, inner])?;
        self.ff_out.backward(&gr.ff_out, b, Some(&dg), dout, &s.g, rows)?;
        let df = zeros(cx, [rows, 2 * inner])?;
        b.geglu_backward(&GegluParams { rows, inner }, &df, &dg, &s.f)?;
        let dn3 = zeros(cx, [rows, d])?;
        self.ff_proj.backward(&gr.ff_proj, b, Some(&dn3), &df, &s.ln3.out, rows)?;
        self.norm3.backward(&gr.norm3, b, &dx2, &dn3, &s.x2, &s.ln3)?;
        // x2 = x1 + attn2(ln2(x1), ctx)
        let dx1 = zeros(cx, [rows, d])?;
        b.accumulate(&dx1, &dx2, rows * d)?;
        let dn2 = zeros(cx, [rows, d])?;
        self.attn2.backward(&gr.attn2, cx, &s.a2, &dx2, &dn2, Some(dctx))?;
        self.norm2.backward(&gr.norm2, b, &dx1, &dn2, &s.x1, &s.ln2)?;
        // x1 = x + attn1(ln1(x))
        b.accumulate(dx, &dx1, rows * d)?;
        let dn1 = zeros(cx, [rows, d])?;
        self.attn1.backward(&gr.attn1, cx, &s.a1, &dx1, &dn1, None)?;
        self.norm1.backward(&gr.norm1, b, dx, &dn1, &s.x, &s.ln1)?;
        cx.arena.release_all_to(mark);
        Ok(())
    }
}

/// What a transformer block's backward reads.
#[derive(Clone, Copy, Debug)]
pub struct BlockSaved {
    pub x: Tensor,
    pub rows: usize,
    pub ln1: LayerNormActs,
    pub a1: AttentionSaved,
    pub x1: Tensor,
    pub ln2: LayerNormActs,
    pub a2: AttentionSaved,
    pub x2: Tensor,
    pub ln3: LayerNormActs,
    pub f: Tensor,
    pub g: Tensor,
    pub out: Tensor,
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

/// The shape of one spatial transformer, as the U-Net config gives it.
#[derive(Clone, Copy, Debug)]
pub struct Transformer2DShape {
    pub channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Transformer blocks (`transformer_layers_per_block`).
    pub layers: usize,
    /// The text embeddings' width (`cross_attention_dim`).
    pub context_dim: usize,
    /// Group-norm groups (`norm_num_groups`).
    pub groups: usize,
    /// `use_linear_projection`: linear in/out projections instead of 1×1 convolutions.
    pub linear_projection: bool,
}

impl Transformer2D {
    pub fn layout(l: &mut Layout, prefix: &str, shape: &Transformer2DShape) -> Transformer2D {
        let Transformer2DShape { channels, heads, head_dim, layers, context_dim, groups, linear_projection } = *shape;
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
    pub fn forward(&self, cx: &mut Cx, x: &Fmap, context: (&Tensor, usize)) -> Result<Fmap> {
        Ok(self.forward_saved(cx, x, context)?.out)
    }

    pub fn forward_saved(&self, cx: &mut Cx, x: &Fmap, context: (&Tensor, usize)) -> Result<Transformer2DSaved> {
        let out = Fmap::alloc(cx.arena, x.batch, x.h, x.w, x.c)?;
        let mark = cx.arena.mark();
        let seq = x.h * x.w;
        let norm = self.norm.apply_saved(cx, x, false)?;
        let h0 = self.proj_in.apply(cx, &norm.out.t, x.rows())?;
        let mut h = h0;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let s = block.forward_saved(cx, &h, x.batch, seq, context)?;
            h = s.out;
            blocks.push(s);
        }
        self.proj_out.forward_into(cx.b, &out.t, &h, x.rows(), Some(&x.t))?;
        cx.arena.release(mark);
        Ok(Transformer2DSaved { x: *x, norm, h0, blocks, h_last: h, out })
    }

    /// Accumulates into `g`, `dx` and `dctx` (batch · ctx_len, context_dim).
    pub fn backward(
        &self,
        g: &Transformer2D,
        cx: &mut Cx,
        s: &Transformer2DSaved,
        dout: &Fmap,
        dx: &Fmap,
        dctx: &Tensor,
    ) -> Result<()> {
        let b = cx.b;
        let mark = cx.arena.mark();
        let rows = s.x.rows();
        let inner = self.proj_in.out_f;
        b.accumulate(&dx.t, &dout.t, dx.numel())?;
        let mut dh = zeros(cx, [rows, inner])?;
        self.proj_out.backward(&g.proj_out, b, Some(&dh), &dout.t, &s.h_last, rows)?;
        for ((block, gb), bs) in self.blocks.iter().zip(&g.blocks).zip(&s.blocks).rev() {
            let dprev = zeros(cx, [rows, inner])?;
            block.backward(gb, cx, bs, &dh, &dprev, dctx)?;
            dh = dprev;
        }
        let dn = zeros_like(cx, &s.norm.out)?;
        self.proj_in.backward(&g.proj_in, b, Some(&dn.t), &dh, &s.norm.out.t, rows)?;
        self.norm.backward(&g.norm, b, dx, &dn, &s.x, &s.norm)?;
        cx.arena.release_all_to(mark);
        Ok(())
    }
}

/// What a spatial transformer's backward reads.
#[derive(Clone, Debug)]
pub struct Transformer2DSaved {
    pub x: Fmap,
    pub norm: GroupNormOut,
    pub h0: Tensor,
    pub blocks: Vec<BlockSaved>,
    pub h_last: Tensor,
    pub out: Fmap,
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

    pub fn forward(&self, cx: &mut Cx, x: &Fmap) -> Result<Fmap> {
        Ok(self.forward_saved(cx, x)?.out)
    }

    pub fn forward_saved(&self, cx: &mut Cx, x: &Fmap) -> Result<VaeAttentionSaved> {
        let out = Fmap::alloc(cx.arena, x.batch, x.h, x.w, x.c)?;
        let mark = cx.arena.mark();
        let norm = self.group_norm.apply_saved(cx, x, false)?;
        let proj = ProjectionOut { into: Some(&out.t), residual: Some(&x.t) };
        let attn = self.attn.forward_saved(cx, &norm.out.t, x.batch, x.h * x.w, None, proj)?;
        cx.arena.release(mark);
        Ok(VaeAttentionSaved { x: *x, norm, attn, out })
    }

    /// Accumulates into `g` and `dx`.
    pub fn backward(&self, g: &VaeAttention, cx: &mut Cx, s: &VaeAttentionSaved, dout: &Fmap, dx: &Fmap) -> Result<()> {
        let b = cx.b;
        let mark = cx.arena.mark();
        b.accumulate(&dx.t, &dout.t, dx.numel())?;
        let dn = zeros_like(cx, &s.norm.out)?;
        self.attn.backward(&g.attn, cx, &s.attn, &dout.t, &dn.t, None)?;
        self.group_norm.backward(&g.group_norm, b, dx, &dn, &s.x, &s.norm)?;
        cx.arena.release_all_to(mark);
        Ok(())
    }
}

/// What the VAE attention's backward reads.
#[derive(Clone, Copy, Debug)]
pub struct VaeAttentionSaved {
    pub x: Fmap,
    pub norm: GroupNormOut,
    pub attn: AttentionSaved,
    pub out: Fmap,
}

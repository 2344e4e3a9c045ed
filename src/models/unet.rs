//! diffusers' `UNet2DConditionModel` for Stable Diffusion v1.x/2.x: everything read from
//! unet/config.json (parsed and bounded in `unet_config`); anything we do not support is refused
//! naming the field and value.

use super::{allocate, allocate_params, Component};
use crate::backend::plan::PlanBackend;
use crate::backend::Activation;
use crate::backend::Backend;
use crate::nn::attention::{Transformer2D, Transformer2DSaved, Transformer2DShape};
use crate::nn::resnet::{ResnetBlock2D, ResnetSaved};
use crate::nn::sampling::{Downsample2D, Upsample2D};
use crate::nn::{zeros, zeros_like, Conv2d, Cx, Fmap, GroupNorm, Linear};
use crate::ops::elementwise::{ConcatParams, TimestepEmbeddingParams};
use crate::tensor::{Arena, DType, Layout, Tensor};
use anyhow::{bail, Context, Result};

pub use super::unet_config::{DownBlockType, UNetConfig, UpBlockType};

#[derive(Clone, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2D>,
    pub downsampler: Option<Downsample2D>,
}

#[derive(Clone, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2D>,
    pub upsampler: Option<Upsample2D>,
}

#[derive(Clone, Debug)]
pub struct UNetParams {
    pub time_linear_1: Linear,
    pub time_linear_2: Linear,
    pub conv_in: Conv2d,
    pub down: Vec<DownBlock>,
    pub mid_resnets: [ResnetBlock2D; 2],
    pub mid_attention: Transformer2D,
    pub up: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

/// The parameter table under diffusers' names, with diffusers' channel bookkeeping.
pub fn params_layout(l: &mut Layout, c: &UNetConfig) -> UNetParams {
    let ch = &c.block_out_channels;
    let n = ch.len();
    let temb = ch[0] * 4;
    let (g, eps) = (c.norm_num_groups, c.norm_eps);
    let time_linear_1 = Linear::layout(l, "time_embedding.linear_1", ch[0], temb, true);
    let time_linear_2 = Linear::layout(l, "time_embedding.linear_2", temb, temb, true);
    let conv_in = Conv2d::layout(l, "conv_in", c.in_channels, ch[0], 3, 1, [1; 4]);
    let transformer = |l: &mut Layout, p: &str, channels: usize, heads: usize, layers: usize| {
        let shape = Transformer2DShape {
            channels,
            heads,
            head_dim: channels / heads,
            layers,
            context_dim: c.cross_attention_dim,
            groups: g,
            linear_projection: c.use_linear_projection,
        };
        Transformer2D::layout(l, p, &shape)
    };
    let mut down = Vec::new();
    let mut out_ch = ch[0];
    for i in 0..n {
        let in_ch = out_ch;
        out_ch = ch[i];
        let p = format!("down_blocks.{i}");
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..c.layers_per_block[i] {
            let rin = if j == 0 { in_ch } else { out_ch };
            resnets.push(ResnetBlock2D::layout(l, &format!("{p}.resnets.{j}"), rin, out_ch, Some(temb), g, eps));
            if c.down_block_types[i] == DownBlockType::CrossAttnDown {
                let tl = c.transformer_layers_per_block[i];
                attentions.push(transformer(l, &format!("{p}.attentions.{j}"), out_ch, c.heads[i], tl));
            }
        }
        let downsampler =
            (i + 1 < n).then(|| Downsample2D::layout(l, &format!("{p}.downsamplers.0"), out_ch, c.downsample_padding));
        down.push(DownBlock { resnets, attentions, downsampler });
    }
    let last = ch[n - 1];
    let mid_resnets = [
        ResnetBlock2D::layout(l, "mid_block.resnets.0", last, last, Some(temb), g, eps),
        ResnetBlock2D::layout(l, "mid_block.resnets.1", last, last, Some(temb), g, eps),
    ];
    let mid_attention =
        transformer(l, "mid_block.attentions.0", last, c.heads[n - 1], c.transformer_layers_per_block[n - 1]);
    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let mut up = Vec::new();
    let mut out_ch = rev[0];
    for i in 0..n {
        let prev_out = out_ch;
        out_ch = rev[i];
        let in_ch = rev[(i + 1).min(n - 1)];
        let bi = n - 1 - i; // the down block this up block mirrors
        let p = format!("up_blocks.{i}");
        let layers = c.layers_per_block[bi] + 1;
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..layers {
            let skip = if j == layers - 1 { in_ch } else { out_ch };
            let rin = if j == 0 { prev_out } else { out_ch };
            resnets.push(ResnetBlock2D::layout(l, &format!("{p}.resnets.{j}"), rin + skip, out_ch, Some(temb), g, eps));
            if c.up_block_types[i] == UpBlockType::CrossAttnUp {
                let tl = c.transformer_layers_per_block[bi];
                attentions.push(transformer(l, &format!("{p}.attentions.{j}"), out_ch, c.heads[bi], tl));
            }
        }
        let upsampler = (i + 1 < n).then(|| Upsample2D::layout(l, &format!("{p}.upsamplers.0"), out_ch));
        up.push(UpBlock { resnets, attentions, upsampler });
    }
    let conv_norm_out = GroupNorm::layout(l, "conv_norm_out", ch[0], g, eps);
    let conv_out = Conv2d::layout(l, "conv_out", ch[0], c.out_channels, 3, 1, [1; 4]);
    UNetParams { time_linear_1, time_linear_2, conv_in, down, mid_resnets, mid_attention, up, conv_norm_out, conv_out }
}

pub use crate::ops::elementwise::timestep_embedding;

/// The attention after a block's resnet, when the block has one there: runs it on `x`, replaces
/// `x` by its output and returns what its backward reads.
fn attend_saved(
    attention: Option<&Transformer2D>,
    cx: &mut Cx,
    x: &mut Fmap,
    context: (&Tensor, usize),
) -> Result<Option<Transformer2DSaved>> {
    let Some(a) = attention else { return Ok(None) };
    let saved = a.forward_saved(cx, x, context)?;
    *x = saved.out;
    Ok(Some(saved))
}

/// Block outputs kept after a forward, for locating a mismatch against diffusers.
pub type Probes = Vec<(String, Fmap)>;

pub struct UNet {
    pub config: UNetConfig,
    pub params: UNetParams,
    pub table: Layout,
}

impl Component for UNet {
    component_parts!(UNetConfig, "unet.params", allocate_params);
}

impl UNet {
    /// Runs the forward on the planning backend: (peak activation elements, FLOP) for
    /// (batch, latent h, latent w, context length).
    pub fn plan(&self, batch: usize, h: usize, w: usize, ctx_len: usize) -> Result<(usize, u64)> {
        let (peak, by_kind) = self.plan_detailed(batch, h, w, ctx_len)?;
        Ok((peak, by_kind.iter().sum()))
    }

    /// As `plan`, with the FLOP split into (convolutions, linear layers, attention).
    pub fn plan_detailed(&self, batch: usize, h: usize, w: usize, ctx_len: usize) -> Result<(usize, [u64; 3])> {
        self.plan_with(batch, h, w, ctx_len, DType::F32)
    }

    /// As `plan_detailed`, with the activations stored as `activations` (bf16: half the arena).
    fn plan_with(
        &self,
        batch: usize,
        h: usize,
        w: usize,
        ctx_len: usize,
        activations: DType,
    ) -> Result<(usize, [u64; 3])> {
        let mut arena = Arena::planning().with_activations(activations);
        let plan = PlanBackend::new();
        let sample = Fmap::alloc(&mut arena, batch, h, w, self.config.in_channels)?;
        let ctx = arena.alloc([batch * ctx_len, self.config.cross_attention_dim])?;
        self.forward(&mut Cx::new(&plan, &mut arena), &sample, 0.0, &ctx, ctx_len, None)?;
        Ok((arena.peak(), plan.flops_by_kind()))
    }

    /// Peak arena elements of a training step at (batch, h, w, ctx_len): the forward (keeping every
    /// activation, or with `recompute` only the blocks' inputs and outputs), the loss gradient, and
    /// the backward's temporaries on top. The caller allocates, in this order, the sample, the
    /// context, the context gradient and the output gradient first.
    pub fn plan_training(&self, batch: usize, h: usize, w: usize, ctx_len: usize, recompute: bool) -> Result<usize> {
        let plan = PlanBackend::new();
        let mut arena = Arena::planning();
        let sample = Fmap::alloc(&mut arena, batch, h, w, self.config.in_channels)?;
        let ctx = arena.alloc([batch * ctx_len, self.config.cross_attention_dim])?;
        let dctx = arena.alloc(ctx.shape)?;
        let dout = Fmap::alloc(&mut arena, batch, h, w, self.config.out_channels)?;
        arena.set_keep(!recompute);
        let saved = self.forward_saved(&mut Cx::new(&plan, &mut arena), &sample, &[0.0], &ctx, ctx_len)?;
        arena.set_keep(false);
        self.backward(&self.params, &mut Cx::new(&plan, &mut arena), &saved, &dout, &dctx, None)?;
        Ok(arena.peak())
    }

    /// The gradient buffers: the parameter layout bound to a pool of its own ("unet.grads").
    pub fn allocate_grads(&self, backend: &mut dyn Backend) -> Result<(UNetParams, Layout)> {
        let c = self.config.clone();
        allocate(backend, "unet.grads", |l| params_layout(l, &c))
    }

    /// Plans the activation arena for (batch, latent h, latent w, context length) and allocates it.
    /// The caller allocates the sample and then the context in it first, as the plan does.
    pub fn allocate_arena(
        &self,
        backend: &mut dyn Backend,
        batch: usize,
        h: usize,
        w: usize,
        ctx_len: usize,
    ) -> Result<Arena> {
        let activations = backend.activation_dtype();
        let (peak, _) = self.plan_with(batch, h, w, ctx_len, activations)?;
        let pool = backend.alloc(peak, "unet.activations")?;
        Ok(Arena::new(pool, peak).with_activations(activations))
    }

    /// The noise prediction for `sample` (batch, h, w, in_channels; channels-last) at `timestep`
    /// (the same for the whole batch, as the pipeline calls it), conditioned on `context`
    /// (batch · ctx_len, cross_attention_dim). `sample` and `context` may live in `arena` (allocated
    /// before this call; the arena is not reset here). Block outputs go to `probes` if given.
    pub fn forward(
        &self,
        cx: &mut Cx,
        sample: &Fmap,
        timestep: f32,
        context: &Tensor,
        ctx_len: usize,
        probes: Option<&mut Probes>,
    ) -> Result<Fmap> {
        let s = self.forward_saved(cx, sample, &[timestep], context, ctx_len)?;
        if let Some(p) = probes {
            p.extend(s.probes.iter().cloned());
        }
        Ok(s.out)
    }

    /// The forward pass, returning what the backward pass reads. With `arena.set_keep(true)` every
    /// activation is kept; without it only the blocks' inputs and outputs are (what inference keeps
    /// anyway), and the backward recomputes each resnet's and transformer's internals from its
    /// input just before its own backward: gradient checkpointing, diffusers' granularity (one
    /// resnet or one Transformer2D at a time), for one more forward's work. `timesteps` holds one
    /// value for the whole batch or one per sample (training draws one per sample).
    pub fn forward_saved(
        &self,
        cx: &mut Cx,
        sample: &Fmap,
        timesteps: &[f32],
        context: &Tensor,
        ctx_len: usize,
    ) -> Result<UNetSaved> {
        let batch = sample.batch;
        let ts = cx.arena.alloc_f32([batch])?;
        self.upload_timesteps(cx.b, &ts, timesteps, batch)?;
        self.forward_from_timesteps(cx, sample, &ts, context, ctx_len)
    }

    /// Writes the timesteps (one value for the whole batch, or one per sample) into `ts` (batch
    /// values): the U-Net's one upload, kept apart so that `forward_from_timesteps` queues device
    /// work only (a replayable CUDA graph; the sinusoidal embedding is computed on the device).
    pub fn upload_timesteps(&self, b: &dyn Backend, ts: &Tensor, timesteps: &[f32], batch: usize) -> Result<()> {
        if timesteps.len() != 1 && timesteps.len() != batch {
            bail!("unet: {} timesteps for a batch of {batch}", timesteps.len());
        }
        let v: Vec<f32> = (0..batch).map(|i| timesteps[if timesteps.len() == 1 { 0 } else { i }]).collect();
        b.upload(&Tensor { shape: [batch].into(), ..*ts }, &v)
    }

    /// As `forward_saved`, from timesteps already on the device (`upload_timesteps`): only device
    /// operations, at addresses that depend on the arena's state alone.
    pub fn forward_from_timesteps(
        &self,
        cx: &mut Cx,
        sample: &Fmap,
        ts: &Tensor,
        context: &Tensor,
        ctx_len: usize,
    ) -> Result<UNetSaved> {
        let b = cx.b;
        let c = &self.config;
        let p = &self.params;
        let batch = sample.batch;
        if sample.c != c.in_channels {
            bail!("unet: sample has {} channels, config in_channels is {}", sample.c, c.in_channels);
        }
        let recompute = !cx.arena.keeps();
        let mut probes = Vec::new();
        let ctx = (context, ctx_len);
        // Time embedding: sinusoidal → linear → SiLU → linear; every resnet uses SiLU of it.
        let dim0 = c.block_out_channels[0];
        let t_emb = cx.arena.alloc([batch, dim0])?;
        let sinusoid =
            TimestepEmbeddingParams { batch, dim: dim0, flip_sin_to_cos: c.flip_sin_to_cos, freq_shift: c.freq_shift };
        b.timestep_embedding(&sinusoid, &t_emb, ts)?;
        let e1 = p.time_linear_1.apply(cx, &t_emb, batch)?;
        let e1s = cx.arena.alloc(e1.shape)?;
        b.activation_forward(&e1s, &e1, Activation::Silu, e1.numel())?;
        let emb = p.time_linear_2.apply(cx, &e1s, batch)?;
        let temb_act = cx.arena.alloc(emb.shape)?;
        b.activation_forward(&temb_act, &emb, Activation::Silu, emb.numel())?;
        let temb = Some(&temb_act);

        let conv_in_out = p.conv_in.apply(cx, sample)?;
        probes.push(("conv_in".to_string(), conv_in_out));
        let mut x = conv_in_out;
        let mut skips = vec![x];
        let mut down = Vec::new();
        for (i, blk) in p.down.iter().enumerate() {
            for (j, res) in blk.resnets.iter().enumerate() {
                let rs = res.forward_saved(cx, &x, temb)?;
                x = rs.out;
                let attn = attend_saved(blk.attentions.get(j), cx, &mut x, ctx)?;
                skips.push(x);
                down.push(DownUnitSaved::Res { block: i, index: j, res: rs, attn });
            }
            if let Some(d) = &blk.downsampler {
                let input = x;
                x = d.forward(cx, &x)?;
                skips.push(x);
                down.push(DownUnitSaved::Down { block: i, input, out: x });
            }
            probes.push((format!("down_blocks.{i}"), x));
        }
        let mid0 = p.mid_resnets[0].forward_saved(cx, &x, temb)?;
        let mid_attn = p.mid_attention.forward_saved(cx, &mid0.out, ctx)?;
        let mid1 = p.mid_resnets[1].forward_saved(cx, &mid_attn.out, temb)?;
        x = mid1.out;
        probes.push(("mid_block".into(), x));
        let mut up = Vec::new();
        for (i, blk) in p.up.iter().enumerate() {
            let mut units = Vec::new();
            for (j, res) in blk.resnets.iter().enumerate() {
                let skip_index = skips.len() - 1;
                let skip = skips.pop().context("unet: skip connections exhausted (internal)")?;
                if (skip.h, skip.w) != (x.h, x.w) {
                    bail!("unet: skip {}×{} vs hidden {}×{} (internal)", skip.h, skip.w, x.h, x.w);
                }
                let cat = Fmap::alloc(cx.arena, batch, x.h, x.w, x.c + skip.c)?;
                let concat = ConcatParams { rows: x.rows(), a_channels: x.c, b_channels: skip.c };
                b.concat_channels_forward(&concat, &cat.t, &x.t, &skip.t)?;
                let rs = res.forward_saved(cx, &cat, temb)?;
                let hidden_in = x;
                x = rs.out;
                let attn = attend_saved(blk.attentions.get(j), cx, &mut x, ctx)?;
                units.push(UpUnitSaved { hidden_in, skip_index, cat, res: rs, attn });
            }
            let mut upsample = None;
            if let Some(u) = &blk.upsampler {
                // Resize to the next skip's size (diffusers' upsample_size), which is 2× unless the
                // latent size is not a multiple of the total downscale.
                let size = skips.last().map(|s| (s.h, s.w));
                let input = x;
                let (upm, out) = u.forward_saved(cx, &x, size)?;
                x = out;
                upsample = Some((input, upm, out));
            }
            probes.push((format!("up_blocks.{i}"), x));
            up.push(UpBlockSaved { units, upsample });
        }
        let norm_in = x;
        let norm_out = p.conv_norm_out.apply_saved(cx, &x, true)?;
        let out = p.conv_out.apply(cx, &norm_out.out)?;
        probes.push(("conv_out".into(), out));
        Ok(UNetSaved {
            sample: *sample,
            context: *context,
            ctx_len,
            recompute,
            t_emb,
            e1,
            e1s,
            emb,
            temb_act,
            conv_in_out,
            down,
            mid: (mid0, mid_attn, mid1),
            up,
            norm_in,
            norm_out,
            out,
            probes,
        })
    }

    /// The backward pass of `forward_saved`: accumulates every parameter gradient into `g` (the
    /// parameter layout bound to the gradient pool), the context gradient into `dctx`
    /// (batch · ctx_len, cross_attention_dim) and, if given, the sample gradient into `dsample`.
    /// Temporaries come from `arena` (above the saved forward) and are released on return.
    pub fn backward(
        &self,
        g: &UNetParams,
        cx: &mut Cx,
        s: &UNetSaved,
        dout: &Fmap,
        dctx: &Tensor,
        dsample: Option<&Fmap>,
    ) -> Result<()> {
        let b = cx.b;
        let p = &self.params;
        let mark = cx.arena.mark();
        let batch = s.sample.batch;
        // One gradient buffer per skip tensor: the up path's concatenations and the down path's
        // next layer both accumulate into it.
        let mut skip_maps = vec![s.conv_in_out];
        for u in &s.down {
            skip_maps.push(match u {
                DownUnitSaved::Res { res, attn, .. } => attn.as_ref().map_or(res.out, |a| a.out),
                DownUnitSaved::Down { out, .. } => *out,
            });
        }
        let dskips: Vec<Fmap> = skip_maps.iter().map(|m| zeros_like(cx, m)).collect::<Result<_>>()?;
        let dtemb = zeros(cx, s.temb_act.shape)?;
        let dtemb_opt = Some(&dtemb);

        let dn = zeros_like(cx, &s.norm_out.out)?;
        p.conv_out.backward(&g.conv_out, b, Some(&dn), dout, &s.norm_out.out)?;
        let mut dx = zeros_like(cx, &s.norm_in)?;
        p.conv_norm_out.backward(&g.conv_norm_out, b, &dx, &dn, &s.norm_in, &s.norm_out)?;

        for ((blk, gblk), bs) in p.up.iter().zip(&g.up).zip(&s.up).rev() {
            if let (Some(u), Some(gu), Some((input, upm, _))) = (&blk.upsampler, &gblk.upsampler, &bs.upsample) {
                let dxin = zeros_like(cx, input)?;
                u.backward(gu, cx, input, upm, &dx, &dxin)?;
                dx = dxin;
            }
            for (j, unit) in bs.units.iter().enumerate().rev() {
                if let (Some(a), Some(asaved)) = (blk.attentions.get(j), &unit.attn) {
                    let dres = zeros_like(cx, &unit.res.out)?;
                    s.transformer_backward(a, &gblk.attentions[j], cx, asaved, &dx, &dres, dctx)?;
                    dx = dres;
                }
                let dcat = zeros_like(cx, &unit.cat)?;
                s.resnet_backward(&blk.resnets[j], &gblk.resnets[j], cx, &unit.res, &dx, &dcat, dtemb_opt)?;
                let dprev = zeros_like(cx, &unit.hidden_in)?;
                let skip = &dskips[unit.skip_index];
                let concat = ConcatParams { rows: unit.cat.rows(), a_channels: unit.hidden_in.c, b_channels: skip.c };
                b.concat_channels_backward(&concat, &dprev.t, &skip.t, &dcat.t)?;
                dx = dprev;
            }
        }

        let (mid0, mid_attn, mid1) = &s.mid;
        let dr1 = zeros_like(cx, &mid0.out)?;
        let da = zeros_like(cx, &mid0.out)?;
        s.resnet_backward(&p.mid_resnets[1], &g.mid_resnets[1], cx, mid1, &dx, &dr1, dtemb_opt)?;
        s.transformer_backward(&p.mid_attention, &g.mid_attention, cx, mid_attn, &dr1, &da, dctx)?;
        let last = dskips.len() - 1;
        s.resnet_backward(&p.mid_resnets[0], &g.mid_resnets[0], cx, mid0, &da, &dskips[last], dtemb_opt)?;

        for (i, unit) in s.down.iter().enumerate().rev() {
            let (dout_i, dinp_i) = (&dskips[i + 1], &dskips[i]);
            match unit {
                DownUnitSaved::Res { block, index, res, attn } => {
                    let (blk, gblk) = (&p.down[*block], &g.down[*block]);
                    let dres = match attn {
                        Some(asaved) => {
                            let dr = zeros_like(cx, &res.out)?;
                            let (a, ga) = (&blk.attentions[*index], &gblk.attentions[*index]);
                            s.transformer_backward(a, ga, cx, asaved, dout_i, &dr, dctx)?;
                            dr
                        }
                        None => *dout_i,
                    };
                    s.resnet_backward(&blk.resnets[*index], &gblk.resnets[*index], cx, res, &dres, dinp_i, dtemb_opt)?;
                }
                DownUnitSaved::Down { block, input, .. } => {
                    let (d, gd) = (p.down[*block].downsampler.as_ref(), g.down[*block].downsampler.as_ref());
                    let (d, gd) = (d.context("internal: downsampler")?, gd.context("internal: downsampler")?);
                    d.conv.backward(&gd.conv, b, Some(dinp_i), dout_i, input)?;
                }
            }
        }
        p.conv_in.backward(&g.conv_in, b, dsample, &dskips[0], &s.sample)?;

        // temb_act = SiLU(emb); emb = linear_2(SiLU(e1)); e1 = linear_1(t_emb).
        let demb = zeros(cx, s.emb.shape)?;
        b.activation_backward(&demb, &dtemb, &s.emb, Activation::Silu, s.emb.numel())?;
        let de1s = zeros(cx, s.e1s.shape)?;
        p.time_linear_2.backward(&g.time_linear_2, b, Some(&de1s), &demb, &s.e1s, batch)?;
        let de1 = zeros(cx, s.e1.shape)?;
        b.activation_backward(&de1, &de1s, &s.e1, Activation::Silu, s.e1.numel())?;
        p.time_linear_1.backward(&g.time_linear_1, b, None, &de1, &s.t_emb, batch)?;
        cx.arena.release_all_to(mark);
        Ok(())
    }
}

impl UNetSaved {
    /// A block's backward from what its forward saved, or, when the forward kept only inputs and
    /// outputs, from its internals recomputed by `forward` (from the block's input, kept: an
    /// earlier block's output) just before, and released after.
    fn block_backward<S>(
        &self,
        cx: &mut Cx,
        saved: &S,
        forward: impl FnOnce(&mut Cx) -> Result<S>,
        backward: impl FnOnce(&mut Cx, &S) -> Result<()>,
    ) -> Result<()> {
        let mark = cx.arena.mark();
        let recomputed;
        let saved = if self.recompute {
            recomputed = keeping(cx, forward)?;
            &recomputed
        } else {
            saved
        };
        backward(cx, saved)?;
        cx.arena.release_all_to(mark);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn resnet_backward(
        &self,
        res: &ResnetBlock2D,
        g: &ResnetBlock2D,
        cx: &mut Cx,
        saved: &ResnetSaved,
        dout: &Fmap,
        dx: &Fmap,
        dtemb_act: Option<&Tensor>,
    ) -> Result<()> {
        let forward = |cx: &mut Cx| res.forward_saved(cx, &saved.x, saved.temb_act.as_ref());
        self.block_backward(cx, saved, forward, |cx, s| res.backward(g, cx, s, dout, dx, dtemb_act))
    }

    #[allow(clippy::too_many_arguments)]
    fn transformer_backward(
        &self,
        a: &Transformer2D,
        g: &Transformer2D,
        cx: &mut Cx,
        saved: &Transformer2DSaved,
        dout: &Fmap,
        dx: &Fmap,
        dctx: &Tensor,
    ) -> Result<()> {
        let forward = |cx: &mut Cx| a.forward_saved(cx, &saved.x, (&self.context, self.ctx_len));
        self.block_backward(cx, saved, forward, |cx, s| a.backward(g, cx, s, dout, dx, dctx))
    }
}

/// Runs a forward with the arena keeping every tensor it allocates (a recomputation for the
/// backward right after), then restores the arena's setting.
fn keeping<T>(cx: &mut Cx, forward: impl FnOnce(&mut Cx) -> Result<T>) -> Result<T> {
    let keep = cx.arena.keeps();
    cx.arena.set_keep(true);
    let out = forward(cx);
    cx.arena.set_keep(keep);
    out
}

/// One step of the U-Net's down path: a resnet (and its transformer) or a downsampler; each output
/// is a skip connection.
#[derive(Clone, Debug)]
pub enum DownUnitSaved {
    Res { block: usize, index: usize, res: ResnetSaved, attn: Option<Transformer2DSaved> },
    Down { block: usize, input: Fmap, out: Fmap },
}

#[derive(Clone, Debug)]
pub struct UpUnitSaved {
    /// The hidden state before the concatenation with the skip.
    pub hidden_in: Fmap,
    /// Which skip (index into [conv_in output, down units' outputs...]) was concatenated.
    pub skip_index: usize,
    pub cat: Fmap,
    pub res: ResnetSaved,
    pub attn: Option<Transformer2DSaved>,
}

#[derive(Clone, Debug)]
pub struct UpBlockSaved {
    pub units: Vec<UpUnitSaved>,
    /// (input, resized map, output) of the upsampler.
    pub upsample: Option<(Fmap, Fmap, Fmap)>,
}

/// Everything the U-Net's backward pass reads.
#[derive(Clone, Debug)]
pub struct UNetSaved {
    pub sample: Fmap,
    pub context: Tensor,
    pub ctx_len: usize,
    /// The forward kept only the blocks' inputs and outputs: the backward recomputes each
    /// resnet's and transformer's internals (`UNet::forward_saved`).
    pub recompute: bool,
    pub t_emb: Tensor,
    pub e1: Tensor,
    pub e1s: Tensor,
    pub emb: Tensor,
    pub temb_act: Tensor,
    pub conv_in_out: Fmap,
    pub down: Vec<DownUnitSaved>,
    pub mid: (ResnetSaved, Transformer2DSaved, ResnetSaved),
    pub up: Vec<UpBlockSaved>,
    pub norm_in: Fmap,
    pub norm_out: crate::nn::GroupNormOut,
    pub out: Fmap,
    /// Block outputs, for locating a mismatch against diffusers.
    pub probes: Probes,
}

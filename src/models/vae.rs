//! diffusers' `AutoencoderKL`: the encoder (→ quant_conv → mean, log-variance) and the decoder
//! (post_quant_conv →), with the mid-block attention. Images and latents are channels-last.

use super::limits::{MAX_BLOCKS, MAX_CHANNELS, MAX_LAYERS, MAX_TOTAL_LAYERS};
use super::{allocate, allocate_params, check_param_count, Component, ConfigReader};
use crate::backend::plan::PlanBackend;
use crate::backend::Backend;
use crate::io::weights;
use crate::nn::attention::{VaeAttention, VaeAttentionSaved};
use crate::nn::resnet::{ResnetBlock2D, ResnetSaved};
use crate::nn::sampling::{Downsample2D, Upsample2D};
use crate::nn::{planned_arena, planned_arena_as, zeros_like, Conv2d, Cx, Fmap, GroupNorm, GroupNormOut};
use crate::tensor::{Arena, Layout};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// The resnets and group norms of the VAE use eps 1e-6 (fixed in diffusers, not in the config).
const VAE_EPS: f32 = 1e-6;

#[derive(Clone, Debug, PartialEq)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    /// Latents are multiplied by this after encoding and divided before decoding (0.18215 for SD v1).
    pub scaling_factor: f32,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<VaeConfig> {
        Self::from_json(&weights::read_json(path)?, path)
    }

    pub fn from_json(v: &Value, path: &Path) -> Result<VaeConfig> {
        let r = ConfigReader::new(v, path)?;
        let block_out_channels = r.size_list("block_out_channels", MAX_CHANNELS)?.unwrap_or_else(|| vec![64]);
        if block_out_channels.len() > MAX_BLOCKS {
            bail!(
                "{}: field \"block_out_channels\" has {} entries; expected at most {MAX_BLOCKS} blocks (each \
                 halves the resolution)",
                path.display(),
                block_out_channels.len()
            );
        }
        let n = block_out_channels.len();
        for (field, want) in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")] {
            if let Some(v) = r.obj.get(field) {
                let a =
                    v.as_array().with_context(|| format!("{}: field \"{field}\" must be a list", path.display()))?;
                if a.len() != n {
                    bail!("{}: field \"{field}\" has {} entries for {n} block_out_channels", path.display(), a.len());
                }
                if let Some(bad) = a.iter().find(|t| t.as_str() != Some(want)) {
                    bail!("{}: field \"{field}\" contains {bad}, which is not supported (only {want})", path.display());
                }
            }
        }
        let act = r.str("act_fn", "silu")?;
        if act != "silu" {
            bail!("{}: field \"act_fn\" = \"{act}\" is not supported (only silu)", path.display());
        }
        for field in ["shift_factor", "latents_mean", "latents_std"] {
            if let Some(v) = r.obj.get(field) {
                if !v.is_null() {
                    bail!("{}: field \"{field}\" = {v} is not supported (SD v1/v2 VAEs have none)", path.display());
                }
            }
        }
        let c = VaeConfig {
            in_channels: r.size("in_channels", 3, MAX_CHANNELS)?,
            out_channels: r.size("out_channels", 3, MAX_CHANNELS)?,
            latent_channels: r.size("latent_channels", 4, MAX_CHANNELS)?,
            layers_per_block: r.size("layers_per_block", 1, MAX_LAYERS)?,
            norm_num_groups: r.size("norm_num_groups", 32, MAX_CHANNELS)?,
            scaling_factor: r.f32("scaling_factor", 0.18215)?,
            use_quant_conv: r.bool("use_quant_conv", true)?,
            use_post_quant_conv: r.bool("use_post_quant_conv", true)?,
            mid_block_add_attention: r.bool("mid_block_add_attention", true)?,
            block_out_channels,
        };
        // Latents are divided by it before decoding.
        if c.scaling_factor == 0.0 {
            bail!("{}: field \"scaling_factor\" is 0; latents are divided by it", path.display());
        }
        for (i, &ch) in c.block_out_channels.iter().enumerate() {
            if ch % c.norm_num_groups != 0 {
                bail!(
                    "{}: block_out_channels[{i}] = {ch} is not divisible by norm_num_groups {}",
                    path.display(),
                    c.norm_num_groups
                );
            }
        }
        // Resnets of encoder and decoder (each with a mid block of two): bounds the parameter
        // table's length before it is measured.
        let resnets = (c.block_out_channels.len() * (2 * c.layers_per_block + 1) + 4) as u64;
        if resnets > MAX_TOTAL_LAYERS {
            bail!(
                "{}: field \"layers_per_block\" = {} over {} blocks describes {resnets} resnets, more than \
                 {MAX_TOTAL_LAYERS} (corrupt sizes?)",
                path.display(),
                c.layers_per_block,
                c.block_out_channels.len()
            );
        }
        check_param_count(path, &Layout::measure(|l| params_layout(l, &c)))?;
        Ok(c)
    }

    /// Pixels per latent along each side: 2^(len(block_out_channels) − 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

#[derive(Clone, Debug)]
pub struct MidBlock {
    pub resnets: [ResnetBlock2D; 2],
    pub attention: Option<VaeAttention>,
}

impl MidBlock {
    fn layout(l: &mut Layout, prefix: &str, c: usize, groups: usize, attention: bool) -> MidBlock {
        MidBlock {
            resnets: [
                ResnetBlock2D::layout(l, &format!("{prefix}.resnets.0"), c, c, None, groups, VAE_EPS),
                ResnetBlock2D::layout(l, &format!("{prefix}.resnets.1"), c, c, None, groups, VAE_EPS),
            ],
            attention: attention
                .then(|| VaeAttention::layout(l, &format!("{prefix}.attentions.0"), c, groups, VAE_EPS)),
        }
    }

    fn forward_saved(&self, cx: &mut Cx, x: &Fmap) -> Result<MidSaved> {
        let r0 = self.resnets[0].forward_saved(cx, x, None)?;
        let attn = match &self.attention {
            Some(a) => Some(a.forward_saved(cx, &r0.out)?),
            None => None,
        };
        let r1 = self.resnets[1].forward_saved(cx, &attn.as_ref().map_or(r0.out, |a| a.out), None)?;
        Ok(MidSaved { r0, attn, r1 })
    }

    fn backward(&self, g: &MidBlock, cx: &mut Cx, s: &MidSaved, dout: &Fmap, dx: &Fmap) -> Result<()> {
        let mark = cx.arena.mark();
        let d1 = zeros_like(cx, &s.r1.x)?;
        self.resnets[1].backward(&g.resnets[1], cx, &s.r1, dout, &d1, None)?;
        let d0 = match (&self.attention, &g.attention, &s.attn) {
            (Some(a), Some(ga), Some(sa)) => {
                let d = zeros_like(cx, &s.r0.out)?;
                a.backward(ga, cx, sa, &d1, &d)?;
                d
            }
            _ => d1,
        };
        self.resnets[0].backward(&g.resnets[0], cx, &s.r0, &d0, dx, None)?;
        cx.arena.release_all_to(mark);
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct MidSaved {
    pub r0: ResnetSaved,
    pub attn: Option<VaeAttentionSaved>,
    pub r1: ResnetSaved,
}

/// One step of the encoder's down path or the decoder's up path.
#[derive(Clone, Debug)]
pub enum VaeUnitSaved {
    Res(ResnetSaved),
    Down { input: Fmap, out: Fmap },
    Up { input: Fmap, up: Fmap, out: Fmap },
}

/// What the encoder's backward reads.
#[derive(Clone, Debug)]
pub struct EncoderSaved {
    pub x: Fmap,
    pub conv_in_out: Fmap,
    pub units: Vec<VaeUnitSaved>,
    pub mid: MidSaved,
    pub norm_in: Fmap,
    pub norm: GroupNormOut,
    pub conv_out_out: Fmap,
    /// quant_conv's output (mean and log-variance channels).
    pub moments: Fmap,
}

/// What the decoder's backward reads.
#[derive(Clone, Debug)]
pub struct DecoderSaved {
    pub z: Fmap,
    pub pq_out: Fmap,
    pub conv_in_out: Fmap,
    pub mid: MidSaved,
    pub units: Vec<VaeUnitSaved>,
    pub norm_in: Fmap,
    pub norm: GroupNormOut,
    pub out: Fmap,
}

/// A block of the encoder or decoder: resnets, then (but in the last block) a resampler.
#[derive(Clone, Debug)]
pub struct VaeBlock<R> {
    pub resnets: Vec<ResnetBlock2D>,
    pub resampler: Option<R>,
}
/// An encoder block: its resampler halves the resolution.
pub type EncoderBlock = VaeBlock<Downsample2D>;
/// A decoder block: its resampler doubles the resolution.
pub type DecoderBlock = VaeBlock<Upsample2D>;

#[derive(Clone, Debug)]
pub struct VaeParams {
    pub enc_conv_in: Conv2d,
    pub enc_blocks: Vec<EncoderBlock>,
    pub enc_mid: MidBlock,
    pub enc_norm_out: GroupNorm,
    pub enc_conv_out: Conv2d,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
    pub dec_conv_in: Conv2d,
    pub dec_mid: MidBlock,
    pub dec_blocks: Vec<DecoderBlock>,
    pub dec_norm_out: GroupNorm,
    pub dec_conv_out: Conv2d,
}

/// The blocks `{prefix}.{i}` of the encoder or decoder: block i goes from the previous block's
/// channels (the first: its own) to `channels[i]` through `layers` resnets, then, in all but the
/// last block, through the resampler `resampler(l, "{prefix}.{i}", channels[i])` lays out.
fn stack_layout<R>(
    l: &mut Layout,
    prefix: &str,
    channels: &[usize],
    layers: usize,
    groups: usize,
    resampler: impl Fn(&mut Layout, &str, usize) -> R,
) -> Vec<VaeBlock<R>> {
    let mut blocks = Vec::new();
    let mut out_ch = channels[0];
    for (i, &ch) in channels.iter().enumerate() {
        let (in_ch, p) = (out_ch, format!("{prefix}.{i}"));
        out_ch = ch;
        let resnets = (0..layers)
            .map(|j| {
                let rin = if j == 0 { in_ch } else { out_ch };
                ResnetBlock2D::layout(l, &format!("{p}.resnets.{j}"), rin, out_ch, None, groups, VAE_EPS)
            })
            .collect();
        let resampler = (i + 1 < channels.len()).then(|| resampler(l, &p, out_ch));
        blocks.push(VaeBlock { resnets, resampler });
    }
    blocks
}

pub fn params_layout(l: &mut Layout, c: &VaeConfig) -> VaeParams {
    let ch = &c.block_out_channels;
    let (n, g, z) = (ch.len(), c.norm_num_groups, c.latent_channels);
    let same = [1; 4];
    let enc_conv_in = Conv2d::layout(l, "encoder.conv_in", c.in_channels, ch[0], 3, 1, same);
    let enc_blocks = stack_layout(l, "encoder.down_blocks", ch, c.layers_per_block, g, |l, name, c| {
        Downsample2D::layout(l, &format!("{name}.downsamplers.0"), c, 0)
    });
    let last = ch[n - 1];
    let enc_mid = MidBlock::layout(l, "encoder.mid_block", last, g, c.mid_block_add_attention);
    let enc_norm_out = GroupNorm::layout(l, "encoder.conv_norm_out", last, g, VAE_EPS);
    let enc_conv_out = Conv2d::layout(l, "encoder.conv_out", last, 2 * z, 3, 1, same);
    let quant_conv = c.use_quant_conv.then(|| Conv2d::layout(l, "quant_conv", 2 * z, 2 * z, 1, 1, [0; 4]));
    let post_quant_conv = c.use_post_quant_conv.then(|| Conv2d::layout(l, "post_quant_conv", z, z, 1, 1, [0; 4]));
    let dec_conv_in = Conv2d::layout(l, "decoder.conv_in", z, last, 3, 1, same);
    let dec_mid = MidBlock::layout(l, "decoder.mid_block", last, g, c.mid_block_add_attention);
    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let dec_blocks = stack_layout(l, "decoder.up_blocks", &rev, c.layers_per_block + 1, g, |l, name, c| {
        Upsample2D::layout(l, &format!("{name}.upsamplers.0"), c)
    });
    let dec_norm_out = GroupNorm::layout(l, "decoder.conv_norm_out", ch[0], g, VAE_EPS);
    let dec_conv_out = Conv2d::layout(l, "decoder.conv_out", ch[0], c.out_channels, 3, 1, same);
    VaeParams {
        enc_conv_in,
        enc_blocks,
        enc_mid,
        enc_norm_out,
        enc_conv_out,
        quant_conv,
        post_quant_conv,
        dec_conv_in,
        dec_mid,
        dec_blocks,
        dec_norm_out,
        dec_conv_out,
    }
}

/// diffusers' `DiagonalGaussianDistribution` of channels-last moments (batch, h, w, 2·latent): the
/// mean and the log-variance clamped to [−30, 20], each (batch, h, w, latent).
pub fn split_moments(moments: &[f32], latent: usize) -> (Vec<f32>, Vec<f32>) {
    let mut mean = Vec::with_capacity(moments.len() / 2);
    let mut logvar = Vec::with_capacity(moments.len() / 2);
    for px in moments.chunks_exact(2 * latent) {
        mean.extend_from_slice(&px[..latent]);
        logvar.extend(px[latent..].iter().map(|v| v.clamp(-30.0, 20.0)));
    }
    (mean, logvar)
}

/// diffusers 0.2-era checkpoints name the mid-block attention query/key/value/proj_attn.
fn legacy_attention_name(name: &str) -> Option<String> {
    for (old, new) in [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."), (".proj_attn.", ".to_out.0.")]
    {
        if name.contains(old) {
            return Some(name.replace(old, new));
        }
    }
    None
}

/// The down- or upsampler of a [`VaeBlock`], as the stack functions below walk it.
trait Resampler {
    /// The forward: its output, and the unit its backward reads.
    fn forward_unit(&self, cx: &mut Cx, h: &Fmap) -> Result<(Fmap, VaeUnitSaved)>;
    /// The backward: accumulates the gradients into `g` and returns the input gradient.
    fn backward_unit(&self, g: &Self, cx: &mut Cx, unit: &VaeUnitSaved, dh: &Fmap) -> Result<Fmap>;
}

impl Resampler for Downsample2D {
    fn forward_unit(&self, cx: &mut Cx, h: &Fmap) -> Result<(Fmap, VaeUnitSaved)> {
        let out = self.forward(cx, h)?;
        Ok((out, VaeUnitSaved::Down { input: *h, out }))
    }
    fn backward_unit(&self, g: &Self, cx: &mut Cx, unit: &VaeUnitSaved, dh: &Fmap) -> Result<Fmap> {
        let VaeUnitSaved::Down { input, .. } = unit else { bail!("internal: encoder units out of order") };
        let d = zeros_like(cx, input)?;
        self.conv.backward(&g.conv, cx.b, Some(&d), dh, input)?;
        Ok(d)
    }
}

impl Resampler for Upsample2D {
    fn forward_unit(&self, cx: &mut Cx, h: &Fmap) -> Result<(Fmap, VaeUnitSaved)> {
        let (up, out) = self.forward_saved(cx, h, None)?;
        Ok((out, VaeUnitSaved::Up { input: *h, up, out }))
    }
    fn backward_unit(&self, g: &Self, cx: &mut Cx, unit: &VaeUnitSaved, dh: &Fmap) -> Result<Fmap> {
        let VaeUnitSaved::Up { input, up, .. } = unit else { bail!("internal: decoder units out of order") };
        let d = zeros_like(cx, input)?;
        self.backward(g, cx, input, up, dh, &d)?;
        Ok(d)
    }
}

/// The forward of a stack of blocks from `h`: its output and the units (each resnet's and
/// resampler's saved tensors, in order) that [`stack_backward`] reads.
fn stack_forward<R: Resampler>(cx: &mut Cx, blocks: &[VaeBlock<R>], mut h: Fmap) -> Result<(Fmap, Vec<VaeUnitSaved>)> {
    let mut units = Vec::new();
    for blk in blocks {
        for r in &blk.resnets {
            let s = r.forward_saved(cx, &h, None)?;
            h = s.out;
            units.push(VaeUnitSaved::Res(s));
        }
        if let Some(rs) = &blk.resampler {
            let (out, unit) = rs.forward_unit(cx, &h)?;
            h = out;
            units.push(unit);
        }
    }
    Ok((h, units))
}

/// The backward of a stack of blocks: walks the saved units in reverse, accumulating into the
/// gradient blocks `grads` and carrying the gradient from the stack's output (`dh`) to its input,
/// which it returns.
fn stack_backward<R: Resampler>(
    cx: &mut Cx,
    blocks: &[VaeBlock<R>],
    grads: &[VaeBlock<R>],
    units: &[VaeUnitSaved],
    mut dh: Fmap,
) -> Result<Fmap> {
    // Each resnet and resampler with its gradient twin, in forward order.
    let mut layers = Vec::new();
    for (blk, g) in blocks.iter().zip(grads) {
        layers.extend(blk.resnets.iter().zip(&g.resnets).map(|r| (Some(r), None)));
        if let (Some(rs), Some(grs)) = (&blk.resampler, &g.resampler) {
            layers.push((None, Some((rs, grs))));
        }
    }
    if layers.len() != units.len() {
        bail!("internal: {} VAE units saved for {} layers", units.len(), layers.len());
    }
    for ((resnet, resampler), unit) in layers.into_iter().zip(units).rev() {
        dh = match (resnet, resampler, unit) {
            (Some((r, gr)), _, VaeUnitSaved::Res(rs)) => {
                let d = zeros_like(cx, &rs.x)?;
                r.backward(gr, cx, rs, &dh, &d, None)?;
                d
            }
            (_, Some((rs, grs)), unit) => rs.backward_unit(grs, cx, unit, &dh)?,
            _ => bail!("internal: VAE units out of order"),
        };
    }
    Ok(dh)
}

pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub params: VaeParams,
    pub table: Layout,
}

impl Component for AutoencoderKL {
    component_parts!(VaeConfig, "vae.params", allocate_params);
    fn alias(name: &str) -> Option<String> {
        legacy_attention_name(name)
    }
}

impl AutoencoderKL {
    /// Parameter counts of (encoder + quant_conv, decoder + post_quant_conv).
    pub fn split_params(&self) -> (usize, usize) {
        let enc = self
            .table
            .entries()
            .iter()
            .filter(|e| e.name.starts_with("encoder.") || e.name.starts_with("quant_conv."))
            .map(|e| e.shape.numel())
            .sum();
        (enc, self.num_params() - enc)
    }

    /// (peak activation elements, FLOP) of `decode` at (batch, latent h, latent w).
    pub fn plan_decode(&self, batch: usize, h: usize, w: usize) -> Result<(usize, u64)> {
        let mut arena = Arena::planning();
        let plan = PlanBackend::new();
        let z = Fmap::alloc(&mut arena, batch, h, w, self.config.latent_channels)?;
        self.decode(&mut Cx::new(&plan, &mut arena), &z)?;
        Ok((arena.peak(), plan.flops()))
    }

    /// An arena planned for `decode` of (batch, latent h, latent w); the latents are allocated in
    /// it first by the caller, as in the plan.
    /// Its activations are stored as the backend stores the U-Net's (`Backend::activation_dtype`).
    pub fn allocate_decode_arena(&self, backend: &mut dyn Backend, batch: usize, h: usize, w: usize) -> Result<Arena> {
        let activations = backend.activation_dtype();
        planned_arena_as(backend, "vae.decode.activations", activations, |cx| {
            let z = Fmap::alloc(cx.arena, batch, h, w, self.config.latent_channels)?;
            self.decode(cx, &z).map(|_| ())
        })
    }

    /// An arena planned for `encode` of (batch, image h, image w).
    pub fn allocate_encode_arena(&self, backend: &mut dyn Backend, batch: usize, h: usize, w: usize) -> Result<Arena> {
        planned_arena(backend, "vae.encode.activations", |cx| {
            let x = Fmap::alloc(cx.arena, batch, h, w, self.config.in_channels)?;
            self.encode(cx, &x).map(|_| ())
        })
    }

    /// Image (batch, h, w, in_channels) in [−1, 1] → the moments (batch, h/f, w/f, 2·latent):
    /// mean in the first `latent_channels` channels, log-variance (not yet clamped) in the rest.
    pub fn encode(&self, cx: &mut Cx, x: &Fmap) -> Result<Fmap> {
        Ok(self.encode_saved(cx, x)?.moments)
    }

    pub fn encode_saved(&self, cx: &mut Cx, x: &Fmap) -> Result<EncoderSaved> {
        let p = &self.params;
        let f = self.config.scale_factor();
        if x.c != self.config.in_channels {
            bail!("vae: image has {} channels, config in_channels is {}", x.c, self.config.in_channels);
        }
        if x.h % f != 0 || x.w % f != 0 {
            bail!("vae: image size {}×{} is not a multiple of {f}", x.h, x.w);
        }
        let conv_in_out = p.enc_conv_in.apply(cx, x)?;
        let (h, units) = stack_forward(cx, &p.enc_blocks, conv_in_out)?;
        let mid = p.enc_mid.forward_saved(cx, &h)?;
        let norm_in = mid.r1.out;
        let norm = p.enc_norm_out.apply_saved(cx, &norm_in, true)?;
        let conv_out_out = p.enc_conv_out.apply(cx, &norm.out)?;
        let moments = match &p.quant_conv {
            Some(q) => q.apply(cx, &conv_out_out)?,
            None => conv_out_out,
        };
        Ok(EncoderSaved { x: *x, conv_in_out, units, mid, norm_in, norm, conv_out_out, moments })
    }

    /// Accumulates the encoder's (and quant_conv's) gradients into `g` for the gradient of the
    /// moments, and the image gradient into `dx` if given.
    pub fn encode_backward(
        &self,
        g: &VaeParams,
        cx: &mut Cx,
        s: &EncoderSaved,
        dmoments: &Fmap,
        dx: Option<&Fmap>,
    ) -> Result<()> {
        let b = cx.b;
        let p = &self.params;
        let mark = cx.arena.mark();
        let dco = match (&p.quant_conv, &g.quant_conv) {
            (Some(q), Some(gq)) => {
                let d = zeros_like(cx, &s.conv_out_out)?;
                q.backward(gq, b, Some(&d), dmoments, &s.conv_out_out)?;
                d
            }
            _ => *dmoments,
        };
        let dn = zeros_like(cx, &s.norm.out)?;
        p.enc_conv_out.backward(&g.enc_conv_out, b, Some(&dn), &dco, &s.norm.out)?;
        let dmid_out = zeros_like(cx, &s.norm_in)?;
        p.enc_norm_out.backward(&g.enc_norm_out, b, &dmid_out, &dn, &s.norm_in, &s.norm)?;
        let dh = zeros_like(cx, &s.mid.r0.x)?;
        p.enc_mid.backward(&g.enc_mid, cx, &s.mid, &dmid_out, &dh)?;
        let dh = stack_backward(cx, &p.enc_blocks, &g.enc_blocks, &s.units, dh)?;
        p.enc_conv_in.backward(&g.enc_conv_in, b, dx, &dh, &s.x)?;
        cx.arena.release_all_to(mark);
        Ok(())
    }

    /// Latents (already divided by `scaling_factor`; batch, h, w, latent) → image in about [−1, 1].
    pub fn decode(&self, cx: &mut Cx, z: &Fmap) -> Result<Fmap> {
        Ok(self.decode_saved(cx, z)?.out)
    }

    pub fn decode_saved(&self, cx: &mut Cx, z: &Fmap) -> Result<DecoderSaved> {
        let p = &self.params;
        if z.c != self.config.latent_channels {
            bail!("vae: latents have {} channels, config latent_channels is {}", z.c, self.config.latent_channels);
        }
        let pq_out = match &p.post_quant_conv {
            Some(q) => q.apply(cx, z)?,
            None => *z,
        };
        let conv_in_out = p.dec_conv_in.apply(cx, &pq_out)?;
        let mid = p.dec_mid.forward_saved(cx, &conv_in_out)?;
        let (h, units) = stack_forward(cx, &p.dec_blocks, mid.r1.out)?;
        let norm_in = h;
        let norm = p.dec_norm_out.apply_saved(cx, &h, true)?;
        let out = p.dec_conv_out.apply(cx, &norm.out)?;
        Ok(DecoderSaved { z: *z, pq_out, conv_in_out, mid, units, norm_in, norm, out })
    }

    /// Accumulates the decoder's (and post_quant_conv's) gradients into `g` and the latent gradient
    /// into `dz`.
    pub fn decode_backward(&self, g: &VaeParams, cx: &mut Cx, s: &DecoderSaved, dout: &Fmap, dz: &Fmap) -> Result<()> {
        let b = cx.b;
        let p = &self.params;
        let mark = cx.arena.mark();
        let dn = zeros_like(cx, &s.norm.out)?;
        p.dec_conv_out.backward(&g.dec_conv_out, b, Some(&dn), dout, &s.norm.out)?;
        let dh = zeros_like(cx, &s.norm_in)?;
        p.dec_norm_out.backward(&g.dec_norm_out, b, &dh, &dn, &s.norm_in, &s.norm)?;
        let dh = stack_backward(cx, &p.dec_blocks, &g.dec_blocks, &s.units, dh)?;
        let dmid_in = zeros_like(cx, &s.conv_in_out)?;
        p.dec_mid.backward(&g.dec_mid, cx, &s.mid, &dh, &dmid_in)?;
        match (&p.post_quant_conv, &g.post_quant_conv) {
            (Some(q), Some(gq)) => {
                let d = zeros_like(cx, &s.pq_out)?;
                p.dec_conv_in.backward(&g.dec_conv_in, b, Some(&d), &dmid_in, &s.pq_out)?;
                q.backward(gq, b, Some(dz), &d, &s.z)?;
            }
            _ => p.dec_conv_in.backward(&g.dec_conv_in, b, Some(dz), &dmid_in, &s.pq_out)?,
        }
        cx.arena.release_all_to(mark);
        Ok(())
    }

    /// The gradient buffers: the parameter layout bound to its own pool ("vae.grads").
    pub fn allocate_grads(&self, backend: &mut dyn Backend) -> Result<(VaeParams, Layout)> {
        let c = self.config.clone();
        allocate(backend, "vae.grads", |l| params_layout(l, &c))
    }
}

/// Images to their latent distribution, one at a time, through an arena planned once for their
/// size (training draws images one by one; img2img encodes its init image).
pub struct LatentEncoder {
    arena: Arena,
    h: usize,
    w: usize,
}

impl LatentEncoder {
    pub fn new(b: &mut dyn Backend, vae: &AutoencoderKL, h: usize, w: usize) -> Result<LatentEncoder> {
        Ok(LatentEncoder { arena: vae.allocate_encode_arena(b, 1, h, w)?, h, w })
    }

    /// One planar image [3, h, w] in [−1, 1] → (mean, logvar clamped to [−30, 20] as diffusers'
    /// `DiagonalGaussianDistribution`), each [c, h/f, w/f].
    pub fn encode(&mut self, b: &dyn Backend, vae: &AutoencoderKL, planar: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (h, w) = (self.h, self.w);
        self.arena.reset();
        let x = Fmap::alloc(&mut self.arena, 1, h, w, 3)?;
        b.upload(&x.t, &crate::tensor::nchw_to_nhwc(planar, 1, 3, h, w))?;
        let m = vae.encode(&mut Cx::new(b, &mut self.arena), &x)?;
        let z = vae.config.latent_channels;
        let (mean, logvar) = split_moments(&b.download(&m.t)?, z);
        let to_chw = |v: &[f32]| crate::tensor::nhwc_to_nchw(v, 1, z, m.h, m.w);
        Ok((to_chw(&mean), to_chw(&logvar)))
    }

    /// The arena's pool, to free when done.
    pub fn pool(&self) -> crate::tensor::PoolId {
        self.arena.pool()
    }
}

//! diffusers' `AutoencoderKL`: the encoder (→ quant_conv → mean, log-variance) and the decoder
//! (post_quant_conv →), with the mid-block attention. Images and latents are channels-last.

use super::{allocate, ConfigReader};
use crate::backend::plan::PlanBackend;
use crate::backend::Backend;
use crate::nn::attention::VaeAttention;
use crate::nn::resnet::ResnetBlock2D;
use crate::nn::sampling::{Downsample2D, Upsample2D};
use crate::nn::{Conv2d, Fmap, GroupNorm};
use crate::tensor::{Arena, Layout};
use crate::weights::{self, LoadReport};
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
        let block_out_channels: Vec<usize> = match r.obj.get("block_out_channels") {
            None | Some(Value::Null) => vec![64],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().filter(|&x| x > 0).map(|x| x as usize))
                .collect::<Option<_>>()
                .with_context(|| {
                    format!("{}: field \"block_out_channels\" must hold positive integers", path.display())
                })?,
            Some(other) => bail!("{}: field \"block_out_channels\" = {other} is not a list", path.display()),
        };
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
        let flag = |f: &str| r.obj.get(f).and_then(|v| v.as_bool()).unwrap_or(true);
        let c = VaeConfig {
            in_channels: r.usize("in_channels", 3)?,
            out_channels: r.usize("out_channels", 3)?,
            latent_channels: r.usize("latent_channels", 4)?,
            layers_per_block: r.usize("layers_per_block", 1)?,
            norm_num_groups: r.usize("norm_num_groups", 32)?,
            scaling_factor: r.f32("scaling_factor", 0.18215)?,
            use_quant_conv: flag("use_quant_conv"),
            use_post_quant_conv: flag("use_post_quant_conv"),
            mid_block_add_attention: flag("mid_block_add_attention"),
            block_out_channels,
        };
        for (i, &ch) in c.block_out_channels.iter().enumerate() {
            if ch % c.norm_num_groups != 0 {
                bail!(
                    "{}: block_out_channels[{i}] = {ch} is not divisible by norm_num_groups {}",
                    path.display(),
                    c.norm_num_groups
                );
            }
        }
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

    fn forward(&self, b: &dyn Backend, arena: &mut Arena, x: &Fmap) -> Result<Fmap> {
        let mut x = self.resnets[0].forward(b, arena, x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(b, arena, &x)?;
        }
        self.resnets[1].forward(b, arena, &x, None)
    }
}

#[derive(Clone, Debug)]
pub struct EncoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsampler: Option<Downsample2D>,
}

#[derive(Clone, Debug)]
pub struct DecoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsampler: Option<Upsample2D>,
}

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

pub fn params_layout(l: &mut Layout, c: &VaeConfig) -> VaeParams {
    let ch = &c.block_out_channels;
    let (n, g, z) = (ch.len(), c.norm_num_groups, c.latent_channels);
    let same = [1; 4];
    let enc_conv_in = Conv2d::layout(l, "encoder.conv_in", c.in_channels, ch[0], 3, 1, same);
    let mut enc_blocks = Vec::new();
    let mut out_ch = ch[0];
    for i in 0..n {
        let in_ch = out_ch;
        out_ch = ch[i];
        let p = format!("encoder.down_blocks.{i}");
        let resnets = (0..c.layers_per_block)
            .map(|j| {
                let rin = if j == 0 { in_ch } else { out_ch };
                ResnetBlock2D::layout(l, &format!("{p}.resnets.{j}"), rin, out_ch, None, g, VAE_EPS)
            })
            .collect();
        let downsampler = (i + 1 < n).then(|| Downsample2D::layout(l, &format!("{p}.downsamplers.0"), out_ch, 0));
        enc_blocks.push(EncoderBlock { resnets, downsampler });
    }
    let last = ch[n - 1];
    let enc_mid = MidBlock::layout(l, "encoder.mid_block", last, g, c.mid_block_add_attention);
    let enc_norm_out = GroupNorm::layout(l, "encoder.conv_norm_out", last, g, VAE_EPS);
    let enc_conv_out = Conv2d::layout(l, "encoder.conv_out", last, 2 * z, 3, 1, same);
    let quant_conv = c.use_quant_conv.then(|| Conv2d::layout(l, "quant_conv", 2 * z, 2 * z, 1, 1, [0; 4]));
    let post_quant_conv = c.use_post_quant_conv.then(|| Conv2d::layout(l, "post_quant_conv", z, z, 1, 1, [0; 4]));
    let dec_conv_in = Conv2d::layout(l, "decoder.conv_in", z, last, 3, 1, same);
    let dec_mid = MidBlock::layout(l, "decoder.mid_block", last, g, c.mid_block_add_attention);
    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let mut dec_blocks = Vec::new();
    let mut out_ch = rev[0];
    for i in 0..n {
        let prev = out_ch;
        out_ch = rev[i];
        let p = format!("decoder.up_blocks.{i}");
        let resnets = (0..c.layers_per_block + 1)
            .map(|j| {
                let rin = if j == 0 { prev } else { out_ch };
                ResnetBlock2D::layout(l, &format!("{p}.resnets.{j}"), rin, out_ch, None, g, VAE_EPS)
            })
            .collect();
        let upsampler = (i + 1 < n).then(|| Upsample2D::layout(l, &format!("{p}.upsamplers.0"), out_ch));
        dec_blocks.push(DecoderBlock { resnets, upsampler });
    }
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

pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub params: VaeParams,
    pub table: Layout,
}

impl AutoencoderKL {
    pub fn allocate(backend: &mut dyn Backend, config: VaeConfig) -> Result<AutoencoderKL> {
        let (params, table) = allocate(backend, "vae.params", |l| params_layout(l, &config))?;
        Ok(AutoencoderKL { config, params, table })
    }

    pub fn load(backend: &mut dyn Backend, dir: &Path, variant: Option<&str>) -> Result<(AutoencoderKL, LoadReport)> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let files = weights::weight_files(dir, variant)?;
        let model = Self::allocate(backend, config)?;
        let report = weights::load_into(backend, &model.table, &files, &legacy_attention_name)?;
        Ok((model, report))
    }

    pub fn random(backend: &mut dyn Backend, config: VaeConfig, seed: u64) -> Result<AutoencoderKL> {
        let model = Self::allocate(backend, config)?;
        super::randomize(backend, &model.table, seed)?;
        Ok(model)
    }

    pub fn num_params(&self) -> usize {
        self.table.numel()
    }

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
        self.decode(&plan, &mut arena, &z)?;
        Ok((arena.peak(), plan.flops()))
    }

    /// An arena planned for `decode` of (batch, latent h, latent w); the latents are allocated in
    /// it first by the caller, as in the plan.
    pub fn allocate_decode_arena(&self, backend: &mut dyn Backend, batch: usize, h: usize, w: usize) -> Result<Arena> {
        let (peak, _) = self.plan_decode(batch, h, w)?;
        let pool = backend.alloc(peak, "vae.decode.activations")?;
        Ok(Arena::new(pool, peak))
    }

    /// An arena planned for `encode` of (batch, image h, image w).
    pub fn allocate_encode_arena(&self, backend: &mut dyn Backend, batch: usize, h: usize, w: usize) -> Result<Arena> {
        let mut plan = Arena::planning();
        let x = Fmap::alloc(&mut plan, batch, h, w, self.config.in_channels)?;
        self.encode(&PlanBackend::new(), &mut plan, &x)?;
        let pool = backend.alloc(plan.peak(), "vae.encode.activations")?;
        Ok(Arena::new(pool, plan.peak()))
    }

    /// Image (batch, h, w, in_channels) in [−1, 1] → the moments (batch, h/f, w/f, 2·latent):
    /// mean in the first `latent_channels` channels, log-variance (not yet clamped) in the rest.
    pub fn encode(&self, b: &dyn Backend, arena: &mut Arena, x: &Fmap) -> Result<Fmap> {
        let p = &self.params;
        let f = self.config.scale_factor();
        if x.c != self.config.in_channels {
            bail!("vae: image has {} channels, config in_channels is {}", x.c, self.config.in_channels);
        }
        if x.h % f != 0 || x.w % f != 0 {
            bail!("vae: image size {}×{} is not a multiple of {f}", x.h, x.w);
        }
        let mut h = p.enc_conv_in.apply(b, arena, x)?;
        for blk in &p.enc_blocks {
            for r in &blk.resnets {
                h = r.forward(b, arena, &h, None)?;
            }
            if let Some(d) = &blk.downsampler {
                h = d.forward(b, arena, &h)?;
            }
        }
        h = p.enc_mid.forward(b, arena, &h)?;
        let n = p.enc_norm_out.apply(b, arena, &h, true)?;
        let moments = p.enc_conv_out.apply(b, arena, &n)?;
        match &p.quant_conv {
            Some(q) => q.apply(b, arena, &moments),
            None => Ok(moments),
        }
    }

    /// Latents (already divided by `scaling_factor`; batch, h, w, latent) → image in about [−1, 1].
    pub fn decode(&self, b: &dyn Backend, arena: &mut Arena, z: &Fmap) -> Result<Fmap> {
        let p = &self.params;
        if z.c != self.config.latent_channels {
            bail!("vae: latents have {} channels, config latent_channels is {}", z.c, self.config.latent_channels);
        }
        let z = match &p.post_quant_conv {
            Some(q) => q.apply(b, arena, z)?,
            None => *z,
        };
        let mut h = p.dec_conv_in.apply(b, arena, &z)?;
        h = p.dec_mid.forward(b, arena, &h)?;
        for blk in &p.dec_blocks {
            for r in &blk.resnets {
                h = r.forward(b, arena, &h, None)?;
            }
            if let Some(u) = &blk.upsampler {
                h = u.forward(b, arena, &h, None)?;
            }
        }
        let n = p.dec_norm_out.apply(b, arena, &h, true)?;
        p.dec_conv_out.apply(b, arena, &n)
    }
}

//! unet/config.json of diffusers' `UNet2DConditionModel`: every field we read is typed and
//! bounded (`super::limits`), anything we do not support is refused naming the file, field and
//! value, and the whole parameter table is measured (never allocated) against the parameter bound
//! before a model is built from it.

use super::limits::{MAX_BLOCKS, MAX_CHANNELS, MAX_LAYERS, MAX_SAMPLE_SIZE, MAX_TOTAL_LAYERS};
use super::{check_param_count, ConfigReader};
use crate::io::weights;
use crate::tensor::Layout;
use anyhow::{bail, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownBlockType {
    CrossAttnDown,
    Down,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpBlockType {
    CrossAttnUp,
    Up,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<DownBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    pub layers_per_block: Vec<usize>,
    pub transformer_layers_per_block: Vec<usize>,
    /// Heads per down block (diffusers: `num_attention_heads or attention_head_dim`, SD v1's quirk).
    pub heads: Vec<usize>,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f32,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f32,
    pub downsample_padding: usize,
    /// The latent size the model was trained at, [height, width] (diffusers' `sample_size`: an
    /// integer for square latents or a [height, width] pair); pipelines default to it × the VAE
    /// scale factor. `None` when the config has none.
    pub sample_size: Option<[usize; 2]>,
}

/// A per-block setting given as one value or a list of one per down block.
fn per_block(r: &ConfigReader, field: &str, default: usize, n: usize, max: usize) -> Result<Vec<usize>> {
    match r.obj.get(field) {
        None | Some(Value::Null) => Ok(vec![default; n]),
        Some(Value::Array(a)) => {
            if a.len() != n {
                bail!("{}: field \"{field}\" has {} entries for {n} blocks", r.path.display(), a.len());
            }
            a.iter().enumerate().map(|(i, v)| r.size_value(&format!("{field}[{i}]"), v, max)).collect()
        }
        Some(_) => Ok(vec![r.size(field, default, max)?; n]),
    }
}

/// A list of block-type names, each one of `supported`.
fn block_types<T: Copy>(r: &ConfigReader, field: &str, supported: &[(&str, T)]) -> Result<Vec<T>> {
    let names: Vec<&str> = supported.iter().map(|(name, _)| *name).collect();
    strings(r, field)?
        .iter()
        .map(|s| {
            supported.iter().find(|(name, _)| name == s).map(|(_, t)| *t).ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: field \"{field}\" contains \"{s}\", which is not supported (supported: {})",
                    r.path.display(),
                    names.join(", ")
                )
            })
        })
        .collect()
}

fn strings(r: &ConfigReader, field: &str) -> Result<Vec<String>> {
    let a = match r.obj.get(field) {
        Some(Value::Array(a)) => a,
        None | Some(Value::Null) => bail!("{}: field \"{field}\" (a list of block types) is missing", r.path.display()),
        Some(v) => bail!("{}: field \"{field}\" is {v}; expected a list of block type names", r.path.display()),
    };
    if a.is_empty() || a.len() > MAX_BLOCKS {
        bail!(
            "{}: field \"{field}\" has {} entries; expected 1 to {MAX_BLOCKS} blocks (each halves the resolution)",
            r.path.display(),
            a.len()
        );
    }
    a.iter()
        .enumerate()
        .map(|(i, s)| {
            s.as_str().map(str::to_string).ok_or_else(|| {
                anyhow::anyhow!("{}: field \"{field}[{i}]\" is {s}; expected a block type name", r.path.display())
            })
        })
        .collect()
}

/// diffusers' `sample_size`: an integer or a [height, width] list of two.
fn sample_size(r: &ConfigReader) -> Result<Option<[usize; 2]>> {
    let bad = |v: &Value| {
        anyhow::anyhow!(
            "{}: field \"sample_size\" is {v}; expected an integer from 1 to {MAX_SAMPLE_SIZE} or a \
             [height, width] list of two",
            r.path.display()
        )
    };
    let one = |v: &Value| v.as_u64().filter(|&n| n >= 1 && n <= MAX_SAMPLE_SIZE as u64).map(|n| n as usize);
    match r.obj.get("sample_size") {
        None | Some(Value::Null) => Ok(None),
        Some(v @ Value::Array(a)) => match a.as_slice() {
            [h, w] => Ok(Some([one(h).ok_or_else(|| bad(v))?, one(w).ok_or_else(|| bad(v))?])),
            _ => Err(bad(v)),
        },
        Some(v) => one(v).map(|s| Some([s, s])).ok_or_else(|| bad(v)),
    }
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<UNetConfig> {
        Self::from_json(&weights::read_json(path)?, path)
    }

    pub fn from_json(v: &Value, path: &Path) -> Result<UNetConfig> {
        let r = ConfigReader::new(v, path)?;
        let refuse = |field: &str, value: &Value| -> anyhow::Error {
            anyhow::anyhow!("{}: field \"{field}\" = {value} is not supported", path.display())
        };
        // Features of other U-Nets (SDXL, inpainting variants, class conditioning...): accept only
        // their defaults.
        let must_be_default: &[(&str, Value)] = &[
            ("center_input_sample", Value::Bool(false)),
            ("only_cross_attention", Value::Bool(false)),
            ("dual_cross_attention", Value::Bool(false)),
            ("class_embed_type", Value::Null),
            ("addition_embed_type", Value::Null),
            ("num_class_embeds", Value::Null),
            ("encoder_hid_dim", Value::Null),
            ("encoder_hid_dim_type", Value::Null),
            ("resnet_time_scale_shift", Value::String("default".into())),
            ("time_embedding_type", Value::String("positional".into())),
            ("time_embedding_dim", Value::Null),
            ("time_embedding_act_fn", Value::Null),
            ("timestep_post_act", Value::Null),
            ("time_cond_proj_dim", Value::Null),
            ("conv_in_kernel", Value::from(3)),
            ("conv_out_kernel", Value::from(3)),
            ("projection_class_embeddings_input_dim", Value::Null),
            ("attention_type", Value::String("default".into())),
            ("class_embeddings_concat", Value::Bool(false)),
            ("mid_block_only_cross_attention", Value::Null),
            ("cross_attention_norm", Value::Null),
            ("addition_time_embed_dim", Value::Null),
            ("resnet_skip_time_act", Value::Bool(false)),
            ("resnet_out_scale_factor", Value::from(1.0)),
            ("reverse_transformer_layers_per_block", Value::Null),
            ("mid_block_type", Value::String("UNetMidBlock2DCrossAttn".into())),
            ("act_fn", Value::String("silu".into())),
        ];
        for (field, default) in must_be_default {
            if let Some(v) = r.obj.get(*field) {
                let same = v == default || (v.as_f64().is_some() && v.as_f64() == default.as_f64());
                if !same {
                    return Err(refuse(field, v));
                }
            }
        }
        if let Some(v) = r.obj.get("mid_block_scale_factor") {
            if v.as_f64() != Some(1.0) {
                return Err(refuse("mid_block_scale_factor", v));
            }
        }
        if let Some(v) = r.obj.get("num_attention_heads") {
            if !v.is_null() {
                // diffusers itself refuses it (its "attention_head_dim" already means heads).
                return Err(refuse("num_attention_heads", v));
            }
        }
        let down = block_types(
            &r,
            "down_block_types",
            &[("CrossAttnDownBlock2D", DownBlockType::CrossAttnDown), ("DownBlock2D", DownBlockType::Down)],
        )?;
        let up = block_types(
            &r,
            "up_block_types",
            &[("CrossAttnUpBlock2D", UpBlockType::CrossAttnUp), ("UpBlock2D", UpBlockType::Up)],
        )?;
        let n = down.len();
        let block_out_channels = r
            .size_list("block_out_channels", MAX_CHANNELS)?
            .ok_or_else(|| anyhow::anyhow!("{}: field \"block_out_channels\" (a list) is missing", path.display()))?;
        if block_out_channels.len() != n || up.len() != n {
            bail!(
                "{}: {} down_block_types, {} up_block_types and {} block_out_channels must agree",
                path.display(),
                n,
                up.len(),
                block_out_channels.len()
            );
        }
        if let Some(v @ Value::Array(_)) = r.obj.get("cross_attention_dim") {
            return Err(refuse("cross_attention_dim", v));
        }
        let heads = per_block(&r, "attention_head_dim", 8, n, MAX_CHANNELS)?;
        let norm_num_groups = r.size("norm_num_groups", 32, MAX_CHANNELS)?;
        let sample_hw = sample_size(&r)?;
        let c = UNetConfig {
            in_channels: r.size("in_channels", 4, MAX_CHANNELS)?,
            out_channels: r.size("out_channels", 4, MAX_CHANNELS)?,
            layers_per_block: per_block(&r, "layers_per_block", 2, n, MAX_LAYERS)?,
            transformer_layers_per_block: per_block(&r, "transformer_layers_per_block", 1, n, MAX_LAYERS)?,
            heads,
            cross_attention_dim: r.size("cross_attention_dim", 1280, MAX_CHANNELS)?,
            use_linear_projection: r.bool("use_linear_projection", false)?,
            upcast_attention: r.bool("upcast_attention", false)?,
            norm_num_groups,
            norm_eps: r.eps("norm_eps", 1e-5)?,
            flip_sin_to_cos: r.bool("flip_sin_to_cos", true)?,
            freq_shift: r.f32("freq_shift", 0.0)?,
            // 1 pads every side, 0 pads right/bottom only (diffusers' two values); a larger one
            // would make the down path's sizes disagree with the up path's.
            downsample_padding: match r.obj.get("downsample_padding") {
                None | Some(Value::Null) => 1,
                Some(v) => v.as_u64().filter(|&p| p <= 1).map(|p| p as usize).ok_or_else(|| {
                    anyhow::anyhow!("{}: field \"downsample_padding\" is {v}; expected 0 or 1", path.display())
                })?,
            },
            sample_size: sample_hw,
            block_out_channels,
            down_block_types: down,
            up_block_types: up,
        };
        for (i, &ch) in c.block_out_channels.iter().enumerate() {
            if ch % norm_num_groups != 0 {
                bail!(
                    "{}: block_out_channels[{i}] = {ch} is not divisible by norm_num_groups {norm_num_groups}",
                    path.display()
                );
            }
            if ch % c.heads[i] != 0 {
                bail!(
                    "{}: block_out_channels[{i}] = {ch} is not divisible by {} attention heads (field \
                     \"attention_head_dim\")",
                    path.display(),
                    c.heads[i]
                );
            }
        }
        // Resnets and transformer blocks of the whole net (down, mid, up): bounds the parameter
        // table's length before it is measured. Each factor is bounded, so this cannot overflow.
        let attn = |i: usize, cross: bool| if cross { c.transformer_layers_per_block[i] as u64 } else { 0 };
        let mut layers = 2 + c.transformer_layers_per_block[n - 1] as u64;
        for i in 0..n {
            let lpb = c.layers_per_block[i] as u64;
            layers += lpb * (1 + attn(i, c.down_block_types[i] == DownBlockType::CrossAttnDown));
            let bi = n - 1 - i;
            let cross = c.up_block_types[i] == UpBlockType::CrossAttnUp;
            layers += (c.layers_per_block[bi] as u64 + 1) * (1 + attn(bi, cross));
        }
        if layers > MAX_TOTAL_LAYERS {
            bail!(
                "{}: fields \"layers_per_block\" and \"transformer_layers_per_block\" describe {layers} \
                 resnets and transformer blocks, more than {MAX_TOTAL_LAYERS} (corrupt sizes?)",
                path.display()
            );
        }
        check_param_count(path, &Layout::measure(|l| super::unet::params_layout(l, &c)))?;
        Ok(c)
    }

    /// Latent downscale of the whole U-Net: 2^(number of downsamplers).
    pub fn total_downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

//! Stable Diffusion v1 single-file checkpoints: the original CompVis (LDM) layout that `.ckpt`
//! releases, A1111, ComfyUI and stable-diffusion.cpp use — one file, every component under a
//! prefix, the U-Net and VAE under LDM's module names:
//!
//! ```text
//! model.diffusion_model.*        the U-Net     (input_blocks / middle_block / output_blocks)
//! first_stage_model.*            the VAE       (encoder.down.i.block.j, decoder.up.i, mid.attn_1)
//! cond_stage_model.transformer.* the CLIP text encoder (transformers' names)
//! model_ema.*                    EMA U-Net weights, LitEma's names (the U-Net name's dots removed)
//! ```
//!
//! This module names, for every tensor of our (diffusers') parameter tables, the tensor of the
//! single file that holds it — the inverse of diffusers' `convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint` and `convert_ldm_clip_checkpoint`, driven by the same config fields
//! (`layers_per_block`, the block types, the block count). Loading reads each table tensor from its
//! single-file name; `export --single-file` writes each under it.

use crate::models::unet_config::{DownBlockType, UNetConfig, UpBlockType};
use anyhow::{bail, Result};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const TEXT_PREFIX: &str = "cond_stage_model.transformer.";
pub const EMA_PREFIX: &str = "model_ema.";

/// Splits `name` after `prefix` and the next `n` dot-separated fields: (fields, rest).
fn fields<'a>(name: &'a str, prefix: &str, n: usize) -> Option<(Vec<&'a str>, &'a str)> {
    let mut rest = name.strip_prefix(prefix)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (f, r) = rest.split_once('.')?;
        out.push(f);
        rest = r;
    }
    Some((out, rest))
}

fn index(s: &str) -> Option<usize> {
    s.parse().ok()
}

/// A diffusers ResnetBlock2D parameter in LDM's ResBlock (U-Net).
fn unet_resnet(rest: &str) -> Option<String> {
    let (module, param) = rest.split_once('.')?;
    let m = match module {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        _ => return None,
    };
    Some(format!("{m}.{param}"))
}

/// The LDM name (without `model.diffusion_model.`) of a diffusers U-Net parameter.
pub fn unet_name(name: &str, c: &UNetConfig) -> Result<String> {
    let layers = |b: usize| c.layers_per_block.get(b).copied().unwrap_or(1);
    let n = c.down_block_types.len();
    let mapped = (|| -> Option<String> {
        let top = match name.split_once('.')?.0 {
            "conv_in" => Some(format!("input_blocks.0.0.{}", name.strip_prefix("conv_in.")?)),
            "conv_norm_out" => Some(format!("out.0.{}", name.strip_prefix("conv_norm_out.")?)),
            "conv_out" => Some(format!("out.2.{}", name.strip_prefix("conv_out.")?)),
            "time_embedding" => {
                let rest = name.strip_prefix("time_embedding.")?;
                let (layer, param) = rest.split_once('.')?;
                let i = match layer {
                    "linear_1" => 0,
                    "linear_2" => 2,
                    _ => return None,
                };
                Some(format!("time_embed.{i}.{param}"))
            }
            _ => None,
        };
        if top.is_some() {
            return top;
        }
        if let Some((f, rest)) = fields(name, "down_blocks.", 3) {
            let b = index(f[0])?;
            // Input block 0 is conv_in; each down block has its resnets (with attentions beside
            // them) and, all but the last, a downsampler block.
            let start = 1 + (0..b).map(|i| layers(i) + usize::from(i + 1 < n)).sum::<usize>();
            return match f[1] {
                "resnets" => Some(format!("input_blocks.{}.0.{}", start + index(f[2])?, unet_resnet(rest)?)),
                "attentions" => Some(format!("input_blocks.{}.1.{rest}", start + index(f[2])?)),
                "downsamplers" if f[2] == "0" => {
                    Some(format!("input_blocks.{}.0.op.{}", start + layers(b), rest.strip_prefix("conv.")?))
                }
                _ => None,
            };
        }
        if let Some((f, rest)) = fields(name, "mid_block.", 2) {
            return match (f[0], f[1]) {
                ("resnets", "0") => Some(format!("middle_block.0.{}", unet_resnet(rest)?)),
                ("attentions", "0") => Some(format!("middle_block.1.{rest}")),
                ("resnets", "1") => Some(format!("middle_block.2.{}", unet_resnet(rest)?)),
                _ => None,
            };
        }
        if let Some((f, rest)) = fields(name, "up_blocks.", 3) {
            let b = index(f[0])?;
            // Up block b mirrors down block n-1-b, with one resnet more; its upsampler sits in its
            // last output block, after the attention when there is one.
            let up_layers = |i: usize| layers(n - 1 - i) + 1;
            let start = (0..b).map(up_layers).sum::<usize>();
            return match f[1] {
                "resnets" => Some(format!("output_blocks.{}.0.{}", start + index(f[2])?, unet_resnet(rest)?)),
                "attentions" => Some(format!("output_blocks.{}.1.{rest}", start + index(f[2])?)),
                "upsamplers" if f[2] == "0" => {
                    let slot = if c.up_block_types.get(b) == Some(&UpBlockType::CrossAttnUp) { 2 } else { 1 };
                    Some(format!("output_blocks.{}.{slot}.{rest}", start + up_layers(b) - 1))
                }
                _ => None,
            };
        }
        None
    })();
    match mapped {
        Some(m) => Ok(m),
        None => bail!("U-Net tensor '{name}' has no place in the single-file (LDM) layout"),
    }
}

/// A diffusers VAE attention parameter in LDM's AttnBlock.
fn vae_attention(rest: &str) -> Option<String> {
    let (module, param) = rest.rsplit_once('.')?;
    let m = match module {
        "group_norm" => "norm",
        "to_q" => "q",
        "to_k" => "k",
        "to_v" => "v",
        "to_out.0" => "proj_out",
        _ => return None,
    };
    Some(format!("{m}.{param}"))
}

fn vae_resnet(rest: &str) -> String {
    match rest.strip_prefix("conv_shortcut.") {
        Some(p) => format!("nin_shortcut.{p}"),
        None => rest.to_string(),
    }
}

/// The LDM name (without `first_stage_model.`) of a diffusers VAE parameter; `blocks`: the number
/// of down (and up) blocks.
pub fn vae_name(name: &str, blocks: usize) -> Result<String> {
    let mapped = (|| -> Option<String> {
        let (part, rest) = name.split_once('.')?;
        if part == "quant_conv" || part == "post_quant_conv" {
            return Some(name.to_string());
        }
        if part != "encoder" && part != "decoder" {
            return None;
        }
        let (module, tail) = rest.split_once('.')?;
        let inner = match module {
            "conv_in" | "conv_out" => format!("{module}.{tail}"),
            "conv_norm_out" => format!("norm_out.{tail}"),
            "mid_block" => {
                let (f, r) = fields(tail, "", 2)?;
                match (f[0], f[1]) {
                    ("resnets", "0") => format!("mid.block_1.{}", vae_resnet(r)),
                    ("resnets", "1") => format!("mid.block_2.{}", vae_resnet(r)),
                    ("attentions", "0") => format!("mid.attn_1.{}", vae_attention(r)?),
                    _ => return None,
                }
            }
            "down_blocks" if part == "encoder" => {
                let (f, r) = fields(tail, "", 3)?;
                let i = index(f[0])?;
                match f[1] {
                    "resnets" => format!("down.{i}.block.{}.{}", index(f[2])?, vae_resnet(r)),
                    "downsamplers" if f[2] == "0" => format!("down.{i}.downsample.{r}"),
                    _ => return None,
                }
            }
            "up_blocks" if part == "decoder" => {
                // LDM numbers the decoder's blocks from the lowest resolution up, diffusers in
                // the order they run.
                let (f, r) = fields(tail, "", 3)?;
                let i = blocks.checked_sub(1 + index(f[0])?)?;
                match f[1] {
                    "resnets" => format!("up.{i}.block.{}.{}", index(f[2])?, vae_resnet(r)),
                    "upsamplers" if f[2] == "0" => format!("up.{i}.upsample.{r}"),
                    _ => return None,
                }
            }
            _ => return None,
        };
        Some(format!("{part}.{inner}"))
    })();
    match mapped {
        Some(m) => Ok(m),
        None => bail!("VAE tensor '{name}' has no place in the single-file (LDM) layout"),
    }
}

/// LitEma's name of a U-Net tensor: `model_ema.` and the U-Net's full name after `model.`, its
/// dots removed (`model_ema.diffusion_modelinput_blocks00weight`).
pub fn ema_name(ldm_unet_name: &str) -> String {
    format!("{EMA_PREFIX}diffusion_model{}", ldm_unet_name.replace('.', ""))
}

/// Whether a U-Net config has the shape the LDM layout can express (SD v1/v2: one resnet count
/// for every block, the attention types mirrored between down and up blocks).
pub fn check_unet_config(c: &UNetConfig) -> Result<()> {
    let n = c.down_block_types.len();
    if c.up_block_types.len() != n {
        bail!("{n} down blocks and {} up blocks: not a layout a single file can hold", c.up_block_types.len());
    }
    for (b, d) in c.down_block_types.iter().enumerate() {
        let up = c.up_block_types[n - 1 - b];
        if (*d == DownBlockType::CrossAttnDown) != (up == UpBlockType::CrossAttnUp) {
            bail!("down block {b} and up block {} differ in attention: not a layout a single file can hold", n - 1 - b);
        }
    }
    Ok(())
}

use crate::backend::Backend;
use crate::io::weights;
use crate::models::clip::ClipTextModel;
use crate::models::text::TextEncoder;
use crate::models::unet::UNet;
use crate::models::vae::AutoencoderKL;
use crate::models::Component;
use std::collections::HashMap;
use std::path::Path;

/// Every single-file name of a component's table tensors: (single-file name, table name).
pub fn text_names(table_name: &str) -> Vec<String> {
    // transformers before 4.22 had no `text_model.` level; SD v1's own checkpoint has it.
    let mut v = vec![format!("{TEXT_PREFIX}{table_name}")];
    if let Some(short) = table_name.strip_prefix("text_model.") {
        v.push(format!("{TEXT_PREFIX}{short}"));
    }
    v
}

/// Loads one component's table from the single file: each table tensor from the file names
/// `names` gives it; the file's other components (`owned` false) are skipped.
fn load_component(
    b: &dyn Backend,
    table: &crate::tensor::Layout,
    c: &dyn weights::TensorContainer,
    names: &dyn Fn(&str) -> Result<Vec<String>>,
    owned: &dyn Fn(&str) -> bool,
) -> Result<weights::LoadReport> {
    let mut map: HashMap<String, String> = HashMap::new();
    for e in table.entries() {
        for n in names(&e.name)? {
            map.insert(n, e.name.clone());
        }
    }
    weights::load_from(b, table, &[c], &|n| map.get(n).cloned(), &|n| !owned(n) || weights::is_known_buffer(n))
}

/// The text encoder, U-Net and VAE of a single-file checkpoint, with the configs of the pipeline
/// folder `config_dir`, declared frozen (sampling).
pub fn load_models(
    b: &mut dyn Backend,
    file: &Path,
    config_dir: &Path,
    ema: bool,
) -> Result<(TextEncoder, UNet, AutoencoderKL)> {
    let single = weights::WeightFile::open(file)?;
    let text_config = ClipTextModel::config_from_file(&config_dir.join("text_encoder/config.json"))?;
    let unet_config = UNet::config_from_file(&config_dir.join("unet/config.json"))?;
    let vae_config = AutoencoderKL::config_from_file(&config_dir.join("vae/config.json"))?;
    check_unet_config(&unet_config)?;
    let text = ClipTextModel::allocate(b, text_config)?;
    let unet = UNet::allocate(b, unet_config)?;
    let vae = AutoencoderKL::allocate(b, vae_config)?;
    let blocks = vae.config.block_out_channels.len();
    let container = single.container()?;
    let c = container.as_ref();
    {
        if ema && !c.names().iter().any(|n| n.starts_with(EMA_PREFIX)) {
            bail!("{}: --ema asks for EMA weights, but the file has no '{EMA_PREFIX}*' tensors", file.display());
        }
        load_component(b, text.table(), c, &|n| Ok(text_names(n)), &|n| n.starts_with(TEXT_PREFIX))?;
        let unet_names = |n: &str| -> Result<Vec<String>> {
            let ldm = unet_name(n, &unet.config)?;
            Ok(vec![if ema { ema_name(&ldm) } else { format!("{UNET_PREFIX}{ldm}") }])
        };
        // LitEma's own buffers (its decay and update count) are not weights.
        let unet_owned = |n: &str| {
            if ema {
                n.starts_with(EMA_PREFIX) && n != "model_ema.decay" && n != "model_ema.num_updates"
            } else {
                n.starts_with(UNET_PREFIX)
            }
        };
        load_component(b, unet.table(), c, &unet_names, &unet_owned)?;
        let vae_names = |n: &str| -> Result<Vec<String>> { Ok(vec![format!("{VAE_PREFIX}{}", vae_name(n, blocks)?)]) };
        load_component(b, vae.table(), c, &vae_names, &|n| n.starts_with(VAE_PREFIX))?;
    }
    for t in [text.table(), unet.table(), vae.table()] {
        b.mark_frozen(t.pool());
    }
    Ok((TextEncoder::Clip(text), unet, vae))
}

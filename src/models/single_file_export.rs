//! `roentgen export` between the two layouts: a pipeline folder to one single file (the CompVis
//! layout A1111, ComfyUI and stable-diffusion.cpp load), and a single file to a pipeline folder.
//! Both go through the loaded models (on the CPU backend), so every name a loader accepts (older
//! library versions', aliases) is written under the target layout's canonical name; float tensors
//! are written in the chosen dtype.

use super::single_file::{load_models, text_names, unet_name, vae_name, UNET_PREFIX, VAE_PREFIX};
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::io::export::ExportDtype;
use crate::io::safetensors::RawTensor;
use crate::models::text::TextEncoder;
use crate::models::unet::UNet;
use crate::models::vae::AutoencoderKL;
use crate::models::Component;
use crate::tensor::{Layout, Tensor};
use anyhow::{bail, Context, Result};
use safetensors::Dtype;
use std::path::Path;

/// Every tensor of a table, downloaded: (table name, shape, values).
fn tensors_of(b: &dyn Backend, table: &Layout) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
    table
        .entries()
        .iter()
        .map(|e| {
            let t = Tensor::new(table.pool(), e.offset, e.shape);
            Ok((e.name.clone(), e.shape.dims().to_vec(), b.download(&t)?))
        })
        .collect()
}

fn raw(name: String, shape: Vec<usize>, v: &[f32], dtype: ExportDtype) -> RawTensor {
    match dtype {
        ExportDtype::F32 => (name, shape, Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        ExportDtype::F16 => {
            (name, shape, Dtype::F16, v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect())
        }
    }
}

/// The pipeline folder `src` (its U-Net, or with `ema` its unet_ema/) as one single-file
/// safetensors checkpoint `out`; returns (tensors, bytes).
pub fn folder_to_single_file(src: &Path, out: &Path, dtype: ExportDtype, ema: bool) -> Result<(usize, u64)> {
    let mut b = CpuBackend::new();
    let (text, _) = TextEncoder::load(&mut b, &src.join("text_encoder"), None)?;
    let TextEncoder::Clip(text) = text else {
        bail!("{}: a BERT text encoder; Stable Diffusion single files hold a CLIP text encoder", src.display())
    };
    let unet_dir = src.join(if ema { "unet_ema" } else { "unet" });
    if ema && !unet_dir.is_dir() {
        bail!("$ema: {} has no unet_ema/ (train with $ema)", src.display());
    }
    let (unet, _) = UNet::load(&mut b, &unet_dir, None)?;
    let (vae, _) = AutoencoderKL::load(&mut b, &src.join("vae"), None)?;
    super::single_file::check_unet_config(&unet.config)?;
    let blocks = vae.config.block_out_channels.len();
    let mut out_tensors: Vec<RawTensor> = Vec::new();
    for (n, shape, v) in tensors_of(&b, text.table())? {
        out_tensors.push(raw(text_names(&n).remove(0), shape, &v, dtype));
    }
    for (n, shape, v) in tensors_of(&b, unet.table())? {
        out_tensors.push(raw(format!("{UNET_PREFIX}{}", unet_name(&n, &unet.config)?), shape, &v, dtype));
    }
    for (n, mut shape, v) in tensors_of(&b, vae.table())? {
        let ldm = vae_name(&n, blocks)?;
        // LDM's VAE attention projections are 1×1 convolutions ([C, C, 1, 1]).
        if ldm.contains(".mid.attn_1.") && shape.len() == 2 {
            shape.extend([1, 1]);
        }
        out_tensors.push(raw(format!("{VAE_PREFIX}{ldm}"), shape, &v, dtype));
    }
    out_tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = crate::io::safetensors::write_raw_atomic(out, &out_tensors)?;
    Ok((out_tensors.len(), bytes))
}

/// A single-file checkpoint `file` as a pipeline folder `out`, with the configs, tokenizer,
/// scheduler and model_index.json of `config_dir`; returns (component, tensors, bytes).
pub fn single_file_to_folder(
    file: &Path,
    config_dir: &Path,
    out: &Path,
    dtype: ExportDtype,
    ema: bool,
) -> Result<Vec<(String, usize, u64)>> {
    let mut b = CpuBackend::new();
    let (text, unet, vae) = load_models(&mut b, file, config_dir, ema)?;
    let tmp = crate::io::files::temp_path(out);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    std::fs::copy(config_dir.join("model_index.json"), tmp.join("model_index.json"))
        .with_context(|| format!("{}: cannot copy model_index.json", config_dir.display()))?;
    for comp in ["scheduler", "tokenizer", "text_encoder", "unet", "vae"] {
        std::fs::create_dir_all(tmp.join(comp))?;
        for e in std::fs::read_dir(config_dir.join(comp)).with_context(|| format!("{}/{comp}", config_dir.display()))? {
            let p = e?.path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            // Configs and tokenizer files; the config folder's own weights (if any) are not these.
            if p.is_file() && !name.contains(".safetensors") && !name.ends_with(".bin") {
                std::fs::copy(&p, tmp.join(comp).join(&name))
                    .with_context(|| format!("{}: cannot copy", p.display()))?;
            }
        }
    }
    let mut report = Vec::new();
    let parts: [(&str, &str, &Layout); 3] = [
        ("text_encoder", "model.safetensors", text.table()),
        ("unet", "diffusion_pytorch_model.safetensors", unet.table()),
        ("vae", "diffusion_pytorch_model.safetensors", vae.table()),
    ];
    for (comp, file_name, table) in parts {
        let tensors: Vec<RawTensor> =
            tensors_of(&b, table)?.into_iter().map(|(n, shape, v)| raw(n, shape, &v, dtype)).collect();
        let bytes = crate::io::safetensors::write_raw_atomic(&tmp.join(comp).join(file_name), &tensors)?;
        report.push((comp.to_string(), tensors.len(), bytes));
    }
    crate::io::files::replace_dir(&tmp, out)?;
    Ok(report)
}

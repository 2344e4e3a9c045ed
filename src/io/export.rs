//! `roentgen export`: copies a pipeline folder (a training checkpoint, say) into a clean pipeline
//! folder for sharing: model_index.json, the scheduler, the tokenizer and each model's config, with
//! the weights rewritten in f16 or f32. Training state (`training_state/`, `trainer.json`) is left
//! behind; `--ema` ships `unet_ema/` as the U-Net. Non-float tensors are copied unchanged.

use crate::io::safetensors::{RawTensor, SafetensorsFile};
use anyhow::{bail, Context, Result};
use safetensors::Dtype as StDtype;
use std::path::Path;

word_enum!(
    /// The float type an export writes.
    pub enum ExportDtype("export dtype") { F16 = "f16" | "fp16", F32 = "f32" | "fp32" }
);

/// Summary of an export: (component, tensors, bytes written).
pub struct ExportReport {
    pub components: Vec<(String, usize, u64)>,
}

/// Components whose weights are rewritten; the others (scheduler, tokenizer) are copied.
const MODEL_COMPONENTS: [&str; 3] = ["text_encoder", "unet", "vae"];

pub fn export(src: &Path, dst: &Path, dtype: ExportDtype, ema: bool, overwrite: bool) -> Result<ExportReport> {
    if !src.join("model_index.json").is_file() {
        bail!("$model {}: not a pipeline folder (no model_index.json)", src.display());
    }
    if dst.exists() && std::fs::read_dir(dst).map(|mut d| d.next().is_some()).unwrap_or(true) && !overwrite {
        bail!("$out {}: exists and is not empty (pass $overwrite to replace it)", dst.display());
    }
    // Build in a temporary sibling, then rename: an interrupted export never leaves half a model.
    crate::io::files::clean_leftovers(crate::io::files::parent_dir(dst), false)?;
    // What earlier builds left after a kill: this destination's own temporary, under its old name.
    let legacy = dst.with_extension("export-tmp");
    if legacy.is_dir() {
        std::fs::remove_dir_all(&legacy).with_context(|| format!("{}: cannot remove", legacy.display()))?;
    }
    let tmp = crate::io::files::temp_path(dst);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    write_model_index(src, &tmp)?;
    let mut report = ExportReport { components: Vec::new() };
    for comp in ["scheduler", "tokenizer"] {
        let from = src.join(comp);
        if from.is_dir() {
            copy_files(&from, &tmp.join(comp))?;
        }
    }
    for comp in MODEL_COMPONENTS {
        let from = if comp == "unet" && ema { src.join("unet_ema") } else { src.join(comp) };
        if !from.is_dir() {
            if comp == "unet" && ema {
                bail!("$ema: {} has no unet_ema/ (train with $ema)", src.display());
            }
            continue;
        }
        let to = tmp.join(comp);
        std::fs::create_dir_all(&to)?;
        let (mut tensors, mut bytes) = (0usize, 0u64);
        for e in std::fs::read_dir(&from).with_context(|| format!("{}: cannot read", from.display()))? {
            let p = e?.path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.ends_with(".safetensors") {
                let (n, b) = convert(&p, &to.join(&name), dtype)?;
                tensors += n;
                bytes += b;
            } else if p.is_file() {
                std::fs::copy(&p, to.join(&name)).with_context(|| format!("{}: cannot copy", p.display()))?;
            }
        }
        report.components.push((comp.to_string(), tensors, bytes));
    }
    crate::io::files::replace_dir(&tmp, dst)?;
    Ok(report)
}

fn copy_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from).with_context(|| format!("{}: cannot read", from.display()))? {
        let p = e?.path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap()))
                .with_context(|| format!("{}: cannot copy", p.display()))?;
        }
    }
    Ok(())
}

/// Rewrites one safetensors file with its float tensors in `dtype`; returns (tensors, bytes).
fn convert(src: &Path, dst: &Path, dtype: ExportDtype) -> Result<(usize, u64)> {
    let f = SafetensorsFile::open(src)?;
    let st = f.parse()?;
    let mut bufs: Vec<RawTensor> = Vec::new();
    for (name, view) in st.iter() {
        let shape = view.shape().to_vec();
        let (d, bytes) = match crate::io::safetensors::float_dtype(view.dtype()) {
            Some(fd) => {
                let n: usize = shape.iter().product();
                let mut v = vec![0f32; n];
                crate::io::safetensors::to_f32(fd, view.data(), &mut v)
                    .with_context(|| format!("{}: tensor '{name}'", src.display()))?;
                match dtype {
                    ExportDtype::F32 => (StDtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
                    ExportDtype::F16 => {
                        (StDtype::F16, v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect())
                    }
                }
            }
            None => (view.dtype(), view.data().to_vec()),
        };
        bufs.push((name.to_string(), shape, d, bytes));
    }
    bufs.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = crate::io::safetensors::write_raw_atomic(dst, &bufs)?;
    Ok((bufs.len(), bytes))
}

/// model_index.json with every component whose folder the export does not contain (typically
/// `safety_checker` and `feature_extractor`, which roentgen never writes) set to `[null, null]`, and
/// `requires_safety_checker: false` when the safety checker is absent: how diffusers itself saves a
/// pipeline without them, so `from_pretrained` loads the export without looking for missing folders.
fn write_model_index(src: &Path, dst: &Path) -> Result<()> {
    let path = src.join("model_index.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut index: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
    let obj = index.as_object_mut().with_context(|| format!("{}: not a JSON object", path.display()))?;
    let shipped = |name: &str| MODEL_COMPONENTS.contains(&name) || ["scheduler", "tokenizer"].contains(&name);
    let mut dropped_checker = false;
    for (name, value) in obj.iter_mut() {
        let is_component = !name.starts_with('_') && value.as_array().is_some_and(|a| a.len() == 2);
        if is_component && !(shipped(name) && src.join(name).is_dir()) && !value[0].is_null() {
            *value = serde_json::json!([null, null]);
            dropped_checker |= name == "safety_checker";
        }
    }
    if dropped_checker {
        obj.insert("requires_safety_checker".into(), serde_json::Value::Bool(false));
    }
    let out = serde_json::to_string_pretty(&index)? + "\n";
    std::fs::write(dst.join("model_index.json"), out)
        .with_context(|| format!("{}: cannot write", dst.join("model_index.json").display()))
}

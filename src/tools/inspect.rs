//! `roentgen inspect`: what a safetensors file or model folder holds, and what the engine makes of it.

use crate::backend::Backend;
use crate::io::weights;
use crate::models::clip::ClipTextModel;
use crate::models::unet::UNet;
use crate::models::vae::AutoencoderKL;
use crate::models::{load_or_random, Component};
use crate::text::bpe::ClipTokenizer;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::Path;

pub struct InspectOptions<'a> {
    pub variant: Option<&'a str>,
    pub random_weights: bool,
    /// List every tensor (otherwise only counts).
    pub tensors: bool,
}

/// A JSON report of `path`: a .safetensors file, a pipeline folder or a component folder.
pub fn inspect(backend: &mut dyn Backend, path: &Path, opts: &InspectOptions) -> Result<Value> {
    if path.is_file() {
        return inspect_file(path, opts.tensors);
    }
    if !path.exists() {
        bail!("{}: no such file or folder", path.display());
    }
    if !path.is_dir() {
        // A device or a FIFO: say so (check_input_file names what it is).
        crate::io::files::check_input_file(path)?;
    }
    if weights::is_pipeline_folder(path) {
        let mut comps = serde_json::Map::new();
        for (name, (lib, class)) in weights::pipeline_components(path)? {
            let dir = path.join(&name);
            let v = if !dir.is_dir() && matches!(name.as_str(), "safety_checker" | "feature_extractor") {
                json!({"class": class, "library": lib, "note": "absent (not used by roentgen)"})
            } else if !dir.is_dir() {
                json!({"class": class, "library": lib, "error": format!("{}: missing component folder", dir.display())})
            } else {
                let mut v = inspect_component(backend, &dir, Some(&class), opts)?;
                v["library"] = json!(lib);
                v
            };
            comps.insert(name, v);
        }
        return Ok(json!({"path": path.display().to_string(), "kind": "pipeline", "components": comps}));
    }
    // A folder holding nothing of a model (an empty folder, a folder of images) is said, not
    // reported as a component of class "unknown".
    let known = ["config.json", "scheduler_config.json", "vocab.json", "merges.txt", "tokenizer.json", "vocab.txt"];
    let has_model_files = std::fs::read_dir(path)
        .with_context(|| format!("{}: cannot read the folder", path.display()))?
        .filter_map(|e| e.ok())
        .any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            known.contains(&name.as_str())
                || name.ends_with(".safetensors")
                || name.ends_with(".safetensors.index.json")
        });
    if !has_model_files {
        bail!(
            "{}: neither a pipeline folder (no model_index.json) nor a component folder (no config.json, \
             scheduler_config.json, tokenizer files or .safetensors weights)",
            path.display()
        );
    }
    let mut v = inspect_component(backend, path, None, opts)?;
    v["path"] = json!(path.display().to_string());
    Ok(v)
}

fn inspect_file(path: &Path, list: bool) -> Result<Value> {
    let f = weights::WeightFile::open(path)?;
    let infos = f.infos()?;
    let params: usize = infos.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    let mut dtypes = std::collections::BTreeMap::<String, usize>::new();
    for t in &infos {
        *dtypes.entry(t.dtype.clone()).or_default() += 1;
    }
    let (kind, metadata) = match &f {
        weights::WeightFile::Safetensors(st) => {
            ("safetensors".to_string(), st.metadata()?.into_iter().collect::<std::collections::BTreeMap<_, _>>())
        }
        // What the tensors were collected from (a state dict, a checkpoint's, a whole module).
        weights::WeightFile::Torch(t) => {
            (format!("PyTorch checkpoint ({:?} format): {}", t.format, t.root), Default::default())
        }
    };
    // A Stable Diffusion single file (the CompVis layout) says so.
    let single_file = infos.iter().any(|t| t.name.starts_with(crate::models::single_file::UNET_PREFIX));
    let mut v = json!({
        "path": path.display().to_string(),
        "kind": kind,
        "tensor_count": infos.len(),
        "elements": params,
        "dtypes": dtypes,
        "metadata": metadata,
    });
    if single_file {
        v["layout"] = json!("Stable Diffusion single file (CompVis): sample/export/parity take it as --model");
    }
    if list {
        v["tensors"] = serde_json::to_value(&infos)?;
    }
    Ok(v)
}

/// The class a component folder holds, from its config (diffusers `_class_name`, transformers
/// `architectures`/`model_type`) or, for tokenizers and schedulers, its files.
fn component_class(dir: &Path) -> Option<String> {
    for cfg in ["config.json", "scheduler_config.json"] {
        if let Ok(v) = weights::read_json(&dir.join(cfg)) {
            if let Some(c) = v.get("_class_name").and_then(|c| c.as_str()) {
                return Some(c.to_string());
            }
            if let Some(c) = v.pointer("/architectures/0").and_then(|c| c.as_str()) {
                return Some(c.to_string());
            }
            if v.get("model_type").and_then(|c| c.as_str()) == Some("clip_text_model") {
                return Some("CLIPTextModel".into());
            }
        }
    }
    if dir.join("vocab.json").is_file() || dir.join("tokenizer.json").is_file() {
        return Some("CLIPTokenizer".into());
    }
    None
}

fn inspect_component(
    backend: &mut dyn Backend,
    dir: &Path,
    class: Option<&str>,
    opts: &InspectOptions,
) -> Result<Value> {
    let class = class.map(str::to_string).or_else(|| component_class(dir)).unwrap_or_else(|| "unknown".into());
    let mut v = json!({"kind": "component", "class": class});
    for cfg in ["config.json", "scheduler_config.json"] {
        let p = dir.join(cfg);
        if p.is_file() {
            v["config"] = weights::read_json(&p)?;
        }
    }
    match class.as_str() {
        "CLIPTokenizer" | "CLIPTokenizerFast" => {
            let t = ClipTokenizer::from_dir(dir)?;
            v["tokenizer"] = json!({
                "vocab_size": t.vocab_size(), "max_length": t.max_length,
                "bos_id": t.bos_id, "eos_id": t.eos_id, "pad_id": t.pad_id,
            });
            return Ok(v);
        }
        "CLIPTextModel" => {
            describe_model::<ClipTextModel>(backend, dir, opts, &mut v)?;
        }
        "UNet2DConditionModel" => {
            describe_model::<UNet>(backend, dir, opts, &mut v)?;
        }
        "AutoencoderKL" => {
            if let Some(m) = describe_model::<AutoencoderKL>(backend, dir, opts, &mut v)? {
                let (enc, dec) = m.split_params();
                v["parameters_encoder"] = json!(enc);
                v["parameters_decoder"] = json!(dec);
            }
        }
        _ => {}
    }
    if let Some(files) = weights::weight_files_if_any(dir, opts.variant)? {
        let mut tensors = Vec::new();
        for f in &files {
            tensors.extend(weights::WeightFile::open(f)?.infos()?);
        }
        let elements: usize = tensors.iter().map(|t| t.shape.iter().product::<usize>()).sum();
        v["files"] = json!(files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>());
        v["tensor_count"] = json!(tensors.len());
        v["file_elements"] = json!(elements);
        if opts.tensors {
            v["tensors"] = serde_json::to_value(&tensors)?;
        }
    }
    Ok(v)
}

fn describe_load(report: &weights::LoadReport) -> String {
    format!(
        "loaded {} tensors from {} file(s){} ({:?}); ignored buffers: {:?}",
        report.tensors,
        report.files.len(),
        if report.mapped { ", mapped in place" } else { "" },
        report.dtypes,
        report.ignored
    )
}

/// 123060480 → "123,060,480".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The human-readable form of an `inspect` report.
pub fn render_text(v: &Value) -> String {
    let mut s = String::new();
    render_into(&mut s, v, "");
    s
}

fn render_into(s: &mut String, v: &Value, indent: &str) {
    use std::fmt::Write;
    let get = |k: &str| v.get(k);
    if let Some(p) = get("path").and_then(|p| p.as_str()) {
        let _ = writeln!(s, "{indent}{p} ({})", get("kind").and_then(|k| k.as_str()).unwrap_or(""));
    }
    if let Some(c) = get("class").and_then(|c| c.as_str()) {
        let _ = writeln!(s, "{indent}  class: {c}");
    }
    if let Some(e) = get("error").and_then(|e| e.as_str()) {
        let _ = writeln!(s, "{indent}  error: {e}");
    }
    if let Some(pc) = get("parsed_config").and_then(|c| c.as_str()) {
        let _ = writeln!(s, "{indent}  config: {pc}");
    } else if let Some(cfg) = get("config") {
        let _ = writeln!(s, "{indent}  config: {}", serde_json::to_string(cfg).unwrap_or_default());
    }
    if let Some(t) = get("tokenizer") {
        let _ = writeln!(s, "{indent}  tokenizer: {}", serde_json::to_string(t).unwrap_or_default());
    }
    if let Some(n) = get("parameters").and_then(|n| n.as_u64()) {
        let _ = writeln!(s, "{indent}  parameters: {}", thousands(n));
    }
    if let (Some(e), Some(d)) =
        (get("parameters_encoder").and_then(|n| n.as_u64()), get("parameters_decoder").and_then(|n| n.as_u64()))
    {
        let _ = writeln!(
            s,
            "{indent}  parameters: encoder + quant_conv {}, decoder + post_quant_conv {}",
            thousands(e),
            thousands(d)
        );
    }
    if let Some(i) = get("instantiated").and_then(|i| i.as_str()) {
        let _ = writeln!(s, "{indent}  instantiated: {i}");
    }
    if let Some(n) = get("not_implemented").or(get("note")).and_then(|n| n.as_str()) {
        let _ = writeln!(s, "{indent}  note: {n}");
    }
    if let Some(files) = get("files").and_then(|f| f.as_array()) {
        for f in files {
            let _ = writeln!(s, "{indent}  file: {}", f.as_str().unwrap_or(""));
        }
    }
    if let Some(n) = get("tensor_count").and_then(|n| n.as_u64()) {
        let elems = get("file_elements").or(get("elements")).and_then(|e| e.as_u64()).unwrap_or(0);
        let _ = writeln!(s, "{indent}  tensors: {n} ({} elements)", thousands(elems));
    }
    if let Some(d) = get("dtypes") {
        let _ = writeln!(s, "{indent}  dtypes: {}", serde_json::to_string(d).unwrap_or_default());
    }
    if let Some(ts) = get("tensors").and_then(|t| t.as_array()) {
        for t in ts {
            let shape: Vec<String> = t["shape"].as_array().into_iter().flatten().map(|d| d.to_string()).collect();
            let _ = writeln!(
                s,
                "{indent}    {:<72} {:>5} [{}]",
                t["name"].as_str().unwrap_or(""),
                t["dtype"].as_str().unwrap_or(""),
                shape.join(", ")
            );
        }
    }
    if let Some(comps) = get("components").and_then(|c| c.as_object()) {
        for (name, c) in comps {
            let _ = writeln!(s, "{indent}{name}:");
            render_into(s, c, &format!("{indent}  "));
        }
    }
}

/// Adds a model component's parsed config to `v` and, with random weights or when the folder has
/// weight files, instantiates it (its parameter count and how it was instantiated); returns it.
fn describe_model<C: Component>(
    backend: &mut dyn Backend,
    dir: &Path,
    opts: &InspectOptions,
    v: &mut Value,
) -> Result<Option<C>> {
    v["parsed_config"] = json!(format!("{:?}", C::config_from_file(&dir.join("config.json"))?));
    if !opts.random_weights && weights::weight_files_if_any(dir, opts.variant)?.is_none() {
        return Ok(None);
    }
    let (model, report) = load_or_random::<C>(backend, dir, opts.variant, opts.random_weights, false)?;
    v["parameters"] = json!(model.num_params());
    v["instantiated"] = json!(report.as_ref().map_or_else(|| "random weights".to_string(), describe_load));
    Ok(Some(model))
}

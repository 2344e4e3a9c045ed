//! Checkpoints: a complete diffusers pipeline folder (the trained unet/ and text_encoder/, the
//! untouched components copied from the source model) that `StableDiffusionPipeline.from_pretrained`
//! and `roentgen sample` load, plus `training_state/` (AdamW moments, step, options) for `--resume`.
//! Every checkpoint is written to a temporary folder beside its destination and renamed into place,
//! so an interrupted write never damages an existing checkpoint.

use crate::backend::Backend;
use crate::io::files;
use crate::io::safetensors::{write_atomic, OutTensor};
use crate::tensor::{Layout, Tensor};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Writes every tensor of `table` (the parameter layout bound to its pool) as f32 safetensors.
pub fn save_table(b: &dyn Backend, table: &Layout, path: &Path) -> Result<()> {
    let mut data = Vec::with_capacity(table.entries().len());
    for e in table.entries() {
        data.push((
            e.name.clone(),
            e.shape.dims().to_vec(),
            b.download(&Tensor::new(table.pool(), e.offset, e.shape))?,
        ));
    }
    let refs: Vec<(&str, Vec<usize>, OutTensor)> =
        data.iter().map(|(n, s, v)| (n.as_str(), s.clone(), OutTensor::F32(v))).collect();
    write_atomic(path, &refs)
}

fn copy_tree(src: &Path, dst: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
    std::fs::create_dir_all(dst).with_context(|| format!("{}: cannot create", dst.display()))?;
    for e in std::fs::read_dir(src).with_context(|| format!("{}: cannot read", src.display()))? {
        let e = e?;
        let p = e.path();
        if skip(&p) {
            continue;
        }
        let to = dst.join(e.file_name());
        if p.is_dir() {
            copy_tree(&p, &to, skip)?;
        } else {
            std::fs::copy(&p, &to).with_context(|| format!("{}: cannot copy to {}", p.display(), to.display()))?;
        }
    }
    Ok(())
}

/// The weights are written in f32: a config that says otherwise ("torch_dtype"/"dtype": "float16",
/// from an f16 source) would make transformers ≥ 5 load them rounded to f16.
fn mark_f32(config: &Path) -> Result<()> {
    let mut v = crate::io::weights::read_json(config)?;
    if let Some(o) = v.as_object_mut() {
        for key in ["torch_dtype", "dtype"] {
            if o.contains_key(key) {
                o.insert(key.to_string(), serde_json::Value::String("float32".into()));
            }
        }
    }
    std::fs::write(config, serde_json::to_string_pretty(&v)? + "\n")
        .with_context(|| format!("{}: cannot write", config.display()))
}

/// Puts another text encoder's config and tokenizer files in a checkpoint and names their classes in
/// model_index.json, so diffusers builds the pipeline with them.
fn replace_text_components(src: &Path, ckpt: &Path) -> Result<()> {
    std::fs::copy(src.join("config.json"), ckpt.join("text_encoder/config.json"))
        .with_context(|| format!("{}: cannot copy config.json", src.display()))?;
    let tok = ckpt.join("tokenizer");
    if tok.exists() {
        std::fs::remove_dir_all(&tok)?;
    }
    std::fs::create_dir_all(&tok)?;
    let mut wordpiece = false;
    for name in
        ["vocab.txt", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    {
        if src.join(name).is_file() {
            std::fs::copy(src.join(name), tok.join(name))?;
            wordpiece |= name == "vocab.txt";
        }
    }
    let cfg = crate::io::weights::read_json(&src.join("config.json"))?;
    let te_class =
        cfg.pointer("/architectures/0").and_then(|v| v.as_str()).unwrap_or("BertModel").replace("ForMaskedLM", "Model");
    let tok_class = if wordpiece
        || crate::io::weights::read_json(&tok.join("tokenizer.json"))
            .ok()
            .and_then(|j| j.pointer("/model/type").and_then(|t| t.as_str()).map(|t| t == "WordPiece"))
            .unwrap_or(false)
    {
        "BertTokenizer"
    } else {
        "CLIPTokenizer"
    };
    let mi = ckpt.join("model_index.json");
    let mut index = crate::io::weights::read_json(&mi)?;
    index["text_encoder"] = serde_json::json!(["transformers", te_class]);
    index["tokenizer"] = serde_json::json!(["transformers", tok_class]);
    std::fs::write(&mi, serde_json::to_string_pretty(&index)? + "\n")?;
    Ok(())
}

/// What a checkpoint holds besides the models.
pub struct CheckpointContents<'a> {
    /// The pipeline folder training started from (its untouched components are copied).
    pub source: &'a Path,
    pub unet: &'a Layout,
    /// Written as unet/config.json.
    pub unet_config: &'a serde_json::Value,
    pub text_encoder: &'a Layout,
    /// A transformers folder whose config.json and tokenizer files replace the source's
    /// text_encoder/ and tokenizer/ (training with another text encoder).
    pub text_source: Option<&'a Path>,
    /// The U-Net's EMA weights, written as `unet_ema/` (diffusers' name) when training with --ema.
    pub unet_ema: Option<&'a Layout>,
    /// (name, m, v) per optimised model, whole pools.
    pub optimizer: Vec<(&'static str, Tensor, Tensor)>,
    /// step, seed, options, data position: anything `--resume` needs, as JSON.
    pub state: serde_json::Value,
}

/// Writes a checkpoint to `dest` atomically (replacing an existing one only once the new one is
/// complete and synced).
pub fn save(b: &dyn Backend, dest: &Path, c: &CheckpointContents) -> Result<()> {
    write_folder(dest, |tmp| {
        // The pipeline's own files only: model_index.json and the component folders it lists
        // (anything else in the source's root, another run's checkpoints or a stray 30 MB file,
        // is not part of the model). Trained weights are written fresh.
        std::fs::copy(c.source.join("model_index.json"), tmp.join("model_index.json"))
            .with_context(|| format!("{}: cannot copy model_index.json", c.source.display()))?;
        let trained_weights = |p: &Path| -> bool {
            p.extension().is_some_and(|e| e == "safetensors" || e == "bin")
                || p.to_string_lossy().ends_with(".index.json")
        };
        for comp in crate::io::weights::pipeline_components(c.source)?.keys() {
            let from = c.source.join(comp);
            if !from.is_dir() {
                continue;
            }
            let is_trained = comp == "unet" || comp == "text_encoder";
            copy_tree(&from, &tmp.join(comp), &|p: &Path| is_trained && trained_weights(p))?;
        }
        save_table(b, c.unet, &tmp.join("unet/diffusion_pytorch_model.safetensors"))?;
        save_table(b, c.text_encoder, &tmp.join("text_encoder/model.safetensors"))?;
        std::fs::write(tmp.join("unet/config.json"), serde_json::to_string_pretty(c.unet_config)? + "\n")?;
        if let Some(src) = c.text_source {
            replace_text_components(src, tmp)?;
        }
        for comp in ["unet", "text_encoder"] {
            mark_f32(&tmp.join(comp).join("config.json"))?;
        }
        if let Some(ema) = c.unet_ema {
            std::fs::create_dir_all(tmp.join("unet_ema"))?;
            std::fs::copy(tmp.join("unet/config.json"), tmp.join("unet_ema/config.json"))?;
            save_table(b, ema, &tmp.join("unet_ema/diffusion_pytorch_model.safetensors"))?;
        }
        save_training_state(b, tmp, &c.optimizer, &c.state)
    })
}

/// Writes a single-component checkpoint (the VAE of `train-vae`): `config.json`, the weights as
/// `diffusion_pytorch_model.safetensors` (loadable by diffusers' `from_pretrained` on the folder),
/// and `training_state/`, atomically.
pub fn save_component(
    b: &dyn Backend,
    dest: &Path,
    config: &serde_json::Value,
    table: &Layout,
    optimizer: &[(&str, Tensor, Tensor)],
    state: &serde_json::Value,
) -> Result<()> {
    write_folder(dest, |tmp| {
        std::fs::write(tmp.join("config.json"), serde_json::to_string_pretty(config)? + "\n")?;
        mark_f32(&tmp.join("config.json"))?;
        save_table(b, table, &tmp.join("diffusion_pytorch_model.safetensors"))?;
        save_training_state(b, tmp, optimizer, state)
    })
}

/// Builds a checkpoint folder in a temporary beside `dest` with `fill`, then moves it into place
/// (`files::replace_dir`: synced, an existing checkpoint replaced only once the new one is whole).
/// A failed write removes its temporary, so a full disk leaves nothing behind.
fn write_folder(dest: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = files::parent_dir(dest);
    std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
    let tmp = files::temp_path(dest);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove a stale temporary", tmp.display()))?;
    }
    let r = std::fs::create_dir_all(&tmp)
        .with_context(|| format!("{}: cannot create", tmp.display()))
        .and_then(|_| fill(&tmp))
        .and_then(|_| files::replace_dir(&tmp, dest));
    if let Err(e) = r {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("{}: the checkpoint was not written", dest.display())));
    }
    Ok(())
}

/// `training_state/`: the AdamW moments (one pair per optimised model, whole pools) and trainer.json.
fn save_training_state<N: AsRef<str>>(
    b: &dyn Backend,
    dir: &Path,
    optimizer: &[(N, Tensor, Tensor)],
    state: &serde_json::Value,
) -> Result<()> {
    let st = dir.join("training_state");
    std::fs::create_dir_all(&st)?;
    let mut moments = Vec::new();
    for (name, m, v) in optimizer {
        moments.push((format!("{}.exp_avg", name.as_ref()), b.download(m)?));
        moments.push((format!("{}.exp_avg_sq", name.as_ref()), b.download(v)?));
    }
    let refs: Vec<(&str, Vec<usize>, OutTensor)> =
        moments.iter().map(|(n, v)| (n.as_str(), vec![v.len()], OutTensor::F32(v))).collect();
    write_atomic(&st.join("optimizer.safetensors"), &refs)?;
    std::fs::write(st.join("trainer.json"), serde_json::to_string_pretty(state)?)?;
    Ok(())
}

/// The `checkpoint-N` folders under `dir` that hold a training state, oldest (lowest N) first.
pub fn list(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))? {
        let p = e?.path();
        let n = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("checkpoint-"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(n) = n {
            if p.join("training_state/trainer.json").is_file() {
                out.push((n, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Keeps the newest `limit` checkpoints in `dir` (diffusers' --checkpoints_total_limit), removing
/// the oldest; called after a checkpoint was written, so the newest is never at risk. Returns what
/// was removed.
pub fn prune(dir: &Path, limit: usize) -> Result<Vec<PathBuf>> {
    let all = list(dir)?;
    let excess = all.len().saturating_sub(limit.max(1));
    let mut removed = Vec::new();
    for (_, p) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&p).with_context(|| format!("{}: cannot remove an old checkpoint", p.display()))?;
        removed.push(p);
    }
    Ok(removed)
}

/// The newest `checkpoint-N` folder under `dir` (or `dir` itself when it is a checkpoint).
pub fn latest(dir: &Path) -> Result<PathBuf> {
    if dir.join("training_state/trainer.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    match list(dir)?.pop() {
        Some((_, p)) => Ok(p),
        None => bail!("{}: no checkpoint-N folder with training_state/ to resume from", dir.display()),
    }
}

/// Reads `training_state/` of a checkpoint: (trainer.json, AdamW moments by name).
pub fn read_state(ckpt: &Path) -> Result<(serde_json::Value, Vec<(String, Vec<f32>)>)> {
    let st = ckpt.join("training_state");
    let state = crate::io::weights::read_json(&st.join("trainer.json"))?;
    let f = crate::io::safetensors::SafetensorsFile::open(&st.join("optimizer.safetensors"))?;
    let parsed = f.parse()?;
    let mut out = Vec::new();
    for (name, view) in parsed.iter() {
        let mut v = vec![0f32; view.shape().iter().product()];
        crate::io::safetensors::to_f32(crate::tensor::DType::F32, view.data(), &mut v)?;
        out.push((name.to_string(), v));
    }
    Ok((state, out))
}

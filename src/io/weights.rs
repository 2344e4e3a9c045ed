//! Checkpoint folders as diffusers and transformers write them, and loading their tensors into a
//! model's parameter pool.
//!
//! A *pipeline folder* has `model_index.json` and one folder per component (unet/, vae/,
//! text_encoder/, tokenizer/, scheduler/). A *component folder* has `config.json` and its weights:
//! `model.safetensors` (transformers) or `diffusion_pytorch_model.safetensors` (diffusers), or the
//! shards listed by `<name>.safetensors.index.json`, or the same with a variant
//! (`model.fp16.safetensors`, `model.safetensors.index.fp16.json`).

use super::safetensors::{float_dtype, to_f32, SafetensorsFile};
use crate::backend::Backend;
use crate::tensor::{DType, Layout, LayoutEntry};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Reads and parses a JSON file, naming it in every error.
pub fn read_json(path: &Path) -> Result<Value> {
    // A FIFO would block the read for ever; a device never ends.
    crate::io::files::check_input_file(path)?;
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

pub fn is_pipeline_folder(dir: &Path) -> bool {
    dir.join("model_index.json").is_file()
}

/// Component names whose model_index.json entry must be a [library, class] pair (or null /
/// [null, null] when the pipeline was saved without it): the five roentgen reads and the optional
/// ones diffusers' Stable Diffusion pipelines declare.
const COMPONENT_KEYS: &[&str] =
    &["text_encoder", "tokenizer", "unet", "vae", "scheduler", "safety_checker", "feature_extractor", "image_encoder"];

/// A pipeline's model_index.json, checked as diffusers reads it: a JSON object; `_class_name`
/// (when present) a string; every component entry a [library, class] pair of strings, or
/// [null, null] or null for a component saved as absent. Other keys that hold no list are
/// pipeline options (`"requires_safety_checker": false`) and are not components. Returns
/// component name → (library, class), `None` for an absent one. Errors name the file and key.
pub fn read_model_index(dir: &Path) -> Result<BTreeMap<String, Option<(String, String)>>> {
    let path = dir.join("model_index.json");
    let v = read_json(&path)?;
    let obj = v.as_object().with_context(|| format!("{}: expected a JSON object, found {v}", path.display()))?;
    if let Some(c) = obj.get("_class_name") {
        if !c.is_string() {
            bail!("{}: key \"_class_name\" is {c}; expected the pipeline class name (a string)", path.display());
        }
    }
    let mut out = BTreeMap::new();
    for (k, val) in obj {
        if k.starts_with('_') {
            continue;
        }
        let bad = || {
            anyhow::anyhow!(
                "{}: key \"{k}\" is {val}; expected a [library, class] pair of strings (or [null, null] for \
                 an absent component)",
                path.display()
            )
        };
        let entry = match val {
            Value::Null => None,
            Value::Array(a) => match a.as_slice() {
                [Value::Null, Value::Null] => None,
                [Value::String(lib), Value::String(class)] => Some((lib.clone(), class.clone())),
                _ => return Err(bad()),
            },
            _ if COMPONENT_KEYS.contains(&k.as_str()) => return Err(bad()),
            _ => continue, // a pipeline option
        };
        out.insert(k.clone(), entry);
    }
    Ok(out)
}

/// The components a pipeline's model_index.json lists and that are present: name → (library,
/// class).
pub fn pipeline_components(dir: &Path) -> Result<BTreeMap<String, (String, String)>> {
    Ok(read_model_index(dir)?.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).collect())
}

/// Checks that `dir` is a folder, naming what it is otherwise (`/dev/zero`, a FIFO or a weights
/// file where a model folder belongs would otherwise surface as a missing file inside it).
pub fn check_folder(dir: &Path, expected: &str) -> Result<()> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{}: no such file or folder", dir.display()),
        Err(e) => bail!("{}: cannot read: {e}", dir.display()),
        Ok(m) if !m.is_dir() => {
            bail!("{}: is {}, not a folder (expected {expected})", dir.display(), crate::io::files::kind_of(&m))
        }
        Ok(_) => Ok(()),
    }
}

/// The folder of `component` for a model path that is either a pipeline folder (→ dir/component,
/// which must exist) or already a component folder (→ dir).
pub fn component_dir(dir: &Path, component: &str) -> Result<PathBuf> {
    check_folder(dir, &format!("a pipeline folder or its {component}/ folder"))?;
    if is_pipeline_folder(dir) {
        // Every load of a pipeline component passes here: a malformed model_index.json is
        // refused before any component is read, as diffusers would.
        read_model_index(dir)?;
        let sub = dir.join(component);
        if !sub.is_dir() {
            bail!("{}: missing component folder '{component}' of the pipeline", sub.display());
        }
        return Ok(sub);
    }
    Ok(dir.to_path_buf())
}

/// The files holding a component's weights, in the order to read them: safetensors (single or
/// sharded), else PyTorch `.bin` files (single or sharded).
pub fn weight_files(dir: &Path, variant: Option<&str>) -> Result<Vec<PathBuf>> {
    // PyTorch files (older repositories) come after safetensors; they are read without Python
    // (`io::torch`).
    let forms = [
        ("model", "safetensors"),
        ("diffusion_pytorch_model", "safetensors"),
        ("pytorch_model", "bin"),
        ("diffusion_pytorch_model", "bin"),
    ];
    for (base, ext) in forms {
        let (single, index) = match variant {
            Some(v) => (format!("{base}.{v}.{ext}"), format!("{base}.{ext}.index.{v}.json")),
            None => (format!("{base}.{ext}"), format!("{base}.{ext}.index.json")),
        };
        let single = dir.join(single);
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(index);
        if index.is_file() {
            return shard_files(&index);
        }
    }
    let listing = list_weight_like(dir);
    let what = match variant {
        Some(v) => format!("no '{v}' variant weights"),
        None => "no weights".to_string(),
    };
    let hint = if variant.is_none() && listing.iter().any(|f| f.contains(".fp16.")) {
        " (only an fp16 variant is present: pass $variant fp16)"
    } else {
        ""
    };
    bail!(
        "{}: {what}{hint}; expected model.safetensors, diffusion_pytorch_model.safetensors, a \
         *.safetensors.index.json, or their PyTorch forms (pytorch_model.bin, diffusion_pytorch_model.bin, \
         *.bin.index.json) (found: {})",
        dir.display(),
        if listing.is_empty() { "nothing weight-like".to_string() } else { listing.join(", ") }
    )
}

/// Like `weight_files`, but `None` for a folder with no weight files of any kind (a config-only
/// component); a folder that has some but not a loadable set is still an error.
pub fn weight_files_if_any(dir: &Path, variant: Option<&str>) -> Result<Option<Vec<PathBuf>>> {
    match weight_files(dir, variant) {
        Ok(f) => Ok(Some(f)),
        Err(_) if list_weight_like(dir).is_empty() => Ok(None),
        Err(e) => Err(e),
    }
}

fn list_weight_like(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| [".safetensors", ".json", ".bin", ".ckpt", ".pt"].iter().any(|s| n.ends_with(s)))
                .filter(|n| !n.ends_with("config.json") && !n.ends_with("model_index.json"))
                .filter(|n| !["vocab.json", "tokenizer.json", "special_tokens_map.json"].contains(&n.as_str()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The distinct shard files of a `*.safetensors.index.json`, in first-mention order.
fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let v = read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no \"weight_map\" object", index.display()))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut seen = HashSet::new();
    let mut files = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .with_context(|| format!("{}: weight_map[\"{tensor}\"] is not a file name", index.display()))?;
        if seen.insert(file.to_string()) {
            let p = dir.join(file);
            if !p.is_file() {
                bail!("{}: shard listed by {} is missing", p.display(), index.display());
            }
            files.push(p);
        }
    }
    if files.is_empty() {
        bail!("{}: the weight_map lists no shards", index.display());
    }
    Ok(files)
}

/// Names of tensors a checkpoint may carry that are buffers, not parameters, and are ignored.
pub fn no_alias(_: &str) -> Option<String> {
    None
}

pub fn is_known_buffer(name: &str) -> bool {
    name.ends_with("embeddings.position_ids") || name.ends_with("embeddings.token_type_ids")
}

/// What loading found, for reports.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub files: Vec<PathBuf>,
    pub tensors: usize,
    /// dtype on disk → tensor count.
    pub dtypes: BTreeMap<String, usize>,
    pub ignored: Vec<String>,
    /// The file is the parameter pool itself, mapped (`Backend::map_file_pool`), not copied.
    pub mapped: bool,
}

/// Loads every tensor of `table` (a layout bound to the parameter pool) from `files`, converting
/// f16/bf16 to f32 once. Every expected tensor must be present with the expected shape; known
/// buffers are ignored; any other tensor is an error, as is a tensor present in two files.
///
/// `alias`: maps a file's tensor name that is not in the table to the canonical name it stands for
/// (older or newer library versions name some tensors differently: transformers 5 saves
/// CLIPTextModel without "text_model.", diffusers 0.2 named the VAE's attention "query"/"proj_attn",
/// BERT checkpoints may prefix "bert." and name LayerNorm's parameters gamma/beta). `ignored`: the
/// tensors a checkpoint may carry that the model does not use ([`is_known_buffer`] for most; a
/// BERT checkpoint's pooler and heads too).
pub fn load_into(
    backend: &dyn Backend,
    table: &Layout,
    files: &[PathBuf],
    alias: &dyn Fn(&str) -> Option<String>,
    ignored: &dyn Fn(&str) -> bool,
) -> Result<LoadReport> {
    let opened: Vec<WeightFile> = files.iter().map(|p| WeightFile::open(p)).collect::<Result<_>>()?;
    let parsed: Vec<Box<dyn TensorContainer + '_>> = opened.iter().map(|f| f.container()).collect::<Result<_>>()?;
    let containers: Vec<&dyn TensorContainer> = parsed.iter().map(|c| c.as_ref()).collect();
    load_from(backend, table, &containers, alias, ignored)
}

/// A weight file of either format, told apart by its first bytes.
pub enum WeightFile {
    Safetensors(SafetensorsFile),
    Torch(super::torch::TorchFile),
}

impl WeightFile {
    pub fn open(path: &Path) -> Result<WeightFile> {
        Ok(if super::torch::is_torch_file(path) {
            WeightFile::Torch(super::torch::TorchFile::open(path)?)
        } else {
            WeightFile::Safetensors(SafetensorsFile::open(path)?)
        })
    }

    pub fn container(&self) -> Result<Box<dyn TensorContainer + '_>> {
        Ok(match self {
            WeightFile::Safetensors(f) => Box::new(SafetensorsContainer { path: &f.path, st: f.parse()? }),
            WeightFile::Torch(t) => Box::new(TorchContainer(t)),
        })
    }

    /// Name, dtype and shape of every tensor.
    pub fn infos(&self) -> Result<Vec<super::safetensors::TensorInfo>> {
        match self {
            WeightFile::Safetensors(f) => f.infos(),
            WeightFile::Torch(t) => Ok(t
                .tensors()
                .iter()
                .map(|(n, x)| super::safetensors::TensorInfo {
                    name: n.clone(),
                    dtype: x.dtype.name().to_string(),
                    shape: x.shape.clone(),
                })
                .collect()),
        }
    }
}

/// One tensor as a container holds it: its type (None: not F32, F16 or BF16, with the type's
/// name), shape and little-endian bytes (in place where the container allows).
pub struct ContainedTensor<'a> {
    pub dtype: std::result::Result<DType, String>,
    pub shape: Vec<usize>,
    pub data: std::borrow::Cow<'a, [u8]>,
}

/// Named tensors in a file: a safetensors file, or a PyTorch checkpoint (`io::torch`).
pub trait TensorContainer {
    /// The file, for messages.
    fn path(&self) -> &Path;
    /// Every tensor name, sorted.
    fn names(&self) -> Vec<String>;
    fn tensor(&self, name: &str) -> Result<ContainedTensor<'_>>;
}

/// A parsed safetensors file.
pub struct SafetensorsContainer<'a> {
    pub path: &'a Path,
    pub st: safetensors::SafeTensors<'a>,
}

impl TensorContainer for SafetensorsContainer<'_> {
    fn path(&self) -> &Path {
        self.path
    }
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.st.names().into_iter().map(|s| s.to_string()).collect();
        names.sort();
        names
    }
    fn tensor(&self, name: &str) -> Result<ContainedTensor<'_>> {
        let view = self.st.tensor(name).with_context(|| format!("{}: tensor '{name}'", self.path.display()))?;
        Ok(ContainedTensor {
            dtype: float_dtype(view.dtype()).ok_or_else(|| format!("{:?}", view.dtype())),
            shape: view.shape().to_vec(),
            data: std::borrow::Cow::Borrowed(view.data()),
        })
    }
}

/// A PyTorch checkpoint as a tensor container.
pub struct TorchContainer<'a>(pub &'a super::torch::TorchFile);

impl TensorContainer for TorchContainer<'_> {
    fn path(&self) -> &Path {
        &self.0.path
    }
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.0.tensors().iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        names
    }
    fn tensor(&self, name: &str) -> Result<ContainedTensor<'_>> {
        use super::torch::ElemType;
        let t = self.0.get(name).with_context(|| format!("{}: no tensor '{name}'", self.0.path.display()))?;
        Ok(ContainedTensor {
            dtype: match t.dtype {
                ElemType::F32 => Ok(DType::F32),
                ElemType::F16 => Ok(DType::F16),
                ElemType::BF16 => Ok(DType::BF16),
                other => Err(other.name().to_string()),
            },
            shape: t.shape.clone(),
            data: self.0.bytes(t)?,
        })
    }
}

/// As [`load_into`], from tensor containers of any format.
pub fn load_from(
    backend: &dyn Backend,
    table: &Layout,
    containers: &[&dyn TensorContainer],
    alias: &dyn Fn(&str) -> Option<String>,
    ignored: &dyn Fn(&str) -> bool,
) -> Result<LoadReport> {
    let files: Vec<PathBuf> = containers.iter().map(|c| c.path().to_path_buf()).collect();
    let mut report = LoadReport { files: files.clone(), ..Default::default() };
    let mut loaded: HashSet<&str> = HashSet::new();
    let mut unexpected: Vec<String> = Vec::new();
    let mut scratch: Vec<f32> = Vec::new();
    let pool = table_pool(table)?;
    for c in containers {
        let path = c.path();
        for name in c.names() {
            let Some(entry) = resolve(table, &name, alias) else {
                if ignored(&name) {
                    report.ignored.push(name);
                } else {
                    unexpected.push(name);
                }
                continue;
            };
            if loaded.contains(entry.name.as_str()) {
                bail!(
                    "{}: tensor '{name}' stands for '{}', which appears more than once (in this or another weight file)",
                    path.display(),
                    entry.name
                );
            }
            let view = c.tensor(&name)?;
            let dtype = view.dtype.map_err(|other| {
                anyhow::anyhow!(
                    "{}: tensor '{name}' has dtype {other}; parameters must be F32, F16 or BF16",
                    path.display()
                )
            })?;
            if !same_shape(&view.shape, entry.shape.dims()) {
                bail!(
                    "{}: tensor '{name}' has shape {:?}, but the config implies {:?}",
                    path.display(),
                    view.shape,
                    entry.shape.dims()
                );
            }
            scratch.resize(entry.shape.numel(), 0.0);
            to_f32(dtype, &view.data, &mut scratch).with_context(|| format!("{}: tensor '{name}'", path.display()))?;
            let t = crate::tensor::Tensor::new(pool, entry.offset, entry.shape);
            backend.upload(&t, &scratch)?;
            loaded.insert(entry.name.as_str());
            report.tensors += 1;
            *report.dtypes.entry(dtype.to_string()).or_default() += 1;
        }
    }
    let missing: Vec<&str> = table.entries().iter().map(|e| e.name.as_str()).filter(|n| !loaded.contains(n)).collect();
    let where_ = files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    if !missing.is_empty() {
        bail!(
            "{where_}: {} expected tensor(s) missing: {}",
            missing.len(),
            abbreviate(&missing.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        );
    }
    if !unexpected.is_empty() {
        bail!(
            "{where_}: {} unexpected tensor(s) that the config does not imply (wrong model type or config?): {}",
            unexpected.len(),
            abbreviate(&unexpected)
        );
    }
    Ok(report)
}

/// The table entry a file's tensor `name` fills: its own name, or the one `alias` gives.
fn resolve<'a>(table: &'a Layout, name: &str, alias: &dyn Fn(&str) -> Option<String>) -> Option<&'a LayoutEntry> {
    table.find(name).or_else(|| alias(name).and_then(|a| table.find(&a)))
}

/// Whether a file's shape fits a table shape. A 1×1 convolution stored where a linear layer is
/// expected (or the reverse) has the same elements in the same order: shapes are compared
/// without trailing 1s.
fn same_shape(file: &[usize], table: &[usize]) -> bool {
    let squeeze = |s: &[usize]| {
        let n = s.iter().rposition(|&d| d != 1).map_or(0, |i| i + 1);
        s[..n].to_vec()
    };
    squeeze(file) == squeeze(table)
}

/// A weight file that can serve as the parameter pool itself, mapped (`Backend::map_file_pool`):
/// where its data section starts (bytes), its length in f32 elements, and each table tensor's
/// offset in it (elements).
pub struct Placement {
    pub path: PathBuf,
    pub data_start: usize,
    pub len: usize,
    pub offsets: HashMap<String, usize>,
    pub report: LoadReport,
}

/// Where `table`'s tensors (a measured layout) lie in the checkpoint `files`, when they can be
/// used in place: one file, every tensor the table needs present once, in f32, 4-byte aligned,
/// with the table's shape, and every other tensor one that is ignored. None otherwise: the tensors
/// are then copied by `load_into`, which also names whatever is wrong.
pub fn placement(
    table: &Layout,
    files: &[PathBuf],
    alias: &dyn Fn(&str) -> Option<String>,
    ignored: &dyn Fn(&str) -> bool,
) -> Result<Option<Placement>> {
    let [path] = files else { return Ok(None) };
    if super::torch::is_torch_file(path) {
        return Ok(None);
    }
    let file = SafetensorsFile::open(path)?;
    let st = file.parse()?;
    let bytes = file.bytes();
    // The format: an 8-byte little-endian header length, the JSON header, then the data.
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().expect("validated by parse")) as usize;
    if data_start % 4 != 0 {
        return Ok(None);
    }
    let mut report = LoadReport { files: files.to_vec(), mapped: true, ..Default::default() };
    let mut offsets = HashMap::new();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for name in names {
        let view = st.tensor(&name).with_context(|| format!("{}: tensor '{name}'", path.display()))?;
        let Some(entry) = resolve(table, &name, alias) else {
            if !ignored(&name) {
                return Ok(None);
            }
            report.ignored.push(name);
            continue;
        };
        let at = view.data().as_ptr() as usize - bytes.as_ptr() as usize - data_start;
        let fits = float_dtype(view.dtype()) == Some(DType::F32) && at % 4 == 0;
        if !fits
            || !same_shape(view.shape(), entry.shape.dims())
            || offsets.insert(entry.name.clone(), at / 4).is_some()
        {
            return Ok(None);
        }
    }
    if offsets.len() != table.entries().len() {
        return Ok(None);
    }
    report.tensors = offsets.len();
    report.dtypes.insert(DType::F32.to_string(), offsets.len());
    let len = (bytes.len() - data_start) / 4;
    Ok(Some(Placement { path: path.clone(), data_start, len, offsets, report }))
}

fn table_pool(table: &Layout) -> Result<crate::tensor::PoolId> {
    let p = table.pool();
    if p == crate::tensor::PoolId::UNBOUND {
        bail!("internal: loading into an unbound parameter layout");
    }
    Ok(p)
}

/// The first few names and a count of the rest.
pub fn abbreviate(names: &[String]) -> String {
    const SHOW: usize = 8;
    let mut s = names.iter().take(SHOW).map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ");
    if names.len() > SHOW {
        s.push_str(&format!(" and {} more", names.len() - SHOW));
    }
    s
}

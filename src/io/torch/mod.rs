//! PyTorch checkpoints (`.pt`, `.pth`, `.ckpt`, `.bin`) read without Python and without running
//! anything in them: the zip format of `torch.save` (PyTorch ≥ 1.6) and the legacy format before
//! it (consecutive pickles, then the raw storages), through a restricted unpickler
//! ([`pickle`]) that only simulates the calls a checkpoint needs and refuses every other by name.
//!
//! What the file holds decides the tensor names, as `state_dict()` would give them:
//! - a state dict (a dict of tensors, nested dicts joined with dots): its keys;
//! - a Lightning/CompVis checkpoint (`{"state_dict": {...}, "global_step": ...}`): its state dict;
//! - a whole module (`torch.save(model)`, e.g. torchxrayvision's DenseNet): the module's
//!   `_parameters` and persistent `_buffers`, then its `_modules`, recursively — the record of each
//!   class is read as data, the class is never imported.
//!
//! Storages stay in the memory-mapped file (stored zip entries, legacy data) and are read on
//! demand; views (offsets, strides, storages shared by several tensors) are resolved per read.

mod pickle;
mod zip;

use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use pickle::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The element types of PyTorch storages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl ElemType {
    /// From a storage class (`torch.FloatStorage`, …; `UntypedStorage` is bytes).
    fn from_storage_class(name: &str) -> Option<ElemType> {
        Some(match name {
            "DoubleStorage" => ElemType::F64,
            "FloatStorage" => ElemType::F32,
            "HalfStorage" => ElemType::F16,
            "BFloat16Storage" => ElemType::BF16,
            "LongStorage" => ElemType::I64,
            "IntStorage" => ElemType::I32,
            "ShortStorage" => ElemType::I16,
            "CharStorage" => ElemType::I8,
            "ByteStorage" | "UntypedStorage" => ElemType::U8,
            "BoolStorage" => ElemType::Bool,
            _ => return None,
        })
    }

    /// From a `torch.<dtype>` name.
    fn from_dtype_name(name: &str) -> Option<ElemType> {
        Some(match name {
            "float64" | "double" => ElemType::F64,
            "float32" | "float" => ElemType::F32,
            "float16" | "half" => ElemType::F16,
            "bfloat16" => ElemType::BF16,
            "int64" | "long" => ElemType::I64,
            "int32" | "int" => ElemType::I32,
            "int16" | "short" => ElemType::I16,
            "int8" => ElemType::I8,
            "uint8" => ElemType::U8,
            "bool" => ElemType::Bool,
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            ElemType::F64 | ElemType::I64 => 8,
            ElemType::F32 | ElemType::I32 => 4,
            ElemType::F16 | ElemType::BF16 | ElemType::I16 => 2,
            ElemType::I8 | ElemType::U8 | ElemType::Bool => 1,
        }
    }

    /// safetensors' name of the type.
    pub fn name(self) -> &'static str {
        match self {
            ElemType::F64 => "F64",
            ElemType::F32 => "F32",
            ElemType::F16 => "F16",
            ElemType::BF16 => "BF16",
            ElemType::I64 => "I64",
            ElemType::I32 => "I32",
            ElemType::I16 => "I16",
            ElemType::I8 => "I8",
            ElemType::U8 => "U8",
            ElemType::Bool => "BOOL",
        }
    }

    /// One little-endian element as f32 (f64 and wide integers rounded).
    fn to_f32(self, b: &[u8]) -> f32 {
        match self {
            ElemType::F64 => f64::from_le_bytes(b.try_into().unwrap()) as f32,
            ElemType::F32 => f32::from_le_bytes(b.try_into().unwrap()),
            ElemType::F16 => half::f16::from_bits(u16::from_le_bytes(b.try_into().unwrap())).to_f32(),
            ElemType::BF16 => half::bf16::from_bits(u16::from_le_bytes(b.try_into().unwrap())).to_f32(),
            ElemType::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f32,
            ElemType::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f32,
            ElemType::I16 => i16::from_le_bytes(b.try_into().unwrap()) as f32,
            ElemType::I8 => b[0] as i8 as f32,
            ElemType::U8 => b[0] as f32,
            ElemType::Bool => (b[0] != 0) as u8 as f32,
        }
    }
}

/// A storage a pickle refers to: its key in the file, element type, and (legacy views) where the
/// view starts in its root storage, in elements.
#[derive(Debug)]
pub struct StorageRef {
    key: String,
    dtype: ElemType,
    elem_offset: usize,
}

/// A tensor as the pickle describes it: a strided view of a storage.
#[derive(Debug)]
pub struct TensorRef {
    storage: Rc<StorageRef>,
    dtype: ElemType,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// One tensor of a checkpoint: a strided view of a storage, checked to lie inside it.
#[derive(Clone, Debug)]
pub struct TorchTensor {
    pub dtype: ElemType,
    pub shape: Vec<usize>,
    stride: Vec<usize>,
    /// In elements from the storage's start.
    offset: usize,
    storage: String,
}

impl TorchTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn is_contiguous(&self) -> bool {
        let mut expect = 1;
        for (&n, &s) in self.shape.iter().zip(&self.stride).rev() {
            if n != 1 && s != expect {
                return false;
            }
            expect *= n;
        }
        true
    }
}

/// The largest expanded view (more elements than its storage) read.
const MAX_EXPANDED_BYTES: usize = 1 << 30;

/// Where a storage's bytes are.
enum Span {
    /// In the mapped file.
    Mapped { start: usize, len: usize },
    /// Inflated from a deflated zip entry.
    Owned(Vec<u8>),
}

/// The container a checkpoint came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `torch.save` since PyTorch 1.6.
    Zip,
    /// `torch.save` before 1.6 (or `_use_new_zipfile_serialization=False`).
    Legacy,
}

/// A PyTorch checkpoint, its tensors named as `state_dict()` names them.
pub struct TorchFile {
    pub path: PathBuf,
    pub format: Format,
    /// What the tensors were collected from (for reports): "state dict", "state_dict of a
    /// checkpoint", "module torchxrayvision.models.DenseNet".
    pub root: String,
    map: Mmap,
    spans: HashMap<String, Span>,
    tensors: Vec<(String, TorchTensor)>,
}

/// Whether `path` looks like a PyTorch checkpoint, by its first bytes: a zip archive, or a pickle
/// (PROTO 2–5). A safetensors file can begin with 0x80 too (its header length is little-endian),
/// but its ninth byte opens the JSON header.
pub fn is_torch_file(path: &Path) -> bool {
    let mut head = [0u8; 9];
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    let n = std::io::Read::read(&mut f, &mut head).unwrap_or(0);
    if n >= 4 && head[..4] == *b"PK\x03\x04" {
        return true;
    }
    n >= 2 && head[0] == 0x80 && (2..=5).contains(&head[1]) && !(n == 9 && head[8] == b'{')
}

impl TorchFile {
    pub fn open(path: &Path) -> Result<TorchFile> {
        let at = || path.display().to_string();
        let f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", at()))?;
        // SAFETY: read-only map of a file we do not write; a concurrent writer could change the
        // bytes, never the map's bounds.
        let map = unsafe { Mmap::map(&f) }.with_context(|| format!("{}: cannot map", at()))?;
        let (format, root, spans) = if map.starts_with(b"PK\x03\x04") {
            let (root, spans) = read_zip(&map).with_context(|| format!("{}: PyTorch zip checkpoint", at()))?;
            (Format::Zip, root, spans)
        } else if map.first() == Some(&0x80) {
            let (root, spans) = read_legacy(&map).with_context(|| format!("{}: PyTorch legacy checkpoint", at()))?;
            (Format::Legacy, root, spans)
        } else if map.len() > 262 && &map[257..262] == b"ustar" {
            bail!("{}: a tar archive (PyTorch < 0.4's format), which roentgen does not read; re-save it with a newer PyTorch", at())
        } else {
            bail!("{}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)", at())
        };
        let (what, tensors) = collect(&root).with_context(|| format!("{}: collecting tensors", at()))?;
        let mut file = TorchFile { path: path.to_path_buf(), format, root: what, map, spans, tensors: Vec::new() };
        for (name, t) in tensors {
            let t = file.checked(&name, &t).with_context(|| format!("{}: tensor '{name}'", at()))?;
            file.tensors.push((name, t));
        }
        Ok(file)
    }

    /// The tensors, in the file's order.
    pub fn tensors(&self) -> &[(String, TorchTensor)] {
        &self.tensors
    }

    pub fn get(&self, name: &str) -> Option<&TorchTensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    fn storage(&self, key: &str) -> Result<&[u8]> {
        match self.spans.get(key) {
            Some(Span::Mapped { start, len }) => Ok(&self.map[*start..*start + *len]),
            Some(Span::Owned(v)) => Ok(v),
            None => bail!("storage '{key}' is not in the file"),
        }
    }

    /// The tensor with its storage resolved and every element it addresses inside the storage.
    fn checked(&self, _name: &str, t: &TensorRef) -> Result<TorchTensor> {
        let bytes = self.storage(&t.storage.key)?;
        let elems = bytes.len() / t.dtype.size();
        let offset = t.offset.checked_add(t.storage.elem_offset).context("offset overflows")?;
        let numel = t.shape.iter().try_fold(1usize, |a, &n| a.checked_mul(n)).context("size overflows")?;
        // A view with a zero stride (an expanded tensor) can address more elements than its
        // storage holds, which reading materialises: bounded, so a hostile size cannot exhaust
        // memory.
        if numel > elems && numel.checked_mul(t.dtype.size()).is_none_or(|b| b > MAX_EXPANDED_BYTES) {
            bail!(
                "an expanded view of {numel} elements from a storage of {elems}: more than {} MiB to materialise",
                MAX_EXPANDED_BYTES >> 20
            );
        }
        if numel > 0 {
            let last =
                t.shape.iter().zip(&t.stride).try_fold(offset, |a, (&n, &s)| a.checked_add((n - 1).checked_mul(s)?));
            match last {
                Some(l) if l < elems => {}
                _ => bail!(
                    "size {:?}, stride {:?}, offset {offset} reach past its storage '{}' of {elems} {} elements",
                    t.shape,
                    t.stride,
                    t.storage.key,
                    t.dtype.name()
                ),
            }
        }
        Ok(TorchTensor {
            dtype: t.dtype,
            shape: t.shape.clone(),
            stride: t.stride.clone(),
            offset,
            storage: t.storage.key.clone(),
        })
    }

    /// The tensor's elements in row-major order, as little-endian bytes of its type (in place
    /// when the view is contiguous).
    pub fn bytes(&self, t: &TorchTensor) -> Result<std::borrow::Cow<'_, [u8]>> {
        let s = self.storage(&t.storage)?;
        let e = t.dtype.size();
        if t.numel() == 0 {
            // An empty view's offset is never checked against the storage (nothing is read).
            return Ok(std::borrow::Cow::Borrowed(&[]));
        }
        if t.is_contiguous() {
            return Ok(std::borrow::Cow::Borrowed(&s[t.offset * e..(t.offset + t.numel()) * e]));
        }
        let mut out = Vec::with_capacity(t.numel() * e);
        let mut index = vec![0usize; t.shape.len()];
        for _ in 0..t.numel() {
            let at = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&s[at * e..(at + 1) * e]);
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < t.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok(std::borrow::Cow::Owned(out))
    }

    /// The tensor's elements as f32, row-major.
    pub fn read_f32(&self, t: &TorchTensor) -> Result<Vec<f32>> {
        let e = t.dtype.size();
        Ok(self.bytes(t)?.chunks_exact(e).map(|b| t.dtype.to_f32(b)).collect())
    }
}

/// A zip checkpoint: `<prefix>/data.pkl` and its storages `<prefix>/data/<key>`.
fn read_zip(map: &Mmap) -> Result<(Value, HashMap<String, Span>)> {
    let entries = zip::entries(map)?;
    let pkl = entries
        .iter()
        .filter(|e| e.name.ends_with("data.pkl") && !e.name.contains(".data/"))
        .min_by_key(|e| e.name.len())
        .context("no data.pkl in the archive (a zip, but not a torch.save checkpoint)")?;
    let prefix = pkl.name.strip_suffix("data.pkl").unwrap().to_string();
    if let Some(bo) = entries.iter().find(|e| e.name == format!("{prefix}byteorder")) {
        let order = zip::read(map, bo)?;
        if order.as_ref() != b"little" {
            bail!("byte order {:?}: only little-endian checkpoints are read", String::from_utf8_lossy(&order));
        }
    }
    let data = zip::read(map, pkl)?;
    let mut keys: Vec<String> = Vec::new();
    let (root, _) = pickle::load(&data, &mut |pid| {
        let t = pid.items().context("a persistent id is not a tuple")?;
        match t.as_slice() {
            [tag, Value::Global(class), key, _location, _numel] if tag.as_str() == Some("storage") => {
                let dtype = ElemType::from_storage_class(&class.name)
                    .with_context(|| format!("storage type {class} is not read (supported: float, half, bfloat16, double, integer and bool storages)"))?;
                let key = key.as_str().context("a storage key is not a string")?.to_string();
                keys.push(key.clone());
                Ok(Value::Storage(Rc::new(StorageRef { key, dtype, elem_offset: 0 })))
            }
            _ => bail!("a persistent id that is not ('storage', type, key, location, size)"),
        }
    })?;
    let mut spans = HashMap::new();
    for key in keys {
        if spans.contains_key(&key) {
            continue;
        }
        let name = format!("{prefix}data/{key}");
        let e =
            entries.iter().find(|e| e.name == name).with_context(|| format!("storage entry '{name}' is missing"))?;
        let span = match zip::read(map, e)? {
            std::borrow::Cow::Borrowed(s) => {
                Span::Mapped { start: s.as_ptr() as usize - map.as_ptr() as usize, len: s.len() }
            }
            std::borrow::Cow::Owned(v) => Span::Owned(v),
        };
        spans.insert(key, span);
    }
    Ok((root, spans))
}

/// The legacy format: pickles of the magic number, the protocol version and the system info,
/// then the object (its persistent ids name storages by key, with an optional view of a root
/// storage), then the sorted storage keys; then each storage as its element count (u64) and its
/// bytes.
fn read_legacy(map: &Mmap) -> Result<(Value, HashMap<String, Span>)> {
    const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    let mut no_pid = |_: Value| -> Result<Value> { bail!("a persistent id in a header pickle") };
    let (magic, mut pos) = pickle::load(map, &mut no_pid)?;
    if !matches!(&magic, Value::Long(b) if **b == MAGIC) {
        bail!("a pickle, but without torch.save's magic number (not a PyTorch checkpoint)");
    }
    let (version, n) = pickle::load(&map[pos..], &mut no_pid)?;
    pos += n;
    if version.as_int() != Some(1001) {
        bail!("legacy protocol version {version:?}; 1001 is read");
    }
    let (sys_info, n) = pickle::load(&map[pos..], &mut no_pid)?;
    pos += n;
    if matches!(sys_info.get("little_endian"), Some(Value::Bool(false))) {
        bail!("saved on a big-endian machine; only little-endian checkpoints are read");
    }
    let mut types: HashMap<String, ElemType> = HashMap::new();
    let (root, n) = pickle::load(&map[pos..], &mut |pid| {
        let t = pid.items().context("a persistent id is not a tuple")?;
        match t.as_slice() {
            [tag, Value::Global(class), key, _location, _size, view] if tag.as_str() == Some("storage") => {
                let dtype = ElemType::from_storage_class(&class.name)
                    .with_context(|| format!("storage type {class} is not read"))?;
                let key = key.as_str().context("a storage key is not a string")?.to_string();
                types.insert(key.clone(), dtype);
                let elem_offset = match view {
                    Value::None => 0,
                    v => match v.items().as_deref() {
                        Some([_view_key, offset, _view_size]) => {
                            offset.as_int().and_then(|o| usize::try_from(o).ok()).context("a view offset")?
                        }
                        _ => bail!("a storage view that is not (key, offset, size)"),
                    },
                };
                Ok(Value::Storage(Rc::new(StorageRef { key, dtype, elem_offset })))
            }
            // A module class with its source (legacy saves of whole modules): the class.
            [tag, class @ Value::Global(_), _source_file, _source] if tag.as_str() == Some("module") => Ok(class.clone()),
            _ => bail!("a persistent id that is not ('storage', type, key, location, size, view) or ('module', class, file, source)"),
        }
    })?;
    pos += n;
    let (keys, n) = pickle::load(&map[pos..], &mut no_pid)?;
    pos += n;
    let keys = keys.items().context("the storage key list is not a list")?;
    let mut spans = HashMap::new();
    for k in keys {
        let key = k.as_str().context("a storage key is not a string")?.to_string();
        let dtype = *types.get(&key).with_context(|| format!("storage '{key}' is listed but never used"))?;
        let count = map.get(pos..pos + 8).context("the storages end early (truncated file?)")?;
        let count = u64::from_le_bytes(count.try_into().unwrap());
        let len = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(dtype.size()))
            .filter(|&l| l <= map.len() - pos - 8)
            .with_context(|| format!("storage '{key}' claims {count} elements, past the end of the file"))?;
        spans.insert(key, Span::Mapped { start: pos + 8, len });
        pos += 8 + len;
    }
    Ok((root, spans))
}

/// Nesting deeper than this is refused (a hostile file must not overflow the stack).
const MAX_DEPTH: usize = 64;

/// The tensors of a checkpoint's object, named as `state_dict()` names them.
fn collect(root: &Value) -> Result<(String, Vec<(String, TensorRef)>)> {
    let mut out = Vec::new();
    let what = match root {
        Value::Dict(_) if matches!(root.get("state_dict"), Some(Value::Dict(_))) => {
            collect_value(&root.get("state_dict").unwrap(), "", &mut out, 0)?;
            "the state_dict of a checkpoint".to_string()
        }
        Value::Dict(_) => {
            collect_value(root, "", &mut out, 0)?;
            "a state dict".to_string()
        }
        Value::Object(o) => {
            collect_value(root, "", &mut out, 0)?;
            format!("a whole module ({})", o.borrow().class)
        }
        _ => bail!("the checkpoint holds no dict of tensors and no module"),
    };
    Ok((what, out))
}

fn tensor_of(v: &Value) -> Option<TensorRef> {
    match v {
        Value::Tensor(t) => Some(TensorRef {
            storage: t.storage.clone(),
            dtype: t.dtype,
            offset: t.offset,
            shape: t.shape.clone(),
            stride: t.stride.clone(),
        }),
        _ => None,
    }
}

fn key_of(k: &Value) -> Option<String> {
    match k {
        Value::Str(s) => Some(s.to_string()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn collect_value(v: &Value, prefix: &str, out: &mut Vec<(String, TensorRef)>, depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        bail!("nested more than {MAX_DEPTH} levels deep");
    }
    match v {
        Value::Dict(d) => {
            for (k, v) in d.borrow().iter() {
                let Some(k) = key_of(k) else { continue };
                let name = format!("{prefix}{k}");
                match tensor_of(v) {
                    Some(t) => out.push((name, t)),
                    None => collect_value(v, &format!("{name}."), out, depth + 1)?,
                }
            }
        }
        Value::Object(o) => {
            let state = o.borrow().state.clone();
            // nn.Module: parameters, persistent buffers, then submodules (state_dict's order).
            if state.get("_parameters").is_none() && state.get("_modules").is_none() {
                return Ok(());
            }
            let skip: Vec<String> = state
                .get("_non_persistent_buffers_set")
                .and_then(|s| match s {
                    Value::Set(s) => Some(s.borrow().iter().filter_map(key_of).collect()),
                    _ => None,
                })
                .unwrap_or_default();
            for (field, persistent_only) in [("_parameters", false), ("_buffers", true)] {
                if let Some(Value::Dict(d)) = state.get(field) {
                    for (k, v) in d.borrow().iter() {
                        let (Some(k), Some(t)) = (key_of(k), tensor_of(v)) else { continue };
                        if !(persistent_only && skip.contains(&k)) {
                            out.push((format!("{prefix}{k}"), t));
                        }
                    }
                }
            }
            if let Some(Value::Dict(d)) = state.get("_modules") {
                for (k, m) in d.borrow().iter() {
                    if let Some(k) = key_of(k) {
                        collect_value(m, &format!("{prefix}{k}."), out, depth + 1)?;
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

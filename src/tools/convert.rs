//! `roentgen convert`: a PyTorch checkpoint (read without Python, `io::torch`) to safetensors, for
//! those who want a copy every tool can map. Tensors keep their names (`state_dict()`'s), shapes
//! and element types; views become contiguous; storages shared by several tensors are written once
//! per tensor (safetensors has no aliasing). The header's metadata records the source file and its
//! SHA-256.

use crate::io::files::{check_output_file, Existing};
use crate::io::torch::{ElemType, TorchFile};
use anyhow::{bail, Result};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// What a conversion wrote.
pub struct ConvertReport {
    pub tensors: usize,
    pub bytes: u64,
    /// Tensors per element type.
    pub dtypes: BTreeMap<&'static str, usize>,
    /// What the tensors were collected from (a state dict, a checkpoint's, a whole module).
    pub root: String,
    pub source_sha256: String,
}

fn dtype(e: ElemType) -> Dtype {
    match e {
        ElemType::F64 => Dtype::F64,
        ElemType::F32 => Dtype::F32,
        ElemType::F16 => Dtype::F16,
        ElemType::BF16 => Dtype::BF16,
        ElemType::I64 => Dtype::I64,
        ElemType::I32 => Dtype::I32,
        ElemType::I16 => Dtype::I16,
        ElemType::I8 => Dtype::I8,
        ElemType::U8 => Dtype::U8,
        ElemType::Bool => Dtype::BOOL,
    }
}

pub fn convert(input: &Path, output: &Path, overwrite: bool) -> Result<ConvertReport> {
    check_output_file(output, if overwrite { Existing::Replace } else { Existing::Refuse }, "output")?;
    let file = TorchFile::open(input)?;
    if file.tensors().is_empty() {
        bail!("{}: holds no tensors ({})", input.display(), file.root);
    }
    let mut raw = Vec::with_capacity(file.tensors().len());
    let mut dtypes = BTreeMap::new();
    for (name, t) in file.tensors() {
        raw.push((name.clone(), t.shape.clone(), dtype(t.dtype), file.bytes(t)?.into_owned()));
        *dtypes.entry(t.dtype.name()).or_default() += 1;
    }
    let source_sha256 = crate::io::published::sha256_file(input)?;
    let name = input.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let metadata: HashMap<String, String> = [
        ("format".to_string(), "pt".to_string()),
        ("source".to_string(), name),
        ("source_sha256".to_string(), source_sha256.clone()),
        ("converted_by".to_string(), format!("roentgen {}", env!("CARGO_PKG_VERSION"))),
    ]
    .into();
    let bytes = crate::io::safetensors::write_raw_atomic_with_metadata(output, &raw, Some(metadata))?;
    Ok(ConvertReport { tensors: raw.len(), bytes, dtypes, root: file.root.clone(), source_sha256 })
}

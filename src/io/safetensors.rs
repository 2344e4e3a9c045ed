//! Reading safetensors files through a memory map. The header is validated by the `safetensors`
//! crate; every error names the file.

use crate::tensor::DType;
use anyhow::{bail, Context, Result};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use std::fs::File;
use std::path::{Path, PathBuf};

/// A memory-mapped safetensors file.
pub struct SafetensorsFile {
    pub path: PathBuf,
    mmap: Mmap,
}

/// Name, on-disk dtype and shape of one tensor, from the header.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        // Opening a FIFO would block until a writer comes; mapping /dev/zero maps nothing useful.
        crate::io::files::check_input_file(path)?;
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: the file is mapped read-only; a concurrent writer could change its bytes under us,
        // which would give wrong numbers but not memory unsafety in our code (we copy out of it).
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        let f = SafetensorsFile { path: path.to_path_buf(), mmap };
        f.parse()?; // validate once, so later calls cannot fail on the header
        Ok(f)
    }

    /// The whole file, as mapped.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    pub fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| {
            anyhow::anyhow!(
                "{}: not a valid safetensors file ({} bytes): {}",
                self.path.display(),
                self.mmap.len(),
                describe_error(&e)
            )
        })
    }

    /// Tensors in the file, sorted by name.
    pub fn infos(&self) -> Result<Vec<TensorInfo>> {
        let st = self.parse()?;
        let mut v: Vec<TensorInfo> = st
            .iter()
            .map(|(name, view)| TensorInfo {
                name: name.to_string(),
                dtype: dtype_name(view.dtype()),
                shape: view.shape().to_vec(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// The `__metadata__` map of the header, if any.
    pub fn metadata(&self) -> Result<Vec<(String, String)>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap)
            .map_err(|e| anyhow::anyhow!("{}: {}", self.path.display(), describe_error(&e)))?;
        let mut v: Vec<(String, String)> = meta
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        v.sort();
        Ok(v)
    }
}

fn describe_error(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "the file is too short to hold a header (truncated?)".into(),
        E::HeaderTooLarge => "the header length field is larger than allowed (corrupt or not safetensors)".into(),
        E::InvalidHeaderLength => "the header length exceeds the file size (truncated?)".into(),
        E::InvalidHeaderDeserialization(msg) => format!("the JSON header cannot be parsed ({msg})"),
        E::InvalidHeader(msg) => format!("the header is invalid ({msg})"),
        E::MetadataIncompleteBuffer => "the tensor data is shorter than the header says (truncated?)".into(),
        other => other.to_string(),
    }
}

pub fn dtype_name(d: StDtype) -> String {
    format!("{d:?}")
}

/// Our float dtype of a safetensors dtype, if it is one we load.
pub fn float_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// Converts little-endian f32/f16/bf16 bytes to f32 into `out` (which has the element count).
pub fn to_f32(dtype: DType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let n = out.len();
    if bytes.len() != n * dtype.size_bytes() {
        bail!("{} bytes for {n} {dtype} elements", bytes.len());
    }
    match dtype {
        DType::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        DType::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        DType::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
    }
    Ok(())
}

/// A tensor to write: f32 values or i64 ids.
pub enum OutTensor<'a> {
    F32(&'a [f32]),
    I64(&'a [i64]),
}

/// Writes a safetensors file atomically (a temporary file beside it, then a rename), so an
/// interrupted write never leaves a half file under the final name.
pub fn write_atomic(path: &Path, tensors: &[(&str, Vec<usize>, OutTensor)]) -> Result<()> {
    let mut bufs: Vec<RawTensor> = Vec::new();
    for (name, shape, t) in tensors {
        let (dtype, bytes) = match t {
            OutTensor::F32(v) => (StDtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            OutTensor::I64(v) => (StDtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        };
        bufs.push((name.to_string(), shape.clone(), dtype, bytes));
    }
    write_raw_atomic(path, &bufs)?;
    Ok(())
}

/// A tensor as it is written: name, shape, dtype and little-endian bytes.
pub type RawTensor = (String, Vec<usize>, StDtype, Vec<u8>);

/// Writes raw tensors as one safetensors file, atomically as [`write_atomic`]; returns the bytes
/// written.
pub fn write_raw_atomic(path: &Path, tensors: &[RawTensor]) -> Result<u64> {
    write_raw_atomic_with_metadata(path, tensors, None)
}

/// As [`write_raw_atomic`], with a `__metadata__` map in the header.
pub fn write_raw_atomic_with_metadata(
    path: &Path,
    tensors: &[RawTensor],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<u64> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| anyhow::anyhow!("{}: tensor '{n}': {e}", path.display()))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, metadata).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    crate::io::files::write_bytes_atomic(path, &bytes)?;
    Ok(bytes.len() as u64)
}

//! Named weights for the evaluation networks: a safetensors file (memory-mapped), a PyTorch
//! checkpoint as published (read without Python), or, for tests, an in-memory map. Every error names the file, the tensor and the network it was meant for, so a
//! wrong `--weights` file (another network, a truncated export) says what is wrong.

use crate::io::safetensors::{float_dtype, to_f32, SafetensorsFile};
use crate::io::torch::TorchFile;
use crate::io::weights::WeightFile;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// Where the tensors come from.
pub trait TensorSource {
    /// For messages: the file.
    fn describe(&self) -> String;
    /// All tensor names (for hints).
    fn names(&self) -> Vec<String>;
    /// Shape of a tensor; None if absent.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
    /// Values as f32 (f16/bf16 converted).
    fn read(&self, name: &str) -> Result<Vec<f32>>;
}

/// An in-memory source (tests, and weights built by other code).
pub struct MapSource {
    pub label: String,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl TensorSource for MapSource {
    fn describe(&self) -> String {
        self.label.clone()
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.tensors.keys().cloned().collect();
        v.sort();
        v
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.0.clone())
    }
    fn read(&self, name: &str) -> Result<Vec<f32>> {
        self.tensors.get(name).map(|t| t.1.clone()).ok_or_else(|| anyhow!("{}: no tensor '{name}'", self.label))
    }
}

/// A safetensors file, its header parsed once.
pub struct FileSource<'a> {
    path: &'a Path,
    st: safetensors::SafeTensors<'a>,
}

impl<'a> FileSource<'a> {
    pub fn new(file: &'a SafetensorsFile) -> Result<FileSource<'a>> {
        Ok(FileSource { path: &file.path, st: file.parse()? })
    }
}

impl TensorSource for FileSource<'_> {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.st.names().into_iter().map(String::from).collect();
        v.sort();
        v
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.st.tensor(name).ok().map(|t| t.shape().to_vec())
    }
    fn read(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.st.tensor(name).map_err(|e| anyhow!("{}: tensor '{name}': {e}", self.describe()))?;
        let dtype = float_dtype(t.dtype()).ok_or_else(|| {
            anyhow!("{}: tensor '{name}' has dtype {:?}; expected F32, F16 or BF16", self.describe(), t.dtype())
        })?;
        let mut out = vec![0f32; t.shape().iter().product()];
        to_f32(dtype, t.data(), &mut out).with_context(|| format!("{}: tensor '{name}'", self.describe()))?;
        Ok(out)
    }
}

/// A PyTorch checkpoint (read without Python, see `io::torch`).
pub struct TorchSource<'a> {
    pub file: &'a TorchFile,
}

impl TensorSource for TorchSource<'_> {
    fn describe(&self) -> String {
        format!("{} (PyTorch checkpoint, {})", self.file.path.display(), self.file.root)
    }
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.file.tensors().iter().map(|(n, _)| n.clone()).collect();
        v.sort();
        v
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.file.get(name).map(|t| t.shape.clone())
    }
    fn read(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.file.get(name).ok_or_else(|| anyhow!("{}: no tensor '{name}'", self.describe()))?;
        self.file.read_f32(t).with_context(|| format!("{}: tensor '{name}'", self.describe()))
    }
}

/// A weights file of either format (`io::weights::WeightFile`: safetensors, or a PyTorch
/// checkpoint as published, `.pt`, `.pth`, `.bin`, `.ckpt`), as a source of named f32 tensors.
pub struct WeightsFile(pub WeightFile);

impl WeightsFile {
    pub fn open(path: &Path) -> Result<WeightsFile> {
        Ok(WeightsFile(WeightFile::open(path)?))
    }

    /// Opens `path` for `network` ("inception", "xrv", …): a PyTorch checkpoint's SHA-256 is
    /// compared with the published file's (`io::published`; a mismatch warns).
    pub fn open_for(path: &Path, network: &str) -> Result<WeightsFile> {
        let f = WeightsFile::open(path)?;
        if f.is_torch() {
            crate::io::published::check(path, network)?;
        }
        Ok(f)
    }

    pub fn is_torch(&self) -> bool {
        matches!(self.0, WeightFile::Torch(_))
    }

    pub fn source(&self) -> Result<Box<dyn TensorSource + '_>> {
        Ok(match &self.0 {
            WeightFile::Safetensors(f) => Box::new(FileSource::new(f)?),
            WeightFile::Torch(file) => Box::new(TorchSource { file }),
        })
    }

    /// The safetensors header's metadata (a PyTorch checkpoint has none).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        Ok(match &self.0 {
            WeightFile::Safetensors(f) => f.metadata()?.into_iter().collect(),
            WeightFile::Torch(_) => HashMap::new(),
        })
    }
}

/// A source checked against what one network expects.
pub struct Weights<'a> {
    pub src: &'a dyn TensorSource,
    /// e.g. "pytorch-fid's InceptionV3 (pt_inception-2015-12-05)".
    pub network: &'a str,
}

impl Weights<'_> {
    /// The tensor `name` with exactly `shape`, as f32.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        match self.src.shape(name) {
            None => Err(self.missing(name)),
            Some(s) if s != shape => bail!(
                "{}: tensor '{name}' has shape {s:?}, but {} needs {shape:?} (weights of another size or network?)",
                self.src.describe(),
                self.network
            ),
            Some(_) => {
                let v = self.src.read(name)?;
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    bail!("{}: tensor '{name}' holds a non-finite value at index {i}", self.src.describe());
                }
                Ok(v)
            }
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.src.shape(name).is_some()
    }

    pub fn missing(&self, name: &str) -> anyhow::Error {
        let names = self.src.names();
        let hint = match names.first() {
            None => "it holds no tensors".to_string(),
            Some(first) => format!("it holds {} tensors, e.g. '{first}'", names.len()),
        };
        anyhow!(
            "{}: tensor '{name}' is missing: these are not {} weights ({hint}); `--help` names the public release, which is read as published",
            self.src.describe(),
            self.network
        )
    }
}

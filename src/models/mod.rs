//! Models, each written once over `&dyn Backend`: config parsed from config.json, parameter table
//! built from the config, forward (and later backward) over an activation arena.

pub mod bert;
pub mod clip;
pub mod text;
pub mod unet;
pub mod vae;

use crate::backend::Backend;
use crate::rng::SplitMix64;
use crate::tensor::Layout;
use anyhow::{Context, Result};
use serde_json::Value;
use std::path::Path;

/// Runs a layout function unbound to size it, allocates one pool of exactly that size, and runs it
/// again bound to the pool. Returns the typed tensors and the layout (the name → (offset, shape)
/// table).
pub fn allocate<T>(backend: &mut dyn Backend, label: &str, build: impl Fn(&mut Layout) -> T) -> Result<(T, Layout)> {
    let total = Layout::measure(&build).total();
    let pool = backend.alloc(total, label)?;
    let mut layout = Layout::new(pool);
    let typed = build(&mut layout);
    Ok((typed, layout))
}

/// As `allocate`, for the parameters of a model with convolutions (U-Net, VAE): the pool is
/// declared to the backend (`Backend::mark_params`: in bf16 the CUDA backend keeps a bf16 copy of
/// it for the convolutions). Text encoders, which have none, use `allocate`.
pub fn allocate_params<T>(
    backend: &mut dyn Backend,
    label: &str,
    build: impl Fn(&mut Layout) -> T,
) -> Result<(T, Layout)> {
    let (typed, layout) = allocate(backend, label, build)?;
    backend.mark_params(layout.pool())?;
    Ok((typed, layout))
}

/// Fills every parameter of `table` with random values in the style of the usual initialisations:
/// biases 0, normalisation weights 1, everything else uniform with standard deviation 0.02 (uniform
/// rather than normal: it is 5× cheaper, and for `--random-weights` the point is the
/// architecture's cost, not its outputs). Deterministic per seed; each tensor is generated in
/// parallel chunks with their own streams.
pub fn randomize(backend: &dyn Backend, table: &Layout, seed: u64) -> Result<()> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut buf = Vec::new();
    for (i, e) in table.entries().iter().enumerate() {
        let n = e.shape.numel();
        buf.clear();
        buf.resize(n, 0.0f32);
        let is_norm = e.name.contains("norm");
        if e.name.ends_with(".bias") {
        } else if is_norm && e.shape.rank() == 1 {
            buf.fill(1.0);
        } else {
            buf.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
                let mut rng = SplitMix64::new(seed ^ ((i as u64) << 32) ^ (c as u64).wrapping_mul(0x9E37_79B9));
                let a = 0.02 * 3f64.sqrt();
                chunk.iter_mut().for_each(|x| *x = ((2.0 * rng.next_f64() - 1.0) * a) as f32);
            });
        }
        let t = crate::tensor::Tensor { pool: table.pool(), offset: e.offset, shape: e.shape };
        backend.upload(&t, &buf)?;
    }
    Ok(())
}

/// PyTorch's default initialisation, for models trained from scratch (the paper's "Rnd U-Net", a
/// new VAE): weights of linear and convolution layers uniform in ±1/√fan_in (kaiming_uniform with
/// a = √5), their biases uniform in ±1/√fan_in of the weight, normalisation weights 1 and biases 0,
/// embeddings N(0, 1) scaled as transformers does (std 0.02). Deterministic per seed.
pub fn init_default(backend: &dyn Backend, table: &Layout, seed: u64) -> Result<()> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut buf = Vec::new();
    for (i, e) in table.entries().iter().enumerate() {
        let n = e.shape.numel();
        buf.clear();
        buf.resize(n, 0f32);
        let weight_of_bias = e.name.strip_suffix(".bias").map(|p| format!("{p}.weight"));
        let is_norm = e.name.contains("norm") && e.shape.rank() == 1;
        let bound = if e.name.contains("embedding") {
            None
        } else if is_norm {
            if e.name.ends_with(".weight") {
                buf.fill(1.0);
            }
            None
        } else if let Some(w) = weight_of_bias {
            table
                .find(&w)
                .filter(|w| w.shape.rank() >= 2)
                .map(|w| 1.0 / ((w.shape.numel() / w.shape.dims()[0]) as f64).sqrt())
        } else if e.shape.rank() >= 2 {
            Some(1.0 / ((n / e.shape.dims()[0]) as f64).sqrt())
        } else {
            None
        };
        let embedding = e.name.contains("embedding") && e.shape.rank() >= 2;
        if bound.is_some() || embedding {
            buf.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
                let mut rng = SplitMix64::new(seed ^ ((i as u64) << 32) ^ (c as u64).wrapping_mul(0x9E37_79B9));
                for x in chunk.iter_mut() {
                    *x = match bound {
                        Some(a) => ((2.0 * rng.next_f64() - 1.0) * a) as f32,
                        None => 0.02 * rng.next_normal(),
                    };
                }
            });
        }
        let t = crate::tensor::Tensor { pool: table.pool(), offset: e.offset, shape: e.shape };
        backend.upload(&t, &buf)?;
    }
    Ok(())
}

/// Typed reads of config.json fields, with transformers' defaults and errors that name the field.
pub(crate) struct ConfigReader<'a> {
    pub obj: &'a serde_json::Map<String, Value>,
    pub path: &'a Path,
}

impl<'a> ConfigReader<'a> {
    pub fn new(v: &'a Value, path: &'a Path) -> Result<Self> {
        let obj = v.as_object().with_context(|| format!("{}: expected a JSON object", path.display()))?;
        Ok(ConfigReader { obj, path })
    }

    fn bad(&self, field: &str, want: &str) -> anyhow::Error {
        anyhow::anyhow!("{}: field \"{field}\" is {}; expected {want}", self.path.display(), self.obj[field])
    }

    pub fn usize(&self, field: &str, default: usize) -> Result<usize> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => {
                v.as_u64().filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| self.bad(field, "a positive integer"))
            }
        }
    }

    pub fn f32(&self, field: &str, default: f32) -> Result<f32> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().map(|x| x as f32).ok_or_else(|| self.bad(field, "a number")),
        }
    }

    pub fn str(&self, field: &str, default: &'a str) -> Result<&'a str> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.bad(field, "a string")),
        }
    }
}

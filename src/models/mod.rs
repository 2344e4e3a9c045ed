//! Models, each written once over `&dyn Backend`: config parsed from config.json, parameter table
//! built from the config, forward (and later backward) over an activation arena.

/// The parts of [`Component`] every model writes alike, given its fields `config`, `params` and
/// `table` and a `params_layout(l, &config)` in its module: the config type and its parser, the
/// parameter pool (labelled `$label`, allocated by `$alloc`: `allocate`, or `allocate_params` for
/// a model with convolutions) and the table.
macro_rules! component_parts {
    ($config:ident, $label:literal, $alloc:ident) => {
        type Config = $config;
        fn config_from_file(path: &std::path::Path) -> anyhow::Result<$config> {
            $config::from_file(path)
        }
        fn allocate(backend: &mut dyn crate::backend::Backend, config: $config) -> anyhow::Result<Self> {
            let (params, table) = $alloc(backend, $label, |l| params_layout(l, &config))?;
            Ok(Self { config, params, table })
        }
        fn measure(config: &$config) -> crate::tensor::Layout {
            crate::tensor::Layout::measure(|l| params_layout(l, config))
        }
        fn allocate_mapped(
            backend: &mut dyn crate::backend::Backend,
            config: &$config,
            placed: &crate::io::weights::Placement,
        ) -> anyhow::Result<Option<Self>> {
            let mapped = crate::models::allocate_mapped(backend, $label, placed, |l| params_layout(l, config))?;
            Ok(mapped.map(|(params, table)| Self { config: config.clone(), params, table }))
        }
        fn table(&self) -> &crate::tensor::Layout {
            &self.table
        }
    };
}

pub mod bert;
pub mod clip;
pub mod single_file;
pub mod single_file_export;
pub mod text;
pub mod unet;
pub mod unet_config;
pub mod vae;

use crate::backend::Backend;
use crate::io::weights::{self, LoadReport};
use crate::rng::splitmix::SplitMix64;
use crate::tensor::{Layout, LayoutEntry};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// A network read from a diffusers/transformers component folder (config.json and weights): how
/// every model is allocated, loaded, randomised and counted, written once. A model gives its
/// config parser, its allocation and its parameter table, and where its checkpoints differ from
/// the table's names, its alias and ignore rules.
pub trait Component: Sized {
    type Config: std::fmt::Debug;
    /// The component folder's config.json, checked.
    fn config_from_file(path: &Path) -> Result<Self::Config>;
    /// The parameter pool for `config`, uninitialised (zeros).
    fn allocate(backend: &mut dyn Backend, config: Self::Config) -> Result<Self>;
    /// The parameter table for `config`, unbound (names, shapes, sizes).
    fn measure(config: &Self::Config) -> Layout;
    /// The parameter pool for `config` as a mapped weight file whose tensors lie as `placed`
    /// says (`allocate_mapped`); None where the backend does not map files.
    fn allocate_mapped(
        backend: &mut dyn Backend,
        config: &Self::Config,
        placed: &weights::Placement,
    ) -> Result<Option<Self>>;
    /// The parameter table: name → (offset, shape) in the parameter pool.
    fn table(&self) -> &Layout;

    /// The table name that a checkpoint tensor outside the table stands for, if any (older or newer
    /// library versions name some tensors differently; see [`weights::load_into`]).
    fn alias(_name: &str) -> Option<String> {
        None
    }
    /// Whether a checkpoint tensor outside the table is skipped rather than refused.
    fn is_ignored(name: &str) -> bool {
        weights::is_known_buffer(name)
    }
    /// Fills the parameters with random values (see [`randomize`]).
    fn randomize(&self, backend: &dyn Backend, seed: u64) -> Result<()> {
        randomize(backend, self.table(), seed)
    }

    /// Loads a component folder (config.json + safetensors, `variant` e.g. "fp16"): the tensors
    /// copied (and converted to f32) into a pool laid out by the table, as training needs (its
    /// optimizer state follows the table's layout).
    fn load(backend: &mut dyn Backend, dir: &Path, variant: Option<&str>) -> Result<(Self, LoadReport)> {
        Self::load_as(backend, dir, variant, false)
    }
    /// As `load`, for weights that will not change (sampling, benchmarks): an f32 checkpoint in
    /// one file is used in place where the backend maps files (no copy, nothing read up front),
    /// and the pool is declared frozen (`Backend::mark_frozen`).
    fn load_frozen(backend: &mut dyn Backend, dir: &Path, variant: Option<&str>) -> Result<(Self, LoadReport)> {
        Self::load_as(backend, dir, variant, true)
    }
    /// `load` (frozen false) or `load_frozen`.
    fn load_as(
        backend: &mut dyn Backend,
        dir: &Path,
        variant: Option<&str>,
        frozen: bool,
    ) -> Result<(Self, LoadReport)> {
        let config = Self::config_from_file(&dir.join("config.json"))?;
        let files = weights::weight_files(dir, variant)?;
        let mut mapped = None;
        if frozen {
            if let Some(placed) = weights::placement(&Self::measure(&config), &files, &Self::alias, &Self::is_ignored)?
            {
                mapped = Self::allocate_mapped(backend, &config, &placed)?.map(|m| (m, placed.report));
            }
        }
        let (model, report) = match mapped {
            Some(m) => m,
            None => {
                let model = Self::allocate(backend, config)?;
                let report = weights::load_into(backend, model.table(), &files, &Self::alias, &Self::is_ignored)?;
                (model, report)
            }
        };
        if frozen {
            backend.mark_frozen(model.table().pool());
        }
        Ok((model, report))
    }
    /// The real architecture with random weights (benchmarks, `inspect`/`bench` with random weights).
    fn random(backend: &mut dyn Backend, config: Self::Config, seed: u64) -> Result<Self> {
        let model = Self::allocate(backend, config)?;
        model.randomize(backend, seed)?;
        Ok(model)
    }
    fn num_params(&self) -> usize {
        self.table().numel()
    }
}

/// The component of `dir`: with random weights (seed 0) from its config.json when `random`, else
/// loaded (with the load report); `frozen`: for inference only (`Component::load_frozen`; random
/// weights declared frozen too).
pub fn load_or_random<C: Component>(
    backend: &mut dyn Backend,
    dir: &Path,
    variant: Option<&str>,
    random: bool,
    frozen: bool,
) -> Result<(C, Option<LoadReport>)> {
    if random {
        let model = C::random(backend, C::config_from_file(&dir.join("config.json"))?, 0)?;
        if frozen {
            backend.mark_frozen(model.table().pool());
        }
        Ok((model, None))
    } else {
        let (model, report) = C::load_as(backend, dir, variant, frozen)?;
        Ok((model, Some(report)))
    }
}

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

/// As `allocate`, with the pool a weight file mapped by the backend (`Backend::map_file_pool`)
/// and the tensors where `placed` found them in it; None where the backend does not map files.
/// The pool is declared as parameters (`Backend::mark_params`) as `allocate_params` does.
pub fn allocate_mapped<T>(
    backend: &mut dyn Backend,
    label: &str,
    placed: &weights::Placement,
    build: impl Fn(&mut Layout) -> T,
) -> Result<Option<(T, Layout)>> {
    let Some(pool) = backend.map_file_pool(&placed.path, placed.data_start, placed.len, label)? else {
        return Ok(None);
    };
    let mut layout = Layout::placed(pool, placed.offsets.clone(), placed.len);
    let typed = build(&mut layout);
    backend.mark_params(pool)?;
    Ok(Some((typed, layout)))
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
    let a = 0.02 * 3f64.sqrt();
    initialise(backend, table, seed, |e| {
        if e.name.ends_with(".bias") {
            Init::Const(0.0)
        } else if e.name.contains("norm") && e.shape.rank() == 1 {
            Init::Const(1.0)
        } else {
            Init::Uniform(a)
        }
    })
}

/// PyTorch's default initialisation, for models trained from scratch (the paper's "Rnd U-Net", a
/// new VAE): weights of linear and convolution layers uniform in ±1/√fan_in (kaiming_uniform with
/// a = √5), their biases uniform in ±1/√fan_in of the weight, normalisation weights 1 and biases 0,
/// embeddings N(0, 1) scaled as transformers does (std 0.02). Deterministic per seed.
pub fn init_default(backend: &dyn Backend, table: &Layout, seed: u64) -> Result<()> {
    let fan_in_bound = |w: &LayoutEntry| 1.0 / ((w.shape.numel() / w.shape.dims()[0]) as f64).sqrt();
    initialise(backend, table, seed, |e| {
        if e.name.contains("embedding") {
            if e.shape.rank() >= 2 {
                Init::Normal(0.02)
            } else {
                Init::Const(0.0)
            }
        } else if e.name.contains("norm") && e.shape.rank() == 1 {
            Init::Const(if e.name.ends_with(".weight") { 1.0 } else { 0.0 })
        } else if let Some(w) = e.name.strip_suffix(".bias").map(|p| format!("{p}.weight")) {
            match table.find(&w).filter(|w| w.shape.rank() >= 2) {
                Some(w) => Init::Uniform(fan_in_bound(w)),
                None => Init::Const(0.0),
            }
        } else if e.shape.rank() >= 2 {
            Init::Uniform(fan_in_bound(e))
        } else {
            Init::Const(0.0)
        }
    })
}

/// How one tensor starts: every value the same, uniform in ±bound, or normal with this std.
enum Init {
    Const(f32),
    Uniform(f64),
    Normal(f32),
}

/// Fills every tensor of `table` as `rule` says. Random tensors are generated in parallel chunks of
/// 2^16 values, each with its own SplitMix64 stream keyed by (seed, tensor index, chunk index), so
/// the values do not depend on the thread count.
fn initialise(backend: &dyn Backend, table: &Layout, seed: u64, rule: impl Fn(&LayoutEntry) -> Init) -> Result<()> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut buf = Vec::new();
    for (i, e) in table.entries().iter().enumerate() {
        let n = e.shape.numel();
        buf.clear();
        reserve(&mut buf, n, &e.name)?;
        buf.resize(n, 0f32);
        let random = |draw: &(dyn Fn(&mut SplitMix64) -> f32 + Sync), buf: &mut [f32]| {
            buf.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
                let mut rng = SplitMix64::new(seed ^ ((i as u64) << 32) ^ (c as u64).wrapping_mul(0x9E37_79B9));
                chunk.iter_mut().for_each(|x| *x = draw(&mut rng));
            })
        };
        match rule(e) {
            Init::Const(v) => buf.fill(v),
            Init::Uniform(a) => random(&|rng| ((2.0 * rng.next_f64() - 1.0) * a) as f32, &mut buf),
            Init::Normal(std) => random(&|rng| std * rng.next_normal(), &mut buf),
        }
        let t = crate::tensor::Tensor::new(table.pool(), e.offset, e.shape);
        backend.upload(&t, &buf)?;
    }
    Ok(())
}

/// Grows a host staging buffer to `n` elements, failing with the tensor's name instead of
/// aborting the process when the memory is not there.
pub(crate) fn reserve(buf: &mut Vec<f32>, n: usize, name: &str) -> Result<()> {
    buf.try_reserve(n.saturating_sub(buf.len()))
        .map_err(|_| anyhow::anyhow!("tensor '{name}': cannot allocate {} MiB of host memory", (n as u64 * 4) >> 20))
}

/// Upper bounds on sizes read from model configs, checked before anything is allocated. Without
/// them a typo or a corrupt file (`"num_hidden_layers": 2147483648`) is multiplied into tensor
/// shapes and either overflows, aborts on allocation or runs for minutes filling memory. Each bound
/// is far above every released model this engine runs (SD 1.x/2.x/XL U-Nets and VAEs, CLIP
/// ViT-L/H/bigG text towers, BERT base/large, PubMedBERT), so only a broken config meets one.
pub mod limits {
    /// Layers of one stack: resnets per U-Net/VAE block, transformer layers per block, text encoder
    /// layers. Real models: 1–3 resnets per block, ≤ 10 transformer layers per block (SDXL),
    /// ≤ 32 text encoder layers (OpenCLIP bigG).
    pub const MAX_LAYERS: usize = 1000;
    /// Resnets plus transformer blocks in a whole U-Net or VAE (SDXL's U-Net has about 100): bounds
    /// the number of named tensors, which the parameter table holds as strings.
    pub const MAX_TOTAL_LAYERS: u64 = 10_000;
    /// Channels, hidden and intermediate sizes, heads. Real models: ≤ 5,120 (bigG's MLP) and
    /// 2,048 cross-attention channels (SDXL).
    pub const MAX_CHANNELS: usize = 1 << 16;
    /// Token vocabularies. Real: 49,408 (CLIP), 30,522 (BERT), ~250,000 (multilingual models).
    pub const MAX_VOCAB: usize = 1 << 24;
    /// Position embeddings. Real: 77 (CLIP), 512 (BERT), 8,192 for long-context encoders.
    pub const MAX_POSITIONS: usize = 1 << 16;
    /// Down blocks of a U-Net or VAE: each halves the resolution, so the scale factor is
    /// 2^(blocks − 1). Real: 3 (SDXL) or 4 (SD 1.x/2.x).
    pub const MAX_BLOCKS: usize = 16;
    /// Parameters of one model: 2^34 ≈ 17 billion, 64 GiB in f32 (256 GiB with the gradients and
    /// AdamW moments of training). The largest model of a supported architecture is SDXL's
    /// U-Net (2.6 billion); beyond this bound no single device holds the model, and the f32
    /// pool alone would take minutes to fill with random weights.
    pub const MAX_PARAMS: usize = 1 << 34;
    /// A U-Net `sample_size` (latent pixels per side): 64 for SD 1.x, 96 for SD 2 (768 px),
    /// 128 for SDXL. 4,096 is 32,768 px at the usual scale factor 8.
    pub const MAX_SAMPLE_SIZE: usize = 1 << 12;
}

/// Refuses a model whose parameter table (measured, never allocated) exceeds
/// `limits::MAX_PARAMS`: the last check of a config's sizes, after each field was bounded.
pub(crate) fn check_param_count(path: &Path, table: &Layout) -> Result<()> {
    let n = table.numel();
    if n > limits::MAX_PARAMS {
        bail!(
            "{}: the config describes {} parameters ({} GiB in f32), more than the {} this engine accepts \
             for one model (corrupt sizes?)",
            path.display(),
            n,
            (n as u64 * 4) >> 30,
            limits::MAX_PARAMS
        );
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

    /// A size: an integer from 1 to `max` (see `limits`); absent or null gives `default`.
    pub fn size(&self, field: &str, default: usize, max: usize) -> Result<usize> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => self.size_value(field, v, max),
        }
    }

    /// One size value (a field, or an entry of a list field named `field[i]`).
    pub fn size_value(&self, field: &str, v: &Value, max: usize) -> Result<usize> {
        match v.as_u64() {
            Some(n) if n >= 1 && n <= max as u64 => Ok(n as usize),
            _ => bail!("{}: field \"{field}\" is {v}; expected an integer from 1 to {max}", self.path.display()),
        }
    }

    /// A list of sizes, each from 1 to `max`, at least one entry.
    pub fn size_list(&self, field: &str, max: usize) -> Result<Option<Vec<usize>>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) if a.is_empty() => {
                bail!("{}: field \"{field}\" is an empty list; expected at least one entry", self.path.display())
            }
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| self.size_value(&format!("{field}[{i}]"), v, max))
                .collect::<Result<_>>()
                .map(Some),
            Some(v) => bail!("{}: field \"{field}\" is {v}; expected a list of integers", self.path.display()),
        }
    }

    /// A finite number (a value beyond f32's range, 1e308, becomes infinite and is refused).
    pub fn f32(&self, field: &str, default: f32) -> Result<f32> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => {
                v.as_f64().map(|x| x as f32).filter(|x| x.is_finite()).ok_or_else(|| self.bad(field, "a finite number"))
            }
        }
    }

    /// A normalisation epsilon: finite and not negative (a negative one makes 1/sqrt(var + eps)
    /// NaN for constant inputs).
    pub fn eps(&self, field: &str, default: f32) -> Result<f32> {
        let x = self.f32(field, default)?;
        if x < 0.0 {
            return Err(self.bad(field, "a number ≥ 0"));
        }
        Ok(x)
    }

    /// true or false; anything else ("yes", 1) is refused rather than read as the default.
    pub fn bool(&self, field: &str, default: bool) -> Result<bool> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.bad(field, "true or false")),
        }
    }

    pub fn str(&self, field: &str, default: &'a str) -> Result<&'a str> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.bad(field, "a string")),
        }
    }
}

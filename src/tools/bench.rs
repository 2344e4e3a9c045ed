//! `roentgen bench`: times model stages of a real (or random-weight) checkpoint on a backend and
//! reports time, the FLOP counted from the shapes by a planning run, and the achieved rate.

use crate::backend::Backend;
use crate::io::weights;
use crate::models::clip::ClipTextModel;
use crate::models::unet::UNet;
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::models::{load_or_random, Component};
use crate::nn::Cx;
use crate::nn::Fmap;
use crate::rng::splitmix::SplitMix64;
use crate::tensor::DType;
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::Path;
use std::time::Instant;

word_enum!(
    /// What `roentgen bench` times.
    pub enum Stage("stage") {
        /// One guided denoising step: the U-Net at batch 2 × prompts.
        Unet = "unet",
        /// The VAE decoder at the image size.
        VaeDecode = "vae-decode" | "vae",
        /// The CLIP text encoder on 77 tokens, batch 2 × prompts.
        TextEncoder = "text-encoder" | "clip",
        /// One joint U-Net + text-encoder training step (f32, AdamW, the paper's settings) on
        /// `batch` random latents and captions.
        TrainStep = "train-step" | "train",
        /// The gradient sum of one data-parallel step over the job's ranks (NCCL or MPI through
        /// the host), checked exact and timed: `mpirun -np N roentgen bench allreduce`.
        Allreduce = "allreduce",
    }
);

pub struct BenchOptions<'a> {
    pub model: &'a Path,
    pub variant: Option<&'a str>,
    pub random_weights: bool,
    pub height: usize,
    pub width: usize,
    /// Prompts per call; guidance doubles the U-Net and text-encoder batch.
    pub batch: usize,
    pub warmup: usize,
    pub iters: usize,
    /// After timing, run once more with per-kernel timing (`Backend::set_profiling`).
    pub profile: bool,
    /// train-step: recompute each U-Net block's internals in the backward (`--gradient-checkpointing`).
    pub gradient_checkpointing: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub stage: String,
    pub backend: String,
    pub shape: String,
    pub parameters: usize,
    pub activation_bytes: usize,
    /// The element type of the arena's activations ("f32", or "bf16" under `--activations bf16`
    /// for the U-Net and the VAE decoder).
    pub activations: &'static str,
    pub iters: usize,
    pub mean_ms: f64,
    pub min_ms: f64,
    pub median_ms: f64,
    pub max_ms: f64,
    /// The process's peak resident memory so far (Linux's VmHWM: loading, warm-up and timed calls).
    pub peak_rss_bytes: Option<u64>,
    /// A device backend's most device memory held at once (weights, gradients, optimizer state,
    /// arenas, parameter copies, workspaces), from loading to the last call.
    pub peak_device_bytes: Option<u64>,
    /// Every timed call, in order.
    pub times_ms: Vec<f64>,
    pub gflop_per_call: f64,
    pub achieved_gflops: f64,
    /// Timed calls served by replaying a captured CUDA graph (the U-Net stage on CUDA).
    pub graph_replays: usize,
    /// With --profile: (kernel, calls, milliseconds) of one call, slowest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<(String, usize, f64)>,
}

impl BenchReport {
    pub fn render(&self) -> String {
        format!(
            "{} on {}: {}\n  parameters {}, activation arena {:.1} MiB ({} activations){}\n  {} iterations: median {:.2} ms (min {:.2}, \
             max {:.2}, mean {:.2})\n  {:.2} GFLOP per call (matrix products, convolutions, attention) → {:.1} GFLOP/s at \
             the min time",
            self.stage,
            self.backend,
            self.shape,
            crate::tools::inspect::thousands(self.parameters as u64),
            self.activation_bytes as f64 / (1 << 20) as f64,
            self.activations,
            self.peak_rss_bytes.map_or(String::new(), |b| format!(", peak resident {:.2} GiB", b as f64 / (1u64 << 30) as f64))
                + &self.peak_device_bytes.map_or(String::new(), |b| format!(", peak device memory {:.2} GiB", b as f64 / (1u64 << 30) as f64)),
            self.iters,
            self.median_ms,
            self.min_ms,
            self.max_ms,
            self.mean_ms,
            self.gflop_per_call,
            self.achieved_gflops
        ) + &(if self.graph_replays > 0 {
            format!("\n  {} of the calls replayed a captured CUDA graph", self.graph_replays)
        } else {
            String::new()
        }) + &self.render_kernels()
    }

    fn render_kernels(&self) -> String {
        if self.kernels.is_empty() {
            return String::new();
        }
        let total: f64 = self.kernels.iter().map(|k| k.2).sum();
        // Launches per call (kernels and library GEMMs): what the fusions reduce.
        let launches: usize = self.kernels.iter().map(|k| k.1).sum();
        let mut s = format!(
            "\n  per kernel (one call: {launches} launches, serialised by the timing events; total {total:.2} ms):"
        );
        for (name, calls, ms) in &self.kernels {
            s += &format!("\n    {name:<64} {calls:>5} calls {ms:>9.3} ms {:>5.1}%", 100.0 * ms / total.max(1e-12));
        }
        s
    }
}

/// (every timed call's ms, per-kernel profile, timed calls that replayed a CUDA graph).
type Timing = (Vec<f64>, Vec<(String, usize, f64)>, usize);

/// The milliseconds of `iters` calls after `warmup`, and with `profile` the per-kernel times of one
/// more call.
fn time_it(
    b: &dyn Backend,
    profile: bool,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Timing> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(iters);
    let replays0 = b.graph_replays();
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let replays = b.graph_replays() - replays0;
    let mut kernels = Vec::new();
    if profile {
        b.set_profiling(true);
        let r = f();
        kernels = b.kernel_profile();
        b.set_profiling(false);
        r?;
    }
    Ok((times, kernels, replays))
}

fn random_values(n: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix64::new(seed);
    (0..n).map(|_| r.next_normal()).collect()
}

/// Most timed (or warm-up) calls: every time is kept for the statistics.
pub const MAX_ITERS: usize = 100_000;

/// The pipeline's `component` folder as a model: random weights with `random_weights`, else
/// loaded; `frozen` (the inference stages) as the sampler loads (`Component::load_frozen`).
fn load_component<C: Component>(b: &mut dyn Backend, o: &BenchOptions, component: &str, frozen: bool) -> Result<C> {
    let dir = weights::component_dir(o.model, component)?;
    Ok(load_or_random(b, &dir, o.variant, o.random_weights, frozen)?.0)
}

pub fn run(b: &mut dyn Backend, stage: Stage, o: &BenchOptions) -> Result<BenchReport> {
    if o.iters == 0 || o.iters > MAX_ITERS || o.warmup > MAX_ITERS {
        bail!("$iters must be between 1 and {MAX_ITERS} (and $warmup at most {MAX_ITERS})");
    }
    if o.batch == 0 || o.batch > 4096 || o.height == 0 || o.width == 0 || o.height > 8192 || o.width > 8192 {
        bail!("$batch (1 to 4096), $height and $width (1 to 8192 pixels) are out of range");
    }
    let report = |stage: &str,
                  shape: String,
                  params,
                  (act, activations): (usize, DType),
                  flops: u64,
                  (times, kernels, graph_replays): Timing,
                  b: &dyn Backend| {
        let mut sorted = times.clone(); // `times` stays in call order for the report
        sorted.sort_by(f64::total_cmp);
        let (min, max) = (sorted[0], sorted[sorted.len() - 1]);
        let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
        let median = (sorted[(sorted.len() - 1) / 2] + sorted[sorted.len() / 2]) / 2.0;
        BenchReport {
            stage: stage.into(),
            backend: b.name(),
            shape,
            parameters: params,
            activation_bytes: act * 4, // arenas count 4-byte slots
            activations: activations.name(),
            iters: o.iters,
            mean_ms: mean,
            min_ms: min,
            median_ms: median,
            max_ms: max,
            peak_rss_bytes: peak_rss_bytes(),
            peak_device_bytes: b.device_memory().map(|(_, peak)| peak as u64),
            times_ms: times,
            gflop_per_call: flops as f64 / 1e9,
            achieved_gflops: flops as f64 / 1e9 / (min / 1e3),
            graph_replays,
            kernels,
        }
    };
    match stage {
        Stage::Unet => {
            let unet = load_component::<UNet>(b, o, "unet", true)?;
            let vae_scale = vae_scale(o.model)?;
            if o.height % vae_scale != 0 || o.width % vae_scale != 0 {
                bail!("$height/$width must be multiples of {vae_scale} (the VAE's scale factor)");
            }
            let (h, w, n) = (o.height / vae_scale, o.width / vae_scale, 2 * o.batch);
            let ctx_len = 77;
            let (_, flops) = unet.plan(n, h, w, ctx_len)?;
            let mut arena = unet.allocate_arena(b, n, h, w, ctx_len)?;
            let x = Fmap::alloc(&mut arena, n, h, w, unet.config.in_channels)?;
            let ctx = arena.alloc([n * ctx_len, unet.config.cross_attention_dim])?;
            let ts = arena.alloc_f32([n])?;
            b.upload(&x.t, &random_values(x.numel(), 1))?;
            b.upload(&ctx, &random_values(ctx.numel(), 2))?;
            let base = arena.mark();
            let bd: &dyn Backend = b;
            let key = (arena.pool().0 as u64) << 32 | n as u64;
            // As the sampler: the timesteps uploaded, then the U-Net as a replayable graph.
            let times = time_it(bd, o.profile, o.warmup, o.iters, || {
                unet.upload_timesteps(bd, &ts, &[500.0], n)?;
                bd.graph(key, &mut || {
                    arena.release(base);
                    unet.forward_from_timesteps(&mut Cx::new(bd, &mut arena), &x, &ts, &ctx, ctx_len).map(|_| ())
                })?;
                bd.synchronize()
            })?;
            bd.clear_graphs();
            let shape = format!(
                "batch {n} (guided, {} prompt(s)) × {h}×{w} latents ({}×{} px), 77 text tokens",
                o.batch, o.height, o.width
            );
            Ok(report(
                "unet (one guided step)",
                shape,
                unet.num_params(),
                (arena.capacity(), arena.activations()),
                flops,
                times,
                b,
            ))
        }
        Stage::VaeDecode => {
            let vae = load_component::<AutoencoderKL>(b, o, "vae", true)?;
            let f = vae.config.scale_factor();
            if o.height % f != 0 || o.width % f != 0 {
                bail!("$height/$width must be multiples of {f} (the VAE's scale factor)");
            }
            let (h, w) = (o.height / f, o.width / f);
            let (_, flops) = vae.plan_decode(o.batch, h, w)?;
            let mut arena = vae.allocate_decode_arena(b, o.batch, h, w)?;
            let z = Fmap::alloc(&mut arena, o.batch, h, w, vae.config.latent_channels)?;
            b.upload(&z.t, &random_values(z.numel(), 3))?;
            let base = arena.mark();
            let times = time_it(b, o.profile, o.warmup, o.iters, || {
                arena.release(base);
                vae.decode(&mut Cx::new(b, &mut arena), &z)?;
                b.synchronize()
            })?;
            let shape = format!("batch {} × {}×{} latents → {}×{} px", o.batch, h, w, o.height, o.width);
            let (_, dec) = vae.split_params();
            Ok(report("vae decode", shape, dec, (arena.capacity(), arena.activations()), flops, times, b))
        }
        Stage::TextEncoder => {
            let clip = load_component::<ClipTextModel>(b, o, "text_encoder", true)?;
            let n = 2 * o.batch;
            let seq = clip.config.max_position_embeddings.min(77);
            let mut arena = clip.allocate_arena(b, n, seq, false)?;
            let ids: Vec<u32> = (0..n * seq).map(|i| (i as u32 * 7919) % clip.config.vocab_size as u32).collect();
            let c = &clip.config;
            let flops = transformer_flops(n, seq, c.num_hidden_layers, c.hidden_size, c.intermediate_size);
            let times = time_it(b, o.profile, o.warmup, o.iters, || {
                arena.release_all_to(0);
                clip.forward(&mut Cx::new(b, &mut arena), &ids, n, seq)?;
                b.synchronize()
            })?;
            let act = arena.capacity();
            let shape = format!("batch {n} × {seq} tokens");
            Ok(report("text encoder", shape, clip.num_params(), (act, DType::F32), flops, times, b))
        }
        Stage::TrainStep => {
            let (shape, params, act, flops, times) = train_step(b, o)?;
            Ok(report("train step (U-Net + text encoder)", shape, params, (act, DType::F32), flops, times, b))
        }
        Stage::Allreduce => bail!("bench allreduce is run by tools::bench_allreduce, not with a model"),
    }
}

/// The process's peak resident set (VmHWM in /proc/self/status), where the OS reports it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.trim_start_matches("VmHWM:").trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

/// Multiply-adds ×2 of a transformer encoder's matrix products and attention on n × seq tokens.
fn transformer_flops(n: usize, seq: usize, layers: usize, d: usize, ffn: usize) -> u64 {
    (n * seq) as u64 * layers as u64 * (2 * (4 * d * d + 2 * d * ffn) + 4 * seq * d) as u64
}

/// The models and settings of a train-step bench: the U-Net, the text encoder, the scheduler's
/// training alphas and the micro-batch (`o.batch` latents at the image size, 77 caption tokens).
pub(crate) struct TrainSetup {
    pub unet: UNet,
    pub text: crate::models::text::TextEncoder,
    pub alphas: Vec<f32>,
    pub shape: crate::train::MicroBatchShape,
}

/// Where the models' parameters come from.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Weights {
    /// As `o.random_weights` says: loaded, or random with the config's architecture.
    AsOptions,
    /// Allocated and not filled: a planning pass (`backend::plan`) reads only the shapes.
    Unfilled,
}

pub(crate) fn train_setup(b: &mut dyn Backend, o: &BenchOptions, weights_from: Weights) -> Result<TrainSetup> {
    use crate::models::text::TextEncoder;
    let unet_dir = weights::component_dir(o.model, "unet")?;
    let text_dir = weights::component_dir(o.model, "text_encoder")?;
    let (unet, text) = match weights_from {
        Weights::Unfilled => (
            UNet::allocate(b, UNet::config_from_file(&unet_dir.join("config.json"))?)?,
            TextEncoder::allocate(b, &text_dir)?,
        ),
        Weights::AsOptions if o.random_weights => {
            (load_or_random::<UNet>(b, &unet_dir, o.variant, true, false)?.0, TextEncoder::random(b, &text_dir, 0)?)
        }
        Weights::AsOptions => (
            load_or_random::<UNet>(b, &unet_dir, o.variant, false, false)?.0,
            TextEncoder::load(b, &text_dir, o.variant)?.0,
        ),
    };
    let vae_scale = vae_scale(o.model)?;
    if o.height % vae_scale != 0 || o.width % vae_scale != 0 {
        bail!("$height/$width must be multiples of {vae_scale} (the VAE's scale factor)");
    }
    let sched = crate::sample::schedulers::config_path(&weights::component_dir(o.model, "scheduler")?)?;
    let alphas = crate::sample::schedulers::training_alphas_cumprod(&weights::read_json(&sched)?, &sched)?;
    let shape =
        crate::train::MicroBatchShape { size: o.batch, h: o.height / vae_scale, w: o.width / vae_scale, seq: 77 };
    Ok(TrainSetup { unet, text, alphas, shape })
}

/// One optimizer step of `roentgen train` (U-Net and text encoder jointly, AdamW, gradient
/// clipping at 1, the paper's defaults; recomputing block internals with `o.gradient_checkpointing`)
/// on `batch` random latents, noise, captions and timesteps.
/// FLOP: 3 × the forward's (the backward's two products per forward product), the usual count;
/// recomputation's extra forward is not counted (the rate stays comparable).
fn train_step(b: &mut dyn Backend, o: &BenchOptions) -> Result<(String, usize, usize, u64, Timing)> {
    use crate::models::text::TextEncoder;
    use crate::train::{Batch, InpaintInputs, Noise, OptimOptions, PredictionType, Trainer};
    let TrainSetup { unet, text, alphas, shape } = train_setup(b, o, Weights::AsOptions)?;
    let (n, h, w, seq) = (shape.size, shape.h, shape.w, shape.seq);
    let opts = OptimOptions { gradient_checkpointing: o.gradient_checkpointing, ..OptimOptions::default() };
    let mut trainer = Trainer::new(b, &unet, &text, opts, alphas.clone(), PredictionType::Epsilon, shape)?;
    let c = unet.config.out_channels;
    let vocab = match &text {
        TextEncoder::Clip(m) => m.config.vocab_size,
        TextEncoder::Bert(m) => m.config.vocab_size,
    };
    let batch = Batch {
        latents: random_values(n * c * h * w, 4),
        latent_shape: [n, c, h, w],
        input_ids: (0..n * seq).map(|i| (i * 7919 % vocab) as u32).collect(),
        attention_mask: vec![1; n * seq],
        noise: Noise::Given(random_values(n * c * h * w, 5)),
        timesteps: (0..n).map(|i| (i * 389 + 500) % alphas.len()).collect(),
        // An inpainting U-Net trains on a mask and masked-image latents beside the noisy latents.
        inpaint: (unet.config.in_channels != c).then(|| InpaintInputs {
            mask: (0..n * h * w).map(|i| ((i % w) * 2 < w) as u8 as f32).collect(),
            masked_latents: random_values(n * c * h * w, 6),
        }),
    };
    let text_flops = match &text {
        TextEncoder::Clip(m) => {
            let c = &m.config;
            transformer_flops(n, seq, c.num_hidden_layers, c.hidden_size, c.intermediate_size)
        }
        TextEncoder::Bert(m) => {
            let c = &m.config;
            transformer_flops(n, seq, c.num_hidden_layers, c.hidden_size, c.intermediate_size)
        }
    };
    let flops = 3 * (unet.plan(n, h, w, seq)?.1 + text_flops);
    let params = unet.num_params() + text.num_params();
    let bd: &dyn Backend = b;
    let times = time_it(bd, o.profile, o.warmup, o.iters, || {
        trainer.train_step(bd, &unet, &text, std::slice::from_ref(&batch), 1_000_000, &crate::dist::Dist::single())?;
        bd.synchronize()
    })?;
    let act: usize = bd
        .pool_sizes()
        .iter()
        .filter(|(l, _)| l.ends_with(".training") || l.ends_with(".activations"))
        .map(|p| p.1)
        .sum();
    let recompute = if o.gradient_checkpointing { ", recomputing block internals" } else { "" };
    let shape =
        format!("batch {n} × {h}×{w} latents ({}×{} px), {seq} caption tokens, AdamW{recompute}", o.height, o.width);
    Ok((shape, params, act / 4, flops, times))
}

/// The VAE's scale factor of a pipeline folder (8 when there is no VAE config to read).
fn vae_scale(model: &Path) -> Result<usize> {
    let p = model.join("vae").join("config.json");
    if weights::is_pipeline_folder(model) && p.is_file() {
        Ok(VaeConfig::from_file(&p)?.scale_factor())
    } else {
        Ok(8)
    }
}

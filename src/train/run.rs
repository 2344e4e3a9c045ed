//! `roentgen train` and `roentgen train-step`: the loops around `Trainer`.
//!
//! Randomness is a function of (seed, step, sample), scheme [`RNG_SCHEME`]: a step's samples are
//! numbered 0..global batch (micro-batch by micro-batch); sample i takes the data index at
//! position (step − 1) · global batch + i of the epochs' permutations (seeded by (seed, epoch)),
//! its VAE latent sample, caption dropout and timestep from a host stream seeded by (seed, step,
//! i), and its noise from the Philox stream (seed, step · 2³² + i) on the backend, the same values
//! on the CPU and the GPU. So where a sample is computed — which micro-batch, with `--grad-accum N`
//! or one batch N times larger (or, later, which rank) — does not change what it draws; and a run
//! resumed from a checkpoint reproduces the uninterrupted run exactly (the CPU backend's reductions
//! are deterministic for a given thread count).

use super::checkpoint::{self, CheckpointContents};
use super::data::OnBadImage;
use super::job::{self, ImageDraw, OutputFolder, TrainLog};
use super::masks;
use super::{Batch, InpaintInputs, MicroBatchShape, Noise, OptimOptions, PredictionType, StepStats, Trainer};
use crate::backend::Backend;
use crate::diag::SettingError;
use crate::dist::{fingerprint, fingerprint_tensor, Dist};
use crate::io::manifest::read_manifest;
use crate::io::weights;
use crate::models::text::{TextEncoder, TextTokenizer};
use crate::models::unet::{UNet, UNetConfig};
use crate::models::vae::{AutoencoderKL, LatentEncoder};
use crate::models::Component;
use crate::rng::splitmix::SplitMix64;
use crate::sample::init_image::{mask_to_latent, masked_image};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub model: PathBuf,
    pub data: PathBuf,
    pub output: PathBuf,
    pub resolution: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub seed: u64,
    pub optim: OptimOptions,
    pub unet_init_random: bool,
    pub checkpoint_every: usize,
    pub resume: bool,
    pub overwrite: bool,
    pub cache_latents: bool,
    pub log_every: usize,
    pub on_bad_image: OnBadImage,
    pub variant: Option<String>,
    /// EMA of the U-Net weights with this maximum decay (diffusers' --use_ema, 0.9999).
    pub ema_decay: Option<f32>,
    /// A transformers text-encoder folder (config.json, weights, tokenizer files) replacing the
    /// pipeline's CLIP, e.g. RadBERT (the paper's "Text Encoders" rows).
    pub text_encoder: Option<PathBuf>,
    /// Start the text encoder from PyTorch's default initialisation (its config only).
    pub text_encoder_init_random: bool,
    /// Caption dropout: the probability that an example is trained with the empty prompt.
    pub uncond_prob: f64,
    /// Keep only the newest N checkpoints (diffusers' --checkpoints_total_limit).
    pub checkpoints_total_limit: Option<usize>,
    /// Resume even when the settings differ from the checkpoint's.
    pub allow_changed_settings: bool,
    /// Decode every image up front instead of reading headers only.
    pub verify_images: bool,
}

/// The version of the randomness scheme (module docs), recorded in checkpoints: 1 drew a step's
/// host values from one stream in order and one noise stream per micro-batch; 2 keys both by the
/// sample.
pub const RNG_SCHEME: u64 = 2;

/// The host stream of sample `i` of step `step`.
fn sample_rng(seed: u64, step: u64, i: u64) -> SplitMix64 {
    SplitMix64::new(seed ^ step.wrapping_mul(0xA24B_AED4_963E_E407) ^ i.wrapping_mul(0x9FB2_1C65_1E98_DF25))
}

impl TrainConfig {
    /// The settings that shape a run's results, keyed like their flags, for a run on `ranks`
    /// ranks; recorded in every checkpoint and compared on `--resume`. The batch enters as the
    /// global batch (`batch_size` × `grad_accum` × ranks): how it is split into micro-batches and
    /// ranks does not change what is drawn (module docs), so a checkpoint resumes on any number of
    /// ranks with the same global batch.
    pub fn settings(&self, ranks: usize) -> serde_json::Value {
        let o = &self.optim;
        serde_json::json!({"seed": self.seed, "data": abs_path(&self.data), "resolution": self.resolution,
            "global_batch": self.batch_size * o.grad_accum * ranks, "lr": o.lr, "adam_beta1": o.beta1,
            "adam_beta2": o.beta2, "adam_eps": o.eps, "weight_decay": o.weight_decay,
            "max_grad_norm": o.max_grad_norm.unwrap_or(0.0), "lr_schedule": format!("{:?}", o.schedule),
            "train_text_encoder": o.train_text_encoder, "uncond_prob": self.uncond_prob, "ema_decay": self.ema_decay,
            "rng_scheme": RNG_SCHEME})
    }

    /// Everything a rank was started with, by name, for the start-up check that all ranks agree
    /// (the settings, and the options that do not shape results but must match across ranks).
    fn rank_options(&self) -> Vec<(String, String)> {
        let mut v: Vec<(String, String)> = match self.settings(1) {
            serde_json::Value::Object(m) => m.into_iter().map(|(k, v)| (format!("${k}"), v.to_string())).collect(),
            _ => Vec::new(),
        };
        let more = [
            ("$batch_size", self.batch_size.to_string()),
            ("$grad_accum", self.optim.grad_accum.to_string()),
            ("$steps", self.steps.to_string()),
            ("$model", abs_path(&self.model)),
            ("$output", abs_path(&self.output)),
            ("$checkpoint_every", self.checkpoint_every.to_string()),
            ("$resume", self.resume.to_string()),
            ("$cache_latents", self.cache_latents.to_string()),
            ("$on_bad_image", format!("{:?}", self.on_bad_image)),
            ("$variant", format!("{:?}", self.variant)),
            ("$text_encoder", format!("{:?}", self.text_encoder.as_deref().map(abs_path))),
            ("$unet_init", self.unet_init_random.to_string()),
            ("$text_encoder_init", self.text_encoder_init_random.to_string()),
        ];
        v.extend(more.into_iter().map(|(k, x)| (k.to_string(), x)));
        v
    }

    /// Every number checked before any work, naming its field.
    pub fn validate(&self) -> Result<()> {
        if self.resolution == 0 || self.resolution % 8 != 0 || self.resolution > MAX_RESOLUTION {
            let problem = format!("must be a positive multiple of 8, at most {MAX_RESOLUTION}");
            return Err(SettingError::value("resolution", self.resolution, problem));
        }
        if self.batch_size == 0 || self.batch_size > MAX_BATCH {
            return Err(SettingError::value(
                "batch_size",
                self.batch_size,
                format!("must be between 1 and {MAX_BATCH}"),
            ));
        }
        if self.steps == 0 {
            return Err(SettingError::fields(&["steps"], "must be at least 1"));
        }
        self.optim.validate()?;
        if !(0.0..=1.0).contains(&self.uncond_prob) {
            return Err(SettingError::value("uncond_prob", self.uncond_prob, "expected a probability in [0, 1]"));
        }
        if let Some(d) = self.ema_decay {
            if !(d > 0.0 && d <= 1.0) {
                return Err(SettingError::value("ema_decay", d, "must be in (0, 1]"));
            }
        }
        if self.checkpoints_total_limit == Some(0) {
            return Err(SettingError::value("checkpoints_total_limit", 0, "must be at least 1"));
        }
        Ok(())
    }
}

/// Training images are at most this many pixels on a side (SD-XL trains at 1024; 8192 leaves room
/// without letting a typo allocate terabytes).
pub const MAX_RESOLUTION: usize = 8192;
/// Images per micro-batch, at most.
pub const MAX_BATCH: usize = 4096;

/// A path as an absolute one where it exists (the recorded data path then compares equal from
/// another working folder).
pub(crate) fn abs_path(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()).display().to_string()
}

/// The frozen and trained models of a pipeline folder, loaded for training.
pub struct Models {
    pub tokenizer: TextTokenizer,
    pub text: TextEncoder,
    pub unet: UNet,
    /// The U-Net's config.json as written to checkpoints (cross_attention_dim follows the text
    /// encoder when it was replaced).
    pub unet_config: serde_json::Value,
    pub vae: AutoencoderKL,
    pub alphas_cumprod: Vec<f32>,
    pub prediction_type: PredictionType,
    /// Where the text encoder's and tokenizer's files come from, when not the pipeline's own.
    pub text_source: Option<PathBuf>,
}

impl Models {
    pub fn load(
        b: &mut dyn Backend,
        dir: &Path,
        variant: Option<&str>,
        unet_random: bool,
        seed: u64,
        text_override: Option<&Path>,
        text_random: bool,
    ) -> Result<Models> {
        if dir.is_file() {
            bail!(
                "$model {}: a single file; training reads a pipeline folder and writes pipeline checkpoints: \
                 unpack it first with `roentgen export --model {} --out DIR --dtype f32`",
                dir.display(),
                dir.display()
            );
        }
        weights::check_folder(dir, "a pipeline folder")?;
        if !weights::is_pipeline_folder(dir) {
            bail!("{}: not a pipeline folder (no model_index.json); training needs the whole pipeline", dir.display());
        }
        let (tok_dir, te_dir) = match text_override {
            Some(t) => {
                if !t.join("config.json").is_file() {
                    bail!("$text_encoder {}: no config.json (expected a transformers model folder)", t.display());
                }
                (t.to_path_buf(), t.to_path_buf())
            }
            None => (weights::component_dir(dir, "tokenizer")?, weights::component_dir(dir, "text_encoder")?),
        };
        let tokenizer = TextTokenizer::from_dir(&tok_dir)?;
        let text = if text_random {
            TextEncoder::init_default(b, &te_dir, seed ^ 0x7E47)?
        } else {
            TextEncoder::load(b, &te_dir, if text_override.is_some() { None } else { variant })?.0
        };
        let unet_dir = weights::component_dir(dir, "unet")?;
        let mut unet_config = weights::read_json(&unet_dir.join("config.json"))?;
        let unet = if unet_random {
            // The paper's "Rnd U-Net": the architecture of the config, from PyTorch's default
            // init, with cross-attention sized for the text encoder.
            unet_config["cross_attention_dim"] = serde_json::Value::from(text.hidden_size());
            let c = UNetConfig::from_json(&unet_config, &unet_dir.join("config.json"))?;
            let u = UNet::allocate(b, c)?;
            crate::models::init_default(b, &u.table, seed)?;
            u
        } else {
            UNet::load(b, &unet_dir, variant)?.0
        };
        if text.hidden_size() != unet.config.cross_attention_dim {
            bail!(
                "the text encoder's hidden size {} does not match the U-Net's cross_attention_dim {}; \
                 a new text encoder needs a new U-Net: add $unet_init random",
                text.hidden_size(),
                unet.config.cross_attention_dim
            );
        }
        // (A tokenizer larger than the encoder's vocabulary is caught by the embedding's id check.)
        let vae_dir = weights::component_dir(dir, "vae")?;
        let (vae, _) = AutoencoderKL::load(b, &vae_dir, variant)?;
        crate::sample::pipeline::check_scaling_factor(&vae, &vae_dir)?;
        let sched_path = crate::sample::schedulers::config_path(&weights::component_dir(dir, "scheduler")?)?;
        let sched = weights::read_json(&sched_path)?;
        let alphas_cumprod = crate::sample::schedulers::training_alphas_cumprod(&sched, &sched_path)?;
        let prediction_type = match sched.get("prediction_type").and_then(|v| v.as_str()).unwrap_or("epsilon") {
            "epsilon" => PredictionType::Epsilon,
            "v_prediction" => PredictionType::VPrediction,
            other => bail!(
                "{}: prediction_type \"{other}\" is not supported for training (epsilon, v_prediction)",
                sched_path.display()
            ),
        };
        Ok(Models {
            tokenizer,
            text,
            unet,
            unet_config,
            vae,
            alphas_cumprod,
            prediction_type,
            text_source: text_override.map(Path::to_path_buf),
        })
    }

    fn checkpoint<'a>(
        &'a self,
        source: &'a Path,
        ema: Option<&'a crate::tensor::Layout>,
        optimizer: Vec<(&'static str, crate::tensor::Tensor, crate::tensor::Tensor)>,
        state: serde_json::Value,
    ) -> CheckpointContents<'a> {
        CheckpointContents {
            source,
            unet: &self.unet.table,
            unet_config: &self.unet_config,
            text_encoder: self.text.table(),
            text_source: self.text_source.as_deref(),
            unet_ema: ema,
            optimizer,
            state,
        }
    }
}

/// The epoch's order of example indices: Fisher–Yates with a stream of (seed, epoch).
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed ^ 0xDA7A_0000_0000_0000 ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

/// Runs `roentgen train` as one of `dist`'s ranks (data parallel: each rank computes its share
/// of every step's samples, the gradients are summed over ranks before the optimizer step, and
/// rank 0 alone writes the output folder); returns the path of the last checkpoint.
pub fn train(
    b: &mut dyn Backend,
    cfg: &TrainConfig,
    log: &mut dyn FnMut(&StepStats, f64),
    dist: &Dist,
) -> Result<PathBuf> {
    cfg.validate()?;
    let (rank, ranks) = (dist.rank(), dist.size());
    dist.agree(&cfg.rank_options().into_iter().map(|(k, v)| (k, fingerprint(v.as_bytes()))).collect::<Vec<_>>())
        .context("the ranks were started with different options")?;
    // Rank 0 alone owns the output folder (lock, leftovers, log, checkpoints); the others wait.
    let out =
        if dist.is_root() { Some(OutputFolder::open(&cfg.output, cfg.resume, cfg.overwrite, "train")?) } else { None };
    dist.barrier();
    // Rank 0 chooses the checkpoint to resume; every rank reads that one.
    let resume_from = if cfg.resume {
        let chosen = match &out {
            Some(o) => checkpoint::latest(&o.dir)?.display().to_string(),
            None => String::new(),
        };
        Some(PathBuf::from(dist.broadcast_string(&chosen)))
    } else {
        None
    };
    if let Some(ckpt) = &resume_from {
        let (mut state, _) = checkpoint::read_state(ckpt)?;
        // Checkpoints from before the scheme was recorded used scheme 1; from before ranks, they
        // recorded the batch as batch_size × grad_accum on one process.
        if state.get("rng_scheme").is_none() {
            state["rng_scheme"] = 1.into();
        }
        if state.get("global_batch").is_none() {
            let field = |k: &str| state.get(k).and_then(|v| v.as_u64());
            if let (Some(bs), Some(acc)) = (field("batch_size"), field("grad_accum")) {
                state["global_batch"] = (bs * acc).into();
            }
        }
        job::check_resume_settings(ckpt, &state, &cfg.settings(ranks), cfg.allow_changed_settings)?;
    }
    let load_dir = resume_from.clone().unwrap_or_else(|| cfg.model.clone());
    let text_override = if resume_from.is_none() { cfg.text_encoder.as_deref() } else { None };
    let unet_random = cfg.unet_init_random && resume_from.is_none();
    let text_random = cfg.text_encoder_init_random && resume_from.is_none();
    let models = Models::load(b, &load_dir, cfg.variant.as_deref(), unet_random, cfg.seed, text_override, text_random)?;
    let f = models.vae.config.scale_factor();
    if cfg.resolution % f != 0 {
        bail!("$resolution {} is not a multiple of the VAE's scale factor {f}", cfg.resolution);
    }
    let lat = cfg.resolution / f;

    // Data: rows, then images checked up front so bad rows are counted before work.
    let good = job::usable_rows(
        &cfg.data,
        read_manifest(&cfg.data)?,
        cfg.on_bad_image,
        cfg.verify_images.then_some(cfg.resolution),
    )?;
    let global_batch = cfg.batch_size * cfg.optim.grad_accum * ranks;
    if good.len() < global_batch {
        bail!(
            "$data {}: {} usable example(s), fewer than the global batch of {global_batch} ($batch_size {} × $grad_accum {} × {ranks} rank(s)): \
             a step would train on some examples twice",
            cfg.data.display(),
            good.len(),
            cfg.batch_size,
            cfg.optim.grad_accum
        );
    }
    let seq = models.tokenizer.max_length();
    let empty = models.tokenizer.encode("");
    let tokens: Vec<crate::models::text::TextTokens> = good.iter().map(|e| models.tokenizer.encode(&e.text)).collect();
    let mut encoder = LatentEncoder::new(b, &models.vae, cfg.resolution, cfg.resolution)?;
    let mut cache: Vec<Option<(Vec<f32>, Vec<f32>)>> = vec![None; good.len()];
    let mut draw = ImageDraw::new(&good, &cfg.data, cfg.on_bad_image, cfg.resolution);
    if cfg.cache_latents {
        let bar = indicatif::ProgressBar::new(good.len() as u64);
        if !dist.is_root() {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        bar.set_message("encoding latents");
        for i in 0..good.len() {
            // A row that does not decode caches its replacement's latents (as drawing it would).
            let (_, px) = draw.load(i)?;
            cache[i] = Some(encoder.encode(b, &models.vae, &px)?);
            bar.inc(1);
        }
        bar.finish_and_clear();
    }

    let mut trainer = Trainer::new(
        b,
        &models.unet,
        &models.text,
        cfg.optim.clone(),
        models.alphas_cumprod.clone(),
        models.prediction_type,
        MicroBatchShape { size: cfg.batch_size, h: lat, w: lat, seq },
    )?;
    if let Some(decay) = cfg.ema_decay {
        trainer.enable_ema(b, &models.unet, decay)?;
    }
    if let Some(ckpt) = &resume_from {
        let (state, moments) = checkpoint::read_state(ckpt)?;
        let step = state.get("step").and_then(|v| v.as_u64()).context("trainer.json: no step")? as usize;
        trainer.restore(b, &moments, step)?;
        if let Some(table) = trainer.ema_table() {
            let dir = ckpt.join("unet_ema");
            let files = weights::weight_files(&dir, None)
                .with_context(|| format!("{}: $ema needs the checkpoint's EMA weights", ckpt.display()))?;
            weights::load_into(b, table, &files, &weights::no_alias, &weights::is_known_buffer)?;
        }
        if dist.is_root() {
            crate::diag::progress(format!("resuming from {} at step {step}", ckpt.display()));
        }
    }
    // Every rank must start from the same data and weights (a file changed between the ranks'
    // reads, or nodes without a shared filesystem, would silently train different models).
    let mut inputs = vec![(format!("the manifest {}", cfg.data.display()), fingerprint(&std::fs::read(&cfg.data)?))];
    for (name, t) in trainer.trained_weights() {
        inputs.push((format!("the loaded {name} weights"), fingerprint_tensor(b, &t)?));
    }
    dist.agree(&inputs)?;
    let n = good.len();
    let per_step = global_batch;
    let z = models.vae.config.latent_channels;
    let per = z * lat * lat;
    let sf = models.vae.config.scaling_factor;
    // An inpainting U-Net (9 input channels) learns to repaint random masks (`masks`).
    let inpainting = models.unet.config.in_channels != z;
    if inpainting && dist.is_root() {
        crate::diag::progress("the U-Net is an inpainting one: training it on random masks (rectangles and ellipses)");
    }
    let mut log_file = match &out {
        Some(o) => Some(TrainLog::open(&o.dir.join("train_log.jsonl"), trainer.step)?),
        None => None,
    };
    let mut last_ckpt = resume_from.clone();
    // The loop, as a closure so that its error can say what is on disk.
    let mut run = || -> Result<()> {
        let t0 = Instant::now();
        let start = trainer.step;
        let mut perm: (u64, Vec<usize>) = (0, permutation(n, cfg.seed, 0));
        while trainer.step < cfg.steps {
            let step = trainer.step + 1;
            let mut micro = Vec::with_capacity(cfg.optim.grad_accum);
            for a in 0..cfg.optim.grad_accum {
                let mut mb = Batch {
                    latents: Vec::with_capacity(cfg.batch_size * per),
                    latent_shape: [cfg.batch_size, z, lat, lat],
                    input_ids: Vec::with_capacity(cfg.batch_size * seq),
                    attention_mask: Vec::with_capacity(cfg.batch_size * seq),
                    // Drawn where the U-Net runs (Philox): one stream per sample, (step, i).
                    noise: Noise::Philox { seed: cfg.seed, streams: Vec::with_capacity(cfg.batch_size) },
                    timesteps: Vec::with_capacity(cfg.batch_size),
                    inpaint: inpainting.then(|| InpaintInputs {
                        mask: Vec::with_capacity(cfg.batch_size * lat * lat),
                        masked_latents: Vec::with_capacity(cfg.batch_size * per),
                    }),
                };
                for k in 0..cfg.batch_size {
                    // The sample's number in the step (micro-batch a of every rank, then the
                    // next), and its place in the epochs' order.
                    let i = (a * ranks + rank) * cfg.batch_size + k;
                    let counter = (step - 1) * per_step + i;
                    let epoch = (counter / n) as u64;
                    if perm.0 != epoch {
                        perm = (epoch, permutation(n, cfg.seed, epoch));
                    }
                    let idx = perm.1[counter % n];
                    let mut rng = sample_rng(cfg.seed, step as u64, i as u64);
                    // The image itself: to encode when not cached, and to mask for inpainting.
                    let pixels = if cache[idx].is_none() || inpainting { Some(draw.load(idx)?.1) } else { None };
                    let (mean, logvar) = match (&cache[idx], &pixels) {
                        (Some(m), _) => m.clone(),
                        (None, Some(px)) => encoder.encode(b, &models.vae, px)?,
                        (None, None) => unreachable!("the image is loaded when its latents are not cached"),
                    };
                    // latent_dist.sample() · scaling_factor
                    for (m, lv) in mean.iter().zip(&logvar) {
                        mb.latents.push((m + (0.5 * lv).exp() * rng.next_normal()) * sf);
                    }
                    // Drawn only when dropout is on, so runs without it keep their streams.
                    let drop = cfg.uncond_prob > 0.0
                        && ((rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < cfg.uncond_prob;
                    let t = if drop { &empty } else { &tokens[idx] };
                    mb.input_ids.extend_from_slice(&t.ids);
                    mb.attention_mask.extend_from_slice(&t.mask);
                    mb.timesteps.push((rng.next_u64() % models.alphas_cumprod.len() as u64) as usize);
                    if let Noise::Philox { streams, .. } = &mut mb.noise {
                        streams.push(((step as u64) << 32) | i as u64);
                    }
                    // Inpainting U-Net: a random mask and the masked image's latent sample, drawn
                    // after the rest so that other runs keep their streams.
                    if let (Some(ip), Some(px)) = (&mut mb.inpaint, &pixels) {
                        let mask = masks::random_mask(cfg.resolution, cfg.resolution, &mut rng);
                        let (mean, logvar) = encoder.encode(b, &models.vae, &masked_image(px, &mask))?;
                        for (m, lv) in mean.iter().zip(&logvar) {
                            ip.masked_latents.push((m + (0.5 * lv).exp() * rng.next_normal()) * sf);
                        }
                        ip.mask.extend(mask_to_latent(&mask, cfg.resolution, f));
                    }
                }
                micro.push(mb);
            }
            let stats = trainer.train_step(b, &models.unet, &models.text, &micro, cfg.steps, dist)?;
            let secs = t0.elapsed().as_secs_f64();
            let ips = ((stats.step - start) * per_step) as f64 / secs.max(1e-9);
            if let Some(log_file) =
                log_file.as_mut().filter(|_| stats.step % cfg.log_every.max(1) == 0 || stats.step == cfg.steps)
            {
                log_file.append(&serde_json::json!({"step": stats.step, "loss": stats.loss, "lr": stats.lr,
                "grad_norm": stats.grad_norm, "images_per_s": ips, "elapsed_s": secs}))?;
            }
            log(&stats, ips);
            if (cfg.checkpoint_every > 0 && stats.step % cfg.checkpoint_every == 0) || stats.step == cfg.steps {
                let dest = cfg.output.join(format!("checkpoint-{}", stats.step));
                // The ranks' weights must not have drifted apart (they get identical updates).
                let mut weights = Vec::new();
                for (name, t) in trainer.trained_weights() {
                    weights.push((format!("the {name} weights after step {}", stats.step), fingerprint_tensor(b, &t)?));
                }
                dist.agree(&weights)?;
                if dist.is_root() {
                    let mut state = cfg.settings(ranks);
                    state["step"] = stats.step.into();
                    state["steps"] = cfg.steps.into();
                    state["loss"] = serde_json::json!(stats.loss);
                    state["source_model"] = cfg.model.display().to_string().into();
                    state["world_size"] = ranks.into();
                    state["batch_size"] = cfg.batch_size.into();
                    state["grad_accum"] = cfg.optim.grad_accum.into();
                    checkpoint::save(
                        b,
                        &dest,
                        &models.checkpoint(&load_dir, trainer.ema_table(), trainer.optimizer_pools(), state),
                    )?;
                    job::retain_checkpoints(&cfg.output, cfg.checkpoints_total_limit)?;
                }
                // Nobody runs ahead of a checkpoint that is not on disk yet.
                dist.barrier();
                last_ckpt = Some(dest);
            }
        }
        Ok(())
    };
    let r = run();
    if draw.skipped > 0 {
        crate::diag::warn(format!("{} image(s) failed to decode while training and were replaced", draw.skipped));
    }
    r.map_err(|e| job::with_checkpoint_note(e, last_ckpt.as_deref()))?;
    last_ckpt.context("no step was run (the checkpoint is already at $steps)")
}

/// Reads a `train-step` batch file: `latents` [n, c, h, w] (scaled, what the U-Net sees) or
/// `pixel_values` [n, 3, H, W] in [−1, 1] (encoded with the VAE's mean), `input_ids` [n, seq],
/// `noise` like the latents, `timesteps` [n]; for an inpainting U-Net also `mask` [n, 1, h, w]
/// and `masked_latents` like the latents.
pub fn read_step_batch(path: &Path, models: &Models, b: &mut dyn Backend) -> Result<Batch> {
    let f = crate::io::safetensors::SafetensorsFile::open(path)?;
    let st = f.parse()?;
    let get = |name: &str| -> Result<Option<(Vec<usize>, Vec<f32>)>> {
        let Ok(view) = st.tensor(name) else { return Ok(None) };
        let shape = view.shape().to_vec();
        let n: usize = shape.iter().product();
        let v: Vec<f32> = match view.dtype() {
            safetensors::Dtype::I64 => {
                view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect()
            }
            safetensors::Dtype::I32 => {
                view.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32).collect()
            }
            d => {
                let dt = crate::io::safetensors::float_dtype(d)
                    .with_context(|| format!("{}: tensor '{name}' has dtype {d:?}", path.display()))?;
                let mut v = vec![0f32; n];
                crate::io::safetensors::to_f32(dt, view.data(), &mut v)?;
                v
            }
        };
        Ok(Some((shape, v)))
    };
    let need = |name: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        get(name)?.with_context(|| format!("{}: no tensor named '{name}'", path.display()))
    };
    let (latents, shape) = match (get("latents")?, get("pixel_values")?) {
        (Some((s, v)), _) => (v, s),
        (None, Some((s, px))) => {
            if s.len() != 4 || s[1] != 3 || s[2] != s[3] {
                bail!("{}: pixel_values has shape {s:?}; expected [n, 3, R, R]", path.display());
            }
            let mut enc = LatentEncoder::new(b, &models.vae, s[2], s[3])?;
            let mut lat = Vec::new();
            let mut lshape = vec![s[0]];
            for i in 0..s[0] {
                let (mean, _) = enc.encode(b, &models.vae, &px[i * 3 * s[2] * s[3]..(i + 1) * 3 * s[2] * s[3]])?;
                lat.extend(mean.iter().map(|x| x * models.vae.config.scaling_factor));
            }
            let f = models.vae.config.scale_factor();
            lshape.extend([models.vae.config.latent_channels, s[2] / f, s[3] / f]);
            (lat, lshape)
        }
        (None, None) => bail!("{}: needs a 'latents' or a 'pixel_values' tensor", path.display()),
    };
    if shape.len() != 4 || shape.contains(&0) {
        bail!("{}: latents have shape {shape:?}; expected [n, c, h, w], none of them 0", path.display());
    }
    let (ishape, ids) = need("input_ids")?;
    let (nshape, noise) = need("noise")?;
    let (_, ts) = need("timesteps")?;
    if nshape != shape || ishape.len() != 2 || ishape[0] != shape[0] || ts.len() != shape[0] {
        bail!(
            "{}: shapes do not agree: latents {shape:?}, noise {nshape:?}, input_ids {ishape:?}, {} timesteps",
            path.display(),
            ts.len()
        );
    }
    // Values checked here, naming the file and tensor: deeper down they surface as a NaN loss, an
    // embedding error or a timestep wrapped around from −1.
    for (name, v) in [("latents", &latents), ("noise", &noise)] {
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            bail!("{}: tensor '{name}' holds a non-finite value ({}) at index {i}", path.display(), v[i]);
        }
    }
    let steps = models.alphas_cumprod.len();
    if let Some(&t) = ts.iter().find(|&&t| !(t >= 0.0 && t < steps as f32 && t.fract() == 0.0)) {
        bail!("{}: tensor 'timesteps' holds {t}; expected whole numbers in 0..{steps} (the scheduler's training timesteps)", path.display());
    }
    let vocab = models.text.vocab_size();
    if let Some(&id) = ids.iter().find(|&&id| !(id >= 0.0 && id < vocab as f32 && id.fract() == 0.0)) {
        bail!(
            "{}: tensor 'input_ids' holds {id}; expected token ids in 0..{vocab} (the text encoder's vocabulary)",
            path.display()
        );
    }
    let attention_mask = match get("attention_mask")? {
        Some((_, m)) if m.len() == ids.len() => m.iter().map(|&x| x as u32).collect(),
        Some((s, _)) => bail!("{}: attention_mask has shape {s:?}; expected {ishape:?}", path.display()),
        None => vec![1; ids.len()],
    };
    // An inpainting U-Net's inputs: both tensors, at the latents' resolution.
    let inpaint = match (get("mask")?, get("masked_latents")?) {
        (None, None) => None,
        (Some((ms, mask)), Some((ls, masked_latents))) => {
            let [n, c, h, w] = [shape[0], shape[1], shape[2], shape[3]];
            if ms != [n, 1, h, w] || ls != shape {
                bail!(
                    "{}: mask has shape {ms:?} and masked_latents {ls:?}; with latents {shape:?} they must be \
                     [{n}, 1, {h}, {w}] and [{n}, {c}, {h}, {w}]",
                    path.display()
                );
            }
            if let Some(i) = masked_latents.iter().position(|x| !x.is_finite()) {
                bail!("{}: tensor 'masked_latents' holds a non-finite value at index {i}", path.display());
            }
            if let Some(&m) = mask.iter().find(|&&m| !(0.0..=1.0).contains(&m)) {
                bail!("{}: tensor 'mask' holds {m}; expected values in [0, 1] (1 repaints)", path.display());
            }
            Some(InpaintInputs { mask, masked_latents })
        }
        (Some(_), None) | (None, Some(_)) => {
            bail!("{}: an inpainting batch needs both 'mask' and 'masked_latents'", path.display())
        }
    };
    Ok(Batch {
        latents,
        latent_shape: [shape[0], shape[1], shape[2], shape[3]],
        attention_mask,
        input_ids: ids.iter().map(|&x| x as u32).collect(),
        noise: Noise::Given(noise),
        timesteps: ts.iter().map(|&t| t as usize).collect(),
        inpaint,
    })
}

/// `roentgen train-step`: one step from a fresh optimizer on a given batch; writes the updated
/// pipeline to `output` and returns the step's statistics.
pub fn train_step(
    b: &mut dyn Backend,
    model: &Path,
    batch_file: &Path,
    output: &Path,
    optim: OptimOptions,
    overwrite: bool,
    variant: Option<&str>,
) -> Result<StepStats> {
    optim.validate()?;
    match std::fs::symlink_metadata(output) {
        Ok(m) if !m.is_dir() => {
            bail!("$output {}: exists and is {}, not a folder", output.display(), crate::io::files::kind_of(&m))
        }
        Ok(_) if !overwrite => bail!("$output {}: exists; pass $overwrite to replace it", output.display()),
        _ => {}
    }
    let models = Models::load(b, model, variant, false, 0, None, false)?;
    let batch = read_step_batch(batch_file, &models, b)?;
    let [n, _, h, w] = batch.latent_shape;
    let seq = batch.input_ids.len() / n;
    let mut trainer = Trainer::new(
        b,
        &models.unet,
        &models.text,
        optim,
        models.alphas_cumprod.clone(),
        models.prediction_type,
        MicroBatchShape { size: n, h, w, seq },
    )?;
    let stats = trainer.train_step(b, &models.unet, &models.text, &[batch], 1, &Dist::single())?;
    let state = serde_json::json!({"step": 1, "loss": stats.loss, "grad_norm": stats.grad_norm});
    checkpoint::save(b, output, &models.checkpoint(model, None, trainer.optimizer_pools(), state))?;
    Ok(stats)
}

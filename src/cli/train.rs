//! `train`, `train-step` and `train-vae`: their arguments, progress bars and the JSON they print.

use super::{open_backend, report_pools, Global};
use anyhow::{bail, Result};
use clap::Args;
use roentgen::backend::Backend;
use std::path::PathBuf;

#[derive(Args)]
pub struct OptimArgs {
    /// Learning rate (the paper's 5e-5).
    #[arg(long, default_value_t = 5e-5)]
    pub lr: f32,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    adam_beta1: f32,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.999)]
    adam_beta2: f32,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    pub adam_eps: f32,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f32,
    /// Global gradient-norm clipping (0 turns it off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Train the CLIP text encoder jointly (on by default, as RoentGen): true or false.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub train_text_encoder: bool,
    /// Keep only each U-Net block's input and output in the forward and recompute the rest just
    /// before that block's backward (diffusers' --gradient_checkpointing): much less activation
    /// memory for about a third more compute; the same gradients.
    #[arg(long)]
    pub gradient_checkpointing: bool,
}

impl OptimArgs {
    fn options(
        &self,
        grad_accum: usize,
        schedule: roentgen::train::schedule::LrSchedule,
    ) -> Result<roentgen::train::OptimOptions> {
        let o = roentgen::train::OptimOptions {
            lr: self.lr,
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_eps,
            weight_decay: self.weight_decay,
            max_grad_norm: grad_clip(self.max_grad_norm)?,
            train_text_encoder: self.train_text_encoder,
            grad_accum,
            schedule,
            gradient_checkpointing: self.gradient_checkpointing,
        };
        o.validate()?;
        Ok(o)
    }
}

/// `--max-grad-norm`: 0 turns clipping off; a negative or NaN value is an error, not "off".
pub fn grad_clip(v: f32) -> Result<Option<f32>> {
    roentgen::train::check_non_negative("max_grad_norm", v)?;
    Ok((v > 0.0).then_some(v))
}

/// How a long training run writes, resumes and guards its output folder and data; shared by
/// `train` and `train-vae`.
#[derive(Args)]
pub struct LongRunArgs {
    /// Write a checkpoint every N steps (and always at the end).
    #[arg(long, default_value_t = 500)]
    pub checkpoint_every: usize,
    /// Log every N steps to train_log.jsonl.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Continue from the latest checkpoint in --output.
    #[arg(long)]
    pub resume: bool,
    /// Allow an existing, non-empty --output (checkpoints of the same step are replaced atomically).
    #[arg(long)]
    pub overwrite: bool,
    /// skip or fail on missing/unreadable images.
    #[arg(long, default_value = "fail")]
    pub on_bad_image: roentgen::train::data::OnBadImage,
    /// Keep only the newest N checkpoints, removing older ones after each new one is written
    /// (diffusers' --checkpoints_total_limit; default: keep all).
    #[arg(long)]
    pub checkpoints_total_limit: Option<usize>,
    /// With --resume: continue even if the seed, learning rate, batch or other settings differ
    /// from those the checkpoint recorded (otherwise the run is refused with the differences).
    #[arg(long)]
    pub allow_changed_settings: bool,
    /// Decode every image of the manifest before training (not only its header), so a corrupt
    /// file is found at the start instead of when it is first drawn.
    #[arg(long)]
    pub verify_images: bool,
}

#[derive(Args)]
pub struct TrainArgs {
    /// The pipeline folder to start from (diffusers layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Manifest: JSONL ({"image": path, "text": prompt} per line) or CSV with image,text columns.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder for checkpoint-N/ and train_log.jsonl.
    #[arg(long)]
    pub output: PathBuf,
    /// Training resolution (shorter side resized, center crop); a multiple of 8.
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// Images per micro-batch (per rank, under MPI: the global batch is batch size × grad accum ×
    /// ranks).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    /// Seed of the data order, timesteps and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// constant, constant_with_warmup or cosine.
    #[arg(long, default_value = "constant")]
    pub lr_schedule: String,
    /// Warmup steps of the learning-rate schedule.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// pretrained, or random (the paper's "Rnd U-Net" rows).
    #[arg(long, default_value = "pretrained")]
    pub unet_init: String,
    /// pretrained, or random (train the text encoder from scratch; its config.json is enough).
    #[arg(long, default_value = "pretrained")]
    pub text_encoder_init: String,
    /// Probability of replacing an example's text with the empty prompt (caption dropout), so the
    /// model learns the unconditional prediction that classifier-free guidance subtracts. 0 (the
    /// paper's and diffusers' default) never drops.
    #[arg(long, default_value_t = 0.0)]
    pub uncond_prob: f64,
    /// Encode every image once with the frozen VAE and reuse its latent distribution.
    #[arg(long)]
    pub cache_latents: bool,
    /// Keep an EMA of the U-Net weights (written as unet_ema/ in each checkpoint; sample it with
    /// `roentgen sample --ema`).
    #[arg(long)]
    pub ema: bool,
    /// The EMA's maximum decay.
    #[arg(long, default_value_t = 0.9999)]
    pub ema_decay: f32,
    /// Weight file variant of the source model, e.g. fp16.
    #[arg(long)]
    pub variant: Option<String>,
    /// Replace the pipeline's text encoder with a transformers folder (e.g. RadBERT: config.json,
    /// model.safetensors, vocab.txt); with --unet-init random the U-Net's cross-attention is sized for it.
    #[arg(long)]
    pub text_encoder: Option<PathBuf>,
    /// Keep the text encoder frozen (the paper's domain-encoder setting); same as
    /// --train-text-encoder false.
    #[arg(long)]
    pub freeze_text_encoder: bool,
    /// Join MPI even when no launcher says so (normally automatic under mpirun/srun). N ranks
    /// train one model data-parallel: each computes its share of every step's samples, the
    /// gradients are summed over ranks, and rank 0 writes the checkpoints; the samples, noise and
    /// results are those of one process with N× the batch.
    #[arg(long)]
    pub distributed: bool,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    pub long_run: LongRunArgs,
}

#[derive(Args)]
pub struct TrainVaeArgs {
    /// A VAE folder, or a pipeline folder (its vae/), to fine-tune.
    #[arg(long, conflicts_with = "config")]
    pub model: Option<PathBuf>,
    /// A VAE config.json to train from scratch (PyTorch's default initialisation).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Manifest (JSONL or CSV with image,text columns; the text is not used).
    #[arg(long)]
    pub data: PathBuf,
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 256)]
    pub resolution: usize,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 1000)]
    pub steps: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f32,
    /// Weight of the KL term.
    #[arg(long, default_value_t = 1e-6)]
    pub kl_weight: f32,
    /// Global gradient-norm clipping (0 turns it off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    #[command(flatten)]
    pub long_run: LongRunArgs,
}

#[derive(Args)]
pub struct TrainStepArgs {
    /// The pipeline folder (diffusers layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Safetensors batch: latents (or pixel_values), input_ids, noise, timesteps.
    #[arg(long)]
    pub batch: PathBuf,
    /// Where to write the updated pipeline.
    #[arg(long)]
    pub output: PathBuf,
    /// Replace an existing --output.
    #[arg(long)]
    pub overwrite: bool,
    /// Weight file variant, e.g. fp16.
    #[arg(long)]
    pub variant: Option<String>,
    #[command(flatten)]
    pub optim: OptimArgs,
}

pub fn train(g: &Global, a: TrainArgs) -> Result<()> {
    let mut b = open_backend(g)?;
    let schedule = roentgen::train::schedule::LrSchedule::parse(&a.lr_schedule, a.warmup_steps)?;
    let unet_init_random = match a.unet_init.as_str() {
        "pretrained" => false,
        "random" => true,
        other => bail!("--unet-init '{other}': expected pretrained or random"),
    };
    let cfg = roentgen::train::run::TrainConfig {
        model: a.model.clone(),
        data: a.data.clone(),
        output: a.output.clone(),
        resolution: a.resolution,
        batch_size: a.batch_size,
        steps: a.steps,
        seed: a.seed,
        optim: a.optim.options(a.grad_accum, schedule)?,
        unet_init_random,
        checkpoint_every: a.long_run.checkpoint_every,
        resume: a.long_run.resume,
        overwrite: a.long_run.overwrite,
        cache_latents: a.cache_latents,
        log_every: a.long_run.log_every,
        on_bad_image: a.long_run.on_bad_image,
        variant: a.variant.clone(),
        ema_decay: a.ema.then_some(a.ema_decay),
        text_encoder: a.text_encoder.clone(),
        text_encoder_init_random: match a.text_encoder_init.as_str() {
            "pretrained" => false,
            "random" => true,
            other => bail!("--text-encoder-init '{other}': expected pretrained or random"),
        },
        uncond_prob: a.uncond_prob,
        checkpoints_total_limit: a.long_run.checkpoints_total_limit,
        allow_changed_settings: a.long_run.allow_changed_settings,
        verify_images: a.long_run.verify_images,
    };
    let mut cfg = cfg;
    if a.freeze_text_encoder {
        cfg.optim.train_text_encoder = false;
    }
    super::as_rank(a.distributed, |dist| train_ranked(b.as_mut(), g, &a, &cfg, dist))
}

/// `train` as one of `dist`'s ranks; rank 0 alone shows progress and prints the result.
fn train_ranked(
    b: &mut dyn Backend,
    g: &Global,
    a: &TrainArgs,
    cfg: &roentgen::train::run::TrainConfig,
    dist: &roentgen::dist::Dist,
) -> Result<()> {
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    if !dist.is_root() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed_precise} < {eta_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut log = |s: &roentgen::train::StepStats, ips: f64| {
        bar.set_position(s.step as u64);
        bar.set_message(format!("loss {:.4} lr {:.2e} {:.2} img/s", s.loss, s.lr, ips));
    };
    let last = roentgen::train::run::train(b, cfg, &mut log, dist)?;
    bar.finish_and_clear();
    if !dist.is_root() {
        return Ok(());
    }
    if dist.size() > 1 {
        eprintln!("{} ranks trained together", dist.size());
    }
    eprintln!("training done: {} (a pipeline folder: roentgen sample --model {} ...)", last.display(), last.display());
    println!(
        "{}",
        serde_json::json!({"checkpoint": last.display().to_string(), "log": a.output.join("train_log.jsonl").display().to_string()})
    );
    report_pools(b, g.verbose);
    Ok(())
}

pub fn train_step(g: &Global, a: TrainStepArgs) -> Result<()> {
    let mut b = open_backend(g)?;
    let opts = a.optim.options(1, roentgen::train::schedule::LrSchedule::Constant)?;
    let s = roentgen::train::run::train_step(
        b.as_mut(),
        &a.model,
        &a.batch,
        &a.output,
        opts,
        a.overwrite,
        a.variant.as_deref(),
    )?;
    println!(
        "{}",
        serde_json::json!({"loss": s.loss, "grad_norm": s.grad_norm, "lr": s.lr, "output": a.output.display().to_string()})
    );
    Ok(())
}

pub fn train_vae(g: &Global, a: TrainVaeArgs) -> Result<()> {
    let mut b = open_backend(g)?;
    let cfg = roentgen::train::vae::TrainVaeConfig {
        model: a.model.clone(),
        config: a.config.clone(),
        data: a.data.clone(),
        output: a.output.clone(),
        resolution: a.resolution,
        batch_size: a.batch_size,
        steps: a.steps,
        seed: a.seed,
        optim: roentgen::train::OptimOptions {
            lr: a.lr,
            max_grad_norm: grad_clip(a.max_grad_norm)?,
            ..Default::default()
        },
        kl_weight: a.kl_weight,
        checkpoint_every: a.long_run.checkpoint_every,
        log_every: a.long_run.log_every,
        resume: a.long_run.resume,
        overwrite: a.long_run.overwrite,
        on_bad_image: a.long_run.on_bad_image,
        verify_images: a.long_run.verify_images,
        checkpoints_total_limit: a.long_run.checkpoints_total_limit,
        allow_changed_settings: a.long_run.allow_changed_settings,
    };
    let bar = indicatif::ProgressBar::new(a.steps as u64);
    let mut log = |s: &roentgen::train::vae::VaeStats| {
        bar.set_position(s.step as u64);
        bar.set_message(format!("loss {:.4} (rec {:.4}, kl {:.1})", s.loss, s.rec_loss, s.kl));
    };
    let last = roentgen::train::vae::train_vae(b.as_mut(), &cfg, &mut log)?;
    bar.finish_and_clear();
    println!("{}", serde_json::json!({"checkpoint": last.display().to_string()}));
    Ok(())
}

//! The `roentgen` command line: parses, calls the library, prints. Errors go to stderr as one line
//! and exit with status 1; nothing a user types makes it panic.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use roentgen::backend::{self, Backend, Device};
use roentgen::inspect::{inspect, render_text, InspectOptions};
use roentgen::models::text::{TextEncoder, TextTokenizer};
use roentgen::weights::{self, safetensors::OutTensor};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

mod cli;

#[derive(Parser)]
#[command(
    name = "roentgen",
    version,
    about = "Text-to-chest-X-ray latent diffusion (Stable Diffusion v1.x, RoentGen): sample, fine-tune, evaluate",
    long_about = "roentgen reads Stable Diffusion checkpoints in diffusers layout and runs them with its own \
                  CPU reference backend (and, with --features cuda, its own CUDA kernels).\n\n\
                  Sample (`sample`; with no --model, the bundled phantom demo model), fine-tune (`train`, \
                  `train-vae`, `train-step`), evaluate (`eval fid`, `eval ms-ssim`, `eval phantom`), build \
                  data (`prepare`, `phantom`), and the tools around them (`export`, `bench`, `inspect`, \
                  `tokenize`, `encode-text`). `--device cuda` needs a build with --features cuda and an \
                  NVIDIA GPU of compute capability 8.0 or newer."
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Global {
    /// Backend to compute on: cpu (the f32 reference) or cuda (needs a build with --features cuda).
    #[arg(long, global = true, default_value = "cpu")]
    device: Device,
    /// CUDA arithmetic: bf16 (tensor cores for convolutions, attention and linear layers, f32
    /// accumulation) or f32 (exact, for parity checks). The CPU backend is always f32.
    #[arg(long, global = true, default_value = "bf16")]
    precision: backend::Precision,
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Print pool sizes and load details to stderr.
    #[arg(long, short, global = true)]
    verbose: bool,
    /// CUDA: replay each U-Net evaluation of the denoising loop (and of `bench unet`) as a captured
    /// CUDA graph (on), or launch every kernel from the host each time (off; for comparison and
    /// profiling). No effect on the CPU.
    #[arg(long, global = true, default_value = "on", value_parser = ["on", "off"])]
    cuda_graphs: String,
}

/// The backend the global options ask for.
fn open_backend(g: &Global) -> Result<Box<dyn Backend>> {
    let b = backend::create(g.device, g.precision)?;
    b.set_graphs(g.cuda_graphs == "on");
    Ok(b)
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize prompts as the text encoder receives them: one JSON line per prompt,
    /// {"ids": [77 padded ids], "tokens": N (with BOS/EOS, before truncation), "truncated": bool};
    /// a BERT (WordPiece) tokenizer adds "attention_mask" (1 for [CLS], tokens, [SEP]), which its
    /// encoder takes.
    Tokenize {
        /// A pipeline folder (its tokenizer/ is used), a folder holding tokenizer/, or a tokenizer
        /// folder: CLIP (vocab.json + merges.txt, or tokenizer.json) or BERT (vocab.txt, or a
        /// WordPiece tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// Prompts, one per line (default: standard input, unless --prompt is given).
        #[arg(long)]
        input: Option<PathBuf>,
        /// A prompt (repeatable); used instead of --input/standard input.
        #[arg(long)]
        prompt: Vec<String>,
    },
    /// List what a safetensors file or model folder holds: tensors, parameter counts, parsed configs.
    Inspect {
        /// A .safetensors file, a pipeline folder (with model_index.json) or a component folder.
        path: PathBuf,
        /// Instantiate the architectures the configs describe with random weights (no weight files
        /// needed) and report their parameter counts.
        #[arg(long)]
        random_weights: bool,
        /// Weight file variant, e.g. fp16 (reads model.fp16.safetensors).
        #[arg(long)]
        variant: Option<String>,
        /// Omit the per-tensor listing (name, dtype, shape); print counts and configs only.
        #[arg(long)]
        summary: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the CLIP text encoder on prompts and write `last_hidden_state` (and the ids) to a
    /// safetensors file: the conditioning Stable Diffusion's U-Net receives.
    EncodeText {
        /// A pipeline folder (text_encoder/ and tokenizer/) or a text encoder folder (then --tokenizer).
        #[arg(long)]
        model: PathBuf,
        /// Tokenizer folder, when --model is a text encoder folder.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// A prompt (repeatable).
        #[arg(long, required = true)]
        prompt: Vec<String>,
        /// Output .safetensors file: last_hidden_state (prompts, 77, hidden) f32, input_ids i64.
        #[arg(long)]
        out: PathBuf,
        /// Weight file variant, e.g. fp16.
        #[arg(long)]
        variant: Option<String>,
        /// Use random weights (the config's architecture), e.g. to time it without a download.
        #[arg(long)]
        random_weights: bool,
    },
    /// Generate images from prompts with a Stable Diffusion v1.x pipeline folder (diffusers layout).
    /// Defaults are the RoentGen paper's: 75 steps, guidance 4, 512×512, and the pipeline's scheduler
    /// (PNDM for SD v1.4). The same --seed gives the same initial noise as diffusers with
    /// `generator=torch.Generator().manual_seed(seed)`.
    Sample(cli::sample::SampleArgs),
    /// Fine-tune a pipeline on image/report pairs as RoentGen: U-Net and CLIP text encoder jointly,
    /// VAE frozen, MSE on the noise, AdamW (lr 5e-5). Writes OUTPUT/checkpoint-N pipeline folders
    /// (loadable by `roentgen sample` and diffusers) and OUTPUT/train_log.jsonl.
    Train(TrainArgs),
    /// One optimizer step from a fresh optimizer state on a given batch (safetensors: `latents` or
    /// `pixel_values`, `input_ids`, `noise`, `timesteps`); writes the updated pipeline and prints the
    /// loss and gradient norm as JSON. The parity hook for checking a step against PyTorch.
    TrainStep(TrainStepArgs),
    /// Train the VAE (encoder and decoder): reconstruction MSE plus kl_weight × KL, AdamW. From a
    /// VAE or pipeline folder (--model), or from scratch (--config vae_config.json). Writes
    /// OUTPUT/checkpoint-N VAE folders (config.json + diffusion_pytorch_model.safetensors).
    TrainVae(TrainVaeArgs),
    /// Draw synthetic chest-radiograph phantoms with findings, report sentences and a training
    /// manifest (deterministic per seed).
    Phantom(roentgen::phantom::PhantomArgs),
    /// Build training/test manifests from MIMIC-CXR-JPG or the IU X-ray reports (the paper's filtering).
    #[command(subcommand)]
    Prepare(roentgen::prepare::PrepareCommand),
    /// Evaluate generated images: MS-SSIM diversity, FID with Inception, XRV DenseNet or CLIP features.
    #[command(subcommand)]
    Eval(roentgen::eval::EvalCommand),
    /// Copy a pipeline folder (e.g. a training checkpoint) into a clean one for sharing: configs,
    /// scheduler, tokenizer and weights (rewritten in f16 or f32), without the training state.
    Export {
        /// The pipeline folder to export (a `train` checkpoint works).
        #[arg(long)]
        model: PathBuf,
        /// The new pipeline folder (written to a temporary folder, then renamed into place).
        #[arg(long)]
        out: PathBuf,
        /// f16 (half the size; loads everywhere diffusers does) or f32.
        #[arg(long, default_value = "f16")]
        dtype: roentgen::export::ExportDtype,
        /// Ship the U-Net's EMA weights (unet_ema/) as the U-Net.
        #[arg(long)]
        ema: bool,
        /// Replace an existing --out folder.
        #[arg(long)]
        overwrite: bool,
    },
    /// What the CUDA kernels in this binary are (registers, shared memory, stack and spills of every
    /// kernel for sm_80 and sm_90a, from ptxas) and which GPU `--device cuda` would use. Exits 1 when
    /// the binary was built without CUDA.
    CudaInfo {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Time a model stage: one guided U-Net step (`unet`), the VAE decoder (`vae-decode`) or the
    /// text encoder (`text-encoder`), with the FLOP counted from the shapes and the rate achieved.
    /// With --random-weights no weight files are needed, e.g.
    /// `roentgen bench unet --model weights/sd-v1-4-config --random-weights --height 512 --width 512`.
    Bench {
        /// unet, vae-decode or text-encoder
        stage: roentgen::bench::Stage,
        /// A pipeline folder (or the stage's component folder).
        #[arg(long)]
        model: PathBuf,
        /// Use random weights with the config's architecture.
        #[arg(long)]
        random_weights: bool,
        /// Weight file variant, e.g. fp16.
        #[arg(long)]
        variant: Option<String>,
        /// Image height in pixels (the U-Net runs at height / 8).
        #[arg(long, default_value_t = 512)]
        height: usize,
        /// Image width in pixels.
        #[arg(long, default_value_t = 512)]
        width: usize,
        /// Prompts per call (classifier-free guidance doubles the U-Net and text-encoder batch).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Untimed calls first.
        #[arg(long, default_value_t = 1)]
        warmup: usize,
        /// Timed calls.
        #[arg(long, default_value_t = 3)]
        iters: usize,
        /// Then run once more timing every kernel (CUDA; events serialise the stream): one row per
        /// kernel and grid, and per GEMM shape.
        #[arg(long)]
        profile: bool,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct OptimArgs {
    /// Learning rate (the paper's 5e-5).
    #[arg(long, default_value_t = 5e-5)]
    lr: f32,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    adam_beta1: f32,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.999)]
    adam_beta2: f32,
    /// AdamW ε.
    #[arg(long, default_value_t = 1e-8)]
    adam_eps: f32,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 1e-2)]
    weight_decay: f32,
    /// Global gradient-norm clipping (0 turns it off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    /// Train the CLIP text encoder jointly (on by default, as RoentGen): true or false.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    train_text_encoder: bool,
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
        };
        o.validate()?;
        Ok(o)
    }
}

/// `--max-grad-norm`: 0 turns clipping off; a negative or NaN value is an error, not "off".
fn grad_clip(v: f32) -> Result<Option<f32>> {
    roentgen::train::check_non_negative("--max-grad-norm", v)?;
    Ok((v > 0.0).then_some(v))
}

/// What keeps a long training run's output folder safe; shared by `train` and `train-vae`.
#[derive(Args)]
struct LongRunArgs {
    /// Keep only the newest N checkpoints, removing older ones after each new one is written
    /// (diffusers' --checkpoints_total_limit; default: keep all).
    #[arg(long)]
    checkpoints_total_limit: Option<usize>,
    /// With --resume: continue even if the seed, learning rate, batch or other settings differ
    /// from those the checkpoint recorded (otherwise the run is refused with the differences).
    #[arg(long)]
    allow_changed_settings: bool,
    /// Decode every image of the manifest before training (not only its header), so a corrupt
    /// file is found at the start instead of when it is first drawn.
    #[arg(long)]
    verify_images: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// The pipeline folder to start from (diffusers layout).
    #[arg(long)]
    model: PathBuf,
    /// Manifest: JSONL ({"image": path, "text": prompt} per line) or CSV with image,text columns.
    #[arg(long)]
    data: PathBuf,
    /// Output folder for checkpoint-N/ and train_log.jsonl.
    #[arg(long)]
    output: PathBuf,
    /// Training resolution (shorter side resized, center crop); a multiple of 8.
    #[arg(long, default_value_t = 512)]
    resolution: usize,
    /// Images per micro-batch.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Seed of the data order, timesteps and noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// constant, constant_with_warmup or cosine.
    #[arg(long, default_value = "constant")]
    lr_schedule: String,
    /// Warmup steps of the learning-rate schedule.
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// pretrained, or random (the paper's "Rnd U-Net" rows).
    #[arg(long, default_value = "pretrained")]
    unet_init: String,
    /// pretrained, or random (train the text encoder from scratch; its config.json is enough).
    #[arg(long, default_value = "pretrained")]
    text_encoder_init: String,
    /// Probability of replacing an example's text with the empty prompt (caption dropout), so the
    /// model learns the unconditional prediction that classifier-free guidance subtracts. 0 (the
    /// paper's and diffusers' default) never drops.
    #[arg(long, default_value_t = 0.0)]
    uncond_prob: f64,
    /// Write a checkpoint every N steps (and always at the end).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: usize,
    /// Continue from the latest checkpoint in --output.
    #[arg(long)]
    resume: bool,
    /// Allow an existing, non-empty --output (checkpoints of the same step are replaced atomically).
    #[arg(long)]
    overwrite: bool,
    /// Encode every image once with the frozen VAE and reuse its latent distribution.
    #[arg(long)]
    cache_latents: bool,
    /// Keep an EMA of the U-Net weights (written as unet_ema/ in each checkpoint; sample it with
    /// `roentgen sample --ema`).
    #[arg(long)]
    ema: bool,
    /// The EMA's maximum decay.
    #[arg(long, default_value_t = 0.9999)]
    ema_decay: f32,
    /// Log every N steps to train_log.jsonl.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// skip or fail on missing/unreadable images.
    #[arg(long, default_value = "fail")]
    on_bad_image: roentgen::train::data::OnBadImage,
    /// Weight file variant of the source model, e.g. fp16.
    #[arg(long)]
    variant: Option<String>,
    /// Replace the pipeline's text encoder with a transformers folder (e.g. RadBERT: config.json,
    /// model.safetensors, vocab.txt); with --unet-init random the U-Net's cross-attention is sized for it.
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// Keep the text encoder frozen (the paper's domain-encoder setting); same as
    /// --train-text-encoder false.
    #[arg(long)]
    freeze_text_encoder: bool,
    #[command(flatten)]
    optim: OptimArgs,
    #[command(flatten)]
    long_run: LongRunArgs,
}

#[derive(Args)]
struct TrainVaeArgs {
    /// A VAE folder, or a pipeline folder (its vae/), to fine-tune.
    #[arg(long, conflicts_with = "config")]
    model: Option<PathBuf>,
    /// A VAE config.json to train from scratch (PyTorch's default initialisation).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Manifest (JSONL or CSV with image,text columns; the text is not used).
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f32,
    /// Weight of the KL term.
    #[arg(long, default_value_t = 1e-6)]
    kl_weight: f32,
    /// Global gradient-norm clipping (0 turns it off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f32,
    #[arg(long, default_value_t = 500)]
    checkpoint_every: usize,
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    overwrite: bool,
    #[arg(long, default_value = "fail")]
    on_bad_image: roentgen::train::data::OnBadImage,
    #[command(flatten)]
    long_run: LongRunArgs,
}

#[derive(Args)]
struct TrainStepArgs {
    /// The pipeline folder (diffusers layout).
    #[arg(long)]
    model: PathBuf,
    /// Safetensors batch: latents (or pixel_values), input_ids, noise, timesteps.
    #[arg(long)]
    batch: PathBuf,
    /// Where to write the updated pipeline.
    #[arg(long)]
    output: PathBuf,
    /// Replace an existing --output.
    #[arg(long)]
    overwrite: bool,
    /// Weight file variant, e.g. fp16.
    #[arg(long)]
    variant: Option<String>,
    #[command(flatten)]
    optim: OptimArgs,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        // The reader of our standard output went away (`roentgen tokenize … | head`): as other
        // command-line tools, stop quietly.
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .map(|io| io.kind())
                .or_else(|| c.downcast_ref::<serde_json::Error>().and_then(|j| j.io_error_kind()))
                == Some(std::io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.global.threads {
        // More threads than a few per core only costs: creating 100,000 took minutes.
        let most = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).max(1) * 8;
        if n == 0 || n > most {
            bail!("--threads {n}: must be between 1 and {most} (8 per core of this machine)");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("--threads")?;
    }
    match cli.command {
        Command::Tokenize { model, input, prompt } => tokenize(&model, input.as_deref(), &prompt),
        Command::CudaInfo { json } => {
            let info = backend::info::cuda_info();
            if json {
                cli::print_stdout(&serde_json::to_string_pretty(&info)?)?;
            } else {
                cli::print_stdout(&info.render())?;
            }
            if !info.cuda_build {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Inspect { path, random_weights, variant, summary, json } => {
            let mut b = open_backend(&cli.global)?;
            let opts = InspectOptions { variant: variant.as_deref(), random_weights, tensors: !summary };
            let v = inspect(b.as_mut(), &path, &opts)?;
            if json {
                cli::print_stdout(&serde_json::to_string_pretty(&v)?)?;
            } else {
                cli::print_stdout(render_text(&v).trim_end_matches('\n'))?;
            }
            report_pools(b.as_ref(), cli.global.verbose);
            Ok(())
        }
        Command::Export { model, out, dtype, ema, overwrite } => {
            let r = roentgen::export::export(&model, &out, dtype, ema, overwrite)?;
            for (c, n, bytes) in &r.components {
                println!("{c:<13} {n:>5} tensors {:>9.2} MiB", *bytes as f64 / 1048576.0);
            }
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Sample(args) => {
            let mut b = open_backend(&cli.global)?;
            cli::sample::sample(b.as_mut(), args)?;
            report_pools(b.as_ref(), cli.global.verbose);
            Ok(())
        }
        Command::Train(a) => {
            let mut b = open_backend(&cli.global)?;
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
                checkpoint_every: a.checkpoint_every,
                resume: a.resume,
                overwrite: a.overwrite,
                cache_latents: a.cache_latents,
                log_every: a.log_every,
                on_bad_image: a.on_bad_image,
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
            let bar = indicatif::ProgressBar::new(a.steps as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let mut log = |s: &roentgen::train::StepStats, ips: f64| {
                bar.set_position(s.step as u64);
                bar.set_message(format!("loss {:.4} lr {:.2e} {:.2} img/s", s.loss, s.lr, ips));
            };
            let last = roentgen::train::run::train(b.as_mut(), &cfg, &mut log)?;
            bar.finish_and_clear();
            eprintln!(
                "training done: {} (a pipeline folder: roentgen sample --model {} ...)",
                last.display(),
                last.display()
            );
            println!(
                "{}",
                serde_json::json!({"checkpoint": last.display().to_string(), "log": a.output.join("train_log.jsonl").display().to_string()})
            );
            report_pools(b.as_ref(), cli.global.verbose);
            Ok(())
        }
        Command::TrainStep(a) => {
            let mut b = open_backend(&cli.global)?;
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
        Command::TrainVae(a) => {
            let mut b = open_backend(&cli.global)?;
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
                checkpoint_every: a.checkpoint_every,
                log_every: a.log_every,
                resume: a.resume,
                overwrite: a.overwrite,
                on_bad_image: a.on_bad_image,
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
        Command::Phantom(a) => roentgen::phantom::run_phantom(a),
        Command::Prepare(cmd) => roentgen::prepare::run(cmd),
        Command::Eval(cmd) => roentgen::eval::run(cmd),
        Command::Bench {
            stage,
            model,
            random_weights,
            variant,
            height,
            width,
            batch,
            warmup,
            iters,
            profile,
            json,
        } => {
            let mut b = open_backend(&cli.global)?;
            let opts = roentgen::bench::BenchOptions {
                model: &model,
                variant: variant.as_deref(),
                random_weights,
                height,
                width,
                batch,
                warmup,
                iters,
                profile,
            };
            bench(b.as_mut(), stage, opts, json)?;
            report_pools(b.as_ref(), cli.global.verbose);
            Ok(())
        }
        Command::EncodeText { model, tokenizer, prompt, out, variant, random_weights } => {
            let mut b = open_backend(&cli.global)?;
            encode_text(b.as_mut(), &model, tokenizer.as_deref(), &prompt, &out, variant.as_deref(), random_weights)?;
            report_pools(b.as_ref(), cli.global.verbose);
            Ok(())
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn bench(
    b: &mut dyn Backend,
    stage: roentgen::bench::Stage,
    opts: roentgen::bench::BenchOptions,
    json: bool,
) -> Result<()> {
    let r = roentgen::bench::run(b, stage, &opts)?;
    if json {
        cli::print_stdout(&serde_json::to_string_pretty(&r)?)?;
    } else {
        cli::print_stdout(&r.render())?;
    }
    Ok(())
}

fn report_pools(b: &dyn Backend, verbose: bool) {
    if verbose {
        for (label, bytes) in b.pool_sizes() {
            eprintln!("pool {label}: {:.1} MiB", bytes as f64 / (1 << 20) as f64);
        }
    }
}

fn warn_truncated(max_length: usize, line: usize, tokens: usize, truncated: bool) {
    if truncated {
        eprintln!(
            "warning: prompt {line} has {tokens} tokens; truncated to {max_length} as the reference tokenizer does"
        );
    }
}

fn tokenize(model: &Path, input: Option<&Path>, prompts: &[String]) -> Result<()> {
    // CLIP BPE or WordPiece, decided by the tokenizer's files: BERT pipelines tokenize too.
    let tok = TextTokenizer::from_dir(model)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut emit = |n: usize, text: &str| -> Result<()> {
        let enc = tok.encode(text);
        warn_truncated(tok.max_length(), n, enc.tokens, enc.truncated);
        // CLIP as Stable Diffusion runs it takes no mask, so its lines keep the three fields.
        let line = match &tok {
            TextTokenizer::Clip(_) => {
                serde_json::json!({"ids": enc.ids, "tokens": enc.tokens, "truncated": enc.truncated})
            }
            TextTokenizer::WordPiece(_) => serde_json::json!({
                "ids": enc.ids, "attention_mask": enc.mask, "tokens": enc.tokens, "truncated": enc.truncated,
            }),
        };
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
        Ok(())
    };
    if !prompts.is_empty() {
        for (i, p) in prompts.iter().enumerate() {
            emit(i + 1, p)?;
        }
    } else {
        let reader: Box<dyn BufRead> = match input {
            Some(p) => {
                // A folder opens on Linux and fails only at the first read ("line 1 is not valid UTF-8").
                if p.is_dir() {
                    bail!("--input {}: is a folder, not a file of prompts (one per line)", p.display());
                }
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(p).with_context(|| format!("--input {}: cannot open", p.display()))?,
                ))
            }
            None => Box::new(std::io::stdin().lock()),
        };
        for (i, line) in reader.lines().enumerate() {
            let line = line.with_context(|| {
                format!(
                    "{}: line {} is not valid UTF-8 text",
                    input.map_or("stdin".into(), |p| p.display().to_string()),
                    i + 1
                )
            })?;
            // A line is one prompt; only its line terminator is removed (a trailing '\r' of CRLF files too).
            emit(i + 1, line.strip_suffix('\r').unwrap_or(&line))?;
        }
    }
    out.flush()?;
    Ok(())
}

fn encode_text(
    b: &mut dyn Backend,
    model: &Path,
    tokenizer: Option<&Path>,
    prompts: &[String],
    out: &Path,
    variant: Option<&str>,
    random_weights: bool,
) -> Result<()> {
    // The output path before the work (the write would otherwise fail after encoding, naming a temporary).
    roentgen::files::check_output_file(out, roentgen::files::Existing::Replace, "--out")?;
    let te_dir = weights::component_dir(model, "text_encoder")?;
    let tok_dir = match tokenizer {
        Some(t) => t.to_path_buf(),
        None => weights::component_dir(model, "tokenizer")?,
    };
    let tok = TextTokenizer::from_dir(&tok_dir).with_context(|| match tokenizer {
        Some(t) => format!("--tokenizer {}", t.display()),
        None if !weights::is_pipeline_folder(model) => format!(
            "--model {} is not a pipeline folder, so its tokenizer must be given with --tokenizer",
            model.display()
        ),
        None => format!("--model {}: its tokenizer", model.display()),
    })?;
    let clip =
        if random_weights { TextEncoder::random(b, &te_dir, 0)? } else { TextEncoder::load(b, &te_dir, variant)?.0 };
    let seq = tok.max_length();
    let mut ids = Vec::with_capacity(prompts.len() * seq);
    let mut mask = Vec::with_capacity(prompts.len() * seq);
    for (i, p) in prompts.iter().enumerate() {
        let enc = tok.encode(p);
        if enc.truncated {
            eprintln!(
                "warning: prompt {} has {} tokens; truncated to {seq} as the reference tokenizer does",
                i + 1,
                enc.tokens
            );
        }
        ids.extend(enc.ids);
        mask.extend(enc.mask);
    }
    let acts = clip.allocate_acts(b, prompts.len(), seq)?;
    let t0 = std::time::Instant::now();
    let hidden = clip.forward(b, &acts, &ids, &mask)?;
    let hidden = hidden.reshape([prompts.len(), seq, clip.hidden_size()]);
    let secs = t0.elapsed().as_secs_f64();
    let values = b.download(&hidden)?;
    let ids64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    weights::safetensors::write_atomic(
        out,
        &[
            ("last_hidden_state", hidden.shape.dims().to_vec(), OutTensor::F32(&values)),
            ("input_ids", vec![prompts.len(), seq], OutTensor::I64(&ids64)),
        ],
    )?;
    eprintln!(
        "encoded {} prompt(s) on {} in {:.3} s → {} {:?}",
        prompts.len(),
        b.name(),
        secs,
        out.display(),
        hidden.shape.dims()
    );
    Ok(())
}

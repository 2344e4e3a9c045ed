//! The command line (the binary's part, not the library's): clap's argument structs, dispatch,
//! progress bars and printing, one file per group of commands. src/main.rs only calls [`main`].
//! Errors go to stderr as one line and exit with status 1; nothing a user types makes it panic.

pub mod classifier;
pub mod eval;
pub mod phantom;
pub mod prepare;
pub mod sample;
pub mod tools;
pub mod train;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use roentgen::backend::{self, Backend, Device};
use roentgen::tensor::DType;

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
pub struct Global {
    /// Backend to compute on: cpu (the f32 reference) or cuda (needs a build with --features cuda).
    #[arg(long, global = true, default_value = "cpu")]
    pub device: Device,
    /// CUDA arithmetic: bf16 (tensor cores for convolutions, attention and linear layers, f32
    /// accumulation) or f32 (exact, for parity checks). The CPU backend is always f32.
    #[arg(long, global = true, default_value = "bf16")]
    pub precision: backend::Precision,
    /// CUDA with --precision bf16: how the U-Net and the VAE decoder store their activations
    /// while sampling: f32, or bf16 (half the activation memory; f32 arithmetic, each result
    /// rounded once). Issue 18's work in progress: convolutions and attention still read bf16
    /// activations through f32 scratch, so bf16 is not yet faster; training refuses it, and the
    /// text encoder and the VAE encoder keep f32.
    #[arg(long, global = true, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub activations: String,
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Print pool sizes and load details to stderr.
    #[arg(long, short, global = true)]
    pub verbose: bool,
    /// CUDA: replay each U-Net evaluation of the denoising loop (and of `bench unet`) as a captured
    /// CUDA graph (on), or launch every kernel from the host each time (off; for comparison and
    /// profiling). No effect on the CPU.
    #[arg(long, global = true, default_value = "on", value_parser = ["on", "off"])]
    pub cuda_graphs: String,
}

/// The backend the global options ask for.
pub fn open_backend(g: &Global) -> Result<Box<dyn Backend>> {
    let mut b = backend::create(g.device, g.precision)?;
    b.set_graphs(g.cuda_graphs == "on");
    b.set_activations(if g.activations == "bf16" { DType::BF16 } else { DType::F32 })?;
    Ok(b)
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize prompts as the text encoder receives them: one JSON line per prompt,
    /// {"ids": [77 padded ids], "tokens": N (with BOS/EOS, before truncation), "truncated": bool};
    /// a BERT (WordPiece) tokenizer adds "attention_mask" (1 for [CLS], tokens, [SEP]), which its
    /// encoder takes.
    Tokenize(tools::TokenizeArgs),
    /// List what a safetensors file or model folder holds: tensors, parameter counts, parsed configs.
    Inspect(tools::InspectArgs),
    /// Run the CLIP text encoder on prompts and write `last_hidden_state` (and the ids) to a
    /// safetensors file: the conditioning Stable Diffusion's U-Net receives.
    EncodeText(tools::EncodeTextArgs),
    /// Generate images from prompts with a Stable Diffusion v1.x pipeline folder (diffusers layout).
    /// Defaults are the RoentGen paper's: 75 steps, guidance 4, 512×512, and the pipeline's scheduler
    /// (PNDM for SD v1.4). The same --seed gives the same initial noise as diffusers with
    /// `generator=torch.Generator().manual_seed(seed)`.
    Sample(sample::SampleArgs),
    /// Serve a loaded pipeline over HTTP: AUTOMATIC1111's POST /sdapi/v1/txt2img and
    /// /sdapi/v1/img2img (JSON with base64 PNGs), GET /health and /v1/models; one request on the
    /// device at a time, a bounded queue (429 when full), loopback by default.
    Serve(tools::ServeArgs),
    /// Fine-tune a pipeline on image/report pairs as RoentGen: U-Net and CLIP text encoder jointly,
    /// VAE frozen, MSE on the noise, AdamW (lr 5e-5). Writes OUTPUT/checkpoint-N pipeline folders
    /// (loadable by `roentgen sample` and diffusers) and OUTPUT/train_log.jsonl.
    Train(train::TrainArgs),
    /// One optimizer step from a fresh optimizer state on a given batch (safetensors: `latents` or
    /// `pixel_values`, `input_ids`, `noise`, `timesteps`); writes the updated pipeline and prints the
    /// loss and gradient norm as JSON. The parity hook for checking a step against PyTorch.
    TrainStep(train::TrainStepArgs),
    /// Train the VAE (encoder and decoder): reconstruction MSE plus kl_weight × KL, AdamW. From a
    /// VAE or pipeline folder (--model), or from scratch (--config vae_config.json). Writes
    /// OUTPUT/checkpoint-N VAE folders (config.json + diffusion_pytorch_model.safetensors).
    TrainVae(train::TrainVaeArgs),
    /// Train a DenseNet classifier from scratch on labelled images (the paper's Table 5): AdamW,
    /// cyclic learning rate, masked BCE, early stopping on the validation AUROC.
    #[command(after_long_help = classifier::TRAIN_CLASSIFIER_HELP)]
    TrainClassifier(classifier::TrainClassifierArgs),
    /// Draw synthetic chest-radiograph phantoms with findings, report sentences and a training
    /// manifest (deterministic per seed).
    Phantom(phantom::PhantomArgs),
    /// Build training/test manifests from MIMIC-CXR-JPG or the IU X-ray reports (the paper's filtering).
    #[command(subcommand)]
    Prepare(prepare::PrepareCommand),
    /// Evaluate generated images: MS-SSIM diversity, FID with Inception, XRV DenseNet or CLIP features.
    #[command(subcommand)]
    Eval(eval::EvalCommand),
    /// Copy a pipeline folder (e.g. a training checkpoint) into a clean one for sharing: configs,
    /// scheduler, tokenizer and weights (rewritten in f16 or f32), without the training state.
    Export(tools::ExportArgs),
    /// Copy a PyTorch checkpoint (.pt/.pth/.bin/.ckpt, read without Python and without running
    /// anything in it) to safetensors: names as state_dict() gives them, dtypes kept.
    Convert(tools::ConvertArgs),
    /// Compare roentgen with your own diffusers/transformers on your model, stage by stage: token
    /// ids, text embeddings, single U-Net calls, VAE decode, every scheduler's trajectory, the
    /// whole image from a seed. Prints max/relative errors against ARCHITECTURE.md's tolerances;
    /// exits 1 when a stage fails. `--device cuda --precision bf16` checks the GPU path.
    Parity(tools::ParityArgs),
    /// What the CUDA kernels in this binary are (registers, shared memory, stack and spills of every
    /// kernel for sm_80 and sm_90a, from ptxas) and which GPU `--device cuda` would use. Exits 1 when
    /// the binary was built without CUDA.
    CudaInfo(tools::CudaInfoArgs),
    /// Time a model stage: one guided U-Net step (`unet`), the VAE decoder (`vae-decode`), the
    /// text encoder (`text-encoder`) or one joint training step (`train-step`), with the FLOP
    /// counted from the shapes and the rate achieved.
    /// With --random-weights no weight files are needed, e.g.
    /// `roentgen bench unet --model weights/sd-v1-4-config --random-weights --height 512 --width 512`.
    Bench(tools::BenchArgs),
}

pub fn main() {
    // The library's warnings and notes, on stderr as the rest of the command line's messages.
    roentgen::diag::set_handler(|level, message| {
        let message = roentgen::diag::render_references(message, flag_for);
        match level {
            roentgen::diag::Level::Warning => eprintln!("warning: {message}"),
            roentgen::diag::Level::Note => eprintln!("note: {message}"),
            roentgen::diag::Level::Progress => eprintln!("{message}"),
        }
    });
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
        eprintln!("error: {}", render_error(&e));
        std::process::exit(1);
    }
}

/// Runs `body` as this process's rank of the job (MPI when a launcher started several ranks, or
/// `force`; else the one and only rank). With several ranks, a rank that fails or panics ends
/// the whole job after printing its own message: the others must not wait for it forever in a
/// collective.
pub(crate) fn as_rank<T>(force: bool, body: impl FnOnce(&roentgen::dist::Dist) -> Result<T>) -> Result<T> {
    let dist = roentgen::dist::Dist::from_env(force)?;
    if dist.size() == 1 {
        return body(&dist);
    }
    dist.install_abort_hook();
    // Fault injection for the test of the abort path (tests/mpi.rs): the named rank panics as a
    // bug would, while the others go on into their first collective.
    if std::env::var("ROENTGEN_FAULT_PANIC_RANK").ok().and_then(|r| r.parse().ok()) == Some(dist.rank()) {
        panic!("ROENTGEN_FAULT_PANIC_RANK={}: a planted panic", dist.rank());
    }
    match body(&dist) {
        Ok(v) => Ok(v),
        Err(e) => {
            // One write of the whole line: the launcher forwards output in pieces, and its own
            // abort report must not land inside our message.
            let line = format!("error (rank {} of {}): {}\n", dist.rank(), dist.size(), render_error(&e));
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            dist.abort(1)
        }
    }
}

/// `{e:#}` (the context chain joined by ": "), with the library's settings (refused ones, and
/// `$field` references) named by their flags.
fn render_error(e: &anyhow::Error) -> String {
    let parts: Vec<String> = e
        .chain()
        .map(|c| match c.downcast_ref::<roentgen::diag::SettingError>() {
            Some(s) => s.render(|f| flag_for(f).unwrap_or_else(|| format!("`{f}`"))),
            None => roentgen::diag::render_references(&c.to_string(), flag_for),
        })
        .collect();
    parts.join(": ")
}

/// The library fields (of its request, config and option structs) whose flag is `--` and the
/// field with dashes.
#[rustfmt::skip]
const PLAIN_FLAGS: &[&str] = &[
    // sample
    "height", "width", "steps", "guidance", "latents_in", "batch_size", "seed", "scheduler", "dump", "out",
    "model", "variant", "device", "precision", "init_image", "strength", "mask",
    // train, train-vae, train-step
    "lr", "weight_decay", "max_grad_norm", "grad_accum", "lr_schedule", "resolution", "uncond_prob", "ema",
    "ema_decay", "checkpoints_total_limit", "kl_weight", "output", "resume", "overwrite", "on_bad_image",
    "allow_changed_settings", "text_encoder", "unet_init", "unet_init_random", "text_encoder_init_random", "data", "config",
    "log_every", "checkpoint_every", "train_text_encoder", "cache_latents", "elements",
    // eval, phantom, bench
    "manifest", "features", "clip_config", "bin_width", "reference_size", "size", "count", "iters", "warmup",
    "batch",
    // prepare mimic / iu-xray
    "root", "reports", "metadata", "tokenizer", "image_ext", "images", "views", "section", "min_chars",
    "max_tokens", "groups", "sample", "split", "cap_no_finding", "summary",
];

/// The flag that sets a library field, by the field's name (None: not a setting we know).
fn flag_for(field: &str) -> Option<String> {
    let special = match field {
        "num_images_per_prompt" => "--num-images",
        "prompts" => "--prompt/--prompts",
        // OptimOptions: Adam's hyperparameters carry the optimizer's name on the command line.
        "beta1" | "adam_beta1" => "--adam-beta1",
        "beta2" | "adam_beta2" => "--adam-beta2",
        "eps" | "adam_eps" => "--adam-eps",
        _ => return PLAIN_FLAGS.contains(&field).then(|| format!("--{}", field.replace('_', "-"))),
    };
    Some(special.to_string())
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
    let g = &cli.global;
    match cli.command {
        Command::Tokenize(a) => tools::tokenize_command(a),
        Command::CudaInfo(a) => tools::cuda_info(a),
        Command::Inspect(a) => tools::inspect_command(g, a),
        Command::Export(a) => tools::export(a),
        Command::Convert(a) => tools::convert(a),
        Command::Parity(a) => tools::parity(g, a),
        Command::Sample(args) => {
            let mut b = open_backend(g)?;
            sample::sample(b.as_mut(), args)?;
            report_pools(b.as_ref(), g.verbose);
            Ok(())
        }
        Command::Serve(a) => tools::serve(g, a),
        Command::Train(a) => train::train(g, a),
        Command::TrainStep(a) => train::train_step(g, a),
        Command::TrainVae(a) => train::train_vae(g, a),
        Command::TrainClassifier(a) => classifier::run(g, a),
        Command::Phantom(a) => phantom::run(a),
        Command::Prepare(cmd) => prepare::run(cmd),
        Command::Eval(cmd) => eval::run(g, cmd),
        Command::Bench(a) => tools::bench(g, a),
        Command::EncodeText(a) => tools::encode_text_command(g, a),
    }
}

/// `--verbose`: every pool of the backend and its size, on stderr.
pub fn report_pools(b: &dyn Backend, verbose: bool) {
    if verbose {
        for (label, bytes) in b.pool_sizes() {
            eprintln!("pool {label}: {:.1} MiB", bytes as f64 / (1 << 20) as f64);
        }
    }
}

/// Prints `text` and a newline on standard output. A closed pipe (`roentgen inspect … | head`)
/// ends the program quietly with status 0, as other command-line tools do, instead of panicking.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.write_all(b"\n")).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        r => Ok(r?),
    }
}

//! The `roentgen` command line: parses, calls the library, prints. Errors go to stderr as one line
//! and exit with status 1; nothing a user types makes it panic.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use roentgen::backend::{self, Backend, Device};
use roentgen::inspect::{inspect, render_text, InspectOptions};
use roentgen::models::clip::{ClipTextConfig, ClipTextModel};
use roentgen::tokenizer::ClipTokenizer;
use roentgen::weights::{self, safetensors::OutTensor};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "roentgen",
    version,
    about = "Text-to-chest-X-ray latent diffusion (Stable Diffusion v1.x, RoentGen): sample, fine-tune, evaluate",
    long_about = "roentgen reads Stable Diffusion checkpoints in diffusers layout and runs them with its own \
                  CPU reference backend (and, with --features cuda, its own CUDA kernels).\n\n\
                  Built so far: the CLIP tokenizer (`tokenize`), the CLIP text encoder (`encode-text`), \
                  checkpoint inspection (`inspect`). Sampling, training and evaluation come with later issues; \
                  the binary does not offer them until they exist."
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
    /// CPU threads (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Print pool sizes and load details to stderr.
    #[arg(long, short, global = true)]
    verbose: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenize prompts as the text encoder receives them: one JSON line per prompt,
    /// {"ids": [77 padded ids], "tokens": N (with BOS/EOS, before truncation), "truncated": bool}.
    Tokenize {
        /// A pipeline folder (its tokenizer/ is used) or a tokenizer folder
        /// (vocab.json + merges.txt, or tokenizer.json).
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
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.global.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("--threads")?;
    }
    match cli.command {
        Command::Tokenize { model, input, prompt } => tokenize(&model, input.as_deref(), &prompt),
        Command::Inspect { path, random_weights, variant, summary, json } => {
            let mut b = backend::create(cli.global.device)?;
            let opts = InspectOptions { variant: variant.as_deref(), random_weights, tensors: !summary };
            let v = inspect(b.as_mut(), &path, &opts)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", render_text(&v));
            }
            report_pools(b.as_ref(), cli.global.verbose);
            Ok(())
        }
        Command::Bench { stage, model, random_weights, variant, height, width, batch, warmup, iters, json } => {
            let mut b = backend::create(cli.global.device)?;
            let opts = roentgen::bench::BenchOptions {
                model: &model,
                variant: variant.as_deref(),
                random_weights,
                height,
                width,
                batch,
                warmup,
                iters,
            };
            bench(b.as_mut(), stage, opts, json)?;
            report_pools(b.as_ref(), cli.global.verbose);
            Ok(())
        }
        Command::EncodeText { model, tokenizer, prompt, out, variant, random_weights } => {
            let mut b = backend::create(cli.global.device)?;
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
    if opts.batch == 0 || opts.height == 0 || opts.width == 0 {
        bail!("--batch, --height and --width must be positive");
    }
    let r = roentgen::bench::run(b, stage, &opts)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("{}", r.render());
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

fn warn_truncated(tok: &ClipTokenizer, line: usize, enc: &roentgen::tokenizer::Encoding) {
    if enc.truncated {
        eprintln!(
            "warning: prompt {line} has {} tokens; truncated to {} as the reference tokenizer does",
            enc.tokens, tok.max_length
        );
    }
}

fn tokenize(model: &Path, input: Option<&Path>, prompts: &[String]) -> Result<()> {
    let tok = ClipTokenizer::from_dir(model)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut emit = |n: usize, text: &str| -> Result<()> {
        let enc = tok.encode(text);
        warn_truncated(&tok, n, &enc);
        serde_json::to_writer(&mut out, &enc)?;
        out.write_all(b"\n")?;
        Ok(())
    };
    if !prompts.is_empty() {
        for (i, p) in prompts.iter().enumerate() {
            emit(i + 1, p)?;
        }
    } else {
        let reader: Box<dyn BufRead> = match input {
            Some(p) => Box::new(std::io::BufReader::new(
                std::fs::File::open(p).with_context(|| format!("{}: cannot open", p.display()))?,
            )),
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
    let te_dir = weights::component_dir(model, "text_encoder")?;
    let tok = ClipTokenizer::from_dir(tokenizer.unwrap_or(model))?;
    let clip = if random_weights {
        ClipTextModel::random(b, ClipTextConfig::from_file(&te_dir.join("config.json"))?, 0)?
    } else {
        ClipTextModel::load(b, &te_dir, variant)?.0
    };
    let seq = tok.max_length;
    let mut ids = Vec::with_capacity(prompts.len() * seq);
    for (i, p) in prompts.iter().enumerate() {
        let enc = tok.encode(p);
        warn_truncated(&tok, i + 1, &enc);
        ids.extend(enc.ids);
    }
    let acts = clip.allocate_acts(b, prompts.len(), seq)?;
    let t0 = std::time::Instant::now();
    let hidden = clip.forward(b, &acts, &ids)?;
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

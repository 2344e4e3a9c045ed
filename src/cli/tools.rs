//! The tools around the models: `tokenize`, `inspect`, `encode-text`, `export`, `cuda-info`, `bench`.

use super::{open_backend, print_stdout, report_pools, Global};
use anyhow::{bail, Context, Result};
use clap::Args;
use roentgen::backend::{self, Backend};
use roentgen::models::text::{TextEncoder, TextTokenizer};
use roentgen::nn::Cx;
use roentgen::tools::inspect::{inspect, render_text, InspectOptions};
use roentgen::{io::safetensors::OutTensor, io::weights};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct TokenizeArgs {
    /// A pipeline folder (its tokenizer/ is used), a folder holding tokenizer/, or a tokenizer
    /// folder: CLIP (vocab.json + merges.txt, or tokenizer.json) or BERT (vocab.txt, or a
    /// WordPiece tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Prompts, one per line (default: standard input, unless --prompt is given).
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// A prompt (repeatable); used instead of --input/standard input.
    #[arg(long)]
    pub prompt: Vec<String>,
}

#[derive(Args)]
pub struct InspectArgs {
    /// A .safetensors file, a pipeline folder (with model_index.json) or a component folder.
    pub path: PathBuf,
    /// Instantiate the architectures the configs describe with random weights (no weight files
    /// needed) and report their parameter counts.
    #[arg(long)]
    pub random_weights: bool,
    /// Weight file variant, e.g. fp16 (reads model.fp16.safetensors).
    #[arg(long)]
    pub variant: Option<String>,
    /// Omit the per-tensor listing (name, dtype, shape); print counts and configs only.
    #[arg(long)]
    pub summary: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct EncodeTextArgs {
    /// A pipeline folder (text_encoder/ and tokenizer/) or a text encoder folder (then --tokenizer).
    #[arg(long)]
    pub model: PathBuf,
    /// Tokenizer folder, when --model is a text encoder folder.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// A prompt (repeatable).
    #[arg(long, required = true)]
    pub prompt: Vec<String>,
    /// Output .safetensors file: last_hidden_state (prompts, 77, hidden) f32, input_ids i64.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight file variant, e.g. fp16.
    #[arg(long)]
    pub variant: Option<String>,
    /// Use random weights (the config's architecture), e.g. to time it without a download.
    #[arg(long)]
    pub random_weights: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The pipeline folder to export (a `train` checkpoint works), or a single-file checkpoint
    /// (.ckpt, .safetensors in the CompVis layout) to unpack into a pipeline folder.
    #[arg(long)]
    pub model: PathBuf,
    /// The new pipeline folder (written to a temporary folder, then renamed into place), or with
    /// --single-file the new single file.
    #[arg(long)]
    pub out: PathBuf,
    /// f16 (half the size; loads everywhere diffusers does) or f32.
    #[arg(long, default_value = "f16")]
    pub dtype: roentgen::io::export::ExportDtype,
    /// Ship the U-Net's EMA weights (unet_ema/, or a single file's model_ema.*) as the U-Net.
    #[arg(long)]
    pub ema: bool,
    /// Write one single-file checkpoint (the original CompVis layout, .safetensors) that A1111,
    /// ComfyUI, stable-diffusion.cpp and diffusers' from_single_file load.
    #[arg(long)]
    pub single_file: bool,
    /// For a single-file --model: the pipeline folder with its configs, tokenizer and scheduler
    /// (default: the bundled Stable Diffusion v1.4 configs).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Replace an existing --out.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args)]
pub struct ConvertArgs {
    /// A PyTorch checkpoint (.pt, .pth, .bin, .ckpt; torch.save's zip or legacy format): a state
    /// dict, a Lightning checkpoint's state_dict, or a whole pickled module. Nothing in it is run.
    pub input: PathBuf,
    /// The safetensors file to write.
    pub output: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    pub overwrite: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn convert(a: ConvertArgs) -> Result<()> {
    let r = roentgen::tools::convert::convert(&a.input, &a.output, a.overwrite)?;
    if a.json {
        let v = serde_json::json!({"output": a.output, "tensors": r.tensors, "bytes": r.bytes, "dtypes": r.dtypes,
            "read_from": r.root, "source_sha256": r.source_sha256});
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let dtypes: Vec<String> = r.dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect();
        println!(
            "wrote {}: {} tensors ({}), {:.2} MiB, from {} of {} (SHA-256 {})",
            a.output.display(),
            r.tensors,
            dtypes.join(", "),
            r.bytes as f64 / 1048576.0,
            r.root,
            a.input.display(),
            r.source_sha256
        );
    }
    Ok(())
}

#[derive(Args)]
pub struct ParityArgs {
    /// The model: a pipeline folder, or a single-file checkpoint (with --config).
    #[arg(long)]
    pub model: PathBuf,
    /// For a single-file --model: the pipeline folder with its configs (default: the bundled SD
    /// v1.4 configs).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The Python to run the reference with (torch, diffusers, transformers, safetensors);
    /// default: python3.
    #[arg(long, default_value = "python3")]
    pub python: PathBuf,
    /// Prompts (repeatable; default: two radiology impressions).
    #[arg(long)]
    pub prompt: Vec<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Denoising steps of the scheduler trajectories and the whole image.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Image height (default: the model's, 512 for SD v1).
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long, default_value_t = 4.0)]
    pub guidance: f32,
    /// Timesteps of the single U-Net calls, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "999,500,1")]
    pub timesteps: Vec<usize>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn parity(g: &Global, a: ParityArgs) -> Result<()> {
    use roentgen::tools::parity;
    let versions = parity::check_python(&a.python)?;
    roentgen::diag::progress(format!("reference: {versions} ({})", a.python.display()));
    let mut b = open_backend(g)?;
    let single = a.model.is_file();
    let config = match (&a.config, single) {
        (Some(c), true) => Some(c.clone()),
        (None, true) => Some(super::sample::bundled("weights/sd-v1-4-config", "--config DIR")?),
        (Some(_), false) => bail!("--config applies to a single-file --model"),
        (None, false) => None,
    };
    let pipe = match &config {
        Some(c) => roentgen::sample::pipeline::Pipeline::load_single_file(b.as_mut(), &a.model, c, false)?,
        None => roentgen::sample::pipeline::Pipeline::load(b.as_mut(), &a.model, None)?,
    };
    let (device, precision) = match g.device {
        roentgen::backend::Device::Cpu => ("cpu", "f32"),
        _ => ("cuda", if g.precision == roentgen::backend::Precision::Bf16 { "bf16" } else { "f32" }),
    };
    let prompts = if a.prompt.is_empty() {
        vec!["Large left pleural effusion.".to_string(), "No acute cardiopulmonary process.".to_string()]
    } else {
        a.prompt.clone()
    };
    let o = parity::ParityOptions {
        model: a.model.clone(),
        config,
        python: a.python.clone(),
        prompts,
        seed: a.seed,
        steps: a.steps,
        height: a.height,
        width: a.width,
        guidance: a.guidance,
        timesteps: a.timesteps.clone(),
        device: device.into(),
        precision: precision.into(),
    };
    let (results, versions) = parity::run(b.as_mut(), &pipe, &o)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&parity::to_json(&results, &versions))?);
    } else {
        println!("roentgen ({device}, {precision}) against {versions}");
        print!("{}", parity::render_table(&results));
    }
    let failed = results.iter().filter(|r| !r.pass).count();
    if failed > 0 {
        bail!("{failed} of {} stages outside their tolerance", results.len());
    }
    Ok(())
}

#[derive(Args)]
pub struct CudaInfoArgs {
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    /// unet, vae-decode, text-encoder, train-step or allreduce (not with --autotune)
    #[arg(required_unless_present = "autotune")]
    pub stage: Option<roentgen::tools::bench::Stage>,
    /// CUDA: run the model's U-Net, VAE decoder and a training step once to find the shapes of
    /// every kernel family with several versions (ROENTGEN_KERNELS), time each version at each
    /// shape after checking it against version 1 there, and write the fastest correct one per
    /// shape to the kernel cache ($ROENTGEN_KERNEL_CACHE, else ~/.cache/roentgen/
    /// kernel-versions.json), which `sample` and `train` read.
    #[arg(long, conflicts_with = "stage")]
    pub autotune: bool,
    /// --autotune: timed calls per version and shape.
    #[arg(long, default_value_t = 50)]
    pub autotune_iters: usize,
    /// A pipeline folder (or the stage's component folder); every stage but allreduce needs one.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// allreduce: f32 elements summed per step (default: SD v1.4's U-Net and CLIP text encoder,
    /// 859,520,964 + 123,060,480 parameters, what joint fine-tuning reduces).
    #[arg(long, default_value_t = 982_581_444)]
    pub elements: usize,
    /// allreduce: join MPI even when no launcher says so.
    #[arg(long)]
    pub distributed: bool,
    /// Use random weights with the config's architecture.
    #[arg(long)]
    pub random_weights: bool,
    /// Weight file variant, e.g. fp16.
    #[arg(long)]
    pub variant: Option<String>,
    /// Image height in pixels (the U-Net runs at height / 8).
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// Image width in pixels.
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    /// Prompts per call (classifier-free guidance doubles the U-Net and text-encoder batch).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Untimed calls first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed calls.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Then run once more timing every kernel (CUDA; events serialise the stream): one row per
    /// kernel and grid, and per GEMM shape.
    #[arg(long)]
    pub profile: bool,
    /// train-step: recompute each U-Net block's internals in the backward (as `train
    /// --gradient-checkpointing`).
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// train-step: print the memory a step at --batch, --height and --width takes (weights,
    /// gradients, AdamW moments, activation arenas), keeping every activation and recomputing, from
    /// a planning pass over the configs: nothing is loaded, allocated or run.
    #[arg(long)]
    pub plan_only: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn tokenize_command(a: TokenizeArgs) -> Result<()> {
    tokenize(&a.model, a.input.as_deref(), &a.prompt)
}

pub fn cuda_info(a: CudaInfoArgs) -> Result<()> {
    let info = backend::info::cuda_info();
    if a.json {
        print_stdout(&serde_json::to_string_pretty(&info)?)?;
    } else {
        print_stdout(&info.render())?;
    }
    if !info.cuda_build {
        std::process::exit(1);
    }
    Ok(())
}

pub fn inspect_command(g: &Global, a: InspectArgs) -> Result<()> {
    let mut b = open_backend(g)?;
    let opts = InspectOptions { variant: a.variant.as_deref(), random_weights: a.random_weights, tensors: !a.summary };
    let v = inspect(b.as_mut(), &a.path, &opts)?;
    if a.json {
        print_stdout(&serde_json::to_string_pretty(&v)?)?;
    } else {
        print_stdout(render_text(&v).trim_end_matches('\n'))?;
    }
    report_pools(b.as_ref(), g.verbose);
    Ok(())
}

pub fn export(a: ExportArgs) -> Result<()> {
    use roentgen::io::files::{check_output_file, Existing};
    use roentgen::models::single_file_export::{folder_to_single_file, single_file_to_folder};
    let components = if a.single_file {
        if a.model.is_file() {
            bail!("--single-file: {} is already a single file", a.model.display());
        }
        check_output_file(&a.out, if a.overwrite { Existing::Replace } else { Existing::Refuse }, "out")?;
        let (n, bytes) = folder_to_single_file(&a.model, &a.out, a.dtype, a.ema)?;
        vec![("single file".to_string(), n, bytes)]
    } else if a.model.is_file() {
        if a.out.exists() && std::fs::read_dir(&a.out).map(|mut d| d.next().is_some()).unwrap_or(true) && !a.overwrite {
            bail!("--out {}: exists and is not empty (pass --overwrite to replace it)", a.out.display());
        }
        let config = match &a.config {
            Some(c) => c.clone(),
            None => super::sample::bundled(
                "weights/sd-v1-4-config",
                "--config DIR (a pipeline folder with the model's configs)",
            )?,
        };
        single_file_to_folder(&a.model, &config, &a.out, a.dtype, a.ema)?
    } else {
        if a.config.is_some() {
            bail!("--config applies to a single-file --model; {} is a folder with its own configs", a.model.display());
        }
        roentgen::io::export::export(&a.model, &a.out, a.dtype, a.ema, a.overwrite)?.components
    };
    for (c, n, bytes) in &components {
        println!("{c:<13} {n:>5} tensors {:>9.2} MiB", *bytes as f64 / 1048576.0);
    }
    println!("wrote {}", a.out.display());
    Ok(())
}

pub fn bench(g: &Global, a: BenchArgs) -> Result<()> {
    let Some(stage) = a.stage else { return autotune(g, &a) };
    if a.plan_only {
        // A planning pass over the configs: no backend, no weights.
        let (roentgen::tools::bench::Stage::TrainStep, Some(model)) = (stage, &a.model) else {
            bail!("bench --plan-only: plans `train-step --model DIR` only");
        };
        let plan = roentgen::tools::train_memory::plan(&bench_options(&a, model))?;
        return print_stdout(&if a.json { serde_json::to_string_pretty(&plan)? } else { plan.render() });
    }
    let mut b = open_backend(g)?;
    if stage == roentgen::tools::bench::Stage::Allreduce {
        return super::as_rank(a.distributed, |dist| {
            let r = roentgen::tools::bench_allreduce::run(b.as_mut(), dist, a.elements, a.warmup, a.iters)?;
            if dist.is_root() {
                print_stdout(&if a.json { serde_json::to_string_pretty(&r)? } else { r.render() })?;
            }
            Ok(())
        });
    }
    let Some(model) = &a.model else {
        bail!("bench {}: --model DIR (a pipeline folder) is required", stage.name());
    };
    let r = roentgen::tools::bench::run(b.as_mut(), stage, &bench_options(&a, model))?;
    if a.json {
        print_stdout(&serde_json::to_string_pretty(&r)?)?;
    } else {
        print_stdout(&r.render())?;
    }
    report_pools(b.as_ref(), g.verbose);
    Ok(())
}

/// The stage options the flags give.
fn bench_options<'a>(a: &'a BenchArgs, model: &'a Path) -> roentgen::tools::bench::BenchOptions<'a> {
    roentgen::tools::bench::BenchOptions {
        model,
        variant: a.variant.as_deref(),
        random_weights: a.random_weights,
        height: a.height,
        width: a.width,
        batch: a.batch,
        warmup: a.warmup,
        iters: a.iters,
        profile: a.profile,
        gradient_checkpointing: a.gradient_checkpointing,
    }
}

/// `bench --autotune` (backend/cuda/autotune.rs).
#[cfg(feature = "cuda")]
fn autotune(g: &Global, a: &BenchArgs) -> Result<()> {
    use roentgen::backend::cuda::{autotune, CudaBackend};
    use roentgen::tools::bench::Stage;
    if g.device != roentgen::backend::Device::Cuda {
        bail!("bench --autotune times CUDA kernel versions: add --device cuda");
    }
    let Some(model) = &a.model else { bail!("bench --autotune: --model DIR (a pipeline folder) is required") };
    let mut gpu = CudaBackend::new(0, g.precision)?;
    // One untimed call of each stage is enough to see its shapes.
    let opts = roentgen::tools::bench::BenchOptions { warmup: 0, iters: 1, profile: false, ..bench_options(a, model) };
    let mut ops: Vec<autotune::TunableOp> = Vec::new();
    for stage in [Stage::Unet, Stage::VaeDecode, Stage::TrainStep] {
        roentgen::diag::progress(format!("autotune: running {} to find its shapes", stage.name()));
        let found = autotune::record(&mut gpu, &mut |b| roentgen::tools::bench::run(b, stage, &opts).map(drop))
            .with_context(|| format!("bench --autotune: running {} to find its kernel shapes", stage.name()))?;
        for op in found {
            if !ops.iter().any(|o| o.family() == op.family() && o.key() == op.key()) {
                ops.push(op);
            }
        }
    }
    roentgen::diag::progress(format!("autotune: timing every version at {} shape(s)", ops.len()));
    let rows = autotune::tune(&mut gpu, &ops, a.autotune_iters)?;
    let path = autotune::save_cache(&gpu, &rows)?;
    if a.json {
        let v = serde_json::json!({"device": gpu.name(), "cache": path.display().to_string(), "rows": rows});
        print_stdout(&serde_json::to_string_pretty(&v)?)?;
    } else {
        print_stdout(&format!(
            "{}
{}written to {}",
            gpu.name(),
            autotune::render(&rows),
            path.display()
        ))?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn autotune(_: &Global, _: &BenchArgs) -> Result<()> {
    bail!(
        "bench --autotune times CUDA kernel versions: CUDA support was not compiled into this binary; rebuild with \
         `cargo build --release --features cuda`"
    )
}

pub fn encode_text_command(g: &Global, a: EncodeTextArgs) -> Result<()> {
    let mut b = open_backend(g)?;
    encode_text(
        b.as_mut(),
        &a.model,
        a.tokenizer.as_deref(),
        &a.prompt,
        &a.out,
        a.variant.as_deref(),
        a.random_weights,
    )?;
    report_pools(b.as_ref(), g.verbose);
    Ok(())
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

/// Where a text encoder's weights come from.
pub enum EncoderWeights<'a> {
    /// Its weight file (of this variant, e.g. fp16).
    File(Option<&'a str>),
    /// roentgen's seeded random weights (for timing without a download).
    Random,
    /// PyTorch's default initialisation from this seed: an encoder that has learned nothing.
    DefaultInit(u64),
}

/// A text encoder and its tokenizer: from a pipeline folder, or from a text encoder folder with
/// `tokenizer` (`--tokenizer`).
pub fn load_text_encoder(
    b: &mut dyn Backend,
    model: &Path,
    tokenizer: Option<&Path>,
    weights: EncoderWeights,
) -> Result<(TextEncoder, TextTokenizer)> {
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
    let encoder = match weights {
        EncoderWeights::File(variant) => TextEncoder::load(b, &te_dir, variant)?.0,
        EncoderWeights::Random => TextEncoder::random(b, &te_dir, 0)?,
        EncoderWeights::DefaultInit(seed) => TextEncoder::init_default(b, &te_dir, seed)?,
    };
    Ok((encoder, tok))
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
    roentgen::io::files::check_output_file(out, roentgen::io::files::Existing::Replace, "out")?;
    let init = if random_weights { EncoderWeights::Random } else { EncoderWeights::File(variant) };
    let (clip, tok) = load_text_encoder(b, model, tokenizer, init)?;
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
    let mut arena = clip.allocate_arena(b, prompts.len(), seq, false)?;
    let t0 = std::time::Instant::now();
    let acts = clip.forward(&mut Cx::new(b, &mut arena), &ids, &mask, prompts.len(), seq)?;
    let hidden = clip.last_hidden_state(&acts)?;
    let secs = t0.elapsed().as_secs_f64();
    let values = b.download(&hidden)?;
    let ids64: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    roentgen::io::safetensors::write_atomic(
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

#[derive(Args)]
pub struct ServeArgs {
    /// The pipeline folder to serve (default: the bundled phantom demo).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Weight file variant, e.g. fp16.
    #[arg(long)]
    pub variant: Option<String>,
    /// The address to listen on: loopback by default; 0.0.0.0 exposes the model to the network
    /// (there is no authentication unless --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port (0: any free one; the chosen address is printed).
    #[arg(long, default_value_t = 7860)]
    pub port: u16,
    /// Requests waiting beyond the running one; more are answered 429 (Retry-After: 5).
    #[arg(long, default_value_t = 8)]
    pub max_queue: usize,
    /// Largest request body, in MiB (413 above).
    #[arg(long, default_value_t = 32)]
    pub max_body_mb: usize,
    /// Seconds a request may wait in the queue before it is answered 503 instead of run.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Require `Authorization: Bearer KEY` on every request.
    #[arg(long)]
    pub api_key: Option<String>,
}

pub fn serve(g: &Global, a: ServeArgs) -> Result<()> {
    let mut b = open_backend(g)?;
    let model = match &a.model {
        Some(m) => m.clone(),
        None => super::sample::demo_model()?,
    };
    if a.max_queue == 0 || a.max_body_mb == 0 {
        bail!("--max-queue and --max-body-mb must be at least 1");
    }
    let pipe = roentgen::sample::pipeline::Pipeline::load(b.as_mut(), &model, a.variant.as_deref())?;
    let o = roentgen::tools::serve::ServeOptions {
        host: a.host,
        port: a.port,
        max_queue: a.max_queue,
        max_body_bytes: a.max_body_mb << 20,
        queue_timeout: std::time::Duration::from_secs(a.timeout),
        api_key: a.api_key,
        model_name: model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into()),
    };
    roentgen::tools::serve::serve(b.as_mut(), &pipe, &o)
}

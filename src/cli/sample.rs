//! `roentgen sample`: prompts in, PNGs out. Every output path is decided and checked before the
//! work (never replacing an earlier result without --overwrite, never anything but a regular
//! file), each image is written as soon as it is decoded, and each PNG records every setting that
//! made it (also as an A1111-style `parameters` chunk that other tools read).

use anyhow::{bail, Context, Result};
use clap::Args;
use roentgen::backend::Backend;
use roentgen::io::files::{self, Existing};
use roentgen::io::safetensors::OutTensor;
use roentgen::rng::torch::NormalVariant;
use roentgen::sample::pipeline::{read_latents, Pipeline, SampleRequest};
use roentgen::sample::schedulers::{SchedulerKind, SchedulerOptions};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct SampleArgs {
    /// A pipeline folder: model_index.json, text_encoder/, tokenizer/, unet/, vae/, scheduler/;
    /// or a single-file checkpoint (.ckpt, .safetensors in the original CompVis layout, as
    /// A1111/ComfyUI use; read with --config's configs). Without it, the bundled phantom demo model
    /// (weights/phantom-demo) is used: a small model trained by roentgen on synthetic phantoms, not
    /// a medical model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// For a single-file --model: a pipeline folder whose configs, tokenizer and scheduler describe
    /// it (default: the bundled Stable Diffusion v1.4 configs, weights/sd-v1-4-config).
    #[arg(long)]
    config: Option<PathBuf>,
    /// A prompt (repeatable).
    #[arg(long)]
    prompt: Vec<String>,
    /// A file of prompts, one per line (blank lines skipped).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// The negative prompt, used for every prompt (default: the empty, unconditional prompt).
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Images per U-Net call (guidance doubles the call's batch); bounds memory, not results.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Seed of the torch-compatible generator (default: drawn from the clock and reported).
    #[arg(long)]
    seed: Option<u64>,
    /// Which of torch's CPU normal kernels to reproduce: native (what torch uses on this CPU),
    /// avx2 (x86 with AVX2/AVX-512) or default (scalar: forced or non-x86).
    #[arg(long, default_value = "native")]
    rng: String,
    /// Image height in pixels, a multiple of the VAE's scale factor (default: the U-Net config's
    /// sample_size × that factor, as diffusers: 512 for SD v1.4, 64 for the phantom demo).
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels (default as --height).
    #[arg(long)]
    width: Option<usize>,
    /// Denoising steps.
    #[arg(long, default_value_t = 75)]
    steps: usize,
    /// Classifier-free guidance scale (≤ 1 turns guidance off).
    #[arg(long, default_value_t = 4.0)]
    guidance: f32,
    /// pndm, ddim, euler, euler-a or dpm++2m (default: the pipeline's scheduler_config.json).
    #[arg(long)]
    scheduler: Option<String>,
    /// Karras sigmas (euler and dpm++2m).
    #[arg(long)]
    karras_sigmas: bool,
    /// Override the scheduler's timestep_spacing: leading, trailing or linspace.
    #[arg(long)]
    timestep_spacing: Option<String>,
    /// Initial noise from a safetensors file (tensor `latents`, [N, C, H/8, W/8]) instead of the seed,
    /// as diffusers' `latents=` argument.
    #[arg(long, conflicts_with = "init_image")]
    latents_in: Option<PathBuf>,
    /// img2img: start from this image (PNG or JPEG; gray is made RGB) instead of noise, as
    /// diffusers' StableDiffusionImg2ImgPipeline. The size is --height/--width when given, else
    /// the image's, each side rounded down to a multiple of the VAE's scale factor; an image of
    /// another size is resized with Pillow's Lanczos filter, as diffusers' image processor does.
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// img2img: how much of the image to redraw, in (0, 1]: it is noised to the timestep where the
    /// last int(steps × strength) steps begin, and those steps are run (diffusers' defaults: 0.8,
    /// and 1 with --mask, which then starts from pure noise).
    #[arg(long, requires = "init_image")]
    strength: Option<f64>,
    /// Inpainting: repaint the white part of --init-image (gray from 0.5 up), keep the black, as
    /// diffusers' StableDiffusionInpaintPipeline: with an inpainting U-Net (9 input channels) it
    /// sees the mask and the masked image; with an ordinary one the kept part is the original,
    /// re-noised to each step's level. Resized like the image when its size differs.
    #[arg(long, requires = "init_image")]
    mask: Option<PathBuf>,
    /// Also write a safetensors file with `image` ([N, 3, H, W] in [0, 1], as diffusers'
    /// output_type="pt"), the final `latents` and the `prompt_embeds`.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Output: a .png file (numbered when several images) or a folder. Each image is written as
    /// soon as it is decoded, so a stopped job keeps what it made (--skip-existing resumes it).
    #[arg(long, default_value = "samples")]
    out: PathBuf,
    /// Write single-channel luminance PNGs (a chest X-ray is gray).
    #[arg(long)]
    gray: bool,
    /// Weight file variant, e.g. fp16.
    #[arg(long)]
    variant: Option<String>,
    /// Use the U-Net's EMA weights (unet_ema/, written by `roentgen train --ema`; a single file's
    /// model_ema.* tensors).
    #[arg(long)]
    ema: bool,
    /// Print a JSON summary (files, timings) on stdout.
    #[arg(long)]
    json: bool,
    /// Join MPI even when no launcher says so (normally automatic under mpirun/srun). With N
    /// ranks, rank r samples images r, r + N, …: the files and their bytes are those of one process.
    #[arg(long)]
    distributed: bool,
    /// Replace existing images (and --dump) at the output paths; without it a run never
    /// overwrites an earlier result.
    #[arg(long, conflicts_with = "skip_existing")]
    overwrite: bool,
    /// Resume a batch job: images whose file already exists are not computed again (the same
    /// seed and settings give the same names and, for the others, the same images).
    #[arg(long)]
    skip_existing: bool,
}

/// The PNG paths for `n` images: a file name for one image, numbered names for several, or files
/// named `{stem}-{index}.png` in a folder (`stem`: the seed, or the --latents-in file's name).
fn output_paths(out: &Path, n: usize, stem: &str) -> Result<Vec<PathBuf>> {
    let is_file = out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if is_file {
        if n == 1 {
            return Ok(vec![out.to_path_buf()]);
        }
        let file_stem = out.file_stem().unwrap_or_default().to_string_lossy().into_owned();
        return Ok((0..n).map(|i| out.with_file_name(format!("{file_stem}-{i}.png"))).collect());
    }
    if let Ok(m) = std::fs::metadata(out) {
        if !m.is_dir() {
            bail!(
                "--out {}: exists and is {}, not a folder (name a .png file or a folder)",
                out.display(),
                files::kind_of(&m)
            );
        }
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("--out {}: cannot create the output folder", out.display()))?;
    Ok((0..n).map(|i| out.join(format!("{stem}-{i:04}.png"))).collect())
}

/// A bundled folder (`rel`, e.g. weights/phantom-demo): next to the binary's source tree, or under
/// the current folder; `instead`: what to pass when it is not there.
pub fn bundled(rel: &str, instead: &str) -> Result<PathBuf> {
    let candidates = [PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel), PathBuf::from(rel)];
    candidates.iter().find(|p| p.join("model_index.json").is_file()).cloned().with_context(|| {
        format!(
            "the bundled {rel} is not at {} (a checkout of roentgen has it); pass {instead}",
            candidates[0].display()
        )
    })
}

/// The bundled demo pipeline.
pub(crate) fn demo_model() -> Result<PathBuf> {
    bundled("weights/phantom-demo", "--model DIR with a diffusers pipeline folder")
}

/// A1111's name for a scheduler (what its `parameters` chunk calls the sampler).

pub fn sample(b: &mut dyn Backend, a: SampleArgs) -> Result<()> {
    super::as_rank(a.distributed, |dist| sample_ranked(b, a, dist))
}

/// `sample` as rank `dist.rank()` of `dist.size()`: this rank's images only (all of them for one).
fn sample_ranked(b: &mut dyn Backend, a: SampleArgs, dist: &roentgen::dist::Dist) -> Result<()> {
    let mut prompts = a.prompt.clone();
    if let Some(f) = &a.prompts {
        files::check_input_file(f).context("--prompts")?;
        let text = std::fs::read_to_string(f).with_context(|| format!("--prompts {}: cannot read", f.display()))?;
        let before = prompts.len();
        prompts
            .extend(text.lines().map(|l| l.trim_end_matches('\r')).filter(|l| !l.trim().is_empty()).map(String::from));
        if prompts.len() == before {
            bail!("--prompts {}: holds no prompt (the file is empty or blank; one prompt per line)", f.display());
        }
    }
    if prompts.is_empty() {
        bail!("no prompt given: use --prompt TEXT (repeatable) or --prompts FILE");
    }
    // Sizes before anything is loaded or allocated.
    let n =
        prompts.len().checked_mul(a.num_images).filter(|&n| n <= roentgen::sample::pipeline::MAX_IMAGES).with_context(
            || {
                format!(
                    "{} prompt(s) × --num-images {}: more than {} images in one run; split the job",
                    prompts.len(),
                    a.num_images,
                    roentgen::sample::pipeline::MAX_IMAGES
                )
            },
        )?;
    if n == 0 || a.batch_size == 0 || a.steps == 0 {
        bail!("--num-images, --batch-size and --steps must be at least 1");
    }
    if a.dump.is_some() && a.skip_existing {
        bail!("--dump holds every image of the run, so it cannot be combined with --skip-existing");
    }
    let rng_variant = match a.rng.as_str() {
        "native" => NormalVariant::native(),
        other => other.parse::<NormalVariant>().map_err(|e| anyhow::anyhow!("--rng: {e}"))?,
    };
    let scheduler = match &a.scheduler {
        Some(s) => Some(s.parse::<SchedulerKind>().map_err(|e| anyhow::anyhow!("--scheduler: {e}"))?),
        None => None,
    };
    if let Some(s) = &a.timestep_spacing {
        // Checked here so that the error names the flag, not the scheduler config it overrides.
        if !["leading", "trailing", "linspace"].contains(&s.as_str()) {
            bail!("--timestep-spacing {s:?}: expected leading, trailing or linspace");
        }
    }
    let latents_in = match &a.latents_in {
        Some(p) => Some(read_latents(p)?),
        None => None,
    };
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let demo = demo_model()?;
            eprintln!(
                "note: no --model given, so this samples the bundled phantom demo ({}): a small model that \
                 roentgen trained on synthetic chest phantoms, not a medical model. For real chest X-rays use \
                 --model with a Stable Diffusion v1.x / RoentGen pipeline folder (see weights/README.md).",
                demo.display()
            );
            demo
        }
    };
    let t_load = std::time::Instant::now();
    let pipe = if model.is_file() {
        let config = match &a.config {
            Some(c) => c.clone(),
            None => bundled("weights/sd-v1-4-config", "--config DIR (a pipeline folder with the model's configs)")?,
        };
        Pipeline::load_single_file(b, &model, &config, a.ema)?
    } else {
        if a.config.is_some() {
            bail!("--config applies to a single-file --model; {} is a folder with its own configs", model.display());
        }
        Pipeline::load_with_unet(b, &model, a.variant.as_deref(), if a.ema { "unet_ema" } else { "unet" })?
    };
    let load_s = t_load.elapsed().as_secs_f64();
    // diffusers' default size: the U-Net config's sample_size ([h, w] or one number) × the VAE's
    // scale factor (64 latent pixels when the config has none).
    let f = pipe.vae_scale_factor();
    let [dh, dw] = pipe.unet.config.sample_size.unwrap_or([64, 64]);
    let init = match &a.init_image {
        Some(p) => {
            let strength = a.strength.unwrap_or(if a.mask.is_some() { 1.0 } else { 0.8 });
            let mut prepared = roentgen::sample::init_image::prepare(p, a.height, a.width, f, strength)?;
            if let Some((h0, w0)) = prepared.resized_from {
                eprintln!(
                    "note: --init-image {}: {w0}×{h0} resized to {}×{} (Pillow's Lanczos filter, as diffusers)",
                    p.display(),
                    prepared.width,
                    prepared.height
                );
            }
            if let Some(m) = &a.mask {
                let (mask, resized) = roentgen::sample::init_image::prepare_mask(m, prepared.height, prepared.width)?;
                if let Some((h0, w0)) = resized {
                    eprintln!(
                        "note: --mask {}: {w0}×{h0} resized to {}×{}",
                        m.display(),
                        prepared.width,
                        prepared.height
                    );
                }
                prepared.init.mask = Some(mask);
            }
            Some(prepared)
        }
        None => None,
    };
    let strength = init.as_ref().map(|p| p.init.strength);
    let (height, width) = match &init {
        Some(p) => (p.height, p.width),
        None => (a.height.unwrap_or(dh * f), a.width.unwrap_or(dw * f)),
    };
    let scheduler_options = SchedulerOptions {
        karras_sigmas: a.karras_sigmas.then_some(true),
        timestep_spacing: a.timestep_spacing.clone(),
        ..Default::default()
    };
    let kind = roentgen::sample::schedulers::from_config(
        scheduler,
        &pipe.scheduler_config,
        &pipe.scheduler_config_path,
        &scheduler_options,
    )?
    .kind();
    // The seed is used (and recorded) when it draws something: the initial noise, or Euler
    // ancestral's step noise. A --latents-in run of another scheduler uses none.
    let seed_used = latents_in.is_none() || kind == SchedulerKind::EulerAncestral;
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
            % 1_000_000_007
    });
    let seed_note = if seed_used { seed.to_string() } else { String::new() };
    let req = SampleRequest {
        prompts: prompts.clone(),
        negative_prompt: a.negative_prompt.clone(),
        num_images_per_prompt: a.num_images,
        batch_size: a.batch_size,
        seed,
        rng_variant,
        height,
        width,
        steps: a.steps,
        guidance: a.guidance,
        scheduler,
        scheduler_options,
        latents_in: None,
        init_image: init.map(|p| p.init),
    };
    let req = match latents_in {
        Some((shape, v)) => {
            let want = pipe.latent_shape(&req);
            if shape != want {
                bail!(
                    "{}: tensor 'latents' has shape {shape:?}; this run needs {want:?} ({} prompt(s) × {} image(s), {} latent channels, {}×{} px / {})",
                    a.latents_in.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
                    prompts.len(),
                    a.num_images,
                    want[1],
                    height,
                    width,
                    pipe.vae_scale_factor()
                );
            }
            SampleRequest { latents_in: Some(v), ..req }
        }
        None => req,
    };
    pipe.validate(&req)?;

    // Every output path, checked before the work.
    let stem = match &a.latents_in {
        Some(p) if !seed_used || a.seed.is_none() => {
            p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "latents".into())
        }
        _ => seed.to_string(),
    };
    let paths = output_paths(&a.out, n, &stem)?;
    let existing = if a.overwrite { Existing::Replace } else { Existing::Refuse };
    let (rank, ranks) = (dist.rank(), dist.size());
    if ranks > 1 && a.dump.is_some() {
        bail!("--dump writes every image's tensors from one process; run it without mpirun");
    }
    // With several ranks, image i is rank (i mod ranks)'s: skipped here as an already written
    // image would be, which leaves the others exactly as one process computes them.
    let mut skip = vec![false; n];
    for (i, p) in paths.iter().enumerate() {
        if i % ranks != rank || (a.skip_existing && p.is_file()) {
            skip[i] = true;
            continue;
        }
        files::check_output_file(p, existing, "out")?;
    }
    if let Some(d) = &a.dump {
        files::check_output_file(d, existing, "dump")?;
    }
    // One rank cleans the folder, before anyone writes to it.
    if dist.is_root() {
        files::clean_leftovers(files::parent_dir(&paths[0]), false)?;
    }
    dist.barrier();
    let todo = skip.iter().filter(|s| !**s).count();
    let theirs = (0..n).filter(|i| i % ranks != rank).count();
    if todo == 0 && ranks == 1 {
        eprintln!("all {n} image(s) already exist under {} (--skip-existing): nothing to do", a.out.display());
    }
    eprintln!(
        "{}sampling {todo} image(s){} of {width}×{height} from {} on {}: {}{} steps, guidance {}",
        if ranks > 1 { format!("rank {rank} of {ranks}: ") } else { String::new() },
        if todo + theirs < n { format!(" ({} already written)", n - todo - theirs) } else { String::new() },
        model.display(),
        b.name(),
        if seed_used {
            format!("seed {seed}, ")
        } else {
            format!("latents from {}, ", a.latents_in.as_ref().unwrap().display())
        },
        a.steps,
        a.guidance
    );

    let sched_name = kind.cli_name().to_string();
    let settings = |i: usize| -> Vec<(&'static str, String)> {
        let prompt = &prompts[i / a.num_images];
        let neg = a.negative_prompt.clone().unwrap_or_default();
        let model_name = model.file_name().map(|m| m.to_string_lossy().into_owned()).unwrap_or_default();
        let mut a1111 = format!("{prompt}\n");
        if !neg.is_empty() {
            a1111.push_str(&format!("Negative prompt: {neg}\n"));
        }
        a1111.push_str(&format!(
            "Steps: {}, Sampler: {}, CFG scale: {}, {}Size: {width}x{height}, Model: {model_name}{}",
            a.steps,
            kind.a1111_name(a.karras_sigmas),
            a.guidance,
            if seed_used { format!("Seed: {seed}, ") } else { String::new() },
            strength.map(|s| format!(", Denoising strength: {s}")).unwrap_or_default(),
        ));
        vec![
            ("prompt", prompt.clone()),
            ("negative_prompt", neg),
            ("seed", seed_note.clone()),
            ("rng", format!("{rng_variant:?}").to_lowercase()),
            ("latents_in", a.latents_in.as_ref().map(|p| p.display().to_string()).unwrap_or_default()),
            ("init_image", a.init_image.as_ref().map(|p| p.display().to_string()).unwrap_or_default()),
            ("strength", strength.map(|s| s.to_string()).unwrap_or_default()),
            ("mask", a.mask.as_ref().map(|p| p.display().to_string()).unwrap_or_default()),
            ("image_index", i.to_string()),
            ("width", width.to_string()),
            ("height", height.to_string()),
            ("steps", a.steps.to_string()),
            ("guidance", a.guidance.to_string()),
            ("scheduler", sched_name.clone()),
            ("karras_sigmas", a.karras_sigmas.to_string()),
            ("timestep_spacing", a.timestep_spacing.clone().unwrap_or_default()),
            ("model", model.display().to_string()),
            ("variant", a.variant.clone().unwrap_or_default()),
            ("ema", a.ema.to_string()),
            ("software", format!("roentgen {}", env!("CARGO_PKG_VERSION"))),
            ("parameters", a1111),
        ]
    };

    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} U-Net calls [{elapsed_precise} < {eta_precise}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        Ok(())
    };
    let mut warn = |m: String| bar.suspend(|| eprintln!("warning: {m}"));
    let (gray, channels) = (a.gray, pipe.vae.config.out_channels);
    let mut dumped: Option<(Vec<f32>, Vec<f32>)> = a.dump.as_ref().map(|_| (Vec::new(), Vec::new()));
    let mut written = Vec::new();
    let (h, w) = (height, width);
    let summary = pipe.generate_each(b, &req, &|i| skip[i], &mut progress, &mut warn, &mut |g| {
        let text = settings(g.index);
        let text: Vec<(&str, String)> = text.into_iter().filter(|(_, v)| !v.is_empty()).collect();
        roentgen::io::images::write_png(
            &paths[g.index],
            &roentgen::io::images::encode_png(g.image, channels, h, w, gray, &text)?,
        )?;
        written.push(paths[g.index].clone());
        if let Some((img, lat)) = &mut dumped {
            img.extend_from_slice(g.image);
            lat.extend_from_slice(g.latents);
        }
        Ok(())
    });
    bar.finish_and_clear();
    let summary = summary.with_context(|| {
        format!("{} of {todo} image(s) had been written to {} before the error", written.len(), a.out.display())
    })?;
    if let (Some(d), Some((img, lat))) = (&a.dump, &dumped) {
        roentgen::io::safetensors::write_atomic(
            d,
            &[
                ("image", vec![n, channels, h, w], OutTensor::F32(img)),
                ("latents", summary.latent_shape.to_vec(), OutTensor::F32(lat)),
                ("prompt_embeds", summary.prompt_embeds_shape().to_vec(), OutTensor::F32(&summary.prompt_embeds())),
            ],
        )?;
    }
    // Every rank's images are on disk before any rank reports.
    dist.barrier();
    let total = dist.sum_u64(written.len() as u64);
    if ranks > 1 && !dist.is_root() {
        return Ok(());
    }
    if ranks > 1 {
        eprintln!("{ranks} ranks wrote {total} image(s) in all");
    }
    let t = &summary.timings;
    eprintln!(
        "wrote {} image(s) to {}: load {load_s:.2} s, text encoding {:.2} s, denoising {:.2} s ({:.3} s per step, {} U-Net calls), VAE decode {:.2} s",
        written.len(),
        if paths.len() == 1 { paths[0].display().to_string() } else { a.out.display().to_string() },
        t.text_encoding_s,
        t.denoising_s,
        t.per_step_s,
        t.unet_calls,
        t.vae_decode_s
    );
    if a.json {
        let summary = serde_json::json!({
            "files": paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "written": written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "seed": if seed_used { Some(seed) } else { None }, "scheduler": sched_name, "steps": a.steps, "guidance": a.guidance,
            "height": h, "width": w, "timings": { "load_s": load_s, "text_encoding_s": t.text_encoding_s,
            "denoising_s": t.denoising_s, "per_step_s": t.per_step_s, "vae_decode_s": t.vae_decode_s, "unet_calls": t.unet_calls,
            "graph_replays": t.graph_replays },
            "dump": a.dump.as_ref().map(|d| d.display().to_string()),
            "ranks": ranks, "written_by_all_ranks": total,
        });
        crate::cli::print_stdout(&serde_json::to_string_pretty(&summary)?)?;
    }
    Ok(())
}

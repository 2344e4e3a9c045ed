//! Text-to-image sampling as diffusers' `StableDiffusionPipeline.__call__` does it: prompt and
//! negative-prompt embeddings, initial latents from a torch-compatible generator (or given),
//! classifier-free guidance with the unconditional half first in one U-Net batch, the scheduler's
//! loop, VAE decode, and `(image / 2 + 0.5).clamp(0, 1)`.
//!
//! Latents live on the host in NCHW (torch's order: the generator's draws and the schedulers are
//! defined on it); each U-Net call uploads them channels-last. `batch_size` bounds the U-Net batch
//! only: every step runs the U-Net over the images chunk by chunk and then steps the scheduler once
//! over all of them, so the ancestral sampler's noise is drawn exactly as diffusers draws it for the
//! whole batch.

use crate::backend::Backend;
use crate::diag::SettingError;
use crate::io::weights;
use crate::models::text::{TextEncoder, TextTokenizer};
use crate::models::unet::UNet;
use crate::models::vae::AutoencoderKL;
use crate::models::Component;
use crate::nn::Cx;
use crate::nn::Fmap;
use crate::rng::torch::{NormalVariant, TorchGenerator};
use crate::sample::edit::{self, InitImage};
use crate::sample::schedulers::{self, Scheduler, SchedulerKind, SchedulerOptions};
use crate::tensor::{nchw_to_nhwc, nhwc_to_nchw};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Most images in one run (a batch evaluation of the paper's size is a few thousand).
pub const MAX_IMAGES: usize = 1_000_000;
/// Most pixels on an image side (SD-XL's 1024, eight times over).
pub const MAX_IMAGE_SIDE: usize = 8192;
/// The initial latents of a run are held at once: at most this many bytes.
pub const MAX_LATENT_BYTES: usize = 8 << 30;
/// Most denoising steps (schedulers have at most num_train_timesteps of them anyway).
pub const MAX_STEPS: usize = 10_000;

/// A loaded Stable Diffusion pipeline folder.
pub struct Pipeline {
    pub dir: PathBuf,
    pub tokenizer: TextTokenizer,
    pub text_encoder: TextEncoder,
    pub unet: UNet,
    pub vae: AutoencoderKL,
    pub scheduler_config: serde_json::Value,
    pub scheduler_config_path: PathBuf,
}

/// Everything one `generate` call needs besides the pipeline.
#[derive(Clone, Debug)]
pub struct SampleRequest {
    pub prompts: Vec<String>,
    /// One negative prompt for every prompt ("" when absent: the unconditional prompt).
    pub negative_prompt: Option<String>,
    pub num_images_per_prompt: usize,
    /// Most images per U-Net call (the call itself is twice that with guidance).
    pub batch_size: usize,
    pub seed: u64,
    pub rng_variant: NormalVariant,
    pub height: usize,
    pub width: usize,
    pub steps: usize,
    pub guidance: f32,
    pub scheduler: Option<SchedulerKind>,
    pub scheduler_options: SchedulerOptions,
    /// Initial noise [N, C, h, w] (NCHW, before `init_noise_sigma`), as diffusers' `latents=`.
    pub latents_in: Option<Vec<f32>>,
    /// img2img or inpainting: start from this image instead of noise (sample::edit).
    pub init_image: Option<InitImage>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Timings {
    pub load_s: f64,
    pub text_encoding_s: f64,
    pub denoising_s: f64,
    pub per_step_s: f64,
    pub vae_decode_s: f64,
    pub unet_calls: usize,
    /// U-Net calls served by replaying a captured CUDA graph (0 on the CPU or with graphs off).
    pub graph_replays: usize,
}

pub struct SampleOutput {
    /// [N, 3, H, W] in [0, 1], image i from prompt i / num_images_per_prompt.
    pub images: Vec<f32>,
    /// Final latents [N, C, h, w] (what diffusers returns with output_type="latent").
    pub latents: Vec<f32>,
    /// The U-Net's conditioning [negatives..., prompts...] (or prompts only without guidance),
    /// each [77, hidden], one row per image as diffusers' `prompt_embeds` after duplication.
    pub prompt_embeds: Vec<f32>,
    pub prompt_embeds_shape: [usize; 3],
    pub num_images: usize,
    pub latent_shape: [usize; 4],
    pub timings: Timings,
    pub scheduler: SchedulerKind,
}

impl Pipeline {
    /// Loads every component of a diffusers pipeline folder (model_index.json, text_encoder/,
    /// tokenizer/, unet/, vae/, scheduler/), checking that they fit together.
    pub fn load(b: &mut dyn Backend, dir: &Path, variant: Option<&str>) -> Result<Pipeline> {
        Self::load_with_unet(b, dir, variant, "unet")
    }

    /// As `load`, with the U-Net from another subfolder (`unet_ema` for EMA weights).
    pub fn load_with_unet(b: &mut dyn Backend, dir: &Path, variant: Option<&str>, unet_dir: &str) -> Result<Pipeline> {
        weights::check_folder(dir, "a pipeline folder")?;
        if !weights::is_pipeline_folder(dir) {
            bail!(
                "{}: not a pipeline folder (no model_index.json); sampling needs the whole pipeline \
                 (text_encoder/, tokenizer/, unet/, vae/, scheduler/)",
                dir.display()
            );
        }
        for comp in ["text_encoder", "tokenizer", unet_dir, "vae", "scheduler"] {
            weights::component_dir(dir, comp)?;
        }
        let tokenizer = TextTokenizer::from_dir(&dir.join("tokenizer"))?;
        // Sampling never changes the weights: used in place where they can be.
        let (text_encoder, _) = TextEncoder::load_frozen(b, &dir.join("text_encoder"), variant)?;
        let (unet, _) = UNet::load_frozen(b, &dir.join(unet_dir), variant)?;
        let (vae, _) = AutoencoderKL::load_frozen(b, &dir.join("vae"), variant)?;
        Self::assemble(dir, dir, tokenizer, text_encoder, unet, vae)
    }

    /// Loads a single-file checkpoint (the CompVis layout of `.ckpt` releases and A1111/ComfyUI
    /// files; see `io::single_file`), `.safetensors` or a PyTorch file, with the configs,
    /// tokenizer and scheduler of the pipeline folder `config_dir` (its weights, if any, are not
    /// read); `ema`: the U-Net's EMA weights (`model_ema.*`) instead of its own.
    pub fn load_single_file(b: &mut dyn Backend, file: &Path, config_dir: &Path, ema: bool) -> Result<Pipeline> {
        weights::check_folder(config_dir, "a pipeline folder of configs")?;
        for comp in ["text_encoder", "tokenizer", "unet", "vae", "scheduler"] {
            weights::component_dir(config_dir, comp)?;
        }
        let tokenizer = TextTokenizer::from_dir(&config_dir.join("tokenizer"))?;
        let (text_encoder, unet, vae) = crate::models::single_file::load_models(b, file, config_dir, ema)?;
        Self::assemble(file, config_dir, tokenizer, text_encoder, unet, vae)
    }

    /// The loaded components checked against each other, with the scheduler config of
    /// `config_dir`; `source`: the folder or file the weights came from (for messages).
    fn assemble(
        source: &Path,
        config_dir: &Path,
        tokenizer: TextTokenizer,
        text_encoder: TextEncoder,
        unet: UNet,
        vae: AutoencoderKL,
    ) -> Result<Pipeline> {
        let dir = source;
        check_scaling_factor(&vae, &config_dir.join("vae"))?;
        if text_encoder.hidden_size() != unet.config.cross_attention_dim {
            bail!(
                "{}: text_encoder hidden_size {} does not match unet cross_attention_dim {}",
                dir.display(),
                text_encoder.hidden_size(),
                unet.config.cross_attention_dim
            );
        }
        // An inpainting U-Net takes the latents, the mask and the masked image's latents.
        let lat = vae.config.latent_channels;
        if (unet.config.in_channels != lat && unet.config.in_channels != 2 * lat + 1) || unet.config.out_channels != lat
        {
            bail!(
                "{}: vae latent_channels {} does not match unet in_channels {} (the latents, or an inpainting U-Net's \
                 latents + mask + masked-image latents) / out_channels {}",
                dir.display(),
                vae.config.latent_channels,
                unet.config.in_channels,
                unet.config.out_channels
            );
        }
        if tokenizer.vocab_size() > text_encoder.vocab_size() {
            bail!(
                "{}: the tokenizer has {} tokens but the text encoder's vocabulary is {}",
                dir.display(),
                tokenizer.vocab_size(),
                text_encoder.vocab_size()
            );
        }
        let scheduler_config_path = schedulers::config_path(&config_dir.join("scheduler"))?;
        let scheduler_config = weights::read_json(&scheduler_config_path)?;
        Ok(Pipeline {
            dir: dir.to_path_buf(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            scheduler_config_path,
        })
    }

    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config.scale_factor()
    }

    /// Checks a request before any work: sizes, counts, the initial latents' shape.
    pub fn validate(&self, r: &SampleRequest) -> Result<()> {
        let f = self.vae_scale_factor();
        let size = || vec![("height", Some(r.height.to_string())), ("width", Some(r.width.to_string()))];
        if r.height == 0 || r.width == 0 || r.height % f != 0 || r.width % f != 0 {
            let problem = format!("both must be positive multiples of {f} (the VAE's scale factor)");
            return Err(SettingError { fields: size(), problem }.into());
        }
        if r.prompts.is_empty() {
            return Err(SettingError::fields(&["prompts"], "no prompt given"));
        }
        if r.num_images_per_prompt == 0 || r.batch_size == 0 || r.steps == 0 {
            return Err(SettingError::fields(&["num_images_per_prompt", "batch_size", "steps"], "must be at least 1"));
        }
        // Bounds before any allocation: the initial latents of all images are one draw.
        let n = r.prompts.len().checked_mul(r.num_images_per_prompt).filter(|&n| n <= MAX_IMAGES);
        let Some(n) = n else {
            let problem = format!(
                "{} prompt(s) × this many images each: more than {MAX_IMAGES} images in one run; split the job",
                r.prompts.len()
            );
            return Err(SettingError::value("num_images_per_prompt", r.num_images_per_prompt, problem));
        };
        if r.height > MAX_IMAGE_SIDE || r.width > MAX_IMAGE_SIDE {
            return Err(SettingError { fields: size(), problem: format!("at most {MAX_IMAGE_SIDE} pixels") }.into());
        }
        let latent_bytes = n * self.vae.config.latent_channels * (r.height / f) * (r.width / f) * 4;
        if latent_bytes > MAX_LATENT_BYTES {
            bail!(
                "{n} images of {}×{} need {:.1} GiB of initial latents (one draw, as diffusers); at most {} GiB: \
                 split the job into several runs",
                r.width,
                r.height,
                latent_bytes as f64 / (1u64 << 30) as f64,
                MAX_LATENT_BYTES >> 30
            );
        }
        if r.steps > MAX_STEPS {
            return Err(SettingError::value("steps", r.steps, format!("at most {MAX_STEPS}")));
        }
        if !r.guidance.is_finite() {
            return Err(SettingError::fields(&["guidance"], "must be a finite number"));
        }
        if let Some(init) = &r.init_image {
            if !(init.strength > 0.0 && init.strength <= 1.0) {
                return Err(SettingError::value("strength", init.strength, "must be in (0, 1]"));
            }
            if init.pixels.len() != 3 * r.height * r.width {
                bail!("the init image has {} values; expected 3 × {} × {}", init.pixels.len(), r.height, r.width);
            }
            if r.latents_in.is_some() {
                return Err(SettingError::fields(&["latents_in", "init_image"], "give one start, not both"));
            }
            if init.mask.as_ref().is_some_and(|m| m.len() != r.height * r.width) {
                bail!(
                    "the mask has {} values; expected {} × {}",
                    init.mask.as_ref().map_or(0, Vec::len),
                    r.height,
                    r.width
                );
            }
        }
        if self.unet.config.in_channels != self.vae.config.latent_channels
            && !r.init_image.as_ref().is_some_and(|i| i.mask.is_some())
        {
            return Err(SettingError::fields(
                &["init_image", "mask"],
                format!(
                    "this U-Net is an inpainting one ({} input channels): it needs an image and a mask to repaint",
                    self.unet.config.in_channels
                ),
            ));
        }
        if let Some(l) = &r.latents_in {
            let want = self.latent_numel(r);
            if l.len() != want {
                let [n, c, h, w] = self.latent_shape(r);
                let problem =
                    format!("tensor 'latents' has {} elements; expected [{n}, {c}, {h}, {w}] = {want}", l.len());
                return Err(SettingError::fields(&["latents_in"], problem));
            }
        }
        Ok(())
    }

    pub fn latent_shape(&self, r: &SampleRequest) -> [usize; 4] {
        let f = self.vae_scale_factor();
        [r.prompts.len() * r.num_images_per_prompt, self.vae.config.latent_channels, r.height / f, r.width / f]
    }

    fn latent_numel(&self, r: &SampleRequest) -> usize {
        self.latent_shape(r).iter().product()
    }

    /// Text embeddings of `texts` (each [77, hidden]), in one text-encoder batch.
    pub(crate) fn encode_texts(
        &self,
        b: &mut dyn Backend,
        texts: &[String],
        warn: &mut dyn FnMut(String),
    ) -> Result<Vec<f32>> {
        let seq = self.tokenizer.max_length();
        let mut ids = Vec::with_capacity(texts.len() * seq);
        let mut mask = Vec::with_capacity(texts.len() * seq);
        for (i, t) in texts.iter().enumerate() {
            let e = self.tokenizer.encode(t);
            if e.truncated {
                warn(format!(
                    "prompt {} has {} tokens; truncated to {} as the reference tokenizer does",
                    i + 1,
                    e.tokens,
                    self.tokenizer.max_length()
                ));
            }
            ids.extend(e.ids);
            mask.extend(e.mask);
        }
        let te = &self.text_encoder;
        let mut arena = te.allocate_arena(b, texts.len(), seq, false)?;
        let bd: &dyn Backend = b;
        let out = te
            .forward(&mut Cx::new(bd, &mut arena), &ids, &mask, texts.len(), seq)
            .and_then(|acts| te.last_hidden_state(&acts))
            .and_then(|out| bd.download(&out));
        b.free(arena.pool())?;
        out
    }

    /// Runs the whole pipeline and returns every image at once (for tests and small jobs; the
    /// CLI uses [`Pipeline::generate_each`], which hands each image over as soon as it is decoded).
    pub fn generate(
        &self,
        b: &mut dyn Backend,
        r: &SampleRequest,
        progress: &mut dyn FnMut(usize, usize) -> Result<()>,
        warn: &mut dyn FnMut(String),
    ) -> Result<SampleOutput> {
        let (mut images, mut latents) = (Vec::new(), Vec::new());
        let s = self.generate_each(b, r, &|_| false, progress, warn, &mut |g| {
            images.extend_from_slice(g.image);
            latents.extend_from_slice(g.latents);
            Ok(())
        })?;
        Ok(SampleOutput {
            images,
            latents,
            prompt_embeds: s.prompt_embeds(),
            prompt_embeds_shape: s.prompt_embeds_shape(),
            num_images: s.num_images,
            latent_shape: s.latent_shape,
            timings: s.timings,
            scheduler: s.scheduler,
        })
    }

    /// Runs the whole pipeline, calling `on_image` with each image as soon as it is decoded (in
    /// index order), so a long job keeps what it made when it is stopped. `progress(done, total)`
    /// follows the U-Net calls; an error from it stops the run there (cancellation), the device
    /// memory of the run freed as on every way out. Images for which
    /// `skip(i)` holds are not computed (a resumed batch job); the others come out exactly as in a
    /// run that computes all of them.
    ///
    /// Why that holds: the initial latents of all images are one draw (diffusers' batch), made
    /// first; every scheduler but Euler ancestral steps each value on its own, so images can be
    /// denoised in groups of `batch_size`, start to finish, each group written before the next
    /// begins. Euler ancestral draws its step noise for the whole batch at every step, so it
    /// denoises all images in lockstep (skipped ones with a zero prediction, their values
    /// discarded) and writes them at the end.
    pub fn generate_each(
        &self,
        b: &mut dyn Backend,
        r: &SampleRequest,
        skip: &dyn Fn(usize) -> bool,
        progress: &mut dyn FnMut(usize, usize) -> Result<()>,
        warn: &mut dyn FnMut(String),
        on_image: &mut dyn FnMut(GeneratedImage) -> Result<()>,
    ) -> Result<SampleSummary> {
        self.validate(r)?;
        let mut timings = Timings::default();
        let cfg_on = r.guidance > 1.0;
        let [n, c, lh, lw] = self.latent_shape(r);
        let c_in = self.unet.config.in_channels;
        let per_image = c * lh * lw;
        let seq = self.tokenizer.max_length();
        let hidden = self.text_encoder.hidden_size();
        let row = seq * hidden;

        // 1. Text embeddings: unique prompts (and their negatives) in one batch; image i is
        //    conditioned on prompt i / num_images_per_prompt (diffusers' repeat + view).
        let t0 = Instant::now();
        let p = r.prompts.len();
        let mut texts = r.prompts.clone();
        if cfg_on {
            texts.extend(std::iter::repeat_n(r.negative_prompt.clone().unwrap_or_default(), p));
        }
        let emb = self.encode_texts(b, &texts, warn)?;
        check_finite(&emb, || "the text encoder's output (the prompt embeddings)".into())?;
        let cond_row = |i: usize| &emb[(i / r.num_images_per_prompt) * row..][..row];
        let uncond_row = |i: usize| &emb[(p + i / r.num_images_per_prompt) * row..][..row];
        timings.text_encoding_s = t0.elapsed().as_secs_f64();

        // 2. Initial latents: one draw for the whole batch, as diffusers.
        let new_scheduler = || -> Result<Scheduler> {
            let mut s = schedulers::from_config(
                r.scheduler,
                &self.scheduler_config,
                &self.scheduler_config_path,
                &r.scheduler_options,
            )?;
            s.set_timesteps(r.steps)?;
            Ok(s)
        };
        let probe = new_scheduler()?;
        let kind = probe.kind();
        let mut generator = TorchGenerator::with_variant(r.seed, r.rng_variant);
        let steps = probe.timesteps().len();
        let (initial, begin, inpaint) = match &r.init_image {
            Some(init) => {
                let begin = edit::begin_index(r.steps, init.strength, steps)?;
                let s = edit::start(self, b, init, [n, c, lh, lw], &probe, begin, &mut generator)?;
                (s.latents, begin, s.inpaint)
            }
            None => {
                let mut initial = match &r.latents_in {
                    Some(l) => l.clone(),
                    None => generator.randn(n * per_image),
                };
                let sigma0 = probe.init_noise_sigma();
                initial.iter_mut().for_each(|x| *x *= sigma0);
                (initial, 0, None)
            }
        };
        drop(probe);

        // 3. Groups of images denoised together (see above), and only the ones not skipped.
        let active: Vec<usize> = (0..n).filter(|&i| !skip(i)).collect();
        let chunk = r.batch_size.min(n);
        let groups: Vec<(Vec<usize>, Vec<usize>)> = if kind == SchedulerKind::EulerAncestral {
            vec![((0..n).collect(), active.clone())]
        } else {
            active.chunks(chunk).map(|g| (g.to_vec(), g.to_vec())).collect()
        };
        let total_calls: usize = (steps - begin) * groups.iter().map(|(_, a)| a.len().div_ceil(chunk)).sum::<usize>();
        let mult = if cfg_on { 2 } else { 1 };
        let mut arena = self.unet.allocate_arena(b, mult * chunk, lh, lw, seq)?;
        let f = self.vae_scale_factor();
        let (h, w) = (lh * f, lw * f);
        let out_c = self.vae.config.out_channels;
        let mut vae_arena = self.vae.allocate_decode_arena(b, chunk, lh, lw)?;
        let sf = self.vae.config.scaling_factor;
        // The U-Net call is a replayable graph per batch size (CUDA graphs; `Backend::graph`): its
        // inputs, the timesteps included, are uploaded before it, and its addresses depend only on
        // this arena, whose pool id is part of the key.
        let mut outs: std::collections::HashMap<usize, Fmap> = std::collections::HashMap::new();
        let replays0 = b.graph_replays();
        let mut calls = 0;
        // The loop in a closure so that the arenas are freed on every way out of it.
        let mut denoise_and_decode = || -> Result<()> {
            for (members, act) in &groups {
                let mut sched = new_scheduler()?;
                sched.set_begin_index(begin)?;
                let timesteps: Vec<f64> = sched.timesteps().to_vec();
                // Image i's place in the group (members ascend): a search, not a scan, because Euler
                // ancestral's one group holds every image of the run.
                let pos = |i: usize| members.binary_search(&i).unwrap_or(0);
                let mut latents: Vec<f32> =
                    members.iter().flat_map(|&i| initial[i * per_image..(i + 1) * per_image].iter().copied()).collect();
                let mut noise = vec![0f32; latents.len()];
                let t1 = Instant::now();
                for (si, &t) in timesteps.iter().enumerate().skip(begin) {
                    for part in act.chunks(chunk) {
                        let k = part.len();
                        let ub = mult * k;
                        let mut x = Vec::with_capacity(k * per_image);
                        for &i in part {
                            x.extend_from_slice(&latents[pos(i) * per_image..(pos(i) + 1) * per_image]);
                        }
                        sched.scale_model_input(&mut x, si);
                        // An inpainting U-Net also sees the mask and the masked image, per image.
                        if let (Some(ip), true) = (&inpaint, c_in != c) {
                            let scaled = std::mem::take(&mut x);
                            scaled.chunks(per_image).for_each(|one| ip.unet_input(one, &mut x));
                        }
                        // U-Net batch: [uncond images..., cond images...] as diffusers' torch.cat.
                        let mut batch_in = Vec::with_capacity(ub * per_image);
                        let mut ctx = Vec::with_capacity(ub * row);
                        if cfg_on {
                            batch_in.extend_from_slice(&x);
                            part.iter().for_each(|&i| ctx.extend_from_slice(uncond_row(i)));
                        }
                        batch_in.extend_from_slice(&x);
                        part.iter().for_each(|&i| ctx.extend_from_slice(cond_row(i)));
                        arena.reset();
                        let xin = Fmap::alloc(&mut arena, ub, lh, lw, c_in)?;
                        let ctx_t = arena.alloc([ub * seq, hidden])?;
                        let ts = arena.alloc_f32([ub])?;
                        b.upload(&xin.t, &nchw_to_nhwc(&batch_in, ub, c_in, lh, lw))?;
                        b.upload(&ctx_t, &ctx)?;
                        self.unet.upload_timesteps(b, &ts, &[t as f32], ub)?;
                        let mark = arena.mark();
                        let bd: &dyn Backend = b;
                        let mut fresh = None;
                        let key = ((arena.pool().0 as u64) << 32) | ub as u64;
                        bd.graph(key, &mut || {
                            arena.release(mark);
                            fresh = Some(
                                self.unet
                                    .forward_from_timesteps(&mut Cx::new(bd, &mut arena), &xin, &ts, &ctx_t, seq)?
                                    .out,
                            );
                            Ok(())
                        })?;
                        let out = match fresh {
                            Some(o) => *outs.entry(ub).or_insert(o),
                            None => *outs.get(&ub).context("internal: a U-Net graph replayed before it ran")?,
                        };
                        let pred = nhwc_to_nchw(&b.download(&out.t)?, ub, c, lh, lw);
                        check_finite(&pred, || format!("the U-Net's output at step {} (timestep {t})", si + 1))?;
                        for (j, &i) in part.iter().enumerate() {
                            let dst = &mut noise[pos(i) * per_image..(pos(i) + 1) * per_image];
                            let cnd = &pred[(mult - 1) * k * per_image + j * per_image..][..per_image];
                            if cfg_on {
                                let u = &pred[j * per_image..][..per_image];
                                for ((d, &u), &cv) in dst.iter_mut().zip(u).zip(cnd) {
                                    *d = u + r.guidance * (cv - u);
                                }
                            } else {
                                dst.copy_from_slice(cnd);
                            }
                        }
                        calls += 1;
                        progress(calls, total_calls)?;
                    }
                    latents = sched.step(&noise, si, &latents, &mut generator)?;
                    if let Some(ip) = &inpaint {
                        for &i in act {
                            let one = &mut latents[pos(i) * per_image..(pos(i) + 1) * per_image];
                            ip.blend(&sched, si, timesteps.len(), i, one)?;
                        }
                    }
                    for &i in act {
                        check_finite(&latents[pos(i) * per_image..(pos(i) + 1) * per_image], || {
                            format!("the latents after the scheduler's step {} (timestep {t})", si + 1)
                        })?;
                    }
                }
                timings.denoising_s += t1.elapsed().as_secs_f64();

                // 4. VAE decode, chunk by chunk, diffusers' postprocess to [0, 1], and out.
                let t2 = Instant::now();
                for part in act.chunks(chunk) {
                    let k = part.len();
                    let mut z = Vec::with_capacity(k * per_image);
                    for &i in part {
                        z.extend(latents[pos(i) * per_image..(pos(i) + 1) * per_image].iter().map(|x| x / sf));
                    }
                    vae_arena.reset();
                    let zt = Fmap::alloc(&mut vae_arena, k, lh, lw, c)?;
                    b.upload(&zt.t, &nchw_to_nhwc(&z, k, c, lh, lw))?;
                    let img = self.vae.decode(&mut Cx::new(b, &mut vae_arena), &zt)?;
                    let px = nhwc_to_nchw(&b.download(&img.t)?, k, out_c, h, w);
                    check_finite(&px, || {
                        "the VAE decoder's output (check the VAE's weights and scaling_factor)".into()
                    })?;
                    let px: Vec<f32> = px.iter().map(|x| (x / 2.0 + 0.5).clamp(0.0, 1.0)).collect();
                    let per_px = out_c * h * w;
                    for (j, &i) in part.iter().enumerate() {
                        on_image(GeneratedImage {
                            index: i,
                            image: &px[j * per_px..(j + 1) * per_px],
                            latents: &latents[pos(i) * per_image..(pos(i) + 1) * per_image],
                        })?;
                    }
                }
                timings.vae_decode_s += t2.elapsed().as_secs_f64();
            }
            Ok(())
        };
        let done = denoise_and_decode();
        timings.per_step_s = timings.denoising_s / ((steps - begin) * groups.len()).max(1) as f64;
        timings.unet_calls = calls;
        timings.graph_replays = b.graph_replays() - replays0;
        b.clear_graphs();
        let freed = b.free(arena.pool()).and_then(|_| b.free(vae_arena.pool()));
        done?;
        freed?;
        Ok(SampleSummary {
            text_embeds: emb,
            prompts: p,
            num_images_per_prompt: r.num_images_per_prompt,
            guidance: cfg_on,
            embed_dims: [seq, hidden],
            num_images: n,
            latent_shape: [n, c, lh, lw],
            image_shape: [out_c, h, w],
            timings,
            scheduler: kind,
        })
    }
}

/// One finished image of [`Pipeline::generate_each`].
pub struct GeneratedImage<'a> {
    /// Its index in the request (prompt `index / num_images_per_prompt`).
    pub index: usize,
    /// [C, H, W] in [0, 1].
    pub image: &'a [f32],
    /// Its final latents [C, h, w].
    pub latents: &'a [f32],
}

/// What [`Pipeline::generate_each`] reports besides the images.
pub struct SampleSummary {
    /// The text encoder's output for [prompts..., negatives...] (negatives only with guidance).
    pub text_embeds: Vec<f32>,
    pub prompts: usize,
    pub num_images_per_prompt: usize,
    pub guidance: bool,
    pub embed_dims: [usize; 2],
    pub num_images: usize,
    pub latent_shape: [usize; 4],
    /// [C, H, W] of each image.
    pub image_shape: [usize; 3],
    pub timings: Timings,
    pub scheduler: SchedulerKind,
}

impl SampleSummary {
    /// The U-Net's conditioning as diffusers' `prompt_embeds` after duplication: [negatives...,
    /// prompts...] (prompts only without guidance), one [77, hidden] row per image.
    pub fn prompt_embeds(&self) -> Vec<f32> {
        let row = self.embed_dims[0] * self.embed_dims[1];
        let mut v = Vec::new();
        let firsts: &[usize] = if self.guidance { &[self.prompts, 0] } else { &[0] };
        for &first in firsts {
            for i in 0..self.num_images {
                let at = (first + i / self.num_images_per_prompt) * row;
                v.extend_from_slice(&self.text_embeds[at..at + row]);
            }
        }
        v
    }

    pub fn prompt_embeds_shape(&self) -> [usize; 3] {
        [if self.guidance { 2 } else { 1 } * self.num_images, self.embed_dims[0], self.embed_dims[1]]
    }
}

/// The latent scaling factor divides the latents before decoding: 0, a negative or a non-finite
/// value turns every image black (or NaN) without an error.
pub fn check_scaling_factor(vae: &AutoencoderKL, dir: &Path) -> Result<()> {
    let sf = vae.config.scaling_factor;
    if !(sf.is_finite() && sf > 0.0) {
        bail!("{}: scaling_factor {sf}: must be a finite number greater than 0", dir.join("config.json").display());
    }
    Ok(())
}

/// Fails naming the stage whose values are not all finite (a broken weight file or setting turns
/// an image black or gray without it).
pub(crate) fn check_finite(v: &[f32], stage: impl FnOnce() -> String) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!("{} is non-finite ({} at index {i}): the weights or settings are broken", stage(), v[i]);
    }
    Ok(())
}

/// Reads `--latents-in`: a safetensors file with an f32 (or f16/bf16) tensor named `latents`.
pub fn read_latents(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let f = crate::io::safetensors::SafetensorsFile::open(path)?;
    let st = f.parse()?;
    let view = st.tensor("latents").map_err(|_| anyhow::anyhow!("{}: no tensor named 'latents'", path.display()))?;
    let dtype = crate::io::safetensors::float_dtype(view.dtype()).with_context(|| {
        format!("{}: tensor 'latents' has dtype {:?}; expected F32, F16 or BF16", path.display(), view.dtype())
    })?;
    let shape = view.shape().to_vec();
    if shape.len() != 4 {
        bail!("{}: tensor 'latents' has shape {shape:?}; expected [N, C, H/f, W/f]", path.display());
    }
    let mut v = vec![0f32; shape.iter().product()];
    crate::io::safetensors::to_f32(dtype, view.data(), &mut v)?;
    // Said here, naming the file: otherwise the U-Net's output is reported non-finite.
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        bail!("{}: tensor 'latents' holds a non-finite value ({}) at index {i}", path.display(), v[i]);
    }
    Ok((shape, v))
}

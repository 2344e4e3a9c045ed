//! Fine-tuning Stable Diffusion as RoentGen did: U-Net and CLIP text encoder trained jointly, VAE
//! frozen, MSE between the U-Net's prediction and the noise (or v), AdamW with fp32 master weights
//! (on the CPU the weights are fp32), global gradient-norm clipping.
//!
//! One optimizer step = zero the gradients; for each micro-batch: text encoder forward, DDPM
//! noising (`add_noise`), U-Net forward (saving activations), MSE, U-Net backward (parameters and
//! the text context), text-encoder backward; then the global norm, clipping, AdamW over the flat
//! parameter pools. Every pool is allocated once, before the first step.

pub mod bce;
pub mod checkpoint;
pub mod classifier;
pub mod data;
pub mod densenet;
pub mod job;
pub mod masks;
pub mod run;
pub mod schedule;
pub mod vae;

use crate::backend::Backend;
use crate::diag::SettingError;
use crate::dist::Dist;
use crate::models::text::{TextEncoder, TextGrads};
use crate::models::unet::{UNet, UNetParams};
use crate::nn::Cx;
use crate::nn::Fmap;
use crate::ops::elementwise::ConcatParams;
use crate::ops::optim::AdamWParams;
use crate::ops::random::AddNoiseParams;
pub use crate::tensor::nchw_to_nhwc;
use crate::tensor::{Arena, Layout, PoolId, Tensor};
use anyhow::{bail, Result};
use schedule::LrSchedule;

/// What the noise is compared with (the scheduler config's `prediction_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

/// Training keeps f32 activations: the backward kernels read f32 (issue 18: bf16 activations cover
/// sampling so far). Refuses a backend asked for bf16 (`--activations bf16`) before anything is
/// allocated, rather than training on f32 silently.
pub fn check_activations_for_training(b: &dyn Backend) -> Result<()> {
    anyhow::ensure!(
        b.activation_dtype() == crate::tensor::DType::F32,
        "training with --activations {}: not built yet (the backward passes read f32 activations); use --activations f32",
        b.activation_dtype()
    );
    Ok(())
}

/// Optimizer and loss settings; defaults are diffusers' train_text_to_image and the paper's lr.
#[derive(Clone, Debug)]
pub struct OptimOptions {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Global gradient-norm clipping (None: off).
    pub max_grad_norm: Option<f32>,
    pub train_text_encoder: bool,
    pub grad_accum: usize,
    pub schedule: LrSchedule,
    /// Recompute each U-Net block's internals in the backward instead of keeping them from the
    /// forward (`UNet::forward_saved`): less memory, the same gradients.
    pub gradient_checkpointing: bool,
}

impl OptimOptions {
    /// Refuses settings that would train the wrong way or turn the weights into NaN after a step
    /// (a negative or NaN learning rate, β outside [0, 1), ε ≤ 0, ...), naming the field.
    pub fn validate(&self) -> Result<()> {
        check_positive("lr", self.lr)?;
        for (field, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(SettingError::value(field, beta, "must be in [0, 1)"));
            }
        }
        check_positive("eps", self.eps)?;
        check_non_negative("weight_decay", self.weight_decay)?;
        if let Some(m) = self.max_grad_norm {
            check_positive("max_grad_norm", m)?;
        }
        if self.grad_accum == 0 || self.grad_accum > MAX_MICRO_BATCHES {
            let problem = format!("must be between 1 and {MAX_MICRO_BATCHES}");
            return Err(SettingError::value("grad_accum", self.grad_accum, problem));
        }
        Ok(())
    }
}

/// Most micro-batches per optimizer step: each is held in memory until the step runs.
pub const MAX_MICRO_BATCHES: usize = 65_536;

/// A finite number > 0, or an error naming `field`.
pub fn check_positive(field: &'static str, v: f32) -> Result<()> {
    if !(v.is_finite() && v > 0.0) {
        return Err(SettingError::value(field, v, "must be a finite number greater than 0"));
    }
    Ok(())
}

/// A finite number ≥ 0, or an error naming `field`.
pub fn check_non_negative(field: &'static str, v: f32) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        return Err(SettingError::value(field, v, "must be a finite number ≥ 0"));
    }
    Ok(())
}

impl Default for OptimOptions {
    fn default() -> Self {
        OptimOptions {
            lr: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: Some(1.0),
            train_text_encoder: true,
            grad_accum: 1,
            schedule: LrSchedule::Constant,
            gradient_checkpointing: false,
        }
    }
}

/// One micro-batch, on the host, in torch's layouts.
#[derive(Clone, Debug)]
pub struct Batch {
    /// [n, c, h, w]: VAE latents already multiplied by the scaling factor (what the U-Net sees).
    pub latents: Vec<f32>,
    pub latent_shape: [usize; 4],
    /// n × 77 token ids.
    pub input_ids: Vec<u32>,
    /// n × seq attention mask (1 for real tokens); used only by text encoders configured with
    /// `use_attention_mask`.
    pub attention_mask: Vec<u32>,
    /// The noise added to the latents.
    pub noise: Noise,
    /// n training timesteps in [0, num_train_timesteps).
    pub timesteps: Vec<usize>,
    /// An inpainting U-Net's extra inputs; None for an ordinary U-Net.
    pub inpaint: Option<InpaintInputs>,
}

/// What an inpainting U-Net (in_channels = 2 · latent channels + 1) sees beside the noisy
/// latents, concatenated as diffusers' inpainting training (and its inpainting pipeline) does:
/// `torch.cat([noisy_latents, mask, masked_latents], dim=1)`. NCHW, on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct InpaintInputs {
    /// [n, 1, h, w] at latent resolution: 1 where the image is repainted, 0 where it is kept.
    pub mask: Vec<f32>,
    /// [n, c, h, w]: the masked image's latents (scaled, like `Batch::latents`).
    pub masked_latents: Vec<f32>,
}

/// Where a micro-batch's noise comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Noise {
    /// [n, c, h, w] standard normal values from the caller (`train-step` batch files, and the
    /// parity tests, which feed PyTorch's); added on the host and uploaded.
    Given(Vec<f32>),
    /// Drawn on the backend, where the U-Net runs (`Backend::randn`, Philox4x32-10), one stream per
    /// sample: element i of stream (`seed`, `streams[j]`) is value i of sample j's U-Net input in
    /// its channels-last layout (h, w, c). Nothing but the clean latents crosses to the device.
    /// One stream per sample keys the noise by the sample, not by its place in a micro-batch (see
    /// `run`: N ranks, or `--grad-accum N`, draw what one batch N times larger draws).
    Philox { seed: u64, streams: Vec<u64> },
}

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct StepStats {
    pub step: usize,
    pub loss: f32,
    pub grad_norm: f32,
    pub lr: f32,
}

/// The end of an optimizer step over one or more models' flat pools: the global gradient norm
/// (before clipping), torch's `clip_grad_norm_` scaling, the learning rate of `step` (1-based) and
/// AdamW. A non-finite norm stops the run. Returns (gradient norm, learning rate).
pub(crate) fn clip_and_step(
    b: &dyn Backend,
    states: &[&OptState],
    sumsq: &Tensor,
    o: &OptimOptions,
    step: usize,
    total_steps: usize,
) -> Result<(f32, f32)> {
    let mut total = 0f64;
    for st in states {
        b.sum_squares(sumsq, &st.grads, st.len)?;
        total += b.download(sumsq)?[0] as f64;
    }
    let grad_norm = total.sqrt() as f32;
    if !grad_norm.is_finite() {
        bail!("the gradient norm is {grad_norm} at step {step}: stopping");
    }
    if let Some(max) = o.max_grad_norm {
        let coef = (max / (grad_norm + 1e-6)).min(1.0);
        for st in states {
            b.scale(&st.grads, coef, st.len)?;
        }
    }
    let lr = o.schedule.lr(o.lr, step - 1, total_steps);
    for st in states {
        let p = AdamWParams {
            n: st.len,
            lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            step,
        };
        b.adamw_step(&p, &st.params(), &st.grads, &st.m, &st.v)?;
    }
    Ok((grad_norm, lr))
}

/// A model's optimizer state: gradients and AdamW moments laid out like its parameters.
pub(crate) struct OptState {
    pub(crate) params_pool: PoolId,
    pub(crate) len: usize,
    pub(crate) grads: Tensor,
    pub(crate) m: Tensor,
    pub(crate) v: Tensor,
}

impl OptState {
    pub(crate) fn new(b: &mut dyn Backend, table: &Layout, grads_pool: PoolId, label: &str) -> Result<OptState> {
        let len = table.total();
        let whole = |pool| Tensor::new(pool, 0, [len].into());
        let m = b.alloc(len, &format!("{label}.adam_m"))?;
        let v = b.alloc(len, &format!("{label}.adam_v"))?;
        Ok(OptState { params_pool: table.pool(), len, grads: whole(grads_pool), m: whole(m), v: whole(v) })
    }

    pub(crate) fn params(&self) -> Tensor {
        Tensor::new(self.params_pool, 0, [self.len].into())
    }
}

pub struct Trainer {
    pub options: OptimOptions,
    pub alphas_cumprod: Vec<f32>,
    pub prediction_type: PredictionType,
    unet_grads: UNetParams,
    unet_opt: OptState,
    clip_grads: Option<TextGrads>,
    clip_opt: Option<OptState>,
    /// The text encoder's forward activations and backward temporaries, emptied after each step.
    clip_arena: Arena,
    /// Tokens per prompt.
    seq: usize,
    arena: Arena,
    /// (sample, context, context gradient, output gradient) at the bottom of `arena`.
    io: (Fmap, Tensor, Tensor, Fmap),
    side: Layout,
    pub micro_batch: usize,
    /// Optimizer steps taken (AdamW's t).
    pub step: usize,
    /// EMA of the U-Net weights: (the table in the EMA pool, maximum decay).
    ema: Option<(Layout, f32)>,
}

/// The shape of one micro-batch: `size` latents of (h, w), each with a caption of `seq` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MicroBatchShape {
    pub size: usize,
    pub h: usize,
    pub w: usize,
    pub seq: usize,
}

impl Trainer {
    /// Allocates every buffer for micro-batches of `shape`.
    pub fn new(
        b: &mut dyn Backend,
        unet: &UNet,
        clip: &TextEncoder,
        options: OptimOptions,
        alphas_cumprod: Vec<f32>,
        prediction_type: PredictionType,
        shape: MicroBatchShape,
    ) -> Result<Trainer> {
        let MicroBatchShape { size: micro_batch, h, w, seq } = shape;
        let (c_in, c_out) = (unet.config.in_channels, unet.config.out_channels);
        if c_in != c_out && c_in != 2 * c_out + 1 {
            bail!(
                "the U-Net takes {c_in} input channels and predicts {c_out}: training needs in_channels equal to \
                 out_channels, or 2 × out_channels + 1 (an inpainting U-Net: latents, mask, masked-image latents)"
            );
        }
        if clip.hidden_size() != unet.config.cross_attention_dim {
            bail!(
                "text encoder hidden_size {} does not match the U-Net's cross_attention_dim {}",
                clip.hidden_size(),
                unet.config.cross_attention_dim
            );
        }
        check_activations_for_training(b)?;
        let (unet_grads, ugt) = unet.allocate_grads(b)?;
        let unet_opt = OptState::new(b, &unet.table, ugt.pool(), "unet")?;
        let (clip_grads, clip_opt) = if options.train_text_encoder {
            let (g, t) = clip.allocate_grads(b)?;
            (Some(g), Some(OptState::new(b, clip.table(), t.pool(), "text_encoder")?))
        } else {
            (None, None)
        };
        let clip_arena = clip.allocate_arena(b, micro_batch, seq, options.train_text_encoder)?;
        let cap = unet.plan_training(micro_batch, h, w, seq, options.gradient_checkpointing)?;
        let mut arena = Arena::new(b.alloc(cap, "unet.training")?, cap);
        let sample = Fmap::alloc(&mut arena, micro_batch, h, w, unet.config.in_channels)?;
        let ctx = arena.alloc([micro_batch * seq, unet.config.cross_attention_dim])?;
        let dctx = arena.alloc(ctx.shape)?;
        let dout = Fmap::alloc(&mut arena, micro_batch, h, w, unet.config.out_channels)?;
        let n = dout.numel();
        // An inpainting U-Net's input is assembled from the noisy latents and the conditioning
        // (mask, masked-image latents), each kept here, then concatenated by channel.
        let cond = sample.numel() - n;
        let side_pool = b.alloc(n + if cond > 0 { n + cond } else { 0 } + 64, "train.side")?;
        let mut side = Layout::new(side_pool);
        side.tensor("target", [n]);
        side.tensor("loss", [1]);
        side.tensor("sumsq", [1]);
        if cond > 0 {
            side.tensor("noisy", [n]);
            side.tensor("inpaint_cond", [cond]);
        }
        Ok(Trainer {
            options,
            alphas_cumprod,
            prediction_type,
            unet_grads,
            unet_opt,
            clip_grads,
            clip_opt,
            clip_arena,
            seq,
            arena,
            io: (sample, ctx, dctx, dout),
            side,
            micro_batch,
            step: 0,
            ema: None,
        })
    }

    /// Keeps an exponential moving average of the U-Net's weights, as diffusers' EMAModel with
    /// `decay` (update_after_step 0, no EMA warmup: decay_t = min(decay, (1 + t) / (10 + t)) with
    /// t = optimizer step − 1, and 0 at the first step). Starts from the current weights.
    pub fn enable_ema(&mut self, b: &mut dyn Backend, unet: &UNet, decay: f32) -> Result<()> {
        let pool = b.alloc(unet.table.total(), "unet.ema")?;
        let table = unet.table.rebind(pool);
        let whole = Tensor::new(pool, 0, [unet.table.total()].into());
        b.zero(&whole)?;
        b.accumulate(&whole, &self.unet_opt.params(), unet.table.total())?;
        self.ema = Some((table, decay));
        Ok(())
    }

    /// The EMA weights' table (bound to the EMA pool), if enabled.
    pub fn ema_table(&self) -> Option<&Layout> {
        self.ema.as_ref().map(|(t, _)| t)
    }

    fn ema_update(&self, b: &dyn Backend) -> Result<()> {
        if let Some((table, max_decay)) = &self.ema {
            let t = self.step.saturating_sub(1);
            let decay = if t == 0 { 0.0 } else { ((1.0 + t as f64) / (10.0 + t as f64)).min(*max_decay as f64) };
            let whole = Tensor::new(table.pool(), 0, [table.total()].into());
            b.lerp(&whole, &self.unet_opt.params(), table.total(), (1.0 - decay) as f32)?;
        }
        Ok(())
    }

    fn side(&self, name: &str) -> Tensor {
        let e = self.side.find(name).expect("side buffer");
        Tensor::new(self.side.pool(), e.offset, e.shape)
    }

    /// (√ᾱ_t, √(1 − ᾱ_t)) in f32, as diffusers' `add_noise` computes them.
    fn noise_coefs(&self, t: usize) -> Result<(f32, f32)> {
        let ac = *self.alphas_cumprod.get(t).ok_or_else(|| {
            anyhow::anyhow!("timestep {t} outside the {} training timesteps", self.alphas_cumprod.len())
        })?;
        Ok((ac.powf(0.5), (1.0 - ac).powf(0.5)))
    }

    /// diffusers' `DDPMScheduler.add_noise` (f32) and the loss target for one micro-batch with
    /// given noise: (noisy latents, target), both NCHW. (Philox noise is added on the backend.)
    pub fn noisy_and_target(&self, batch: &Batch) -> Result<(Vec<f32>, Vec<f32>)> {
        let [n, c, h, w] = batch.latent_shape;
        let per = c * h * w;
        let Noise::Given(noise) = &batch.noise else {
            bail!("noisy_and_target: the batch's noise is drawn on the backend, not given");
        };
        let mut noisy = vec![0f32; n * per];
        let mut target = vec![0f32; n * per];
        for i in 0..n {
            let (sa, s1a) = self.noise_coefs(batch.timesteps[i])?;
            for j in i * per..(i + 1) * per {
                let (x0, e) = (batch.latents[j], noise[j]);
                noisy[j] = sa * x0 + s1a * e;
                target[j] = match self.prediction_type {
                    PredictionType::Epsilon => e,
                    PredictionType::VPrediction => sa * e - s1a * x0,
                };
            }
        }
        Ok((noisy, target))
    }

    /// One optimizer step over `micro_batches` (gradient accumulation: the loss is averaged), as
    /// one of `dist`'s ranks (`Dist::single()` alone), each with its own `micro_batches` (the same
    /// number on every rank): every micro-batch's gradient is scaled by 1/(micro-batches × ranks),
    /// the gradient pools are summed over ranks once, and the loss (whose sum is non-finite on
    /// every rank when it is on one) is averaged over all; clipping, AdamW and EMA then run on
    /// identical values on every rank. Returns the mean loss, the gradient norm before clipping
    /// and the learning rate used.
    pub fn train_step(
        &mut self,
        b: &dyn Backend,
        unet: &UNet,
        clip: &TextEncoder,
        micro_batches: &[Batch],
        total_steps: usize,
        dist: &Dist,
    ) -> Result<StepStats> {
        if micro_batches.is_empty() {
            bail!("train_step: no micro-batches");
        }
        b.zero(&self.unet_opt.grads)?;
        if let Some(o) = &self.clip_opt {
            b.zero(&o.grads)?;
        }
        let parts = micro_batches.len() * dist.size();
        let inv_parts = 1.0 / parts as f32;
        let mut loss_sum = 0f64;
        for mb in micro_batches {
            loss_sum += self.micro_step(b, unet, clip, mb, inv_parts)? as f64;
        }
        let states: Vec<&OptState> = std::iter::once(&self.unet_opt).chain(self.clip_opt.as_ref()).collect();
        let loss = (dist.sum_f64(loss_sum) / parts as f64) as f32;
        if !loss.is_finite() {
            bail!("the loss is {loss} at step {}: stopping", self.step + 1);
        }
        for st in &states {
            dist.sum_tensor(b, &st.grads)?;
        }
        let (grad_norm, lr) =
            clip_and_step(b, &states, &self.side("sumsq"), &self.options, self.step + 1, total_steps)?;
        self.step += 1;
        self.ema_update(b)?;
        Ok(StepStats { step: self.step, loss, grad_norm, lr })
    }

    fn micro_step(
        &mut self,
        b: &dyn Backend,
        unet: &UNet,
        clip: &TextEncoder,
        mb: &Batch,
        inv_accum: f32,
    ) -> Result<f32> {
        let [n, c, h, w] = mb.latent_shape;
        let (sample, ctx, dctx, dout) = self.io;
        if n != self.micro_batch || (h, w, c) != (sample.h, sample.w, dout.c) {
            bail!(
                "micro-batch of shape {:?}; the trainer was built for [{}, {}, {}, {}]",
                mb.latent_shape,
                self.micro_batch,
                dout.c,
                sample.h,
                sample.w
            );
        }
        let inpainting = sample.c != c;
        match &mb.inpaint {
            None if inpainting => bail!(
                "this U-Net is an inpainting one ({} input channels): each micro-batch needs a mask and the masked \
                 image's latents",
                sample.c
            ),
            Some(_) if !inpainting => {
                bail!("a micro-batch carries inpainting inputs, but the U-Net is not an inpainting one")
            }
            Some(ip) if ip.mask.len() != n * h * w || ip.masked_latents.len() != n * c * h * w => bail!(
                "micro-batch: {} mask values and {} masked-latent values for {n} samples of [{c}, {h}, {w}]",
                ip.mask.len(),
                ip.masked_latents.len()
            ),
            _ => {}
        }
        let seq = self.seq;
        let given = match &mb.noise {
            Noise::Given(v) => v.len(),
            Noise::Philox { .. } => mb.latents.len(),
        };
        if mb.input_ids.len() != n * seq
            || mb.attention_mask.len() != n * seq
            || mb.latents.len() != n * c * h * w
            || given != mb.latents.len()
            || mb.timesteps.len() != n
        {
            bail!(
                "micro-batch: {} ids, {} latent values, {given} noise values, {} timesteps for {n} samples",
                mb.input_ids.len(),
                mb.latents.len(),
                mb.timesteps.len()
            );
        }
        self.clip_arena.release_all_to(0);
        let clip_acts =
            clip.forward(&mut Cx::new(b, &mut self.clip_arena), &mb.input_ids, &mb.attention_mask, n, seq)?;
        let hidden = clip.last_hidden_state(&clip_acts)?;
        let tgt = self.side("target");
        let per = c * h * w;
        // Where the noisy latents go: the U-Net's input itself, or beside it for an inpainting one.
        let noisy_t = if inpainting { self.side("noisy") } else { sample.t };
        match &mb.noise {
            Noise::Given(_) => {
                let (noisy, target) = self.noisy_and_target(mb)?;
                b.upload(&noisy_t, &nchw_to_nhwc(&noisy, n, c, h, w))?;
                b.upload(&tgt, &nchw_to_nhwc(&target, n, c, h, w))?;
            }
            Noise::Philox { seed, streams } => {
                if streams.len() != n {
                    bail!("train_step: {} noise streams for {n} samples", streams.len());
                }
                b.upload(&noisy_t, &nchw_to_nhwc(&mb.latents, n, c, h, w))?;
                let v = self.prediction_type == PredictionType::VPrediction;
                for (i, &t) in mb.timesteps.iter().enumerate() {
                    let (sa, s1a) = self.noise_coefs(t)?;
                    let at = |x: &Tensor| Tensor::new(x.pool, x.offset + i * per, [per].into());
                    b.randn(&at(&tgt), per, *seed, streams[i])?;
                    let p = AddNoiseParams { n: per, sqrt_alpha: sa, sqrt_one_minus_alpha: s1a, v_prediction: v };
                    b.ddpm_add_noise(&p, &at(&noisy_t), &at(&tgt))?;
                }
            }
        }
        if let Some(ip) = &mb.inpaint {
            // [mask | masked latents] per sample, then channels-last, then [noisy | that].
            let mut cond = Vec::with_capacity(n * (c + 1) * h * w);
            for i in 0..n {
                cond.extend_from_slice(&ip.mask[i * h * w..(i + 1) * h * w]);
                cond.extend_from_slice(&ip.masked_latents[i * per..(i + 1) * per]);
            }
            let cond_t = self.side("inpaint_cond");
            b.upload(&cond_t, &nchw_to_nhwc(&cond, n, c + 1, h, w))?;
            let p = ConcatParams { rows: n * h * w, a_channels: c, b_channels: c + 1 };
            b.concat_channels_forward(&p, &sample.t, &noisy_t, &cond_t)?;
        }
        b.zero(&ctx)?;
        b.accumulate(&ctx, &hidden, ctx.numel())?;
        b.zero(&dctx)?;
        let base = self.arena.mark();
        self.arena.set_keep(!self.options.gradient_checkpointing);
        let ts: Vec<f32> = mb.timesteps.iter().map(|&t| t as f32).collect();
        let saved = unet.forward_saved(&mut Cx::new(b, &mut self.arena), &sample, &ts, &ctx, seq);
        self.arena.set_keep(false);
        let saved = saved?;
        let loss_t = self.side("loss");
        b.mse_loss(&dout.t, &loss_t, &saved.out.t, &tgt, dout.numel())?;
        if inv_accum != 1.0 {
            b.scale(&dout.t, inv_accum, dout.numel())?;
        }
        unet.backward(&self.unet_grads, &mut Cx::new(b, &mut self.arena), &saved, &dout, &dctx, None)?;
        self.arena.release_all_to(base);
        if let Some(g) = &self.clip_grads {
            clip.backward(
                &mut Cx::new(b, &mut self.clip_arena),
                g,
                &clip_acts,
                &dctx,
                &mb.input_ids,
                &mb.attention_mask,
            )?;
        }
        Ok(b.download(&loss_t)?[0])
    }

    /// Restores AdamW moments saved by a checkpoint (names "unet.exp_avg", ...) and the step count.
    pub fn restore(&mut self, b: &dyn Backend, moments: &[(String, Vec<f32>)], step: usize) -> Result<()> {
        let find = |name: String| moments.iter().find(|(n, _)| *n == name).map(|(_, v)| v);
        for (name, o) in
            std::iter::once(("unet", &self.unet_opt)).chain(self.clip_opt.as_ref().map(|o| ("text_encoder", o)))
        {
            for (suffix, t) in [("exp_avg", o.m), ("exp_avg_sq", o.v)] {
                let v = find(format!("{name}.{suffix}"))
                    .ok_or_else(|| anyhow::anyhow!("the checkpoint has no optimizer state '{name}.{suffix}'"))?;
                if v.len() != o.len {
                    bail!("optimizer state '{name}.{suffix}' has {} values; this model needs {}", v.len(), o.len);
                }
                b.upload(&t, v)?;
            }
        }
        self.step = step;
        Ok(())
    }

    /// The AdamW moments of (U-Net, text encoder), for checkpoints.
    /// The weights this trainer changes, by name: the U-Net's, the text encoder's when trained,
    /// the EMA copy when kept (what must stay identical on every rank).
    pub fn trained_weights(&self) -> Vec<(&'static str, Tensor)> {
        let mut v = vec![("unet", self.unet_opt.params())];
        if let Some(o) = &self.clip_opt {
            v.push(("text_encoder", o.params()));
        }
        if let Some((table, _)) = &self.ema {
            v.push(("unet_ema", Tensor::new(table.pool(), 0, [table.total()].into())));
        }
        v
    }

    pub fn optimizer_pools(&self) -> Vec<(&'static str, Tensor, Tensor)> {
        let mut v = vec![("unet", self.unet_opt.m, self.unet_opt.v)];
        if let Some(o) = &self.clip_opt {
            v.push(("text_encoder", o.m, o.v));
        }
        v
    }
}

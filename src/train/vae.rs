//! Training the VAE (`roentgen train-vae`): reconstruction MSE plus a small KL term, as the
//! AutoencoderKL is trained without its adversarial loss:
//!
//!   loss = mean((decode(z) − x)²) + kl_weight · mean_b KL_b,
//!   z = mean + exp(logvar / 2) · ε,  KL_b = ½ Σ (mean² + exp(logvar) − 1 − logvar)
//!
//! with logvar clamped to [−30, 20] as diffusers' DiagonalGaussianDistribution does (no gradient
//! through the clamp where it binds). The reparameterisation and the KL term are computed on the
//! host: they touch only the latents.

use super::{nchw_to_nhwc, OptState, OptimOptions};
use crate::backend::plan::PlanBackend;
use crate::backend::Backend;
use crate::diag::SettingError;
use crate::models::vae::{AutoencoderKL, VaeParams};
use crate::models::Component;
use crate::nn::Cx;
use crate::nn::Fmap;
use crate::tensor::{Arena, Layout, Tensor};
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct VaeStats {
    pub step: usize,
    pub loss: f32,
    pub rec_loss: f32,
    pub kl: f32,
    pub grad_norm: f32,
    pub lr: f32,
}

pub struct VaeTrainer {
    pub options: OptimOptions,
    pub kl_weight: f32,
    pub grads: VaeParams,
    pub grad_table: Layout,
    opt: OptState,
    arena: Arena,
    /// (image, reconstruction gradient, latent sample, its gradient, moments gradient)
    io: (Fmap, Fmap, Fmap, Fmap, Fmap),
    side: Tensor,
    pub batch: usize,
    pub step: usize,
}

impl VaeTrainer {
    pub fn new(
        b: &mut dyn Backend,
        vae: &AutoencoderKL,
        options: OptimOptions,
        kl_weight: f32,
        batch: usize,
        res: usize,
    ) -> Result<VaeTrainer> {
        let f = vae.config.scale_factor();
        if res % f != 0 {
            bail!("resolution {res} is not a multiple of the VAE's scale factor {f}");
        }
        let (grads, grad_table) = vae.allocate_grads(b)?;
        let opt = OptState::new(b, &vae.table, grad_table.pool(), "vae")?;
        let zc = vae.config.latent_channels;
        let build = |arena: &mut Arena| -> Result<(Fmap, Fmap, Fmap, Fmap, Fmap)> {
            let x = Fmap::alloc(arena, batch, res, res, vae.config.in_channels)?;
            let drec = Fmap::alloc(arena, batch, res, res, vae.config.out_channels)?;
            let z = Fmap::alloc(arena, batch, res / f, res / f, zc)?;
            let dz = Fmap::alloc(arena, batch, res / f, res / f, zc)?;
            let dm = Fmap::alloc(arena, batch, res / f, res / f, 2 * zc)?;
            Ok((x, drec, z, dz, dm))
        };
        // Plan: both forwards keeping their activations, then both backwards.
        let plan = PlanBackend::new();
        let mut pa = Arena::planning();
        let (x, drec, z, dz, dm) = build(&mut pa)?;
        pa.set_keep(true);
        let enc = vae.encode_saved(&mut Cx::new(&plan, &mut pa), &x)?;
        let dec = vae.decode_saved(&mut Cx::new(&plan, &mut pa), &z)?;
        pa.set_keep(false);
        vae.decode_backward(&vae.params, &mut Cx::new(&plan, &mut pa), &dec, &drec, &dz)?;
        vae.encode_backward(&vae.params, &mut Cx::new(&plan, &mut pa), &enc, &dm, None)?;
        let cap = pa.peak();
        let mut arena = Arena::new(b.alloc(cap, "vae.training")?, cap);
        let io = build(&mut arena)?;
        let side_pool = b.alloc(16, "vae.side")?;
        let side = Tensor::new(side_pool, 0, [2].into());
        Ok(VaeTrainer { options, kl_weight, grads, grad_table, opt, arena, io, side, batch, step: 0 })
    }

    /// Zeroes the gradients and accumulates those of one batch: `images` [n, 3, r, r] in [−1, 1],
    /// `eps` [n, latent, r/f, r/f] standard normal. Returns (loss, reconstruction MSE, mean KL).
    pub fn compute_grads(
        &mut self,
        b: &dyn Backend,
        vae: &AutoencoderKL,
        images: &[f32],
        eps: &[f32],
    ) -> Result<(f32, f32, f32)> {
        let (x, drec, z, dz, dm) = self.io;
        if images.len() != x.numel() || eps.len() != z.numel() {
            bail!(
                "vae batch: {} image values and {} noise values; expected {} and {}",
                images.len(),
                eps.len(),
                x.numel(),
                z.numel()
            );
        }
        b.zero(&self.opt.grads)?;
        let n = x.batch;
        b.upload(&x.t, &nchw_to_nhwc(images, n, x.c, x.h, x.w))?;
        let base = self.arena.mark();
        self.arena.set_keep(true);
        let result = (|| -> Result<(f32, f32, f32)> {
            let enc = vae.encode_saved(&mut Cx::new(b, &mut self.arena), &x)?;
            // Host: reparameterisation and KL on channels-last moments [n, h, w, 2·zc].
            let zc = z.c;
            let moments = b.download(&enc.moments.t)?;
            let eps_nhwc = nchw_to_nhwc(eps, n, zc, z.h, z.w);
            let mut zv = vec![0f32; z.numel()];
            let mut kl = 0f64;
            for (i, px) in moments.chunks_exact(2 * zc).enumerate() {
                for c in 0..zc {
                    let (m, lv) = (px[c], px[zc + c].clamp(-30.0, 20.0));
                    zv[i * zc + c] = m + (0.5 * lv).exp() * eps_nhwc[i * zc + c];
                    kl += 0.5 * (m as f64 * m as f64 + (lv as f64).exp() - 1.0 - lv as f64);
                }
            }
            let kl = (kl / n as f64) as f32;
            b.upload(&z.t, &zv)?;
            let dec = vae.decode_saved(&mut Cx::new(b, &mut self.arena), &z)?;
            b.mse_loss(&drec.t, &self.side, &dec.out.t, &x.t, x.numel())?;
            let rec = b.download(&self.side)?[0];
            self.arena.set_keep(false);
            b.zero(&dz.t)?;
            vae.decode_backward(&self.grads, &mut Cx::new(b, &mut self.arena), &dec, &drec, &dz)?;
            let dzv = b.download(&dz.t)?;
            let kw = self.kl_weight / n as f32;
            let mut dmv = vec![0f32; dm.numel()];
            for (i, px) in moments.chunks_exact(2 * zc).enumerate() {
                for c in 0..zc {
                    let (m, raw) = (px[c], px[zc + c]);
                    let lv = raw.clamp(-30.0, 20.0);
                    let g = dzv[i * zc + c];
                    dmv[i * 2 * zc + c] = g + kw * m;
                    let inside = raw == lv; // the clamp passes no gradient where it binds
                    dmv[i * 2 * zc + zc + c] = if inside {
                        g * eps_nhwc[i * zc + c] * 0.5 * (0.5 * lv).exp() + kw * 0.5 * (lv.exp() - 1.0)
                    } else {
                        0.0
                    };
                }
            }
            b.upload(&dm.t, &dmv)?;
            vae.encode_backward(&self.grads, &mut Cx::new(b, &mut self.arena), &enc, &dm, None)?;
            Ok((rec + self.kl_weight * kl, rec, kl))
        })();
        self.arena.set_keep(false);
        self.arena.release_all_to(base);
        result
    }

    /// The AdamW moments (for checkpoints) and a restore for `--resume`.
    pub fn optimizer_pools(&self) -> Vec<(&'static str, Tensor, Tensor)> {
        vec![("vae", self.opt.m, self.opt.v)]
    }

    pub fn restore(&mut self, b: &dyn Backend, moments: &[(String, Vec<f32>)], step: usize) -> Result<()> {
        for (suffix, t) in [("exp_avg", self.opt.m), ("exp_avg_sq", self.opt.v)] {
            let v = moments
                .iter()
                .find(|(n, _)| *n == format!("vae.{suffix}"))
                .map(|(_, v)| v)
                .ok_or_else(|| anyhow::anyhow!("the checkpoint has no optimizer state 'vae.{suffix}'"))?;
            if v.len() != self.opt.len {
                bail!("optimizer state 'vae.{suffix}' has {} values; this VAE needs {}", v.len(), self.opt.len);
            }
            b.upload(&t, v)?;
        }
        self.step = step;
        Ok(())
    }

    /// One AdamW step on a batch (global-norm clipping as the U-Net trainer).
    pub fn train_step(
        &mut self,
        b: &dyn Backend,
        vae: &AutoencoderKL,
        images: &[f32],
        eps: &[f32],
        total_steps: usize,
    ) -> Result<VaeStats> {
        let (loss, rec, kl) = self.compute_grads(b, vae, images, eps)?;
        if !loss.is_finite() {
            bail!("the VAE loss is {loss} at step {}: stopping", self.step + 1);
        }
        let sumsq = Tensor { shape: [1].into(), ..self.side };
        let (grad_norm, lr) = super::clip_and_step(b, &[&self.opt], &sumsq, &self.options, self.step + 1, total_steps)?;
        self.step += 1;
        Ok(VaeStats { step: self.step, loss, rec_loss: rec, kl, grad_norm, lr })
    }
}

/// `roentgen train-vae` settings.
#[derive(Clone, Debug)]
pub struct TrainVaeConfig {
    /// A VAE folder or a pipeline folder (its vae/) to fine-tune, or None with `config`.
    pub model: Option<std::path::PathBuf>,
    /// A VAE config.json to train from scratch (PyTorch's default initialisation).
    pub config: Option<std::path::PathBuf>,
    pub data: std::path::PathBuf,
    pub output: std::path::PathBuf,
    pub resolution: usize,
    pub batch_size: usize,
    pub steps: usize,
    pub seed: u64,
    pub optim: OptimOptions,
    pub kl_weight: f32,
    pub checkpoint_every: usize,
    pub log_every: usize,
    pub resume: bool,
    pub overwrite: bool,
    pub on_bad_image: super::data::OnBadImage,
    pub verify_images: bool,
    pub checkpoints_total_limit: Option<usize>,
    pub allow_changed_settings: bool,
}

impl TrainVaeConfig {
    /// The settings that shape a run's results, keyed like their flags (compared on `--resume`).
    pub fn settings(&self) -> serde_json::Value {
        serde_json::json!({"seed": self.seed, "data": super::run::abs_path(&self.data), "resolution": self.resolution,
            "batch_size": self.batch_size, "lr": self.optim.lr, "kl_weight": self.kl_weight,
            "max_grad_norm": self.optim.max_grad_norm.unwrap_or(0.0)})
    }
}

/// Runs `roentgen train-vae`; returns the last checkpoint (a VAE component folder).
pub fn train_vae(
    b: &mut dyn Backend,
    cfg: &TrainVaeConfig,
    log: &mut dyn FnMut(&VaeStats),
) -> Result<std::path::PathBuf> {
    use crate::models::vae::VaeConfig;
    use crate::rng::splitmix::SplitMix64;
    use anyhow::Context;
    if cfg.resolution == 0 || cfg.resolution > super::run::MAX_RESOLUTION {
        let problem = format!("must be between 1 and {}", super::run::MAX_RESOLUTION);
        return Err(SettingError::value("resolution", cfg.resolution, problem));
    }
    if cfg.batch_size == 0 || cfg.batch_size > super::run::MAX_BATCH || cfg.steps == 0 {
        let problem = format!("must be positive (the batch size at most {})", super::run::MAX_BATCH);
        return Err(SettingError::fields(&["batch_size", "steps"], problem));
    }
    cfg.optim.validate()?;
    super::check_non_negative("kl_weight", cfg.kl_weight)?;
    if cfg.checkpoints_total_limit == Some(0) {
        return Err(SettingError::value("checkpoints_total_limit", 0, "must be at least 1"));
    }
    let out = super::job::OutputFolder::open(&cfg.output, cfg.resume, cfg.overwrite, "train-vae")?;
    let resume_from = if cfg.resume { Some(super::checkpoint::latest(&out.dir)?) } else { None };
    if let Some(ck) = &resume_from {
        let (state, _) = super::checkpoint::read_state(ck)?;
        super::job::check_resume_settings(ck, &state, &cfg.settings(), cfg.allow_changed_settings)?;
    }
    // The model: a checkpoint to resume, a VAE (or pipeline) to fine-tune, or a config from scratch.
    let (vae, config_json) = if let Some(ck) = &resume_from {
        (AutoencoderKL::load(b, ck, None)?.0, crate::io::weights::read_json(&ck.join("config.json"))?)
    } else if let Some(m) = &cfg.model {
        let dir = if crate::io::weights::is_pipeline_folder(m) {
            crate::io::weights::component_dir(m, "vae")?
        } else {
            m.clone()
        };
        (AutoencoderKL::load(b, &dir, None)?.0, crate::io::weights::read_json(&dir.join("config.json"))?)
    } else if let Some(c) = &cfg.config {
        let v = AutoencoderKL::allocate(b, VaeConfig::from_file(c)?)?;
        crate::models::init_default(b, &v.table, cfg.seed)?;
        (v, crate::io::weights::read_json(c)?)
    } else {
        bail!("give $model (a VAE or pipeline folder to fine-tune) or $config (a VAE config to train from scratch)");
    };
    let good = super::job::usable_rows(
        &cfg.data,
        crate::io::manifest::read_manifest(&cfg.data)?,
        cfg.on_bad_image,
        cfg.verify_images.then_some(cfg.resolution),
    )?;
    let mut draw = super::job::ImageDraw::new(&good, &cfg.data, cfg.on_bad_image, cfg.resolution);
    let mut tr = VaeTrainer::new(b, &vae, cfg.optim.clone(), cfg.kl_weight, cfg.batch_size, cfg.resolution)?;
    if let Some(ck) = &resume_from {
        let (state, moments) = super::checkpoint::read_state(ck)?;
        let step = state.get("step").and_then(|v| v.as_u64()).context("trainer.json: no step")? as usize;
        tr.restore(b, &moments, step)?;
    }
    let f = vae.config.scale_factor();
    let per_eps = vae.config.latent_channels * (cfg.resolution / f) * (cfg.resolution / f);
    let mut log_file = super::job::TrainLog::open(&out.dir.join("train_vae_log.jsonl"), tr.step)?;
    let mut last = resume_from.clone();
    let n = good.len();
    let mut run = || -> Result<()> {
        while tr.step < cfg.steps {
            let step = tr.step + 1;
            let mut rng = SplitMix64::new(cfg.seed ^ (step as u64).wrapping_mul(0xA24B_AED4_963E_E407));
            let mut images = Vec::with_capacity(cfg.batch_size * 3 * cfg.resolution * cfg.resolution);
            for k in 0..cfg.batch_size {
                let counter = (step - 1) * cfg.batch_size + k;
                let idx = super::run::permutation(n, cfg.seed, (counter / n) as u64)[counter % n];
                images.extend(draw.load(idx)?.1);
            }
            let eps: Vec<f32> = (0..cfg.batch_size * per_eps).map(|_| rng.next_normal()).collect();
            let s = tr.train_step(b, &vae, &images, &eps, cfg.steps)?;
            if s.step % cfg.log_every.max(1) == 0 || s.step == cfg.steps {
                log_file.append(&serde_json::to_value(s)?)?;
            }
            log(&s);
            if (cfg.checkpoint_every > 0 && s.step % cfg.checkpoint_every == 0) || s.step == cfg.steps {
                let dest = cfg.output.join(format!("checkpoint-{}", s.step));
                let mut state = cfg.settings();
                state["step"] = s.step.into();
                state["loss"] = serde_json::json!(s.loss);
                super::checkpoint::save_component(b, &dest, &config_json, &vae.table, &tr.optimizer_pools(), &state)?;
                last = Some(dest);
                super::job::retain_checkpoints(&cfg.output, cfg.checkpoints_total_limit)?;
            }
        }
        Ok(())
    };
    run().map_err(|e| super::job::with_checkpoint_note(e, last.as_deref()))?;
    last.context("no step was run (the checkpoint is already at $steps)")
}

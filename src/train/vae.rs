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
use crate::models::vae::{AutoencoderKL, VaeParams};
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
        let enc = vae.encode_saved(&plan, &mut pa, &x)?;
        let dec = vae.decode_saved(&plan, &mut pa, &z)?;
        pa.set_keep(false);
        vae.decode_backward(&vae.params, &plan, &mut pa, &dec, &drec, &dz)?;
        vae.encode_backward(&vae.params, &plan, &mut pa, &enc, &dm, None)?;
        let cap = pa.peak();
        let mut arena = Arena::new(b.alloc(cap, "vae.training")?, cap);
        let io = build(&mut arena)?;
        let side_pool = b.alloc(16, "vae.side")?;
        let side = Tensor { pool: side_pool, offset: 0, shape: [2].into() };
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
            let enc = vae.encode_saved(b, &mut self.arena, &x)?;
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
            let dec = vae.decode_saved(b, &mut self.arena, &z)?;
            b.mse_loss(&drec.t, &self.side, &dec.out.t, &x.t, x.numel())?;
            let rec = b.download(&self.side)?[0];
            self.arena.set_keep(false);
            b.zero(&dz.t)?;
            vae.decode_backward(&self.grads, b, &mut self.arena, &dec, &drec, &dz)?;
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
            vae.encode_backward(&self.grads, b, &mut self.arena, &enc, &dm, None)?;
            Ok((rec + self.kl_weight * kl, rec, kl))
        })();
        self.arena.set_keep(false);
        self.arena.release_all_to(base);
        result
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
            bail!("the VAE loss is {loss} at step {}: stopping (the last checkpoint is intact)", self.step + 1);
        }
        b.sum_squares(&self.side, &self.opt.grads, self.opt.len)?;
        let grad_norm = b.download(&self.side)?[0].sqrt();
        if !grad_norm.is_finite() {
            bail!("the VAE gradient norm is {grad_norm} at step {}: stopping", self.step + 1);
        }
        if let Some(max) = self.options.max_grad_norm {
            b.scale(&self.opt.grads, (max / (grad_norm + 1e-6)).min(1.0), self.opt.len)?;
        }
        self.step += 1;
        let o = &self.options;
        let lr = o.schedule.lr(o.lr, self.step - 1, total_steps);
        let st = &self.opt;
        b.adamw_step(
            &st.params(),
            &st.grads,
            &st.m,
            &st.v,
            st.len,
            lr,
            o.beta1,
            o.beta2,
            o.eps,
            o.weight_decay,
            self.step,
        )?;
        Ok(VaeStats { step: self.step, loss, rec_loss: rec, kl, grad_norm, lr })
    }
}

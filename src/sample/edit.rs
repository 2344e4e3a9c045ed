//! Runs that start from an image: img2img (diffusers' StableDiffusionImg2ImgPipeline) and
//! inpainting (StableDiffusionInpaintPipeline, with an ordinary 4-channel U-Net or a 9-channel
//! inpainting one). What they add to sampling is here: where the denoising begins, the initial
//! latents (drawn from the seed's generator in diffusers' order), the inpainting U-Net's extra
//! input channels, and the 4-channel U-Net's blending after every step.

use super::init_image::{mask_to_latent, masked_image};
use super::pipeline::{check_finite, Pipeline};
use super::schedulers::Scheduler;
use crate::backend::Backend;
use crate::diag::SettingError;
use crate::models::vae::LatentEncoder;
use crate::rng::torch::TorchGenerator;
use anyhow::{bail, Result};

/// The image a run starts from.
#[derive(Clone, Debug)]
pub struct InitImage {
    /// Planar RGB [3, height, width] in [−1, 1] (the request's size).
    pub pixels: Vec<f32>,
    /// In (0, 1]: the share of the steps run (int(steps · strength) of them, the last ones); 1
    /// starts at the first timestep (inpainting then starts from pure noise, as diffusers).
    pub strength: f64,
    /// Inpainting: [height, width], 1 where the image is repainted, 0 where it is kept
    /// (diffusers' binarised mask: gray ≥ 0.5 repaints).
    pub mask: Option<Vec<f32>>,
}

/// img2img's first step (diffusers' `get_timesteps`): t_start = steps − min(int(steps · strength),
/// steps), times the scheduler's order (1 for all five). Errors when no step is left.
pub fn begin_index(steps: usize, strength: f64, timesteps: usize) -> Result<usize> {
    let init_timestep = ((steps as f64 * strength) as usize).min(steps);
    let begin = steps - init_timestep;
    if begin >= timesteps {
        return Err(SettingError::fields(
            &["strength", "steps"],
            format!("int({steps} steps × strength {strength}) = {init_timestep}: no step left to denoise"),
        ));
    }
    Ok(begin)
}

/// What inpainting carries through the denoising loop.
pub struct Inpaint {
    /// The mask at latent resolution [h, w] (nearest, as torch's `interpolate`), 0 or 1.
    pub mask: Vec<f32>,
    /// The masked image's latents [c, h, w] (9-channel U-Net input).
    pub masked_latents: Vec<f32>,
    /// 4-channel U-Net: the init image's latents [c, h, w] and the run's noise [n, c, h, w], to
    /// re-noise the kept part after every step. None with a 9-channel U-Net.
    pub blend: Option<(Vec<f32>, Vec<f32>)>,
}

/// A run's start from an image: the initial latents [n, c, h, w] and what inpainting needs.
pub struct Start {
    pub latents: Vec<f32>,
    pub inpaint: Option<Inpaint>,
}

/// (mean + std · ε) · scaling factor of `pixels`' latent distribution, ε from the generator: the
/// VAE's `latent_dist.sample(generator)` as diffusers' `retrieve_latents` then scales it.
fn encode_sample(
    p: &Pipeline,
    b: &mut dyn Backend,
    pixels: &[f32],
    h: usize,
    w: usize,
    g: &mut TorchGenerator,
) -> Result<Vec<f32>> {
    let mut enc = LatentEncoder::new(b, &p.vae, h, w)?;
    let encoded = enc.encode(b, &p.vae, pixels);
    b.free(enc.pool())?;
    let (mean, logvar) = encoded?;
    check_finite(&mean, || "the VAE encoder's output for the init image".into())?;
    let eps = g.randn(mean.len());
    let sf = p.vae.config.scaling_factor;
    Ok(mean.iter().zip(&logvar).zip(&eps).map(|((&m, &lv), &e)| (m + (0.5 * lv).exp() * e) * sf).collect())
}

/// The initial latents of `n` images of [c, lh, lw] starting from `init`, drawing as diffusers
/// does. img2img (`prepare_latents`): the init image's latent sample, then the noise, added at
/// `timesteps[begin]`. Inpainting: the init image's latent sample (4-channel U-Net, or strength
/// below 1), the noise (the start itself at strength 1: noise · init_noise_sigma), then the masked
/// image's latent sample (`prepare_mask_latents`).
pub fn start(
    p: &Pipeline,
    b: &mut dyn Backend,
    init: &InitImage,
    [n, c, lh, lw]: [usize; 4],
    sched: &Scheduler,
    begin: usize,
    g: &mut TorchGenerator,
) -> Result<Start> {
    let f = p.vae_scale_factor();
    let (h, w) = (lh * f, lw * f);
    let per = c * lh * lw;
    let inpaint_unet = p.unet.config.in_channels != c;
    let strength_max = init.strength == 1.0;
    let image_latents = match (&init.mask, inpaint_unet && strength_max) {
        (Some(_), true) => None,
        _ => Some(encode_sample(p, b, &init.pixels, h, w, g)?),
    };
    if let Some(z) = &image_latents {
        if z.len() != per {
            bail!("the VAE encodes to {} values per image; the U-Net takes {c} × {lh} × {lw}", z.len());
        }
    }
    let repeat = |z: &[f32]| -> Vec<f32> { z.iter().copied().cycle().take(n * z.len()).collect() };
    let noise = g.randn(n * per);
    let latents = match (&image_latents, init.mask.is_some() && strength_max) {
        (_, true) => noise.iter().map(|x| x * sched.init_noise_sigma()).collect(),
        (Some(z), false) => sched.add_noise(&repeat(z), &noise, begin)?,
        (None, false) => unreachable!("the image is encoded unless inpainting at strength 1"),
    };
    let Some(mask) = &init.mask else { return Ok(Start { latents, inpaint: None }) };
    // diffusers' masked image: init_image · (mask < 0.5), then its latent sample.
    let masked_latents = encode_sample(p, b, &masked_image(&init.pixels, mask), h, w, g)?;
    let mask_lat = mask_to_latent(mask, w, f);
    let blend = if inpaint_unet { None } else { image_latents.map(|z| (z, noise)) };
    Ok(Start { latents, inpaint: Some(Inpaint { mask: mask_lat, masked_latents, blend }) })
}

impl Inpaint {
    /// The 9-channel U-Net's input for one image: its scaled latents, the mask, the masked image's
    /// latents (diffusers' `torch.cat([latent_model_input, mask, masked_image_latents], dim=1)`).
    pub fn unet_input(&self, scaled: &[f32], out: &mut Vec<f32>) {
        out.extend_from_slice(scaled);
        out.extend_from_slice(&self.mask);
        out.extend_from_slice(&self.masked_latents);
    }

    /// 4-channel U-Net, after the scheduler's step `si` (of `timesteps`): the kept part of image
    /// `i` is the init image's latents re-noised to the next timestep (not after the last step),
    /// `(1 − m) · proper + m · latents`.
    pub fn blend(&self, sched: &Scheduler, si: usize, timesteps: usize, i: usize, latents: &mut [f32]) -> Result<()> {
        let Some((z, noise)) = &self.blend else { return Ok(()) };
        let per = z.len();
        let proper =
            if si + 1 < timesteps { sched.add_noise(z, &noise[i * per..(i + 1) * per], si + 1)? } else { z.clone() };
        let hw = self.mask.len();
        for (k, x) in latents.iter_mut().enumerate() {
            let m = self.mask[k % hw];
            *x = (1.0 - m) * proper[k] + m * *x;
        }
        Ok(())
    }
}

//! The pipeline's stages one at a time, for stage-by-stage comparisons (`roentgen parity`): the
//! text encoder on given texts, one U-Net call on given latents, timestep and context, and the VAE
//! decoder's raw output. Tensors cross in NCHW on the host, as torch holds them.

use super::pipeline::Pipeline;
use crate::backend::Backend;
use crate::nn::{Cx, Fmap};
use crate::tensor::{nchw_to_nhwc, nhwc_to_nchw};
use anyhow::{bail, Result};

impl Pipeline {
    /// The padded token ids of each text, concatenated ([texts, 77]).
    pub fn token_ids(&self, texts: &[String]) -> Vec<u32> {
        texts.iter().flat_map(|t| self.tokenizer.encode(t).ids).collect()
    }

    /// The text encoder's `last_hidden_state` of each text ([texts, 77, hidden]).
    pub fn text_embeddings(&self, b: &mut dyn Backend, texts: &[String]) -> Result<Vec<f32>> {
        self.encode_texts(b, texts, &mut |_| {})
    }

    /// One U-Net call: the prediction for `latents` [1, C, lh, lw] at timestep `t` with the
    /// conditioning `context` [77, hidden] (no guidance).
    pub fn unet_prediction(
        &self,
        b: &mut dyn Backend,
        latents: &[f32],
        lh: usize,
        lw: usize,
        t: f32,
        context: &[f32],
    ) -> Result<Vec<f32>> {
        let (c, seq) = (self.unet.config.in_channels, self.tokenizer.max_length());
        let hidden = self.unet.config.cross_attention_dim;
        if latents.len() != c * lh * lw || context.len() != seq * hidden {
            bail!(
                "unet_prediction: latents of {} values for [1, {c}, {lh}, {lw}], context of {} for [{seq}, {hidden}]",
                latents.len(),
                context.len()
            );
        }
        let mut arena = self.unet.allocate_arena(b, 1, lh, lw, seq)?;
        let run = |b: &mut dyn Backend, arena: &mut crate::tensor::Arena| -> Result<Vec<f32>> {
            let x = Fmap::alloc(arena, 1, lh, lw, c)?;
            let ctx = arena.alloc([seq, hidden])?;
            let ts = arena.alloc_f32([1])?;
            b.upload(&x.t, &nchw_to_nhwc(latents, 1, c, lh, lw))?;
            b.upload(&ctx, context)?;
            self.unet.upload_timesteps(b, &ts, &[t], 1)?;
            let bd: &dyn Backend = b;
            let out = self.unet.forward_from_timesteps(&mut Cx::new(bd, arena), &x, &ts, &ctx, seq)?.out;
            Ok(nhwc_to_nchw(&bd.download(&out.t)?, 1, c, lh, lw))
        };
        let out = run(b, &mut arena);
        b.free(arena.pool())?;
        out
    }

    /// The VAE decoder's raw output ([1, out_channels, lh·f, lw·f], before `/2 + 0.5`) for `z`
    /// [1, C, lh, lw] (already divided by the scaling factor).
    pub fn vae_decode_raw(&self, b: &mut dyn Backend, z: &[f32], lh: usize, lw: usize) -> Result<Vec<f32>> {
        let c = self.vae.config.latent_channels;
        let (f, out_c) = (self.vae_scale_factor(), self.vae.config.out_channels);
        let mut arena = self.vae.allocate_decode_arena(b, 1, lh, lw)?;
        let run = |b: &mut dyn Backend, arena: &mut crate::tensor::Arena| -> Result<Vec<f32>> {
            let zt = Fmap::alloc(arena, 1, lh, lw, c)?;
            b.upload(&zt.t, &nchw_to_nhwc(z, 1, c, lh, lw))?;
            let bd: &dyn Backend = b;
            let img = self.vae.decode(&mut Cx::new(bd, arena), &zt)?;
            Ok(nhwc_to_nchw(&bd.download(&img.t)?, 1, out_c, lh * f, lw * f))
        };
        let out = run(b, &mut arena);
        b.free(arena.pool())?;
        out
    }
}

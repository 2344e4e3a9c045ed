//! The init image of img2img and inpainting, and inpainting's mask, prepared as diffusers' `VaeImageProcessor.preprocess` prepares a PIL
//! image: its size by default (each side rounded down to a multiple of the VAE's scale factor), a
//! resize with Pillow's Lanczos filter where the size differs (the processor's
//! `resample="lanczos"`; Pillow returns the image itself when it does not), then /255 and
//! 2x − 1. Gray images are made RGB first (diffusers refuses them; a user converts with
//! `convert("RGB")`, which is what is done here); 16-bit images keep their high byte, as training
//! images do (`train::data::decode_rgb8`).

use super::edit::InitImage;
use crate::eval::resize::pil_lanczos;
use crate::io::images::luma;
use crate::train::data::decode_rgb8_bytes;
use anyhow::{bail, Context, Result};
use std::path::Path;

/// An init image at the run's size, and the size it had when that differs.
pub struct PreparedInit {
    pub init: InitImage,
    pub height: usize,
    pub width: usize,
    /// (height, width) of the file when it was resized.
    pub resized_from: Option<(usize, usize)>,
}

/// Reads `path` for a run of `height` × `width` (each None: the image's, rounded down to a
/// multiple of `factor`).
pub fn prepare(
    path: &Path,
    height: Option<usize>,
    width: Option<usize>,
    factor: usize,
    strength: f64,
) -> Result<PreparedInit> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    prepare_bytes(&bytes, &path.display().to_string(), height, width, factor, strength)
}

/// [`prepare`] of an image in memory (`name` names it in errors).
pub fn prepare_bytes(
    bytes: &[u8],
    name: &str,
    height: Option<usize>,
    width: Option<usize>,
    factor: usize,
    strength: f64,
) -> Result<PreparedInit> {
    let (rgb, w0, h0) = decode_rgb8_bytes(bytes, name)?;
    let round = |x: usize| x - x % factor.max(1);
    let (h, w) = (height.unwrap_or(round(h0)), width.unwrap_or(round(w0)));
    if h == 0 || w == 0 {
        bail!(
            "$init_image {name}: {w0}×{h0} pixels is smaller than the VAE's scale factor {factor}; give $height and $width"
        );
    }
    let rgb = pil_lanczos(&rgb, h0, w0, 3, h, w);
    let mut pixels = vec![0f32; 3 * h * w];
    for (p, px) in rgb.chunks_exact(3).enumerate() {
        for (ch, &v) in px.iter().enumerate() {
            // numpy's x / 255 in f32, then torch's 2x − 1.
            pixels[ch * h * w + p] = 2.0 * (v as f32 / 255.0) - 1.0;
        }
    }
    Ok(PreparedInit {
        init: InitImage { pixels, strength, mask: None },
        height: h,
        width: w,
        resized_from: (h != h0 || w != w0).then_some((h0, w0)),
    })
}

/// Inpainting's mask for a run of `height` × `width`, as diffusers' mask processor prepares it:
/// gray (Pillow's `convert("L")`: (19595 R + 38470 G + 7471 B + 2¹⁵) >> 16), resized with Lanczos
/// where the size differs, /255, then binarised: 1 (repaint) from 0.5 up, else 0 (keep).
/// Returns the mask [height · width] and the file's (height, width) when it was resized.
pub fn prepare_mask(path: &Path, height: usize, width: usize) -> Result<(Vec<f32>, Option<(usize, usize)>)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    prepare_mask_bytes(&bytes, &path.display().to_string(), height, width)
}

/// [`prepare_mask`] of an image in memory (`name` names it in errors).
pub fn prepare_mask_bytes(
    bytes: &[u8],
    name: &str,
    height: usize,
    width: usize,
) -> Result<(Vec<f32>, Option<(usize, usize)>)> {
    let (rgb, w0, h0) = decode_rgb8_bytes(bytes, name)?;
    let gray: Vec<u8> = rgb.chunks_exact(3).map(|p| luma(p[0], p[1], p[2])).collect();
    let gray = pil_lanczos(&gray, h0, w0, 1, height, width);
    let mask = gray.iter().map(|&v| if v as f32 / 255.0 < 0.5 { 0.0 } else { 1.0 }).collect();
    Ok((mask, (height != h0 || width != w0).then_some((h0, w0))))
}

/// The mask at latent resolution (`factor` pixels per latent), nearest as torch's `interpolate`
/// (mode "nearest": source index ⌊i · factor⌋).
pub fn mask_to_latent(mask: &[f32], width: usize, factor: usize) -> Vec<f32> {
    let (lw, lh) = (width / factor, mask.len() / width / factor);
    (0..lh * lw).map(|i| mask[(i / lw) * factor * width + (i % lw) * factor]).collect()
}

/// diffusers' masked image: the planar image [c, h, w] times (mask < 0.5).
pub fn masked_image(planar: &[f32], mask: &[f32]) -> Vec<f32> {
    let hw = mask.len();
    planar.iter().enumerate().map(|(i, &x)| x * (mask[i % hw] < 0.5) as u8 as f32).collect()
}

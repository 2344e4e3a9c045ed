//! Feature extraction for FID: which network, its weights, image decoding and folder listing.
//!
//! Images are decoded with the `image` crate (PNG 8/16-bit gray, gray+alpha, RGB, RGBA, palette;
//! JPEG) to 8 bits per channel, because every reference preprocessor works on 8-bit pixels
//! (pytorch-fid and CLIP through PIL's "RGB", TorchXRayVision through `normalize(img, 255)`, which
//! rejects larger values). 16-bit samples are rounded to 8 bits (v·255/65535, so 257·k maps to k);
//! alpha is dropped (PIL's `convert("RGB")`; transformers composites onto white, which differs only
//! for transparent pixels). PNG decoding is lossless and so exact; JPEG decoders differ from
//! libjpeg's by a level here and there, so JPEG features match PyTorch's only approximately.

use super::clip_vision::{self, ClipVision, ClipVisionConfig};
use super::densenet::{self, DenseNet, DenseNetConfig};
use super::inception::{self, InceptionV3};
use super::net::Pixels;
use super::tensors::{TensorSource, Weights, WeightsFile};
use crate::backend::Backend;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The feature network (the `features` setting).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FeatureKind {
    /// InceptionV3 pool3 (2048-d), pytorch-fid's FID network.
    Inception,
    /// TorchXRayVision DenseNet-121 `features2` (1024-d).
    Xrv,
    /// CLIP image tower, pooled output before the projection (768-d for ViT-B/32; the paper's).
    Clip,
    /// CLIP image embedding after `visual_projection` (512-d for ViT-B/32).
    ClipProj,
}

impl std::str::FromStr for FeatureKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<FeatureKind, String> {
        const ALL: [FeatureKind; 4] =
            [FeatureKind::Inception, FeatureKind::Xrv, FeatureKind::Clip, FeatureKind::ClipProj];
        ALL.into_iter()
            .find(|k| k.name() == s.to_ascii_lowercase())
            .ok_or_else(|| format!("{s:?}: expected one of {}", ALL.map(|k| k.name()).join(", ")))
    }
}

impl FeatureKind {
    pub fn name(self) -> &'static str {
        match self {
            FeatureKind::Inception => "inception",
            FeatureKind::Xrv => "xrv",
            FeatureKind::Clip => "clip",
            FeatureKind::ClipProj => "clip-proj",
        }
    }
}

/// An image as 8-bit samples, HWC with 1 (gray) or 3 (RGB) channels.
#[derive(Clone, Debug)]
pub struct Image {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

fn to8(v: u16) -> u8 {
    ((v as u32 * 255 + 32767) / 65535) as u8
}

/// Decodes a PNG or JPEG file (see the module comment for the conversions).
pub fn load_image(path: &Path) -> Result<Image> {
    use image::DynamicImage as D;
    let img = image::ImageReader::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?
        .decode()
        .with_context(|| format!("{}: not a readable PNG or JPEG image", path.display()))?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    if width == 0 || height == 0 {
        bail!("{}: the image is empty ({width}×{height})", path.display());
    }
    let (channels, pixels): (usize, Vec<u8>) = match img {
        D::ImageLuma8(b) => (1, b.into_raw()),
        D::ImageLumaA8(b) => (1, b.into_raw().chunks_exact(2).map(|p| p[0]).collect()),
        D::ImageLuma16(b) => (1, b.into_raw().into_iter().map(to8).collect()),
        D::ImageLumaA16(b) => (1, b.into_raw().chunks_exact(2).map(|p| to8(p[0])).collect()),
        D::ImageRgb8(b) => (3, b.into_raw()),
        D::ImageRgba8(b) => (3, b.into_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect()),
        D::ImageRgb16(b) => (3, b.into_raw().into_iter().map(to8).collect()),
        D::ImageRgba16(b) => {
            (3, b.into_raw().chunks_exact(4).flat_map(|p| [to8(p[0]), to8(p[1]), to8(p[2])]).collect())
        }
        other => bail!("{}: unsupported pixel format {:?}", path.display(), other.color()),
    };
    Ok(Image { width, height, channels, pixels })
}

/// The PNG/JPEG files of a folder (not recursive; hidden files skipped), sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("{}: cannot read the folder", dir.display()))?;
    let mut v = Vec::new();
    for e in rd {
        let e = e.with_context(|| format!("{}: cannot read the folder", dir.display()))?;
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let ext = p.extension().map(|x| x.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if !name.starts_with('.') && p.is_file() && matches!(ext.as_str(), "png" | "jpg" | "jpeg") {
            v.push(p);
        }
    }
    if v.is_empty() {
        bail!("{}: no images (.png, .jpg, .jpeg) in this folder", dir.display());
    }
    v.sort();
    Ok(v)
}

/// A feature network's preprocessing: an 8-bit image to the network's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preprocess {
    Inception,
    Xrv,
    Clip { size: usize, norm: clip_vision::PixelNorm },
}

impl Preprocess {
    pub fn apply(self, img: &Image) -> Pixels {
        let (p, h, w, c) = (&img.pixels, img.height, img.width, img.channels);
        match self {
            Preprocess::Inception => inception::preprocess(p, h, w, c),
            Preprocess::Xrv => densenet::preprocess(p, h, w, c),
            Preprocess::Clip { size, norm } => clip_vision::preprocess(p, h, w, c, size, norm),
        }
    }
}

/// A loaded feature network.
pub enum FeatureNet {
    Inception(InceptionV3),
    Xrv(DenseNet),
    Clip(ClipVision),
}

impl FeatureNet {
    /// Loads `kind` from a safetensors file (`clip_config`: a transformers config.json for a CLIP
    /// tower other than ViT-B/32), onto `backend`.
    pub fn load(
        kind: FeatureKind,
        weights: &Path,
        clip_config: Option<&Path>,
        backend: Box<dyn Backend>,
    ) -> Result<FeatureNet> {
        let file = WeightsFile::open_for(weights, kind.name())?;
        let src = file.source()?;
        FeatureNet::from_source(kind, src.as_ref(), clip_config, backend)
    }

    pub fn from_source(
        kind: FeatureKind,
        src: &dyn TensorSource,
        clip_config: Option<&Path>,
        backend: Box<dyn Backend>,
    ) -> Result<FeatureNet> {
        if clip_config.is_some() && !matches!(kind, FeatureKind::Clip | FeatureKind::ClipProj) {
            bail!("$clip_config applies to $features clip and clip-proj only");
        }
        Ok(match kind {
            FeatureKind::Inception => {
                FeatureNet::Inception(InceptionV3::load(backend, &Weights { src, network: inception::NETWORK })?)
            }
            FeatureKind::Xrv => FeatureNet::Xrv(DenseNet::load(
                backend,
                &Weights { src, network: densenet::NETWORK },
                DenseNetConfig::densenet121(),
            )?),
            FeatureKind::Clip | FeatureKind::ClipProj => {
                let config = match clip_config {
                    Some(p) => ClipVisionConfig::from_file(p)?,
                    None => ClipVisionConfig::vit_b32(),
                };
                let projected = kind == FeatureKind::ClipProj;
                let weights = Weights { src, network: clip_vision::NETWORK };
                FeatureNet::Clip(ClipVision::load(backend, &weights, config, projected)?)
            }
        })
    }

    /// CLIP's pixel normalisation (`PixelNorm::Openai` unless set); an error for other networks.
    pub fn set_pixel_norm(&mut self, norm: clip_vision::PixelNorm) -> Result<()> {
        match self {
            FeatureNet::Clip(m) => m.pixel_norm = norm,
            _ if norm == clip_vision::PixelNorm::Openai => {}
            _ => bail!("a CLIP pixel normalisation applies to the CLIP features only"),
        }
        Ok(())
    }

    pub fn dims(&self) -> usize {
        match self {
            FeatureNet::Inception(_) => inception::DIMS,
            FeatureNet::Xrv(m) => m.config.dims(),
            FeatureNet::Clip(m) => m.dims(),
        }
    }

    /// The network's preprocessing (images of a batch are prepared in parallel, then run together).
    pub fn preprocessor(&self) -> Preprocess {
        match self {
            FeatureNet::Inception(_) => Preprocess::Inception,
            FeatureNet::Xrv(_) => Preprocess::Xrv,
            FeatureNet::Clip(m) => Preprocess::Clip { size: m.config.image_size, norm: m.pixel_norm },
        }
    }

    /// The features of preprocessed images (a batch), one vector each.
    pub fn forward(&mut self, inputs: &[Pixels]) -> Result<Vec<Vec<f32>>> {
        match self {
            FeatureNet::Inception(m) => m.forward(inputs),
            FeatureNet::Xrv(m) => m.forward(inputs),
            FeatureNet::Clip(m) => m.forward(inputs),
        }
    }

    /// The features of one image (its network's preprocessing, then the forward pass).
    pub fn extract(&mut self, img: &Image) -> Result<Vec<f32>> {
        let input = self.preprocessor().apply(img);
        Ok(self.forward(std::slice::from_ref(&input))?.remove(0))
    }
}

/// Images per feature-network call when a list of images is featurised.
const LIST_BATCH: usize = 16;

/// The features of each image of `paths` (decoded and preprocessed in parallel, in batches), one
/// vector per image, in order.
pub fn features_of(net: &mut FeatureNet, paths: &[PathBuf]) -> Result<Vec<Vec<f32>>> {
    use rayon::prelude::*;
    let preprocess = net.preprocessor();
    let bar = crate::diag::progress_bar(paths.len() as u64, "images", "features");
    let mut out = Vec::with_capacity(paths.len());
    for chunk in paths.chunks(LIST_BATCH) {
        let inputs = chunk.par_iter().map(|p| Ok(preprocess.apply(&load_image(p)?))).collect::<Result<Vec<_>>>()?;
        out.extend(net.forward(&inputs)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

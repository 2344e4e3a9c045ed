//! CLIP's image tower as transformers' `CLIPVisionModelWithProjection` computes it: patch
//! embedding (a stride-p convolution without bias), class token and learned positions,
//! `pre_layrnorm` (sic, transformers' name), pre-LN transformer layers (quick-GELU MLP for OpenAI's
//! checkpoints), then the class token through `post_layernorm` — the *pooled output* (768-d for
//! ViT-B/32, the features the RoentGen paper reports) — and `visual_projection` (no bias) — the
//! 512-d *image embedding*, unnormalised, as `get_image_features` returns it (what RoentGen's released
//! script is said to use). `--features clip` is the first, `--features clip-proj` the second.
//!
//! Preprocessing, CLIP's (OpenAI's `preprocess` and transformers' PIL image processor
//! `CLIPImageProcessorPil`, the default before transformers 5): RGB (gray replicated), resize so the
//! shortest side is 224 with Pillow's bicubic (long side `int(224·long/short)`), centre crop 224
//! (top = (h − 224)//2), ÷ 255, normalise with CLIP's mean/std. (transformers 5's default processor
//! resizes with torchvision instead, which differs from Pillow by a few levels.)
//!
//! Weights: transformers' names, `vision_model.*` and `visual_projection.weight` — the layout of both
//! `CLIPVisionModelWithProjection` and the full `CLIPModel` (whose `text_model.*` is ignored), e.g.
//! a transformers `model.safetensors` of openai/clip-vit-base-patch32 as it is; otherwise:
//!
//! ```text
//! import safetensors.torch; from transformers import CLIPVisionModelWithProjection
//! m = CLIPVisionModelWithProjection.from_pretrained("openai/clip-vit-base-patch32")
//! safetensors.torch.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, "clip-vit-base-patch32-vision.safetensors")
//! ```

use super::net::NetDevice;
use super::net::Pixels;
use super::resize::pil_bicubic;
use super::tensors::Weights;
use crate::backend::{Activation, Backend};
use crate::models::allocate;
use crate::models::clip::CLIP_LAYER_NAMES;
use crate::nn::transformer::{LayerShape, NormPlacement, Tokens, TransformerLayer};
use crate::nn::{Cx, LayerNorm, Linear};
use crate::ops::elementwise::BiasRowsParams;
use crate::tensor::{Layout, Tensor};
use anyhow::{bail, Context, Result};
use std::path::Path;

pub const NETWORK: &str = "CLIP's vision tower (transformers CLIPVisionModelWithProjection / CLIPModel)";
/// OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, rounded to f32 through f64 as numpy converts Python floats.
const MEAN: [f32; 3] = [0.48145466f64 as f32, 0.4578275f64 as f32, 0.40821073f64 as f32];
const STD: [f32; 3] = [0.26862954f64 as f32, 0.26130258f64 as f32, 0.27577711f64 as f32];

/// CXR-RePaiR's (and CheXzero's) pixel statistics of MIMIC-CXR on the 0–255 scale, divided by 255
/// (through f64, as numpy converts Python floats).
const CXR_REPAIR_MEAN: f32 = (101.48761f64 / 255.0) as f32;
const CXR_REPAIR_STD: f32 = (83.43944f64 / 255.0) as f32;

/// The mean and standard deviation the pixels are normalised with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PixelNorm {
    /// OpenAI CLIP's per-channel statistics (of its web images): the released checkpoints'.
    #[default]
    Openai,
    /// CXR-RePaiR's chest X-ray statistics (mean 101.48761, std 83.43944 of 255, every channel),
    /// for CLIP models fine-tuned on MIMIC-CXR as CXR-RePaiR and CheXzero were. CLIP's resize and
    /// crop stay: CXR-RePaiR normalises at 320 px and then resizes, which differs from normalising
    /// after the resize only by the rounding of 8-bit resized levels (the resize is linear).
    CxrRepair,
}

impl PixelNorm {
    fn mean_std(self) -> ([f32; 3], [f32; 3]) {
        match self {
            PixelNorm::Openai => (MEAN, STD),
            PixelNorm::CxrRepair => ([CXR_REPAIR_MEAN; 3], [CXR_REPAIR_STD; 3]),
        }
    }
}

/// The fields of transformers' `CLIPVisionConfig` the forward needs.
#[derive(Clone, Debug, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
}

impl ClipVisionConfig {
    /// ViT-B/32 (openai/clip-vit-base-patch32; also `CLIPVisionConfig()`'s defaults).
    pub fn vit_b32() -> ClipVisionConfig {
        ClipVisionConfig {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            image_size: 224,
            patch_size: 32,
            layer_norm_eps: 1e-5,
            hidden_act: Activation::QuickGelu,
        }
    }

    /// From a transformers config.json: a `CLIPVisionConfig` or a `CLIPConfig` (its `vision_config`).
    /// Absent fields take `CLIPVisionConfig`'s defaults (ViT-B/32), as transformers does.
    pub fn from_file(path: &Path) -> Result<ClipVisionConfig> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))?;
        let v = v.get("vision_config").unwrap_or(&v);
        let mut c = ClipVisionConfig::vit_b32();
        // Bounded like the text models' configs (`crate::models::limits`): a corrupt size must
        // not reach a tensor shape.
        use crate::models::limits::{MAX_CHANNELS, MAX_LAYERS, MAX_POSITIONS};
        let int = |key: &str, dst: &mut usize, max: usize| -> Result<()> {
            if let Some(x) = v.get(key) {
                *dst = x.as_u64().filter(|&n| n > 0 && n <= max as u64).with_context(|| {
                    format!("{}: field '{key}' must be an integer from 1 to {max}, got {x}", path.display())
                })? as usize;
            }
            Ok(())
        };
        int("hidden_size", &mut c.hidden_size, MAX_CHANNELS)?;
        int("intermediate_size", &mut c.intermediate_size, MAX_CHANNELS)?;
        int("num_hidden_layers", &mut c.num_hidden_layers, MAX_LAYERS)?;
        int("num_attention_heads", &mut c.num_attention_heads, MAX_CHANNELS)?;
        int("image_size", &mut c.image_size, MAX_CHANNELS)?;
        int("patch_size", &mut c.patch_size, MAX_CHANNELS)?;
        if let Some(x) = v.get("layer_norm_eps") {
            c.layer_norm_eps = x.as_f64().filter(|e| e.is_finite() && *e >= 0.0).with_context(|| {
                format!("{}: field 'layer_norm_eps' must be a finite number ≥ 0, got {x}", path.display())
            })?;
        }
        if let Some(x) = v.get("hidden_act") {
            c.hidden_act = match x.as_str() {
                Some("quick_gelu") => Activation::QuickGelu,
                Some("gelu") => Activation::Gelu,
                _ => bail!("{}: field 'hidden_act' is {x}; supported: \"quick_gelu\", \"gelu\"", path.display()),
            };
        }
        if c.hidden_size % c.num_attention_heads != 0 {
            bail!(
                "{}: hidden_size {} is not a multiple of num_attention_heads {}",
                path.display(),
                c.hidden_size,
                c.num_attention_heads
            );
        }
        if c.patch_size > c.image_size {
            bail!("{}: patch_size {} exceeds image_size {}", path.display(), c.patch_size, c.image_size);
        }
        if c.num_positions() > MAX_POSITIONS {
            bail!(
                "{}: image_size {} / patch_size {} gives {} positions, more than {MAX_POSITIONS}",
                path.display(),
                c.image_size,
                c.patch_size,
                c.num_positions()
            );
        }
        Ok(c)
    }

    pub fn num_positions(&self) -> usize {
        (self.image_size / self.patch_size).pow(2) + 1
    }

    /// Every layer's shape: pre-LN, bidirectional (the text tower's layer without its causal mask).
    fn layer_shape(&self) -> LayerShape {
        let (dim, mlp_dim, heads) = (self.hidden_size, self.intermediate_size, self.num_attention_heads);
        let (eps, act) = (self.layer_norm_eps as f32, self.hidden_act);
        LayerShape { dim, mlp_dim, heads, eps, act, norm: NormPlacement::Pre, causal: false }
    }

    /// The tensors the pooled output needs, under transformers' names (the projection,
    /// `visual_projection.weight` [P, hidden], is the checkpoint's when asked for).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let table = Layout::measure(|l| params_layout(l, self, None));
        let d = self.hidden_size;
        let mut v: Vec<(String, Vec<usize>)> =
            vec![(CLASS_EMBEDDING.into(), vec![d]), (POSITION_EMBEDDING.into(), vec![self.num_positions(), d])];
        v.extend(table.entries().iter().map(|e| (e.name.clone(), e.shape.dims().to_vec())));
        v
    }
}

const CLASS_EMBEDDING: &str = "vision_model.embeddings.class_embedding";
const POSITION_EMBEDDING: &str = "vision_model.embeddings.position_embedding.weight";

/// The tower's parameters on the backend. The class token and the learned positions are not
/// among them: they are folded at load into one token bias (see `ClipVision::token_bias`).
#[derive(Clone, Debug)]
struct ClipVisionParams {
    /// The patch convolution (hidden, 3, p, p) as a linear map of unfolded patches (3·p·p values
    /// per patch in the weight's (channel, y, x) order; kernel = stride, no padding, no bias).
    patch_embedding: Linear,
    pre_layrnorm: LayerNorm,
    layers: Vec<TransformerLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Option<Linear>,
}

fn params_layout(l: &mut Layout, c: &ClipVisionConfig, projection_dim: Option<usize>) -> ClipVisionParams {
    let (d, p, eps) = (c.hidden_size, c.patch_size, c.layer_norm_eps as f32);
    let patch_weight = l.tensor("vision_model.embeddings.patch_embedding.weight", [d, 3, p, p]);
    let patch_embedding = Linear { weight: patch_weight, bias: None, in_f: 3 * p * p, out_f: d };
    let pre_layrnorm = LayerNorm::layout(l, "vision_model.pre_layrnorm", d, eps);
    let layers = (0..c.num_hidden_layers)
        .map(|i| {
            TransformerLayer::layout(l, &format!("vision_model.encoder.layers.{i}"), &CLIP_LAYER_NAMES, c.layer_shape())
        })
        .collect();
    let post_layernorm = LayerNorm::layout(l, "vision_model.post_layernorm", d, eps);
    let visual_projection = projection_dim.map(|pd| Linear::layout(l, "visual_projection", d, pd, false));
    ClipVisionParams { patch_embedding, pre_layrnorm, layers, post_layernorm, visual_projection }
}

/// transformers' `CLIPVisionModelWithProjection`, on the backend, with the text tower's
/// transformer layers.
pub struct ClipVision {
    pub config: ClipVisionConfig,
    params: ClipVisionParams,
    /// class_embedding + position 0 in row 0, position i in row i (positions, hidden): the
    /// embeddings PyTorch forms as cat(class, patches) + positions are patches (a zero row 0) plus
    /// this, which adds the same two numbers in each element.
    token_bias: Tensor,
    device: NetDevice,
    /// The preprocessing's normalisation (OpenAI's unless the caller sets another).
    pub pixel_norm: PixelNorm,
}

impl ClipVision {
    /// Loads the tower onto `backend`. Its output is the pooled output, or with `projection` the
    /// image embedding (`visual_projection.weight`, required then).
    pub fn load(
        mut backend: Box<dyn Backend>,
        w: &Weights,
        config: ClipVisionConfig,
        projection: bool,
    ) -> Result<ClipVision> {
        let d = config.hidden_size;
        // Layers beyond the configured count mean the config does not describe these weights.
        let extra = format!("vision_model.encoder.layers.{}.layer_norm1.weight", config.num_hidden_layers);
        if w.has(&extra) {
            bail!(
                "{}: tensor '{extra}' exists, but the CLIP config has {} layers (pass the checkpoint's config.json with $clip_config)",
                w.src.describe(),
                config.num_hidden_layers
            );
        }
        let projection_dim = if projection {
            let name = "visual_projection.weight";
            let shape = w.src.shape(name).ok_or_else(|| w.missing(name))?;
            if shape.len() != 2 || shape[1] != d {
                bail!("{}: tensor '{name}' has shape {shape:?}; expected [projection_dim, {d}]", w.src.describe());
            }
            Some(shape[0])
        } else {
            None
        };
        let (params, table) =
            allocate(backend.as_mut(), "clip_vision.params", |l| params_layout(l, &config, projection_dim))?;
        for e in table.entries() {
            let t = Tensor::new(table.pool(), e.offset, e.shape);
            backend.upload(&t, &w.get(&e.name, e.shape.dims())?)?;
        }
        let class = w.get(CLASS_EMBEDDING, &[d])?;
        let mut bias = w.get(POSITION_EMBEDDING, &[config.num_positions(), d])?;
        bias[..d].iter_mut().zip(&class).for_each(|(b, c)| *b += c);
        let (token_bias, _) = allocate(backend.as_mut(), "clip_vision.token_bias", |l| {
            l.tensor("token_bias", [config.num_positions(), d])
        })?;
        backend.upload(&token_bias, &bias)?;
        Ok(ClipVision { config, params, token_bias, device: NetDevice::new(backend), pixel_norm: PixelNorm::Openai })
    }

    /// The length of the output: the projection's, else the hidden size.
    pub fn dims(&self) -> usize {
        self.params.visual_projection.map_or(self.config.hidden_size, |p| p.out_f)
    }

    /// The tower on preprocessed images (image_size², 3 channels, normalised each): one output
    /// (pooled, or projected) per image.
    pub fn forward(&mut self, images: &[Pixels]) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        for x in images {
            if x.h != c.image_size || x.w != c.image_size || x.c != 3 {
                bail!("CLIP's vision tower takes {0}×{0}×3 pixels, got {1}×{2}×{3}", c.image_size, x.h, x.w, x.c);
            }
        }
        let patches = self.unfold(images);
        let batch = images.len();
        let (p, token_bias) = (&self.params, &self.token_bias);
        let out = self.device.run("clip_vision.activations", batch, |cx| run(cx, p, token_bias, c, &patches, batch))?;
        // Every token went through the final norm (and the projection); the class tokens (row 0
        // of each image) are the outputs.
        let (t, width) = (c.num_positions(), self.dims());
        Ok((0..batch).map(|i| out[i * t * width..][..width].to_vec()).collect())
    }

    /// The patch convolution's input as rows: per image, a zero row (the class token's place) and
    /// one row per patch (row-major over the grid, as `flatten(2)` orders them), each 3·p·p values
    /// in the weight's (channel, y, x) order.
    fn unfold(&self, images: &[Pixels]) -> Vec<f32> {
        let p = self.config.patch_size;
        let grid = self.config.image_size / p;
        let width = 3 * p * p;
        let mut rows = vec![0f32; images.len() * self.config.num_positions() * width];
        for (x, out) in images.iter().zip(rows.chunks_mut(self.config.num_positions() * width)) {
            for (g, row) in out.chunks_mut(width).skip(1).enumerate() {
                let (gy, gx) = (g / grid, g % grid);
                for ch in 0..3 {
                    for y in 0..p {
                        for xx in 0..p {
                            row[(ch * p + y) * p + xx] = x.data[((gy * p + y) * x.w + gx * p + xx) * 3 + ch];
                        }
                    }
                }
            }
        }
        rows
    }
}

/// The tower's forward for `batch` images whose unfolded patches are `patches`: the final norm's
/// output (batch · positions, hidden), or with a projection its projection. Each layer's
/// activations are released once its output is copied out (inference keeps nothing).
fn run(
    cx: &mut Cx,
    p: &ClipVisionParams,
    token_bias: &Tensor,
    c: &ClipVisionConfig,
    patches: &[f32],
    batch: usize,
) -> Result<Tensor> {
    let b = cx.b;
    let (t, d) = (c.num_positions(), c.hidden_size);
    let rows = batch * t;
    let input = cx.arena.alloc([rows, p.patch_embedding.in_f])?;
    b.upload(&input, patches)?;
    let embedded = p.patch_embedding.apply(cx, &input, rows)?;
    let x = cx.arena.alloc([rows, d])?;
    // The same (positions · hidden) bias for every image.
    b.add_bias_rows_forward(&BiasRowsParams { batch: 1, rows: batch, channels: t * d }, &x, &embedded, token_bias)?;
    let mut h = [p.pre_layrnorm.apply(cx, &x, rows)?.out, cx.arena.alloc([rows, d])?];
    let tokens = Tokens { batch, seq: t, key_mask: None };
    for layer in &p.layers {
        let mark = cx.arena.mark();
        let acts = layer.forward(cx, &h[0], &tokens)?;
        b.zero(&h[1])?;
        b.accumulate(&h[1], &layer.output(&acts), rows * d)?;
        cx.arena.release_all_to(mark);
        h.swap(0, 1);
    }
    let pooled = p.post_layernorm.apply(cx, &h[0], rows)?.out;
    match p.visual_projection {
        Some(projection) => projection.apply(cx, &pooled, rows),
        None => Ok(pooled),
    }
}

/// CLIP's input for an 8-bit image (HWC, 1 or 3 channels), at the config's image size.
pub fn preprocess(pixels: &[u8], h: usize, w: usize, c: usize, size: usize, norm: PixelNorm) -> Pixels {
    let rgb: Vec<u8> = if c == 1 { pixels.iter().flat_map(|&v| [v, v, v]).collect() } else { pixels.to_vec() };
    // transformers' get_resize_output_image_size(default_to_square=False): the short side becomes
    // `size`, the long side int(size · long / short) (computed in f64, truncated).
    let (oh, ow) = if w <= h {
        ((size as f64 * h as f64 / w as f64) as usize, size)
    } else {
        (size, (size as f64 * w as f64 / h as f64) as usize)
    };
    let r = pil_bicubic(&rgb, h, w, 3, oh, ow);
    let (top, left) = ((oh - size) / 2, (ow - size) / 2);
    let (mean, std) = norm.mean_std();
    let mut out = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            for ch in 0..3 {
                let v = r[((top + y) * ow + left + x) * 3 + ch];
                // rescale: uint8 → f64 · (1/255) → f32; normalise in f32.
                let v = (v as f64 * (1.0 / 255.0)) as f32;
                out.push((v - mean[ch]) / std[ch]);
            }
        }
    }
    Pixels::new(size, size, 3, out)
}

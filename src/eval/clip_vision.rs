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

use super::ops::{layer_norm, linear, Act, Conv};
use super::resize::pil_bicubic;
use super::tensors::Weights;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::Path;

pub const NETWORK: &str = "CLIP's vision tower (transformers CLIPVisionModelWithProjection / CLIPModel)";
/// OPENAI_CLIP_MEAN / OPENAI_CLIP_STD, rounded to f32 through f64 as numpy converts Python floats.
const MEAN: [f32; 3] = [0.48145466f64 as f32, 0.4578275f64 as f32, 0.40821073f64 as f32];
const STD: [f32; 3] = [0.26862954f64 as f32, 0.26130258f64 as f32, 0.27577711f64 as f32];

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    QuickGelu,
    Gelu,
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

    /// The tensors the pooled output needs (the projection is `visual_projection.weight`, [P, hidden]).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let mut v: Vec<(String, Vec<usize>)> = vec![
            ("vision_model.embeddings.class_embedding".into(), vec![d]),
            ("vision_model.embeddings.patch_embedding.weight".into(), vec![d, 3, self.patch_size, self.patch_size]),
            ("vision_model.embeddings.position_embedding.weight".into(), vec![self.num_positions(), d]),
            ("vision_model.pre_layrnorm.weight".into(), vec![d]),
            ("vision_model.pre_layrnorm.bias".into(), vec![d]),
        ];
        for i in 0..self.num_hidden_layers {
            let p = format!("vision_model.encoder.layers.{i}");
            for ln in ["layer_norm1", "layer_norm2"] {
                v.push((format!("{p}.{ln}.weight"), vec![d]));
                v.push((format!("{p}.{ln}.bias"), vec![d]));
            }
            for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                v.push((format!("{p}.self_attn.{proj}.weight"), vec![d, d]));
                v.push((format!("{p}.self_attn.{proj}.bias"), vec![d]));
            }
            v.push((format!("{p}.mlp.fc1.weight"), vec![f, d]));
            v.push((format!("{p}.mlp.fc1.bias"), vec![f]));
            v.push((format!("{p}.mlp.fc2.weight"), vec![d, f]));
            v.push((format!("{p}.mlp.fc2.bias"), vec![d]));
        }
        v.push(("vision_model.post_layernorm.weight".into(), vec![d]));
        v.push(("vision_model.post_layernorm.bias".into(), vec![d]));
        v
    }
}

struct Layer {
    ln1: (Vec<f32>, Vec<f32>),
    qkv: [(Vec<f32>, Vec<f32>); 3],
    out: (Vec<f32>, Vec<f32>),
    ln2: (Vec<f32>, Vec<f32>),
    fc1: (Vec<f32>, Vec<f32>),
    fc2: (Vec<f32>, Vec<f32>),
}

pub struct ClipVision {
    pub config: ClipVisionConfig,
    patch: Conv,
    class_embedding: Vec<f32>,
    position_embedding: Vec<f32>,
    pre_ln: (Vec<f32>, Vec<f32>),
    layers: Vec<Layer>,
    post_ln: (Vec<f32>, Vec<f32>),
    /// `visual_projection.weight` [P, hidden], when asked for.
    projection: Option<(usize, Vec<f32>)>,
}

/// Pooled output and (if loaded) the projected image embedding.
pub struct ClipOutput {
    pub pooled: Vec<f32>,
    pub projected: Option<Vec<f32>>,
}

impl ClipVision {
    /// Loads the tower; `projection` also loads `visual_projection.weight` (required then).
    pub fn load(w: &Weights, config: ClipVisionConfig, projection: bool) -> Result<ClipVision> {
        let (d, f, p) = (config.hidden_size, config.intermediate_size, config.patch_size);
        let ln = |name: &str| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((w.get(&format!("{name}.weight"), &[d])?, w.get(&format!("{name}.bias"), &[d])?))
        };
        let lin = |name: &str, o: usize, i: usize| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((w.get(&format!("{name}.weight"), &[o, i])?, w.get(&format!("{name}.bias"), &[o])?))
        };
        let e = "vision_model.embeddings";
        let patch_w = w.get(&format!("{e}.patch_embedding.weight"), &[d, 3, p, p])?;
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let l = format!("vision_model.encoder.layers.{i}");
            let a = |n: &str| lin(&format!("{l}.self_attn.{n}"), d, d);
            layers.push(Layer {
                ln1: ln(&format!("{l}.layer_norm1"))?,
                qkv: [a("q_proj")?, a("k_proj")?, a("v_proj")?],
                out: a("out_proj")?,
                ln2: ln(&format!("{l}.layer_norm2"))?,
                fc1: lin(&format!("{l}.mlp.fc1"), f, d)?,
                fc2: lin(&format!("{l}.mlp.fc2"), d, f)?,
            });
        }
        // Layers beyond the configured count mean the config does not describe these weights.
        let extra = format!("vision_model.encoder.layers.{}.layer_norm1.weight", config.num_hidden_layers);
        if w.has(&extra) {
            bail!(
                "{}: tensor '{extra}' exists, but the CLIP config has {} layers (pass the checkpoint's config.json with $clip_config)",
                w.src.describe(),
                config.num_hidden_layers
            );
        }
        let projection = if projection {
            let name = "visual_projection.weight";
            let shape = w.src.shape(name).ok_or_else(|| w.missing(name))?;
            if shape.len() != 2 || shape[1] != d {
                bail!("{}: tensor '{name}' has shape {shape:?}; expected [projection_dim, {d}]", w.src.describe());
            }
            Some((shape[0], w.get(name, &shape)?))
        } else {
            None
        };
        Ok(ClipVision {
            patch: Conv::new(&patch_w, [d, 3, p, p], (p, p), (0, 0)),
            class_embedding: w.get(&format!("{e}.class_embedding"), &[d])?,
            position_embedding: w.get(&format!("{e}.position_embedding.weight"), &[config.num_positions(), d])?,
            pre_ln: ln("vision_model.pre_layrnorm")?,
            layers,
            post_ln: ln("vision_model.post_layernorm")?,
            projection,
            config,
        })
    }

    pub fn projection_dim(&self) -> Option<usize> {
        self.projection.as_ref().map(|p| p.0)
    }

    /// The tower on preprocessed pixels (image_size², 3 channels, normalised).
    pub fn forward(&self, x: &Act) -> Result<ClipOutput> {
        let c = &self.config;
        if x.h != c.image_size || x.w != c.image_size || x.c != 3 {
            bail!("CLIP's vision tower takes {0}×{0}×3 pixels, got {1}×{2}×{3}", c.image_size, x.h, x.w, x.c);
        }
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        let patches = self.patch.forward(x); // (grid², d), row-major over the grid like flatten(2)
        let t = patches.pixels() + 1;
        let mut h = Vec::with_capacity(t * d);
        h.extend_from_slice(&self.class_embedding);
        h.extend_from_slice(&patches.data);
        h.iter_mut().zip(&self.position_embedding).for_each(|(v, p)| *v += p);
        h = layer_norm(&h, d, &self.pre_ln.0, &self.pre_ln.1, eps);
        for l in &self.layers {
            let a = layer_norm(&h, d, &l.ln1.0, &l.ln1.1, eps);
            let att = self.attention(&a, t, l);
            let o = linear(&att, t, &l.out.0, Some(&l.out.1), d, d);
            h.iter_mut().zip(&o).for_each(|(v, o)| *v += o);
            let m = layer_norm(&h, d, &l.ln2.0, &l.ln2.1, eps);
            let mut u = linear(&m, t, &l.fc1.0, Some(&l.fc1.1), d, c.intermediate_size);
            match c.hidden_act {
                Activation::QuickGelu => u.iter_mut().for_each(|v| *v *= 1.0 / (1.0 + (-1.702 * *v).exp())),
                Activation::Gelu => u
                    .iter_mut()
                    .for_each(|v| *v = (0.5 * *v as f64 * (1.0 + libm::erf(*v as f64 / 2f64.sqrt()))) as f32),
            }
            let o = linear(&u, t, &l.fc2.0, Some(&l.fc2.1), c.intermediate_size, d);
            h.iter_mut().zip(&o).for_each(|(v, o)| *v += o);
        }
        let pooled = layer_norm(&h[..d], d, &self.post_ln.0, &self.post_ln.1, eps);
        let projected = self.projection.as_ref().map(|(p, w)| linear(&pooled, 1, w, None, d, *p));
        Ok(ClipOutput { pooled, projected })
    }

    /// Multi-head self-attention (softmax(q·kᵀ/√dₕ)·v per head), concatenated heads.
    fn attention(&self, x: &[f32], t: usize, l: &Layer) -> Vec<f32> {
        let d = self.config.hidden_size;
        let nh = self.config.num_attention_heads;
        let hd = d / nh;
        let q = linear(x, t, &l.qkv[0].0, Some(&l.qkv[0].1), d, d);
        let k = linear(x, t, &l.qkv[1].0, Some(&l.qkv[1].1), d, d);
        let v = linear(x, t, &l.qkv[2].0, Some(&l.qkv[2].1), d, d);
        let scale = (hd as f32).powf(-0.5);
        let mut out = vec![0f32; t * d];
        // One task per (query token); each loops over heads.
        out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
            let mut s = vec![0f32; t];
            for hh in 0..nh {
                let qi = &q[i * d + hh * hd..][..hd];
                let mut max = f32::NEG_INFINITY;
                for (j, sj) in s.iter_mut().enumerate() {
                    let kj = &k[j * d + hh * hd..][..hd];
                    *sj = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                    max = max.max(*sj);
                }
                let mut sum = 0f32;
                s.iter_mut().for_each(|x| {
                    *x = (*x - max).exp();
                    sum += *x;
                });
                let oh = &mut o[hh * hd..(hh + 1) * hd];
                for (j, sj) in s.iter().enumerate() {
                    let p = sj / sum;
                    let vj = &v[j * d + hh * hd..][..hd];
                    oh.iter_mut().zip(vj).for_each(|(a, b)| *a += p * b);
                }
            }
        });
        out
    }
}

/// CLIP's input for an 8-bit image (HWC, 1 or 3 channels), at the config's image size.
pub fn preprocess(pixels: &[u8], h: usize, w: usize, c: usize, size: usize) -> Act {
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
    let mut out = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        for x in 0..size {
            for ch in 0..3 {
                let v = r[((top + y) * ow + left + x) * 3 + ch];
                // rescale: uint8 → f64 · (1/255) → f32; normalise in f32.
                let v = (v as f64 * (1.0 / 255.0)) as f32;
                out.push((v - MEAN[ch]) / STD[ch]);
            }
        }
    }
    Act::new(size, size, 3, out)
}

//! CLIP's text tower with its projection, as transformers' `CLIPModel.get_text_features` computes
//! it: the text transformer (the one Stable Diffusion conditions on, `models::clip`), its pooled
//! output — the state of the first end-of-text token — and `text_projection` (no bias): the text
//! embedding in the space CLIP shares with its image embedding (`--features clip-proj`). Image→text
//! retrieval compares the two.
//!
//! Weights: a transformers `CLIPModel` file (`text_model.*`, `text_projection.weight`, and the
//! image tower's tensors, which the text side skips), e.g. openai/clip-vit-base-patch32's
//! `model.safetensors` as published, with its config.json (a `CLIPConfig`: the `text_config` is
//! read) and its tokenizer files (vocab.json, merges.txt). Reports are tokenized as diffusers does
//! for Stable Diffusion — padded to 77 without an attention mask — which leaves the pooled output
//! unchanged: the mask is causal, so no token before the end-of-text token sees the padding.

use super::tensors::{Weights, WeightsFile};
use super::text_knn::{embed_texts, Pooling};
use crate::backend::Backend;
use crate::io::weights;
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::text::{TextEncoder, TextTokenizer};
use crate::models::Component;
use anyhow::{bail, Context, Result};
use std::path::Path;

const NETWORK: &str = "CLIP's text tower with its projection (transformers CLIPModel)";
const PROJECTION: &str = "text_projection.weight";

/// CLIP's text tower, its tokenizer and its projection.
pub struct ClipTextTower {
    encoder: TextEncoder,
    tokenizer: TextTokenizer,
    /// `text_projection.weight`, (projection_dim, hidden) row-major.
    projection: Vec<f32>,
    projection_dim: usize,
}

/// Whether a `CLIPModel` tensor belongs to the image side (or is the contrastive temperature),
/// which the text tower does not use.
fn is_image_side(name: &str) -> bool {
    name.starts_with("vision_model.") || name == "visual_projection.weight" || name == "logit_scale"
}

impl ClipTextTower {
    /// Loads the tower from a `CLIPModel` safetensors file; `config`: its config.json (without one,
    /// ViT-B/32's text tower, transformers' `CLIPTextConfig` defaults); `tokenizer`: a folder with
    /// CLIP's tokenizer files.
    pub fn load(b: &mut dyn Backend, file: &Path, config: Option<&Path>, tokenizer: &Path) -> Result<ClipTextTower> {
        let st = WeightsFile::open(file)?;
        let src = st.source()?;
        let w = Weights { src: src.as_ref(), network: NETWORK };
        if !w.has("text_model.embeddings.token_embedding.weight") {
            bail!(
                "{}: no CLIP text tower (tensors 'text_model.*'): image→text retrieval needs a whole CLIPModel file, both towers",
                file.display()
            );
        }
        let config = match config {
            Some(p) => ClipTextConfig::from_json(&weights::read_json(p)?, p)?,
            None => ClipTextConfig::from_json(&serde_json::json!({}), Path::new("(CLIPTextConfig defaults)"))?,
        };
        let hidden = config.hidden_size;
        let projection = {
            let shape = w.src.shape(PROJECTION).ok_or_else(|| w.missing(PROJECTION))?;
            if shape.len() != 2 || shape[1] != hidden {
                bail!(
                    "{}: tensor '{PROJECTION}' has shape {shape:?}; expected [projection_dim, {hidden}]",
                    file.display()
                );
            }
            (w.get(PROJECTION, &shape)?, shape[0])
        };
        let model = ClipTextModel::allocate(b, config)?;
        weights::load_into(b, model.table(), &[file.to_path_buf()], &ClipTextModel::alias, &|n| {
            weights::is_known_buffer(n) || is_image_side(n) || n == PROJECTION
        })
        .with_context(|| format!("loading {NETWORK}"))?;
        let tokenizer_dir = tokenizer;
        let tokenizer = TextTokenizer::from_dir(tokenizer_dir)?;
        if tokenizer.vocab_size() > model.config.vocab_size {
            bail!(
                "{}: the tokenizer has {} tokens, the text tower's embedding {} (not this model's tokenizer?)",
                tokenizer_dir.display(),
                tokenizer.vocab_size(),
                model.config.vocab_size
            );
        }
        Ok(ClipTextTower {
            encoder: TextEncoder::Clip(model),
            tokenizer,
            projection: projection.0,
            projection_dim: projection.1,
        })
    }

    /// The length of a text embedding (the projection's).
    pub fn dims(&self) -> usize {
        self.projection_dim
    }

    /// One text embedding per text: the pooled output times `text_projection`ᵀ (f32, as PyTorch's
    /// f32 linear; the order of the sum differs from a blocked GEMM only by rounding).
    pub fn embed(&self, b: &mut dyn Backend, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let pooled = embed_texts(b, &self.encoder, &self.tokenizer, texts, Pooling::Pooled)?;
        let hidden = self.encoder.hidden_size();
        Ok(pooled
            .iter()
            .map(|x| self.projection.chunks_exact(hidden).map(|w| w.iter().zip(x).map(|(a, b)| a * b).sum()).collect())
            .collect())
    }
}

//! `CLIPTextModel` (transformers): token + position embeddings, pre-LN transformer layers with a
//! causal mask, quick_gelu or gelu MLPs, final layer norm; the output is `last_hidden_state`.
//!
//! Stable Diffusion v1 feeds the 77 padded ids with no attention mask, so the only mask is causal.

use super::limits::{MAX_CHANNELS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB};
use super::{allocate, check_param_count, Component, ConfigReader};
use crate::backend::{Activation, Backend};
use crate::io::weights;
use crate::nn::transformer::{LayerActs, LayerNames, LayerShape, NormPlacement, Tokens, TransformerLayer};
use crate::nn::{planned_arena, zeros, Cx, LayerNorm, LayerNormActs};
use crate::ops::elementwise::{EmbeddingBackward, EmbeddingForward, EmbeddingParams};
use crate::tensor::{Arena, Layout, Tensor};
use anyhow::{bail, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f32,
    pub hidden_act: Activation,
}

impl ClipTextConfig {
    pub fn from_file(path: &Path) -> Result<ClipTextConfig> {
        Self::from_json(&weights::read_json(path)?, path)
    }

    /// Parses a `CLIPTextConfig` (or the `text_config` of a full `CLIPConfig`), with transformers'
    /// defaults for absent fields.
    pub fn from_json(v: &Value, path: &Path) -> Result<ClipTextConfig> {
        let v = match v.get("model_type").and_then(|m| m.as_str()) {
            Some("clip") => v.get("text_config").unwrap_or(v),
            Some("clip_text_model") | None => v,
            Some(other) => bail!(
                "{}: field \"model_type\" is \"{other}\"; expected \"clip_text_model\" (a CLIP text encoder)",
                path.display()
            ),
        };
        let r = ConfigReader::new(v, path)?;
        let act_name = r.str("hidden_act", "quick_gelu")?;
        let hidden_act = match Activation::from_config_name(act_name) {
            Some(a @ (Activation::QuickGelu | Activation::Gelu | Activation::GeluTanh)) => a,
            _ => bail!(
                "{}: field \"hidden_act\" is \"{act_name}\", which the CLIP text encoder does not support \
                 (supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast)",
                path.display()
            ),
        };
        let c = ClipTextConfig {
            vocab_size: r.size("vocab_size", 49408, MAX_VOCAB)?,
            hidden_size: r.size("hidden_size", 512, MAX_CHANNELS)?,
            intermediate_size: r.size("intermediate_size", 2048, MAX_CHANNELS)?,
            num_hidden_layers: r.size("num_hidden_layers", 12, MAX_LAYERS)?,
            num_attention_heads: r.size("num_attention_heads", 8, MAX_CHANNELS)?,
            max_position_embeddings: r.size("max_position_embeddings", 77, MAX_POSITIONS)?,
            layer_norm_eps: r.eps("layer_norm_eps", 1e-5)?,
            hidden_act,
        };
        c.layer_shape().check(path)?;
        check_param_count(path, &Layout::measure(|l| params_layout(l, &c)))?;
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.layer_shape().head_dim()
    }

    /// Every layer's shape: pre-LN, causal (the text encoder Stable Diffusion conditions on).
    fn layer_shape(&self) -> LayerShape {
        let (dim, mlp_dim, heads) = (self.hidden_size, self.intermediate_size, self.num_attention_heads);
        let (eps, act) = (self.layer_norm_eps, self.hidden_act);
        LayerShape { dim, mlp_dim, heads, eps, act, norm: NormPlacement::Pre, causal: true }
    }
}

/// transformers' `CLIPEncoderLayer` names (the text tower's and the vision tower's).
pub(crate) const CLIP_LAYER_NAMES: LayerNames = LayerNames {
    q: "self_attn.q_proj",
    k: "self_attn.k_proj",
    v: "self_attn.v_proj",
    attn_out: "self_attn.out_proj",
    attn_norm: "layer_norm1",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
    mlp_norm: "layer_norm2",
};

#[derive(Clone, Debug)]
pub struct ClipParams {
    pub token_embedding: Tensor,    // (vocab, C)
    pub position_embedding: Tensor, // (max_positions, C)
    pub layers: Vec<TransformerLayer>,
    pub final_layer_norm: LayerNorm,
}

/// The parameter table of a CLIPTextModel, under transformers' names.
pub fn params_layout(l: &mut Layout, c: &ClipTextConfig) -> ClipParams {
    let (d, eps) = (c.hidden_size, c.layer_norm_eps);
    let token_embedding = l.tensor("text_model.embeddings.token_embedding.weight", [c.vocab_size, d]);
    let position_embedding =
        l.tensor("text_model.embeddings.position_embedding.weight", [c.max_position_embeddings, d]);
    let layers = (0..c.num_hidden_layers)
        .map(|i| {
            TransformerLayer::layout(l, &format!("text_model.encoder.layers.{i}"), &CLIP_LAYER_NAMES, c.layer_shape())
        })
        .collect();
    let final_layer_norm = LayerNorm::layout(l, "text_model.final_layer_norm", d, eps);
    ClipParams { token_embedding, position_embedding, layers, final_layer_norm }
}

/// What one forward at (batch, seq) computed, in its arena (the backward reads it).
#[derive(Clone, Debug)]
pub struct ClipActs {
    pub batch: usize,
    pub seq: usize,
    pub embeddings: Tensor, // (rows, C)
    pub layers: Vec<LayerActs>,
    pub final_layer_norm: LayerNormActs,
}

pub struct ClipTextModel {
    pub config: ClipTextConfig,
    pub params: ClipParams,
    /// The parameter table: name → (offset, shape) in the parameter pool.
    pub table: Layout,
}

impl Component for ClipTextModel {
    component_parts!(ClipTextConfig, "text_encoder.params", allocate);
    /// transformers 5 saves CLIPTextModel without the "text_model." prefix.
    fn alias(name: &str) -> Option<String> {
        Some(format!("text_model.{name}"))
    }
}

impl ClipTextModel {
    /// An arena planned for `forward` at (batch, seq) and, when `training`, the backward's
    /// temporaries on top (the gradient of the output lives elsewhere).
    pub fn allocate_arena(&self, backend: &mut dyn Backend, batch: usize, seq: usize, training: bool) -> Result<Arena> {
        let ids = vec![0u32; batch * seq];
        planned_arena(backend, "text_encoder.activations", |cx| {
            let acts = self.forward(cx, &ids, batch, seq)?;
            if training {
                let dout = Arena::planning().alloc([batch * seq, self.config.hidden_size])?;
                self.backward(cx, &self.params, &acts, &dout, &ids)?;
            }
            Ok(())
        })
    }

    /// The forward for `ids` (batch · seq token ids), every activation from the arena; the output
    /// is `last_hidden_state(..)` of what it returns.
    pub fn forward(&self, cx: &mut Cx, ids: &[u32], batch: usize, seq: usize) -> Result<ClipActs> {
        let b = cx.b;
        let c = &self.config;
        let (rows, d) = (batch * seq, c.hidden_size);
        if seq > c.max_position_embeddings {
            bail!("text encoder: {seq} tokens exceed max_position_embeddings {}", c.max_position_embeddings);
        }
        let p = &self.params;
        let embeddings = cx.arena.alloc([batch, seq, d])?;
        b.embedding_forward(
            &EmbeddingParams { batch, seq, dim: d },
            &EmbeddingForward { out: &embeddings, ids, wte: &p.token_embedding, wpe: &p.position_embedding },
        )?;
        let tokens = Tokens { batch, seq, key_mask: None };
        let mut x = embeddings;
        let mut layers = Vec::with_capacity(p.layers.len());
        for layer in &p.layers {
            let la = layer.forward(cx, &x, &tokens)?;
            x = layer.output(&la);
            layers.push(la);
        }
        let final_layer_norm = p.final_layer_norm.apply(cx, &x, rows)?;
        Ok(ClipActs { batch, seq, embeddings, layers, final_layer_norm })
    }

    /// `last_hidden_state` (batch, seq, C) of a forward's activations: the final layer norm's output.
    pub fn last_hidden_state(&self, acts: &ClipActs) -> Tensor {
        acts.final_layer_norm.out.reshape([acts.batch, acts.seq, self.config.hidden_size])
    }

    /// The gradient buffers: the parameter layout bound to its own pool ("text_encoder.grads").
    pub fn allocate_grads(&self, backend: &mut dyn Backend) -> Result<(ClipParams, Layout)> {
        let c = self.config.clone();
        allocate(backend, "text_encoder.grads", |l| params_layout(l, &c))
    }

    /// The backward pass of `forward` (whose `acts` it reads): accumulates every parameter gradient
    /// into `g` for the gradient `dout` (batch · seq, hidden) of `last_hidden_state`. Temporaries
    /// come from `arena` and are released on return.
    pub fn backward(&self, cx: &mut Cx, g: &ClipParams, acts: &ClipActs, dout: &Tensor, ids: &[u32]) -> Result<()> {
        let b = cx.b;
        let c = &self.config;
        let p = &self.params;
        let mark = cx.arena.mark();
        let (batch, seq, d) = (acts.batch, acts.seq, c.hidden_size);
        let tokens = Tokens { batch, seq, key_mask: None };
        let input = |i: usize| if i == 0 { acts.embeddings } else { p.layers[i - 1].output(&acts.layers[i - 1]) };
        let x_last = input(p.layers.len());
        let mut dx = zeros(cx, [batch * seq, d])?;
        p.final_layer_norm.backward(&g.final_layer_norm, b, &dx, dout, &x_last, &acts.final_layer_norm)?;
        for (i, ((layer, lg), la)) in p.layers.iter().zip(&g.layers).zip(&acts.layers).enumerate().rev() {
            dx = layer.backward(cx, lg, la, &input(i), &dx, &tokens)?;
        }
        b.embedding_backward(
            &EmbeddingParams { batch, seq, dim: d },
            &EmbeddingBackward { dwte: &g.token_embedding, dwpe: &g.position_embedding, dout: &dx, ids },
        )?;
        cx.arena.release_all_to(mark);
        Ok(())
    }
}

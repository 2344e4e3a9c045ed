//! `CLIPTextModel` (transformers): token + position embeddings, pre-LN transformer layers with a
//! causal mask, quick_gelu or gelu MLPs, final layer norm; the output is `last_hidden_state`.
//!
//! Stable Diffusion v1 feeds the 77 padded ids with no attention mask, so the only mask is causal.

use super::limits::{MAX_CHANNELS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB};
use super::{allocate, check_param_count, ConfigReader};
use crate::backend::plan::PlanBackend;
use crate::backend::{Activation, Backend};
use crate::nn::{zeros, Cx, LayerNorm, LayerNormActs, Linear};
use crate::ops::attention::{AttentionBackward, AttentionForward, AttentionParams};
use crate::ops::elementwise::EmbeddingParams;
use crate::tensor::{Arena, Layout, Tensor};
use crate::{io::weights, io::weights::LoadReport};
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
        if c.hidden_size % c.num_attention_heads != 0 {
            bail!(
                "{}: field \"hidden_size\" ({}) is not divisible by \"num_attention_heads\" ({})",
                path.display(),
                c.hidden_size,
                c.num_attention_heads
            );
        }
        check_param_count(path, &Layout::measure(|l| params_layout(l, &c)))?;
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[derive(Clone, Debug)]
pub struct ClipLayerParams {
    pub layer_norm1: LayerNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
}

#[derive(Clone, Debug)]
pub struct ClipParams {
    pub token_embedding: Tensor,    // (vocab, C)
    pub position_embedding: Tensor, // (max_positions, C)
    pub layers: Vec<ClipLayerParams>,
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
            let p = format!("text_model.encoder.layers.{i}");
            ClipLayerParams {
                layer_norm1: LayerNorm::layout(l, &format!("{p}.layer_norm1"), d, eps),
                q_proj: Linear::layout(l, &format!("{p}.self_attn.q_proj"), d, d, true),
                k_proj: Linear::layout(l, &format!("{p}.self_attn.k_proj"), d, d, true),
                v_proj: Linear::layout(l, &format!("{p}.self_attn.v_proj"), d, d, true),
                out_proj: Linear::layout(l, &format!("{p}.self_attn.out_proj"), d, d, true),
                layer_norm2: LayerNorm::layout(l, &format!("{p}.layer_norm2"), d, eps),
                fc1: Linear::layout(l, &format!("{p}.mlp.fc1"), d, c.intermediate_size, true),
                fc2: Linear::layout(l, &format!("{p}.mlp.fc2"), c.intermediate_size, d, true),
            }
        })
        .collect();
    let final_layer_norm = LayerNorm::layout(l, "text_model.final_layer_norm", d, eps);
    ClipParams { token_embedding, position_embedding, layers, final_layer_norm }
}

/// What one layer's forward writes (and its backward will read); rows = batch · seq.
#[derive(Clone, Debug)]
pub struct ClipLayerActs {
    pub ln1: LayerNormActs,
    pub q: Tensor,        // (rows, C)
    pub k: Tensor,        // (rows, C)
    pub v: Tensor,        // (rows, C)
    pub attn: Tensor,     // (rows, C) heads concatenated
    pub lse: Tensor,      // (rows, heads)
    pub attn_out: Tensor, // (rows, C) after out_proj
    pub residual1: Tensor,
    pub ln2: LayerNormActs,
    pub fc1: Tensor, // (rows, intermediate)
    pub act: Tensor, // (rows, intermediate)
    pub fc2: Tensor, // (rows, C)
    pub residual2: Tensor,
}

/// The activation arena of one forward at (batch, seq).
#[derive(Clone, Debug)]
pub struct ClipActs {
    pub batch: usize,
    pub seq: usize,
    pub embeddings: Tensor, // (rows, C)
    pub layers: Vec<ClipLayerActs>,
    pub final_layer_norm: LayerNormActs,
}

pub fn acts_layout(l: &mut Layout, c: &ClipTextConfig, batch: usize, seq: usize) -> ClipActs {
    let (rows, d, f, h) = (batch * seq, c.hidden_size, c.intermediate_size, c.num_attention_heads);
    let embeddings = l.tensor("embeddings", [batch, seq, d]);
    let layers = (0..c.num_hidden_layers)
        .map(|i| {
            let p = format!("layers.{i}");
            ClipLayerActs {
                ln1: LayerNorm::acts_layout(l, &format!("{p}.layer_norm1"), rows, d),
                q: l.tensor(format!("{p}.q"), [rows, d]),
                k: l.tensor(format!("{p}.k"), [rows, d]),
                v: l.tensor(format!("{p}.v"), [rows, d]),
                attn: l.tensor(format!("{p}.attn"), [rows, d]),
                lse: l.tensor(format!("{p}.lse"), [rows, h]),
                attn_out: l.tensor(format!("{p}.attn_out"), [rows, d]),
                residual1: l.tensor(format!("{p}.residual1"), [rows, d]),
                ln2: LayerNorm::acts_layout(l, &format!("{p}.layer_norm2"), rows, d),
                fc1: l.tensor(format!("{p}.fc1"), [rows, f]),
                act: l.tensor(format!("{p}.act"), [rows, f]),
                fc2: l.tensor(format!("{p}.fc2"), [rows, d]),
                residual2: l.tensor(format!("{p}.residual2"), [rows, d]),
            }
        })
        .collect();
    let final_layer_norm = LayerNorm::acts_layout(l, "final_layer_norm", rows, d);
    ClipActs { batch, seq, embeddings, layers, final_layer_norm }
}

pub struct ClipTextModel {
    pub config: ClipTextConfig,
    pub params: ClipParams,
    /// The parameter table: name → (offset, shape) in the parameter pool.
    pub table: Layout,
}

impl ClipTextModel {
    /// Allocates the parameter pool (uninitialised: zeros) for `config`.
    pub fn allocate(backend: &mut dyn Backend, config: ClipTextConfig) -> Result<ClipTextModel> {
        let (params, table) = allocate(backend, "text_encoder.params", |l| params_layout(l, &config))?;
        Ok(ClipTextModel { config, params, table })
    }

    /// Loads a text_encoder component folder (config.json + safetensors, `variant` e.g. "fp16").
    pub fn load(backend: &mut dyn Backend, dir: &Path, variant: Option<&str>) -> Result<(ClipTextModel, LoadReport)> {
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let files = weights::weight_files(dir, variant)?;
        let model = Self::allocate(backend, config)?;
        let report = weights::load_into(backend, &model.table, &files, &|n| Some(format!("text_model.{n}")))?;
        Ok((model, report))
    }

    /// The real architecture with random weights (for benchmarks and `inspect --random-weights`).
    pub fn random(backend: &mut dyn Backend, config: ClipTextConfig, seed: u64) -> Result<ClipTextModel> {
        let model = Self::allocate(backend, config)?;
        super::randomize(backend, &model.table, seed)?;
        Ok(model)
    }

    pub fn num_params(&self) -> usize {
        self.table.numel()
    }

    /// Allocates the activation arena for a forward at (batch, seq).
    pub fn allocate_acts(&self, backend: &mut dyn Backend, batch: usize, seq: usize) -> Result<ClipActs> {
        let c = self.config.clone();
        Ok(allocate(backend, "text_encoder.acts", |l| acts_layout(l, &c, batch, seq))?.0)
    }

    /// `last_hidden_state` (batch, seq, C) for `ids` (batch · seq token ids), written into `acts`.
    pub fn forward(&self, b: &dyn Backend, acts: &ClipActs, ids: &[u32]) -> Result<Tensor> {
        let c = &self.config;
        let (batch, seq, d) = (acts.batch, acts.seq, c.hidden_size);
        let rows = batch * seq;
        if seq > c.max_position_embeddings {
            bail!("text encoder: {seq} tokens exceed max_position_embeddings {}", c.max_position_embeddings);
        }
        let p = &self.params;
        b.embedding_forward(
            &EmbeddingParams { batch, seq, dim: d },
            &acts.embeddings,
            ids,
            &p.token_embedding,
            &p.position_embedding,
        )?;
        let (heads, hd) = (c.num_attention_heads, c.head_dim());
        let mut x = acts.embeddings;
        for (lp, la) in p.layers.iter().zip(&acts.layers) {
            lp.layer_norm1.forward(b, &la.ln1, &x, rows)?;
            lp.q_proj.forward(b, &la.q, &la.ln1.out, rows)?;
            lp.k_proj.forward(b, &la.k, &la.ln1.out, rows)?;
            lp.v_proj.forward(b, &la.v, &la.ln1.out, rows)?;
            let scale = 1.0 / (hd as f32).sqrt();
            let p = AttentionParams { batch, q_len: seq, kv_len: seq, heads, head_dim: hd, scale, causal: true };
            let (out, lse, q, k, v) = (&la.attn, &la.lse, &la.q, &la.k, &la.v);
            b.attention_forward(&p, &AttentionForward { out, lse, q, k, v, key_mask: None })?;
            lp.out_proj.forward(b, &la.attn_out, &la.attn, rows)?;
            b.add_forward(&la.residual1, &x, &la.attn_out, rows * d)?;
            lp.layer_norm2.forward(b, &la.ln2, &la.residual1, rows)?;
            lp.fc1.forward(b, &la.fc1, &la.ln2.out, rows)?;
            b.activation_forward(&la.act, &la.fc1, c.hidden_act, rows * c.intermediate_size)?;
            lp.fc2.forward(b, &la.fc2, &la.act, rows)?;
            b.add_forward(&la.residual2, &la.residual1, &la.fc2, rows * d)?;
            x = la.residual2;
        }
        p.final_layer_norm.forward(b, &acts.final_layer_norm, &x, rows)?;
        Ok(acts.final_layer_norm.out.reshape([batch, seq, d]))
    }

    /// The gradient buffers: the parameter layout bound to its own pool ("text_encoder.grads").
    pub fn allocate_grads(&self, backend: &mut dyn Backend) -> Result<(ClipParams, Layout)> {
        let c = self.config.clone();
        allocate(backend, "text_encoder.grads", |l| params_layout(l, &c))
    }

    /// Arena elements the backward pass needs for its temporaries at (batch, seq).
    pub fn plan_backward(&self, batch: usize, seq: usize) -> Result<usize> {
        let c = self.config.clone();
        let mut l = Layout::unbound();
        let acts = acts_layout(&mut l, &c, batch, seq);
        let dout = l.tensor("dout", [batch * seq, c.hidden_size]);
        let mut arena = Arena::planning();
        let ids = vec![0u32; batch * seq];
        self.backward(&mut Cx::new(&PlanBackend::new(), &mut arena), &self.params, &acts, &dout, &ids)?;
        Ok(arena.peak())
    }

    /// The backward pass of `forward` (whose `acts` it reads): accumulates every parameter gradient
    /// into `g` for the gradient `dout` (batch · seq, hidden) of `last_hidden_state`. Temporaries
    /// come from `arena` and are released on return.
    pub fn backward(&self, cx: &mut Cx, g: &ClipParams, acts: &ClipActs, dout: &Tensor, ids: &[u32]) -> Result<()> {
        let b = cx.b;
        let c = &self.config;
        let p = &self.params;
        let mark = cx.arena.mark();
        let (batch, seq, d, f) = (acts.batch, acts.seq, c.hidden_size, c.intermediate_size);
        let rows = batch * seq;
        let (heads, hd) = (c.num_attention_heads, c.head_dim());
        let x_last = acts.layers.last().map_or(acts.embeddings, |l| l.residual2);
        let mut dx = zeros(cx, [rows, d])?;
        p.final_layer_norm.backward(&g.final_layer_norm, b, &dx, dout, &x_last, &acts.final_layer_norm)?;
        for (i, ((lp, lg), la)) in p.layers.iter().zip(&g.layers).zip(&acts.layers).enumerate().rev() {
            let x_in = if i == 0 { acts.embeddings } else { acts.layers[i - 1].residual2 };
            // residual2 = residual1 + fc2(act(fc1(ln2(residual1))))
            let dres1 = zeros(cx, [rows, d])?;
            b.accumulate(&dres1, &dx, rows * d)?;
            let dact = zeros(cx, [rows, f])?;
            lp.fc2.backward(&lg.fc2, b, Some(&dact), &dx, &la.act, rows)?;
            let dfc1 = zeros(cx, [rows, f])?;
            b.activation_backward(&dfc1, &dact, &la.fc1, c.hidden_act, rows * f)?;
            let dln2 = zeros(cx, [rows, d])?;
            lp.fc1.backward(&lg.fc1, b, Some(&dln2), &dfc1, &la.ln2.out, rows)?;
            lp.layer_norm2.backward(&lg.layer_norm2, b, &dres1, &dln2, &la.residual1, &la.ln2)?;
            // residual1 = x + out_proj(attention(q, k, v)), causal
            let dxin = zeros(cx, [rows, d])?;
            b.accumulate(&dxin, &dres1, rows * d)?;
            let dattn = zeros(cx, [rows, d])?;
            lp.out_proj.backward(&lg.out_proj, b, Some(&dattn), &dres1, &la.attn, rows)?;
            let (dq, dk, dv) = (zeros(cx, [rows, d])?, zeros(cx, [rows, d])?, zeros(cx, [rows, d])?);
            let scale = 1.0 / (hd as f32).sqrt();
            let p = AttentionParams { batch, q_len: seq, kv_len: seq, heads, head_dim: hd, scale, causal: true };
            let (dout, q, k, v, out, lse) = (&dattn, &la.q, &la.k, &la.v, &la.attn, &la.lse);
            b.attention_backward(
                &p,
                &AttentionBackward { dq: &dq, dk: &dk, dv: &dv, dout, q, k, v, out, lse, key_mask: None },
            )?;
            let dln1 = zeros(cx, [rows, d])?;
            lp.q_proj.backward(&lg.q_proj, b, Some(&dln1), &dq, &la.ln1.out, rows)?;
            lp.k_proj.backward(&lg.k_proj, b, Some(&dln1), &dk, &la.ln1.out, rows)?;
            lp.v_proj.backward(&lg.v_proj, b, Some(&dln1), &dv, &la.ln1.out, rows)?;
            lp.layer_norm1.backward(&lg.layer_norm1, b, &dxin, &dln1, &x_in, &la.ln1)?;
            dx = dxin;
        }
        b.embedding_backward(
            &EmbeddingParams { batch, seq, dim: d },
            &g.token_embedding,
            &g.position_embedding,
            &dx,
            ids,
        )?;
        cx.arena.release_all_to(mark);
        Ok(())
    }
}

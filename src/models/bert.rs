//! `BertModel` (transformers) as a Stable Diffusion text encoder: the RoentGen paper swaps CLIP for
//! the domain-specific RadBERT and SapBERT. Word + position + token-type embeddings and a layer
//! norm, then post-LN encoder layers (self-attention → dense → LayerNorm(· + x); intermediate dense
//! → activation → output dense → LayerNorm(· + ·)); the output is `last_hidden_state`. No final
//! layer norm and no pooler: diffusers conditions the U-Net on `last_hidden_state` only.
//!
//! Reference quirks reproduced here:
//! - token_type_ids are all zero (diffusers passes none; transformers then uses its zero buffer),
//!   so row 0 of `token_type_embeddings` is added at every position;
//! - the padding attention mask is applied only when asked: diffusers passes
//!   `attention_mask` only if the text encoder's config sets `use_attention_mask`
//!   (`BertConfig::use_attention_mask`); otherwise padding tokens are attended to like any other;
//! - `word_embeddings` is an `nn.Embedding(padding_idx=pad_token_id)`, whose backward never
//!   writes the pad row: `backward` leaves that row's gradient as it found it;
//! - checkpoints of BertForMaskedLM & co. name everything under `bert.` and carry heads (`cls.*`,
//!   `classifier.*`) and a pooler, which are ignored, as are the `position_ids`/`token_type_ids`
//!   buffers; TF-converted checkpoints call the layer-norm parameters `gamma`/`beta`.

use super::limits::{MAX_CHANNELS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB};
use super::{allocate, check_param_count, Component, ConfigReader};
use crate::backend::{Activation, Backend};
use crate::io::weights;
use crate::nn::transformer::{LayerActs, LayerNames, LayerShape, NormPlacement, Tokens, TransformerLayer};
use crate::nn::{planned_arena, zeros, Cx, LayerNorm, LayerNormActs};
use crate::ops::elementwise::{BiasRowsParams, EmbeddingBackward, EmbeddingForward, EmbeddingParams};
use crate::tensor::{Arena, Layout, Shape, Tensor};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::path::Path;

#[derive(Clone, Debug, PartialEq)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f32,
    /// The `padding_idx` of the word embeddings (its gradient row stays untouched); `None` when
    /// the config has `"pad_token_id": null`.
    pub pad_token_id: Option<usize>,
    /// diffusers' switch: when true, pipelines pass the tokenizer's attention mask to `forward`.
    pub use_attention_mask: bool,
}

impl BertConfig {
    pub fn from_file(path: &Path) -> Result<BertConfig> {
        Self::from_json(&weights::read_json(path)?, path)
    }

    /// Parses a `BertConfig` with transformers' defaults for absent fields (bert-base's sizes).
    /// Variants this encoder does not implement (decoders, relative position embeddings) are
    /// refused with the field named rather than computed wrongly.
    pub fn from_json(v: &Value, path: &Path) -> Result<BertConfig> {
        let r = ConfigReader::new(v, path)?;
        match r.str("model_type", "bert")? {
            "bert" => {}
            other => bail!(
                "{}: field \"model_type\" is \"{other}\"; expected \"bert\" (a BERT text encoder)",
                path.display()
            ),
        }
        let flag = |field: &str| -> Result<bool> {
            match r.obj.get(field) {
                None | Some(Value::Null) => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(x) => bail!("{}: field \"{field}\" is {x}; expected true or false", path.display()),
            }
        };
        for field in ["is_decoder", "add_cross_attention"] {
            if flag(field)? {
                bail!("{}: field \"{field}\" is true; only BERT encoders are supported", path.display());
            }
        }
        let pos = r.str("position_embedding_type", "absolute")?;
        if pos != "absolute" {
            bail!("{}: field \"position_embedding_type\" is \"{pos}\"; only \"absolute\" is supported", path.display());
        }
        let act_name = r.str("hidden_act", "gelu")?;
        let hidden_act = Activation::from_config_name(act_name).with_context(|| {
            format!(
                "{}: field \"hidden_act\" is \"{act_name}\", which is not supported (supported: {})",
                path.display(),
                Activation::CONFIG_NAMES
            )
        })?;
        let pad_token_id =
            match r.obj.get("pad_token_id") {
                None => Some(0),
                Some(Value::Null) => None,
                Some(x) => Some(x.as_u64().map(|n| n as usize).with_context(|| {
                    format!("{}: field \"pad_token_id\" is {x}; expected an integer", path.display())
                })?),
            };
        let c = BertConfig {
            vocab_size: r.size("vocab_size", 30522, MAX_VOCAB)?,
            hidden_size: r.size("hidden_size", 768, MAX_CHANNELS)?,
            num_hidden_layers: r.size("num_hidden_layers", 12, MAX_LAYERS)?,
            num_attention_heads: r.size("num_attention_heads", 12, MAX_CHANNELS)?,
            intermediate_size: r.size("intermediate_size", 3072, MAX_CHANNELS)?,
            hidden_act,
            max_position_embeddings: r.size("max_position_embeddings", 512, MAX_POSITIONS)?,
            type_vocab_size: r.size("type_vocab_size", 2, MAX_VOCAB)?,
            layer_norm_eps: r.eps("layer_norm_eps", 1e-12)?,
            pad_token_id,
            use_attention_mask: flag("use_attention_mask")?,
        };
        c.layer_shape().check(path)?;
        if let Some(p) = c.pad_token_id.filter(|&p| p >= c.vocab_size) {
            bail!("{}: field \"pad_token_id\" ({p}) is outside the vocabulary of {}", path.display(), c.vocab_size);
        }
        check_param_count(path, &Layout::measure(|l| params_layout(l, &c)))?;
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.layer_shape().head_dim()
    }

    /// Every layer's shape: post-LN, bidirectional.
    fn layer_shape(&self) -> LayerShape {
        let (dim, mlp_dim, heads) = (self.hidden_size, self.intermediate_size, self.num_attention_heads);
        let (eps, act) = (self.layer_norm_eps, self.hidden_act);
        LayerShape { dim, mlp_dim, heads, eps, act, norm: NormPlacement::Post, causal: false }
    }
}

/// transformers' `BertLayer` names.
const BERT_LAYER_NAMES: LayerNames = LayerNames {
    q: "attention.self.query",
    k: "attention.self.key",
    v: "attention.self.value",
    attn_out: "attention.output.dense",
    attn_norm: "attention.output.LayerNorm",
    fc1: "intermediate.dense",
    fc2: "output.dense",
    mlp_norm: "output.LayerNorm",
};

#[derive(Clone, Debug)]
pub struct BertParams {
    pub word_embeddings: Tensor,       // (vocab, C)
    pub position_embeddings: Tensor,   // (max_positions, C)
    pub token_type_embeddings: Tensor, // (type_vocab, C)
    pub embeddings_layer_norm: LayerNorm,
    pub layers: Vec<TransformerLayer>,
}

/// The parameter table of a BertModel, under transformers' names (as `BertModel.save_pretrained`
/// writes them: no `bert.` prefix, no pooler).
pub fn params_layout(l: &mut Layout, c: &BertConfig) -> BertParams {
    let (d, eps) = (c.hidden_size, c.layer_norm_eps);
    let word_embeddings = l.tensor("embeddings.word_embeddings.weight", [c.vocab_size, d]);
    let position_embeddings = l.tensor("embeddings.position_embeddings.weight", [c.max_position_embeddings, d]);
    let token_type_embeddings = l.tensor("embeddings.token_type_embeddings.weight", [c.type_vocab_size, d]);
    let embeddings_layer_norm = LayerNorm::layout(l, "embeddings.LayerNorm", d, eps);
    let layers = (0..c.num_hidden_layers)
        .map(|i| TransformerLayer::layout(l, &format!("encoder.layer.{i}"), &BERT_LAYER_NAMES, c.layer_shape()))
        .collect();
    BertParams { word_embeddings, position_embeddings, token_type_embeddings, embeddings_layer_norm, layers }
}

/// The activation arena of one forward at (batch, seq).
#[derive(Clone, Debug)]
pub struct BertActs {
    pub batch: usize,
    pub seq: usize,
    /// word + position embeddings
    pub word_position: Tensor,
    /// word + position + token-type embeddings (the embedding layer norm's input)
    pub embeddings: Tensor,
    pub embeddings_ln: LayerNormActs,
    pub layers: Vec<LayerActs>,
}

/// Row `row` of a (rows, width) tensor, as a tensor of its own.
fn row_view(t: &Tensor, row: usize, width: usize) -> Tensor {
    Tensor::new(t.pool, t.offset + row * width, Shape::new(&[width]))
}

pub struct BertModel {
    pub config: BertConfig,
    pub params: BertParams,
    /// The parameter table: name → (offset, shape) in the parameter pool.
    pub table: Layout,
}

impl Component for BertModel {
    component_parts!(BertConfig, "text_encoder.params", allocate);
    /// A model with heads keeps its encoder under `bert.`; older checkpoints name LayerNorm's
    /// parameters gamma/beta.
    fn alias(name: &str) -> Option<String> {
        Some(canonical_name(name))
    }
    /// The pooler and any heads are not part of the encoder.
    fn is_ignored(name: &str) -> bool {
        is_ignored(name)
    }
    fn randomize(&self, backend: &dyn Backend, seed: u64) -> Result<()> {
        super::randomize(backend, &self.table, seed)?;
        // `randomize` recognises norms by a lower-case "norm"; BERT spells them "LayerNorm".
        for e in self.table.entries().iter().filter(|e| e.name.ends_with("LayerNorm.weight")) {
            let t = Tensor::new(self.table.pool(), e.offset, e.shape);
            backend.upload(&t, &vec![1.0; e.shape.numel()])?;
        }
        Ok(())
    }
}

impl BertModel {
    /// An arena planned for `forward` at (batch, seq) and, when `training`, the backward's
    /// temporaries on top (the gradient of the output lives elsewhere).
    pub fn allocate_arena(&self, backend: &mut dyn Backend, batch: usize, seq: usize, training: bool) -> Result<Arena> {
        let ids = vec![0u32; batch * seq];
        planned_arena(backend, "text_encoder.activations", |cx| {
            let acts = self.forward(cx, &ids, batch, seq, None)?;
            if training {
                let dout = Arena::planning().alloc([batch * seq, self.config.hidden_size])?;
                self.backward(cx, &self.params, &acts, &dout, &ids, None)?;
            }
            Ok(())
        })
    }

    /// The forward for `ids` (batch · seq token ids), every activation from the arena; the output
    /// is `last_hidden_state(..)` of what it returns. `mask` (batch · seq, nonzero = a real token)
    /// is the tokenizer's attention mask: pass it exactly when the pipeline would
    /// (`config.use_attention_mask`); `None` attends everywhere.
    pub fn forward(
        &self,
        cx: &mut Cx,
        ids: &[u32],
        batch: usize,
        seq: usize,
        mask: Option<&[u32]>,
    ) -> Result<BertActs> {
        let b = cx.b;
        let (rows, d) = (batch * seq, self.config.hidden_size);
        self.check_inputs(batch, seq, ids, mask)?;
        let p = &self.params;
        let word_position = cx.arena.alloc([rows, d])?;
        b.embedding_forward(
            &EmbeddingParams { batch, seq, dim: d },
            &EmbeddingForward { out: &word_position, ids, wte: &p.word_embeddings, wpe: &p.position_embeddings },
        )?;
        let token_type0 = row_view(&p.token_type_embeddings, 0, d);
        let token_type = BiasRowsParams { batch: 1, rows, channels: d };
        let embeddings = cx.arena.alloc([rows, d])?;
        b.add_bias_rows_forward(&token_type, &embeddings, &word_position, &token_type0)?;
        let embeddings_ln = p.embeddings_layer_norm.apply(cx, &embeddings, rows)?;
        let tokens = Tokens { batch, seq, key_mask: mask };
        let mut x = embeddings_ln.out;
        let mut layers = Vec::with_capacity(p.layers.len());
        for layer in &p.layers {
            let la = layer.forward(cx, &x, &tokens)?;
            x = layer.output(&la);
            layers.push(la);
        }
        Ok(BertActs { batch, seq, word_position, embeddings, embeddings_ln, layers })
    }

    /// `last_hidden_state` (batch, seq, C) of a forward's activations: the last layer's output.
    pub fn last_hidden_state(&self, acts: &BertActs) -> Tensor {
        let x = match (self.params.layers.last(), acts.layers.last()) {
            (Some(layer), Some(la)) => layer.output(la),
            _ => acts.embeddings_ln.out,
        };
        x.reshape([acts.batch, acts.seq, self.config.hidden_size])
    }

    fn check_inputs(&self, batch: usize, seq: usize, ids: &[u32], mask: Option<&[u32]>) -> Result<()> {
        let c = &self.config;
        if seq > c.max_position_embeddings {
            bail!("text encoder: {seq} tokens exceed max_position_embeddings {}", c.max_position_embeddings);
        }
        ensure!(ids.len() == batch * seq, "text encoder: {} ids for batch {batch} × seq {seq}", ids.len());
        if let Some(m) = mask {
            ensure!(
                m.len() == batch * seq,
                "text encoder: attention mask of {} for batch {batch} × seq {seq}",
                m.len()
            );
            if let Some(i) = (0..batch).find(|&i| m[i * seq..(i + 1) * seq].iter().all(|&x| x == 0)) {
                bail!("text encoder: the attention mask of sequence {i} is all zeros (no token to attend to)");
            }
        }
        Ok(())
    }

    /// The gradient buffers: the parameter layout bound to its own pool ("text_encoder.grads").
    pub fn allocate_grads(&self, backend: &mut dyn Backend) -> Result<(BertParams, Layout)> {
        let c = self.config.clone();
        allocate(backend, "text_encoder.grads", |l| params_layout(l, &c))
    }

    /// The backward pass of `forward` (whose `acts` it reads, with the same `ids` and `mask`):
    /// accumulates every parameter gradient into `g` for the gradient `dout` (batch · seq, hidden)
    /// of `last_hidden_state`. Temporaries come from `arena` and are released on return.
    pub fn backward(
        &self,
        cx: &mut Cx,
        g: &BertParams,
        acts: &BertActs,
        dout: &Tensor,
        ids: &[u32],
        mask: Option<&[u32]>,
    ) -> Result<()> {
        let b = cx.b;
        let c = &self.config;
        let p = &self.params;
        let (batch, seq, d) = (acts.batch, acts.seq, c.hidden_size);
        let rows = batch * seq;
        self.check_inputs(batch, seq, ids, mask)?;
        let mark = cx.arena.mark();
        let tokens = Tokens { batch, seq, key_mask: mask };
        // dx: the gradient of the current layer's output (`dout` itself for the last layer).
        let mut dx = *dout;
        for (i, ((layer, lg), la)) in p.layers.iter().zip(&g.layers).zip(&acts.layers).enumerate().rev() {
            let x_in = if i == 0 { acts.embeddings_ln.out } else { p.layers[i - 1].output(&acts.layers[i - 1]) };
            dx = layer.backward(cx, lg, la, &x_in, &dx, &tokens)?;
        }
        // embeddings_ln.out = LN(word + position + token_type[0])
        let demb = zeros(cx, [rows, d])?;
        p.embeddings_layer_norm.backward(
            &g.embeddings_layer_norm,
            b,
            &demb,
            &dx,
            &acts.embeddings,
            &acts.embeddings_ln,
        )?;
        let token_type = BiasRowsParams { batch: 1, rows, channels: d };
        b.add_bias_rows_backward(&token_type, &row_view(&g.token_type_embeddings, 0, d), &demb)?;
        // nn.Embedding(padding_idx=pad) never writes the pad row's gradient: keep it as it was.
        let pad_row = c.pad_token_id.map(|pad| row_view(&g.word_embeddings, pad, d));
        let saved = match pad_row {
            Some(row) => {
                let s = zeros(cx, [d])?;
                b.accumulate(&s, &row, d)?;
                Some((row, s))
            }
            None => None,
        };
        b.embedding_backward(
            &EmbeddingParams { batch, seq, dim: d },
            &EmbeddingBackward { dwte: &g.word_embeddings, dwpe: &g.position_embeddings, dout: &demb, ids },
        )?;
        if let Some((row, s)) = saved {
            b.zero(&row)?;
            b.accumulate(&row, &s, d)?;
        }
        cx.arena.release_all_to(mark);
        Ok(())
    }
}

/// The name a checkpoint tensor has in our table: without the `bert.` prefix of models with
/// heads, and with TF-era `gamma`/`beta` layer-norm names mapped to `weight`/`bias`.
fn canonical_name(name: &str) -> String {
    let n = name.strip_prefix("bert.").unwrap_or(name);
    if let Some(base) = n.strip_suffix("LayerNorm.gamma") {
        format!("{base}LayerNorm.weight")
    } else if let Some(base) = n.strip_suffix("LayerNorm.beta") {
        format!("{base}LayerNorm.bias")
    } else {
        n.to_string()
    }
}

/// Tensors a BERT checkpoint may carry that the text encoder does not use: buffers, the pooler,
/// and the heads of BertForMaskedLM / BertForPreTraining / BertForSequenceClassification.
fn is_ignored(name: &str) -> bool {
    let n = name.strip_prefix("bert.").unwrap_or(name);
    weights::is_known_buffer(name)
        || n.starts_with("pooler.")
        || name.starts_with("cls.")
        || name.starts_with("classifier.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_map_to_the_table() {
        assert_eq!(canonical_name("bert.embeddings.LayerNorm.gamma"), "embeddings.LayerNorm.weight");
        assert_eq!(canonical_name("encoder.layer.3.output.LayerNorm.beta"), "encoder.layer.3.output.LayerNorm.bias");
        assert_eq!(
            canonical_name("bert.encoder.layer.0.attention.self.query.weight"),
            "encoder.layer.0.attention.self.query.weight"
        );
        assert!(is_ignored("bert.pooler.dense.weight") && is_ignored("pooler.dense.bias"));
        assert!(is_ignored("cls.predictions.bias") && is_ignored("bert.embeddings.position_ids"));
        assert!(!is_ignored("encoder.layer.0.attention.self.query.weight") && !is_ignored("text_model.x"));
    }

    #[test]
    fn bert_base_has_its_published_parameter_count() {
        // bert-base-uncased without the pooler: 109,482,240 − 768·768 − 768.
        let c = BertConfig::from_json(&serde_json::json!({"model_type": "bert"}), Path::new("config.json")).unwrap();
        assert_eq!(Layout::measure(|l| params_layout(l, &c)).numel(), 109_482_240 - 768 * 768 - 768);
    }
}

//! The text side of a pipeline, whichever family it is: CLIP (Stable Diffusion's) or a BERT-family
//! domain encoder (the paper's RadBERT/SapBERT experiments), with the matching tokenizer. The
//! pipeline and the trainer use only this interface.

use super::bert::{BertActs, BertConfig, BertModel, BertParams};
use super::clip::{ClipActs, ClipParams, ClipTextConfig, ClipTextModel};
use crate::backend::Backend;
use crate::models::Component;
use crate::nn::Cx;
use crate::tensor::{Arena, Layout, Tensor};
use crate::text::bpe::ClipTokenizer;
use crate::text::wordpiece::WordPieceTokenizer;
use crate::{io::weights, io::weights::LoadReport};
use anyhow::{bail, Result};
use std::path::Path;

/// One prompt, tokenized: padded ids, the attention mask (1 for real tokens), the token count
/// before truncation, whether it was truncated.
#[derive(Clone, Debug)]
pub struct TextTokens {
    pub ids: Vec<u32>,
    pub mask: Vec<u32>,
    pub tokens: usize,
    pub truncated: bool,
}

pub enum TextTokenizer {
    Clip(ClipTokenizer),
    WordPiece(WordPieceTokenizer),
}

impl TextTokenizer {
    /// A tokenizer folder: WordPiece when it has a `vocab.txt` (or a tokenizer.json with a WordPiece
    /// model), else CLIP's BPE. A pipeline folder, or a folder holding `tokenizer/`, is resolved to
    /// its tokenizer first (see [`crate::text::bpe::tokenizer_dir`]): the family is decided by the
    /// files, so the folder they are in must be found before looking.
    pub fn from_dir(dir: &Path) -> Result<TextTokenizer> {
        let dir = &crate::text::bpe::tokenizer_dir(dir)?;
        let is_wordpiece = dir.join("vocab.txt").is_file()
            || weights::read_json(&dir.join("tokenizer.json"))
                .ok()
                .and_then(|j| j.pointer("/model/type").and_then(|t| t.as_str()).map(|t| t == "WordPiece"))
                .unwrap_or(false);
        Ok(if is_wordpiece {
            TextTokenizer::WordPiece(WordPieceTokenizer::from_dir(dir)?)
        } else {
            TextTokenizer::Clip(ClipTokenizer::from_dir(dir)?)
        })
    }

    pub fn max_length(&self) -> usize {
        match self {
            TextTokenizer::Clip(t) => t.max_length,
            TextTokenizer::WordPiece(t) => t.max_length,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            TextTokenizer::Clip(t) => t.vocab_size(),
            TextTokenizer::WordPiece(t) => t.vocab_size(),
        }
    }

    pub fn encode(&self, text: &str) -> TextTokens {
        match self {
            TextTokenizer::Clip(t) => {
                let e = t.encode(text);
                let real = e.tokens.min(t.max_length);
                let mask = (0..e.ids.len()).map(|i| (i < real) as u32).collect();
                TextTokens { ids: e.ids, mask, tokens: e.tokens, truncated: e.truncated }
            }
            TextTokenizer::WordPiece(t) => {
                let e = t.encode(text);
                TextTokens { ids: e.ids, mask: e.attention_mask, tokens: e.tokens, truncated: e.truncated }
            }
        }
    }
}

pub enum TextEncoder {
    Clip(ClipTextModel),
    Bert(BertModel),
}

/// The activations of one text-encoder forward.
pub enum TextActs {
    Clip(ClipActs),
    Bert(BertActs),
}

/// The gradient buffers of a text encoder.
pub enum TextGrads {
    Clip(ClipParams),
    Bert(BertParams),
}

/// Whether a text_encoder/config.json describes a BERT-family model.
fn is_bert(config: &serde_json::Value) -> bool {
    let mt = config.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let arch = config.pointer("/architectures/0").and_then(|v| v.as_str()).unwrap_or("");
    matches!(mt, "bert" | "roberta") || arch.starts_with("Bert")
}

impl TextEncoder {
    pub fn load(b: &mut dyn Backend, dir: &Path, variant: Option<&str>) -> Result<(TextEncoder, LoadReport)> {
        Self::load_as(b, dir, variant, false)
    }

    /// As `load`, for weights that will not change (see `Component::load_frozen`).
    pub fn load_frozen(b: &mut dyn Backend, dir: &Path, variant: Option<&str>) -> Result<(TextEncoder, LoadReport)> {
        Self::load_as(b, dir, variant, true)
    }

    fn load_as(
        b: &mut dyn Backend,
        dir: &Path,
        variant: Option<&str>,
        frozen: bool,
    ) -> Result<(TextEncoder, LoadReport)> {
        let cfg = weights::read_json(&dir.join("config.json"))?;
        Ok(if is_bert(&cfg) {
            let (m, r) = BertModel::load_as(b, dir, variant, frozen)?;
            (TextEncoder::Bert(m), r)
        } else {
            let (m, r) = ClipTextModel::load_as(b, dir, variant, frozen)?;
            (TextEncoder::Clip(m), r)
        })
    }

    /// The architecture of `dir/config.json` with random weights.
    pub fn random(b: &mut dyn Backend, dir: &Path, seed: u64) -> Result<TextEncoder> {
        let path = dir.join("config.json");
        let cfg = weights::read_json(&path)?;
        Ok(if is_bert(&cfg) {
            TextEncoder::Bert(BertModel::random(b, BertConfig::from_json(&cfg, &path)?, seed)?)
        } else {
            TextEncoder::Clip(ClipTextModel::random(b, ClipTextConfig::from_json(&cfg, &path)?, seed)?)
        })
    }

    /// The architecture of `dir/config.json` with PyTorch's default initialisation, for a text
    /// encoder trained from scratch.
    pub fn init_default(b: &mut dyn Backend, dir: &Path, seed: u64) -> Result<TextEncoder> {
        let te = TextEncoder::allocate(b, dir)?;
        super::init_default(b, te.table(), seed)?;
        Ok(te)
    }

    /// The architecture of `dir/config.json`, its parameters allocated and not filled (zeros; or
    /// nothing at all on the planning backend).
    pub fn allocate(b: &mut dyn Backend, dir: &Path) -> Result<TextEncoder> {
        let path = dir.join("config.json");
        let cfg = weights::read_json(&path)?;
        Ok(if is_bert(&cfg) {
            TextEncoder::Bert(BertModel::allocate(b, BertConfig::from_json(&cfg, &path)?)?)
        } else {
            TextEncoder::Clip(ClipTextModel::allocate(b, ClipTextConfig::from_json(&cfg, &path)?)?)
        })
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            TextEncoder::Clip(m) => m.config.hidden_size,
            TextEncoder::Bert(m) => m.config.hidden_size,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            TextEncoder::Clip(m) => m.config.vocab_size,
            TextEncoder::Bert(m) => m.config.vocab_size,
        }
    }

    /// The parameter table (name → offset, shape).
    pub fn table(&self) -> &Layout {
        match self {
            TextEncoder::Clip(m) => &m.table,
            TextEncoder::Bert(m) => &m.table,
        }
    }

    pub fn num_params(&self) -> usize {
        self.table().numel()
    }

    /// The attention mask is passed only when the config asks for it (diffusers' rule); CLIP as
    /// Stable Diffusion uses it never takes one.
    pub fn uses_attention_mask(&self) -> bool {
        matches!(self, TextEncoder::Bert(m) if m.config.use_attention_mask)
    }

    /// An arena planned for `forward` at (batch, seq) and, when `training`, the backward's
    /// temporaries on top.
    pub fn allocate_arena(&self, b: &mut dyn Backend, batch: usize, seq: usize, training: bool) -> Result<Arena> {
        match self {
            TextEncoder::Clip(m) => m.allocate_arena(b, batch, seq, training),
            TextEncoder::Bert(m) => m.allocate_arena(b, batch, seq, training),
        }
    }

    /// The forward for `ids` (batch · seq), its activations from the arena. `mask` is used only if
    /// `uses_attention_mask`.
    pub fn forward(&self, cx: &mut Cx, ids: &[u32], mask: &[u32], batch: usize, seq: usize) -> Result<TextActs> {
        let mask = self.uses_attention_mask().then_some(mask);
        Ok(match self {
            TextEncoder::Clip(m) => TextActs::Clip(m.forward(cx, ids, batch, seq)?),
            TextEncoder::Bert(m) => TextActs::Bert(m.forward(cx, ids, batch, seq, mask)?),
        })
    }

    /// `last_hidden_state` (batch, seq, hidden) of a forward's activations.
    pub fn last_hidden_state(&self, acts: &TextActs) -> Result<Tensor> {
        match (self, acts) {
            (TextEncoder::Clip(m), TextActs::Clip(a)) => Ok(m.last_hidden_state(a)),
            (TextEncoder::Bert(m), TextActs::Bert(a)) => Ok(m.last_hidden_state(a)),
            _ => bail!("internal: text encoder and activations of different families"),
        }
    }

    pub fn allocate_grads(&self, b: &mut dyn Backend) -> Result<(TextGrads, Layout)> {
        Ok(match self {
            TextEncoder::Clip(m) => {
                let (g, t) = m.allocate_grads(b)?;
                (TextGrads::Clip(g), t)
            }
            TextEncoder::Bert(m) => {
                let (g, t) = m.allocate_grads(b)?;
                (TextGrads::Bert(g), t)
            }
        })
    }

    pub fn backward(
        &self,
        cx: &mut Cx,
        g: &TextGrads,
        acts: &TextActs,
        dout: &Tensor,
        ids: &[u32],
        mask: &[u32],
    ) -> Result<()> {
        let mask = self.uses_attention_mask().then_some(mask);
        match (self, g, acts) {
            (TextEncoder::Clip(m), TextGrads::Clip(g), TextActs::Clip(a)) => m.backward(cx, g, a, dout, ids),
            (TextEncoder::Bert(m), TextGrads::Bert(g), TextActs::Bert(a)) => m.backward(cx, g, a, dout, ids, mask),
            _ => bail!("internal: text encoder, gradients and activations of different families"),
        }
    }

    /// The weight file name transformers expects in the component folder.
    pub fn weights_file_name(&self) -> &'static str {
        "model.safetensors"
    }
}

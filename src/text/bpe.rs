//! The CLIP BPE tokenizer, exact against transformers' `CLIPTokenizer` as Stable Diffusion v1 calls
//! it (`padding="max_length", max_length=77, truncation=True`).
//!
//! transformers ≥ 5 runs CLIP through the `tokenizers` pipeline, which this reproduces step by step:
//! 1. added (special) tokens are split out first: those marked `normalized: false` on the raw text,
//!    the others after normalization (so "<|STARTOFTEXT|>" is BOS but "<|ENDOFTEXT|>" is not);
//! 2. normalization: NFC, every run of whitespace → one space, per-character lower-casing (no
//!    final-sigma rule: "Σ" → "σ" wherever it stands);
//! 3. pre-tokenization: CLIP's regex keeps letters runs, single digits, punctuation runs and
//!    contractions; then the byte-level step splits each piece again with GPT-2's regex (which
//!    matters only for pieces such as "<|endoftext|>" that mix classes) and maps bytes to
//!    printable characters;
//! 4. BPE with the merge ranks, "</w>" appended to the last symbol of each piece;
//! 5. `<|startoftext|>` … `<|endoftext|>` around the ids, truncation keeping EOS last, padding.
//!
//! We write it ourselves rather than through the `tokenizers` crate: it is ~300 lines, it has no C
//! dependency, and every quirk above is visible and tested against the reference.

use super::{tokenize_around_added, AddedToken};
use crate::io::weights::read_json;
use anyhow::{bail, Context, Result};
use regex::Regex;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use unicode_normalization::UnicodeNormalization;

const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// GPT-2's byte-level split, less its whitespace alternatives (CLIP's pieces hold no whitespace).
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";
const END_OF_WORD: &str = "</w>";

/// How the built-in tokenizer names itself in messages and summaries.
pub const BUILTIN_SD_V1: &str = "built-in SD v1 CLIP tokenizer (openai/clip-vit-large-patch14)";
const SD_V1_VOCAB: &str = include_str!("../../weights/sd-v1-4-config/tokenizer/vocab.json");
const SD_V1_MERGES: &str = include_str!("../../weights/sd-v1-4-config/tokenizer/merges.txt");
const SD_V1_CONFIG: &str = include_str!("../../weights/sd-v1-4-config/tokenizer/tokenizer_config.json");
const SD_V1_SPECIAL: &str = include_str!("../../weights/sd-v1-4-config/tokenizer/special_tokens_map.json");

/// The files whose presence makes a folder a tokenizer folder (CLIP's or BERT's).
const TOKENIZER_FILES: [&str; 4] = ["vocab.json", "merges.txt", "tokenizer.json", "vocab.txt"];

/// The folder holding a tokenizer's files, from what a user may pass: a diffusers pipeline folder
/// (its `tokenizer/`, after checking model_index.json), a tokenizer folder itself, or a folder
/// without tokenizer files that holds a `tokenizer/` subfolder (a pipeline saved without
/// model_index.json, or a text encoder folder with its tokenizer beside the weights). Errors name
/// the path.
pub fn tokenizer_dir(dir: &Path) -> Result<PathBuf> {
    if !dir.exists() {
        bail!("{}: no such tokenizer folder", dir.display());
    }
    if !dir.is_dir() {
        bail!("{}: not a folder (give a tokenizer folder, or a pipeline folder with tokenizer/)", dir.display());
    }
    if crate::io::weights::is_pipeline_folder(dir) {
        return crate::io::weights::component_dir(dir, "tokenizer");
    }
    let sub = dir.join("tokenizer");
    if !TOKENIZER_FILES.iter().any(|f| dir.join(f).is_file()) && sub.is_dir() {
        return Ok(sub);
    }
    Ok(dir.to_path_buf())
}

/// One prompt, tokenized as the text encoder receives it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Encoding {
    /// Exactly `max_length` ids: BOS, tokens, EOS, then padding.
    pub ids: Vec<u32>,
    /// Token count including BOS and EOS, before truncation and padding.
    pub tokens: usize,
    pub truncated: bool,
}

pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    merges: HashMap<(String, String), u32>,
    added: Vec<AddedToken>,
    byte_chars: [char; 256],
    clip_re: Regex,
    byte_level_re: Regex,
    ws_re: Regex,
    pub bos_id: u32,
    pub eos_id: u32,
    pub pad_id: u32,
    pub max_length: usize,
    /// Where it was loaded from, for messages.
    pub source: PathBuf,
}

/// GPT-2/CLIP's reversible map from bytes to printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut map = ['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        map[b as usize] = char::from_u32(c).unwrap();
    }
    map
}

/// A token given in a config as `"text"` or `{"content": "text", ...}` (or the old `__type` form).
fn token_content(v: &Value) -> Option<(String, Option<bool>)> {
    match v {
        Value::String(s) => Some((s.clone(), None)),
        Value::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(|c| (c.to_string(), o.get("normalized").and_then(|n| n.as_bool()))),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `vocab.json` + `merges.txt` (+ `tokenizer_config.json`,
    /// `special_tokens_map.json`), or a lone `tokenizer.json`. A pipeline folder, or any folder
    /// holding a `tokenizer/` subfolder, is accepted too (see [`tokenizer_dir`]).
    pub fn from_dir(dir: &Path) -> Result<ClipTokenizer> {
        let dir = tokenizer_dir(dir)?;
        let (vocab_path, merges_path, json_path) =
            (dir.join("vocab.json"), dir.join("merges.txt"), dir.join("tokenizer.json"));
        let config = super::read_tokenizer_config(&dir)?;
        if vocab_path.is_file() && merges_path.is_file() {
            let vocab = read_json(&vocab_path)?;
            let merges = std::fs::read_to_string(&merges_path)
                .with_context(|| format!("{}: cannot read", merges_path.display()))?;
            Self::from_vocab_merges(&vocab, &vocab_path, &merges, &merges_path, &config, &dir)
        } else if json_path.is_file() {
            Self::from_tokenizer_json(&json_path, &config, &dir)
        } else {
            bail!(
                "{}: not a CLIP tokenizer folder: expected vocab.json and merges.txt, or tokenizer.json",
                dir.display()
            )
        }
    }

    /// The Stable Diffusion v1 tokenizer (openai/clip-vit-large-patch14, as
    /// `weights/sd-v1-4-config/tokenizer` holds it), compiled into the binary: `prepare` and
    /// `eval ms-ssim` need only this tokenizer, and a default path relative to the checkout would
    /// break them when run from any other folder.
    pub fn sd_v1() -> Result<ClipTokenizer> {
        let source = Path::new(BUILTIN_SD_V1);
        let parse = |text: &str, name: &str| -> Result<Value> {
            serde_json::from_str(text).with_context(|| format!("{BUILTIN_SD_V1}: {name} is not valid JSON"))
        };
        let mut config = serde_json::Map::new();
        for (text, name) in [(SD_V1_CONFIG, "tokenizer_config.json"), (SD_V1_SPECIAL, "special_tokens_map.json")] {
            match parse(text, name)? {
                Value::Object(o) => config.extend(o),
                _ => bail!("{BUILTIN_SD_V1}: {name}: expected a JSON object"),
            }
        }
        let vocab = parse(SD_V1_VOCAB, "vocab.json")?;
        Self::from_vocab_merges(
            &vocab,
            &source.join("vocab.json"),
            SD_V1_MERGES,
            &source.join("merges.txt"),
            &config,
            source,
        )
    }

    /// The tokenizer in `dir` when given, else the built-in SD v1 one ([`ClipTokenizer::sd_v1`]).
    pub fn from_dir_or_sd_v1(dir: Option<&Path>) -> Result<ClipTokenizer> {
        match dir {
            Some(d) => Self::from_dir(d),
            None => Self::sd_v1(),
        }
    }

    /// From a parsed vocab.json and the text of merges.txt (the paths are for messages).
    fn from_vocab_merges(
        vocab: &Value,
        vocab_path: &Path,
        text: &str,
        merges_path: &Path,
        config: &serde_json::Map<String, Value>,
        dir: &Path,
    ) -> Result<ClipTokenizer> {
        let vocab = parse_vocab(vocab, vocab_path)?;
        if text.trim().is_empty() {
            // An empty download tokenizes letter by letter without a word of warning.
            bail!("{}: the file is empty; a CLIP merges.txt lists the BPE merges, one pair per line (truncated download?)", merges_path.display());
        }
        let mut merges = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => bail!("{}:{}: expected two symbols separated by one space", merges_path.display(), i + 1),
            }
        }
        // The special tokens, in transformers' registration order; a later one with the same text
        // sets the flags (a token given as a bare string is not normalized).
        let mut added: Vec<AddedToken> = Vec::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            let default = if key == "bos_token" { "<|startoftext|>" } else { "<|endoftext|>" };
            let (content, normalized) = config.get(key).and_then(token_content).unwrap_or((default.into(), None));
            let id = *vocab.get(&content).with_context(|| {
                format!("{}: {key} '{content}' is not in the vocabulary {}", dir.display(), vocab_path.display())
            })?;
            added.retain(|t| t.content != content);
            added.push(AddedToken { content, id, normalized: normalized.unwrap_or(false) });
        }
        Self::build(vocab, merges, added, config, None, dir)
    }

    fn from_tokenizer_json(path: &Path, config: &serde_json::Map<String, Value>, dir: &Path) -> Result<ClipTokenizer> {
        let j = read_json(path)?;
        let model = j.get("model").with_context(|| format!("{}: no \"model\"", path.display()))?;
        let ty = model.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let suffix = model.get("end_of_word_suffix").and_then(|t| t.as_str()).unwrap_or("");
        if ty != "BPE" || suffix != END_OF_WORD {
            bail!(
                "{}: not a CLIP tokenizer (model type '{ty}', end_of_word_suffix '{suffix}'; expected BPE with '</w>')",
                path.display()
            );
        }
        let vocab =
            parse_vocab(model.get("vocab").with_context(|| format!("{}: no model.vocab", path.display()))?, path)?;
        let raw = model
            .get("merges")
            .and_then(|m| m.as_array())
            .with_context(|| format!("{}: no model.merges list", path.display()))?;
        let mut merges = Vec::with_capacity(raw.len());
        for (i, m) in raw.iter().enumerate() {
            // Older files write "a b", newer ones ["a", "b"].
            let pair = match m {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
                Value::Array(a) if a.len() == 2 => {
                    a[0].as_str().zip(a[1].as_str()).map(|(x, y)| (x.to_string(), y.to_string()))
                }
                _ => None,
            };
            merges
                .push(pair.with_context(|| format!("{}: model.merges[{i}] is not a pair of symbols", path.display()))?);
        }
        let mut added = Vec::new();
        for t in j.get("added_tokens").and_then(|a| a.as_array()).into_iter().flatten() {
            let content = t.get("content").and_then(|c| c.as_str());
            let id = t.get("id").and_then(|c| c.as_u64());
            let (Some(content), Some(id)) = (content, id) else {
                bail!("{}: an added_tokens entry lacks content or id", path.display());
            };
            let normalized = t.get("normalized").and_then(|n| n.as_bool()).unwrap_or(false);
            added.push(AddedToken { content: content.to_string(), id: id as u32, normalized });
        }
        // Without a tokenizer_config.json, take what tokenizer.json itself says, then SD v1's values.
        let json_max = j
            .pointer("/truncation/max_length")
            .or_else(|| j.pointer("/padding/strategy/Fixed"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize);
        let mut config = config.clone();
        if !config.contains_key("pad_token") {
            if let Some(p) = j.pointer("/padding/pad_token").and_then(|v| v.as_str()) {
                config.insert("pad_token".into(), Value::String(p.into()));
            }
        }
        Self::build(vocab, merges, added, &config, json_max, dir)
    }

    fn build(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        added: Vec<AddedToken>,
        config: &serde_json::Map<String, Value>,
        fallback_max: Option<usize>,
        dir: &Path,
    ) -> Result<ClipTokenizer> {
        let id_of = |key: &str, default: &str| -> Result<u32> {
            let content = config.get(key).and_then(token_content).map(|(c, _)| c).unwrap_or(default.to_string());
            vocab
                .get(&content)
                .copied()
                .with_context(|| format!("{}: {key} '{content}' is not in the vocabulary", dir.display()))
        };
        let bos_id = id_of("bos_token", "<|startoftext|>")?;
        let eos_id = id_of("eos_token", "<|endoftext|>")?;
        let pad_id = id_of("pad_token", "<|endoftext|>")?;
        // transformers' "no limit" sentinel is a huge number; SD's pipelines use 77.
        let max_length = match config.get("model_max_length").and_then(|v| v.as_u64()) {
            Some(n) if n <= 1 << 20 => n as usize,
            _ => fallback_max.unwrap_or(77),
        };
        if max_length < 2 {
            bail!("{}: model_max_length {max_length} leaves no room for BOS and EOS", dir.display());
        }
        let byte_chars = bytes_to_unicode();
        for c in byte_chars {
            for s in [c.to_string(), format!("{c}{END_OF_WORD}")] {
                if !vocab.contains_key(&s) {
                    bail!("{}: the vocabulary lacks the byte symbol '{s}' (not a CLIP vocabulary)", dir.display());
                }
            }
        }
        let merges = merges.into_iter().enumerate().map(|(i, p)| (p, i as u32)).collect();
        Ok(ClipTokenizer {
            vocab,
            merges,
            added,
            byte_chars,
            clip_re: Regex::new(CLIP_PATTERN).expect("static regex"),
            byte_level_re: Regex::new(BYTE_LEVEL_PATTERN).expect("static regex"),
            ws_re: Regex::new(r"\s+").expect("static regex"),
            bos_id,
            eos_id,
            pad_id,
            max_length,
            source: dir.to_path_buf(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Token ids of `text` without BOS/EOS, untruncated.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        tokenize_around_added(text, &self.added, |t| self.normalize(t), |piece, ids| self.encode_normalized(piece, ids))
    }

    fn normalize(&self, text: &str) -> String {
        let nfc: String = text.nfc().collect();
        let spaced = self.ws_re.replace_all(&nfc, " ");
        spaced.chars().flat_map(char::to_lowercase).collect()
    }

    fn encode_normalized(&self, text: &str, ids: &mut Vec<u32>) {
        for piece in self.clip_re.find_iter(text) {
            for word in self.byte_level_re.find_iter(piece.as_str()) {
                let mapped: String = word.as_str().bytes().map(|b| self.byte_chars[b as usize]).collect();
                self.bpe(&mapped, ids);
            }
        }
    }

    /// Applies the merges to one word, lowest rank first, every occurrence of a pair at once.
    fn bpe(&self, word: &str, ids: &mut Vec<u32>) {
        let chars: Vec<char> = word.chars().collect();
        let mut symbols: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str(END_OF_WORD);
        }
        loop {
            let best = symbols.windows(2).filter_map(|w| self.merges.get(&(w[0].clone(), w[1].clone())).copied()).min();
            let Some(rank) = best else { break };
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len()
                    && self.merges.get(&(symbols[i].clone(), symbols[i + 1].clone())) == Some(&rank)
                {
                    merged.push(format!("{}{}", symbols[i], symbols[i + 1]));
                    i += 2;
                } else {
                    merged.push(std::mem::take(&mut symbols[i]));
                    i += 1;
                }
            }
            symbols = merged;
        }
        for s in symbols {
            // Every byte symbol is in the vocabulary (checked at load), and merges produce vocabulary
            // entries in a consistent CLIP vocabulary; fall back to EOS (CLIP's unk) otherwise.
            ids.push(self.vocab.get(&s).copied().unwrap_or(self.eos_id));
        }
    }

    /// Tokenizes as the pipeline feeds the text encoder: BOS + ids + EOS, truncated to
    /// `max_length` with EOS kept last, padded with the pad token.
    pub fn encode(&self, text: &str) -> Encoding {
        let body = self.tokenize(text);
        let tokens = body.len() + 2;
        let keep = body.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Encoding { ids, tokens, truncated: tokens > self.max_length }
    }
}

fn parse_vocab(v: &Value, path: &Path) -> Result<HashMap<String, u32>> {
    let obj = v.as_object().with_context(|| format!("{}: the vocabulary is not a JSON object", path.display()))?;
    obj.iter()
        .map(|(k, id)| {
            id.as_u64()
                .filter(|&i| i <= u32::MAX as u64)
                .map(|i| (k.clone(), i as u32))
                .with_context(|| format!("{}: vocabulary entry '{k}' has no integer id", path.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection_onto_printable_chars() {
        let m = bytes_to_unicode();
        let mut seen = std::collections::HashSet::new();
        for c in m {
            assert!(!c.is_whitespace() && !c.is_control(), "{c:?}");
            assert!(seen.insert(c));
        }
        assert_eq!(m[b'a' as usize], 'a');
        assert_eq!(m[b' ' as usize], 'Ġ');
    }
}

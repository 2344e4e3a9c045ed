//! The WordPiece tokenizer of BERT text encoders (RadBERT, SapBERT), exact against transformers 5's
//! `BertTokenizer.from_pretrained(dir)`, which is the `tokenizers`-backed class (`TokenizersBackend`;
//! the pure-Python one survives only as `tokenization_bert_legacy`). Its pipeline, step by step:
//! 1. special tokens ([PAD], [UNK], [CLS], [SEP], [MASK]; `normalized: false`) are split out of the
//!    raw text first, case-sensitively: "[MASK]" is one token, "[mask]" is five pieces of text;
//! 2. `BertNormalizer`: clean_text drops NUL, U+FFFD and "other" characters (Cc, Cf, Co; but not
//!    \t \n \r) and maps whitespace to ' '; CJK ideographs get a space on each side; accents are
//!    stripped (NFD, then non-spacing marks dropped) when `strip_accents`, which defaults to
//!    `do_lower_case`; lower-casing is per character (no final-sigma rule, "İ" → "i̇");
//! 3. `BertPreTokenizer`: split on whitespace (dropped) and punctuation (each mark its own word);
//! 4. WordPiece per word: greedy longest match from the left, continuations prefixed "##"; a word
//!    with any unmatched remainder, or of more than 100 characters, is one [UNK];
//! 5. [CLS] … [SEP], truncated to `max_length` keeping [SEP] last, padded with [PAD].
//!
//! The character classes of steps 2–3 are not today's Unicode: `tokenizers` takes them from the
//! `unicode_categories` crate, whose tables are years older (e.g. U+166D is punctuation there, and
//! marks added to Unicode since are not stripped). The tables below are that reference's, probed
//! on every code point by tests/fixtures/generate_bert.py (`unicode --print-rust`), and
//! tests/bert.rs checks them against the probe again.
//!
//! `max_length` is 77 whatever the folder's `model_max_length` (BERT's is 512): RoentGen keeps the
//! CLIP tokenizer's limit for every text encoder so that the U-Net sees the same context length.

use super::{tokenize_around_added, AddedToken};
use crate::io::weights::read_json;
use crate::text::bpe::Encoding;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use unicode_normalization::UnicodeNormalization;

/// The context length the paper keeps for every text encoder (CLIP's).
pub const MAX_LENGTH: usize = 77;

/// One prompt as a BERT text encoder receives it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WordPieceEncoding {
    /// Exactly `max_length` ids: [CLS], tokens, [SEP], then [PAD].
    pub ids: Vec<u32>,
    /// 1 for [CLS], the tokens and [SEP]; 0 for padding (what transformers returns as
    /// `attention_mask`, passed to the encoder when its config sets `use_attention_mask`).
    pub attention_mask: Vec<u32>,
    /// Token count including [CLS] and [SEP], before truncation and padding.
    pub tokens: usize,
    pub truncated: bool,
}

impl WordPieceEncoding {
    /// The CLIP tokenizer's encoding type (ids, tokens, truncated), for code that handles both.
    pub fn to_encoding(&self) -> Encoding {
        Encoding { ids: self.ids.clone(), tokens: self.tokens, truncated: self.truncated }
    }
}

pub struct WordPieceTokenizer {
    vocab: HashMap<String, u32>,
    /// id → token, for `id_to_token`.
    tokens: HashMap<u32, String>,
    added: Vec<AddedToken>,
    continuing_prefix: String,
    max_input_chars_per_word: usize,
    /// `do_lower_case`
    pub lowercase: bool,
    /// `strip_accents` (absent or null: follows `do_lower_case`, as in the original BERT)
    pub strip_accents: bool,
    /// `tokenize_chinese_chars`
    pub chinese_chars: bool,
    pub unk_id: u32,
    pub cls_id: u32,
    pub sep_id: u32,
    pub pad_id: u32,
    pub mask_id: u32,
    /// Ids per prompt, [CLS] and [SEP] included: `MAX_LENGTH` unless changed.
    pub max_length: usize,
    /// Where it was loaded from, for messages.
    pub source: PathBuf,
}

/// A token given in a config as `"text"` or `{"content": "text", ...}`.
fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl WordPieceTokenizer {
    /// Loads a BERT tokenizer folder: `vocab.txt` (as RadBERT and SapBERT are published) or
    /// `tokenizer.json` (what transformers 5's `save_pretrained` writes), with
    /// `tokenizer_config.json` / `special_tokens_map.json` for the options and special tokens. As
    /// transformers 5 does, the options come from tokenizer_config.json (defaults: lower-casing,
    /// Chinese-character splitting) even when tokenizer.json has a normalizer of its own. A
    /// pipeline folder is accepted too (its `tokenizer/` is used).
    pub fn from_dir(dir: &Path) -> Result<WordPieceTokenizer> {
        let dir = crate::text::bpe::tokenizer_dir(dir)?;
        let config = super::read_tokenizer_config(&dir)?;
        let (vocab_path, json_path) = (dir.join("vocab.txt"), dir.join("tokenizer.json"));
        let (mut vocab, mut added, mut prefix, mut max_chars) = (HashMap::new(), Vec::new(), "##".to_string(), 100);
        if vocab_path.is_file() {
            vocab = read_vocab_txt(&vocab_path)?;
        } else if json_path.is_file() {
            let j = read_json(&json_path)?;
            let model = j.get("model").with_context(|| format!("{}: no \"model\"", json_path.display()))?;
            let ty = model.get("type").and_then(|t| t.as_str()).unwrap_or("");
            if ty != "WordPiece" {
                bail!("{}: not a WordPiece tokenizer (model type '{ty}')", json_path.display());
            }
            let obj = model
                .get("vocab")
                .and_then(|v| v.as_object())
                .with_context(|| format!("{}: no model.vocab object", json_path.display()))?;
            for (k, id) in obj {
                let id = id
                    .as_u64()
                    .filter(|&i| i <= u32::MAX as u64)
                    .with_context(|| format!("{}: vocabulary entry '{k}' has no integer id", json_path.display()))?;
                vocab.insert(k.clone(), id as u32);
            }
            if let Some(p) = model.get("continuing_subword_prefix").and_then(|p| p.as_str()) {
                prefix = p.to_string();
            }
            if let Some(n) = model.get("max_input_chars_per_word").and_then(|n| n.as_u64()) {
                max_chars = n as usize;
            }
            for t in j.get("added_tokens").and_then(|a| a.as_array()).into_iter().flatten() {
                let (Some(content), Some(id)) =
                    (t.get("content").and_then(|c| c.as_str()), t.get("id").and_then(|i| i.as_u64()))
                else {
                    bail!("{}: an added_tokens entry lacks content or id", json_path.display());
                };
                let normalized = t.get("normalized").and_then(|n| n.as_bool()).unwrap_or(false);
                added.push(AddedToken { content: content.to_string(), id: id as u32, normalized });
            }
        } else {
            bail!("{}: not a BERT tokenizer folder: expected vocab.txt or tokenizer.json", dir.display());
        }
        if vocab.is_empty() {
            bail!("{}: the vocabulary is empty", dir.display());
        }
        // The special tokens, as BertTokenizer registers them (not normalized); one missing from
        // the vocabulary is appended after it, as transformers does ([MASK] is often absent).
        let mut next_id = vocab.values().max().map_or(0, |&m| m + 1);
        let mut special = |key: &str, default: &str, required: bool| -> Result<u32> {
            let content = config.get(key).and_then(token_content).unwrap_or_else(|| default.to_string());
            let id = match vocab.get(&content) {
                Some(&id) => id,
                None if !required => {
                    next_id += 1;
                    next_id - 1
                }
                None => bail!("{}: {key} '{content}' is not in the vocabulary", dir.display()),
            };
            if !added.iter().any(|t| t.content == content) {
                added.push(AddedToken { content, id, normalized: false });
            }
            Ok(id)
        };
        let pad_id = special("pad_token", "[PAD]", true)?;
        let unk_id = special("unk_token", "[UNK]", true)?;
        let cls_id = special("cls_token", "[CLS]", true)?;
        let sep_id = special("sep_token", "[SEP]", true)?;
        let mask_id = special("mask_token", "[MASK]", false)?;
        let flag = |key: &str| -> Result<Option<bool>> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(v) => bail!("{}: tokenizer option \"{key}\" is {v}; expected true, false or null", dir.display()),
            }
        };
        let lowercase = flag("do_lower_case")?.unwrap_or(true);
        let strip_accents = flag("strip_accents")?.unwrap_or(lowercase);
        let chinese_chars = flag("tokenize_chinese_chars")?.unwrap_or(true);
        let tokens = vocab.iter().map(|(k, &v)| (v, k.clone())).collect();
        Ok(WordPieceTokenizer {
            vocab,
            tokens,
            added,
            continuing_prefix: prefix,
            max_input_chars_per_word: max_chars,
            lowercase,
            strip_accents,
            chinese_chars,
            unk_id,
            cls_id,
            sep_id,
            pad_id,
            mask_id,
            max_length: MAX_LENGTH,
            source: dir,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens
            .get(&id)
            .map(String::as_str)
            .or_else(|| self.added.iter().find(|t| t.id == id).map(|t| t.content.as_str()))
    }

    /// Token ids of `text` without [CLS]/[SEP], untruncated.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let encode = |piece: &str, ids: &mut Vec<u32>| {
            pre_tokenize(piece).into_iter().for_each(|word| self.wordpiece(word, ids))
        };
        tokenize_around_added(text, &self.added, |t| self.normalize(t), encode)
    }

    /// Tokenizes as a pipeline feeds the text encoder: [CLS] + ids + [SEP], truncated to
    /// `max_length` with [SEP] kept last, padded with [PAD], and the attention mask.
    pub fn encode(&self, text: &str) -> WordPieceEncoding {
        let body = self.tokenize(text);
        let tokens = body.len() + 2;
        let keep = body.len().min(self.max_length.saturating_sub(2));
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.cls_id);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.sep_id);
        let real = ids.len();
        ids.resize(self.max_length.max(real), self.pad_id);
        let mut attention_mask = vec![1u32; real];
        attention_mask.resize(ids.len(), 0);
        WordPieceEncoding { ids, attention_mask, tokens, truncated: tokens > self.max_length }
    }

    /// Step 2: `BertNormalizer` with clean_text on (BertTokenizer always sets it).
    pub fn normalize(&self, text: &str) -> String {
        let mut s = String::with_capacity(text.len());
        for c in text.chars() {
            if chars::is_removed(c) {
                continue;
            }
            let c = if chars::is_whitespace(c) { ' ' } else { c };
            if self.chinese_chars && chars::is_chinese(c) {
                s.push(' ');
                s.push(c);
                s.push(' ');
            } else {
                s.push(c);
            }
        }
        if self.strip_accents {
            s = s.nfd().filter(|&c| !chars::is_nonspacing_mark(c)).collect();
        }
        if self.lowercase {
            s = s.chars().flat_map(char::to_lowercase).collect();
        }
        s
    }

    /// Step 4 for one word, appending its ids.
    fn wordpiece(&self, word: &str, ids: &mut Vec<u32>) {
        if word.chars().count() > self.max_input_chars_per_word {
            ids.push(self.unk_id);
            return;
        }
        let first = ids.len();
        let mut start = 0;
        let mut candidate = String::new();
        while start < word.len() {
            // The longest piece from `start` in the vocabulary, shrinking one character at a time.
            let mut end = word.len();
            let found = loop {
                candidate.clear();
                if start > 0 {
                    candidate.push_str(&self.continuing_prefix);
                }
                candidate.push_str(&word[start..end]);
                if let Some(&id) = self.vocab.get(&candidate) {
                    break Some(id);
                }
                end -= word[start..end].chars().next_back().map_or(1, char::len_utf8);
                if end == start {
                    break None;
                }
            };
            match found {
                Some(id) => ids.push(id),
                None => {
                    ids.truncate(first);
                    ids.push(self.unk_id);
                    return;
                }
            }
            start = end;
        }
    }
}

/// Step 3, `BertPreTokenizer`: words between whitespace, each punctuation mark a word of its own.
pub fn pre_tokenize(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        let (space, punct) = (c.is_whitespace(), chars::is_punctuation(c));
        if space || punct {
            if start < i {
                words.push(&text[start..i]);
            }
            if punct {
                words.push(&text[i..i + c.len_utf8()]);
            }
            start = i + c.len_utf8();
        }
    }
    if start < text.len() {
        words.push(&text[start..]);
    }
    words
}

/// vocab.txt as transformers' `load_vocab` reads it: one token per line (universal newlines, so
/// "\r\n" and "\r" end lines too), id = line number, a repeated token keeping its last line.
fn read_vocab_txt(path: &Path) -> Result<HashMap<String, u32>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{}: cannot read (UTF-8 expected)", path.display()))?;
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let body = text.strip_suffix('\n').unwrap_or(&text);
    if body.is_empty() {
        return Ok(HashMap::new());
    }
    Ok(body.split('\n').enumerate().map(|(i, t)| (t.to_string(), i as u32)).collect())
}

/// The character classes of the reference (see the module doc), public for the exhaustive test.
pub mod chars {
    /// Dropped by clean_text: NUL, U+FFFD, and the reference's "other" characters less \t \n \r.
    pub fn is_removed(c: char) -> bool {
        in_table(&REMOVED, c)
    }

    /// Mapped to ' ' by clean_text (after removal): \t \n \r and Rust's `char::is_whitespace`.
    pub fn is_whitespace(c: char) -> bool {
        matches!(c, '\t' | '\n' | '\r') || c.is_whitespace()
    }

    /// Isolated by the pre-tokenizer: ASCII punctuation and the reference's Unicode punctuation.
    pub fn is_punctuation(c: char) -> bool {
        c.is_ascii_punctuation() || in_table(&PUNCTUATION, c)
    }

    /// Dropped after NFD when stripping accents (general category Mn in the reference's tables).
    pub fn is_nonspacing_mark(c: char) -> bool {
        in_table(&NONSPACING_MARK, c)
    }

    /// The CJK ideograph blocks BERT surrounds with spaces (not Hangul, kana or CJK punctuation).
    pub fn is_chinese(c: char) -> bool {
        matches!(c as u32,
            0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
    }

    fn in_table(table: &[(u32, u32)], c: char) -> bool {
        let c = c as u32;
        table
            .binary_search_by(|&(lo, hi)| {
                if hi < c {
                    std::cmp::Ordering::Less
                } else if lo > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
    }

    // Generated by `tests/fixtures/generate_bert.py unicode --print-rust` (tokenizers 0.23.3).
    #[rustfmt::skip]
    const REMOVED: [(u32, u32); 25] = [
        (0x0, 0x8), (0xB, 0xC), (0xE, 0x1F), (0x7F, 0x9F), (0xAD, 0xAD), (0x600, 0x605), (0x61C, 0x61C), (0x6DD, 0x6DD),
        (0x70F, 0x70F), (0x180E, 0x180E), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x2064), (0x2066, 0x206F),
        (0xE000, 0xF8FF), (0xFEFF, 0xFEFF), (0xFFF9, 0xFFFB), (0xFFFD, 0xFFFD), (0x110BD, 0x110BD), (0x1BCA0, 0x1BCA3),
        (0x1D173, 0x1D17A), (0xE0001, 0xE0001), (0xE0020, 0xE007F), (0xF0000, 0xFFFFD), (0x100000, 0x10FFFD),
    ];
    #[rustfmt::skip]
    const PUNCTUATION: [(u32, u32); 156] = [
        (0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E), (0xA1, 0xA1), (0xA7, 0xA7), (0xAB, 0xAB), (0xB6, 0xB7),
        (0xBB, 0xBB), (0xBF, 0xBF), (0x37E, 0x37E), (0x387, 0x387), (0x55A, 0x55F), (0x589, 0x58A), (0x5BE, 0x5BE),
        (0x5C0, 0x5C0), (0x5C3, 0x5C3), (0x5C6, 0x5C6), (0x5F3, 0x5F4), (0x609, 0x60A), (0x60C, 0x60D), (0x61B, 0x61B),
        (0x61E, 0x61F), (0x66A, 0x66D), (0x6D4, 0x6D4), (0x700, 0x70D), (0x7F7, 0x7F9), (0x830, 0x83E), (0x85E, 0x85E),
        (0x964, 0x965), (0x970, 0x970), (0xAF0, 0xAF0), (0xDF4, 0xDF4), (0xE4F, 0xE4F), (0xE5A, 0xE5B), (0xF04, 0xF12),
        (0xF14, 0xF14), (0xF3A, 0xF3D), (0xF85, 0xF85), (0xFD0, 0xFD4), (0xFD9, 0xFDA), (0x104A, 0x104F),
        (0x10FB, 0x10FB), (0x1360, 0x1368), (0x1400, 0x1400), (0x166D, 0x166E), (0x169B, 0x169C), (0x16EB, 0x16ED),
        (0x1735, 0x1736), (0x17D4, 0x17D6), (0x17D8, 0x17DA), (0x1800, 0x180A), (0x1944, 0x1945), (0x1A1E, 0x1A1F),
        (0x1AA0, 0x1AA6), (0x1AA8, 0x1AAD), (0x1B5A, 0x1B60), (0x1BFC, 0x1BFF), (0x1C3B, 0x1C3F), (0x1C7E, 0x1C7F),
        (0x1CC0, 0x1CC7), (0x1CD3, 0x1CD3), (0x2010, 0x2027), (0x2030, 0x2043), (0x2045, 0x2051), (0x2053, 0x205E),
        (0x207D, 0x207E), (0x208D, 0x208E), (0x2308, 0x230B), (0x2329, 0x232A), (0x2768, 0x2775), (0x27C5, 0x27C6),
        (0x27E6, 0x27EF), (0x2983, 0x2998), (0x29D8, 0x29DB), (0x29FC, 0x29FD), (0x2CF9, 0x2CFC), (0x2CFE, 0x2CFF),
        (0x2D70, 0x2D70), (0x2E00, 0x2E2E), (0x2E30, 0x2E42), (0x3001, 0x3003), (0x3008, 0x3011), (0x3014, 0x301F),
        (0x3030, 0x3030), (0x303D, 0x303D), (0x30A0, 0x30A0), (0x30FB, 0x30FB), (0xA4FE, 0xA4FF), (0xA60D, 0xA60F),
        (0xA673, 0xA673), (0xA67E, 0xA67E), (0xA6F2, 0xA6F7), (0xA874, 0xA877), (0xA8CE, 0xA8CF), (0xA8F8, 0xA8FA),
        (0xA8FC, 0xA8FC), (0xA92E, 0xA92F), (0xA95F, 0xA95F), (0xA9C1, 0xA9CD), (0xA9DE, 0xA9DF), (0xAA5C, 0xAA5F),
        (0xAADE, 0xAADF), (0xAAF0, 0xAAF1), (0xABEB, 0xABEB), (0xFD3E, 0xFD3F), (0xFE10, 0xFE19), (0xFE30, 0xFE52),
        (0xFE54, 0xFE61), (0xFE63, 0xFE63), (0xFE68, 0xFE68), (0xFE6A, 0xFE6B), (0xFF01, 0xFF03), (0xFF05, 0xFF0A),
        (0xFF0C, 0xFF0F), (0xFF1A, 0xFF1B), (0xFF1F, 0xFF20), (0xFF3B, 0xFF3D), (0xFF3F, 0xFF3F), (0xFF5B, 0xFF5B),
        (0xFF5D, 0xFF5D), (0xFF5F, 0xFF65), (0x10100, 0x10102), (0x1039F, 0x1039F), (0x103D0, 0x103D0),
        (0x1056F, 0x1056F), (0x10857, 0x10857), (0x1091F, 0x1091F), (0x1093F, 0x1093F), (0x10A50, 0x10A58),
        (0x10A7F, 0x10A7F), (0x10AF0, 0x10AF6), (0x10B39, 0x10B3F), (0x10B99, 0x10B9C), (0x11047, 0x1104D),
        (0x110BB, 0x110BC), (0x110BE, 0x110C1), (0x11140, 0x11143), (0x11174, 0x11175), (0x111C5, 0x111C9),
        (0x111CD, 0x111CD), (0x111DB, 0x111DB), (0x111DD, 0x111DF), (0x11238, 0x1123D), (0x112A9, 0x112A9),
        (0x114C6, 0x114C6), (0x115C1, 0x115D7), (0x11641, 0x11643), (0x1173C, 0x1173E), (0x12470, 0x12474),
        (0x16A6E, 0x16A6F), (0x16AF5, 0x16AF5), (0x16B37, 0x16B3B), (0x16B44, 0x16B44), (0x1BC9F, 0x1BC9F),
        (0x1DA87, 0x1DA8B),
    ];
    #[rustfmt::skip]
    const NONSPACING_MARK: [(u32, u32); 279] = [
        (0x300, 0x33F), (0x342, 0x342), (0x345, 0x36F), (0x483, 0x487), (0x591, 0x5BD), (0x5BF, 0x5BF), (0x5C1, 0x5C2),
        (0x5C4, 0x5C5), (0x5C7, 0x5C7), (0x610, 0x61A), (0x64B, 0x65F), (0x670, 0x670), (0x6D6, 0x6DC), (0x6DF, 0x6E4),
        (0x6E7, 0x6E8), (0x6EA, 0x6ED), (0x711, 0x711), (0x730, 0x74A), (0x7A6, 0x7B0), (0x7EB, 0x7F3), (0x816, 0x819),
        (0x81B, 0x823), (0x825, 0x827), (0x829, 0x82D), (0x859, 0x85B), (0x8E3, 0x902), (0x93A, 0x93A), (0x93C, 0x93C),
        (0x941, 0x948), (0x94D, 0x94D), (0x951, 0x957), (0x962, 0x963), (0x981, 0x981), (0x9BC, 0x9BC), (0x9C1, 0x9C4),
        (0x9CD, 0x9CD), (0x9E2, 0x9E3), (0xA01, 0xA02), (0xA3C, 0xA3C), (0xA41, 0xA42), (0xA47, 0xA48), (0xA4B, 0xA4D),
        (0xA51, 0xA51), (0xA70, 0xA71), (0xA75, 0xA75), (0xA81, 0xA82), (0xABC, 0xABC), (0xAC1, 0xAC5), (0xAC7, 0xAC8),
        (0xACD, 0xACD), (0xAE2, 0xAE3), (0xB01, 0xB01), (0xB3C, 0xB3C), (0xB3F, 0xB3F), (0xB41, 0xB44), (0xB4D, 0xB4D),
        (0xB56, 0xB56), (0xB62, 0xB63), (0xB82, 0xB82), (0xBC0, 0xBC0), (0xBCD, 0xBCD), (0xC00, 0xC00), (0xC3E, 0xC40),
        (0xC46, 0xC47), (0xC4A, 0xC4D), (0xC55, 0xC56), (0xC62, 0xC63), (0xC81, 0xC81), (0xCBC, 0xCBC), (0xCBF, 0xCBF),
        (0xCC6, 0xCC6), (0xCCC, 0xCCD), (0xCE2, 0xCE3), (0xD01, 0xD01), (0xD41, 0xD44), (0xD4D, 0xD4D), (0xD62, 0xD63),
        (0xDCA, 0xDCA), (0xDD2, 0xDD4), (0xDD6, 0xDD6), (0xE31, 0xE31), (0xE34, 0xE3A), (0xE47, 0xE4E), (0xEB1, 0xEB1),
        (0xEB4, 0xEB9), (0xEBB, 0xEBC), (0xEC8, 0xECD), (0xF18, 0xF19), (0xF35, 0xF35), (0xF37, 0xF37), (0xF39, 0xF39),
        (0xF71, 0xF72), (0xF74, 0xF74), (0xF77, 0xF77), (0xF79, 0xF7E), (0xF80, 0xF80), (0xF82, 0xF84), (0xF86, 0xF87),
        (0xF8D, 0xF92), (0xF94, 0xF97), (0xF99, 0xF9C), (0xF9E, 0xFA1), (0xFA3, 0xFA6), (0xFA8, 0xFAB), (0xFAD, 0xFB8),
        (0xFBA, 0xFBC), (0xFC6, 0xFC6), (0x102D, 0x1030), (0x1032, 0x1037), (0x1039, 0x103A), (0x103D, 0x103E),
        (0x1058, 0x1059), (0x105E, 0x1060), (0x1071, 0x1074), (0x1082, 0x1082), (0x1085, 0x1086), (0x108D, 0x108D),
        (0x109D, 0x109D), (0x135D, 0x135F), (0x1712, 0x1714), (0x1732, 0x1734), (0x1752, 0x1753), (0x1772, 0x1773),
        (0x17B4, 0x17B5), (0x17B7, 0x17BD), (0x17C6, 0x17C6), (0x17C9, 0x17D3), (0x17DD, 0x17DD), (0x180B, 0x180D),
        (0x18A9, 0x18A9), (0x1920, 0x1922), (0x1927, 0x1928), (0x1932, 0x1932), (0x1939, 0x193B), (0x1A17, 0x1A18),
        (0x1A1B, 0x1A1B), (0x1A56, 0x1A56), (0x1A58, 0x1A5E), (0x1A60, 0x1A60), (0x1A62, 0x1A62), (0x1A65, 0x1A6C),
        (0x1A73, 0x1A7C), (0x1A7F, 0x1A7F), (0x1AB0, 0x1ABD), (0x1B00, 0x1B03), (0x1B34, 0x1B34), (0x1B36, 0x1B3A),
        (0x1B3C, 0x1B3C), (0x1B42, 0x1B42), (0x1B6B, 0x1B73), (0x1B80, 0x1B81), (0x1BA2, 0x1BA5), (0x1BA8, 0x1BA9),
        (0x1BAB, 0x1BAD), (0x1BE6, 0x1BE6), (0x1BE8, 0x1BE9), (0x1BED, 0x1BED), (0x1BEF, 0x1BF1), (0x1C2C, 0x1C33),
        (0x1C36, 0x1C37), (0x1CD0, 0x1CD2), (0x1CD4, 0x1CE0), (0x1CE2, 0x1CE8), (0x1CED, 0x1CED), (0x1CF4, 0x1CF4),
        (0x1CF8, 0x1CF9), (0x1DC0, 0x1DF5), (0x1DFC, 0x1DFF), (0x20D0, 0x20DC), (0x20E1, 0x20E1), (0x20E5, 0x20F0),
        (0x2CEF, 0x2CF1), (0x2D7F, 0x2D7F), (0x2DE0, 0x2DFF), (0x302A, 0x302D), (0x3099, 0x309A), (0xA66F, 0xA66F),
        (0xA674, 0xA67D), (0xA69E, 0xA69F), (0xA6F0, 0xA6F1), (0xA802, 0xA802), (0xA806, 0xA806), (0xA80B, 0xA80B),
        (0xA825, 0xA826), (0xA8C4, 0xA8C4), (0xA8E0, 0xA8F1), (0xA926, 0xA92D), (0xA947, 0xA951), (0xA980, 0xA982),
        (0xA9B3, 0xA9B3), (0xA9B6, 0xA9B9), (0xA9BC, 0xA9BC), (0xA9E5, 0xA9E5), (0xAA29, 0xAA2E), (0xAA31, 0xAA32),
        (0xAA35, 0xAA36), (0xAA43, 0xAA43), (0xAA4C, 0xAA4C), (0xAA7C, 0xAA7C), (0xAAB0, 0xAAB0), (0xAAB2, 0xAAB4),
        (0xAAB7, 0xAAB8), (0xAABE, 0xAABF), (0xAAC1, 0xAAC1), (0xAAEC, 0xAAED), (0xAAF6, 0xAAF6), (0xABE5, 0xABE5),
        (0xABE8, 0xABE8), (0xABED, 0xABED), (0xFB1E, 0xFB1E), (0xFE00, 0xFE0F), (0xFE20, 0xFE2F), (0x101FD, 0x101FD),
        (0x102E0, 0x102E0), (0x10376, 0x1037A), (0x10A01, 0x10A03), (0x10A05, 0x10A06), (0x10A0C, 0x10A0F),
        (0x10A38, 0x10A3A), (0x10A3F, 0x10A3F), (0x10AE5, 0x10AE6), (0x11001, 0x11001), (0x11038, 0x11046),
        (0x1107F, 0x11081), (0x110B3, 0x110B6), (0x110B9, 0x110BA), (0x11100, 0x11102), (0x11127, 0x1112B),
        (0x1112D, 0x1112D), (0x11130, 0x11134), (0x11173, 0x11173), (0x11180, 0x11181), (0x111B6, 0x111BE),
        (0x111CA, 0x111CC), (0x1122F, 0x11231), (0x11234, 0x11234), (0x11236, 0x11237), (0x112DF, 0x112DF),
        (0x112E3, 0x112EA), (0x11300, 0x11301), (0x1133C, 0x1133C), (0x11340, 0x11340), (0x11366, 0x1136C),
        (0x11370, 0x11374), (0x114B3, 0x114B8), (0x114BA, 0x114BA), (0x114BF, 0x114C0), (0x114C2, 0x114C3),
        (0x115B2, 0x115B5), (0x115BC, 0x115BD), (0x115BF, 0x115C0), (0x115DC, 0x115DD), (0x11633, 0x1163A),
        (0x1163D, 0x1163D), (0x1163F, 0x11640), (0x116AB, 0x116AB), (0x116AD, 0x116AD), (0x116B0, 0x116B5),
        (0x116B7, 0x116B7), (0x1171D, 0x1171F), (0x11722, 0x11725), (0x11727, 0x1172B), (0x16AF0, 0x16AF4),
        (0x16B30, 0x16B36), (0x16F8F, 0x16F92), (0x1BC9D, 0x1BC9E), (0x1D167, 0x1D169), (0x1D17B, 0x1D182),
        (0x1D185, 0x1D18B), (0x1D1AA, 0x1D1AD), (0x1D242, 0x1D244), (0x1DA00, 0x1DA36), (0x1DA3B, 0x1DA6C),
        (0x1DA75, 0x1DA75), (0x1DA84, 0x1DA84), (0x1DA9B, 0x1DA9F), (0x1DAA1, 0x1DAAF), (0x1E8D0, 0x1E8D6),
        (0xE0100, 0xE01EF),
    ];
}

//! Text to token ids: [`bpe`] is CLIP's byte-level BPE tokenizer, [`wordpiece`] BERT's WordPiece
//! (for the CXR-BERT text encoders).

pub mod bpe;
pub mod wordpiece;

use crate::io::weights::read_json;
use anyhow::{bail, Result};
use serde_json::Value;
use std::path::Path;

/// A token split out of the raw text (or, if `normalized`, out of the normalized text) before the
/// model's own splitting (BPE or WordPiece): the special tokens, and the added tokens of a
/// tokenizer.json.
#[derive(Clone, Debug)]
struct AddedToken {
    content: String,
    id: u32,
    normalized: bool,
}

/// tokenizer_config.json overlaid with special_tokens_map.json (either may be absent).
fn read_tokenizer_config(dir: &Path) -> Result<serde_json::Map<String, Value>> {
    let mut cfg = serde_json::Map::new();
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let p = dir.join(name);
        if p.is_file() {
            match read_json(&p)? {
                Value::Object(o) => cfg.extend(o),
                _ => bail!("{}: expected a JSON object", p.display()),
            }
        }
    }
    Ok(cfg)
}

/// The ids of `text` as transformers' tokenizers produce them around their added tokens: added
/// tokens matched in the raw text (those not `normalized`), then in each normalised piece (those
/// `normalized`), each as its own id; `encode` appends the ids of every plain piece left.
fn tokenize_around_added(
    text: &str,
    added: &[AddedToken],
    normalize: impl Fn(&str) -> String,
    mut encode: impl FnMut(&str, &mut Vec<u32>),
) -> Vec<u32> {
    let mut ids = Vec::new();
    for (raw, special) in split_added(text, added.iter().filter(|t| !t.normalized)) {
        if let Some(id) = special {
            ids.push(id);
            continue;
        }
        let normalized = normalize(raw);
        for (piece, special) in split_added(&normalized, added.iter().filter(|t| t.normalized)) {
            match special {
                Some(id) => ids.push(id),
                None => encode(piece, &mut ids),
            }
        }
    }
    ids
}

/// Splits `text` at every occurrence of the added tokens (leftmost, longest first at a position),
/// as transformers' tokenizers do before tokenizing the rest: pieces of plain text with `None`,
/// added tokens with their id.
fn split_added<'a, 'b>(text: &'a str, tokens: impl Iterator<Item = &'b AddedToken>) -> Vec<(&'a str, Option<u32>)> {
    let mut tokens: Vec<&AddedToken> = tokens.filter(|t| !t.content.is_empty()).collect();
    tokens.sort_by_key(|t| std::cmp::Reverse(t.content.len()));
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < text.len() {
        if let Some(t) = tokens.iter().find(|t| text[i..].starts_with(t.content.as_str())) {
            if start < i {
                out.push((&text[start..i], None));
            }
            out.push((&text[i..i + t.content.len()], Some(t.id)));
            i += t.content.len();
            start = i;
        } else {
            i += text[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    if start < text.len() {
        out.push((&text[start..], None));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_added_finds_tokens_anywhere() {
        let t = [AddedToken { content: "<|e|>".into(), id: 7, normalized: false }];
        let parts = split_added("a<|e|>b<|e|>", t.iter());
        assert_eq!(parts, vec![("a", None), ("<|e|>", Some(7)), ("b", None), ("<|e|>", Some(7))]);
    }
}

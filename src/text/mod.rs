//! Text to token ids: [`bpe`] is CLIP's byte-level BPE tokenizer, [`wordpiece`] BERT's WordPiece
//! (for the CXR-BERT text encoders).

pub mod bpe;
pub mod wordpiece;

/// A token split out of the raw text (or, if `normalized`, out of the normalized text) before the
/// model's own splitting (BPE or WordPiece): the special tokens, and the added tokens of a
/// tokenizer.json.
#[derive(Clone, Debug)]
struct AddedToken {
    content: String,
    id: u32,
    normalized: bool,
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

//! Text to token ids: [`bpe`] is CLIP's byte-level BPE tokenizer, [`wordpiece`] BERT's WordPiece
//! (for the CXR-BERT text encoders).

pub mod bpe;
pub mod wordpiece;

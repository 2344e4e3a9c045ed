//! BERT text encoders (RadBERT / SapBERT's architecture) and their WordPiece tokenizer against
//! transformers (fixtures from tests/fixtures/generate_bert.py): forward with and without the
//! padding mask, every parameter gradient of an MSE loss, loading checkpoints with heads, and the
//! tokenizer on a few thousand strings in four configurations.

mod common;
use common::*;
use flate2::read::GzDecoder;
use roentgen::backend::cpu::CpuBackend;
use roentgen::backend::Backend;
use roentgen::backend::{AttentionOps, ElementwiseOps, OptimOps};
use roentgen::models::bert::{BertConfig, BertModel};
use roentgen::models::Component;
use roentgen::nn::Cx;
use roentgen::ops::attention::{AttentionBackward, AttentionForward, AttentionParams};
use roentgen::tensor::{Layout, Tensor};
use roentgen::text::wordpiece::{chars, WordPieceTokenizer, MAX_LENGTH};
use std::io::{BufRead, BufReader};
use std::path::Path;

fn bert(rel: &str) -> std::path::PathBuf {
    fixture(&format!("bert/{rel}"))
}

/// The fixture's ids and attention mask (batch, seq).
fn inputs(io: &Path) -> (usize, usize, Vec<u32>, Vec<u32>) {
    let (shape, ids) = read_ids(io, "input_ids");
    let (_, mask) = read_ids(io, "attention_mask");
    (shape[0], shape[1], ids, mask)
}

fn check_forward(name: &str) -> Vec<String> {
    let dir = bert(name);
    let io = dir.join("io.safetensors");
    let mut b = CpuBackend::new();
    let (model, report) = BertModel::load(&mut b, &dir, None).unwrap();
    assert_eq!(report.tensors, model.table.entries().len());
    let (batch, seq, ids, mask) = inputs(&io);
    let mut arena = model.allocate_arena(&mut b, batch, seq, false).unwrap();
    for (key, m) in [("last_hidden_state", None), ("last_hidden_state_masked", Some(&mask[..]))] {
        arena.release_all_to(0);
        let acts = model.forward(&mut Cx::new(&b, &mut arena), &ids, batch, seq, m).unwrap();
        let out = model.last_hidden_state(&acts);
        let (want_shape, want) = read_f32(&io, key);
        assert_eq!(out.shape.dims(), &want_shape[..]);
        assert_close(&format!("{name} {key}"), &b.download(&out).unwrap(), &want, F32_PARITY);
    }
    // The mask must matter (the padded positions differ), or the masked comparison proves nothing.
    let (_, a) = read_f32(&io, "last_hidden_state");
    let (_, m) = read_f32(&io, "last_hidden_state_masked");
    assert!(a.iter().zip(&m).any(|(x, y)| (x - y).abs() > 1e-2), "{name}: the mask changes nothing");
    report.ignored
}

#[test]
fn bert_model_matches_transformers_with_and_without_mask_gelu_config() {
    let ignored = check_forward("bert-a");
    assert_eq!(ignored, ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]);
    let cfg = BertConfig::from_file(&bert("bert-a/config.json")).unwrap();
    assert!(cfg.use_attention_mask && cfg.head_dim() == 8 && cfg.pad_token_id == Some(0));
}

#[test]
fn bert_for_masked_lm_checkpoint_loads_and_matches_gelu_new_config() {
    let ignored = check_forward("bert-b");
    assert!(!ignored.is_empty() && ignored.iter().all(|n| n.starts_with("cls.predictions.")), "{ignored:?}");
    let cfg = BertConfig::from_file(&bert("bert-b/config.json")).unwrap();
    assert!(!cfg.use_attention_mask && cfg.num_hidden_layers == 3 && cfg.pad_token_id == Some(1));
}

/// Gradients may legitimately be constant, so only the error bar applies, relative to each
/// tensor's own scale (as tests/grads.rs). Returns (max error, scale).
fn assert_grad_close(what: &str, got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let err = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err <= F32_PARITY * scale.max(1e-3), "{what}: max error {err:e}, scale {scale:e}");
    (err, scale)
}

fn check_gradients(name: &str, masked: bool) {
    let dir = bert(name);
    let io = dir.join("io.safetensors");
    let mut b = CpuBackend::new();
    let (model, _) = BertModel::load(&mut b, &dir, None).unwrap();
    let (grads, gtable) = model.allocate_grads(&mut b).unwrap();
    let (batch, seq, ids, mask) = inputs(&io);
    let mask = masked.then_some(&mask[..]);
    let (_, target) = read_f32(&io, "target");
    let mut arena = model.allocate_arena(&mut b, batch, seq, true).unwrap();
    let acts = model.forward(&mut Cx::new(&b, &mut arena), &ids, batch, seq, mask).unwrap();
    let hidden = model.last_hidden_state(&acts);
    let side = b.alloc(2 * target.len() + 32, "test.side").unwrap();
    let mut l = Layout::new(side);
    let (tgt, dout, loss) =
        (l.tensor("target", [target.len()]), l.tensor("dout", [target.len()]), l.tensor("loss", [1]));
    b.upload(&tgt, &target).unwrap();
    b.mse_loss(&dout, &loss, &hidden, &tgt, target.len()).unwrap();
    for e in gtable.entries() {
        b.zero(&Tensor::new(gtable.pool(), e.offset, e.shape)).unwrap();
    }
    model.backward(&mut Cx::new(&b, &mut arena), &grads, &acts, &dout, &ids, mask).unwrap();
    let (got_loss, want_loss) = (b.download(&loss).unwrap()[0], read_f32(&io, "loss").1[0]);
    println!("{name} loss: ours {got_loss}, PyTorch {want_loss}");
    assert!((got_loss - want_loss).abs() <= F32_PARITY * want_loss.abs().max(1.0));
    let (mut worst, mut zero_err) = (0f32, 0f32);
    for e in gtable.entries() {
        let got = b.download(&Tensor::new(gtable.pool(), e.offset, e.shape)).unwrap();
        let (_, want) = read_f32(&io, &format!("grad.{}", e.name));
        let (err, scale) = assert_grad_close(&format!("{name} grad {}", e.name), &got, &want);
        if e.name.ends_with("attention.self.key.bias") {
            // Analytically zero (a key bias shifts a whole softmax row); both sides hold round-off.
            assert!(scale < 1e-6 && err < 1e-6, "{name} {}: scale {scale:e}, error {err:e}", e.name);
            zero_err = zero_err.max(err);
        } else {
            worst = worst.max(err / scale);
        }
    }
    println!(
        "{name}: {} parameter gradients match (worst error {worst:.2e} of the tensor's scale; key biases, \
         analytically 0, within {zero_err:.1e})",
        gtable.entries().len()
    );
    // nn.Embedding(padding_idx) leaves the pad row without gradient, though pads are among the ids.
    let pad = model.config.pad_token_id.unwrap();
    assert!(ids.contains(&(pad as u32)));
    let e = gtable.find("embeddings.word_embeddings.weight").unwrap();
    let d = model.config.hidden_size;
    let row = Tensor::new(gtable.pool(), e.offset + pad * d, [d].into());
    assert!(b.download(&row).unwrap().iter().all(|&x| x == 0.0));
}

#[test]
fn bert_gradients_match_pytorch_backward_with_mask() {
    check_gradients("bert-a", true);
}

#[test]
fn bert_gradients_match_pytorch_backward_without_mask() {
    check_gradients("bert-b", false);
}

#[test]
fn masked_attention_with_a_full_mask_equals_unmasked_attention() {
    let (batch, len, heads, hd) = (2, 5, 3, 4);
    let n = batch * len * heads * hd;
    let mut b = CpuBackend::new();
    let build = |l: &mut Layout| -> Vec<Tensor> {
        (0..14).map(|i| l.tensor(format!("t{i}"), [if i == 4 || i == 8 { batch * len * heads } else { n }])).collect()
    };
    let (t, _) = roentgen::models::allocate(&mut b, "t", build).unwrap();
    let mut rng = roentgen::rng::splitmix::SplitMix64::new(9);
    for x in [&t[0], &t[1], &t[2], &t[9]] {
        b.upload(x, &(0..n).map(|_| rng.next_normal()).collect::<Vec<_>>()).unwrap();
    }
    let mask = vec![1u32; batch * len];
    let p = AttentionParams { batch, q_len: len, kv_len: len, heads, head_dim: hd, scale: 0.5, causal: false };
    let fwd = |out, lse, key_mask| AttentionForward { out, lse, q: &t[0], k: &t[1], v: &t[2], key_mask };
    b.attention_forward(&p, &fwd(&t[3], &t[4], None)).unwrap();
    b.attention_forward(&p, &fwd(&t[7], &t[8], Some(&mask))).unwrap();
    assert_eq!(b.download(&t[3]).unwrap(), b.download(&t[7]).unwrap());
    assert_eq!(b.download(&t[4]).unwrap(), b.download(&t[8]).unwrap());
    for g in &t[10..] {
        b.zero(g).unwrap();
    }
    let bwd = |out, lse, key_mask| AttentionBackward {
        dq: &t[10],
        dk: &t[11],
        dv: &t[12],
        dout: &t[9],
        forward: fwd(out, lse, key_mask),
    };
    b.attention_backward(&p, &bwd(&t[3], &t[4], None)).unwrap();
    let want: Vec<Vec<f32>> = t[10..13].iter().map(|x| b.download(x).unwrap()).collect();
    for g in &t[10..] {
        b.zero(g).unwrap();
    }
    b.attention_backward(&p, &bwd(&t[7], &t[8], Some(&mask))).unwrap();
    for (i, w) in want.iter().enumerate() {
        assert_eq!(&b.download(&t[10 + i]).unwrap(), w);
    }
    // A sequence with every key masked has no softmax: refused, not NaN.
    let mut none = mask.clone();
    none[len..].fill(0);
    let err = b.attention_forward(&p, &fwd(&t[7], &t[8], Some(&none)));
    assert!(err.unwrap_err().to_string().contains("sequence 1 masks every key"));
}

#[test]
fn bad_inputs_and_checkpoints_are_reported() {
    let mut b = CpuBackend::new();
    let (model, _) = BertModel::load(&mut b, &bert("bert-b"), None).unwrap();
    let mut arena = model.allocate_arena(&mut b, 1, 4, false).unwrap();
    let mut forward = |ids: &[u32], seq, mask| {
        arena.release_all_to(0);
        model.forward(&mut Cx::new(&b, &mut arena), ids, 1, seq, mask).map(|_| ()).unwrap_err().to_string()
    };
    let err = forward(&[2, 5, 6, 3], 4, Some(&[0, 0, 0, 0]));
    assert!(err.contains("all zeros"), "{err}");
    let err = forward(&[2, 5, 96, 3], 4, None);
    assert!(err.contains("outside the vocabulary"), "{err}");
    assert!(forward(&[2; 17], 17, None).contains("max_position_embeddings"));

    // An extra tensor is named; so is a config that does not fit the weights.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&bert("bert-b"), &dir);
    std::fs::remove_file(dir.join("io.safetensors")).unwrap();
    write_f32(&dir.join("model.safetensors"), "bert.encoder.layer.9.extra.weight", &[2], &[1.0, 2.0]);
    let err = BertModel::load(&mut b, &dir, None).err().unwrap().to_string();
    assert!(err.contains("missing"), "{err}");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    cfg["is_decoder"] = true.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let err = BertConfig::from_file(&dir.join("config.json")).unwrap_err().to_string();
    assert!(err.contains("is_decoder"), "{err}");
    cfg["is_decoder"] = false.into();
    cfg["hidden_act"] = "relu".into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    assert!(BertConfig::from_file(&dir.join("config.json")).unwrap_err().to_string().contains("hidden_act"));

    let dir = tmp.path().join("extra");
    copy_dir(&bert("bert-a"), &dir);
    let mut tensors = Vec::new();
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in st.tensors() {
        tensors.push((name, view));
    }
    let extra = vec![0u8; 8];
    let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &extra).unwrap();
    tensors.push(("decoder.extra.weight".to_string(), v));
    std::fs::write(dir.join("model.safetensors"), safetensors::serialize(tensors, None).unwrap()).unwrap();
    let err = BertModel::load(&mut b, &dir, None).err().unwrap().to_string();
    assert!(err.contains("1 unexpected tensor(s)") && err.contains("decoder.extra.weight"), "{err}");
}

// ---- the WordPiece tokenizer ----

const TOKENIZERS: [&str; 4] =
    ["tokenizer-uncased", "tokenizer-cased", "tokenizer-lower-keep-accents", "tokenizer-strip-no-chinese"];

#[test]
fn wordpiece_tokenizer_matches_transformers_in_four_configurations() {
    let f = std::fs::File::open(bert("cases.jsonl.gz")).unwrap();
    let rows: Vec<serde_json::Value> =
        BufReader::new(GzDecoder::new(f)).lines().map(|l| serde_json::from_str(&l.unwrap()).unwrap()).collect();
    assert!(rows.len() > 2000, "expected a few thousand cases, found {}", rows.len());
    for name in TOKENIZERS {
        let tok = WordPieceTokenizer::from_dir(&bert(name)).unwrap();
        assert_eq!(tok.max_length, MAX_LENGTH);
        let (mut bad, mut truncated, mut unk) = (Vec::new(), 0, 0);
        for r in &rows {
            let text = r["text"].as_str().unwrap();
            // A tokenizer whose result equals the first one's is not repeated in the file.
            let want = r.get(name).unwrap_or(&r[TOKENIZERS[0]]);
            let mut ids: Vec<u32> =
                want["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            let real = ids.len();
            ids.resize(MAX_LENGTH, tok.pad_id);
            let tokens = want["tokens"].as_u64().unwrap() as usize;
            let e = tok.encode(text);
            let mask: Vec<u32> = (0..MAX_LENGTH).map(|i| (i < real) as u32).collect();
            if e.ids != ids || e.tokens != tokens || e.truncated != (tokens > MAX_LENGTH) || e.attention_mask != mask {
                bad.push(format!(
                    "{text:?}\n   ours {:?} ({} tokens)\n   ref  {ids:?} ({tokens} tokens)",
                    e.ids, e.tokens
                ));
            }
            truncated += e.truncated as usize;
            unk += e.ids.contains(&tok.unk_id) as usize;
        }
        assert_no_mismatches(name, rows.len(), &format!("{truncated} truncated, {unk} with [UNK]"), &bad);
        assert!(truncated > 50 && unk > 50, "the cases must exercise truncation and [UNK]");
    }
}

#[test]
fn tokenizer_options_come_from_the_config() {
    let t = WordPieceTokenizer::from_dir(&bert("tokenizer-uncased")).unwrap();
    assert!(t.lowercase && t.strip_accents && t.chinese_chars);
    assert_eq!((t.pad_id, t.unk_id, t.cls_id, t.sep_id, t.mask_id), (0, 9, 10, 11, 12));
    assert_eq!(t.normalize("Ménière\u{00a0}胸X"), "meniere  胸 x");
    assert_eq!(t.id_to_token(t.cls_id), Some("[CLS]"));
    let t = WordPieceTokenizer::from_dir(&bert("tokenizer-cased")).unwrap(); // tokenizer.json form
    assert!(!t.lowercase && !t.strip_accents && t.chinese_chars);
    let t = WordPieceTokenizer::from_dir(&bert("tokenizer-strip-no-chinese")).unwrap();
    assert!(!t.lowercase && t.strip_accents && !t.chinese_chars);
    // "[MASK]" is split out of the raw text; "[mask]" is ordinary text.
    let e = t.encode("a[MASK]b [mask]");
    assert_eq!(&e.ids[1..4], &[t.token_to_id("a").unwrap(), t.mask_id, t.token_to_id("b").unwrap()]);
    assert_eq!(e.to_encoding().ids, e.ids);
    assert!(WordPieceTokenizer::from_dir(Path::new("/nonexistent")).is_err());
}

/// The character classes against the reference's, probed on every code point.
#[test]
fn character_classes_equal_the_reference_tables_on_every_code_point() {
    use unicode_normalization::UnicodeNormalization;
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bert("unicode-classes.json")).unwrap()).unwrap();
    let set = |k: &str| -> Vec<(u32, u32)> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|r| (r[0].as_u64().unwrap() as u32, r[1].as_u64().unwrap() as u32))
            .collect()
    };
    let inside = |t: &[(u32, u32)], c: u32| t.iter().any(|&(a, b)| a <= c && c <= b);
    let (removed, space, punct, split, mn, chinese) = (
        set("removed"),
        set("space"),
        set("punctuation"),
        set("split_whitespace"),
        set("nonspacing_mark"),
        set("chinese"),
    );
    let mut checked = 0;
    for c in (0..0x110000u32).filter_map(char::from_u32) {
        let cp = c as u32;
        assert_eq!(chars::is_removed(c), inside(&removed, cp), "removed {cp:#x}");
        assert_eq!(!chars::is_removed(c) && chars::is_whitespace(c), inside(&space, cp), "space {cp:#x}");
        assert_eq!(chars::is_punctuation(c), inside(&punct, cp), "punctuation {cp:#x}");
        assert_eq!(c.is_whitespace(), inside(&split, cp), "whitespace {cp:#x}");
        assert_eq!(chars::is_chinese(c), inside(&chinese, cp), "chinese {cp:#x}");
        if c.nfd().eq(std::iter::once(c)) {
            assert_eq!(chars::is_nonspacing_mark(c), inside(&mn, cp), "non-spacing mark {cp:#x}");
        }
        checked += 1;
    }
    println!("{checked} code points classified as tokenizers does");
}

/// With the mask, what stands at padded positions cannot reach the real tokens' outputs; without
/// it, it does (diffusers' default for BERT configs without `use_attention_mask`).
#[test]
fn masked_padding_does_not_reach_real_tokens_of_a_random_model() {
    let cfg = BertConfig::from_json(
        &serde_json::json!({"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                            "intermediate_size": 24, "max_position_embeddings": 10}),
        Path::new("config.json"),
    )
    .unwrap();
    let mut b = CpuBackend::new();
    let model = BertModel::random(&mut b, cfg, 3).unwrap();
    let mut arena = model.allocate_arena(&mut b, 1, 8, false).unwrap();
    let mask = [1, 1, 1, 1, 1, 0, 0, 0];
    let mut run = |ids: &[u32], m: Option<&[u32]>| {
        arena.release_all_to(0);
        let acts = model.forward(&mut Cx::new(&b, &mut arena), ids, 1, 8, m).unwrap();
        b.download(&model.last_hidden_state(&acts)).unwrap()
    };
    let (a, c) = ([2, 7, 8, 9, 3, 0, 0, 0], [2, 7, 8, 9, 3, 41, 17, 5]);
    let (ma, mc) = (run(&a, Some(&mask)), run(&c, Some(&mask)));
    assert!(ma.iter().all(|x| x.is_finite()) && ma.iter().any(|&x| x.abs() > 0.5), "LayerNorm weights must be 1");
    assert_eq!(ma[..5 * 16], mc[..5 * 16]);
    assert_ne!(run(&a, None)[..5 * 16], run(&c, None)[..5 * 16]);
}

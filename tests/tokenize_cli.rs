//! `roentgen tokenize` on every tokenizer a pipeline may carry (CLIP BPE and BERT WordPiece) and
//! every folder a user may name (a pipeline, a folder holding tokenizer/, the tokenizer itself),
//! and the built-in SD v1 tokenizer that `prepare` and `eval ms-ssim` use by default, run from a
//! folder other than the checkout.

mod common;
use common::*;
use flate2::read::GzDecoder;
use roentgen::text::wordpiece::WordPieceTokenizer;
use serde_json::Value;
use std::io::{BufRead, BufReader};

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap_or_else(|| panic!("not a list: {v}")).iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn lines(out: &str) -> Vec<Value> {
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Reference (text, ids without padding, tokens) of a BERT fixture tokenizer, from transformers.
fn bert_cases(name: &str) -> Vec<(String, Vec<u32>, usize)> {
    let f = std::fs::File::open(fixture("bert/cases.jsonl.gz")).unwrap();
    BufReader::new(GzDecoder::new(f))
        .lines()
        .map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap())
        // A tokenizer whose result equals tokenizer-uncased's is not repeated in the file.
        .map(|r| {
            let want = r.get(name).unwrap_or(&r["tokenizer-uncased"]).clone();
            (r["text"].as_str().unwrap().to_string(), u32s(&want["ids"]), want["tokens"].as_u64().unwrap() as usize)
        })
        .collect()
}

#[test]
fn tokenize_bert_tokenizer_in_a_folder_holding_only_tokenizer() {
    // A folder with only tokenizer/ (no model_index.json) was refused, and so was every BERT tokenizer.
    let dir = tempfile::tempdir().unwrap();
    let holder = dir.path().join("radbert-like");
    copy_dir(&fixture("bert/tokenizer-cased"), &holder.join("tokenizer"));
    let cases: Vec<_> = bert_cases("tokenizer-cased")
        .into_iter()
        .filter(|(t, ..)| !t.is_empty() && !t.contains(['\n', '\r']))
        .take(300)
        .collect();
    assert!(cases.iter().any(|(_, _, n)| *n > 77), "the cases must exercise truncation");
    let input: String = cases.iter().map(|(t, ..)| format!("{t}\n")).collect();
    let pad = WordPieceTokenizer::from_dir(&fixture("bert/tokenizer-cased")).unwrap().pad_id;
    let file = dir.path().join("prompts.txt");
    std::fs::write(&file, &input).unwrap();
    for model in [holder.clone(), holder.join("tokenizer")] {
        let (code, out, err) =
            run_cli(&["tokenize", "--model", model.to_str().unwrap(), "--input", file.to_str().unwrap()], None);
        assert_eq!(code, 0, "{}: {err}", model.display());
        let got = lines(&out);
        assert_eq!(got.len(), cases.len());
        let mut truncated = 0;
        for (v, (text, ids, tokens)) in got.iter().zip(&cases) {
            let (ours, mask) = (u32s(&v["ids"]), u32s(&v["attention_mask"]));
            assert_eq!(ours.len(), 77);
            let real = ids.len().min(77);
            // Truncation keeps [SEP] last, as transformers does.
            let mut want = ids.clone();
            if want.len() > 77 {
                want.truncate(76);
                want.push(*ids.last().unwrap());
            }
            assert_eq!(&ours[..real], &want[..], "{text:?}");
            assert!(ours[real..].iter().all(|&x| x == pad), "{text:?}: padding");
            assert_eq!(mask, (0..77).map(|i| (i < real) as u32).collect::<Vec<_>>(), "{text:?}");
            assert_eq!(v["tokens"].as_u64().unwrap() as usize, *tokens);
            assert_eq!(v["truncated"].as_bool().unwrap(), *tokens > 77);
            truncated += (*tokens > 77) as usize;
        }
        let warnings = err.lines().filter(|l| l.starts_with("warning:") && l.contains("truncated")).count();
        assert_eq!(warnings, truncated, "{err}");
    }
}

#[test]
fn tokenize_a_bert_pipeline() {
    // The paper's domain-encoder pipelines: model_index.json names a BertTokenizer.
    let pipe = fixture("pipe-bert");
    let lib = WordPieceTokenizer::from_dir(&pipe.join("tokenizer")).unwrap();
    let prompts = ["Small left pleural effusion.", "No acute cardiopulmonary process; ÉTAT stable — 2 views"];
    let (code, out, err) =
        run_cli(&["tokenize", "--model", pipe.to_str().unwrap(), "--prompt", prompts[0], "--prompt", prompts[1]], None);
    assert_eq!(code, 0, "{err}");
    let got = lines(&out);
    assert_eq!(got.len(), 2);
    for (v, p) in got.iter().zip(prompts) {
        let e = lib.encode(p);
        assert_eq!(u32s(&v["ids"]), e.ids, "{p}");
        assert_eq!(u32s(&v["attention_mask"]), e.attention_mask, "{p}");
        assert_eq!(v["tokens"].as_u64().unwrap() as usize, e.tokens);
        assert!(e.tokens > 4 && u32s(&v["ids"]).iter().collect::<std::collections::BTreeSet<_>>().len() > 4);
    }
}

#[test]
fn tokenize_clip_lines_keep_their_three_fields_from_any_folder() {
    // A CLIP tokenizer folder held in a plain folder, named by a path relative to another cwd.
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&sd14_config().join("tokenizer"), &dir.path().join("sd/tokenizer"));
    let (code, out, err) = run_cli_in(dir.path(), &["tokenize", "--model", "sd", "--prompt", "a chest x-ray"]);
    assert_eq!(code, 0, "{err}");
    let v = &lines(&out)[0];
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["ids", "tokens", "truncated"], "CLIP lines are unchanged: SD's CLIP takes no mask");
    let ids = u32s(&v["ids"]);
    assert_eq!((ids[0], ids[ids.len() - 1], v["tokens"].as_u64().unwrap()), (49406, 49407, 7));
    // A folder with neither tokenizer files nor tokenizer/ is refused, naming it.
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    let (code, _, err) = run_cli_in(dir.path(), &["tokenize", "--model", "empty", "--prompt", "x"]);
    assert_eq!(code, 1);
    assert!(err.contains("empty") && err.contains("not a CLIP tokenizer folder"), "{err}");
}

#[test]
fn msssim_default_tokenizer_works_from_any_folder() {
    let imgs = fixture("msssim/images");
    let tok = sd14_config().display().to_string();
    let (code, want, err) =
        run_cli(&["eval", "ms-ssim", "--json", "--images", imgs.to_str().unwrap(), "--tokenizer", &tok], None);
    assert_eq!(code, 0, "{err}");
    let cwd = tempfile::tempdir().unwrap();
    let (code, got, err) = run_cli_in(cwd.path(), &["eval", "ms-ssim", "--json", "--images", imgs.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (got, want): (Value, Value) = (serde_json::from_str(&got).unwrap(), serde_json::from_str(&want).unwrap());
    assert!(want["bins"].as_array().is_some_and(|b| !b.is_empty()), "{want}");
    assert_eq!(got, want, "the built-in tokenizer bins as the SD v1.4 files do");
}

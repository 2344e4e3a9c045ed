//! The CLIP tokenizer against transformers' CLIPTokenizer (ids written by tests/fixtures/generate.py).

mod common;
use common::*;
use flate2::read::GzDecoder;
use roentgen::text::bpe::ClipTokenizer;
use std::io::{BufRead, BufReader, Read};

struct Case {
    text: String,
    ids: Vec<u32>,
    tokens: usize,
    truncated: bool,
}

fn cases() -> Vec<Case> {
    let f = std::fs::File::open(fixture("tokenizer/cases.jsonl.gz")).unwrap();
    BufReader::new(GzDecoder::new(f))
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l.unwrap()).unwrap();
            Case {
                text: v["text"].as_str().unwrap().to_string(),
                ids: v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect(),
                tokens: v["tokens"].as_u64().unwrap() as usize,
                truncated: v["truncated"].as_bool().unwrap(),
            }
        })
        .collect()
}

fn check_all(tok: &ClipTokenizer, form: &str) {
    let cases = cases();
    assert!(cases.len() > 2000, "expected a few thousand cases, found {}", cases.len());
    let mut bad = Vec::new();
    for c in &cases {
        let e = tok.encode(&c.text);
        if e.ids != c.ids || e.tokens != c.tokens || e.truncated != c.truncated {
            bad.push(format!(
                "{:?}\n   ours {:?} ({} tokens)\n   ref  {:?} ({} tokens)",
                c.text, e.ids, e.tokens, c.ids, c.tokens
            ));
        }
    }
    let truncated = cases.iter().filter(|c| c.truncated).count();
    assert_no_mismatches(form, cases.len(), &format!("{truncated} over-long"), &bad);
    assert!(truncated > 50, "the cases must exercise truncation");
    assert!(cases.iter().any(|c| c.text.is_empty()), "the cases must include the empty (unconditional) prompt");
}

#[test]
fn tokenizer_matches_transformers_vocab_merges_form() {
    let tok = ClipTokenizer::from_dir(&sd14_config().join("tokenizer")).unwrap();
    assert_eq!((tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length), (49406, 49407, 49407, 77));
    check_all(&tok, "vocab.json + merges.txt");
}

#[test]
fn tokenizer_matches_transformers_lone_tokenizer_json_form() {
    let dir = tempfile::tempdir().unwrap();
    let mut json = Vec::new();
    GzDecoder::new(std::fs::File::open(fixture("tokenizer/tokenizer.json.gz")).unwrap())
        .read_to_end(&mut json)
        .unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), json).unwrap();
    let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!((tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length), (49406, 49407, 49407, 77));
    check_all(&tok, "lone tokenizer.json");
}

#[test]
fn empty_prompt_is_bos_eos_then_padding() {
    // The unconditional prompt of classifier-free guidance; the reference case is in cases.jsonl.
    let tok = ClipTokenizer::from_dir(&sd14_config()).unwrap();
    let c = cases().into_iter().find(|c| c.text.is_empty()).unwrap();
    let e = tok.encode("");
    assert_eq!(e.ids, c.ids);
    assert_eq!(e.tokens, 2);
    assert!(!e.truncated);
}

#[test]
fn tokenize_cli_prints_reference_ids_and_warns_when_truncating() {
    let cs: Vec<Case> =
        cases().into_iter().filter(|c| !c.text.contains(['\n', '\r']) && !c.text.is_empty()).take(400).collect();
    assert!(cs.iter().any(|c| c.truncated));
    let input: String = cs.iter().map(|c| format!("{}\n", c.text)).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("prompts.txt");
    std::fs::write(&file, &input).unwrap();
    let model = sd14_config();
    for args in [
        vec!["tokenize", "--model", model.to_str().unwrap(), "--input", file.to_str().unwrap()],
        vec!["tokenize", "--model", model.to_str().unwrap()],
    ] {
        let stdin = if args.len() == 3 { Some(input.as_str()) } else { None };
        let (code, out, err) = run_cli(&args, stdin);
        assert_eq!(code, 0, "stderr: {err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), cs.len());
        for (line, c) in lines.iter().zip(&cs) {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let ids: Vec<u32> = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            assert_eq!(ids, c.ids, "{:?}", c.text);
            assert_eq!(v["tokens"].as_u64().unwrap() as usize, c.tokens);
            assert_eq!(v["truncated"].as_bool().unwrap(), c.truncated);
        }
        let warnings = err.lines().filter(|l| l.starts_with("warning:") && l.contains("truncated")).count();
        assert_eq!(warnings, cs.iter().filter(|c| c.truncated).count(), "stderr: {err}");
    }
}

#[test]
fn built_in_sd_v1_tokenizer_matches_transformers() {
    // The copy compiled into the binary, the default of `prepare` and `eval ms-ssim`.
    let tok = ClipTokenizer::sd_v1().unwrap();
    assert_eq!((tok.bos_id, tok.eos_id, tok.pad_id, tok.max_length), (49406, 49407, 49407, 77));
    check_all(&tok, "built-in");
}

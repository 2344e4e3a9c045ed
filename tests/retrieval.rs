//! `roentgen eval retrieval` (image→image, the paper's Table 4) against transformers (fixture by
//! tests/fixtures/generate_retrieval.py): 16 query and 36 candidate phantoms, the single-label ones
//! kept, the tiny CLIP tower's pooled and projected features, Precision@1, 3 and 5 overall and per
//! class; and its errors.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn precision_at_k_matches_transformers() {
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("retrieval/expected.json")).unwrap()).unwrap();
    let (q, c) = (fixture("retrieval/q/manifest.jsonl"), fixture("retrieval/c/manifest.jsonl"));
    let (w, cfg) = (fixture("fid/clip-tiny/model.safetensors"), fixture("fid/clip-tiny/config.json"));
    for kind in ["clip", "clip-proj"] {
        let args = [
            "eval",
            "retrieval",
            "--queries",
            q.to_str().unwrap(),
            "--candidates",
            c.to_str().unwrap(),
            "--features",
            kind,
            "--weights",
            w.to_str().unwrap(),
            "--clip-config",
            cfg.to_str().unwrap(),
            "-k",
            "1,3,5",
            "--json",
        ];
        let (code, out, err) = run_cli(&args, None);
        assert_eq!(code, 0, "{err}");
        let got: Value = serde_json::from_str(&out).unwrap();
        let sum = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).sum::<u64>();
        assert_eq!(sum(&got["queries_per_class"]), want["queries"].as_u64().unwrap());
        assert_eq!(sum(&got["candidates_per_class"]), want["candidates"].as_u64().unwrap());
        for (g, w) in got["precision_at_k"].as_array().unwrap().iter().zip(want["results"][kind].as_array().unwrap()) {
            let k = &w["k"];
            assert_eq!(&g["k"], k);
            let close = |a: &Value, b: &Value| match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() <= 1e-12,
                _ => a == b,
            };
            println!("{kind} P@{k}: {} (reference {})", g["precision"], w["precision"]);
            assert!(close(&g["precision"], &w["precision"]), "{kind} P@{k}");
            for (cls, p) in w["per_class"].as_object().unwrap() {
                assert!(close(&g["per_class"][cls], p), "{kind} P@{k} {cls}: {} vs {p}", g["per_class"][cls]);
            }
        }
    }
}

#[test]
fn bad_inputs_are_refused_by_name() {
    let (q, c) = (fixture("retrieval/q/manifest.jsonl"), fixture("retrieval/c/manifest.jsonl"));
    let (w, cfg) = (fixture("fid/clip-tiny/model.safetensors"), fixture("fid/clip-tiny/config.json"));
    let base = |k: &str, classes: &str| -> String {
        let mut args = vec![
            "eval",
            "retrieval",
            "--queries",
            q.to_str().unwrap(),
            "--candidates",
            c.to_str().unwrap(),
            "--features",
            "clip",
            "--weights",
            w.to_str().unwrap(),
            "--clip-config",
            cfg.to_str().unwrap(),
            "-k",
            k,
        ];
        if !classes.is_empty() {
            args.extend_from_slice(&["--classes", classes]);
        }
        let (code, _, err) = run_cli(&args, None);
        assert_ne!(code, 0);
        err
    };
    let err = base("100", "");
    assert!(err.contains("k = 100: must lie between 1 and the 23 single-label candidates"), "{err}");
    let err = base("1", "Edema");
    assert!(err.contains("\"Edema\" is not a phantom finding"), "{err}");
}

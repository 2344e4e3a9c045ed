//! `roentgen eval text-knn` against transformers and scikit-learn (fixture by
//! tests/fixtures/generate_text_knn.py): the bundled demo model's text encoder with both poolings
//! and the TF-IDF baseline on 300 phantom reports (128 distinct), Precision@k per finding and the
//! macro averages at k = 5 and 10; the embeddings themselves; and the errors for bad inputs.

mod common;

use common::*;
use serde_json::Value;

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("text-knn/expected.json")).unwrap()).unwrap()
}

fn demo() -> String {
    root().join("weights/phantom-demo").display().to_string()
}

fn text_knn(extra: &[&str]) -> Value {
    let manifest = fixture("text-knn/reports.jsonl").display().to_string();
    let mut args = vec!["eval", "text-knn", "--manifest", &manifest, "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = run_cli(&args, None);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-12,
        _ => a == b,
    }
}

#[test]
fn precision_at_k_matches_transformers_and_sklearn() {
    let want = expected();
    let demo = demo();
    for (mode, args) in [
        ("pooled", vec!["--model", demo.as_str()]),
        ("mean", vec!["--model", demo.as_str(), "--pooling", "mean"]),
        ("tfidf", vec!["--tfidf"]),
    ] {
        for k in ["5", "10"] {
            let mut a = args.clone();
            a.extend_from_slice(&["-k", k]);
            let got = text_knn(&a);
            let w = &want["results"][mode][k];
            assert_eq!(got["reports"], want["reports"], "{mode}: distinct reports");
            let findings = got["findings"].as_array().unwrap();
            assert_eq!(findings.len(), w["precision"].as_object().unwrap().len(), "{mode} k {k}: findings");
            for f in findings {
                let name = f["finding"].as_str().unwrap();
                let p = &w["precision"][name];
                assert!(same(&f["precision"], p), "{mode} k {k} {name}: P@k {} vs reference {p}", f["precision"]);
            }
            println!("{mode} k={k}: macro {} (reference {})", got["macro"], w["macro"]);
            assert!(same(&got["macro"], &w["macro"]) && same(&got["macro_with_side"], &w["macro_with_side"]));
        }
    }
}

/// The embeddings behind the scores: the first distinct reports' pooled and mean vectors.
#[test]
fn embeddings_match_clip_text_model() {
    use roentgen::eval::text_knn::{embed_texts, Pooling};
    use roentgen::models::text::{TextEncoder, TextTokenizer};
    let want = expected();
    let texts: Vec<String> =
        want["first_texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    let mut b = roentgen::backend::cpu::CpuBackend::new();
    let dir = root().join("weights/phantom-demo");
    let (encoder, _) = TextEncoder::load(&mut b, &dir.join("text_encoder"), None).unwrap();
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    for (pooling, name) in [(Pooling::Pooled, "pooled"), (Pooling::Mean, "mean")] {
        let got: Vec<f32> = embed_texts(&mut b, &encoder, &tok, &texts, pooling).unwrap().concat();
        let w: Vec<f32> = want["first_embeddings"][name]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
            .collect();
        assert_close(&format!("{name} embeddings of the first 4 reports"), &got, &w, F32_PARITY);
    }
}

#[test]
fn bad_inputs_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m.jsonl");
    let run = |body: &str, extra: &[&str]| {
        std::fs::write(&m, body).unwrap();
        let mut args = vec!["eval", "text-knn", "--manifest", m.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (code, _, err) = run_cli(&args, None);
        assert_ne!(code, 0, "{body}");
        err
    };
    let row =
        |text: &str, labels: &str| format!("{{\"image\": \"x.png\", \"text\": \"{text}\", \"labels\": {labels}}}\n");
    let err = run(&format!("{}{{\"image\": \"y.png\", \"text\": \"b\"}}\n", row("a", r#"{"Edema": 1}"#)), &["--tfidf"]);
    assert!(err.contains("m.jsonl:2: no labels"), "{err}");
    let err = run(&row("a", r#"{"Edma": 1}"#), &["--tfidf"]);
    assert!(err.contains("m.jsonl:1") && err.contains("\"Edma\" is not a CheXpert finding"), "{err}");
    let body: String = (0..4).map(|i| row(&format!("report {i}"), r#"{"Edema": 1}"#)).collect();
    let err = run(&body, &["--tfidf", "-k", "4"]);
    assert!(err.contains("4 distinct reports: --k 4 needs more than k"), "{err}");
    let err = run(&body, &[]);
    assert!(err.contains("--model"), "{err}");
}

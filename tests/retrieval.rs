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

/// The single-label rows of a fixture manifest (the four phantom classes), in order.
fn single_label_rows(rel: &str) -> Vec<roentgen::io::manifest::Example> {
    use roentgen::eval::labels::{named_targets, LabelPolicy};
    use roentgen::eval::retrieval::{single_class, PHANTOM_CLASSES};
    let classes: Vec<String> = PHANTOM_CLASSES.map(String::from).to_vec();
    let rows = roentgen::io::manifest::read_manifest_rows(&fixture(rel), None).unwrap();
    rows.into_iter()
        .filter(|r| {
            single_class(&named_targets(r.labels.as_ref().unwrap(), &classes, LabelPolicy::Xrv).unwrap()).is_some()
        })
        .collect()
}

/// Image→text: the tiny CLIPModel's text embeddings of the reports and image embeddings of the
/// queries (both pixel normalisations) equal transformers' `get_text_features` and
/// `get_image_features` (retrieval/clip-model-embeddings.safetensors).
#[test]
fn clip_model_embeddings_match_transformers() {
    use roentgen::eval::clip_text::ClipTextTower;
    use roentgen::eval::clip_vision::PixelNorm;
    use roentgen::eval::features::{features_of, FeatureKind, FeatureNet};
    let dir = fixture("retrieval/clip-model");
    let (weights, config) = (dir.join("model.safetensors"), dir.join("config.json"));
    let want_file = fixture("retrieval/clip-model-embeddings.safetensors");
    let tokenizer = root().join("weights/phantom-demo/tokenizer");
    let mut b = roentgen::backend::cpu::CpuBackend::new();
    let tower = ClipTextTower::load(&mut b, &weights, Some(&config), &tokenizer).unwrap();
    let texts: Vec<String> = single_label_rows("retrieval/c/manifest.jsonl").into_iter().map(|r| r.text).collect();
    let got: Vec<f32> = tower.embed(&mut b, &texts).unwrap().concat();
    let (shape, want) = read_f32(&want_file, "text_embeds");
    assert_eq!(shape, [texts.len(), tower.dims()]);
    assert_close("text embeddings", &got, &want, F32_PARITY);
    let images: Vec<_> = single_label_rows("retrieval/q/manifest.jsonl").into_iter().map(|r| r.image).collect();
    for (norm, name) in [(PixelNorm::Openai, "openai"), (PixelNorm::CxrRepair, "cxr-repair")] {
        let cpu = Box::new(roentgen::backend::cpu::CpuBackend::new());
        let mut net = FeatureNet::load(FeatureKind::ClipProj, &weights, Some(&config), cpu).unwrap();
        net.set_pixel_norm(norm).unwrap();
        let got: Vec<f32> = features_of(&mut net, &images).unwrap().concat();
        let (shape, want) = read_f32(&want_file, &format!("image_embeds_{name}"));
        assert_eq!(shape, [images.len(), 8]);
        assert_close(&format!("image embeddings, {name} normalisation"), &got, &want, F32_PARITY);
    }
}

/// `eval retrieval --reports`: image→text Precision@k equals the reference's (expected-text.json).
#[test]
fn image_to_text_precision_matches_transformers() {
    let want: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("retrieval/expected-text.json")).unwrap()).unwrap();
    let dir = fixture("retrieval/clip-model");
    for norm in ["openai", "cxr-repair"] {
        let (got, _) = CliArgs::new(&["eval", "retrieval", "--json"])
            .opt("--queries", fixture("retrieval/q/manifest.jsonl"))
            .opt("--reports", fixture("retrieval/c/manifest.jsonl"))
            .opt("--features", "clip-proj")
            .opt("--weights", dir.join("model.safetensors"))
            .opt("--clip-config", dir.join("config.json"))
            .opt("--tokenizer", root().join("weights/phantom-demo/tokenizer"))
            .opt("--pixel-norm", norm)
            .opt("-k", "1,3,5")
            .run_ok();
        let got: Value = serde_json::from_str(&got).unwrap();
        assert_eq!(got["direction"], "image→text");
        for (g, w) in got["precision_at_k"].as_array().unwrap().iter().zip(want["results"][norm].as_array().unwrap()) {
            println!("{norm} P@{}: {} (reference {})", w["k"], g["precision"], w["precision"]);
            assert_eq!(g["k"], w["k"]);
            assert!((g["precision"].as_f64().unwrap() - w["precision"].as_f64().unwrap()).abs() <= 1e-12, "{norm}");
            for (cls, p) in w["per_class"].as_object().unwrap() {
                let (a, b) = (g["per_class"][cls].as_f64(), p.as_f64());
                assert!(a == b || (a.unwrap() - b.unwrap()).abs() <= 1e-12, "{norm} P@{} {cls}", w["k"]);
            }
        }
    }
}

/// Image→text needs the projected image features and a file with the text tower.
#[test]
fn image_to_text_refuses_what_cannot_compare() {
    let q = fixture("retrieval/q/manifest.jsonl");
    let reports = fixture("retrieval/c/manifest.jsonl");
    let tiny = fixture("fid/clip-tiny");
    let args = CliArgs::new(&["eval", "retrieval"])
        .opt("--queries", &q)
        .opt("--reports", &reports)
        .opt("--weights", tiny.join("model.safetensors"))
        .opt("--clip-config", tiny.join("config.json"))
        .opt("--tokenizer", root().join("weights/phantom-demo/tokenizer"));
    args.clone().opt("--features", "clip").expect_error(&["--reports", "--features clip-proj"]);
    args.clone().opt("--features", "clip-proj").expect_error(&["no CLIP text tower", "model.safetensors"]);
    let (code, _, err) = args.opt("--features", "clip-proj").opt("--candidates", &q).run();
    assert_eq!(code, 2, "clap's usage error: {err}");
    assert!(err.contains("'--reports <REPORTS>' cannot be used with '--candidates <CANDIDATES>'"), "{err}");
}

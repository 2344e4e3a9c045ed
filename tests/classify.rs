//! `roentgen eval classify` and its parts against their references (fixtures by
//! tests/fixtures/generate_xrv_outputs.py, torchxrayvision 1.5.7 and scikit-learn):
//! - XRV's output normalisation (sigmoid, then `op_norm` with the model's operating points): logits
//!   just below, at and above every threshold, wide logits, and NaN thresholds;
//! - the classifier head on the seeded DenseNet-121;
//! - the paper's preprocessing (longer side to 512, a 512 square by padding or cropping, XRV's 224);
//! - the whole command on 24 labelled images: scores, per-class AUROC against sklearn, and the
//!   bootstrap intervals redrawn in Python;
//! - its errors for bad inputs.

mod common;

use common::seeded::seeded_source;
use common::*;
use roentgen::eval::densenet::{
    op_norm_score, paper_preprocess, preprocess, DenseNet, DenseNetConfig, Square, OP_THRESHS_ALL,
};
use roentgen::eval::features::load_image;
use roentgen::eval::tensors::{MapSource, Weights};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn cpu() -> Box<dyn roentgen::backend::Backend> {
    Box::new(roentgen::backend::cpu::CpuBackend::new())
}

fn json_fixture(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn pipeline_images() -> Vec<PathBuf> {
    ["a.png", "b.png", "c.png"].iter().map(|n| fixture(&format!("fid/images/{n}"))).collect()
}

/// DenseNet-121's tensors and an 18-output classifier head.
fn classifier_specs() -> Vec<(String, Vec<usize>)> {
    let config = DenseNetConfig::densenet121();
    let mut specs = config.expected_tensors();
    specs.push(("classifier.weight".into(), vec![18, config.dims()]));
    specs.push(("classifier.bias".into(), vec![18]));
    specs
}

/// The seeded network of paper.json: its classifier weight multiplied by the fixture's
/// `classifier_scale` in f32, as PyTorch's `mul_` does.
fn paper_source(fx: &Value) -> MapSource {
    let mut src = seeded_source("seeded xrv (paper.json)", &classifier_specs());
    let scale = fx["classifier_scale"].as_f64().unwrap() as f32;
    src.tensors.get_mut("classifier.weight").unwrap().1.iter_mut().for_each(|w| *w *= scale);
    src
}

fn grid(v: &Value) -> Vec<Vec<f32>> {
    let value = |x: &Value| x.as_f64().map_or(f32::NAN, |x| x as f32);
    v.as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(value).collect()).collect()
}

#[test]
fn op_norm_matches_torchxrayvision() {
    let path = fixture("xrv-outputs/op_norm.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut bad = Vec::new();
    let mut total = 0;
    for case in fx["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let threshs: Vec<f32> = grid(&Value::Array(vec![case["op_threshs"].clone()])).remove(0);
        if name == "all" {
            assert_eq!(threshs, OP_THRESHS_ALL, "densenet121-res224-all's operating points");
        }
        let (logits, want) = (grid(&case["logits"]), grid(&case["op_norm"]));
        for (r, (row, want_row)) in logits.iter().zip(&want).enumerate() {
            for (k, ((&x, &t), &w)) in row.iter().zip(&threshs).zip(want_row).enumerate() {
                total += 1;
                let got = op_norm_score(x, t);
                if (got - w).abs() > 1e-6 {
                    bad.push(format!("{name} row {r} output {k}: logit {x} threshold {t}: {got} vs xrv {w}"));
                }
            }
        }
    }
    assert_no_mismatches("op_norm scores", total, "two threshold sets, logits around each threshold", &bad);
}

/// The classifier head on top of the same seeded network: logits against
/// `model.classifier(model.features2(x))`, scores against `model(x)` with densenet121-res224-all's
/// operating points (xrv-outputs/classify.json, by generate_xrv_outputs.py); weights without the
/// head compute features only and say so when asked for logits.
#[test]
fn xrv_classifier_matches_torchxrayvision() {
    let config = DenseNetConfig::densenet121();
    let src = seeded_source("seeded xrv", &classifier_specs());
    let mut net = DenseNet::load(cpu(), &Weights { src: &src, network: "xrv" }, config.clone()).unwrap();
    let fx = json_fixture("xrv-outputs/classify.json");
    for p in pipeline_images() {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        let img = load_image(&p).unwrap();
        let x = preprocess(&img.pixels, img.height, img.width, img.channels);
        let features = net.forward(&[x]).unwrap();
        let logits = net.logits(&features).unwrap().remove(0);
        let want = &fx["images"][&name];
        assert_close(&format!("xrv classifier logits {name}"), &logits, &f32s(&want["logits"]), F32_PARITY);
        let scores: Vec<f32> = logits.iter().zip(OP_THRESHS_ALL).map(|(&l, t)| op_norm_score(l, t)).collect();
        assert_close(&format!("xrv scores {name}"), &scores, &f32s(&want["scores"]), 1e-6);
    }
    let headless = seeded_source("seeded xrv", &config.expected_tensors());
    let net = DenseNet::load(cpu(), &Weights { src: &headless, network: "xrv" }, config).unwrap();
    let err = net.logits(&[vec![0.5; 1024]]).unwrap_err().to_string();
    assert!(err.contains("no classifier head"), "{err}");
}

/// The paper's preprocessing (both squares) and the classifier on it, on five images: enlarged
/// gray and RGB, a non-square gray, a wide gray shrunk (700×540) and a tall RGB (380×620).
#[test]
fn paper_preprocessing_and_scores_match_torchxrayvision() {
    let fx = json_fixture("xrv-outputs/paper.json");
    let src = paper_source(&fx);
    let mut net = DenseNet::load(cpu(), &Weights { src: &src, network: "xrv" }, DenseNetConfig::densenet121()).unwrap();
    let images = fx["images"].as_object().unwrap();
    assert_eq!(images.len(), 5);
    for (name, by_square) in images {
        let path = if ["wide.png", "tall.png"].contains(&name.as_str()) {
            fixture(&format!("xrv-outputs/images/{name}"))
        } else {
            fixture(&format!("fid/images/{name}"))
        };
        let img = load_image(&path).unwrap();
        for (square, tag) in [(Square::Pad, "pad"), (Square::Crop, "crop")] {
            let want = &by_square[tag];
            let x = paper_preprocess(&img.pixels, img.height, img.width, img.channels, square, 224);
            assert_eq!((x.h, x.w, x.c), (224, 224, 1));
            let sample: Vec<f32> = (0..224)
                .step_by(11)
                .flat_map(|y| (0..224).step_by(5).map(move |c| (y, c)))
                .map(|(y, c)| x.data[y * 224 + c])
                .collect();
            let want_sample: Vec<f32> = want["input_sample"].as_array().unwrap().iter().flat_map(f32s).collect();
            // Values span [-1024, 1024]: the bar is relative to that scale.
            assert_close(&format!("paper preprocessing {name} {tag}"), &sample, &want_sample, 1e-6);
            let features = net.forward(&[x]).unwrap();
            let logits = net.logits(&features).unwrap().remove(0);
            assert_close(&format!("logits {name} {tag}"), &logits, &f32s(&want["logits"]), F32_PARITY);
            let scores: Vec<f32> = logits.iter().zip(OP_THRESHS_ALL).map(|(&l, t)| op_norm_score(l, t)).collect();
            assert_close(&format!("scores {name} {tag}"), &scores, &f32s(&want["scores"]), 1e-5);
        }
    }
}

/// Writes the seeded classifier of paper.json as a safetensors file (the command reads files).
fn write_weights(src: &MapSource, path: &Path) {
    use roentgen::io::safetensors::{write_atomic, OutTensor};
    let mut names: Vec<&String> = src.tensors.keys().collect();
    names.sort();
    let tensors: Vec<_> = names
        .iter()
        .map(|n| {
            let (shape, data) = &src.tensors[*n];
            (n.as_str(), shape.clone(), OutTensor::F32(data))
        })
        .collect();
    write_atomic(path, &tensors).unwrap();
}

fn classify_json(args: &[&str]) -> Value {
    let (code, out, err) = run_cli(args, None);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn close(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-12,
        _ => a == b,
    }
}

fn interval_close(a: &Value, b: &Value) -> bool {
    match (a.as_array(), b.as_array()) {
        (Some(x), Some(y)) => x.len() == y.len() && x.iter().zip(y).all(|(p, q)| close(p, q)),
        _ => a == b,
    }
}

/// The whole command on 24 labelled images (CheXpert labels, targets by xrv's own code): every
/// score against xrv, every class's AUROC and counts against sklearn, and every interval (and the
/// filtered average's) against the same bootstrap drawn in Python.
#[test]
fn eval_classify_matches_sklearn_on_labelled_images() {
    let fx = json_fixture("xrv-outputs/paper.json");
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("xrv.safetensors");
    write_weights(&paper_source(&fx), &weights);
    let manifest = fixture("xrv-outputs/e2e/manifest.jsonl");
    let boot = &fx["e2e"]["bootstrap"];
    let (resamples, seed) = (boot["resamples"].to_string(), boot["seed"].to_string());
    let v = classify_json(&[
        "eval",
        "classify",
        "--manifest",
        manifest.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--resamples",
        &resamples,
        "--seed",
        &seed,
        "--json",
        "--per-image",
    ]);
    let want = &fx["e2e"];
    let rows = v["per_image"].as_array().unwrap();
    assert_eq!(rows.len(), 24);
    let got_scores: Vec<f32> = rows.iter().flat_map(|r| f32s(&r["scores"])).collect();
    let want_scores: Vec<f32> = want["scores"].as_array().unwrap().iter().flat_map(f32s).collect();
    assert_close("scores of the 24 images", &got_scores, &want_scores, 1e-5);
    let xrv_labels = json_fixture("xrv-labels/rows.json");
    for (r, row) in rows.iter().zip(xrv_labels["rows"].as_array().unwrap()) {
        assert_eq!(
            r["targets"].as_array().unwrap().iter().map(|t| t.as_bool().map(|b| b as i64)).collect::<Vec<_>>(),
            row["xrv_targets"].as_array().unwrap().iter().map(Value::as_i64).collect::<Vec<_>>(),
            "{}",
            r["image"]
        );
    }
    let mut compared = 0;
    for c in v["classes"].as_array().unwrap() {
        let name = c["class"].as_str().unwrap();
        let w = &want["classes"][name];
        assert_eq!((&c["n_pos"], &c["n_neg"]), (&w["n_pos"], &w["n_neg"]), "{name}: counts");
        assert!(close(&c["auroc"], &w["auroc"]), "{name}: AUROC {} vs sklearn {}", c["auroc"], w["auroc"]);
        assert!(
            interval_close(&c["interval"], &w["interval"]),
            "{name}: interval {} vs {}",
            c["interval"],
            w["interval"]
        );
        compared += c["auroc"].is_f64() as usize;
    }
    assert_eq!(compared, 11, "classes with an AUROC");
    let (f, wf) = (&v["filtered_average"], &want["filtered_average"]);
    println!("filtered average {} {} (sklearn {} {})", f["auroc"], f["interval"], wf["auroc"], wf["interval"]);
    assert!(close(&f["auroc"], &wf["auroc"]) && interval_close(&f["interval"], &wf["interval"]), "{f} vs {wf}");
    assert_eq!(f["classes"], wf["classes"]);
}

/// Phantom labels in PNG chunks: the four findings are known in every image and no other class
/// is; the table names the classes skipped for want of labels, and the filtered average says which
/// of its classes it went without.
#[test]
fn eval_classify_reads_phantom_folders_and_says_what_it_skips() {
    let fx = json_fixture("xrv-outputs/paper.json");
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("xrv.safetensors");
    write_weights(&paper_source(&fx), &weights);
    let dir = tmp.path().join("phantoms");
    let (code, _, err) =
        run_cli(&["phantom", "--out", dir.to_str().unwrap(), "--count", "12", "--size", "64", "--seed", "3"], None);
    assert_eq!(code, 0, "phantom: {err}");
    let (d, w) = (dir.to_str().unwrap(), weights.to_str().unwrap());
    let v = classify_json(&["eval", "classify", "--images", d, "--weights", w, "--resamples", "50", "--json"]);
    let phantom_classes = ["Consolidation", "Pneumothorax", "Effusion", "Cardiomegaly"];
    for c in v["classes"].as_array().unwrap() {
        let name = c["class"].as_str().unwrap();
        let known = c["n_pos"].as_u64().unwrap() + c["n_neg"].as_u64().unwrap();
        assert_eq!(known, if phantom_classes.contains(&name) { 12 } else { 0 }, "{name}");
    }
    assert_eq!(v["filtered_average"]["missing"], json!(["Atelectasis", "Edema"]));
    let (code, out, err) = run_cli(&["eval", "classify", "--images", d, "--weights", w, "--resamples", "50"], None);
    assert_eq!(code, 0, "{err}");
    println!("{out}");
    assert!(out.contains("skipped, no labels: Atelectasis, Infiltration, Edema, Emphysema"), "{out}");
    assert!(out.contains("(without Atelectasis, Edema: no AUROC)"), "{out}");
}

/// Bad inputs get errors that name the file, row and field.
#[test]
fn eval_classify_refuses_bad_inputs_by_name() {
    let fx = json_fixture("xrv-outputs/paper.json");
    let tmp = tempfile::tempdir().unwrap();
    let weights = tmp.path().join("xrv.safetensors");
    write_weights(&paper_source(&fx), &weights);
    let img = fixture("xrv-outputs/e2e/i00.png");
    let w = weights.to_str().unwrap();
    let run = |rows: &[Value]| {
        let m = tmp.path().join("m.jsonl");
        std::fs::write(&m, rows.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
        let (code, _, err) = run_cli(&["eval", "classify", "--manifest", m.to_str().unwrap(), "--weights", w], None);
        assert_ne!(code, 0);
        err
    };
    let image = img.to_str().unwrap();
    let err =
        run(&[json!({"image": image, "text": "a", "labels": {"Edema": 1}}), json!({"image": image, "text": "b"})]);
    assert!(err.contains("m.jsonl:2: no labels for image"), "{err}");
    let err = run(&[json!({"image": image, "text": "a", "labels": {"Pleural Efusion": 1}})]);
    assert!(err.contains("m.jsonl:1") && err.contains("\"Pleural Efusion\" is not a CheXpert finding"), "{err}");
    let err = run(&[json!({"image": image, "text": "a", "labels": {"Edema": 1}})]);
    assert!(err.contains("1 labelled image"), "{err}");
    // A PNG without a labels chunk (the pipeline images have none).
    let dir = tmp.path().join("unlabelled");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(&pipeline_images()[0], dir.join("a.png")).unwrap();
    let (code, _, err) = run_cli(&["eval", "classify", "--images", dir.to_str().unwrap(), "--weights", w], None);
    assert_ne!(code, 0);
    assert!(err.contains("a.png: no \"labels\" text chunk"), "{err}");
    // Weights without the classifier head.
    let headless = tmp.path().join("headless.safetensors");
    let mut src = paper_source(&fx);
    src.tensors.retain(|k, _| !k.starts_with("classifier."));
    write_weights(&src, &headless);
    let two = [
        json!({"image": image, "text": "a", "labels": {"Edema": 1}}),
        json!({"image": image, "text": "b", "labels": {"Edema": 0}}),
    ];
    let m = tmp.path().join("two.jsonl");
    std::fs::write(&m, two.iter().map(|r| format!("{r}\n")).collect::<String>()).unwrap();
    let (code, _, err) = run_cli(
        &["eval", "classify", "--manifest", m.to_str().unwrap(), "--weights", headless.to_str().unwrap()],
        None,
    );
    assert_ne!(code, 0);
    assert!(err.contains("no classifier head"), "{err}");
}

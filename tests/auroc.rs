//! Per-class AUROC against scikit-learn's `roc_auc_score` and the bootstrap's percentiles against
//! numpy's (fixtures by tests/fixtures/generate_auroc.py), on scores with many ties and missing
//! labels.

mod common;

use common::*;
use roentgen::eval::auroc::{bootstrap_interval, class_auroc, percentile};
use serde_json::Value;

fn cases() -> Value {
    let path = fixture("auroc/cases.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// 1 positive, 0 negative, −1 missing (the fixture's coding).
fn labels(v: &Value) -> Vec<Option<bool>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| match x.as_i64().unwrap() {
            -1 => None,
            l => Some(l == 1),
        })
        .collect()
}

#[test]
fn auroc_matches_sklearn_with_ties_and_missing_labels() {
    let fx = cases();
    let mut ties_seen = 0;
    for c in fx["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let (s, l) = (f32s(&c["scores"]), labels(&c["labels"]));
        let mut sorted = s.clone();
        sorted.sort_by(f32::total_cmp);
        ties_seen += sorted.windows(2).filter(|w| w[0] == w[1]).count();
        let got = class_auroc(&s, &l).unwrap();
        assert_eq!(got.n_pos as u64, c["n_pos"].as_u64().unwrap(), "{name}: positives");
        assert_eq!(got.n_neg as u64, c["n_neg"].as_u64().unwrap(), "{name}: negatives");
        let want = c["sklearn_auroc"].as_f64().unwrap();
        let auc = got.auroc.unwrap();
        assert!((auc - want).abs() < 1e-12, "{name}: AUROC {auc} vs sklearn {want}");
    }
    assert!(ties_seen > 1000, "the fixture should exercise ties ({ties_seen} tied neighbours)");
}

#[test]
fn percentiles_match_numpy() {
    for p in cases()["percentiles"].as_array().unwrap() {
        let values: Vec<f64> = p["values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let q = p["q"].as_f64().unwrap();
        let want = p["numpy"].as_f64().unwrap();
        let got = percentile(&values, q);
        assert!((got - want).abs() < 1e-15, "q {q}: {got} vs numpy {want}");
    }
}

/// The interval is reproducible from its seed, holds the point estimate on a sizeable sample,
/// narrows as the sample grows, and is absent when the known labels hold one class.
#[test]
fn bootstrap_interval_is_seeded_and_sensible() {
    let fx = cases();
    let all = fx["cases"].as_array().unwrap();
    let pick = |n: usize| all.iter().find(|c| c["scores"].as_array().unwrap().len() == n).unwrap();
    let widths: Vec<f64> = [200, 5000]
        .iter()
        .map(|&n| {
            let c = pick(n);
            let (s, l) = (f32s(&c["scores"]), labels(&c["labels"]));
            let (lo, hi) = bootstrap_interval(&[(&s, &l)], 500, 0.95, 7).unwrap().unwrap();
            assert_eq!(bootstrap_interval(&[(&s, &l)], 500, 0.95, 7).unwrap(), Some((lo, hi)), "n {n}: same seed");
            assert_ne!(bootstrap_interval(&[(&s, &l)], 500, 0.95, 8).unwrap(), Some((lo, hi)), "n {n}: other seed");
            let auc = c["sklearn_auroc"].as_f64().unwrap();
            assert!(lo < auc && auc < hi, "n {n}: {auc} outside [{lo}, {hi}]");
            hi - lo
        })
        .collect();
    assert!(widths[1] < widths[0] / 2.0, "interval widths {widths:?}");
    let one_class = bootstrap_interval(&[(&[0.1, 0.9], &[Some(true), Some(true)])], 100, 0.95, 1).unwrap();
    assert_eq!(one_class, None);
}

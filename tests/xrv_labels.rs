//! CheXpert labels → TorchXRayVision's 18 targets, against torchxrayvision 1.5.7's own
//! `MIMIC_Dataset` + `relabel_dataset` on random label rows (fixture by
//! tests/fixtures/generate_xrv_labels.py): the "No Finding" rule, uncertain and blank as missing,
//! Pleural Effusion → Effusion, the outputs no CheXpert label reaches.

mod common;

use common::*;
use roentgen::eval::labels::{xrv_targets, XRV_PATHOLOGIES};
use serde_json::Value;

#[test]
fn targets_match_torchxrayvision() {
    let path = fixture("xrv-labels/rows.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let names: Vec<&str> = fx["pathologies"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(names, XRV_PATHOLOGIES, "output order");
    let rows = fx["rows"].as_array().unwrap();
    let mut bad = Vec::new();
    let (mut healthy, mut uncertain) = (0, 0);
    for r in rows {
        let labels = r["labels"].as_object().unwrap();
        healthy += labels.get("No Finding").is_some() as usize;
        uncertain += labels.values().filter(|v| v.as_f64() == Some(-1.0)).count();
        let want: Vec<Option<bool>> =
            r["xrv_targets"].as_array().unwrap().iter().map(|v| v.as_i64().map(|x| x == 1)).collect();
        let got = xrv_targets(labels).unwrap();
        if got.as_slice() != want.as_slice() {
            bad.push(format!("subject {}: {got:?} vs xrv {want:?}", r["subject_id"]));
        }
    }
    assert_no_mismatches("XRV targets", rows.len(), "rows of random CheXpert labels", &bad);
    assert!(
        healthy > 40 && uncertain > 200,
        "the fixture exercises the rules ({healthy} healthy, {uncertain} uncertain)"
    );
}

//! TorchXRayVision's output normalisation (sigmoid, then `op_norm` with the model's operating
//! points) against torchxrayvision 1.5.7 (fixture by tests/fixtures/generate_xrv_outputs.py):
//! logits just below, at and above every threshold, wide logits, and NaN thresholds.

mod common;

use common::*;
use roentgen::eval::densenet::{op_norm_score, OP_THRESHS_ALL};
use serde_json::Value;

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

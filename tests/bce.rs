//! The classifier's masked BCE-with-logits loss and its gradient against PyTorch's
//! `binary_cross_entropy_with_logits` with a masked mean and `loss.backward()` (fixture by
//! tests/fixtures/generate_bce.py): missing labels, 18 and 6 outputs, logits up to ±40.

mod common;

use common::*;
use roentgen::train::bce::masked_bce_with_logits;
use serde_json::Value;

#[test]
fn masked_bce_matches_pytorch() {
    let path = fixture("bce/cases.json");
    let fx: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for c in fx["cases"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let f32s =
            |k: &str| -> Vec<f32> { c[k].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
        let targets: Vec<Option<bool>> = c["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| match t.as_i64().unwrap() {
                -1 => None,
                t => Some(t == 1),
            })
            .collect();
        let (loss, grad) = masked_bce_with_logits(&f32s("logits"), &targets).unwrap();
        let want = c["loss"].as_f64().unwrap() as f32;
        assert!((loss - want).abs() <= 1e-6 * want.abs().max(1.0), "{name}: loss {loss} vs PyTorch {want}");
        assert_close(&format!("{name}: d loss / d logits"), &grad, &f32s("grad"), 1e-7);
        for (g, t) in grad.iter().zip(&targets) {
            assert!(t.is_some() || *g == 0.0, "{name}: a missing label has a gradient");
        }
    }
}

#[test]
fn nothing_known_is_zero_and_lengths_must_agree() {
    let (loss, grad) = masked_bce_with_logits(&[0.3, -2.0], &[None, None]).unwrap();
    assert_eq!((loss, grad), (0.0, vec![0.0, 0.0]));
    let e = masked_bce_with_logits(&[0.3, -2.0], &[None]).unwrap_err().to_string();
    assert!(e.contains("2 logits but 1 targets"), "{e}");
}

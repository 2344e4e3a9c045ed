//! The multi-label classifier's loss (issue 16, Table 5's classifiers): binary cross-entropy on
//! logits, averaged over the labels that are known. A missing label (CheXpert's blank or
//! uncertain under XRV's policy, see `eval::labels`) takes no part in the loss or its gradient.
//!
//! Per element it is PyTorch's `binary_cross_entropy_with_logits` (the stable form
//! max(x, 0) − x·y + log(1 + e^−|x|)); the reduction is `(loss · mask).sum() / mask.sum()`, the
//! usual masked mean (PyTorch has no masked reduction of its own). The logits are a batch × 18
//! matrix, so this runs on the host: downloading them costs less than a kernel launch's setup.
//! tests/bce.rs checks the loss and `loss.backward()`'s gradient against PyTorch.

use anyhow::{ensure, Result};

/// (mean loss over the known labels, d loss / d logit for every logit). `targets[i]` is `None`
/// for a missing label; its gradient is 0. With no known label at all the loss is 0 and so is
/// every gradient (an empty mean, which PyTorch would give as NaN; a batch with nothing to learn
/// from is not an error here).
pub fn masked_bce_with_logits(logits: &[f32], targets: &[Option<bool>]) -> Result<(f32, Vec<f32>)> {
    ensure!(logits.len() == targets.len(), "masked BCE: {} logits but {} targets", logits.len(), targets.len());
    let known = targets.iter().filter(|t| t.is_some()).count();
    if known == 0 {
        return Ok((0.0, vec![0.0; logits.len()]));
    }
    let n = known as f32;
    let mut sum = 0f64;
    let grad = logits
        .iter()
        .zip(targets)
        .map(|(&x, t)| match t {
            None => 0.0,
            Some(t) => {
                let y = if *t { 1.0f32 } else { 0.0 };
                sum += (x.max(0.0) - x * y + (-x.abs()).exp().ln_1p()) as f64;
                (sigmoid(x) - y) / n
            }
        })
        .collect();
    Ok(((sum / known as f64) as f32, grad))
}

/// The logistic function, without overflow for large |x|.
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

//! Per-class AUROC, as the paper's Tables 3 and 5 report it (issue 16): sklearn's
//! `roc_auc_score` for binary labels, the class counts beside it, and a percentile bootstrap
//! interval.
//!
//! sklearn computes the area under the ROC curve with the trapezoidal rule over the curve's
//! distinct thresholds. That area equals the Mann–Whitney statistic: the probability that a random
//! positive scores above a random negative, a tie counting one half. Here it is computed that way,
//! from average ranks in f64, in O(n log n), with no curve built. The two computations agree to
//! rounding (tests/auroc.rs checks against sklearn on scores with many ties).

use crate::rng::splitmix::SplitMix64;
use anyhow::{bail, Result};

/// One class's AUROC over the rows whose label is known.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassAuroc {
    /// None when the known labels hold only one class (sklearn raises; the report prints a skip
    /// line).
    pub auroc: Option<f64>,
    pub n_pos: usize,
    pub n_neg: usize,
}

/// The AUROC of `scores` against `labels`, over the rows whose label is `Some` (a missing label,
/// e.g. CheXpert's blank or −1 under XRV's policy, takes no part). A NaN score is an error naming
/// its row: sklearn refuses NaN input too.
pub fn class_auroc(scores: &[f32], labels: &[Option<bool>]) -> Result<ClassAuroc> {
    let mut known = known_pairs(scores, labels)?;
    let n_pos = known.iter().filter(|(_, l)| *l).count();
    let n_neg = known.len() - n_pos;
    Ok(ClassAuroc { auroc: mann_whitney_auc(&mut known), n_pos, n_neg })
}

/// The (score, positive) pairs of the rows whose label is known, after the checks every AUROC
/// makes: equal lengths, no NaN score.
fn known_pairs(scores: &[f32], labels: &[Option<bool>]) -> Result<Vec<(f32, bool)>> {
    if scores.len() != labels.len() {
        bail!("AUROC: {} scores but {} labels", scores.len(), labels.len());
    }
    let mut known = Vec::with_capacity(scores.len());
    for (row, (&s, l)) in scores.iter().zip(labels).enumerate() {
        if let Some(l) = l {
            if s.is_nan() {
                bail!("AUROC: the score of row {row} is NaN");
            }
            known.push((s, *l));
        }
    }
    Ok(known)
}

/// The area from (score, positive) pairs, reordered in place; None without both classes.
fn mann_whitney_auc(pairs: &mut [(f32, bool)]) -> Option<f64> {
    let n_pos = pairs.iter().filter(|(_, l)| *l).count();
    let n_neg = pairs.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    pairs.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
    // Σ over positives of their rank (1-based; tied scores share the mean of their ranks). −0 and
    // +0 are one score here, as they are to numpy.
    let mut pos_rank_sum = 0f64;
    let mut i = 0;
    while i < pairs.len() {
        let mut j = i + 1;
        while j < pairs.len() && pairs[j].0 == pairs[i].0 {
            j += 1;
        }
        let mean_rank = (i + 1 + j) as f64 / 2.0; // ranks i + 1 ..= j
        let positives = pairs[i..j].iter().filter(|(_, l)| *l).count();
        pos_rank_sum += positives as f64 * mean_rank;
        i = j;
    }
    let (p, n) = (n_pos as f64, n_neg as f64);
    Some((pos_rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

/// One class's scores and labels, row for row (the rows are images, shared by every class).
pub type ClassColumn<'a> = (&'a [f32], &'a [Option<bool>]);

/// A percentile bootstrap interval of the AUROC of one class, or of the mean AUROC of several (the
/// paper's filtered average): `resamples` draws of the images (rows) with replacement, the same
/// draw for every class (SplitMix64 from `seed`: row = next_u64 mod n, so a run is reproducible
/// and tests/classify.rs can redraw it in Python); in each draw, each class's AUROC over the drawn
/// rows whose label is known, averaged over the classes; then the `level` interval's percentiles
/// (numpy's linear rule). A draw in which some class holds one class of label only has no AUROC
/// and is skipped. None when fewer than half the draws had one.
pub fn bootstrap_interval(
    classes: &[ClassColumn],
    resamples: usize,
    level: f64,
    seed: u64,
) -> Result<Option<(f64, f64)>> {
    let n = classes.first().map_or(0, |(s, _)| s.len());
    for (scores, labels) in classes {
        if scores.len() != n {
            bail!("AUROC bootstrap: classes over {} and {} rows", n, scores.len());
        }
        known_pairs(scores, labels)?;
    }
    if n == 0 || resamples == 0 {
        return Ok(None);
    }
    let mut rng = SplitMix64::new(seed);
    let mut rows = vec![0usize; n];
    let mut pairs = Vec::with_capacity(n);
    let mut stats = Vec::with_capacity(resamples);
    'draws: for _ in 0..resamples {
        for r in rows.iter_mut() {
            *r = (rng.next_u64() % n as u64) as usize;
        }
        let mut sum = 0.0;
        for (scores, labels) in classes {
            pairs.clear();
            pairs.extend(rows.iter().filter_map(|&r| labels[r].map(|l| (scores[r], l))));
            match mann_whitney_auc(&mut pairs) {
                Some(a) => sum += a,
                None => continue 'draws,
            }
        }
        stats.push(sum / classes.len() as f64);
    }
    if stats.len() * 2 < resamples {
        return Ok(None);
    }
    stats.sort_unstable_by(f64::total_cmp);
    let tail = (1.0 - level) / 2.0 * 100.0;
    Ok(Some((percentile(&stats, tail), percentile(&stats, 100.0 - tail))))
}

/// numpy's `percentile(values, q)` with its default (linear) rule, on sorted values: the value at
/// fractional index q / 100 · (n − 1), interpolated between its neighbours.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let at = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, frac) = (at.floor() as usize, at - at.floor());
    match sorted.get(lo + 1) {
        Some(&hi) if frac > 0.0 => sorted[lo] + (hi - sorted[lo]) * frac,
        _ => sorted[lo],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition by pairs (a tie one half), on a case small enough to count by hand: positives
    /// 0.8, 0.4, 0.4; negatives 0.4, 0.1. Pairs: 0.8 beats both (2), each 0.4 ties one and beats
    /// one (1.5 each): 5 of 6.
    #[test]
    fn ties_count_one_half() {
        let scores = [0.8, 0.4, 0.4, 0.4, 0.1];
        let labels = [Some(true), Some(true), Some(true), Some(false), Some(false)];
        let r = class_auroc(&scores, &labels).unwrap();
        assert_eq!((r.n_pos, r.n_neg), (3, 2));
        assert!((r.auroc.unwrap() - 5.0 / 6.0).abs() < 1e-15);
    }

    #[test]
    fn missing_labels_take_no_part_and_one_class_has_no_auroc() {
        let scores = [0.9, 0.2, 0.5, f32::NAN];
        let r = class_auroc(&scores, &[Some(true), Some(false), None, None]).unwrap();
        assert_eq!(r.auroc, Some(1.0));
        let one = class_auroc(&scores[..2], &[Some(true), Some(true)]).unwrap();
        assert_eq!((one.auroc, one.n_pos, one.n_neg), (None, 2, 0));
        let err = class_auroc(&scores, &[Some(true), Some(false), None, Some(true)]).unwrap_err();
        assert!(err.to_string().contains("row 3 is NaN"), "{err}");
        assert!(class_auroc(&scores, &[Some(true)]).is_err());
    }

    /// numpy's linear percentile, by hand: [1, 2, 4, 8] at q = 50 is index 1.5 → 3; q = 100 is 8.
    #[test]
    fn percentile_interpolates_linearly() {
        let v = [1.0, 2.0, 4.0, 8.0];
        assert_eq!(percentile(&v, 50.0), 3.0);
        assert_eq!(percentile(&v, 100.0), 8.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert!((percentile(&v, 2.5) - 1.075).abs() < 1e-12);
    }
}

//! `roentgen eval retrieval`, the reachable part of the paper's Table 4: retrieval precision. Each
//! query image (a generated one) retrieves its k most similar candidates by cosine similarity: real
//! images, by an image encoder's features (any of `eval fid`'s networks: CLIP's tower as the
//! paper's retrieval baselines use, XRV's DenseNet, Inception), or reports, by CLIP's joint
//! image–text embeddings (`clip_text` for the text side). A retrieved candidate scores when it has
//! the query's finding. As the paper does, only images and reports whose labels hold exactly one of
//! the classes take part (a report with several findings has no single right answer).
//! Precision@k: the mean over queries of the share of their k neighbours that score, overall and
//! per class.
//!
//! Not built: report generation with its NLP metrics (the rest of Table 4).

use anyhow::{bail, Result};

/// The paper's retrieval classes (Table 4: reports with exactly one of these findings).
pub const PAPER_CLASSES: [&str; 8] = [
    "Atelectasis",
    "Consolidation",
    "Cardiomegaly",
    "Edema",
    "Fracture",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
];

/// The phantom findings retrieval uses by default (no finding is not a class, as in the paper).
pub const PHANTOM_CLASSES: [&str; 4] = ["cardiomegaly", "effusion", "pneumothorax", "consolidation"];
use rayon::prelude::*;
use serde_json::{json, Value};

/// For each query, the indices of its `k` most cosine-similar candidates, most similar first (ties
/// in candidate order). With `skip_same_index`, query i never retrieves candidate i (a set against
/// itself). Similarities in f64 from unit vectors (a zero vector is similar to nothing).
pub fn cosine_neighbours(
    queries: &[Vec<f32>],
    candidates: &[Vec<f32>],
    k: usize,
    skip_same_index: bool,
) -> Vec<Vec<usize>> {
    let unit = |e: &Vec<f32>| -> Vec<f64> {
        let norm = e.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
        e.iter().map(|&x| if norm > 0.0 { x as f64 / norm } else { 0.0 }).collect()
    };
    let (q, c): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
        (queries.iter().map(unit).collect(), candidates.iter().map(unit).collect());
    (0..q.len())
        .into_par_iter()
        .map(|i| {
            let mut sims: Vec<(f64, usize)> = (0..c.len())
                .filter(|&j| !(skip_same_index && j == i))
                .map(|j| (q[i].iter().zip(&c[j]).map(|(a, b)| a * b).sum(), j))
                .collect();
            sims.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            sims.iter().take(k).map(|&(_, j)| j).collect()
        })
        .collect()
}

/// The one class of `targets` that is positive, if exactly one is.
pub fn single_class(targets: &[Option<bool>]) -> Option<usize> {
    let mut pos = targets.iter().enumerate().filter(|(_, t)| **t == Some(true)).map(|(i, _)| i);
    match (pos.next(), pos.next()) {
        (Some(i), None) => Some(i),
        _ => None,
    }
}

/// Precision@k for each k: overall and per class (classes with no query: None).
#[derive(Clone, Debug)]
pub struct RetrievalReport {
    pub classes: Vec<String>,
    pub queries_per_class: Vec<usize>,
    pub candidates_per_class: Vec<usize>,
    /// (k, overall, per class).
    pub precision: Vec<(usize, f64, Vec<Option<f64>>)>,
}

/// Precision@k of `neighbours` (from [`cosine_neighbours`] with the largest k) for queries of
/// classes `query_class` among candidates of classes `candidate_class`.
pub fn precision_at_k(
    classes: &[String],
    query_class: &[usize],
    candidate_class: &[usize],
    neighbours: &[Vec<usize>],
    ks: &[usize],
) -> Result<RetrievalReport> {
    if query_class.is_empty() || candidate_class.is_empty() {
        bail!("no single-label queries or candidates: nothing to retrieve");
    }
    let count = |cls: &[usize]| (0..classes.len()).map(|c| cls.iter().filter(|&&x| x == c).count()).collect::<Vec<_>>();
    let mut precision = Vec::with_capacity(ks.len());
    for &k in ks {
        if k == 0 || k > candidate_class.len() {
            bail!("k = {k}: must lie between 1 and the {} single-label candidates", candidate_class.len());
        }
        let hit_share: Vec<f64> = neighbours
            .iter()
            .zip(query_class)
            .map(|(n, &qc)| n[..k].iter().filter(|&&j| candidate_class[j] == qc).count() as f64 / k as f64)
            .collect();
        let overall = hit_share.iter().sum::<f64>() / hit_share.len() as f64;
        let per_class = (0..classes.len())
            .map(|c| {
                let v: Vec<f64> =
                    hit_share.iter().zip(query_class).filter(|(_, &qc)| qc == c).map(|(h, _)| *h).collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            })
            .collect();
        precision.push((k, overall, per_class));
    }
    Ok(RetrievalReport {
        classes: classes.to_vec(),
        queries_per_class: count(query_class),
        candidates_per_class: count(candidate_class),
        precision,
    })
}

impl RetrievalReport {
    pub fn to_json(&self) -> Value {
        let per_k: Vec<Value> = self
            .precision
            .iter()
            .map(|(k, overall, per)| {
                let per: serde_json::Map<String, Value> =
                    self.classes.iter().zip(per).map(|(c, p)| (c.clone(), json!(p))).collect();
                json!({"k": k, "precision": overall, "per_class": per})
            })
            .collect();
        json!({"classes": self.classes, "queries_per_class": self.queries_per_class,
            "candidates_per_class": self.candidates_per_class, "precision_at_k": per_k})
    }

    pub fn render_table(&self) -> String {
        let mut out = format!("{:<28} {:>7} {:>10}", "class", "queries", "candidates");
        for (k, _, _) in &self.precision {
            out += &format!(" {:>8}", format!("P@{k}"));
        }
        out += "\n";
        for (c, name) in self.classes.iter().enumerate() {
            out += &format!("{name:<28} {:>7} {:>10}", self.queries_per_class[c], self.candidates_per_class[c]);
            for (_, _, per) in &self.precision {
                out += &per[c].map_or(format!(" {:>8}", "—"), |p| format!(" {p:>8.4}"));
            }
            out += "\n";
        }
        out += &format!(
            "{:<28} {:>7} {:>10}",
            "all",
            self.queries_per_class.iter().sum::<usize>(),
            self.candidates_per_class.iter().sum::<usize>()
        );
        for (_, overall, _) in &self.precision {
            out += &format!(" {overall:>8.4}");
        }
        out + "\n"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand: queries a=(1,0) of class 0 and b=(0,1) of class 1; candidates c0=(0.9,0.1) class 0,
    /// c1=(0.1,0.9) class 1, c2=(1,1) class 0. a's neighbours: c0, c2, c1; b's: c1, c2, c0. P@1 = 1;
    /// P@2: a's c0 and c2 both class 0 (1), b's c1 yes and c2 no (1/2): mean 0.75.
    #[test]
    fn precision_counts_same_class_neighbours() {
        let q = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let c = vec![vec![0.9, 0.1], vec![0.1, 0.9], vec![1.0, 1.0]];
        let n = cosine_neighbours(&q, &c, 3, false);
        assert_eq!(n, [vec![0, 2, 1], vec![1, 2, 0]]);
        let names = vec!["x".to_string(), "y".to_string()];
        let r = precision_at_k(&names, &[0, 1], &[0, 1, 0], &n, &[1, 2]).unwrap();
        assert_eq!((r.precision[0].1, r.precision[1].1), (1.0, 0.75));
        assert_eq!(r.precision[1].2, [Some(1.0), Some(0.5)]);
        assert_eq!(single_class(&[None, Some(true), Some(false)]), Some(1));
        assert_eq!(single_class(&[Some(true), Some(true)]), None);
        assert!(precision_at_k(&names, &[0], &[0, 1, 0], &n[..1], &[4]).is_err());
    }
}

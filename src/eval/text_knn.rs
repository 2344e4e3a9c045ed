//! `roentgen eval text-knn`, the paper's Table 6: how well a text encoder's embedding space groups
//! radiology reports by finding — the "CheXpert@10" score of Chambon et al. (2022), which the paper
//! cites without defining. The definition implemented here:
//!
//! - each report is embedded (`Pooling`), and its neighbours are the other reports ordered by cosine
//!   similarity, most similar first (the query itself excluded; ties in manifest order, so identical
//!   texts, which embed identically, come in the order they were listed);
//! - a report's findings are its positive labels: CheXpert names whose value is 1 (−1, 0 and blank
//!   are not findings), or a phantom's classes (`effusion-right`, …) and, for a class with a side,
//!   its finding alone (`effusion`);
//! - Precision@k of a finding: over every report that has it, the fraction of its k nearest
//!   neighbours that have it too, averaged over those reports;
//! - the score: the macro average over findings with at least two reports (one alone cannot find a
//!   neighbour like itself). Findings with a side (`-right`, `-left`, `-bilateral`) are averaged
//!   apart from those without, so that "finding" and "finding + side" are two scores.
//!
//! Why this reading: precision among the k nearest neighbours per class, macro-averaged, is what a
//! class-wise "@10" retrieval score over CheXpert labels measures in the paper's source [3]; a report
//! with several findings counts as a query for each of them, as multi-label retrieval does. Next to
//! each finding the report prints its prevalence among the other reports: a random embedding's
//! expected precision, the level an encoder that learned nothing scores.
//!
//! The embeddings: the pipeline's text encoder (random weights or trained ones) or, as a baseline
//! with no learning at all, scikit-learn's `TfidfVectorizer` with its defaults (`tfidf`).

use super::labels::chexpert_values;
use crate::backend::Backend;
use crate::models::text::{TextEncoder, TextTokenizer};
use crate::nn::Cx;
use anyhow::{bail, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;

/// How a report's token states become one vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Pooling {
    /// The encoder's sentence token: CLIP's pooled output (the state of the first end-of-text
    /// token, as `CLIPTextModel.pooler_output`), a BERT encoder's [CLS] state (position 0).
    #[default]
    Pooled,
    /// The mean of `last_hidden_state` over the report's tokens (start and end tokens included,
    /// padding excluded).
    Mean,
}

/// Reports per text-encoder call.
const EMBED_BATCH: usize = 32;

/// One vector per text from the encoder's `last_hidden_state`.
pub fn embed_texts(
    b: &mut dyn Backend,
    encoder: &TextEncoder,
    tokenizer: &TextTokenizer,
    texts: &[String],
    pooling: Pooling,
) -> Result<Vec<Vec<f32>>> {
    let (seq, hidden) = (tokenizer.max_length(), encoder.hidden_size());
    let bar = crate::diag::progress_bar(texts.len() as u64, "reports", "embedding");
    let mut out = Vec::with_capacity(texts.len());
    let mut arena = encoder.allocate_arena(b, EMBED_BATCH.min(texts.len()).max(1), seq, false)?;
    for chunk in texts.chunks(EMBED_BATCH) {
        let tokens: Vec<_> = chunk.iter().map(|t| tokenizer.encode(t)).collect();
        let ids: Vec<u32> = tokens.iter().flat_map(|t| t.ids.iter().copied()).collect();
        let mask: Vec<u32> = tokens.iter().flat_map(|t| t.mask.iter().copied()).collect();
        let mark = arena.mark();
        let hidden_states = {
            let mut cx = Cx::new(b, &mut arena);
            let acts = encoder.forward(&mut cx, &ids, &mask, chunk.len(), seq)?;
            encoder.last_hidden_state(&acts)?
        };
        let states = b.download(&hidden_states)?;
        arena.release_all_to(mark);
        for (t, s) in tokens.iter().zip(states.chunks_exact(seq * hidden)) {
            let real = t.mask.iter().filter(|&&m| m == 1).count().max(1);
            let row = |i: usize| &s[i * hidden..(i + 1) * hidden];
            out.push(match (pooling, encoder) {
                // The first end-of-text token is the last real one (CLIP keeps it when truncating).
                (Pooling::Pooled, TextEncoder::Clip(_)) => row(real - 1).to_vec(),
                (Pooling::Pooled, TextEncoder::Bert(_)) => row(0).to_vec(),
                (Pooling::Mean, _) => {
                    let mut m = vec![0f32; hidden];
                    for i in (0..seq).filter(|&i| t.mask[i] == 1) {
                        m.iter_mut().zip(row(i)).for_each(|(a, x)| *a += x);
                    }
                    m.iter_mut().for_each(|a| *a /= real as f32);
                    m
                }
            });
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

/// scikit-learn's `TfidfVectorizer()` with its defaults, fitted on `texts` and applied to them:
/// lowercase; tokens are runs of two or more word characters (`(?u)\b\w\w+\b`); the vocabulary in
/// sorted order; raw counts times idf = ln((1 + n) / (1 + df)) + 1; each row scaled to unit length
/// (a text with no token stays zero).
pub fn tfidf(texts: &[String]) -> Vec<Vec<f32>> {
    let docs: Vec<Vec<String>> = texts
        .iter()
        .map(|t| {
            let lower = t.to_lowercase();
            lower
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|w| w.chars().count() >= 2)
                .map(str::to_string)
                .collect()
        })
        .collect();
    let mut df: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &docs {
        let mut seen: Vec<&str> = d.iter().map(String::as_str).collect();
        seen.sort_unstable();
        seen.dedup();
        for w in seen {
            *df.entry(w).or_default() += 1;
        }
    }
    let index: BTreeMap<&str, usize> = df.keys().enumerate().map(|(i, w)| (*w, i)).collect();
    let n = docs.len() as f64;
    let idf: Vec<f64> = df.values().map(|&d| ((1.0 + n) / (1.0 + d as f64)).ln() + 1.0).collect();
    docs.iter()
        .map(|d| {
            let mut v = vec![0f64; idf.len()];
            for w in d {
                v[index[w.as_str()]] += 1.0;
            }
            v.iter_mut().zip(&idf).for_each(|(x, i)| *x *= i);
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| if norm > 0.0 { (x / norm) as f32 } else { 0.0 }).collect()
        })
        .collect()
}

const SIDES: [&str; 3] = ["-right", "-left", "-bilateral"];

fn is_sided(label: &str) -> bool {
    SIDES.iter().any(|s| label.ends_with(s))
}

/// A report's findings from its `labels` (see the module comment): a phantom's classes (it has a
/// `classes` list) with the finding of each sided class, or the CheXpert names whose value is 1.
pub fn report_findings(labels: &Value) -> Result<Vec<String>> {
    let Value::Object(map) = labels else {
        bail!("labels are {labels}: expected an object (CheXpert names → 1/0/-1, or a phantom's labels)")
    };
    let mut out: Vec<String> = match map.get("classes") {
        Some(Value::Array(classes)) => {
            let mut f = Vec::new();
            for c in classes {
                let Some(c) = c.as_str() else { bail!("phantom label classes hold {c}: expected names") };
                f.push(c.to_string());
                if let Some(s) = SIDES.iter().find(|s| c.ends_with(*s)) {
                    f.push(c[..c.len() - s.len()].to_string());
                }
            }
            f
        }
        Some(other) => bail!("labels \"classes\" is {other}: expected a list of class names"),
        None => chexpert_positives(map)?,
    };
    out.sort();
    out.dedup();
    Ok(out)
}

/// The CheXpert names whose value is 1.
fn chexpert_positives(map: &Map<String, Value>) -> Result<Vec<String>> {
    Ok(chexpert_values(map)?.into_iter().filter(|&(_, v)| v == 1.0).map(|(n, _)| n.to_string()).collect())
}

/// One finding's line.
#[derive(Clone, Debug)]
pub struct FindingPrecision {
    pub name: String,
    /// Reports with the finding (each a query).
    pub reports: usize,
    /// Precision@k; None when fewer than two reports have the finding.
    pub precision: Option<f64>,
    /// The finding's share of the other reports, averaged over its queries: what neighbours drawn
    /// at random would score.
    pub chance: Option<f64>,
}

/// The report of `eval text-knn`.
#[derive(Clone, Debug)]
pub struct KnnReport {
    pub k: usize,
    pub reports: usize,
    pub findings: Vec<FindingPrecision>,
    /// Macro averages over the findings without a side, and over those with one.
    pub macro_unsided: Option<f64>,
    pub macro_sided: Option<f64>,
}

/// Precision@k per finding of the cosine neighbourhoods of `embeddings` (see the module comment).
pub fn knn_precision(embeddings: &[Vec<f32>], findings: &[Vec<String>], k: usize) -> Result<KnnReport> {
    let n = embeddings.len();
    if findings.len() != n {
        bail!("{n} embeddings but {} labelled reports", findings.len());
    }
    if k == 0 || k >= n {
        bail!("k = {k}: the neighbours must number at least 1 and fewer than the {n} reports");
    }
    let neighbours = super::retrieval::cosine_neighbours(embeddings, embeddings, k, true);
    let mut names: Vec<&String> = findings.iter().flatten().collect();
    names.sort();
    names.dedup();
    let has = |i: usize, f: &str| findings[i].iter().any(|x| x == f);
    let mut lines = Vec::with_capacity(names.len());
    for f in names {
        let queries: Vec<usize> = (0..n).filter(|&i| has(i, f)).collect();
        let (precision, chance) = if queries.len() < 2 {
            (None, None)
        } else {
            let hits: usize = queries.iter().map(|&q| neighbours[q].iter().filter(|&&j| has(j, f)).count()).sum();
            let p = hits as f64 / (queries.len() * k) as f64;
            (Some(p), Some((queries.len() - 1) as f64 / (n - 1) as f64))
        };
        lines.push(FindingPrecision { name: f.clone(), reports: queries.len(), precision, chance });
    }
    let macro_of = |sided: bool| {
        let ps: Vec<f64> = lines.iter().filter(|l| is_sided(&l.name) == sided).filter_map(|l| l.precision).collect();
        (!ps.is_empty()).then(|| ps.iter().sum::<f64>() / ps.len() as f64)
    };
    let (macro_unsided, macro_sided) = (macro_of(false), macro_of(true));
    Ok(KnnReport { k, reports: n, findings: lines, macro_unsided, macro_sided })
}

impl KnnReport {
    pub fn to_json(&self) -> Value {
        let findings: Vec<Value> = self
            .findings
            .iter()
            .map(|f| json!({"finding": f.name, "reports": f.reports, "precision": f.precision, "chance": f.chance}))
            .collect();
        json!({"k": self.k, "reports": self.reports, "findings": findings,
            "macro": self.macro_unsided, "macro_with_side": self.macro_sided})
    }

    pub fn render_table(&self) -> String {
        let k = self.k;
        let mut out = format!("{:<28} {:>7}  {:>8}  {:>7}\n", "finding", "reports", format!("P@{k}"), "chance");
        let mut skipped = Vec::new();
        for f in &self.findings {
            match (f.precision, f.chance) {
                (Some(p), Some(c)) => out += &format!("{:<28} {:>7}  {p:>8.4}  {c:>7.4}\n", f.name, f.reports),
                _ => skipped.push(format!("{} ({})", f.name, f.reports)),
            }
        }
        if let Some(m) = self.macro_unsided {
            out += &format!("macro average P@{k}, findings: {m:.4}\n");
        }
        if let Some(m) = self.macro_sided {
            out += &format!("macro average P@{k}, findings with their side: {m:.4}\n");
        }
        if !skipped.is_empty() {
            out += &format!("skipped, fewer than 2 reports: {}\n", skipped.join(", "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Neighbours by hand: four 2-d reports, k = 1. a=(1,0) and b=(0.9,0.1) share "x"; c=(0,1) and
    /// d=(0.1,0.9) share "y"; a also has "z", alone. Each query's nearest is its partner: P@1 = 1
    /// for x and y; z has one report and is skipped.
    #[test]
    fn precision_counts_neighbours_sharing_the_finding() {
        let e = vec![vec![1.0, 0.0], vec![0.9, 0.1], vec![0.0, 1.0], vec![0.1, 0.9]];
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let labels = vec![f(&["x", "z"]), f(&["x"]), f(&["y"]), f(&["y"])];
        let r = knn_precision(&e, &labels, 1).unwrap();
        let get = |n: &str| r.findings.iter().find(|l| l.name == n).unwrap().clone();
        assert_eq!(get("x").precision, Some(1.0));
        assert_eq!(get("y").precision, Some(1.0));
        assert_eq!((get("z").precision, get("z").reports), (None, 1));
        assert_eq!(get("x").chance, Some(1.0 / 3.0));
        assert_eq!(r.macro_unsided, Some(1.0));
        // k = 2: a's neighbours are b then d (cos 0.11 > 0): x scores (1 + 1) / 4 … b's are a, d.
        let r = knn_precision(&e, &labels, 2).unwrap();
        assert_eq!(r.findings.iter().find(|l| l.name == "x").unwrap().precision, Some(0.5));
        assert!(knn_precision(&e, &labels, 4).is_err());
    }

    #[test]
    fn findings_of_phantoms_and_chexpert_rows() {
        let phantom = json!({"no_finding": false, "classes": ["effusion-left", "cardiomegaly"]});
        assert_eq!(report_findings(&phantom).unwrap(), ["cardiomegaly", "effusion", "effusion-left"]);
        let chexpert = json!({"Edema": 1.0, "Pleural Effusion": -1.0, "No Finding": 0.0, "Fracture": 1});
        assert_eq!(report_findings(&chexpert).unwrap(), ["Edema", "Fracture"]);
        let e = report_findings(&json!({"Edemaa": 1})).unwrap_err().to_string();
        assert!(e.contains("\"Edemaa\" is not a CheXpert finding"), "{e}");
    }
}

//! `roentgen phantom`: writes a folder of phantoms, their manifest and a label summary.

use super::spec::Findings;
use crate::diag::SettingError;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// Smallest and largest image side accepted.
pub const MIN_SIZE: usize = 32;
pub const MAX_SIZE: usize = 4096;
/// Most phantoms in one run (each row of the manifest is held in memory until it is written).
pub const MAX_COUNT: usize = 10_000_000;

/// Label counts over a set of phantoms.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    pub images: usize,
    /// Per evaluation class ("no-finding", "cardiomegaly", "effusion-left", …); an image with two
    /// findings counts in both.
    pub classes: BTreeMap<String, usize>,
    /// Finer counts: effusion and pneumothorax by side and size, consolidation by lobe, and the number
    /// of findings per image.
    pub details: BTreeMap<String, usize>,
}

impl Summary {
    pub fn add(&mut self, f: &Findings) {
        self.images += 1;
        for c in f.classes() {
            *self.classes.entry(c).or_default() += 1;
        }
        let mut bump = |k: String| *self.details.entry(k).or_default() += 1;
        if let Some(e) = f.effusion {
            bump(format!("effusion {} {}", e.laterality.name(), e.size.name()));
        }
        if let Some(p) = f.pneumothorax {
            bump(format!("pneumothorax {} {}", p.side.name(), p.size.name()));
        }
        if let Some(l) = f.consolidation {
            bump(format!("consolidation {}", l.name()));
        }
        let n = f.cardiomegaly as usize
            + f.effusion.is_some() as usize
            + f.pneumothorax.is_some() as usize
            + f.consolidation.is_some() as usize;
        bump(format!("images with {n} finding(s)"));
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({"images": self.images, "classes": self.classes, "details": self.details})
    }

    pub fn render_table(&self) -> String {
        let mut s = format!("{} phantoms\n", self.images);
        let pct = |n: usize| 100.0 * n as f64 / self.images.max(1) as f64;
        s.push_str(&format!("{:<34}{:>7}{:>8}\n", "class", "images", "%"));
        for (k, &n) in &self.classes {
            s.push_str(&format!("{k:<34}{n:>7}{:>7.1}%\n", pct(n)));
        }
        s.push_str(&format!("{:<34}{:>7}{:>8}\n", "detail", "images", "%"));
        for (k, &n) in &self.details {
            s.push_str(&format!("{k:<34}{n:>7}{:>7.1}%\n", pct(n)));
        }
        s
    }
}

pub fn check_size(size: usize) -> Result<()> {
    if size < MIN_SIZE {
        let problem =
            format!("phantoms need at least {MIN_SIZE}×{MIN_SIZE} pixels (ribs and pleural lines vanish below that)");
        return Err(SettingError::value("size", size, problem));
    }
    if size > MAX_SIZE {
        return Err(SettingError::value("size", size, format!("at most {MAX_SIZE}")));
    }
    Ok(())
}

/// File name of image `i` among `count`.
pub fn file_name(i: usize, count: usize) -> String {
    let digits = (count.saturating_sub(1)).to_string().len().max(5);
    format!("phantom-{i:0digits$}.png")
}

/// Writes the phantoms, the manifest and summary.json; returns the summary.
pub fn write_phantoms(out: &Path, count: usize, size: usize, seed: u64) -> Result<Summary> {
    if count == 0 {
        return Err(SettingError::value("count", 0, "nothing to generate (give at least 1)"));
    }
    if count > MAX_COUNT {
        let problem = format!("at most {MAX_COUNT} phantoms per run (use several $seed values for more)");
        return Err(SettingError::value("count", count, problem));
    }
    check_size(size)?;
    if let Ok(m) = std::fs::metadata(out) {
        if !m.is_dir() {
            bail!("$out {}: exists and is {}, not a folder", out.display(), crate::io::files::kind_of(&m));
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("$out {}: cannot create folder", out.display()))?;
    crate::io::files::clean_leftovers(out, false)?;
    let rows: Vec<Result<(String, Findings)>> = (0..count)
        .into_par_iter()
        .map(|i| {
            let g = super::generate(seed, i as u64, size);
            let name = file_name(i, count);
            let text = [
                ("prompt", g.text.clone()),
                ("labels", g.labels.to_string()),
                ("seed", seed.to_string()),
                ("index", i.to_string()),
                ("generator", "roentgen phantom".to_string()),
            ];
            crate::io::images::write_png(
                &out.join(&name),
                &crate::io::images::encode_png(&g.pixels, 1, size, size, true, &text)?,
            )?;
            let row = json!({"image": name, "text": g.text, "labels": g.labels});
            Ok((row.to_string(), g.findings))
        })
        .collect();
    let mut summary = Summary::default();
    let mut manifest = String::new();
    for r in rows {
        let (line, f) = r?;
        manifest.push_str(&line);
        manifest.push('\n');
        summary.add(&f);
    }
    crate::io::files::write_bytes_atomic(&out.join("manifest.jsonl"), manifest.as_bytes())?;
    let mut js = serde_json::to_string_pretty(&summary.to_json())?;
    js.push('\n');
    crate::io::files::write_bytes_atomic(&out.join("summary.json"), js.as_bytes())?;
    Ok(summary)
}

//! Manifests: the (image, text) rows that training reads and the evaluations that take a manifest
//! (MS-SSIM, phantom) group or score: JSONL (`{"image": path, "text": prompt}` per line) or CSV
//! with `image` and `text` columns.

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub image: PathBuf,
    pub text: String,
    /// 1-based line (JSONL) or record (CSV) number, for messages.
    pub line: usize,
    /// The row's `labels` (a JSONL field; in a CSV, a `labels` column holding JSON), as `prepare
    /// mimic` and `phantom` write them; None when the row has none. Only the classifier
    /// evaluations read them.
    pub labels: Option<serde_json::Value>,
}

/// Reads a training manifest: the rows of [`read_manifest_rows`] with image paths relative to the
/// manifest's folder. Rows with an empty text are errors (an empty prompt teaches the unconditional
/// case only by accident).
pub fn read_manifest(path: &Path) -> Result<Vec<Example>> {
    let rows = read_manifest_rows(path, None)?;
    if let Some(e) = rows.iter().find(|e| e.text.trim().is_empty()) {
        bail!("{}:{}: empty text for image {}", path.display(), e.line, e.image.display());
    }
    Ok(rows)
}

/// Reads a JSONL manifest (`{"image": path, "text": prompt}` per line) or a CSV with `image` and
/// `text` columns. Relative image paths are resolved against `base` (default: the manifest's
/// folder). Used by training and by the evaluations that take a manifest (MS-SSIM, phantom).
pub fn read_manifest_rows(path: &Path, base: Option<&Path>) -> Result<Vec<Example>> {
    let base = base.unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")));
    let example = |line, image: &str, text: &str, labels| Example {
        image: base.join(image),
        text: text.to_string(),
        line,
        labels,
    };
    let is_csv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let mut out = Vec::new();
    if is_csv {
        let mut rdr = csv::Reader::from_path(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let headers = rdr.headers().with_context(|| format!("{}: no header row", path.display()))?.clone();
        let col = |name: &str| headers.iter().position(|h| h.trim() == name);
        let (Some(ic), Some(tc)) = (col("image"), col("text")) else {
            bail!("{}: the CSV needs columns named 'image' and 'text' (found: {:?})", path.display(), headers);
        };
        let lc = col("labels");
        for (i, rec) in rdr.records().enumerate() {
            let rec = rec.with_context(|| format!("{}: record {}", path.display(), i + 1))?;
            let labels = match lc.and_then(|c| rec.get(c)).map(str::trim).filter(|l| !l.is_empty()) {
                Some(l) => Some(serde_json::from_str(l).with_context(|| {
                    format!("{}:{}: the labels column is not JSON (e.g. {{\"Edema\": 1}})", path.display(), i + 2)
                })?),
                None => None,
            };
            out.push(example(i + 2, rec.get(ic).unwrap_or("").trim(), rec.get(tc).unwrap_or(""), labels));
        }
    } else {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("{}:{}: not JSON", path.display(), i + 1))?;
            let img = v.get("image").and_then(|x| x.as_str());
            let txt = v.get("text").and_then(|x| x.as_str());
            let (Some(img), Some(txt)) = (img, txt) else {
                bail!("{}:{}: needs string fields \"image\" and \"text\"", path.display(), i + 1);
            };
            let labels = v.get("labels").filter(|l| !l.is_null()).cloned();
            out.push(example(i + 1, img, txt, labels));
        }
    }
    if out.is_empty() {
        bail!("{}: the manifest has no rows (no images listed)", path.display());
    }
    Ok(out)
}

//! Training data: manifests of (image, text) pairs, and image preprocessing as diffusers'
//! train_text_to_image does it: resize the shorter side to the resolution (bilinear), center crop,
//! scale to [−1, 1]; gray images are replicated to three channels.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub image: PathBuf,
    pub text: String,
    /// 1-based line (JSONL) or record (CSV) number, for messages.
    pub line: usize,
}

/// What to do with a row whose image is missing or unreadable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnBadImage {
    Skip,
    Fail,
}

impl std::str::FromStr for OnBadImage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "skip" => Ok(OnBadImage::Skip),
            "fail" => Ok(OnBadImage::Fail),
            _ => Err(format!("'{s}': expected skip or fail")),
        }
    }
}

/// Reads a JSONL manifest (`{"image": path, "text": prompt}` per line) or a CSV with `image` and
/// `text` columns. Relative image paths are resolved against the manifest's folder. Rows with an
/// empty text are errors (an empty prompt teaches the unconditional case only by accident).
pub fn read_manifest(path: &Path) -> Result<Vec<Example>> {
    let base = path.parent().unwrap_or(Path::new("."));
    let resolve = |p: &str| -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
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
        for (i, rec) in rdr.records().enumerate() {
            let rec = rec.with_context(|| format!("{}: record {}", path.display(), i + 1))?;
            let (img, text) = (rec.get(ic).unwrap_or(""), rec.get(tc).unwrap_or(""));
            out.push(example(path, i + 2, resolve(img.trim()), text)?);
        }
    } else {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))?;
            let img = v.get("image").and_then(|x| x.as_str());
            let txt = v.get("text").and_then(|x| x.as_str());
            let (Some(img), Some(txt)) = (img, txt) else {
                bail!("{}:{}: needs string fields \"image\" and \"text\"", path.display(), i + 1);
            };
            out.push(example(path, i + 1, resolve(img), txt)?);
        }
    }
    if out.is_empty() {
        bail!("{}: the manifest has no rows", path.display());
    }
    Ok(out)
}

fn example(path: &Path, line: usize, image: PathBuf, text: &str) -> Result<Example> {
    if text.trim().is_empty() {
        bail!("{}:{line}: empty text for image {}", path.display(), image.display());
    }
    Ok(Example { image, text: text.to_string(), line })
}

/// Loads an image (PNG or JPEG, 8- or 16-bit, gray or RGB(A)) as planar [3, res, res] in [−1, 1]:
/// shorter side resized to `res` (bilinear, half-pixel centres), center-cropped, gray replicated.
pub fn load_image(path: &Path, res: usize) -> Result<Vec<f32>> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", path.display()))?
        .decode()
        .with_context(|| format!("{}: cannot decode the image", path.display()))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        bail!("{}: empty image", path.display());
    }
    // To f32 in [0, 1], three planes (16-bit kept at full precision).
    let rgb = img.to_rgb32f();
    let px = rgb.as_raw();
    let plane = |c: usize, x: usize, y: usize| px[(y * w + x) * 3 + c];
    let scale = res as f64 / w.min(h) as f64;
    let (rw, rh) = (((w as f64 * scale).round() as usize).max(res), ((h as f64 * scale).round() as usize).max(res));
    let (x0, y0) = ((rw - res) / 2, (rh - res) / 2);
    let mut out = vec![0f32; 3 * res * res];
    for c in 0..3 {
        for oy in 0..res {
            let sy = ((y0 + oy) as f64 + 0.5) * h as f64 / rh as f64 - 0.5;
            let (ya, fy) = (sy.floor().clamp(0.0, (h - 1) as f64) as usize, (sy - sy.floor()).clamp(0.0, 1.0) as f32);
            let yb = (ya + 1).min(h - 1);
            for ox in 0..res {
                let sx = ((x0 + ox) as f64 + 0.5) * w as f64 / rw as f64 - 0.5;
                let (xa, fx) =
                    (sx.floor().clamp(0.0, (w - 1) as f64) as usize, (sx - sx.floor()).clamp(0.0, 1.0) as f32);
                let xb = (xa + 1).min(w - 1);
                let top = plane(c, xa, ya) * (1.0 - fx) + plane(c, xb, ya) * fx;
                let bot = plane(c, xa, yb) * (1.0 - fx) + plane(c, xb, yb) * fx;
                out[(c * res + oy) * res + ox] = (top * (1.0 - fy) + bot * fy) * 2.0 - 1.0;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gray_16_bit_image_is_resized_cropped_and_scaled() {
        let dir = tempfile_dir();
        let p = dir.join("g.png");
        // 16-bit gray, 12×8, a horizontal ramp
        let img =
            image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(12, 8, |x, _| image::Luma([(x * 5000) as u16]));
        img.save(&p).unwrap();
        let v = load_image(&p, 8).unwrap();
        assert_eq!(v.len(), 3 * 64);
        assert!(v.iter().all(|&x| (-1.0..=1.0).contains(&x)));
        // gray replicated, ramp increasing left to right, center crop of the 12-wide image
        assert_eq!(v[..64], v[64..128]);
        assert!(v[7] > v[0]);
        std::fs::remove_dir_all(dir).ok();
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("roentgen-data-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

//! Writing sampled images: 8-bit PNG (RGB, or single-channel luminance for `--gray`, which is what a
//! chest X-ray is) with the generation settings in UTF-8 text chunks, written atomically.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// diffusers' `numpy_to_pil`: (x · 255).round() of a [0, 1] value.
fn to_u8(x: f32) -> u8 {
    (x.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Luminance as PIL's `convert("L")` computes it: (R·19595 + G·38470 + B·7471 + 2¹⁵) >> 16.
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// Writes a PNG (from [`encode_png`]) atomically.
pub fn write_png(path: &Path, png: &[u8]) -> Result<()> {
    crate::io::files::write_atomic(path, |file| Ok(std::io::Write::write_all(file, png)?))
}

/// One image as PNG bytes, from planar [c, h, w] values in [0, 1] (c = 3, or 1 for a gray
/// model; `gray` stores an RGB image as luminance), with `text` in UTF-8 text chunks.
pub fn encode_png(
    planar: &[f32],
    c: usize,
    h: usize,
    w: usize,
    gray: bool,
    text: &[(&str, String)],
) -> Result<Vec<u8>> {
    let px = |ch: usize, y: usize, x: usize| to_u8(planar[(ch * h + y) * w + x]);
    let (color, data): (png::ColorType, Vec<u8>) = if c == 1 {
        (png::ColorType::Grayscale, (0..h * w).map(|i| px(0, i / w, i % w)).collect())
    } else if gray {
        (
            png::ColorType::Grayscale,
            (0..h * w).map(|i| luma(px(0, i / w, i % w), px(1, i / w, i % w), px(2, i / w, i % w))).collect(),
        )
    } else {
        let mut v = Vec::with_capacity(h * w * 3);
        for y in 0..h {
            for x in 0..w {
                v.extend_from_slice(&[px(0, y, x), px(1, y, x), px(2, y, x)]);
            }
        }
        (png::ColorType::Rgb, v)
    };
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
    enc.set_color(color);
    enc.set_depth(png::BitDepth::Eight);
    for (k, v) in text {
        enc.add_itxt_chunk(k.to_string(), v.clone()).with_context(|| format!("text chunk '{k}'"))?;
    }
    let mut writer = enc.write_header()?;
    writer.write_image_data(&data)?;
    writer.finish()?;
    Ok(out)
}

/// Reads the 8-bit pixels and the text chunks of a PNG (for tests and `eval`).
pub fn read_png(path: &Path) -> Result<(png::ColorType, u32, u32, Vec<u8>, Vec<(String, String)>)> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("{}: not a PNG", path.display()))?;
    let mut buf = vec![0; reader.output_buffer_size().context("PNG too large")?];
    let info = reader.next_frame(&mut buf).with_context(|| format!("{}: corrupt PNG", path.display()))?;
    buf.truncate(info.buffer_size());
    let i = reader.info();
    let mut text: Vec<(String, String)> =
        i.uncompressed_latin1_text.iter().map(|t| (t.keyword.clone(), t.text.clone())).collect();
    for t in &i.utf8_text {
        text.push((t.keyword.clone(), t.get_text().unwrap_or_default()));
    }
    Ok((info.color_type, info.width, info.height, buf, text))
}

/// The PNG files directly in `dir`, sorted by name. None is an error naming the folder and what
/// should have written them (`made_by`, e.g. "`roentgen sample`").
pub fn png_files(dir: &Path, made_by: &str) -> Result<Vec<PathBuf>> {
    let unreadable = || format!("{}: cannot read folder", dir.display());
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).with_context(unreadable)? {
        let p = e.with_context(unreadable)?.path();
        if p.is_file() && p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
            files.push(p);
        }
    }
    if files.is_empty() {
        anyhow::bail!("{}: no PNG images (expected the output folder of {made_by})", dir.display());
    }
    files.sort();
    Ok(files)
}

//! `roentgen eval ms-ssim`: intra-prompt generation diversity as the RoentGen paper measures it
//! (Section 5, Table 2 and Figure 3): the images generated from one prompt are compared pairwise with
//! MS-SSIM (Gaussian window 11, sigma 1.5, the five standard scales and weights), and the pair scores
//! are summarised as mean ± std overall and per CLIP token-length bin of 10. Lower means more diverse.
//!
//! The metric is computed exactly as `pytorch_msssim.ms_ssim(X, Y, data_range=255, size_average=True,
//! win_size=11, win_sigma=1.5)` does on one gray channel (tests/msssim.rs checks ≤ 1e-4 against it),
//! including its quirks:
//! - "valid" Gaussian filtering (no padding): each scale's maps are (H − 10) × (W − 10);
//! - the window is exp(−(i − 5)² / (2·1.5²)) normalised to sum 1, applied separably, with the taps
//!   rounded to float32 as torch builds them (see `WINDOW_F32`);
//! - between scales, `avg_pool2d(kernel 2, padding = side % 2)`: an odd side is zero-padded by one
//!   pixel on both ends and the zeros count in the average (count_include_pad);
//! - the per-scale contrast-structure means (scales 1–4) and the last scale's SSIM mean are clamped at
//!   zero (`relu`) before the weighted product, so anti-correlated images score 0, not NaN;
//! - images must have a shorter side > (11 − 1)·2⁴ = 160 (pytorch_msssim asserts it; we refuse smaller
//!   images with an error naming the file).
//!
//! Color images are reduced to gray with PIL's `convert("L")` rule, the luminance the project uses
//! everywhere (`sample --gray`): L = (R·19595 + G·38470 + B·7471 + 2¹⁵) >> 16; alpha is ignored.
//! Arithmetic is f64 (pytorch_msssim on float32 tensors differs from its float64 result by ~1e-6).
//!
//! Each image's per-scale mean and mean of squares are computed once and shared by all the pairs it
//! is in, so a pair costs one filtered product per scale instead of five.

use crate::io::manifest::read_manifest_rows;
use crate::text::bpe::ClipTokenizer;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Gaussian window size and sigma (paper, Section 5).
pub const WIN_SIZE: usize = 11;
pub const WIN_SIGMA: f64 = 1.5;
/// The five scale weights of Wang et al. (2003), pytorch_msssim's defaults.
pub const WEIGHTS: [f64; 5] = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333];
/// 8-bit images: data range 255, so C1 = (0.01·255)², C2 = (0.03·255)².
pub const DATA_RANGE: f64 = 255.0;
/// Smallest side accepted: pytorch_msssim asserts side > (WIN_SIZE − 1)·2⁴.
pub const MIN_SIDE: usize = (WIN_SIZE - 1) * 16 + 1;
/// Groups up to this size keep every image's pyramid in memory (8 MB for 512²); larger groups (e.g.
/// real images sharing a common impression) recompute per pair so memory stays bounded.
const CACHE_GROUP: usize = 32;

/// An 8-bit gray image as f64 values in [0, 255], row-major.
#[derive(Clone, Debug)]
pub struct Gray {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<f64>,
}

impl Gray {
    pub fn from_u8(width: usize, height: usize, pixels: &[u8]) -> Gray {
        Gray { width, height, pixels: pixels.iter().map(|&v| v as f64).collect() }
    }
}

/// PIL's `convert("L")`.
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// pytorch_msssim's `_fspecial_gauss_1d(11, 1.5)` exactly as torch computes it, in float32: the
/// exact Gaussian exp(−(i − 5)² / 4.5) / Σ differs from these by up to 1e-8, which is enough to move
/// MS-SSIM by ~7e-6 on smooth images, so the reference's rounded taps are used (then widened to f64,
/// as `win.to(X.dtype)` does for float64 inputs). `window_is_the_gaussian` checks they are the
/// Gaussian to f32 precision.
const WINDOW_F32: [f32; WIN_SIZE] = [
    0.0010283804,
    0.007598758,
    0.036000773,
    0.10936069,
    0.21300553,
    0.26601171,
    0.21300553,
    0.10936069,
    0.036000773,
    0.007598758,
    0.0010283804,
];

fn window() -> [f64; WIN_SIZE] {
    WINDOW_F32.map(|v| v as f64)
}

/// Separable "valid" Gaussian filter of a w × h image: (w − 10) × (h − 10) out.
fn filter(img: &[f64], w: usize, h: usize, win: &[f64; WIN_SIZE]) -> Vec<f64> {
    let (ow, oh) = (w - WIN_SIZE + 1, h - WIN_SIZE + 1);
    let mut tmp = vec![0.0; ow * h];
    for y in 0..h {
        let row = &img[y * w..(y + 1) * w];
        for x in 0..ow {
            tmp[y * ow + x] = win.iter().zip(&row[x..x + WIN_SIZE]).map(|(a, b)| a * b).sum();
        }
    }
    let mut out = vec![0.0; ow * oh];
    for y in 0..oh {
        for (k, wk) in win.iter().enumerate() {
            let src = &tmp[(y + k) * ow..(y + k + 1) * ow];
            for (o, s) in out[y * ow..(y + 1) * ow].iter_mut().zip(src) {
                *o += wk * s;
            }
        }
    }
    out
}

/// `F.avg_pool2d(x, kernel_size=2, padding=[h % 2, w % 2])` (count_include_pad: zeros of the padding
/// count in the average).
fn avg_pool(img: &[f64], w: usize, h: usize) -> (Vec<f64>, usize, usize) {
    let (pw, ph) = (w % 2, h % 2);
    let (ow, oh) = ((w + 2 * pw - 2) / 2 + 1, (h + 2 * ph - 2) / 2 + 1);
    let at = |y: isize, x: isize| -> f64 {
        if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
            0.0
        } else {
            img[y as usize * w + x as usize]
        }
    };
    let mut out = vec![0.0; ow * oh];
    for oy in 0..oh {
        for ox in 0..ow {
            let (y, x) = ((2 * oy) as isize - ph as isize, (2 * ox) as isize - pw as isize);
            out[oy * ow + ox] = (at(y, x) + at(y, x + 1) + at(y + 1, x) + at(y + 1, x + 1)) / 4.0;
        }
    }
    (out, ow, oh)
}

/// One scale of one image: its pixels, Gaussian mean and Gaussian mean of squares.
struct Level {
    w: usize,
    h: usize,
    img: Vec<f64>,
    mu: Vec<f64>,
    ex2: Vec<f64>,
}

/// The five scales of one image with the per-image statistics MS-SSIM needs.
pub struct Pyramid {
    levels: Vec<Level>,
}

impl Pyramid {
    pub fn new(g: &Gray) -> Result<Pyramid> {
        if g.width.min(g.height) < MIN_SIDE {
            bail!(
                "{}×{} image is too small for MS-SSIM: both sides must be at least {MIN_SIDE} \
                 (> (window {WIN_SIZE} − 1)·2⁴, for the four downsamplings)",
                g.width,
                g.height
            );
        }
        let win = window();
        let (mut img, mut w, mut h) = (g.pixels.clone(), g.width, g.height);
        let mut levels = Vec::with_capacity(WEIGHTS.len());
        for i in 0..WEIGHTS.len() {
            let mu = filter(&img, w, h, &win);
            let sq: Vec<f64> = img.iter().map(|v| v * v).collect();
            let ex2 = filter(&sq, w, h, &win);
            let next = (i + 1 < WEIGHTS.len()).then(|| avg_pool(&img, w, h));
            levels.push(Level { w, h, img, mu, ex2 });
            match next {
                Some((n, nw, nh)) => (img, w, h) = (n, nw, nh),
                None => break,
            }
        }
        Ok(Pyramid { levels })
    }
}

/// MS-SSIM of two images' pyramids (same size), as pytorch_msssim's `ms_ssim`.
pub fn ms_ssim_pyramids(a: &Pyramid, b: &Pyramid) -> f64 {
    let win = window();
    let c1 = (0.01 * DATA_RANGE).powi(2);
    let c2 = (0.03 * DATA_RANGE).powi(2);
    let mut result = 1.0;
    for (i, (la, lb)) in a.levels.iter().zip(&b.levels).enumerate() {
        let xy: Vec<f64> = la.img.iter().zip(&lb.img).map(|(x, y)| x * y).collect();
        let exy = filter(&xy, la.w, la.h, &win);
        let (mut cs_sum, mut ssim_sum) = (0.0, 0.0);
        for (k, &e12) in exy.iter().enumerate() {
            let (m1, m2) = (la.mu[k], lb.mu[k]);
            let s1 = la.ex2[k] - m1 * m1;
            let s2 = lb.ex2[k] - m2 * m2;
            let s12 = e12 - m1 * m2;
            let cs = (2.0 * s12 + c2) / (s1 + s2 + c2);
            cs_sum += cs;
            ssim_sum += (2.0 * m1 * m2 + c1) / (m1 * m1 + m2 * m2 + c1) * cs;
        }
        let n = exy.len() as f64;
        // Scales 1–4 contribute relu(mean cs); the last one relu(mean SSIM).
        let v = if i + 1 < WEIGHTS.len() { cs_sum / n } else { ssim_sum / n };
        result *= v.max(0.0).powf(WEIGHTS[i]);
    }
    result
}

/// MS-SSIM of two gray images of the same size.
pub fn ms_ssim(x: &Gray, y: &Gray) -> Result<f64> {
    if (x.width, x.height) != (y.width, y.height) {
        bail!("MS-SSIM needs images of one size, got {}×{} and {}×{}", x.width, x.height, y.width, y.height);
    }
    Ok(ms_ssim_pyramids(&Pyramid::new(x)?, &Pyramid::new(y)?))
}

/// Reads a PNG (8-bit after expanding palettes and low bit depths) as gray, with its "prompt" text
/// chunk if it has one. 16-bit PNGs are refused: data range 255 would not fit them.
pub fn read_png_gray(path: &Path) -> Result<(Gray, Option<String>)> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(file));
    dec.set_transformations(png::Transformations::EXPAND);
    let mut reader = dec.read_info().with_context(|| format!("{}: not a readable PNG", path.display()))?;
    let mut buf = vec![0; reader.output_buffer_size().with_context(|| format!("{}: PNG too large", path.display()))?];
    let info = reader.next_frame(&mut buf).with_context(|| format!("{}: corrupt PNG", path.display()))?;
    if info.bit_depth != png::BitDepth::Eight {
        bail!("{}: {}-bit PNG; MS-SSIM here takes 8-bit images (data range 255)", path.display(), info.bit_depth as u8);
    }
    let (w, h) = (info.width as usize, info.height as usize);
    let pixels = to_gray(&buf[..info.buffer_size()], info.color_type.samples(), w, h)
        .with_context(|| format!("{}: {:?} PNG", path.display(), info.color_type))?;
    // Text chunks may also follow the image data: read to the end before looking.
    reader.finish().with_context(|| format!("{}: corrupt PNG", path.display()))?;
    let prompt = text_chunk(reader.info(), "prompt");
    Ok((Gray::from_u8(w, h, &pixels), prompt))
}

/// The "prompt" text chunk of a PNG, from its header when it is there (as `sample` and PIL write it),
/// else by reading the whole file.
fn png_prompt(path: &Path) -> Result<Option<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("{}: not a readable PNG", path.display()))?;
    match text_chunk(reader.info(), "prompt") {
        Some(p) => Ok(Some(p)),
        None => Ok(read_png_gray(path)?.1),
    }
}

fn text_chunk(i: &png::Info, key: &str) -> Option<String> {
    let utf8 = i.utf8_text.iter().filter(|t| t.keyword == key).find_map(|t| t.get_text().ok());
    let latin = || i.uncompressed_latin1_text.iter().find(|t| t.keyword == key).map(|t| t.text.clone());
    let z = || i.compressed_latin1_text.iter().filter(|t| t.keyword == key).find_map(|t| t.get_text().ok());
    utf8.or_else(latin).or_else(z)
}

/// Interleaved 8-bit samples (gray, gray+alpha, RGB, RGBA) to gray with PIL's rule.
fn to_gray(buf: &[u8], samples: usize, w: usize, h: usize) -> Result<Vec<u8>> {
    if buf.len() != w * h * samples {
        bail!("unexpected pixel buffer size {} for {w}×{h}×{samples}", buf.len());
    }
    Ok(match samples {
        1 => buf.to_vec(),
        2 => buf.chunks_exact(2).map(|p| p[0]).collect(),
        3 | 4 => buf.chunks_exact(samples).map(|p| luma(p[0], p[1], p[2])).collect(),
        n => bail!("{n} samples per pixel"),
    })
}

/// Any image the `image` crate decodes (JPEG, …) as gray; 8-bit gray is taken as is.
fn read_other_gray(path: &Path) -> Result<Gray> {
    let img = image::open(path).with_context(|| format!("{}: cannot read image", path.display()))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    let px = match img {
        image::DynamicImage::ImageLuma8(g) => g.into_raw(),
        other => other.to_rgb8().pixels().map(|p| luma(p[0], p[1], p[2])).collect(),
    };
    Ok(Gray::from_u8(w, h, &px))
}

fn read_gray(path: &Path) -> Result<Gray> {
    let is_png = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if is_png {
        Ok(read_png_gray(path)?.0)
    } else {
        read_other_gray(path)
    }
}

/// Prompt → image paths, in a stable order (prompts sorted, images as listed / by file name).
type Groups = BTreeMap<String, Vec<PathBuf>>;

pub fn groups_from_folder(dir: &Path) -> Result<Groups> {
    let files = crate::io::images::png_files(dir, "`roentgen sample`")?;
    let prompts: Vec<Result<String>> = files
        .par_iter()
        .map(|p| {
            png_prompt(p)?.with_context(|| {
                format!("{}: no \"prompt\" text chunk (not written by `roentgen sample`?); pass $manifest", p.display())
            })
        })
        .collect();
    let mut groups = Groups::new();
    for (p, prompt) in files.into_iter().zip(prompts) {
        groups.entry(prompt?).or_default().push(p);
    }
    Ok(groups)
}

/// The images of a manifest ([`read_manifest_rows`]) grouped by their text.
pub fn groups_from_manifest(manifest: &Path, base: Option<&Path>) -> Result<Groups> {
    let mut groups = Groups::new();
    for row in read_manifest_rows(manifest, base)? {
        groups.entry(row.text).or_default().push(row.image);
    }
    Ok(groups)
}

/// MS-SSIM of every pair within one prompt's images, in (i, j) order with i < j.
fn group_pairs(prompt: &str, paths: &[PathBuf]) -> Result<Vec<f64>> {
    if paths.len() < 2 {
        bail!("prompt {prompt:?} has {} image(s) ({}); diversity needs at least two", paths.len(), list(paths));
    }
    let images: Vec<Gray> = paths.par_iter().map(|p| read_gray(p)).collect::<Result<_>>()?;
    let (w0, h0) = (images[0].width, images[0].height);
    for (g, p) in images.iter().zip(paths) {
        if (g.width, g.height) != (w0, h0) {
            bail!(
                "prompt {prompt:?}: {} is {}×{} but {} is {w0}×{h0}; images of one prompt must share a size",
                p.display(),
                g.width,
                g.height,
                paths[0].display()
            );
        }
        if w0.min(h0) < MIN_SIDE {
            bail!("{}: {w0}×{h0} is too small for MS-SSIM (both sides must be at least {MIN_SIDE})", p.display());
        }
    }
    let pairs: Vec<(usize, usize)> =
        (0..images.len()).flat_map(|i| (i + 1..images.len()).map(move |j| (i, j))).collect();
    if images.len() <= CACHE_GROUP {
        let pyr: Vec<Pyramid> = images.par_iter().map(Pyramid::new).collect::<Result<_>>()?;
        Ok(pairs.par_iter().map(|&(i, j)| ms_ssim_pyramids(&pyr[i], &pyr[j])).collect())
    } else {
        pairs.par_iter().map(|&(i, j)| ms_ssim(&images[i], &images[j])).collect()
    }
}

fn list(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Mean and sample standard deviation (n − 1, as pandas; 0 for fewer than two values).
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, 0.0);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = if v.len() < 2 { 0.0 } else { (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() };
    (mean, std)
}

#[derive(serde::Serialize, Debug)]
pub struct PromptScore {
    pub prompt: String,
    pub tokens: usize,
    pub images: usize,
    pub pairs: Vec<f64>,
    pub mean: f64,
}

#[derive(serde::Serialize, Debug)]
pub struct BinScore {
    /// Token lengths [tokens_min, tokens_max] (CLIP tokens with BOS/EOS, before truncation).
    pub tokens_min: usize,
    pub tokens_max: usize,
    pub prompts: usize,
    pub pairs: usize,
    pub mean: f64,
    pub std: f64,
}

#[derive(serde::Serialize, Debug)]
pub struct Report {
    pub images: usize,
    pub prompts: usize,
    pub pairs: usize,
    /// Mean and sample std over all pairs.
    pub mean: f64,
    pub std: f64,
    pub window: usize,
    pub sigma: f64,
    pub bins: Vec<BinScore>,
    pub per_prompt: Vec<PromptScore>,
}

/// Scores every prompt group and summarises overall and per token-length bin.
pub fn evaluate(groups: &Groups, tok: &ClipTokenizer, bin_width: usize) -> Result<Report> {
    if bin_width == 0 {
        bail!("$bin_width must be at least 1");
    }
    let scored: Vec<Result<PromptScore>> = groups
        .par_iter()
        .map(|(prompt, paths)| {
            let pairs = group_pairs(prompt, paths)?;
            Ok(PromptScore {
                prompt: prompt.clone(),
                tokens: tok.encode(prompt).tokens,
                images: paths.len(),
                mean: mean_std(&pairs).0,
                pairs,
            })
        })
        .collect();
    let per_prompt: Vec<PromptScore> = scored.into_iter().collect::<Result<_>>()?;
    let all: Vec<f64> = per_prompt.iter().flat_map(|p| p.pairs.iter().copied()).collect();
    let (mean, std) = mean_std(&all);
    let mut by_bin: BTreeMap<usize, (usize, Vec<f64>)> = BTreeMap::new();
    for p in &per_prompt {
        let e = by_bin.entry(p.tokens / bin_width).or_default();
        e.0 += 1;
        e.1.extend_from_slice(&p.pairs);
    }
    let bins = by_bin
        .into_iter()
        .map(|(b, (prompts, v))| {
            let (mean, std) = mean_std(&v);
            BinScore {
                tokens_min: b * bin_width,
                tokens_max: (b + 1) * bin_width - 1,
                prompts,
                pairs: v.len(),
                mean,
                std,
            }
        })
        .collect();
    Ok(Report {
        images: per_prompt.iter().map(|p| p.images).sum(),
        prompts: per_prompt.len(),
        pairs: all.len(),
        mean,
        std,
        window: WIN_SIZE,
        sigma: WIN_SIGMA,
        bins,
        per_prompt,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn window_is_the_gaussian() {
        let half = (super::WIN_SIZE / 2) as f64;
        let g: Vec<f64> = (0..super::WIN_SIZE)
            .map(|i| (-((i as f64 - half).powi(2)) / (2.0 * super::WIN_SIGMA * super::WIN_SIGMA)).exp())
            .collect();
        let s: f64 = g.iter().sum();
        for (a, b) in super::window().iter().zip(&g) {
            assert!((a - b / s).abs() < 2e-8, "{a} vs {}", b / s);
        }
    }
}

//! The resampling kernels the reference preprocessors use, each reproduced as its library
//! computes it (FID values move when preprocessing does, so "a bilinear resize" is not enough):
//!
//! - [`bilinear_torch`]: `F.interpolate(mode="bilinear", align_corners=False)` without
//!   antialiasing, f32 — pytorch-fid's resize to 299×299 (upsampling or downsampling alike).
//! - [`skimage_resize`]: `skimage.transform.resize(img, shape, mode="constant", preserve_range=True)`
//!   — TorchXRayVision's `XRayResizer`: a Gaussian anti-aliasing filter when shrinking
//!   (σ = (factor − 1)/2, scipy's `gaussian_filter`, zero padding), then `scipy.ndimage.zoom`
//!   (order 1, grid_mode, mode "grid-constant": zeros outside the image take part in the
//!   interpolation, so an enlarged image's outermost half pixel fades towards 0), then clipping to
//!   the input's range.
//! - [`pil_bicubic`]: Pillow's `Image.resize(BICUBIC)` on 8-bit images — CLIP's processor: separable
//!   convolution with the a = −0.5 cubic, support scaled by the reduction factor (antialiased),
//!   22-bit fixed-point coefficients, rounded to 8 bits after each pass.
//! - [`pil_bilinear`]: Pillow's `Image.resize(BILINEAR)` on 8-bit images — torchvision's `Resize` on
//!   a PIL image, the training preprocessing of diffusers' train_text_to_image: the same fixed-point
//!   convolution with the triangle filter (support 1, widened by the reduction factor, so it
//!   antialiases where a plain 2-tap bilinear would alias).

use rayon::prelude::*;

/// HWC f32 image resized to (oh, ow) like PyTorch's bilinear interpolation (align_corners=False).
pub fn bilinear_torch(x: &[f32], h: usize, w: usize, c: usize, oh: usize, ow: usize) -> Vec<f32> {
    // PyTorch: scale = in / out (in the op's float type); src = scale·(dst + 0.5) − 0.5, clamped at 0;
    // i0 = floor(src), i1 = i0 + 1 unless at the last pixel; λ = src − i0.
    let taps = |n_in: usize, n_out: usize| -> Vec<(usize, usize, f32, f32)> {
        let scale = n_in as f32 / n_out as f32;
        (0..n_out)
            .map(|i| {
                let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(n_in - 1);
                let l1 = (src - i0 as f32).clamp(0.0, 1.0);
                let i1 = if i0 < n_in - 1 { i0 + 1 } else { i0 };
                (i0, i1, 1.0 - l1, l1)
            })
            .collect()
    };
    let ty = taps(h, oh);
    let tx = taps(w, ow);
    let mut out = vec![0f32; oh * ow * c];
    out.par_chunks_mut(ow * c).enumerate().for_each(|(y, row)| {
        let (y0, y1, hy0, hy1) = ty[y];
        for (ox, &(x0, x1, wx0, wx1)) in tx.iter().enumerate() {
            for ch in 0..c {
                let p = |yy: usize, xx: usize| x[(yy * w + xx) * c + ch];
                row[ox * c + ch] =
                    hy0 * (wx0 * p(y0, x0) + wx1 * p(y0, x1)) + hy1 * (wx0 * p(y1, x0) + wx1 * p(y1, x1));
            }
        }
    });
    out
}

/// One-channel (h × w) image resized to (oh, ow) as `skimage.transform.resize(..., order=1,
/// mode="constant", cval=0, clip=True, preserve_range=True, anti_aliasing=None)` computes it on
/// float32 input (each scipy pass in f64, stored as f32).
pub fn skimage_resize(x: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let (fy, fx) = (h as f64 / oh as f64, w as f64 / ow as f64);
    // anti_aliasing defaults to True when any axis shrinks; σ = max(0, (factor − 1) / 2) per axis.
    let mut img = x.to_vec();
    if oh < h || ow < w {
        let (sy, sx) = (((fy - 1.0) / 2.0).max(0.0), ((fx - 1.0) / 2.0).max(0.0));
        // gaussian_filter skips axes with σ ≤ 1e-15; axis order y, then x.
        if sy > 1e-15 {
            img = gaussian_axis(&img, h, w, sy, true);
        }
        if sx > 1e-15 {
            img = gaussian_axis(&img, h, w, sx, false);
        }
    }
    let mut out = if oh == h && ow == w {
        img // zoom by 1 returns its input
    } else {
        zoom_linear_grid_constant(&img, h, w, oh, ow)
    };
    // _clip_warp_output: clip to the input's range, widened to cval (0) when the output uses it.
    let (mut lo, mut hi) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let (olo, ohi) = out.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    if !(lo <= 0.0 && 0.0 <= hi) && olo <= 0.0 && 0.0 <= ohi {
        lo = lo.min(0.0);
        hi = hi.max(0.0);
    }
    out.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
    out
}

/// scipy.ndimage.gaussian_filter1d (truncate 4, mode "grid-constant" = "constant" for filters,
/// cval 0) along y or x.
fn gaussian_axis(x: &[f32], h: usize, w: usize, sigma: f64, along_y: bool) -> Vec<f32> {
    let r = (4.0 * sigma + 0.5) as usize;
    let s2 = sigma * sigma;
    let mut k: Vec<f64> = (0..=2 * r).map(|i| (-0.5 / s2 * ((i as f64 - r as f64).powi(2))).exp()).collect();
    let sum: f64 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= sum);
    let kc = &k[r..]; // kc[j] = weight at offset ±j (the kernel is symmetric)
    let (n, lines, stride, step) = if along_y { (h, w, 1, w) } else { (w, h, w, 1) };
    let mut out = vec![0f32; x.len()];
    let results: Vec<(usize, Vec<f32>)> = (0..lines)
        .into_par_iter()
        .map(|l| {
            let base = l * stride;
            let line: Vec<f64> = (0..n).map(|i| x[base + i * step] as f64).collect();
            let at = |i: isize| if i >= 0 && (i as usize) < n { line[i as usize] } else { 0.0 };
            // scipy's symmetric correlate1d: in[i]·k0, then (in[i−j] + in[i+j])·kj for j = r … 1.
            let o = (0..n)
                .map(|i| {
                    let mut acc = line[i] * kc[0];
                    for j in (1..=r).rev() {
                        acc += (at(i as isize - j as isize) + at(i as isize + j as isize)) * kc[j];
                    }
                    acc as f32
                })
                .collect();
            (l, o)
        })
        .collect();
    for (l, o) in results {
        for (i, v) in o.into_iter().enumerate() {
            out[l * stride + i * step] = v;
        }
    }
    out
}

/// scipy.ndimage.zoom(order=1, mode="grid-constant", cval=0, grid_mode=True) of an h × w image —
/// skimage translates its "constant" to scipy's "grid-constant": input coordinate
/// (o + 0.5)·(in/out) − 0.5, linear interpolation in which samples outside the image are 0 (so
/// enlarging darkens the outermost half pixel towards 0).
fn zoom_linear_grid_constant(x: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    // Per output index: (first tap, its weight, the next tap's weight).
    let taps = |n_in: usize, n_out: usize| -> Vec<(isize, f64, f64)> {
        let z = n_in as f64 / n_out as f64;
        (0..n_out)
            .map(|o| {
                let cc = (o as f64 + 0.5) * z - 0.5;
                let f = cc.floor();
                let t = cc - f;
                (f as isize, 1.0 - t, t)
            })
            .collect()
    };
    let ty = taps(h, oh);
    let tx = taps(w, ow);
    let mut out = vec![0f32; oh * ow];
    out.par_chunks_mut(ow).enumerate().for_each(|(oy, row)| {
        let (y0, wy0, wy1) = ty[oy];
        for (ox, v) in row.iter_mut().enumerate() {
            let (x0, wx0, wx1) = tx[ox];
            let p = |yy: isize, xx: isize| {
                if yy >= 0 && (yy as usize) < h && xx >= 0 && (xx as usize) < w {
                    x[yy as usize * w + xx as usize] as f64
                } else {
                    0.0
                }
            };
            // scipy sums the taps in index order (last axis fastest), each weight product applied in turn.
            let mut t = p(y0, x0) * wy0 * wx0;
            t += p(y0, x0 + 1) * wy0 * wx1;
            t += p(y0 + 1, x0) * wy1 * wx0;
            t += p(y0 + 1, x0 + 1) * wy1 * wx1;
            *v = t as f32;
        }
    });
    out
}

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One of Pillow's separable filters (`struct filter` in libImaging/Resample.c): the kernel and its
/// support at scale 1. Antialiasing is Pillow's: when shrinking, the support is widened by the
/// reduction factor and the kernel's argument scaled down by it.
#[derive(Clone, Copy)]
struct PilFilter {
    kernel: fn(f64) -> f64,
    support: f64,
}

/// Pillow's BICUBIC: the a = −0.5 cubic, support 2.
const PIL_BICUBIC: PilFilter = PilFilter { kernel: bicubic, support: 2.0 };
/// Pillow's BILINEAR: the triangle, support 1.
const PIL_BILINEAR: PilFilter = PilFilter { kernel: triangle, support: 1.0 };
/// Pillow's LANCZOS: the 3-lobed truncated sinc, support 3 (what diffusers' image processor
/// resizes with, its `resample="lanczos"`).
const PIL_LANCZOS: PilFilter = PilFilter { kernel: lanczos, support: 3.0 };

/// Pillow's `sinc_filter(x) · sinc_filter(x / 3)` on [−3, 3) (the interval is Pillow's, half open).
fn lanczos(x: f64) -> f64 {
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            return 1.0;
        }
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Pillow's bicubic filter (a = −0.5).
fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// Pillow's `bilinear_filter`.
fn triangle(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output pixel the first input index
/// and the fixed-point weights.
fn pil_coeffs(n_in: usize, n_out: usize, filter: PilFilter) -> Vec<(usize, Vec<i32>)> {
    let scale = n_in as f64 / n_out as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support * filterscale;
    let ss = 1.0 / filterscale;
    (0..n_out)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize; // C cast truncates toward 0
            let xmax = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
            let xmax = xmax.saturating_sub(xmin);
            let mut k: Vec<f64> =
                (0..xmax).map(|x| (filter.kernel)((x as f64 + xmin as f64 - center + 0.5) * ss)).collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|v| *v /= ww);
            }
            let one = (1u32 << PRECISION_BITS) as f64;
            let ki =
                k.iter().map(|&v| if v < 0.0 { (-0.5 + v * one) as i32 } else { (0.5 + v * one) as i32 }).collect();
            (xmin, ki)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    let v = v >> PRECISION_BITS;
    v.clamp(0, 255) as u8
}

/// HWC 8-bit image (c channels) resized to (oh, ow) as Pillow's `Image.resize(..., BICUBIC)`.
pub fn pil_bicubic(x: &[u8], h: usize, w: usize, c: usize, oh: usize, ow: usize) -> Vec<u8> {
    pil_resample(x, h, w, c, oh, ow, PIL_BICUBIC)
}

/// HWC 8-bit image (c channels) resized to (oh, ow) as Pillow's `Image.resize(..., LANCZOS)`.
pub fn pil_lanczos(x: &[u8], h: usize, w: usize, c: usize, oh: usize, ow: usize) -> Vec<u8> {
    pil_resample(x, h, w, c, oh, ow, PIL_LANCZOS)
}

/// HWC 8-bit image (c channels) resized to (oh, ow) as Pillow's `Image.resize(..., BILINEAR)`
/// (what torchvision's `Resize(interpolation=BILINEAR)` calls on a PIL image): the triangle filter,
/// antialiased when shrinking.
pub fn pil_bilinear(x: &[u8], h: usize, w: usize, c: usize, oh: usize, ow: usize) -> Vec<u8> {
    pil_resample(x, h, w, c, oh, ow, PIL_BILINEAR)
}

/// Pillow's `ImagingResampleInner` for 8-bit bands: horizontal pass first (over the rows the
/// vertical pass needs), then vertical, each rounded to 8 bits; an axis whose size is unchanged is
/// not filtered.
fn pil_resample(x: &[u8], h: usize, w: usize, c: usize, oh: usize, ow: usize, filter: PilFilter) -> Vec<u8> {
    if oh == h && ow == w {
        return x.to_vec(); // Image.resize returns a copy when the size is unchanged
    }
    let round = 1i64 << (PRECISION_BITS - 1);
    let (mut cur, cur_h, cur_w) = (x.to_vec(), h, w);
    let vert = pil_coeffs(h, oh, filter);
    // Rows of the source the vertical pass reads.
    let (first, last) = if oh != h { (vert[0].0, vert[oh - 1].0 + vert[oh - 1].1.len()) } else { (0, h) };
    let (mut cur_h, mut cur_w) = (cur_h, cur_w);
    if ow != w {
        let horiz = pil_coeffs(w, ow, filter);
        let rows = last - first;
        let mut out = vec![0u8; rows * ow * c];
        out.par_chunks_mut(ow * c).enumerate().for_each(|(r, row)| {
            let src = &cur[(first + r) * w * c..][..w * c];
            for (xx, (xmin, k)) in horiz.iter().enumerate() {
                for ch in 0..c {
                    let mut ss = round;
                    for (i, kv) in k.iter().enumerate() {
                        ss += src[(xmin + i) * c + ch] as i64 * *kv as i64;
                    }
                    row[xx * c + ch] = clip8(ss);
                }
            }
        });
        cur = out;
        cur_h = rows;
        cur_w = ow;
    } else if oh != h {
        cur = cur[first * w * c..last * w * c].to_vec();
        cur_h = last - first;
    }
    if oh != h {
        let mut out = vec![0u8; oh * cur_w * c];
        out.par_chunks_mut(cur_w * c).enumerate().for_each(|(yy, row)| {
            let (ymin, k) = &vert[yy];
            let ymin = ymin - first;
            for xx in 0..cur_w * c {
                let mut ss = round;
                for (i, kv) in k.iter().enumerate() {
                    ss += cur[(ymin + i) * cur_w * c + xx] as i64 * *kv as i64;
                }
                row[xx] = clip8(ss);
            }
        });
        cur = out;
        cur_h = oh;
    }
    debug_assert_eq!(cur.len(), cur_h * cur_w * c);
    cur
}

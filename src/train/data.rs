//! Training data: manifests of (image, text) pairs, and image preprocessing as diffusers'
//! train_text_to_image does it: `convert("RGB")`, the shorter side resized to the resolution with
//! Pillow's antialiased bilinear, center crop, scale to [−1, 1] (see [`load_image`]).

use anyhow::{bail, Context, Result};
use std::path::Path;

word_enum!(
    /// What to do with a row whose image is missing or unreadable.
    pub enum OnBadImage("bad-image policy") { Skip = "skip", Fail = "fail" }
);

/// Pillow's `Image.MAX_IMAGE_PIXELS` (`int(1024 * 1024 * 1024 // 4 // 3)`).
pub const PIL_MAX_IMAGE_PIXELS: u64 = 1024 * 1024 * 1024 / 4 / 3;

/// The most pixels a training image may have: `Image.open` raises `DecompressionBombError` above
/// 2 × `MAX_IMAGE_PIXELS` (it only warns between 1× and 2×), so the reference trains on anything up to
/// this and refuses anything larger.
pub const MAX_IMAGE_PIXELS: u64 = 2 * PIL_MAX_IMAGE_PIXELS;

/// Loads an image as diffusers' train_text_to_image preprocesses it (with `--center_crop`), as planar
/// [3, res, res] f32 in [−1, 1]:
///
/// 1. `image.convert("RGB")` — see [`decode_rgb8`] (gray replicated, alpha dropped, 16-bit samples
///    reduced to their high byte);
/// 2. torchvision `Resize(res, BILINEAR)` — Pillow's antialiased bilinear in 8-bit fixed point, the
///    shorter side to `res`, the longer to `int(res * long / short)`; see [`preprocess_rgb8`];
/// 3. `CenterCrop(res)`, `ToTensor()`, `Normalize([0.5], [0.5])`.
///
/// For 8-bit PNGs (and 16-bit RGB(A)/LA PNGs, which Pillow reduces the same way) the result is the
/// reference's to the bit. JPEGs go through a different decoder (zune-jpeg, not libjpeg-turbo), whose
/// pixels may differ by a level or so. Refused with an error naming the file: images over
/// [`MAX_IMAGE_PIXELS`], truncated files, bad PNG CRCs.
pub fn load_image(path: &Path, res: usize) -> Result<Vec<f32>> {
    if res == 0 {
        bail!("{}: the resolution must be positive", path.display());
    }
    let (rgb, w, h) = decode_rgb8(path)?;
    Ok(preprocess_rgb8(&rgb, w, h, res))
}

/// Decodes a PNG or JPEG to interleaved 8-bit RGB (h × w × 3), returning (pixels, w, h), as Pillow's
/// `Image.open(path).convert("RGB")` does:
///
/// - gray ("L", and 1/2/4-bit gray, which both libraries scale to 0–255) is replicated to three channels;
/// - an alpha channel is dropped, not composited (Pillow's `rgba2rgb` / `la2rgb`); palettes are expanded;
/// - 16-bit RGB, RGBA and gray+alpha PNGs keep the high byte of each sample: Pillow unpacks them with its
///   `RGB;16B` / `RGBA;16B` / `LA;16B` raw modes, which take the most significant byte.
/// - 16-bit gray PNGs also keep the high byte. This is our decision, not Pillow's: Pillow 13 opens them
///   as mode "I;16" and `convert("RGB")` *clips* each sample to 255 (`I16_RGB`: v < 256 ? v : 255), so
///   the reference would train on an all-but-white image for any real 16-bit X-ray. The high byte is
///   what Pillow itself does with every other 16-bit PNG (a 16-bit RGB PNG of the same gray pixels gives
///   exactly our result), and it is what the reference computes after a dataset is reduced to 8 bits by
///   dropping the low byte.
///
/// A header claiming more than [`MAX_IMAGE_PIXELS`] pixels is refused before any pixel buffer is
/// allocated (Pillow's decompression-bomb rule, with its `max(1, w) · max(1, h)` count).
pub fn decode_rgb8(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    decode_rgb8_bytes(&bytes, &path.display().to_string())
}

/// [`decode_rgb8`] of an image already in memory; `name` names it in errors.
pub fn decode_rgb8_bytes(bytes: &[u8], name: &str) -> Result<(Vec<u8>, usize, usize)> {
    use image::{DynamicImage as D, ImageDecoder, ImageFormat};
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes[..]))
        .with_guessed_format()
        .with_context(|| format!("{}: cannot read", name))?;
    let format = reader.format();
    // image's default allocation cap (512 MiB) would refuse 16-bit images Pillow accepts; the largest
    // buffer an image under the pixel limit needs is RGBA with 16-bit samples.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
    reader.limits(limits);
    let decoder = reader.into_decoder().with_context(|| format!("{}: cannot decode the image", name))?;
    let (w, h) = decoder.dimensions();
    let pixels = u64::from(w.max(1)) * u64::from(h.max(1));
    if pixels > MAX_IMAGE_PIXELS {
        bail!(
            "{}: image size {w}×{h} ({pixels} pixels) exceeds the limit of {MAX_IMAGE_PIXELS} pixels \
             (Pillow's decompression-bomb limit, 2 × Image.MAX_IMAGE_PIXELS); not decoding it",
            name
        );
    }
    if w == 0 || h == 0 {
        bail!("{}: empty image ({w}×{h})", name);
    }
    if format == Some(ImageFormat::Jpeg) && !jpeg_has_end(&bytes) {
        bail!("{}: cannot decode the image: truncated JPEG (no end-of-image marker after the last scan)", name);
    }
    let img = D::from_decoder(decoder).with_context(|| format!("{}: cannot decode the image", name))?;
    let hi = |v: u16| (v >> 8) as u8;
    let rgb = match img {
        D::ImageLuma8(b) => to_rgb(b.as_raw(), 1, |v| v),
        D::ImageLumaA8(b) => to_rgb(b.as_raw(), 2, |v| v),
        D::ImageRgb8(b) => b.into_raw(),
        D::ImageRgba8(b) => to_rgb(b.as_raw(), 4, |v| v),
        D::ImageLuma16(b) => to_rgb(b.as_raw(), 1, hi),
        D::ImageLumaA16(b) => to_rgb(b.as_raw(), 2, hi),
        D::ImageRgb16(b) => to_rgb(b.as_raw(), 3, hi),
        D::ImageRgba16(b) => to_rgb(b.as_raw(), 4, hi),
        // Float images come from neither the PNG nor the JPEG decoder.
        other => other.to_rgb8().into_raw(),
    };
    Ok((rgb, w as usize, h as usize))
}

/// Interleaved samples with `c` channels (1 or 2: gray[+alpha]; 3 or 4: RGB[A]) to 8-bit RGB.
fn to_rgb<T: Copy>(px: &[T], c: usize, to8: impl Fn(T) -> u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(px.len() / c * 3);
    for p in px.chunks_exact(c) {
        if c < 3 {
            out.extend([to8(p[0]); 3]);
        } else {
            out.extend([to8(p[0]), to8(p[1]), to8(p[2])]);
        }
    }
    out
}

/// Whether a JPEG's last scan ends with the end-of-image marker. image runs zune-jpeg in non-strict
/// mode, which fills a truncated scan with grey and returns Ok; Pillow raises "image file is
/// truncated". In entropy-coded data a 0xFF byte is always followed by 0x00 or a restart marker, so
/// FF D9 after the last start-of-scan (FF DA) can only be the EOI.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    match bytes.windows(2).rposition(|m| m == [0xFF, 0xDA]) {
        Some(sos) => bytes[sos + 2..].windows(2).any(|m| m == [0xFF, 0xD9]),
        None => true, // no scan at all: the decoder reports that
    }
}

/// torchvision's `Resize(res, interpolation=BILINEAR)`, `CenterCrop(res)`, `ToTensor()`,
/// `Normalize([0.5], [0.5])` on an 8-bit RGB PIL image (interleaved h × w × 3): planar [3, res, res].
pub fn preprocess_rgb8(rgb: &[u8], w: usize, h: usize, res: usize) -> Vec<f32> {
    // _compute_resized_output_size: the shorter side becomes res, the longer int(res * long / short) —
    // Python's true division of exact integers, truncated (the f64 quotient of exact operands is the
    // same correctly rounded value).
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = ((res * long) as f64 / short as f64) as usize;
    let (nw, nh) = if w <= h { (res, new_long) } else { (new_long, res) };
    // F.resize returns the image unchanged when the size is; pil_bilinear copies it then.
    let resized = crate::eval::resize::pil_bilinear(rgb, h, w, 3, nh, nw);
    let (top, left) = (crop_offset(nh, res), crop_offset(nw, res));
    let mut out = vec![0f32; 3 * res * res];
    for y in 0..res {
        for x in 0..res {
            for c in 0..3 {
                let v = resized[((top + y) * nw + left + x) * 3 + c];
                // ToTensor: float32 / 255; Normalize: (x − 0.5) / 0.5, each rounded in f32.
                out[(c * res + y) * res + x] = (v as f32 / 255.0 - 0.5) / 0.5;
            }
        }
    }
    out
}

/// CenterCrop's offset `int(round((size - res) / 2.0))`: Python's round sends halves to the even
/// integer, so an odd margin of 2k + 1 starts at k or k + 1, whichever is even.
fn crop_offset(size: usize, res: usize) -> usize {
    let d = size - res;
    let k = d / 2;
    if d % 2 == 1 && k % 2 == 1 {
        k + 1
    } else {
        k
    }
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

    #[test]
    fn center_crop_offsets_round_halves_to_even_like_python() {
        // int(round(d / 2.0)) in Python 3 for these margins d.
        let want = [(0, 0), (1, 0), (2, 1), (3, 2), (5, 2), (7, 4), (9, 4), (17, 8), (19, 10)];
        for (d, off) in want {
            assert_eq!(crop_offset(64 + d, 64), off, "margin {d}");
        }
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("roentgen-data-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

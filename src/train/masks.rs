//! Random masks for training an inpainting U-Net, as diffusers' inpainting training draws them
//! (examples/research_projects/dreambooth_inpaint, `random_mask(im_shape, ratio=1)`): a rectangle
//! or an ellipse, one chance in two each, of a size uniform in 0..=width × 0..=height, centred
//! uniformly where its half-size fits, painted with PIL's `ImageDraw` (its box corners inclusive).
//!
//! The draws come from the sample's host stream (`train::run`), not Python's `random`: the same
//! distribution of masks, not the same masks. The ellipse is the pixels whose centres fall inside
//! the ellipse inscribed in the box; PIL's rasteriser can differ by a pixel along the edge.

use crate::rng::splitmix::SplitMix64;
#[cfg(test)]
use crate::sample::init_image::{mask_to_latent, masked_image};

/// Python's `random.randint(lo, hi)`: uniform in lo..=hi (by rejection, no modulo bias).
fn randint(rng: &mut SplitMix64, lo: i64, hi: i64) -> i64 {
    let span = (hi - lo + 1) as u64;
    let zone = u64::MAX - (u64::MAX % span);
    loop {
        let x = rng.next_u64();
        if x < zone {
            return lo + (x % span) as i64;
        }
    }
}

/// A random mask of `width` × `height` pixels, row-major, 1 where the image is repainted.
pub fn random_mask(width: usize, height: usize, rng: &mut SplitMix64) -> Vec<f32> {
    let (w, h) = (width as i64, height as i64);
    let size = (randint(rng, 0, w), randint(rng, 0, h));
    let half = (size.0 / 2, size.1 / 2);
    let center = (randint(rng, half.0, w - half.0), randint(rng, half.1, h - half.1));
    let ellipse = randint(rng, 0, 1) == 1;
    // The box, corners included (PIL), before clipping to the image.
    let (x0, y0, x1, y1) = (center.0 - half.0, center.1 - half.1, center.0 + half.0, center.1 + half.1);
    let (cx, cy) = ((x0 + x1 + 1) as f64 / 2.0, (y0 + y1 + 1) as f64 / 2.0);
    let (rx, ry) = ((x1 - x0 + 1) as f64 / 2.0, (y1 - y0 + 1) as f64 / 2.0);
    let mut mask = vec![0f32; width * height];
    for y in y0.max(0)..=y1.min(h - 1) {
        for x in x0.max(0)..=x1.min(w - 1) {
            let inside = !ellipse || {
                let (dx, dy) = ((x as f64 + 0.5 - cx) / rx, (y as f64 + 0.5 - cy) / ry);
                dx * dx + dy * dy <= 1.0
            };
            if inside {
                mask[y as usize * width + x as usize] = 1.0;
            }
        }
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Over many draws: both shapes appear, every mask is a single filled rectangle or an
    /// ellipse within its box, sizes cover the whole range, and the stream decides the mask.
    #[test]
    fn masks_cover_the_range_and_are_reproducible() {
        let (w, h) = (24usize, 16usize);
        let mut rng = SplitMix64::new(7);
        let (mut rects, mut ellipses, mut empty_or_tiny, mut large) = (0, 0, 0, 0);
        for _ in 0..2000 {
            let m = random_mask(w, h, &mut rng);
            let on: Vec<(usize, usize)> = (0..w * h).filter(|&i| m[i] == 1.0).map(|i| (i % w, i / w)).collect();
            // A zero-size shape centred on the far edge paints nothing, as in PIL.
            if on.len() <= 4 {
                empty_or_tiny += 1;
                continue;
            }
            let (xs, ys) = (on.iter().map(|p| p.0), on.iter().map(|p| p.1));
            let (bx0, bx1) = (xs.clone().min().unwrap(), xs.max().unwrap());
            let (by0, by1) = (ys.clone().min().unwrap(), ys.max().unwrap());
            let box_area = (bx1 - bx0 + 1) * (by1 - by0 + 1);
            if on.len() == box_area {
                rects += 1;
            } else {
                ellipses += 1;
                // An ellipse fills about π/4 of its box (a convex shape clipped by the image, at
                // least about half of its own box).
                let fill = on.len() as f64 / box_area as f64;
                assert!(fill > 0.4 && fill < 0.97, "ellipse fill {fill}");
            }
            if on.len() * 2 > w * h {
                large += 1;
            }
        }
        assert!(rects > 700 && ellipses > 400, "rectangles {rects}, ellipses {ellipses}");
        assert!(empty_or_tiny > 0 && large > 0, "sizes: {empty_or_tiny} tiny, {large} over half the image");
        let draw = |seed| random_mask(w, h, &mut SplitMix64::new(seed));
        assert_eq!(draw(3), draw(3));
        assert!((0..8).any(|s| draw(s) != draw(3)), "the seed changes the mask");
    }

    #[test]
    fn latent_mask_is_nearest_and_masked_image_zeroes_the_repainted_part() {
        let (w, h) = (8usize, 4usize);
        let mask: Vec<f32> = (0..w * h).map(|i| ((i % w) >= 2 && (i / w) < 2) as u8 as f32).collect();
        // factor 2: latent (x, y) reads pixel (2x, 2y).
        assert_eq!(mask_to_latent(&mask, w, 2), vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        let planar: Vec<f32> = (0..3 * w * h).map(|i| 0.1 + i as f32 * 0.01).collect();
        let masked = masked_image(&planar, &mask);
        for (i, (&m, &p)) in masked.iter().zip(&planar).enumerate() {
            assert_eq!(m, if mask[i % (w * h)] == 1.0 { 0.0 } else { p });
        }
    }
}

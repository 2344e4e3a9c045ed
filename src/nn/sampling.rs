//! diffusers' `Downsample2D` (strided 3×3 convolution; the VAE's variant pads right/bottom by one
//! and convolves with no padding) and `Upsample2D` (nearest ×2, or to the skip's size, then 3×3).

use super::{Conv2d, Fmap};
use crate::backend::Backend;
use crate::tensor::{Arena, Layout};
use anyhow::Result;

#[derive(Clone, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
}

impl Downsample2D {
    /// `padding` as diffusers' `downsample_padding`: 1 pads all sides; 0 means the asymmetric
    /// (0, 1, 0, 1) pad of the VAE encoder.
    pub fn layout(l: &mut Layout, prefix: &str, c: usize, padding: usize) -> Downsample2D {
        let pad = if padding == 0 { [0, 1, 0, 1] } else { [padding; 4] };
        Downsample2D { conv: Conv2d::layout(l, &format!("{prefix}.conv"), c, c, 3, 2, pad) }
    }

    pub fn forward(&self, b: &dyn Backend, arena: &mut Arena, x: &Fmap) -> Result<Fmap> {
        self.conv.apply(b, arena, x)
    }
}

#[derive(Clone, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn layout(l: &mut Layout, prefix: &str, c: usize) -> Upsample2D {
        Upsample2D { conv: Conv2d::layout(l, &format!("{prefix}.conv"), c, c, 3, 1, [1; 4]) }
    }

    /// Resizes to `size` (the skip connection's (h, w) when the U-Net input is not a multiple of
    /// its total downscale, as diffusers' `upsample_size`), else to twice the size. The resized
    /// map stays on the arena until the caller's enclosing release.
    pub fn forward(&self, b: &dyn Backend, arena: &mut Arena, x: &Fmap, size: Option<(usize, usize)>) -> Result<Fmap> {
        let (oh, ow) = size.unwrap_or((2 * x.h, 2 * x.w));
        let up = Fmap::alloc(arena, x.batch, oh, ow, x.c)?;
        b.upsample_nearest_forward(&up.t, &x.t, x.batch, x.h, x.w, oh, ow, x.c)?;
        self.conv.apply(b, arena, &up)
    }
}

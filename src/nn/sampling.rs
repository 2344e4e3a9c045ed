//! diffusers' `Downsample2D` (strided 3×3 convolution; the VAE's variant pads right/bottom by one
//! and convolves with no padding) and `Upsample2D` (nearest ×2, or to the skip's size, then 3×3).

use super::{Conv2d, Cx, Fmap};
use crate::ops::elementwise::UpsampleParams;
use crate::tensor::Layout;
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

    pub fn forward(&self, cx: &mut Cx, x: &Fmap) -> Result<Fmap> {
        self.conv.apply(cx, x)
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
    pub fn forward(&self, cx: &mut Cx, x: &Fmap, size: Option<(usize, usize)>) -> Result<Fmap> {
        Ok(self.forward_saved(cx, x, size)?.1)
    }

    /// Returns (the resized map, the output).
    pub fn forward_saved(&self, cx: &mut Cx, x: &Fmap, size: Option<(usize, usize)>) -> Result<(Fmap, Fmap)> {
        let b = cx.b;
        let (oh, ow) = size.unwrap_or((2 * x.h, 2 * x.w));
        let up = Fmap::alloc(cx.arena, x.batch, oh, ow, x.c)?;
        b.upsample_nearest_forward(&upsample(x, oh, ow), &up.t, &x.t)?;
        let out = self.conv.apply(cx, &up)?;
        Ok((up, out))
    }

    /// Accumulates into `g` and `dx`, given the input `x` and the resized map `up` of the forward.
    pub fn backward(&self, g: &Upsample2D, cx: &mut Cx, x: &Fmap, up: &Fmap, dout: &Fmap, dx: &Fmap) -> Result<()> {
        let b = cx.b;
        let mark = cx.arena.mark();
        let dup = super::zeros_like(cx, up)?;
        self.conv.backward(&g.conv, b, Some(&dup), dout, up)?;
        b.upsample_nearest_backward(&upsample(x, up.h, up.w), &dx.t, &dup.t)?;
        cx.arena.release_all_to(mark);
        Ok(())
    }
}

/// The resize of `x` to out_h × out_w.
fn upsample(x: &Fmap, out_h: usize, out_w: usize) -> UpsampleParams {
    UpsampleParams { batch: x.batch, in_h: x.h, in_w: x.w, out_h, out_w, channels: x.c }
}

//! What the evaluation networks share on a backend: the device that holds a network's weights and
//! the activation arena planned for the batch size it last ran (planned again, the old one freed,
//! when the size changes; FID runs every batch but the last at one size), and their layers beyond
//! the diffusion models' (batch norm folded for inference, pooling, concatenation of branches).

use super::tensors::Weights;
use crate::backend::Backend;
use crate::nn::{planned_arena, Cx, Fmap};
use crate::ops::elementwise::ConcatParams;
use crate::ops::norm::{BatchNormForward, BatchNormParams};
use crate::ops::pool::{Pool2dParams, PoolMode};
use crate::tensor::{Arena, Layout, Tensor};
use anyhow::{bail, Context, Result};

/// One preprocessed image, a network's input: `data[(y · w + x) · c + ch]` (channels-last f32).
#[derive(Clone, Debug)]
pub struct Pixels {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Pixels {
    pub fn new(h: usize, w: usize, c: usize, data: Vec<f32>) -> Pixels {
        debug_assert_eq!(data.len(), h * w * c);
        Pixels { h, w, c, data }
    }

    /// From planar (CHW) values, as PyTorch tensors are laid out.
    pub fn from_chw(chw: &[f32], c: usize, h: usize, w: usize) -> Pixels {
        Pixels::new(h, w, c, crate::tensor::nchw_to_nhwc(chw, 1, c, h, w))
    }
}

/// The images of a batch as one (batch, h, w, c) array, after checking that they share one size
/// with `channels` channels and at least `min` pixels a side (`network` names the network in the
/// messages); None for an empty batch.
pub fn stack(images: &[Pixels], network: &str, channels: usize, min: usize) -> Result<Option<([usize; 3], Vec<f32>)>> {
    let Some(first) = images.first() else { return Ok(None) };
    let (h, w, c) = (first.h, first.w, first.c);
    if c != channels {
        bail!("{network} takes {channels} channel(s), got {c}");
    }
    if h < min || w < min {
        bail!("{network} needs at least {min}×{min} pixels, got {h}×{w}");
    }
    if images.iter().any(|x| (x.h, x.w, x.c) != (h, w, c)) {
        bail!("{network} runs a batch of images of one size");
    }
    Ok(Some(([h, w, c], images.iter().flat_map(|x| x.data.iter().copied()).collect())))
}

pub struct NetDevice {
    pub backend: Box<dyn Backend>,
    arena: Option<(usize, Arena)>,
}

impl NetDevice {
    pub fn new(backend: Box<dyn Backend>) -> NetDevice {
        NetDevice { backend, arena: None }
    }

    /// Runs the forward `run` of `batch` inputs in an arena planned for that batch (`label` names
    /// its pool) and downloads the tensor it returns.
    pub fn run(&mut self, label: &str, batch: usize, run: impl Fn(&mut Cx) -> Result<Tensor>) -> Result<Vec<f32>> {
        if self.arena.as_ref().is_none_or(|(b, _)| *b != batch) {
            if let Some((_, old)) = self.arena.take() {
                self.backend.free(old.pool())?;
            }
            let arena = planned_arena(self.backend.as_mut(), label, |cx| run(cx).map(|_| ()))?;
            self.arena = Some((batch, arena));
        }
        let Some((_, arena)) = self.arena.as_mut() else { unreachable!("planned above") };
        arena.reset();
        let out = run(&mut Cx::new(self.backend.as_ref(), arena))?;
        self.backend.download(&out)
    }
}

/// A batch norm folded for inference: per channel, x · scale + shift (every one of these networks'
/// norms is followed by a ReLU, applied with it).
#[derive(Clone, Copy, Debug)]
pub struct FoldedNorm {
    pub scale: Tensor,
    pub shift: Tensor,
}

impl FoldedNorm {
    /// `<name>.scale` and `<name>.shift`, filled from the checkpoint's `<name>.weight`, `.bias`,
    /// `.running_mean` and `.running_var` by [`load_folding_norms`].
    pub fn layout(l: &mut Layout, name: &str, c: usize) -> FoldedNorm {
        FoldedNorm { scale: l.tensor(format!("{name}.scale"), [c]), shift: l.tensor(format!("{name}.shift"), [c]) }
    }

    /// relu(norm(x)) as a new map.
    pub fn apply_relu(&self, cx: &mut Cx, x: &Fmap) -> Result<Fmap> {
        let out = Fmap::alloc(cx.arena, x.batch, x.h, x.w, x.c)?;
        let p = BatchNormParams { rows: x.rows(), channels: x.c, relu: true };
        cx.b.batch_norm_forward(
            &p,
            &BatchNormForward { out: &out.t, inp: &x.t, scale: &self.scale, shift: &self.shift },
        )?;
        Ok(out)
    }
}

/// Uploads every tensor of `table` from `w`: a [`FoldedNorm`]'s pair folded (with `eps`) from its
/// checkpoint statistics, everything else as it is.
pub fn load_folding_norms(b: &dyn Backend, w: &Weights, table: &Layout, eps: f64) -> Result<()> {
    let at = |name: &str| {
        let e = table.find(name).with_context(|| format!("internal: '{name}' is not in the table"))?;
        Ok::<_, anyhow::Error>(Tensor::new(table.pool(), e.offset, e.shape))
    };
    for e in table.entries() {
        if let Some(norm) = e.name.strip_suffix(".scale") {
            let c = e.shape.numel();
            let g = |p: &str| w.get(&format!("{norm}.{p}"), &[c]);
            let (scale, shift) =
                BatchNormParams::fold(&g("weight")?, &g("bias")?, &g("running_mean")?, &g("running_var")?, eps);
            b.upload(&at(&e.name)?, &scale)?;
            b.upload(&at(&format!("{norm}.shift"))?, &shift)?;
        } else if !e.name.ends_with(".shift") {
            b.upload(&at(&e.name)?, &w.get(&e.name, e.shape.dims())?)?;
        }
    }
    Ok(())
}

/// `mode` pooling of x with a square window.
pub fn pool(cx: &mut Cx, x: &Fmap, kernel: usize, stride: usize, pad: usize, mode: PoolMode) -> Result<Fmap> {
    let p = Pool2dParams::square(x.batch, [x.h, x.w, x.c], kernel, stride, pad, mode);
    let out = Fmap::alloc(cx.arena, x.batch, p.window.out_h(), p.window.out_w(), x.c)?;
    cx.b.pool2d_forward(&p, &out.t, &x.t)?;
    Ok(out)
}

/// The mean of each channel over the map: (batch, channels).
pub fn global_avg(cx: &mut Cx, x: &Fmap) -> Result<Tensor> {
    let p = Pool2dParams::global_avg(x.batch, [x.h, x.w, x.c]);
    let out = cx.arena.alloc([x.batch, x.c])?;
    cx.b.pool2d_forward(&p, &out, &x.t)?;
    Ok(out)
}

/// The maps of `parts` (same batch and size) concatenated along channels, as `torch.cat(.., 1)`.
pub fn concat(cx: &mut Cx, parts: &[Fmap]) -> Result<Fmap> {
    let mut acc = parts[0];
    for part in &parts[1..] {
        let out = Fmap::alloc(cx.arena, acc.batch, acc.h, acc.w, acc.c + part.c)?;
        let p = ConcatParams { rows: acc.rows(), a_channels: acc.c, b_channels: part.c };
        cx.b.concat_channels_forward(&p, &out.t, &acc.t, &part.t)?;
        acc = out;
    }
    Ok(acc)
}

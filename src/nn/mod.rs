//! Layers: parameter handles plus a forward that calls the backend (and, with the training issue,
//! a backward). Each layer registers its parameters under diffusers'/transformers' names, so the
//! parameter table is built from the config and matches checkpoint files without a rename table.

use crate::backend::Backend;
use crate::ops::conv::{Conv2dBackward, Conv2dForward, Conv2dParams};
use crate::ops::linear::{LinearBackward, LinearForward, LinearGroupBackward, LinearGroupForward, LinearParams};
use crate::ops::norm::{GroupNormBackward, GroupNormParams, LayerNormBackward, LayerNormParams, NormForward};
use crate::tensor::{DType, Layout, Tensor};
use anyhow::Result;

/// `torch.nn.Linear`: weight (out_f, in_f), optional bias (out_f).
#[derive(Clone, Copy, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub in_f: usize,
    pub out_f: usize,
}

impl Linear {
    /// The operation this layer applies to `rows` vectors.
    fn params(&self, rows: usize) -> LinearParams {
        LinearParams { rows, in_features: self.in_f, out_features: self.out_f }
    }

    pub fn layout(l: &mut Layout, prefix: &str, in_f: usize, out_f: usize, bias: bool) -> Linear {
        let weight = l.tensor(format!("{prefix}.weight"), [out_f, in_f]);
        let bias = bias.then(|| l.tensor(format!("{prefix}.bias"), [out_f]));
        Linear { weight, bias, in_f, out_f }
    }

    /// out (rows, out_f) = inp (rows, in_f) · Wᵀ + b.
    pub fn forward(&self, b: &dyn Backend, out: &Tensor, inp: &Tensor, rows: usize) -> Result<()> {
        self.forward_into(b, out, inp, rows, None)
    }

    /// out = (inp · Wᵀ + b) + residual (shaped as out) when given: a residual connection summed
    /// in the product's epilogue, equal to `forward` then `add_forward` (to the bit on the CPU).
    pub fn forward_into(
        &self,
        b: &dyn Backend,
        out: &Tensor,
        inp: &Tensor,
        rows: usize,
        residual: Option<&Tensor>,
    ) -> Result<()> {
        let t = LinearForward { out, inp, weight: &self.weight, bias: self.bias.as_ref(), residual };
        b.linear_forward(&self.params(rows), &t)
    }
}

/// Whether `layers` can run as one group (`linear_group_forward`/`_backward`): one shape, no
/// biases, their weights back to back in one pool, in order (a U-Net attention's to_q, to_k and
/// to_v; to_k and to_v of the text; and the same layers in the gradient pool).
fn stacked(layers: &[&Linear]) -> bool {
    let first = layers[0];
    layers.iter().enumerate().all(|(g, l)| {
        (l.in_f, l.out_f, l.bias.is_none()) == (first.in_f, first.out_f, true)
            && l.weight.pool == first.weight.pool
            && l.weight.offset == first.weight.offset + g * first.weight.numel()
    })
}

/// The weights of stacked `layers` as one tensor (group · out_f, in_f).
fn group_weight(layers: &[&Linear]) -> Tensor {
    let first = layers[0];
    Tensor { shape: [layers.len() * first.out_f, first.in_f].into(), ..first.weight }
}

/// Applies `layers` to one input: where they are stacked, in one call (`linear_group_forward`:
/// one batched product on CUDA) whose outputs are the blocks of one arena tensor; else one
/// `apply` each.
pub fn apply_group<const N: usize>(
    cx: &mut Cx,
    layers: [&Linear; N],
    inp: &Tensor,
    rows: usize,
) -> Result<[Tensor; N]> {
    if !stacked(&layers) {
        let mut out = [*inp; N];
        for (o, l) in out.iter_mut().zip(layers) {
            *o = l.apply(cx, inp, rows)?;
        }
        return Ok(out);
    }
    let p = layers[0].params(rows);
    let out = cx.arena.alloc([N, rows, layers[0].out_f])?;
    let t = LinearGroupForward { out: &out, inp, weight: &group_weight(&layers) };
    cx.b.linear_group_forward(&p, N, &t)?;
    Ok(std::array::from_fn(|g| p.group_out(g, &out)))
}

/// `n` zeroed (rows, cols) tensors, the blocks of one arena tensor (as `apply_group`'s outputs,
/// so that their gradients can go to `backward_group` as one).
pub fn zeros_group<const N: usize>(cx: &mut Cx, rows: usize, cols: usize) -> Result<[Tensor; N]> {
    let all = zeros(cx, [N, rows, cols])?;
    Ok(std::array::from_fn(|g| Tensor { offset: all.offset + g * rows * cols, shape: [rows, cols].into(), ..all }))
}

/// The backward of `layers` applied to one input `inp`, `douts` their output gradients:
/// accumulates each layer's gradients into `grads` (the same layers in the gradient pool) and,
/// if given, Σ douts_g · W_g into `dinp`, in the layers' order. One call where the layers, their
/// gradients and `douts` are stacked (CUDA: the weight gradients in one batched product); else
/// one `backward` each.
pub fn backward_group<const N: usize>(
    b: &dyn Backend,
    layers: [&Linear; N],
    grads: [&Linear; N],
    dinp: Option<&Tensor>,
    douts: [&Tensor; N],
    inp: &Tensor,
    rows: usize,
) -> Result<()> {
    let first = layers[0];
    let block = rows * first.out_f;
    let douts_stacked =
        douts.iter().enumerate().all(|(g, d)| d.pool == douts[0].pool && d.offset == douts[0].offset + g * block);
    if !(stacked(&layers) && stacked(&grads) && douts_stacked) {
        for ((l, g), dout) in layers.iter().zip(grads).zip(douts) {
            l.backward(g, b, dinp, dout, inp, rows)?;
        }
        return Ok(());
    }
    let dout = Tensor { shape: [N, rows, first.out_f].into(), ..*douts[0] };
    let t =
        LinearGroupBackward { dinp, dweight: &group_weight(&grads), dout: &dout, inp, weight: &group_weight(&layers) };
    b.linear_group_backward(&first.params(rows), N, &t)
}

/// `torch.nn.LayerNorm` over the last dimension, with affine weight and bias.
#[derive(Clone, Copy, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub dim: usize,
    pub eps: f32,
}

/// What a layer norm's forward saves for its backward.
#[derive(Clone, Copy, Debug)]
pub struct LayerNormActs {
    pub out: Tensor,
    pub mean: Tensor,
    pub rstd: Tensor,
}

impl LayerNorm {
    /// The operation this layer applies to `rows` vectors.
    fn params(&self, rows: usize) -> LayerNormParams {
        LayerNormParams { rows, cols: self.dim, eps: self.eps }
    }

    pub fn layout(l: &mut Layout, prefix: &str, dim: usize, eps: f32) -> LayerNorm {
        let weight = l.tensor(format!("{prefix}.weight"), [dim]);
        let bias = l.tensor(format!("{prefix}.bias"), [dim]);
        LayerNorm { weight, bias, dim, eps }
    }

    pub fn forward(&self, b: &dyn Backend, acts: &LayerNormActs, inp: &Tensor, rows: usize) -> Result<()> {
        b.layer_norm_forward(
            &self.params(rows),
            &NormForward {
                out: &acts.out,
                mean: &acts.mean,
                rstd: &acts.rstd,
                inp,
                weight: &self.weight,
                bias: &self.bias,
            },
        )
    }
}

pub mod attention;
pub mod resnet;
pub mod sampling;
pub mod transformer;

use crate::tensor::Arena;

/// Where a layer runs: the backend that computes and the arena its activations come from. Layers
/// that allocate take one `&mut Cx`; layers that only write into tensors they are given (`Linear::
/// forward`, every `backward`'s parameter-gradient half) take the backend alone.
pub struct Cx<'a> {
    pub b: &'a dyn Backend,
    pub arena: &'a mut Arena,
}

impl<'a> Cx<'a> {
    pub fn new(b: &'a dyn Backend, arena: &'a mut Arena) -> Cx<'a> {
        Cx { b, arena }
    }
}

/// A channels-last feature map: `t` holds (batch, h, w, c).
#[derive(Clone, Copy, Debug)]
pub struct Fmap {
    pub t: Tensor,
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Fmap {
    pub fn alloc(arena: &mut Arena, batch: usize, h: usize, w: usize, c: usize) -> Result<Fmap> {
        Ok(Fmap { t: arena.alloc([batch, h, w, c])?, batch, h, w, c })
    }

    /// batch · h · w: the row count when the map is seen as a (rows, c) matrix.
    pub fn rows(&self) -> usize {
        self.batch * self.h * self.w
    }

    pub fn numel(&self) -> usize {
        self.rows() * self.c
    }
}

impl Linear {
    /// A 1×1 convolution's weight (out_f, in_f, 1, 1), applied as a linear layer: on channels-last
    /// maps the two are the same product.
    pub fn layout_conv1x1(l: &mut Layout, prefix: &str, in_f: usize, out_f: usize) -> Linear {
        let weight = l.tensor(format!("{prefix}.weight"), [out_f, in_f, 1, 1]);
        let bias = Some(l.tensor(format!("{prefix}.bias"), [out_f]));
        Linear { weight, bias, in_f, out_f }
    }

    /// As `forward`, with the output taken from the arena.
    pub fn apply(&self, cx: &mut Cx, inp: &Tensor, rows: usize) -> Result<Tensor> {
        self.apply_residual(cx, inp, rows, None)
    }

    /// As `forward_into` (`residual` added when given), with the output taken from the arena.
    pub fn apply_residual(&self, cx: &mut Cx, inp: &Tensor, rows: usize, residual: Option<&Tensor>) -> Result<Tensor> {
        let b = cx.b;
        let out = cx.arena.alloc([rows, self.out_f])?;
        self.forward_into(b, &out, inp, rows, residual)?;
        Ok(out)
    }

    pub fn apply_fmap(&self, cx: &mut Cx, x: &Fmap) -> Result<Fmap> {
        let t = self.apply(cx, &x.t, x.rows())?;
        Ok(Fmap { t, c: self.out_f, ..*x })
    }

    /// Accumulates this layer's gradients into `g` (the same layer laid out in the gradient pool)
    /// and, if given, the input gradient into `dinp`.
    pub fn backward(
        &self,
        g: &Linear,
        b: &dyn Backend,
        dinp: Option<&Tensor>,
        dout: &Tensor,
        inp: &Tensor,
        rows: usize,
    ) -> Result<()> {
        b.linear_backward(
            &self.params(rows),
            &LinearBackward { dinp, dweight: &g.weight, dbias: g.bias.as_ref(), dout, inp, weight: &self.weight },
        )
    }
}

impl LayerNorm {
    /// As `forward`, with output and statistics taken from the arena.
    pub fn apply(&self, cx: &mut Cx, inp: &Tensor, rows: usize) -> Result<LayerNormActs> {
        let b = cx.b;
        let acts = LayerNormActs {
            out: cx.arena.alloc([rows, self.dim])?,
            mean: cx.arena.alloc_f32([rows])?,
            rstd: cx.arena.alloc_f32([rows])?,
        };
        self.forward(b, &acts, inp, rows)?;
        Ok(acts)
    }

    pub fn backward(
        &self,
        g: &LayerNorm,
        b: &dyn Backend,
        dinp: &Tensor,
        dout: &Tensor,
        inp: &Tensor,
        acts: &LayerNormActs,
    ) -> Result<()> {
        // The forward saved one mean per normalised row: that count is the row count.
        b.layer_norm_backward(
            &self.params(acts.mean.numel()),
            &LayerNormBackward {
                dinp,
                dweight: &g.weight,
                dbias: &g.bias,
                dout,
                inp,
                weight: &self.weight,
                mean: &acts.mean,
                rstd: &acts.rstd,
            },
        )
    }
}

/// `torch.nn.Conv2d` on channels-last maps; weight (c_out, c_in, k, k) as PyTorch stores it.
#[derive(Clone, Copy, Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    /// [top, bottom, left, right]
    pub pad: [usize; 4],
}

impl Conv2d {
    pub fn layout(
        l: &mut Layout,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        pad: [usize; 4],
    ) -> Conv2d {
        let weight = l.tensor(format!("{prefix}.weight"), [c_out, c_in, kernel, kernel]);
        let bias = Some(l.tensor(format!("{prefix}.bias"), [c_out]));
        Conv2d { weight, bias, c_in, c_out, kernel, stride, pad }
    }

    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        let p = self.params(&Fmap { t: self.weight, batch: 1, h, w, c: self.c_in });
        (p.out_h(), p.out_w())
    }

    pub fn apply(&self, cx: &mut Cx, x: &Fmap) -> Result<Fmap> {
        self.apply_fused(cx, x, None, None)
    }

    /// The convolution with more added in its epilogue after the bias: `batch_bias` (batch,
    /// c_out), one row per image, then `residual` (shaped as the output); what a separate
    /// add_bias_rows and add would compute, to the bit, without their launches and the extra map.
    pub fn apply_fused(
        &self,
        cx: &mut Cx,
        x: &Fmap,
        batch_bias: Option<&Tensor>,
        residual: Option<&Fmap>,
    ) -> Result<Fmap> {
        let (oh, ow) = self.out_size(x.h, x.w);
        let out = Fmap::alloc(cx.arena, x.batch, oh, ow, self.c_out)?;
        self.apply_into(cx.b, &out, x, batch_bias, residual)?;
        Ok(out)
    }

    /// As `apply_fused`, into `out` (allocated by the caller).
    pub fn apply_into(
        &self,
        b: &dyn Backend,
        out: &Fmap,
        x: &Fmap,
        batch_bias: Option<&Tensor>,
        residual: Option<&Fmap>,
    ) -> Result<()> {
        anyhow::ensure!(x.c == self.c_in, "conv2d: input has {} channels, weight expects {}", x.c, self.c_in);
        let t = Conv2dForward {
            out: &out.t,
            inp: &x.t,
            weight: &self.weight,
            bias: self.bias.as_ref(),
            batch_bias,
            residual: residual.map(|r| &r.t),
        };
        b.conv2d_forward(&self.params(x), &t)
    }

    /// `dout` is the gradient of this layer's output for input `x`; accumulates into `g` and `dx`.
    pub fn backward(&self, g: &Conv2d, b: &dyn Backend, dx: Option<&Fmap>, dout: &Fmap, x: &Fmap) -> Result<()> {
        b.conv2d_backward(
            &self.params(x),
            &Conv2dBackward {
                dinp: dx.map(|d| &d.t),
                dweight: &g.weight,
                dbias: g.bias.as_ref(),
                dout: &dout.t,
                inp: &x.t,
                weight: &self.weight,
            },
        )
    }

    /// The convolution this layer applies to `x`.
    fn params(&self, x: &Fmap) -> Conv2dParams {
        let (c_in, c_out, kernel, stride, pad) = (self.c_in, self.c_out, self.kernel, self.stride, self.pad);
        Conv2dParams { batch: x.batch, h: x.h, w: x.w, c_in, c_out, kernel, stride, pad }
    }
}

/// `torch.nn.GroupNorm` (affine) on channels-last maps.
#[derive(Clone, Copy, Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub c: usize,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNorm {
    pub fn layout(l: &mut Layout, prefix: &str, c: usize, groups: usize, eps: f32) -> GroupNorm {
        let weight = l.tensor(format!("{prefix}.weight"), [c]);
        let bias = l.tensor(format!("{prefix}.bias"), [c]);
        GroupNorm { weight, bias, c, groups, eps }
    }

    /// Normalises `x`, then applies SiLU when `silu` (the resnet's norm → act pair).
    pub fn apply(&self, cx: &mut Cx, x: &Fmap, silu: bool) -> Result<Fmap> {
        Ok(self.apply_saved(cx, x, silu)?.out)
    }

    pub fn backward(
        &self,
        g: &GroupNorm,
        b: &dyn Backend,
        dx: &Fmap,
        dout: &Fmap,
        x: &Fmap,
        saved: &GroupNormOut,
    ) -> Result<()> {
        b.group_norm_backward(
            &self.params(x, saved.silu),
            &GroupNormBackward {
                dinp: &dx.t,
                dweight: &g.weight,
                dbias: &g.bias,
                dout: &dout.t,
                inp: &x.t,
                weight: &self.weight,
                bias: &self.bias,
                mean: &saved.mean,
                rstd: &saved.rstd,
            },
        )
    }

    /// The operation this layer applies to `x`.
    fn params(&self, x: &Fmap, silu: bool) -> GroupNormParams {
        GroupNormParams { batch: x.batch, hw: x.h * x.w, channels: x.c, groups: self.groups, eps: self.eps, silu }
    }

    /// As `apply`, returning the statistics the backward pass needs too.
    pub fn apply_saved(&self, cx: &mut Cx, x: &Fmap, silu: bool) -> Result<GroupNormOut> {
        let b = cx.b;
        let out = Fmap::alloc(cx.arena, x.batch, x.h, x.w, x.c)?;
        let mean = cx.arena.alloc_f32([x.batch, self.groups])?;
        let rstd = cx.arena.alloc_f32([x.batch, self.groups])?;
        b.group_norm_forward(
            &self.params(x, silu),
            &NormForward { out: &out.t, mean: &mean, rstd: &rstd, inp: &x.t, weight: &self.weight, bias: &self.bias },
        )?;
        Ok(GroupNormOut { out, mean, rstd, silu })
    }
}

/// A group norm's output and saved statistics.
#[derive(Clone, Copy, Debug)]
pub struct GroupNormOut {
    pub out: Fmap,
    pub mean: Tensor,
    pub rstd: Tensor,
    pub silu: bool,
}

/// An arena sized by a planning run: `run` on the planning backend over an unbounded arena, then a
/// pool of exactly its peak (`label`), for the same calls on a real backend.
pub fn planned_arena(backend: &mut dyn Backend, label: &str, run: impl FnOnce(&mut Cx) -> Result<()>) -> Result<Arena> {
    planned_arena_as(backend, label, DType::F32, run)
}

/// As `planned_arena`, its activations stored as `activations` (`Arena::with_activations`), in the
/// plan as in the real run.
pub fn planned_arena_as(
    backend: &mut dyn Backend,
    label: &str,
    activations: DType,
    run: impl FnOnce(&mut Cx) -> Result<()>,
) -> Result<Arena> {
    let mut arena = Arena::planning().with_activations(activations);
    run(&mut Cx::new(&crate::backend::plan::PlanBackend::new(), &mut arena))?;
    let pool = backend.alloc(arena.peak(), label)?;
    Ok(Arena::new(pool, arena.peak()).with_activations(activations))
}

/// A zeroed arena tensor (gradient buffers: backward passes accumulate).
pub fn zeros(cx: &mut Cx, shape: impl Into<crate::tensor::Shape>) -> Result<Tensor> {
    let b = cx.b;
    let t = cx.arena.alloc(shape)?;
    b.zero(&t)?;
    Ok(t)
}

/// A zeroed feature map shaped like `like`.
pub fn zeros_like(cx: &mut Cx, like: &Fmap) -> Result<Fmap> {
    Ok(Fmap { t: zeros(cx, like.t.shape)?, ..*like })
}

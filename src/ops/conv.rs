//! 2-D convolution (`torch.nn.Conv2d` on channels-last activations, PyTorch's (c_out, c_in, kh, kw)
//! weight), with the asymmetric padding the VAE's downsamplers use; and im2col, the patches of a
//! rectangular kernel for a linear layer to convolve (inference only). Kernels: kernels/conv.cu.

use super::linear::{column_sums_into, LinearParams, WeightedBackward};
use super::Window2d;
use crate::backend::cpu::gemm::{self, Mat, PackedB};
use crate::backend::cpu::scratch;
use crate::backend::{check_disjoint, check_len};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// One convolution: `batch` images of h × w × c_in, a square `kernel`, `stride`, and padding
/// [top, bottom, left, right]; the output is (batch, out_h, out_w, c_out).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Conv2dParams {
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: [usize; 4],
}

/// A convolution's forward tensors: `out` (batch, out_h, out_w, c_out), `inp` (batch, h, w, c_in),
/// `weight` (c_out, c_in, kernel, kernel), and what the epilogue adds to each output element, in
/// this order, each if given: `bias` (c_out), `batch_bias` (batch, c_out: one row per image, a
/// U-Net resnet's projected time embedding) and `residual` (shaped as `out`: a resnet's shortcut).
/// Added in the order the separate layers would add them, so fusing changes no bit.
#[derive(Clone, Copy)]
pub struct Conv2dForward<'a> {
    pub out: &'a Tensor,
    pub inp: &'a Tensor,
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub batch_bias: Option<&'a Tensor>,
    pub residual: Option<&'a Tensor>,
}

impl<'a> Conv2dForward<'a> {
    /// A convolution with an optional bias and nothing else in its epilogue.
    pub fn new(out: &'a Tensor, inp: &'a Tensor, weight: &'a Tensor, bias: Option<&'a Tensor>) -> Conv2dForward<'a> {
        Conv2dForward { out, inp, weight, bias, batch_bias: None, residual: None }
    }
}
/// A convolution's backward tensors (shapes as [`Conv2dForward`]).
pub type Conv2dBackward<'a> = WeightedBackward<'a>;

impl Conv2dParams {
    pub fn out_h(&self) -> usize {
        (self.h + self.pad[0] + self.pad[1] - self.kernel) / self.stride + 1
    }

    pub fn out_w(&self) -> usize {
        (self.w + self.pad[2] + self.pad[3] - self.kernel) / self.stride + 1
    }

    /// Output pixels over the batch: the rows of the implicit GEMM.
    pub fn out_rows(&self) -> usize {
        self.batch * self.out_h() * self.out_w()
    }

    /// The GEMM's inner dimension: one patch, c_in · kernel².
    pub fn patch_len(&self) -> usize {
        self.c_in * self.kernel * self.kernel
    }

    /// Multiply-adds ×2 of the forward (the backward's weight and input gradients are one each).
    pub fn flops(&self) -> usize {
        2 * self.out_rows() * self.c_out * self.patch_len()
    }

    /// A 1×1 kernel, stride 1, no padding: a plain GEMM over the pixels.
    fn is_pointwise(&self) -> bool {
        self.kernel == 1 && self.stride == 1 && self.pad == [0; 4]
    }

    fn check_fits(&self, what: &str) -> Result<()> {
        let Conv2dParams { h, w, kernel, stride, pad, .. } = *self;
        ensure!(
            stride >= 1 && kernel >= 1 && h + pad[0] + pad[1] >= kernel && w + pad[2] + pad[3] >= kernel,
            "{what}: kernel {kernel} (stride {stride}) does not fit {h}×{w} with padding {pad:?}"
        );
        Ok(())
    }

    /// What every backend checks before a forward: the kernel fits the padded image, the tensors
    /// hold what the shapes need, the output overlaps no input.
    pub fn check_forward(&self, t: &Conv2dForward) -> Result<()> {
        self.check_fits("conv2d")?;
        check_len("conv2d out", t.out, self.out_rows() * self.c_out)?;
        check_len("conv2d inp", t.inp, self.batch * self.h * self.w * self.c_in)?;
        check_len("conv2d weight", t.weight, self.c_out * self.patch_len())?;
        if let Some(b) = t.bias {
            check_len("conv2d bias", b, self.c_out)?;
        }
        if let Some(b) = t.batch_bias {
            check_len("conv2d batch bias", b, self.batch * self.c_out)?;
        }
        if let Some(r) = t.residual {
            check_len("conv2d residual", r, self.out_rows() * self.c_out)?;
        }
        let ins: Vec<&Tensor> =
            [t.inp, t.weight].into_iter().chain(t.bias).chain(t.batch_bias).chain(t.residual).collect();
        check_disjoint("conv2d", &[t.out], &ins)
    }

    /// The CPU reference of the epilogue after bias: out += batch_bias[image] then += residual,
    /// element by element (the separate layers' order).
    pub fn cpu_epilogue(&self, out: &mut [f32], batch_bias: Option<&[f32]>, residual: Option<&[f32]>) {
        let (c, per_image) = (self.c_out, self.out_h() * self.out_w());
        let rows = self.out_rows();
        out[..rows * c].par_chunks_mut(c).enumerate().for_each(|(r, row)| {
            if let Some(bb) = batch_bias {
                let b = &bb[(r / per_image) * c..][..c];
                row.iter_mut().zip(b).for_each(|(o, v)| *o += v);
            }
            if let Some(res) = residual {
                row.iter_mut().zip(&res[r * c..][..c]).for_each(|(o, v)| *o += v);
            }
        });
    }

    /// As [`Conv2dParams::check_forward`], for a backward: no gradient may alias another or an
    /// input.
    pub fn check_backward(&self, t: &Conv2dBackward) -> Result<()> {
        self.check_fits("conv2d backward")?;
        let k = self.patch_len();
        check_len("conv2d dout", t.dout, self.out_rows() * self.c_out)?;
        check_len("conv2d inp", t.inp, self.batch * self.h * self.w * self.c_in)?;
        check_len("conv2d weight", t.weight, self.c_out * k)?;
        check_len("conv2d dweight", t.dweight, self.c_out * k)?;
        if let Some(db) = t.dbias {
            check_len("conv2d dbias", db, self.c_out)?;
        }
        if let Some(di) = t.dinp {
            check_len("conv2d dinp", di, self.batch * self.h * self.w * self.c_in)?;
        }
        let outs: Vec<&Tensor> = std::iter::once(t.dweight).chain(t.dinp).chain(t.dbias).collect();
        check_disjoint("conv2d backward", &outs, &[t.dout, t.inp, t.weight])
    }

    /// Output row `r` (a pixel of the NHWC output) as its image and the input row and column of
    /// its window's top-left tap (negative in the padding).
    fn window_corner(&self, r: usize) -> (usize, isize, isize) {
        let (oh, ow) = (self.out_h(), self.out_w());
        let (b, rem) = (r / (oh * ow), r % (oh * ow));
        let (oy, ox) = (rem / ow, rem % ow);
        (b, (oy * self.stride) as isize - self.pad[0] as isize, (ox * self.stride) as isize - self.pad[2] as isize)
    }

    /// Output pixel `r`'s input patch into `p` (patch_len values), ordered (c_in, ky, kx) as
    /// PyTorch's weight; 0 where the window hangs over the padding.
    fn gather_patch(&self, p: &mut [f32], x: &[f32], r: usize) {
        let Conv2dParams { h, w, c_in, kernel, .. } = *self;
        let (b, y0, x0) = self.window_corner(r);
        for ky in 0..kernel {
            let iy = y0 + ky as isize;
            for kx in 0..kernel {
                let ix = x0 + kx as isize;
                let inside = iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < w;
                let base = if inside { ((b * h + iy as usize) * w + ix as usize) * c_in } else { 0 };
                let kk = ky * kernel + kx;
                for ci in 0..c_in {
                    p[ci * kernel * kernel + kk] = if inside { x[base + ci] } else { 0.0 };
                }
            }
        }
    }

    /// The weight (c_out × patch_len, PyTorch's order) as the forward GEMM's B: Wᵀ with its rows
    /// tap-major, as `Patches` orders the patch's columns.
    pub fn weight_as_b<'a>(&self, w: &'a [f32]) -> gemm::BSource<'a> {
        gemm::BSource::TapMajor { w, taps: self.kernel * self.kernel, c_in: self.c_in }
    }

    /// The CPU reference of the forward, on checked slices: an implicit GEMM (the patches read in
    /// place, see `Patches`) against the weight packed by the caller from `weight_as_b`, the bias as
    /// the GEMM's starting value.
    pub fn cpu_forward(&self, out: &mut [f32], x: &[f32], packed: &PackedB, bias: Option<&[f32]>) {
        let (rows, c_out, k) = (self.out_rows(), self.c_out, self.patch_len());
        assert_eq!(packed.shape(), (k, c_out), "conv2d weight packed for another shape");
        let o = &mut out[..rows * c_out];
        match bias {
            Some(b) => o.par_chunks_mut(c_out).for_each(|row| row.copy_from_slice(&b[..c_out])),
            None => o.fill(0.0),
        }
        if self.is_pointwise() {
            let xm = Mat { data: x, row_stride: self.c_in, col_stride: 1 };
            return gemm::sgemm_packed(rows, xm, packed, o, 1.0, true);
        }
        // An implicit GEMM: the kernel reads each patch's tap runs where they lie in the input
        // (no patch matrix in memory, nothing gathered; see `Patches`).
        gemm::sgemm_rows(rows, &Patches::new(self, x), packed, o, 1.0, true);
    }

    /// The CPU reference of the backward, on checked slices (gradients accumulated into): by tiles
    /// of output pixels, dW += doutᵀ·patches, and dpatches = dout·W scattered back (col2im) into
    /// dinp; db += Σ dout. Tiles run in order (their input windows overlap); the products inside a
    /// tile are parallel.
    pub fn cpu_backward(
        &self,
        mut dinp: Option<&mut [f32]>,
        dweight: &mut [f32],
        dbias: Option<&mut [f32]>,
        [dout, inp, weight]: [&[f32]; 3],
    ) {
        let Conv2dParams { c_in, c_out, .. } = *self;
        let (rows, k) = (self.out_rows(), self.patch_len());
        if let Some(db) = dbias {
            column_sums_into(db, dout, rows, c_out);
        }
        if self.is_pointwise() {
            let pointwise = LinearParams { rows, in_features: c_in, out_features: c_out };
            pointwise.cpu_backward(dinp, dweight, None, [dout, inp, weight]);
            return;
        }
        const TILE: usize = 1024;
        // W (c_out × k) packed once for every tile's dpatches.
        let wm = Mat { data: weight, row_stride: k, col_stride: 1 };
        gemm::with_packed_b(c_out, k, wm, true, |w_packed| {
            scratch::with_buffer(TILE.min(rows) * k, |patch| {
                for r0 in (0..rows).step_by(TILE) {
                    let n = TILE.min(rows - r0);
                    let dt = &dout[r0 * c_out..(r0 + n) * c_out];
                    patch[..n * k].par_chunks_mut(k).enumerate().for_each(|(r, p)| self.gather_patch(p, inp, r0 + r));
                    let a = Mat { data: dt, row_stride: 1, col_stride: c_out }; // doutᵀ tile (c_out × n)
                    let b = Mat { data: patch, row_stride: k, col_stride: 1 };
                    gemm::sgemm_par(c_out, n, k, a, b, &mut dweight[..c_out * k], 1.0);
                    if let Some(di) = dinp.as_deref_mut() {
                        let a = Mat { data: dt, row_stride: c_out, col_stride: 1 };
                        gemm::sgemm_packed(n, a, w_packed, &mut patch[..n * k], 0.0, true);
                        for r in 0..n {
                            self.scatter_add_patch(di, &patch[r * k..(r + 1) * k], r0 + r);
                        }
                    }
                }
            })
        });
    }

    /// The inverse of `gather_patch` (col2im): output pixel `r`'s patch gradient `p` added into
    /// the input gradient `di` at the pixels its window covers (padding dropped).
    fn scatter_add_patch(&self, di: &mut [f32], p: &[f32], r: usize) {
        let Conv2dParams { h, w, c_in, kernel, .. } = *self;
        let (bb, y0, x0) = self.window_corner(r);
        for ky in 0..kernel {
            let iy = y0 + ky as isize;
            if iy < 0 || iy as usize >= h {
                continue;
            }
            for kx in 0..kernel {
                let ix = x0 + kx as isize;
                if ix < 0 || ix as usize >= w {
                    continue;
                }
                let base = ((bb * h + iy as usize) * w + ix as usize) * c_in;
                let kk = ky * kernel + kx;
                for ci in 0..c_in {
                    di[base + ci] += p[ci * kernel * kernel + kk];
                }
            }
        }
    }
}

/// A convolution's patch matrix (output pixels × taps·c_in: tap-major, see `BSource::TapMajor`)
/// as a GEMM's A read in place: the run of a pixel's tap is the c_in channels of the input pixel
/// under it, or zeros where the window hangs over the padding.
struct Patches<'a> {
    conv: &'a Conv2dParams,
    x: &'a [f32],
    zeros: std::borrow::Cow<'static, [f32]>,
}

impl<'a> Patches<'a> {
    fn new(conv: &'a Conv2dParams, x: &'a [f32]) -> Patches<'a> {
        static ZEROS: [f32; 4096] = [0.0; 4096];
        let zeros = match ZEROS.get(..conv.c_in) {
            Some(z) => z.into(),
            None => vec![0f32; conv.c_in].into(),
        };
        Patches { conv, x, zeros }
    }
}

impl gemm::RowRuns for Patches<'_> {
    fn run(&self) -> usize {
        self.conv.c_in
    }

    fn starts(&self, out: &mut [*const f32], i0: usize, rows: usize, mr: usize) {
        let Conv2dParams { h, w, c_in, kernel, .. } = *self.conv;
        out.fill(self.zeros.as_ptr());
        for i in 0..rows {
            let (b, y0, x0) = self.conv.window_corner(i0 + i);
            for tap in 0..kernel * kernel {
                let (iy, ix) = (y0 + (tap / kernel) as isize, x0 + (tap % kernel) as isize);
                if iy >= 0 && (iy as usize) < h && ix >= 0 && (ix as usize) < w {
                    out[tap * mr + i] = self.x[((b * h + iy as usize) * w + ix as usize) * c_in..][..c_in].as_ptr();
                }
            }
        }
    }
}

/// The 2-D convolution on a backend.
/// The patches of a convolution with a rectangular kernel `window` (Inception's
/// 1×7, 7×1, 1×3 and 3×1 convolutions), laid out as rows: out (batch · out_h · out_w,
/// channels · kernel_h · kernel_w), column (ci · kernel_h + ky) · kernel_w + kx, padding zeros. A
/// linear layer with the convolution's (c_out, c_in, kh, kw) weight seen as (c_out, c_in · kh · kw)
/// then computes the convolution. Forward only (the evaluation networks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Im2colParams {
    pub batch: usize,
    pub channels: usize,
    pub window: Window2d,
}

impl Im2colParams {
    /// Rows of the output: output pixels over the batch.
    pub fn rows(&self) -> usize {
        self.batch * self.window.out_h() * self.window.out_w()
    }

    /// Columns of the output: one patch.
    pub fn patch_len(&self) -> usize {
        self.channels * self.window.kernel[0] * self.window.kernel[1]
    }

    pub fn check_forward(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        self.window.check_fits("im2col")?;
        check_len("im2col out", out, self.rows() * self.patch_len())?;
        check_len("im2col inp", inp, self.batch * self.window.h * self.window.w * self.channels)?;
        check_disjoint("im2col", &[out], &[inp])
    }

    /// The CPU reference: one task per output row.
    pub fn cpu_forward(&self, out: &mut [f32], inp: &[f32]) {
        let (win, c) = (self.window, self.channels);
        let [kh, kw] = win.kernel;
        let (oh, ow) = (win.out_h(), win.out_w());
        out[..self.rows() * self.patch_len()].par_chunks_mut(self.patch_len()).enumerate().for_each(|(r, row)| {
            let (b, oy, ox) = (r / (oh * ow), (r / ow) % oh, r % ow);
            for ky in 0..kh {
                let iy = win.row0(oy) + ky as isize;
                for kx in 0..kw {
                    let ix = win.col0(ox) + kx as isize;
                    let inside = iy >= 0 && (iy as usize) < win.h && ix >= 0 && (ix as usize) < win.w;
                    let base = ((b * win.h + iy.max(0) as usize) * win.w + ix.max(0) as usize) * c;
                    for ci in 0..c {
                        row[(ci * kh + ky) * kw + kx] = if inside { inp[base + ci] } else { 0.0 };
                    }
                }
            }
        });
    }
}

pub trait ConvOps {
    /// 2-D convolution on channels-last tensors: inp (batch, h, w, c_in), out (batch, oh, ow, c_out)
    /// with oh = (h + pad_top + pad_bottom − kh) / stride + 1 (likewise ow), weight in PyTorch's
    /// layout (c_out, c_in, kh, kw). `pad` is [top, bottom, left, right] (the VAE's downsampler pads
    /// asymmetrically).
    fn conv2d_forward(&self, p: &Conv2dParams, t: &Conv2dForward) -> Result<()>;

    /// Of `conv2d_forward`: data, weight and bias gradients (dinp optional: the first layer's input
    /// needs none).
    fn conv2d_backward(&self, p: &Conv2dParams, t: &Conv2dBackward) -> Result<()>;

    /// out (rows, patch) = the patches of inp (batch, h, w, channels) (see [`Im2colParams`]).
    fn im2col_forward(&self, p: &Im2colParams, out: &Tensor, inp: &Tensor) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::splitmix::SplitMix64;

    /// The textbook sum over the window, NHWC input, (c_out, c_in, ky, kx) weight.
    fn direct(p: &Conv2dParams, x: &[f32], wt: &[f32], bias: &[f32]) -> Vec<f32> {
        let (oh, ow, k) = (p.out_h(), p.out_w(), p.kernel);
        let mut out = vec![0f32; p.batch * oh * ow * p.c_out];
        for b in 0..p.batch {
            for (oy, ox) in (0..oh).flat_map(|y| (0..ow).map(move |x| (y, x))) {
                for co in 0..p.c_out {
                    let mut acc = bias[co] as f64;
                    for (ci, ky, kx) in
                        (0..p.c_in).flat_map(|c| (0..k).flat_map(move |y| (0..k).map(move |x| (c, y, x))))
                    {
                        let (iy, ix) = (
                            (oy * p.stride + ky) as isize - p.pad[0] as isize,
                            (ox * p.stride + kx) as isize - p.pad[2] as isize,
                        );
                        if iy >= 0 && ix >= 0 && (iy as usize) < p.h && (ix as usize) < p.w {
                            let xv = x[((b * p.h + iy as usize) * p.w + ix as usize) * p.c_in + ci];
                            acc += xv as f64 * wt[((co * p.c_in + ci) * k + ky) * k + kx] as f64;
                        }
                    }
                    out[((b * oh + oy) * ow + ox) * p.c_out + co] = acc as f32;
                }
            }
        }
        out
    }

    /// The implicit GEMM (patches read in place, or packed from their runs when c_in is 3) against
    /// the textbook sum: many output pixels (several row blocks, a short last one), a patch longer
    /// than one KC block (taps cut at a block edge), a strided convolution with the VAE encoder's
    /// asymmetric padding.
    #[test]
    fn forward_matches_the_direct_sum() {
        let many = ((2 * rayon::current_num_threads() * 144 + 77) as f64).sqrt() as usize;
        for (h, w, c_in, stride, pad) in [
            (5, 7, 31, 1, [1; 4]),
            (many + 1, many + 2, 3, 1, [1; 4]),
            (9, 11, 31, 2, [0, 1, 0, 1]),
            (many, many, 40, 1, [1; 4]),
        ] {
            let p = Conv2dParams { batch: 2, h, w, c_in, c_out: 37, kernel: 3, stride, pad };
            let k = p.patch_len();
            let mut rng = SplitMix64::new(h as u64);
            let x: Vec<f32> = (0..2 * h * w * c_in).map(|_| rng.next_normal()).collect();
            let wt: Vec<f32> = (0..37 * k).map(|_| rng.next_normal()).collect();
            let bias: Vec<f32> = (0..37).map(|_| rng.next_normal()).collect();
            let mut out = vec![f32::NAN; p.out_rows() * 37];
            let packed = PackedB::new(k, 37, p.weight_as_b(&wt), false);
            p.cpu_forward(&mut out, &x, &packed, Some(&bias));
            let want = direct(&p, &x, &wt, &bias);
            let worst = out.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{h}×{w}×{c_in} stride {stride}: max |gemm − direct| = {worst}");
        }
    }
}

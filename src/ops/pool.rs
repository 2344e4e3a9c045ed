//! Pooling over channels-last maps: max and average windows as `F.max_pool2d` and `F.avg_pool2d`
//! compute them (floor mode), and the global average (`adaptive_avg_pool2d(x, 1)`: the window is
//! the whole map), forward and backward (the classifier trained from scratch, issue 16). Kernels:
//! kernels/pool.cu.

use super::Window2d;
use crate::backend::{check_disjoint, check_len};
use crate::tensor::Tensor;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// What a window computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// The largest value (padding never wins: it stands for −∞; a NaN wins, as in PyTorch).
    Max,
    /// The mean over the window, padding counted as zeros (`count_include_pad=True`, the default).
    Avg,
    /// The mean over the window's positions inside the map (`count_include_pad=False`).
    AvgExcludePad,
}

/// One pooling: `batch` maps of `channels` channels, each pooled by `window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dParams {
    pub batch: usize,
    pub channels: usize,
    pub window: Window2d,
    pub mode: PoolMode,
}

impl Pool2dParams {
    /// A square window with the same padding on every side.
    pub fn square(
        batch: usize,
        [h, w, channels]: [usize; 3],
        kernel: usize,
        stride: usize,
        pad: usize,
        mode: PoolMode,
    ) -> Pool2dParams {
        Pool2dParams { batch, channels, window: Window2d { h, w, kernel: [kernel; 2], stride, pad: [pad; 4] }, mode }
    }

    /// The global average of each channel (the output is batch × 1 × 1 × channels).
    pub fn global_avg(batch: usize, [h, w, channels]: [usize; 3]) -> Pool2dParams {
        Pool2dParams {
            batch,
            channels,
            window: Window2d { h, w, kernel: [h, w], stride: 1, pad: [0; 4] },
            mode: PoolMode::Avg,
        }
    }

    pub fn in_elements(&self) -> usize {
        self.batch * self.window.h * self.window.w * self.channels
    }

    pub fn out_elements(&self) -> usize {
        self.batch * self.window.out_h() * self.window.out_w() * self.channels
    }

    /// What every backend checks before a forward: the window fits the padded map, padding at most
    /// half the window (PyTorch's rule), the tensors' lengths, and that out does not overlap inp.
    pub fn check_forward(&self, out: &Tensor, inp: &Tensor) -> Result<()> {
        let win = self.window;
        win.check_fits("pool2d")?;
        let [kh, kw] = win.kernel;
        let [t, b, l, r] = win.pad;
        ensure!(
            2 * t.max(b) <= kh && 2 * l.max(r) <= kw,
            "pool2d: padding {:?} is more than half the {kh}×{kw} window",
            win.pad
        );
        check_len("pool2d out", out, self.out_elements())?;
        check_len("pool2d inp", inp, self.in_elements())?;
        check_disjoint("pool2d", &[out], &[inp])
    }

    /// The CPU reference: one task per output position, averages accumulated in f64.
    pub fn cpu_forward(&self, out: &mut [f32], inp: &[f32]) {
        let (win, c, mode) = (self.window, self.channels, self.mode);
        let (oh, ow) = (win.out_h(), win.out_w());
        // A window's [start, end) along an axis of `size`, clipped to the map.
        let clip = |start: isize, k: usize, size: usize| {
            (start.max(0) as usize, ((start + k as isize).max(0) as usize).min(size))
        };
        out[..self.out_elements()].par_chunks_mut(c).enumerate().for_each(|(r, o)| {
            let (b, oy, ox) = (r / (oh * ow), (r / ow) % oh, r % ow);
            let (y0, y1) = clip(win.row0(oy), win.kernel[0], win.h);
            let (x0, x1) = clip(win.col0(ox), win.kernel[1], win.w);
            let at = |y: usize, x: usize| &inp[((b * win.h + y) * win.w + x) * c..][..c];
            match mode {
                PoolMode::Max => {
                    o.fill(f32::NEG_INFINITY);
                    for y in y0..y1 {
                        for x in x0..x1 {
                            for (a, &v) in o.iter_mut().zip(at(y, x)) {
                                if v > *a || v.is_nan() {
                                    *a = v;
                                }
                            }
                        }
                    }
                }
                PoolMode::Avg | PoolMode::AvgExcludePad => {
                    let mut acc = vec![0f64; c];
                    for y in y0..y1 {
                        for x in x0..x1 {
                            acc.iter_mut().zip(at(y, x)).for_each(|(a, &v)| *a += v as f64);
                        }
                    }
                    let n = if mode == PoolMode::Avg { win.kernel[0] * win.kernel[1] } else { (y1 - y0) * (x1 - x0) };
                    o.iter_mut().zip(&acc).for_each(|(o, a)| *o = (a / n as f64) as f32);
                }
            }
        });
    }
}

/// Where a max window's gradient goes: the position (y, x) of its maximum, scanning rows then
/// columns and keeping the first largest value (a later NaN replaces it, as PyTorch's CPU
/// `max_pool2d_with_indices` scans); None for a window with nothing inside the map.
fn window_argmax(
    inp: &[f32],
    [w, c]: [usize; 2],
    [y0, y1, x0, x1]: [usize; 4],
    base: usize,
    ch: usize,
) -> Option<(usize, usize)> {
    let (mut best, mut at) = (f32::NEG_INFINITY, None);
    for y in y0..y1 {
        for x in x0..x1 {
            let v = inp[base + (y * w + x) * c + ch];
            if v > best || v.is_nan() || at.is_none() {
                best = v;
                at = Some((y, x));
            }
        }
    }
    at
}

impl Pool2dParams {
    /// What every backend checks before a backward: those of the forward, for dout and dinp.
    pub fn check_backward(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor) -> Result<()> {
        self.check_forward(dout, inp)?;
        check_len("pool2d dinp", dinp, self.in_elements())?;
        check_disjoint("pool2d backward", &[dinp], &[dout, inp])
    }

    /// The CPU reference of the backward: dinp += the gradient of every window that holds each
    /// input position (gathered per input position, so no two tasks write one value): for max, the
    /// window's dout when the position is the window's maximum ([`window_argmax`]); for the
    /// averages, dout divided by the window's count. Sums in f64, in (oy, ox) order.
    pub fn cpu_backward(&self, dinp: &mut [f32], dout: &[f32], inp: &[f32]) {
        let (win, c, mode) = (self.window, self.channels, self.mode);
        let (oh, ow) = (win.out_h(), win.out_w());
        let [kh, kw] = win.kernel;
        let clip = |start: isize, k: usize, size: usize| {
            (start.max(0) as usize, ((start + k as isize).max(0) as usize).min(size))
        };
        // The output rows (or columns) whose window covers map position `p` along an axis.
        let covering = |p: usize, pad: usize, k: usize, n_out: usize| {
            let hi = (p + pad) / win.stride; // the last window starting at or before p
            let lo = (p + pad + 1).saturating_sub(k).div_ceil(win.stride);
            lo..(hi + 1).min(n_out)
        };
        dinp[..self.in_elements()].par_chunks_mut(c).enumerate().for_each(|(r, d)| {
            let (b, y, x) = (r / (win.h * win.w), (r / win.w) % win.h, r % win.w);
            let base = b * win.h * win.w * c;
            for (ch, d) in d.iter_mut().enumerate() {
                let mut acc = 0f64;
                for oy in covering(y, win.pad[0], kh, oh) {
                    for ox in covering(x, win.pad[2], kw, ow) {
                        let g = dout[((b * oh + oy) * ow + ox) * c + ch] as f64;
                        let (y0, y1) = clip(win.row0(oy), kh, win.h);
                        let (x0, x1) = clip(win.col0(ox), kw, win.w);
                        acc += match mode {
                            PoolMode::Max => {
                                let at = window_argmax(inp, [win.w, c], [y0, y1, x0, x1], base, ch);
                                if at == Some((y, x)) {
                                    g
                                } else {
                                    0.0
                                }
                            }
                            PoolMode::Avg => g / (kh * kw) as f64,
                            PoolMode::AvgExcludePad => g / ((y1 - y0) * (x1 - x0)) as f64,
                        };
                    }
                }
                *d = (*d as f64 + acc) as f32;
            }
        });
    }
}

/// The pooling family, implemented by each backend in its file of that family.
pub trait PoolOps {
    /// out (batch, out_h, out_w, channels) = the pooled inp (batch, h, w, channels).
    fn pool2d_forward(&self, p: &Pool2dParams, out: &Tensor, inp: &Tensor) -> Result<()>;

    /// dinp (batch, h, w, channels) += the gradient of `pool2d_forward` for dout; max windows
    /// recompute their maximum from inp.
    fn pool2d_backward(&self, p: &Pool2dParams, dinp: &Tensor, dout: &Tensor, inp: &Tensor) -> Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::ops::test_support::cpu_pool;

    /// A 2×3 single-channel map pooled 2×2, stride 1, padding 1, worked by hand.
    #[test]
    fn windows_count_padding_as_pytorch_does() {
        let (b, t) = cpu_pool(64);
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        b.upload(&t(0, 6), &x).unwrap();
        let run = |mode| {
            let p = Pool2dParams::square(1, [2, 3, 1], 2, 1, 1, mode);
            assert_eq!((p.window.out_h(), p.window.out_w()), (3, 4));
            b.pool2d_forward(&p, &t(16, 12), &t(0, 6)).unwrap();
            b.download(&t(16, 12)).unwrap()
        };
        assert_eq!(run(PoolMode::Max), [1.0, 2.0, 3.0, 3.0, 4.0, 5.0, 6.0, 6.0, 4.0, 5.0, 6.0, 6.0]);
        let q = 0.25;
        assert_eq!(
            run(PoolMode::Avg),
            [
                1.0 * q,
                3.0 * q,
                5.0 * q,
                3.0 * q,
                5.0 * q,
                12.0 * q,
                16.0 * q,
                9.0 * q,
                4.0 * q,
                9.0 * q,
                11.0 * q,
                6.0 * q
            ]
        );
        assert_eq!(run(PoolMode::AvgExcludePad), [1.0, 1.5, 2.5, 3.0, 2.5, 3.0, 4.0, 4.5, 4.0, 4.5, 5.5, 6.0]);
    }

    #[test]
    fn a_window_that_does_not_fit_is_refused() {
        let (b, t) = cpu_pool(64);
        let p = Pool2dParams::square(1, [2, 2, 1], 3, 1, 0, PoolMode::Max);
        let e = b.pool2d_forward(&p, &t(16, 1), &t(0, 4)).unwrap_err().to_string();
        assert!(e.contains("does not fit 2×2"), "{e}");
        let p = Pool2dParams::square(1, [4, 4, 1], 2, 1, 2, PoolMode::Max);
        let e = b.pool2d_forward(&p, &t(16, 25), &t(0, 16)).unwrap_err().to_string();
        assert!(e.contains("more than half"), "{e}");
    }
}

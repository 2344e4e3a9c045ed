//! Pooling over channels-last maps: max and average windows as `F.max_pool2d` and `F.avg_pool2d`
//! compute them (floor mode), and the global average (`adaptive_avg_pool2d(x, 1)`: the window is
//! the whole map). Forward only: pooling serves the evaluation networks (TorchXRayVision's
//! DenseNet), which run inference. Kernels: kernels/pool.cu.

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

/// The pooling family, implemented by each backend in its file of that family.
pub trait PoolOps {
    /// out (batch, out_h, out_w, channels) = the pooled inp (batch, h, w, channels).
    fn pool2d_forward(&self, p: &Pool2dParams, out: &Tensor, inp: &Tensor) -> Result<()>;
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

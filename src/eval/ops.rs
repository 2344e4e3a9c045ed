//! Plain CPU building blocks for pytorch-fid's Inception (the CLIP tower and the DenseNet run on
//! the backend): one image at a time, channels-last (HWC),
//! f32, convolutions as im2col + the crate's row-parallel SGEMM. These networks only run forward
//! (inference, batch-norm folded into the preceding convolution where the order allows), so they
//! live here rather than on the training backend.

use crate::backend::cpu::gemm::{sgemm_par, Mat};
use crate::ops::norm::BatchNormParams;
use rayon::prelude::*;

/// One image's activations: `data[(y * w + x) * c + ch]`.
#[derive(Clone, Debug)]
pub struct Act {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Act {
    pub fn new(h: usize, w: usize, c: usize, data: Vec<f32>) -> Act {
        debug_assert_eq!(data.len(), h * w * c);
        Act { h, w, c, data }
    }

    /// From planar (CHW) values, as PyTorch tensors are laid out.
    pub fn from_chw(chw: &[f32], c: usize, h: usize, w: usize) -> Act {
        let mut data = vec![0f32; c * h * w];
        for ch in 0..c {
            for i in 0..h * w {
                data[i * c + ch] = chw[ch * h * w + i];
            }
        }
        Act { h, w, c, data }
    }

    pub fn pixels(&self) -> usize {
        self.h * self.w
    }
}

/// Inference batch norm as an affine map per channel: y = x · scale + shift, with
/// scale = γ / √(var + ε) and shift = β − mean · scale (as PyTorch's CPU kernel folds it).
#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub scale: Vec<f32>,
    pub shift: Vec<f32>,
}

impl BatchNorm {
    pub fn new(gamma: &[f32], beta: &[f32], mean: &[f32], var: &[f32], eps: f64) -> BatchNorm {
        let (scale, shift) = BatchNormParams::fold(gamma, beta, mean, var, eps);
        BatchNorm { scale, shift }
    }
}

/// A 2-D convolution with optional bias and fused ReLU. Weights are repacked once from PyTorch's
/// (out, in, kh, kw) to a (kh·kw·in) × out matrix whose row order matches the im2col columns.
#[derive(Clone, Debug)]
pub struct Conv {
    pub cout: usize,
    pub cin: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub pad: (usize, usize),
    w: Vec<f32>,
    bias: Option<Vec<f32>>,
    pub relu: bool,
}

impl Conv {
    pub fn new(torch_w: &[f32], shape: [usize; 4], stride: (usize, usize), pad: (usize, usize)) -> Conv {
        let [cout, cin, kh, kw] = shape;
        assert_eq!(torch_w.len(), cout * cin * kh * kw);
        let mut w = vec![0f32; cout * cin * kh * kw];
        for o in 0..cout {
            for i in 0..cin {
                for y in 0..kh {
                    for x in 0..kw {
                        w[((y * kw + x) * cin + i) * cout + o] = torch_w[((o * cin + i) * kh + y) * kw + x];
                    }
                }
            }
        }
        Conv { cout, cin, kh, kw, stride, pad, w, bias: None, relu: false }
    }

    /// Folds a following inference batch norm into the weights and a bias (BasicConv2d: conv → BN).
    pub fn fold_bn(mut self, bn: &BatchNorm) -> Conv {
        for row in self.w.chunks_mut(self.cout) {
            for (v, s) in row.iter_mut().zip(&bn.scale) {
                *v *= s;
            }
        }
        let b = match self.bias.take() {
            Some(b) => b.iter().zip(&bn.scale).zip(&bn.shift).map(|((b, s), t)| b * s + t).collect(),
            None => bn.shift.clone(),
        };
        self.bias = Some(b);
        self
    }

    pub fn with_relu(mut self) -> Conv {
        self.relu = true;
        self
    }

    /// Output size along one axis (floor, as PyTorch); None when the input is smaller than the kernel.
    pub fn out_size(n: usize, k: usize, s: usize, p: usize) -> Option<usize> {
        (n + 2 * p).checked_sub(k).map(|v| v / s + 1)
    }

    pub fn forward(&self, x: &Act) -> Act {
        assert_eq!(x.c, self.cin, "conv input channels");
        let (sh, sw) = self.stride;
        let (ph, pw) = self.pad;
        let oh = Conv::out_size(x.h, self.kh, sh, ph).expect("input smaller than the kernel");
        let ow = Conv::out_size(x.w, self.kw, sw, pw).expect("input smaller than the kernel");
        let rows = oh * ow;
        let k = self.kh * self.kw * self.cin;
        let pointwise = self.kh == 1 && self.kw == 1 && self.stride == (1, 1) && self.pad == (0, 0);
        let cols_buf;
        let cols: &[f32] = if pointwise {
            &x.data
        } else {
            let mut cols = vec![0f32; rows * k];
            cols.par_chunks_mut(k).enumerate().for_each(|(r, col)| {
                let (oy, ox) = (r / ow, r % ow);
                for ky in 0..self.kh {
                    let iy = (oy * sh + ky) as isize - ph as isize;
                    for kx in 0..self.kw {
                        let ix = (ox * sw + kx) as isize - pw as isize;
                        let dst = &mut col[(ky * self.kw + kx) * self.cin..][..self.cin];
                        if iy >= 0 && (iy as usize) < x.h && ix >= 0 && (ix as usize) < x.w {
                            let src = ((iy as usize) * x.w + ix as usize) * x.c;
                            dst.copy_from_slice(&x.data[src..src + self.cin]);
                        } // else stays zero (zero padding)
                    }
                }
            });
            cols_buf = cols;
            &cols_buf
        };
        let mut out = vec![0f32; rows * self.cout];
        sgemm_par(
            rows,
            k,
            self.cout,
            Mat { data: cols, row_stride: k, col_stride: 1 },
            Mat { data: &self.w, row_stride: self.cout, col_stride: 1 },
            &mut out,
            0.0,
        );
        if self.bias.is_some() || self.relu {
            let zero = vec![0f32; self.cout];
            let bias = self.bias.as_deref().unwrap_or(&zero);
            out.par_chunks_mut(self.cout).for_each(|row| {
                for (v, b) in row.iter_mut().zip(bias) {
                    *v += b;
                    if self.relu {
                        *v = v.max(0.0);
                    }
                }
            });
        }
        Act::new(oh, ow, self.cout, out)
    }
}

/// Max pooling (padding acts as −∞, floor mode), as `F.max_pool2d`.
pub fn max_pool(x: &Act, k: usize, s: usize, p: usize) -> Act {
    let oh = Conv::out_size(x.h, k, s, p).expect("input smaller than the pooling window");
    let ow = Conv::out_size(x.w, k, s, p).expect("input smaller than the pooling window");
    let mut out = vec![f32::NEG_INFINITY; oh * ow * x.c];
    out.par_chunks_mut(x.c).enumerate().for_each(|(r, o)| {
        let (oy, ox) = (r / ow, r % ow);
        for ky in 0..k {
            let iy = (oy * s + ky) as isize - p as isize;
            if iy < 0 || iy as usize >= x.h {
                continue;
            }
            for kx in 0..k {
                let ix = (ox * s + kx) as isize - p as isize;
                if ix < 0 || ix as usize >= x.w {
                    continue;
                }
                let src = &x.data[((iy as usize) * x.w + ix as usize) * x.c..][..x.c];
                for (a, b) in o.iter_mut().zip(src) {
                    if *b > *a || b.is_nan() {
                        *a = *b;
                    }
                }
            }
        }
    });
    Act::new(oh, ow, x.c, out)
}

/// 3×3 average pooling, stride 1, padding 1, `count_include_pad=False`: the patch pytorch-fid's
/// FIDInception blocks apply (TensorFlow's average pool ignores the padded zeros).
pub fn avg_pool3_exclude_pad(x: &Act) -> Act {
    let (h, w, c) = (x.h, x.w, x.c);
    let mut out = vec![0f32; h * w * c];
    out.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
        let (oy, ox) = (r / w, r % w);
        let (y0, y1) = (oy.saturating_sub(1), (oy + 1).min(h - 1));
        let (x0, x1) = (ox.saturating_sub(1), (ox + 1).min(w - 1));
        for yy in y0..=y1 {
            for xx in x0..=x1 {
                let src = &x.data[(yy * w + xx) * c..][..c];
                o.iter_mut().zip(src).for_each(|(a, b)| *a += b);
            }
        }
        let n = ((y1 - y0 + 1) * (x1 - x0 + 1)) as f32;
        o.iter_mut().for_each(|a| *a /= n);
    });
    Act::new(h, w, c, out)
}

/// Global average pooling (`adaptive_avg_pool2d(x, 1)`), accumulated in f64.
pub fn global_avg(x: &Act, relu: bool) -> Vec<f32> {
    let mut acc = vec![0f64; x.c];
    for px in x.data.chunks_exact(x.c) {
        for (a, v) in acc.iter_mut().zip(px) {
            *a += if relu { v.max(0.0) } else { *v } as f64;
        }
    }
    let n = x.pixels() as f64;
    acc.iter().map(|a| (a / n) as f32).collect()
}

/// Concatenation along channels (`torch.cat(.., 1)` in NCHW).
pub fn concat(parts: &[&Act]) -> Act {
    let (h, w) = (parts[0].h, parts[0].w);
    assert!(parts.iter().all(|p| p.h == h && p.w == w), "concat of different spatial sizes");
    let c: usize = parts.iter().map(|p| p.c).sum();
    let mut out = vec![0f32; h * w * c];
    out.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
        let mut off = 0;
        for p in parts {
            o[off..off + p.c].copy_from_slice(&p.data[r * p.c..(r + 1) * p.c]);
            off += p.c;
        }
    });
    Act::new(h, w, c, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_matches_direct_loop() {
        let mut r = crate::rng::splitmix::SplitMix64::new(5);
        let (cin, cout, h, w, kh, kw) = (3, 4, 7, 6, 3, 2);
        let x: Vec<f32> = (0..h * w * cin).map(|_| r.next_normal()).collect();
        let wt: Vec<f32> = (0..cout * cin * kh * kw).map(|_| r.next_normal()).collect();
        let conv = Conv::new(&wt, [cout, cin, kh, kw], (2, 1), (1, 0));
        let y = conv.forward(&Act::new(h, w, cin, x.clone()));
        for oy in 0..y.h {
            for ox in 0..y.w {
                for o in 0..cout {
                    let mut acc = 0f32;
                    for i in 0..cin {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * 2 + ky) as isize - 1;
                                let ix = (ox + kx) as isize;
                                if iy >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    acc += x[((iy as usize) * w + ix as usize) * cin + i]
                                        * wt[((o * cin + i) * kh + ky) * kw + kx];
                                }
                            }
                        }
                    }
                    let got = y.data[(oy * y.w + ox) * cout + o];
                    assert!((got - acc).abs() < 1e-5, "({oy},{ox},{o}): {got} vs {acc}");
                }
            }
        }
        assert_eq!((y.h, y.w), (4, 5));
    }
}

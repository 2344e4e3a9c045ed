//! Pooling on the GPU (ops/pool.rs; kernels/pool.cu): one thread per output element (forward) or
//! input element (backward), sums accumulated in f64 in the CPU reference's order.

use super::launch::*;
use super::{nonempty_i32, to_i32, CudaBackend};
use crate::backend::PoolOps;
use crate::ops::pool::{Pool2dParams, PoolMode};
use crate::ops::Window2d;
use crate::tensor::Tensor;
use anyhow::Result;

/// A window's geometry as the kernels take it: h, w, out_h, out_w, kernel h and w, stride, and the
/// top and left padding (the bottom and right are implied by the output size). The callers have
/// checked the sizes fit an i32.
pub(super) fn window_args(win: &Window2d) -> [i32; 9] {
    let [kh, kw] = win.kernel;
    [win.h, win.w, win.out_h(), win.out_w(), kh, kw, win.stride, win.pad[0], win.pad[2]].map(|v| v as i32)
}

/// The kernels' mode argument.
fn mode_arg(mode: PoolMode) -> i32 {
    match mode {
        PoolMode::Max => 0,
        PoolMode::Avg => 1,
        PoolMode::AvgExcludePad => 2,
    }
}

impl PoolOps for CudaBackend {
    fn pool2d_forward(&self, p: &Pool2dParams, out: &Tensor, inp: &Tensor) -> Result<()> {
        p.check_forward(out, inp)?;
        to_i32("pool2d inp", p.in_elements())?;
        let Some(_) = nonempty_i32("pool2d", p.out_elements())? else { return Ok(()) };
        let mode = mode_arg(p.mode);
        let [h, w, oh, ow, kh, kw, stride, pt, pl] = window_args(&p.window);
        let (out, inp, batch, c) = (self.dptr(out), self.dptr(inp), p.batch as i32, p.channels as i32);
        let k = Pool2dFwd { out, inp, batch, h, w, c, oh, ow, kh, kw, stride, pt, pl, mode };
        self.ops_launch1(p.out_elements(), k)
    }

    fn pool2d_backward(&self, p: &Pool2dParams, dinp: &Tensor, dout: &Tensor, inp: &Tensor) -> Result<()> {
        p.check_backward(dinp, dout, inp)?;
        to_i32("pool2d dout", p.out_elements())?;
        let Some(_) = nonempty_i32("pool2d backward", p.in_elements())? else { return Ok(()) };
        let [h, w, oh, ow, kh, kw, stride, pt, pl] = window_args(&p.window);
        let (dinp, dout, inp) = (self.dptr(dinp), self.dptr(dout), self.dptr(inp));
        let (batch, c, mode) = (p.batch as i32, p.channels as i32, mode_arg(p.mode));
        let k = Pool2dBwd { dinp, dout, inp, batch, h, w, c, oh, ow, kh, kw, stride, pt, pl, mode };
        self.ops_launch1(p.in_elements(), k)
    }
}

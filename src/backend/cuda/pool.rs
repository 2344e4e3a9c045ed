//! Pooling on the GPU (ops/pool.rs; kernels/pool.cu): one thread per output element, averages
//! accumulated in f64 in the CPU reference's order.

use super::launch::*;
use super::{nonempty_i32, to_i32, CudaBackend};
use crate::backend::PoolOps;
use crate::ops::pool::{Pool2dParams, PoolMode};
use crate::tensor::Tensor;
use anyhow::Result;

impl PoolOps for CudaBackend {
    fn pool2d_forward(&self, p: &Pool2dParams, out: &Tensor, inp: &Tensor) -> Result<()> {
        p.check_forward(out, inp)?;
        to_i32("pool2d inp", p.in_elements())?;
        let Some(_) = nonempty_i32("pool2d", p.out_elements())? else { return Ok(()) };
        let i = |v: usize| v as i32;
        let mode = match p.mode {
            PoolMode::Max => 0,
            PoolMode::Avg => 1,
            PoolMode::AvgExcludePad => 2,
        };
        let k = Pool2dFwd {
            out: self.dptr(out),
            inp: self.dptr(inp),
            batch: i(p.batch),
            h: i(p.h),
            w: i(p.w),
            c: i(p.channels),
            oh: i(p.out_h()),
            ow: i(p.out_w()),
            kh: i(p.kernel_h),
            kw: i(p.kernel_w),
            stride: i(p.stride),
            pad: i(p.pad),
            mode,
        };
        self.ops_launch1(p.out_elements(), k)
    }
}

//! Linear layers on the GPU (ops/linear.rs): the product through cuBLASLt with the bias fused (its
//! BIAS epilogue), cuBLAS where cuBLASLt declines; kernels/linear.cu fills the bias when cuBLAS
//! runs the product and sums the bias gradient.

use super::device::Gemm;
use super::launch::*;
use super::{CudaBackend, LIN_BLOCK};
use crate::backend::LinearOps;
use crate::ops::linear::{LinearBackward, LinearForward, LinearParams};
use anyhow::Result;

impl LinearOps for CudaBackend {
    /// out (rows, out_f) = inp · Wᵀ + bias. Row-major X (rows×in) is column-major Xᵀ; so
    /// outᵀ (out_f×rows, col-major) = op_T(W as col-major in×out) · Xᵀ.
    fn linear_forward(&self, p: &LinearParams, t: &LinearForward) -> Result<()> {
        p.check_forward(t)?;
        let LinearParams { rows, in_features: in_f, out_features: out_f } = *p;
        let LinearForward { out, inp, weight, bias } = *t;
        let product = Gemm {
            ta: true,
            m: out_f,
            n: rows,
            k: in_f,
            a: self.dptr(weight),
            lda: in_f,
            b: self.dptr(inp),
            ldb: in_f,
            c: self.dptr(out),
            ldc: out_f,
            ..Gemm::UNIT
        };
        // cuBLASLt with the bias fused (BIAS epilogue: one bias value per output feature).
        if self.lt_gemm(&product, bias.map(|b| self.dptr(b)))? {
            return Ok(());
        }
        // cuBLAS: the bias is filled first and the product accumulated onto it (beta 1).
        let beta = match bias {
            Some(b) => {
                let n = rows * out_f;
                // The kernel is grid-stride: cap the grid (a `n as u32` could wrap to an empty grid).
                self.launch(
                    LinearBiasFill { out: self.dptr(out), bias: self.dptr(b), rows: rows as i32, cols: out_f as i32 },
                    (n.div_ceil(LIN_BLOCK as usize).clamp(1, 65535) as u32, 1, 1),
                    (LIN_BLOCK, 1, 1),
                    0,
                )?;
                1.0
            }
            None => 0.0,
        };
        self.gemm(Gemm { beta, ..product })
    }

    /// dinp += dout · W; dweight += doutᵀ · inp; dbias += Σ_rows dout (column-major views as in
    /// `linear_forward`).
    fn linear_backward(&self, p: &LinearParams, t: &LinearBackward) -> Result<()> {
        p.check_backward(t)?;
        let LinearParams { rows, in_features: in_f, out_features: out_f } = *p;
        let LinearBackward { dinp, dweight, dbias, dout, inp, weight } = *t;
        if let Some(di) = dinp {
            // dinpᵀ (in×rows) += Wᵀ(col-major view of W: in×out) · doutᵀ (out×rows)
            self.linear_gemm(Gemm {
                m: in_f,
                n: rows,
                k: out_f,
                a: self.dptr(weight),
                lda: in_f,
                b: self.dptr(dout),
                ldb: out_f,
                beta: 1.0,
                c: self.dptr(di),
                ldc: in_f,
                ..Gemm::UNIT
            })?;
        }
        // dWᵀ (in×out, col-major) += Xᵀ (in×rows) · dout (rows×out) = Xᵀ · op_T(doutᵀ)
        self.linear_gemm(Gemm {
            tb: true,
            m: in_f,
            n: out_f,
            k: rows,
            a: self.dptr(inp),
            lda: in_f,
            b: self.dptr(dout),
            ldb: out_f,
            beta: 1.0,
            c: self.dptr(dweight),
            ldc: in_f,
            ..Gemm::UNIT
        })?;
        if let Some(db) = dbias {
            self.launch(
                LinearBiasGrad { dbias: self.dptr(db), dout: self.dptr(dout), rows: rows as i32, cols: out_f as i32 },
                ((out_f as u32).div_ceil(32), 1, 1),
                (32, 8, 1),
                0,
            )?;
        }
        Ok(())
    }
}

//! Linear layers on the GPU (ops/linear.rs): the product through cuBLASLt with the bias fused (its
//! BIAS epilogue) and a residual as its C, cuBLAS where cuBLASLt declines; kernels/linear.cu fills the bias when cuBLAS
//! runs the product and sums the bias gradient.

use super::device::{Gemm, LtBatch};
use super::launch::*;
use super::lt::LtExtras;
use super::{CudaBackend, LIN_BLOCK};
use crate::backend::{ElementwiseOps, LinearOps};
use crate::ops::linear::{LinearBackward, LinearForward, LinearGroupBackward, LinearGroupForward, LinearParams};
use crate::tensor::Tensor;
use anyhow::Result;

impl LinearOps for CudaBackend {
    /// out (rows, out_f) = inp · Wᵀ + bias (+ residual).
    fn linear_forward(&self, p: &LinearParams, t: &LinearForward) -> Result<()> {
        p.check_forward(t)?;
        let LinearParams { rows, out_features: out_f, .. } = *p;
        let LinearForward { out, inp, weight, bias, residual } = *t;
        let product = self.forward_product(p, out, inp, weight);
        // cuBLASLt with the bias fused (BIAS epilogue: one bias value per output feature) and the
        // residual as its C (beta 1), the product written beside it into `out` (its D).
        let fused = match residual {
            Some(r) => Gemm { beta: 1.0, c: self.dptr(r), ..product },
            None => product,
        };
        let extras =
            LtExtras { bias: bias.map(|b| self.dptr(b)), d: residual.map(|_| self.dptr(out)), ..LtExtras::NONE };
        if self.lt_gemm(&fused, extras)? {
            return Ok(());
        }
        // cuBLAS: the bias is filled first and the product accumulated onto it (beta 1), then the
        // residual added (the order of the CPU reference's sums).
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
        self.gemm(Gemm { beta, ..product })?;
        match residual {
            Some(r) => self.accumulate(out, r, rows * out_f),
            None => Ok(()),
        }
    }

    /// The group's products as one strided batch through cuBLASLt (product g: weight block g,
    /// the shared input, output block g), so that a U-Net attention's q, k and v are one launch;
    /// one `linear_forward` per layer where cuBLASLt declines.
    fn linear_group_forward(&self, p: &LinearParams, group: usize, t: &LinearGroupForward) -> Result<()> {
        p.check_group_forward(group, t)?;
        let LinearParams { rows, in_features: in_f, out_features: out_f } = *p;
        let product = self.forward_product(p, t.out, t.inp, t.weight);
        let batch = LtBatch { count: group, stride_a: out_f * in_f, stride_b: 0, stride_c: rows * out_f };
        if self.lt_gemm(&product, LtExtras { batch, ..LtExtras::NONE })? {
            return Ok(());
        }
        p.group_forward_each(self, group, t)
    }

    /// dinp += Σ_g dout_g · W_g, one accumulating product per layer in the group's order (they
    /// share their output); the weight gradients in one strided batch (product g: the shared
    /// input, dout block g, dweight block g), per layer where cuBLASLt declines.
    fn linear_group_backward(&self, p: &LinearParams, group: usize, t: &LinearGroupBackward) -> Result<()> {
        p.check_group_backward(group, t)?;
        let LinearParams { rows, in_features: in_f, out_features: out_f } = *p;
        if let Some(di) = t.dinp {
            for g in 0..group {
                let (dout, weight) = (p.group_out(g, t.dout), p.group_weight(g, t.weight));
                self.linear_gemm(self.input_grad_product(p, di, &dout, &weight))?;
            }
        }
        let product = self.weight_grad_product(p, t.dweight, t.dout, t.inp);
        let batch = LtBatch { count: group, stride_a: 0, stride_b: rows * out_f, stride_c: out_f * in_f };
        if self.lt_gemm(&product, LtExtras { batch, ..LtExtras::NONE })? {
            return Ok(());
        }
        for g in 0..group {
            let (dout, dweight) = (p.group_out(g, t.dout), p.group_weight(g, t.dweight));
            self.linear_gemm(self.weight_grad_product(p, &dweight, &dout, t.inp))?;
        }
        Ok(())
    }

    /// dinp += dout · W; dweight += doutᵀ · inp; dbias += Σ_rows dout (column-major views as in
    /// `linear_forward`).
    fn linear_backward(&self, p: &LinearParams, t: &LinearBackward) -> Result<()> {
        p.check_backward(t)?;
        let LinearParams { rows, out_features: out_f, .. } = *p;
        let LinearBackward { dinp, dweight, dbias, dout, inp, weight } = *t;
        if let Some(di) = dinp {
            self.linear_gemm(self.input_grad_product(p, di, dout, weight))?;
        }
        self.linear_gemm(self.weight_grad_product(p, dweight, dout, inp))?;
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

impl CudaBackend {
    /// dinpᵀ (in×rows) += Wᵀ (col-major view of W: in×out) · doutᵀ (out×rows).
    fn input_grad_product(&self, p: &LinearParams, dinp: &Tensor, dout: &Tensor, weight: &Tensor) -> Gemm {
        let LinearParams { rows, in_features: in_f, out_features: out_f } = *p;
        Gemm {
            m: in_f,
            n: rows,
            k: out_f,
            a: self.dptr(weight),
            lda: in_f,
            b: self.dptr(dout),
            ldb: out_f,
            beta: 1.0,
            c: self.dptr(dinp),
            ldc: in_f,
            ..Gemm::UNIT
        }
    }

    /// dWᵀ (in×out, col-major) += Xᵀ (in×rows) · dout (rows×out) = Xᵀ · op_T(doutᵀ).
    fn weight_grad_product(&self, p: &LinearParams, dweight: &Tensor, dout: &Tensor, inp: &Tensor) -> Gemm {
        let LinearParams { rows, in_features: in_f, out_features: out_f } = *p;
        Gemm {
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
        }
    }

    /// out (rows, out_f) = inp · Wᵀ as a column-major product: row-major X (rows×in) is
    /// column-major Xᵀ, so outᵀ (out_f×rows) = op_T(W as col-major in×out) · Xᵀ.
    fn forward_product(&self, p: &LinearParams, out: &Tensor, inp: &Tensor, weight: &Tensor) -> Gemm {
        let LinearParams { rows, in_features: in_f, out_features: out_f } = *p;
        Gemm {
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
        }
    }
}

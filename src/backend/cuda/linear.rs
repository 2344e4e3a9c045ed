//! Linear layers on the GPU (ops/linear.rs): the product through cuBLASLt with the bias fused (its
//! BIAS epilogue) and a residual as its C, cuBLAS where cuBLASLt declines; kernels/linear.cu fills the bias when cuBLAS
//! runs the product and sums the bias gradient.

use super::device::{Gemm, GemmTypes, LtBatch};
use super::launch::*;
use super::lt::LtExtras;
use super::{CudaBackend, LIN_BLOCK};
use crate::backend::{ElementwiseOps, LinearOps};
use crate::ops::activation_dtype;
use crate::ops::linear::{LinearBackward, LinearForward, LinearGroupBackward, LinearGroupForward, LinearParams};
use crate::tensor::{DType, Tensor};
use anyhow::Result;

/// Workspace slots of the bf16 copies `weight_operand` makes of a weight and a bias outside a
/// parameter pool (nothing else holds a slot across a linear call).
const WS_WEIGHT: usize = 0;
const WS_BIAS: usize = 1;

impl LinearOps for CudaBackend {
    /// out (rows, out_f) = inp · Wᵀ + bias (+ residual).
    ///
    /// Beside bf16 activations (inp, out and the residual bf16) the product reads the weight's and
    /// the bias's bf16 copies and writes bf16: A, B, C and D all bf16, accumulated in f32.
    fn linear_forward(&self, p: &LinearParams, t: &LinearForward) -> Result<()> {
        p.check_forward(t)?;
        let LinearParams { rows, out_features: out_f, .. } = *p;
        let LinearForward { out, inp, weight, bias, residual } = *t;
        let mut acts = vec![("out", out), ("inp", inp)];
        acts.extend(residual.map(|r| ("residual", r)));
        let dt = activation_dtype("linear", &acts)?;
        let product = self.forward_product(p, out, inp, self.weight_operand(weight, dt, WS_WEIGHT)?);
        // cuBLASLt with the bias fused (BIAS epilogue: one bias value per output feature, of D's
        // type) and the residual as its C (beta 1), the product written beside it into `out` (its D).
        let fused = match residual {
            Some(r) => Gemm { beta: 1.0, c: self.act_ptr(r), ..product },
            None => product,
        };
        let lt_bias = match bias {
            Some(b) => Some(self.weight_operand(b, dt, WS_BIAS)?.0),
            None => None,
        };
        let extras = LtExtras { bias: lt_bias, d: residual.map(|_| self.act_ptr(out)), ..LtExtras::NONE };
        if self.lt_gemm(&fused, extras)? {
            return Ok(());
        }
        // cuBLAS: the bias is filled first and the product accumulated onto it (beta 1), then the
        // residual added (the order of the CPU reference's sums).
        let beta = match bias {
            Some(b) => {
                let n = rows * out_f;
                // The kernel is grid-stride: cap the grid (a `n as u32` could wrap to an empty grid).
                self.launch_act::<_, LinearBiasFillBf16>(
                    dt,
                    LinearBiasFill {
                        out: self.act_ptr(out),
                        bias: self.dptr(b),
                        rows: rows as i32,
                        cols: out_f as i32,
                    },
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
        let dt = activation_dtype("linear group", &[("out", t.out), ("inp", t.inp)])?;
        let product = self.forward_product(p, t.out, t.inp, self.weight_operand(t.weight, dt, WS_WEIGHT)?);
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
    /// column-major Xᵀ, so outᵀ (out_f×rows) = op_T(W as col-major in×out) · Xᵀ. `weight`: the
    /// weight's address and the product's types (`weight_operand`).
    fn forward_product(&self, p: &LinearParams, out: &Tensor, inp: &Tensor, weight: (u64, GemmTypes)) -> Gemm {
        let LinearParams { rows, in_features: in_f, out_features: out_f } = *p;
        Gemm {
            ta: true,
            m: out_f,
            n: rows,
            k: in_f,
            a: weight.0,
            lda: in_f,
            b: self.act_ptr(inp),
            ldb: in_f,
            c: self.act_ptr(out),
            ldc: out_f,
            types: weight.1,
            ..Gemm::UNIT
        }
    }

    /// Where a product beside activations of type `dt` reads parameter `t` (a weight or a bias),
    /// and the product's types (all f32, or all bf16: cuBLAS pairs A's type with B's, and
    /// cuBLASLt's bias has D's). Beside bf16 activations: the parameter pool's bf16 copy
    /// (params.rs) or, for a parameter in a pool without one, a copy rounded into workspace
    /// `slot` for this call.
    fn weight_operand(&self, t: &Tensor, dt: DType, slot: usize) -> Result<(u64, GemmTypes)> {
        if dt != DType::BF16 {
            return Ok((self.dptr(t), GemmTypes::F32));
        }
        let bf16 = GemmTypes { a: DType::BF16, b: DType::BF16, c: DType::BF16 };
        if let Some(copy) = self.param_bf16(t)? {
            return Ok((copy, bf16));
        }
        let n = t.numel();
        let ws = self.workspace(slot, n.div_ceil(2))?;
        let ni = super::to_i32("bf16 copy of a linear parameter", n)?;
        self.launch(
            EwToBf16 { out: ws, r#in: self.dptr(t), n: ni },
            (n.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
            (256, 1, 1),
            0,
        )?;
        Ok((ws, bf16))
    }
}

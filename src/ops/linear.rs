//! Linear layers (`torch.nn.Linear`: out = inp · weightᵀ + bias, weight (out_features,
//! in_features)). On CUDA the product is cuBLASLt's, the bias fused; kernels/linear.cu holds the
//! bias fill and the bias gradient.

use crate::backend::cpu::gemm::{self, Mat, PackedB};
use crate::backend::{check_disjoint, check_len};
use crate::tensor::Tensor;
use anyhow::Result;
use rayon::prelude::*;

/// One linear layer over `rows` vectors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearParams {
    pub rows: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// A linear layer's forward tensors: `out` (rows, out_features), `inp` (rows, in_features),
/// `weight` (out_features, in_features), `bias` (out_features), if any, and `residual` (shaped as
/// `out`), if any, added after the bias: out = (inp · weightᵀ + bias) + residual, what a separate
/// `add_forward` of the layer's output and the residual computes, without its launch and the
/// extra map (a transformer's attention projection, feed-forward output and proj_out).
pub struct LinearForward<'a> {
    pub out: &'a Tensor,
    pub inp: &'a Tensor,
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub residual: Option<&'a Tensor>,
}

/// The tensors of its backward call: the gradients (accumulated into; `dinp` and `dbias` only when
/// wanted), `dout`, and the forward's input and weight.
pub struct WeightedBackward<'a> {
    pub dinp: Option<&'a Tensor>,
    pub dweight: &'a Tensor,
    pub dbias: Option<&'a Tensor>,
    pub dout: &'a Tensor,
    pub inp: &'a Tensor,
    pub weight: &'a Tensor,
}

/// The tensors of `group` linear layers of one shape, without biases, applied to one input:
/// `out` (group, rows, out_features), each layer's output a contiguous block; `inp` (rows,
/// in_features); `weight` (group · out_features, in_features), the layers' weights back to back,
/// as a U-Net attention's to_q, to_k and to_v lie in its parameters.
pub struct LinearGroupForward<'a> {
    pub out: &'a Tensor,
    pub inp: &'a Tensor,
    pub weight: &'a Tensor,
}

/// The backward tensors of a group forward (shapes as [`LinearGroupForward`]): `dinp` (if wanted)
/// += Σ_g dout_g · W_g, in the order of the group; `dweight` (group · out_features, in_features)
/// += dout_gᵀ · inp, block by block; `dout` (group, rows, out_features).
pub struct LinearGroupBackward<'a> {
    pub dinp: Option<&'a Tensor>,
    pub dweight: &'a Tensor,
    pub dout: &'a Tensor,
    pub inp: &'a Tensor,
    pub weight: &'a Tensor,
}

/// A linear layer's backward tensors (shapes as [`LinearForward`]).
pub type LinearBackward<'a> = WeightedBackward<'a>;

impl LinearParams {
    /// Multiply-adds ×2 of the forward product (each backward product is one more).
    pub fn flops(&self) -> usize {
        2 * self.rows * self.in_features * self.out_features
    }

    /// What every backend checks before a forward: the tensors' lengths, and the output overlaps
    /// no input.
    pub fn check_forward(&self, t: &LinearForward) -> Result<()> {
        let LinearParams { rows, in_features: i, out_features: o } = *self;
        check_len("linear out", t.out, rows * o)?;
        check_len("linear inp", t.inp, rows * i)?;
        check_len("linear weight", t.weight, o * i)?;
        if let Some(b) = t.bias {
            check_len("linear bias", b, o)?;
        }
        if let Some(r) = t.residual {
            check_len("linear residual", r, rows * o)?;
        }
        let ins: Vec<&Tensor> = [t.inp, t.weight].into_iter().chain(t.bias).chain(t.residual).collect();
        check_disjoint("linear", &[t.out], &ins)
    }

    /// What every backend checks before a group forward: the lengths for `group` layers, and
    /// the output overlaps no input.
    pub fn check_group_forward(&self, group: usize, t: &LinearGroupForward) -> Result<()> {
        let LinearParams { rows, in_features: i, out_features: o } = *self;
        check_len("linear group out", t.out, group * rows * o)?;
        check_len("linear group inp", t.inp, rows * i)?;
        check_len("linear group weight", t.weight, group * o * i)?;
        check_disjoint("linear group", &[t.out], &[t.inp, t.weight])
    }

    /// Layer `g`'s block of a group's output (or output gradient): (rows, out_features).
    pub fn group_out(&self, g: usize, out: &Tensor) -> Tensor {
        let LinearParams { rows, out_features: o, .. } = *self;
        Tensor { offset: out.offset + g * rows * o, shape: [rows, o].into(), ..*out }
    }

    /// Layer `g`'s block of a group's weight (or weight gradient): (out_features, in_features).
    pub fn group_weight(&self, g: usize, weight: &Tensor) -> Tensor {
        let LinearParams { in_features: i, out_features: o, .. } = *self;
        Tensor { offset: weight.offset + g * o * i, shape: [o, i].into(), ..*weight }
    }

    /// What every backend checks before a group backward.
    pub fn check_group_backward(&self, group: usize, t: &LinearGroupBackward) -> Result<()> {
        let LinearParams { rows, in_features: i, out_features: o } = *self;
        check_len("linear group backward dout", t.dout, group * rows * o)?;
        check_len("linear group backward inp", t.inp, rows * i)?;
        check_len("linear group backward weight", t.weight, group * o * i)?;
        check_len("linear group backward dweight", t.dweight, group * o * i)?;
        if let Some(di) = t.dinp {
            check_len("linear group backward dinp", di, rows * i)?;
        }
        let outs: Vec<&Tensor> = std::iter::once(t.dweight).chain(t.dinp).collect();
        check_disjoint("linear group backward", &outs, &[t.dout, t.inp, t.weight])
    }

    /// A group backward as one `linear_backward` per layer, in the group's order.
    pub fn group_backward_each(
        &self,
        b: &(impl LinearOps + ?Sized),
        group: usize,
        t: &LinearGroupBackward,
    ) -> Result<()> {
        self.check_group_backward(group, t)?;
        for g in 0..group {
            let (dout, weight, dweight) =
                (self.group_out(g, t.dout), self.group_weight(g, t.weight), self.group_weight(g, t.dweight));
            let one = LinearBackward {
                dinp: t.dinp,
                dweight: &dweight,
                dbias: None,
                dout: &dout,
                inp: t.inp,
                weight: &weight,
            };
            b.linear_backward(self, &one)?;
        }
        Ok(())
    }

    /// A group forward as one `linear_forward` per layer (the CPU's, and CUDA's where one batched
    /// product cannot run).
    pub fn group_forward_each(
        &self,
        b: &(impl LinearOps + ?Sized),
        group: usize,
        t: &LinearGroupForward,
    ) -> Result<()> {
        self.check_group_forward(group, t)?;
        for g in 0..group {
            let (out, weight) = (self.group_out(g, t.out), self.group_weight(g, t.weight));
            b.linear_forward(
                self,
                &LinearForward { out: &out, inp: t.inp, weight: &weight, bias: None, residual: None },
            )?;
        }
        Ok(())
    }

    /// What every backend checks before a backward: no gradient may alias another or an input.
    pub fn check_backward(&self, t: &LinearBackward) -> Result<()> {
        let LinearParams { rows, in_features: i, out_features: o } = *self;
        check_len("linear_backward dout", t.dout, rows * o)?;
        check_len("linear_backward inp", t.inp, rows * i)?;
        check_len("linear_backward weight", t.weight, o * i)?;
        check_len("linear_backward dweight", t.dweight, o * i)?;
        if let Some(di) = t.dinp {
            check_len("linear_backward dinp", di, rows * i)?;
        }
        if let Some(db) = t.dbias {
            check_len("linear_backward dbias", db, o)?;
        }
        let outs: Vec<&Tensor> = std::iter::once(t.dweight).chain(t.dinp).chain(t.dbias).collect();
        check_disjoint("linear_backward", &outs, &[t.dout, t.inp, t.weight])
    }

    /// The CPU reference of the forward, on checked slices: the bias as the GEMM's starting value,
    /// then out += inp · wᵀ, with wᵀ (in_features × out_features) packed by the caller, then
    /// out += residual (a pass of its own, so that the sum is the unfused add's to the bit).
    pub fn cpu_forward(&self, out: &mut [f32], x: &[f32], w: &PackedB, bias: Option<&[f32]>, residual: Option<&[f32]>) {
        let LinearParams { rows, in_features: i, out_features: o } = *self;
        assert_eq!(w.shape(), (i, o), "linear weight packed for another shape");
        let out = &mut out[..rows * o];
        match bias {
            Some(b) => out.par_chunks_mut(o).for_each(|row| row.copy_from_slice(&b[..o])),
            None => out.fill(0.0),
        }
        let xm = Mat { data: x, row_stride: i, col_stride: 1 };
        gemm::sgemm_packed(rows, xm, w, out, 1.0, true);
        if let Some(r) = residual {
            out.par_iter_mut().zip(&r[..rows * o]).for_each(|(y, r)| *y += r);
        }
    }

    /// The CPU reference of the backward, on checked slices (accumulated into): dinp += dout · W;
    /// dweight += doutᵀ · inp; dbias += Σ_rows dout.
    pub fn cpu_backward(
        &self,
        dinp: Option<&mut [f32]>,
        dweight: &mut [f32],
        dbias: Option<&mut [f32]>,
        [dout, inp, weight]: [&[f32]; 3],
    ) {
        let LinearParams { rows, in_features: i, out_features: o } = *self;
        if let Some(di) = dinp {
            let a = Mat { data: dout, row_stride: o, col_stride: 1 };
            let b = Mat { data: weight, row_stride: i, col_stride: 1 };
            gemm::sgemm_par(rows, o, i, a, b, &mut di[..rows * i], 1.0);
        }
        let a = Mat { data: dout, row_stride: 1, col_stride: o }; // doutᵀ (out × rows)
        let b = Mat { data: inp, row_stride: i, col_stride: 1 };
        gemm::sgemm_par(o, rows, i, a, b, &mut dweight[..o * i], 1.0);
        if let Some(db) = dbias {
            column_sums_into(db, dout, rows, o);
        }
    }
}

/// db[c] += Σ_r x[r, c], in f64 (bias gradients of linear layers and convolutions).
pub(crate) fn column_sums_into(db: &mut [f32], x: &[f32], rows: usize, cols: usize) {
    db[..cols].par_iter_mut().enumerate().for_each(|(c, d)| {
        let s: f64 = (0..rows).map(|r| x[r * cols + c] as f64).sum();
        *d += s as f32;
    });
}

/// The linear layer on a backend (every backend implements it; [`Backend`](crate::backend::Backend) requires it).
pub trait LinearOps {
    /// out (rows, out_f) = inp (rows, in_f) · weightᵀ + bias, weight (out_f, in_f) as PyTorch's Linear.
    fn linear_forward(&self, p: &LinearParams, t: &LinearForward) -> Result<()>;

    /// `group` layers of one shape on one input (see [`LinearGroupForward`]): what `group` calls
    /// of `linear_forward` compute, one per layer (this default); CUDA runs one batched product.
    fn linear_group_forward(&self, p: &LinearParams, group: usize, t: &LinearGroupForward) -> Result<()> {
        p.group_forward_each(self, group, t)
    }

    /// Of `linear_group_forward` (see [`LinearGroupBackward`]): `group` calls of
    /// `linear_backward`, one per layer in order (this default); CUDA sums the weight gradients in
    /// one batched product.
    fn linear_group_backward(&self, p: &LinearParams, group: usize, t: &LinearGroupBackward) -> Result<()> {
        p.group_backward_each(self, group, t)
    }

    /// Of `linear_forward`: dinp += dout · W, dweight += doutᵀ · inp, dbias += Σ_rows dout.
    fn linear_backward(&self, p: &LinearParams, t: &LinearBackward) -> Result<()>;
}

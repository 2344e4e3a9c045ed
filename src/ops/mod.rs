//! Operations as units: norms, convolution, attention, linear, the elementwise family (resize,
//! embedding, timestep embedding, bias rows, concatenation, GEGLU, and the pointwise activations,
//! add, accumulate, scale and lerp), the training reductions and AdamW, and the random family
//! (Philox normals, DDPM noise), and pooling (the evaluation networks').
//!
//! Each operation family is one module named like its kernel file (`ops/norm.rs` ↔
//! `kernels/norm.cu`). A parameter struct per operation owns what every backend shares: the shape
//! and aliasing checks (so the CPU and CUDA backends refuse the same calls with the same
//! messages), and the CPU reference of the forward and backward. The tensors of one call travel in
//! one struct too, named by role, so a call site reads as what it passes. A backend's method for
//! the operation takes both: the CPU backend runs the reference on its memory, the CUDA backend
//! launches kernels/norm.cu with typed launches (src/backend/cuda/launch.rs; the launch code stays in
//! src/backend/cuda, by family).

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod optim;
pub mod pool;
pub mod random;

/// A window moved over a map of h × w positions (an im2col kernel, a pooling window): `kernel`
/// [height, width], `stride`, and `pad` [top, bottom, left, right]; floor mode, as PyTorch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window2d {
    pub h: usize,
    pub w: usize,
    pub kernel: [usize; 2],
    pub stride: usize,
    pub pad: [usize; 4],
}

impl Window2d {
    pub fn out_h(&self) -> usize {
        (self.h + self.pad[0] + self.pad[1] - self.kernel[0]) / self.stride + 1
    }

    pub fn out_w(&self) -> usize {
        (self.w + self.pad[2] + self.pad[3] - self.kernel[1]) / self.stride + 1
    }

    /// The window fits the padded map (`what` names the operation in the message).
    pub fn check_fits(&self, what: &str) -> anyhow::Result<()> {
        let Window2d { h, w, kernel: [kh, kw], stride, pad } = *self;
        anyhow::ensure!(
            stride >= 1 && kh >= 1 && kw >= 1 && h + pad[0] + pad[1] >= kh && w + pad[2] + pad[3] >= kw,
            "{what}: a {kh}×{kw} window (stride {stride}) does not fit {h}×{w} with padding {pad:?}"
        );
        Ok(())
    }

    /// The first map row of output row `oy`'s window, which may lie in the padding (negative).
    pub fn row0(&self, oy: usize) -> isize {
        (oy * self.stride) as isize - self.pad[0] as isize
    }

    /// The first map column of output column `ox`'s window.
    pub fn col0(&self, ox: usize) -> isize {
        (ox * self.stride) as isize - self.pad[2] as isize
    }
}

/// The element type the activations of one call share: `tensors` (role, tensor) must all be of
/// one type, f32 or bf16 (a backend computing on bf16 activations stores them so; statistics and
/// parameters stay f32 and are not passed here). Names the first that differs.
pub fn activation_dtype(op: &str, tensors: &[(&str, &crate::tensor::Tensor)]) -> anyhow::Result<crate::tensor::DType> {
    use crate::tensor::DType;
    let Some((first_role, first)) = tensors.first() else { return Ok(DType::F32) };
    anyhow::ensure!(first.dtype != DType::F16, "{op}: {first_role} is f16; activations are f32 or bf16");
    for (role, t) in &tensors[1..] {
        anyhow::ensure!(
            t.dtype == first.dtype,
            "{op}: {role} is {} but {first_role} is {}: the activations of one call share a type",
            t.dtype,
            first.dtype
        );
    }
    Ok(first.dtype)
}

/// The exact (erf) GELU, evaluated in f64.
pub(crate) fn gelu(x: f32) -> f32 {
    (0.5 * x as f64 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2))) as f32
}

/// SiLU (x · sigmoid(x)) in f32, as torch computes it on the CPU, with the vectorisable
/// exponential (within 2 ulp of libm's; inlined so that loops over it vectorise).
#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + crate::backend::cpu::vmath::exp(-x))
}

#[cfg(test)]
mod activation_dtype_tests {
    use super::activation_dtype;
    use crate::tensor::{DType, PoolId, Tensor};

    #[test]
    fn the_activations_of_one_call_share_a_type() {
        let f = Tensor::new(PoolId(0), 0, [4].into());
        let h = Tensor { dtype: DType::BF16, ..f };
        assert_eq!(activation_dtype("add", &[("out", &h), ("a", &h)]).unwrap(), DType::BF16);
        assert_eq!(activation_dtype("add", &[("out", &f), ("a", &f)]).unwrap(), DType::F32);
        let err = activation_dtype("add", &[("out", &f), ("a", &f), ("b", &h)]).unwrap_err().to_string();
        assert_eq!(err, "add: b is bf16 but out is f32: the activations of one call share a type");
        let half = Tensor { dtype: DType::F16, ..f };
        assert!(activation_dtype("add", &[("out", &half)]).is_err());
    }
}

/// What the ops' unit tests share.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::backend::{cpu::CpuBackend, Backend};
    use crate::tensor::{Shape, Tensor};

    /// A CPU backend with one pool of `len` elements, and `slot(offset, n)`: the 1-D tensor of `n`
    /// elements at `offset` in it (tests place their tensors by hand to make them overlap or fall
    /// short on purpose).
    pub fn cpu_pool(len: usize) -> (CpuBackend, impl Fn(usize, usize) -> Tensor) {
        let mut b = CpuBackend::new();
        let pool = b.alloc(len, "t").unwrap();
        (b, move |offset, n| Tensor::new(pool, offset, Shape::new(&[n])))
    }
}

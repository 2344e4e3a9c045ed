//! Operations as units (issue 15, in progress: norms, convolution, attention, linear, resize,
//! embedding, timestep embedding, bias rows, concatenation, GEGLU, AdamW and DDPM noise are here;
//! the activations, add, scale, lerp and the loss/norm reductions still live in the backends).
//!
//! Each operation family is one module named like its kernel file (`ops/norm.rs` ↔
//! `kernels/norm.cu`). A parameter struct per operation owns what every backend shares: the shape
//! and aliasing checks (so the CPU and CUDA backends refuse the same calls with the same
//! messages), and the CPU reference of the forward and backward. The tensors of one call travel in
//! one struct too, named by role, so a call site reads as what it passes. A backend's method for
//! the operation takes both: the CPU backend runs the reference on its memory, the CUDA backend
//! launches kernels/norm.cu (its launches stay in src/backend/cuda for now).

pub mod attention;
pub mod conv;
pub mod elementwise;
pub mod linear;
pub mod norm;
pub mod optim;
pub mod random;

/// The exact (erf) GELU, evaluated in f64.
pub(crate) fn gelu(x: f32) -> f32 {
    (0.5 * x as f64 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2))) as f32
}

/// SiLU (x · sigmoid(x)) in f32, as torch computes it on the CPU.
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

//! The `Backend` trait: every numeric operation the models use, one method each.
//!
//! Argument order follows llm.c: outputs first, then inputs and saved statistics, then dimensions.
//! Tensors are views into pools the backend owns (see `tensor::Layout`); an operation never
//! allocates. The CPU backend (`cpu`) is the readable f32 reference; the CUDA backend (issue 5)
//! implements the same methods with hand-written kernels.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod info;
pub mod plan;

use crate::ops::attention::{AttentionBackward, AttentionForward, AttentionParams};
use crate::ops::conv::{Conv2dBackward, Conv2dForward, Conv2dParams};
use crate::ops::elementwise::TimestepEmbeddingParams;
use crate::ops::elementwise::{BiasRowsParams, ConcatParams, GegluParams};
use crate::ops::elementwise::{EmbeddingBackward, EmbeddingForward, EmbeddingParams, UpsampleParams};
use crate::ops::linear::{LinearBackward, LinearForward, LinearParams};
use crate::ops::norm::{GroupNormBackward, GroupNormParams, LayerNormBackward, LayerNormParams, NormForward};
use crate::ops::optim::AdamWParams;
use crate::ops::random::AddNoiseParams;
use crate::tensor::{PoolId, Tensor};
use anyhow::Result;

/// Elementwise activation functions, named as in the configs that select them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// x · sigmoid(1.702 x), CLIP's `quick_gelu`.
    QuickGelu,
    /// The exact erf form, PyTorch's `gelu` (transformers' `gelu`).
    Gelu,
    /// The tanh approximation (transformers' `gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// x · sigmoid(x) (`silu`, `swish`).
    Silu,
}

impl Activation {
    /// Parses a transformers/diffusers activation name (`hidden_act`, `act_fn`).
    pub fn from_config_name(name: &str) -> Option<Activation> {
        Some(match name {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }

    pub const CONFIG_NAMES: &'static str = "quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, silu, swish";
}

word_enum!(
    /// Which backend a command runs on (`--device`).
    pub enum Device("device") { Cpu = "cpu", Cuda = "cuda" | "gpu" }
);

word_enum!(
    /// Arithmetic of the CUDA backend (`--precision`); the CPU backend is always f32.
    pub enum Precision("precision") { F32 = "f32" | "fp32", Bf16 = "bf16" }
);

/// Creates the backend for `device`, or says plainly why it cannot.
pub fn create(device: Device, precision: Precision) -> Result<Box<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Box::new(cpu::CpuBackend::new())),
        #[cfg(feature = "cuda")]
        Device::Cuda => Ok(Box::new(cuda::CudaBackend::new(0, precision)?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => {
            let _ = precision;
            anyhow::bail!(
                "$device cuda: CUDA support was not compiled into this binary; rebuild with \
                 `cargo build --release --features cuda` (scripts/install-cuda-toolchain.sh installs nvcc), \
                 or use $device cpu"
            )
        }
    }
}

/// A tensor argument must hold at least `want` elements (checked by every backend).
pub(crate) fn check_len(what: &str, t: &Tensor, want: usize) -> Result<()> {
    anyhow::ensure!(t.numel() >= want, "{what}: tensor of {} elements, operation needs {want}", t.numel());
    Ok(())
}

/// Each named tensor argument of `op` must hold at least its count of elements (as [`check_len`],
/// the message naming `op` and the argument).
pub(crate) fn check_lens(op: &str, args: &[(&str, &Tensor, usize)]) -> Result<()> {
    for (name, t, want) in args {
        check_len(&format!("{op} {name}"), t, *want)?;
    }
    Ok(())
}

/// Outputs must not overlap each other or any input (the CPU reference asserts the same).
pub(crate) fn check_disjoint(what: &str, outs: &[&Tensor], ins: &[&Tensor]) -> Result<()> {
    for (i, o) in outs.iter().enumerate() {
        for o2 in &outs[i + 1..] {
            anyhow::ensure!(!o.overlaps(o2), "{what}: output tensors overlap: {o:?} and {o2:?}");
        }
        for x in ins {
            anyhow::ensure!(!o.overlaps(x), "{what}: output {o:?} overlaps input {x:?}");
        }
    }
    Ok(())
}

/// A key mask must cover every key of every sequence and keep at least one key per sequence (an
/// all-masked row has no softmax; transformers would average every value there instead).
pub(crate) fn check_key_mask(what: &str, key_mask: &[u32], batch: usize, kv_len: usize) -> Result<()> {
    anyhow::ensure!(
        key_mask.len() == batch * kv_len,
        "{what}: attention mask has {} entries for batch {batch} × {kv_len} keys",
        key_mask.len()
    );
    if let Some(b) = (0..batch).find(|&b| key_mask[b * kv_len..(b + 1) * kv_len].iter().all(|&m| m == 0)) {
        anyhow::bail!("{what}: attention mask: sequence {b} masks every key");
    }
    Ok(())
}

pub trait Backend {
    /// A short name for messages ("cpu", "cuda:0 (NVIDIA H100)").
    fn name(&self) -> String;

    /// Allocates a pool of `len` f32-equivalent elements. A pool lives until [`Backend::free`] or
    /// the backend's end.
    fn alloc(&mut self, len: usize, label: &str) -> Result<PoolId>;

    /// Frees a pool: its memory goes back, and an operation on a tensor in it fails naming the pool
    /// (ids are not reused, so a stale tensor never aliases a newer pool). A long-lived process
    /// (a server, a loop over checkpoints) frees what each call allocated: `Pipeline::generate`
    /// frees its activation pools before it returns.
    fn free(&mut self, pool: PoolId) -> Result<()>;

    /// Declares that `pool` holds the parameters of a model with convolutions
    /// (`models::allocate_params`). The CUDA backend in bf16 allocates a bf16 copy of such a pool
    /// now, beside the f32 weights (which stay the master copy), refreshes it before the next
    /// convolution that reads it after an `upload`, `zero`, `accumulate`, `scale` or `lerp` into the
    /// pool, and updates it in `adamw_step` in the same pass as the f32 weights; so a parameter pool
    /// must be written through those operations only. Other backends ignore it.
    fn mark_params(&mut self, _pool: PoolId) -> Result<()> {
        Ok(())
    }

    /// (label, bytes) of every pool, for `--verbose` reports.
    fn pool_sizes(&self) -> Vec<(String, usize)>;

    /// Waits until every queued operation has finished (a no-op on the CPU, whose operations are
    /// synchronous); timings call it before reading the clock.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Turns per-kernel timing on or off (CUDA: events around every launch, which serialises the
    /// stream; for `bench --profile`). Backends without kernels ignore it.
    fn set_profiling(&self, _on: bool) {}

    /// (kernel, calls, total milliseconds) accumulated while profiling, slowest first.
    fn kernel_profile(&self) -> Vec<(String, usize, f64)> {
        Vec::new()
    }

    /// Turns replayable graphs on or off (`--cuda-graphs`); backends without graphs ignore it.
    fn set_graphs(&self, _on: bool) {}

    /// Runs `f` so that its work can be replayed. `f` must only queue device operations (no
    /// upload, download or wait) and queue the same ones on the same addresses at every call with
    /// this `key`; inputs that change between calls are written to device memory before the call.
    /// The CUDA backend runs `f` directly the first time (scratch buffers reach their sizes),
    /// captures it into a CUDA graph the second time, and from then on launches the graph without
    /// calling `f`; should a capture fail, it says so once on stderr and runs `f` directly from
    /// then on. Returns true when the work ran as a graph. Other backends just call `f`.
    fn graph(&self, _key: u64, f: &mut dyn FnMut() -> Result<()>) -> Result<bool> {
        f()?;
        Ok(false)
    }

    /// Frees every captured graph (call before the memory they address is given up or reused
    /// for other work: a graph replays fixed addresses).
    fn clear_graphs(&self) {}

    /// Calls of `graph` served by replaying a graph, so far.
    fn graph_replays(&self) -> usize {
        0
    }

    /// Copies host data into `dst` (`src.len()` must equal `dst.numel()`).
    fn upload(&self, dst: &Tensor, src: &[f32]) -> Result<()>;

    /// Copies `src` to the host.
    fn download(&self, src: &Tensor) -> Result<Vec<f32>>;

    /// out[b, t, :] = wte[ids[b·seq + t], :] + wpe[t, :]; out (batch, seq, dim), wte (vocab, dim),
    /// wpe (max_positions ≥ seq, dim). Ids are checked against the vocabulary.
    fn embedding_forward(&self, p: &EmbeddingParams, t: &EmbeddingForward) -> Result<()>;

    /// Layer norm over the last dimension: out, mean (rows), rstd (rows), inp (rows, cols).
    fn layer_norm_forward(&self, p: &LayerNormParams, t: &NormForward) -> Result<()>;

    /// out (rows, out_f) = inp (rows, in_f) · weightᵀ + bias, weight (out_f, in_f) as PyTorch's Linear.
    fn linear_forward(&self, p: &LinearParams, t: &LinearForward) -> Result<()>;

    /// Multi-head scaled dot-product attention (ops/attention.rs): causal (CLIP) and/or over a
    /// key padding mask (BERT); lse, the log-sum-exp of each softmax row, is saved for backward.
    fn attention_forward(&self, p: &AttentionParams, t: &AttentionForward) -> Result<()>;

    /// out = act(inp), n elements.
    fn activation_forward(&self, out: &Tensor, inp: &Tensor, act: Activation, n: usize) -> Result<()>;

    /// out = a + b, n elements (residual connections).
    fn add_forward(&self, out: &Tensor, a: &Tensor, b: &Tensor, n: usize) -> Result<()>;

    /// 2-D convolution on channels-last tensors: inp (batch, h, w, c_in), out (batch, oh, ow, c_out)
    /// with oh = (h + pad_top + pad_bottom − kh) / stride + 1 (likewise ow), weight in PyTorch's
    /// layout (c_out, c_in, kh, kw). `pad` is [top, bottom, left, right] (the VAE's downsampler pads
    /// asymmetrically).
    fn conv2d_forward(&self, p: &Conv2dParams, t: &Conv2dForward) -> Result<()>;

    /// Group norm on channels-last tensors, statistics over (hw, c / groups) per (batch, group),
    /// optionally followed by SiLU (the resnet's norm → act pair, fused). inp/out (batch, hw, c),
    /// mean/rstd (batch, groups).
    fn group_norm_forward(&self, p: &GroupNormParams, t: &NormForward) -> Result<()>;

    /// Nearest-neighbour resize, channels-last: inp (batch, ih, iw, c) → out (batch, oh, ow, c),
    /// source index floor(o · in / out) as PyTorch's `interpolate(mode="nearest")`.
    fn upsample_nearest_forward(&self, p: &UpsampleParams, out: &Tensor, inp: &Tensor) -> Result<()>;

    /// out[b, r, :] = inp[b, r, :] + bias[b, :]: a per-sample channel vector added at every position
    /// (the resnet's time embedding). inp/out (batch, rows, c), bias (batch, c).
    fn add_bias_rows_forward(&self, p: &BiasRowsParams, out: &Tensor, inp: &Tensor, bias: &Tensor) -> Result<()>;

    /// Channel concatenation, channels-last: out (rows, ca + cb) = [a (rows, ca) | b (rows, cb)]
    /// (the U-Net's skip connections, `torch.cat([h, skip], dim=1)` in NCHW).
    fn concat_channels_forward(&self, p: &ConcatParams, out: &Tensor, a: &Tensor, b: &Tensor) -> Result<()>;

    /// diffusers' `get_timestep_embedding` (scale 1, max_period 10000) in f32: out (batch, dim),
    /// row b = [sin | cos] (or [cos | sin] with `flip_sin_to_cos`) of timesteps[b] · exp(−ln(10000)
    /// · i / (dim/2 − freq_shift)), i < dim/2, zero-padded for an odd dim; timesteps (batch).
    fn timestep_embedding(&self, p: &TimestepEmbeddingParams, out: &Tensor, timesteps: &Tensor) -> Result<()>;

    /// GEGLU: inp (rows, 2·inner) = [x | gate] → out (rows, inner) = x · gelu(gate) (exact erf gelu).
    fn geglu_forward(&self, p: &GegluParams, out: &Tensor, inp: &Tensor) -> Result<()>;

    // ---- training: backward passes (they ACCUMULATE into every gradient they write, as llm.c
    // does, so residual and skip paths need no special casing; callers zero gradients first),
    // the loss, and the optimizer ----

    /// t = 0.
    fn zero(&self, t: &Tensor) -> Result<()>;

    /// dst += src, n elements.
    fn accumulate(&self, dst: &Tensor, src: &Tensor, n: usize) -> Result<()>;

    /// t *= s, n elements.
    fn scale(&self, t: &Tensor, s: f32, n: usize) -> Result<()>;

    /// Of `linear_forward`: dinp += dout · W, dweight += doutᵀ · inp, dbias += Σ_rows dout.
    fn linear_backward(&self, p: &LinearParams, t: &LinearBackward) -> Result<()>;

    /// Of `layer_norm_forward`, from the saved mean and rstd.
    fn layer_norm_backward(&self, p: &LayerNormParams, t: &LayerNormBackward) -> Result<()>;

    /// Of `attention_forward`, recomputing the softmax from the saved log-sum-exp.
    fn attention_backward(&self, p: &AttentionParams, t: &AttentionBackward) -> Result<()>;

    /// Of `activation_forward`: dinp += dout · act'(inp).
    fn activation_backward(&self, dinp: &Tensor, dout: &Tensor, inp: &Tensor, act: Activation, n: usize) -> Result<()>;

    /// Of `conv2d_forward`: data, weight and bias gradients (dinp optional: the first layer's input
    /// needs none).
    fn conv2d_backward(&self, p: &Conv2dParams, t: &Conv2dBackward) -> Result<()>;

    /// Of `group_norm_forward` (with its SiLU when `silu`, recomputed from the saved statistics).
    fn group_norm_backward(&self, p: &GroupNormParams, t: &GroupNormBackward) -> Result<()>;

    /// Of `upsample_nearest_forward`: each input position sums the gradients of its copies.
    fn upsample_nearest_backward(&self, p: &UpsampleParams, dinp: &Tensor, dout: &Tensor) -> Result<()>;

    /// Of `add_bias_rows_forward`, the bias part: dbias[b, :] += Σ_r dout[b, r, :].
    fn add_bias_rows_backward(&self, p: &BiasRowsParams, dbias: &Tensor, dout: &Tensor) -> Result<()>;

    /// Of `concat_channels_forward`: da += dout[:, :ca], db += dout[:, ca:].
    fn concat_channels_backward(&self, p: &ConcatParams, da: &Tensor, db: &Tensor, dout: &Tensor) -> Result<()>;

    /// Of `geglu_forward`.
    fn geglu_backward(&self, p: &GegluParams, dinp: &Tensor, dout: &Tensor, inp: &Tensor) -> Result<()>;

    /// Of `embedding_forward`: dwte[ids] += dout rows, dwpe[t] += dout rows.
    fn embedding_backward(&self, p: &EmbeddingParams, t: &EmbeddingBackward) -> Result<()>;

    /// Mean squared error: loss[0] = mean((pred − target)²); dpred = 2 (pred − target) / n (written).
    fn mse_loss(&self, dpred: &Tensor, loss: &Tensor, pred: &Tensor, target: &Tensor, n: usize) -> Result<()>;

    /// out[0] = Σ x² over n elements (accumulated in f64), for gradient-norm clipping.
    fn sum_squares(&self, out: &Tensor, x: &Tensor, n: usize) -> Result<()>;

    /// One AdamW step over flat memory (torch.optim.AdamW semantics: decoupled weight decay
    /// p ← p − lr·wd·p, bias-corrected moments, eps added to the bias-corrected √v̂).
    fn adamw_step(&self, p: &AdamWParams, param: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor) -> Result<()>;

    /// dst += w · (src − dst), n elements (an exponential moving average's update).
    fn lerp(&self, dst: &Tensor, src: &Tensor, n: usize, w: f32) -> Result<()>;

    // ---- training noise, drawn where the model runs ----

    /// out[i] = element i of the standard-normal stream (`seed`, `stream`), i < n: Philox4x32-10
    /// through Box–Muller (src/rng/philox.rs `philox_normals`, which is the CPU implementation). Every
    /// backend draws the same values, so a training run's noise does not depend on the device.
    fn randn(&self, out: &Tensor, n: usize, seed: u64, stream: u64) -> Result<()>;

    /// DDPM's forward process in place, for one sample of n values (diffusers' `add_noise` and the
    /// loss target, f32): x ← √ᾱ·x + √(1−ᾱ)·noise; with `v_prediction`, noise ← √ᾱ·noise − √(1−ᾱ)·x₀
    /// (the velocity), else the noise is left as the target.
    fn ddpm_add_noise(&self, p: &AddNoiseParams, x: &Tensor, noise: &Tensor) -> Result<()>;
}

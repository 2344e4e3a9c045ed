//! The `Backend` trait: a device (pools, copies, synchronisation, graphs) that runs every
//! operation family the models use. Each family's trait (`LinearOps`, `ConvOps`, `NormOps`,
//! `AttentionOps`, `ElementwiseOps`, `OptimOps`, `RandomOps`, `PoolOps`) lives in its `ops/` module beside the
//! parameter structs, checks and CPU reference; the backends implement it in their file of that
//! family, and `plan` counts it.
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

pub use crate::ops::attention::AttentionOps;
pub use crate::ops::conv::ConvOps;
pub use crate::ops::elementwise::ElementwiseOps;
pub use crate::ops::linear::LinearOps;
pub use crate::ops::norm::NormOps;
pub use crate::ops::optim::OptimOps;
pub use crate::ops::pool::PoolOps;
pub use crate::ops::random::RandomOps;
use crate::tensor::{DType, PoolId, Tensor};
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
        // Under an MPI launcher each rank takes the GPU of its index among the node's ranks.
        Device::Cuda => match crate::dist::launcher_local_rank() {
            Some(local) => Ok(Box::new(cuda::CudaBackend::new(local, precision).map_err(|e| {
                e.context(format!(
                    "this process is rank {local} of its node and uses GPU {local}: start at most one rank per GPU"
                ))
            })?)),
            None => Ok(Box::new(cuda::CudaBackend::new(0, precision)?)),
        },
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

/// A device that runs the models: pools (allocate, free, copy), synchronisation, graphs, and every
/// operation family, each declared beside its parameters and CPU reference in `ops/` (one trait a
/// family, e.g. [`NormOps`] in ops/norm.rs ↔ kernels/norm.cu) and implemented by each backend in
/// its file of that family (cuda/norm.rs, …).
pub trait Backend:
    LinearOps + ConvOps + NormOps + AttentionOps + ElementwiseOps + OptimOps + RandomOps + PoolOps
{
    /// A short name for messages ("cpu", "cuda:0 (NVIDIA H100)").
    fn name(&self) -> String;

    /// Allocates a pool of `len` f32-equivalent elements. A pool lives until [`Backend::free`] or
    /// the backend's end.
    fn alloc(&mut self, len: usize, label: &str) -> Result<PoolId>;

    /// A pool holding the `len` f32 values of the file at `path` from byte `offset` on, mapped
    /// copy-on-write (a write changes the pool, never the file), where the backend computes in
    /// host memory; None where it does not (the caller then allocates and uploads). The CPU
    /// backend maps: loading f32 weights then copies nothing, and the pages come in from the page
    /// cache as the first forward reads them, as diffusers' lazily mapped safetensors do. (As for
    /// any mapped file, truncating it while in use ends the process.)
    fn map_file_pool(
        &mut self,
        _path: &std::path::Path,
        _offset: usize,
        _len: usize,
        _label: &str,
    ) -> Result<Option<PoolId>> {
        Ok(None)
    }

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

    /// Declares that the weights in `pool` will not change from now on (sampling, evaluation,
    /// benchmarks of inference): the CPU backend then keeps its layers' packed weights from their
    /// first use rather than their second (which tells a model being trained from one being
    /// used); the CUDA backend in bf16 keeps its conv weights permuted from their bf16 copy (made
    /// per call otherwise). A later write to the pool is still noticed, and the copies dropped or
    /// made again. Other backends ignore it.
    fn mark_frozen(&self, _pool: PoolId) {}

    /// The element type the U-Net's activations are stored in on this backend (its arena:
    /// `UNet::allocate_arena`): f32, or bf16 where `set_activations` asked for it.
    fn activation_dtype(&self) -> DType {
        DType::F32
    }

    /// Stores the U-Net's activations as `dtype` from now on (`--activations`). Only the CUDA
    /// backend in bf16 precision takes bf16; every backend takes f32.
    fn set_activations(&mut self, dtype: DType) -> Result<()> {
        anyhow::ensure!(
            dtype == DType::F32,
            "--activations {dtype}: the {} backend stores f32 activations only",
            self.name()
        );
        Ok(())
    }

    /// (label, bytes) of every pool, for `--verbose` reports.
    fn pool_sizes(&self) -> Vec<(String, usize)>;

    /// A device backend: (bytes of device memory it holds now, the most it has held at once):
    /// pools, parameter copies, workspaces and library scratch. None on the CPU, whose memory is
    /// the process's.
    fn device_memory(&self) -> Option<(usize, usize)> {
        None
    }

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

    /// Sums `t` over `ranks`' ranks in place with the device's own collective (NCCL between GPUs);
    /// Ok(false) where this backend has none, and the caller reduces through the host. Collective:
    /// every rank calls it for the same tensor, in the same order.
    fn sum_over_ranks(&self, t: &Tensor, ranks: &crate::dist::Dist) -> Result<bool> {
        let _ = (t, ranks);
        Ok(false)
    }

    /// Copies host data into `dst` (`src.len()` must equal `dst.numel()`).
    fn upload(&self, dst: &Tensor, src: &[f32]) -> Result<()>;

    /// Copies `src` to the host.
    fn download(&self, src: &Tensor) -> Result<Vec<f32>>;
}

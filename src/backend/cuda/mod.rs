//! The CUDA backend: the `Backend` operations as hand-written kernels (kernels/*.cu, compiled ahead of
//! time by build.rs and embedded), launched through the driver API as llm.c does; linear layers through
//! cuBLASLt (lt.rs). Pools are device allocations of f32 made once (`alloc`); operations never
//! allocate, except the small scratch buffers below, which grow only when a larger request arrives
//! and are counted.
//!
//! Precision: the pools hold f32. `Precision::F32` runs every operation in f32 (the parity path,
//! ≤ 1e-4 against the CPU reference); `Precision::Bf16` runs convolutions, attention and linear
//! layers on bf16 tensor cores (f32 accumulation), the elementwise and normalisation kernels in f32.
//! In bf16 a parameter pool also has a bf16 copy (params.rs), which the convolutions read and AdamW
//! updates beside the f32 master weights; activations stay f32 in memory and are rounded to bf16
//! when a tensor-core kernel stages them.
//!
//! Repeated work (a U-Net evaluation per denoising step) can be captured once and replayed as a CUDA
//! graph (graph.rs, `Backend::graph`).
//!
//! The driver is loaded at run time (cudarc's `dynamic-loading`): a `cuda` build starts on a machine
//! without CUDA and `CudaBackend::new` says "no CUDA driver" instead of crashing.
//!
//! Every call to the driver, cuBLAS and cuBLASLt goes through one narrow interface, device.rs
//! (`Device`): the backend holds a `Box<dyn Device>` and never names cudarc, so that the same code
//! can run on the real driver (`CudaDriver`) or on an emulated device (issue 14).

mod attention;
pub mod autotune;
mod bridge;
mod conv;
mod device;
#[cfg(feature = "cuda-emu")]
mod emu;
mod graph;
mod launch;
mod linear;
mod lt;
#[cfg(feature = "nccl")]
pub mod nccl;
mod norm;
mod ops;
mod params;
mod pool;
// The emulated device's GEMM (issue 14): in a build without `cuda-emu`, only its known-answer tests
// use it.
#[cfg_attr(not(any(test, feature = "cuda-emu")), allow(dead_code))]
mod reference_gemm;
pub mod versions;

use super::{Backend, Precision};
use crate::tensor::{DType, PoolId, Tensor};
use anyhow::{anyhow, bail, ensure, Context, Result};
use device::{Compute, CudaDriver, Device, DeviceError, Event, Function, Gemm, LaunchDims};
use launch::Kernel;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// The fatbins built from kernels/*.cu (see build.rs).
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

struct DevPool {
    /// 0 once freed (`Backend::free`).
    ptr: u64,
    len: usize,
    label: String,
}

/// A device buffer that grows on demand (ids, masks, reduction workspaces).
#[derive(Default, Clone, Copy)]
struct Scratch {
    ptr: u64,
    bytes: usize,
}

const SLOTS: usize = 4;

pub struct CudaBackend {
    name: String,
    gpu: String,
    cc: (i32, i32),
    /// The driver, cuBLAS and cuBLASLt (device.rs): the real ones or an emulation.
    dev: Box<dyn Device>,
    functions: RefCell<HashMap<String, Function>>,
    /// The dynamic shared memory each kernel has been allowed so far (bytes).
    smem_opt_in: RefCell<HashMap<String, u32>>,
    /// Every pool, by `PoolId`; a RefCell because the bf16 bridge (bridge.rs) points its pools at
    /// grown scratch from within operations.
    pools: RefCell<Vec<DevPool>>,
    precision: Precision,
    /// What the U-Net's activations are stored as (`Backend::set_activations`).
    activations: DType,
    u32_scratch: RefCell<[Scratch; SLOTS]>,
    f32_scratch: RefCell<[Scratch; SLOTS]>,
    /// bridge.rs: f32 scratch an f32-only operation reads bf16 activations through, and the pools
    /// that name it (their memory is the scratch's, not theirs to free).
    bridge_scratch: RefCell<[Scratch; SLOTS]>,
    bridge_pools: RefCell<[Option<PoolId>; SLOTS]>,
    allocations: Cell<usize>,
    allocated_bytes: Cell<usize>,
    /// The most `allocated_bytes` has been.
    peak_bytes: Cell<usize>,
    /// attention.rs: most elements of one score-matrix chunk (head_dim > 160).
    attn_ws_limit: Cell<usize>,
    /// Per-kernel (calls, milliseconds) while profiling is on.
    profile: RefCell<Option<HashMap<String, (usize, f64)>>>,
    /// graph.rs: captured work by key, whether graphs are used, whether a capture is under way.
    graphs: RefCell<HashMap<u64, graph::GraphState>>,
    graphs_on: Cell<bool>,
    capturing: Cell<bool>,
    graph_replays: Cell<usize>,
    graph_warned: Cell<bool>,
    /// lt.rs: cuBLASLt plans by shape, the workspace cuBLAS and cuBLASLt share.
    lt_plans: RefCell<HashMap<device::LtMatmul, lt::LtPlan>>,
    lt_declined_noted: Cell<bool>,
    blas_workspace: u64,
    /// params.rs: bf16 copies of parameter pools, by pool index.
    param_copies: RefCell<HashMap<usize, params::ParamCopy>>,
    /// nccl.rs: the communicator over the job's ranks, made at the first reduction.
    #[cfg(feature = "nccl")]
    nccl: std::cell::OnceCell<nccl::NcclComm>,
    /// versions.rs: which version of each kernel family runs.
    kernel_choice: RefCell<versions::KernelChoice>,
    /// autotune.rs: the calls of versioned kernels seen while recording (one per shape).
    tunable_seen: RefCell<Option<Vec<autotune::TunableOp>>>,
}

fn driver<T>(r: Result<T, DeviceError>, what: &str) -> Result<T> {
    r.map_err(|e| anyhow!("CUDA: {what}: {e:?}"))
}

/// True when the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    device::driver_present()
}

/// The dynamic shared memory a launch gets without opting in (cuFuncSetAttribute) to more.
pub(crate) const DEFAULT_SMEM_LIMIT: usize = 48 * 1024;

/// Whether `CudaBackend::new` opens the emulated device: in a `cuda-emu` build, when
/// ROENTGEN_CUDA_EMU=1, or when no CUDA driver is present (ROENTGEN_CUDA_EMU=0 forbids it).
pub fn emulate() -> bool {
    if !cfg!(feature = "cuda-emu") {
        return false;
    }
    match std::env::var("ROENTGEN_CUDA_EMU").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => !device::driver_present(),
    }
}

impl CudaBackend {
    /// Opens device `ordinal`, loads the kernels for its compute capability and creates the stream
    /// and cuBLAS handle. Fails with a plain message where there is no driver or no device.
    pub fn new(ordinal: usize, precision: Precision) -> Result<CudaBackend> {
        #[cfg(feature = "cuda-emu")]
        if emulate() {
            return CudaBackend::with_device(Box::new(emu::EmuDevice::open()), ordinal, precision);
        }
        let dev = CudaDriver::open(ordinal)?;
        CudaBackend::with_device(Box::new(dev), ordinal, precision)
    }

    /// The backend on an opened device (its context current, its stream made): loads the kernels,
    /// opens cuBLAS and cuBLASLt and gives them their workspace.
    fn with_device(mut dev: Box<dyn Device>, ordinal: usize, precision: Precision) -> Result<CudaBackend> {
        let gpu = dev.device_name().to_string();
        let (major, minor) = dev.compute_capability();
        for (name, image) in kernels::MODULES {
            dev.load_module(image)
                .map_err(|e| anyhow!("CUDA: loading kernels/{name}.cu's module on {gpu} (sm_{major}{minor}): {e:?}"))?;
        }
        dev.open_blas()?;
        let mut backend = CudaBackend {
            name: format!("cuda:{ordinal} ({gpu}, sm_{major}{minor}, {precision:?})"),
            gpu: gpu.clone(),
            cc: (major, minor),
            dev,
            functions: RefCell::new(HashMap::new()),
            smem_opt_in: RefCell::new(HashMap::new()),
            pools: RefCell::new(Vec::new()),
            precision,
            u32_scratch: RefCell::new([Scratch::default(); SLOTS]),
            f32_scratch: RefCell::new([Scratch::default(); SLOTS]),
            activations: DType::F32,
            bridge_scratch: RefCell::new([Scratch::default(); SLOTS]),
            bridge_pools: RefCell::new([None; SLOTS]),
            allocations: Cell::new(0),
            allocated_bytes: Cell::new(0),
            peak_bytes: Cell::new(0),
            attn_ws_limit: Cell::new(attention::WIDE_WORKSPACE_ELEMS),
            profile: RefCell::new(None),
            graphs: RefCell::new(HashMap::new()),
            graphs_on: Cell::new(true),
            capturing: Cell::new(false),
            graph_replays: Cell::new(0),
            graph_warned: Cell::new(false),
            lt_plans: RefCell::new(HashMap::new()),
            lt_declined_noted: Cell::new(false),
            blas_workspace: 0,
            param_copies: RefCell::new(HashMap::new()),
            #[cfg(feature = "nccl")]
            nccl: std::cell::OnceCell::new(),
            kernel_choice: RefCell::new(versions::KernelChoice::from_env()?),
            tunable_seen: RefCell::new(None),
        };
        autotune::load_cache(&backend);
        // One workspace for cuBLAS and cuBLASLt, so that neither allocates by itself (an
        // allocation inside a CUDA-graph capture would fail it).
        backend.blas_workspace = backend.raw_alloc(lt::WORKSPACE_BYTES, "cuBLAS workspace")?;
        backend
            .dev
            .set_blas_workspace(backend.blas_workspace, lt::WORKSPACE_BYTES)
            .map_err(|e| anyhow!("cuBLAS: set workspace: {e:?}"))?;
        Ok(backend)
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    /// The kernel versions this backend runs (versions.rs).
    pub fn kernel_choice(&self) -> versions::KernelChoice {
        self.kernel_choice.borrow().clone()
    }

    /// Runs version `v` of `family` from now on (refused when it does not exist).
    pub fn set_kernel_version(&self, family: versions::KernelFamily, v: u32) -> Result<()> {
        self.kernel_choice.borrow_mut().set(family, v)
    }

    /// The version that runs `op` (a call of a versioned kernel family at its shape), which is
    /// recorded while autotune.rs collects the shapes a model runs. The shape's key is formatted
    /// only when a table has to be looked up.
    fn kernel_version(&self, op: autotune::TunableOp) -> u32 {
        let family = op.family();
        if let Some(seen) = self.tunable_seen.borrow_mut().as_mut() {
            if !seen.iter().any(|o| o.family() == family && o.key() == op.key()) {
                seen.push(op);
            }
        }
        let choice = self.kernel_choice.borrow();
        choice.fixed_version(family).unwrap_or_else(|| choice.version_for(family, &op.key()))
    }

    /// The device's name as the driver gives it.
    pub fn device_name(&self) -> &str {
        &self.gpu
    }

    /// (free, total) device memory in bytes (0, 0 if the driver will not say).
    pub fn memory_info(&self) -> (usize, usize) {
        self.dev.memory_info().unwrap_or((0, 0))
    }

    pub(crate) fn use_bf16(&self) -> bool {
        self.precision == Precision::Bf16
    }

    /// Device allocations made so far (pools and scratch growth); a steady-state loop keeps it flat.
    pub fn allocation_count(&self) -> usize {
        self.allocations.get()
    }

    /// Waits for all queued work; surfaces asynchronous kernel faults.
    pub fn synchronize(&self) -> Result<()> {
        driver(self.dev.synchronize(), "stream synchronize (a kernel failed)")
    }

    fn raw_alloc(&self, bytes: usize, what: &str) -> Result<u64> {
        let bytes = bytes.max(4);
        let p = self.dev.alloc(bytes).map_err(|e| {
            let (free, total) = self.dev.memory_info().unwrap_or((0, 0));
            anyhow!(
                "CUDA: allocating {what}: {:.1} MiB needed, {:.1} MiB free of {:.1} MiB ({e:?})",
                bytes as f64 / 1048576.0,
                free as f64 / 1048576.0,
                total as f64 / 1048576.0
            )
        })?;
        driver(self.dev.memset_d8(p, 0, bytes), "memset")?;
        self.allocations.set(self.allocations.get() + 1);
        self.allocated_bytes.set(self.allocated_bytes.get() + bytes);
        self.peak_bytes.set(self.peak_bytes.get().max(self.allocated_bytes.get()));
        Ok(p)
    }

    /// Device address of an f32 tensor's first element (bounds-checked against its pool). Every
    /// operation takes f32 tensors through it; those that also take bf16 activations use
    /// [`CudaBackend::act_ptr`], so a bf16 tensor reaching an operation not written for it stops
    /// here, naming the tensor.
    pub(crate) fn dptr(&self, t: &Tensor) -> u64 {
        assert!(
            t.dtype == DType::F32,
            "tensor {t:?} is {}: this operation takes f32 tensors only on CUDA (a bf16 activation reached an op not written for it)",
            t.dtype
        );
        self.act_ptr(t)
    }

    /// Device address of an activation's first element, f32 or bf16 (bounds-checked).
    pub(crate) fn act_ptr(&self, t: &Tensor) -> u64 {
        let pools = self.pools.borrow();
        let p =
            pools.get(t.pool.0).unwrap_or_else(|| panic!("tensor {t:?} refers to a pool this backend does not own"));
        assert!(p.ptr != 0, "tensor {t:?} refers to pool '{}', which was freed", p.label);
        assert!(t.dtype != DType::F16, "tensor {t:?}: f16 is a file format here, never a device tensor's type");
        let bytes = t.byte_range();
        assert!(
            bytes.end <= 4 * p.len,
            "tensor {t:?} runs past the end of pool '{}' ({} f32 elements)",
            p.label,
            p.len
        );
        p.ptr + bytes.start as u64
    }

    fn function(&self, kernel: &str) -> Result<Function> {
        if let Some(f) = self.functions.borrow().get(kernel) {
            return Ok(*f);
        }
        if let Some(f) = self.dev.function(kernel) {
            self.functions.borrow_mut().insert(kernel.to_string(), f);
            return Ok(f);
        }
        bail!("CUDA: no kernel named '{kernel}' in the embedded modules (a build/backend mismatch)")
    }

    /// Opts `kernel` in to more than 48 KiB of dynamic shared memory (`launch` does, for a launch
    /// that asks for more than [`DEFAULT_SMEM_LIMIT`]).
    fn set_max_dynamic_shared(&self, kernel: &str, bytes: u32) -> Result<()> {
        // A driver call once per kernel and size, not before every launch.
        if self.smem_opt_in.borrow().get(kernel).is_some_and(|&b| b >= bytes) {
            return Ok(());
        }
        let f = self.function(kernel)?;
        self.dev
            .set_max_dynamic_shared(f, bytes)
            .map_err(|e| anyhow!("CUDA: {kernel}: {bytes} B of dynamic shared memory refused: {e:?}"))?;
        self.smem_opt_in.borrow_mut().insert(kernel.to_string(), bytes);
        Ok(())
    }

    /// `launch` of the f32 kernel `k`, or of its bf16-activation twin `B` (kernels/common.cuh
    /// `ld_act`: the same arguments, the activations' pointers then to bf16) when `dtype` is bf16.
    pub(crate) fn launch_act<K: Kernel, B: Kernel + From<K>>(
        &self,
        dtype: DType,
        k: K,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
    ) -> Result<()> {
        match dtype {
            DType::BF16 => self.launch(B::from(k), grid, block, shared_bytes),
            _ => self.launch(k, grid, block, shared_bytes),
        }
    }

    /// Launches kernel `k` (a typed launch: see launch.rs) on the backend's stream.
    pub(crate) fn launch(
        &self,
        k: impl Kernel,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(()); // nothing to do (an empty tensor)
        }
        let kernel = k.name();
        let f = self.function(&kernel)?;
        if shared_bytes as usize > DEFAULT_SMEM_LIMIT {
            self.set_max_dynamic_shared(&kernel, shared_bytes)?;
        }
        let timer = self.profile_start()?;
        // One 64-bit slot per parameter, as cuLaunchKernel reads them (device.rs `launch`).
        let vals = k.params();
        self.dev.launch(f, LaunchDims { grid, block, shared_bytes }, &vals).map_err(|e| {
            anyhow!("CUDA: launching {kernel} grid {grid:?} block {block:?} smem {shared_bytes}: {e:?}")
        })?;
        // Keyed by grid too: one kernel at the U-Net's four resolutions is four rows, so a
        // small-grid launch that leaves most of the card idle shows as its own line.
        self.profile_end(timer, || {
            format!("{kernel} grid {}x{}x{} block {}", grid.0, grid.1, grid.2, block.0 * block.1 * block.2)
        })?;
        if (cfg!(debug_assertions) || std::env::var_os("ROENTGEN_CUDA_SYNC").is_some()) && !self.capturing.get() {
            self.synchronize().with_context(|| format!("after {kernel}"))?;
        }
        Ok(())
    }

    /// Device milliseconds of the work `f` queues: an event recorded before and one after, waited
    /// for (the stream's own clock: no host launch latency or synchronisation in the figure).
    pub(crate) fn device_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        let (start, end) = (driver(self.dev.event_create(), "event")?, driver(self.dev.event_create(), "event")?);
        let timed = (|| {
            driver(self.dev.event_record(start), "event record")?;
            f()?;
            driver(self.dev.event_record(end), "event record")?;
            driver(self.dev.event_synchronize(end), "event synchronize")?;
            Ok(driver(self.dev.event_elapsed_ms(start, end), "event elapsed")? as f64)
        })();
        let _ = self.dev.event_destroy(start);
        let _ = self.dev.event_destroy(end);
        timed
    }

    /// With profiling on: an event recorded before the launch.
    fn profile_start(&self) -> Result<Option<Event>> {
        if self.profile.borrow().is_none() {
            return Ok(None);
        }
        let e = driver(self.dev.event_create(), "event")?;
        driver(self.dev.event_record(e), "event record")?;
        Ok(Some(e))
    }

    /// Records the end event, waits for it and adds the elapsed time to the entry `label` names
    /// (built only when profiling).
    fn profile_end(&self, start: Option<Event>, label: impl FnOnce() -> String) -> Result<()> {
        let Some(start) = start else { return Ok(()) };
        let end = driver(self.dev.event_create(), "event")?;
        let ms = {
            driver(self.dev.event_record(end), "event record")?;
            driver(self.dev.event_synchronize(end), "event synchronize")?;
            let ms = driver(self.dev.event_elapsed_ms(start, end), "event elapsed")?;
            let _ = self.dev.event_destroy(start);
            let _ = self.dev.event_destroy(end);
            ms
        };
        if let Some(p) = self.profile.borrow_mut().as_mut() {
            let e = p.entry(label()).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += ms as f64;
        }
        Ok(())
    }

    fn scratch(&self, table: &RefCell<[Scratch; SLOTS]>, slot: usize, bytes: usize, what: &str) -> Result<u64> {
        assert!(slot < SLOTS, "scratch slot {slot} out of range");
        let mut t = table.borrow_mut();
        if t[slot].bytes < bytes {
            // Captured graphs have the old address baked in: growing is refused during a capture
            // (which then fails and runs directly) and drops the graphs otherwise.
            ensure!(!self.capturing.get(), "{what}: a scratch buffer cannot grow during a graph capture");
            if t[slot].ptr != 0 {
                self.clear_graphs_impl();
                self.synchronize()?;
                let old = std::mem::take(&mut t[slot]);
                // Forgotten before the new allocation: should that fail, the slot must not keep a
                // freed address (a later smaller request would be handed it; Drop would free it again).
                driver(self.dev.free(old.ptr), "free")?;
                self.allocated_bytes.set(self.allocated_bytes.get().saturating_sub(old.bytes));
            }
            let grow = bytes.next_power_of_two().max(1024);
            t[slot] = Scratch { ptr: self.raw_alloc(grow, what)?, bytes: grow };
        }
        Ok(t[slot].ptr)
    }

    /// Copies host u32 data (token ids, key masks) to the scratch buffer of `slot`.
    pub(crate) fn upload_u32(&self, slot: usize, data: &[u32]) -> Result<u64> {
        let p = self.scratch(&self.u32_scratch, slot, data.len() * 4, "u32 scratch")?;
        if !data.is_empty() {
            // Ordered after the stream's queued work (a blocking stream), so no kernel still reads it.
            self.synchronize()?;
            driver(self.dev.copy_htod(p, bytemuck::cast_slice(data)), "copy to device")?;
        }
        Ok(p)
    }

    /// An f32 workspace of at least `n` elements for `slot`; contents undefined.
    pub(crate) fn workspace(&self, slot: usize, n: usize) -> Result<u64> {
        self.scratch(&self.f32_scratch, slot, n * 4, "f32 workspace")
    }

    /// C (col-major m×n, ldc) = op(A)·op(B) + beta·C, f32 in memory; in bf16 mode cuBLAS may
    /// round the operands to bf16 (compute type 32F_FAST_16BF) and use tensor cores. (Linear layers.)
    fn gemm(&self, g: Gemm) -> Result<()> {
        self.gemm_for("cublas_gemm (linear layers)", g)
    }

    /// A linear layer's product: cuBLASLt, or `gemm` for a shape cuBLASLt declines.
    fn linear_gemm(&self, g: Gemm) -> Result<()> {
        if self.lt_gemm(&g, lt::LtExtras::NONE)? {
            return Ok(());
        }
        self.gemm(g)
    }

    /// The compute type of a product of `types`: f32 accumulation always; f32 operands may be
    /// rounded to bf16 by the library in bf16 precision (32F_FAST_16BF), bf16 ones are bf16 already.
    pub(crate) fn gemm_compute(&self, types: &device::GemmTypes) -> Compute {
        if self.use_bf16() && types.a == DType::F32 {
            Compute::F32FastBf16
        } else {
            Compute::F32
        }
    }

    /// As `gemm`, its time profiled under `label`. `g.compute` is the backend's to choose.
    pub(crate) fn gemm_for(&self, label: &str, g: Gemm) -> Result<()> {
        let Gemm { m, n, k, .. } = g;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let compute = self.gemm_compute(&g.types);
        let timer = self.profile_start()?;
        // Pointers come from `dptr` of checked tensors; sizes were validated by the caller.
        let g = Gemm { compute, ..g };
        let r = self.dev.gemm_ex(&g).map_err(|e| anyhow!("cuBLAS: gemm {m}×{n}×{k} ({label}): {e:?}"));
        r?;
        self.profile_end(timer, || format!("{label} {m}×{n}×{k}"))
    }

    /// The most elements of one score-matrix chunk of the attention path for head dims above 160
    /// (attention.rs: the forward holds one such matrix in a workspace, the backward two).
    pub fn attention_workspace_limit(&self) -> usize {
        self.attn_ws_limit.get()
    }

    /// Sets `attention_workspace_limit` (at least one row is always processed; tests lower it to
    /// exercise the chunking). Default 32 Mi elements (128 MiB).
    pub fn set_attention_workspace_limit(&self, elems: usize) {
        self.attn_ws_limit.set(elems.max(1));
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        self.clear_graphs_impl();
        self.lt_destroy_plans();
        let _ = self.dev.synchronize();
        if self.blas_workspace != 0 {
            let _ = self.dev.free(self.blas_workspace);
        }
        let bridged = *self.bridge_pools.borrow();
        for (i, p) in self.pools.borrow().iter().enumerate().filter(|(_, p)| p.ptr != 0) {
            if !bridged.contains(&Some(PoolId(i))) {
                let _ = self.dev.free(p.ptr);
            }
        }
        self.free_param_copies();
        let (u, f, b) = (self.u32_scratch.borrow(), self.f32_scratch.borrow(), self.bridge_scratch.borrow());
        for s in u.iter().chain(f.iter()).chain(b.iter()) {
            if s.ptr != 0 {
                let _ = self.dev.free(s.ptr);
            }
        }
        // Then `dev` drops: the cuBLASLt and cuBLAS handles, the modules, the stream.
    }
}

/// A size or count as the kernels' i32 parameter (they index with 32-bit ints).
pub(crate) fn to_i32(what: &str, v: usize) -> Result<i32> {
    ensure!(
        v <= i32::MAX as usize,
        "{what}: {v} elements exceed the CUDA kernels' 32-bit index range (2^31 − 1); split the batch"
    );
    Ok(v as i32)
}

/// `n` elements as the kernels' i32 count (checked as `to_i32`), or `None` when there are none
/// (the op launches nothing).
pub(crate) fn nonempty_i32(what: &str, n: usize) -> Result<Option<i32>> {
    Ok(Some(to_i32(what, n)?).filter(|&n| n != 0))
}

/// Threads per block of kernels/linear.cu's bias fill.
const LIN_BLOCK: u32 = 256;

impl Backend for CudaBackend {
    fn name(&self) -> String {
        match self.kernel_choice.borrow().describe() {
            chosen if chosen.is_empty() => self.name.clone(),
            chosen => format!("{} [kernels {chosen}]", self.name),
        }
    }

    /// NCCL's all-reduce, in place on the backend's stream (a `nccl` build on a real GPU; the
    /// emulated device has no NCCL and reduces through the host).
    #[cfg(feature = "nccl")]
    fn sum_over_ranks(&self, t: &Tensor, ranks: &crate::dist::Dist) -> Result<bool> {
        let Some(stream) = self.dev.raw_stream() else { return Ok(false) };
        ensure!(!self.capturing.get(), "NCCL: a reduction inside a CUDA-graph capture");
        if self.nccl.get().is_none() {
            let comm = nccl::NcclComm::new(ranks)?;
            if ranks.is_root() {
                let lib = comm.lib();
                crate::diag::progress(format!(
                    "NCCL {} ({}) joins {} rank(s)",
                    lib.version(),
                    lib.path().display(),
                    comm.ranks()
                ));
            }
            let _ = self.nccl.set(comm);
        }
        let comm = self.nccl.get().expect("set above");
        ensure!(comm.ranks() == ranks.size(), "NCCL: a communicator of {} ranks for {}", comm.ranks(), ranks.size());
        self.params_written(t);
        comm.sum_f32_in_place(self.dptr(t), t.numel(), stream)?;
        Ok(true)
    }

    fn alloc(&mut self, len: usize, label: &str) -> Result<PoolId> {
        let ptr = self.raw_alloc(len * 4, &format!("pool '{label}'"))?;
        let mut pools = self.pools.borrow_mut();
        pools.push(DevPool { ptr, len, label: label.to_string() });
        Ok(PoolId(pools.len() - 1))
    }

    fn free(&mut self, pool: PoolId) -> Result<()> {
        let ptr = {
            let pools = self.pools.borrow();
            let p = pools.get(pool.0).ok_or_else(|| anyhow!("free: no pool {}", pool.0))?;
            ensure!(p.ptr != 0, "free: pool '{}' was already freed", p.label);
            ensure!(!self.bridge_pools.borrow().contains(&Some(pool)), "free: pool '{}' is the backend's own", p.label);
            p.ptr
        };
        // Captured graphs may hold the pool's addresses, and queued work may still use it.
        self.clear_graphs_impl();
        self.synchronize()?;
        let copy_bytes = self.free_param_copy(pool)?;
        driver(self.dev.free(ptr), "free")?;
        let mut pools = self.pools.borrow_mut();
        let p = &mut pools[pool.0];
        p.ptr = 0;
        self.allocated_bytes.set(self.allocated_bytes.get().saturating_sub(p.len * 4 + copy_bytes));
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        CudaBackend::synchronize(self)
    }

    fn set_profiling(&self, on: bool) {
        *self.profile.borrow_mut() = on.then(HashMap::new);
    }

    fn kernel_profile(&self) -> Vec<(String, usize, f64)> {
        let mut v: Vec<(String, usize, f64)> =
            self.profile.borrow().iter().flatten().map(|(k, (c, ms))| (k.clone(), *c, *ms)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }

    fn device_memory(&self) -> Option<(usize, usize)> {
        Some((self.allocated_bytes.get(), self.peak_bytes.get()))
    }

    fn pool_sizes(&self) -> Vec<(String, usize)> {
        let pools = self.pools.borrow();
        let mut v: Vec<(String, usize)> =
            pools.iter().filter(|p| p.ptr != 0).map(|p| (p.label.clone(), p.len * 4)).collect();
        let copies = self.param_copies.borrow();
        let mut ids: Vec<&usize> = copies.keys().collect();
        ids.sort();
        for id in ids {
            let (copy, permuted) = copies[id].bytes();
            v.push((format!("{} (bf16 copy)", pools[*id].label), copy));
            if permuted > 0 {
                v.push((format!("{} (permuted conv weights)", pools[*id].label), permuted));
            }
        }
        v
    }

    fn activation_dtype(&self) -> DType {
        self.activations
    }

    /// bf16 activations need bf16 precision: they are what the tensor cores read, and an f32
    /// run is for parity.
    fn set_activations(&mut self, dtype: DType) -> Result<()> {
        ensure!(
            dtype == DType::F32 || (dtype == DType::BF16 && self.use_bf16()),
            "--activations {dtype}: bf16 activations need --precision bf16 (f32 precision is the exact path)"
        );
        self.activations = dtype;
        Ok(())
    }

    fn mark_params(&mut self, pool: PoolId) -> Result<()> {
        self.mark_params_impl(pool)
    }

    fn mark_frozen(&self, pool: PoolId) {
        self.mark_frozen_impl(pool)
    }

    fn set_graphs(&self, on: bool) {
        if !on {
            self.clear_graphs_impl();
        }
        self.graphs_on.set(on);
    }

    fn graph(&self, key: u64, f: &mut dyn FnMut() -> Result<()>) -> Result<bool> {
        self.graph_impl(key, f)
    }

    fn clear_graphs(&self) {
        self.clear_graphs_impl();
    }

    fn graph_replays(&self) -> usize {
        self.graph_replays.get()
    }

    /// f32 values are copied as they are; a bf16 tensor receives them rounded to nearest even
    /// (as `__float2bfloat16_rn`).
    fn upload(&self, dst: &Tensor, src: &[f32]) -> Result<()> {
        ensure!(src.len() == dst.numel(), "upload: {} values for a tensor of {}", src.len(), dst.numel());
        self.params_written(dst);
        let p = self.act_ptr(dst);
        self.synchronize()?;
        if dst.dtype == DType::BF16 {
            let bits: Vec<u16> = src.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect();
            return driver(self.dev.copy_htod(p, bytemuck::cast_slice(&bits)), "copy to device");
        }
        driver(self.dev.copy_htod(p, bytemuck::cast_slice(src)), "copy to device")
    }

    /// Always f32 on the host: a bf16 tensor's values widened exactly.
    fn download(&self, src: &Tensor) -> Result<Vec<f32>> {
        let p = self.act_ptr(src);
        self.synchronize()?;
        if src.dtype == DType::BF16 {
            let mut bits = vec![0u16; src.numel()];
            driver(self.dev.copy_dtoh(bytemuck::cast_slice_mut(&mut bits), p), "copy to host")?;
            return Ok(bits.into_iter().map(|b| half::bf16::from_bits(b).to_f32()).collect());
        }
        let mut out = vec![0f32; src.numel()];
        driver(self.dev.copy_dtoh(bytemuck::cast_slice_mut(&mut out), p), "copy to host")?;
        Ok(out)
    }
}

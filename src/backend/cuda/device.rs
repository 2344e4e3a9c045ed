//! The device layer under the CUDA backend (issue 14, ARCHITECTURE.md decision 11): every call the
//! backend makes to the CUDA driver, cuBLAS and cuBLASLt goes through [`Device`]. Nothing above this
//! file names cudarc; `CudaBackend` holds a `Box<dyn Device>` and does not know what is under it.
//!
//! Implementations:
//! * [`CudaDriver`] (here): the real driver through cudarc, exactly the calls the backend made before
//!   this layer existed, on one blocking stream of the device's primary context.
//! * `EmuDevice` (emu.rs, feature `cuda-emu`): the same contract on the host. Device addresses are
//!   host addresses of guard-paged, 0xFF-filled allocations; copies, memsets and GEMM operands are
//!   checked against live allocations; `launch` runs the unmodified kernels/*.cu through the CPU
//!   emulation of kernels/emu (build.rs compiles it with `cc`; kernels/emu/registry.h lists the
//!   kernels, and the C++ compiler deduces each signature from the kernel itself) with the same u64
//!   slots, checking what the driver refuses (unknown kernel, argument count, a 4-byte parameter
//!   whose slot has upper bytes set, grid/block/`__launch_bounds__` limits, dynamic shared memory
//!   above 48 KiB or the opt-in, an opt-in above sm_80's 163 KiB). A fault while a kernel runs
//!   (guard page, misaligned vector access, divergent barrier, deadlock) names kernel, grid, block
//!   and thread and becomes a sticky error that `synchronize` and every later call return.
//!   Everything runs at the call (stream order is program order; events read a host clock); a
//!   capture records launches and GEMMs with their argument bytes and refuses synchronisation,
//!   allocation, copies and memset as CU_STREAM_CAPTURE_MODE_GLOBAL does. GEMMs run
//!   reference_gemm.rs (cuBLAS/cuBLASLt semantics, checked against numpy known answers written
//!   from the vendors' documentation, tests/fixtures/gemm). `CudaBackend::new` chooses it with
//!   `ROENTGEN_CUDA_EMU=1`, or when no driver is present.
//!
//! Errors: calls that the vendor libraries answer with a status return [`DeviceError`], which
//! prints as the binding's status (`DriverError(CUDA_ERROR_..., "...")`, `CublasError(...)`); the
//! backend adds what it was doing, so its messages read exactly as before this layer.

use crate::tensor::DType;
use anyhow::{anyhow, bail, ensure, Result};
use cudarc::cublas::{result as cublas, sys as cublas_sys};
use cudarc::cublaslt::{result as lt, sys as lts};
use cudarc::driver::{result as cu, sys};
use std::cell::RefCell;
use std::ffi::{c_void, CString};

/// A status from the driver, cuBLAS or cuBLASLt, or a message of the device layer itself. Its
/// Debug text is the binding's (`DriverError(CUDA_ERROR_..., "...")`, `CublasError(...)`), produced
/// only when formatted (the backend formats it with `{e:?}`).
#[derive(Clone)]
pub(crate) enum DeviceError {
    Driver(cu::DriverError),
    Blas(cublas::CublasError),
    BlasLt(lt::CublasError),
    /// Said by the device layer (an emulated device's refusal, a misused handle).
    Message(String),
}

impl std::fmt::Debug for DeviceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceError::Driver(e) => e.fmt(f),
            DeviceError::Blas(e) => e.fmt(f),
            DeviceError::BlasLt(e) => e.fmt(f),
            DeviceError::Message(m) => f.write_str(m),
        }
    }
}

impl From<cu::DriverError> for DeviceError {
    fn from(e: cu::DriverError) -> Self {
        DeviceError::Driver(e)
    }
}

impl From<cublas::CublasError> for DeviceError {
    fn from(e: cublas::CublasError) -> Self {
        DeviceError::Blas(e)
    }
}

impl From<lt::CublasError> for DeviceError {
    fn from(e: lt::CublasError) -> Self {
        DeviceError::BlasLt(e)
    }
}

/// A kernel of a loaded module (opaque to the backend; valid while the device lives).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Function(pub(crate) u64);

/// A timing event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Event(pub(crate) u64);

/// A captured, not yet instantiated graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Graph(pub(crate) u64);

/// An instantiated graph, launchable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GraphExec(pub(crate) u64);

/// A cuBLASLt product described once (matmul descriptor, three matrix layouts, the algorithm the
/// heuristic chose), used by `lt_set_bias` and `lt_matmul` until `lt_destroy_plan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MatmulPlan(pub(crate) u64);

/// The compute type of a GEMM on f32 data (cublasComputeType_t).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Compute {
    /// CUBLAS_COMPUTE_32F: f32 products, f32 accumulation.
    F32,
    /// CUBLAS_COMPUTE_32F_FAST_16BF: the library may round A and B to bf16 (nearest even) and use
    /// bf16 tensor cores; f32 accumulation, alpha/beta and C in f32.
    F32FastBf16,
}

/// The element types of a product's A, B and C (D is C's type): f32 (CUDA_R_32F), or bf16
/// (CUDA_R_16BF) activations and weight copies (issue 18). A and B share a type (cuBLAS and
/// cuBLASLt pair them), and bf16 A/B compute as CUBLAS_COMPUTE_32F: they are bf16 already, and
/// the products accumulate in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GemmTypes {
    pub a: DType,
    pub b: DType,
    pub c: DType,
}

impl GemmTypes {
    pub(crate) const F32: GemmTypes = GemmTypes { a: DType::F32, b: DType::F32, c: DType::F32 };

    /// (A, B, C) as they are stored: the bytes of one element each.
    pub(crate) fn sizes(&self) -> [usize; 3] {
        [self.a.size_bytes(), self.b.size_bytes(), self.c.size_bytes()]
    }
}

/// One cuBLAS `cublasGemmEx` call, the matrices of `types` (all f32 unless bf16 activations), column-major, algorithm
/// CUBLAS_GEMM_DEFAULT: C (m×n, ldc) = alpha·op(A)·op(B) + beta·C, where op(X) = Xᵀ when the
/// flag is set; op(A) is m×k (A stored k×m, lda ≥ k, when `ta`; m×k, lda ≥ m, otherwise), op(B) is
/// k×n (B stored n×k, ldb ≥ n, when `tb`; k×n, ldb ≥ k, otherwise); ldc ≥ m. Leading dimensions
/// in elements. With beta = 0, C is not read (NaN in C does not propagate). m, n, k fit in i32.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gemm {
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    pub beta: f32,
    pub c: u64,
    pub ldc: usize,
    pub compute: Compute,
    pub types: GemmTypes,
}

impl Gemm {
    /// No transposes, alpha 1, beta 0, f32 compute: what a product names on top of
    /// (`Gemm { m, n, k, a, lda, b, ldb, c, ldc, ..Gemm::UNIT }`).
    pub(crate) const UNIT: Gemm = Gemm {
        ta: false,
        tb: false,
        m: 0,
        n: 0,
        k: 0,
        alpha: 1.0,
        a: 0,
        lda: 0,
        b: 0,
        ldb: 0,
        beta: 0.0,
        c: 0,
        ldc: 0,
        compute: Compute::F32,
        types: GemmTypes::F32,
    };
}

/// The shape and layout of one product (the scalars and operands are per call).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GemmShape {
    pub ta: bool,
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub compute: Compute,
    pub types: GemmTypes,
}

/// The shape of a cuBLASLt product, what a plan is made for: D = alpha·op(A)·op(B) + beta·C
/// (+ bias), f32 matrices and scale type, column-major, C and D one layout (the same matrix, or
/// D beside a C that is only read), shapes and leading dimensions as in [`Gemm`]. `bias`: the
/// BIAS epilogue (D[i][j] += bias[i], one f32 per row of D, its address set per call with
/// `lt_set_bias`). `align`: the alignments in bytes of A, B, C and D promised to the heuristic
/// (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_{A,B,C,D}_BYTES); the call's addresses must honour them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct LtMatmul {
    pub shape: GemmShape,
    pub bias: bool,
    pub align: [u32; 4],
    pub batch: LtBatch,
}

/// A strided batch of products of one shape (CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT and
/// _STRIDED_BATCH_OFFSET on every layout): product `i` reads A + i·stride_a, B + i·stride_b and
/// C + i·stride_c and writes D + i·stride_c (strides in elements; 0 shares an operand). `count` 1
/// is a single product.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct LtBatch {
    pub count: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl LtBatch {
    pub(crate) const SINGLE: LtBatch = LtBatch { count: 1, stride_a: 0, stride_b: 0, stride_c: 0 };
}

/// The per-call operands of `lt_matmul`: scalars, addresses, and the workspace cuBLASLt may use
/// (`workspace_bytes` at `workspace`, at most the plan's `max_workspace`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct LtOperands {
    pub alpha: f32,
    pub beta: f32,
    pub a: u64,
    pub b: u64,
    pub c: u64,
    /// Where the product is written: `c` (in place) or another matrix of C's layout (C is then
    /// only read: a linear layer's residual).
    pub d: u64,
    pub workspace: u64,
    pub workspace_bytes: usize,
}

/// The shape of one kernel launch: `grid` blocks of `block` threads, with `shared_bytes` of
/// dynamic shared memory each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LaunchDims {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

/// The narrow interface between `CudaBackend` and a CUDA device: one stream (blocking: it orders
/// after work on the legacy default stream and the synchronous copies order after it), device
/// memory as `u64` addresses, kernels from the embedded modules, cuBLAS and cuBLASLt bound to that
/// stream. Work queued on the stream runs in queue order; "queued" calls return before it runs
/// (their faults surface at a later `synchronize`). Handles are valid until destroyed or until the
/// device is dropped; dropping the device releases its stream, modules and library handles (not
/// the memory: the backend frees what it allocated first).
pub(crate) trait Device {
    // ---- identity -----------------------------------------------------------------------------
    /// The device's name as the driver gives it (cuDeviceGetName).
    fn device_name(&self) -> &str;
    /// (major, minor) compute capability.
    fn compute_capability(&self) -> (i32, i32);
    /// Streaming multiprocessors (CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT): how many blocks fill
    /// the device, for kernels that size their grid by it (conv's split-K).
    fn multiprocessor_count(&self) -> usize;
    /// (free, total) device memory in bytes (cuMemGetInfo).
    fn memory_info(&self) -> Result<(usize, usize), DeviceError>;

    // ---- memory -------------------------------------------------------------------------------
    /// cuMemAlloc: `bytes` (> 0) of device memory, aligned for any kind of variable (256 bytes in
    /// practice), contents undefined. Refused during a graph capture.
    fn alloc(&self, bytes: usize) -> Result<u64, DeviceError>;
    /// cuMemFree of an address `alloc` returned. Refused during a graph capture; the backend
    /// synchronises first wherever queued work may still use the memory.
    fn free(&self, ptr: u64) -> Result<(), DeviceError>;
    /// cuMemsetD8: sets `bytes` bytes from `ptr` to `value`, ordered after the work queued on the
    /// stream (legacy-stream semantics); may return before it is done.
    fn memset_d8(&self, ptr: u64, value: u8, bytes: usize) -> Result<(), DeviceError>;
    /// cuMemcpyHtoD: copies `src` to `[dst, dst + src.len())`, ordered after the stream's queued
    /// work; `src` may be reused when it returns.
    fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<(), DeviceError>;
    /// cuMemcpyDtoH: copies `[src, src + dst.len())` into `dst` after the stream's queued work
    /// has finished; returns when `dst` holds the data.
    fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), DeviceError>;

    // ---- modules and kernels --------------------------------------------------------------------
    /// cuModuleLoadData of one embedded image (a fatbin from build.rs: sm_80 and sm_90a cubins
    /// and compute_80 PTX, `include_bytes!` data, any alignment).
    fn load_module(&mut self, image: &[u8]) -> Result<(), DeviceError>;
    /// The `extern "C"` kernel `name` of the first loaded module (in load order) that has it;
    /// None if none does.
    fn function(&self, name: &str) -> Option<Function>;
    /// cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes): lets later
    /// launches of `f` ask for up to `bytes` of dynamic shared memory (48 KiB without it).
    fn set_max_dynamic_shared(&self, f: Function, bytes: u32) -> Result<(), DeviceError>;
    /// cuLaunchKernel on the stream, shaped by `dims`. `args` holds one 64-bit slot per kernel parameter, in parameter order: the
    /// driver reads sizeof(parameter) bytes from the start of each slot (little endian: a pointer
    /// takes the whole slot, an int or float its low 4 bytes) — the bytes the kernel receives. The
    /// slots are read before the call returns. Queued (faults surface at `synchronize`).
    fn launch(&self, f: Function, dims: LaunchDims, args: &[u64]) -> Result<(), DeviceError>;
    /// cuStreamSynchronize: waits for the stream's queued work; returns the first fault of it (a
    /// fault is sticky: the context is unusable afterwards).
    fn synchronize(&self) -> Result<(), DeviceError>;

    // ---- events (profiling) -------------------------------------------------------------------
    /// cuEventCreate(CU_EVENT_DEFAULT): a timing event.
    fn event_create(&self) -> Result<Event, DeviceError>;
    /// cuEventRecord on the stream: the event completes when the work queued before it has.
    fn event_record(&self, e: Event) -> Result<(), DeviceError>;
    /// cuEventSynchronize: waits until `e` has completed.
    fn event_synchronize(&self, e: Event) -> Result<(), DeviceError>;
    /// cuEventElapsedTime: milliseconds from `start` to `end`, both recorded and completed.
    fn event_elapsed_ms(&self, start: Event, end: Event) -> Result<f32, DeviceError>;
    /// cuEventDestroy.
    fn event_destroy(&self, e: Event) -> Result<(), DeviceError>;

    // ---- graphs -------------------------------------------------------------------------------
    /// cuStreamBeginCapture(CU_STREAM_CAPTURE_MODE_GLOBAL): from now on work queued on the stream
    /// is recorded, not run; a synchronisation, allocation, free or synchronous copy (anywhere in
    /// the process) meanwhile is an error and invalidates the capture.
    fn begin_capture(&self) -> Result<(), DeviceError>;
    /// cuStreamEndCapture: the recorded graph (None if the driver returns none), or the error that
    /// invalidated the capture. The stream leaves capture mode either way.
    fn end_capture(&self) -> Result<Option<Graph>, DeviceError>;
    /// cuGraphInstantiateWithFlags(flags 0). The graph may be destroyed afterwards.
    fn graph_instantiate(&self, g: Graph) -> Result<GraphExec, DeviceError>;
    /// cuGraphDestroy.
    fn graph_destroy(&self, g: Graph) -> Result<(), DeviceError>;
    /// cuGraphLaunch on the stream: queues the recorded work, with the recorded argument bytes.
    fn graph_launch(&self, e: GraphExec) -> Result<(), DeviceError>;
    /// cuGraphExecDestroy.
    fn graph_exec_destroy(&self, e: GraphExec) -> Result<(), DeviceError>;

    // ---- cuBLAS and cuBLASLt ------------------------------------------------------------------
    /// Opens cuBLAS and cuBLASLt on the stream (the second half of opening the device; the error
    /// says which library is missing).
    fn open_blas(&mut self) -> Result<()>;
    /// cublasSetWorkspace: cuBLAS uses `bytes` at `ptr` instead of allocating its own (which a graph
    /// capture would refuse).
    fn set_blas_workspace(&self, ptr: u64, bytes: usize) -> Result<(), DeviceError>;
    /// cublasGemmEx on the stream (see [`Gemm`] for the exact operation). Queued.
    fn gemm_ex(&self, g: &Gemm) -> Result<(), DeviceError>;
    /// Describes `shape` to cuBLASLt (matmul descriptor with TRANSA/TRANSB and the BIAS epilogue if
    /// asked, matrix layouts of A, B and C, a preference with `max_workspace` bytes and the
    /// alignments) and asks its heuristic for the best algorithm. Err when any step is refused or
    /// no algorithm exists; nothing is left allocated then.
    fn lt_plan(&self, shape: &LtMatmul, max_workspace: usize) -> Result<MatmulPlan, DeviceError>;
    /// Sets the BIAS epilogue's vector address (CUBLASLT_MATMUL_DESC_BIAS_POINTER) for the plan's
    /// following `lt_matmul` calls; the value is copied. A call recorded in a graph keeps the
    /// address it was recorded with.
    fn lt_set_bias(&self, plan: MatmulPlan, bias: u64) -> Result<(), DeviceError>;
    /// cublasLtMatmul on the stream with the plan's descriptor, layouts and algorithm: D = C at
    /// `ops.c`, in place. Queued; an Err is a refusal before anything ran.
    fn lt_matmul(&self, plan: MatmulPlan, ops: &LtOperands) -> Result<(), DeviceError>;
    /// Destroys the plan's descriptor and layouts.
    fn lt_destroy_plan(&self, plan: MatmulPlan);

    // ---- collectives --------------------------------------------------------------------------
    /// The stream's handle (a CUstream) for libraries that queue work on it (NCCL); None for a
    /// device without one (the emulation).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    fn raw_stream(&self) -> Option<u64> {
        None
    }
}

/// True when the CUDA driver library can be loaded on this machine.
pub(crate) fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library.
    unsafe { sys::is_culib_present() }
}

/// A plan of the real cuBLASLt.
#[derive(Clone, Copy)]
struct RealPlan {
    desc: lts::cublasLtMatmulDesc_t,
    layouts: [lts::cublasLtMatrixLayout_t; 3],
    algo: lts::cublasLtMatmulAlgo_t,
}

/// The real device: the CUDA driver, cuBLAS and cuBLASLt through cudarc (loaded at run time).
pub(crate) struct CudaDriver {
    gpu: String,
    cc: (i32, i32),
    sms: usize,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    modules: Vec<sys::CUmodule>,
    /// Null until `open_blas`.
    blas: cublas_sys::cublasHandle_t,
    lt_handle: lts::cublasLtHandle_t,
    /// Plans by `MatmulPlan` index; None once destroyed.
    plans: RefCell<Vec<Option<RealPlan>>>,
}

fn driver<T>(r: Result<T, cu::DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| anyhow!("CUDA: {what}: {e:?}"))
}

impl CudaDriver {
    /// Opens device `ordinal`'s primary context and creates the stream. Fails with a plain message
    /// where there is no driver, no such device, or a device older than the kernels (sm_80).
    pub(crate) fn open(ordinal: usize) -> Result<CudaDriver> {
        if !driver_present() {
            bail!("$device cuda: no CUDA driver (libcuda.so) on this machine; use $device cpu");
        }
        driver(cu::init(), "cuInit")?;
        let count = driver(cu::device::get_count(), "cuDeviceGetCount")?;
        ensure!(count > 0, "$device cuda: the CUDA driver sees no GPU");
        ensure!((ordinal as i32) < count, "$device cuda:{ordinal}: only {count} GPU(s)");
        let dev = driver(cu::device::get(ordinal as i32), "cuDeviceGet")?;
        let gpu = driver(cu::device::get_name(dev), "cuDeviceGetName")?;
        // SAFETY: dev is a valid device; the primary context is retained for the process's life.
        let ctx = unsafe { driver(cu::primary_ctx::retain(dev), "cuDevicePrimaryCtxRetain")? };
        unsafe { driver(cu::ctx::set_current(ctx), "cuCtxSetCurrent")? };
        let attr = |a| unsafe { cu::device::get_attribute(dev, a) };
        let major = driver(attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR), "attribute")?;
        let minor = driver(attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR), "attribute")?;
        let sms = driver(attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT), "attribute")?;
        ensure!(
            major >= 8,
            "$device cuda: {gpu} has compute capability {major}.{minor}; the kernels need 8.0 or newer (A100, H100)"
        );
        // A blocking stream: synchronous copies on the legacy stream order after its work.
        let stream = driver(cu::stream::create(cu::stream::StreamKind::Default), "cuStreamCreate")?;
        Ok(CudaDriver {
            gpu,
            cc: (major, minor),
            sms: sms.max(1) as usize,
            ctx,
            stream,
            modules: Vec::new(),
            blas: std::ptr::null_mut(),
            lt_handle: std::ptr::null_mut(),
            plans: RefCell::new(Vec::new()),
        })
    }

    fn real_plan(&self, plan: MatmulPlan) -> Result<RealPlan, DeviceError> {
        match self.plans.borrow().get(plan.0 as usize) {
            Some(Some(p)) => Ok(*p),
            _ => Err(DeviceError::Message(format!("no cuBLASLt plan {}", plan.0))),
        }
    }

    fn lt_describe(
        &self,
        key: &LtMatmul,
        max_workspace: usize,
        parts: &mut LtParts,
    ) -> Result<lts::cublasLtMatmulAlgo_t, lt::CublasError> {
        let compute = match key.shape.compute {
            Compute::F32FastBf16 => lts::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
            Compute::F32 => lts::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let f32t = lts::cudaDataType::CUDA_R_32F;
        let ty = |t: DType| match t {
            DType::BF16 => lts::cudaDataType::CUDA_R_16BF,
            _ => f32t,
        };
        // The scale type (alpha, beta) stays f32 whatever the matrices' types.
        let desc = lt::create_matmul_desc(compute, f32t)?;
        parts.desc = Some(desc);
        let set = |attr, v: &[u8]| set_attr(lt::set_matmul_desc_attribute, desc, attr, v);
        // cublasOperation_t is an int32: N = 0, T = 1.
        set(lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &(key.shape.ta as i32).to_ne_bytes())?;
        set(lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &(key.shape.tb as i32).to_ne_bytes())?;
        if key.bias {
            let epi = lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32;
            set(lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi.to_ne_bytes())?;
        }
        // Stored shapes: op(A) is m×k, so A is k×m when transposed; op(B) is k×n.
        let (ar, ac) = if key.shape.ta { (key.shape.k, key.shape.m) } else { (key.shape.m, key.shape.k) };
        let (br, bc) = if key.shape.tb { (key.shape.n, key.shape.k) } else { (key.shape.k, key.shape.n) };
        let LtBatch { count, stride_a, stride_b, stride_c } = key.batch;
        let types = key.shape.types;
        for (r, c, ld, stride, t) in [
            (ar, ac, key.shape.lda, stride_a, types.a),
            (br, bc, key.shape.ldb, stride_b, types.b),
            (key.shape.m, key.shape.n, key.shape.ldc, stride_c, types.c),
        ] {
            let l = lt::create_matrix_layout(ty(t), r as u64, c as u64, ld as i64)?;
            parts.layouts.push(l);
            if count > 1 {
                use lts::cublasLtMatrixLayoutAttribute_t as L;
                set_attr(
                    lt::set_matrix_layout_attribute,
                    l,
                    L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    &(count as i32).to_ne_bytes(),
                )?;
                let offset = (stride as i64).to_ne_bytes();
                set_attr(lt::set_matrix_layout_attribute, l, L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &offset)?;
            }
        }
        let pref = lt::create_matmul_pref()?;
        parts.pref = Some(pref);
        use lts::cublasLtMatmulPreferenceAttributes_t as P;
        set_attr(
            lt::set_matmul_pref_attribute,
            pref,
            P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &(max_workspace as u64).to_ne_bytes(),
        )?;
        for (attr, al) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align[0]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align[1]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align[2]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align[3]),
        ] {
            set_attr(lt::set_matmul_pref_attribute, pref, attr, &al.to_ne_bytes())?;
        }
        unsafe {
            let l = &parts.layouts;
            let h = lt::get_matmul_algo_heuristic(self.lt_handle, desc, l[0], l[1], l[2], l[2], pref)?;
            Ok(h.algo)
        }
    }
}

/// What `lt_describe` has created so far; destroyed on drop unless taken into a plan (the
/// preference is always destroyed: plans do not keep it).
struct LtParts {
    desc: Option<lts::cublasLtMatmulDesc_t>,
    layouts: Vec<lts::cublasLtMatrixLayout_t>,
    pref: Option<lts::cublasLtMatmulPreference_t>,
}

impl Drop for LtParts {
    fn drop(&mut self) {
        unsafe {
            if let Some(p) = self.pref.take() {
                let _ = lt::destroy_matmul_pref(p);
            }
            if let Some(d) = self.desc.take() {
                let _ = lt::destroy_matmul_desc(d);
            }
            for l in self.layouts.drain(..) {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

fn destroy_real_plan(p: RealPlan) {
    unsafe {
        let _ = lt::destroy_matmul_desc(p.desc);
        for l in p.layouts.iter() {
            let _ = lt::destroy_matrix_layout(*l);
        }
    }
}

impl Device for CudaDriver {
    fn device_name(&self) -> &str {
        &self.gpu
    }

    fn raw_stream(&self) -> Option<u64> {
        Some(self.stream as u64)
    }

    fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    fn multiprocessor_count(&self) -> usize {
        self.sms
    }

    fn memory_info(&self) -> Result<(usize, usize), DeviceError> {
        cu::mem_get_info().map_err(DeviceError::from)
    }

    fn alloc(&self, bytes: usize) -> Result<u64, DeviceError> {
        unsafe { cu::malloc_sync(bytes) }.map_err(DeviceError::from)
    }

    fn free(&self, ptr: u64) -> Result<(), DeviceError> {
        unsafe { cu::free_sync(ptr) }.map_err(DeviceError::from)
    }

    fn memset_d8(&self, ptr: u64, value: u8, bytes: usize) -> Result<(), DeviceError> {
        unsafe { cu::memset_d8_sync(ptr, value, bytes) }.map_err(DeviceError::from)
    }

    fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<(), DeviceError> {
        unsafe { cu::memcpy_htod_sync(dst, src) }.map_err(DeviceError::from)
    }

    fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), DeviceError> {
        unsafe { cu::memcpy_dtoh_sync(dst, src) }.map_err(DeviceError::from)
    }

    fn load_module(&mut self, image: &[u8]) -> Result<(), DeviceError> {
        // The fatbin holds sm_80 and sm_90a cubins and compute_80 PTX; the driver picks.
        // include_bytes! data is only byte-aligned, while the fatbin header holds 64-bit fields
        // (nvcc itself places fatbins 8-byte aligned): load from an 8-byte-aligned copy.
        let mut aligned = vec![0u64; image.len().div_ceil(8)];
        // SAFETY: `aligned` holds at least image.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), aligned.as_mut_ptr() as *mut u8, image.len()) };
        let m = unsafe { cu::module::load_data(aligned.as_ptr() as *const c_void) }.map_err(DeviceError::from)?;
        self.modules.push(m);
        Ok(())
    }

    fn function(&self, name: &str) -> Option<Function> {
        let cname = CString::new(name).unwrap();
        for m in &self.modules {
            if let Ok(f) = unsafe { cu::module::get_function(*m, cname.clone()) } {
                return Some(Function(f as usize as u64));
            }
        }
        None
    }

    fn set_max_dynamic_shared(&self, f: Function, bytes: u32) -> Result<(), DeviceError> {
        unsafe {
            cu::function::set_function_attribute(
                f.0 as usize as sys::CUfunction,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
        }
        .map_err(DeviceError::from)
    }

    fn launch(&self, f: Function, dims: LaunchDims, args: &[u64]) -> Result<(), DeviceError> {
        let LaunchDims { grid, block, shared_bytes } = dims;
        // Each parameter is passed as a pointer to its slot; the driver only reads through them.
        let mut params: Vec<*mut c_void> = args.iter().map(|v| v as *const u64 as *mut c_void).collect();
        // SAFETY: the argument list matches the kernel's signature (each kernel's wrapper builds it);
        // a u64 slot holds a pointer, and an int or float in its low bytes (little endian).
        unsafe {
            cu::launch_kernel(f.0 as usize as sys::CUfunction, grid, block, shared_bytes, self.stream, &mut params)
        }
        .map_err(DeviceError::from)
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        unsafe { cu::stream::synchronize(self.stream) }.map_err(DeviceError::from)
    }

    fn event_create(&self) -> Result<Event, DeviceError> {
        cu::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT)
            .map(|e| Event(e as usize as u64))
            .map_err(DeviceError::from)
    }

    fn event_record(&self, e: Event) -> Result<(), DeviceError> {
        unsafe { cu::event::record(e.0 as usize as sys::CUevent, self.stream) }.map_err(DeviceError::from)
    }

    fn event_synchronize(&self, e: Event) -> Result<(), DeviceError> {
        unsafe { cu::event::synchronize(e.0 as usize as sys::CUevent) }.map_err(DeviceError::from)
    }

    fn event_elapsed_ms(&self, start: Event, end: Event) -> Result<f32, DeviceError> {
        unsafe { cu::event::elapsed(start.0 as usize as sys::CUevent, end.0 as usize as sys::CUevent) }
            .map_err(DeviceError::from)
    }

    fn event_destroy(&self, e: Event) -> Result<(), DeviceError> {
        unsafe { cu::event::destroy(e.0 as usize as sys::CUevent) }.map_err(DeviceError::from)
    }

    fn begin_capture(&self) -> Result<(), DeviceError> {
        unsafe { cu::stream::begin_capture(self.stream, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL) }
            .map_err(DeviceError::from)
    }

    fn end_capture(&self) -> Result<Option<Graph>, DeviceError> {
        let g = unsafe { cu::stream::end_capture(self.stream) }.map_err(DeviceError::from)?;
        Ok((!g.is_null()).then_some(Graph(g as usize as u64)))
    }

    fn graph_instantiate(&self, g: Graph) -> Result<GraphExec, DeviceError> {
        unsafe { cu::graph::instantiate(g.0 as usize as sys::CUgraph, sys::CUgraphInstantiate_flags(0)) }
            .map(|e| GraphExec(e as usize as u64))
            .map_err(DeviceError::from)
    }

    fn graph_destroy(&self, g: Graph) -> Result<(), DeviceError> {
        unsafe { cu::graph::destroy(g.0 as usize as sys::CUgraph) }.map_err(DeviceError::from)
    }

    fn graph_launch(&self, e: GraphExec) -> Result<(), DeviceError> {
        unsafe { cu::graph::launch(e.0 as usize as sys::CUgraphExec, self.stream) }.map_err(DeviceError::from)
    }

    fn graph_exec_destroy(&self, e: GraphExec) -> Result<(), DeviceError> {
        unsafe { cu::graph::exec_destroy(e.0 as usize as sys::CUgraphExec) }.map_err(DeviceError::from)
    }

    fn open_blas(&mut self) -> Result<()> {
        // SAFETY: loads libcublas dynamically; a missing library is reported, not a crash.
        if !unsafe { cublas_sys::is_culib_present() } {
            bail!("$device cuda: the driver is present but libcublas is not; install the CUDA toolkit's cuBLAS");
        }
        self.blas = cublas::create_handle().map_err(|e| anyhow!("cuBLAS: create handle: {e:?}"))?;
        unsafe { cublas::set_stream(self.blas, self.stream as cublas_sys::cudaStream_t) }
            .map_err(|e| anyhow!("cuBLAS: set stream: {e:?}"))?;
        if !unsafe { lts::is_culib_present() } {
            bail!("$device cuda: the driver is present but libcublasLt is not; install the CUDA toolkit's cuBLAS");
        }
        self.lt_handle = lt::create_handle().map_err(|e| anyhow!("cuBLASLt: create handle: {e:?}"))?;
        Ok(())
    }

    fn set_blas_workspace(&self, ptr: u64, bytes: usize) -> Result<(), DeviceError> {
        unsafe { cublas_sys::cublasSetWorkspace_v2(self.blas, ptr as *mut c_void, bytes).result() }
            .map_err(DeviceError::from)
    }

    fn gemm_ex(&self, g: &Gemm) -> Result<(), DeviceError> {
        use cublas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let compute = match g.compute {
            Compute::F32FastBf16 => cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
            Compute::F32 => cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let ty = |t: DType| match t {
            DType::BF16 => cublas_sys::cudaDataType::CUDA_R_16BF,
            _ => cublas_sys::cudaDataType::CUDA_R_32F,
        };
        // SAFETY: the caller's addresses are device buffers of the described shapes.
        unsafe {
            cublas::gemm_ex(
                self.blas,
                op(g.ta),
                op(g.tb),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                &g.alpha as *const f32 as *const c_void,
                g.a as *const c_void,
                ty(g.types.a),
                g.lda as i32,
                g.b as *const c_void,
                ty(g.types.b),
                g.ldb as i32,
                &g.beta as *const f32 as *const c_void,
                g.c as *mut c_void,
                ty(g.types.c),
                g.ldc as i32,
                compute,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(DeviceError::from)
    }

    fn lt_plan(&self, shape: &LtMatmul, max_workspace: usize) -> Result<MatmulPlan, DeviceError> {
        let mut parts = LtParts { desc: None, layouts: Vec::new(), pref: None };
        // On an error `parts` destroys what was made.
        let algo = self.lt_describe(shape, max_workspace, &mut parts).map_err(DeviceError::from)?;
        let desc = parts.desc.take().expect("described");
        let layouts = [parts.layouts[0], parts.layouts[1], parts.layouts[2]];
        parts.layouts.clear();
        let mut plans = self.plans.borrow_mut();
        plans.push(Some(RealPlan { desc, layouts, algo }));
        Ok(MatmulPlan((plans.len() - 1) as u64))
    }

    fn lt_set_bias(&self, plan: MatmulPlan, bias: u64) -> Result<(), DeviceError> {
        let desc = self.real_plan(plan)?.desc;
        set_attr(
            lt::set_matmul_desc_attribute,
            desc,
            lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
            &bias.to_ne_bytes(),
        )
        .map_err(DeviceError::from)
    }

    fn lt_matmul(&self, plan: MatmulPlan, ops: &LtOperands) -> Result<(), DeviceError> {
        let RealPlan { desc, layouts, algo } = self.real_plan(plan)?;
        unsafe {
            lt::matmul(
                self.lt_handle,
                desc,
                &ops.alpha as *const f32 as *const c_void,
                &ops.beta as *const f32 as *const c_void,
                ops.a as *const c_void,
                layouts[0],
                ops.b as *const c_void,
                layouts[1],
                ops.c as *const c_void,
                layouts[2],
                ops.d as *mut c_void,
                layouts[2],
                &algo,
                ops.workspace as *mut c_void,
                ops.workspace_bytes,
                self.stream as lts::cudaStream_t,
            )
        }
        .map_err(DeviceError::from)
    }

    fn lt_destroy_plan(&self, plan: MatmulPlan) {
        let p = self.plans.borrow_mut().get_mut(plan.0 as usize).and_then(Option::take);
        if let Some(p) = p {
            destroy_real_plan(p);
        }
    }
}

impl Drop for CudaDriver {
    /// The backend has synchronised, destroyed its plans and graphs and freed its memory by now.
    fn drop(&mut self) {
        for p in self.plans.get_mut().drain(..).flatten() {
            destroy_real_plan(p);
        }
        unsafe {
            if !self.lt_handle.is_null() {
                let _ = lt::destroy_handle(self.lt_handle);
            }
            if !self.blas.is_null() {
                let _ = cublas::destroy_handle(self.blas);
            }
            for m in &self.modules {
                let _ = cu::module::unload(*m);
            }
            let _ = cu::stream::destroy(self.stream);
        }
        // The primary context stays retained for the process's life.
        let _ = self.ctx;
    }
}

/// A cuBLASLt attribute setter (`set_matmul_desc_attribute`, `set_matmul_pref_attribute`).
type LtSetter<H, A> = unsafe fn(H, A, *const c_void, usize) -> Result<(), lt::CublasError>;

/// Sets one attribute of a cuBLASLt matmul descriptor or preference (`handle`, through `set`) from
/// its value's native-endian bytes (the attribute's C type: int32 for the transposes, uint32 for
/// the epilogue and the alignments, uint64 for the workspace size and the bias pointer).
fn set_attr<H, A>(set: LtSetter<H, A>, handle: H, attr: A, value: &[u8]) -> Result<(), lt::CublasError> {
    // SAFETY: `value` outlives the call, which copies `value.len()` bytes from it.
    unsafe { set(handle, attr, value.as_ptr() as *const c_void, value.len()) }
}

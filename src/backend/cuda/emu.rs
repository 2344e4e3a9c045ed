//! The emulated device (feature `cuda-emu`, issue 14): [`Device`] on the host, so the CUDA
//! backend's own Rust code — pools, offsets, grids, argument slots, GEMM calls, graphs — runs
//! without a GPU, and the unmodified kernels/*.cu run on the CPU emulation of kernels/emu (compiled
//! by build.rs into a static library; kernels/emu/device.cpp is its C side).
//!
//! Device addresses are host addresses: an allocation ends at a guard page and starts as 0xFF
//! (NaN), so a kernel that reads or writes past a buffer faults. Every copy, memset and GEMM
//! operand is checked to lie inside one live allocation, and named when it does not. Launches run
//! to completion at the call (stream order is program order). During a graph capture, launches and
//! GEMMs are recorded with their argument bytes and replayed by `graph_launch`; what a real capture
//! refuses (allocation, free, copies, memset, synchronisation) fails the call and the capture.
//! GEMMs run the reference of reference_gemm.rs. A kernel that faults while it runs (out of bounds,
//! misaligned, a divergent barrier) spoils the device as a fault spoils a CUDA context: the launch
//! itself returns (launches are asynchronous on hardware) and every later call fails with the
//! fault's message, which names the kernel, block and thread; a new device starts clean. Launches
//! alternate between the emulation's two block schedules, round-robin and warp-greedy (a missing
//! `__syncthreads` shows under the latter); ROENTGEN_EMU_SCHEDULE=round-robin|warp-greedy pins one.
//! What is not emulated: timing (events read a host clock) and the vendor libraries' algorithms.

use super::device::Compute;
use super::device::{
    Device, DeviceError, Event, Function, Gemm, GemmShape, Graph, GraphExec, LaunchDims, LtBatch, LtMatmul, LtOperands,
    MatmulPlan,
};
use super::reference_gemm::gemm;
use crate::tensor::DType;
use anyhow::Result;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CString};
use std::time::Instant;

extern "C" {
    fn roentgen_emu_has_kernel(name: *const c_char) -> i32;
    fn roentgen_emu_set_max_dynamic_shared(name: *const c_char, bytes: u32, err: *mut c_char, n: usize) -> i32;
    fn roentgen_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        smem: u32,
        slots: *const u64,
        nslots: usize,
        err: *mut c_char,
        n: usize,
    ) -> i32;
    fn roentgen_emu_alloc(bytes: usize) -> *mut c_void;
    fn roentgen_emu_free(p: *mut c_void, bytes: usize);
}

/// What a capture records: the calls that run on the stream.
#[derive(Clone)]
enum Op {
    Launch { f: Function, dims: LaunchDims, args: Vec<u64> },
    Gemm(Gemm),
    Lt { shape: LtMatmul, bias: u64, ops: LtOperands },
}

/// The emulated device's capacity, reported by `memory_info` (an 80 GB card's).
const TOTAL_BYTES: usize = 80 << 30;

pub(crate) struct EmuDevice {
    /// Live allocations: address → bytes.
    allocs: RefCell<BTreeMap<u64, usize>>,
    /// Kernel names by `Function` index.
    kernels: RefCell<Vec<CString>>,
    /// Some while capturing: the recorded calls, and the refusal that spoilt the capture if any.
    capture: RefCell<Option<(Vec<Op>, Option<String>)>>,
    graphs: RefCell<Vec<Option<Vec<Op>>>>,
    execs: RefCell<Vec<Option<Vec<Op>>>>,
    /// Plans: the shape and the bias address set for the next calls.
    plans: RefCell<Vec<Option<(LtMatmul, u64)>>>,
    events: RefCell<Vec<Option<Instant>>>,
    epoch: Instant,
    /// The fault that spoilt this device, if one did (a sticky error).
    fault: RefCell<Option<String>>,
}

fn refuse(msg: String) -> DeviceError {
    DeviceError::Message(format!("emulated device: {msg}"))
}

impl EmuDevice {
    pub(crate) fn open() -> EmuDevice {
        EmuDevice {
            allocs: RefCell::new(BTreeMap::new()),
            kernels: RefCell::new(Vec::new()),
            capture: RefCell::new(None),
            graphs: RefCell::new(Vec::new()),
            execs: RefCell::new(Vec::new()),
            plans: RefCell::new(Vec::new()),
            events: RefCell::new(Vec::new()),
            epoch: Instant::now(),
            fault: RefCell::new(None),
        }
    }

    /// Fails every call after a kernel fault, as a CUDA context does (CUDA_ERROR_ILLEGAL_ADDRESS
    /// and its kind are sticky: the process must start over).
    fn usable(&self) -> Result<(), DeviceError> {
        match self.fault.borrow().as_ref() {
            Some(why) => Err(refuse(format!(
                "a kernel faulted earlier and the device is unusable (a sticky error, as \
                 CUDA_ERROR_ILLEGAL_ADDRESS): {why}"
            ))),
            None => Ok(()),
        }
    }

    /// Checks that `[ptr, ptr + bytes)` lies inside one live allocation.
    fn check_range(&self, what: &str, ptr: u64, bytes: usize) -> Result<(), DeviceError> {
        let allocs = self.allocs.borrow();
        match allocs.range(..=ptr).next_back() {
            Some((&base, &len)) if ptr + bytes as u64 <= base + len as u64 => Ok(()),
            Some((&base, &len)) if ptr < base + len as u64 => Err(refuse(format!(
                "{what}: {bytes} bytes at {ptr:#x} run {} bytes past the end of the allocation of {len} bytes at {base:#x}",
                ptr + bytes as u64 - (base + len as u64)
            ))),
            _ => Err(refuse(format!("{what}: {ptr:#x} is not in any live allocation"))),
        }
    }

    /// Fails (and spoils the capture) when a call that a real capture refuses comes during one.
    fn not_capturing(&self, what: &str) -> Result<(), DeviceError> {
        if let Some((_, spoilt)) = self.capture.borrow_mut().as_mut() {
            let msg = format!("{what} during a graph capture (cudaErrorStreamCaptureUnsupported)");
            spoilt.get_or_insert(msg.clone());
            return Err(refuse(msg));
        }
        Ok(())
    }

    /// Records `op` while capturing (true), or leaves it to run now (false).
    fn record(&self, op: &Op) -> bool {
        match self.capture.borrow_mut().as_mut() {
            Some((ops, _)) => {
                ops.push(op.clone());
                true
            }
            None => false,
        }
    }

    fn run(&self, op: &Op) -> Result<(), DeviceError> {
        self.usable()?;
        match op {
            Op::Launch { f, dims: LaunchDims { grid, block, shared_bytes: smem }, args } => {
                let name = self.kernels.borrow()[f.0 as usize].clone();
                let mut err = vec![0 as c_char; 1024];
                let (g, b) = ([grid.0, grid.1, grid.2], [block.0, block.1, block.2]);
                // SAFETY: the pointers are valid for the call; the kernel reads device memory that
                // is host memory of live allocations (a fault at a guard page returns 2).
                let rc = unsafe {
                    roentgen_emu_launch(
                        name.as_ptr(),
                        g.as_ptr(),
                        b.as_ptr(),
                        *smem,
                        args.as_ptr(),
                        args.len(),
                        err.as_mut_ptr(),
                        err.len(),
                    )
                };
                match rc {
                    0 => Ok(()),
                    // A fault while the kernel ran: reported by the calls that follow.
                    2 => {
                        *self.fault.borrow_mut() = Some(c_message(&err));
                        Ok(())
                    }
                    _ => Err(refuse(c_message(&err))),
                }
            }
            Op::Gemm(g) => {
                let shape = GemmShape::from(g);
                let o = Operands { alpha: g.alpha, a: g.a, b: g.b, beta: g.beta, c: g.c };
                self.gemm_on_device("cublasGemmEx", &shape, o, None)
            }
            Op::Lt { shape: s, bias, ops } => {
                let shape = s.shape;
                // A batch's products one after another, each at its strides from the bases; every
                // product's alignment checked before any runs (a broken promise refuses the call).
                let LtBatch { count, stride_a, stride_b, stride_c } = s.batch;
                let [za, zb, zc] = shape.types.sizes();
                let product = |i: usize| {
                    let at = |base: u64, stride: usize, size: usize| base + (i * stride * size) as u64;
                    [at(ops.a, stride_a, za), at(ops.b, stride_b, zb), at(ops.c, stride_c, zc), at(ops.d, stride_c, zc)]
                };
                for i in 0..count {
                    for ((what, addr), align) in ["A", "B", "C", "D"].into_iter().zip(product(i)).zip(s.align) {
                        if align > 0 && addr % align as u64 != 0 {
                            return Err(refuse(format!(
                                "cublasLtMatmul: {what} at {addr:#x} (product {i}) breaks the plan's promised \
                                 {align}-byte alignment"
                            )));
                        }
                    }
                }
                for i in 0..count {
                    let [a, b, c, d] = product(i);
                    if d != c {
                        self.copy_matrix_c_to_d(&shape, c, d)?;
                    }
                    // With C copied into D, the product in place on D is D = op(A)·op(B) + beta·C.
                    let o = Operands { alpha: ops.alpha, a, b, beta: ops.beta, c: d };
                    self.gemm_on_device("cublasLtMatmul", &shape, o, s.bias.then_some(*bias))?;
                }
                Ok(())
            }
        }
    }

    /// Copies C's m×n elements (leading dimension ldc) into D of the same layout, for a cuBLASLt
    /// product whose D is not its C; the two may not overlap (cuBLASLt's out-of-place contract).
    fn copy_matrix_c_to_d(&self, s: &GemmShape, c: u64, d: u64) -> Result<(), DeviceError> {
        let (.., n_c) = s.spans();
        let size = s.types.c.size_bytes();
        self.check_range("cublasLtMatmul C", c, n_c * size)?;
        self.check_range("cublasLtMatmul D", d, n_c * size)?;
        let bytes = (n_c * size) as u64;
        if c < d + bytes && d < c + bytes {
            return Err(refuse(format!("cublasLtMatmul: D at {d:#x} overlaps C at {c:#x} (out of place)")));
        }
        for j in 0..s.n {
            let col = (j * s.ldc * size) as u64;
            // SAFETY: both spans lie in live allocations (checked above) and do not overlap.
            unsafe { std::ptr::copy_nonoverlapping((c + col) as *const u8, (d + col) as *mut u8, s.m * size) };
        }
        Ok(())
    }

    /// The reference GEMM on device memory, each operand's whole span checked first.
    ///
    /// Operands of bf16 type (`s.types`) are widened to f32 for the reference and C written back
    /// rounded to nearest even; the bias has D's type, as cuBLASLt's BIAS epilogue reads it by
    /// default. A and B of different types are refused, as cuBLAS refuses them.
    fn gemm_on_device(&self, what: &str, s: &GemmShape, o: Operands, bias: Option<u64>) -> Result<(), DeviceError> {
        let Operands { alpha, a, b, beta, c } = o;
        let types = s.types;
        if types.a != types.b {
            return Err(refuse(format!(
                "{what}: A is {} and B {} (CUBLAS_STATUS_NOT_SUPPORTED: A and B share a type)",
                types.a, types.b
            )));
        }
        if types.a == DType::BF16 && s.compute != Compute::F32 {
            return Err(refuse(format!("{what}: bf16 A and B with compute {:?}: 32F expected", s.compute)));
        }
        let (na, nb, nc) = s.spans();
        let [za, zb, zc] = types.sizes();
        for (name, addr, n, size) in [("A", a, na, za), ("B", b, nb, zb), ("C", c, nc, zc)] {
            self.check_range(&format!("{what} {name}"), addr, n * size)?;
        }
        if let Some(p) = bias {
            self.check_range(&format!("{what} bias"), p, s.m * zc)?;
        }
        // SAFETY: each range lies in a live allocation of host memory (checked above); C may alias
        // neither A nor B in a well-formed call, which the reference reads (widened) before
        // writing C.
        let read = |p: u64, n: usize, t: DType| -> Vec<f32> {
            match t {
                DType::BF16 => unsafe { std::slice::from_raw_parts(p as *const u16, n) }
                    .iter()
                    .map(|&h| half::bf16::from_bits(h).to_f32())
                    .collect(),
                _ => unsafe { std::slice::from_raw_parts(p as *const f32, n) }.to_vec(),
            }
        };
        let (sa, sb) = (read(a, na, types.a), read(b, nb, types.b));
        let sbias = bias.map(|p| read(p, s.m, types.c));
        let mut sc = read(c, nc, types.c);
        gemm(s, alpha, &sa, &sb, beta, &mut sc, sbias.as_deref()).map_err(|e| refuse(format!("{what}: {e}")))?;
        // Only C's m×n block is written (the padding between columns keeps its bytes).
        for j in 0..s.n {
            for i in 0..s.m {
                let at = i + j * s.ldc;
                // SAFETY: `at` < nc, within C's checked span.
                unsafe {
                    match types.c {
                        DType::BF16 => *(c as *mut u16).add(at) = half::bf16::from_f32(sc[at]).to_bits(),
                        _ => *(c as *mut f32).add(at) = sc[at],
                    }
                }
            }
        }
        Ok(())
    }
}

/// A product's scalars and device addresses (C = alpha·op(A)·op(B) + beta·C).
struct Operands {
    alpha: f32,
    a: u64,
    b: u64,
    beta: f32,
    c: u64,
}

fn c_message(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

impl Device for EmuDevice {
    fn device_name(&self) -> &str {
        "emulated device (the kernels on the CPU, kernels/emu)"
    }

    fn compute_capability(&self) -> (i32, i32) {
        // sm_80, the stricter of the two targets (163 KiB of dynamic shared memory).
        (8, 0)
    }

    fn multiprocessor_count(&self) -> usize {
        // An A100's 108, so that grids sized by it take the paths they take on a GPU.
        108
    }

    fn memory_info(&self) -> Result<(usize, usize), DeviceError> {
        let used: usize = self.allocs.borrow().values().sum();
        Ok((TOTAL_BYTES.saturating_sub(used), TOTAL_BYTES))
    }

    fn alloc(&self, bytes: usize) -> Result<u64, DeviceError> {
        self.usable()?;
        self.not_capturing("cuMemAlloc")?;
        // SAFETY: plain allocation through the emulation library.
        let p = unsafe { roentgen_emu_alloc(bytes) };
        if p.is_null() {
            return Err(refuse(format!("cannot allocate {bytes} bytes (CUDA_ERROR_OUT_OF_MEMORY)")));
        }
        self.allocs.borrow_mut().insert(p as u64, bytes);
        Ok(p as u64)
    }

    fn free(&self, ptr: u64) -> Result<(), DeviceError> {
        self.not_capturing("cuMemFree")?;
        let bytes = self
            .allocs
            .borrow_mut()
            .remove(&ptr)
            .ok_or_else(|| refuse(format!("cuMemFree of {ptr:#x}, which is not an allocation's address")))?;
        // SAFETY: `ptr` came from roentgen_emu_alloc with `bytes` and is freed once.
        unsafe { roentgen_emu_free(ptr as *mut c_void, bytes) };
        Ok(())
    }

    fn memset_d8(&self, ptr: u64, value: u8, bytes: usize) -> Result<(), DeviceError> {
        self.usable()?;
        self.not_capturing("cuMemsetD8")?;
        self.check_range("cuMemsetD8", ptr, bytes)?;
        // SAFETY: the range lies in a live allocation.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, value, bytes) };
        Ok(())
    }

    fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<(), DeviceError> {
        self.usable()?;
        self.not_capturing("cuMemcpyHtoD")?;
        self.check_range("cuMemcpyHtoD", dst, src.len())?;
        // SAFETY: the destination range lies in a live allocation; host buffers never overlap it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn copy_dtoh(&self, dst: &mut [u8], src: u64) -> Result<(), DeviceError> {
        self.usable()?;
        self.not_capturing("cuMemcpyDtoH")?;
        self.check_range("cuMemcpyDtoH", src, dst.len())?;
        // SAFETY: the source range lies in a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn load_module(&mut self, _image: &[u8]) -> Result<(), DeviceError> {
        // The kernels are the emulation library's (the same sources); the image is not read.
        Ok(())
    }

    fn function(&self, name: &str) -> Option<Function> {
        let c = CString::new(name).ok()?;
        // SAFETY: a NUL-terminated name.
        if unsafe { roentgen_emu_has_kernel(c.as_ptr()) } == 0 {
            return None;
        }
        let mut k = self.kernels.borrow_mut();
        let i = k.iter().position(|n| *n == c).unwrap_or_else(|| {
            k.push(c);
            k.len() - 1
        });
        Some(Function(i as u64))
    }

    fn set_max_dynamic_shared(&self, f: Function, bytes: u32) -> Result<(), DeviceError> {
        let name = self.kernels.borrow()[f.0 as usize].clone();
        let mut err = vec![0 as c_char; 512];
        // SAFETY: valid pointers for the call.
        let rc = unsafe { roentgen_emu_set_max_dynamic_shared(name.as_ptr(), bytes, err.as_mut_ptr(), err.len()) };
        if rc != 0 {
            return Err(refuse(c_message(&err)));
        }
        Ok(())
    }

    fn launch(&self, f: Function, dims: LaunchDims, args: &[u64]) -> Result<(), DeviceError> {
        let op = Op::Launch { f, dims, args: args.to_vec() };
        if self.record(&op) {
            return Ok(());
        }
        self.run(&op)
    }

    fn synchronize(&self) -> Result<(), DeviceError> {
        // Launches ran at the call; a fault during one is reported here and by every later call.
        self.usable()?;
        self.not_capturing("cuStreamSynchronize")
    }

    fn event_create(&self) -> Result<Event, DeviceError> {
        let mut e = self.events.borrow_mut();
        e.push(None);
        Ok(Event(e.len() as u64 - 1))
    }

    fn event_record(&self, e: Event) -> Result<(), DeviceError> {
        self.events.borrow_mut()[e.0 as usize] = Some(Instant::now());
        Ok(())
    }

    fn event_synchronize(&self, _e: Event) -> Result<(), DeviceError> {
        self.usable()?;
        self.not_capturing("cuEventSynchronize")
    }

    fn event_elapsed_ms(&self, start: Event, end: Event) -> Result<f32, DeviceError> {
        let ev = self.events.borrow();
        let at = |e: Event| ev[e.0 as usize].unwrap_or(self.epoch);
        Ok(at(end).saturating_duration_since(at(start)).as_secs_f32() * 1e3)
    }

    fn event_destroy(&self, e: Event) -> Result<(), DeviceError> {
        self.events.borrow_mut()[e.0 as usize] = None;
        Ok(())
    }

    fn begin_capture(&self) -> Result<(), DeviceError> {
        let mut c = self.capture.borrow_mut();
        if c.is_some() {
            return Err(refuse("cuStreamBeginCapture while already capturing".into()));
        }
        *c = Some((Vec::new(), None));
        Ok(())
    }

    fn end_capture(&self) -> Result<Option<Graph>, DeviceError> {
        let (ops, spoilt) =
            self.capture.borrow_mut().take().ok_or_else(|| refuse("cuStreamEndCapture without a capture".into()))?;
        if let Some(why) = spoilt {
            return Err(refuse(format!("the capture was invalidated: {why}")));
        }
        let mut g = self.graphs.borrow_mut();
        g.push(Some(ops));
        Ok(Some(Graph(g.len() as u64 - 1)))
    }

    fn graph_instantiate(&self, g: Graph) -> Result<GraphExec, DeviceError> {
        let ops = self.graphs.borrow()[g.0 as usize]
            .clone()
            .ok_or_else(|| refuse("instantiating a destroyed graph".into()))?;
        let mut e = self.execs.borrow_mut();
        e.push(Some(ops));
        Ok(GraphExec(e.len() as u64 - 1))
    }

    fn graph_destroy(&self, g: Graph) -> Result<(), DeviceError> {
        self.graphs.borrow_mut()[g.0 as usize] = None;
        Ok(())
    }

    fn graph_launch(&self, e: GraphExec) -> Result<(), DeviceError> {
        let ops =
            self.execs.borrow()[e.0 as usize].clone().ok_or_else(|| refuse("launching a destroyed graph".into()))?;
        for op in &ops {
            if !self.record(op) {
                self.run(op)?;
            }
        }
        Ok(())
    }

    fn graph_exec_destroy(&self, e: GraphExec) -> Result<(), DeviceError> {
        self.execs.borrow_mut()[e.0 as usize] = None;
        Ok(())
    }

    fn open_blas(&mut self) -> Result<()> {
        Ok(())
    }

    fn set_blas_workspace(&self, ptr: u64, bytes: usize) -> Result<(), DeviceError> {
        self.check_range("cublasSetWorkspace", ptr, bytes)
    }

    fn gemm_ex(&self, g: &Gemm) -> Result<(), DeviceError> {
        let op = Op::Gemm(*g);
        if self.record(&op) {
            return Ok(());
        }
        self.run(&op)
    }

    fn lt_plan(&self, key: &LtMatmul, _max_workspace: usize) -> Result<MatmulPlan, DeviceError> {
        let shape = &key.shape;
        let (a_rows, b_rows) = (if shape.ta { shape.k } else { shape.m }, if shape.tb { shape.n } else { shape.k });
        if shape.lda < a_rows.max(1) || shape.ldb < b_rows.max(1) || shape.ldc < shape.m.max(1) {
            return Err(refuse(format!("cublasLtMatrixLayoutCreate: leading dimension below the rows in {shape:?}")));
        }
        let mut p = self.plans.borrow_mut();
        p.push(Some((*key, 0)));
        Ok(MatmulPlan(p.len() as u64 - 1))
    }

    fn lt_set_bias(&self, plan: MatmulPlan, bias: u64) -> Result<(), DeviceError> {
        match self.plans.borrow_mut().get_mut(plan.0 as usize) {
            Some(Some((_, b))) => {
                *b = bias;
                Ok(())
            }
            _ => Err(refuse("cublasLtMatmulDescSetAttribute on a destroyed plan".into())),
        }
    }

    fn lt_matmul(&self, plan: MatmulPlan, ops: &LtOperands) -> Result<(), DeviceError> {
        let (shape, bias) = self.plans.borrow()[plan.0 as usize]
            .ok_or_else(|| refuse("cublasLtMatmul with a destroyed plan".into()))?;
        if ops.workspace_bytes > 0 {
            self.check_range("cublasLtMatmul workspace", ops.workspace, ops.workspace_bytes)?;
        }
        let op = Op::Lt { shape, bias, ops: *ops };
        if self.record(&op) {
            return Ok(());
        }
        self.run(&op)
    }

    fn lt_destroy_plan(&self, plan: MatmulPlan) {
        if let Some(p) = self.plans.borrow_mut().get_mut(plan.0 as usize) {
            *p = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::device::GemmTypes;
    use super::*;

    fn message(e: DeviceError) -> String {
        format!("{e:?}")
    }

    /// Zeroes `n` floats at `buf` with the real `ew_zero` kernel (1-D grid-stride).
    fn zero(d: &EmuDevice, buf: u64, n: usize) -> Result<(), DeviceError> {
        let f = d.function("ew_zero").expect("the emulated device has ew_zero");
        d.launch(
            f,
            LaunchDims { grid: (n.div_ceil(256) as u32, 1, 1), block: (256, 1, 1), shared_bytes: 0 },
            &[buf, n as u64],
        )
    }

    #[test]
    fn a_kernel_fault_is_a_sticky_error_that_names_the_kernel() {
        let d = EmuDevice::open();
        let buf = d.alloc(64 * 4).unwrap();
        // 64 floats allocated, 4096 zeroed: the kernel writes into the guard page after them. The
        // launch itself returns, as an asynchronous launch does; the fault surfaces at the sync.
        zero(&d, buf, 4096).expect("the launch returns before its fault is seen");
        let e = message(d.synchronize().unwrap_err());
        assert!(e.contains("SIGSEGV") && e.contains("kernel ew_zero grid (16,1,1)"), "{e}");
        // Sticky: every later call fails with the same fault.
        for e in [message(d.alloc(16).unwrap_err()), message(d.copy_dtoh(&mut [0u8; 4], buf).unwrap_err())] {
            assert!(e.contains("faulted earlier") && e.contains("ew_zero"), "{e}");
        }
        // A new device starts clean: the same kernel, in bounds, zeroes a fresh (0xFF) allocation.
        let d2 = EmuDevice::open();
        let b2 = d2.alloc(64 * 4).unwrap();
        zero(&d2, b2, 64).unwrap();
        d2.synchronize().unwrap();
        let mut out = vec![0xAAu8; 64 * 4];
        d2.copy_dtoh(&mut out, b2).unwrap();
        assert!(out.iter().all(|&b| b == 0), "ew_zero after a fault left {:?}…", &out[..8]);
    }

    fn upload(d: &EmuDevice, v: &[f32]) -> u64 {
        let p = d.alloc(v.len() * 4).unwrap();
        d.copy_htod(p, &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        p
    }

    fn download(d: &EmuDevice, p: u64, n: usize) -> Vec<f32> {
        let mut bytes = vec![0u8; n * 4];
        d.copy_dtoh(&mut bytes, p).unwrap();
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }

    /// cuBLASLt's strided batch and out-of-place D as the emulator runs them, against the
    /// documented definition (D_i = op(A_i)·op(B_i) + beta·C_i, X_i = X + i·stride, column-major),
    /// on small integers so that f32 is exact: C stays as it was, B is shared (stride 0); and a
    /// stride that breaks the promised alignment of a later product, or a D overlapping C, is refused.
    #[test]
    fn a_batched_out_of_place_lt_product_follows_the_definition() {
        let d = EmuDevice::open();
        let (m, n, k, count) = (3usize, 2usize, 4usize, 2usize);
        let a: Vec<f32> = (0..count * m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 2.0).collect();
        let c: Vec<f32> = (0..count * m * n).map(|i| i as f32 * 0.5 - 1.0).collect();
        let (pa, pb, pc) = (upload(&d, &a), upload(&d, &b), upload(&d, &c));
        let pd = upload(&d, &vec![f32::NAN; count * m * n]);
        let shape = GemmShape {
            ta: false,
            tb: false,
            m,
            n,
            k,
            lda: m,
            ldb: k,
            ldc: m,
            compute: Compute::F32,
            types: GemmTypes::F32,
        };
        let batch = LtBatch { count, stride_a: m * k, stride_b: 0, stride_c: m * n };
        let key = LtMatmul { shape, bias: false, align: [4; 4], batch };
        let plan = d.lt_plan(&key, 0).unwrap();
        let ops = LtOperands { alpha: 1.0, beta: 1.0, a: pa, b: pb, c: pc, d: pd, workspace: 0, workspace_bytes: 0 };
        d.lt_matmul(plan, &ops).unwrap();
        d.synchronize().unwrap();
        let got = download(&d, pd, count * m * n);
        for (p, j, i) in (0..count).flat_map(|p| (0..n).flat_map(move |j| (0..m).map(move |i| (p, j, i)))) {
            let dot: f32 = (0..k).map(|q| a[p * m * k + i + q * m] * b[q + j * k]).sum();
            let want = dot + c[p * m * n + i + j * m];
            assert_eq!(got[p * m * n + i + j * m], want, "D of product {p} at ({i}, {j})");
        }
        assert_eq!(download(&d, pc, count * m * n), c, "C must only be read");
        // A stride of 3 elements puts product 1's A 12 bytes past a 16-byte promise.
        let key16 = LtMatmul { align: [16, 4, 4, 4], batch: LtBatch { stride_a: 3, ..batch }, ..key };
        let a16 = d.alloc(64 * 4).unwrap();
        let plan16 = d.lt_plan(&key16, 0).unwrap();
        let e = message(d.lt_matmul(plan16, &LtOperands { a: a16, ..ops }).unwrap_err());
        assert!(e.contains("(product 1)") && e.contains("16-byte"), "{e}");
        let e = message(d.lt_matmul(plan, &LtOperands { d: pc + 4, ..ops }).unwrap_err());
        assert!(e.contains("overlaps C"), "{e}");
    }

    #[test]
    fn a_refused_launch_leaves_the_device_usable() {
        let d = EmuDevice::open();
        let buf = d.alloc(64 * 4).unwrap();
        let f = d.function("ew_zero").unwrap();
        let cases: [(&[u64], (u32, u32, u32), &str); 3] = [
            (&[buf], (256, 1, 1), "takes 2 parameters, the launch passes 1"),
            (&[64, buf], (256, 1, 1), "argument 1 is a 4-byte parameter"),
            (&[buf, 64], (2048, 1, 1), "block past the limits"),
        ];
        for (args, block, want) in cases {
            let e = message(d.launch(f, LaunchDims { grid: (1, 1, 1), block, shared_bytes: 0 }, args).unwrap_err());
            assert!(e.contains(want), "expected '{want}' in: {e}");
        }
        zero(&d, buf, 64).unwrap();
        d.synchronize().unwrap();
        let mut out = vec![0xAAu8; 64 * 4];
        d.copy_dtoh(&mut out, buf).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }
}

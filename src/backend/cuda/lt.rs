//! Linear-layer GEMMs through cuBLASLt: the forward's bias add fused into the product (the BIAS
//! epilogue) and the backward's accumulating products, with the matmul descriptor, layouts and
//! the heuristic's algorithm chosen once per shape and operand alignment and cached. Products
//! cuBLASLt declines (no algorithm, a refused call, a bias vector not 16-byte aligned) go through
//! cuBLAS `gemmEx` (`CudaBackend::gemm`, with the bias added by linear.cu), once noted.

use super::device::{Gemm, GemmShape, LtBatch, LtMatmul, LtOperands, MatmulPlan};
use super::CudaBackend;
use anyhow::{anyhow, Result};

/// Bytes of the workspace handed to cuBLASLt (and to cuBLAS, so that neither allocates on its
/// own, which would break CUDA-graph capture): 32 MiB, NVIDIA's recommendation for Hopper.
pub(crate) const WORKSPACE_BYTES: usize = 32 << 20;

/// The largest power of two up to 256 that divides the address.
fn alignment(p: u64) -> u32 {
    if p == 0 {
        256
    } else {
        (1u64 << p.trailing_zeros().min(8)) as u32
    }
}

/// What a cuBLASLt product may add to a [`Gemm`]: `bias` (m values, one per row of C, i.e. per
/// output feature: the BIAS epilogue); `d`, the output when it is not C (in C's layout; C then
/// only read: the residual a linear layer adds); `batch`, the products of one call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LtExtras {
    pub bias: Option<u64>,
    pub d: Option<u64>,
    pub batch: LtBatch,
}

impl LtExtras {
    pub(crate) const NONE: LtExtras = LtExtras { bias: None, d: None, batch: LtBatch::SINGLE };
}

/// A shape's plan, by `LtMatmul` (shape, compute type and the operands' alignments, up to 256
/// bytes: cuBLASLt's heuristics assume 256-byte-aligned operands unless told, and our tensors sit
/// at any f32 offset of a pool).
pub(crate) enum LtPlan {
    /// The matmul descriptor, layouts and algorithm (device.rs `lt_plan`).
    Ready(MatmulPlan),
    /// cuBLASLt has no algorithm for this shape: cuBLAS gemmEx.
    Declined,
}

impl CudaBackend {
    /// D = op(A)·op(B) + beta·C, f32 in memory, compute type as `gemm` (`g.alpha` must be 1
    /// and `g.compute` is the backend's to choose), with what `x` adds: the bias, D beside C, a
    /// batch. False where cuBLASLt declines (nothing ran: the caller goes through cuBLAS).
    pub(crate) fn lt_gemm(&self, g: &Gemm, x: LtExtras) -> Result<bool> {
        let Gemm { ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc, .. } = *g;
        let LtExtras { bias, d, batch } = x;
        debug_assert_eq!(g.alpha, 1.0, "lt_gemm runs alpha 1");
        // One bias for every product of a batch is not what a caller of a batch would mean.
        debug_assert!(bias.is_none() || batch.count == 1, "lt_gemm: a bias with a batch");
        if m == 0 || n == 0 || batch.count == 0 {
            return Ok(true);
        }
        // The BIAS epilogue wants a 16-byte-aligned bias vector (as other users of it found): a
        // less aligned bias takes the cuBLAS path, which adds the bias with its own kernel.
        if bias.is_some_and(|b| b % 16 != 0) {
            return Ok(false);
        }
        let types = g.types;
        let shape = GemmShape { ta, tb, m, n, k, lda, ldb, ldc, compute: self.gemm_compute(&types), types };
        let d = d.unwrap_or(c);
        // Every product of a batch must honour the promise: the base's alignment and the
        // stride's, whichever is smaller.
        let bytes = |stride: usize, size: usize| if batch.count > 1 { (stride * size) as u64 } else { 0 };
        let [za, zb, zc] = types.sizes();
        let (sa, sb, sc) = (bytes(batch.stride_a, za), bytes(batch.stride_b, zb), bytes(batch.stride_c, zc));
        let align = [a | sa, b | sb, c | sc, d | sc].map(alignment);
        let key = LtMatmul { shape, bias: bias.is_some(), align, batch };
        if !self.lt_plans.borrow().contains_key(&key) {
            let plan = self.lt_plan(&key);
            if matches!(plan, LtPlan::Declined) && !self.lt_declined_noted.replace(true) {
                crate::diag::note(format!(
                    "cuBLASLt declined a {m}×{n}×{k} product (no algorithm); using cuBLAS gemmEx for it"
                ));
            }
            self.lt_plans.borrow_mut().insert(key, plan);
        }
        let plans = self.lt_plans.borrow();
        let LtPlan::Ready(plan) = plans[&key] else {
            return Ok(false);
        };
        let timer = self.profile_start()?;
        let ran = {
            if let Some(bias) = bias {
                // The pointer changes from call to call; the descriptor keeps the rest.
                self.dev.lt_set_bias(plan, bias).map_err(|e| anyhow!("cuBLASLt: bias pointer: {e:?}"))?;
            }
            let ops = LtOperands {
                alpha: 1.0,
                beta,
                a,
                b,
                c,
                d,
                workspace: self.blas_workspace,
                workspace_bytes: WORKSPACE_BYTES,
            };
            let r = self.dev.lt_matmul(plan, &ops);
            if let Err(e) = &r {
                // Refused before anything ran (a status, not a fault): this shape goes through
                // cuBLAS from now on. Said once.
                drop(plans);
                if !self.lt_declined_noted.replace(true) {
                    crate::diag::note(format!(
                        "cuBLASLt refused a {m}×{n}×{k} product ({e:?}); using cuBLAS gemmEx for it"
                    ));
                }
                if let Some(LtPlan::Ready(old)) = self.lt_plans.borrow_mut().insert(key, LtPlan::Declined) {
                    self.dev.lt_destroy_plan(old);
                }
            }
            r.is_ok()
        };
        self.profile_end(timer, || match batch.count {
            1 => format!("cublaslt_matmul {m}×{n}×{k} (linear layers)"),
            count => format!("cublaslt_matmul {count}×({m}×{n}×{k}) (linear layers, batched)"),
        })?;
        Ok(ran)
    }

    /// The plan for `key`, or `Declined` when cuBLASLt has no algorithm for it or refuses any
    /// step of describing it (the device destroys whatever was created).
    fn lt_plan(&self, key: &LtMatmul) -> LtPlan {
        match self.dev.lt_plan(key, WORKSPACE_BYTES) {
            Ok(plan) => LtPlan::Ready(plan),
            Err(_) => LtPlan::Declined,
        }
    }

    /// Destroys every plan's handles (before the cuBLASLt handle goes).
    pub(crate) fn lt_destroy_plans(&self) {
        for (_, p) in self.lt_plans.borrow_mut().drain() {
            if let LtPlan::Ready(plan) = p {
                self.dev.lt_destroy_plan(plan);
            }
        }
    }
}

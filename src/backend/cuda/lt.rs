//! Linear-layer GEMMs through cuBLASLt: the forward's bias add fused into the product (the BIAS
//! epilogue) and the backward's accumulating products, with the matmul descriptor, layouts and
//! the heuristic's algorithm chosen once per shape and operand alignment and cached. Products
//! cuBLASLt declines (no algorithm, a refused call, a bias vector not 16-byte aligned) go through
//! cuBLAS `gemmEx` (`CudaBackend::gemm`, with the bias added by linear.cu), once noted.

use super::CudaBackend;
use anyhow::{anyhow, Result};
use cudarc::cublaslt::{result as lt, sys as lts};
use std::ffi::c_void;

/// Bytes of the workspace handed to cuBLASLt (and to cuBLAS, so that neither allocates on its
/// own, which would break CUDA-graph capture): 32 MiB, NVIDIA's recommendation for Hopper.
pub(crate) const WORKSPACE_BYTES: usize = 32 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct LtKey {
    ta: bool,
    tb: bool,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    bias: bool,
    bf16: bool,
    /// Alignments (bytes, a power of two up to 256) of A, B and C: cuBLASLt's heuristics assume
    /// 256-byte-aligned operands unless told, and our tensors sit at any f32 offset of a pool.
    align: [u32; 3],
}

/// The largest power of two up to 256 that divides the address.
fn alignment(p: u64) -> u32 {
    if p == 0 {
        256
    } else {
        (1u64 << p.trailing_zeros().min(8)) as u32
    }
}

pub(crate) enum LtPlan {
    Ready {
        desc: lts::cublasLtMatmulDesc_t,
        layouts: [lts::cublasLtMatrixLayout_t; 3],
        algo: lts::cublasLtMatmulAlgo_t,
    },
    /// cuBLASLt has no algorithm for this shape: cuBLAS gemmEx.
    Declined,
}

fn lt_err(what: &str, e: lt::CublasError) -> anyhow::Error {
    anyhow!("cuBLASLt: {what}: {e:?}")
}

impl CudaBackend {
    /// C (col-major m×n, ldc) = op(A)·op(B) + beta·C, plus `bias` (m values, one per row of C,
    /// i.e. per output feature) when given; f32 in memory, compute type as `gemm`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lt_gemm(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        beta: f32,
        c: u64,
        ldc: usize,
        bias: Option<u64>,
    ) -> Result<bool> {
        if m == 0 || n == 0 {
            return Ok(true);
        }
        // The BIAS epilogue wants a 16-byte-aligned bias vector (as other users of it found): a
        // less aligned bias takes the cuBLAS path, which adds the bias with its own kernel.
        if bias.is_some_and(|b| b % 16 != 0) {
            return Ok(false);
        }
        let key = LtKey {
            ta,
            tb,
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
            bias: bias.is_some(),
            bf16: self.use_bf16(),
            align: [alignment(a), alignment(b), alignment(c)],
        };
        if !self.lt_plans.borrow().contains_key(&key) {
            let plan = self.lt_plan(&key);
            if matches!(plan, LtPlan::Declined) && !self.lt_declined_noted.replace(true) {
                eprintln!("note: cuBLASLt declined a {m}×{n}×{k} product (no algorithm); using cuBLAS gemmEx for it");
            }
            self.lt_plans.borrow_mut().insert(key, plan);
        }
        let plans = self.lt_plans.borrow();
        let LtPlan::Ready { desc, layouts, algo } = &plans[&key] else {
            return Ok(false);
        };
        let alpha = 1.0f32;
        let timer = self.profile_start()?;
        let ran = unsafe {
            if let Some(bias) = bias {
                // The pointer changes from call to call; the descriptor keeps the rest.
                lt::set_matmul_desc_attribute(
                    *desc,
                    lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias as *const u64 as *const c_void,
                    std::mem::size_of::<u64>(),
                )
                .map_err(|e| lt_err("bias pointer", e))?;
            }
            let r = lt::matmul(
                self.lt_handle,
                *desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                a as *const c_void,
                layouts[0],
                b as *const c_void,
                layouts[1],
                c as *const c_void,
                layouts[2],
                c as *mut c_void,
                layouts[2],
                algo,
                self.blas_workspace as *mut c_void,
                WORKSPACE_BYTES,
                self.stream as lts::cudaStream_t,
            );
            if let Err(e) = r {
                // Refused before anything ran (a status, not a fault): this shape goes through
                // cuBLAS from now on. Said once.
                drop(plans);
                if !self.lt_declined_noted.replace(true) {
                    eprintln!("note: cuBLASLt refused a {m}×{n}×{k} product ({e:?}); using cuBLAS gemmEx for it");
                }
                // (The replaced plan's handles are destroyed by its Drop.)
                self.lt_plans.borrow_mut().insert(key, LtPlan::Declined);
            }
            r.is_ok()
        };
        self.profile_end(timer, "cublaslt_matmul (linear layers)")?;
        Ok(ran)
    }

    /// The plan for `key`, or `Declined` when cuBLASLt has no algorithm for it or refuses any
    /// step of describing it (whatever was created is destroyed).
    fn lt_plan(&self, key: &LtKey) -> LtPlan {
        let mut parts = LtParts { desc: None, layouts: Vec::new(), pref: None };
        match self.lt_describe(key, &mut parts) {
            Ok(algo) => {
                let desc = parts.desc.take().expect("described");
                let layouts = [parts.layouts[0], parts.layouts[1], parts.layouts[2]];
                parts.layouts.clear();
                LtPlan::Ready { desc, layouts, algo }
            }
            Err(_) => LtPlan::Declined, // `parts` destroys what was made
        }
    }

    fn lt_describe(&self, key: &LtKey, parts: &mut LtParts) -> Result<lts::cublasLtMatmulAlgo_t> {
        let compute = if key.bf16 {
            lts::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF
        } else {
            lts::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let f32t = lts::cudaDataType::CUDA_R_32F;
        let desc = lt::create_matmul_desc(compute, f32t).map_err(|e| lt_err("matmul descriptor", e))?;
        parts.desc = Some(desc);
        let set = |attr, v: &[u8]| unsafe {
            lt::set_matmul_desc_attribute(desc, attr, v.as_ptr() as *const c_void, v.len())
                .map_err(|e| lt_err("descriptor attribute", e))
        };
        // cublasOperation_t is an int32: N = 0, T = 1.
        set(lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, &(key.ta as i32).to_ne_bytes())?;
        set(lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, &(key.tb as i32).to_ne_bytes())?;
        if key.bias {
            let epi = lts::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS as u32;
            set(lts::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi.to_ne_bytes())?;
        }
        // Stored shapes: op(A) is m×k, so A is k×m when transposed; op(B) is k×n.
        let (ar, ac) = if key.ta { (key.k, key.m) } else { (key.m, key.k) };
        let (br, bc) = if key.tb { (key.n, key.k) } else { (key.k, key.n) };
        for (r, c, ld) in [(ar, ac, key.lda), (br, bc, key.ldb), (key.m, key.n, key.ldc)] {
            let l = lt::create_matrix_layout(f32t, r as u64, c as u64, ld as i64)
                .map_err(|e| lt_err("matrix layout", e))?;
            parts.layouts.push(l);
        }
        let pref = lt::create_matmul_pref().map_err(|e| lt_err("preference", e))?;
        parts.pref = Some(pref);
        let ws = WORKSPACE_BYTES as u64;
        unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                lts::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
            .map_err(|e| lt_err("workspace preference", e))?;
            use lts::cublasLtMatmulPreferenceAttributes_t as P;
            for (attr, al) in [
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align[0]),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align[1]),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align[2]),
                (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align[2]),
            ] {
                lt::set_matmul_pref_attribute(pref, attr, &al as *const u32 as *const c_void, 4)
                    .map_err(|e| lt_err("alignment preference", e))?;
            }
            let l = &parts.layouts;
            let h = lt::get_matmul_algo_heuristic(self.lt_handle, desc, l[0], l[1], l[2], l[2], pref)
                .map_err(|e| lt_err("heuristic", e))?;
            Ok(h.algo)
        }
    }

    /// Destroys every plan's handles (before the cuBLASLt handle goes).
    pub(crate) fn lt_destroy_plans(&self) {
        self.lt_plans.borrow_mut().clear();
    }
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        if let LtPlan::Ready { desc, layouts, .. } = self {
            unsafe {
                let _ = lt::destroy_matmul_desc(*desc);
                for l in layouts.iter() {
                    let _ = lt::destroy_matrix_layout(*l);
                }
            }
        }
    }
}

/// What `lt_describe` has created so far; destroyed on drop unless taken into a plan (the
/// preference is always destroyed: plans do not keep it).
pub(crate) struct LtParts {
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

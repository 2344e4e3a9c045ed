//! The GEMM of the emulated device (issue 14; device.rs's plan): what `cublasGemmEx` and
//! `cublasLtMatmul` compute, on host memory, with the vendor libraries' exact semantics, so that a
//! backend call with a wrong transpose, leading dimension, alpha/beta or bias is caught without a
//! GPU. Checked against known answers that numpy computed from the cuBLAS/cuBLASLt documentation's
//! definitions (tests/fixtures/generate_gemm_kat.py), not against our backend's own calls, since an
//! emulation written by the caller could share the caller's misunderstanding.
//!
//! Semantics (device.rs `Gemm`/`LtMatmul`): column-major storage, element (i, j) of X at
//! `x[i + j·ldX]`; op(A) is m×k (A stored k×m when transposed), op(B) is k×n (B stored n×k when
//! transposed); C := alpha·op(A)·op(B) + beta·C, where beta = 0 does not read C (a NaN there does
//! not propagate); cuBLASLt's BIAS epilogue then adds bias[i] to every element of row i. With
//! `Compute::F32FastBf16` the library may round A and B to bf16 (nearest even) for its tensor cores;
//! the emulation always does, the stricter reading. Products are summed in f64 and the result
//! rounded to f32 once: a reference, which real GPUs match within their accumulation error.

#[cfg(test)]
use super::device::GemmTypes;
use super::device::{Compute, Gemm, GemmShape};

impl GemmShape {
    /// (rows, columns) of A and of B as stored.
    fn stored(&self) -> ((usize, usize), (usize, usize)) {
        let a = if self.ta { (self.k, self.m) } else { (self.m, self.k) };
        let b = if self.tb { (self.n, self.k) } else { (self.k, self.n) };
        (a, b)
    }

    /// The elements that A, B and C span from their first element (what must be addressable).
    pub(crate) fn spans(&self) -> (usize, usize, usize) {
        let span =
            |ld: usize, rows: usize, cols: usize| if rows == 0 || cols == 0 { 0 } else { ld * (cols - 1) + rows };
        let ((ar, ac), (br, bc)) = self.stored();
        (span(self.lda, ar, ac), span(self.ldb, br, bc), span(self.ldc, self.m, self.n))
    }

    /// What cuBLAS refuses (CUBLAS_STATUS_INVALID_VALUE), and buffers shorter than the operands.
    fn check(&self, a: usize, b: usize, c: usize) -> Result<(), String> {
        let ((a_rows, _), (b_rows, _)) = self.stored();
        let ld_ok = self.lda >= a_rows.max(1) && self.ldb >= b_rows.max(1) && self.ldc >= self.m.max(1);
        if !ld_ok {
            return Err(format!(
                "leading dimensions lda {} ldb {} ldc {} below the stored rows ({a_rows}, {b_rows}, {})",
                self.lda, self.ldb, self.ldc, self.m
            ));
        }
        let (na, nb, nc) = self.spans();
        for (what, have, need) in [("A", a, na), ("B", b, nb), ("C", c, nc)] {
            if have < need {
                return Err(format!("{what} spans {need} elements; the buffer holds {have}"));
            }
        }
        Ok(())
    }
}

impl From<&Gemm> for GemmShape {
    fn from(g: &Gemm) -> GemmShape {
        let Gemm { ta, tb, m, n, k, lda, ldb, ldc, compute, types, .. } = *g;
        GemmShape { ta, tb, m, n, k, lda, ldb, ldc, compute, types }
    }
}

/// bf16 rounding, nearest even (NaN stays NaN), as `__float2bfloat16_rn` and the tensor cores.
fn bf16(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(rounded)
}

/// C := alpha·op(A)·op(B) + beta·C (+ bias[i] on row i), on host slices that start at each
/// operand's first element. Errors as cuBLAS would refuse the call, or when a slice is shorter
/// than the operand it must hold.
pub(crate) fn gemm(
    s: &GemmShape,
    alpha: f32,
    a: &[f32],
    b: &[f32],
    beta: f32,
    c: &mut [f32],
    bias: Option<&[f32]>,
) -> Result<(), String> {
    s.check(a.len(), b.len(), c.len())?;
    if let Some(bias) = bias {
        if bias.len() < s.m {
            return Err(format!("the bias has {} entries; D has {} rows", bias.len(), s.m));
        }
    }
    let round = |x: f32| if s.compute == Compute::F32FastBf16 { bf16(x) } else { x };
    let op_a = |i: usize, p: usize| round(if s.ta { a[p + i * s.lda] } else { a[i + p * s.lda] }) as f64;
    let op_b = |p: usize, j: usize| round(if s.tb { b[j + p * s.ldb] } else { b[p + j * s.ldb] }) as f64;
    for j in 0..s.n {
        for i in 0..s.m {
            let mut acc = 0f64;
            for p in 0..s.k {
                acc += op_a(i, p) * op_b(p, j);
            }
            let at = i + j * s.ldc;
            let mut d = alpha as f64 * acc;
            if beta != 0.0 {
                d += beta as f64 * c[at] as f64;
            }
            if let Some(bias) = bias {
                d += bias[i] as f64;
            }
            c[at] = d as f32;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The known answers of tests/fixtures/gemm/kat.safetensors, each case run and compared.
    #[test]
    fn gemm_matches_the_documented_definition_on_known_answers() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gemm/kat.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let cases: serde_json::Value = serde_json::from_str(&meta.metadata().as_ref().unwrap()["cases"]).unwrap();
        let get = |name: &str| -> Vec<f32> {
            let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
        };
        let cases = cases.as_array().unwrap();
        assert!(cases.len() >= 9, "the fixture lists {} cases", cases.len());
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let u = |k: &str| case[k].as_u64().unwrap() as usize;
            let s = GemmShape {
                ta: case["ta"].as_bool().unwrap(),
                tb: case["tb"].as_bool().unwrap(),
                m: u("m"),
                n: u("n"),
                k: u("k"),
                lda: u("lda"),
                ldb: u("ldb"),
                ldc: u("ldc"),
                compute: if case["bf16"].as_bool().unwrap() { Compute::F32FastBf16 } else { Compute::F32 },
                types: GemmTypes::F32,
            };
            let (alpha, beta) = (case["alpha"].as_f64().unwrap() as f32, case["beta"].as_f64().unwrap() as f32);
            let bias = case["bias"].as_bool().unwrap().then(|| get(&format!("{name}.bias")));
            let mut c = get(&format!("{name}.c"));
            let want = get(&format!("{name}.expected"));
            gemm(&s, alpha, &get(&format!("{name}.a")), &get(&format!("{name}.b")), beta, &mut c, bias.as_deref())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            for (idx, (g, w)) in c.iter().zip(&want).enumerate() {
                // Padding rows of C keep their bytes (NaN included); the block is within f32 rounding.
                if w.is_nan() {
                    assert!(g.is_nan(), "{name}: element {idx} should be untouched NaN padding, is {g}");
                    continue;
                }
                let err = (g - w).abs() / w.abs().max(1.0);
                assert!(err <= 1e-6, "{name}: element {idx}: ours {g}, reference {w} (relative error {err:.2e})");
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even mantissa (1.0).
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd mantissa) and 1 + 2^-6 (even): → 1 + 2^-6.
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert_eq!(bf16(1.0 + 1.5 / 256.0), 1.0 + 1.0 / 128.0);
        assert!(bf16(f32::NAN).is_nan());
    }

    #[test]
    fn leading_dimensions_below_the_rows_are_refused() {
        let s = GemmShape {
            ta: false,
            tb: false,
            m: 4,
            n: 2,
            k: 3,
            lda: 3,
            ldb: 3,
            ldc: 4,
            compute: Compute::F32,
            types: GemmTypes::F32,
        };
        let e = gemm(&s, 1.0, &[1.0; 12], &[1.0; 6], 0.0, &mut [0.0; 8], None).unwrap_err();
        assert!(e.contains("lda 3"), "{e}");
        let s = GemmShape { lda: 4, ..s };
        let e = gemm(&s, 1.0, &[1.0; 11], &[1.0; 6], 0.0, &mut [0.0; 8], None).unwrap_err();
        assert!(e.contains("A spans 12"), "{e}");
    }
}

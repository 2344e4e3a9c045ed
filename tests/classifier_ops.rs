//! The operations a DenseNet classifier trains with (issue 16) against PyTorch's CPU kernels
//! (fixture by tests/fixtures/generate_classifier_ops.py): batch norm in training mode (the batch's
//! statistics, the running statistics' update with momentum 0.1 and the unbiased variance, the
//! output with and without ReLU, and the backward), and pooling's backward (DenseNet's max 3/2/1
//! with tied values, its 2×2 average, the global average, a padded average both ways). The CUDA
//! kernels of the same operations are checked against these CPU references by tests/cuda.rs.

mod common;

use common::*;
use roentgen::backend::cpu::CpuBackend;
use roentgen::backend::{Backend, NormOps, PoolOps};
use roentgen::ops::norm::{BatchNormBackward, BatchNormForward, BatchNormParams, BatchNormStats, BatchNormTrainParams};
use roentgen::ops::pool::{Pool2dParams, PoolMode};
use roentgen::ops::Window2d;
use roentgen::tensor::{Shape, Tensor};
use serde_json::Value;

fn cases() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("classifier-ops/cases.json")).unwrap()).unwrap()
}

fn get(name: &str) -> Vec<f32> {
    read_f32(&fixture("classifier-ops/ops.safetensors"), name).1
}

fn put(b: &mut CpuBackend, data: &[f32]) -> Tensor {
    let pool = b.alloc(data.len().max(1), "t").unwrap();
    let t = Tensor { pool, offset: 0, shape: Shape::new(&[data.len()]) };
    b.upload(&t, data).unwrap();
    t
}

fn shape(v: &Value) -> Vec<usize> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect()
}

#[test]
fn batch_norm_training_matches_pytorch() {
    for case in cases()["batch_norm"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let [n, c, h, w] = shape(&case["shape"])[..] else { panic!() };
        let relu = case["relu"].as_bool().unwrap();
        let g = |t: &str| get(&format!("bn_{name}_{t}"));
        let mut b = CpuBackend::new();
        let rows = n * h * w;
        let p = BatchNormTrainParams { rows, channels: c, eps: 1e-5, momentum: 0.1, relu };
        let (x, weight, bias) = (put(&mut b, &g("x")), put(&mut b, &g("weight")), put(&mut b, &g("bias")));
        let (rm, rv) = (put(&mut b, &g("rm0")), put(&mut b, &g("rv0")));
        let zeros = |b: &mut CpuBackend, k: usize| put(b, &vec![0.0; k]);
        let (mean, rstd, scale, shift) = (zeros(&mut b, c), zeros(&mut b, c), zeros(&mut b, c), zeros(&mut b, c));
        let stats = BatchNormStats {
            inp: &x,
            weight: &weight,
            bias: &bias,
            running_mean: &rm,
            running_var: &rv,
            mean: &mean,
            rstd: &rstd,
            scale: &scale,
            shift: &shift,
        };
        b.batch_norm_stats(&p, &stats).unwrap();
        let y = zeros(&mut b, rows * c);
        let fwd = BatchNormForward { out: &y, inp: &x, scale: &scale, shift: &shift };
        b.batch_norm_forward(&BatchNormParams { rows, channels: c, relu }, &fwd).unwrap();
        let down = |t: &Tensor| b.download(t).unwrap();
        assert_close(&format!("{name}: batch mean"), &down(&mean), &g("mean"), 1e-6);
        assert_close(&format!("{name}: invstd"), &down(&rstd), &g("invstd"), 1e-6);
        assert_close(&format!("{name}: running mean"), &down(&rm), &g("rm1"), 1e-6);
        assert_close(&format!("{name}: running var (unbiased)"), &down(&rv), &g("rv1"), 1e-6);
        assert_close(&format!("{name}: output"), &down(&y), &g("y"), 1e-6);
        let (dx, dw, db, dy) = (zeros(&mut b, rows * c), zeros(&mut b, c), zeros(&mut b, c), put(&mut b, &g("dy")));
        let bwd = BatchNormBackward {
            dinp: &dx,
            dweight: &dw,
            dbias: &db,
            dout: &dy,
            inp: &x,
            out: &y,
            mean: &mean,
            rstd: &rstd,
            weight: &weight,
        };
        b.batch_norm_backward(&p, &bwd).unwrap();
        let down = |t: &Tensor| b.download(t).unwrap();
        assert_close(&format!("{name}: dx"), &down(&dx), &g("dx"), 1e-5);
        assert_close(&format!("{name}: dweight"), &down(&dw), &g("dweight"), 1e-5);
        assert_close(&format!("{name}: dbias"), &down(&db), &g("dbias"), 1e-5);
    }
}

#[test]
fn pooling_backward_matches_pytorch() {
    for case in cases()["pool"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let [n, c, h, w] = shape(&case["shape"])[..] else { panic!() };
        let (kernel, stride, pad, mode) = match name {
            "max3s2p1" => (3, 2, 1, PoolMode::Max),
            "avg2s2" => (2, 2, 0, PoolMode::Avg),
            "global" => (h, 1, 0, PoolMode::Avg),
            "avg3s2p1" => (3, 2, 1, PoolMode::Avg),
            "avg3s2p1_exclude" => (3, 2, 1, PoolMode::AvgExcludePad),
            other => panic!("unknown case {other}"),
        };
        let p = Pool2dParams {
            batch: n,
            channels: c,
            window: Window2d { h, w, kernel: [kernel, kernel], stride, pad: [pad; 4] },
            mode,
        };
        let g = |t: &str| get(&format!("pool_{name}_{t}"));
        let mut b = CpuBackend::new();
        let x = put(&mut b, &g("x"));
        let y = put(&mut b, &vec![0.0; p.out_elements()]);
        b.pool2d_forward(&p, &y, &x).unwrap();
        assert_close(&format!("{name}: forward"), &b.download(&y).unwrap(), &g("y"), 1e-6);
        // The gradient accumulates: start from a known value and subtract it after.
        let start: Vec<f32> = (0..p.in_elements()).map(|i| (i % 5) as f32 * 0.25).collect();
        let (dx, dy) = (put(&mut b, &start), put(&mut b, &g("dy")));
        b.pool2d_backward(&p, &dx, &dy, &x).unwrap();
        let got: Vec<f32> = b.download(&dx).unwrap().iter().zip(&start).map(|(d, s)| d - s).collect();
        assert_close(&format!("{name}: dx"), &got, &g("dx"), 1e-6);
    }
}

//! 2-D convolution on the GPU (kernels/conv.cu): forward and backward as implicit GEMMs.
//!
//! Semantics are those of the CPU reference (src/ops/conv.rs `Conv2dParams::cpu_forward`,
//! `cpu_backward`): NHWC activations, PyTorch weight layout
//! (c_out, c_in, k, k), pad [top, bottom, left, right], any stride ≥ 1. The forward overwrites `out`;
//! the backward adds into dinp, dweight and dbias.
//!
//! * forward: `conv2d_igemm_{f32,bf16}` over output pixels × c_out, reducing tap by tap over c_in,
//!   with the weight permuted to (c_out, k·k, c_in) in workspace slot `WS_SLOT` (for k = 1 that is
//!   the weight itself). The bf16 kernel reads bf16 weights: permuted from the bf16 copy the
//!   backend keeps of a parameter pool (params.rs; that permutation is kept while the copy is
//!   unchanged, not made again per call), or rounded from f32 while permuting.
//! * data gradient: the same kernel over input pixels × c_in, once per stride phase (py, px) (the
//!   input pixels with iy ≡ py, ix ≡ px mod stride), visiting only the taps whose output pixel
//!   (iy + pt − ky)/stride is whole, with the weight permuted to (k·k, c_in, c_out).
//! * weight gradient: `conv2d_wgrad_{f32,bf16}`, one tap per block row, the pixel sum split over
//!   grid.z with atomicAdd.
//! * bias gradient: `conv2d_bias_grad`, column sums of dout.

use super::autotune::TunableOp;
use super::bridge::Role;
use super::launch::*;
use super::{nonempty_i32, to_i32, CudaBackend};
use crate::backend::ConvOps;
use crate::ops::conv::{Conv2dBackward, Conv2dForward, Conv2dParams, Im2colParams};
use crate::tensor::{DType, Tensor};
use anyhow::{ensure, Result};

/// The workspace slot holding the permuted weight (valid only during one call).
const WS_SLOT: usize = 0;
/// Workspace slot of split-K's partial sums (version 2).
const SPLIT_SLOT: usize = 1;

/// Tile sizes of kernels/conv.cu (must match F_BM/F_BN/F_BK and H_BM/H_BN/H_BK there).
const F_BM: usize = 64;
const F_BN: usize = 64;
const F_BK: usize = 16;
const H_BM: usize = 128;
const H_BN: usize = 64;
const H_BK: usize = 32;
const THREADS: u32 = 256;

/// An i32 kernel argument, refusing sizes past i32 (the kernels index with 32-bit ints).
fn int(what: &str, v: usize) -> Result<i32> {
    to_i32(&format!("conv2d {what}"), v)
}

/// Arguments of one conv2d_igemm_* launch (see the comment above those kernels in conv.cu): its
/// buffers (0 for an epilogue input not given) and its shape.
#[derive(Clone, Copy)]
struct Igemm {
    dst: u64,
    src: u64,
    wt: u64,
    bias: u64,
    /// (batch, n): added per image after the bias (the forward only).
    batch_bias: u64,
    /// Laid out as dst: added last (the forward only).
    residual: u64,
    shape: IgemmShape,
}

/// An implicit-GEMM convolution launch without its buffers (see [`Igemm`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IgemmShape {
    /// Rows: a (batch, rh, rw) grid.
    batch: usize,
    rh: usize,
    rw: usize,
    n: usize,
    c: usize,
    sh: usize,
    sw: usize,
    ss: usize,
    sy0: i64,
    sx0: i64,
    tys: i64,
    txs: i64,
    nty: usize,
    ntx: usize,
    tap0: usize,
    tapys: usize,
    tapxs: usize,
    bs_n: usize,
    bs_t: usize,
    dh: usize,
    dw: usize,
    os: usize,
    dy0: usize,
    dx0: usize,
    accumulate: bool,
}

impl IgemmShape {
    /// "M×N×C taps a×b" (+ " acc"): rows, columns, channels per tap and the taps walked.
    pub fn key(&self) -> String {
        let m = self.batch * self.rh * self.rw;
        let acc = if self.accumulate { " acc" } else { "" };
        format!("{m}x{}x{} taps {}x{}{acc}", self.n, self.c, self.nty, self.ntx)
    }

    /// The launch's multiply-adds × 2: rows × output channels × (channels × taps) × 2.
    pub fn flops(&self) -> usize {
        2 * self.batch * self.rh * self.rw * self.n * self.c * self.nty * self.ntx
    }

    /// (source, weight, destination) elements the launch reads and writes.
    pub fn extents(&self) -> (usize, usize, usize) {
        let src = self.batch * self.sh * self.sw * self.c;
        let last_tap = self.tap0 + (self.nty - 1) * self.tapys + (self.ntx - 1) * self.tapxs;
        let wt = (self.n - 1) * self.bs_n + last_tap * self.bs_t + self.c;
        (src, wt, self.batch * self.dh * self.dw * self.n)
    }
}

impl CudaBackend {
    /// Runs the launch `s` on buffers `dst`, `src`, `wt` (bf16 on the bf16 path) without a bias:
    /// autotune.rs's replay of a recorded convolution.
    pub(crate) fn conv_igemm_replay(&self, s: &IgemmShape, dst: u64, src: u64, wt: u64) -> Result<()> {
        self.conv_igemm(&Igemm { dst, src, wt, bias: 0, batch_bias: 0, residual: 0, shape: *s })
    }
}

/// Dynamic shared memory of kernels/conv_pipeline.cu's `Smem<stages>`: per stage the f32
/// activation tile (H_BM × H_BK) and the bf16 weight tile (H_BN rows of H_LDW words), then two bf16
/// activation tiles (H_BM rows of H_LDW words).
fn pipeline_smem(stages: usize) -> u32 {
    const H_LDW_BYTES: usize = (H_BK / 2 + 4) * 4;
    (stages * (H_BM * H_BK * 4 + H_BN * H_LDW_BYTES) + 2 * H_BM * H_LDW_BYTES) as u32
}

/// Split-K for `blocks` output tiles of `ktiles` reduction tiles on `sms` multiprocessors: when
/// fewer than 2 × sms blocks would launch, enough splits to reach that (at least 4 reduction tiles
/// each, at most 32 splits), as (splits, tiles per split) with no empty split; None otherwise.
fn split_k(blocks: usize, ktiles: usize, sms: usize) -> Option<(usize, usize)> {
    const MIN_TILES: usize = 4;
    const MAX_SPLITS: usize = 32;
    let target = 2 * sms;
    if blocks == 0 || blocks >= target || ktiles < 2 * MIN_TILES {
        return None;
    }
    let want = target.div_ceil(blocks).min(ktiles / MIN_TILES).min(MAX_SPLITS);
    let per_split = ktiles.div_ceil(want);
    let splits = ktiles.div_ceil(per_split);
    (splits >= 2).then_some((splits, per_split))
}

fn small(what: &str, v: i64) -> Result<i32> {
    ensure!(v.unsigned_abs() <= i32::MAX as u64, "conv2d: {what} = {v} exceeds the kernels' 32-bit indices");
    Ok(v as i32)
}

impl CudaBackend {
    /// Permutes the PyTorch weight (c_out, c_in, taps) with element (co, ci, t) at
    /// co·s_co + ci·s_ci + t·s_t: into the workspace, or for a parameter in bf16 into the
    /// permutation its copy keeps (params.rs), made only when the copy has changed since. Returns
    /// the permuted weight's address.
    fn conv_permute_weight(
        &self,
        weight: &Tensor,
        c_out: usize,
        c_in: usize,
        taps: usize,
        strides: [usize; 3],
    ) -> Result<u64> {
        let total = c_out * c_in * taps;
        let [s_co, s_ci, s_t] = strides;
        // bf16 (what conv2d_igemm_bf16 reads): from the pool's bf16 copy when the weight is a
        // parameter (`mark_params`), else rounded from the f32 weight. f32: as it is.
        let grid = (total.div_ceil(THREADS as usize) as u32, 1, 1);
        let permute = |out: u64, w: u64| -> Result<Conv2dWeightPermute> {
            Ok(Conv2dWeightPermute {
                out,
                w,
                total: int("weight elements", total)?,
                c_in: int("c_in", c_in)?,
                taps: int("taps", taps)?,
                s_co: int("weight stride", s_co)?,
                s_ci: int("weight stride", s_ci)?,
                s_t: int("weight stride", s_t)?,
            })
        };
        let ws;
        if self.use_bf16() {
            match self.param_bf16(weight)? {
                Some(copy) => {
                    // A parameter's permutation is kept while its copy is unchanged (params.rs).
                    let launch = |out: u64| {
                        self.launch(Conv2dWeightPermuteBf16Copy::from(permute(out, copy)?), grid, (THREADS, 1, 1), 0)
                    };
                    let layout = (weight.offset, total, c_in, taps, strides);
                    if let Some(kept) = self.permuted_param(weight, layout, 2 * total, launch)? {
                        return Ok(kept);
                    }
                    ws = self.workspace(WS_SLOT, total.div_ceil(2).max(1))?;
                    launch(ws)?
                }
                None => {
                    ws = self.workspace(WS_SLOT, total.div_ceil(2).max(1))?;
                    let k = Conv2dWeightPermuteBf16::from(permute(ws, self.dptr(weight))?);
                    self.launch(k, grid, (THREADS, 1, 1), 0)?
                }
            }
        } else {
            ws = self.workspace(WS_SLOT, total.max(1))?;
            self.launch(permute(ws, self.dptr(weight))?, grid, (THREADS, 1, 1), 0)?;
        }
        Ok(ws)
    }

    fn conv_igemm(&self, launch: &Igemm) -> Result<()> {
        let Igemm { dst, src, wt, bias, batch_bias, residual, shape } = *launch;
        let g = &shape;
        let m = g.batch * g.rh * g.rw;
        if m == 0 || g.n == 0 {
            return Ok(());
        }
        // Largest element offsets are 64-bit in the kernels; pixel and row counts must fit i32.
        int("rows", m)?;
        int("batch·height", g.batch * g.sh.max(g.dh))?;
        let bf16 = self.use_bf16();
        let (bm, bn) = if bf16 { (H_BM, H_BN) } else { (F_BM, F_BN) };
        let grid_x = m.div_ceil(bm);
        let grid_y = g.n.div_ceil(bn);
        ensure!(grid_x <= i32::MAX as usize && grid_y <= 65535, "conv2d: grid {grid_x}×{grid_y} too large");
        let k = Conv2dIgemmF32 {
            dst,
            src,
            wt,
            bias,
            batch_bias,
            residual,
            M: int("rows", m)?,
            RH: int("rh", g.rh)?,
            RW: int("rw", g.rw)?,
            N: int("n", g.n)?,
            C: int("c", g.c)?,
            SH: int("sh", g.sh)?,
            SW: int("sw", g.sw)?,
            ss: int("ss", g.ss)?,
            sy0: small("sy0", g.sy0)?,
            sx0: small("sx0", g.sx0)?,
            tys: small("tys", g.tys)?,
            txs: small("txs", g.txs)?,
            nty: int("nty", g.nty)?,
            ntx: int("ntx", g.ntx)?,
            tap0: int("tap0", g.tap0)?,
            tapys: int("tapys", g.tapys)?,
            tapxs: int("tapxs", g.tapxs)?,
            bs_n: int("bs_n", g.bs_n)?,
            bs_t: int("bs_t", g.bs_t)?,
            DH: int("dh", g.dh)?,
            DW: int("dw", g.dw)?,
            os: int("os", g.os)?,
            dy0: int("dy0", g.dy0)?,
            dx0: int("dx0", g.dx0)?,
            accumulate: g.accumulate as i32,
        };
        let grid = (grid_x as u32, grid_y as u32, 1);
        if !bf16 {
            return self.launch(k, grid, (THREADS, 1, 1), 0);
        }
        let ktiles = g.nty * g.ntx * g.c.div_ceil(H_BK);
        // kernels/conv.cu: version 2 splits the reduction where the grid is small; every later
        // version does too, with its own tile loop: 3 the ldmatrix / two-stage one (`_v3`),
        // kernels/conv_pipeline.cu's 4, 5 and 6 the cp.async pipeline of 2, 3 and 4 stages.
        let version = self.kernel_version(TunableOp::Conv(shape));
        if version >= 2 {
            if let Some((splits, per_split)) = split_k(grid_x * grid_y, ktiles, self.dev.multiprocessor_count()) {
                // kernels/conv.cu "split-K, version 2": slices in workspace slot SPLIT_SLOT (the
                // weight is in WS_SLOT), summed in order by the reduce kernel.
                let part = self.workspace(SPLIT_SLOT, splits * m * g.n)?;
                let split = Conv2dIgemmBf16Splitk {
                    part,
                    src: k.src,
                    wt: k.wt,
                    M: k.M,
                    RH: k.RH,
                    RW: k.RW,
                    N: k.N,
                    C: k.C,
                    SH: k.SH,
                    SW: k.SW,
                    ss: k.ss,
                    sy0: k.sy0,
                    sx0: k.sx0,
                    tys: k.tys,
                    txs: k.txs,
                    nty: k.nty,
                    ntx: k.ntx,
                    tap0: k.tap0,
                    tapys: k.tapys,
                    tapxs: k.tapxs,
                    bs_n: k.bs_n,
                    bs_t: k.bs_t,
                    kt_per_split: int("reduction tiles per split", per_split)?,
                };
                let split_grid = (grid_x as u32, grid_y as u32, splits as u32);
                let block = (THREADS, 1, 1);
                match version {
                    2 => self.launch(split, split_grid, block, 0)?,
                    3 => self.launch(Conv2dIgemmBf16SplitkV3::from(split), split_grid, block, 0)?,
                    4 => self.launch(Conv2dIgemmBf16SplitkV4::from(split), split_grid, block, pipeline_smem(2))?,
                    5 => self.launch(Conv2dIgemmBf16SplitkV5::from(split), split_grid, block, pipeline_smem(3))?,
                    _ => self.launch(Conv2dIgemmBf16SplitkV6::from(split), split_grid, block, pipeline_smem(4))?,
                }
                let reduce = Conv2dSplitkReduce {
                    dst: k.dst,
                    part,
                    bias: k.bias,
                    batch_bias: k.batch_bias,
                    residual: k.residual,
                    splits: splits as i32,
                    M: k.M,
                    RH: k.RH,
                    RW: k.RW,
                    N: k.N,
                    DH: k.DH,
                    DW: k.DW,
                    os: k.os,
                    dy0: k.dy0,
                    dx0: k.dx0,
                    accumulate: k.accumulate,
                };
                return self.ops_launch1(m * g.n, reduce);
            }
        }
        let block = (THREADS, 1, 1);
        match version {
            1 | 2 => self.launch(Conv2dIgemmBf16::from(k), grid, block, 0),
            3 => self.launch(Conv2dIgemmBf16V3::from(k), grid, block, 0),
            4 => self.launch(Conv2dIgemmBf16V4::from(k), grid, block, pipeline_smem(2)),
            5 => self.launch(Conv2dIgemmBf16V5::from(k), grid, block, pipeline_smem(3)),
            _ => self.launch(Conv2dIgemmBf16V6::from(k), grid, block, pipeline_smem(4)),
        }
    }
}

impl ConvOps for CudaBackend {
    /// bf16 activations (out, inp, residual) go through the bf16 bridge (bridge.rs) until the
    /// implicit GEMMs load bf16 operands themselves.
    fn conv2d_forward(&self, p: &Conv2dParams, t: &Conv2dForward) -> Result<()> {
        p.check_forward(t)?;
        // The per-sample bias (a time embedding's projection) is an activation too.
        let mut acts = vec![(t.out, Role::Out), (t.inp, Role::In)];
        acts.extend(t.residual.map(|r| (r, Role::In)));
        acts.extend(t.batch_bias.map(|r| (r, Role::In)));
        if acts.iter().any(|(a, _)| a.dtype == DType::BF16) {
            return self.bridged(&acts, |v| {
                let mut rest = v[2..].iter();
                let residual = t.residual.and_then(|_| rest.next());
                let batch_bias = t.batch_bias.and_then(|_| rest.next());
                self.conv2d_forward(p, &Conv2dForward { out: &v[0], inp: &v[1], residual, batch_bias, ..*t })
            });
        }
        let Conv2dParams { batch, h, w, c_in, c_out, kernel, stride, pad } = *p;
        let Conv2dForward { out, inp, weight, bias, batch_bias, residual } = *t;
        let [pt, _, pl, _] = pad;
        let (oh, ow, taps) = (p.out_h(), p.out_w(), kernel * kernel);
        let bias_ptr = bias.map_or(0, |b| self.dptr(b));
        if batch * oh * ow == 0 || c_out == 0 {
            return Ok(());
        }
        // (c_out, taps, c_in): for a 1×1 kernel the weight as it is (in bf16: its parameter copy,
        // or a rounded copy in the workspace).
        let wt = match (taps, self.use_bf16()) {
            (1, false) => self.dptr(weight),
            (1, true) => match self.param_bf16(weight)? {
                Some(copy) => copy,
                None => self.conv_permute_weight(weight, c_out, c_in, taps, [taps * c_in, 1, c_in])?,
            },
            _ => self.conv_permute_weight(weight, c_out, c_in, taps, [taps * c_in, 1, c_in])?,
        };
        self.conv_igemm(&Igemm {
            dst: self.dptr(out),
            src: self.dptr(inp),
            wt,
            bias: bias_ptr,
            batch_bias: batch_bias.map_or(0, |b| self.dptr(b)),
            residual: residual.map_or(0, |r| self.dptr(r)),
            shape: IgemmShape {
                batch,
                rh: oh,
                rw: ow,
                n: c_out,
                c: c_in,
                sh: h,
                sw: w,
                ss: stride,
                sy0: -(pt as i64),
                sx0: -(pl as i64),
                tys: 1,
                txs: 1,
                nty: kernel,
                ntx: kernel,
                tap0: 0,
                tapys: kernel,
                tapxs: 1,
                bs_n: taps * c_in,
                bs_t: c_in,
                dh: oh,
                dw: ow,
                os: 1,
                dy0: 0,
                dx0: 0,
                accumulate: false,
            },
        })
    }

    fn conv2d_backward(&self, p: &Conv2dParams, t: &Conv2dBackward) -> Result<()> {
        p.check_backward(t)?;
        let Conv2dParams { batch, h, w, c_in, c_out, kernel, stride, pad } = *p;
        let Conv2dBackward { dinp, dweight, dbias, dout, inp, weight } = *t;
        let [pt, _, pl, _] = pad;
        let (oh, ow, taps, rows) = (p.out_h(), p.out_w(), kernel * kernel, p.out_rows());
        if rows == 0 || c_out == 0 {
            return Ok(());
        }
        int("rows", rows)?;
        int("batch·height", batch * h.max(oh))?;

        // Bias gradient: column sums of dout, rows split so that there are ~1024 blocks.
        if let Some(db) = dbias {
            let col_blocks = c_out.div_ceil(32);
            let splits = (1024 / col_blocks).clamp(1, rows.div_ceil(64).max(1)).min(65535);
            let chunk = rows.div_ceil(splits);
            let splits = rows.div_ceil(chunk);
            self.launch(
                Conv2dBiasGrad {
                    db: self.dptr(db),
                    dout: self.dptr(dout),
                    rows: int("rows", rows)?,
                    n: int("c_out", c_out)?,
                    chunk: int("chunk", chunk)?,
                },
                (col_blocks as u32, splits as u32, 1),
                (THREADS, 1, 1),
                0,
            )?;
        }

        // Weight gradient: the pixel sum split so that there are ~1024 blocks, ≥ 256 pixels each.
        if c_in > 0 {
            let bf16 = self.use_bf16();
            let (bm, bn, bk) = if bf16 { (H_BM, H_BN, H_BK) } else { (F_BM, F_BN, F_BK) };
            let gx = c_out.div_ceil(bm);
            let gy = c_in.div_ceil(bn) * taps;
            ensure!(gy <= 65535, "conv2d backward: {gy} weight-gradient block rows exceed the grid limit");
            let splits = (1024 / (gx * gy)).clamp(1, rows.div_ceil(256)).min(65535);
            let chunk = rows.div_ceil(splits).div_ceil(bk) * bk;
            let splits = rows.div_ceil(chunk);
            let k = Conv2dWgradF32 {
                dw: self.dptr(dweight),
                dout: self.dptr(dout),
                x: self.dptr(inp),
                P: int("rows", rows)?,
                oh: int("oh", oh)?,
                ow: int("ow", ow)?,
                h: int("h", h)?,
                w: int("w", w)?,
                c_in: int("c_in", c_in)?,
                c_out: int("c_out", c_out)?,
                k: int("kernel", kernel)?,
                stride: int("stride", stride)?,
                pt: int("pad top", pt)?,
                pl: int("pad left", pl)?,
                chunk: int("chunk", chunk)?,
            };
            let grid = (gx as u32, gy as u32, splits as u32);
            if bf16 {
                self.launch(Conv2dWgradBf16::from(k), grid, (THREADS, 1, 1), 0)?;
            } else {
                self.launch(k, grid, (THREADS, 1, 1), 0)?;
            }
        }

        // Data gradient: one launch per stride phase (py, px), over the input pixels
        // iy = qy·stride + py, ix = qx·stride + px. Tap ky reaches them when (iy + pt − ky) is a
        // multiple of the stride, i.e. ky = ky0 + j·stride with ky0 = (py + pt) mod stride; its output
        // row is oy = (iy + pt − ky)/stride = qy + (py + pt − ky0)/stride − j (the kernel drops
        // oy outside [0, oh)). Likewise for x.
        let Some(di) = dinp else { return Ok(()) };
        if batch * h * w == 0 || c_in == 0 {
            return Ok(());
        }
        // (taps, c_in, c_out): element (co, ci, t) at t·c_in·c_out + ci·c_out + co.
        let wt = self.conv_permute_weight(weight, c_out, c_in, taps, [1, c_out, c_in * c_out])?;
        let s = stride;
        for py in 0..s.min(h) {
            let ky0 = (py + pt) % s;
            let nty = if ky0 < kernel { (kernel - ky0).div_ceil(s) } else { 0 };
            for px in 0..s.min(w) {
                let kx0 = (px + pl) % s;
                let ntx = if kx0 < kernel { (kernel - kx0).div_ceil(s) } else { 0 };
                if nty == 0 || ntx == 0 {
                    continue; // no tap reaches this phase: its gradient is zero
                }
                self.conv_igemm(&Igemm {
                    dst: self.dptr(di),
                    src: self.dptr(dout),
                    wt,
                    bias: 0,
                    batch_bias: 0,
                    residual: 0,
                    shape: IgemmShape {
                        batch,
                        rh: (h - py).div_ceil(s),
                        rw: (w - px).div_ceil(s),
                        n: c_in,
                        c: c_out,
                        sh: oh,
                        sw: ow,
                        ss: 1,
                        sy0: ((py + pt - ky0) / s) as i64,
                        sx0: ((px + pl - kx0) / s) as i64,
                        tys: -1,
                        txs: -1,
                        nty,
                        ntx,
                        tap0: ky0 * kernel + kx0,
                        tapys: s * kernel,
                        tapxs: s,
                        bs_n: c_out,
                        bs_t: c_in * c_out,
                        dh: h,
                        dw: w,
                        os: s,
                        dy0: py,
                        dx0: px,
                        accumulate: true,
                    },
                })?;
            }
        }
        Ok(())
    }

    fn im2col_forward(&self, p: &Im2colParams, out: &Tensor, inp: &Tensor) -> Result<()> {
        p.check_forward(out, inp)?;
        let n = p.rows() * p.patch_len();
        to_i32("im2col inp", p.batch * p.window.h * p.window.w * p.channels)?;
        let Some(ni) = nonempty_i32("im2col", n)? else { return Ok(()) };
        let [h, w, oh, ow, kh, kw, stride, pt, pl] = super::pool::window_args(&p.window);
        let (out, inp, c) = (self.dptr(out), self.dptr(inp), p.channels as i32);
        let k = Conv2dIm2col { out, inp, h, w, c, oh, ow, kh, kw, stride, pt, pl, n: ni };
        self.ops_launch1(n, k)
    }
}

#[cfg(test)]
mod tests {
    use super::{pipeline_smem, split_k};

    #[test]
    fn pipeline_smem_is_the_kernels_smem_size() {
        // kernels/conv_pipeline.cu static_asserts sizeof(Smem<2/3/4>) to these numbers.
        assert_eq!([pipeline_smem(2), pipeline_smem(3), pipeline_smem(4)], [63488, 84992, 106496]);
    }

    #[test]
    fn split_k_fills_the_device_only_where_the_grid_is_small() {
        // SD's 8×8×1280 3×3 conv at batch 2: 20 tiles of 360 reduction tiles on 132 SMs.
        assert_eq!(split_k(20, 360, 132), Some((14, 26)));
        // Enough blocks already, or too short a reduction: none.
        assert_eq!(split_k(264, 360, 132), None);
        assert_eq!(split_k(20, 7, 132), None);
        // Never an empty split, never more than 32, at least 4 tiles each.
        for (blocks, ktiles) in [(1, 9), (1, 1000), (3, 37), (100, 50), (7, 8)] {
            if let Some((splits, per)) = split_k(blocks, ktiles, 132) {
                assert!(splits >= 2 && splits <= 32 && per >= 4, "{blocks} {ktiles}: {splits} × {per}");
                assert!((splits - 1) * per < ktiles && splits * per >= ktiles, "{blocks} {ktiles}: {splits} × {per}");
            }
        }
    }
}

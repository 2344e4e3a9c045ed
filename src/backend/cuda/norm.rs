//! Layer norm, group norm and batch norm on the GPU (ops/norm.rs; kernels/norm.cu). Statistics in
//! f64, as the CPU reference; no atomics, so results are deterministic. Workspace slot 0 holds
//! group norm's per-chunk partial sums and per-group statistics, and batch norm's per-chunk column
//! sums; slot 1 the per-chunk column sums of dweight/dbias, and batch norm's backward coefficients.

use super::autotune::TunableOp;
use super::launch::*;
use super::ops::{chunking, f64_at, BLOCK, COL_CHUNK_ROWS, COL_MAX_CHUNKS, MAX_GRID};
use super::{nonempty_i32, to_i32, CudaBackend};
use crate::backend::NormOps;
use crate::ops::activation_dtype;
use crate::ops::norm::{
    BatchNormBackward, BatchNormForward, BatchNormParams, BatchNormStats, BatchNormTrainParams, GroupNormBackward,
    GroupNormParams, LayerNormBackward, LayerNormParams, NormForward,
};
use crate::tensor::Tensor;
use anyhow::Result;

/// Group norm: elements per block aimed at by the statistics passes, and most chunks per group.
const GN_CHUNK_ELEMS: usize = 8192;
const GN_MAX_CHUNKS: usize = 1024;

/// How a group norm's statistics passes split the work: `nchunks` chunks of `rpc` positions per
/// (sample, group) (`bg` of them, `cpg` channels each), `blocks` = bg · nchunks blocks, and the f64
/// workspace: two per-chunk partial arrays (`part1`, `part2`: sums and squared deviations forward,
/// Σdxhat and Σdxhat·xhat backward), then the per-group statistics (`stats`, 2 per group).
struct GnPlan {
    n: usize,
    bg: usize,
    cpg: usize,
    nchunks: usize,
    rpc: usize,
    blocks: u32,
    part1: u64,
    part2: u64,
    stats: u64,
}

impl CudaBackend {
    /// The group norm's split and workspace; `None` when there is nothing to normalise. `what`
    /// names the op in the 32-bit index range error.
    fn gn_plan(&self, p: &GroupNormParams, what: &str) -> Result<Option<GnPlan>> {
        let (n, bg) = (p.elements(), p.batch * p.groups);
        let Some(_) = nonempty_i32(what, n)? else { return Ok(None) };
        let cpg = p.channels_per_group();
        let (nchunks, rpc) = chunking(p.hw, GN_CHUNK_ELEMS / cpg, GN_MAX_CHUNKS);
        let blocks = to_i32(&format!("{what} blocks"), bg * nchunks)? as u32;
        let ws = self.ops_workspace_f64(0, 2 * bg * nchunks + 2 * bg)?;
        let (part1, part2, stats) = (ws, f64_at(ws, bg * nchunks), f64_at(ws, 2 * bg * nchunks));
        Ok(Some(GnPlan { n, bg, cpg, nchunks, rpc, blocks, part1, part2, stats }))
    }

    /// dweight[ch] += Σ dy·xhat, dbias[ch] += Σ dy over all rows (f64 column sums by row chunks,
    /// then a fixed-order sum over the chunks): the parameter gradients of both norms.
    fn ops_norm_dparams(&self, dweight: u64, dbias: u64, s: NormDparams) -> Result<()> {
        let NormDparams { dout, inp, weight, bias, mean, rstd, rows, hw, c, groups, silu } = s;
        let (chunks, rpc) = chunking(rows, COL_CHUNK_ROWS, COL_MAX_CHUNKS);
        let part = self.ops_workspace_f64(1, chunks * c * 2)?;
        self.launch(
            NrmDparamsPartial {
                part,
                dout,
                inp,
                weight,
                bias,
                mean,
                rstd,
                rows: rows as i32,
                hw: hw as i32,
                c: c as i32,
                groups: groups as i32,
                rows_per_chunk: rpc as i32,
                silu: silu as i32,
            },
            (c.div_ceil(32) as u32, chunks as u32, 1),
            (32, 8, 1),
            0,
        )?;
        self.ops_launch1(c, NrmDparamsFinalize { dweight, dbias, part, c: c as i32, chunks: chunks as i32 })
    }
}

/// What the parameter gradients of a norm read (device addresses; `bias` only with SiLU): `rows`
/// rows of `c` channels, statistics per (sample, group) with `hw` rows a sample (a layer norm: one
/// group, hw 1).
struct NormDparams {
    dout: u64,
    inp: u64,
    weight: u64,
    bias: u64,
    mean: u64,
    rstd: u64,
    rows: usize,
    hw: usize,
    c: usize,
    groups: usize,
    silu: bool,
}

impl NormOps for CudaBackend {
    fn layer_norm_forward(&self, p: &LayerNormParams, t: &NormForward) -> Result<()> {
        p.check_forward(t)?;
        let LayerNormParams { rows, cols, eps } = *p;
        let NormForward { out, mean, rstd, inp, weight, bias } = *t;
        to_i32("layer_norm", rows * cols)?;
        if rows == 0 {
            return Ok(());
        }
        let dt = activation_dtype("layer_norm", &[("out", out), ("inp", inp)])?;
        // One warp per row, 8 rows per block.
        self.launch_act::<_, LnForwardBf16>(
            dt,
            LnForward {
                out: self.act_ptr(out),
                mean: self.dptr(mean),
                rstd: self.dptr(rstd),
                inp: self.act_ptr(inp),
                weight: self.dptr(weight),
                bias: self.dptr(bias),
                rows: rows as i32,
                cols: cols as i32,
                eps,
            },
            (rows.div_ceil(8).clamp(1, MAX_GRID) as u32, 1, 1),
            (BLOCK, 1, 1),
            0,
        )
    }

    /// Group norm forward. Version 1 in four launches: per-chunk sums, per-chunk squared deviations
    /// about the mean, per-group statistics (f64, two passes as the CPU), then the normalisation (+
    /// SiLU); version 2 (versions.rs) in one or two.
    fn group_norm_forward(&self, p: &GroupNormParams, t: &NormForward) -> Result<()> {
        p.check_forward(t)?;
        let GroupNormParams { batch, hw, channels: c, groups, eps, silu } = *p;
        let NormForward { out, mean, rstd, inp, weight, bias } = *t;
        let Some(GnPlan { n, bg, cpg, nchunks, rpc, blocks, part1: psum, part2: psq, stats }) =
            self.gn_plan(p, "group_norm")?
        else {
            return Ok(());
        };
        let (hw_i, c_i, g_i, nc_i, rpc_i) = (hw as i32, c as i32, groups as i32, nchunks as i32, rpc as i32);
        let dt = activation_dtype("group_norm", &[("out", out), ("inp", inp)])?;
        let x = self.act_ptr(inp);
        let grid = (blocks, 1, 1);
        if self.kernel_version(TunableOp::GroupNorm(*p)) == 2 {
            // kernels/norm.cu "version 2": one-pass moments (skipped when a group is one chunk),
            // then statistics and normalisation per block. psum/psq: the plan's two partial arrays.
            if nchunks > 1 {
                let (nc, rpc) = (nc_i, rpc_i);
                let moments = GnForwardMomentsV2 {
                    psum,
                    psq,
                    inp: x,
                    hw: hw_i,
                    c: c_i,
                    groups: g_i,
                    nchunks: nc,
                    rows_per_chunk: rpc,
                };
                self.launch_act::<_, GnForwardMomentsBf16V2>(dt, moments, grid, (BLOCK, 1, 1), 0)?;
            }
            let apply = GnForwardApplyV2 {
                out: self.act_ptr(out),
                mean: self.dptr(mean),
                rstd: self.dptr(rstd),
                inp: x,
                weight: self.dptr(weight),
                bias: self.dptr(bias),
                psum,
                psq,
                hw: hw_i,
                c: c_i,
                groups: g_i,
                nchunks: nc_i,
                rows_per_chunk: rpc_i,
                eps,
                silu: silu as i32,
            };
            return self.launch_act::<_, GnForwardApplyBf16V2>(dt, apply, grid, (BLOCK, 1, 1), 0);
        }
        self.launch_act::<_, GnForwardSumBf16>(
            dt,
            GnForwardSum { psum, inp: x, hw: hw_i, c: c_i, groups: g_i, nchunks: nc_i, rows_per_chunk: rpc_i },
            grid,
            (BLOCK, 1, 1),
            0,
        )?;
        self.launch_act::<_, GnForwardSqdevBf16>(
            dt,
            GnForwardSqdev { psq, psum, inp: x, hw: hw_i, c: c_i, groups: g_i, nchunks: nc_i, rows_per_chunk: rpc_i },
            grid,
            (BLOCK, 1, 1),
            0,
        )?;
        self.launch(
            GnForwardFinalize {
                mean: self.dptr(mean),
                rstd: self.dptr(rstd),
                stats,
                psum,
                psq,
                hw: hw_i,
                cpg: cpg as i32,
                nchunks: nc_i,
                eps,
            },
            (bg as u32, 1, 1),
            (32, 1, 1),
            0,
        )?;
        self.ops_launch1_act::<_, GnForwardApplyBf16>(
            dt,
            n,
            GnForwardApply {
                out: self.act_ptr(out),
                inp: x,
                weight: self.dptr(weight),
                bias: self.dptr(bias),
                stats,
                batch: batch as i32,
                hw: hw_i,
                c: c_i,
                groups: g_i,
                silu: silu as i32,
            },
        )
    }

    fn layer_norm_backward(&self, p: &LayerNormParams, t: &LayerNormBackward) -> Result<()> {
        p.check_backward(t)?;
        let LayerNormParams { rows, cols, .. } = *p;
        let LayerNormBackward { dinp, dweight, dbias, dout, inp, weight, mean, rstd } = *t;
        let n = rows * cols;
        let Some(_) = nonempty_i32("layer_norm_backward", n)? else { return Ok(()) };
        let (di, dy, x, w, m, r) =
            (self.dptr(dinp), self.dptr(dout), self.dptr(inp), self.dptr(weight), self.dptr(mean), self.dptr(rstd));
        self.launch(
            LnBackwardDinp {
                dinp: di,
                dout: dy,
                inp: x,
                weight: w,
                mean: m,
                rstd: r,
                rows: rows as i32,
                cols: cols as i32,
            },
            (rows.div_ceil(8).clamp(1, MAX_GRID) as u32, 1, 1),
            (BLOCK, 1, 1),
            0,
        )?;
        // Layer norm = statistics per row: hw = 1, one group; no SiLU, so no bias.
        let s = NormDparams {
            dout: dy,
            inp: x,
            weight: w,
            bias: 0,
            mean: m,
            rstd: r,
            rows,
            hw: 1,
            c: cols,
            groups: 1,
            silu: false,
        };
        self.ops_norm_dparams(self.dptr(dweight), self.dptr(dbias), s)
    }

    /// Group norm backward: per-chunk sums of dxhat and dxhat·xhat, per-group means, the input
    /// gradient, then the parameter gradients (`ops_norm_dparams`).
    fn group_norm_backward(&self, p: &GroupNormParams, t: &GroupNormBackward) -> Result<()> {
        p.check_backward(t)?;
        let GroupNormParams { batch, hw, channels: c, groups, silu, .. } = *p;
        let GroupNormBackward { dinp, dweight, dbias, dout, inp, weight, bias, mean, rstd } = *t;
        let Some(GnPlan { n, bg, cpg, nchunks, rpc, blocks, part1: p1, part2: p2, stats }) =
            self.gn_plan(p, "group_norm_backward")?
        else {
            return Ok(());
        };
        let (dy, x, w, b, m, r) =
            (self.dptr(dout), self.dptr(inp), self.dptr(weight), self.dptr(bias), self.dptr(mean), self.dptr(rstd));
        let (hw_i, c_i, g_i, nc_i) = (hw as i32, c as i32, groups as i32, nchunks as i32);
        self.launch(
            GnBackwardReduce {
                p1,
                p2,
                dout: dy,
                inp: x,
                weight: w,
                bias: b,
                mean: m,
                rstd: r,
                hw: hw_i,
                c: c_i,
                groups: g_i,
                nchunks: nc_i,
                rows_per_chunk: rpc as i32,
                silu: silu as i32,
            },
            (blocks, 1, 1),
            (BLOCK, 1, 1),
            0,
        )?;
        if self.kernel_version(TunableOp::GroupNormBackward(*p)) >= 2 {
            // kernels/norm.cu "group_norm_backward version 2": statistics and update per chunk.
            let v2 = GnBackwardDinpV2 {
                dinp: self.dptr(dinp),
                p1,
                p2,
                dout: dy,
                inp: x,
                weight: w,
                bias: b,
                mean: m,
                rstd: r,
                hw: hw_i,
                c: c_i,
                groups: g_i,
                nchunks: nc_i,
                rows_per_chunk: rpc as i32,
                silu: silu as i32,
            };
            self.launch(v2, (blocks, 1, 1), (BLOCK, 1, 1), 0)?;
        } else {
            self.launch(
                GnBackwardFinalize { stats, p1, p2, hw: hw_i, cpg: cpg as i32, nchunks: nc_i },
                (bg as u32, 1, 1),
                (32, 1, 1),
                0,
            )?;
            self.ops_launch1(
                n,
                GnBackwardDinp {
                    dinp: self.dptr(dinp),
                    dout: dy,
                    inp: x,
                    weight: w,
                    bias: b,
                    mean: m,
                    rstd: r,
                    stats,
                    batch: batch as i32,
                    hw: hw_i,
                    c: c_i,
                    groups: g_i,
                    silu: silu as i32,
                },
            )?;
        }
        let s = NormDparams {
            dout: dy,
            inp: x,
            weight: w,
            bias: b,
            mean: m,
            rstd: r,
            rows: batch * hw,
            hw,
            c,
            groups,
            silu,
        };
        self.ops_norm_dparams(self.dptr(dweight), self.dptr(dbias), s)
    }

    fn batch_norm_forward(&self, p: &BatchNormParams, t: &BatchNormForward) -> Result<()> {
        p.check_forward(t)?;
        let n = p.rows * p.channels;
        let Some(ni) = nonempty_i32("batch_norm", n)? else { return Ok(()) };
        let (out, inp, scale, shift) = (self.dptr(t.out), self.dptr(t.inp), self.dptr(t.scale), self.dptr(t.shift));
        let k = BnForward { out, inp, scale, shift, n: ni, c: p.channels as i32, relu: p.relu as i32 };
        self.ops_launch1(n, k)
    }

    fn batch_norm_stats(&self, p: &BatchNormTrainParams, t: &BatchNormStats) -> Result<()> {
        p.check_stats(t)?;
        let Some(_) = nonempty_i32("batch_norm_stats", p.rows * p.channels)? else { return Ok(()) };
        let (part, chunks) = self.bn_train_partial(p, t.inp, None)?;
        let k = BnTrainStats {
            mean: self.dptr(t.mean),
            rstd: self.dptr(t.rstd),
            scale: self.dptr(t.scale),
            shift: self.dptr(t.shift),
            running_mean: self.dptr(t.running_mean),
            running_var: self.dptr(t.running_var),
            part,
            weight: self.dptr(t.weight),
            bias: self.dptr(t.bias),
            rows: p.rows as i32,
            c: p.channels as i32,
            chunks: chunks as i32,
            eps: p.eps,
            momentum: p.momentum,
        };
        self.ops_launch1(p.channels, k)
    }

    fn batch_norm_backward(&self, p: &BatchNormTrainParams, t: &BatchNormBackward) -> Result<()> {
        p.check_backward(t)?;
        let n = p.rows * p.channels;
        let Some(ni) = nonempty_i32("batch_norm_backward", n)? else { return Ok(()) };
        let (part, chunks) = self.bn_train_partial(p, t.inp, Some(t))?;
        let coef = self.ops_workspace_f64(1, 2 * p.channels)?;
        let (rows, c) = (p.rows as i32, p.channels as i32);
        let (dweight, dbias) = (self.dptr(t.dweight), self.dptr(t.dbias));
        self.ops_launch1(p.channels, BnTrainDparams { dweight, dbias, coef, part, rows, c, chunks: chunks as i32 })?;
        let k = BnTrainDinp {
            dinp: self.dptr(t.dinp),
            dout: self.dptr(t.dout),
            inp: self.dptr(t.inp),
            out: self.dptr(t.out),
            mean: self.dptr(t.mean),
            rstd: self.dptr(t.rstd),
            weight: self.dptr(t.weight),
            coef,
            n: ni,
            c,
            relu: p.relu as i32,
        };
        self.ops_launch1(n, k)
    }
}

impl CudaBackend {
    /// `bn_train_partial` over row chunks into workspace slot 0: the statistics' sums (`bwd` None)
    /// or the backward's (its dout, out, mean and rstd). Returns the partials and the chunk count.
    fn bn_train_partial(
        &self,
        p: &BatchNormTrainParams,
        inp: &Tensor,
        bwd: Option<&BatchNormBackward>,
    ) -> Result<(u64, usize)> {
        let (rows, c) = (p.rows, p.channels);
        let (chunks, rpc) = chunking(rows, COL_CHUNK_ROWS, COL_MAX_CHUNKS);
        let part = self.ops_workspace_f64(0, chunks * c * 2)?;
        let ptr = |t: Option<&Tensor>| t.map_or(0, |t| self.dptr(t));
        let k = BnTrainPartial {
            part,
            inp: self.dptr(inp),
            dout: ptr(bwd.map(|b| b.dout)),
            out: ptr(bwd.map(|b| b.out)),
            mean: ptr(bwd.map(|b| b.mean)),
            rstd: ptr(bwd.map(|b| b.rstd)),
            rows: rows as i32,
            c: c as i32,
            rows_per_chunk: rpc as i32,
            mode: bwd.is_some() as i32,
            relu: p.relu as i32,
        };
        self.launch(k, (c.div_ceil(32) as u32, chunks as u32, 1), (32, 8, 1), 0)?;
        Ok((part, chunks))
    }
}

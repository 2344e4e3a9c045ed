//! Layer norm and group norm on the GPU (ops/norm.rs; kernels/norm.cu). Statistics in f64 with
//! two passes, as the CPU reference; no atomics, so results are deterministic. Workspace slot 0
//! holds group norm's per-chunk partial sums and per-group statistics, slot 1 the per-chunk column
//! sums of dweight/dbias.

use super::ops::{chunking, f64_at, BLOCK, COL_CHUNK_ROWS, COL_MAX_CHUNKS, MAX_GRID};
use super::{to_i32, Arg, CudaBackend};
use crate::ops::norm::{GroupNormBackward, GroupNormParams, LayerNormBackward, LayerNormParams, NormForward};
use anyhow::Result;

/// Group norm: elements per block aimed at by the statistics passes, and most chunks per group.
const GN_CHUNK_ELEMS: usize = 8192;
const GN_MAX_CHUNKS: usize = 1024;

impl CudaBackend {
    pub(crate) fn layer_norm_forward_impl(&self, p: &LayerNormParams, t: &NormForward) -> Result<()> {
        p.check_forward(t)?;
        let LayerNormParams { rows, cols, eps } = *p;
        let NormForward { out, mean, rstd, inp, weight, bias } = *t;
        to_i32("layer_norm", rows * cols)?;
        if rows == 0 {
            return Ok(());
        }
        // One warp per row, 8 rows per block.
        self.launch(
            "ln_forward",
            (rows.div_ceil(8).clamp(1, MAX_GRID) as u32, 1, 1),
            (BLOCK, 1, 1),
            0,
            &[
                Arg::P(self.dptr(out)),
                Arg::P(self.dptr(mean)),
                Arg::P(self.dptr(rstd)),
                Arg::P(self.dptr(inp)),
                Arg::P(self.dptr(weight)),
                Arg::P(self.dptr(bias)),
                Arg::I(rows as i32),
                Arg::I(cols as i32),
                Arg::F(eps),
            ],
        )
    }

    /// Group norm forward in four launches: per-chunk sums, per-chunk squared deviations about the
    /// mean, per-group statistics (f64, two passes as the CPU), then the normalisation (+ SiLU).
    pub(crate) fn group_norm_forward_impl(&self, p: &GroupNormParams, t: &NormForward) -> Result<()> {
        p.check_forward(t)?;
        let GroupNormParams { batch, hw, channels: c, groups, eps, silu } = *p;
        let NormForward { out, mean, rstd, inp, weight, bias } = *t;
        let (n, bg) = (p.elements(), batch * groups);
        to_i32("group_norm", n)?;
        if n == 0 {
            return Ok(());
        }
        let cpg = c / groups;
        let (nchunks, rpc) = chunking(hw, GN_CHUNK_ELEMS / cpg, GN_MAX_CHUNKS);
        let blocks = to_i32("group_norm blocks", bg * nchunks)?;
        let ws = self.ops_workspace_f64(0, 2 * bg * nchunks + 2 * bg)?;
        let (psum, psq, stats) = (ws, f64_at(ws, bg * nchunks), f64_at(ws, 2 * bg * nchunks));
        let (hw_i, c_i, g_i, nc_i, rpc_i) = (hw as i32, c as i32, groups as i32, nchunks as i32, rpc as i32);
        let x = self.dptr(inp);
        let grid = (blocks as u32, 1, 1);
        self.launch(
            "gn_forward_sum",
            grid,
            (BLOCK, 1, 1),
            0,
            &[Arg::P(psum), Arg::P(x), Arg::I(hw_i), Arg::I(c_i), Arg::I(g_i), Arg::I(nc_i), Arg::I(rpc_i)],
        )?;
        self.launch(
            "gn_forward_sqdev",
            grid,
            (BLOCK, 1, 1),
            0,
            &[
                Arg::P(psq),
                Arg::P(psum),
                Arg::P(x),
                Arg::I(hw_i),
                Arg::I(c_i),
                Arg::I(g_i),
                Arg::I(nc_i),
                Arg::I(rpc_i),
            ],
        )?;
        self.launch(
            "gn_forward_finalize",
            (bg as u32, 1, 1),
            (32, 1, 1),
            0,
            &[
                Arg::P(self.dptr(mean)),
                Arg::P(self.dptr(rstd)),
                Arg::P(stats),
                Arg::P(psum),
                Arg::P(psq),
                Arg::I(hw_i),
                Arg::I(cpg as i32),
                Arg::I(nc_i),
                Arg::F(eps),
            ],
        )?;
        self.ops_launch1(
            "gn_forward_apply",
            n,
            &[
                Arg::P(self.dptr(out)),
                Arg::P(x),
                Arg::P(self.dptr(weight)),
                Arg::P(self.dptr(bias)),
                Arg::P(stats),
                Arg::I(batch as i32),
                Arg::I(hw_i),
                Arg::I(c_i),
                Arg::I(g_i),
                Arg::I(silu as i32),
            ],
        )
    }

    pub(crate) fn layer_norm_backward_impl(&self, p: &LayerNormParams, t: &LayerNormBackward) -> Result<()> {
        p.check_backward(t)?;
        let LayerNormParams { rows, cols, .. } = *p;
        let LayerNormBackward { dinp, dweight, dbias, dout, inp, weight, mean, rstd } = *t;
        let n = rows * cols;
        to_i32("layer_norm_backward", n)?;
        if n == 0 {
            return Ok(());
        }
        let (di, dy, x, w, m, r) =
            (self.dptr(dinp), self.dptr(dout), self.dptr(inp), self.dptr(weight), self.dptr(mean), self.dptr(rstd));
        self.launch(
            "ln_backward_dinp",
            (rows.div_ceil(8).clamp(1, MAX_GRID) as u32, 1, 1),
            (BLOCK, 1, 1),
            0,
            &[
                Arg::P(di),
                Arg::P(dy),
                Arg::P(x),
                Arg::P(w),
                Arg::P(m),
                Arg::P(r),
                Arg::I(rows as i32),
                Arg::I(cols as i32),
            ],
        )?;
        // Layer norm = statistics per row: hw = 1, one group; no SiLU, so no bias.
        self.ops_norm_dparams(self.dptr(dweight), self.dptr(dbias), dy, x, w, 0, m, r, rows, 1, cols, 1, false)
    }

    /// dweight[ch] += Σ dy·xhat, dbias[ch] += Σ dy over all rows (f64 column sums by row chunks,
    /// then a fixed-order sum over the chunks): the parameter gradients of both norms.
    #[allow(clippy::too_many_arguments)]
    fn ops_norm_dparams(
        &self,
        dweight: u64,
        dbias: u64,
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
    ) -> Result<()> {
        let (chunks, rpc) = chunking(rows, COL_CHUNK_ROWS, COL_MAX_CHUNKS);
        let part = self.ops_workspace_f64(1, chunks * c * 2)?;
        self.launch(
            "nrm_dparams_partial",
            (c.div_ceil(32) as u32, chunks as u32, 1),
            (32, 8, 1),
            0,
            &[
                Arg::P(part),
                Arg::P(dout),
                Arg::P(inp),
                Arg::P(weight),
                Arg::P(bias),
                Arg::P(mean),
                Arg::P(rstd),
                Arg::I(rows as i32),
                Arg::I(hw as i32),
                Arg::I(c as i32),
                Arg::I(groups as i32),
                Arg::I(rpc as i32),
                Arg::I(silu as i32),
            ],
        )?;
        self.ops_launch1(
            "nrm_dparams_finalize",
            c,
            &[Arg::P(dweight), Arg::P(dbias), Arg::P(part), Arg::I(c as i32), Arg::I(chunks as i32)],
        )
    }

    /// Group norm backward: per-chunk sums of dxhat and dxhat·xhat, per-group means, the input
    /// gradient, then the parameter gradients (`ops_norm_dparams`).
    pub(crate) fn group_norm_backward_impl(&self, p: &GroupNormParams, t: &GroupNormBackward) -> Result<()> {
        p.check_backward(t)?;
        let GroupNormParams { batch, hw, channels: c, groups, silu, .. } = *p;
        let GroupNormBackward { dinp, dweight, dbias, dout, inp, weight, bias, mean, rstd } = *t;
        let (n, bg) = (p.elements(), batch * groups);
        to_i32("group_norm_backward", n)?;
        if n == 0 {
            return Ok(());
        }
        let cpg = c / groups;
        let (nchunks, rpc) = chunking(hw, GN_CHUNK_ELEMS / cpg, GN_MAX_CHUNKS);
        let blocks = to_i32("group_norm_backward blocks", bg * nchunks)?;
        let ws = self.ops_workspace_f64(0, 2 * bg * nchunks + 2 * bg)?;
        let (p1, p2, stats) = (ws, f64_at(ws, bg * nchunks), f64_at(ws, 2 * bg * nchunks));
        let (dy, x, w, b, m, r) =
            (self.dptr(dout), self.dptr(inp), self.dptr(weight), self.dptr(bias), self.dptr(mean), self.dptr(rstd));
        let (hw_i, c_i, g_i, nc_i) = (hw as i32, c as i32, groups as i32, nchunks as i32);
        self.launch(
            "gn_backward_reduce",
            (blocks as u32, 1, 1),
            (BLOCK, 1, 1),
            0,
            &[
                Arg::P(p1),
                Arg::P(p2),
                Arg::P(dy),
                Arg::P(x),
                Arg::P(w),
                Arg::P(b),
                Arg::P(m),
                Arg::P(r),
                Arg::I(hw_i),
                Arg::I(c_i),
                Arg::I(g_i),
                Arg::I(nc_i),
                Arg::I(rpc as i32),
                Arg::I(silu as i32),
            ],
        )?;
        self.launch(
            "gn_backward_finalize",
            (bg as u32, 1, 1),
            (32, 1, 1),
            0,
            &[Arg::P(stats), Arg::P(p1), Arg::P(p2), Arg::I(hw_i), Arg::I(cpg as i32), Arg::I(nc_i)],
        )?;
        self.ops_launch1(
            "gn_backward_dinp",
            n,
            &[
                Arg::P(self.dptr(dinp)),
                Arg::P(dy),
                Arg::P(x),
                Arg::P(w),
                Arg::P(b),
                Arg::P(m),
                Arg::P(r),
                Arg::P(stats),
                Arg::I(batch as i32),
                Arg::I(hw_i),
                Arg::I(c_i),
                Arg::I(g_i),
                Arg::I(silu as i32),
            ],
        )?;
        self.ops_norm_dparams(self.dptr(dweight), self.dptr(dbias), dy, x, w, b, m, r, batch * hw, hw, c, groups, silu)
    }
}

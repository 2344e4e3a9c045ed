//! diffusers' `ResnetBlock2D` (time_embedding_norm "default", output_scale_factor 1, no up/down).

use super::{zeros, zeros_like, Conv2d, Cx, Fmap, GroupNorm, GroupNormOut, Linear};
use crate::ops::elementwise::BiasRowsParams;
use crate::tensor::{Layout, Tensor};
use anyhow::Result;

#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    /// 1×1 convolution when the channel count changes.
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn layout(
        l: &mut Layout,
        prefix: &str,
        c_in: usize,
        c_out: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f32,
    ) -> ResnetBlock2D {
        let same = [1, 1, 1, 1];
        ResnetBlock2D {
            norm1: GroupNorm::layout(l, &format!("{prefix}.norm1"), c_in, groups, eps),
            conv1: Conv2d::layout(l, &format!("{prefix}.conv1"), c_in, c_out, 3, 1, same),
            time_emb_proj: temb_channels.map(|t| Linear::layout(l, &format!("{prefix}.time_emb_proj"), t, c_out, true)),
            norm2: GroupNorm::layout(l, &format!("{prefix}.norm2"), c_out, groups, eps),
            conv2: Conv2d::layout(l, &format!("{prefix}.conv2"), c_out, c_out, 3, 1, same),
            conv_shortcut: (c_in != c_out)
                .then(|| Conv2d::layout(l, &format!("{prefix}.conv_shortcut"), c_in, c_out, 1, 1, [0; 4])),
        }
    }

    /// `temb_act` is SiLU(time embedding), (batch, temb_channels), shared by every resnet.
    /// The output is allocated before the block's temporaries, which are released on return
    /// (kept when the arena keeps, for the backward pass).
    pub fn forward(&self, cx: &mut Cx, x: &Fmap, temb_act: Option<&Tensor>) -> Result<Fmap> {
        Ok(self.forward_saved(cx, x, temb_act)?.out)
    }

    pub fn forward_saved(&self, cx: &mut Cx, x: &Fmap, temb_act: Option<&Tensor>) -> Result<ResnetSaved> {
        let out = Fmap::alloc(cx.arena, x.batch, x.h, x.w, self.conv2.c_out)?;
        let mark = cx.arena.mark();
        let n1 = self.norm1.apply_saved(cx, x, true)?;
        // conv1 + the projected time embedding, one row per image, in conv1's epilogue; then
        // conv2 + the shortcut in conv2's: diffusers' (h1 + temb) and (shortcut + h2), the same
        // sums to the bit, without two elementwise launches and two intermediate maps.
        let t = match (&self.time_emb_proj, temb_act) {
            (Some(proj), Some(temb)) => Some(proj.apply(cx, temb, x.batch)?),
            _ => None,
        };
        let h1t = self.conv1.apply_fused(cx, &n1.out, t.as_ref(), None)?;
        let n2 = self.norm2.apply_saved(cx, &h1t, true)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.apply(cx, x)?,
            None => *x,
        };
        self.conv2.apply_into(cx.b, &out, &n2.out, None, Some(&shortcut))?;
        cx.arena.release(mark);
        Ok(ResnetSaved { x: *x, temb_act: temb_act.copied(), n1, h1t, n2, out })
    }

    /// Accumulates parameter gradients into `g`, the input gradient into `dx` and the gradient of
    /// SiLU(time embedding) into `dtemb_act`. Temporaries are released on return.
    pub fn backward(
        &self,
        g: &ResnetBlock2D,
        cx: &mut Cx,
        s: &ResnetSaved,
        dout: &Fmap,
        dx: &Fmap,
        dtemb_act: Option<&Tensor>,
    ) -> Result<()> {
        let b = cx.b;
        let mark = cx.arena.mark();
        match (&self.conv_shortcut, &g.conv_shortcut) {
            (Some(c), Some(gc)) => c.backward(gc, b, Some(dx), dout, &s.x)?,
            _ => b.accumulate(&dx.t, &dout.t, dx.numel())?,
        }
        let dn2 = zeros_like(cx, &s.n2.out)?;
        self.conv2.backward(&g.conv2, b, Some(&dn2), dout, &s.n2.out)?;
        let dh1 = zeros_like(cx, &s.h1t)?;
        self.norm2.backward(&g.norm2, b, &dh1, &dn2, &s.h1t, &s.n2)?;
        if let (Some(proj), Some(gproj), Some(temb), Some(dtemb)) =
            (&self.time_emb_proj, &g.time_emb_proj, &s.temb_act, dtemb_act)
        {
            // h1t = h1 + proj(temb)[b]: h1 receives dh1 unchanged; the projection the row sums.
            let dt = zeros(cx, [s.x.batch, proj.out_f])?;
            let rows = BiasRowsParams { batch: s.x.batch, rows: s.h1t.h * s.h1t.w, channels: s.h1t.c };
            b.add_bias_rows_backward(&rows, &dt, &dh1.t)?;
            proj.backward(gproj, b, Some(dtemb), &dt, temb, s.x.batch)?;
        }
        let dn1 = zeros_like(cx, &s.n1.out)?;
        self.conv1.backward(&g.conv1, b, Some(&dn1), &dh1, &s.n1.out)?;
        self.norm1.backward(&g.norm1, b, dx, &dn1, &s.x, &s.n1)?;
        cx.arena.release_all_to(mark);
        Ok(())
    }
}

/// What a resnet's backward pass reads (valid while the forward arena keeps its tensors).
#[derive(Clone, Copy, Debug)]
pub struct ResnetSaved {
    pub x: Fmap,
    /// SiLU(time embedding) as the forward received it (the U-Net's resnets; none in the VAE).
    pub temb_act: Option<Tensor>,
    pub n1: GroupNormOut,
    /// conv1's output plus the projected time embedding (fused in conv1's epilogue; conv1's
    /// output alone without one).
    pub h1t: Fmap,
    pub n2: GroupNormOut,
    pub out: Fmap,
}

//! diffusers' `ResnetBlock2D` (time_embedding_norm "default", output_scale_factor 1, no up/down).

use super::{Conv2d, Fmap, GroupNorm, Linear};
use crate::backend::Backend;
use crate::tensor::{Arena, Layout, Tensor};
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
    /// The output is allocated before the block's temporaries, which are released on return.
    pub fn forward(&self, b: &dyn Backend, arena: &mut Arena, x: &Fmap, temb_act: Option<&Tensor>) -> Result<Fmap> {
        let out = Fmap::alloc(arena, x.batch, x.h, x.w, self.conv2.c_out)?;
        let mark = arena.mark();
        let h = self.norm1.apply(b, arena, x, true)?;
        let mut h = self.conv1.apply(b, arena, &h)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb_act) {
            let t = proj.apply(b, arena, temb, x.batch)?;
            let ht = Fmap::alloc(arena, h.batch, h.h, h.w, h.c)?;
            b.add_bias_rows_forward(&ht.t, &h.t, &t, h.batch, h.h * h.w, h.c)?;
            h = ht;
        }
        let h = self.norm2.apply(b, arena, &h, true)?;
        let h = self.conv2.apply(b, arena, &h)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.apply(b, arena, x)?,
            None => *x,
        };
        b.add_forward(&out.t, &shortcut.t, &h.t, out.numel())?;
        arena.release(mark);
        Ok(out)
    }
}

//! InceptionV3 as pytorch-fid runs it for FID: the 2048-d pool3 features (the output of the final
//! average pool) of the TensorFlow FID Inception (`pt_inception-2015-12-05`), with pytorch-fid's
//! FIDInceptionA/C/E_1/E_2 patches: the average pools inside Mixed_5b–d, 6b–e and 7b exclude the
//! padding (TensorFlow semantics), and Mixed_7c pools with *max* instead of average.
//!
//! Preprocessing, as pytorch-fid's `ImagePathDataset` + `InceptionV3(resize_input=True,
//! normalize_input=True)`: the image as 8-bit RGB (`PIL.Image.convert("RGB")`: gray is replicated),
//! `ToTensor` (÷ 255), bilinear resize to 299×299 (`F.interpolate`, align_corners=False, no
//! antialiasing — also when shrinking), then 2x − 1.
//!
//! Weights: pytorch-fid's state dict, unchanged names (`Conv2d_1a_3x3.conv.weight`,
//! `Mixed_5b.branch1x1.bn.running_var`, …; `fc.*` is ignored). Conversion from the public release:
//!
//! ```text
//! import torch, safetensors.torch; from pytorch_fid.inception import FID_WEIGHTS_URL
//! sd = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu")
//! safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "pt_inception-2015-12-05.safetensors")
//! ```

use super::net::Pixels;
use super::net::{concat, global_avg, load_folding_norms, pool, stack, FoldedNorm, NetDevice};
use super::resize::bilinear_torch;
use super::tensors::Weights;
use crate::backend::Backend;
use crate::models::allocate;
use crate::nn::{Conv2d, Cx, Fmap, Linear};
use crate::ops::conv::Im2colParams;
use crate::ops::pool::PoolMode;
use crate::ops::Window2d;
use crate::tensor::{Layout, Tensor};
use anyhow::Result;

pub const NETWORK: &str = "pytorch-fid's InceptionV3 (pt_inception-2015-12-05)";
/// pool3 feature size.
pub const DIMS: usize = 2048;
/// pytorch-fid resizes every image to this size.
pub const INPUT_SIZE: usize = 299;
/// The smallest input the stride-2 stem and reductions accept.
pub const MIN_SIZE: usize = 75;

/// A layer's specification: name, in, out, kernel, stride, padding.
type Spec = (&'static str, usize, usize, (usize, usize), (usize, usize), (usize, usize));

const K1: (usize, usize) = (1, 1);
const K3: (usize, usize) = (3, 3);
const S1: (usize, usize) = (1, 1);
const S2: (usize, usize) = (2, 2);
const P0: (usize, usize) = (0, 0);
const P1: (usize, usize) = (1, 1);

fn stem_specs() -> Vec<Spec> {
    vec![
        ("Conv2d_1a_3x3", 3, 32, K3, S2, P0),
        ("Conv2d_2a_3x3", 32, 32, K3, S1, P0),
        ("Conv2d_2b_3x3", 32, 64, K3, S1, P1),
        ("Conv2d_3b_1x1", 64, 80, K1, S1, P0),
        ("Conv2d_4a_3x3", 80, 192, K3, S1, P0),
    ]
}

/// The mixed blocks in order, with torchvision's branch layouts (InceptionA/B/C/D/E).
#[derive(Clone, Copy, Debug)]
enum Kind {
    A { cin: usize, pool: usize },
    B { cin: usize },
    C { cin: usize, c7: usize },
    D { cin: usize },
    E { cin: usize, max_pool: bool },
}

const MIXED: [(&str, Kind); 11] = [
    ("Mixed_5b", Kind::A { cin: 192, pool: 32 }),
    ("Mixed_5c", Kind::A { cin: 256, pool: 64 }),
    ("Mixed_5d", Kind::A { cin: 288, pool: 64 }),
    ("Mixed_6a", Kind::B { cin: 288 }),
    ("Mixed_6b", Kind::C { cin: 768, c7: 128 }),
    ("Mixed_6c", Kind::C { cin: 768, c7: 160 }),
    ("Mixed_6d", Kind::C { cin: 768, c7: 160 }),
    ("Mixed_6e", Kind::C { cin: 768, c7: 192 }),
    ("Mixed_7a", Kind::D { cin: 768 }),
    ("Mixed_7b", Kind::E { cin: 1280, max_pool: false }),
    ("Mixed_7c", Kind::E { cin: 2048, max_pool: true }),
];

/// The branch convolutions of one mixed block (names relative to the block).
fn branch_specs(kind: Kind) -> Vec<Spec> {
    let (k17, k71, p17, p71) = ((1, 7), (7, 1), (0, 3), (3, 0));
    let (k13, k31, p13, p31) = ((1, 3), (3, 1), (0, 1), (1, 0));
    match kind {
        Kind::A { cin, pool } => vec![
            ("branch1x1", cin, 64, K1, S1, P0),
            ("branch5x5_1", cin, 48, K1, S1, P0),
            ("branch5x5_2", 48, 64, (5, 5), S1, (2, 2)),
            ("branch3x3dbl_1", cin, 64, K1, S1, P0),
            ("branch3x3dbl_2", 64, 96, K3, S1, P1),
            ("branch3x3dbl_3", 96, 96, K3, S1, P1),
            ("branch_pool", cin, pool, K1, S1, P0),
        ],
        Kind::B { cin } => vec![
            ("branch3x3", cin, 384, K3, S2, P0),
            ("branch3x3dbl_1", cin, 64, K1, S1, P0),
            ("branch3x3dbl_2", 64, 96, K3, S1, P1),
            ("branch3x3dbl_3", 96, 96, K3, S2, P0),
        ],
        Kind::C { cin, c7 } => vec![
            ("branch1x1", cin, 192, K1, S1, P0),
            ("branch7x7_1", cin, c7, K1, S1, P0),
            ("branch7x7_2", c7, c7, k17, S1, p17),
            ("branch7x7_3", c7, 192, k71, S1, p71),
            ("branch7x7dbl_1", cin, c7, K1, S1, P0),
            ("branch7x7dbl_2", c7, c7, k71, S1, p71),
            ("branch7x7dbl_3", c7, c7, k17, S1, p17),
            ("branch7x7dbl_4", c7, c7, k71, S1, p71),
            ("branch7x7dbl_5", c7, 192, k17, S1, p17),
            ("branch_pool", cin, 192, K1, S1, P0),
        ],
        Kind::D { cin } => vec![
            ("branch3x3_1", cin, 192, K1, S1, P0),
            ("branch3x3_2", 192, 320, K3, S2, P0),
            ("branch7x7x3_1", cin, 192, K1, S1, P0),
            ("branch7x7x3_2", 192, 192, k17, S1, p17),
            ("branch7x7x3_3", 192, 192, k71, S1, p71),
            ("branch7x7x3_4", 192, 192, K3, S2, P0),
        ],
        Kind::E { cin, .. } => vec![
            ("branch1x1", cin, 320, K1, S1, P0),
            ("branch3x3_1", cin, 384, K1, S1, P0),
            ("branch3x3_2a", 384, 384, k13, S1, p13),
            ("branch3x3_2b", 384, 384, k31, S1, p31),
            ("branch3x3dbl_1", cin, 448, K1, S1, P0),
            ("branch3x3dbl_2", 448, 384, K3, S1, P1),
            ("branch3x3dbl_3a", 384, 384, k13, S1, p13),
            ("branch3x3dbl_3b", 384, 384, k31, S1, p31),
            ("branch_pool", cin, 192, K1, S1, P0),
        ],
    }
}

/// Every BasicConv2d of the network as (full name, spec).
fn all_convs() -> Vec<(String, Spec)> {
    let mut v: Vec<(String, Spec)> = stem_specs().into_iter().map(|s| (s.0.to_string(), s)).collect();
    for (block, kind) in MIXED {
        v.extend(branch_specs(kind).into_iter().map(|s| (format!("{block}.{}", s.0), s)));
    }
    v
}

/// The tensors this implementation reads, with their shapes (a subset of the public state dict:
/// without `fc.*` and the `num_batches_tracked` counters).
pub fn expected_tensors() -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for (name, (_, cin, cout, (kh, kw), _, _)) in all_convs() {
        out.push((format!("{name}.conv.weight"), vec![cout, cin, kh, kw]));
        for p in ["weight", "bias", "running_mean", "running_var"] {
            out.push((format!("{name}.bn.{p}"), vec![cout]));
        }
    }
    out
}

/// BasicConv2d: conv (no bias) → BatchNorm(eps 0.001) → ReLU. A square kernel runs as the
/// backend's convolution; a rectangular one (1×7, 7×1, 1×3, 3×1) as im2col and a linear map, the
/// weight (c_out, c_in, kh, kw) read as (c_out, c_in · kh · kw).
#[derive(Clone, Copy, Debug)]
struct Basic {
    weight: Tensor,
    spec: Spec,
    norm: FoldedNorm,
}

impl Basic {
    fn layout(l: &mut Layout, name: &str, spec: Spec) -> Basic {
        let (_, cin, cout, (kh, kw), _, _) = spec;
        let weight = l.tensor(format!("{name}.conv.weight"), [cout, cin, kh, kw]);
        Basic { weight, spec, norm: FoldedNorm::layout(l, &format!("{name}.bn"), cout) }
    }

    fn apply(&self, cx: &mut Cx, x: &Fmap) -> Result<Fmap> {
        let (_, c_in, c_out, (kh, kw), (stride, _), (ph, pw)) = self.spec;
        let pad = [ph, ph, pw, pw];
        let y = if kh == kw {
            Conv2d { weight: self.weight, bias: None, c_in, c_out, kernel: kh, stride, pad }.apply(cx, x)?
        } else {
            let window = Window2d { h: x.h, w: x.w, kernel: [kh, kw], stride, pad };
            let p = Im2colParams { batch: x.batch, channels: c_in, window };
            let cols = cx.arena.alloc([p.rows(), p.patch_len()])?;
            cx.b.im2col_forward(&p, &cols, &x.t)?;
            let weight = self.weight.reshape([c_out, p.patch_len()]);
            let t = Linear { weight, bias: None, in_f: p.patch_len(), out_f: c_out }.apply(cx, &cols, p.rows())?;
            Fmap { t, batch: x.batch, h: window.out_h(), w: window.out_w(), c: c_out }
        };
        self.norm.apply_relu(cx, &y)
    }
}

#[derive(Clone, Debug)]
struct Mixed {
    kind: Kind,
    convs: Vec<Basic>,
}

impl Mixed {
    fn forward(&self, cx: &mut Cx, x: &Fmap) -> Result<Fmap> {
        let c = |cx: &mut Cx, i: usize, x: &Fmap| self.convs[i].apply(cx, x);
        let chain = |cx: &mut Cx, convs: &[usize], x: &Fmap| -> Result<Fmap> {
            let mut y = c(cx, convs[0], x)?;
            for &i in &convs[1..] {
                y = c(cx, i, &y)?;
            }
            Ok(y)
        };
        let parts = match self.kind {
            Kind::A { .. } => {
                let pooled = pool(cx, x, 3, 1, 1, PoolMode::AvgExcludePad)?;
                vec![c(cx, 0, x)?, chain(cx, &[1, 2], x)?, chain(cx, &[3, 4, 5], x)?, c(cx, 6, &pooled)?]
            }
            Kind::B { .. } => vec![c(cx, 0, x)?, chain(cx, &[1, 2, 3], x)?, pool(cx, x, 3, 2, 0, PoolMode::Max)?],
            Kind::C { .. } => {
                let pooled = pool(cx, x, 3, 1, 1, PoolMode::AvgExcludePad)?;
                vec![c(cx, 0, x)?, chain(cx, &[1, 2, 3], x)?, chain(cx, &[4, 5, 6, 7, 8], x)?, c(cx, 9, &pooled)?]
            }
            Kind::D { .. } => {
                vec![chain(cx, &[0, 1], x)?, chain(cx, &[2, 3, 4, 5], x)?, pool(cx, x, 3, 2, 0, PoolMode::Max)?]
            }
            Kind::E { max_pool, .. } => {
                let t = c(cx, 1, x)?;
                let d = chain(cx, &[4, 5], x)?;
                // FIDInceptionE_1 averages without the padding; FIDInceptionE_2 max-pools.
                let mode = if max_pool { PoolMode::Max } else { PoolMode::AvgExcludePad };
                let pooled = pool(cx, x, 3, 1, 1, mode)?;
                vec![c(cx, 0, x)?, c(cx, 2, &t)?, c(cx, 3, &t)?, c(cx, 6, &d)?, c(cx, 7, &d)?, c(cx, 8, &pooled)?]
            }
        };
        concat(cx, &parts)
    }
}

#[derive(Clone, Debug)]
struct InceptionParams {
    stem: Vec<Basic>,
    mixed: Vec<Mixed>,
}

fn params_layout(l: &mut Layout) -> InceptionParams {
    let stem = stem_specs().into_iter().map(|s| Basic::layout(l, s.0, s)).collect();
    let mixed = MIXED
        .iter()
        .map(|&(block, kind)| {
            let convs =
                branch_specs(kind).into_iter().map(|s| Basic::layout(l, &format!("{block}.{}", s.0), s)).collect();
            Mixed { kind, convs }
        })
        .collect();
    InceptionParams { stem, mixed }
}

/// pytorch-fid's InceptionV3, on the backend.
pub struct InceptionV3 {
    params: InceptionParams,
    device: NetDevice,
}

impl InceptionV3 {
    /// Loads the network onto `backend`, each batch norm's statistics folded (ε 0.001, TensorFlow's).
    pub fn load(mut backend: Box<dyn Backend>, w: &Weights) -> Result<InceptionV3> {
        let (params, table) = allocate(backend.as_mut(), "inception.params", params_layout)?;
        load_folding_norms(backend.as_ref(), w, &table, 1e-3)?;
        Ok(InceptionV3 { params, device: NetDevice::new(backend) })
    }

    /// pool3 features of inputs already in the network's range ([-1, 1]), all of one size ≥ 75×75.
    pub fn forward(&mut self, images: &[Pixels]) -> Result<Vec<Vec<f32>>> {
        let Some(([h, w, c], pixels)) = stack(images, "InceptionV3", 3, MIN_SIZE)? else { return Ok(Vec::new()) };
        let (batch, p) = (images.len(), &self.params);
        let out = self.device.run("inception.activations", batch, |cx| {
            let x = Fmap::alloc(cx.arena, batch, h, w, c)?;
            cx.b.upload(&x.t, &pixels)?;
            pool3(cx, p, &x)
        })?;
        Ok(out.chunks(DIMS).map(<[f32]>::to_vec).collect())
    }
}

/// The stem, the mixed blocks and the final average: (batch, 2048).
fn pool3(cx: &mut Cx, p: &InceptionParams, x: &Fmap) -> Result<Tensor> {
    let mut x = p.stem[0].apply(cx, x)?;
    x = p.stem[1].apply(cx, &x)?;
    x = p.stem[2].apply(cx, &x)?;
    x = pool(cx, &x, 3, 2, 0, PoolMode::Max)?;
    x = p.stem[3].apply(cx, &x)?;
    x = p.stem[4].apply(cx, &x)?;
    x = pool(cx, &x, 3, 2, 0, PoolMode::Max)?;
    for m in &p.mixed {
        // Each block's branches are released once their concatenation is moved below them. The
        // move cannot overlap: the concatenation was allocated after branch outputs whose sizes
        // add up to its own, so it starts at least its own size above the mark (and the backends
        // refuse an accumulate whose source and destination overlap).
        let mark = cx.arena.mark();
        let y = m.forward(cx, &x)?;
        cx.arena.release_all_to(mark);
        let out = Fmap::alloc(cx.arena, y.batch, y.h, y.w, y.c)?;
        cx.b.zero(&out.t)?;
        cx.b.accumulate(&out.t, &y.t, y.numel())?;
        x = out;
    }
    global_avg(cx, &x)
}

/// pytorch-fid's input for an 8-bit image (HWC, 1 or 3 channels): RGB ÷ 255, bilinear to 299×299,
/// then 2x − 1.
pub fn preprocess(pixels: &[u8], h: usize, w: usize, c: usize) -> Pixels {
    let rgb: Vec<f32> = pixels
        .chunks_exact(c)
        .flat_map(|p| {
            let (r, g, b) = if c == 1 { (p[0], p[0], p[0]) } else { (p[0], p[1], p[2]) };
            [r as f32 / 255.0, g as f32 / 255.0, b as f32 / 255.0]
        })
        .collect();
    let mut x = bilinear_torch(&rgb, h, w, 3, INPUT_SIZE, INPUT_SIZE);
    x.iter_mut().for_each(|v| *v = 2.0 * *v - 1.0);
    Pixels::new(INPUT_SIZE, INPUT_SIZE, 3, x)
}

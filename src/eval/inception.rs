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

use super::ops::{avg_pool3_exclude_pad, concat, global_avg, max_pool, Act, BatchNorm, Conv};
use super::resize::bilinear_torch;
use super::tensors::Weights;
use anyhow::{bail, Result};

pub const NETWORK: &str = "pytorch-fid's InceptionV3 (pt_inception-2015-12-05)";
/// pool3 feature size.
pub const DIMS: usize = 2048;
/// pytorch-fid resizes every image to this size.
pub const INPUT_SIZE: usize = 299;
/// The smallest input the stride-2 stem and reductions accept.
pub const MIN_SIZE: usize = 75;

/// BasicConv2d: conv (no bias) → BatchNorm(eps 0.001) → ReLU, folded into one convolution.
struct Basic(Conv);

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
#[derive(Clone, Copy)]
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

fn load_basic(w: &Weights, name: &str, spec: Spec) -> Result<Basic> {
    let (_, cin, cout, (kh, kw), stride, pad) = spec;
    let wt = w.get(&format!("{name}.conv.weight"), &[cout, cin, kh, kw])?;
    let bn = |p: &str| w.get(&format!("{name}.bn.{p}"), &[cout]);
    let bn = BatchNorm::new(&bn("weight")?, &bn("bias")?, &bn("running_mean")?, &bn("running_var")?, 1e-3);
    Ok(Basic(Conv::new(&wt, [cout, cin, kh, kw], stride, pad).fold_bn(&bn).with_relu()))
}

struct Mixed {
    kind: Kind,
    convs: Vec<Basic>,
}

impl Mixed {
    fn forward(&self, x: &Act) -> Act {
        let c = |i: usize, x: &Act| self.convs[i].0.forward(x);
        match self.kind {
            Kind::A { .. } => {
                let b1 = c(0, x);
                let b5 = c(2, &c(1, x));
                let b3 = c(5, &c(4, &c(3, x)));
                let bp = c(6, &avg_pool3_exclude_pad(x));
                concat(&[&b1, &b5, &b3, &bp])
            }
            Kind::B { .. } => {
                let b3 = c(0, x);
                let bd = c(3, &c(2, &c(1, x)));
                let bp = max_pool(x, 3, 2, 0);
                concat(&[&b3, &bd, &bp])
            }
            Kind::C { .. } => {
                let b1 = c(0, x);
                let b7 = c(3, &c(2, &c(1, x)));
                let bd = c(8, &c(7, &c(6, &c(5, &c(4, x)))));
                let bp = c(9, &avg_pool3_exclude_pad(x));
                concat(&[&b1, &b7, &bd, &bp])
            }
            Kind::D { .. } => {
                let b3 = c(1, &c(0, x));
                let b7 = c(5, &c(4, &c(3, &c(2, x))));
                let bp = max_pool(x, 3, 2, 0);
                concat(&[&b3, &b7, &bp])
            }
            Kind::E { max_pool: mp, .. } => {
                let b1 = c(0, x);
                let t = c(1, x);
                let (a, b) = (c(2, &t), c(3, &t));
                let t = c(5, &c(4, x));
                let (d1, d2) = (c(6, &t), c(7, &t));
                // FIDInceptionE_1 averages without the padding; FIDInceptionE_2 max-pools.
                let pooled = if mp { max_pool(x, 3, 1, 1) } else { avg_pool3_exclude_pad(x) };
                let bp = c(8, &pooled);
                concat(&[&b1, &a, &b, &d1, &d2, &bp])
            }
        }
    }
}

pub struct InceptionV3 {
    stem: Vec<Basic>,
    mixed: Vec<Mixed>,
}

impl InceptionV3 {
    pub fn load(w: &Weights) -> Result<InceptionV3> {
        let stem = stem_specs().into_iter().map(|s| load_basic(w, s.0, s)).collect::<Result<_>>()?;
        let mut mixed = Vec::new();
        for (block, kind) in MIXED {
            let convs = branch_specs(kind)
                .into_iter()
                .map(|s| load_basic(w, &format!("{block}.{}", s.0), s))
                .collect::<Result<_>>()?;
            mixed.push(Mixed { kind, convs });
        }
        Ok(InceptionV3 { stem, mixed })
    }

    /// pool3 features of an input already in the network's range ([-1, 1]), any size ≥ 75×75.
    pub fn forward(&self, x: &Act) -> Result<Vec<f32>> {
        if x.c != 3 {
            bail!("InceptionV3 takes 3 channels, got {}", x.c);
        }
        if x.h < MIN_SIZE || x.w < MIN_SIZE {
            bail!("InceptionV3 needs at least {MIN_SIZE}×{MIN_SIZE} pixels, got {}×{}", x.h, x.w);
        }
        let mut x = self.stem[0].0.forward(x);
        x = self.stem[1].0.forward(&x);
        x = self.stem[2].0.forward(&x);
        x = max_pool(&x, 3, 2, 0);
        x = self.stem[3].0.forward(&x);
        x = self.stem[4].0.forward(&x);
        x = max_pool(&x, 3, 2, 0);
        for m in &self.mixed {
            x = m.forward(&x);
        }
        Ok(global_avg(&x, false))
    }
}

/// pytorch-fid's input for an 8-bit image (HWC, 1 or 3 channels): RGB ÷ 255, bilinear to 299×299,
/// then 2x − 1.
pub fn preprocess(pixels: &[u8], h: usize, w: usize, c: usize) -> Act {
    let rgb: Vec<f32> = pixels
        .chunks_exact(c)
        .flat_map(|p| {
            let (r, g, b) = if c == 1 { (p[0], p[0], p[0]) } else { (p[0], p[1], p[2]) };
            [r as f32 / 255.0, g as f32 / 255.0, b as f32 / 255.0]
        })
        .collect();
    let mut x = bilinear_torch(&rgb, h, w, 3, INPUT_SIZE, INPUT_SIZE);
    x.iter_mut().for_each(|v| *v = 2.0 * *v - 1.0);
    Act::new(INPUT_SIZE, INPUT_SIZE, 3, x)
}

//! TorchXRayVision's DenseNet-121 (`xrv.models.DenseNet`, weights `densenet121-res224-all`) as a
//! feature extractor: the 1024-d vector `model.features2(x)` returns — `features(x)` (ending with
//! norm5), then ReLU and global average pooling — and as the classifier of `eval classify`: the
//! head's logits and their output normalisation (`op_norm_score`, with `OP_THRESHS_ALL`), on the
//! paper's preprocessing ([`paper_preprocess`]).
//!
//! Preprocessing, TorchXRayVision's own (its README and `xrv.utils.load_image`): the 8-bit image
//! scaled to [-1024, 1024] by `xrv.datasets.normalize(img, 255)` = (2·(v/255) − 1)·1024 in f32, one
//! channel (the mean of R, G, B for colour images, as the README's `img.mean(2)`),
//! `XRayCenterCrop` (the central square: start = size//2 − side//2), and `XRayResizer(224)`
//! (skimage's resize: anti-aliased when shrinking, zero-filled border samples when enlarging; see
//! [`super::resize::skimage_resize`]). Since that yields 224×224, `features2`'s own
//! `fix_resolution` never resizes.
//!
//! Weights: the model's state dict, unchanged names (`features.conv0.weight`,
//! `features.denseblock1.denselayer1.norm1.running_mean`, …; `classifier.*`, `op_threshs` and the
//! `num_batches_tracked` counters are ignored). Conversion from the public release:
//!
//! ```text
//! import torchxrayvision as xrv, safetensors.torch
//! m = xrv.models.DenseNet(weights="densenet121-res224-all")
//! safetensors.torch.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, "xrv-densenet121-res224-all.safetensors")
//! ```

use super::net::Pixels;
use super::net::{global_avg, load_folding_norms, pool, stack, FoldedNorm, NetDevice};
use super::resize::{pil_bilinear, skimage_resize};
use super::tensors::Weights;
use crate::backend::Backend;
use crate::models::allocate;
use crate::nn::{Conv2d, Cx, Fmap};
use crate::ops::elementwise::ConcatParams;
use crate::ops::pool::PoolMode;
use crate::tensor::{Layout, Shape, Tensor};
use anyhow::Result;

pub const NETWORK: &str = "TorchXRayVision's DenseNet-121 (densenet121-res224-all)";
/// XRayResizer's output size (the resolution the released weights were trained at).
pub const INPUT_SIZE: usize = 224;

/// The architecture's hyper-parameters (torchvision's DenseNet arguments, as xrv's class takes them).
#[derive(Clone, Debug, PartialEq)]
pub struct DenseNetConfig {
    pub growth_rate: usize,
    pub block_config: Vec<usize>,
    pub num_init_features: usize,
    pub bn_size: usize,
    pub in_channels: usize,
}

impl DenseNetConfig {
    /// DenseNet-121 with one input channel, as every TorchXRayVision DenseNet.
    pub fn densenet121() -> DenseNetConfig {
        DenseNetConfig {
            growth_rate: 32,
            block_config: vec![6, 12, 24, 16],
            num_init_features: 64,
            bn_size: 4,
            in_channels: 1,
        }
    }

    /// The smallest DenseNet the tests train and compare (growth 4, blocks 2-2, 8 initial
    /// features, bn_size 2, one input channel).
    pub fn tiny() -> DenseNetConfig {
        DenseNetConfig { growth_rate: 4, block_config: vec![2, 2], num_init_features: 8, bn_size: 2, in_channels: 1 }
    }

    /// Feature size (channels after norm5): 1024 for DenseNet-121.
    pub fn dims(&self) -> usize {
        let mut c = self.num_init_features;
        for (i, &n) in self.block_config.iter().enumerate() {
            c += n * self.growth_rate;
            if i + 1 < self.block_config.len() {
                c /= 2;
            }
        }
        c
    }

    /// The tensors this implementation reads, with their shapes.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = Vec::new();
        let bn = |v: &mut Vec<(String, Vec<usize>)>, name: String, c: usize| {
            for p in ["weight", "bias", "running_mean", "running_var"] {
                v.push((format!("{name}.{p}"), vec![c]));
            }
        };
        let nif = self.num_init_features;
        v.push(("features.conv0.weight".into(), vec![nif, self.in_channels, 7, 7]));
        bn(&mut v, "features.norm0".into(), nif);
        let mut c = nif;
        let mid = self.bn_size * self.growth_rate;
        for (b, &n) in self.block_config.iter().enumerate() {
            for l in 0..n {
                let p = format!("features.denseblock{}.denselayer{}", b + 1, l + 1);
                let cin = c + l * self.growth_rate;
                bn(&mut v, format!("{p}.norm1"), cin);
                v.push((format!("{p}.conv1.weight"), vec![mid, cin, 1, 1]));
                bn(&mut v, format!("{p}.norm2"), mid);
                v.push((format!("{p}.conv2.weight"), vec![self.growth_rate, mid, 3, 3]));
            }
            c += n * self.growth_rate;
            if b + 1 < self.block_config.len() {
                let p = format!("features.transition{}", b + 1);
                bn(&mut v, format!("{p}.norm"), c);
                v.push((format!("{p}.conv.weight"), vec![c / 2, c, 1, 1]));
                c /= 2;
            }
        }
        bn(&mut v, "features.norm5".into(), c);
        v
    }
}

/// norm1 → relu → conv1 (1×1) → norm2 → relu → conv2 (3×3), its output concatenated to its input.
/// `N` is how a batch norm is held: folded for inference ([`FoldedNorm`]) or trainable
/// (`train::densenet::TrainNorm`).
#[derive(Clone, Copy, Debug)]
pub struct DenseLayer<N> {
    pub norm1: N,
    pub conv1: Conv2d,
    pub norm2: N,
    pub conv2: Conv2d,
}

/// norm → relu → conv (1×1) → 2×2 average pool.
#[derive(Clone, Copy, Debug)]
pub struct Transition<N> {
    pub norm: N,
    pub conv: Conv2d,
}

/// The network's modules under torchvision's names (the architecture, in one place for inference
/// and training).
#[derive(Clone, Debug)]
pub struct DenseNetModules<N> {
    pub conv0: Conv2d,
    pub norm0: N,
    pub blocks: Vec<Vec<DenseLayer<N>>>,
    pub transitions: Vec<Transition<N>>,
    pub norm5: N,
}

/// The inference network's parameters (a norm's folded pair as `<norm>.scale` and `<norm>.shift`).
type DenseNetParams = DenseNetModules<FoldedNorm>;

/// Lays out `config`'s modules in `l` (convolutions without bias, as torchvision's), each batch
/// norm by `norm(l, name, channels)`.
pub fn modules_layout<N>(
    l: &mut Layout,
    config: &DenseNetConfig,
    mut norm: impl FnMut(&mut Layout, &str, usize) -> N,
) -> DenseNetModules<N> {
    let conv = |l: &mut Layout, name: &str, [c_out, c_in, kernel]: [usize; 3], stride: usize, pad: usize| {
        let weight = l.tensor(format!("{name}.weight"), [c_out, c_in, kernel, kernel]);
        Conv2d { weight, bias: None, c_in, c_out, kernel, stride, pad: [pad; 4] }
    };
    let nif = config.num_init_features;
    let conv0 = conv(l, "features.conv0", [nif, config.in_channels, 7], 2, 3);
    let norm0 = norm(l, "features.norm0", nif);
    let (gr, mid) = (config.growth_rate, config.bn_size * config.growth_rate);
    let mut c = nif;
    let (mut blocks, mut transitions) = (Vec::new(), Vec::new());
    for (b, &n) in config.block_config.iter().enumerate() {
        let mut layers = Vec::with_capacity(n);
        for i in 0..n {
            let p = format!("features.denseblock{}.denselayer{}", b + 1, i + 1);
            layers.push(DenseLayer {
                norm1: norm(l, &format!("{p}.norm1"), c + i * gr),
                conv1: conv(l, &format!("{p}.conv1"), [mid, c + i * gr, 1], 1, 0),
                norm2: norm(l, &format!("{p}.norm2"), mid),
                conv2: conv(l, &format!("{p}.conv2"), [gr, mid, 3], 1, 1),
            });
        }
        blocks.push(layers);
        c += n * gr;
        if b + 1 < config.block_config.len() {
            let p = format!("features.transition{}", b + 1);
            transitions.push(Transition {
                norm: norm(l, &format!("{p}.norm"), c),
                conv: conv(l, &format!("{p}.conv"), [c / 2, c, 1], 1, 0),
            });
            c /= 2;
        }
    }
    let norm5 = norm(l, "features.norm5", c);
    DenseNetModules { conv0, norm0, blocks, transitions, norm5 }
}

/// TorchXRayVision's DenseNet, on the backend.
pub struct DenseNet {
    pub config: DenseNetConfig,
    params: DenseNetParams,
    device: NetDevice,
    /// `classifier.weight` (outputs × features, row-major) and `classifier.bias`, on the host
    /// (18 × 1,024 multiply-adds per image), when the weights have them.
    classifier: Option<(Vec<f32>, Vec<f32>)>,
}

impl DenseNet {
    /// Loads the network onto `backend`: the convolutions' weights as they are, each batch norm's
    /// running statistics folded into (scale, shift) (ε 1e-5, torchvision's).
    pub fn load(mut backend: Box<dyn Backend>, w: &Weights, config: DenseNetConfig) -> Result<DenseNet> {
        let (params, table) =
            allocate(backend.as_mut(), "densenet.params", |l| modules_layout(l, &config, FoldedNorm::layout))?;
        load_folding_norms(backend.as_ref(), w, &table, 1e-5)?;
        let classifier = match w.src.shape("classifier.weight") {
            Some(s) if s.len() == 2 => {
                let (outputs, dims) = (s[0], config.dims());
                Some((w.get("classifier.weight", &[outputs, dims])?, w.get("classifier.bias", &[outputs])?))
            }
            _ => None,
        };
        Ok(DenseNet { config, params, device: NetDevice::new(backend), classifier })
    }

    /// The classifier head's logits for `features2` outputs: `classifier(features)`, one row of
    /// outputs per image. An error when the weights had no `classifier.weight`.
    pub fn logits(&self, features: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let Some((weight, bias)) = &self.classifier else {
            anyhow::bail!("these DenseNet weights have no classifier head (tensor 'classifier.weight'): only features can be computed")
        };
        let dims = self.config.dims();
        let logits = features
            .iter()
            .map(|f| {
                weight
                    .chunks(dims)
                    .zip(bias)
                    .map(|(row, b)| b + row.iter().zip(f).map(|(w, x)| w * x).sum::<f32>())
                    .collect()
            })
            .collect();
        Ok(logits)
    }

    /// `features2` of each preprocessed image (1 channel): relu(features(x)) averaged over space.
    pub fn forward(&mut self, images: &[Pixels]) -> Result<Vec<Vec<f32>>> {
        let min = 1 << (self.config.block_config.len() + 1);
        let channels = self.config.in_channels;
        let Some(([h, w, c], pixels)) = stack(images, "the DenseNet", channels, min)? else { return Ok(Vec::new()) };
        let (batch, p, gr) = (images.len(), &self.params, self.config.growth_rate);
        let out = self.device.run("densenet.activations", batch, |cx| {
            let x = Fmap::alloc(cx.arena, batch, h, w, c)?;
            cx.b.upload(&x.t, &pixels)?;
            features2(cx, p, gr, &x)
        })?;
        Ok(out.chunks(self.config.dims()).map(<[f32]>::to_vec).collect())
    }
}

/// The map of `c` channels held at the start of `buf` (a dense block's concatenation buffer).
fn prefix(buf: &Tensor, x: &Fmap, c: usize) -> Fmap {
    let t = Tensor::new(buf.pool, buf.offset, Shape::new(&[x.batch, x.h, x.w, c]));
    Fmap { t, c, ..*x }
}

/// The network's `features2`: (batch, 1, 1, features) of the input map.
fn features2(cx: &mut Cx, p: &DenseNetParams, gr: usize, x: &Fmap) -> Result<Tensor> {
    let x = p.conv0.apply(cx, x)?;
    let x = p.norm0.apply_relu(cx, &x)?;
    let mut x = pool(cx, &x, 3, 2, 1, PoolMode::Max)?;
    for (b, layers) in p.blocks.iter().enumerate() {
        // Each layer's output is the concatenation of its input and its new channels, written to
        // the other of two buffers sized for the block's last one; its temporaries are released.
        let total = x.c + layers.len() * gr;
        let bufs = [cx.arena.alloc([x.rows() * total])?, cx.arena.alloc([x.rows() * total])?];
        for (i, layer) in layers.iter().enumerate() {
            let mark = cx.arena.mark();
            let t = layer.norm1.apply_relu(cx, &x)?;
            let t = layer.conv1.apply(cx, &t)?;
            let t = layer.norm2.apply_relu(cx, &t)?;
            let new = layer.conv2.apply(cx, &t)?;
            let out = prefix(&bufs[i % 2], &x, x.c + gr);
            let cat = ConcatParams { rows: x.rows(), a_channels: x.c, b_channels: gr };
            cx.b.concat_channels_forward(&cat, &out.t, &x.t, &new.t)?;
            cx.arena.release_all_to(mark);
            x = out;
        }
        if let Some(t) = p.transitions.get(b) {
            let y = t.norm.apply_relu(cx, &x)?;
            let y = t.conv.apply(cx, &y)?;
            x = pool(cx, &y, 2, 2, 0, PoolMode::Avg)?;
        }
    }
    // norm5, then features2's ReLU and global average.
    let x = p.norm5.apply_relu(cx, &x)?;
    global_avg(cx, &x)
}

/// The operating points of `densenet121-res224-all`, one per output in
/// `labels::XRV_PATHOLOGIES`' order (torchxrayvision's `model_urls["all"]["op_threshs"]`): each
/// output's probability at the point its authors chose, which `op_norm_score` maps to 0.5.
pub const OP_THRESHS_ALL: [f32; 18] = [
    0.074_228_72,
    0.038_290_843,
    0.098_147_56,
    0.009_811_847_5,
    0.023_601_074,
    0.002_249_035_8,
    0.010_060_724,
    0.103_246_614,
    0.056_810_737,
    0.026_791_653,
    0.050_318_155,
    0.023_985_857,
    0.019_395_03,
    0.042_889_766,
    0.053_369_623,
    0.035_975_814,
    0.202_046_92,
    0.050_153_12,
];

/// What xrv's `DenseNet.forward` returns for a classifier logit when the model has operating
/// points: p = sigmoid(logit), then `op_norm`: p / (2t) below the threshold t, 1 − (1 − p) / (2(1 − t))
/// at or above it (so t maps to 0.5 and the order of scores is kept), and 0.5 where t is NaN (an
/// output with no operating point). f32 throughout, as torch computes it.
pub fn op_norm_score(logit: f32, thresh: f32) -> f32 {
    let p = 1.0 / (1.0 + (-logit).exp());
    if thresh.is_nan() {
        0.5
    } else if p < thresh {
        p / (thresh * 2.0)
    } else {
        1.0 - (1.0 - p) / ((1.0 - thresh) * 2.0)
    }
}

/// TorchXRayVision's input for an 8-bit image (HWC, 1 or 3 channels): one channel in [-1024, 1024],
/// centre-cropped to a square, resized to 224×224 (see the module comment).
pub fn preprocess(pixels: &[u8], h: usize, w: usize, c: usize) -> Pixels {
    preprocess_to(pixels, h, w, c, INPUT_SIZE)
}

/// As [`preprocess`], resized to `size` × `size` (XRayResizer(size)).
fn preprocess_to(pixels: &[u8], h: usize, w: usize, c: usize, size: usize) -> Pixels {
    let gray = xrv_gray(pixels, c);
    let side = h.min(w);
    let (y0, x0) = (h / 2 - side / 2, w / 2 - side / 2);
    let crop: Vec<f32> = (0..side).flat_map(|y| gray[(y0 + y) * w + x0..][..side].iter().copied()).collect();
    let out = skimage_resize(&crop, side, side, size, size);
    Pixels::new(size, size, 1, out)
}

/// `xrv.datasets.normalize(img, 255)` in f32, then one channel (the mean of R, G, B).
fn xrv_gray(pixels: &[u8], c: usize) -> Vec<f32> {
    let norm = |v: u8| (2.0f32 * (v as f32 / 255.0) - 1.0) * 1024.0;
    if c == 1 {
        pixels.iter().map(|&v| norm(v)).collect()
    } else {
        pixels.chunks_exact(c).map(|p| (norm(p[0]) + norm(p[1]) + norm(p[2])) / 3.0).collect()
    }
}

/// The side the paper's classifier preprocessing brings an image to before the classifier's own.
pub const PAPER_SIDE: usize = 512;

/// How the paper's "center cropping (512 px)" meets an image that is not square after its longer
/// side was brought to 512 (the paper does not say; both readings are offered).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Square {
    /// torchvision's `CenterCrop(512)`, the literal reading: the shorter side is padded with black
    /// (0) to 512, half on each side (the extra pixel of an odd margin on the right/bottom).
    #[default]
    Pad,
    /// TorchXRayVision's `XRayCenterCrop`: the central square of the shorter side; nothing of the
    /// longer side's ends is kept.
    Crop,
}

/// The paper's preprocessing for Table 3 ("downsizing to a maximum height or width of 512 px
/// (preserving aspect ratio), center cropping (512 px) and downsizing to 224 x 224"), on an 8-bit
/// image (HWC, 1 or 3 channels):
/// 1. the longer side to 512 with Pillow's bilinear filter (torchvision's `Resize` on a PIL image),
///    the shorter to `(short · 512 + long / 2) / long` (rounded half up); smaller images are
///    enlarged, so 256² samples reach the same 512;
/// 2. a square by `square` ([`Square::Pad`] by default);
/// 3. TorchXRayVision's own input: `normalize(img, 255)`, one channel, and `XRayResizer(size)`
///    ([`preprocess`]; `size` is 224, [`INPUT_SIZE`], for the public weights; a classifier trained
///    by `train-classifier` may use another).
pub fn paper_preprocess(pixels: &[u8], h: usize, w: usize, c: usize, square: Square, size: usize) -> Pixels {
    let long = h.max(w);
    let scaled = |n: usize| (n * PAPER_SIDE + long / 2) / long;
    let (oh, ow) = (scaled(h), scaled(w));
    let resized = pil_bilinear(pixels, h, w, c, oh, ow);
    match square {
        Square::Crop => preprocess_to(&resized, oh, ow, c, size),
        Square::Pad => {
            let (top, left) = ((PAPER_SIDE - oh) / 2, (PAPER_SIDE - ow) / 2);
            let mut padded = vec![0u8; PAPER_SIDE * PAPER_SIDE * c];
            for (y, row) in resized.chunks_exact(ow * c).enumerate() {
                padded[((top + y) * PAPER_SIDE + left) * c..][..ow * c].copy_from_slice(row);
            }
            preprocess_to(&padded, PAPER_SIDE, PAPER_SIDE, c, size)
        }
    }
}

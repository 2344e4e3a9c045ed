//! TorchXRayVision's DenseNet-121 (`xrv.models.DenseNet`, weights `densenet121-res224-all`) as a
//! feature extractor: the 1024-d vector `model.features2(x)` returns — `features(x)` (ending with
//! norm5), then ReLU and global average pooling; the classifier is not used.
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

use super::ops::{avg_pool2, global_avg, max_pool, Act, BatchNorm, Conv};
use super::resize::skimage_resize;
use super::tensors::Weights;
use anyhow::{bail, Result};
use rayon::prelude::*;

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

/// norm1 → relu → conv1 (1×1) → norm2 → relu → conv2 (3×3); norm2 is folded into conv1.
struct DenseLayer {
    norm1: BatchNorm,
    conv1: Conv,
    conv2: Conv,
}

/// norm → relu → conv (1×1) → 2×2 average pool.
struct Transition {
    norm: BatchNorm,
    conv: Conv,
}

pub struct DenseNet {
    pub config: DenseNetConfig,
    conv0: Conv, // with norm0 folded and relu0
    blocks: Vec<Vec<DenseLayer>>,
    transitions: Vec<Transition>,
    norm5: BatchNorm,
}

fn load_bn(w: &Weights, name: &str, c: usize) -> Result<BatchNorm> {
    let g = |p: &str| w.get(&format!("{name}.{p}"), &[c]);
    Ok(BatchNorm::new(&g("weight")?, &g("bias")?, &g("running_mean")?, &g("running_var")?, 1e-5))
}

fn load_conv(w: &Weights, name: &str, shape: [usize; 4], stride: usize, pad: usize) -> Result<Conv> {
    Ok(Conv::new(&w.get(name, &shape)?, shape, (stride, stride), (pad, pad)))
}

impl DenseNet {
    pub fn load(w: &Weights, config: DenseNetConfig) -> Result<DenseNet> {
        let nif = config.num_init_features;
        let conv0 = load_conv(w, "features.conv0.weight", [nif, config.in_channels, 7, 7], 2, 3)?
            .fold_bn(&load_bn(w, "features.norm0", nif)?)
            .with_relu();
        let (gr, mid) = (config.growth_rate, config.bn_size * config.growth_rate);
        let mut c = nif;
        let (mut blocks, mut transitions) = (Vec::new(), Vec::new());
        for (b, &n) in config.block_config.iter().enumerate() {
            let mut layers = Vec::new();
            for l in 0..n {
                let p = format!("features.denseblock{}.denselayer{}", b + 1, l + 1);
                let cin = c + l * gr;
                layers.push(DenseLayer {
                    norm1: load_bn(w, &format!("{p}.norm1"), cin)?,
                    conv1: load_conv(w, &format!("{p}.conv1.weight"), [mid, cin, 1, 1], 1, 0)?
                        .fold_bn(&load_bn(w, &format!("{p}.norm2"), mid)?)
                        .with_relu(),
                    conv2: load_conv(w, &format!("{p}.conv2.weight"), [gr, mid, 3, 3], 1, 1)?,
                });
            }
            blocks.push(layers);
            c += n * gr;
            if b + 1 < config.block_config.len() {
                let p = format!("features.transition{}", b + 1);
                transitions.push(Transition {
                    norm: load_bn(w, &format!("{p}.norm"), c)?,
                    conv: load_conv(w, &format!("{p}.conv.weight"), [c / 2, c, 1, 1], 1, 0)?,
                });
                c /= 2;
            }
        }
        let norm5 = load_bn(w, "features.norm5", c)?;
        Ok(DenseNet { config, conv0, blocks, transitions, norm5 })
    }

    /// `features2`: relu(features(x)) averaged over space. x: the preprocessed image (1 channel).
    pub fn forward(&self, x: &Act) -> Result<Vec<f32>> {
        if x.c != self.config.in_channels {
            bail!("the DenseNet takes {} channel(s), got {}", self.config.in_channels, x.c);
        }
        let min = 1 << (self.config.block_config.len() + 1);
        if x.h < min || x.w < min {
            bail!("the DenseNet needs at least {min}×{min} pixels, got {}×{}", x.h, x.w);
        }
        let gr = self.config.growth_rate;
        let mut cur = max_pool(&self.conv0.forward(x), 3, 2, 1);
        for (b, layers) in self.blocks.iter().enumerate() {
            // The block's concatenation buffer, filled growth_rate channels per layer.
            let total = cur.c + layers.len() * gr;
            let mut buf = Act::new(cur.h, cur.w, total, vec![0f32; cur.pixels() * total]);
            buf.data
                .par_chunks_mut(total)
                .zip(cur.data.par_chunks(cur.c))
                .for_each(|(o, i)| o[..i.len()].copy_from_slice(i));
            let mut c = cur.c;
            for layer in layers {
                let t = layer.norm1.relu_prefix(&buf, c);
                let new = layer.conv2.forward(&layer.conv1.forward(&t));
                buf.data
                    .par_chunks_mut(total)
                    .zip(new.data.par_chunks(gr))
                    .for_each(|(o, n)| o[c..c + gr].copy_from_slice(n));
                c += gr;
            }
            cur = buf;
            if let Some(t) = self.transitions.get(b) {
                cur = avg_pool2(&t.conv.forward(&t.norm.relu_prefix(&cur, cur.c)));
            }
        }
        let out = self.norm5.relu_prefix(&cur, cur.c); // norm5, then features2's ReLU
        Ok(global_avg(&out, false))
    }
}

/// TorchXRayVision's input for an 8-bit image (HWC, 1 or 3 channels): one channel in [-1024, 1024],
/// centre-cropped to a square, resized to 224×224 (see the module comment).
pub fn preprocess(pixels: &[u8], h: usize, w: usize, c: usize) -> Act {
    let norm = |v: u8| (2.0f32 * (v as f32 / 255.0) - 1.0) * 1024.0;
    let gray: Vec<f32> = if c == 1 {
        pixels.iter().map(|&v| norm(v)).collect()
    } else {
        pixels.chunks_exact(c).map(|p| (norm(p[0]) + norm(p[1]) + norm(p[2])) / 3.0).collect()
    };
    let side = h.min(w);
    let (y0, x0) = (h / 2 - side / 2, w / 2 - side / 2);
    let crop: Vec<f32> = (0..side).flat_map(|y| gray[(y0 + y) * w + x0..][..side].iter().copied()).collect();
    let out = skimage_resize(&crop, side, side, INPUT_SIZE, INPUT_SIZE);
    Act::new(INPUT_SIZE, INPUT_SIZE, 1, out)
}

//! A DenseNet trained from scratch: the classifier of the paper's Table 5 (issue 16), on the
//! backend, forward in training mode and backward.
//!
//! The architecture is torchvision's (`torchvision.models.DenseNet`, one input channel as
//! TorchXRayVision's): the modules come from [`modules_layout`], the same tree the evaluation
//! network loads, with every batch norm trainable ([`TrainNorm`]) and a linear classifier on the
//! global average of relu(norm5). Tensor names are torchvision's, so a checkpoint's state dict
//! loads in PyTorch as it is.
//!
//! Pools: the parameters (convolution weights, norm weights and biases, the classifier) in one
//! pool, which the optimiser updates; the running statistics in another (buffers: no gradient, no
//! weight decay); the gradients in a third with the parameters' layout. A training forward saves
//! what the backward reads: every norm's input, output (after its ReLU), batch mean and rstd,
//! every convolution's input, every dense layer's concatenated input. The backward accumulates into
//! the gradient pool (zero it before a step).

use crate::backend::Backend;
use crate::eval::densenet::{modules_layout, DenseNetConfig, DenseNetModules};
use crate::eval::net::{global_avg, pool};
use crate::nn::{zeros, zeros_like, Cx, Fmap, Linear};
use crate::ops::elementwise::ConcatParams;
use crate::ops::norm::{BatchNormBackward, BatchNormForward, BatchNormParams, BatchNormStats, BatchNormTrainParams};
use crate::ops::pool::{Pool2dParams, PoolMode};
use crate::tensor::{Arena, Layout, PoolId, Shape, Tensor};
use anyhow::Result;

/// torchvision's `BatchNorm2d` defaults.
pub const BN_EPS: f32 = 1e-5;
pub const BN_MOMENTUM: f32 = 0.1;

/// A batch norm being trained: `weight` and `bias` in the parameter pool, `running_mean` and
/// `running_var` in the buffer pool. (In the gradient pool's copy of the network the running
/// statistics lie in an unbound layout and are never used.)
#[derive(Clone, Copy, Debug)]
pub struct TrainNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
}

impl TrainNorm {
    fn layout(params: &mut Layout, buffers: &mut Layout, name: &str, c: usize) -> TrainNorm {
        TrainNorm {
            weight: params.tensor(format!("{name}.weight"), [c]),
            bias: params.tensor(format!("{name}.bias"), [c]),
            running_mean: buffers.tensor(format!("{name}.running_mean"), [c]),
            running_var: buffers.tensor(format!("{name}.running_var"), [c]),
        }
    }
}

/// The network: torchvision's modules and the classifier (`outputs` logits).
#[derive(Clone, Debug)]
pub struct DenseNetClassifier {
    pub config: DenseNetConfig,
    pub outputs: usize,
    pub modules: DenseNetModules<TrainNorm>,
    pub classifier: Linear,
}

impl DenseNetClassifier {
    /// Lays the network out: parameters in `params`, running statistics in `buffers`.
    pub fn layout(params: &mut Layout, buffers: &mut Layout, config: &DenseNetConfig, outputs: usize) -> Self {
        let modules = modules_layout(params, config, |l, name, c| TrainNorm::layout(l, buffers, name, c));
        let classifier = Linear::layout(params, "classifier", config.dims(), outputs, true);
        DenseNetClassifier { config: config.clone(), outputs, modules, classifier }
    }
}

/// What a norm's forward saves: its output after the ReLU and, in training mode, the batch mean
/// and rstd the backward reads.
#[derive(Clone, Copy, Debug)]
struct NormActs {
    out: Fmap,
    stats: Option<(Tensor, Tensor)>,
}

#[derive(Clone, Copy, Debug)]
struct LayerActs {
    /// The concatenation this layer reads.
    inp: Fmap,
    n1: NormActs,
    c1: Fmap,
    n2: NormActs,
    new: Fmap,
}

#[derive(Clone, Copy, Debug)]
struct TransitionActs {
    inp: Fmap,
    n: NormActs,
    conv: Fmap,
}

/// A training forward's saved activations.
#[derive(Clone, Debug)]
pub struct TrainActs {
    x: Fmap,
    c0: Fmap,
    n0: NormActs,
    blocks: Vec<Vec<LayerActs>>,
    block_outs: Vec<Fmap>,
    transitions: Vec<TransitionActs>,
    n5: NormActs,
    pooled: Tensor,
    /// (batch, outputs).
    pub logits: Tensor,
}

type NormFn = dyn Fn(&mut Cx, &TrainNorm, &Fmap) -> Result<NormActs>;

fn norm_params(x: &Fmap) -> BatchNormTrainParams {
    BatchNormTrainParams { rows: x.rows(), channels: x.c, eps: BN_EPS, momentum: BN_MOMENTUM, relu: true }
}

/// relu(batch_norm(x)) in training mode: batch statistics, the running statistics updated.
fn norm_forward(cx: &mut Cx, n: &TrainNorm, x: &Fmap) -> Result<NormActs> {
    let c = x.c;
    let [mean, rstd, scale, shift] = [(); 4].map(|_| cx.arena.alloc_f32([c]));
    let (mean, rstd, scale, shift) = (mean?, rstd?, scale?, shift?);
    let stats = BatchNormStats {
        inp: &x.t,
        weight: &n.weight,
        bias: &n.bias,
        running_mean: &n.running_mean,
        running_var: &n.running_var,
        mean: &mean,
        rstd: &rstd,
        scale: &scale,
        shift: &shift,
    };
    cx.b.batch_norm_stats(&norm_params(x), &stats)?;
    let out = Fmap::alloc(cx.arena, x.batch, x.h, x.w, c)?;
    let apply = BatchNormForward { out: &out.t, inp: &x.t, scale: &scale, shift: &shift };
    cx.b.batch_norm_forward(&BatchNormParams { rows: x.rows(), channels: c, relu: true }, &apply)?;
    Ok(NormActs { out, stats: Some((mean, rstd)) })
}

/// relu(batch_norm(x)) in eval mode: the running statistics folded (on the host: a few hundred
/// values per norm) into the scale and shift of the inference kernel, as the evaluation network
/// folds them at load.
fn norm_eval(cx: &mut Cx, n: &TrainNorm, x: &Fmap) -> Result<NormActs> {
    let b = cx.b;
    let get = |t: &Tensor| b.download(t);
    let (w, bias, m, v) = (get(&n.weight)?, get(&n.bias)?, get(&n.running_mean)?, get(&n.running_var)?);
    let (scale_v, shift_v) = BatchNormParams::fold(&w, &bias, &m, &v, BN_EPS as f64);
    let (scale, shift) = (cx.arena.alloc_f32([x.c])?, cx.arena.alloc_f32([x.c])?);
    b.upload(&scale, &scale_v)?;
    b.upload(&shift, &shift_v)?;
    let out = Fmap::alloc(cx.arena, x.batch, x.h, x.w, x.c)?;
    let apply = BatchNormForward { out: &out.t, inp: &x.t, scale: &scale, shift: &shift };
    b.batch_norm_forward(&BatchNormParams { rows: x.rows(), channels: x.c, relu: true }, &apply)?;
    Ok(NormActs { out, stats: None })
}

/// dinp += the gradient of relu(batch_norm(x)) for dout; the norm's parameter gradients into `g`.
fn norm_backward(
    cx: &mut Cx,
    n: &TrainNorm,
    g: &TrainNorm,
    x: &Fmap,
    a: &NormActs,
    dout: &Fmap,
    dinp: &Fmap,
) -> Result<()> {
    let (mean, rstd) = a.stats.as_ref().ok_or_else(|| anyhow::anyhow!("internal: backward of an eval-mode forward"))?;
    let t = BatchNormBackward {
        dinp: &dinp.t,
        dweight: &g.weight,
        dbias: &g.bias,
        dout: &dout.t,
        inp: &x.t,
        out: &a.out.t,
        mean,
        rstd,
        weight: &n.weight,
    };
    cx.b.batch_norm_backward(&norm_params(x), &t)
}

impl DenseNetClassifier {
    /// The forward in training mode on `x` (batch, h, w, in_channels), every activation kept in the
    /// arena; updates the running statistics.
    pub fn forward_train(&self, cx: &mut Cx, x: &Fmap) -> Result<TrainActs> {
        self.forward(cx, x, &norm_forward)
    }

    /// The logits (batch, outputs) in eval mode (the running statistics, which stay unchanged).
    pub fn forward_eval(&self, cx: &mut Cx, x: &Fmap) -> Result<Tensor> {
        Ok(self.forward(cx, x, &norm_eval)?.logits)
    }

    /// The network on `x`, each batch norm (and its ReLU) applied by `norm`.
    fn forward(&self, cx: &mut Cx, x: &Fmap, norm_forward: &NormFn) -> Result<TrainActs> {
        let m = &self.modules;
        let c0 = m.conv0.apply(cx, x)?;
        let n0 = norm_forward(cx, &m.norm0, &c0)?;
        let mut h = pool(cx, &n0.out, 3, 2, 1, PoolMode::Max)?;
        let (mut blocks, mut block_outs, mut transitions) = (Vec::new(), Vec::new(), Vec::new());
        for (bi, layers) in m.blocks.iter().enumerate() {
            let mut saved = Vec::with_capacity(layers.len());
            for layer in layers {
                let n1 = norm_forward(cx, &layer.norm1, &h)?;
                let c1 = layer.conv1.apply(cx, &n1.out)?;
                let n2 = norm_forward(cx, &layer.norm2, &c1)?;
                let new = layer.conv2.apply(cx, &n2.out)?;
                let cat = Fmap::alloc(cx.arena, h.batch, h.h, h.w, h.c + new.c)?;
                let p = ConcatParams { rows: h.rows(), a_channels: h.c, b_channels: new.c };
                cx.b.concat_channels_forward(&p, &cat.t, &h.t, &new.t)?;
                saved.push(LayerActs { inp: h, n1, c1, n2, new });
                h = cat;
            }
            blocks.push(saved);
            block_outs.push(h);
            if let Some(t) = m.transitions.get(bi) {
                let n = norm_forward(cx, &t.norm, &h)?;
                let conv = t.conv.apply(cx, &n.out)?;
                transitions.push(TransitionActs { inp: h, n, conv });
                h = pool(cx, &conv, 2, 2, 0, PoolMode::Avg)?;
            }
        }
        let n5 = norm_forward(cx, &m.norm5, &h)?;
        let pooled = global_avg(cx, &n5.out)?;
        let logits = self.classifier.apply(cx, &pooled, x.batch)?;
        Ok(TrainActs { x: *x, c0, n0, blocks, block_outs, transitions, n5, pooled, logits })
    }

    /// Accumulates into `g` (this network laid out in the gradient pool) the gradients of a loss
    /// whose gradient with respect to the logits is `dlogits` (batch, outputs).
    pub fn backward(&self, g: &DenseNetClassifier, cx: &mut Cx, a: &TrainActs, dlogits: &Tensor) -> Result<()> {
        let (m, gm, batch) = (&self.modules, &g.modules, a.x.batch);
        let dpooled = zeros(cx, a.pooled.shape)?;
        self.classifier.backward(&g.classifier, cx.b, Some(&dpooled), dlogits, &a.pooled, batch)?;
        let f = a.n5.out;
        let df = zeros_like(cx, &f)?;
        cx.b.pool2d_backward(&Pool2dParams::global_avg(batch, [f.h, f.w, f.c]), &df.t, &dpooled, &f.t)?;
        let last = *a.block_outs.last().expect("a DenseNet has blocks");
        let mut dh = zeros_like(cx, &last)?;
        norm_backward(cx, &m.norm5, &gm.norm5, &last, &a.n5, &df, &dh)?;
        for bi in (0..m.blocks.len()).rev() {
            if let (Some(t), Some(gt), Some(ta)) =
                (m.transitions.get(bi), gm.transitions.get(bi), a.transitions.get(bi))
            {
                // dh is the gradient of the transition's pooled output.
                let dconv = zeros_like(cx, &ta.conv)?;
                let p = Pool2dParams::square(batch, [ta.conv.h, ta.conv.w, ta.conv.c], 2, 2, 0, PoolMode::Avg);
                cx.b.pool2d_backward(&p, &dconv.t, &dh.t, &ta.conv.t)?;
                let dn = zeros_like(cx, &ta.n.out)?;
                t.conv.backward(&gt.conv, cx.b, Some(&dn), &dconv, &ta.n.out)?;
                let dinp = zeros_like(cx, &ta.inp)?;
                norm_backward(cx, &t.norm, &gt.norm, &ta.inp, &ta.n, &dn, &dinp)?;
                dh = dinp;
            }
            // dh is the gradient of the block's last concatenation.
            for (li, layer) in m.blocks[bi].iter().enumerate().rev() {
                let (la, gl) = (&a.blocks[bi][li], &gm.blocks[bi][li]);
                let (dprev, dnew) = (zeros_like(cx, &la.inp)?, zeros_like(cx, &la.new)?);
                let p = ConcatParams { rows: la.inp.rows(), a_channels: la.inp.c, b_channels: la.new.c };
                cx.b.concat_channels_backward(&p, &dprev.t, &dnew.t, &dh.t)?;
                let dn2 = zeros_like(cx, &la.n2.out)?;
                layer.conv2.backward(&gl.conv2, cx.b, Some(&dn2), &dnew, &la.n2.out)?;
                let dc1 = zeros_like(cx, &la.c1)?;
                norm_backward(cx, &layer.norm2, &gl.norm2, &la.c1, &la.n2, &dn2, &dc1)?;
                let dn1 = zeros_like(cx, &la.n1.out)?;
                layer.conv1.backward(&gl.conv1, cx.b, Some(&dn1), &dc1, &la.n1.out)?;
                // The layer's input gets both its copy in the concatenation and the norm's path.
                norm_backward(cx, &layer.norm1, &gl.norm1, &la.inp, &la.n1, &dn1, &dprev)?;
                dh = dprev;
            }
        }
        // dh is the gradient of the stem's max pool.
        let n0 = a.n0.out;
        let dn0 = zeros_like(cx, &n0)?;
        cx.b.pool2d_backward(
            &Pool2dParams::square(batch, [n0.h, n0.w, n0.c], 3, 2, 1, PoolMode::Max),
            &dn0.t,
            &dh.t,
            &n0.t,
        )?;
        let dc0 = zeros_like(cx, &a.c0)?;
        norm_backward(cx, &m.norm0, &gm.norm0, &a.c0, &a.n0, &dn0, &dc0)?;
        m.conv0.backward(&gm.conv0, cx.b, None, &dc0, &a.x)
    }
}

/// The three pools of a network being trained, and its arena for one batch shape.
pub struct ClassifierPools {
    pub net: DenseNetClassifier,
    pub params: Layout,
    pub buffers: Layout,
    pub grads: DenseNetClassifier,
    pub grad_table: Layout,
}

impl ClassifierPools {
    pub fn allocate(b: &mut dyn Backend, config: &DenseNetConfig, outputs: usize) -> Result<ClassifierPools> {
        let measure = || {
            let (mut p, mut buf) = (Layout::unbound(), Layout::unbound());
            DenseNetClassifier::layout(&mut p, &mut buf, config, outputs);
            (p.total(), buf.total())
        };
        let (np, nb) = measure();
        let (pp, pb, pg) =
            (b.alloc(np, "classifier.params")?, b.alloc(nb, "classifier.buffers")?, b.alloc(np, "classifier.grads")?);
        b.mark_params(pp)?;
        let (mut params, mut buffers) = (Layout::new(pp), Layout::new(pb));
        let net = DenseNetClassifier::layout(&mut params, &mut buffers, config, outputs);
        let mut grad_table = Layout::new(pg);
        let grads = DenseNetClassifier::layout(&mut grad_table, &mut Layout::unbound(), config, outputs);
        Ok(ClassifierPools { net, params, buffers, grads, grad_table })
    }

    /// Fills every parameter and running statistic: `get(name, shape)` gives a tensor's values
    /// under its torchvision name.
    pub fn load_with(&self, b: &dyn Backend, get: impl Fn(&str, &[usize]) -> Result<Vec<f32>>) -> Result<()> {
        for l in [&self.params, &self.buffers] {
            for e in l.entries() {
                b.upload(&entry(l, &e.name), &get(&e.name, e.shape.dims())?)?;
            }
        }
        Ok(())
    }

    /// Every tensor of a pool's layout with its values (a state dict's worth).
    pub fn download(&self, b: &dyn Backend, l: &Layout) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
        l.entries()
            .iter()
            .map(|e| Ok((e.name.clone(), e.shape.dims().to_vec(), b.download(&entry(l, &e.name))?)))
            .collect()
    }

    /// torchvision's initialisation of a new DenseNet, from `seed`: every convolution Kaiming-normal
    /// (fan-in, gain √2: std √(2 / (c_in·k·k))), every batch norm weight 1 and bias 0 (running mean
    /// 0, variance 1), the classifier's weight as `nn.Linear` draws it (uniform in ±1/√in) and its
    /// bias 0. The draws are roentgen's (SplitMix64, Box–Muller), not torch's generator: the same
    /// distributions, other values.
    pub fn init_torchvision(&self, b: &dyn Backend, seed: u64) -> Result<()> {
        let mut rng = crate::rng::splitmix::SplitMix64::new(seed);
        for e in self.params.entries() {
            let dims = e.shape.dims();
            let n = e.shape.numel();
            let v: Vec<f32> = if dims.len() == 4 {
                let std = (2.0 / (dims[1] * dims[2] * dims[3]) as f64).sqrt() as f32;
                (0..n).map(|_| rng.next_normal() * std).collect()
            } else if e.name == "classifier.weight" {
                let bound = 1.0 / (dims[1] as f64).sqrt();
                (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect()
            } else if e.name.ends_with(".weight") {
                vec![1.0; n]
            } else {
                vec![0.0; n]
            };
            b.upload(&entry(&self.params, &e.name), &v)?;
        }
        for e in self.buffers.entries() {
            let fill = if e.name.ends_with("running_var") { 1.0 } else { 0.0 };
            b.upload(&entry(&self.buffers, &e.name), &vec![fill; e.shape.numel()])?;
        }
        Ok(())
    }

    pub fn zero_grads(&self, b: &dyn Backend) -> Result<()> {
        b.zero(&whole(&self.grad_table))
    }

    /// One training step's forward and backward on `images` (batch, h, w, in_channels) with
    /// `targets` (batch × outputs; None: missing), in `arena` (from [`Self::training_arena`] for
    /// this shape): the running statistics updated, the gradients of the masked BCE accumulated.
    /// Returns the logits and the loss.
    pub fn forward_backward(
        &self,
        b: &dyn Backend,
        arena: &mut Arena,
        [batch, h, w]: [usize; 3],
        images: &[f32],
        targets: &[Option<bool>],
    ) -> Result<(Vec<f32>, f32)> {
        let mark = arena.mark();
        let mut cx = Cx::new(b, arena);
        let x = Fmap::alloc(cx.arena, batch, h, w, self.net.config.in_channels)?;
        b.upload(&x.t, images)?;
        let dlogits = cx.arena.alloc([batch, self.net.outputs])?;
        let acts = self.net.forward_train(&mut cx, &x)?;
        let logits = b.download(&acts.logits)?;
        let (loss, grad) = crate::train::bce::masked_bce_with_logits(&logits, targets)?;
        b.upload(&dlogits, &grad)?;
        self.net.backward(&self.grads, &mut cx, &acts, &dlogits)?;
        cx.arena.release_all_to(mark);
        Ok((logits, loss))
    }

    /// An arena planned for a training step on batches of (batch, h, w): the input first, then
    /// the logits' gradient, then the forward and backward.
    pub fn training_arena(&self, b: &mut dyn Backend, batch: usize, h: usize, w: usize) -> Result<Arena> {
        crate::nn::planned_arena(b, "classifier.activations", |cx| {
            let x = Fmap::alloc(cx.arena, batch, h, w, self.net.config.in_channels)?;
            let dlogits = cx.arena.alloc([batch, self.net.outputs])?;
            let acts = self.net.forward_train(cx, &x)?;
            self.net.backward(&self.grads, cx, &acts, &dlogits)
        })
    }
}

/// A layout entry's tensor.
fn entry(l: &Layout, name: &str) -> Tensor {
    let e = l.find(name).expect("the name comes from the layout");
    Tensor::new(l.pool(), e.offset, e.shape)
}

/// The first `n` elements of `pool` as one flat tensor (a whole parameter, gradient or moment pool).
pub(crate) fn flat(pool: PoolId, n: usize) -> Tensor {
    Tensor::new(pool, 0, Shape::new(&[n]))
}

/// The whole of a layout's pool as one tensor.
fn whole(l: &Layout) -> Tensor {
    flat(l.pool(), l.total())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;

    /// torchvision's initialisation by its definition: conv weights with std √(2 / fan-in) and mean
    /// 0, norms 1 and 0, running statistics 0 and 1, the classifier within ±1/√in and bias 0;
    /// the same seed gives the same weights, another seed others.
    #[test]
    fn init_follows_torchvision() {
        let config = DenseNetConfig::tiny();
        let mut b = CpuBackend::new();
        let pools = ClassifierPools::allocate(&mut b, &config, 3).unwrap();
        pools.init_torchvision(&b, 7).unwrap();
        let get = |l: &Layout, n: &str| b.download(&entry(l, n)).unwrap();
        // conv1 of the second block's second layer: 8 × (8 + 4 + 4 + 4 = 20) × 1 × 1 … pool all convs.
        let conv: Vec<f32> = pools
            .params
            .entries()
            .iter()
            .filter(|e| e.shape.dims().len() == 4)
            .flat_map(|e| {
                let d = e.shape.dims();
                let std = (2.0 / (d[1] * d[2] * d[3]) as f64).sqrt();
                get(&pools.params, &e.name).into_iter().map(move |v| v as f64 / std).map(|z| z as f32)
            })
            .collect();
        let n = conv.len() as f64;
        let mean = conv.iter().map(|&z| z as f64).sum::<f64>() / n;
        let var = conv.iter().map(|&z| (z as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 4.0 / n.sqrt() && (var - 1.0).abs() < 0.1,
            "standardised conv weights: mean {mean}, var {var} over {n}"
        );
        assert!(get(&pools.params, "features.norm0.weight").iter().all(|&v| v == 1.0));
        assert!(get(&pools.params, "features.norm5.bias").iter().all(|&v| v == 0.0));
        assert!(get(&pools.buffers, "features.norm5.running_var").iter().all(|&v| v == 1.0));
        let bound = 1.0 / (config.dims() as f32).sqrt();
        let w = get(&pools.params, "classifier.weight");
        assert!(w.iter().all(|v| v.abs() <= bound) && w.iter().any(|v| v.abs() > bound / 2.0));
        assert!(get(&pools.params, "classifier.bias").iter().all(|&v| v == 0.0));
        let first = get(&pools.params, "features.conv0.weight");
        pools.init_torchvision(&b, 7).unwrap();
        assert_eq!(get(&pools.params, "features.conv0.weight"), first);
        pools.init_torchvision(&b, 8).unwrap();
        assert_ne!(get(&pools.params, "features.conv0.weight"), first);
    }
}

//! The shared weight generator of the fixture scripts (generate_fid.py: fnv1a64, splitmix_uniform,
//! tensor_range): the same seeded tensors in Rust as PyTorch loads, so large networks need no
//! weights file in the repository.

use roentgen::eval::tensors::MapSource;
use std::collections::HashMap;

pub const WEIGHT_SEED: u64 = 0x524F_454E_5447_454E;

pub fn fnv1a64(s: &str) -> u64 {
    let mut h: u64 = 0xCBF2_9CE4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01B3);
    }
    h
}

pub fn uniform_f64(name: &str, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut r = roentgen::rng::splitmix::SplitMix64::new(fnv1a64(name) ^ WEIGHT_SEED);
    (0..n).map(|_| lo + (hi - lo) * r.next_f64()).collect()
}

pub fn tensor_range(name: &str, shape: &[usize]) -> (f64, f64) {
    match shape.len() {
        4 => {
            let a = (6.0 / (shape[1] * shape[2] * shape[3]) as f64).sqrt();
            (-a, a)
        }
        2 => {
            let a = (3.0 / shape[1] as f64).sqrt();
            (-a, a)
        }
        _ if name.ends_with("running_var") => (0.5, 1.5),
        _ if name.ends_with("weight") => (0.6, 1.4),
        _ => (-0.2, 0.2),
    }
}

pub fn seeded_tensor(name: &str, shape: &[usize]) -> Vec<f32> {
    let (lo, hi) = tensor_range(name, shape);
    uniform_f64(name, shape.iter().product(), lo, hi).into_iter().map(|x| x as f32).collect()
}

/// The generator's weights for every tensor of `specs`, in memory.
pub fn seeded_source(label: &str, specs: &[(String, Vec<usize>)]) -> MapSource {
    let tensors: HashMap<String, (Vec<usize>, Vec<f32>)> =
        specs.iter().map(|(n, s)| (n.clone(), (s.clone(), seeded_tensor(n, s)))).collect();
    MapSource { label: label.into(), tensors }
}

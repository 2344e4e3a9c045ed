//! `TorchGenerator::randn` against torch 2.15's CPU `torch.randn`, bit for bit, for both Box–Muller
//! variants (fixtures: tests/fixtures/randn/, written by tests/fixtures/generate_schedulers.py under
//! ATEN_CPU_CAPABILITY=default, avx2 and avx512).

mod common;

use std::collections::HashMap;

use roentgen::rng::torch::{NormalVariant, TorchGenerator};

struct RandnFixture {
    capability: String,
    cases: Vec<serde_json::Value>,
    tensors: HashMap<String, Vec<f32>>,
}

fn load(cap: &str) -> RandnFixture {
    let path = common::fixture(&format!("randn/randn_{cap}.safetensors"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().expect("fixture metadata");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
            let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name, v)
        })
        .collect();
    RandnFixture {
        capability: meta["capability"].clone(),
        cases: serde_json::from_str::<Vec<serde_json::Value>>(&meta["cases"]).unwrap(),
        tensors,
    }
}

fn fnv1a64(values: &[f32]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for b in v.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// The variant ATen used for a fixture, from the capability torch reported.
fn variant_of(capability: &str) -> NormalVariant {
    match capability {
        "DEFAULT" => NormalVariant::Default,
        "AVX2" | "AVX512" => NormalVariant::Avx2,
        other => panic!("fixture made with an unexpected CPU capability {other}"),
    }
}

/// Replays every case of one fixture; returns (values checked through the hash, values compared
/// one by one).
fn check(cap: &str, variant: NormalVariant) -> (usize, usize) {
    let fx = load(cap);
    assert_eq!(variant_of(&fx.capability), variant, "{cap}: fixture capability {}", fx.capability);
    let (mut hashed, mut compared) = (0usize, 0usize);
    for (ci, case) in fx.cases.iter().enumerate() {
        let seed: u64 = case["seed"].as_str().unwrap().parse().unwrap();
        let sizes: Vec<usize> =
            case["sizes"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        let mut g = TorchGenerator::with_variant(seed, variant);
        for (c, &n) in sizes.iter().enumerate() {
            let ours = g.randn(n);
            let what = format!("{cap}: seed {seed}, sizes {sizes:?}, call {c} (n = {n})");
            let want = &fx.tensors[&format!("s{ci}_c{c}")];
            let (head, tail): (&[f32], &[f32]) = if n <= 128 { (&ours, &[]) } else { (&ours[..64], &ours[n - 64..]) };
            let got: Vec<f32> = head.iter().chain(tail).copied().collect();
            assert_eq!(got.len(), want.len(), "{what}");
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{what}: stored value {i}: ours {a:e}, torch {b:e}");
            }
            compared += got.len();
            assert_eq!(fnv1a64(&ours), case["fnv1a64"][c].as_str().unwrap(), "{what}: hash of all values differs");
            hashed += n;
        }
    }
    println!(
        "{cap} (torch capability {}, {variant:?}): {} cases, {hashed} values bit-exact by hash, {compared} compared one by one",
        fx.capability,
        fx.cases.len()
    );
    (hashed, compared)
}

#[test]
fn randn_default_variant_is_bit_exact() {
    let (hashed, _) = check("default", NormalVariant::Default);
    assert!(hashed > 100_000);
}

#[test]
fn randn_avx2_variant_is_bit_exact() {
    let (hashed, _) = check("avx2", NormalVariant::Avx2);
    assert!(hashed > 100_000);
}

/// On x86-64, torch's AVX-512 kernel uses the same avx_mathfun code as the AVX2 one: its output
/// is the Avx2 variant's, not the scalar one's.
#[test]
fn randn_avx512_capability_is_the_avx2_variant() {
    let fx = load("avx512");
    if fx.capability != "AVX512" {
        println!("fixture made on a machine without AVX-512 ({}); checking it as that", fx.capability);
    }
    check("avx512", variant_of(&fx.capability));
}

/// The variants do differ (else the two tests above would not tell them apart).
#[test]
fn variants_differ_and_serial_path_is_shared() {
    let a = TorchGenerator::with_variant(0, NormalVariant::Default).randn(4096);
    let b = TorchGenerator::with_variant(0, NormalVariant::Avx2).randn(4096);
    let differ = a.iter().zip(&b).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
    println!("seed 0, n = 4096: {differ} values differ between the variants (by an ulp or so)");
    assert!(differ > 0);
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5 * x.abs().max(1.0)));
    // n < 16 does not use normal_fill: the same for both.
    let a = TorchGenerator::with_variant(7, NormalVariant::Default).randn(15);
    let b = TorchGenerator::with_variant(7, NormalVariant::Avx2).randn(15);
    assert_eq!(a, b);
    assert_eq!(TorchGenerator::new(1).variant(), NormalVariant::Default);
}

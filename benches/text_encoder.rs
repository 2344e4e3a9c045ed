//! The CLIP text encoder forward on the CPU backend with SD v1.4's real architecture (CLIP ViT-L/14
//! text tower, 123M parameters) and random weights: batch 1 (one prompt) and batch 2 (prompt and
//! unconditional prompt, as classifier-free guidance runs it), 77 tokens.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use roentgen::backend::cpu::CpuBackend;
use roentgen::models::clip::{ClipTextConfig, ClipTextModel};
use roentgen::models::Component;
use roentgen::nn::Cx;
use std::path::Path;

fn bench(c: &mut Criterion) {
    let cfg_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/sd-v1-4-config/text_encoder/config.json");
    let cfg = ClipTextConfig::from_file(&cfg_path).unwrap();
    let mut b = CpuBackend::new();
    let model = ClipTextModel::random(&mut b, cfg.clone(), 0).unwrap();
    let mut g = c.benchmark_group("clip_text_encoder_sd14");
    g.sample_size(10);
    for batch in [1usize, 2] {
        let mut arena = model.allocate_arena(&mut b, batch, 77, false).unwrap();
        let ids: Vec<u32> = (0..batch * 77).map(|i| (i as u32 * 7919) % cfg.vocab_size as u32).collect();
        // Matmul FLOP per token: 2 · params of the linear layers (attention scores are ~1% more).
        let per_token = 2
            * cfg.num_hidden_layers
            * (4 * cfg.hidden_size * cfg.hidden_size + 2 * cfg.hidden_size * cfg.intermediate_size);
        g.throughput(Throughput::Elements((per_token * batch * 77) as u64));
        g.bench_function(format!("forward_batch{batch}"), |bch| {
            bch.iter(|| {
                arena.release_all_to(0);
                model.forward(&mut Cx::new(&b, &mut arena), &ids, batch, 77).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

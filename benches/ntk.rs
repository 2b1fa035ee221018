//! NTK speed by method on the demo model shape (4 blocks, d_model 128, FFN 512, vocabulary 8192;
//! all 1.85 M parameters) for 64 sequences of 64 tokens: exact (one backward per sample) against
//! batched, ghost and auto. Goal: batched or ghost ≥ 5× faster than exact. `cargo bench --bench ntk`.

use criterion::{criterion_group, criterion_main, Criterion};
use tch::{nn, Device, Kind, Tensor};

use tailscope::capture::{capture, CaptureOptions, Method, Selection};
use tailscope::model::{Arch, ExpertConfig, Model, ModelConfig};
use tailscope::ntk::{kernel, BlockBy};

fn bench(c: &mut Criterion) {
    tch::manual_seed(0);
    let cfg = ModelConfig {
        arch: Arch::Gpt,
        vocab_size: 8192,
        max_len: 64,
        n_layer: 4,
        d_model: 128,
        n_head: 4,
        d_ffn: 512,
        dropout: 0.0,
        tie_embeddings: true,
        experts: ExpertConfig::Dense,
        ..ModelConfig::default()
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Model::new(&vs.root(), &cfg).unwrap();
    let params = Selection::default().select(&vs).unwrap();
    let ids: Vec<i64> =
        Vec::try_from(Tensor::randint(8192, [64 * 64], (Kind::Int64, Device::Cpu))).unwrap();
    let seqs: Vec<Vec<u32>> = ids
        .chunks(64)
        .map(|c| c.iter().map(|&x| x as u32).collect())
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let mut g = c.benchmark_group("ntk_64x64");
    g.sample_size(10);
    for method in [Method::Exact, Method::Batched, Method::Ghost, Method::Auto] {
        g.bench_function(format!("{method:?}"), |b| {
            b.iter(|| {
                let opts = CaptureOptions {
                    method,
                    batch: 16,
                    ..Default::default()
                };
                let cap = capture(&model, &params, &refs, &opts, Device::Cpu, &|_| {}).unwrap();
                kernel(&cap, None, BlockBy::None, false).unwrap().total
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

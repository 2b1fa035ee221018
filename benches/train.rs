//! Training throughput (tokens per second) of the demo model shape (4 blocks, d_model 128, 4 heads,
//! FFN 512, vocabulary 8192, 32 sequences of 64 tokens) in its dense, Switch-MoE (4 experts, last 2
//! blocks) and CSE-MoF (4 experts per block, last 2 blocks, initialised) forms, at equal active
//! parameters per token. One iteration = forward, backward, gradient clipping and an AdamW step.
//! Goal: CSE within 10% of dense. `cargo bench --bench train`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tch::{nn, Device, Kind, Tensor};

use tailscope::model::{
    token_losses, Arch, CseConfig, ExpertConfig, Model, ModelConfig, SwitchConfig,
};
use tailscope::train::optim::{AdamW, AdamWConfig};

fn config(experts: ExpertConfig) -> ModelConfig {
    ModelConfig {
        arch: Arch::Gpt,
        vocab_size: 8192,
        max_len: 64,
        n_layer: 4,
        d_model: 128,
        n_head: 4,
        d_ffn: 512,
        dropout: 0.0,
        tie_embeddings: true,
        experts,
        ..ModelConfig::default()
    }
}

fn bench(c: &mut Criterion) {
    tch::manual_seed(0);
    let (b, t) = (32i64, 64i64);
    let ids = Tensor::randint(8192, [b, t], (Kind::Int64, Device::Cpu));
    let targets = ids.roll([-1], [1]);
    let mask = Tensor::ones([b, t], (Kind::Bool, Device::Cpu));
    let cse = CseConfig {
        experts: vec![4, 4],
        ..CseConfig::default()
    };
    let variants = [
        ("dense", ExpertConfig::Dense),
        (
            "switch",
            ExpertConfig::Switch(SwitchConfig {
                n_experts: 4,
                capacity_factor: 1.25,
                aux_weight: 0.01,
                last_k: 2,
            }),
        ),
        ("cse", ExpertConfig::Cse(cse)),
    ];
    let mut g = c.benchmark_group("train_step");
    g.sample_size(10);
    g.throughput(Throughput::Elements((b * t) as u64));
    for (name, experts) in variants {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new(&vs.root(), &config(experts)).unwrap();
        // Spread the CSE centroids over the projected embeddings of the batch, so every expert works.
        tch::no_grad(|| {
            let out = model.forward_t(&ids, &mask, false, true).unwrap();
            for (layer, r) in model.cse_routers() {
                let v = r.project(
                    &out.seq_emb[layer as usize].unsqueeze(1),
                    &Tensor::ones([b, 1], (Kind::Bool, Device::Cpu)),
                );
                if let Some(cent) = &r.centroids {
                    cent.shallow_clone().copy_(&v.narrow(0, 0, 4));
                }
            }
        });
        let mut opt = AdamW::new(&vs, AdamWConfig::default());
        g.bench_function(name, |bench| {
            bench.iter(|| {
                let out = model.forward_t(&ids, &mask, true, false).unwrap();
                let (loss, _, _) = token_losses(&out.logits, &targets);
                opt.zero_grad();
                (loss + out.aux_loss * 0.01).backward();
                opt.clip_grad_norm(1.0);
                opt.step(1e-3);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

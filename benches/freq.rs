//! Throughput of n-gram counting and scoring (the core of `tailscope freq`), in tokens per second.
//! The end-to-end goal (10 million tokens through `tailscope freq`, tokenisation included, in under
//! a minute on 2 cores) is measured by `scripts/bench-freq`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use tailscope::freq::{NgramCounts, Norm};

/// Zipf-distributed token ids (vocabulary 8192) in sequences of 10 to 40 tokens.
fn corpus(tokens: usize) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let zipf = rand_distr::Zipf::new(8192.0, 1.1).unwrap();
    let mut out = Vec::new();
    let mut n = 0;
    while n < tokens {
        let len = rng.random_range(10..40);
        out.push(
            (0..len)
                .map(|_| rng.sample(zipf) as u32)
                .collect::<Vec<u32>>(),
        );
        n += len;
    }
    out
}

fn bench(c: &mut Criterion) {
    let tokens = 2_000_000;
    let seqs = corpus(tokens);
    let mut g = c.benchmark_group("freq");
    g.sample_size(10);
    g.throughput(Throughput::Elements(tokens as u64));
    for order in 1..=3 {
        g.bench_function(format!("count+score {order}-grams"), |b| {
            b.iter(|| {
                let t = NgramCounts::count(&seqs, order).unwrap();
                seqs.iter()
                    .filter_map(|s| t.score(s, Norm::Max))
                    .sum::<f64>()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Costs that grow with the number of samples, each measured once in one run (not criterion:
//! single runs of seconds to minutes). `cargo bench --bench scale`.
//! - DBSCAN on 10,000 and 100,000 points in 32 dimensions (20 Gaussian clusters plus 5% uniform
//!   noise): the knee rule for eps and the clustering. Goal: 10k under 1 s, 100k feasible. The
//!   brute-force neighbour counts of the same 10k points (what DBSCAN did before the ball tree)
//!   are timed for the ratio.
//! - The principal pair of a kernel: `eigh` against Lanczos at n = 4,096 (ratio), Lanczos at
//!   16,384, and the GC jackknife intervals (32 groups, 12 sample groups) at 16,384.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use tch::{Device, Kind, Tensor};

use tailscope::cluster::{dbscan, eps_from_knee, eps_max_clusters, points, DbscanParams};
use tailscope::ntk::gc;
use tailscope::ntk::lanczos::{top_eigenpair, LanczosOptions};

fn blobs(n: usize, d: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let centres: Vec<Vec<f32>> = (0..20)
        .map(|_| (0..d).map(|_| rng.random_range(-10.0f32..10.0)).collect())
        .collect();
    let normal = Normal::new(0.0f32, 0.5).expect("valid normal");
    let mut out = Vec::with_capacity(n * d);
    for i in 0..n {
        if i % 20 == 19 {
            out.extend((0..d).map(|_| rng.random_range(-12.0f32..12.0)));
        } else {
            let c = &centres[i % 20];
            out.extend(c.iter().map(|m| m + normal.sample(&mut rng)));
        }
    }
    out
}

fn dbscan_at(n: usize) {
    let d = 32;
    let data = blobs(n, d, n as u64);
    let x = points(&data, d).expect("points");
    let t = Instant::now();
    let eps = eps_from_knee(x, 5).expect("eps");
    let t_eps = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let c = dbscan(x, DbscanParams::new(eps, 5).expect("params")).expect("dbscan");
    let t_db = t.elapsed().as_secs_f64();
    println!(
        "dbscan n={n} d={d}: knee eps {eps:.3} in {t_eps:.2} s, clustering in {t_db:.2} s ({} clusters, {} noise); total {:.2} s",
        c.n_clusters,
        c.noise(),
        t_eps + t_db
    );
    // The CSE default rule: DBSCAN at 19 k-distance quantiles, in one multi-radius sweep, against
    // 19 separate clusterings (at the knee radius: comparable work per run).
    let t = Instant::now();
    let best = eps_max_clusters(x, 5, 16).expect("eps");
    let t_many = t.elapsed().as_secs_f64();
    let t19 = if n <= 10_000 {
        let t = Instant::now();
        for _ in 0..19 {
            dbscan(x, DbscanParams::new(eps, 5).expect("params")).expect("dbscan");
        }
        format!(
            ", 19 separate clusterings {:.2} s",
            t.elapsed().as_secs_f64()
        )
    } else {
        String::new()
    };
    println!("dbscan n={n} d={d}: max-clusters eps {best:.3} (19 radii) in {t_many:.2} s{t19}");
    if n <= 10_000 {
        let rows: Vec<&[f32]> = data.chunks(d).collect();
        let t = Instant::now();
        let counts: usize = (0..n)
            .into_par_iter()
            .map(|i| {
                rows.iter()
                    .filter(|r| {
                        r.iter()
                            .zip(rows[i])
                            .map(|(a, b)| (f64::from(*a) - f64::from(*b)).powi(2))
                            .sum::<f64>()
                            <= eps * eps
                    })
                    .count()
            })
            .sum();
        let t_bf = t.elapsed().as_secs_f64();
        println!(
            "  brute-force neighbour counts alone (one radius): {t_bf:.2} s ({counts} pairs); blocked clustering is {:.1}x faster",
            t_bf / t_db
        );
    }
}

fn kernel(n: i64) -> Tensor {
    tch::manual_seed(n);
    let dims = 64;
    let j = Tensor::randn([n, dims], (Kind::Double, Device::Cpu)) * 0.5
        + Tensor::randn([1, dims], (Kind::Double, Device::Cpu));
    j.matmul(&j.tr())
}

fn principal_pairs() {
    let k = kernel(4096);
    let t = Instant::now();
    let (vals, _) = k.linalg_eigh("L");
    let t_eigh = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let p = top_eigenpair(&k, None, LanczosOptions::default()).expect("lanczos");
    let t_l = t.elapsed().as_secs_f64();
    println!(
        "principal pair n=4096: eigh {t_eigh:.2} s, Lanczos {t_l:.3} s ({} steps, residual {:.1e}, |Δλ|/λ {:.1e}): {:.0}x",
        p.steps,
        p.residual,
        (p.lambda - vals.double_value(&[4095])).abs() / p.lambda,
        t_eigh / t_l
    );
    let n = 16_384;
    let k = kernel(n);
    let t = Instant::now();
    let whole = gc::principal(&k).expect("principal");
    println!(
        "principal pair n={n}: Lanczos {:.2} s (λ {:.4e})",
        t.elapsed().as_secs_f64(),
        whole.lambda
    );
    let groups: Vec<Vec<usize>> = (0..12)
        .map(|g| (0..n as usize).filter(|i| i % 12 == g).collect())
        .collect();
    let refs: Vec<&[usize]> = groups.iter().map(Vec::as_slice).collect();
    let t = Instant::now();
    let iv = gc::gc_intervals(
        &tailscope::ntk::op::Dense::new(&k),
        &whole,
        &refs,
        gc::IntervalMethod::Jackknife,
        32,
        0.05,
        0,
    )
    .expect("intervals");
    println!(
        "GC jackknife n={n}, 32 groups, 12 sample groups: {:.1} s (first interval {:?})",
        t.elapsed().as_secs_f64(),
        iv[0]
    );
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument picks a part.
    let which = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .unwrap_or_default();
    if which.is_empty() || which.contains("dbscan") {
        dbscan_at(10_000);
        dbscan_at(100_000);
    }
    if which.is_empty() || which.contains("principal") {
        principal_pairs();
    }
}

//! Coverage of the GC intervals by simulation on kernels with a known GC
//! (`tailscope::ntk::coverage`): for each interval method, how often the 95% interval holds the
//! true GC and its own estimate, per group.
//!   cargo run --release --example gc_coverage -- [REPLICATIONS] [SEED]

use tailscope::ntk::coverage::{simulate, CoverageSetup};
use tailscope::ntk::gc::IntervalMethod;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let replications = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let seed = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1);
    for (label, sizes, noise) in [
        (
            "n 224 (128/64/32), noise 2× signal",
            vec![128, 64, 32],
            0.25,
        ),
        ("n 112 (64/32/16), noise 2× signal", vec![64, 32, 16], 0.25),
        ("n 224 (128/64/32), noise 4× signal", vec![128, 64, 32], 0.5),
    ] {
        let setup = CoverageSetup {
            sizes,
            noise,
            replications,
            seed,
            ..CoverageSetup::default()
        };
        println!("{label}, {replications} replications, seed {seed}:");
        println!(
            "  method       group  size  true GC  mean est.  coverage  holds est.  mean width"
        );
        for (name, method, resamples) in [
            ("jackknife", IntervalMethod::Jackknife, 32),
            ("half-sample", IntervalMethod::HalfSample, 200),
        ] {
            let s = CoverageSetup {
                resamples,
                ..setup.clone()
            };
            for r in simulate(&s, method)? {
                println!(
                    "  {name:<12} {:>5} {:>5} {:>8.3} {:>10.3} {:>9.3} {:>11.3} {:>11.3}",
                    r.group,
                    r.size,
                    r.true_gc,
                    r.mean_estimate,
                    r.coverage,
                    r.holds_estimate,
                    r.mean_width
                );
            }
        }
    }
    Ok(())
}

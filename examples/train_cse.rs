//! Train a CSE model from a training spec through the library (what `tailscope train` does),
//! then evaluate it: perplexity per domain and how validation sequences route through the
//! experts that DBSCAN found.
//!
//! ```sh
//! tailscope corpus ingest fixtures/brown/brown.jsonl.gz -o out/demo/corpus.parquet
//! cargo run --release --example train_cse -- analyses/demo-train.toml out/example-train [STEPS]
//! ```
//!
//! The spec's `cse` run is trained (with `STEPS` steps, default 60) into `OUT/cse`.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use tailscope::eval::evaluate::{evaluate, EvalSpec};
use tailscope::progress::Silent;
use tailscope::train::runs::{train_runs, Overrides, TrainPlan};
use tailscope::train::TrainSpec;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (spec_path, out) = match args.as_slice() {
        [s, o, ..] => (PathBuf::from(s), PathBuf::from(o)),
        _ => anyhow::bail!("usage: train_cse SPEC.toml OUT_DIR [STEPS]"),
    };
    let steps: u64 = args.get(2).map_or(Ok(60), |s| s.parse())?;
    let device = tailscope::device::resolve(tailscope::device::DeviceArg::Cpu)?;
    let mut spec = TrainSpec::read(&spec_path)?;
    spec.apply(&Overrides {
        steps: Some(steps),
        ..Overrides::default()
    })?;
    let runs = vec!["cse".to_string()];
    spec.check_run_names(&runs, &spec_path)?;
    let plan = TrainPlan {
        spec: &spec,
        runs: &runs,
        out: &out,
        resume: false,
        seed: 0,
    };
    let stop = AtomicBool::new(false);
    let trained = train_runs(&plan, device, &stop, &tailscope::train::Silent, &mut |_| {})?;
    for t in &trained {
        let r = &t.result;
        println!(
            "run {}: {} steps, final loss {:.3}",
            r.state.run,
            r.state.step,
            r.state.log.last().map_or(f64::NAN, |x| x.loss)
        );
        for rep in &r.cse_init {
            println!(
                "  block {}: DBSCAN found {} clusters, {} experts of sizes {:?}",
                rep.layer,
                rep.raw_clusters,
                rep.sizes.len(),
                rep.sizes
            );
        }
        let eval = evaluate(
            &EvalSpec {
                model: r.dir.join("final"),
                corpus: spec.data.corpus.clone(),
                tokenizer: spec.data.tokenizer.clone(),
                label: "domain".into(),
                extra_labels: Vec::new(),
                layer: None,
                probe_samples: 1000,
                samples: Some(500),
                seed: 0,
            },
            device,
            &Silent,
        )?;
        for g in &eval.tail_groups {
            println!(
                "  perplexity {:<10} {:>9.2} ({} samples)",
                g.group,
                g.perplexity(),
                g.samples
            );
        }
        for table in &eval.routing {
            println!(
                "  routing at block {}: {} experts",
                table.block, table.experts
            );
            for (label, row) in table.labels.iter().zip(&table.counts) {
                println!("    {label:<18} {row:?}");
            }
        }
    }
    Ok(())
}

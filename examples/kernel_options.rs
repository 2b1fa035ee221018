//! The kernel-options study (README, "Choosing the kernel"): for one model and corpus, the NTK
//! over several parameter selections, two draws of samples and both gradient normalisations,
//! with the diagnostics that say whether the kernel is informative (participation ratio of the
//! principal direction, its share of the trace, GC interval widths) and how far GC per frequency
//! bin moves between the two sample draws. Each selection and draw is captured once; the
//! normalisations share that capture.
//!   cargo run --release --example kernel_options -- MODEL CORPUS [SAMPLES] [PROJECT] [SELECTIONS]
//! SELECTIONS is a comma list of: all, no-embeddings, last-2, mlp, mlp-last-2 (default: the
//! first four). PROJECT 0 (default) keeps gradients unprojected.

use std::path::PathBuf;

use anyhow::Context;
use tailscope::capture::job::{Job, JobSpec};
use tailscope::capture::{CaptureOptions, Projection, ProjectionKind, Selection};
use tailscope::corpus::SplitChoice;
use tailscope::ntk::pipeline::{from_kernel, NtkOptions};
use tailscope::ntk::{kernel, Normalize};
use tailscope::progress::Silent;

/// The parameter selection named `name`.
fn selection(name: &str) -> anyhow::Result<Selection> {
    let globs = |g: &[&str]| g.iter().map(|s| s.to_string()).collect();
    Ok(match name {
        "all" => Selection::default(),
        "no-embeddings" => Selection {
            globs: globs(&["h.*", "ln_f.*", "lm_head.*"]),
            ..Selection::default()
        },
        "last-2" => Selection {
            last_blocks: Some(2),
            ..Selection::default()
        },
        "mlp" => Selection {
            mlp_only: true,
            ..Selection::default()
        },
        "mlp-last-2" => Selection {
            last_blocks: Some(2),
            mlp_only: true,
            ..Selection::default()
        },
        other => anyhow::bail!("unknown selection {other:?}"),
    })
}

/// A frequency bin's label, GC and interval.
type Bin = (usize, f64, Option<(f64, f64)>);

/// One result row: GC per frequency bin and the diagnostics.
struct Row {
    bins: Vec<(f64, Option<(f64, f64)>)>,
    participation: f64,
    top_share: f64,
    median_width: f64,
    warnings: usize,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(model), Some(corpus)) = (args.first(), args.get(1)) else {
        anyhow::bail!("usage: kernel_options MODEL CORPUS [SAMPLES] [PROJECT] [SELECTIONS]");
    };
    let samples: usize = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(256);
    let project: i64 = args.get(3).map(|a| a.parse()).transpose()?.unwrap_or(0);
    let names: Vec<String> = args
        .get(4)
        .map_or("all,no-embeddings,last-2,mlp", |s| s.as_str())
        .split(',')
        .map(str::to_string)
        .collect();
    let device = tailscope::device::resolve(tailscope::device::DeviceArg::Cpu)?;
    println!("model {model}, {samples} validation samples, projection {project} (0: none)");
    println!("selection      params      seed  normalize  PR     PR/n   top share  median width  warnings  GC per bin, rarest first [95% jackknife]");
    let mut rows: Vec<(String, u64, Normalize, Row)> = Vec::new();
    for name in &names {
        for sample_seed in [1u64, 2] {
            let spec = JobSpec {
                model: PathBuf::from(model),
                corpus: PathBuf::from(corpus),
                tokenizer: None,
                split: SplitChoice::Validation,
                samples,
                sample_seed,
                selection: selection(name)?,
                options: CaptureOptions {
                    batch: 8,
                    projection: (project > 0).then_some(Projection {
                        kind: ProjectionKind::Gaussian,
                        dim: project,
                        seed: 0,
                    }),
                    ..CaptureOptions::default()
                },
            };
            let job = Job::prepare(&spec, device).context("loading the model")?;
            let t0 = std::time::Instant::now();
            let cx = job.capture(&job.ids, "capturing", device, &Silent)?;
            let k = kernel(&cx, None, tailscope::ntk::BlockBy::None, false)?;
            let secs = t0.elapsed().as_secs_f64();
            for normalize in [Normalize::None, Normalize::Cosine] {
                let opts = NtkOptions {
                    normalize,
                    ..NtkOptions::default()
                };
                let out = from_kernel(&job, k.shallow_clone(), &opts, device, &Silent)?;
                let s = out.summary.context("summary")?;
                let d = s.diagnostics.context("diagnostics")?;
                let mut bins: Vec<Bin> = out
                    .gc
                    .iter()
                    .filter(|r| r.column == "freq_bin")
                    .map(|r| {
                        (
                            r.group.parse().unwrap_or(0),
                            r.gc.unwrap_or(f64::NAN),
                            r.interval,
                        )
                    })
                    .collect();
                bins.sort_by_key(|b| b.0);
                let mut widths: Vec<f64> = bins
                    .iter()
                    .filter_map(|b| b.2.map(|(lo, hi)| hi - lo))
                    .collect();
                widths.sort_by(f64::total_cmp);
                let row = Row {
                    bins: bins.iter().map(|b| (b.1, b.2)).collect(),
                    participation: d.participation,
                    top_share: d.top_share,
                    median_width: widths.get(widths.len() / 2).copied().unwrap_or(f64::NAN),
                    warnings: s.warnings.len(),
                };
                println!(
                    "{name:<14} {:>10} {sample_seed:>5}  {:<9} {:>6.1} {:>6.3} {:>9.3} {:>13.3} {:>9}  {}   ({secs:.0} s capture)",
                    job.parameter_count(),
                    format!("{normalize:?}").to_lowercase(),
                    row.participation,
                    row.participation / samples as f64,
                    row.top_share,
                    row.median_width,
                    row.warnings,
                    row.bins
                        .iter()
                        .map(|(g, iv)| match iv {
                            Some((lo, hi)) => format!("{g:.2} [{lo:.2}, {hi:.2}]"),
                            None => format!("{g:.2}"),
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                rows.push((name.clone(), sample_seed, normalize, row));
            }
        }
    }
    println!("\nagreement of GC per frequency bin between sample draws 1 and 2:");
    println!("selection      normalize  mean |ΔGC|  bins whose intervals overlap");
    for name in &names {
        for normalize in [Normalize::None, Normalize::Cosine] {
            let pick = |seed| {
                rows.iter()
                    .find(|r| &r.0 == name && r.1 == seed && r.2 == normalize)
                    .map(|r| &r.3)
            };
            let (Some(a), Some(b)) = (pick(1), pick(2)) else {
                continue;
            };
            let pairs: Vec<_> = a.bins.iter().zip(&b.bins).collect();
            let mad =
                pairs.iter().map(|(x, y)| (x.0 - y.0).abs()).sum::<f64>() / pairs.len() as f64;
            let overlap = pairs
                .iter()
                .filter(|(x, y)| match (x.1, y.1) {
                    (Some((a0, a1)), Some((b0, b1))) => a0 <= b1 && b0 <= a1,
                    _ => false,
                })
                .count();
            println!(
                "{name:<14} {:<9} {mad:>11.3}  {overlap} of {}",
                format!("{normalize:?}").to_lowercase(),
                pairs.len()
            );
        }
    }
    Ok(())
}

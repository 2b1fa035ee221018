//! What `tailscope ntk` prints: the kernel, its diagnostics and GC per group, the ranks of an
//! MPI run, the steps of a trajectory.

use std::path::Path;

use crate::capture::job::Job;
use crate::ntk::gc::IntervalMethod;
use crate::ntk::pipeline::{GcRow, NtkOutput, NtkSummary};
use crate::ntk::trajectory::{Checkpoint, Trajectory};
use crate::ntk::Normalize;
use crate::report::Figure;

/// What `tailscope ntk` prints about a finished run written into `out`.
pub fn print_ntk(job: &Job, out: &Path, assemble_max: usize, r: &NtkOutput) {
    if let (Some(rep), None) = (&r.stream, &r.samples) {
        println!(
            "share done: {} shards ({} reused, {} more taken over from other shares), {} tiles ({} reused) under {}",
            rep.shards,
            rep.shards_reused,
            rep.shards_taken_over,
            rep.tiles,
            rep.tiles_reused,
            out.display()
        );
        println!(
            "when every share is done, run the same command with --assemble instead of --shard"
        );
        return;
    }
    if let Some(rep) = &r.stream {
        println!(
            "streamed: {} shards ({} reused), {} tiles ({} reused) under {}",
            rep.shards,
            rep.shards_reused,
            rep.tiles,
            rep.tiles_reused,
            out.display()
        );
    }
    let Some(s) = &r.summary else {
        println!(
            "{} samples exceed --assemble-max {}: the kernel stays in tiles/ (rows and columns as in tiles.parquet, samples in samples.parquet)",
            job.ids.len(),
            assemble_max
        );
        return;
    };
    println!(
        "NTK of {} samples over {} parameters ({} tensors), output {:?}, method {:?}{}: {:.1} s",
        s.samples,
        s.parameters,
        s.tensors,
        s.output,
        s.method,
        s.projection
            .map(|k| format!(", projected to {k}"))
            .unwrap_or_default(),
        s.seconds
    );
    let Some(whole) = &r.principal else {
        println!(
            "wrote {}/kernel.safetensors (diagonal) and samples.parquet",
            out.display()
        );
        return;
    };
    print_diagnostics(s, whole.lambda);
    print_gc(s.interval, &r.gc);
    if let Some(c) = &r.cross {
        println!(
            "cross-kernel {} × {} against the {} split: cross_kernel.safetensors",
            s.samples,
            c.n,
            c.split.as_str()
        );
    }
    match &r.kernel {
        Some(k) => println!(
            "wrote {}/kernel.safetensors ({} blocks), samples.parquet, gc.parquet",
            out.display(),
            k.blocks.len()
        ),
        None => println!(
            "{} samples exceed --assemble-max {}: GC came from the kernel's tiles (by rows over the ranks under MPI), which stay in tiles/; wrote {}/samples.parquet, gc.parquet",
            s.samples,
            assemble_max,
            out.display()
        ),
    }
}

/// GC per frequency bin, then per long-tail flag and expert, each with its interval.
fn print_gc(interval: IntervalMethod, gc: &[GcRow]) {
    println!(
        "GC (cos of the primary gradient directions) [95% {} interval] by 1-gram frequency bin (0 = rarest):",
        interval_name(interval)
    );
    for row in gc.iter().filter(|r| r.column == "freq_bin") {
        println!(
            "  bin {:<3} n {:>4}  mean score {:.4}  GC {}",
            row.group,
            row.n,
            row.mean_freq_score,
            show_gc(row)
        );
    }
    for row in gc
        .iter()
        .filter(|r| r.column == "long_tail" || r.column.starts_with("expert_"))
    {
        println!(
            "  {} {:<8} n {:>4}  GC {}",
            row.column,
            row.group,
            row.n,
            show_gc(row)
        );
    }
}

/// The interval method in words.
fn interval_name(m: IntervalMethod) -> &'static str {
    match m {
        IntervalMethod::Jackknife => "jackknife",
        IntervalMethod::HalfSample => "half-sampling",
    }
}

/// The kernel diagnostics and, when the result is degenerate, the warnings in plain words.
fn print_diagnostics(s: &NtkSummary, lambda: f64) {
    if let Some(d) = &s.diagnostics {
        println!(
            "kernel{}: principal eigenvalue {lambda:.4e} holds {:.1}% of the trace; carried by {:.1} of {} samples (participation ratio); Θ_ii max/median {:.1}; mean |cosine| {:.3}",
            match s.normalize {
                Normalize::Cosine => " (cosine-normalised)",
                Normalize::None => "",
            },
            100.0 * d.top_share,
            d.participation,
            d.samples,
            d.diag_spread,
            d.mean_abs_cosine
        );
    }
    if s.warnings.is_empty() {
        println!("diagnostics: the kernel is not degenerate (no warning)");
    }
    for w in &s.warnings {
        println!("WARNING: {} {}", w.problem, w.change);
    }
}

/// A GC with its interval: `0.812 [0.700, 0.900]`.
fn show_gc(r: &GcRow) -> String {
    match (r.gc, r.interval) {
        (Some(v), Some((lo, hi))) => format!("{v:.3} [{lo:.3}, {hi:.3}]"),
        (Some(v), None) => format!("{v:.3}"),
        _ => "-".into(),
    }
}

/// The ranks of an MPI run: what each computed and reused, and how long it took.
#[cfg(feature = "mpi")]
pub(super) fn ranks(size: usize, ranks: &[crate::ntk::mpi::RankReport], out: &Path) {
    println!("ranks: {size}");
    println!("rank  samples  shards new/reused  tiles new/reused  capture s  tiles s  exchange s  MB sent");
    for p in ranks {
        println!(
            "{:>4}  {:>7}  {:>10}/{:<6}  {:>9}/{:<6}  {:>9.2}  {:>7.2}  {:>10.2}  {:>7.1}",
            p.rank,
            p.samples,
            p.shards_captured,
            p.shards_reused,
            p.tiles_computed,
            p.tiles_reused,
            p.capture_seconds,
            p.tile_seconds,
            p.exchange_seconds,
            p.bytes_sent as f64 / 1e6
        );
    }
    println!("wrote {}/ranks.json", out.display());
}

/// The checkpoints of a trajectory, with the kernel drift and GC per frequency bin at each.
pub(super) fn trajectory(
    model: &Path,
    checkpoints: &[Checkpoint],
    t: &Trajectory,
    figs: &[Figure],
    out: &Path,
) {
    println!(
        "NTK at {} checkpoints of {} ({} reused), steps {}",
        checkpoints.len(),
        model.display(),
        t.reused,
        checkpoints
            .iter()
            .map(|c| c.step.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("step      drift  drift(cos)  GC by frequency bin (0 = rarest)");
    for d in &t.drift {
        let gcs: Vec<String> = t
            .rows
            .iter()
            .filter(|r| r.step == d.step && r.column == "freq_bin")
            .map(|r| format!("{:+.3} [{:+.2}, {:+.2}]", r.gc, r.gc_low, r.gc_high))
            .collect();
        println!(
            "{:<8} {:>6.3} {:>10.3}  {}",
            d.step,
            d.drift,
            d.drift_cosine,
            gcs.join("  ")
        );
    }
    println!(
        "wrote {}/trajectory.parquet, drift.parquet, step-*/ and figures/{{{}}}.{{svg,png}}",
        out.display(),
        figs.iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
}

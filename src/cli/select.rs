//! `tailscope select`: rank an analysis's samples by a criterion and write the selection table.

use std::path::PathBuf;

use clap::Args;

use super::Global;
use crate::analysis::select::{self, Amount, Criterion, Pool, Sources};

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    tailscope select --analysis out/demo/analysis/cse --top 32 -o out/demo/select/flag.parquet\n  \
    tailscope select --analysis out/demo/analysis/cse --criterion uncertainty --top 32 -o out/demo/select/uncertainty.parquet\n  \
    tailscope select --analysis out/demo/analysis/cse --criterion loss --threshold 6.5 -o sel.parquet")]
pub struct SelectArgs {
    /// An `analyze` output folder (analysis.parquet, summary.json).
    #[arg(long, value_name = "DIR", help_heading = "Input")]
    pub analysis: PathBuf,
    /// How samples are ranked (higher score: selected first).
    #[arg(
        long,
        value_enum,
        default_value_t = Criterion::Flag,
        value_name = "CRITERION",
        help_heading = "Selection",
        long_help = "How samples are ranked; every score is 'higher: select first', each a column \
            of the analysis's analysis.parquet. flag (default): the neglect score (learnable and \
            not yet learned), flagged samples first; loss, uncertainty, excess-loss (loss against \
            tokens at the same positions), reducible (needs analyze --reference): highest first; \
            predicted-decrease, support, support-cos: what the training data lowers least, the \
            most isolated gradients first; gc: lowest |GC| of the sample's domain first; \
            self-kernel: largest Θ_ii; alignment: least aligned; frequency: rarest; loss-slope, \
            forgetting, self-influence (need analyze --checkpoints; steepest fall, most forgotten, \
            largest first); rarity-rule: the earlier \
            flag rule; random: a seeded draw. A sample without a score ranks last; ties are \
            broken by a seeded random key."
    )]
    pub criterion: Criterion,
    /// Select the M highest-ranked samples.
    #[arg(
        long,
        value_name = "M",
        conflicts_with = "threshold",
        required_unless_present = "threshold",
        value_parser = super::at_least_one,
        help_heading = "Selection"
    )]
    pub top: Option<usize>,
    /// Select every sample whose score is at least T (a finite number).
    #[arg(long, value_name = "T", value_parser = finite, help_heading = "Selection")]
    pub threshold: Option<f64>,
    /// Unused by analyses of this version (kept for scripts that pass it).
    #[arg(long, value_name = "DIR", help_heading = "Input")]
    pub ntk: Option<PathBuf>,
    /// The model for `--criterion uncertainty` of an analysis made before that column existed.
    #[arg(long, value_name = "PATH", help_heading = "Input")]
    pub model: Option<PathBuf>,
    /// The tokenizer for `--criterion uncertainty` of such an analysis.
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    pub tokenizer: Option<PathBuf>,
    /// The selection table to write (Parquet: id, domain, score, rank, selected, flagged, criterion).
    #[arg(short, long, value_name = "FILE", help_heading = "Output")]
    pub out: PathBuf,
}

/// A score threshold: a finite number (no sample's score is at least NaN).
fn finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(_) => Err(format!(
            "expected a finite number, got {s:?}: no score is at least it"
        )),
        Err(_) => Err(format!("expected a number, got {s:?}")),
    }
}

/// `tailscope select`.
pub fn run(a: &SelectArgs, g: &Global) -> anyhow::Result<()> {
    let device = crate::device::resolve(g.device)?;
    let pool = Pool::read(&a.analysis)?;
    let amount = match (a.top, a.threshold) {
        (Some(m), _) => Amount::Top(m),
        (None, Some(t)) => Amount::Threshold(t),
        (None, None) => anyhow::bail!("give --top M or --threshold T"),
    };
    let sources = Sources {
        ntk: a.ntk.clone(),
        model: a.model.clone(),
        tokenizer: a.tokenizer.clone(),
    };
    let s = select::select(&pool, a.criterion, amount, &sources, device, g.seed)?;
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
    }
    crate::io::write_parquet(&mut s.frame(&pool)?, &a.out)?;
    println!(
        "{} of {} samples selected by {} (seed {}); wrote {}",
        s.selected,
        pool.ids.len(),
        a.criterion.name(),
        g.seed,
        a.out.display()
    );
    for (r, &i) in s.order.iter().take(s.selected.min(5)).enumerate() {
        println!(
            "  {:>3}. {:<16} {:<14} score {:.3}",
            r + 1,
            pool.ids[i],
            pool.domains[i],
            s.scores[i]
        );
    }
    Ok(())
}

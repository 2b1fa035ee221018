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
        long_help = "How samples are ranked; every score is 'higher: select first'. flag (default): \
            the flag rank score (1 − frequency percentile) + (1 − alignment percentile) + loss z, \
            flagged samples first; alignment: lowest cos(g(X), J_i) first; gc: lowest GC of the \
            sample's domain first (needs the NTK folder); self-kernel: largest Θ_ii first; loss: \
            largest mean token loss first; frequency: lowest frequency score first; uncertainty: \
            largest mean token entropy under the model first (runs the model); random: a seeded \
            uniform draw. Ties are broken by a seeded random key."
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
    /// The NTK folder for `--criterion gc` (default: the one the analysis used).
    #[arg(long, value_name = "DIR", help_heading = "Input")]
    pub ntk: Option<PathBuf>,
    /// The model for `--criterion uncertainty` (default: the one the analysis used).
    #[arg(long, value_name = "PATH", help_heading = "Input")]
    pub model: Option<PathBuf>,
    /// The tokenizer for `--criterion uncertainty` (default: the model's, else the corpus's).
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

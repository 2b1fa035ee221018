//! `tailscope report`.

use std::path::PathBuf;

use clap::Args;

use super::Global;

#[derive(Debug, Clone, Args)]
#[command(after_help = "Example:\n  \
    tailscope report --analysis out/demo/analysis/cse --ntk out/demo/ntk/cse --baseline out/demo/ntk/dense \\\n    \
    -o out/demo/report --notebook notebooks-export/demo.ipynb")]
pub struct ReportArgs {
    /// An `analyze` output folder.
    #[arg(long, value_name = "DIR")]
    pub analysis: PathBuf,
    /// The `ntk` folder the analysis was computed from.
    #[arg(long, value_name = "DIR")]
    pub ntk: PathBuf,
    /// The dense baseline's `ntk` folder (heatmap beside this model's).
    #[arg(long, value_name = "DIR")]
    pub baseline: Option<PathBuf>,
    /// A training run folder (log.parquet, clusters.parquet): adds training curves and cluster dynamics.
    #[arg(long, value_name = "DIR")]
    pub train_run: Option<PathBuf>,
    /// Report title.
    #[arg(long, default_value = "tailscope report", value_name = "TEXT")]
    pub title: String,
    /// Output folder (report.html, figures/).
    #[arg(short, long, value_name = "DIR")]
    pub out: PathBuf,
    /// Where the notebook goes (default: report.ipynb in the output folder).
    #[arg(long, value_name = "FILE")]
    pub notebook: Option<PathBuf>,
}

pub fn run(a: &ReportArgs, _g: &Global) -> anyhow::Result<()> {
    let r = crate::report::build(
        &a.analysis,
        &a.ntk,
        a.baseline.as_deref(),
        a.train_run.as_deref(),
        &a.title,
    )?;
    let nb = a
        .notebook
        .clone()
        .unwrap_or_else(|| a.out.join("report.ipynb"));
    crate::report::write(&r, &a.out, &nb)?;
    for s in &r.summary {
        println!("{s}");
    }
    for s in &r.isolation {
        println!("{s}");
    }
    println!("report: {}", a.out.join("report.html").display());
    println!("notebook: {}", nb.display());
    Ok(())
}

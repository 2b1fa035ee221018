//! `tailscope report`.

use std::path::PathBuf;

use clap::Args;

use super::Global;
use crate::report::ReportSpec;

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
    /// A `tailscope study` output folder (selection or CSE study): adds its findings and figure.
    #[arg(long, value_name = "DIR")]
    pub study: Option<PathBuf>,
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

/// `tailscope report`.
pub fn run(a: &ReportArgs, _g: &Global) -> anyhow::Result<()> {
    let spec = ReportSpec {
        analysis: a.analysis.clone(),
        ntk: a.ntk.clone(),
        baseline: a.baseline.clone(),
        train_run: a.train_run.clone(),
        study: a.study.clone(),
        title: a.title.clone(),
        out: a.out.clone(),
        notebook: a.notebook.clone(),
    };
    let r = crate::report::render(&spec)?;
    print_report(&r, &a.out.join("report.html"), &spec.notebook_path());
    Ok(())
}

/// What `tailscope report` prints: the kernel lines, the findings and isolation lines, and where
/// the files are.
pub fn print_report(r: &crate::report::Report, html: &std::path::Path, notebook: &std::path::Path) {
    for s in r.kernel.iter().chain(&r.summary) {
        println!("{s}");
    }
    for s in &r.isolation {
        println!("{s}");
    }
    println!("report: {}", html.display());
    println!("notebook: {}", notebook.display());
}

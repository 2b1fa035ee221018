//! `tailscope run SPEC.toml`: a declarative pipeline (see [`crate::pipeline`] for the spec). The
//! steps run through the library; this file prints their results as the single commands do.

use std::path::{Path, PathBuf};

use clap::Args;

use super::progress::Bars;
use super::train::RunBars;
use super::Global;
use crate::analysis::analyze::{Analysis, AnalyzeSpec};
use crate::capture::job::Job;
use crate::corpus::{BuildStats, Corpus};
use crate::ntk::pipeline::{NtkOptions, NtkOutput};
use crate::pipeline::{self, Observer, Reporting};
use crate::train::runs::TrainedRun;

/// Arguments of `tailscope run`.
#[derive(Debug, Clone, Args)]
#[command(after_help = "Example:\n  tailscope run analyses/demo.toml")]
pub struct RunArgs {
    /// The pipeline spec (TOML).
    #[arg(value_name = "SPEC")]
    pub spec: PathBuf,
}

/// Prints each step's result as the command of the same name would.
struct Printer<'a> {
    spec: &'a Path,
}

impl Observer for Printer<'_> {
    fn step(&mut self, name: &str) {
        tracing::info!("run {}: {name}", self.spec.display());
    }
    fn ingested(&mut self, c: &Corpus, stats: &BuildStats, out: &Path, tok: &Path, vocab: usize) {
        super::corpus::print_summary(c, stats, out, tok, vocab);
    }
    fn trained(&mut self, run: &TrainedRun) {
        super::train::print_run(run);
    }
    fn ntk(&mut self, job: &Job, opts: &NtkOptions, out: &NtkOutput, dir: &Path) {
        super::ntk::print_ntk(job, dir, opts.assemble_max, out);
    }
    fn analysed(&mut self, spec: &AnalyzeSpec, a: &Analysis) {
        super::analyze::print_analysis(spec, a);
    }
    fn reported(&mut self, r: &crate::report::Report, html: &Path, notebook: &Path) {
        super::report::print_report(r, html, notebook);
        println!("HTML report: {}", html.display());
    }
}

/// `tailscope run`.
pub fn run(a: &RunArgs, g: &Global) -> anyhow::Result<()> {
    let device = crate::device::resolve(g.device)?;
    let stop = super::train::ctrl_c_flag();
    let mut printer = Printer { spec: &a.spec };
    let mut rep = Reporting {
        observer: &mut printer,
        progress: &Bars::default(),
        train: &RunBars::default(),
        stop: &stop,
    };
    pipeline::run(&a.spec, g.seed, device, &mut rep)?;
    Ok(())
}

//! The command-line edge: argument parsing (clap derive), logging, progress bars and exit codes.
//! Arguments are parsed into plain structs first; heavy objects are built by the command handlers.
//!
//! Exit status: 0 success; 1 failure; 2 bad input or usage (with a one-line reason naming the
//! file, line, field or option).

mod analyze;
mod capture;
mod corpus;
mod freq;
mod import;
mod ntk;
pub mod progress;
mod report;
mod run;
mod select;
mod study;
mod train;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::device::DeviceArg;

/// tailscope: find the long-tail training data a language model fails to learn.
#[derive(Debug, Parser)]
#[command(
    name = "tailscope",
    version,
    about = "Find the long-tail training data a language model fails to learn, and why",
    long_about = "Find the long-tail training data a language model fails to learn, and why.\n\n\
        Pipeline: corpus (ingest or synth) -> freq -> train -> capture -> ntk -> analyze -> report.\n\
        Exit status: 0 success, 1 failure, 2 bad input or usage.",
    after_help = "Example:\n  tailscope corpus ingest fixtures/brown/brown.jsonl.gz -o out/brown/corpus.parquet\n  \
        tailscope freq --corpus out/brown/corpus.parquet -o out/brown/freq"
)]
/// tailscope's command line.
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: Global,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// Compute device.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = DeviceArg::Auto,
        value_name = "DEVICE",
        help_heading = "Global",
        long_help = "Compute device for tensor work: auto (CUDA when available), cpu, or cuda.\n\
            CPU runs are deterministic for a given --seed. Example: --device cpu"
    )]
    pub device: DeviceArg,
    /// Worker threads (default: all cores).
    #[arg(
        long,
        global = true,
        value_name = "N",
        help_heading = "Global",
        long_help = "Number of worker threads for libtorch and for parallel loops (tokenisation, \
            counting). Default: all cores. Example: --threads 2"
    )]
    pub threads: Option<usize>,
    /// Seed of every random choice.
    #[arg(
        long,
        global = true,
        default_value_t = 0,
        value_name = "SEED",
        help_heading = "Global",
        long_help = "Seed of every random choice (splits, synthetic data, initialisation). The same \
            seed and inputs give the same outputs on the CPU. Example: --seed 42"
    )]
    pub seed: u64,
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = "Global")]
    pub verbose: u8,
    /// Less output: errors only, no progress bars.
    #[arg(
        short,
        long,
        global = true,
        conflicts_with = "verbose",
        help_heading = "Global"
    )]
    pub quiet: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build corpus tables: ingest your data or generate a synthetic long-tail corpus.
    #[command(subcommand)]
    Corpus(corpus::CorpusCommand),
    /// Data-frequency statistics: n-gram counts, sentence frequency scores, long-tail domains.
    Freq(freq::FreqArgs),
    /// Pretrain dense, Switch-MoE and CSE language models from a TOML spec.
    Train(train::TrainArgs),
    /// Perplexity per domain and linear-probe accuracy of a trained model.
    Eval(train::EvalArgs),
    /// Per-sample gradients of a scalar output for chosen parameters.
    Capture(capture::CaptureArgs),
    /// Empirical NTK (total, blocks or diagonal) and gradient consistency.
    Ntk(ntk::NtkArgs),
    /// Frequency correlations, GC per bin and the ranked under-memorised long-tail flags.
    Analyze(analyze::AnalyzeArgs),
    /// Rank an analysis's samples by a criterion and choose what to train on next.
    Select(select::SelectArgs),
    /// A self-contained HTML report and a Jupyter notebook from an analysis.
    Report(report::ReportArgs),
    /// Studies: training on each criterion's selection, or flag ranking quality against ground truth.
    Study(study::StudyArgs),
    /// Run a declarative pipeline spec (train, ntk, analyze, report).
    Run(run::RunArgs),
    /// Save a pretrained model (Hugging Face folder or GGUF file) as a tailscope checkpoint.
    Import(import::ImportArgs),
}

/// Parse `args` and run the command. Usage errors exit through clap (status 2; 0 for --help).
pub fn run<I, T>(args: I) -> anyhow::Result<ExitCode>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_logging(&cli.global);
    progress::set_quiet(cli.global.quiet);
    for (flag, path, kind) in outputs(&cli.command) {
        check_output(flag, path, kind)?;
    }
    crate::device::configure(cli.global.threads, cli.global.seed)?;
    match &cli.command {
        Command::Corpus(cmd) => corpus::run(cmd, &cli.global)?,
        Command::Freq(args) => freq::run(args, &cli.global)?,
        Command::Train(args) => train::run_train(args, &cli.global)?,
        Command::Eval(args) => train::run_eval(args, &cli.global)?,
        Command::Capture(args) => capture::run_capture_cmd(args, &cli.global)?,
        Command::Ntk(args) => ntk::run_ntk(args, &cli.global)?,
        Command::Analyze(args) => analyze::run(args, &cli.global)?,
        Command::Select(args) => select::run(args, &cli.global)?,
        Command::Report(args) => report::run(args, &cli.global)?,
        Command::Study(args) => study::run(args, &cli.global)?,
        Command::Run(args) => run::run(args, &cli.global)?,
        Command::Import(args) => import::run(args, &cli.global)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// What an output path names: a folder the command writes into, or one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Output {
    Folder,
    File,
}

/// The output paths a command was given, with their flags (those of `study` and `run` are in
/// their specs).
fn outputs(c: &Command) -> Vec<(&'static str, &std::path::Path, Output)> {
    use Output::{File, Folder};
    match c {
        Command::Corpus(corpus::CorpusCommand::Ingest(a)) => vec![("-o", &a.build.out, File)],
        Command::Corpus(corpus::CorpusCommand::Synth(a)) => vec![("-o", &a.build.out, File)],
        Command::Corpus(corpus::CorpusCommand::Facts(a)) => {
            let mut v = vec![("-o", a.out.as_path(), File)];
            v.extend(a.probes.iter().map(|p| ("--probes", p.as_path(), File)));
            v
        }
        Command::Freq(a) => vec![("-o", &a.out, Folder)],
        Command::Train(a) => vec![("-o", &a.out, Folder)],
        Command::Eval(a) => a.out.iter().map(|o| ("-o", o.as_path(), Folder)).collect(),
        Command::Capture(a) => vec![("-o", &a.out, Folder)],
        Command::Ntk(a) => vec![("-o", &a.capture.out, Folder)],
        Command::Analyze(a) => vec![("-o", &a.out, Folder)],
        Command::Select(a) => vec![("-o", &a.out, File)],
        Command::Report(a) => {
            let mut v = vec![("-o", a.out.as_path(), Folder)];
            v.extend(a.notebook.iter().map(|n| ("--notebook", n.as_path(), File)));
            v
        }
        Command::Import(a) => vec![("-o", &a.out, Folder)],
        Command::Study(_) | Command::Run(_) => Vec::new(),
    }
}

/// Refuse, before any work and naming `flag`, an output `path` that cannot be one: an existing
/// file where a folder goes, an existing folder where a file goes, or a path below a file.
fn check_output(flag: &str, path: &std::path::Path, kind: Output) -> crate::Result<()> {
    let bad = |m: String| Err(crate::Error::invalid(flag, m));
    let shown = path.display();
    match kind {
        Output::Folder if path.is_file() => {
            return bad(format!(
                "{shown} is an existing file, and the outputs go into a folder: give a folder's path (a new one, or an existing folder)"
            ))
        }
        Output::File if path.is_dir() => {
            return bad(format!(
                "{shown} is an existing folder: give the path of the file to write"
            ))
        }
        _ => {}
    }
    // The nearest part of the path that exists must be a folder.
    let existing = path
        .ancestors()
        .skip(1)
        .filter(|a| !a.as_os_str().is_empty())
        .find(|a| a.exists());
    match existing {
        Some(a) if !a.is_dir() => bad(format!(
            "{} is an existing file, so {shown} cannot be made under it",
            a.display()
        )),
        _ => Ok(()),
    }
}

/// A count that must be at least 1 (`--batch`, `--bins`, `--samples`, …): clap names the flag
/// and shows this message when it is 0 or not a number.
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("expected a whole number, got {s:?}")),
    }
}

/// The one line printed for an error: its chain of causes joined by ": ", leaving out a cause
/// whose text the line already ends with (a library error that names its file shows the
/// system's reason itself, which is also its source).
pub fn message(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// The exit status for an error: 2 when some `tailscope::Error` in its chain is bad input.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    let bad_input = err
        .chain()
        .filter_map(|e| e.downcast_ref::<crate::Error>())
        .any(crate::Error::is_bad_input);
    if bad_input {
        2
    } else {
        1
    }
}

fn init_logging(g: &Global) {
    let level = match (g.quiet, g.verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("warn,tailscope={level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .try_init();
}

//! `tailscope run SPEC.toml`: a declarative pipeline. A spec names the data, the training spec and
//! the runs to train, the capture and NTK settings, the analysis and the report; each step runs
//! the CLI command of the same name with the arguments the spec gives, so a step behaves exactly
//! as that command does (and its outputs can be rerun by hand). Unknown keys are errors naming
//! the key and line; missing files are named before anything runs.
//!
//! ```toml
//! [data]
//! corpus = "out/demo/corpus.parquet"
//! ingest = "corpus.jsonl.gz"           # optional: ingested into `corpus` when it is missing
//! tokenizer = "tokenizer.json"         # optional: for ingest and every step
//! [train]                              # optional: omit to use existing checkpoints
//! config = "analyses/demo-train.toml"
//! runs = ["dense", "cse"]
//! out = "out/demo/train"
//! resume = true                        # finished runs are not trained again
//! [ntk]
//! samples = 512                        # also: split, method, output, params, project, batch,
//!                                      # gc_resamples
//! out = "out/demo/ntk"
//! [analysis]
//! model = "cse"                        # a run name under train.out (or a model folder)
//! baseline = "dense"                   # optional: expert isolation against this run
//! out = "out/demo/analysis"
//! [report]
//! out = "out/demo/report"
//! notebook = "notebooks-export/demo.ipynb"
//! title = "..."
//! ```

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Deserialize;

use super::Global;
use crate::error::Error;

#[derive(Debug, Clone, Args)]
#[command(after_help = "Example:\n  tailscope run analyses/demo.toml")]
pub struct RunArgs {
    /// The pipeline spec (TOML).
    #[arg(value_name = "SPEC")]
    pub spec: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    data: DataStep,
    #[serde(default)]
    train: Option<TrainStep>,
    ntk: NtkStep,
    analysis: AnalysisStep,
    #[serde(default)]
    report: Option<ReportStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataStep {
    corpus: PathBuf,
    #[serde(default)]
    tokenizer: Option<PathBuf>,
    /// A corpus file to ingest into `corpus` when that table does not exist yet (with
    /// `tokenizer` when given).
    #[serde(default)]
    ingest: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainStep {
    config: PathBuf,
    #[serde(default)]
    runs: Vec<String>,
    out: PathBuf,
    #[serde(default)]
    steps: Option<u64>,
    /// Continue runs from their checkpoints (finished runs are not trained again).
    #[serde(default)]
    resume: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NtkStep {
    #[serde(default = "default_samples")]
    samples: usize,
    #[serde(default)]
    split: Option<String>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    output: Option<String>,
    #[serde(default)]
    params: Vec<String>,
    #[serde(default)]
    project: Option<i64>,
    #[serde(default)]
    batch: Option<usize>,
    #[serde(default)]
    gc_resamples: Option<usize>,
    out: PathBuf,
}

fn default_samples() -> usize {
    512
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnalysisStep {
    model: String,
    #[serde(default)]
    baseline: Option<String>,
    out: PathBuf,
    #[serde(default)]
    resamples: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportStep {
    out: PathBuf,
    #[serde(default)]
    notebook: Option<PathBuf>,
    #[serde(default)]
    title: Option<String>,
}

/// The folder name of a model's outputs: a run name as it is; for a path, the file stem (a GGUF
/// file) or the folder name (a checkpoint's `final` folder: its run's name).
fn model_label(m: &str) -> String {
    let p = Path::new(m);
    if !m.contains('/') {
        return m.to_string();
    }
    let stem = |q: &Path| q.file_stem().map(|x| x.to_string_lossy().into_owned());
    match stem(p) {
        Some(x) if x == "final" => p.parent().and_then(stem).unwrap_or(x),
        Some(x) => x,
        None => m.replace('/', "_"),
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

pub fn run(a: &RunArgs, g: &Global) -> anyhow::Result<()> {
    let spec: Spec = crate::io::read_toml(&a.spec)?;
    // A model is a run name under train.out, or a model folder.
    let model_dir = |name: &str| -> PathBuf {
        match &spec.train {
            Some(t) if !name.contains('/') => t.out.join(name).join("final"),
            _ => PathBuf::from(name),
        }
    };
    if let Some(t) = &spec.train {
        if !t.config.exists() {
            return Err(Error::in_file(
                &a.spec,
                format!("train.config: {} not found", t.config.display()),
            )
            .into());
        }
    } else {
        for m in std::iter::once(&spec.analysis.model).chain(spec.analysis.baseline.iter()) {
            if !model_dir(m).exists() {
                return Err(Error::in_file(
                    &a.spec,
                    format!(
                        "analysis: model {:?} not found (no [train] step to make it)",
                        m
                    ),
                )
                .into());
            }
        }
    }
    if let Some(input) = spec
        .data
        .ingest
        .as_ref()
        .filter(|_| !spec.data.corpus.exists())
    {
        if !input.exists() {
            return Err(Error::in_file(
                &a.spec,
                format!("data.ingest: {} not found", input.display()),
            )
            .into());
        }
    } else if !spec.data.corpus.exists() {
        return Err(Error::in_file(
            &a.spec,
            format!("data.corpus: {} not found", spec.data.corpus.display()),
        )
        .into());
    }
    let mut global: Vec<String> = vec!["tailscope".into(), "--seed".into(), g.seed.to_string()];
    if let Some(t) = g.threads {
        global.extend(["--threads".into(), t.to_string()]);
    }
    global.push("--device".into());
    global.push(
        match g.device {
            crate::device::DeviceArg::Auto => "auto",
            crate::device::DeviceArg::Cpu => "cpu",
            crate::device::DeviceArg::Cuda => "cuda",
        }
        .into(),
    );
    if g.quiet {
        global.push("-q".into());
    }
    let step = |name: &str, args: Vec<String>| -> anyhow::Result<()> {
        tracing::info!("run {}: {name} {}", a.spec.display(), args.join(" "));
        let mut argv = global.clone();
        argv.push(name.to_string());
        argv.extend(args);
        super::run(argv)
            .map(|_| ())
            .map_err(|e| e.context(format!("step `{name}` of {}", a.spec.display())))
    };
    let corpus = s(&spec.data.corpus);
    let tok: Vec<String> = spec
        .data
        .tokenizer
        .iter()
        .flat_map(|t| ["--tokenizer".to_string(), s(t)])
        .collect();
    if let Some(input) = spec
        .data
        .ingest
        .as_ref()
        .filter(|_| !spec.data.corpus.exists())
    {
        let mut args = vec![s(input)];
        args.extend(tok.clone());
        args.extend(["-o".into(), corpus.clone()]);
        step("corpus", [vec!["ingest".to_string()], args].concat())?;
    }
    if let Some(t) = &spec.train {
        let mut args = vec![
            "--config".into(),
            s(&t.config),
            "--corpus".into(),
            corpus.clone(),
            "-o".into(),
            s(&t.out),
        ];
        for r in &t.runs {
            args.extend(["--run".into(), r.clone()]);
        }
        if let Some(n) = t.steps {
            args.extend(["--steps".into(), n.to_string()]);
        }
        if t.resume {
            args.push("--resume".into());
        }
        step("train", args)?;
    }
    let n = &spec.ntk;
    let models: Vec<&String> = std::iter::once(&spec.analysis.model)
        .chain(spec.analysis.baseline.iter())
        .collect();
    for m in &models {
        let mut args = vec![
            "--model".into(),
            s(&model_dir(m)),
            "--corpus".into(),
            corpus.clone(),
            "--samples".into(),
            n.samples.to_string(),
        ];
        args.extend(tok.clone());
        for (flag, v) in [
            ("--split", &n.split),
            ("--method", &n.method),
            ("--output", &n.output),
        ] {
            if let Some(v) = v {
                args.extend([flag.to_string(), v.clone()]);
            }
        }
        for p in &n.params {
            args.extend(["--params".into(), p.clone()]);
        }
        if let Some(k) = n.project {
            args.extend(["--project".into(), k.to_string()]);
        }
        if let Some(b) = n.batch {
            args.extend(["--batch".into(), b.to_string()]);
        }
        if let Some(r) = n.gc_resamples {
            args.extend(["--gc-resamples".into(), r.to_string()]);
        }
        args.extend(["-o".into(), s(&n.out.join(model_label(m)))]);
        step("ntk", args)?;
    }
    let an = &spec.analysis;
    let ntk_dir = |m: &str| n.out.join(model_label(m));
    let mut args = vec![
        "--ntk".into(),
        s(&ntk_dir(&an.model)),
        "--model".into(),
        s(&model_dir(&an.model)),
        "--corpus".into(),
        corpus.clone(),
    ];
    args.extend(tok.clone());
    if let Some(b) = &an.baseline {
        args.extend(["--baseline".into(), s(&ntk_dir(b))]);
    }
    if let Some(r) = an.resamples {
        args.extend(["--resamples".into(), r.to_string()]);
    }
    args.extend(["-o".into(), s(&an.out)]);
    step("analyze", args)?;
    if let Some(r) = &spec.report {
        let mut args = vec![
            "--analysis".into(),
            s(&an.out),
            "--ntk".into(),
            s(&ntk_dir(&an.model)),
        ];
        if let Some(b) = &an.baseline {
            args.extend(["--baseline".into(), s(&ntk_dir(b))]);
        }
        if let Some(t) = &r.title {
            args.extend(["--title".into(), t.clone()]);
        }
        if spec.train.is_some() || an.model.contains('/') {
            // The run folder holds log.parquet and clusters.parquet beside final/.
            if let Some(run) = model_dir(&an.model)
                .parent()
                .filter(|r| r.join("log.parquet").exists())
            {
                args.extend(["--train-run".into(), s(run)]);
            }
        }
        if let Some(nb) = &r.notebook {
            args.extend(["--notebook".into(), s(nb)]);
        }
        args.extend(["-o".into(), s(&r.out)]);
        step("report", args)?;
        println!("HTML report: {}", r.out.join("report.html").display());
    }
    Ok(())
}

//! Declarative pipelines (`tailscope run SPEC.toml`): a spec names the data, the training spec
//! and the runs to train, the capture and NTK settings, the analysis and the report, and
//! [`run`] carries them out through the library functions the single commands use, so a step
//! gives what the command of the same name gives (and its outputs can be rerun by hand). Unknown
//! keys are errors naming the key and line; missing files are named before anything runs.
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
//!                                      # gc_resamples, interval, normalize
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
use std::sync::atomic::AtomicBool;

use serde::Deserialize;
use tch::Device;

use crate::analysis::analyze::{self, Analysis, AnalyzeSpec};
use crate::capture::job::{Job, JobSpec};
use crate::capture::{CaptureOptions, Method, OutputKind, Selection};
pub use crate::corpus::ingest_default;
use crate::corpus::{BuildStats, Corpus, SplitChoice};
use crate::error::{Error, Result};
use crate::ntk::pipeline::{self as ntk_pipeline, NtkOptions, NtkOutput};
use crate::ntk::{gc::IntervalMethod, Normalize};
use crate::progress::Progress;
use crate::report::ReportSpec;
use crate::train::runs::{self, TrainPlan, TrainedRun};
use crate::train::TrainSpec;

/// A pipeline spec.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// The corpus.
    pub data: DataStep,
    /// Models to train (omit to use existing ones).
    #[serde(default)]
    pub train: Option<TrainStep>,
    /// NTK settings, applied to the analysed model and its baseline.
    pub ntk: NtkStep,
    /// The analysis.
    pub analysis: AnalysisStep,
    /// The report.
    #[serde(default)]
    pub report: Option<ReportStep>,
}

/// `[data]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataStep {
    /// The corpus table.
    pub corpus: PathBuf,
    /// A tokenizer for ingest and every step.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// A corpus file ingested into `corpus` when that table does not exist yet.
    #[serde(default)]
    pub ingest: Option<PathBuf>,
}

/// `[train]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainStep {
    /// The training spec.
    pub config: PathBuf,
    /// Runs to train (default: all).
    #[serde(default)]
    pub runs: Vec<String>,
    /// Output folder.
    pub out: PathBuf,
    /// Override of `train.steps`.
    #[serde(default)]
    pub steps: Option<u64>,
    /// Continue runs from their checkpoints (finished runs are not trained again).
    #[serde(default)]
    pub resume: bool,
}

/// `[ntk]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NtkStep {
    /// Number of samples.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// 0 (default): samples evenly spaced over the split; otherwise a seeded random draw.
    #[serde(default)]
    pub sample_seed: Option<u64>,
    /// Inclusive block range of the parameters (`first..last`), OR-ed with `params`.
    #[serde(default)]
    pub layers: Option<String>,
    /// The last k blocks. With no `params`, `layers`, `last_blocks` or `mlp_only`, the MLPs of
    /// the last 2 (as `ntk`).
    #[serde(default)]
    pub last_blocks: Option<i64>,
    /// Only MLP parameters of what the rest selects.
    #[serde(default)]
    pub mlp_only: bool,
    /// Every parameter when no other selection is given.
    #[serde(default)]
    pub all_params: bool,
    /// Split of the samples (default validation).
    #[serde(default)]
    pub split: Option<SplitChoice>,
    /// Capture method (default batched).
    #[serde(default)]
    pub method: Option<Method>,
    /// Scalar output (default mean-loss).
    #[serde(default)]
    pub output: Option<OutputKind>,
    /// Parameter name globs (default: all).
    #[serde(default)]
    pub params: Vec<String>,
    /// Projection dimension.
    #[serde(default)]
    pub project: Option<i64>,
    /// Projection kind (default sparse; `gaussian`, `kronecker`, `rademacher`), as `--projection`.
    #[serde(default)]
    pub projection: Option<crate::capture::ProjectionKind>,
    /// Samples per pass (default 16).
    #[serde(default)]
    pub batch: Option<usize>,
    /// Memory budget of capture in GB (default: 80% of the memory available at start).
    #[serde(default)]
    pub memory: Option<f64>,
    /// Jackknife groups (or half-samples) of the GC intervals (default 32).
    #[serde(default)]
    pub gc_resamples: Option<usize>,
    /// How the GC intervals are computed (default jackknife).
    #[serde(default)]
    pub interval: Option<IntervalMethod>,
    /// How per-sample gradients are scaled before the principal direction.
    #[serde(default)]
    pub normalize: Option<Normalize>,
    /// Output folder; each model writes into a subfolder named after it.
    pub out: PathBuf,
}

fn default_samples() -> usize {
    crate::capture::job::DEFAULT_SAMPLES
}

/// `[analysis]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnalysisStep {
    /// A run name under `train.out`, or a model path.
    pub model: String,
    /// The dense baseline (run name or path): adds expert isolation.
    #[serde(default)]
    pub baseline: Option<String>,
    /// Output folder.
    pub out: PathBuf,
    /// Bootstrap resamples of each correlation (default 1000).
    #[serde(default)]
    pub resamples: Option<usize>,
    /// Training texts of the learnability statistics (default 2048; 0: none).
    #[serde(default)]
    pub train_samples: Option<usize>,
    /// A reference model (run name or path) for the reducible loss.
    #[serde(default)]
    pub reference: Option<String>,
}

/// `[report]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportStep {
    /// Output folder.
    pub out: PathBuf,
    /// Where the notebook goes (default: report.ipynb in `out`).
    #[serde(default)]
    pub notebook: Option<PathBuf>,
    /// Report title.
    #[serde(default)]
    pub title: Option<String>,
}

/// Sees each step's result as the pipeline runs (the CLI prints them).
pub trait Observer {
    /// A step begins.
    fn step(&mut self, _name: &str) {}
    /// The corpus was ingested.
    fn ingested(
        &mut self,
        _corpus: &Corpus,
        _stats: &BuildStats,
        _out: &Path,
        _tok: &Path,
        _vocab: usize,
    ) {
    }
    /// A training run ended.
    fn trained(&mut self, _run: &TrainedRun) {}
    /// An NTK was computed and written into `dir`.
    fn ntk(&mut self, _job: &Job, _opts: &NtkOptions, _out: &NtkOutput, _dir: &Path) {}
    /// The analysis was computed and written.
    fn analysed(&mut self, _spec: &AnalyzeSpec, _analysis: &Analysis) {}
    /// The report was written.
    fn reported(&mut self, _report: &crate::report::Report, _html: &Path, _notebook: &Path) {}
}

/// An observer that ignores everything.
impl Observer for () {}

/// How a pipeline reports: step results and progress.
pub struct Reporting<'a> {
    /// Step results.
    pub observer: &'a mut dyn Observer,
    /// Progress of long loops.
    pub progress: &'a dyn Progress,
    /// Progress of training runs.
    pub train: &'a dyn crate::train::Progress,
    /// Set to stop training early (Ctrl-C), with a checkpoint.
    pub stop: &'a AtomicBool,
}

/// The folder name of a model's outputs: a run name as it is; for a path, the file stem (a GGUF
/// file) or the folder name (a checkpoint's `final` folder: its run's name).
pub fn model_label(m: &str) -> String {
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

impl Spec {
    /// Read a spec; TOML errors carry the file and line.
    pub fn read(path: &Path) -> Result<Spec> {
        crate::io::read_toml(path)
    }

    /// A model: a run name under `train.out`, or a model path.
    pub fn model_dir(&self, name: &str) -> PathBuf {
        match &self.train {
            Some(t) if !name.contains('/') => t.out.join(name).join("final"),
            _ => PathBuf::from(name),
        }
    }

    /// The NTK folder of a model.
    pub fn ntk_dir(&self, name: &str) -> PathBuf {
        self.ntk.out.join(model_label(name))
    }

    /// The analysed model and its baseline.
    fn models(&self) -> Vec<&String> {
        std::iter::once(&self.analysis.model)
            .chain(self.analysis.baseline.iter())
            .collect()
    }

    /// Whether the corpus is to be ingested first.
    fn ingest_input(&self) -> Option<&PathBuf> {
        self.data
            .ingest
            .as_ref()
            .filter(|_| !self.data.corpus.exists())
    }

    /// Name what is missing, or asked for in vain, before anything runs.
    pub fn check_inputs(&self, path: &Path) -> Result<()> {
        let missing = |what: String| Err(Error::in_file(path, what));
        if self.ntk.projection.is_some() && self.ntk.project.is_none() {
            return missing(
                "ntk.projection applies to a projection, and none was asked for: add `project = K` (the dimension to project to) under [ntk], or drop `projection`".into(),
            );
        }
        match &self.train {
            Some(t) if !t.config.exists() => {
                return missing(format!("train.config: {} not found", t.config.display()))
            }
            Some(_) => {}
            None => {
                for m in self.models() {
                    if !self.model_dir(m).exists() {
                        return missing(format!(
                            "analysis: model {m:?} not found (no [train] step to make it)"
                        ));
                    }
                }
            }
        }
        match self.ingest_input() {
            Some(input) if !input.exists() => {
                missing(format!("data.ingest: {} not found", input.display()))
            }
            Some(_) => Ok(()),
            None if !self.data.corpus.exists() => missing(format!(
                "data.corpus: {} not found",
                self.data.corpus.display()
            )),
            None => Ok(()),
        }
    }
}

/// Run the spec at `path`: ingest, train, NTK of the model and its baseline, analysis, report.
pub fn run(path: &Path, seed: u64, device: Device, rep: &mut Reporting) -> Result<()> {
    let spec = Spec::read(path)?;
    spec.check_inputs(path)?;
    let ctx = |step: &str, e: Error| Error::Step {
        step: step.to_string(),
        spec: path.to_path_buf(),
        source: Box::new(e),
    };
    if let Some(input) = spec.ingest_input() {
        rep.observer.step("corpus ingest");
        ingest_step(&spec, input, seed, rep).map_err(|e| ctx("corpus", e))?;
    }
    if let Some(t) = &spec.train {
        rep.observer.step("train");
        train_step(&spec, t, seed, device, rep).map_err(|e| ctx("train", e))?;
    }
    for m in spec.models() {
        rep.observer.step("ntk");
        ntk_step(&spec, m, seed, device, rep).map_err(|e| ctx("ntk", e))?;
    }
    rep.observer.step("analyze");
    analysis_step(&spec, seed, device, rep).map_err(|e| ctx("analyze", e))?;
    if let Some(r) = &spec.report {
        rep.observer.step("report");
        report_step(&spec, r, rep).map_err(|e| ctx("report", e))?;
    }
    Ok(())
}

/// Ingest `input` into the spec's corpus table with `corpus ingest`'s defaults.
fn ingest_step(spec: &Spec, input: &Path, seed: u64, rep: &mut Reporting) -> Result<()> {
    let out = &spec.data.corpus;
    let (corpus, stats, tok_out, vocab) = ingest_default(
        input,
        out,
        spec.data.tokenizer.as_deref(),
        seed,
        rep.progress,
    )?;
    rep.observer.ingested(&corpus, &stats, out, &tok_out, vocab);
    Ok(())
}

/// Train the spec's runs.
fn train_step(
    spec: &Spec,
    t: &TrainStep,
    seed: u64,
    device: Device,
    rep: &mut Reporting,
) -> Result<()> {
    let mut ts = TrainSpec::read(&t.config)?;
    ts.apply(&crate::train::runs::Overrides {
        steps: t.steps,
        corpus: Some(spec.data.corpus.clone()),
        ..Default::default()
    })?;
    ts.check_run_names(&t.runs, &t.config)?;
    let plan = TrainPlan {
        spec: &ts,
        runs: &t.runs,
        out: &t.out,
        resume: t.resume,
        seed,
    };
    let observer = &mut *rep.observer;
    runs::train_runs(&plan, device, rep.stop, rep.train, &mut |r| {
        observer.trained(r)
    })?;
    Ok(())
}

/// The NTK of one model with the spec's settings, written into its NTK folder.
fn ntk_step(spec: &Spec, m: &str, seed: u64, device: Device, rep: &mut Reporting) -> Result<()> {
    let n = &spec.ntk;
    let job_spec = JobSpec {
        model: spec.model_dir(m),
        corpus: spec.data.corpus.clone(),
        tokenizer: spec.data.tokenizer.clone(),
        split: n.split.unwrap_or(SplitChoice::Validation),
        samples: n.samples,
        sample_seed: n.sample_seed.unwrap_or(0),
        selection: Selection {
            globs: n.params.clone(),
            layers: n
                .layers
                .as_deref()
                .map(crate::capture::job::parse_block_range)
                .transpose()?,
            last_blocks: n.last_blocks,
            mlp_only: n.mlp_only,
            ..Selection::default()
        }
        .or_recommended(n.all_params),
        options: CaptureOptions {
            output: n.output.unwrap_or_default(),
            method: n.method.unwrap_or_default(),
            projection: n.project.map(|dim| crate::capture::Projection {
                kind: n.projection.unwrap_or_default(),
                dim,
                seed,
            }),
            batch: n.batch.unwrap_or(crate::capture::job::DEFAULT_BATCH),
            probes: crate::capture::job::DEFAULT_PROBES,
            seed,
            memory: match n.memory {
                Some(gb) if gb > 0.0 => Some((gb * 1e9) as u64),
                Some(gb) => {
                    return Err(Error::invalid(
                        "[ntk] memory",
                        format!("must be a positive number of GB, got {gb}"),
                    ))
                }
                None => crate::capture::memory::default_budget(),
            },
            ..CaptureOptions::default()
        },
    };
    let opts = NtkOptions {
        gc_resamples: n.gc_resamples.unwrap_or(ntk_pipeline::DEFAULT_GC_RESAMPLES),
        interval: n.interval.unwrap_or_default(),
        normalize: n.normalize.unwrap_or_default(),
        seed,
        ..NtkOptions::default()
    };
    let dir = spec.ntk_dir(m);
    let job = Job::prepare(&job_spec, device)?;
    let out = ntk_pipeline::compute_into(&job, &opts, device, &dir, rep.progress)?;
    rep.observer.ntk(&job, &opts, &out, &dir);
    Ok(())
}

/// The analysis of the model (with isolation against the baseline).
fn analysis_step(spec: &Spec, seed: u64, device: Device, rep: &mut Reporting) -> Result<()> {
    let an = &spec.analysis;
    let defaults = crate::analysis::learnability::LearnabilityOptions::default();
    let train_samples = an.train_samples.unwrap_or(defaults.train_samples);
    let aspec = AnalyzeSpec {
        tokenizer: spec.data.tokenizer.clone(),
        resamples: an.resamples.unwrap_or(analyze::DEFAULT_RESAMPLES),
        baseline: an.baseline.as_deref().map(|b| spec.ntk_dir(b)),
        learnability: (train_samples > 0).then_some(
            crate::analysis::learnability::LearnabilityOptions {
                train_samples,
                sample_seed: seed.max(1),
                ..defaults
            },
        ),
        reference: an.reference.as_deref().map(|r| spec.model_dir(r)),
        memory: crate::capture::memory::default_budget(),
        seed,
        ..AnalyzeSpec::new(
            &spec.ntk_dir(&an.model),
            &spec.model_dir(&an.model),
            &spec.data.corpus,
        )
    };
    let mut a = analyze::analyze(&aspec, device, rep.progress)?;
    a.write(&an.out)?;
    rep.observer.analysed(&aspec, &a);
    Ok(())
}

/// The HTML report and notebook.
fn report_step(spec: &Spec, r: &ReportStep, rep: &mut Reporting) -> Result<()> {
    let an = &spec.analysis;
    // A run folder holds log.parquet and clusters.parquet beside final/.
    let run_dir = if spec.train.is_some() || an.model.contains('/') {
        spec.model_dir(&an.model)
            .parent()
            .filter(|d| d.join("log.parquet").exists())
            .map(Path::to_path_buf)
    } else {
        None
    };
    let rs = ReportSpec {
        analysis: an.out.clone(),
        ntk: spec.ntk_dir(&an.model),
        baseline: an.baseline.as_deref().map(|b| spec.ntk_dir(b)),
        train_run: run_dir,
        study: None,
        title: r.title.clone().unwrap_or_else(|| "tailscope report".into()),
        out: r.out.clone(),
        notebook: r.notebook.clone(),
    };
    let report = crate::report::render(&rs)?;
    let nb = rs.notebook_path();
    rep.observer
        .reported(&report, &r.out.join("report.html"), &nb);
    Ok(())
}

//! CSE against dense and Switch-MoE over seeds (`tailscope study` with an `[experts]` spec,
//! `analyses/cse-study.toml`).
//!
//! For every seed and every `[[run]]` (a name, its experts and, optionally, its own CSE warm-up
//! share): the run trained from scratch with the spec's model shape and training options (the
//! same data order and initial trunk per seed); its evaluation on `eval_samples` validation
//! sentences (perplexity overall, on long-tail and on common domains) with linear probes of the
//! domain and of the long-tail label from the last block's sequence embeddings (fitted on
//! `probe_samples` training sentences); the default NTK of `ntk_samples` validation sentences, and
//! for every routed run the expert-isolation analysis against the baseline run's kernel on the
//! same sentences (experts used, isolated experts, NMI(domain, expert), separation of the experts'
//! inputs); and the cluster dynamics of the probe sentences at the last step (DBSCAN clusters and
//! distance/radius ratio at the output of each of the last blocks).
//!
//! Across seeds: means with 95% t intervals per run, and each run against the baseline paired by
//! seed (perplexity as a relative change in %, probe accuracies as differences).
//!
//! Outputs under `out`: `seed-S/{train, eval, ntk, analysis}/<run>/` (each step's own outputs;
//! finished runs and their measurements are reused on a rerun), `results.parquet` (seed, run,
//! metric, value), `summary.parquet` (run, metric, mean and interval), `comparisons.parquet` (run,
//! metric, run against the baseline and interval), `experts.md` and `figures/cse_study.{svg,png}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use polars::prelude::{Column, DataFrame};
use serde::{Deserialize, Serialize};
use tch::Device;

use super::{interval_columns, t_interval, Interval};
use crate::analysis::analyze::{self, AnalyzeSpec};
use crate::corpus::SplitChoice;
use crate::error::{Error, Result};
use crate::eval::evaluate::{evaluate, EvalSpec};
use crate::model::ExpertConfig;
use crate::progress::Progress;
use crate::train::spec::{DataSpec, ModelSpec};
use crate::train::{self, RunSpec, TrainData, TrainOptions, TrainSpec};

/// An experts study spec: `[experts]`, `[model]`, `[train]` and `[[run]]`s.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertsSpec {
    /// `[experts]`.
    pub experts: ExpertsSettings,
    /// `[model]`: the shape every run shares.
    pub model: ModelSpec,
    /// `[train]`: the training every run shares.
    pub train: TrainOptions,
    /// `[[run]]`: the compared models.
    #[serde(rename = "run")]
    pub runs: Vec<StudyRun>,
}

/// `[experts]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertsSettings {
    /// Seeds (default 1, 2, 3): each trains every run afresh.
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// The corpus table (its tokenizer beside it).
    pub corpus: PathBuf,
    /// A corpus file (`corpus ingest`'s input) ingested into `corpus` when that does not exist.
    #[serde(default)]
    pub ingest: Option<PathBuf>,
    /// Validation sentences of every perplexity (evenly spaced).
    #[serde(default = "default_eval")]
    pub eval_samples: usize,
    /// Training sentences the linear probes are fitted on (evenly spaced).
    #[serde(default = "default_probe")]
    pub probe_samples: usize,
    /// Validation sentences of the kernels behind expert isolation (evenly spaced).
    #[serde(default = "default_ntk")]
    pub ntk_samples: usize,
    /// The run every other is compared with, and whose kernel isolation is measured against.
    #[serde(default = "default_baseline")]
    pub baseline: String,
    /// Output folder.
    pub out: PathBuf,
}

/// `[[run]]`: a named model of the study.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyRun {
    /// The run's name (its output folders).
    pub name: String,
    /// Dense, Switch or CSE.
    #[serde(default)]
    pub experts: ExpertConfig,
    /// This run's dense warm-up share before the CSE clustering (default: `[train]`'s).
    #[serde(default)]
    pub cse_warmup_fraction: Option<f64>,
}

fn default_seeds() -> Vec<u64> {
    vec![1, 2, 3]
}
fn default_eval() -> usize {
    2000
}
fn default_probe() -> usize {
    1000
}
fn default_ntk() -> usize {
    256
}
fn default_baseline() -> String {
    "dense".into()
}

impl ExpertsSpec {
    /// Read and check a spec.
    pub fn read(path: &Path) -> Result<ExpertsSpec> {
        let s: ExpertsSpec = crate::io::read_toml(path)?;
        s.check().map_err(|e| Error::in_file(path, e.to_string()))?;
        Ok(s)
    }

    /// Check the settings.
    pub fn check(&self) -> Result<()> {
        let e = &self.experts;
        if e.seeds.len() < 2 {
            return Err(Error::invalid(
                "experts.seeds",
                "give at least 2 seeds (intervals come from the spread across seeds)",
            ));
        }
        let mut names: Vec<&str> = self.runs.iter().map(|r| r.name.as_str()).collect();
        if !names.contains(&e.baseline.as_str()) {
            return Err(Error::invalid(
                "experts.baseline",
                format!("{:?} is not the name of a [[run]]", e.baseline),
            ));
        }
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::invalid("run.name", "run names must differ"));
        }
        if self.runs.len() < 2 {
            return Err(Error::invalid(
                "run",
                "give the baseline and at least one other run",
            ));
        }
        for r in &self.runs {
            if let Some(f) = r.cse_warmup_fraction {
                if !(0.0..1.0).contains(&f) {
                    return Err(Error::invalid(
                        format!("run {:?}: cse_warmup_fraction", r.name),
                        format!("must be in [0, 1), got {f}"),
                    ));
                }
            }
        }
        if e.ntk_samples < 2 || e.eval_samples == 0 || e.probe_samples == 0 {
            return Err(Error::invalid(
                "experts",
                "eval_samples and probe_samples must be positive, ntk_samples at least 2",
            ));
        }
        for r in &self.runs {
            self.train_spec(r).check()?;
        }
        Ok(())
    }

    /// The training spec of one run (a single `[[run]]`, its warm-up share applied).
    pub fn train_spec(&self, run: &StudyRun) -> TrainSpec {
        TrainSpec {
            data: DataSpec {
                corpus: self.experts.corpus.clone(),
                tokenizer: None,
                eval_samples: self.experts.eval_samples,
            },
            model: Some(self.model.clone()),
            base: None,
            train: TrainOptions {
                cse_warmup_fraction: run
                    .cse_warmup_fraction
                    .unwrap_or(self.train.cse_warmup_fraction),
                ..self.train.clone()
            },
            selection: None,
            runs: vec![RunSpec {
                name: run.name.clone(),
                experts: run.experts.clone(),
            }],
        }
    }

    /// The last blocks whose isolation and dynamics are reported: those of the run with the most
    /// routed blocks.
    fn reported_blocks(&self) -> Vec<i64> {
        let k = self
            .runs
            .iter()
            .map(|r| match &r.experts {
                ExpertConfig::Dense => 0,
                ExpertConfig::Switch(s) => s.last_k,
                ExpertConfig::Cse(c) => c.last_k,
            })
            .max()
            .unwrap_or(0)
            .clamp(0, self.model.n_layer);
        (self.model.n_layer - k..self.model.n_layer).collect()
    }
}

/// One measurement of one run at one seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// Seed.
    pub seed: u64,
    /// Run name.
    pub run: String,
    /// `ppl_all`, `ppl_long_tail`, `ppl_common`, `probe_domain`, `probe_long_tail` (and their
    /// `_balanced` accuracies), `params`;
    /// per block b: `experts_hb` (in the model), `experts_used_hb` (not idle on the kernel's
    /// texts), `isolated_hb`, `nmi_hb`, `separation_hb` (routed runs),
    /// `clusters_hb`, `cluster_ratio_hb` (every run; DBSCAN at the block's output).
    pub metric: String,
    /// Value.
    pub value: f64,
}

/// A metric's mean over seeds for one run.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricSummary {
    /// Run.
    pub run: String,
    /// Metric.
    pub metric: String,
    /// Mean and 95% t interval over seeds.
    pub value: Interval,
}

/// A run against the baseline on one metric, paired by seed.
#[derive(Debug, Clone, PartialEq)]
pub struct BaselineComparison {
    /// Run.
    pub run: String,
    /// Metric.
    pub metric: String,
    /// Perplexities: 100 (run / baseline − 1), in %; accuracies: run − baseline.
    pub diff: Interval,
}

/// A finished experts study.
#[derive(Debug, Clone)]
pub struct ExpertsStudy {
    /// The baseline run.
    pub baseline: String,
    /// The runs, in the spec's order.
    pub runs: Vec<String>,
    /// Every measurement.
    pub results: Vec<Measurement>,
    /// Per run and metric.
    pub summary: Vec<MetricSummary>,
    /// Each run against the baseline on perplexities and probe accuracies.
    pub comparisons: Vec<BaselineComparison>,
}

/// The metrics compared against the baseline; perplexities as relative changes.
const COMPARED: [&str; 7] = [
    "ppl_all",
    "ppl_long_tail",
    "ppl_common",
    "probe_domain",
    "probe_long_tail",
    "probe_domain_balanced",
    "probe_long_tail_balanced",
];

/// Measurements of one finished run, stored beside its evaluation so that a rerun reuses them
/// while the run's and the baseline's training manifests and the measurement settings are
/// unchanged: (metric, value, the value's bits), the bits read back so that a rerun's tables are
/// the same bytes (JSON's decimal is for reading).
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    manifest: String,
    baseline_manifest: String,
    /// eval_samples, probe_samples, ntk_samples.
    settings: [usize; 3],
    metrics: Vec<(String, f64, u64)>,
}

fn read_manifest(run_dir: &Path) -> Result<String> {
    let p = run_dir.join("manifest.json");
    std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))
}

/// Make the corpus by ingesting `[experts] ingest` when it is missing.
fn ensure_corpus(e: &ExpertsSettings, seed: u64, progress: &dyn Progress) -> Result<()> {
    if e.corpus.exists() {
        return Ok(());
    }
    match &e.ingest {
        Some(input) if input.exists() => {
            crate::corpus::ingest_default(input, &e.corpus, None, seed, progress)?;
            Ok(())
        }
        Some(input) => Err(Error::in_file(
            input,
            "experts.ingest not found (scripts/fetch-corpora makes brown-fortunes.jsonl.gz)",
        )),
        None => Err(Error::in_file(
            &e.corpus,
            "corpus not found (give [experts] ingest to make it)",
        )),
    }
}

/// Run the study (reusing finished runs and measurements) and write its tables and figure.
pub fn run(
    spec: &ExpertsSpec,
    device: Device,
    stop: &AtomicBool,
    progress: &dyn Progress,
    train_progress: &dyn train::Progress,
    mut say: impl FnMut(&str),
) -> Result<ExpertsStudy> {
    let e = &spec.experts;
    ensure_corpus(e, e.seeds[0], progress)?;
    let data = TrainData::load(&e.corpus, None)?;
    let blocks = spec.reported_blocks();
    let settings = [e.eval_samples, e.probe_samples, e.ntk_samples];
    let base_run = spec
        .runs
        .iter()
        .find(|r| r.name == e.baseline)
        .ok_or_else(|| Error::invalid("experts.baseline", "not a run"))?;
    let mut results = Vec::new();
    for &seed in &e.seeds {
        let sd = e.out.join(format!("seed-{seed}"));
        // The baseline first: every other run's isolation is measured against its kernel.
        let order =
            std::iter::once(base_run).chain(spec.runs.iter().filter(|r| r.name != e.baseline));
        let mut baseline_manifest = String::new();
        for r in order {
            say(&format!("seed {seed}: {}", r.name));
            let ts = spec.train_spec(r);
            let trained = super::train_to_end(
                &ts,
                &data,
                &sd.join("train"),
                device,
                seed,
                stop,
                train_progress,
            )?;
            let manifest = read_manifest(&trained.dir)?;
            if r.name == e.baseline {
                baseline_manifest = manifest.clone();
            }
            let eval_dir = sd.join("eval").join(&r.name);
            let stored_path = eval_dir.join("measurements.json");
            let stored: Option<Stored> = std::fs::read(&stored_path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .filter(|s: &Stored| {
                    s.manifest == manifest
                        && s.baseline_manifest == baseline_manifest
                        && s.settings == settings
                });
            let metrics: Vec<(String, f64)> = match stored {
                Some(s) => s
                    .metrics
                    .into_iter()
                    .map(|(name, _, bits)| (name, f64::from_bits(bits)))
                    .collect(),
                None => {
                    let m = measure(spec, r, &trained, &sd, &blocks, seed, device, progress)?;
                    let s = Stored {
                        manifest,
                        baseline_manifest: baseline_manifest.clone(),
                        settings,
                        metrics: m
                            .iter()
                            .map(|(n, v)| (n.clone(), *v, v.to_bits()))
                            .collect(),
                    };
                    let json = serde_json::to_vec_pretty(&s)
                        .map_err(|x| Error::invalid("measurements", x.to_string()))?;
                    crate::io::write_atomic(&stored_path, &json)?;
                    m
                }
            };
            results.extend(metrics.into_iter().map(|(metric, value)| Measurement {
                seed,
                run: r.name.clone(),
                metric,
                value,
            }));
        }
    }
    let runs: Vec<String> = spec.runs.iter().map(|r| r.name.clone()).collect();
    let study = summarise(results, &runs, &e.baseline);
    write(&study, &e.out)?;
    Ok(study)
}

/// Every metric of one trained run.
#[allow(clippy::too_many_arguments)]
fn measure(
    spec: &ExpertsSpec,
    r: &StudyRun,
    trained: &train::RunResult,
    sd: &Path,
    blocks: &[i64],
    seed: u64,
    device: Device,
    progress: &dyn Progress,
) -> Result<Vec<(String, f64)>> {
    let e = &spec.experts;
    let model = trained.dir.join("final");
    let mut m: Vec<(String, f64)> = vec![("params".into(), trained.params as f64)];
    let eval_dir = sd.join("eval").join(&r.name);
    m.extend(eval_metrics(
        spec, &model, &eval_dir, seed, device, progress,
    )?);
    m.extend(cluster_metrics(trained, blocks));
    let ntk_dir = sd.join("ntk").join(&r.name);
    super::default_ntk(
        &model,
        &e.corpus,
        SplitChoice::Validation,
        e.ntk_samples,
        0,
        seed,
        &ntk_dir,
        device,
        progress,
    )?;
    if matches!(r.experts, ExpertConfig::Dense) {
        return Ok(m);
    }
    // Isolation is what this study reads; the neglect score's learnability statistics come from
    // 512 training texts (the default 2,048 would cost more than the analysis it serves).
    let aspec = AnalyzeSpec {
        resamples: 200,
        baseline: Some(sd.join("ntk").join(&e.baseline)),
        learnability: Some(
            crate::analysis::learnability::LearnabilityOptions {
                train_samples: 512,
                ..Default::default()
            }
            .seeded(seed),
        ),
        seed,
        ..AnalyzeSpec::new(&ntk_dir, &model, &e.corpus)
    };
    let mut an = analyze::analyze(&aspec, device, progress)?;
    an.write(&sd.join("analysis").join(&r.name))?;
    m.extend(isolation_metrics(&an));
    Ok(m)
}

/// Held-out perplexity per group and the linear probes' accuracies of the model `model`,
/// evaluated and written into `eval_dir`.
fn eval_metrics(
    spec: &ExpertsSpec,
    model: &Path,
    eval_dir: &Path,
    seed: u64,
    device: Device,
    progress: &dyn Progress,
) -> Result<Vec<(String, f64)>> {
    let e = &spec.experts;
    let mut m = Vec::new();
    let es = EvalSpec {
        model: model.to_path_buf(),
        corpus: e.corpus.clone(),
        tokenizer: None,
        label: "domain".into(),
        extra_labels: vec!["long_tail".into()],
        layer: None,
        probe_samples: e.probe_samples,
        samples: Some(e.eval_samples),
        seed,
    };
    let ev = evaluate(&es, device, progress)?;
    ev.write(&es, eval_dir)?;
    for g in &ev.tail_groups {
        m.push((format!("ppl_{}", g.group.replace('-', "_")), g.perplexity()));
    }
    // Accuracy, and balanced accuracy (the mean of the per-label accuracies: a probe that
    // always answers the majority label scores 1/labels, however unbalanced they are).
    let probes = std::iter::once(("domain".to_string(), &ev.probe))
        .chain(ev.extra_probes.iter().map(|(l, p)| (l.clone(), p)));
    for (label, p) in probes {
        m.push((format!("probe_{label}"), p.accuracy));
        let per: Vec<f64> = p.per_label.iter().map(|x| x.2).collect();
        if !per.is_empty() {
            let balanced = per.iter().sum::<f64>() / per.len() as f64;
            m.push((format!("probe_{label}_balanced"), balanced));
        }
    }
    Ok(m)
}

/// The clusters (and their separation ratio) the last cluster-dynamics log found at the input
/// of each CSE block.
fn cluster_metrics(trained: &train::RunResult, blocks: &[i64]) -> Vec<(String, f64)> {
    let mut m = Vec::new();
    let last = trained.state.step;
    for &b in blocks {
        if let Some(c) = trained
            .state
            .clusters
            .iter()
            .find(|c| c.step == last && c.layer == b + 1)
        {
            m.push((format!("clusters_h{b}"), c.n_clusters as f64));
            if let Some(ratio) = c.ratio {
                m.push((format!("cluster_ratio_h{b}"), ratio));
            }
        }
    }
    m
}

/// Experts, the ones used and the isolated ones, NMI and separation, per sparse block.
fn isolation_metrics(an: &analyze::Analysis) -> Vec<(String, f64)> {
    let mut m = Vec::new();
    for rep in an.isolation.iter().flat_map(|i| &i.reports) {
        let b = rep.block.trim_start_matches("expert_");
        let used = rep.experts.iter().filter(|x| x.verdict != "idle").count();
        let isolated = rep
            .experts
            .iter()
            .filter(|x| x.verdict == "isolated")
            .count();
        m.push((format!("experts_{b}"), rep.experts.len() as f64));
        m.push((format!("experts_used_{b}"), used as f64));
        m.push((format!("isolated_{b}"), isolated as f64));
        m.push((format!("nmi_{b}"), rep.nmi));
        if let Some(s) = rep.separation {
            m.push((format!("separation_{b}"), s));
        }
    }
    m
}

/// Means and intervals over seeds, and each run against the baseline paired by seed.
pub fn summarise(results: Vec<Measurement>, runs: &[String], baseline: &str) -> ExpertsStudy {
    let mut by: BTreeMap<(String, String), BTreeMap<u64, f64>> = BTreeMap::new();
    let mut metrics: Vec<String> = Vec::new();
    for x in &results {
        if !metrics.contains(&x.metric) {
            metrics.push(x.metric.clone());
        }
        by.entry((x.run.clone(), x.metric.clone()))
            .or_default()
            .insert(x.seed, x.value);
    }
    let mut summary = Vec::new();
    for r in runs {
        for metric in &metrics {
            if let Some(v) = by.get(&(r.clone(), metric.clone())) {
                summary.push(MetricSummary {
                    run: r.clone(),
                    metric: metric.clone(),
                    value: t_interval(&v.values().copied().collect::<Vec<_>>()),
                });
            }
        }
    }
    let mut comparisons = Vec::new();
    for r in runs.iter().filter(|r| *r != baseline) {
        for metric in COMPARED {
            let key = |run: &str| (run.to_string(), metric.to_string());
            let (Some(a), Some(b)) = (by.get(&key(r)), by.get(&key(baseline))) else {
                continue;
            };
            let d: Vec<f64> = a
                .iter()
                .filter_map(|(s, x)| {
                    b.get(s).map(|y| match metric.starts_with("ppl") {
                        true => 100.0 * (x / y - 1.0),
                        false => x - y,
                    })
                })
                .collect();
            if d.len() >= 2 {
                comparisons.push(BaselineComparison {
                    run: r.clone(),
                    metric: metric.into(),
                    diff: t_interval(&d),
                });
            }
        }
    }
    ExpertsStudy {
        baseline: baseline.into(),
        runs: runs.to_vec(),
        results,
        summary,
        comparisons,
    }
}

impl ExpertsStudy {
    fn get(&self, run: &str, metric: &str) -> Option<&Interval> {
        self.summary
            .iter()
            .find(|s| s.run == run && s.metric == metric)
            .map(|s| &s.value)
    }

    fn cmp(&self, run: &str, metric: &str) -> Option<&Interval> {
        self.comparisons
            .iter()
            .find(|s| s.run == run && s.metric == metric)
            .map(|s| &s.diff)
    }

    /// A run's parameter count, or its range over seeds (a CSE run's experts differ by seed).
    fn params(&self, run: &str) -> String {
        let p: Vec<f64> = self
            .results
            .iter()
            .filter(|x| x.run == run && x.metric == "params")
            .map(|x| x.value)
            .collect();
        let (lo, hi) = p
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        match p.len() {
            0 => "–".into(),
            _ if lo == hi => format!("{lo:.0}"),
            _ => format!("{lo:.0}–{hi:.0}"),
        }
    }

    /// The blocks with any per-block metric, sorted.
    fn blocks(&self) -> Vec<String> {
        let mut b: Vec<String> = self
            .summary
            .iter()
            .filter_map(|s| s.metric.rsplit_once("_h").map(|(_, b)| format!("h{b}")))
            .collect();
        b.sort();
        b.dedup();
        b
    }

    /// The tables as Markdown: perplexities and probes per run, then experts and clusters per
    /// run and block (means over seeds with 95% t intervals).
    pub fn markdown(&self) -> String {
        let f = |x: Option<&Interval>, digits: usize| match x {
            Some(i) if i.low.is_finite() => {
                format!("{:.d$} [{:.d$}, {:.d$}]", i.mean, i.low, i.high, d = digits)
            }
            Some(i) => format!("{:.d$}", i.mean, d = digits),
            None => "–".into(),
        };
        let signed = |x: Option<&Interval>, unit: &str| match x {
            Some(i) => format!("{:+.1}{unit} [{:+.1}, {:+.1}]", i.mean, i.low, i.high),
            None => "–".into(),
        };
        let mut s = format!(
            "| run | parameters | ppl all | ppl long-tail | ppl common | long-tail ppl vs {b} | \
             common ppl vs {b} | probe: domain (balanced acc.) | probe: long-tail (balanced \
             acc.) | probe domain vs {b} |\n|---|---|---|---|---|---|---|---|---|---|\n",
            b = self.baseline
        );
        for r in &self.runs {
            let pct = |m: &str| {
                let scaled = self.cmp(r, m).map(|i| Interval {
                    mean: 100.0 * i.mean,
                    low: 100.0 * i.low,
                    high: 100.0 * i.high,
                });
                signed(scaled.as_ref(), " pt")
            };
            s.push_str(&format!(
                "| {r} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                self.params(r),
                f(self.get(r, "ppl_all"), 1),
                f(self.get(r, "ppl_long_tail"), 1),
                f(self.get(r, "ppl_common"), 1),
                signed(self.cmp(r, "ppl_long_tail"), "%"),
                signed(self.cmp(r, "ppl_common"), "%"),
                f(self.get(r, "probe_domain_balanced"), 3),
                f(self.get(r, "probe_long_tail_balanced"), 3),
                pct("probe_domain_balanced"),
            ));
        }
        s.push_str(
            "\n| run | block | experts | experts used | isolated experts | NMI(domain, expert) | \
             separation of expert inputs | DBSCAN clusters (probe, last step) | cluster \
             distance/radius |\n|---|---|---|---|---|---|---|---|---|\n",
        );
        for r in &self.runs {
            for b in self.blocks() {
                let g = |m: &str, d| f(self.get(r, &format!("{m}_{b}")), d);
                s.push_str(&format!(
                    "| {r} | {b} | {} | {} | {} | {} | {} | {} | {} |\n",
                    g("experts", 2),
                    g("experts_used", 2),
                    g("isolated", 2),
                    g("nmi", 3),
                    g("separation", 2),
                    g("clusters", 2),
                    g("cluster_ratio", 2),
                ));
            }
        }
        s
    }
}

impl ExpertsStudy {
    /// A study written into `dir` ([`write`]): its measurements summarised again; the baseline
    /// is the run without comparisons.
    pub fn read(dir: &Path) -> Result<ExpertsStudy> {
        use crate::io::{column_f64, column_str, read_parquet};
        let p = dir.join("results.parquet");
        let df = read_parquet(&p)?;
        let (seed, run, metric, value) = (
            column_f64(&df, "seed", &p)?,
            column_str(&df, "run", &p)?,
            column_str(&df, "metric", &p)?,
            column_f64(&df, "value", &p)?,
        );
        let results: Vec<Measurement> = (0..run.len())
            .map(|i| Measurement {
                seed: seed[i] as u64,
                run: run[i].clone(),
                metric: metric[i].clone(),
                value: value[i],
            })
            .collect();
        let mut runs: Vec<String> = Vec::new();
        for r in &run {
            if !runs.contains(r) {
                runs.push(r.clone());
            }
        }
        let q = dir.join("comparisons.parquet");
        let compared = column_str(&read_parquet(&q)?, "run", &q)?;
        let baseline = runs
            .iter()
            .find(|r| !compared.contains(r))
            .cloned()
            .ok_or_else(|| Error::in_file(&q, "every run has comparisons; no baseline"))?;
        Ok(summarise(results, &runs, &baseline))
    }

    /// The study in words: each run's perplexity against the baseline (a direction only when
    /// the interval excludes 0), then its experts per block.
    pub fn findings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in self.runs.iter().filter(|r| **r != self.baseline) {
            let part = |m: &str, what: &str| {
                self.cmp(r, m).map(|i| {
                    format!(
                        "{what} {:+.1}% [{:+.1}, {:+.1}]{}",
                        i.mean,
                        i.low,
                        i.high,
                        match i.sign() {
                            -1 => " (lower)",
                            1 => " (higher)",
                            _ => " (no difference is detectable)",
                        }
                    )
                })
            };
            let parts: Vec<String> = [("ppl_long_tail", "long-tail"), ("ppl_common", "common")]
                .iter()
                .filter_map(|(m, w)| part(m, w))
                .collect();
            if !parts.is_empty() {
                out.push(format!(
                    "CSE study: {r} against {}, held-out perplexity: {} (mean over seeds, 95% t \
                     interval, paired by seed).",
                    self.baseline,
                    parts.join("; ")
                ));
            }
            for b in self.blocks() {
                let v = |m: &str| self.get(r, &format!("{m}_{b}")).map(|i| i.mean);
                if let (Some(made), Some(used), Some(iso)) =
                    (v("experts"), v("experts_used"), v("isolated"))
                {
                    out.push(format!(
                        "CSE study: {r} block {b}: {made:.2} experts made, {used:.2} used, {iso:.2} \
                         isolated (means over seeds); NMI(domain, expert) {:.3}.",
                        v("nmi").unwrap_or(f64::NAN)
                    ));
                }
            }
        }
        out
    }
}

/// Write the tables, `experts.md` and the figure into `out`.
pub fn write(s: &ExpertsStudy, out: &Path) -> Result<()> {
    let r = &s.results;
    let mut results = DataFrame::new(
        r.len(),
        vec![
            Column::new("seed".into(), r.iter().map(|x| x.seed).collect::<Vec<_>>()),
            Column::new(
                "run".into(),
                r.iter().map(|x| x.run.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "metric".into(),
                r.iter().map(|x| x.metric.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "value".into(),
                r.iter().map(|x| x.value).collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("experts results", e))?;
    crate::io::write_parquet(&mut results, out.join("results.parquet"))?;
    let frame = |name: &str, runs: Vec<&str>, metrics: Vec<&str>, xs: Vec<&Interval>, col: &str| {
        let mut cols = vec![
            Column::new("run".into(), runs),
            Column::new("metric".into(), metrics),
        ];
        cols.extend(interval_columns(col, &xs));
        DataFrame::new(xs.len(), cols).map_err(|e| Error::table(name, e))
    };
    let sm = &s.summary;
    let mut summary = frame(
        "experts summary",
        sm.iter().map(|x| x.run.as_str()).collect(),
        sm.iter().map(|x| x.metric.as_str()).collect(),
        sm.iter().map(|x| &x.value).collect(),
        "value",
    )?;
    crate::io::write_parquet(&mut summary, out.join("summary.parquet"))?;
    let c = &s.comparisons;
    let mut comparisons = frame(
        "experts comparisons",
        c.iter().map(|x| x.run.as_str()).collect(),
        c.iter().map(|x| x.metric.as_str()).collect(),
        c.iter().map(|x| &x.diff).collect(),
        "diff",
    )?;
    crate::io::write_parquet(&mut comparisons, out.join("comparisons.parquet"))?;
    crate::io::write_atomic(out.join("experts.md"), s.markdown().as_bytes())?;
    let others: Vec<String> = s
        .runs
        .iter()
        .filter(|r| **r != s.baseline)
        .cloned()
        .collect();
    let series: Vec<crate::plots::IntervalSeries> = [
        ("long-tail", "ppl_long_tail"),
        ("common", "ppl_common"),
        ("all", "ppl_all"),
    ]
    .iter()
    .map(|(label, m)| {
        (
            label.to_string(),
            others
                .iter()
                .map(|r| s.cmp(r, m).map(|i| (i.mean, i.low, i.high)))
                .collect(),
        )
    })
    .collect();
    let fig = crate::plots::interval_dots(
        &others,
        &series,
        &format!(
            "Held-out perplexity against {} (mean over seeds, 95% t interval)",
            s.baseline
        ),
        "perplexity change (%)",
    )?;
    let fdir = out.join("figures");
    std::fs::create_dir_all(&fdir).map_err(|e| Error::io(&fdir, e))?;
    crate::io::write_atomic(fdir.join("cse_study.svg"), fig.svg.as_bytes())?;
    crate::io::write_atomic(fdir.join("cse_study.png"), &fig.png)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(seed: u64, run: &str, metric: &str, value: f64) -> Measurement {
        Measurement {
            seed,
            run: run.into(),
            metric: metric.into(),
            value,
        }
    }

    #[test]
    fn runs_are_compared_with_the_baseline_paired_by_seed() {
        let results = vec![
            m(1, "dense", "ppl_long_tail", 100.0),
            m(2, "dense", "ppl_long_tail", 200.0),
            m(1, "cse", "ppl_long_tail", 110.0),
            m(2, "cse", "ppl_long_tail", 180.0),
            m(1, "dense", "probe_domain", 0.5),
            m(2, "dense", "probe_domain", 0.4),
            m(2, "cse", "probe_domain", 0.6),
            m(1, "cse", "probe_domain", 0.7),
            m(1, "cse", "isolated_h3", 1.0),
            m(2, "cse", "isolated_h3", 2.0),
        ];
        let runs = vec!["dense".to_string(), "cse".to_string()];
        let s = summarise(results, &runs, "dense");
        // Relative: (+10%, −10%) → mean 0; unpaired means would give 145 vs 150 (−3.3%).
        let c = s.cmp("cse", "ppl_long_tail").unwrap();
        assert!(c.mean.abs() < 1e-12, "{c:?}");
        assert!(c.low < -10.0 && c.high > 10.0, "{c:?}");
        // Accuracies as differences, paired by seed: (0.2, 0.2).
        let p = s.cmp("cse", "probe_domain").unwrap();
        assert!(
            (p.mean - 0.2).abs() < 1e-12 && (p.high - p.low).abs() < 1e-9,
            "{p:?}"
        );
        assert!(s.cmp("dense", "ppl_long_tail").is_none());
        assert!(s.cmp("cse", "isolated_h3").is_none());
        assert!((s.get("cse", "isolated_h3").unwrap().mean - 1.5).abs() < 1e-12);
        let md = s.markdown();
        assert!(md.contains("| cse | h3 | – | – | 1.50 ["), "{md}");
        assert!(md.contains("+0.0% ["), "{md}");
        let dir = tempfile::tempdir().unwrap();
        write(&s, dir.path()).unwrap();
        let back = crate::io::read_parquet(dir.path().join("comparisons.parquet")).unwrap();
        assert_eq!(back.height(), s.comparisons.len());
        assert!(dir.path().join("figures/cse_study.png").exists());
    }
}

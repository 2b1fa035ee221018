//! The counterfactual selection study (`tailscope study SPEC.toml`): does training on what a
//! criterion selects help the model, and does NTK-based selection beat the others?
//!
//! For every seed: train a base model; compute the NTK of a pool of its *training* samples and
//! analyse it; for every criterion select the same number of samples from the pool
//! ([`crate::analysis::select`]); continue the base model for the same steps with that selection
//! up-weighted so that it makes up `share` of each batch in expectation, plus a control run with
//! no selection (`none`); then read every run's held-out (validation) token loss: overall, on
//! long-tail and on common domains, and on the selected samples' domains (`targeted`: the mean of
//! the per-domain losses weighted by the selection's domain mix). Across seeds: the mean
//! difference against the control and against every other criterion, with a t interval
//! (seeds − 1 degrees of freedom; 3 seeds give wide intervals, which the tables show as they are).
//!
//! Outputs under `out`: `seed-S/{base, ntk, analysis, select, continued}/` (every step's own
//! outputs; finished training runs are reused on a rerun), `results.parquet` (seed, criterion,
//! group, loss, ppl, delta), `summary.parquet` (criterion, group, mean delta and interval),
//! `comparisons.parquet` (a, b, group, mean loss difference a − b and interval), `study.md`, and
//! `figures/selection_study.{svg,png}`.

pub mod counterfactual;
pub mod experts;
pub mod facts;
pub mod ranking;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use polars::prelude::{Column, DataFrame};
use serde::Deserialize;
use tch::Device;

use crate::analysis::analyze::{self, AnalyzeSpec};
use crate::analysis::select::{self, Amount, Criterion, Pool, Sources};
use crate::capture::job::{Job, JobSpec};
use crate::capture::{CaptureOptions, Selection as ParamSelection};
use crate::corpus::SplitChoice;
use crate::error::{Error, Result};
use crate::freq::{domain_shares, ShareBy};
use crate::model::ExpertConfig;
use crate::ntk::pipeline::{self as ntk_pipeline, NtkOptions};
use crate::progress::Progress;
use crate::train::selection::SelectionSpec;
use crate::train::spec::{DataSpec, ModelSpec};
use crate::train::{self, BaseSpec, RunSpec, TrainData, TrainOptions, TrainScope, TrainSpec};

/// A study spec (TOML; `analyses/selection-study.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudySpec {
    /// `[data]`.
    pub data: StudyData,
    /// `[model]`: the base model's shape.
    pub model: ModelSpec,
    /// `[train]`: the base model's training.
    pub train: TrainOptions,
    /// `[select]`.
    #[serde(default)]
    pub select: StudySelect,
    /// `[continue]`: the continued runs.
    #[serde(rename = "continue", default)]
    pub cont: StudyContinue,
    /// Seeds (default 1, 2, 3): each trains its own base model and draws its own pool.
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Output folder.
    pub out: PathBuf,
}

/// `[data]`: the corpus (made by `corpus synth` with `synth` when it does not exist).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyData {
    /// The corpus table (its tokenizer beside it).
    pub corpus: PathBuf,
    /// Generate the corpus when missing: `corpus synth` with these settings.
    #[serde(default)]
    pub synth: Option<StudySynth>,
    /// Validation samples the runs are evaluated on (evenly spaced; default 2000).
    #[serde(default = "default_eval")]
    pub eval_samples: usize,
}

/// `[data.synth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudySynth {
    /// Sentences.
    pub samples: usize,
    /// Share of the rare domains.
    pub rare_share: f64,
    /// Tokenizer vocabulary.
    pub vocab_size: usize,
    /// Generator seed.
    #[serde(default = "one")]
    pub seed: u64,
    /// Add the contrast domains and the `neglected` and `noise` truths (`corpus synth
    /// --contrasts`): the results then also report the neglected and noise samples' loss.
    #[serde(default)]
    pub contrasts: bool,
}

/// `[select]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StudySelect {
    /// Training samples in the analysed pool (drawn at random per seed).
    pub pool: usize,
    /// Samples each criterion selects.
    pub top: usize,
    /// The criteria compared.
    pub criteria: Vec<Criterion>,
}

impl Default for StudySelect {
    fn default() -> Self {
        StudySelect {
            pool: 512,
            top: 64,
            criteria: Criterion::ALL.to_vec(),
        }
    }
}

/// `[continue]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StudyContinue {
    /// Steps of every continued run.
    pub steps: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Expected share of selected samples in a batch (sets the sampling weight).
    pub share: f64,
    /// What is trained.
    pub train: TrainScope,
}

impl Default for StudyContinue {
    fn default() -> Self {
        StudyContinue {
            steps: 100,
            lr: 1e-3,
            share: 0.5,
            train: TrainScope::All,
        }
    }
}

fn default_seeds() -> Vec<u64> {
    vec![1, 2, 3]
}
fn default_eval() -> usize {
    2000
}
fn one() -> u64 {
    1
}

/// The name of the control run (no selection).
pub const CONTROL: &str = "none";

impl StudySpec {
    /// Read and check a spec.
    pub fn read(path: &Path) -> Result<StudySpec> {
        let s: StudySpec = crate::io::read_toml(path)?;
        s.check().map_err(|e| Error::in_file(path, e.to_string()))?;
        Ok(s)
    }

    /// Check the settings.
    pub fn check(&self) -> Result<()> {
        if self.seeds.len() < 2 {
            return Err(Error::invalid(
                "seeds",
                "give at least 2 seeds (intervals come from the spread across seeds)",
            ));
        }
        if !(self.cont.share > 0.0 && self.cont.share < 1.0) {
            return Err(Error::invalid("continue.share", "must be in (0, 1)"));
        }
        if self.select.top == 0 || self.select.top >= self.select.pool {
            return Err(Error::invalid(
                "select.top",
                format!("must be in [1, select.pool = {})", self.select.pool),
            ));
        }
        if self.select.criteria.is_empty() {
            return Err(Error::invalid("select.criteria", "give at least one"));
        }
        self.base_spec().check()
    }

    fn data_spec(&self) -> DataSpec {
        DataSpec {
            corpus: self.data.corpus.clone(),
            tokenizer: None,
            eval_samples: self.data.eval_samples,
        }
    }

    /// The base model's training spec (one dense run, `base`).
    pub fn base_spec(&self) -> TrainSpec {
        TrainSpec {
            data: self.data_spec(),
            model: Some(self.model.clone()),
            base: None,
            train: self.train.clone(),
            selection: None,
            runs: vec![RunSpec {
                name: "base".into(),
                experts: ExpertConfig::Dense,
            }],
        }
    }

    /// The spec of a continued run from `base` with `selection` up-weighted (none: the control).
    pub fn continued_spec(
        &self,
        base: &Path,
        name: &str,
        selection: Option<SelectionSpec>,
    ) -> TrainSpec {
        let t = TrainOptions {
            steps: self.cont.steps,
            lr: self.cont.lr,
            warmup_steps: 0,
            checkpoint_every: self.cont.steps,
            keep_last: 1,
            keep_steps: Vec::new(),
            dynamics_every: 0,
            probe_samples: 64,
            ..self.train.clone()
        };
        TrainSpec {
            data: self.data_spec(),
            model: None,
            base: Some(BaseSpec {
                model: base.to_path_buf(),
                train: self.cont.train,
                last_k: 1,
                max_len: None,
                upcycle: false,
            }),
            train: t,
            selection,
            runs: vec![RunSpec {
                name: name.into(),
                experts: ExpertConfig::Dense,
            }],
        }
    }
}

/// One run's held-out loss on one group.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultRow {
    /// Seed.
    pub seed: u64,
    /// Criterion (or `none`, or `base` for the model before continuing).
    pub criterion: String,
    /// `all`, `long-tail`, `common` or `targeted`.
    pub group: String,
    /// Mean token loss (nats).
    pub loss: f64,
    /// The control's loss on the same group (for `targeted`: with this criterion's weights).
    pub control: f64,
}

/// A mean over seeds with its t interval.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Interval {
    /// Mean.
    pub mean: f64,
    /// Lower end.
    pub low: f64,
    /// Upper end.
    pub high: f64,
}

impl Interval {
    /// −1 when the whole interval lies below 0, +1 when above, 0 when it holds 0 (no direction
    /// is stated).
    pub fn sign(&self) -> i8 {
        if self.high < 0.0 {
            -1
        } else if self.low > 0.0 {
            1
        } else {
            0
        }
    }
}

/// The mean of `xs` with the two-sided 95% t interval (len − 1 degrees of freedom).
pub fn t_interval(xs: &[f64]) -> Interval {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return Interval {
            mean,
            low: f64::NAN,
            high: f64::NAN,
        };
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let half = crate::stats::t_quantile(0.975, n - 1.0) * (var / n).sqrt();
    Interval {
        mean,
        low: mean - half,
        high: mean + half,
    }
}

/// The mean of `xs`, values bounded to [lo, hi], with a 95% t interval computed on the logit
/// scale of (x − lo)/(hi − lo) and mapped back, so it stays inside the bounds (a t interval of
/// AUROCs near 1 otherwise runs past 1). Values at a bound are moved 1e-6 of the range inside.
pub fn bounded_interval(xs: &[f64], lo: f64, hi: f64) -> Interval {
    if xs.len() < 2 {
        return t_interval(xs);
    }
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let w = hi - lo;
    let to = |x: f64| {
        let u = ((x - lo) / w).clamp(1e-6, 1.0 - 1e-6);
        (u / (1.0 - u)).ln()
    };
    let back = |z: f64| lo + w / (1.0 + (-z).exp());
    let t = t_interval(&xs.iter().map(|&x| to(x)).collect::<Vec<_>>());
    Interval {
        mean,
        low: back(t.low).min(mean),
        high: back(t.high).max(mean),
    }
}

/// One row of `summary.parquet`: a criterion's loss change against the control.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRow {
    /// Criterion.
    pub criterion: String,
    /// Group.
    pub group: String,
    /// Mean over seeds of (loss − control loss); negative: the selection helped.
    pub delta: Interval,
}

/// One row of `comparisons.parquet`: criterion a against b.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// Criterion a.
    pub a: String,
    /// Criterion b.
    pub b: String,
    /// Group (`all`, `long-tail`, `common`).
    pub group: String,
    /// Mean over seeds of loss(a) − loss(b); negative: a is better.
    pub diff: Interval,
}

/// A finished study.
#[derive(Debug, Clone)]
pub struct Study {
    /// Per seed, run and group.
    pub results: Vec<ResultRow>,
    /// Per criterion and group.
    pub summary: Vec<SummaryRow>,
    /// Every criterion against every other, on the untargeted groups.
    pub comparisons: Vec<Comparison>,
}

/// Make the corpus with `corpus synth`'s steps when the spec asks for it and it is missing.
fn ensure_corpus(spec: &StudySpec, progress: &dyn Progress) -> Result<()> {
    let d = &spec.data;
    if d.corpus.exists() {
        return Ok(());
    }
    let Some(s) = &d.synth else {
        return Err(Error::in_file(
            &d.corpus,
            "corpus not found (give [data.synth] to generate one)",
        ));
    };
    crate::corpus::synth::write_corpus(
        &crate::corpus::synth::SynthOptions {
            samples: s.samples,
            rare_share: s.rare_share,
            seed: s.seed,
            contrasts: s.contrasts,
            ..Default::default()
        },
        s.vocab_size,
        &d.corpus,
        progress,
    )
}

/// Per-sample validation losses of a finished run: (corpus index, domain, loss sum, tokens).
type ValLosses = Vec<(u64, String, f64, i64)>;

/// The held-out groups a selection study summarises, in order: every sentence, long-tail and
/// common domains, the neglected and noise sentences of a corpus with those truths (`corpus synth
/// --contrasts`), and the selection's own domains (`targeted`, not compared across criteria,
/// whose domains differ).
pub const GROUPS: [&str; 6] = [
    "all",
    "long-tail",
    "common",
    "neglected",
    "noise",
    "targeted",
];

fn final_losses(r: &train::RunResult) -> ValLosses {
    let last = r.state.step;
    r.state
        .val_samples
        .iter()
        .filter(|v| v.step == last)
        .map(|v| (v.sample, v.domain.clone(), v.loss_sum, v.tokens))
        .collect()
}

/// Mean token loss over the samples `keep` accepts.
fn mean_loss(v: &ValLosses, keep: &dyn Fn(&str) -> bool) -> f64 {
    let (l, t) = v
        .iter()
        .filter(|x| keep(&x.1))
        .fold((0.0, 0i64), |(l, t), x| (l + x.2, t + x.3));
    l / t.max(1) as f64
}

/// Σ_d w_d · (mean token loss of domain d), w the selection's domain mix (domains without
/// held-out samples dropped, the weights renormalised).
fn targeted_loss(v: &ValLosses, mix: &BTreeMap<String, f64>) -> f64 {
    let mut acc = (0.0, 0.0);
    for (d, w) in mix {
        let l = mean_loss(v, &|x| x == d);
        if v.iter().any(|x| &x.1 == d) {
            acc = (acc.0 + w * l, acc.1 + w);
        }
    }
    acc.0 / acc.1.max(1e-300)
}

/// The held-out samples of a corpus's truths (`corpus synth --contrasts`), by corpus row.
#[derive(Debug, Clone, Default)]
struct Truths {
    neglected: HashSet<u64>,
    noise: HashSet<u64>,
}

impl Truths {
    fn of(c: &crate::corpus::Corpus) -> Truths {
        let rows = |f: &dyn Fn(&crate::corpus::Sample) -> bool| {
            c.samples
                .iter()
                .enumerate()
                .filter(|(_, s)| f(s))
                .map(|(i, _)| i as u64)
                .collect()
        };
        Truths {
            neglected: rows(&|s| s.neglected == Some(true)),
            noise: rows(&|s| s.noise == Some(true)),
        }
    }
}

/// Mean token loss over the samples whose corpus rows are in `set`.
fn mean_loss_of(v: &ValLosses, set: &HashSet<u64>) -> f64 {
    let (l, t) = v
        .iter()
        .filter(|x| set.contains(&x.0))
        .fold((0.0, 0i64), |(l, t), x| (l + x.2, t + x.3));
    l / t.max(1) as f64
}

/// A run's rows: its loss and the control's on all, long-tail and common held-out sentences, on
/// the neglected and noise ones when the corpus has those truths, and on the selection's
/// domains (`targeted`) when `mix` is given.
fn group_rows(
    seed: u64,
    criterion: &str,
    v: &ValLosses,
    control: &ValLosses,
    (long_tail, truths): (&HashSet<String>, &Truths),
    mix: Option<&BTreeMap<String, f64>>,
) -> Vec<ResultRow> {
    let row = |group: &str, loss: f64, ctl: f64| ResultRow {
        seed,
        criterion: criterion.into(),
        group: group.into(),
        loss,
        control: ctl,
    };
    let by = |keep: &dyn Fn(&str) -> bool| (mean_loss(v, keep), mean_loss(control, keep));
    let mut out = Vec::new();
    for (group, (l, c)) in [
        ("all", by(&|_| true)),
        ("long-tail", by(&|d| long_tail.contains(d))),
        ("common", by(&|d| !long_tail.contains(d))),
    ] {
        out.push(row(group, l, c));
    }
    for (group, set) in [("neglected", &truths.neglected), ("noise", &truths.noise)] {
        if v.iter().any(|x| set.contains(&x.0)) {
            out.push(row(group, mean_loss_of(v, set), mean_loss_of(control, set)));
        }
    }
    if let Some(mix) = mix {
        out.push(row(
            "targeted",
            targeted_loss(v, mix),
            targeted_loss(control, mix),
        ));
    }
    out
}

/// Train the single run of `spec` into `dir` to its last step, resuming (or reusing) what is
/// there; an interruption is an error that says to rerun.
pub(crate) fn train_to_end(
    spec: &TrainSpec,
    data: &TrainData,
    dir: &Path,
    device: Device,
    seed: u64,
    stop: &AtomicBool,
    progress: &dyn train::Progress,
) -> Result<train::RunResult> {
    let r = train::train_run(
        spec,
        &spec.runs[0],
        data,
        dir,
        device,
        seed,
        true,
        stop,
        progress,
    )?;
    if r.outcome != train::Outcome::Finished {
        return Err(Error::invalid("study", "interrupted; rerun to resume"));
    }
    Ok(r)
}

/// The NTK of `samples` sentences of `split` (drawn with `sample_seed`, 0: evenly spaced) under
/// `model` with the default kernel (the MLPs of the last two blocks, cosine-normalised; projected
/// like the learnability statistics above [`analyze::PROJECT_ABOVE`] values), written into
/// `ntk_dir`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn default_ntk(
    model: &Path,
    corpus: &Path,
    split: SplitChoice,
    samples: usize,
    sample_seed: u64,
    seed: u64,
    ntk_dir: &Path,
    device: Device,
    progress: &dyn Progress,
) -> Result<()> {
    let mut job = Job::prepare(
        &JobSpec {
            model: model.to_path_buf(),
            corpus: corpus.to_path_buf(),
            tokenizer: None,
            split,
            samples,
            sample_seed,
            selection: ParamSelection::default().or_recommended(false),
            options: CaptureOptions {
                seed,
                ..CaptureOptions::default()
            },
        },
        device,
    )?;
    // A pretrained model's last two MLPs (5.3 M values on SmolLM2) are projected, as the
    // learnability statistics are: 512 unprojected gradients would take 11 GB.
    if job.parameter_count() > analyze::PROJECT_ABOVE {
        job.opts.projection = Some(crate::capture::projection::Projection {
            kind: crate::capture::projection::ProjectionKind::Sparse,
            dim: analyze::LEARNABILITY_PROJECTION,
            seed,
        });
    }
    let opts = NtkOptions {
        seed,
        ..NtkOptions::default()
    };
    ntk_pipeline::compute_into(&job, &opts, device, ntk_dir, progress)?;
    Ok(())
}

/// What a study analyses: the default NTK of `samples` sentences of `split` under `model` (see
/// [`default_ntk`]) into `dir/ntk` and their analysis (`resamples` bootstrap draws) into
/// `dir/analysis` (its settings those of [`AnalyzeSpec::new`], changed by `tune`), read back as
/// a selection pool.
#[allow(clippy::too_many_arguments)]
pub(crate) fn analyse_pool(
    model: &Path,
    corpus: &Path,
    split: SplitChoice,
    samples: usize,
    sample_seed: u64,
    resamples: usize,
    seed: u64,
    dir: &Path,
    device: Device,
    progress: &dyn Progress,
    tune: &dyn Fn(&mut AnalyzeSpec),
) -> Result<Pool> {
    let ntk_dir = dir.join("ntk");
    default_ntk(
        model,
        corpus,
        split,
        samples,
        sample_seed,
        seed,
        &ntk_dir,
        device,
        progress,
    )?;
    let an_dir = dir.join("analysis");
    let mut aspec = AnalyzeSpec {
        resamples,
        seed,
        ..AnalyzeSpec::new(&ntk_dir, model, corpus)
    };
    aspec.learnability = aspec.learnability.map(|l| l.seeded(seed));
    tune(&mut aspec);
    analyze::analyze(&aspec, device, progress)?.write(&an_dir)?;
    Pool::read(&an_dir)
}

/// Run the study (resuming finished training runs) and write its tables and figure.
pub fn run(
    spec: &StudySpec,
    device: Device,
    stop: &AtomicBool,
    progress: &dyn Progress,
    train_progress: &dyn train::Progress,
    mut say: impl FnMut(&str),
) -> Result<Study> {
    ensure_corpus(spec, progress)?;
    let data = TrainData::load(&spec.data.corpus, None)?;
    let (shares, _) = domain_shares(&data.corpus, ShareBy::Tokens);
    let long_tail: HashSet<String> = shares
        .iter()
        .filter(|d| d.long_tail)
        .map(|d| d.domain.clone())
        .collect();
    let truths = Truths::of(&data.corpus);
    let m = spec.select.top;
    let n = data.train.len();
    // share = w m / (w m + n − m)  ⇔  w = share (n − m) / ((1 − share) m).
    let weight = spec.cont.share * (n - m) as f64 / ((1.0 - spec.cont.share) * m as f64);
    let ctx = Runs {
        spec,
        data: &data,
        long_tail: &long_tail,
        truths: &truths,
        weight,
        device,
        stop,
        progress,
        train_progress,
    };
    let mut results = Vec::new();
    for &seed in &spec.seeds {
        results.extend(ctx.seed(seed, &mut say)?);
    }
    let study = summarise(results);
    write(&study, &spec.out)?;
    Ok(study)
}

/// What every seed of a selection study shares.
struct Runs<'a> {
    spec: &'a StudySpec,
    data: &'a TrainData,
    long_tail: &'a HashSet<String>,
    truths: &'a Truths,
    /// The sampling weight that gives the selection its share of the continued batches.
    weight: f64,
    device: Device,
    stop: &'a AtomicBool,
    progress: &'a dyn Progress,
    train_progress: &'a dyn train::Progress,
}

impl Runs<'_> {
    /// Train `s` to its end under the seed's folder `dir`.
    fn train(&self, s: &TrainSpec, dir: &Path, seed: u64) -> Result<train::RunResult> {
        let (data, device, stop) = (self.data, self.device, self.stop);
        train_to_end(s, data, dir, device, seed, stop, self.train_progress)
    }

    /// One seed: the base model, the NTK of its pool, the control run, then one continued run
    /// per criterion; the result rows of all of them.
    fn seed(&self, seed: u64, say: &mut dyn FnMut(&str)) -> Result<Vec<ResultRow>> {
        let spec = self.spec;
        let sd = spec.out.join(format!("seed-{seed}"));
        say(&format!("seed {seed}: base model"));
        let base = self.train(&spec.base_spec(), &sd, seed)?;
        let base_final = sd.join("base").join("final");
        say(&format!(
            "seed {seed}: NTK of {} training samples",
            spec.select.pool
        ));
        let pool = analyse_pool(
            &base_final,
            &spec.data.corpus,
            SplitChoice::Train,
            spec.select.pool,
            seed,
            analyze::DEFAULT_RESAMPLES,
            seed,
            &sd,
            self.device,
            self.progress,
            &|_| {},
        )?;
        let s = spec.continued_spec(&base_final, CONTROL, None);
        let control = final_losses(&self.train(&s, &sd.join("continued"), seed)?);
        let base_losses = final_losses(&base);
        let groups = (self.long_tail, self.truths);
        let mut results = Vec::new();
        for (name, v) in [("base", &base_losses), (CONTROL, &control)] {
            results.extend(group_rows(seed, name, v, &control, groups, None));
        }
        for &c in &spec.select.criteria {
            say(&format!("seed {seed}: {} selection", c.name()));
            let (v, mix) = self.continued(c, &pool, &base_final, &sd, seed)?;
            results.extend(group_rows(seed, c.name(), &v, &control, groups, Some(&mix)));
        }
        Ok(results)
    }

    /// The continued run of criterion `c` on the base model: its selection from the pool
    /// (written under `sd/select/`), its final validation losses and the domain mix it chose.
    fn continued(
        &self,
        c: Criterion,
        pool: &Pool,
        base_final: &Path,
        sd: &Path,
        seed: u64,
    ) -> Result<(ValLosses, BTreeMap<String, f64>)> {
        let m = self.spec.select.top;
        let sel = select::select(
            pool,
            c,
            Amount::Top(m),
            &Sources::default(),
            self.device,
            seed,
        )?;
        let file = sd.join("select").join(format!("{}.parquet", c.name()));
        crate::io::write_parquet(&mut sel.frame(pool)?, &file)?;
        let mut mix: BTreeMap<String, f64> = BTreeMap::new();
        for &i in &sel.order[..sel.selected] {
            *mix.entry(pool.domains[i].clone()).or_default() += 1.0 / m as f64;
        }
        let selection = SelectionSpec {
            file,
            repeat: None,
            weight: Some(self.weight),
        };
        let s = self
            .spec
            .continued_spec(base_final, c.name(), Some(selection));
        let v = final_losses(&self.train(&s, &sd.join("continued"), seed)?);
        Ok((v, mix))
    }
}

/// Means and intervals over seeds: each criterion against the control, and every pair of
/// criteria on the groups they share (`targeted` differs per criterion, so it is not compared).
pub fn summarise(results: Vec<ResultRow>) -> Study {
    // (criterion, group) → [(seed, loss, control loss)].
    type BySeed = BTreeMap<(String, String), Vec<(u64, f64, f64)>>;
    let mut by: BySeed = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for r in &results {
        if !order.contains(&r.criterion) {
            order.push(r.criterion.clone());
        }
        by.entry((r.criterion.clone(), r.group.clone()))
            .or_default()
            .push((r.seed, r.loss, r.control));
    }
    let mut summary = Vec::new();
    for c in &order {
        for g in GROUPS {
            if let Some(v) = by.get(&(c.clone(), g.to_string())) {
                let d: Vec<f64> = v.iter().map(|x| x.1 - x.2).collect();
                summary.push(SummaryRow {
                    criterion: c.clone(),
                    group: g.into(),
                    delta: t_interval(&d),
                });
            }
        }
    }
    let mut comparisons = Vec::new();
    let crits: Vec<&String> = order.iter().filter(|c| *c != "base").collect();
    for a in &crits {
        for b in &crits {
            if a == b {
                continue;
            }
            for g in GROUPS.iter().filter(|g| **g != "targeted") {
                let (Some(va), Some(vb)) = (
                    by.get(&((*a).clone(), g.to_string())),
                    by.get(&((*b).clone(), g.to_string())),
                ) else {
                    continue;
                };
                let d: Vec<f64> = va
                    .iter()
                    .filter_map(|x| vb.iter().find(|y| y.0 == x.0).map(|y| x.1 - y.1))
                    .collect();
                if d.len() == va.len() {
                    comparisons.push(Comparison {
                        a: (*a).clone(),
                        b: (*b).clone(),
                        group: (*g).into(),
                        diff: t_interval(&d),
                    });
                }
            }
        }
    }
    Study {
        results,
        summary,
        comparisons,
    }
}

impl Study {
    /// The summary as a Markdown table (criterion × group: Δ loss against the control, 95%
    /// interval).
    pub fn markdown(&self) -> String {
        let groups: Vec<&str> = GROUPS
            .into_iter()
            .filter(|g| self.summary.iter().any(|r| r.group == *g))
            .collect();
        let mut s = format!(
            "| criterion | {} |\n|---|{}\n",
            groups
                .iter()
                .map(|g| format!("Δ loss, {g}"))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(groups.len())
        );
        let mut crits: Vec<&str> = Vec::new();
        for r in &self.summary {
            if !crits.contains(&r.criterion.as_str()) && r.criterion != CONTROL {
                crits.push(&r.criterion);
            }
        }
        for c in crits {
            let cells: Vec<String> = groups
                .iter()
                .map(|g| {
                    self.summary
                        .iter()
                        .find(|r| r.criterion == c && r.group == *g)
                        .map_or("–".into(), |r| {
                            format!(
                                "{:+.4} [{:+.4}, {:+.4}]",
                                r.delta.mean, r.delta.low, r.delta.high
                            )
                        })
                })
                .collect();
            s.push_str(&format!("| {c} | {} |\n", cells.join(" | ")));
        }
        s
    }
}

impl Study {
    /// The summary and comparisons of a study written into `dir` (no per-seed results).
    pub fn read(dir: &Path) -> Result<Study> {
        use crate::io::{column_f64, column_str, read_parquet};
        let interval = |df: &DataFrame, p: &Path, name: &str| -> Result<Vec<Interval>> {
            let (m, l, h) = (
                column_f64(df, name, p)?,
                column_f64(df, &format!("{name}_low"), p)?,
                column_f64(df, &format!("{name}_high"), p)?,
            );
            Ok((0..m.len())
                .map(|i| Interval {
                    mean: m[i],
                    low: l[i],
                    high: h[i],
                })
                .collect())
        };
        let p = dir.join("summary.parquet");
        let df = read_parquet(&p)?;
        let (c, g, d) = (
            column_str(&df, "criterion", &p)?,
            column_str(&df, "group", &p)?,
            interval(&df, &p, "delta")?,
        );
        let summary = (0..c.len())
            .map(|i| SummaryRow {
                criterion: c[i].clone(),
                group: g[i].clone(),
                delta: d[i].clone(),
            })
            .collect();
        let p = dir.join("comparisons.parquet");
        let df = read_parquet(&p)?;
        let (a, b, g, d) = (
            column_str(&df, "a", &p)?,
            column_str(&df, "b", &p)?,
            column_str(&df, "group", &p)?,
            interval(&df, &p, "diff")?,
        );
        let comparisons = (0..a.len())
            .map(|i| Comparison {
                a: a[i].clone(),
                b: b[i].clone(),
                group: g[i].clone(),
                diff: d[i].clone(),
            })
            .collect();
        Ok(Study {
            results: Vec::new(),
            summary,
            comparisons,
        })
    }

    /// The study in words: each criterion's long-tail change against the control, and the flag
    /// score against each other criterion on the long tail; a direction is stated only when the
    /// interval excludes 0.
    pub fn findings(&self) -> Vec<String> {
        // The neglected samples where the corpus marks them, else the long tail.
        let focus = if self.summary.iter().any(|r| r.group == "neglected") {
            "neglected"
        } else {
            "long-tail"
        };
        let word = |i: &Interval, lower: &str, higher: &str| match i.sign() {
            -1 => lower.to_string(),
            1 => higher.to_string(),
            _ => "no difference is detectable".to_string(),
        };
        let mut out = Vec::new();
        for r in self
            .summary
            .iter()
            .filter(|r| r.group == focus && r.criterion != CONTROL && r.criterion != "base")
        {
            let all = self
                .summary
                .iter()
                .find(|x| x.criterion == r.criterion && x.group == "all");
            out.push(format!(
                "Selection study: continuing on the {} selection changed {focus} held-out loss by \
                 {:+.3} [{:+.3}, {:+.3}] nats against no selection ({}){}.",
                r.criterion,
                r.delta.mean,
                r.delta.low,
                r.delta.high,
                word(&r.delta, "lower", "higher"),
                all.map_or(String::new(), |a| format!(
                    ", and overall loss by {:+.3} [{:+.3}, {:+.3}]",
                    a.delta.mean, a.delta.low, a.delta.high
                ))
            ));
        }
        for c in self
            .comparisons
            .iter()
            .filter(|c| c.a == "flag" && c.group == focus && c.b != CONTROL && c.b != "base")
        {
            out.push(format!(
                "Selection study, {focus}: flag against {}: {:+.3} [{:+.3}, {:+.3}] nats ({}).",
                c.b,
                c.diff.mean,
                c.diff.low,
                c.diff.high,
                word(&c.diff, "flag better", "flag worse")
            ));
        }
        out
    }
}

/// Columns `prefix`, `prefix_low`, `prefix_high` of intervals.
pub(crate) fn interval_columns(prefix: &str, xs: &[&Interval]) -> Vec<Column> {
    vec![
        Column::new(prefix.into(), xs.iter().map(|x| x.mean).collect::<Vec<_>>()),
        Column::new(
            format!("{prefix}_low").into(),
            xs.iter().map(|x| x.low).collect::<Vec<_>>(),
        ),
        Column::new(
            format!("{prefix}_high").into(),
            xs.iter().map(|x| x.high).collect::<Vec<_>>(),
        ),
    ]
}

/// Write the tables, `study.md` and the figure into `out`.
pub fn write(s: &Study, out: &Path) -> Result<()> {
    let r = &s.results;
    let mut results = DataFrame::new(
        r.len(),
        vec![
            Column::new("seed".into(), r.iter().map(|x| x.seed).collect::<Vec<_>>()),
            Column::new(
                "criterion".into(),
                r.iter().map(|x| x.criterion.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "group".into(),
                r.iter().map(|x| x.group.as_str()).collect::<Vec<_>>(),
            ),
            Column::new("loss".into(), r.iter().map(|x| x.loss).collect::<Vec<_>>()),
            Column::new(
                "ppl".into(),
                r.iter().map(|x| x.loss.exp()).collect::<Vec<_>>(),
            ),
            Column::new(
                "delta".into(),
                r.iter().map(|x| x.loss - x.control).collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("study results", e))?;
    crate::io::write_parquet(&mut results, out.join("results.parquet"))?;
    let mut cols = vec![
        Column::new(
            "criterion".into(),
            s.summary
                .iter()
                .map(|x| x.criterion.as_str())
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "group".into(),
            s.summary
                .iter()
                .map(|x| x.group.as_str())
                .collect::<Vec<_>>(),
        ),
    ];
    cols.extend(interval_columns(
        "delta",
        &s.summary.iter().map(|x| &x.delta).collect::<Vec<_>>(),
    ));
    let mut summary =
        DataFrame::new(s.summary.len(), cols).map_err(|e| Error::table("study summary", e))?;
    crate::io::write_parquet(&mut summary, out.join("summary.parquet"))?;
    let c = &s.comparisons;
    let mut cols = vec![
        Column::new(
            "a".into(),
            c.iter().map(|x| x.a.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "b".into(),
            c.iter().map(|x| x.b.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "group".into(),
            c.iter().map(|x| x.group.as_str()).collect::<Vec<_>>(),
        ),
    ];
    cols.extend(interval_columns(
        "diff",
        &c.iter().map(|x| &x.diff).collect::<Vec<_>>(),
    ));
    let mut comparisons =
        DataFrame::new(c.len(), cols).map_err(|e| Error::table("study comparisons", e))?;
    crate::io::write_parquet(&mut comparisons, out.join("comparisons.parquet"))?;
    crate::io::write_atomic(out.join("study.md"), s.markdown().as_bytes())?;
    let groups: Vec<&str> = GROUPS
        .into_iter()
        .filter(|g| s.summary.iter().any(|r| r.group == *g))
        .collect();
    let crits: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for r in &s.summary {
            if r.criterion != CONTROL && r.criterion != "base" && !v.contains(&r.criterion) {
                v.push(r.criterion.clone());
            }
        }
        v
    };
    let series: Vec<crate::plots::IntervalSeries> = groups
        .iter()
        .map(|g| {
            (
                g.to_string(),
                crits
                    .iter()
                    .map(|c| {
                        s.summary
                            .iter()
                            .find(|r| &r.criterion == c && r.group == *g)
                            .map(|r| (r.delta.mean, r.delta.low, r.delta.high))
                    })
                    .collect(),
            )
        })
        .collect();
    let fig = crate::plots::interval_dots(
        &crits,
        &series,
        "Held-out loss change against no selection (mean over seeds, 95% t interval)",
        "Δ mean token loss (nats)",
    )?;
    let fdir = out.join("figures");
    std::fs::create_dir_all(&fdir).map_err(|e| Error::io(&fdir, e))?;
    crate::io::write_atomic(fdir.join("selection_study.svg"), fig.svg.as_bytes())?;
    crate::io::write_atomic(fdir.join("selection_study.png"), &fig.png)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_interval_matches_hand_computation() {
        // Mean 2, sd 1, n 3: half-width t(0.975, 2) / √3 = 4.3027 / 1.7321 = 2.4841.
        let i = t_interval(&[1.0, 2.0, 3.0]);
        assert!((i.mean - 2.0).abs() < 1e-12);
        assert!((i.high - 2.0 - 2.4841).abs() < 1e-3, "{i:?}");
        assert!((i.low - 2.0 + 2.4841).abs() < 1e-3, "{i:?}");
    }

    #[test]
    fn summary_pairs_seeds_and_skips_targeted_comparisons() {
        let row = |seed, c: &str, g: &str, loss, control| ResultRow {
            seed,
            criterion: c.into(),
            group: g.into(),
            loss,
            control,
        };
        let results = vec![
            row(1, "flag", "all", 3.0, 3.5),
            row(2, "flag", "all", 3.2, 3.6),
            row(1, "flag", "targeted", 2.0, 2.5),
            row(2, "flag", "targeted", 2.2, 2.6),
            row(2, "loss", "all", 3.4, 3.6),
            row(1, "loss", "all", 3.1, 3.5),
            row(1, "flag", "long-tail", 2.0, 2.4),
            row(2, "flag", "long-tail", 2.1, 2.6),
            row(1, "loss", "long-tail", 2.3, 2.4),
            row(2, "loss", "long-tail", 2.41, 2.6),
        ];
        let s = summarise(results);
        let flag_all = s
            .summary
            .iter()
            .find(|r| r.criterion == "flag" && r.group == "all")
            .unwrap();
        assert!((flag_all.delta.mean + 0.45).abs() < 1e-12);
        // flag − loss, paired by seed: (3.0 − 3.1, 3.2 − 3.4) = (−0.1, −0.2).
        let c = s
            .comparisons
            .iter()
            .find(|c| c.a == "flag" && c.b == "loss" && c.group == "all")
            .unwrap();
        assert!((c.diff.mean + 0.15).abs() < 1e-12, "{c:?}");
        assert!(!s.comparisons.iter().any(|c| c.group == "targeted"));
        assert!(s.markdown().contains("| flag | -0.4500"));
        let dir = tempfile::tempdir().unwrap();
        write(&s, dir.path()).unwrap();
        let back = Study::read(dir.path()).unwrap();
        assert_eq!(back.summary, s.summary);
        assert_eq!(back.comparisons, s.comparisons);
        let words = back.findings().join("\n");
        assert!(
            words.contains("flag against loss: -0.305 [-0.369, -0.241] nats (flag better)"),
            "{words}"
        );
    }
}

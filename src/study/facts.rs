//! Once read is enough? The knowledge-acquisition benchmark (`tailscope study` with a `[facts]`
//! spec, `analyses/facts-study.toml`): fictional facts inserted into a host corpus at controlled
//! counts ([`crate::corpus::facts`]), a pretrained model continued on host + facts for exactly
//! one epoch by every `[[run]]` (dense fine-tuning, Switch and CSE upcycling, at equal steps and
//! tokens), and, per run and seed, which facts it acquired ([`crate::eval::facts`]).
//!
//! Exposure is exact: the training sampler is epoch-based and the study trains steps × batch =
//! the training split's size, so every training row is read once and a fact of count k exactly k
//! times, its sentences spread over the stream by the seeded permutation. The study refuses a
//! corpus whose training split is not a multiple of the batch size.
//!
//! Per seed (each trains every run afresh; the base model and the facts are the same): each run's
//! probe scores against the base model's (the gain is the model's, not prior knowledge; the base
//! must be at chance on the invented facts, [`crate::eval::facts::ChanceCheck`]); its held-out
//! host perplexity before and after (forgetting); for routed runs, the expert each fact text and
//! host text goes to; and *foresight* ([`foresight`]): at a quarter of the steps, the NTK and
//! analysis of the fact texts, and how well each criterion ranks the facts not acquired at the
//! end. The blocks that train are chosen on a development seed when `[[choice]]`s are given:
//! the baseline run under each, the choice with the highest acquired share wins.
//!
//! The frozen trunk below the trained blocks is the same for every run, seed, checkpoint and
//! probe text: its outputs are computed once per text ([`crate::model::trunk`]) and shared.
//!
//! Outputs under `out`: `seed-S/<choice>/{train,eval,foresight}/<run>/`, `outcomes.parquet`
//! (seed, run, fact), `curves.parquet` and `vs_baseline.parquet` (run, count, metric, mean and
//! interval), `half.parquet`, `forgetting.parquet`, `routing.parquet`, `foresight.parquet`,
//! `truth.parquet` (the per-fact truth table of every run and seed), `development.parquet`,
//! `facts-study.md`, `findings.json` and `figures/acquisition.{svg,png}`. Finished runs and their
//! measurements are reused on a rerun.

pub mod foresight;
pub mod summary;
pub mod tables;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::Device;

use super::experts::StudyRun;
use super::StudySynth;
use crate::corpus::facts::{self as facts_corpus, FactsOptions, ProbeSet};
use crate::error::{Error, Result};
use crate::eval::facts::{self as probes, ChanceCheck, EncodedProbes, FactEval, FactRow};
use crate::model::trunk::{Trunk, TrunkStats};
use crate::model::{ExpertConfig, Model};
use crate::progress::Progress;
use crate::train::spec::{DataSpec, ModelSpec};
use crate::train::upcycle::{self, TrunkCache};
use crate::train::{self, BaseSpec, RunSpec, TrainData, TrainOptions, TrainScope, TrainSpec};
use foresight::{Quality, TruthRow};
use summary::{Forgetting, Outcome, Route};

/// A facts study spec: `[facts]`, `[base]`, optional `[pretrain]`, `[train]`, `[[run]]`s and
/// optional `[[choice]]`s.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactsStudySpec {
    /// `[facts]`.
    pub facts: FactsSettings,
    /// `[base]`: the model every run continues.
    pub base: FactsBase,
    /// `[pretrain]`: train the base model from scratch on the host corpus first (the tiny study).
    #[serde(default)]
    pub pretrain: Option<Pretrain>,
    /// `[train]`: the continued training every run shares (`steps` is set to one epoch).
    #[serde(default)]
    pub train: TrainOptions,
    /// `[[run]]`: the compared models.
    #[serde(rename = "run")]
    pub runs: Vec<StudyRun>,
    /// `[[choice]]`: which blocks train, compared on the development seed.
    #[serde(default, rename = "choice")]
    pub choices: Vec<BlockChoice>,
}

/// `[facts]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactsSettings {
    /// Seeds the results are reported over (default 1, 2, 3).
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// The development seed the block choice is made on (not one of `seeds`).
    #[serde(default)]
    pub dev_seed: u64,
    /// The host corpus table (its tokenizer beside it).
    pub host: PathBuf,
    /// A corpus file ingested into `host` when that does not exist.
    #[serde(default)]
    pub ingest: Option<PathBuf>,
    /// Or a synthetic host generated there (`corpus synth`).
    #[serde(default)]
    pub synth: Option<StudySynth>,
    /// The corpus with the facts inserted (made by `corpus facts` when missing).
    pub corpus: PathBuf,
    /// Insertion counts.
    #[serde(default = "default_counts")]
    pub counts: Vec<u32>,
    /// Facts per count.
    #[serde(default = "default_per_count")]
    pub facts_per_count: usize,
    /// Never-inserted control facts.
    #[serde(default = "default_controls")]
    pub controls: usize,
    /// Distractors per fact.
    #[serde(default = "default_distractors")]
    pub distractors: usize,
    /// Host training samples kept (a seeded subset; default all).
    #[serde(default)]
    pub host_samples: Option<usize>,
    /// Seed of `corpus facts` (entities, answers, host subset).
    #[serde(default)]
    pub generator_seed: u64,
    /// Epochs over host + facts (default 1: a fact of count k is read exactly k times; with E
    /// epochs, E·k times).
    #[serde(default = "one")]
    pub epochs: u64,
    /// Held-out host sentences of the forgetting measurement (and of training's validation).
    #[serde(default = "two_hundred")]
    pub eval_samples: usize,
    /// Analyse the fact texts at a quarter of the steps (NTK + analyze).
    #[serde(default = "yes")]
    pub foresight: bool,
    /// Sparse projection of the foresight kernel's gradients (dimensions per parameter; 0: none).
    #[serde(default = "projection")]
    pub projection: i64,
    /// Memory budget of the foresight kernel in GiB (the whole study process counts against it:
    /// a CSE run upcycling six FFNs held 4.9 GB before its first batch).
    #[serde(default = "eight")]
    pub foresight_memory: f64,
    /// Bootstrap resamples of the intervals over seeds and facts.
    #[serde(default = "resamples")]
    pub resamples: usize,
    /// Share the frozen trunk's outputs per text (off: every pass runs the whole network).
    #[serde(default = "yes")]
    pub trunk_cache: bool,
    /// The run every other is compared with.
    #[serde(default = "dense")]
    pub baseline: String,
    /// Output folder.
    pub out: PathBuf,
}

/// `[base]`: the model every run continues, and the default block choice.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactsBase {
    /// The model (absent with `[pretrain]`, which trains it).
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// What trains without `[[choice]]`s.
    #[serde(default)]
    pub train: TrainScope,
    /// The blocks that train (and receive experts) without `[[choice]]`s.
    #[serde(default = "two")]
    pub last_k: i64,
    /// Cut training sentences to this many tokens.
    #[serde(default)]
    pub max_len: Option<i64>,
}

/// `[pretrain]`: a dense base model trained from scratch on the host corpus (no facts).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pretrain {
    /// `[pretrain.model]`.
    pub model: ModelSpec,
    /// `[pretrain.train]`.
    pub train: TrainOptions,
}

/// `[[choice]]`: which blocks the runs train.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BlockChoice {
    /// Its name (an output folder).
    pub name: String,
    /// What trains.
    #[serde(default)]
    pub train: TrainScope,
    /// The last blocks that train and receive the experts.
    pub last_k: i64,
}

fn default_seeds() -> Vec<u64> {
    vec![1, 2, 3]
}
fn default_counts() -> Vec<u32> {
    FactsOptions::default().counts
}
fn default_per_count() -> usize {
    FactsOptions::default().facts_per_count
}
fn default_controls() -> usize {
    FactsOptions::default().controls
}
fn default_distractors() -> usize {
    FactsOptions::default().distractors
}
fn eight() -> f64 {
    8.0
}
fn two() -> i64 {
    2
}
fn one() -> u64 {
    1
}
fn two_hundred() -> usize {
    200
}
fn projection() -> i64 {
    1024
}
fn resamples() -> usize {
    summary::RESAMPLES
}
fn yes() -> bool {
    true
}
fn dense() -> String {
    "dense".into()
}

impl FactsStudySpec {
    /// Read and check a spec.
    pub fn read(path: &Path) -> Result<FactsStudySpec> {
        let s: FactsStudySpec = crate::io::read_toml(path)?;
        s.check().map_err(|e| Error::in_file(path, e.to_string()))?;
        Ok(s)
    }

    /// The generator's options.
    pub fn facts_options(&self) -> FactsOptions {
        let f = &self.facts;
        FactsOptions {
            counts: f.counts.clone(),
            facts_per_count: f.facts_per_count,
            controls: f.controls,
            distractors: f.distractors,
            host_samples: f.host_samples,
            seed: f.generator_seed,
        }
    }

    /// Check the settings.
    pub fn check(&self) -> Result<()> {
        let f = &self.facts;
        if f.seeds.len() < 2 {
            return Err(Error::invalid(
                "facts.seeds",
                "give at least 2 seeds (intervals come from the spread across seeds)",
            ));
        }
        if self.choices.len() > 1 && f.seeds.contains(&f.dev_seed) {
            return Err(Error::invalid(
                "facts.dev_seed",
                format!(
                    "{} is one of facts.seeds: the block choice is made on a seed of its own",
                    f.dev_seed
                ),
            ));
        }
        if self.base.model.is_none() && self.pretrain.is_none() {
            return Err(Error::invalid(
                "base.model",
                "give the model, or [pretrain] to train one",
            ));
        }
        self.facts_options().check()?;
        if !(f.foresight_memory.is_finite() && f.foresight_memory > 0.0) {
            return Err(Error::invalid(
                "facts.foresight_memory",
                format!("is {}; give a budget in GB above 0", f.foresight_memory),
            ));
        }
        if f.eval_samples == 0 || f.epochs == 0 {
            return Err(Error::invalid(
                "facts",
                "eval_samples and epochs must be at least 1",
            ));
        }
        let mut names: Vec<&str> = self.runs.iter().map(|r| r.name.as_str()).collect();
        if !names.contains(&f.baseline.as_str()) {
            return Err(Error::invalid(
                "facts.baseline",
                format!("{:?} is not the name of a [[run]]", f.baseline),
            ));
        }
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) || self.runs.len() < 2 {
            return Err(Error::invalid(
                "run",
                "give the baseline and at least one other run, with distinct names",
            ));
        }
        let mut choices: Vec<&str> = self.choices.iter().map(|c| c.name.as_str()).collect();
        choices.sort_unstable();
        if choices.windows(2).any(|w| w[0] == w[1]) {
            return Err(Error::invalid("choice.name", "choice names must differ"));
        }
        let model = PathBuf::from("base");
        for c in self.block_choices() {
            for r in &self.runs {
                self.run_spec(r, &c, &model, 4).check()?;
            }
        }
        Ok(())
    }

    /// The block choices: the `[[choice]]`s, or `[base]`'s.
    pub fn block_choices(&self) -> Vec<BlockChoice> {
        if !self.choices.is_empty() {
            return self.choices.clone();
        }
        vec![BlockChoice {
            name: format!("{}-last{}", scope_name(self.base.train), self.base.last_k),
            train: self.base.train,
            last_k: self.base.last_k,
        }]
    }

    /// The training spec of one run under `choice`, from `base`, for `steps` steps (one epoch):
    /// checkpoints at a quarter of the steps (foresight) and at the end, no cluster dynamics,
    /// the run's experts on the choice's blocks.
    pub fn run_spec(
        &self,
        run: &StudyRun,
        choice: &BlockChoice,
        base: &Path,
        steps: u64,
    ) -> TrainSpec {
        let t = &self.train;
        TrainSpec {
            data: DataSpec {
                corpus: self.facts.corpus.clone(),
                tokenizer: None,
                eval_samples: self.facts.eval_samples,
            },
            model: None,
            base: Some(BaseSpec {
                model: base.to_path_buf(),
                train: choice.train,
                last_k: choice.last_k,
                max_len: self.base.max_len,
                upcycle: true,
            }),
            train: TrainOptions {
                steps,
                checkpoint_every: 0,
                keep_last: 1,
                keep_steps: vec![quarter(steps)],
                dynamics_every: 0,
                probe_samples: 0,
                cse_warmup_fraction: run.cse_warmup_fraction.unwrap_or(t.cse_warmup_fraction),
                ..t.clone()
            },
            selection: None,
            runs: vec![RunSpec {
                name: run.name.clone(),
                experts: on_blocks(&run.experts, choice.last_k),
            }],
        }
    }

    /// The pretraining spec of the base model (`[pretrain]`): one dense run on the host.
    fn pretrain_spec(&self, p: &Pretrain) -> TrainSpec {
        TrainSpec {
            data: DataSpec {
                corpus: self.facts.host.clone(),
                tokenizer: None,
                eval_samples: self.facts.eval_samples,
            },
            model: Some(p.model.clone()),
            base: None,
            train: p.train.clone(),
            selection: None,
            runs: vec![RunSpec {
                name: "base".into(),
                experts: ExpertConfig::Dense,
            }],
        }
    }
}

/// The step of the foresight checkpoint: a quarter of the steps (at least 1).
pub fn quarter(steps: u64) -> u64 {
    (steps / 4).max(1)
}

fn scope_name(s: TrainScope) -> &'static str {
    match s {
        TrainScope::Mlp => "mlp",
        TrainScope::Blocks => "blocks",
        TrainScope::All => "all",
    }
}

/// `experts` placed on the last `k` blocks (the blocks a choice trains).
fn on_blocks(experts: &ExpertConfig, k: i64) -> ExpertConfig {
    match experts {
        ExpertConfig::Dense => ExpertConfig::Dense,
        ExpertConfig::Switch(s) => ExpertConfig::Switch(crate::model::SwitchConfig {
            last_k: k,
            ..s.clone()
        }),
        ExpertConfig::Cse(c) => ExpertConfig::Cse(crate::model::CseConfig {
            last_k: k,
            ..c.clone()
        }),
    }
}

/// The baseline run under one block choice on the development seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DevRow {
    /// The choice.
    pub choice: String,
    /// What trains.
    pub train: String,
    /// Blocks.
    pub last_k: i64,
    /// Share of inserted facts acquired.
    pub acquired: f64,
    /// Mean gain over inserted facts.
    pub gain: f64,
    /// Trainable parameters.
    pub params: i64,
    /// Whether it was chosen.
    pub chosen: bool,
}

/// What one run at one seed measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunMeasures {
    /// Per fact.
    pub facts: Vec<FactRow>,
    /// Host perplexity at the first and the last step.
    pub ppl: (f64, f64),
    /// Routing of fact and host texts (routed runs).
    pub routes: Vec<Route>,
    /// The truth table (with foresight).
    pub truth: Vec<TruthRow>,
    /// Ranking quality of each criterion (with foresight).
    pub quality: Vec<Quality>,
    /// Trainable parameters.
    pub params: i64,
}

/// A finished facts study.
#[derive(Debug, Clone)]
pub struct FactsStudy {
    /// The runs, baseline first.
    pub runs: Vec<String>,
    /// The baseline.
    pub baseline: String,
    /// The block choice the results are for.
    pub choice: BlockChoice,
    /// The development table (empty without `[[choice]]`s).
    pub development: Vec<DevRow>,
    /// The base model at chance on the invented facts?
    pub chance: Option<ChanceCheck>,
    /// Every (seed, run, fact).
    pub outcomes: Vec<Outcome>,
    /// Per run, count and metric.
    pub curves: Vec<summary::CurveRow>,
    /// Each run against the baseline, per count and metric.
    pub vs_baseline: Vec<summary::CurveRow>,
    /// Half-acquisition counts.
    pub half: Vec<summary::HalfCount>,
    /// Per (seed, run): host perplexity before and after.
    pub forgetting: Vec<Forgetting>,
    /// Every route.
    pub routes: Vec<Route>,
    /// Per (seed, run, criterion): AP and AUROC.
    pub quality: Vec<(u64, String, Quality)>,
    /// Per (seed, run, fact): the truth table.
    pub truth: Vec<(u64, String, TruthRow)>,
    /// Sizes and time, for the summary.
    pub sizes: Sizes,
}

/// What the study trained on and how long it took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sizes {
    /// Host training samples.
    pub host_train: usize,
    /// Fact sentences.
    pub fact_rows: usize,
    /// Facts inserted, and controls.
    pub facts: usize,
    /// Controls.
    pub controls: usize,
    /// Steps per run (`epochs` epochs).
    pub steps: u64,
    /// Epochs over host + facts (a fact of count k is read epochs·k times).
    pub epochs: u64,
    /// Batch size.
    pub batch: usize,
    /// Tokens per epoch (its real tokens).
    pub tokens: u64,
    /// Trainable parameters per run.
    pub params: BTreeMap<String, i64>,
    /// Wall time of this invocation, seconds.
    pub seconds: f64,
    /// The trunk cache at the end.
    pub trunk: Option<TrunkStats>,
}

/// Make the host corpus (ingest or synth) when missing, then the facts corpus.
fn ensure_corpora(spec: &FactsStudySpec, progress: &dyn Progress) -> Result<()> {
    let f = &spec.facts;
    if !f.host.exists() {
        match (&f.ingest, &f.synth) {
            (Some(input), _) => {
                crate::corpus::ingest_default(input, &f.host, None, 0, progress)?;
            }
            (None, Some(s)) => crate::corpus::synth::write_corpus(
                &crate::corpus::synth::SynthOptions {
                    samples: s.samples,
                    rare_share: s.rare_share,
                    seed: s.seed,
                    ..Default::default()
                },
                s.vocab_size,
                &f.host,
                progress,
            )?,
            (None, None) => {
                return Err(Error::in_file(
                    &f.host,
                    "host corpus not found (give facts.ingest or [facts.synth] to make it)",
                ))
            }
        }
    }
    let probes = facts_corpus::default_probes_path(&f.corpus);
    // The generator's settings are stamped beside the corpus, so a corpus made with other
    // settings (distractors, seed, host subset) is refused rather than reused.
    let stamp = f.corpus.with_extension("options.json");
    let want_stamp = serde_json::json!({"host": f.host, "options": spec.facts_options()});
    if !f.corpus.exists() || !probes.exists() {
        facts_corpus::write_facts(&f.host, &f.corpus, None, &spec.facts_options())?;
        crate::io::write_atomic(&stamp, want_stamp.to_string().as_bytes())?;
    }
    let have_stamp: Option<serde_json::Value> = std::fs::read_to_string(&stamp)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    if have_stamp.as_ref() != Some(&want_stamp) {
        return Err(Error::in_file(
            &stamp,
            format!(
                "{} was made with other [facts] settings than this spec's ({}); remove it and its \
                 probe table to regenerate them",
                f.corpus.display(),
                have_stamp.map_or("no record of them".into(), |v| v.to_string())
            ),
        ));
    }
    let set = ProbeSet::read(&probes)?;
    let mut per: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, c) in set.facts() {
        *per.entry(c).or_default() += 1;
    }
    let mut want: BTreeMap<u32, usize> = f.counts.iter().map(|&c| (c, f.facts_per_count)).collect();
    if f.controls > 0 {
        want.insert(0, f.controls);
    }
    if per != want {
        return Err(Error::in_file(
            &probes,
            format!(
                "its facts per count {per:?} are not the spec's {want:?}; remove {} and its probe \
                 table to regenerate them",
                f.corpus.display()
            ),
        ));
    }
    Ok(())
}

/// The base model's path, pretrained first when `[pretrain]` asks.
fn base_model(
    spec: &FactsStudySpec,
    device: Device,
    stop: &AtomicBool,
    train_progress: &dyn train::Progress,
) -> Result<PathBuf> {
    let Some(p) = &spec.pretrain else {
        return spec
            .base
            .model
            .clone()
            .ok_or_else(|| Error::invalid("base.model", "missing"));
    };
    let ts = spec.pretrain_spec(p);
    let data = TrainData::for_spec(&ts)?;
    let dir = spec.facts.out.join("pretrain");
    super::train_to_end(
        &ts,
        &data,
        &dir,
        device,
        spec.facts.dev_seed,
        stop,
        train_progress,
    )?;
    Ok(dir.join("base").join("final"))
}

/// Everything the runs share: the data (and its trunk cache), the probes, the base model's
/// scores per choice, the paths.
struct Shared {
    data: TrainData,
    base: PathBuf,
    set: ProbeSet,
    enc: EncodedProbes,
    /// Base scores per choice name.
    before: BTreeMap<String, Vec<Vec<f64>>>,
    steps: u64,
    analysis_corpus: PathBuf,
}

impl Shared {
    fn trunk(&self, choice: &BlockChoice, cfg: &crate::model::ModelConfig) -> Option<Trunk<'_>> {
        let b = BaseSpec {
            model: self.base.clone(),
            train: choice.train,
            last_k: choice.last_k,
            max_len: None,
            upcycle: true,
        };
        upcycle::trunk_layer(&self.data.trunk, &b, cfg).map(|layer| Trunk {
            cache: &self.data.trunk,
            source: &self.base,
            layer,
        })
    }
}

/// Load what the runs share; declare every probe text to the trunk cache of every choice (before
/// any training, so chunks are the same in every process) and score the base model.
fn prepare(
    spec: &FactsStudySpec,
    base: PathBuf,
    choices: &[BlockChoice],
    device: Device,
    say: &mut dyn FnMut(&str),
) -> Result<Shared> {
    let f = &spec.facts;
    let mut data = TrainData::for_spec(&spec.run_spec(&spec.runs[0], &choices[0], &base, 1))?;
    if !f.trunk_cache {
        data.trunk = TrunkCache::disabled();
    }
    let batch = spec.train.batch_size;
    let n = data.train.len();
    if batch == 0 || n % batch != 0 {
        return Err(Error::invalid(
            "facts.host_samples",
            format!(
                "one epoch must be whole steps: {n} training rows (host + facts) are not a \
                 multiple of train.batch_size {batch}; use host_samples {} or {}",
                host_hint(f.host_samples, n, batch, false),
                host_hint(f.host_samples, n, batch, true)
            ),
        ));
    }
    let set = ProbeSet::read(&facts_corpus::default_probes_path(&f.corpus))?;
    let (_vs, model) = crate::source::load_model(&base, device)?;
    let tok = crate::source::tokenizer_for(None, &base, &model, &f.corpus)?;
    let enc = probes::encode(&tok, &set)?;
    let analysis_corpus = f.out.join("analysis-corpus").join("corpus.parquet");
    foresight::write_analysis_corpus(&f.corpus, &analysis_corpus)?;
    let mut shared = Shared {
        data,
        base,
        set,
        enc,
        before: BTreeMap::new(),
        steps: f.epochs * (n / batch) as u64,
        analysis_corpus,
    };
    let rows = shared.enc.rows(&model);
    for c in choices {
        if let Some(t) = shared.trunk(c, &model.cfg) {
            t.declare(&rows);
        }
    }
    for c in choices {
        say(&format!("base model: probe scores ({})", c.name));
        let s = probes::score(
            &model,
            shared.trunk(c, &model.cfg).as_ref(),
            &shared.enc,
            device,
        )?;
        shared.before.insert(c.name.clone(), s);
    }
    Ok(shared)
}

/// The `host_samples` nearest the current setting that make the training rows a multiple of
/// `batch` (down or up).
fn host_hint(current: Option<usize>, rows: usize, batch: usize, up: bool) -> String {
    let r = rows % batch;
    match current {
        Some(h) if up => (h + batch - r).to_string(),
        Some(h) => h.saturating_sub(r).to_string(),
        None => format!(
            "a count {} the host's training rows",
            if up { "above" } else { "below" }
        ),
    }
}

/// Run the study (reusing finished runs and measurements) and write its tables and figure.
pub fn run(
    spec: &FactsStudySpec,
    device: Device,
    stop: &AtomicBool,
    progress: &dyn Progress,
    train_progress: &dyn train::Progress,
    mut say: impl FnMut(&str),
) -> Result<FactsStudy> {
    let started = Instant::now();
    let f = &spec.facts;
    ensure_corpora(spec, progress)?;
    let base = base_model(spec, device, stop, train_progress)?;
    let choices = spec.block_choices();
    let shared = prepare(spec, base, &choices, device, &mut say)?;
    let ctx = Ctx {
        spec,
        shared: &shared,
        device,
        stop,
        progress,
        train_progress,
    };
    let (choice, development) = if choices.len() > 1 {
        develop(&ctx, &choices, &mut say)?
    } else {
        (choices[0].clone(), Vec::new())
    };
    let mut order: Vec<&StudyRun> = spec.runs.iter().filter(|r| r.name == f.baseline).collect();
    order.extend(spec.runs.iter().filter(|r| r.name != f.baseline));
    let mut measured: Vec<(u64, String, RunMeasures)> = Vec::new();
    for &seed in &f.seeds {
        for r in &order {
            say(&format!("seed {seed}: {} ({})", r.name, choice.name));
            let m = ctx.measure(r, &choice, seed)?;
            measured.push((seed, r.name.clone(), m));
        }
    }
    let runs: Vec<String> = order.iter().map(|r| r.name.clone()).collect();
    let mut study = assemble(spec, &shared, runs, choice, development, measured);
    study.sizes.seconds = started.elapsed().as_secs_f64();
    study.sizes.trunk = f.trunk_cache.then(|| shared.data.trunk.stats());
    tables::write(&study, &f.out)?;
    Ok(study)
}

/// The baseline run under every block choice on the development seed; the choice with the
/// highest acquired share of inserted facts (ties: the first listed) wins.
fn develop(
    ctx: &Ctx,
    choices: &[BlockChoice],
    say: &mut dyn FnMut(&str),
) -> Result<(BlockChoice, Vec<DevRow>)> {
    let f = &ctx.spec.facts;
    let base_run = ctx
        .spec
        .runs
        .iter()
        .find(|r| r.name == f.baseline)
        .ok_or_else(|| Error::invalid("facts.baseline", "not a run"))?;
    let mut rows: Vec<DevRow> = Vec::new();
    for c in choices {
        say(&format!(
            "development seed {}: {} ({})",
            f.dev_seed, base_run.name, c.name
        ));
        let m = ctx.measure(base_run, c, f.dev_seed)?;
        let inserted: Vec<&FactRow> = m.facts.iter().filter(|x| x.count > 0).collect();
        let n = inserted.len().max(1) as f64;
        rows.push(DevRow {
            choice: c.name.clone(),
            train: scope_name(c.train).into(),
            last_k: c.last_k,
            acquired: inserted.iter().filter(|x| x.acquired).count() as f64 / n,
            gain: inserted.iter().filter_map(|x| x.gain).sum::<f64>() / n,
            params: m.params,
            chosen: false,
        });
    }
    let best = (0..rows.len()).fold(0, |b, i| {
        if rows[i].acquired > rows[b].acquired {
            i
        } else {
            b
        }
    });
    rows[best].chosen = true;
    Ok((choices[best].clone(), rows))
}

/// What measuring a run needs.
struct Ctx<'a> {
    spec: &'a FactsStudySpec,
    shared: &'a Shared,
    device: Device,
    stop: &'a AtomicBool,
    progress: &'a dyn Progress,
    train_progress: &'a dyn train::Progress,
}

/// What a run's stored measurements were made under: its training manifest and the settings of
/// the measurements (reused on a rerun only when both are unchanged).
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    manifest: String,
    settings: String,
    /// The measurements; floats as bits so that a rerun writes the same bytes.
    measures: String,
}

impl Ctx<'_> {
    fn settings(&self) -> String {
        let f = &self.spec.facts;
        format!(
            "foresight={} projection={} eval_samples={} trunk_cache={} probes={}",
            f.foresight,
            f.projection,
            f.eval_samples,
            f.trunk_cache,
            self.shared.set.probes.len()
        )
    }

    /// Train (or reuse) one run and measure it (or reuse its stored measurements).
    fn measure(&self, r: &StudyRun, choice: &BlockChoice, seed: u64) -> Result<RunMeasures> {
        let sh = self.shared;
        let ts = self.spec.run_spec(r, choice, &sh.base, sh.steps);
        let sd = self
            .spec
            .facts
            .out
            .join(format!("seed-{seed}"))
            .join(&choice.name);
        let trained = super::train_to_end(
            &ts,
            &sh.data,
            &sd.join("train"),
            self.device,
            seed,
            self.stop,
            self.train_progress,
        )?;
        let mp = trained.dir.join("manifest.json");
        let manifest = std::fs::read_to_string(&mp).map_err(|e| Error::io(&mp, e))?;
        let eval_dir = sd.join("eval").join(&r.name);
        let stored_path = eval_dir.join("measures.json");
        let stored: Option<Stored> = std::fs::read(&stored_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|s: &Stored| s.manifest == manifest && s.settings == self.settings());
        if let Some(m) = stored.and_then(|s| decode(&s.measures)) {
            return Ok(m);
        }
        let m = self.measure_afresh(r, choice, seed, &trained, &sd)?;
        let s = Stored {
            manifest,
            settings: self.settings(),
            measures: encode(&m)?,
        };
        let json = serde_json::to_vec(&s).map_err(|e| Error::invalid("measures", e.to_string()))?;
        crate::io::write_atomic(&stored_path, &json)?;
        Ok(m)
    }

    fn measure_afresh(
        &self,
        r: &StudyRun,
        choice: &BlockChoice,
        seed: u64,
        trained: &train::RunResult,
        sd: &Path,
    ) -> Result<RunMeasures> {
        let sh = self.shared;
        let final_dir = trained.dir.join("final");
        let (_vs, model) = crate::source::load_model(&final_dir, self.device)?;
        let trunk = sh.trunk(choice, &model.cfg);
        let after = probes::score(&model, trunk.as_ref(), &sh.enc, self.device)?;
        let before = sh.before.get(&choice.name).map(Vec::as_slice);
        let e: FactEval = probes::judge(&sh.set, &after, before);
        e.write(&sd.join("eval").join(&r.name))?;
        let val_all = |step: u64| {
            trained
                .state
                .val
                .iter()
                .find(|v| v.step == step && v.group == "all")
                .map_or(f64::NAN, |v| v.ppl)
        };
        let mut m = RunMeasures {
            facts: e.facts,
            ppl: (val_all(0), val_all(trained.state.step)),
            params: trained.params,
            ..RunMeasures::default()
        };
        if !matches!(r.experts, ExpertConfig::Dense) {
            m.routes = self.routes(&model, trunk.as_ref(), seed, &r.name)?;
        }
        drop(model);
        if self.spec.facts.foresight {
            let q = quarter(sh.steps);
            let spec = foresight::ForesightSpec {
                model: trained.dir.join("checkpoints").join(format!("step-{q:06}")),
                corpus: sh.analysis_corpus.clone(),
                dir: sd.join("foresight").join(&r.name),
                projection: self.spec.facts.projection,
                memory_gb: self.spec.facts.foresight_memory,
                resamples: 200,
                seed,
            };
            let pool = foresight::analyse(&spec, self.device, self.progress)?;
            m.truth = foresight::truth_table(&pool, &m.facts, self.device, seed)?;
            m.quality = foresight::quality(&m.truth, seed)?;
        }
        Ok(m)
    }

    /// The expert of every routed block that each fact text (a fact's first training sentence)
    /// and each held-out host text goes to, counted per expert.
    fn routes(
        &self,
        model: &Model,
        trunk: Option<&Trunk>,
        seed: u64,
        run: &str,
    ) -> Result<Vec<Route>> {
        let d = &self.shared.data;
        let fact_rows: Vec<usize> = (0..d.corpus.len())
            .filter(|&i| {
                let s = &d.corpus.samples[i];
                s.fact
                    .as_ref()
                    .is_some_and(|f| s.id == format!("{}#1", f.id))
            })
            .collect();
        let host = d.val_subset(self.spec.facts.eval_samples);
        let idx: Vec<usize> = fact_rows.iter().chain(&host).copied().collect();
        let routed = route_texts(model, trunk, &d.seqs(&idx), self.device)?;
        let mut counts: BTreeMap<(i64, i64), (usize, usize)> = BTreeMap::new();
        for (block, experts) in routed {
            for (j, e) in experts.into_iter().enumerate() {
                let c = counts.entry((block, e)).or_default();
                if j < fact_rows.len() {
                    c.0 += 1;
                } else {
                    c.1 += 1;
                }
            }
        }
        Ok(counts
            .into_iter()
            .map(|((block, expert), (facts, host))| Route {
                seed,
                run: run.to_string(),
                block,
                expert,
                facts,
                host,
            })
            .collect())
    }
}

/// Each routed block's expert of every text: (block, expert per text).
fn route_texts(
    model: &Model,
    trunk: Option<&Trunk>,
    seqs: &[&[u32]],
    device: Device,
) -> Result<Vec<(i64, Vec<i64>)>> {
    let order = crate::eval::batch_order(model, seqs);
    let f = crate::model::Forward {
        head: false,
        ..crate::eval::INFERENCE
    };
    let mut by: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    tch::no_grad(|| -> Result<()> {
        for idx in order.chunks(64) {
            let chunk: Vec<&[u32]> = idx.iter().map(|&i| seqs[i]).collect();
            let mut rng = crate::batch::step_rng(0, 0);
            let b = crate::batch::model_batch(model, &chunk, &mut rng, device);
            let (_, out) = match trunk {
                Some(t) => t.final_hidden(model, &b.ids, &b.mask, &f)?,
                None => {
                    let x = model.hidden_before(&b.ids, &b.mask, 0, true)?;
                    model.final_hidden(0, x, &b.mask, &f)?
                }
            };
            for (block, r) in out.routes {
                let v: Vec<i64> = Vec::try_from(r.to_device(Device::Cpu))?;
                let slot = by.entry(block).or_insert_with(|| vec![0; seqs.len()]);
                for (&i, e) in idx.iter().zip(v) {
                    slot[i] = e;
                }
            }
        }
        Ok(())
    })?;
    Ok(by.into_iter().collect())
}

/// Measurements as JSON with every float as its bits (JSON's decimals need not read back to
/// the same float), so a rerun writes the same table bytes.
fn encode(m: &RunMeasures) -> Result<String> {
    let v = serde_json::to_value(m).map_err(|e| Error::invalid("measures", e.to_string()))?;
    Ok(bits(v, true).to_string())
}

fn decode(s: &str) -> Option<RunMeasures> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    serde_json::from_value(bits(v, false)).ok()
}

/// Floats to `{"f64": bits}` objects (`to` true) or back.
fn bits(v: serde_json::Value, to: bool) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Value::Number(n) if to && n.is_f64() => {
            serde_json::json!({ "f64": n.as_f64().unwrap_or(f64::NAN).to_bits() })
        }
        Value::Object(m) if !to && m.len() == 1 && m.contains_key("f64") => {
            let b = m["f64"].as_u64().unwrap_or(0);
            serde_json::Number::from_f64(f64::from_bits(b)).map_or(Value::Null, Value::Number)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(|x| bits(x, to)).collect()),
        Value::Object(m) => Value::Object(m.into_iter().map(|(k, x)| (k, bits(x, to))).collect()),
        other => other,
    }
}

/// The study's tables from every run's measurements.
fn assemble(
    spec: &FactsStudySpec,
    shared: &Shared,
    runs: Vec<String>,
    choice: BlockChoice,
    development: Vec<DevRow>,
    measured: Vec<(u64, String, RunMeasures)>,
) -> FactsStudy {
    let f = &spec.facts;
    let before = shared.before.get(&choice.name);
    let chance = before.and_then(|b| probes::judge(&shared.set, b, Some(b)).chance);
    let mut s = FactsStudy {
        runs,
        baseline: f.baseline.clone(),
        choice,
        development,
        chance,
        outcomes: Vec::new(),
        curves: Vec::new(),
        vs_baseline: Vec::new(),
        half: Vec::new(),
        forgetting: Vec::new(),
        routes: Vec::new(),
        quality: Vec::new(),
        truth: Vec::new(),
        sizes: sizes(spec, shared),
    };
    let base_ppl: BTreeMap<u64, f64> = measured
        .iter()
        .filter(|(_, r, _)| *r == f.baseline)
        .map(|(seed, _, m)| (*seed, m.ppl.0))
        .collect();
    for (seed, run, m) in measured {
        s.sizes.params.insert(run.clone(), m.params);
        s.outcomes.extend(m.facts.into_iter().map(|fact| Outcome {
            seed,
            run: run.clone(),
            fact,
        }));
        s.forgetting.push(Forgetting {
            seed,
            run: run.clone(),
            before: base_ppl.get(&seed).copied().unwrap_or(f64::NAN),
            after: m.ppl.1,
        });
        s.routes.extend(m.routes);
        s.quality
            .extend(m.quality.into_iter().map(|q| (seed, run.clone(), q)));
        s.truth
            .extend(m.truth.into_iter().map(|t| (seed, run.clone(), t)));
    }
    let seed = f.seeds[0];
    (s.curves, s.vs_baseline, s.half) =
        summary::curves(&s.outcomes, &s.runs, &s.baseline, f.resamples, seed);
    s
}

fn sizes(spec: &FactsStudySpec, shared: &Shared) -> Sizes {
    let d = &shared.data;
    let fact_rows = d
        .train
        .iter()
        .filter(|&&i| d.corpus.samples[i].fact.is_some())
        .count();
    let f = &spec.facts;
    let max_len = spec.base.max_len.unwrap_or(i64::MAX).max(1) as usize;
    Sizes {
        host_train: d.train.len() - fact_rows,
        fact_rows,
        facts: f.counts.len() * f.facts_per_count,
        controls: f.controls,
        steps: shared.steps,
        epochs: f.epochs,
        batch: spec.train.batch_size,
        tokens: d
            .train
            .iter()
            .map(|&i| d.ids[i].len().min(max_len) as u64)
            .sum(),
        ..Sizes::default()
    }
}

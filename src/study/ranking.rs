//! Does the neglect score find what is learnable but not yet learned? (`tailscope study` with a
//! `[ranking]` spec: `analyses/ranking-study.toml`, and its real-text twin
//! `analyses/ranking-study-brown.toml`.)
//!
//! For every rare share and seed (a *pool*): a synthetic corpus with contrasts (`corpus synth
//! --contrasts`: rare domains a model neglects, a rare glossary it learns, and chatter it cannot
//! learn) and a base model trained on it with checkpoints — or, for a real corpus, the given
//! model and a seeded draw of validation texts; a reference model trained on held-out text (the
//! validation split less the pool) for the reducible loss; the NTK and the analysis of the pool
//! ([`crate::analysis::analyze`]: every statistic of neglect); and the counterfactual truth
//! ([`super::counterfactual`]). Then:
//!
//! 1. logistic neglect models are fitted on the **development** pools only (`fit_seeds`),
//!    on four feature sets ([`metrics::feature_sets`]): with and without the kernel's
//!    statistics, with and without the optional ones; the choice between the two sets every
//!    analysis has (`fit:default`, `fit:default-no-kernel`) is made by leave-one-pool-out
//!    cross-validated AP on the development pools, and is frozen as `flag` (`fitted-model.toml`);
//!    a spec with `frozen_model` scores that model as `flag` instead;
//! 2. every criterion of [`crate::analysis::select`], every fitted model, `flag` and the control
//!    `flag:kernel-permuted` (the `fit:default` model with the kernel statistics' rows permuted
//!    among the samples) is scored on every pool against each truth: tie-aware AP, AUROC,
//!    precision at the number of positives, AP within uncertainty-matched bins, and Spearman's ρ
//!    with the counterfactual gain;
//! 3. the summary uses the **held-out** seeds only: per seed the mean over shares, then the mean
//!    over seeds with a 95% t interval on the logit scale (inside [0, 1]); `flag` against every
//!    other criterion paired by seed, with the share of the remaining error removed,
//!    (AP_flag − AP_other) / (1 − AP_other).
//!
//! Outputs under `out`: per pool `share-S/seed-N/` (or `seed-N/`) with `corpus.parquet`, `base`,
//! `reference`, `ntk`, `analysis`, `counterfactual`; `ranking.parquet` (every pool × truth ×
//! criterion), `summary.parquet`, `comparisons.parquet`, `models.toml` (every fitted model with
//! its cross-validated AP), `fitted-model.toml` and `ranking.md`.

pub mod metrics;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use polars::prelude::{Column, DataFrame};
use serde::Deserialize;
use tch::Device;

use super::counterfactual::{self, CounterfactualOptions};
use super::{bounded_interval, Interval};
use crate::analysis::learnability::LearnabilityOptions;
use crate::analysis::neglect::{Feature, FeatureTable, NeglectModel};
use crate::analysis::select::{self, Criterion, Pool, Sources};
use crate::corpus::{Corpus, Split, SplitChoice};
use crate::error::{Error, Result};
use crate::model::ExpertConfig;
use crate::progress::Progress;
use crate::train::spec::{DataSpec, ModelSpec};
use crate::train::{self, RunSpec, TrainData, TrainOptions, TrainSpec};
use metrics::{Metrics, PoolData};

/// A ranking study spec: `[ranking]`, `[model]` and `[train]` (synthetic pools), optional
/// `[counterfactual]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankingSpec {
    /// `[ranking]`.
    pub ranking: RankingSettings,
    /// `[model]`: the base model's shape (synthetic pools).
    #[serde(default)]
    pub model: Option<ModelSpec>,
    /// `[train]`: its training, and the reference model's (synthetic pools).
    #[serde(default)]
    pub train: Option<TrainOptions>,
    /// `[counterfactual]`: the continued runs of the counterfactual truth.
    #[serde(default)]
    pub counterfactual: CounterfactualOptions,
}

/// `[ranking]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankingSettings {
    /// Seeds (corpus, models and pool per seed).
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Development seeds: models are fitted on them; the summary leaves them out.
    #[serde(default = "default_fit_seeds")]
    pub fit_seeds: Vec<u64>,
    /// Shares of the rare domains (synthetic pools).
    #[serde(default = "default_shares")]
    pub rare_shares: Vec<f64>,
    /// Sentences per synthetic corpus.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Tokenizer vocabulary of the synthetic corpora.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// A real corpus instead of synthetic ones (with `base_model`).
    #[serde(default)]
    pub corpus: Option<PathBuf>,
    /// The model analysed on a real corpus.
    #[serde(default)]
    pub base_model: Option<PathBuf>,
    /// Validation sentences analysed and ranked per pool.
    #[serde(default = "default_pool")]
    pub pool: usize,
    /// Validation sentences of the training runs' perplexity.
    #[serde(default = "default_eval")]
    pub eval_samples: usize,
    /// Training texts of the learnability statistics (0: none).
    #[serde(default = "default_train_samples")]
    pub train_samples: usize,
    /// Train a reference model on held-out text for the reducible loss (synthetic pools).
    #[serde(default = "yes")]
    pub reference: bool,
    /// Trajectory statistics over the base model's checkpoints (synthetic pools).
    #[serde(default = "yes")]
    pub checkpoints: bool,
    /// Measure the counterfactual truth.
    #[serde(default = "yes")]
    pub counterfactual: bool,
    /// The truth the models are fitted on: `synthetic` or `counterfactual`.
    #[serde(default = "default_fit_truth")]
    pub fit_truth: String,
    /// Score this neglect model as `flag` instead of the one chosen here.
    #[serde(default)]
    pub frozen_model: Option<PathBuf>,
    /// The single criteria ranked.
    #[serde(default = "default_criteria")]
    pub criteria: Vec<Criterion>,
    /// Output folder.
    pub out: PathBuf,
}

fn default_seeds() -> Vec<u64> {
    vec![1, 2, 3, 4, 5]
}
fn default_fit_seeds() -> Vec<u64> {
    vec![1, 2]
}
fn default_shares() -> Vec<f64> {
    vec![0.02, 0.06, 0.12]
}
fn default_samples() -> usize {
    20_000
}
fn default_vocab() -> usize {
    2048
}
fn default_pool() -> usize {
    512
}
fn default_eval() -> usize {
    500
}
fn default_train_samples() -> usize {
    2048
}
fn yes() -> bool {
    true
}
fn default_fit_truth() -> String {
    "synthetic".into()
}
fn default_criteria() -> Vec<Criterion> {
    Criterion::ALL
        .iter()
        .copied()
        .filter(|c| *c != Criterion::Flag)
        .collect()
}

impl RankingSpec {
    /// Read and check a spec.
    pub fn read(path: &Path) -> Result<RankingSpec> {
        let s: RankingSpec = crate::io::read_toml(path)?;
        s.check().map_err(|e| Error::in_file(path, e.to_string()))?;
        Ok(s)
    }

    /// Whether the pools are real text (a corpus and a model given) rather than synthetic.
    pub fn real(&self) -> bool {
        self.ranking.corpus.is_some()
    }

    /// Check the settings.
    pub fn check(&self) -> Result<()> {
        let r = &self.ranking;
        let held = r.seeds.iter().filter(|s| !r.fit_seeds.contains(s)).count();
        if held < 2 {
            return Err(Error::invalid(
                "ranking.seeds",
                "give at least 2 seeds outside fit_seeds (the summary's intervals come from them)",
            ));
        }
        if r.fit_seeds.len() < 2 && r.frozen_model.is_none() {
            return Err(Error::invalid(
                "ranking.fit_seeds",
                "give at least 2 development seeds (the model choice cross-validates over them)",
            ));
        }
        if !matches!(r.fit_truth.as_str(), "synthetic" | "counterfactual") {
            return Err(Error::invalid(
                "ranking.fit_truth",
                format!(
                    "is {:?}; give \"synthetic\" or \"counterfactual\"",
                    r.fit_truth
                ),
            ));
        }
        if r.criteria.contains(&Criterion::Flag) {
            return Err(Error::invalid(
                "ranking.criteria",
                "leave out flag: the study scores its own fitted (or frozen) model as flag",
            ));
        }
        if self.real() {
            if r.base_model.is_none() {
                return Err(Error::invalid(
                    "ranking.base_model",
                    "a real corpus needs the model to analyse",
                ));
            }
            if !r.counterfactual || r.fit_truth != "counterfactual" {
                return Err(Error::invalid(
                    "ranking.fit_truth",
                    "a real corpus has only the counterfactual truth: set counterfactual = true \
                     and fit_truth = \"counterfactual\"",
                ));
            }
        } else {
            if r.rare_shares.is_empty() || r.rare_shares.iter().any(|&s| !(s > 0.0 && s < 0.5)) {
                return Err(Error::invalid(
                    "ranking.rare_shares",
                    "give shares in (0, 0.5)",
                ));
            }
            self.base_spec(Path::new("corpus.parquet"), "base")?
                .check()?;
        }
        self.counterfactual.check()
    }

    /// The training spec of the synthetic base (or reference) model on `corpus`.
    fn base_spec(&self, corpus: &Path, name: &str) -> Result<TrainSpec> {
        let (Some(model), Some(train)) = (&self.model, &self.train) else {
            return Err(Error::invalid(
                "[model]",
                "synthetic pools need [model] and [train] (or give ranking.corpus and base_model)",
            ));
        };
        Ok(TrainSpec {
            data: DataSpec {
                corpus: corpus.to_path_buf(),
                tokenizer: None,
                eval_samples: self.ranking.eval_samples,
            },
            model: Some(model.clone()),
            base: None,
            train: train.clone(),
            selection: None,
            runs: vec![RunSpec {
                name: name.into(),
                experts: ExpertConfig::Dense,
            }],
        })
    }

    /// The pools, in order: (share, seed).
    fn pools(&self) -> Vec<(f64, u64)> {
        let shares = if self.real() {
            vec![0.0]
        } else {
            self.ranking.rare_shares.clone()
        };
        shares
            .iter()
            .flat_map(|&sh| self.ranking.seeds.iter().map(move |&s| (sh, s)))
            .collect()
    }

    fn pool_dir(&self, share: f64, seed: u64) -> PathBuf {
        let out = &self.ranking.out;
        if self.real() {
            out.join(format!("seed-{seed}"))
        } else {
            out.join(format!("share-{share}"))
                .join(format!("seed-{seed}"))
        }
    }
}

/// One ranking's quality on one pool against one truth.
#[derive(Debug, Clone, PartialEq)]
pub struct RankRow {
    /// Rare share (0 for a real corpus).
    pub share: f64,
    /// Seed.
    pub seed: u64,
    /// The truth: `synthetic` or `counterfactual`.
    pub truth: String,
    /// Criterion or model.
    pub criterion: String,
    /// The metrics.
    pub m: Metrics,
    /// Positives in the pool.
    pub positives: usize,
    /// Pool size.
    pub n: usize,
    /// Whether the seed is held out.
    pub held_out: bool,
}

/// A criterion's mean quality over the held-out seeds (one share, or all: `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct RankSummary {
    /// The truth.
    pub truth: String,
    /// Criterion.
    pub criterion: String,
    /// The share, or `None` for all shares (per seed, the mean over shares).
    pub share: Option<f64>,
    /// AP.
    pub ap: Interval,
    /// AUROC.
    pub auroc: Interval,
    /// Precision at the number of positives.
    pub p_at_pos: Interval,
    /// Uncertainty-matched AP.
    pub matched_ap: Interval,
    /// Spearman's ρ with the counterfactual gain.
    pub spearman_gain: Interval,
}

/// `flag` − another criterion, paired by seed (shares averaged per seed).
#[derive(Debug, Clone, PartialEq)]
pub struct RankComparison {
    /// The truth.
    pub truth: String,
    /// The other criterion.
    pub other: String,
    /// The share, or `None` for all shares.
    pub share: Option<f64>,
    /// AP(flag) − AP(other).
    pub ap: Interval,
    /// AUROC(flag) − AUROC(other).
    pub auroc: Interval,
    /// Uncertainty-matched AP(flag) − that of the other.
    pub matched_ap: Interval,
    /// ρ(flag, gain) − ρ(other, gain): agreement with the continuous counterfactual gain.
    pub spearman_gain: Interval,
    /// (AP_flag − AP_other) / (1 − AP_other), of the held-out means.
    pub error_removed: f64,
}

/// A finished ranking study.
#[derive(Debug, Clone)]
pub struct RankingStudy {
    /// Every ranking.
    pub rows: Vec<RankRow>,
    /// Held-out means.
    pub summary: Vec<RankSummary>,
    /// `flag` against the others.
    pub comparisons: Vec<RankComparison>,
    /// The model scored as `flag`.
    pub flag_model: NeglectModel,
    /// Every fitted model with its cross-validated development AP.
    pub fitted: Vec<(String, NeglectModel, f64)>,
}

/// What a pool's preparation needs besides the spec.
struct Ctx<'a> {
    device: Device,
    stop: &'a AtomicBool,
    progress: &'a dyn Progress,
    train_progress: &'a dyn train::Progress,
}

/// Run the study (reusing finished models, analyses and truths) and write its tables.
pub fn run(
    spec: &RankingSpec,
    device: Device,
    stop: &AtomicBool,
    progress: &dyn Progress,
    train_progress: &dyn train::Progress,
    mut say: impl FnMut(&str),
) -> Result<RankingStudy> {
    let ctx = Ctx {
        device,
        stop,
        progress,
        train_progress,
    };
    let mut pools = Vec::new();
    for (share, seed) in spec.pools() {
        say(&format!("pool: rare share {share}, seed {seed}"));
        pools.push(prepare(spec, share, seed, &ctx)?);
    }
    let study = evaluate(spec, &pools)?;
    write(&study, &spec.ranking.out)?;
    Ok(study)
}

/// One pool: corpus, models, analysis, truths and the single criteria's scores.
fn prepare(spec: &RankingSpec, share: f64, seed: u64, ctx: &Ctx) -> Result<PoolData> {
    let r = &spec.ranking;
    let dir = spec.pool_dir(share, seed);
    let (corpus, model) = match (&r.corpus, &r.base_model) {
        (Some(c), Some(m)) => (c.clone(), m.clone()),
        _ => {
            let corpus = dir.join("corpus.parquet");
            synth_corpus(spec, share, seed, &corpus, ctx)?;
            let data = TrainData::load(&corpus, None)?;
            let base = spec.base_spec(&corpus, "base")?;
            let t = ctx;
            super::train_to_end(&base, &data, &dir, t.device, seed, t.stop, t.train_progress)?;
            (corpus, dir.join("base").join("final"))
        }
    };
    let c = Corpus::read(&corpus)?;
    let sample_seed = if spec.real() { seed } else { 0 };
    let pool_idx = c.pick_seeded(SplitChoice::Validation, r.pool, sample_seed);
    let pool_ids: Vec<String> = pool_idx.iter().map(|&i| c.samples[i].id.clone()).collect();
    let reference = if r.reference && !spec.real() {
        Some(reference_model(
            spec, &c, &corpus, &pool_idx, &dir, seed, ctx,
        )?)
    } else {
        None
    };
    let checkpoints = (r.checkpoints && !spec.real()).then(|| dir.join("base"));
    let an_dir = dir.join("analysis");
    if !an_dir.join("summary.json").exists() {
        super::analyse_pool(
            &model,
            &corpus,
            SplitChoice::Validation,
            r.pool,
            sample_seed,
            200,
            seed,
            &dir,
            ctx.device,
            ctx.progress,
            &|a| {
                a.learnability = (r.train_samples > 0).then(|| LearnabilityOptions {
                    train_samples: r.train_samples,
                    sample_seed: seed,
                    ..LearnabilityOptions::default()
                });
                a.reference = reference.clone();
                a.checkpoints = checkpoints.clone();
            },
        )?;
    }
    let pool = Pool::read(&an_dir)?;
    if pool.ids != pool_ids {
        return Err(Error::in_file(
            an_dir.join("analysis.parquet"),
            "holds other samples than the pool; remove the folder to redo it",
        ));
    }
    let truth_rows = if r.counterfactual {
        Some(counterfactual_truth(
            spec, &model, &corpus, &pool_ids, &dir, seed, ctx,
        )?)
    } else {
        None
    };
    pool_data(spec, share, seed, &c, &pool, truth_rows, ctx)
}

/// `corpus synth --contrasts` of the pool's share and seed, unless present.
fn synth_corpus(spec: &RankingSpec, share: f64, seed: u64, corpus: &Path, ctx: &Ctx) -> Result<()> {
    if corpus.exists() {
        return Ok(());
    }
    crate::corpus::synth::write_corpus(
        &crate::corpus::synth::SynthOptions {
            samples: spec.ranking.samples,
            rare_share: share,
            seed,
            contrasts: true,
            ..Default::default()
        },
        spec.ranking.vocab_size,
        corpus,
        ctx.progress,
    )
}

/// A reference model of the base model's shape and training, trained on held-out text: the
/// validation split less the pool (so it never sees a pool sample), as RHO-LOSS's irreducible
/// loss model is trained on a holdout set.
fn reference_model(
    spec: &RankingSpec,
    c: &Corpus,
    corpus: &Path,
    pool_idx: &[usize],
    dir: &Path,
    seed: u64,
    ctx: &Ctx,
) -> Result<PathBuf> {
    let rdir = dir.join("reference-data");
    let rcorpus = rdir.join("corpus.parquet");
    if !rcorpus.exists() {
        let in_pool: std::collections::HashSet<usize> = pool_idx.iter().copied().collect();
        let mut held = Corpus {
            samples: c
                .samples
                .iter()
                .enumerate()
                .filter(|(i, s)| s.split == Split::Validation && !in_pool.contains(i))
                .map(|(_, s)| s.clone())
                .collect(),
        };
        // A tenth of them stays validation (the run's perplexity), the rest is its training set.
        for (k, s) in held.samples.iter_mut().enumerate() {
            s.split = if k % 10 == 0 {
                Split::Validation
            } else {
                Split::Train
            };
        }
        std::fs::create_dir_all(&rdir).map_err(|e| Error::io(&rdir, e))?;
        let tok = crate::corpus::tokenizer::default_path(corpus);
        let to = rdir.join("tokenizer.json");
        std::fs::copy(&tok, &to).map_err(|e| Error::io(&tok, e))?;
        held.write(&rcorpus)?;
    }
    let data = TrainData::load(&rcorpus, None)?;
    let rspec = spec.base_spec(&rcorpus, "reference")?;
    super::train_to_end(
        &rspec,
        &data,
        dir,
        ctx.device,
        seed,
        ctx.stop,
        ctx.train_progress,
    )?;
    Ok(dir.join("reference").join("final"))
}

/// The pool's counterfactual truth, measured once and kept in `counterfactual/truth.parquet`.
fn counterfactual_truth(
    spec: &RankingSpec,
    model: &Path,
    corpus: &Path,
    pool_ids: &[String],
    dir: &Path,
    seed: u64,
    ctx: &Ctx,
) -> Result<Vec<counterfactual::TruthRow>> {
    let cdir = dir.join("counterfactual");
    let path = counterfactual::truth_path(&cdir);
    if path.exists() {
        // The binary truth follows the spec's threshold, not the one it was written under.
        let mut rows = counterfactual::read(&path)?;
        // A truth written for another pool (another `pool` size or seed) is never zipped with
        // this one's scores.
        if rows.len() != pool_ids.len() || rows.iter().zip(pool_ids).any(|(r, id)| &r.id != id) {
            return Err(Error::in_file(
                &path,
                "holds the counterfactual truth of another pool (its ids differ from the \
                 analysed samples'); delete the folder to recompute it",
            ));
        }
        let gain: Vec<f64> = rows.iter().map(|r| r.gain).collect();
        let now: Vec<f64> = rows.iter().map(|r| r.loss_now).collect();
        let t =
            counterfactual::neglected_by_gain(&gain, &now, spec.counterfactual.min_relative_gain);
        for (r, n) in rows.iter_mut().zip(t) {
            r.neglected = n;
        }
        return Ok(rows);
    }
    // On a real corpus the model and the runs do not depend on the pool: one set of continued
    // runs (trained with the first seed) serves every pool.
    let (runs, run_seed) = if spec.real() {
        let first = spec.ranking.seeds.first().copied().unwrap_or(seed);
        (spec.ranking.out.join("counterfactual-runs"), first)
    } else {
        (cdir.clone(), seed)
    };
    let rows = counterfactual::measure(
        model,
        corpus,
        None,
        pool_ids,
        &spec.counterfactual,
        &runs,
        ctx.device,
        run_seed,
        ctx.stop,
        ctx.train_progress,
    )?;
    crate::io::write_parquet(&mut counterfactual::frame(&rows)?, &path)?;
    Ok(rows)
}

/// The pool's statistics (from its analysis), truths and single-criterion scores.
fn pool_data(
    spec: &RankingSpec,
    share: f64,
    seed: u64,
    c: &Corpus,
    pool: &Pool,
    truth_rows: Option<Vec<counterfactual::TruthRow>>,
    ctx: &Ctx,
) -> Result<PoolData> {
    let features: FeatureTable = Feature::ALL
        .iter()
        .filter_map(|&f| pool.columns.get(f.name()).map(|v| (f, v.clone())))
        .collect();
    let uncertainty = pool.column("uncertainty", Criterion::Uncertainty)?.to_vec();
    let mut truths = Vec::new();
    if !spec.real() {
        let by_id: HashMap<&str, bool> = c
            .samples
            .iter()
            .filter_map(|s| s.neglected.map(|t| (s.id.as_str(), t)))
            .collect();
        let t = pool
            .ids
            .iter()
            .map(|id| {
                by_id.get(id.as_str()).copied().ok_or_else(|| {
                    Error::invalid("ranking", format!("sample {id:?} has no `neglected` truth"))
                })
            })
            .collect::<Result<Vec<bool>>>()?;
        truths.push(("synthetic".to_string(), t));
    }
    let gain = match truth_rows {
        Some(rows) => {
            truths.push((
                "counterfactual".to_string(),
                rows.iter().map(|r| r.neglected).collect(),
            ));
            Some(rows.iter().map(|r| r.gain).collect())
        }
        None => None,
    };
    let mut criteria = Vec::new();
    for &crit in &spec.ranking.criteria {
        let missing = crit
            .column()
            .is_some_and(|(name, _)| !pool.columns.contains_key(name));
        if missing {
            continue;
        }
        let s = select::scores(pool, crit, &Sources::default(), ctx.device, seed)?;
        // The rarity rule ranks its flagged samples first: a score above every unflagged one.
        let top = s
            .iter()
            .map(|x| x.0)
            .filter(|x| x.is_finite())
            .fold(0.0, f64::max);
        let v = s
            .iter()
            .map(|&(x, f)| if f { x + top.abs() + 1e3 } else { x })
            .collect();
        criteria.push((crit.name().to_string(), v));
    }
    Ok(PoolData {
        share,
        seed,
        held_out: !spec.ranking.fit_seeds.contains(&seed),
        features,
        uncertainty,
        truths,
        gain,
        criteria,
    })
}

/// Fit, choose, score and summarise (module docs, steps 1–3).
pub fn evaluate(spec: &RankingSpec, pools: &[PoolData]) -> Result<RankingStudy> {
    let r = &spec.ranking;
    let dev: Vec<&PoolData> = pools.iter().filter(|p| !p.held_out).collect();
    let mut fitted = Vec::new();
    for set in metrics::feature_sets(pools) {
        if set.features.is_empty() || dev.is_empty() {
            continue;
        }
        let cv = metrics::cross_validated_ap(&dev, &r.fit_truth, &set.features)?;
        let mut m = metrics::fit(&dev, &r.fit_truth, &set.features)?;
        m.provenance = format!(
            "{}: logistic regression (L2 {}) on rank-Gaussian features, fitted to the {} truth of \
             the development pools (seeds {:?}) of {}; leave-one-pool-out AP {cv:.3}",
            set.name,
            metrics::LAMBDA,
            r.fit_truth,
            r.fit_seeds,
            r.out.display()
        );
        fitted.push((set.name, m, cv));
    }
    let flag_model = match &r.frozen_model {
        Some(p) => NeglectModel::read(p)?,
        None => choose(&fitted)?,
    };
    let permuted_base = fitted
        .iter()
        .find(|(n, _, _)| n == "fit:default")
        .map(|x| x.1.clone());
    let mut rows = Vec::new();
    for p in pools {
        let mut cands: Vec<(String, Vec<f64>)> = p.criteria.clone();
        for (name, m, _) in &fitted {
            cands.push((name.clone(), metrics::probabilities(m, p)?));
        }
        cands.push(("flag".into(), metrics::probabilities(&flag_model, p)?));
        if let Some(m) = &permuted_base {
            let q = metrics::kernel_permuted(p, p.seed);
            cands.push((
                "flag:kernel-permuted".into(),
                metrics::probabilities(m, &q)?,
            ));
        }
        for (truth, t) in &p.truths {
            let positives = t.iter().filter(|&&x| x).count();
            if positives == 0 || positives == t.len() {
                tracing::warn!(
                    "seed {} share {}: the {truth} truth marks {positives} of {} samples; AP, \
                     AUROC and P@positives are undefined in this pool (ρ with the gain is kept)",
                    p.seed,
                    p.share,
                    t.len()
                );
            }
            for (name, scores) in &cands {
                rows.push(RankRow {
                    share: p.share,
                    seed: p.seed,
                    truth: truth.clone(),
                    criterion: name.clone(),
                    m: metrics::metrics(scores, t, p),
                    positives,
                    n: t.len(),
                    held_out: p.held_out,
                });
            }
        }
    }
    let shares: Vec<f64> = {
        let mut v: Vec<f64> = pools.iter().map(|p| p.share).collect();
        v.dedup();
        v
    };
    let (summary, comparisons) = summarise(&rows, &shares);
    Ok(RankingStudy {
        rows,
        summary,
        comparisons,
        flag_model,
        fitted,
    })
}

/// The default's choice: of the two feature sets every analysis has, the one with the higher
/// cross-validated development AP (the kernel's statistics stay only if they earn it).
fn choose(fitted: &[(String, NeglectModel, f64)]) -> Result<NeglectModel> {
    let pick = |n: &str| fitted.iter().find(|x| x.0 == n);
    let (a, b) = (pick("fit:default"), pick("fit:default-no-kernel"));
    let best = match (a, b) {
        (Some(a), Some(b)) => {
            if a.2 > b.2 {
                a
            } else {
                b
            }
        }
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => {
            return Err(Error::invalid(
                "ranking.fit_seeds",
                "no model could be fitted (no development pools)",
            ))
        }
    };
    let mut m = best.1.clone();
    m.provenance = format!(
        "chosen as the default: {} (the other set's leave-one-pool-out AP: {:.3})",
        best.1.provenance,
        if best.0 == "fit:default" { b } else { a }.map_or(f64::NAN, |x| x.2)
    );
    Ok(m)
}

/// Per held-out seed, the value of `f` for `crit` under `truth` in `scope` (a share, or the
/// mean over shares). Undefined values (a pool without positives) are left out; a seed with
/// none defined is absent.
fn per_seed(
    rows: &[RankRow],
    truth: &str,
    crit: &str,
    scope: Option<f64>,
    f: fn(&Metrics) -> f64,
) -> Vec<(u64, f64)> {
    let mut by: std::collections::BTreeMap<u64, Vec<f64>> = Default::default();
    for r in rows.iter().filter(|r| {
        r.held_out && r.truth == truth && r.criterion == crit && scope.is_none_or(|s| r.share == s)
    }) {
        let v = by.entry(r.seed).or_default();
        let x = f(&r.m);
        if x.is_finite() {
            v.push(x);
        }
    }
    by.into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(s, v)| (s, v.iter().sum::<f64>() / v.len() as f64))
        .collect()
}

/// Held-out summaries and `flag` comparisons, per truth and scope.
pub fn summarise(rows: &[RankRow], shares: &[f64]) -> (Vec<RankSummary>, Vec<RankComparison>) {
    let mut crits: Vec<String> = Vec::new();
    let mut truths: Vec<String> = Vec::new();
    for r in rows {
        if !crits.contains(&r.criterion) {
            crits.push(r.criterion.clone());
        }
        if !truths.contains(&r.truth) {
            truths.push(r.truth.clone());
        }
    }
    let mut scopes: Vec<Option<f64>> = shares.iter().map(|&s| Some(s)).collect();
    if shares.len() > 1 {
        scopes.push(None);
    } else {
        scopes = vec![None];
    }
    let vals = |v: Vec<(u64, f64)>| v.into_iter().map(|x| x.1).collect::<Vec<_>>();
    let (mut summary, mut comparisons) = (Vec::new(), Vec::new());
    for truth in &truths {
        for &scope in &scopes {
            for c in &crits {
                let get = |f: fn(&Metrics) -> f64| per_seed(rows, truth, c, scope, f);
                let ap = get(|m| m.ap);
                let rho = get(|m| m.spearman_gain);
                if ap.is_empty() && rho.is_empty() {
                    continue;
                }
                summary.push(RankSummary {
                    truth: truth.clone(),
                    criterion: c.clone(),
                    share: scope,
                    ap: bounded_interval(&vals(ap.clone()), 0.0, 1.0),
                    auroc: bounded_interval(&vals(get(|m| m.auroc)), 0.0, 1.0),
                    p_at_pos: bounded_interval(&vals(get(|m| m.p_at_pos)), 0.0, 1.0),
                    matched_ap: bounded_interval(&vals(get(|m| m.matched_ap)), 0.0, 1.0),
                    spearman_gain: bounded_interval(&vals(rho), -1.0, 1.0),
                });
                if c == "flag" {
                    continue;
                }
                let flag = |f: fn(&Metrics) -> f64| per_seed(rows, truth, "flag", scope, f);
                // Paired by seed (per_seed keeps finite values only); `w` bounds the difference:
                // 1 for a metric in [0, 1], 2 for a correlation.
                let diff = |f: fn(&Metrics) -> f64, w: f64| -> Interval {
                    let (a, b) = (flag(f), get(f));
                    let d: Vec<f64> = a
                        .iter()
                        .filter_map(|(s, x)| b.iter().find(|y| y.0 == *s).map(|y| x - y.1))
                        .collect();
                    bounded_interval(&d, -w, w)
                };
                let mean = |v: &[(u64, f64)]| v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64;
                let (fa, oa) = (mean(&flag(|m| m.ap)), mean(&ap));
                comparisons.push(RankComparison {
                    truth: truth.clone(),
                    other: c.clone(),
                    share: scope,
                    ap: diff(|m| m.ap, 1.0),
                    auroc: diff(|m| m.auroc, 1.0),
                    matched_ap: diff(|m| m.matched_ap, 1.0),
                    spearman_gain: diff(|m| m.spearman_gain, 2.0),
                    error_removed: (fa - oa) / (1.0 - oa),
                });
            }
        }
    }
    (summary, comparisons)
}

fn fmt(i: &Interval) -> String {
    if i.mean.is_nan() {
        return "–".into();
    }
    format!("{:.3} [{:.3}, {:.3}]", i.mean, i.low, i.high)
}

/// A correlation: signed.
fn fmt_rho(i: &Interval) -> String {
    fmt_diff(i)
}

fn fmt_diff(i: &Interval) -> String {
    if i.mean.is_nan() {
        return "–".into();
    }
    format!("{:+.3} [{:+.3}, {:+.3}]", i.mean, i.low, i.high)
}

impl RankingStudy {
    /// Per truth, the held-out summary (all shares) and `flag`'s differences, as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let mut truths: Vec<&str> = self.summary.iter().map(|r| r.truth.as_str()).collect();
        truths.dedup();
        for truth in truths {
            s.push_str(&format!(
                "\n**Truth: {truth}** (held-out seeds; means with 95% t intervals on the logit scale)\n\n"
            ));
            // Pools (held out) where this truth marks no sample, or every sample: AP is undefined.
            let pools: Vec<&RankRow> = self
                .rows
                .iter()
                .filter(|r| r.held_out && r.truth == truth && r.criterion == "flag")
                .collect();
            let degenerate: Vec<&&RankRow> = pools
                .iter()
                .filter(|r| r.positives == 0 || r.positives == r.n)
                .collect();
            if !degenerate.is_empty() {
                s.push_str(&format!(
                    "{} of {} held-out pools have {}: AP, AUROC and P@positives are undefined \
                     there and left out{}.\n\n",
                    degenerate.len(),
                    pools.len(),
                    if degenerate.iter().all(|r| r.positives == 0) {
                        "no positive (the truth's rule marks no sample)"
                    } else {
                        "only one class"
                    },
                    if degenerate.len() == pools.len() {
                        "; only ρ with the continuous gain is measured"
                    } else {
                        ""
                    }
                ));
            }
            s.push_str(
                "| criterion | AP | AUROC | P@positives | matched AP | ρ(gain) | AP(flag) − AP | \
                 ρ(flag) − ρ | error removed |\n\
                 |---|---|---|---|---|---|---|---|---|\n",
            );
            let mut rows: Vec<&RankSummary> = self
                .summary
                .iter()
                .filter(|r| r.share.is_none() && r.truth == truth)
                .collect();
            // By AP, then (where AP is undefined) by ρ with the gain.
            let key = |x: f64| if x.is_nan() { f64::NEG_INFINITY } else { x };
            rows.sort_by(|a, b| {
                key(b.ap.mean)
                    .total_cmp(&key(a.ap.mean))
                    .then(key(b.spearman_gain.mean).total_cmp(&key(a.spearman_gain.mean)))
            });
            for r in rows {
                let c = self
                    .comparisons
                    .iter()
                    .find(|c| c.share.is_none() && c.other == r.criterion && c.truth == truth);
                s.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    r.criterion,
                    fmt(&r.ap),
                    fmt(&r.auroc),
                    fmt(&r.p_at_pos),
                    fmt(&r.matched_ap),
                    fmt_rho(&r.spearman_gain),
                    c.map_or("–".into(), |c| fmt_diff(&c.ap)),
                    c.map_or("–".into(), |c| fmt_diff(&c.spearman_gain)),
                    c.filter(|c| c.error_removed.is_finite())
                        .map_or("–".into(), |c| format!("{:+.2}", c.error_removed)),
                ));
            }
        }
        s.push_str(&format!(
            "\n`flag` = {}\n\nweights: {}\n",
            self.flag_model.provenance,
            self.flag_model
                .features
                .iter()
                .zip(&self.flag_model.weights)
                .map(|(f, w)| format!("{} {w:+.3}", f.name()))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        s
    }
}

fn share_column(v: impl Iterator<Item = Option<f64>>) -> Column {
    Column::new(
        "share".into(),
        v.map(|s| s.map_or("all".to_string(), |x| format!("{x}")))
            .collect::<Vec<_>>(),
    )
}

/// Write the tables, the models and `ranking.md` into `out`.
pub fn write(s: &RankingStudy, out: &Path) -> Result<()> {
    let r = &s.rows;
    let m = |f: fn(&Metrics) -> f64| r.iter().map(|x| f(&x.m)).collect::<Vec<_>>();
    let mut rows = DataFrame::new(
        r.len(),
        vec![
            Column::new(
                "share".into(),
                r.iter().map(|x| x.share).collect::<Vec<_>>(),
            ),
            Column::new("seed".into(), r.iter().map(|x| x.seed).collect::<Vec<_>>()),
            Column::new(
                "truth".into(),
                r.iter().map(|x| x.truth.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "criterion".into(),
                r.iter().map(|x| x.criterion.as_str()).collect::<Vec<_>>(),
            ),
            Column::new("ap".into(), m(|x| x.ap)),
            Column::new("auroc".into(), m(|x| x.auroc)),
            Column::new("p_at_pos".into(), m(|x| x.p_at_pos)),
            Column::new("matched_ap".into(), m(|x| x.matched_ap)),
            Column::new("spearman_gain".into(), m(|x| x.spearman_gain)),
            Column::new(
                "positives".into(),
                r.iter().map(|x| x.positives as u64).collect::<Vec<_>>(),
            ),
            Column::new("n".into(), r.iter().map(|x| x.n as u64).collect::<Vec<_>>()),
            Column::new(
                "held_out".into(),
                r.iter().map(|x| x.held_out).collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("ranking", e))?;
    crate::io::write_parquet(&mut rows, out.join("ranking.parquet"))?;
    let sm = &s.summary;
    let mut cols = vec![
        Column::new(
            "truth".into(),
            sm.iter().map(|x| x.truth.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "criterion".into(),
            sm.iter().map(|x| x.criterion.as_str()).collect::<Vec<_>>(),
        ),
        share_column(sm.iter().map(|x| x.share)),
    ];
    for (name, f) in [
        (
            "ap",
            (|x: &RankSummary| &x.ap) as fn(&RankSummary) -> &Interval,
        ),
        ("auroc", |x| &x.auroc),
        ("p_at_pos", |x| &x.p_at_pos),
        ("matched_ap", |x| &x.matched_ap),
        ("spearman_gain", |x| &x.spearman_gain),
    ] {
        cols.extend(super::interval_columns(
            name,
            &sm.iter().map(f).collect::<Vec<_>>(),
        ));
    }
    let mut summary =
        DataFrame::new(sm.len(), cols).map_err(|e| Error::table("ranking summary", e))?;
    crate::io::write_parquet(&mut summary, out.join("summary.parquet"))?;
    let c = &s.comparisons;
    let mut cols = vec![
        Column::new(
            "truth".into(),
            c.iter().map(|x| x.truth.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "other".into(),
            c.iter().map(|x| x.other.as_str()).collect::<Vec<_>>(),
        ),
        share_column(c.iter().map(|x| x.share)),
        Column::new(
            "error_removed".into(),
            c.iter().map(|x| x.error_removed).collect::<Vec<_>>(),
        ),
    ];
    for (name, f) in [
        (
            "ap_diff",
            (|x: &RankComparison| &x.ap) as fn(&RankComparison) -> &Interval,
        ),
        ("auroc_diff", |x| &x.auroc),
        ("matched_ap_diff", |x| &x.matched_ap),
        ("spearman_gain_diff", |x| &x.spearman_gain),
    ] {
        cols.extend(super::interval_columns(
            name,
            &c.iter().map(f).collect::<Vec<_>>(),
        ));
    }
    let mut comparisons =
        DataFrame::new(c.len(), cols).map_err(|e| Error::table("ranking comparisons", e))?;
    crate::io::write_parquet(&mut comparisons, out.join("comparisons.parquet"))?;
    let mut models = String::new();
    for (name, m, cv) in &s.fitted {
        let text = toml::to_string(m).map_err(|e| Error::invalid("models", e.to_string()))?;
        models.push_str(&format!(
            "# {name}: cross-validated development AP {cv:.3}\n{text}\n"
        ));
    }
    crate::io::write_atomic(out.join("models.toml"), models.as_bytes())?;
    s.flag_model.write(&out.join("fitted-model.toml"))?;
    crate::io::write_atomic(out.join("ranking.md"), s.markdown().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(share: f64, seed: u64, c: &str, ap: f64) -> RankRow {
        RankRow {
            share,
            seed,
            truth: "synthetic".into(),
            criterion: c.into(),
            m: Metrics {
                ap,
                auroc: ap,
                p_at_pos: ap,
                matched_ap: ap,
                spearman_gain: f64::NAN,
            },
            positives: 5,
            n: 10,
            held_out: seed > 2,
        }
    }

    /// Held-out seeds only; shares averaged per seed before the interval (seeds repeat across
    /// shares, so they are the unit); flag's differences paired by seed.
    #[test]
    fn summary_pairs_by_seed_over_shares() {
        let rows = vec![
            row(0.1, 1, "flag", 0.0),
            row(0.1, 1, "loss", 1.0),
            row(0.1, 3, "flag", 0.9),
            row(0.1, 3, "loss", 0.5),
            row(0.1, 4, "flag", 0.8),
            row(0.1, 4, "loss", 0.6),
            row(0.2, 3, "flag", 0.7),
            row(0.2, 3, "loss", 0.6),
            row(0.2, 4, "flag", 0.6),
            row(0.2, 4, "loss", 0.4),
        ];
        let (s, c) = summarise(&rows, &[0.1, 0.2]);
        let flag_all = s
            .iter()
            .find(|r| r.criterion == "flag" && r.share.is_none())
            .unwrap();
        // Seed 3: (0.9 + 0.7)/2 = 0.8; seed 4: (0.8 + 0.6)/2 = 0.7; mean 0.75 (seed 1 left out).
        assert!((flag_all.ap.mean - 0.75).abs() < 1e-12);
        assert!(flag_all.ap.high <= 1.0 && flag_all.ap.low >= 0.0);
        let d = c
            .iter()
            .find(|c| c.other == "loss" && c.share.is_none())
            .unwrap();
        // Per seed: 0.8 − 0.55 = 0.25 and 0.7 − 0.5 = 0.2: mean 0.225.
        assert!((d.ap.mean - 0.225).abs() < 1e-12, "{d:?}");
        // Error removed from the means: (0.75 − 0.525) / (1 − 0.525).
        assert!((d.error_removed - 0.225 / 0.475).abs() < 1e-12);
        let per_share = c
            .iter()
            .find(|c| c.other == "loss" && c.share == Some(0.1))
            .unwrap();
        assert!((per_share.ap.mean - 0.3).abs() < 1e-12);
    }

    /// A truth whose rule marks no sample: AP is undefined (left out, not 0 or 1), ρ with the
    /// continuous gain is summarised and compared by seed, and ranking.md says why AP is missing.
    #[test]
    fn a_truth_without_positives_keeps_rho_and_says_so() {
        let rho_row = |seed: u64, c: &str, ap: f64, rho: f64, positives: usize| RankRow {
            truth: "counterfactual".into(),
            m: Metrics {
                ap,
                auroc: ap,
                p_at_pos: ap,
                matched_ap: f64::NAN,
                spearman_gain: rho,
            },
            positives,
            ..row(0.1, seed, c, ap)
        };
        let nan = f64::NAN;
        let rows = vec![
            rho_row(3, "flag", nan, 0.30, 0),
            rho_row(3, "loss", nan, 0.10, 0),
            rho_row(4, "flag", nan, 0.20, 0),
            rho_row(5, "flag", 0.6, 0.40, 2),
            rho_row(5, "loss", 0.5, 0.05, 2),
        ];
        let (summary, comparisons) = summarise(&rows, &[0.1]);
        let flag = summary.iter().find(|r| r.criterion == "flag").unwrap();
        // AP from seed 5 alone (the pools without positives are left out, not counted as 0).
        assert!((flag.ap.mean - 0.6).abs() < 1e-12, "{flag:?}");
        assert!((flag.spearman_gain.mean - 0.3).abs() < 1e-12, "{flag:?}");
        let c = comparisons.iter().find(|c| c.other == "loss").unwrap();
        // Paired by seed (seed 4 has no loss row): 0.20, 0.35 → mean 0.275 (unpaired means
        // would give 0.3 − 0.075 = 0.225).
        assert!((c.spearman_gain.mean - 0.275).abs() < 1e-12, "{c:?}");
        let study = RankingStudy {
            rows,
            summary,
            comparisons,
            flag_model: NeglectModel {
                provenance: "test".into(),
                features: vec![],
                weights: vec![],
                intercept: 0.0,
                threshold: 0.5,
            },
            fitted: vec![],
        };
        let md = study.markdown();
        assert!(
            md.contains("2 of 3 held-out pools have no positive"),
            "{md}"
        );
        assert!(md.contains("| +0.275 ["), "{md}");
    }

    #[test]
    fn bounded_intervals_stay_inside_the_range() {
        // A t interval of these AUROCs runs past 1 on the raw scale.
        let xs = [0.999, 0.97, 0.998];
        let raw = super::super::t_interval(&xs);
        assert!(raw.high > 1.0, "{raw:?}");
        let b = bounded_interval(&xs, 0.0, 1.0);
        assert!(
            b.high < 1.0 && b.low > 0.0 && b.low <= b.mean && b.mean <= b.high,
            "{b:?}"
        );
    }
}

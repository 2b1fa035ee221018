//! Foresight: at an early checkpoint, do the flags (and each `select` criterion) rank first the
//! facts that will *not* be acquired by the end of training?
//!
//! The fact texts (one per inserted fact: its first training sentence) are analysed at the
//! checkpoint with the NTK + `analyze` pipeline, as `study::analyse_pool` does for a selection
//! pool: the kernel of the last two blocks' FFN weights (sparse-projected, so expert models fit
//! in memory) over the fact texts, frequency scores counted over the training corpus (a fact's
//! entity is as frequent as its count makes it). Every criterion of
//! [`crate::analysis::select::Criterion::ALL`] scores the facts (new criteria come along), and
//! so does `count` (fewer reads first). Joined with what the end of training says about each
//! fact ([`FactRow`]), this is the *truth table* ([`TruthRow`]): ground truth for any rule that
//! claims to foresee neglect. [`quality`] scores each ranking against "not acquired" by average
//! precision and AUROC (`crate::stats`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::Device;

use crate::analysis::analyze::{self, AnalyzeSpec};
use crate::analysis::select::{self, Amount, Criterion, Pool, Sources};
use crate::capture::job::{Job, JobSpec};
use crate::capture::projection::{Projection, ProjectionKind};
use crate::capture::{CaptureOptions, Selection};
use crate::corpus::facts::FACTS_DOMAIN;
use crate::corpus::{Corpus, Sample, Split, SplitChoice};
use crate::error::{Error, Result};
use crate::eval::facts::FactRow;
use crate::ntk::pipeline::{self as ntk_pipeline, NtkOptions};
use crate::progress::Progress;

/// The name of the count baseline among the criteria.
pub const COUNT: &str = "count";

/// The corpus the fact texts are analysed in: every training row of `corpus` (so frequency
/// scores count what training read), no host validation rows, and one validation row per
/// inserted fact, id = the fact's id, text = its first training sentence. The tokenizer of
/// `corpus_path` is copied beside `out`. Returns the analysed fact ids.
pub fn write_analysis_corpus(corpus_path: &Path, out: &Path) -> Result<Vec<String>> {
    let c = Corpus::read(corpus_path)?;
    let mut samples: Vec<Sample> = c
        .samples
        .iter()
        .filter(|s| s.split == Split::Train)
        .cloned()
        .collect();
    let mut ids = Vec::new();
    for s in &c.samples {
        let Some(f) = &s.fact else { continue };
        if s.split != Split::Train || s.id != format!("{}#1", f.id) {
            continue;
        }
        ids.push(f.id.clone());
        samples.push(Sample {
            id: f.id.clone(),
            split: Split::Validation,
            ..s.clone()
        });
    }
    if ids.is_empty() {
        return Err(Error::in_file(
            corpus_path,
            format!("no inserted facts (rows of domain {FACTS_DOMAIN:?} with a fact_id)"),
        ));
    }
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tok = crate::corpus::tokenizer::default_path(corpus_path);
    let tok_out = crate::corpus::tokenizer::default_path(out);
    std::fs::copy(&tok, &tok_out).map_err(|e| Error::io(&tok, e))?;
    Corpus { samples }.write(out)?;
    Ok(ids)
}

/// Where and how the fact texts are analysed at a checkpoint.
#[derive(Debug, Clone)]
pub struct ForesightSpec {
    /// The checkpoint's model folder.
    pub model: PathBuf,
    /// The analysis corpus ([`write_analysis_corpus`]).
    pub corpus: PathBuf,
    /// Output folder (`ntk/`, `analysis/`).
    pub dir: PathBuf,
    /// Sparse projection of each parameter's gradient to this many dimensions (0: none).
    pub projection: i64,
    /// Memory budget of the kernel's capture, in GiB.
    pub memory_gb: f64,
    /// Bootstrap resamples of the analysis's correlations.
    pub resamples: usize,
    /// Seed of the projection, the intervals and the tie-breaking.
    pub seed: u64,
}

/// The NTK and analysis of the fact texts under the checkpoint, read back as a pool.
pub fn analyse(spec: &ForesightSpec, device: Device, progress: &dyn Progress) -> Result<Pool> {
    let options = CaptureOptions {
        seed: spec.seed,
        projection: (spec.projection > 0).then_some(Projection {
            kind: ProjectionKind::Sparse,
            dim: spec.projection,
            seed: spec.seed,
        }),
        memory: Some((spec.memory_gb * (1u64 << 30) as f64) as u64),
        ..CaptureOptions::default()
    };
    let job = Job::prepare(
        &JobSpec {
            model: spec.model.clone(),
            corpus: spec.corpus.clone(),
            tokenizer: None,
            split: SplitChoice::Validation,
            samples: usize::MAX,
            sample_seed: 0,
            selection: Selection::recommended(),
            options,
        },
        device,
    )?;
    let ntk_dir = spec.dir.join("ntk");
    let opts = NtkOptions {
        seed: spec.seed,
        ..NtkOptions::default()
    };
    ntk_pipeline::compute_into(&job, &opts, device, &ntk_dir, progress)?;
    drop(job);
    let an_dir = spec.dir.join("analysis");
    // The analysis corpus holds the training rows, so the learnability statistics (which the
    // neglect model reads) are computed against them.
    let aspec = AnalyzeSpec {
        resamples: spec.resamples,
        seed: spec.seed,
        ..AnalyzeSpec::new(&ntk_dir, &spec.model, &spec.corpus)
    };
    analyze::analyze(&aspec, device, progress)?.write(&an_dir)?;
    Pool::read(&an_dir)
}

/// One inserted fact: what the early checkpoint said of it and what the end of training did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TruthRow {
    /// The fact.
    pub fact_id: String,
    /// Its relation.
    pub relation: String,
    /// Training sentences that state it.
    pub count: u32,
    /// Acquired at the end of training (ranked first on most held-out probes).
    pub acquired_end: bool,
    /// Its first-rank rate at the end.
    pub first_rate_end: f64,
    /// Mean log-probability gain of its answer over the base model.
    pub gain: f64,
    /// Mean specific gain (the answer's gain less its distractors').
    pub specific_gain: f64,
    /// Flagged by the default flag rule at the checkpoint.
    pub flagged: bool,
    /// (criterion, score: higher = predicted not to be acquired), every criterion then `count`.
    pub scores: Vec<(String, f64)>,
    /// Whether each criterion of `scores` flags the fact (its rule: `flag`'s threshold,
    /// `rarity-rule`'s bins; false for criteria without flags and for `count`), in that order.
    pub criterion_flags: Vec<bool>,
}

/// The truth table of one run: every fact of `pool` scored by every criterion and `count`,
/// joined with its outcome in `outcome` (facts of the pool without an outcome are an error).
pub fn truth_table(
    pool: &Pool,
    outcome: &[FactRow],
    device: Device,
    seed: u64,
) -> Result<Vec<TruthRow>> {
    let by_id: HashMap<&str, &FactRow> = outcome.iter().map(|f| (f.fact_id.as_str(), f)).collect();
    let mut per_criterion = Vec::new();
    let mut flagged = vec![false; pool.ids.len()];
    for c in Criterion::ALL {
        // Criteria whose column this analysis lacks (no reference model, no checkpoint
        // trajectory at the early checkpoint) are left out rather than guessed.
        if c.column()
            .is_some_and(|(col, _)| pool.column(col, c).is_err())
        {
            continue;
        }
        let s = select::scores(pool, c, &Sources::default(), device, seed)?;
        if c == Criterion::Flag {
            flagged = s.iter().map(|x| x.1).collect();
        }
        per_criterion.push((c.name().to_string(), s));
    }
    pool.ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let f = by_id.get(id.as_str()).ok_or_else(|| {
                Error::invalid("facts", format!("analysed fact {id:?} has no outcome"))
            })?;
            let mut scores: Vec<(String, f64)> = per_criterion
                .iter()
                .map(|(name, v)| (name.clone(), v[i].0))
                .collect();
            scores.push((COUNT.into(), -f64::from(f.count)));
            let mut criterion_flags: Vec<bool> =
                per_criterion.iter().map(|(_, v)| v[i].1).collect();
            criterion_flags.push(false);
            Ok(TruthRow {
                fact_id: id.clone(),
                relation: f.relation.clone(),
                count: f.count,
                acquired_end: f.acquired,
                first_rate_end: f.first_rate,
                gain: f.gain.unwrap_or(f64::NAN),
                specific_gain: f.specific_gain.unwrap_or(f64::NAN),
                flagged: flagged[i],
                scores,
                criterion_flags,
            })
        })
        .collect()
}

/// How well one criterion's ranking puts the facts that were not acquired first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    /// The criterion (or `count`).
    pub criterion: String,
    /// Average precision for "not acquired" (`None` when every fact or none was acquired).
    pub ap: Option<f64>,
    /// AUROC.
    pub auroc: Option<f64>,
    /// Facts not acquired.
    pub positives: usize,
    /// Facts.
    pub n: usize,
}

/// AP and AUROC of every ranking in `table` against "not acquired at the end". The order is
/// `select`'s: for a criterion with flags (`flag`, `rarity-rule`), flagged facts first; then the score, highest first; ties in a
/// seeded random order (an undefined score ranks last).
pub fn quality(table: &[TruthRow], seed: u64) -> Result<Vec<Quality>> {
    let Some(first) = table.first() else {
        return Ok(Vec::new());
    };
    let truth: Vec<bool> = table.iter().map(|r| !r.acquired_end).collect();
    let positives = truth.iter().filter(|&&t| t).count();
    let mut out = Vec::new();
    for (k, (name, _)) in first.scores.iter().enumerate() {
        let scored: Vec<(f64, bool)> = table
            .iter()
            .map(|r| {
                let x = r.scores[k].1;
                let x = if x.is_nan() { f64::NEG_INFINITY } else { x };
                (x, r.criterion_flags.get(k).copied().unwrap_or(false))
            })
            .collect();
        let order = match Criterion::ALL.iter().find(|c| c.name() == name) {
            Some(&c) => select::rank(&scored, c, Amount::Top(0), seed)?.order,
            None => score_order(&scored, seed),
        };
        let ordered: Vec<bool> = order.iter().map(|&i| truth[i]).collect();
        out.push(Quality {
            criterion: name.clone(),
            ap: crate::stats::average_precision(&ordered).filter(|_| positives < truth.len()),
            auroc: crate::stats::auroc(&ordered),
            positives,
            n: truth.len(),
        });
    }
    Ok(out)
}

/// Indices by score, highest first, ties in a seeded random order (as `select::rank` orders a
/// criterion that has no flags).
fn score_order(scored: &[(f64, bool)], seed: u64) -> Vec<usize> {
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(seed, b"select-ties"));
    let ties: Vec<u64> = (0..scored.len()).map(|_| rng.random()).collect();
    let mut order: Vec<usize> = (0..scored.len()).collect();
    order.sort_by(|&a, &b| {
        scored[b]
            .0
            .total_cmp(&scored[a].0)
            .then(ties[a].cmp(&ties[b]))
    });
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, count: u32, acquired: bool, loss: f64) -> TruthRow {
        TruthRow {
            fact_id: id.into(),
            relation: "birthplace".into(),
            count,
            acquired_end: acquired,
            first_rate_end: if acquired { 1.0 } else { 0.0 },
            gain: 0.0,
            specific_gain: 0.0,
            flagged: false,
            scores: vec![("loss".into(), loss), (COUNT.into(), -f64::from(count))],
            criterion_flags: vec![false, false],
        }
    }

    /// A criterion with flags ranks its flagged facts first, whatever their score, as `select`
    /// does (the rarity rule's flags were dropped once, ranking it by score alone).
    #[test]
    fn flagged_facts_rank_first_for_every_criterion_with_flags() {
        let with = |id: &str, acquired: bool, score: f64, flagged: bool| TruthRow {
            scores: vec![(Criterion::RarityRule.name().into(), score)],
            criterion_flags: vec![flagged],
            ..row(id, 1, acquired, 0.0)
        };
        // Not acquired: b, with the lowest score but flagged.
        let t = vec![
            with("a", true, 3.0, false),
            with("b", false, 1.0, true),
            with("c", true, 2.0, false),
        ];
        let q = quality(&t, 3).unwrap();
        assert_eq!(q[0].ap, Some(1.0), "{q:?}");
        assert_eq!(q[0].auroc, Some(1.0), "{q:?}");
    }

    #[test]
    fn quality_by_hand() {
        // Not acquired: b and d. Loss ranks d, a, b, c: AP = (1/1 + 2/3) / 2, AUROC 3/4.
        // Count ranks b (1), then c and d tied (2), then a (4).
        let t = vec![
            row("a", 4, true, 3.0),
            row("b", 1, false, 2.0),
            row("c", 2, true, 1.0),
            row("d", 2, false, 5.0),
        ];
        let q = quality(&t, 7).unwrap();
        assert_eq!(q[0].criterion, "loss");
        assert!((q[0].ap.unwrap() - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!((q[0].auroc.unwrap() - 0.75).abs() < 1e-12);
        assert_eq!((q[0].positives, q[0].n), (2, 4));
        // b first; d is second or third by the seeded tie-break: AUROC 1 or 3/4, never less.
        let c = &q[1];
        assert_eq!(c.criterion, COUNT);
        assert!(c.auroc.unwrap() >= 0.75 && c.ap.unwrap() >= (1.0 + 2.0 / 3.0) / 2.0);
        let all = vec![row("a", 1, true, 1.0), row("b", 2, true, 2.0)];
        assert_eq!(quality(&all, 1).unwrap()[0].ap, None, "no fact was lost");
    }
}

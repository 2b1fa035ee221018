//! What to train on next (`tailscope select`): rank the samples of an analysis by a criterion
//! and choose the top m, or those at or above a score threshold.
//!
//! Every criterion is a score where higher means "select first"; each reads a column of the
//! analysis's `analysis.parquet` ([`super::analyze`]):
//! - `flag` (default): the neglect probability ([`super::neglect`]), flagged samples first;
//! - `loss`: mean token loss, the worst fitted first;
//! - `uncertainty`: the model's mean token entropy (nats), the least certain first;
//! - `excess-loss`: position-matched excess loss, the hardest tokens for their context first;
//! - `reducible`: loss minus the reference model's (analyses with `--reference`), largest first;
//! - `predicted-decrease`: the loss decrease training on the data predicts, smallest first (what
//!   the data does not teach);
//! - `support`: ridge leverage on the training gradients, smallest first (isolated gradients);
//! - `support-cos`: mean positive cosine with the training gradients, smallest first;
//! - `gc`: |GC| of the sample's domain, smallest first (undefined GCs last);
//! - `self-kernel`: Θ_ii, the largest per-sample gradient first (GraNd-like);
//! - `alignment`: cos(g(X), J_i), the least aligned first;
//! - `frequency`: frequency score, the rarest first;
//! - `loss-slope`, `forgetting`, `self-influence` (analyses with `--checkpoints`): the loss
//!   falling fastest (learnable, and still being learned), forgotten most (noise, by
//!   second-split forgetting's reading), moved most by its own gradient first;
//! - `rarity-rule`: the earlier flag rule of [`super::flags`] (rare, misaligned, poorly fitted),
//!   kept for comparison;
//! - `random`: a seeded uniform draw.
//!
//! A sample without a score (NaN: an undefined domain GC, a statistic not computed for it) ranks
//! last. Ties are broken by a seeded random key, so the same seed gives the same selection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use polars::prelude::{Column, DataFrame};
use rand::{Rng, SeedableRng};
use tch::Device;

use super::flags::{self, FlagOptions, SampleMetrics};
use crate::error::{Error, Result};
use crate::io::{column_f64, column_str, read_parquet};

/// How samples are ranked (module docs).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Criterion {
    /// Neglect probability, flagged samples first.
    #[default]
    Flag,
    /// Largest loss first.
    Loss,
    /// Largest mean token entropy first.
    Uncertainty,
    /// Largest position-matched excess loss first.
    ExcessLoss,
    /// Largest reducible loss first.
    Reducible,
    /// Smallest predicted decrease first.
    PredictedDecrease,
    /// Smallest ridge leverage first.
    Support,
    /// Smallest mean positive cosine first.
    SupportCos,
    /// Smallest |GC| of the sample's domain first.
    Gc,
    /// Largest Θ_ii first.
    SelfKernel,
    /// Lowest alignment first.
    Alignment,
    /// Lowest frequency score first.
    Frequency,
    /// Steepest fall of the loss over checkpoints first.
    LossSlope,
    /// Most forgetting events first.
    Forgetting,
    /// Largest self-influence first.
    SelfInfluence,
    /// The earlier rarity rule's rank score, its flagged samples first.
    RarityRule,
    /// Seeded random order.
    Random,
}

impl Criterion {
    /// Every criterion, in the order of the docs.
    pub const ALL: [Criterion; 17] = [
        Criterion::Flag,
        Criterion::Loss,
        Criterion::Uncertainty,
        Criterion::ExcessLoss,
        Criterion::Reducible,
        Criterion::PredictedDecrease,
        Criterion::Support,
        Criterion::SupportCos,
        Criterion::Gc,
        Criterion::SelfKernel,
        Criterion::Alignment,
        Criterion::Frequency,
        Criterion::LossSlope,
        Criterion::Forgetting,
        Criterion::SelfInfluence,
        Criterion::RarityRule,
        Criterion::Random,
    ];

    /// The criterion's name as the CLI and tables spell it.
    pub fn name(self) -> &'static str {
        match self {
            Criterion::Flag => "flag",
            Criterion::Loss => "loss",
            Criterion::Uncertainty => "uncertainty",
            Criterion::ExcessLoss => "excess-loss",
            Criterion::Reducible => "reducible",
            Criterion::PredictedDecrease => "predicted-decrease",
            Criterion::Support => "support",
            Criterion::SupportCos => "support-cos",
            Criterion::Gc => "gc",
            Criterion::SelfKernel => "self-kernel",
            Criterion::Alignment => "alignment",
            Criterion::Frequency => "frequency",
            Criterion::LossSlope => "loss-slope",
            Criterion::Forgetting => "forgetting",
            Criterion::SelfInfluence => "self-influence",
            Criterion::RarityRule => "rarity-rule",
            Criterion::Random => "random",
        }
    }

    /// The `analysis.parquet` column a criterion reads and its sign (+1: high first), for the
    /// criteria that are one column.
    pub fn column(self) -> Option<(&'static str, f64)> {
        Some(match self {
            Criterion::Flag => ("neglect", 1.0),
            Criterion::Loss => ("loss", 1.0),
            Criterion::Uncertainty => ("uncertainty", 1.0),
            Criterion::ExcessLoss => ("excess_loss", 1.0),
            Criterion::Reducible => ("reducible_loss", 1.0),
            Criterion::PredictedDecrease => ("predicted_decrease", -1.0),
            Criterion::Support => ("support", -1.0),
            Criterion::SupportCos => ("support_cos", -1.0),
            Criterion::Gc => ("domain_gc", -1.0),
            Criterion::SelfKernel => ("self_kernel", 1.0),
            Criterion::Alignment => ("alignment", -1.0),
            Criterion::Frequency => ("freq_score", -1.0),
            Criterion::LossSlope => ("loss_slope", -1.0),
            Criterion::Forgetting => ("forgetting", 1.0),
            Criterion::SelfInfluence => ("self_influence", 1.0),
            Criterion::RarityRule | Criterion::Random => return None,
        })
    }

    /// What the analysis needs for the criterion, when it is not always there.
    fn needs(self) -> &'static str {
        match self {
            Criterion::Reducible => "analyze --reference MODEL",
            Criterion::LossSlope | Criterion::Forgetting | Criterion::SelfInfluence => {
                "analyze --checkpoints RUN"
            }
            Criterion::PredictedDecrease | Criterion::Support | Criterion::SupportCos => {
                "analyze with the learnability statistics (--train-samples above 0)"
            }
            _ => "a rerun of analyze with this version",
        }
    }
}

/// How many samples are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Amount {
    /// The m highest-ranked samples.
    Top(usize),
    /// Every sample whose score is at least this.
    Threshold(f64),
}

/// An analysis folder's samples with what the criteria need.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Sample ids.
    pub ids: Vec<String>,
    /// Domains.
    pub domains: Vec<String>,
    /// Texts.
    pub texts: Vec<String>,
    /// Every numeric column of `analysis.parquet`, by name.
    pub columns: HashMap<String, Vec<f64>>,
    /// Whether each sample is flagged (has a `flag_rank`).
    pub flagged: Vec<bool>,
    /// The inputs the analysis recorded (ntk, model, corpus, tokenizer), when it did.
    pub inputs: HashMap<String, PathBuf>,
    path: PathBuf,
}

impl Pool {
    /// Read `analysis.parquet` and `summary.json` of an analysis folder.
    pub fn read(dir: &Path) -> Result<Pool> {
        let path = dir.join("analysis.parquet");
        let df = read_parquet(&path)?;
        let mut columns = HashMap::new();
        for c in df.columns() {
            if c.dtype().is_primitive_numeric() || c.dtype().is_bool() {
                columns.insert(c.name().to_string(), column_f64(&df, c.name(), &path)?);
            }
        }
        let flagged = column_f64(&df, "flag_rank", &path)?
            .iter()
            .map(|r| r.is_finite())
            .collect();
        let sp = dir.join("summary.json");
        let summary: serde_json::Value = match std::fs::read_to_string(&sp) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| Error::in_file(&sp, e.to_string()))?,
            Err(e) => return Err(Error::io(&sp, e)),
        };
        let inputs = summary
            .get("inputs")
            .and_then(|v| v.as_object())
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), PathBuf::from(s))))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Pool {
            ids: column_str(&df, "id", &path)?,
            domains: column_str(&df, "domain", &path)?,
            texts: column_str(&df, "text", &path)?,
            columns,
            flagged,
            inputs,
            path,
        })
    }

    /// A column of `analysis.parquet`, or an error saying what analysis it needs.
    pub fn column(&self, name: &str, criterion: Criterion) -> Result<&[f64]> {
        self.columns.get(name).map(Vec::as_slice).ok_or_else(|| {
            Error::in_file(
                &self.path,
                format!(
                    "no column `{name}`, which --criterion {} ranks by; it needs {}",
                    criterion.name(),
                    criterion.needs()
                ),
            )
        })
    }

    /// The metrics of the earlier rarity rule.
    fn rarity_metrics(&self) -> Result<Vec<SampleMetrics>> {
        let c = Criterion::RarityRule;
        let (freq, align, loss, bins, lt) = (
            self.column("freq_score", c)?,
            self.column("alignment", c)?,
            self.column("loss", c)?,
            self.column("freq_bin", c)?,
            self.column("long_tail_domain", c)?,
        );
        // A sample with no frequency score has no bin (null): its own loss peers, not bin 0.
        let peers = flags::peer_bins(bins);
        Ok((0..freq.len())
            .map(|i| SampleMetrics {
                freq_score: freq[i],
                long_tail_domain: lt[i] > 0.5,
                alignment: align[i],
                loss: loss[i],
                bin: peers[i],
            })
            .collect())
    }
}

/// Where older analyses (without the `uncertainty` column) find the model for it.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The NTK folder; unused by analyses of this version (kept for the CLI's `--ntk`).
    pub ntk: Option<PathBuf>,
    /// The model, for `uncertainty` of an analysis without that column.
    pub model: Option<PathBuf>,
    /// The tokenizer, for `uncertainty` of an analysis without that column.
    pub tokenizer: Option<PathBuf>,
}

/// Every sample's score under `criterion` (higher: select first; NaN: none) and whether it is
/// flagged (for `flag` and `rarity-rule`; false otherwise).
pub fn scores(
    pool: &Pool,
    criterion: Criterion,
    sources: &Sources,
    device: Device,
    seed: u64,
) -> Result<Vec<(f64, bool)>> {
    let plain = |v: Vec<f64>| v.into_iter().map(|x| (x, false)).collect();
    Ok(match criterion {
        Criterion::RarityRule => flags::score_all(&pool.rarity_metrics()?, &FlagOptions::default())
            .into_iter()
            .map(|(f, s)| (s, f.is_some()))
            .collect(),
        Criterion::Random => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(
                seed,
                b"select-random",
            ));
            plain((0..pool.ids.len()).map(|_| rng.random::<f64>()).collect())
        }
        Criterion::Uncertainty if !pool.columns.contains_key("uncertainty") => {
            plain(uncertainty(pool, sources, device, seed)?)
        }
        c => {
            let (name, sign) = c
                .column()
                .ok_or_else(|| Error::invalid("--criterion", "no column"))?;
            let v = pool.column(name, c)?;
            let flagged = c == Criterion::Flag;
            v.iter()
                .zip(&pool.flagged)
                .map(|(&x, &f)| (sign * x, flagged && f))
                .collect()
        }
    })
}

/// Mean token entropy of each sample under the model (analyses that predate the column).
fn uncertainty(pool: &Pool, sources: &Sources, device: Device, seed: u64) -> Result<Vec<f64>> {
    let model_path = sources
        .model
        .clone()
        .or_else(|| pool.inputs.get("model").cloned())
        .ok_or_else(|| {
            Error::invalid(
                "--model",
                "the analysis does not record its model; give --model",
            )
        })?;
    let (_vs, model) = crate::source::load_model(&model_path, device)?;
    let corpus = pool.inputs.get("corpus").cloned().unwrap_or_default();
    let tok = crate::source::tokenizer_for(
        sources
            .tokenizer
            .as_deref()
            .or(pool.inputs.get("tokenizer").map(PathBuf::as_path)),
        &model_path,
        &model,
        &corpus,
    )?;
    let texts: Vec<&str> = pool.texts.iter().map(String::as_str).collect();
    let enc = crate::corpus::tokenizer::encode_all(&tok, &texts)?;
    let refs: Vec<&[u32]> = enc.iter().map(Vec::as_slice).collect();
    Ok(
        crate::eval::sample_entropies(&model, &refs, 64, device, seed)?
            .into_iter()
            .map(|(h, c)| h / c.max(1) as f64)
            .collect(),
    )
}

/// A ranking of the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    /// The criterion.
    pub criterion: Criterion,
    /// Sample indices, best first.
    pub order: Vec<usize>,
    /// Each sample's score (by sample index).
    pub scores: Vec<f64>,
    /// Whether each sample is flagged (by sample index; `flag` only).
    pub flagged: Vec<bool>,
    /// How many of `order` are selected (a prefix).
    pub selected: usize,
}

/// Rank `scores` (module docs: flagged first under `flag` and `rarity-rule`, then score, samples
/// without one (NaN) last, then a seeded random key) and cut by `amount`; under a threshold the
/// samples at or above it lead.
pub fn rank(
    scored: &[(f64, bool)],
    criterion: Criterion,
    amount: Amount,
    seed: u64,
) -> Result<Selection> {
    // (Top(0) ranks without selecting, as the ranking study does; the CLI refuses `--top 0`.)
    if let Amount::Threshold(t) = amount {
        if !t.is_finite() {
            return Err(Error::invalid(
                "--threshold",
                format!("must be a finite number, got {t}: no score is at least it"),
            ));
        }
    }
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(seed, b"select-ties"));
    let ties: Vec<u64> = (0..scored.len()).map(|_| rng.random()).collect();
    // Only `flag` ranks flagged samples first; a threshold then counts on the score alone, so
    // the flagged samples it passes lead and a flagged sample below it is not selected.
    let flag_first = matches!(criterion, Criterion::Flag | Criterion::RarityRule);
    let key = |i: usize| {
        let x = scored[i].0;
        if x.is_nan() {
            f64::NEG_INFINITY
        } else {
            x
        }
    };
    let passes = |i: usize| match amount {
        Amount::Threshold(t) => scored[i].0 >= t,
        Amount::Top(_) => true,
    };
    let mut order: Vec<usize> = (0..scored.len()).collect();
    order.sort_by(|&a, &b| {
        passes(b)
            .cmp(&passes(a))
            .then((flag_first && scored[b].1).cmp(&(flag_first && scored[a].1)))
            .then(key(b).total_cmp(&key(a)))
            .then(ties[a].cmp(&ties[b]))
    });
    let selected = match amount {
        Amount::Top(m) => m.min(order.len()),
        Amount::Threshold(_) => order.iter().filter(|&&i| passes(i)).count(),
    };
    Ok(Selection {
        criterion,
        order,
        scores: scored.iter().map(|s| s.0).collect(),
        flagged: scored.iter().map(|s| s.1).collect(),
        selected,
    })
}

/// Score and rank the pool in one call.
pub fn select(
    pool: &Pool,
    criterion: Criterion,
    amount: Amount,
    sources: &Sources,
    device: Device,
    seed: u64,
) -> Result<Selection> {
    let scored = scores(pool, criterion, sources, device, seed)?;
    rank(&scored, criterion, amount, seed)
}

impl Selection {
    /// The selected samples' ids, best first.
    pub fn selected_ids<'p>(&self, pool: &'p Pool) -> Vec<&'p str> {
        self.order[..self.selected]
            .iter()
            .map(|&i| pool.ids[i].as_str())
            .collect()
    }

    /// The selection table: one row per sample, best first: id, domain, score, rank (1-based),
    /// selected, flagged, criterion.
    pub fn frame(&self, pool: &Pool) -> Result<DataFrame> {
        let o = &self.order;
        DataFrame::new(
            o.len(),
            vec![
                Column::new(
                    "id".into(),
                    o.iter().map(|&i| pool.ids[i].clone()).collect::<Vec<_>>(),
                ),
                Column::new(
                    "domain".into(),
                    o.iter()
                        .map(|&i| pool.domains[i].clone())
                        .collect::<Vec<_>>(),
                ),
                Column::new(
                    "score".into(),
                    o.iter().map(|&i| self.scores[i]).collect::<Vec<_>>(),
                ),
                Column::new("rank".into(), (1..=o.len() as u32).collect::<Vec<_>>()),
                Column::new(
                    "selected".into(),
                    (0..o.len()).map(|r| r < self.selected).collect::<Vec<_>>(),
                ),
                Column::new(
                    "flagged".into(),
                    o.iter().map(|&i| self.flagged[i]).collect::<Vec<_>>(),
                ),
                Column::new("criterion".into(), vec![self.criterion.name(); o.len()]),
            ],
        )
        .map_err(|e| Error::table("selection", e))
    }
}

/// The selected ids of a selection table (rows with `selected` true), in rank order.
pub fn read_selected(path: &Path) -> Result<Vec<String>> {
    let df = read_parquet(path)?;
    let ids = column_str(&df, "id", path)?;
    let sel = column_f64(&df, "selected", path)?;
    Ok(ids
        .into_iter()
        .zip(sel)
        .filter(|(_, s)| *s > 0.5)
        .map(|(i, _)| i)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flagged samples come first under `flag`; scores order the rest; ties fall to the seed, so
    /// one seed gives one selection and another may differ; a threshold cuts by score.
    #[test]
    fn ranking_is_by_flag_then_score_then_seeded_ties() {
        let scored = [
            (0.5, false),
            (2.0, false),
            (0.1, true),
            (0.7, false),
            (0.7, false),
            (0.7, false),
        ];
        let s = rank(&scored, Criterion::Flag, Amount::Top(3), 1).unwrap();
        assert_eq!(&s.order[..2], &[2, 1]);
        assert_eq!(s.selected, 3);
        let ties: Vec<usize> = s.order[2..5].to_vec();
        let mut sorted = ties.clone();
        sorted.sort();
        assert_eq!(sorted, vec![3, 4, 5]);
        assert_eq!(s.order[5], 0);
        assert_eq!(
            rank(&scored, Criterion::Flag, Amount::Top(3), 1).unwrap(),
            s
        );
        let differs = (2..40).any(|seed| {
            rank(&scored, Criterion::Flag, Amount::Top(3), seed)
                .unwrap()
                .order[2..5]
                != ties[..]
        });
        assert!(differs, "ties never depend on the seed");
        let t = rank(&scored, Criterion::Loss, Amount::Threshold(0.6), 1).unwrap();
        assert_eq!(t.selected, 4);
        assert_eq!(t.order[0], 1);
        // Other criteria ignore the flag: the flagged sample ranks by its (lowest) score.
        assert_eq!(
            rank(&scored, Criterion::Loss, Amount::Top(1), 1)
                .unwrap()
                .order[5],
            2
        );
        // Under a threshold the flagged sample below it is not selected.
        let f = rank(&scored, Criterion::Flag, Amount::Threshold(0.6), 1).unwrap();
        assert_eq!(f.selected, 4);
        assert!(!f.order[..4].contains(&2));
        // A sample without a score ranks last, below every scored one.
        let nan = rank(
            &[(f64::NAN, false), (-5.0, false)],
            Criterion::Gc,
            Amount::Top(1),
            0,
        )
        .unwrap();
        assert_eq!(nan.order, vec![1, 0]);
    }
}

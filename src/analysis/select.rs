//! What to train on next (`tailscope select`): rank the samples of an analysis by a criterion
//! and choose the top m, or those at or above a score threshold.
//!
//! Every criterion is a score where higher means "select first":
//! - `flag` (default): the flag rank score (1 − frequency percentile) + (1 − alignment
//!   percentile) + loss z ([`super::flags`]), with the samples that meet all three flag
//!   conditions ahead of those that do not;
//! - `alignment`: −cos(g(X), J_i), the least aligned first;
//! - `gc`: −GC of the sample's domain (from the NTK run's `gc.parquet`), the least consistent
//!   domain first;
//! - `self-kernel`: Θ_ii, the largest per-sample gradient first (GraNd-like);
//! - `loss`: mean token loss, the worst fitted first;
//! - `frequency`: −frequency score, the rarest first;
//! - `uncertainty`: the model's mean token entropy (nats), the least certain first;
//! - `random`: a seeded uniform draw.
//!
//! Ties are broken by a seeded random key, so the same seed gives the same selection.

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
    /// Flag rank score, flagged samples first.
    #[default]
    Flag,
    /// Lowest alignment first.
    Alignment,
    /// Lowest GC of the sample's domain first.
    Gc,
    /// Largest Θ_ii first.
    SelfKernel,
    /// Largest loss first.
    Loss,
    /// Lowest frequency score first.
    Frequency,
    /// Largest mean token entropy first.
    Uncertainty,
    /// Seeded random order.
    Random,
}

impl Criterion {
    /// Every criterion, in the order of the docs.
    pub const ALL: [Criterion; 8] = [
        Criterion::Flag,
        Criterion::Alignment,
        Criterion::Gc,
        Criterion::SelfKernel,
        Criterion::Loss,
        Criterion::Frequency,
        Criterion::Uncertainty,
        Criterion::Random,
    ];

    /// The criterion's name as the CLI and tables spell it.
    pub fn name(self) -> &'static str {
        match self {
            Criterion::Flag => "flag",
            Criterion::Alignment => "alignment",
            Criterion::Gc => "gc",
            Criterion::SelfKernel => "self-kernel",
            Criterion::Loss => "loss",
            Criterion::Frequency => "frequency",
            Criterion::Uncertainty => "uncertainty",
            Criterion::Random => "random",
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
    /// Texts (for the uncertainty criterion's forward pass).
    pub texts: Vec<String>,
    /// Per-sample metrics of the flag rule.
    pub metrics: Vec<SampleMetrics>,
    /// Θ_ii.
    pub self_kernel: Vec<f64>,
    /// The flag options the analysis used.
    pub flags: FlagOptions,
    /// The inputs the analysis recorded (ntk, model, corpus, tokenizer), when it did.
    pub inputs: HashMap<String, PathBuf>,
}

impl Pool {
    /// Read `analysis.parquet` and `summary.json` of an analysis folder.
    pub fn read(dir: &Path) -> Result<Pool> {
        let path = dir.join("analysis.parquet");
        let df = read_parquet(&path)?;
        let f = |name: &str| column_f64(&df, name, &path);
        let (freq, align, loss, bins, lt) = (
            f("freq_score")?,
            f("alignment")?,
            f("loss")?,
            f("freq_bin")?,
            f("long_tail_domain")?,
        );
        let peers = flags::peer_bins(&bins);
        let metrics = (0..freq.len())
            .map(|i| SampleMetrics {
                freq_score: freq[i],
                long_tail_domain: lt[i] > 0.5,
                alignment: align[i],
                loss: loss[i],
                bin: peers[i],
            })
            .collect();
        let sp = dir.join("summary.json");
        let summary: serde_json::Value = match std::fs::read_to_string(&sp) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| Error::in_file(&sp, e.to_string()))?,
            Err(e) => return Err(Error::io(&sp, e)),
        };
        let flags: FlagOptions = summary
            .get("flag_options")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .map_err(|e| Error::in_file(&sp, format!("flag_options: {e}")))?
            .unwrap_or_default();
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
            self_kernel: f("self_kernel")?,
            metrics,
            flags,
            inputs,
        })
    }

    /// An input the analysis recorded, or the override.
    fn input(&self, key: &str, given: Option<&Path>, flag: &str) -> Result<PathBuf> {
        given
            .map(Path::to_path_buf)
            .or_else(|| self.inputs.get(key).cloned())
            .ok_or_else(|| {
                Error::invalid(
                    flag,
                    format!("the analysis does not record its {key}; give {flag}"),
                )
            })
    }
}

/// Where the criteria that need more than the analysis table find it.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The NTK folder (its `gc.parquet`), for `gc`; default: the one the analysis used.
    pub ntk: Option<PathBuf>,
    /// The model, for `uncertainty`; default: the one the analysis used.
    pub model: Option<PathBuf>,
    /// The tokenizer, for `uncertainty`; default: the model's, else the corpus's.
    pub tokenizer: Option<PathBuf>,
}

/// Every sample's score under `criterion` (higher: select first) and whether it is flagged
/// (for `flag`; false otherwise).
pub fn scores(
    pool: &Pool,
    criterion: Criterion,
    sources: &Sources,
    device: Device,
    seed: u64,
) -> Result<Vec<(f64, bool)>> {
    let plain = |v: Vec<f64>| v.into_iter().map(|x| (x, false)).collect();
    Ok(match criterion {
        Criterion::Flag => flags::score_all(&pool.metrics, &pool.flags)
            .into_iter()
            .map(|(f, s)| (s, f.is_some()))
            .collect(),
        Criterion::Alignment => plain(pool.metrics.iter().map(|m| -m.alignment).collect()),
        Criterion::Loss => plain(pool.metrics.iter().map(|m| m.loss).collect()),
        Criterion::Frequency => plain(pool.metrics.iter().map(|m| -m.freq_score).collect()),
        Criterion::SelfKernel => plain(pool.self_kernel.clone()),
        Criterion::Gc => {
            let ntk = pool.input("ntk", sources.ntk.as_deref(), "--ntk")?;
            let by_domain = domain_gc(&ntk.join("gc.parquet"))?;
            let v = pool
                .domains
                .iter()
                .map(|d| {
                    by_domain.get(d).map(|g| -g).ok_or_else(|| {
                        Error::in_file(
                            ntk.join("gc.parquet"),
                            format!("no GC for domain {d:?} (column `domain`)"),
                        )
                    })
                })
                .collect::<Result<Vec<f64>>>()?;
            plain(v)
        }
        Criterion::Uncertainty => plain(uncertainty(pool, sources, device, seed)?),
        Criterion::Random => {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(
                seed,
                b"select-random",
            ));
            plain((0..pool.ids.len()).map(|_| rng.random::<f64>()).collect())
        }
    })
}

/// GC of each domain group in a `gc.parquet`.
fn domain_gc(path: &Path) -> Result<HashMap<String, f64>> {
    let gc = read_parquet(path)?;
    let (col, group, val) = (
        column_str(&gc, "column", path)?,
        column_str(&gc, "group", path)?,
        column_f64(&gc, "gc", path)?,
    );
    Ok((0..col.len())
        .filter(|&i| col[i] == "domain" && val[i].is_finite())
        .map(|i| (group[i].clone(), val[i]))
        .collect())
}

/// Mean token entropy of each sample under the model.
fn uncertainty(pool: &Pool, sources: &Sources, device: Device, seed: u64) -> Result<Vec<f64>> {
    let model_path = pool.input("model", sources.model.as_deref(), "--model")?;
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

/// Rank `scores` (module docs: flagged first under `flag`, then score, then a seeded random key)
/// and cut by `amount`; under a threshold the samples at or above it lead.
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
    if let Some(i) = scored.iter().position(|(s, _)| s.is_nan()) {
        return Err(Error::invalid(
            "--criterion",
            format!("sample {i} has no {} score (NaN)", criterion.name()),
        ));
    }
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(seed, b"select-ties"));
    let ties: Vec<u64> = (0..scored.len()).map(|_| rng.random()).collect();
    // Only `flag` ranks flagged samples first; a threshold then counts on the score alone, so
    // the flagged samples it passes lead and a flagged sample below it is not selected.
    let flag_first = criterion == Criterion::Flag;
    let passes = |i: usize| match amount {
        Amount::Threshold(t) => scored[i].0 >= t,
        Amount::Top(_) => true,
    };
    let mut order: Vec<usize> = (0..scored.len()).collect();
    order.sort_by(|&a, &b| {
        passes(b)
            .cmp(&passes(a))
            .then((flag_first && scored[b].1).cmp(&(flag_first && scored[a].1)))
            .then(scored[b].0.total_cmp(&scored[a].0))
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
        assert!(rank(&[(f64::NAN, false)], Criterion::Loss, Amount::Top(1), 0).is_err());
    }
}

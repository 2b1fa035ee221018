//! Flag ranking quality where rarity and neglect differ (`tailscope study` with a `[ranking]`
//! spec, `analyses/ranking-study.toml`).
//!
//! For every rare share and seed: a synthetic corpus with contrasts (`corpus synth --contrasts`:
//! a rare domain a model learns, a frequent-vocabulary domain it cannot, and the `neglected`
//! ground truth), a base model trained on it, the NTK and analysis of a pool of validation
//! sentences, and each criterion's ranking of the pool ([`crate::analysis::select::rank`], the
//! order `select` uses) scored by average precision and AUROC against `neglected`. Nothing is fitted
//! (the flag score's weights and thresholds are the defaults), so the development seeds
//! (`fit_seeds`, 1–2 by default) are reported apart and the summary uses the other seeds only.
//!
//! Outputs under `out`: `share-S/seed-N/{corpus.parquet, base, ntk, analysis}`,
//! `ranking.parquet` (share, seed, criterion, ap, auroc, positives, n, held_out),
//! `summary.parquet` (criterion, share or `all`, AP and AUROC means with t intervals over the
//! held-out seeds), `comparisons.parquet` (flag − each other criterion, AP and AUROC, paired by
//! share and seed), and `ranking.md`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use polars::prelude::{Column, DataFrame};
use serde::Deserialize;
use tch::Device;

use super::{t_interval, Interval};
use crate::analysis::select::{self, Amount, Criterion, Sources};
use crate::corpus::{Corpus, SplitChoice};
use crate::error::{Error, Result};
use crate::model::ExpertConfig;
use crate::progress::Progress;
use crate::train::spec::{DataSpec, ModelSpec};
use crate::train::{self, RunSpec, TrainData, TrainOptions, TrainSpec};

/// A ranking study spec: `[ranking]`, `[model]`, `[train]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankingSpec {
    /// `[ranking]`.
    pub ranking: RankingSettings,
    /// `[model]`: the base model's shape.
    pub model: ModelSpec,
    /// `[train]`: its training.
    pub train: TrainOptions,
}

/// `[ranking]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankingSettings {
    /// Seeds (corpus, model and pool per seed).
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Development seeds, reported apart from the summary.
    #[serde(default = "default_fit_seeds")]
    pub fit_seeds: Vec<u64>,
    /// Shares of the rare domains.
    #[serde(default = "default_shares")]
    pub rare_shares: Vec<f64>,
    /// Sentences per corpus.
    #[serde(default = "default_samples")]
    pub samples: usize,
    /// Tokenizer vocabulary.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Validation sentences analysed and ranked.
    #[serde(default = "default_pool")]
    pub pool: usize,
    /// Validation sentences of the training runs' perplexity.
    #[serde(default = "default_eval")]
    pub eval_samples: usize,
    /// The criteria ranked.
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
fn default_criteria() -> Vec<Criterion> {
    Criterion::ALL.to_vec()
}

impl RankingSpec {
    /// Read and check a spec.
    pub fn read(path: &Path) -> Result<RankingSpec> {
        let s: RankingSpec = crate::io::read_toml(path)?;
        s.check().map_err(|e| Error::in_file(path, e.to_string()))?;
        Ok(s)
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
        if r.rare_shares.is_empty() || r.rare_shares.iter().any(|&s| !(s > 0.0 && s < 0.5)) {
            return Err(Error::invalid(
                "ranking.rare_shares",
                "give shares in (0, 0.5)",
            ));
        }
        if r.criteria.is_empty() || !r.criteria.contains(&Criterion::Flag) {
            return Err(Error::invalid(
                "ranking.criteria",
                "must include flag (the comparisons are flag against the others)",
            ));
        }
        self.base_spec(Path::new("corpus.parquet")).check()
    }

    fn base_spec(&self, corpus: &Path) -> TrainSpec {
        TrainSpec {
            data: DataSpec {
                corpus: corpus.to_path_buf(),
                tokenizer: None,
                eval_samples: self.ranking.eval_samples,
            },
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
}

/// One ranking's quality.
#[derive(Debug, Clone, PartialEq)]
pub struct RankRow {
    /// Rare share of the corpus.
    pub share: f64,
    /// Seed.
    pub seed: u64,
    /// Criterion.
    pub criterion: String,
    /// Average precision against `neglected`.
    pub ap: f64,
    /// AUROC against `neglected`.
    pub auroc: f64,
    /// Neglected sentences in the pool.
    pub positives: usize,
    /// Pool size.
    pub n: usize,
    /// Whether the seed is a held-out (not a development) seed.
    pub held_out: bool,
}

/// A criterion's mean quality over the held-out seeds (one share, or `None`: all shares).
#[derive(Debug, Clone, PartialEq)]
pub struct RankSummary {
    /// Criterion.
    pub criterion: String,
    /// The share, or `None` for all shares pooled.
    pub share: Option<f64>,
    /// Average precision.
    pub ap: Interval,
    /// AUROC.
    pub auroc: Interval,
}

/// flag − another criterion, paired by (share, seed), over the held-out seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct RankComparison {
    /// The other criterion.
    pub other: String,
    /// The share, or `None` for all shares pooled.
    pub share: Option<f64>,
    /// AP(flag) − AP(other).
    pub ap: Interval,
    /// AUROC(flag) − AUROC(other).
    pub auroc: Interval,
}

/// A finished ranking study.
#[derive(Debug, Clone)]
pub struct RankingStudy {
    /// Every ranking.
    pub rows: Vec<RankRow>,
    /// Held-out means.
    pub summary: Vec<RankSummary>,
    /// Flag against the others.
    pub comparisons: Vec<RankComparison>,
}

fn share_name(s: f64) -> String {
    format!("{s}")
}

/// Run the study (reusing finished base models) and write its tables.
pub fn run(
    spec: &RankingSpec,
    device: Device,
    stop: &AtomicBool,
    progress: &dyn Progress,
    train_progress: &dyn train::Progress,
    mut say: impl FnMut(&str),
) -> Result<RankingStudy> {
    let r = &spec.ranking;
    let mut rows = Vec::new();
    for &share in &r.rare_shares {
        for &seed in &r.seeds {
            let dir = r
                .out
                .join(format!("share-{}", share_name(share)))
                .join(format!("seed-{seed}"));
            say(&format!("rare share {share}, seed {seed}"));
            let corpus = dir.join("corpus.parquet");
            if !corpus.exists() {
                crate::corpus::synth::write_corpus(
                    &crate::corpus::synth::SynthOptions {
                        samples: r.samples,
                        rare_share: share,
                        seed,
                        contrasts: true,
                        ..Default::default()
                    },
                    r.vocab_size,
                    &corpus,
                    progress,
                )?;
            }
            let data = TrainData::load(&corpus, None)?;
            let base_spec = spec.base_spec(&corpus);
            super::train_to_end(&base_spec, &data, &dir, device, seed, stop, train_progress)?;
            let pool = super::analyse_pool(
                &dir.join("base").join("final"),
                &corpus,
                SplitChoice::Validation,
                r.pool,
                0,
                200,
                seed,
                &dir,
                device,
                progress,
            )?;
            let c = Corpus::read(&corpus)?;
            let truth_of: HashMap<&str, bool> = c
                .samples
                .iter()
                .filter_map(|s| s.neglected.map(|t| (s.id.as_str(), t)))
                .collect();
            let truth: Vec<bool> = pool
                .ids
                .iter()
                .map(|id| {
                    truth_of.get(id.as_str()).copied().ok_or_else(|| {
                        Error::in_file(&corpus, format!("sample {id:?} has no `neglected` truth"))
                    })
                })
                .collect::<Result<_>>()?;
            for &crit in &r.criteria {
                // An undefined score (a GC of a group too small to have one) ranks last.
                let scored: Vec<(f64, bool)> =
                    select::scores(&pool, crit, &Sources::default(), device, seed)?
                        .into_iter()
                        .map(|(x, f)| (if x.is_nan() { f64::NEG_INFINITY } else { x }, f))
                        .collect();
                let ranked = select::rank(&scored, crit, Amount::Top(0), seed)?;
                let ordered: Vec<bool> = ranked.order.iter().map(|&i| truth[i]).collect();
                let (Some(ap), Some(auroc)) = (
                    crate::stats::average_precision(&ordered),
                    crate::stats::auroc(&ordered),
                ) else {
                    return Err(Error::invalid(
                        "ranking.pool",
                        format!(
                            "the pool of share {share}, seed {seed} lacks neglected or learned \
                             sentences; raise ranking.pool"
                        ),
                    ));
                };
                rows.push(RankRow {
                    share,
                    seed,
                    criterion: crit.name().into(),
                    ap,
                    auroc,
                    positives: truth.iter().filter(|&&t| t).count(),
                    n: truth.len(),
                    held_out: !r.fit_seeds.contains(&seed),
                });
            }
        }
    }
    let study = summarise(rows, &r.rare_shares);
    write(&study, &r.out)?;
    Ok(study)
}

/// Held-out means per criterion (per share and pooled) and flag − each other criterion.
pub fn summarise(rows: Vec<RankRow>, shares: &[f64]) -> RankingStudy {
    let mut crits: Vec<String> = Vec::new();
    for r in &rows {
        if !crits.contains(&r.criterion) {
            crits.push(r.criterion.clone());
        }
    }
    let scopes: Vec<Option<f64>> = shares
        .iter()
        .map(|&s| Some(s))
        .chain(std::iter::once(None))
        .collect();
    let pick = |c: &str, scope: Option<f64>| -> Vec<&RankRow> {
        let mut v: Vec<&RankRow> = rows
            .iter()
            .filter(|r| r.held_out && r.criterion == c && scope.is_none_or(|s| r.share == s))
            .collect();
        v.sort_by(|a, b| a.share.total_cmp(&b.share).then(a.seed.cmp(&b.seed)));
        v
    };
    let mut summary = Vec::new();
    let mut comparisons = Vec::new();
    for &scope in &scopes {
        let flag = pick("flag", scope);
        for c in &crits {
            let v = pick(c, scope);
            if v.is_empty() {
                continue;
            }
            summary.push(RankSummary {
                criterion: c.clone(),
                share: scope,
                ap: t_interval(&v.iter().map(|r| r.ap).collect::<Vec<_>>()),
                auroc: t_interval(&v.iter().map(|r| r.auroc).collect::<Vec<_>>()),
            });
            if c != "flag" && v.len() == flag.len() {
                let d = |f: &dyn Fn(&RankRow) -> f64| -> Vec<f64> {
                    flag.iter().zip(&v).map(|(a, b)| f(a) - f(b)).collect()
                };
                comparisons.push(RankComparison {
                    other: c.clone(),
                    share: scope,
                    ap: t_interval(&d(&|r| r.ap)),
                    auroc: t_interval(&d(&|r| r.auroc)),
                });
            }
        }
    }
    RankingStudy {
        rows,
        summary,
        comparisons,
    }
}

fn fmt(i: &Interval) -> String {
    format!("{:.3} [{:.3}, {:.3}]", i.mean, i.low, i.high)
}

impl RankingStudy {
    /// The held-out summary (all shares pooled) and flag's differences, as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| criterion | AP | AUROC | AP(flag) − AP(criterion) | AUROC(flag) − AUROC(criterion) |\n|---|---|---|---|---|\n",
        );
        for r in self.summary.iter().filter(|r| r.share.is_none()) {
            let c = self
                .comparisons
                .iter()
                .find(|c| c.share.is_none() && c.other == r.criterion);
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                r.criterion,
                fmt(&r.ap),
                fmt(&r.auroc),
                c.map_or("–".into(), |c| format!(
                    "{:+.3} [{:+.3}, {:+.3}]",
                    c.ap.mean, c.ap.low, c.ap.high
                )),
                c.map_or("–".into(), |c| format!(
                    "{:+.3} [{:+.3}, {:+.3}]",
                    c.auroc.mean, c.auroc.low, c.auroc.high
                )),
            ));
        }
        s
    }
}

fn share_column(v: impl Iterator<Item = Option<f64>>) -> Column {
    Column::new(
        "share".into(),
        v.map(|s| s.map_or("all".to_string(), share_name))
            .collect::<Vec<_>>(),
    )
}

/// Write the tables and `ranking.md` into `out`.
pub fn write(s: &RankingStudy, out: &Path) -> Result<()> {
    let r = &s.rows;
    let mut rows = DataFrame::new(
        r.len(),
        vec![
            Column::new(
                "share".into(),
                r.iter().map(|x| x.share).collect::<Vec<_>>(),
            ),
            Column::new("seed".into(), r.iter().map(|x| x.seed).collect::<Vec<_>>()),
            Column::new(
                "criterion".into(),
                r.iter().map(|x| x.criterion.as_str()).collect::<Vec<_>>(),
            ),
            Column::new("ap".into(), r.iter().map(|x| x.ap).collect::<Vec<_>>()),
            Column::new(
                "auroc".into(),
                r.iter().map(|x| x.auroc).collect::<Vec<_>>(),
            ),
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
    let mut cols = vec![
        Column::new(
            "criterion".into(),
            s.summary
                .iter()
                .map(|x| x.criterion.as_str())
                .collect::<Vec<_>>(),
        ),
        share_column(s.summary.iter().map(|x| x.share)),
    ];
    cols.extend(super::interval_columns(
        "ap",
        &s.summary.iter().map(|x| &x.ap).collect::<Vec<_>>(),
    ));
    cols.extend(super::interval_columns(
        "auroc",
        &s.summary.iter().map(|x| &x.auroc).collect::<Vec<_>>(),
    ));
    let mut summary =
        DataFrame::new(s.summary.len(), cols).map_err(|e| Error::table("ranking summary", e))?;
    crate::io::write_parquet(&mut summary, out.join("summary.parquet"))?;
    let c = &s.comparisons;
    let mut cols = vec![
        Column::new(
            "other".into(),
            c.iter().map(|x| x.other.as_str()).collect::<Vec<_>>(),
        ),
        share_column(c.iter().map(|x| x.share)),
    ];
    cols.extend(super::interval_columns(
        "ap_diff",
        &c.iter().map(|x| &x.ap).collect::<Vec<_>>(),
    ));
    cols.extend(super::interval_columns(
        "auroc_diff",
        &c.iter().map(|x| &x.auroc).collect::<Vec<_>>(),
    ));
    let mut comparisons =
        DataFrame::new(c.len(), cols).map_err(|e| Error::table("ranking comparisons", e))?;
    crate::io::write_parquet(&mut comparisons, out.join("comparisons.parquet"))?;
    crate::io::write_atomic(out.join("ranking.md"), s.markdown().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_uses_held_out_seeds_and_pairs_by_share_and_seed() {
        let row = |share, seed, c: &str, ap| RankRow {
            share,
            seed,
            criterion: c.into(),
            ap,
            auroc: ap,
            positives: 5,
            n: 10,
            held_out: seed > 2,
        };
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
        let s = summarise(rows, &[0.1, 0.2]);
        let flag_all = s
            .summary
            .iter()
            .find(|r| r.criterion == "flag" && r.share.is_none())
            .unwrap();
        // Seed 1 (development) is left out: (0.9 + 0.8 + 0.7 + 0.6) / 4.
        assert!((flag_all.ap.mean - 0.75).abs() < 1e-12);
        let d = s
            .comparisons
            .iter()
            .find(|c| c.other == "loss" && c.share.is_none())
            .unwrap();
        // Pairs (0.4, 0.2, 0.1, 0.2): mean 0.225.
        assert!((d.ap.mean - 0.225).abs() < 1e-12, "{d:?}");
        let per_share = s
            .comparisons
            .iter()
            .find(|c| c.other == "loss" && c.share == Some(0.1))
            .unwrap();
        assert!((per_share.ap.mean - 0.3).abs() < 1e-12);
        assert!(s.markdown().contains("| flag | 0.750"));
    }
}

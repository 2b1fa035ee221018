//! Data-frequency statistics (`tailscope freq`): token n-gram counts, per-sample sentence
//! frequency scores, per-domain shares and the long-tail domains by the elbow of the share curve.
//!
//! Outputs (all written atomically into one directory):
//! - `scores.parquet`: id, domain, split, n_tokens, domain_long_tail, `score_<n>gram` per order
//!   (null for samples shorter than n tokens);
//! - `ngrams.parquet`: order, ids (space-separated token ids), ngram (decoded text), count, freq;
//! - `domains.parquet`: domain, samples, tokens, share, rank, long_tail;
//! - `summary.json`: the options, totals, threshold and long-tail domains.

pub mod domains;
pub mod ngram;

use std::path::Path;

use polars::prelude::{Column, DataFrame};
use tokenizers::Tokenizer;

pub use domains::{domain_shares, elbow, DomainShare, ShareBy};
pub use ngram::{NgramCounts, Norm};

use crate::corpus::{Corpus, Split};
use crate::error::{Error, Result};
use crate::io;

/// Which samples the n-gram counts are taken over. Scores are given for every sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CountOn {
    /// The training split only (default): the frequencies the model sees while training.
    #[default]
    Train,
    /// Every sample.
    All,
}

/// How frequency scores and long-tail domains are computed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FreqOptions {
    /// N-gram orders, each in 1..=3.
    pub orders: Vec<usize>,
    /// How counts are normalised.
    pub norm: Norm,
    /// Which samples the counts come from.
    pub count_on: CountOn,
    /// Domain shares by tokens or by samples.
    pub share_by: ShareBy,
}

impl Default for FreqOptions {
    fn default() -> Self {
        FreqOptions {
            orders: vec![1, 2, 3],
            norm: Norm::Max,
            count_on: CountOn::Train,
            share_by: ShareBy::Tokens,
        }
    }
}

/// Everything `freq` computes.
#[derive(Debug, Clone)]
pub struct FreqReport {
    /// The options used.
    pub options: FreqOptions,
    /// N-gram counts per order.
    pub counts: Vec<NgramCounts>,
    /// `scores[k][i]`: score of sample i for `options.orders[k]`.
    pub scores: Vec<Vec<Option<f64>>>,
    /// Domains by share, with their long-tail flag.
    pub domains: Vec<DomainShare>,
    /// The elbow's share, when the curve has one.
    pub threshold: Option<f64>,
}

/// `tailscope freq` as a function: read the corpus at `corpus_path`, encode it with its tokenizer
/// (`tokenizer_path`, default the one beside the corpus) and compute the statistics. Returns the
/// corpus and the tokenizer with the report ([`FreqReport::write`] needs both).
pub fn compute_file(
    corpus_path: &Path,
    tokenizer_path: Option<&Path>,
    options: FreqOptions,
    progress: &dyn crate::progress::Progress,
) -> Result<(FreqReport, Corpus, Tokenizer)> {
    let corpus = Corpus::read(corpus_path)?;
    let tok_path = tokenizer_path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| crate::corpus::tokenizer::default_path(corpus_path));
    let tok = crate::corpus::tokenizer::load(&tok_path)?;
    let texts: Vec<&str> = corpus.samples.iter().map(|s| s.text.as_str()).collect();
    progress.start("tokenizing", Some(texts.len() as u64));
    let ids = crate::corpus::tokenizer::encode_with_progress(&tok, &texts, &|d| {
        progress.advance_to(d as u64)
    })?;
    progress.finish();
    progress.start("counting n-grams", None);
    let report = compute(&corpus, &ids, options)?;
    progress.finish();
    Ok((report, corpus, tok))
}

/// Compute counts, scores and domain shares. `ids[i]` are the token ids of sample i.
pub fn compute(corpus: &Corpus, ids: &[Vec<u32>], options: FreqOptions) -> Result<FreqReport> {
    if options.orders.is_empty() {
        return Err(Error::invalid("--orders", "give at least one n-gram order"));
    }
    let counted: Vec<&[u32]> = corpus
        .samples
        .iter()
        .zip(ids)
        .filter(|(s, _)| options.count_on == CountOn::All || s.split == Split::Train)
        .map(|(_, v)| v.as_slice())
        .collect();
    if counted.is_empty() {
        return Err(Error::invalid(
            "--count-on",
            "the training split is empty; use --count-on all",
        ));
    }
    let mut counts = Vec::new();
    let mut scores = Vec::new();
    for &order in &options.orders {
        let table = NgramCounts::count(&counted, order)?;
        let s: Vec<Option<f64>> = {
            use rayon::prelude::*;
            ids.par_iter()
                .map(|v| table.score(v, options.norm))
                .collect()
        };
        counts.push(table);
        scores.push(s);
    }
    let (domains, threshold) = domain_shares(corpus, options.share_by);
    Ok(FreqReport {
        options,
        counts,
        scores,
        domains,
        threshold,
    })
}

impl FreqReport {
    /// The long-tail domains.
    pub fn long_tail_domains(&self) -> Vec<&str> {
        self.domains
            .iter()
            .filter(|d| d.long_tail)
            .map(|d| d.domain.as_str())
            .collect()
    }

    /// Write the four outputs into `dir` (created if needed).
    pub fn write(&self, dir: &Path, corpus: &Corpus, tok: &Tokenizer) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        io::write_parquet(&mut self.scores_frame(corpus)?, dir.join("scores.parquet"))?;
        io::write_parquet(&mut self.ngrams_frame(tok)?, dir.join("ngrams.parquet"))?;
        io::write_parquet(&mut self.domains_frame()?, dir.join("domains.parquet"))?;
        let json = serde_json::to_string_pretty(&self.summary(corpus))
            .map_err(|e| Error::invalid("summary", e.to_string()))?;
        io::write_atomic(dir.join("summary.json"), json.as_bytes())
    }

    fn scores_frame(&self, corpus: &Corpus) -> Result<DataFrame> {
        let s = &corpus.samples;
        let lt: std::collections::HashSet<&str> = self.long_tail_domains().into_iter().collect();
        let refs: Vec<&crate::corpus::Sample> = s.iter().collect();
        let mut cols = crate::corpus::sample_columns(&refs);
        cols.push(Column::new(
            "domain_long_tail".into(),
            s.iter()
                .map(|x| lt.contains(x.domain.as_str()))
                .collect::<Vec<_>>(),
        ));
        for (order, sc) in self.options.orders.iter().zip(&self.scores) {
            cols.push(Column::new(format!("score_{order}gram").into(), sc.clone()));
        }
        DataFrame::new(s.len(), cols).map_err(|e| Error::table("building scores", e))
    }

    fn ngrams_frame(&self, tok: &Tokenizer) -> Result<DataFrame> {
        // Decode each vocabulary entry once; an n-gram's text is the concatenation.
        let vocab = tok.get_vocab_size(true) as u32;
        let pieces: Vec<String> = (0..vocab)
            .map(|id| tok.decode(&[id], false).unwrap_or_default())
            .collect();
        let (mut order, mut ids, mut text, mut count, mut freq) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for table in &self.counts {
            let mut rows: Vec<(&u64, &u64)> = table.counts.iter().collect();
            // Most frequent first; ties by key so the file is deterministic.
            rows.sort_unstable_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            for (&key, &c) in rows {
                let unpacked = ngram::unpack(key, table.order);
                order.push(table.order as u32);
                ids.push(
                    unpacked
                        .iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                );
                text.push(
                    unpacked
                        .iter()
                        .map(|&i| pieces.get(i as usize).map(String::as_str).unwrap_or("?"))
                        .collect::<String>(),
                );
                count.push(c);
                freq.push(self.options.norm.apply(c, table.max, table.total));
            }
        }
        let n = order.len();
        DataFrame::new(
            n,
            vec![
                Column::new("order".into(), order),
                Column::new("ids".into(), ids),
                Column::new("ngram".into(), text),
                Column::new("count".into(), count),
                Column::new("freq".into(), freq),
            ],
        )
        .map_err(|e| Error::table("building ngrams", e))
    }

    fn domains_frame(&self) -> Result<DataFrame> {
        let d = &self.domains;
        DataFrame::new(
            d.len(),
            vec![
                Column::new(
                    "domain".into(),
                    d.iter().map(|x| x.domain.as_str()).collect::<Vec<_>>(),
                ),
                Column::new(
                    "samples".into(),
                    d.iter().map(|x| x.samples).collect::<Vec<_>>(),
                ),
                Column::new(
                    "tokens".into(),
                    d.iter().map(|x| x.tokens).collect::<Vec<_>>(),
                ),
                Column::new(
                    "share".into(),
                    d.iter().map(|x| x.share).collect::<Vec<_>>(),
                ),
                Column::new(
                    "rank".into(),
                    d.iter().map(|x| x.rank as u32).collect::<Vec<_>>(),
                ),
                Column::new(
                    "long_tail".into(),
                    d.iter().map(|x| x.long_tail).collect::<Vec<_>>(),
                ),
            ],
        )
        .map_err(|e| Error::table("building domains", e))
    }

    /// The machine-readable summary (also the source of the printed one).
    pub fn summary(&self, corpus: &Corpus) -> serde_json::Value {
        let orders: Vec<serde_json::Value> = self
            .options
            .orders
            .iter()
            .zip(&self.counts)
            .zip(&self.scores)
            .map(|((o, c), s)| {
                let q = quantiles(s);
                serde_json::json!({
                    "order": o,
                    "distinct": c.counts.len(),
                    "occurrences": c.total,
                    "max_count": c.max,
                    "score_mean": q.mean,
                    "score_p10": q.p10,
                    "score_median": q.p50,
                    "score_p90": q.p90,
                    "scored_samples": q.n,
                })
            })
            .collect();
        serde_json::json!({
            "options": self.options,
            "samples": corpus.len(),
            "tokens": corpus.samples.iter().map(|s| u64::from(s.n_tokens)).sum::<u64>(),
            "domains": self.domains,
            "long_tail_threshold": self.threshold,
            "long_tail_domains": self.long_tail_domains(),
            "orders": orders,
        })
    }
}

/// Mean and quantiles of the defined values (nearest-rank quantiles).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quantiles {
    /// Values present.
    pub n: usize,
    /// Their mean.
    pub mean: f64,
    /// 10th percentile.
    pub p10: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
}

/// Summary of the values present (`None`: samples too short for the order).
pub fn quantiles(values: &[Option<f64>]) -> Quantiles {
    let mut v: Vec<f64> = values.iter().flatten().copied().collect();
    if v.is_empty() {
        return Quantiles::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Quantiles {
        n: v.len(),
        mean: v.iter().sum::<f64>() / v.len() as f64,
        p10: at(0.1),
        p50: at(0.5),
        p90: at(0.9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_nearest_rank() {
        let v: Vec<Option<f64>> = (1..=10).map(|i| Some(i as f64)).chain([None]).collect();
        let q = quantiles(&v);
        assert_eq!((q.n, q.p10, q.p50, q.p90), (10, 1.0, 5.0, 9.0));
        assert!((q.mean - 5.5).abs() < 1e-12);
    }
}

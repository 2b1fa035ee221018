//! GC per group of samples: the groups (frequency bins, domains, the long-tail flag, experts,
//! clusters), the GC and interval of each ([`GcRow`]) and the table `gc.parquet` holds. Below
//! [`super::pipeline`] and [`super::diagnostics`], which both read the rows.

use std::collections::{BTreeMap, HashSet};

use polars::prelude::{Column, DataFrame};

use super::gc::{self, IntervalMethod, Principal};
use super::op::KernelOp;
use crate::capture::job::Job;
use crate::error::{Error, Result};
use crate::freq::{domain_shares, ShareBy};
use crate::progress::Progress;

/// One row of `gc.parquet`: the GC of one group of samples.
#[derive(Debug, Clone, PartialEq)]
pub struct GcRow {
    /// The grouping column (`freq_bin`, `domain`, `long_tail`, `expert_h{i}`, `cluster`).
    pub column: String,
    /// The group's label in that column.
    pub group: String,
    /// Members.
    pub n: u64,
    /// GC of the group (`None` when undefined).
    pub gc: Option<f64>,
    /// The group's 95% interval.
    pub interval: Option<(f64, f64)>,
    /// Participation ratio of the principal eigenvector of the group's own kernel.
    pub participation: Option<f64>,
    /// Top eigenvalue of the group's own kernel as a share of its trace.
    pub top_share: Option<f64>,
    /// Σ u′ / Σ |u′| of the group's own principal eigenvector ([`gc::SubsetGc::sign_margin`]).
    pub sign_margin: Option<f64>,
    /// Mean 1-gram frequency score of the members.
    pub mean_freq_score: f64,
}

/// The frequency bin of each sample ([`quantile_bins`]), warning with their count when some
/// samples have no frequency score: those are in no bin (no `freq_bin` group, and null
/// `freq_score` and `freq_bin` in the sample table), rather than counted as the rarest.
pub(super) fn frequency_bins(scores: &[Option<f64>], bins: usize) -> Vec<Option<usize>> {
    let missing = scores.iter().filter(|s| s.is_none()).count();
    if missing > 0 {
        tracing::warn!(
            "{missing} of {} samples have no frequency score (no tokens to count): they are left out of the frequency bins, with null freq_score and freq_bin in samples.parquet",
            scores.len()
        );
    }
    quantile_bins(scores, bins)
}

/// A group of samples GC is computed for: (column, label, member indices).
pub(super) type Group = (String, String, Vec<usize>);

/// The frequency-bin groups, in order of the bin; samples in no bin are in none of them.
fn freq_groups(bins: &[Option<usize>]) -> Vec<Group> {
    let mut m: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, b) in bins.iter().enumerate() {
        if let Some(b) = b {
            m.entry(*b).or_default().push(i);
        }
    }
    m.into_iter()
        .map(|(b, v)| ("freq_bin".to_string(), b.to_string(), v))
        .collect()
}

/// The groups: frequency bins, domains, long-tail flag, and every integer annotation.
pub(super) fn groups(
    job: &Job,
    bins: &[Option<usize>],
    extra: &[(String, Vec<i64>)],
) -> Vec<Group> {
    let (shares, _) = domain_shares(&job.corpus, ShareBy::Tokens);
    let lt: HashSet<&str> = shares
        .iter()
        .filter(|d| d.long_tail)
        .map(|d| d.domain.as_str())
        .collect();
    let samples = job.samples();
    let mut groups: Vec<Group> = freq_groups(bins);
    let mut by = |column: &str, labels: Vec<String>| {
        let mut m: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, l) in labels.into_iter().enumerate() {
            m.entry(l).or_default().push(i);
        }
        for (l, v) in m {
            groups.push((column.to_string(), l, v));
        }
    };
    by("domain", samples.iter().map(|s| s.domain.clone()).collect());
    by(
        "long_tail",
        samples
            .iter()
            .map(|s| lt.contains(s.domain.as_str()).to_string())
            .collect(),
    );
    for (name, r) in extra {
        by(name, r.iter().map(|e| e.to_string()).collect());
    }
    groups
}

/// How the groups' GC intervals are resampled (`NtkOptions`' `interval`, `gc_resamples`, `seed`).
pub(super) struct Resampling {
    /// Jackknife or half-sampling.
    pub method: IntervalMethod,
    /// Number of resamples.
    pub resamples: usize,
    /// Seed of the resamples.
    pub seed: u64,
}

/// GC and its interval for every group.
pub(super) fn gc_rows(
    k: &dyn KernelOp,
    whole: &Principal,
    groups: &[Group],
    scores: &[Option<f64>],
    r: &Resampling,
    progress: &dyn Progress,
) -> Result<Vec<GcRow>> {
    progress.start(&format!("GC intervals ({} resamples)", r.resamples), None);
    let refs: Vec<&[usize]> = groups.iter().map(|g| g.2.as_slice()).collect();
    let (method, resamples, seed) = (r.method, r.resamples, r.seed);
    let intervals = gc::gc_intervals(k, whole, &refs, method, resamples, 0.05, seed)?;
    progress.finish();
    let subsets = gc::subsets(k, whole, &refs)?;
    let mut rows = Vec::with_capacity(groups.len());
    for (((column, group, members), interval), sub) in groups.iter().zip(intervals).zip(subsets) {
        let mean = mean_score(members, scores);
        rows.push(GcRow {
            column: column.clone(),
            group: group.clone(),
            n: members.len() as u64,
            gc: sub.map(|s| s.gc),
            interval,
            participation: sub.map(|s| s.participation),
            top_share: sub.map(|s| s.top_share),
            sign_margin: sub.map(|s| s.sign_margin),
            mean_freq_score: mean,
        });
    }
    Ok(rows)
}

/// The mean frequency score of `members` over those that have one; NaN where none has.
fn mean_score(members: &[usize], scores: &[Option<f64>]) -> f64 {
    let scored: Vec<f64> = members.iter().filter_map(|&i| scores[i]).collect();
    if scored.is_empty() {
        return f64::NAN;
    }
    scored.iter().sum::<f64>() / scored.len() as f64
}

/// Quantile bin (0 = lowest) of each value, `bins` bins of near-equal size; `None` for a
/// missing value, which is in no bin and not counted. A value's bin is ⌊bins · b / m⌋, where b
/// is the number of the m present values strictly below it: tied values share one bin (the one
/// their lowest rank falls in), whatever their order, so ties across a bin edge make the bins
/// unequal, and a bin can be empty.
pub fn quantile_bins(values: &[Option<f64>], bins: usize) -> Vec<Option<usize>> {
    let mut sorted: Vec<f64> = values.iter().flatten().copied().collect();
    sorted.sort_by(f64::total_cmp);
    let m = sorted.len().max(1);
    values
        .iter()
        .map(|v| {
            let v = (*v)?;
            Some(sorted.partition_point(|x| x.total_cmp(&v).is_lt()) * bins / m)
        })
        .collect()
}

/// The GC table as `gc.parquet` holds it.
pub fn gc_frame(rows: &[GcRow]) -> Result<DataFrame> {
    let col = |name: &str, f: &dyn Fn(&GcRow) -> Option<f64>| {
        Column::new(name.into(), rows.iter().map(f).collect::<Vec<_>>())
    };
    DataFrame::new(
        rows.len(),
        vec![
            Column::new(
                "column".into(),
                rows.iter().map(|r| r.column.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "group".into(),
                rows.iter().map(|r| r.group.as_str()).collect::<Vec<_>>(),
            ),
            Column::new("n".into(), rows.iter().map(|r| r.n).collect::<Vec<_>>()),
            col("gc", &|r| r.gc),
            col("gc_low", &|r| r.interval.map(|x| x.0)),
            col("gc_high", &|r| r.interval.map(|x| x.1)),
            col("gc_width", &|r| r.interval.map(|x| x.1 - x.0)),
            col("participation", &|r| r.participation),
            col("top_share", &|r| r.top_share),
            col("sign_margin", &|r| r.sign_margin),
            Column::new(
                "mean_freq_score".into(),
                rows.iter().map(|r| r.mean_freq_score).collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("gc", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tied scores share a bin whatever the samples' order: four samples tied at the minimum
    /// of ten all land in bin 0 (by index, one of them went to bin 1); without ties the bins
    /// are of equal size.
    #[test]
    fn tied_scores_share_a_bin() {
        let plain: Vec<Option<f64>> = (0..10).map(|i| Some(i as f64)).collect();
        let b = quantile_bins(&plain, 5);
        assert_eq!(b, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4].map(Some).to_vec());
        let mut tied = plain.clone();
        for v in tied.iter_mut().take(4) {
            *v = Some(0.0);
        }
        tied.reverse();
        let b = quantile_bins(&tied, 5);
        assert_eq!(b, [4, 4, 3, 3, 2, 2, 0, 0, 0, 0].map(Some).to_vec());
        // A tie across the edge of bins 1 and 2 goes whole to bin 1.
        let edge: Vec<Option<f64>> = [0.0, 1.0, 2.0, 3.0, 3.0, 3.0, 6.0, 7.0, 8.0, 9.0]
            .map(Some)
            .to_vec();
        let b = quantile_bins(&edge, 5);
        assert_eq!(b, [0, 0, 1, 1, 1, 1, 3, 3, 4, 4].map(Some).to_vec());
    }

    /// A sample with no frequency score is in no bin, is not counted in the others' bins, and is
    /// in no frequency-bin group; the group means leave it out.
    #[test]
    fn samples_without_a_frequency_score_are_in_no_bin() {
        let scores = [Some(0.0), None, Some(1.0), Some(2.0), None, Some(3.0)];
        let b = quantile_bins(&scores, 2);
        assert_eq!(b, vec![Some(0), None, Some(0), Some(1), None, Some(1)]);
        let g = freq_groups(&b);
        let members: Vec<(&str, &[usize])> = g
            .iter()
            .map(|(_, l, m)| (l.as_str(), m.as_slice()))
            .collect();
        assert_eq!(members, [("0", &[0, 2][..]), ("1", &[3, 5][..])]);
        assert!(g.iter().all(|(c, _, _)| c == "freq_bin"));
        assert_eq!(mean_score(&[0, 1, 2], &scores), 0.5);
        assert!(mean_score(&[1, 4], &scores).is_nan());
        assert_eq!(quantile_bins(&[None, None], 3), vec![None, None]);
    }
}

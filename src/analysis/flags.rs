//! Under-memorised long-tail flags. A sample is flagged when it is
//! 1. rare: its frequency percentile (the fraction of the other samples whose score is strictly
//!    below its own, so samples tied at the lowest score are at 0) is below `rare_quantile`, or
//!    its domain is long-tail (when `long_tail_domains` is on); a sample with no frequency score
//!    (NaN) is rare only by its domain;
//! 2. poorly aligned: its alignment cos(g(X), J_i) is in the lowest `align_quantile`;
//! 3. poorly fitted: its loss exceeds the median loss of its frequency-bin peers by at least
//!    `loss_z` robust standard deviations (1.4826 × the bin's median absolute deviation).
//!
//! Defaults: rare_quantile 0.2, long-tail domains on, align_quantile 0.5, loss_z 0.5. Flags are
//! ranked by (1 − frequency percentile) + (1 − alignment percentile) + the loss z-score, and each
//! carries its reasons with the values behind them.

use serde::{Deserialize, Serialize};

/// The flag rule's thresholds (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FlagOptions {
    /// Rare: frequency score below this quantile.
    pub rare_quantile: f64,
    /// Also count samples of long-tail domains as rare.
    pub long_tail_domains: bool,
    /// Poorly aligned: alignment below this quantile.
    pub align_quantile: f64,
    /// Poorly fitted: loss this many robust sd above its frequency bin's median.
    pub loss_z: f64,
}

impl Default for FlagOptions {
    fn default() -> Self {
        FlagOptions {
            rare_quantile: 0.2,
            long_tail_domains: true,
            align_quantile: 0.5,
            loss_z: 0.5,
        }
    }
}

/// What the flags need per sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleMetrics {
    /// 1-gram frequency score.
    pub freq_score: f64,
    /// Whether the sample's domain is long-tail.
    pub long_tail_domain: bool,
    /// Alignment with the principal gradient direction.
    pub alignment: f64,
    /// Mean token loss.
    pub loss: f64,
    /// Frequency bin (peers for the loss comparison; see [`peer_bins`] for samples without one).
    pub bin: usize,
}

/// A flagged sample, with why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Flag {
    /// Index of the sample in the analysed set.
    pub index: usize,
    /// Ranking score (higher: more neglected).
    pub rank_score: f64,
    /// Percentile of its frequency score ([`percentiles`]: the fraction of the other samples
    /// strictly below; NaN without a score).
    pub freq_percentile: f64,
    /// Percentile of its alignment ([`percentiles`]).
    pub align_percentile: f64,
    /// Robust z-score of its loss within its frequency bin.
    pub loss_z: f64,
    /// Which conditions hold, in words.
    pub reasons: Vec<String>,
}

/// The percentile of each value: the fraction of the other values strictly below it,
/// #{j ≠ i : v_j < v_i} / (n − 1). The lowest value, and every value tied with it, is at 0;
/// without ties this is (rank − 1) / (n − 1). A NaN (a missing value) has a NaN percentile and
/// is not counted among the n values of the others.
pub fn percentiles(v: &[f64]) -> Vec<f64> {
    let mut sorted: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    sorted.sort_by(f64::total_cmp);
    let others = sorted.len().saturating_sub(1).max(1) as f64;
    v.iter()
        .map(|&x| {
            if x.is_nan() {
                return f64::NAN;
            }
            sorted.partition_point(|&y| y < x) as f64 / others
        })
        .collect()
}

/// The loss-peer group of each sample from its frequency bin as a table holds it (`freq_bin`,
/// NaN where the sample has no frequency score and so no bin): its bin, and for samples with
/// no bin one group of their own after the last bin.
pub fn peer_bins(bins: &[f64]) -> Vec<usize> {
    let missing = bins
        .iter()
        .filter(|b| b.is_finite())
        .fold(0.0f64, |m, &b| m.max(b + 1.0)) as usize;
    bins.iter()
        .map(|&b| {
            if b.is_finite() {
                b.max(0.0) as usize
            } else {
                missing
            }
        })
        .collect()
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 0 {
        (v[m - 1] + v[m]) / 2.0
    } else {
        v[m]
    }
}

/// Every sample's rank score and whether it meets all three conditions, with the quantities
/// behind them: (flag, or `None` when not all conditions hold; rank score). The rank score
/// (1 − frequency percentile) + (1 − alignment percentile) + loss z is defined for every sample,
/// which is what `select --criterion flag` ranks by.
pub fn score_all(m: &[SampleMetrics], opts: &FlagOptions) -> Vec<(Option<Flag>, f64)> {
    let fp = percentiles(&m.iter().map(|s| s.freq_score).collect::<Vec<_>>());
    let ap = percentiles(&m.iter().map(|s| s.alignment).collect::<Vec<_>>());
    let n_bins = m.iter().map(|s| s.bin).max().map_or(0, |b| b + 1);
    let mut stats = vec![(0.0, 1.0); n_bins];
    for (b, st) in stats.iter_mut().enumerate() {
        let mut l: Vec<f64> = m.iter().filter(|s| s.bin == b).map(|s| s.loss).collect();
        let med = median(&mut l);
        let mut dev: Vec<f64> = l.iter().map(|x| (x - med).abs()).collect();
        let mad = median(&mut dev) * 1.4826;
        *st = (med, if mad > 0.0 { mad } else { 1.0 });
    }
    m.iter()
        .enumerate()
        .map(|(i, s)| {
            let (med, scale) = stats[s.bin];
            let z = (s.loss - med) / scale;
            let score = (1.0 - fp[i]) + (1.0 - ap[i]) + z;
            let rare_freq = fp[i] < opts.rare_quantile;
            let rare_dom = opts.long_tail_domains && s.long_tail_domain;
            let misaligned = ap[i] < opts.align_quantile;
            let unfit = z >= opts.loss_z;
            if !((rare_freq || rare_dom) && misaligned && unfit) {
                return (None, score);
            }
            let mut reasons = Vec::new();
            if rare_freq {
                reasons.push(format!("rare: frequency score {:.4} (percentile {:.2})", s.freq_score, fp[i]));
            }
            if rare_dom {
                reasons.push("rare: long-tail domain".to_string());
            }
            reasons.push(format!("poorly aligned: alignment {:.3} (percentile {:.2})", s.alignment, ap[i]));
            reasons.push(format!("poorly fitted: loss {:.3}, {z:.2} robust sd above its frequency bin's median {med:.3}", s.loss));
            let flag = Flag { index: i, rank_score: score, freq_percentile: fp[i], align_percentile: ap[i], loss_z: z, reasons };
            (Some(flag), score)
        })
        .collect()
}

/// Flag and rank; returns flags sorted by decreasing rank score (ties by index).
pub fn flag(m: &[SampleMetrics], opts: &FlagOptions) -> Vec<Flag> {
    let mut out: Vec<Flag> = score_all(m, opts)
        .into_iter()
        .filter_map(|(f, _)| f)
        .collect();
    out.sort_by(|a, b| {
        b.rank_score
            .total_cmp(&a.rank_score)
            .then(a.index.cmp(&b.index))
    });
    out
}

/// Precision and recall of flags against ground-truth labels (`truth[i]`: sample i is a
/// positive: long-tail, or neglected where the corpus separates neglect from rarity and noise).
/// `flagged` holds the flagged samples' indices (of this module's or `analyze`'s flags).
pub fn precision_recall(flagged: &[usize], truth: &[bool]) -> (f64, f64) {
    let tp = flagged.iter().filter(|&&i| truth[i]).count() as f64;
    let pos = truth.iter().filter(|t| **t).count() as f64;
    let precision = if flagged.is_empty() {
        0.0
    } else {
        tp / flagged.len() as f64
    };
    let recall = if pos == 0.0 { 0.0 } else { tp / pos };
    (precision, recall)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(freq: f64, lt: bool, align: f64, loss: f64, bin: usize) -> SampleMetrics {
        SampleMetrics {
            freq_score: freq,
            long_tail_domain: lt,
            alignment: align,
            loss,
            bin,
        }
    }

    /// The percentile is the fraction of the other values strictly below: samples tied at the
    /// minimum are at 0 (average ranks put them at 0.25), ties elsewhere share the fraction
    /// below them, and a NaN is left out of the others' fractions.
    #[test]
    fn percentiles_are_the_fraction_strictly_below_under_ties() {
        let p = percentiles(&[0.0, 0.0, 0.0, 0.5, 1.0]);
        assert_eq!(p, vec![0.0, 0.0, 0.0, 0.75, 1.0]);
        let p = percentiles(&[3.0, 1.0, 3.0, 2.0, 5.0]);
        assert_eq!(p, vec![0.5, 0.0, 0.5, 0.25, 1.0]);
        let p = percentiles(&[2.0, f64::NAN, 1.0, 3.0]);
        assert_eq!((p[0], p[2], p[3]), (0.5, 0.0, 1.0));
        assert!(p[1].is_nan());
        assert_eq!(percentiles(&[7.0]), vec![0.0]);
    }

    /// The rarest samples, tied at the lowest frequency score, are rare (percentile 0 below
    /// 0.2); under average ranks they were at 0.25 and never rare.
    #[test]
    fn samples_tied_at_the_lowest_frequency_are_rare() {
        let mut m: Vec<SampleMetrics> = (0..10)
            .map(|i| {
                s(
                    0.1 * i as f64,
                    false,
                    0.1 * i as f64,
                    1.0 + i as f64 / 10.0,
                    0,
                )
            })
            .collect();
        for (k, x) in m.iter_mut().take(5).enumerate() {
            x.freq_score = 0.0;
            x.alignment = -1.0 + 0.1 * k as f64;
            x.loss = 10.0 + k as f64;
        }
        let f = flag(
            &m,
            &FlagOptions {
                long_tail_domains: false,
                ..Default::default()
            },
        );
        assert_eq!(f.len(), 5, "{f:?}");
        assert!(f.iter().all(|x| x.freq_percentile == 0.0));
        assert!(f[0].reasons[0].contains("(percentile 0.00)"), "{:?}", f[0]);
    }

    /// Samples with no frequency bin (NaN) are their own loss peers after the last bin.
    #[test]
    fn samples_without_a_bin_are_their_own_peers() {
        assert_eq!(peer_bins(&[0.0, f64::NAN, 2.0, 1.0]), vec![0, 3, 2, 1]);
        assert_eq!(peer_bins(&[f64::NAN, f64::NAN]), vec![0, 0]);
    }

    /// Ten samples in one bin, losses 1..=10 (median 5.5, MAD 2.5 → scale 3.7065).
    #[test]
    fn flags_need_all_three_reasons() {
        let m: Vec<SampleMetrics> = vec![
            s(0.01, false, -0.5, 10.0, 0), // rare by frequency, misaligned, unfit → flagged
            s(0.50, true, -0.4, 9.0, 0),   // long-tail domain, misaligned, unfit → flagged
            s(0.02, false, 0.9, 8.0, 0),   // rare, unfit, but well aligned → not
            s(0.60, false, -0.3, 7.0, 0),  // misaligned, unfit, common → not
            s(0.70, false, -0.2, 1.0, 0),
            s(0.80, false, 0.1, 2.0, 0),
            s(0.90, false, 0.2, 3.0, 0),
            s(0.95, false, 0.3, 4.0, 0),
            s(0.97, false, 0.4, 5.0, 0),
            s(0.99, false, 0.5, 6.0, 0),
        ];
        let f = flag(&m, &FlagOptions::default());
        assert_eq!(f.iter().map(|x| x.index).collect::<Vec<_>>(), vec![0, 1]);
        assert!((f[0].loss_z - 4.5 / 3.7065).abs() < 1e-3, "{}", f[0].loss_z);
        assert!(f[0].reasons[0].starts_with("rare: frequency score 0.0100"));
        assert!(f[1].reasons[0] == "rare: long-tail domain");
        let truth = [
            true, false, true, false, false, false, false, false, false, false,
        ];
        let idx: Vec<usize> = f.iter().map(|x| x.index).collect();
        assert_eq!(precision_recall(&idx, &truth), (0.5, 0.5));
        let off = flag(
            &m,
            &FlagOptions {
                long_tail_domains: false,
                ..Default::default()
            },
        );
        assert_eq!(off.len(), 1);
    }
}

//! Domain shares and the long-tail threshold (paper notes, "Data frequency"): sort domains by their
//! share of the corpus, take the elbow of that curve as the threshold; domains whose share is at or
//! below the threshold are long-tail.
//!
//! Elbow rule (Kneedle, Satopää et al. 2011): scale the sorted curve to the unit square, x_i =
//! i/(K−1), y_i = (s_i − s_min)/(s_max − s_min), and take the interior point farthest below the
//! chord from the first to the last point, i.e. argmax_i (1 − x_i − y_i). No point strictly below
//! the chord (fewer than 3 domains, or a straight or concave curve) means no elbow and no long-tail
//! domain.

use std::collections::BTreeMap;

use crate::corpus::Corpus;

/// What a domain's share counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ShareBy {
    /// Share of all tokens (default): what the model sees during training.
    #[default]
    Tokens,
    /// Share of all samples.
    Samples,
}

/// One domain's size and share.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DomainShare {
    /// The domain.
    pub domain: String,
    /// Its samples.
    pub samples: u64,
    /// Its tokens.
    pub tokens: u64,
    /// Fraction of the corpus, by [`ShareBy`].
    pub share: f64,
    /// 1 for the largest domain.
    pub rank: usize,
    /// At or below the elbow.
    pub long_tail: bool,
}

/// The domain table sorted by share (largest first, ties by name), with long-tail flags set by
/// the elbow threshold, and the threshold itself.
pub fn domain_shares(corpus: &Corpus, by: ShareBy) -> (Vec<DomainShare>, Option<f64>) {
    let mut acc: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for s in &corpus.samples {
        let e = acc.entry(s.domain.as_str()).or_default();
        e.0 += 1;
        e.1 += u64::from(s.n_tokens);
    }
    let (all_samples, all_tokens) = acc
        .values()
        .fold((0u64, 0u64), |(a, b), (x, y)| (a + x, b + y));
    let mut rows: Vec<DomainShare> = acc
        .into_iter()
        .map(|(domain, (samples, tokens))| {
            let share = match by {
                ShareBy::Tokens => tokens as f64 / all_tokens.max(1) as f64,
                ShareBy::Samples => samples as f64 / all_samples.max(1) as f64,
            };
            DomainShare {
                domain: domain.to_owned(),
                samples,
                tokens,
                share,
                rank: 0,
                long_tail: false,
            }
        })
        .collect();
    rows.sort_by(|a, b| b.share.total_cmp(&a.share).then(a.domain.cmp(&b.domain)));
    let shares: Vec<f64> = rows.iter().map(|r| r.share).collect();
    let threshold = elbow(&shares).map(|i| shares[i]);
    for (i, r) in rows.iter_mut().enumerate() {
        r.rank = i + 1;
        r.long_tail = threshold.is_some_and(|t| r.share <= t);
    }
    (rows, threshold)
}

/// Index of the elbow of a curve sorted in decreasing order, by the rule in the module docs.
pub fn elbow(sorted_desc: &[f64]) -> Option<usize> {
    let k = sorted_desc.len();
    if k < 3 {
        return None;
    }
    let (hi, lo) = (sorted_desc[0], sorted_desc[k - 1]);
    if hi - lo <= 0.0 {
        return None;
    }
    let mut best: Option<(usize, f64)> = None;
    for (i, &s) in sorted_desc.iter().enumerate().take(k - 1).skip(1) {
        let x = i as f64 / (k - 1) as f64;
        let y = (s - lo) / (hi - lo);
        let d = 1.0 - x - y;
        if d > 1e-12 && best.is_none_or(|(_, bd)| d > bd) {
            best = Some((i, d));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::{Sample, Split};

    /// By hand: x = 0, .2, .4, .6, .8, 1; y = (s − .05)/.45 = 1, .333, .111, .111, 0, 0;
    /// 1 − x − y = 0, .467, .489, .289, .2, 0 → elbow at index 2 (share 0.10).
    #[test]
    fn elbow_by_hand() {
        let s = [0.5, 0.2, 0.1, 0.1, 0.05, 0.05];
        assert_eq!(elbow(&s), Some(2));
    }

    #[test]
    fn no_elbow_for_straight_or_tiny_curves() {
        assert_eq!(elbow(&[0.4, 0.3, 0.2, 0.1]), None);
        assert_eq!(elbow(&[0.7, 0.3]), None);
        assert_eq!(elbow(&[0.25; 4]), None);
        // concave: above the chord everywhere
        assert_eq!(elbow(&[0.3, 0.29, 0.28, 0.13]), None);
    }

    #[test]
    fn shares_threshold_and_flags() {
        let mut samples = Vec::new();
        for (d, n, toks) in [
            ("a", 10, 50),
            ("b", 4, 20),
            ("c", 2, 10),
            ("d", 2, 10),
            ("e", 1, 5),
            ("f", 1, 5),
        ] {
            for i in 0..n {
                samples.push(Sample {
                    id: format!("{d}{i}"),
                    text: String::new(),
                    domain: d.into(),
                    split: Split::Train,
                    n_tokens: toks / n as u32,
                    long_tail: None,
                    neglected: None,
                    fact: None,
                    noise: None,
                });
            }
        }
        let corpus = Corpus { samples };
        let (rows, t) = domain_shares(&corpus, ShareBy::Samples);
        // shares 0.5, 0.2, 0.1, 0.1, 0.05, 0.05 as in elbow_by_hand
        assert_eq!(t, Some(0.1));
        let flags: Vec<(&str, bool)> = rows
            .iter()
            .map(|r| (r.domain.as_str(), r.long_tail))
            .collect();
        assert_eq!(
            flags,
            [
                ("a", false),
                ("b", false),
                ("c", true),
                ("d", true),
                ("e", true),
                ("f", true)
            ]
        );
        assert_eq!(rows[0].rank, 1);
        let (rows_t, _) = domain_shares(&corpus, ShareBy::Tokens);
        assert_eq!(rows_t[0].tokens, 50);
        assert!((rows_t.iter().map(|r| r.share).sum::<f64>() - 1.0).abs() < 1e-12);
    }
}

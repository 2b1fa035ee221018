//! Token n-gram counts and the sentence frequency score.
//!
//! For order n, every window of n consecutive token ids of a sample is one n-gram occurrence;
//! counts are taken over the chosen samples (by default the training split). An n-gram of ids
//! (a, b, c) is packed into one u64 key, 21 bits per id, which bounds the vocabulary at 2^21.
//!
//! Sentence frequency score of a sample for order n (paper notes, "Data frequency"):
//!     score_n(x) = mean over the n-grams g of x of norm(count(g)),
//! undefined (null) for samples shorter than n tokens.

use rayon::prelude::*;
use rustc_hash::FxHashMap;

use crate::error::{Error, Result};

/// Largest token id an n-gram key can hold.
pub const MAX_ID: u32 = (1 << 21) - 1;
/// Largest n-gram order (3 ids × 21 bits fit in a u64).
pub const MAX_ORDER: usize = 3;

/// How an n-gram count becomes a normalised frequency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Norm {
    /// count / (largest count of that order): the most frequent n-gram scores 1 (default).
    #[default]
    Max,
    /// count / (number of n-gram occurrences of that order): relative frequency, sums to 1.
    Total,
    /// ln(1 + count) / ln(1 + largest count): compresses the Zipf head, spreads the tail.
    LogMax,
}

impl Norm {
    /// Normalise `count` given the order's largest count and total.
    pub fn apply(self, count: u64, max: u64, total: u64) -> f64 {
        if count == 0 {
            return 0.0;
        }
        match self {
            Norm::Max => count as f64 / max as f64,
            Norm::Total => count as f64 / total as f64,
            Norm::LogMax => (count as f64).ln_1p() / (max as f64).ln_1p(),
        }
    }
}

/// Pack up to three ids into one key; ids must be ≤ [`MAX_ID`].
#[inline]
pub fn pack(ids: &[u32]) -> u64 {
    ids.iter().fold(0u64, |k, &id| (k << 21) | u64::from(id))
}

/// Inverse of [`pack`] for a given order.
pub fn unpack(key: u64, order: usize) -> Vec<u32> {
    (0..order)
        .rev()
        .map(|i| ((key >> (21 * i)) & u64::from(MAX_ID)) as u32)
        .collect()
}

/// Counts of all n-grams of one order.
#[derive(Debug, Clone, Default)]
pub struct NgramCounts {
    /// n.
    pub order: usize,
    /// Count of each packed n-gram (see [`pack`]).
    pub counts: FxHashMap<u64, u64>,
    /// Number of n-gram occurrences counted.
    pub total: u64,
    /// Largest count (0 when nothing was counted).
    pub max: u64,
}

impl NgramCounts {
    /// Count the n-grams of `order` in `seqs`, in parallel.
    pub fn count<S: AsRef<[u32]> + Sync>(seqs: &[S], order: usize) -> Result<NgramCounts> {
        if order == 0 || order > MAX_ORDER {
            return Err(Error::invalid(
                "--orders",
                format!("n-gram order must be 1..={MAX_ORDER}, got {order}"),
            ));
        }
        if let Some(bad) = seqs
            .par_iter()
            .flat_map_iter(|s| s.as_ref().iter().copied())
            .find_any(|&id| id > MAX_ID)
        {
            return Err(Error::invalid(
                "tokenizer",
                format!("token id {bad} exceeds the n-gram key limit {MAX_ID}"),
            ));
        }
        let counts = seqs
            .par_chunks(2048)
            .fold(FxHashMap::default, |mut map: FxHashMap<u64, u64>, chunk| {
                for s in chunk {
                    for w in s.as_ref().windows(order) {
                        *map.entry(pack(w)).or_insert(0) += 1;
                    }
                }
                map
            })
            // Merge the smaller map into the larger one.
            .reduce(FxHashMap::default, |a, b| {
                if a.len() >= b.len() {
                    merge(a, b)
                } else {
                    merge(b, a)
                }
            });
        let total = counts.values().sum();
        let max = counts.values().copied().max().unwrap_or(0);
        Ok(NgramCounts {
            order,
            counts,
            total,
            max,
        })
    }

    /// Count of `ngram`.
    pub fn get(&self, ngram: &[u32]) -> u64 {
        self.counts.get(&pack(ngram)).copied().unwrap_or(0)
    }

    /// Normalised frequency of one n-gram.
    pub fn freq(&self, ngram: &[u32], norm: Norm) -> f64 {
        norm.apply(self.get(ngram), self.max, self.total)
    }

    /// The sentence frequency score of a token sequence: mean normalised frequency of its
    /// n-grams; `None` when the sequence has fewer than `order` tokens.
    pub fn score(&self, ids: &[u32], norm: Norm) -> Option<f64> {
        if ids.len() < self.order {
            return None;
        }
        let windows = ids.windows(self.order);
        let n = windows.len();
        Some(windows.map(|w| self.freq(w, norm)).sum::<f64>() / n as f64)
    }
}

fn merge(mut big: FxHashMap<u64, u64>, small: FxHashMap<u64, u64>) -> FxHashMap<u64, u64> {
    for (k, v) in small {
        *big.entry(k).or_insert(0) += v;
    }
    big
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_round_trips() {
        for ids in [vec![0u32], vec![5, MAX_ID], vec![MAX_ID, 0, 77]] {
            assert_eq!(unpack(pack(&ids), ids.len()), ids);
        }
    }

    /// Hand-computed: seqs [1 2 1 3] and [1 2]:
    /// unigrams 1:3 2:2 3:1 (total 6, max 3); bigrams (1,2):2 (2,1):1 (1,3):1 (total 4, max 2).
    #[test]
    fn counts_and_scores_by_hand() {
        let seqs = vec![vec![1u32, 2, 1, 3], vec![1, 2]];
        let uni = NgramCounts::count(&seqs, 1).unwrap();
        assert_eq!((uni.get(&[1]), uni.get(&[2]), uni.get(&[3])), (3, 2, 1));
        assert_eq!((uni.total, uni.max), (6, 3));
        // max norm: (3/3 + 2/3 + 3/3 + 1/3) / 4 = 0.75
        assert!((uni.score(&seqs[0], Norm::Max).unwrap() - 0.75).abs() < 1e-12);
        // total norm: (3 + 2 + 3 + 1) / 6 / 4 = 0.375
        assert!((uni.score(&seqs[0], Norm::Total).unwrap() - 0.375).abs() < 1e-12);
        // log-max: mean of ln(1+c)/ln 4 over c = 3, 2, 3, 1
        let want = [3.0f64, 2.0, 3.0, 1.0]
            .iter()
            .map(|c| c.ln_1p() / 4f64.ln())
            .sum::<f64>()
            / 4.0;
        assert!((uni.score(&seqs[0], Norm::LogMax).unwrap() - want).abs() < 1e-12);
        let bi = NgramCounts::count(&seqs, 2).unwrap();
        assert_eq!(
            (bi.get(&[1, 2]), bi.get(&[2, 1]), bi.get(&[1, 3])),
            (2, 1, 1)
        );
        assert_eq!((bi.total, bi.max), (4, 2));
        // (2/2 + 1/2 + 1/2) / 3
        assert!((bi.score(&seqs[0], Norm::Max).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        // unseen n-grams score 0; too-short sequences have no score
        assert_eq!(bi.score(&[9, 9], Norm::Max), Some(0.0));
        let tri = NgramCounts::count(&seqs, 3).unwrap();
        assert_eq!(tri.score(&[1, 2], Norm::Max), None);
        assert_eq!(tri.get(&[2, 1, 3]), 1);
    }

    #[test]
    fn parallel_count_equals_serial() {
        let seqs: Vec<Vec<u32>> = (0..5000u32)
            .map(|i| (0..(i % 17)).map(|j| (i * 31 + j * 7) % 50).collect())
            .collect();
        let par = NgramCounts::count(&seqs, 2).unwrap();
        let mut serial: FxHashMap<u64, u64> = FxHashMap::default();
        for s in &seqs {
            for w in s.windows(2) {
                *serial.entry(pack(w)).or_insert(0) += 1;
            }
        }
        assert_eq!(par.counts, serial);
    }

    #[test]
    fn bad_order_and_oversized_ids_are_rejected() {
        assert!(NgramCounts::count(&[vec![1u32]], 4).is_err());
        assert!(NgramCounts::count(&[vec![MAX_ID + 1]], 1).is_err());
    }
}

//! How well scores rank the neglected samples of a pool, and the neglect models fitted to do it:
//! tie-aware AP, AUROC and precision at the number of positives ([`crate::stats`]), AP within
//! uncertainty-matched bins, Spearman correlation with a continuous truth, logistic models
//! fitted on development pools with the choice between feature sets made by leave-one-pool-out
//! cross-validation, and the permuted-kernel control.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::analysis::neglect::{self, Feature, FeatureTable, NeglectModel};
use crate::error::{Error, Result};

/// Quantile bins of the uncertainty-matched AP.
pub const MATCHED_BINS: usize = 5;
/// L2 penalty of every fit (fixed before any fit was made).
pub const LAMBDA: f64 = 1.0;

/// One pool's statistics and truths.
#[derive(Debug, Clone)]
pub struct PoolData {
    /// Rare share of the corpus (0 for a real corpus).
    pub share: f64,
    /// Seed.
    pub seed: u64,
    /// Whether the seed is held out (not a development seed).
    pub held_out: bool,
    /// The analysis's statistics.
    pub features: FeatureTable,
    /// Mean token entropy (the matching variable of the binned AP).
    pub uncertainty: Vec<f64>,
    /// Binary truths by name (`synthetic`, `counterfactual`).
    pub truths: Vec<(String, Vec<bool>)>,
    /// The counterfactual gain, when measured.
    pub gain: Option<Vec<f64>>,
    /// Scores of the single criteria (higher: more neglected; NaN: none), by name.
    pub criteria: Vec<(String, Vec<f64>)>,
}

impl PoolData {
    /// A truth by name.
    pub fn truth(&self, name: &str) -> Option<&[bool]> {
        self.truths
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_slice())
    }

    fn has(&self, f: Feature) -> bool {
        self.features.iter().any(|(g, _)| *g == f)
    }
}

/// A ranking's quality on one pool against one truth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    /// Tie-aware average precision.
    pub ap: f64,
    /// Tie-aware AUROC.
    pub auroc: f64,
    /// Tie-aware precision among the top P (P positives).
    pub p_at_pos: f64,
    /// Mean AP within [`MATCHED_BINS`] quantile bins of uncertainty (bins with a positive and a
    /// negative).
    pub matched_ap: f64,
    /// Spearman correlation of the score with the counterfactual gain (NaN without one).
    pub spearman_gain: f64,
}

/// AP within quantile bins of `strat` (ties kept together), averaged over the bins that hold
/// both classes; NaN when none does.
pub fn matched_ap(scores: &[f64], truth: &[bool], strat: &[f64], bins: usize) -> f64 {
    let r = crate::stats::ranks(strat);
    let n = strat.len() as f64;
    let bin_of = |i: usize| (((r[i] - 1.0) / n * bins as f64) as usize).min(bins - 1);
    let mut aps = Vec::new();
    for b in 0..bins {
        let idx: Vec<usize> = (0..scores.len()).filter(|&i| bin_of(i) == b).collect();
        let s: Vec<f64> = idx.iter().map(|&i| scores[i]).collect();
        let t: Vec<bool> = idx.iter().map(|&i| truth[i]).collect();
        if t.iter().any(|&x| x) && t.iter().any(|&x| !x) {
            if let Some(ap) = crate::stats::average_precision_tied(&s, &t) {
                aps.push(ap);
            }
        }
    }
    if aps.is_empty() {
        f64::NAN
    } else {
        aps.iter().sum::<f64>() / aps.len() as f64
    }
}

/// Every metric of `scores` on `pool` against `truth`; those that need both classes are NaN
/// without them.
pub fn metrics(scores: &[f64], truth: &[bool], pool: &PoolData) -> Metrics {
    let pos = truth.iter().filter(|&&t| t).count();
    // A truth with no positive (or no negative) in this pool leaves AP, AUROC and P@positives
    // undefined (NaN, left out of the summaries); ρ with the continuous gain is still measured.
    let ap = crate::stats::average_precision_tied(scores, truth).unwrap_or(f64::NAN);
    let auroc = crate::stats::auroc_tied(scores, truth).unwrap_or(f64::NAN);
    let p_at_pos = crate::stats::precision_at_tied(scores, truth, pos).unwrap_or(f64::NAN);
    let spearman_gain = pool
        .gain
        .as_ref()
        .and_then(|g| {
            let keep: Vec<usize> = (0..g.len())
                .filter(|&i| g[i].is_finite() && scores[i].is_finite())
                .collect();
            let a: Vec<f64> = keep.iter().map(|&i| scores[i]).collect();
            let b: Vec<f64> = keep.iter().map(|&i| g[i]).collect();
            crate::stats::spearman(&a, &b)
        })
        .unwrap_or(f64::NAN);
    Metrics {
        ap,
        auroc,
        p_at_pos,
        matched_ap: matched_ap(scores, truth, &pool.uncertainty, MATCHED_BINS),
        spearman_gain,
    }
}

/// A set of features a model is fitted on.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureSet {
    /// Its name in the tables (`fit:…`).
    pub name: String,
    /// The features.
    pub features: Vec<Feature>,
}

/// The features every analysis has (no reference model, no checkpoints needed), less the
/// sign-dependent alignment ([`Feature::sign_dependent`]).
pub const ALWAYS: [Feature; 9] = [
    Feature::Loss,
    Feature::ExcessLoss,
    Feature::Uncertainty,
    Feature::FreqScore,
    Feature::GradNorm,
    Feature::DomainGc,
    Feature::PredictedDecrease,
    Feature::Support,
    Feature::SupportCos,
];

/// The four feature sets compared: with and without the optional statistics (reducible loss,
/// trajectory), with and without the kernel's, each restricted to what every pool has and to
/// features that do not depend on the principal direction's arbitrary sign.
pub fn feature_sets(pools: &[PoolData]) -> Vec<FeatureSet> {
    let present = |f: &Feature| !f.sign_dependent() && pools.iter().all(|p| p.has(*f));
    let all: Vec<Feature> = Feature::ALL.iter().copied().filter(present).collect();
    let always: Vec<Feature> = ALWAYS.iter().copied().filter(present).collect();
    let no_kernel = |v: &[Feature]| v.iter().copied().filter(|f| !f.is_kernel()).collect();
    vec![
        FeatureSet {
            name: "fit:default".into(),
            features: always.clone(),
        },
        FeatureSet {
            name: "fit:default-no-kernel".into(),
            features: no_kernel(&always),
        },
        FeatureSet {
            name: "fit:all".into(),
            features: all.clone(),
        },
        FeatureSet {
            name: "fit:all-no-kernel".into(),
            features: no_kernel(&all),
        },
    ]
}

/// Rank-Gaussian features of `pool` in the order of `features`.
fn standardised(pool: &PoolData, features: &[Feature]) -> Result<Vec<Vec<f64>>> {
    features
        .iter()
        .map(|f| {
            pool.features
                .iter()
                .find(|(g, _)| g == f)
                .map(|(_, v)| neglect::rank_gaussian(v))
                .ok_or_else(|| Error::invalid("ranking", format!("a pool lacks `{}`", f.name())))
        })
        .collect()
}

/// A logistic neglect model on `features`, fitted to `truth` over `pools` together.
pub fn fit(pools: &[&PoolData], truth: &str, features: &[Feature]) -> Result<NeglectModel> {
    let mut x: Vec<Vec<f64>> = vec![Vec::new(); features.len()];
    let mut y = Vec::new();
    for p in pools {
        let t = p
            .truth(truth)
            .ok_or_else(|| Error::invalid("ranking", format!("a pool lacks the {truth} truth")))?;
        for (col, z) in x.iter_mut().zip(standardised(p, features)?) {
            col.extend(z);
        }
        y.extend_from_slice(t);
    }
    let (weights, intercept) = neglect::fit_logistic(&x, &y, LAMBDA)?;
    let mut m = NeglectModel {
        provenance: String::new(),
        features: features.to_vec(),
        weights,
        intercept,
        threshold: 0.5,
    };
    m.threshold = best_f1_threshold(&m, pools, truth)?;
    Ok(m)
}

/// The probability threshold with the best F1 of the flags over `pools` (ties: the higher).
fn best_f1_threshold(m: &NeglectModel, pools: &[&PoolData], truth: &str) -> Result<f64> {
    let mut pairs: Vec<(f64, bool)> = Vec::new();
    for p in pools {
        let s = m.score(&p.features)?;
        let t = p.truth(truth).unwrap_or(&[]);
        pairs.extend(s.iter().map(|x| x.probability).zip(t.iter().copied()));
    }
    pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
    let pos = pairs.iter().filter(|p| p.1).count() as f64;
    let (mut tp, mut best, mut at) = (0.0, -1.0, 0.5);
    for (k, &(prob, t)) in pairs.iter().enumerate() {
        tp += f64::from(u8::from(t));
        let f1 = 2.0 * tp / ((k + 1) as f64 + pos);
        let next_differs = pairs.get(k + 1).is_none_or(|n| n.0 < prob);
        if next_differs && f1 > best {
            best = f1;
            at = prob;
        }
    }
    Ok(at.clamp(1e-6, 1.0 - 1e-6))
}

/// Leave-one-pool-out AP of fitting `features` on the other `pools` (mean over pools).
pub fn cross_validated_ap(pools: &[&PoolData], truth: &str, features: &[Feature]) -> Result<f64> {
    let mut aps = Vec::new();
    for k in 0..pools.len() {
        let rest: Vec<&PoolData> = (0..pools.len())
            .filter(|&j| j != k)
            .map(|j| pools[j])
            .collect();
        let m = fit(&rest, truth, features)?;
        let s = probabilities(&m, pools[k])?;
        if let Some(ap) = pools[k]
            .truth(truth)
            .and_then(|t| crate::stats::average_precision_tied(&s, t))
        {
            aps.push(ap);
        }
    }
    Ok(aps.iter().sum::<f64>() / aps.len().max(1) as f64)
}

/// A model's neglect probability for every sample of a pool.
pub fn probabilities(m: &NeglectModel, pool: &PoolData) -> Result<Vec<f64>> {
    Ok(m.logits(&pool.features)?
        .into_iter()
        .map(neglect::sigmoid)
        .collect())
}

/// The pool with its kernel statistics' rows permuted among the samples (one seeded
/// permutation for all of them): the control under which kernel terms must lose their edge.
pub fn kernel_permuted(pool: &PoolData, seed: u64) -> PoolData {
    let n = pool.uncertainty.len();
    let mut perm: Vec<usize> = (0..n).collect();
    perm.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
        crate::seed::stable_hash(seed, b"kernel-permuted"),
    ));
    let mut p = pool.clone();
    for (f, v) in p.features.iter_mut() {
        if f.is_kernel() {
            *v = perm.iter().map(|&j| v[j]).collect();
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(features: FeatureTable, truth: Vec<bool>) -> PoolData {
        let n = truth.len();
        PoolData {
            share: 0.1,
            seed: 1,
            held_out: false,
            features,
            uncertainty: (0..n).map(|i| i as f64).collect(),
            truths: vec![("synthetic".into(), truth)],
            gain: None,
            criteria: Vec::new(),
        }
    }

    /// Matched AP: AP computed separately inside each uncertainty bin, by hand.
    #[test]
    fn matched_ap_averages_within_bins() {
        // Two bins of 4 by uncertainty 0..8: bin 0 = samples 0-3, bin 1 = samples 4-7.
        let scores = [0.9, 0.1, 0.5, 0.2, 0.3, 0.8, 0.4, 0.7];
        let truth = [true, false, false, true, false, true, false, false];
        let strat: Vec<f64> = (0..8).map(f64::from).collect();
        // Bin 0 ranks 0, 2, 3, 1: positives at 1 and 3 → (1 + 2/3)/2; bin 1 ranks 5, 7, 6, 4:
        // positive at 1 → 1.
        let want = ((1.0 + 2.0 / 3.0) / 2.0 + 1.0) / 2.0;
        assert!((matched_ap(&scores, &truth, &strat, 2) - want).abs() < 1e-12);
        // A bin without positives is skipped, not counted as 0.
        let t2 = [true, false, false, true, false, false, false, false];
        assert!((matched_ap(&scores, &t2, &strat, 2) - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
    }

    /// A planted signal in one feature: the fitted model ranks by it, the choice by
    /// cross-validation prefers the set that has it, and permuting a kernel feature destroys a
    /// kernel signal.
    #[test]
    fn fits_find_the_signal_and_the_control_removes_it() {
        let make = |seed: u64| {
            let n = 60;
            let truth: Vec<bool> = (0..n).map(|i| (i * 7 + seed as usize) % 5 == 0).collect();
            let support: Vec<f64> = truth
                .iter()
                .enumerate()
                .map(|(i, &t)| {
                    if t {
                        -1.0 - i as f64 * 0.01
                    } else {
                        i as f64 * 0.01
                    }
                })
                .collect();
            let loss: Vec<f64> = (0..n).map(|i| ((i * 13) % 17) as f64).collect();
            pool(
                vec![(Feature::Loss, loss), (Feature::Support, support)],
                truth,
            )
        };
        let pools: Vec<PoolData> = (1..=4).map(make).collect();
        let refs: Vec<&PoolData> = pools.iter().collect();
        let m = fit(&refs, "synthetic", &[Feature::Loss, Feature::Support]).unwrap();
        assert!(
            m.weights[1] < -1.0,
            "low support is neglect: {:?}",
            m.weights
        );
        let p = probabilities(&m, &pools[0]).unwrap();
        let t = pools[0].truth("synthetic").unwrap();
        assert_eq!(crate::stats::average_precision_tied(&p, t), Some(1.0));
        let with =
            cross_validated_ap(&refs, "synthetic", &[Feature::Loss, Feature::Support]).unwrap();
        let without = cross_validated_ap(&refs, "synthetic", &[Feature::Loss]).unwrap();
        assert!(with > 0.99 && without < 0.6, "{with} {without}");
        let perm = kernel_permuted(&pools[0], 3);
        let pp = probabilities(&m, &perm).unwrap();
        let ap_perm = crate::stats::average_precision_tied(&pp, t).unwrap();
        assert!(ap_perm < 0.6, "{ap_perm}");
        // The loss column (not a kernel statistic) is not permuted.
        assert_eq!(perm.features[0], pools[0].features[0]);
    }
}

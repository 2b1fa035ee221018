//! Correlation statistics with bootstrap confidence intervals: Pearson's r, Spearman's ρ (Pearson
//! on average ranks, so ties are handled as scipy does) and Kendall's τ-b (tie-corrected), and a
//! percentile bootstrap over resampled pairs, run in parallel with rayon and deterministic for a
//! seed (resample b draws from a RNG seeded by (seed, b)).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Which correlation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Corr {
    /// Pearson's r.
    Pearson,
    /// Spearman's rho.
    Spearman,
    /// Kendall's tau-b.
    Kendall,
}

/// Pearson's r; `None` for fewer than 2 pairs or a constant variable.
pub fn pearson(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len().min(y.len());
    if n < 2 {
        return None;
    }
    let (mx, my) = (
        x[..n].iter().sum::<f64>() / n as f64,
        y[..n].iter().sum::<f64>() / n as f64,
    );
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (a, b) = (x[i] - mx, y[i] - my);
        sxy += a * b;
        sxx += a * a;
        syy += b * b;
    }
    (sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
}

/// Average ranks (1-based), ties sharing the mean of their positions.
pub fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman's ρ: Pearson on average ranks.
pub fn spearman(x: &[f64], y: &[f64]) -> Option<f64> {
    pearson(&ranks(x), &ranks(y))
}

/// Kendall's τ-b = (C − D) / sqrt((n0 − n1)(n0 − n2)), O(n²).
pub fn kendall(x: &[f64], y: &[f64]) -> Option<f64> {
    let n = x.len().min(y.len());
    let (mut c, mut d, mut tx, mut ty) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..n {
        for j in i + 1..n {
            // f64::signum(0.0) is 1.0, so ties are compared explicitly.
            let sign = |v: f64| {
                if v > 0.0 {
                    1.0
                } else if v < 0.0 {
                    -1.0
                } else {
                    0.0
                }
            };
            let (a, b) = (sign(x[i] - x[j]), sign(y[i] - y[j]));
            if a == 0.0 && b == 0.0 {
                continue;
            }
            if a == 0.0 {
                tx += 1;
            } else if b == 0.0 {
                ty += 1;
            } else if a == b {
                c += 1;
            } else {
                d += 1;
            }
        }
    }
    let denom = (((c + d + tx) * (c + d + ty)) as f64).sqrt();
    (denom > 0.0).then(|| (c - d) as f64 / denom)
}

/// The correlation `kind` of the pairs (x, y).
pub fn correlation(kind: Corr, x: &[f64], y: &[f64]) -> Option<f64> {
    match kind {
        Corr::Pearson => pearson(x, y),
        Corr::Spearman => spearman(x, y),
        Corr::Kendall => kendall(x, y),
    }
}

/// A statistic with its percentile bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Estimate {
    /// The estimate.
    pub value: f64,
    /// Lower end of the interval.
    pub low: f64,
    /// Upper end of the interval.
    pub high: f64,
    /// Pairs.
    pub n: usize,
}

/// The correlation and its (1 − α) percentile bootstrap interval from `resamples` resamples.
pub fn bootstrap(
    kind: Corr,
    x: &[f64],
    y: &[f64],
    resamples: usize,
    alpha: f64,
    seed: u64,
) -> Option<Estimate> {
    let n = x.len().min(y.len());
    let value = correlation(kind, x, y)?;
    let mut stats: Vec<f64> = (0..resamples)
        .into_par_iter()
        .filter_map(|b| {
            let mut rng = ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(
                seed,
                &(b as u64).to_le_bytes(),
            ));
            let pick: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
            let xs: Vec<f64> = pick.iter().map(|&i| x[i]).collect();
            let ys: Vec<f64> = pick.iter().map(|&i| y[i]).collect();
            correlation(kind, &xs, &ys)
        })
        .collect();
    if stats.is_empty() {
        return Some(Estimate {
            value,
            low: value,
            high: value,
            n,
        });
    }
    let (low, high) = percentile_interval(&mut stats, alpha);
    Some(Estimate {
        value,
        low,
        high,
        n,
    })
}

/// The (α/2, 1 − α/2) percentiles of bootstrap statistics (nearest rank); NaN for none.
pub fn percentile_interval(stats: &mut [f64], alpha: f64) -> (f64, f64) {
    if stats.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    stats.sort_by(f64::total_cmp);
    let q = |p: f64| stats[((p * (stats.len() - 1) as f64).round() as usize).min(stats.len() - 1)];
    (q(alpha / 2.0), q(1.0 - alpha / 2.0))
}

/// The p-quantile of the standard normal distribution (Acklam's rational approximation,
/// relative error below 1.2e-9; written here as statrs would pull in nalgebra for one function).
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969683028665376e1,
        2.209460984245205e2,
        -2.759285104469687e2,
        1.383_577_518_672_69e2,
        -3.066479806614716e1,
        2.506628277459239,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e1,
        1.615858368580409e2,
        -1.556989798598866e2,
        6.680131188771972e1,
        -1.328068155288572e1,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-3,
        -3.223964580411365e-1,
        -2.400758277161838,
        -2.549732539343734,
        4.374664141464968,
        2.938163982698783,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-3,
        3.224671290700398e-1,
        2.445134137142996,
        3.754408661907416,
    ];
    if p <= 0.0 {
        return f64::NEG_INFINITY;
    }
    if p >= 1.0 {
        return f64::INFINITY;
    }
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.02425 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.02425 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// The p-quantile of Student's t with `df` degrees of freedom: exact for 1 and 2, otherwise the
/// Cornish–Fisher expansion in 1/df (Abramowitz & Stegun 26.7.5; within 1e-3 of the exact
/// value at the 97.5% point for df ≥ 3).
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if df <= 1.0 {
        return (std::f64::consts::PI * (p - 0.5)).tan();
    }
    if df <= 2.0 {
        return (2.0 * p - 1.0) / (2.0 * p * (1.0 - p)).sqrt();
    }
    let z = normal_quantile(p);
    let (z2, v) = (z * z, df);
    let g1 = (z2 + 1.0) * z / 4.0;
    let g2 = ((5.0 * z2 + 16.0) * z2 + 3.0) * z / 96.0;
    let g3 = (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) * z / 384.0;
    let g4 = ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) * z / 92160.0;
    z + g1 / v + g2 / (v * v) + g3 / v.powi(3) + g4 / v.powi(4)
}

/// Average precision of a ranking: `truth` holds the labels in rank order (best first);
/// AP = mean over the positives of the precision at their rank. `None` without positives.
pub fn average_precision(truth: &[bool]) -> Option<f64> {
    let mut hits = 0usize;
    let mut sum = 0.0;
    for (k, &t) in truth.iter().enumerate() {
        if t {
            hits += 1;
            sum += hits as f64 / (k + 1) as f64;
        }
    }
    (hits > 0).then(|| sum / hits as f64)
}

/// Area under the ROC curve of a ranking (`truth` in rank order, best first): the share of
/// (positive, negative) pairs the ranking orders correctly. `None` without both classes.
pub fn auroc(truth: &[bool]) -> Option<f64> {
    let (mut negatives_below, mut correct) = (0usize, 0usize);
    let negatives = truth.iter().filter(|&&t| !t).count();
    let positives = truth.len() - negatives;
    for &t in truth {
        if t {
            correct += negatives - negatives_below;
        } else {
            negatives_below += 1;
        }
    }
    (positives > 0 && negatives > 0).then(|| correct as f64 / (positives * negatives) as f64)
}

/// Groups of tied scores, best first: (items in the group, positives in it). Higher scores rank
/// first; a non-finite score (NaN, ±∞ below every finite one) ranks last, all of them tied.
fn tie_groups(scores: &[f64], truth: &[bool]) -> Vec<(usize, usize)> {
    let key = |x: f64| if x.is_finite() { x } else { f64::NEG_INFINITY };
    let mut idx: Vec<usize> = (0..scores.len().min(truth.len())).collect();
    idx.sort_by(|&a, &b| key(scores[b]).total_cmp(&key(scores[a])));
    let mut groups = Vec::new();
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && key(scores[idx[j + 1]]) == key(scores[idx[i]]) {
            j += 1;
        }
        let pos = idx[i..=j].iter().filter(|&&k| truth[k]).count();
        groups.push((j + 1 - i, pos));
        i = j + 1;
    }
    groups
}

/// Average precision of ranking by `scores` (higher first) against `truth`, in expectation over
/// the orders of tied scores (every tie-break equally likely; McSherry and Najork, ECIR 2008):
/// a positive placed at position i of a tied group of t items with r positives, after N items
/// with R positives, has expected precision (R + 1 + (i − 1)(r − 1)/(t − 1)) / (N + i), and lands
/// at i with probability r/t. Non-finite scores rank last, tied. `None` without positives.
pub fn average_precision_tied(scores: &[f64], truth: &[bool]) -> Option<f64> {
    let groups = tie_groups(scores, truth);
    let total: usize = groups.iter().map(|g| g.1).sum();
    if total == 0 {
        return None;
    }
    let (mut before, mut pos_before, mut sum) = (0usize, 0usize, 0.0);
    for &(t, r) in &groups {
        if r > 0 {
            let within = |i: usize| {
                if t == 1 {
                    0.0
                } else {
                    (i - 1) as f64 * (r - 1) as f64 / (t - 1) as f64
                }
            };
            let part: f64 = (1..=t)
                .map(|i| (pos_before as f64 + 1.0 + within(i)) / (before + i) as f64)
                .sum();
            sum += r as f64 / t as f64 * part;
        }
        before += t;
        pos_before += r;
    }
    Some(sum / total as f64)
}

/// AUROC of ranking by `scores` (higher first) against `truth`: the share of (positive,
/// negative) pairs ordered correctly, a tied pair counting one half (the Mann–Whitney U
/// statistic over P·N). Non-finite scores rank last, tied. `None` without both classes.
pub fn auroc_tied(scores: &[f64], truth: &[bool]) -> Option<f64> {
    let groups = tie_groups(scores, truth);
    let pos: usize = groups.iter().map(|g| g.1).sum();
    let neg: usize = groups.iter().map(|g| g.0 - g.1).sum();
    if pos == 0 || neg == 0 {
        return None;
    }
    let (mut neg_above, mut u) = (0usize, 0.0);
    for &(t, r) in &groups {
        let n_here = t - r;
        // Positives here beat every negative below this group and tie with those in it.
        u += r as f64 * ((neg - neg_above - n_here) as f64 + 0.5 * n_here as f64);
        neg_above += n_here;
    }
    Some(u / (pos * neg) as f64)
}

/// Precision among the top `k` by `scores` (higher first), in expectation over the orders of
/// tied scores: a tied group cut by the k-th place contributes its positives in proportion to
/// the places it gets. Non-finite scores rank last. `None` for k = 0.
pub fn precision_at_tied(scores: &[f64], truth: &[bool], k: usize) -> Option<f64> {
    if k == 0 {
        return None;
    }
    let (mut taken, mut hits) = (0usize, 0.0);
    for (t, r) in tie_groups(scores, truth) {
        if taken >= k {
            break;
        }
        let places = t.min(k - taken);
        hits += r as f64 * places as f64 / t as f64;
        taken += places;
    }
    Some(hits / k.min(taken.max(1)) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranking_quality_by_hand() {
        // Positives at ranks 1 and 3 of 4: AP = (1/1 + 2/3) / 2; AUROC: the first positive beats
        // both negatives, the second one of them: 3/4.
        let t = [true, false, true, false];
        assert!((average_precision(&t).unwrap() - (1.0 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!((auroc(&t).unwrap() - 0.75).abs() < 1e-12);
        assert_eq!(auroc(&[true, true, false]), Some(1.0));
        assert_eq!(auroc(&[false, true]), Some(0.0));
        assert_eq!(average_precision(&[false, false]), None);
        assert_eq!(auroc(&[true]), None);
    }

    /// The tie-aware metrics against an independent oracle: the plain (untied) AP, AUROC and
    /// precision of every order of the tied groups, averaged (exhaustive enumeration).
    #[test]
    fn tie_aware_metrics_equal_the_mean_over_tie_breaks() {
        fn permutations(v: &[usize]) -> Vec<Vec<usize>> {
            if v.len() <= 1 {
                return vec![v.to_vec()];
            }
            let mut out = Vec::new();
            for i in 0..v.len() {
                let mut rest = v.to_vec();
                let x = rest.remove(i);
                for mut p in permutations(&rest) {
                    p.insert(0, x);
                    out.push(p);
                }
            }
            out
        }
        let cases: [(&[f64], &[bool]); 4] = [
            (
                &[0.9, 0.5, 0.5, 0.5, 0.2, 0.2, 0.1],
                &[false, true, false, true, true, false, false],
            ),
            (&[1.0, 1.0, 1.0, 1.0], &[true, false, false, true]),
            (
                &[3.0, f64::NAN, 2.0, 2.0, f64::NEG_INFINITY, 1.0],
                &[false, true, true, false, true, false],
            ),
            (&[0.3, 0.7, 0.1, 0.5], &[true, false, false, true]),
        ];
        for (scores, truth) in cases {
            // Every order of the items consistent with the scores (non-finite last, tied).
            let key = |x: f64| if x.is_finite() { x } else { f64::NEG_INFINITY };
            let idx: Vec<usize> = (0..scores.len()).collect();
            let orders: Vec<Vec<usize>> = permutations(&idx)
                .into_iter()
                .filter(|p| p.windows(2).all(|w| key(scores[w[0]]) >= key(scores[w[1]])))
                .collect();
            let mean = |f: &dyn Fn(&[bool]) -> f64| {
                orders
                    .iter()
                    .map(|p| f(&p.iter().map(|&i| truth[i]).collect::<Vec<_>>()))
                    .sum::<f64>()
                    / orders.len() as f64
            };
            let ap = mean(&|t| average_precision(t).unwrap());
            let au = mean(&|t| auroc(t).unwrap());
            let npos = truth.iter().filter(|&&t| t).count();
            let pk = mean(&|t| t[..npos].iter().filter(|&&x| x).count() as f64 / npos as f64);
            assert!(
                (average_precision_tied(scores, truth).unwrap() - ap).abs() < 1e-12,
                "{scores:?}"
            );
            assert!(
                (auroc_tied(scores, truth).unwrap() - au).abs() < 1e-12,
                "{scores:?}"
            );
            assert!(
                (precision_at_tied(scores, truth, npos).unwrap() - pk).abs() < 1e-12,
                "{scores:?}"
            );
        }
        // All tied: AP is the expected AP of a random order, not 1 or the base rate.
        let all = average_precision_tied(&[0.0; 4], &[true, false, false, true]).unwrap();
        assert!(all > 0.5 && all < 0.75, "{all}");
        assert_eq!(
            auroc_tied(&[0.0; 4], &[true, false, false, true]),
            Some(0.5)
        );
        assert_eq!(average_precision_tied(&[1.0, 2.0], &[false, false]), None);
        assert_eq!(auroc_tied(&[1.0, 2.0], &[true, true]), None);
    }

    const X: [f64; 10] = [1.0, 2.5, 2.5, 4.0, 7.0, 3.0, 9.5, 6.0, 6.0, 0.5];
    const Y: [f64; 10] = [2.0, 1.0, 3.5, 3.5, 8.0, 2.0, 7.0, 9.0, 5.0, 1.5];

    /// Reference values from scipy 1.x (`pearsonr`, `spearmanr`, `kendalltau`, tau-b) on X, Y.
    #[test]
    fn matches_scipy() {
        assert!((pearson(&X, &Y).unwrap() - 0.8394028301269676).abs() < 1e-12);
        assert!((spearman(&X, &Y).unwrap() - 0.8374233128834357).abs() < 1e-12);
        assert!((kendall(&X, &Y).unwrap() - 0.6744186046511628).abs() < 1e-12);
        assert_eq!(ranks(&[3.0, 1.0, 3.0, 2.0]), vec![3.5, 1.0, 3.5, 2.0]);
        assert_eq!(pearson(&[1.0, 1.0], &[2.0, 3.0]), None);
    }

    /// Reference quantiles from scipy.stats (`norm.ppf`, `t.ppf`).
    #[test]
    fn quantiles_match_scipy() {
        assert!((normal_quantile(0.975) - 1.959963984540054).abs() < 1e-8);
        assert!((normal_quantile(0.01) + 2.3263478740408408).abs() < 1e-8);
        assert!((normal_quantile(0.5)).abs() < 1e-12);
        for (df, want) in [
            (1.0, 12.706204736174698),
            (2.0, 4.302652729749464),
            (4.0, 2.7764451051977987),
            (9.0, 2.2621571628540993),
            (31.0, 2.0395134463964077),
            (199.0, 1.971956544249395),
        ] {
            let got = t_quantile(0.975, df);
            assert!((got - want).abs() < 1e-3, "df {df}: {got} vs {want}");
        }
    }

    #[test]
    fn bootstrap_interval_covers_and_is_deterministic() {
        let a = bootstrap(Corr::Spearman, &X, &Y, 500, 0.05, 7).unwrap();
        let b = bootstrap(Corr::Spearman, &X, &Y, 500, 0.05, 7).unwrap();
        assert_eq!(a, b);
        assert!(
            a.low <= a.value && a.value <= a.high && a.high <= 1.0 && a.low > -1.0,
            "{a:?}"
        );
        let c = bootstrap(Corr::Spearman, &X, &Y, 500, 0.05, 8).unwrap();
        assert_ne!(a.low, c.low, "another seed, another interval");
    }
}

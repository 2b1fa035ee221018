//! Expert isolation: does a sparse model send each (long-tail) domain to its own expert, and are
//! the gradients within an expert more consistent than the dense baseline's on the same samples?
//!
//! Per block with sequence routing (CSE): routing purity of each domain (share of its samples in
//! its most used expert), NMI(domain, expert) (arithmetic-mean normalisation, as scikit-learn's
//! default), and per expert: load, dominant domain and its share, kernel consistency (mean
//! normalised off-diagonal entry K_ij / √(K_ii K_jj) over the expert's samples) for the sparse model
//! and for the baseline kernel on the same samples, and GC of each long-tail domain within the
//! expert (X = the expert's samples, X′ = its samples of that domain) for both kernels.
//!
//! Per block also the experts' distance/radius ratio in the embeddings that enter the block
//! ([`separation`]).
//!
//! Verdict per expert: `idle` when it holds fewer than `idle_share` of the samples; `isolated`
//! when one domain, or the long-tail domains together, make up at least `purity` of its samples
//! and its kernel consistency exceeds the baseline's; otherwise `mixed`. Defaults: idle_share
//! 0.01, purity 0.7.

use std::collections::BTreeMap;

use serde::Serialize;
use tch::Tensor;

use crate::error::Result;
use crate::ntk::gc;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct VerdictRule {
    pub idle_share: f64,
    pub purity: f64,
}

impl Default for VerdictRule {
    fn default() -> Self {
        VerdictRule {
            idle_share: 0.01,
            purity: 0.7,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpertReport {
    pub expert: i64,
    pub load: usize,
    pub dominant_domain: String,
    pub dominant_share: f64,
    /// Share of the expert's samples from long-tail domains.
    pub long_tail_share: f64,
    pub consistency: Option<f64>,
    pub baseline_consistency: Option<f64>,
    /// (long-tail domain, GC within the expert, baseline GC on the same sets)
    pub long_tail_gc: Vec<(String, Option<f64>, Option<f64>)>,
    pub verdict: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockReport {
    pub block: String,
    /// (domain, purity, samples)
    pub purity: Vec<(String, f64, usize)>,
    pub nmi: f64,
    /// Cluster distance/radius ratio of the experts in the sequence embeddings entering the
    /// block (mean pairwise distance of the experts' centroids over their mean radius; paper
    /// Fig. 3); `None` with fewer than two used experts, or when no embeddings were given.
    pub separation: Option<f64>,
    pub experts: Vec<ExpertReport>,
}

fn entropy(counts: &[usize], n: usize) -> f64 {
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n as f64;
            -p * p.ln()
        })
        .sum()
}

/// Normalised mutual information with arithmetic-mean normalisation; 1 for identical partitions.
pub fn nmi(a: &[String], b: &[i64]) -> f64 {
    let n = a.len();
    let mut joint: BTreeMap<(&str, i64), usize> = BTreeMap::new();
    let mut ca: BTreeMap<&str, usize> = BTreeMap::new();
    let mut cb: BTreeMap<i64, usize> = BTreeMap::new();
    for (x, &y) in a.iter().zip(b) {
        *joint.entry((x.as_str(), y)).or_default() += 1;
        *ca.entry(x.as_str()).or_default() += 1;
        *cb.entry(y).or_default() += 1;
    }
    let mut mi = 0.0;
    for (&(x, y), &c) in &joint {
        let pxy = c as f64 / n as f64;
        mi += pxy * (pxy / (ca[x] as f64 / n as f64 * cb[&y] as f64 / n as f64)).ln();
    }
    let (ha, hb) = (
        entropy(&ca.values().copied().collect::<Vec<_>>(), n),
        entropy(&cb.values().copied().collect::<Vec<_>>(), n),
    );
    if ha + hb == 0.0 {
        1.0
    } else {
        (2.0 * mi / (ha + hb)).clamp(0.0, 1.0)
    }
}

/// Mean of K_ij / √(K_ii K_jj) over distinct pairs of `idx`; `None` for fewer than two samples.
pub fn consistency(k: &Tensor, idx: &[usize]) -> Option<f64> {
    if idx.len() < 2 {
        return None;
    }
    let mut total = 0.0;
    let mut pairs = 0usize;
    for (a, &i) in idx.iter().enumerate() {
        for &j in &idx[a + 1..] {
            let (kij, kii, kjj) = (
                k.double_value(&[i as i64, j as i64]),
                k.double_value(&[i as i64, i as i64]),
                k.double_value(&[j as i64, j as i64]),
            );
            if kii > 0.0 && kjj > 0.0 {
                total += kij / (kii * kjj).sqrt();
                pairs += 1;
            }
        }
    }
    (pairs > 0).then(|| total / pairs as f64)
}

fn sub_gc(k: &Tensor, whole: &[usize], part: &[usize]) -> Result<Option<f64>> {
    if whole.len() < 2 || part.is_empty() {
        return Ok(None);
    }
    let sel = Tensor::from_slice(&whole.iter().map(|&i| i as i64).collect::<Vec<_>>());
    let sub = k.index_select(0, &sel).index_select(1, &sel);
    let pos: Vec<usize> = part
        .iter()
        .filter_map(|p| whole.iter().position(|w| w == p))
        .collect();
    let pr = gc::principal(&sub)?;
    gc::gc(&sub, &pr, &pos)
}

/// One block's routing of the analysed samples.
pub struct Routing<'a> {
    pub block: &'a str,
    pub domains: &'a [String],
    /// Expert of each sample.
    pub routes: &'a [i64],
    /// Experts of the block (those no sample reached are reported `idle`).
    pub n_experts: usize,
}

/// The isolation report of one routed block.
pub fn block_report(
    r: &Routing,
    long_tail: &[String],
    kernel: &Tensor,
    baseline: &Tensor,
    rule: &VerdictRule,
) -> Result<BlockReport> {
    let (block, domains, routes, n_experts) = (r.block, r.domains, r.routes, r.n_experts);
    let n = domains.len();
    let mut by_dom: BTreeMap<&str, BTreeMap<i64, usize>> = BTreeMap::new();
    for (d, &e) in domains.iter().zip(routes) {
        *by_dom.entry(d.as_str()).or_default().entry(e).or_default() += 1;
    }
    let purity = by_dom
        .iter()
        .map(|(d, m)| {
            let total: usize = m.values().sum();
            (
                d.to_string(),
                *m.values().max().unwrap_or(&0) as f64 / total.max(1) as f64,
                total,
            )
        })
        .collect();
    // Experts no sample reached still get a row (and the verdict `idle`).
    let n_exp = routes
        .iter()
        .copied()
        .max()
        .map_or(0, |m| m + 1)
        .max(n_experts as i64);
    let mut experts = Vec::new();
    for e in 0..n_exp {
        let idx: Vec<usize> = (0..n).filter(|&i| routes[i] == e).collect();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for &i in &idx {
            *counts.entry(domains[i].as_str()).or_default() += 1;
        }
        let (dom, top) = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(d, c)| (d.to_string(), *c))
            .unwrap_or_default();
        let share = top as f64 / idx.len().max(1) as f64;
        let lt_share = idx
            .iter()
            .filter(|&&i| long_tail.contains(&domains[i]))
            .count() as f64
            / idx.len().max(1) as f64;
        let (c, cb) = (consistency(kernel, &idx), consistency(baseline, &idx));
        let mut lt = Vec::new();
        for d in long_tail {
            let part: Vec<usize> = idx.iter().copied().filter(|&i| &domains[i] == d).collect();
            if !part.is_empty() {
                lt.push((
                    d.clone(),
                    sub_gc(kernel, &idx, &part)?,
                    sub_gc(baseline, &idx, &part)?,
                ));
            }
        }
        let verdict = if (idx.len() as f64) < rule.idle_share * n as f64 {
            "idle"
        } else if (share >= rule.purity || lt_share >= rule.purity)
            && c.zip(cb).is_some_and(|(a, b)| a > b)
        {
            "isolated"
        } else {
            "mixed"
        };
        experts.push(ExpertReport {
            expert: e,
            load: idx.len(),
            dominant_domain: dom,
            dominant_share: share,
            long_tail_share: lt_share,
            consistency: c,
            baseline_consistency: cb,
            long_tail_gc: lt,
            verdict: verdict.to_string(),
        });
    }
    Ok(BlockReport {
        block: block.to_string(),
        purity,
        nmi: nmi(domains, routes),
        separation: None,
        experts,
    })
}

/// Distance/radius ratio of the groups `routes` makes of the rows of `emb` ((n, d) f32, row-major):
/// mean pairwise centroid distance over mean radius (mean member distance to its centroid).
/// Experts no row reached are left out (they have no centroid).
pub fn separation(emb: &[f32], d: usize, routes: &[i64]) -> Result<Option<f64>> {
    let used: BTreeMap<i64, usize> = {
        let mut u: Vec<i64> = routes.iter().copied().filter(|&r| r >= 0).collect();
        u.sort_unstable();
        u.dedup();
        u.into_iter().enumerate().map(|(i, r)| (r, i)).collect()
    };
    let labels: Vec<Option<usize>> = routes.iter().map(|r| used.get(r).copied()).collect();
    let stats = crate::cluster::ClusterStats::compute(emb, d, &labels, used.len())?;
    Ok(stats.separation_ratio(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand: expert 0 = {(0,0), (2,0)} → centroid (1,0), radius 1; expert 3 = {(10,0), (10,4)}
    /// → centroid (10,2), radius 2; ratio = √85 / 1.5. Unused experts 1 and 2 do not count.
    #[test]
    fn separation_by_hand() {
        let emb = [0.0f32, 0.0, 2.0, 0.0, 10.0, 0.0, 10.0, 4.0];
        let r = separation(&emb, 2, &[0, 0, 3, 3]).unwrap().unwrap();
        assert!((r - 85f64.sqrt() / 1.5).abs() < 1e-6, "{r}");
        assert_eq!(separation(&emb, 2, &[1, 1, 1, 1]).unwrap(), None);
    }

    #[test]
    fn nmi_extremes() {
        let d: Vec<String> = ["a", "a", "b", "b"].iter().map(|s| s.to_string()).collect();
        assert!((nmi(&d, &[0, 0, 1, 1]) - 1.0).abs() < 1e-12);
        assert!((nmi(&d, &[5, 5, 7, 7]) - 1.0).abs() < 1e-12);
        assert!(nmi(&d, &[0, 1, 0, 1]).abs() < 1e-12);
    }

    /// A constructed case with known isolation: domain "law" (samples 0..4) goes to expert 1 and
    /// its gradients are aligned in the sparse model (one shared direction) but not in the
    /// baseline; expert 0 holds a mix of "news" and "sport"; expert 2 receives nothing.
    #[test]
    fn verdicts_on_a_constructed_case() {
        let domains: Vec<String> = ["law", "law", "law", "law", "news", "sport", "news", "sport"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let routes = [1i64, 1, 1, 1, 0, 0, 0, 0];
        // Sparse model: law gradients = e1 + small noise; others spread.
        let j = Tensor::from_slice(&[
            1.0f64, 0.1, 0.0, 0.0, 1.0, 0.0, 0.1, 0.0, 1.0, 0.0, 0.0, 0.1, 1.0, 0.1, 0.1,
            0.0, // law
            0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0,
            0.0, // others
        ])
        .view([8, 4]);
        let k = j.matmul(&j.tr());
        // Baseline: law gradients point in different directions.
        let jb = Tensor::from_slice(&[
            1.0f64, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0,
            1.0, //
            0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0,
        ])
        .view([8, 4]);
        let kb = jb.matmul(&jb.tr());
        let r = block_report(
            &Routing {
                block: "h.3",
                domains: &domains,
                routes: &routes,
                n_experts: 3,
            },
            &["law".into()],
            &k,
            &kb,
            &VerdictRule::default(),
        )
        .unwrap();
        let v: Vec<(&str, &str)> = r
            .experts
            .iter()
            .map(|e| (e.dominant_domain.as_str(), e.verdict.as_str()))
            .collect();
        assert_eq!(
            v,
            vec![("news", "mixed"), ("law", "isolated"), ("", "idle")]
        );
        assert!(
            r.experts[1].consistency.unwrap() > 0.9
                && r.experts[1].baseline_consistency.unwrap() < 0.05
        );
        assert_eq!(
            (r.experts[0].long_tail_share, r.experts[1].long_tail_share),
            (0.0, 1.0)
        );
        let (ref d, g, gb) = r.experts[1].long_tail_gc[0];
        assert_eq!(d, "law");
        assert!(
            (g.unwrap() - 1.0).abs() < 1e-9 && (gb.unwrap() - 1.0).abs() < 1e-9,
            "GC of a whole set with itself"
        );
        assert!(
            (r.nmi - 1.0).abs() > 0.1 && r.nmi > 0.5,
            "law is separated, news/sport are not: {}",
            r.nmi
        );
        let purity: Vec<f64> = r.purity.iter().map(|p| p.1).collect();
        assert_eq!(purity, vec![1.0, 1.0, 1.0]);
        // An expert with too few samples is idle.
        let rule = VerdictRule {
            idle_share: 0.6,
            purity: 0.7,
        };
        let r = block_report(
            &Routing {
                block: "h.3",
                domains: &domains,
                routes: &routes,
                n_experts: 2,
            },
            &[],
            &k,
            &kb,
            &rule,
        )
        .unwrap();
        assert!(r.experts.iter().all(|e| e.verdict == "idle"));
    }
}

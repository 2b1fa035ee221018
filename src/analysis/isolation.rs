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
use std::path::Path;

use ndarray::{Array2, ArrayView2};
use polars::prelude::{Column, DataFrame};
use serde::Serialize;
use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::io::{column_f64, column_str, read_parquet};
use crate::model::{ExpertConfig, Model};
use crate::ntk::gc;

/// Thresholds of the per-expert verdict (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct VerdictRule {
    /// `idle` below this share of the samples.
    pub idle_share: f64,
    /// `isolated` needs one domain (or the long tail) at this share or more.
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

/// One expert of one block.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpertReport {
    /// The expert's index.
    pub expert: i64,
    /// Samples routed to it.
    pub load: usize,
    /// Its most frequent domain.
    pub dominant_domain: String,
    /// That domain's share of its samples.
    pub dominant_share: f64,
    /// Share of the expert's samples from long-tail domains.
    pub long_tail_share: f64,
    /// Mean normalised kernel entry among its samples (sparse model).
    pub consistency: Option<f64>,
    /// The same on the baseline's kernel.
    pub baseline_consistency: Option<f64>,
    /// (long-tail domain, GC within the expert, baseline GC on the same sets)
    pub long_tail_gc: Vec<(String, Option<f64>, Option<f64>)>,
    /// `idle`, `isolated` or `mixed`.
    pub verdict: String,
}

/// Isolation at one routed block.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BlockReport {
    /// The block's route column (`expert_h{i}`).
    pub block: String,
    /// (domain, purity, samples)
    pub purity: Vec<(String, f64, usize)>,
    /// NMI(domain, expert).
    pub nmi: f64,
    /// Cluster distance/radius ratio of the experts in the sequence embeddings entering the
    /// block (mean pairwise distance of the experts' centroids over their mean radius; paper
    /// Fig. 3); `None` with fewer than two used experts, or when no embeddings were given.
    pub separation: Option<f64>,
    /// One report per expert.
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
pub fn consistency(k: ArrayView2<f64>, idx: &[usize]) -> Option<f64> {
    if idx.len() < 2 {
        return None;
    }
    let mut total = 0.0;
    let mut pairs = 0usize;
    for (a, &i) in idx.iter().enumerate() {
        for &j in &idx[a + 1..] {
            let (kij, kii, kjj) = (k[[i, j]], k[[i, i]], k[[j, j]]);
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
    gc::gc(&crate::ntk::op::Dense::new(&sub), &pr, &pos)
}

/// One block's routing of the analysed samples.
pub struct Routing<'a> {
    /// The block's route column.
    pub block: &'a str,
    /// Domain of each sample.
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
    let kernels = Kernels {
        sparse: kernel,
        baseline,
        sparse_cpu: crate::array::matrix_f64(kernel)?,
        baseline_cpu: crate::array::matrix_f64(baseline)?,
    };
    let experts = (0..n_exp)
        .map(|e| expert_report(e, r, long_tail, &kernels, rule))
        .collect::<Result<Vec<_>>>()?;
    Ok(BlockReport {
        block: block.to_string(),
        purity,
        nmi: nmi(domains, routes),
        separation: None,
        experts,
    })
}

/// The sparse model's and the baseline's kernels, as tensors (for GC) and CPU arrays.
struct Kernels<'a> {
    sparse: &'a Tensor,
    baseline: &'a Tensor,
    sparse_cpu: Array2<f64>,
    baseline_cpu: Array2<f64>,
}

/// One expert's load, dominant domain, long-tail share, kernel consistency (and the baseline's)
/// and verdict.
fn expert_report(
    e: i64,
    r: &Routing,
    long_tail: &[String],
    k: &Kernels,
    rule: &VerdictRule,
) -> Result<ExpertReport> {
    let (kernel, baseline) = (k.sparse, k.baseline);
    let (domains, routes) = (r.domains, r.routes);
    let n = domains.len();
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
    let (c, cb) = (
        consistency(k.sparse_cpu.view(), &idx),
        consistency(k.baseline_cpu.view(), &idx),
    );
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
    Ok(ExpertReport {
        expert: e,
        load: idx.len(),
        dominant_domain: dom,
        dominant_share: share,
        long_tail_share: lt_share,
        consistency: c,
        baseline_consistency: cb,
        long_tail_gc: lt,
        verdict: verdict.to_string(),
    })
}

/// Distance/radius ratio of the groups `routes` makes of the rows of `emb` (n, d):
/// mean pairwise centroid distance over mean radius (mean member distance to its centroid).
/// Experts no row reached are left out (they have no centroid).
pub fn separation(emb: ArrayView2<f32>, routes: &[i64]) -> Result<Option<f64>> {
    let d = emb.ncols();
    let used: BTreeMap<i64, usize> = {
        let mut u: Vec<i64> = routes.iter().copied().filter(|&r| r >= 0).collect();
        u.sort_unstable();
        u.dedup();
        u.into_iter().enumerate().map(|(i, r)| (r, i)).collect()
    };
    let labels: Vec<Option<usize>> = routes.iter().map(|r| used.get(r).copied()).collect();
    let stats = crate::cluster::ClusterStats::compute(emb, &labels, used.len())?;
    Ok(stats.separation_ratio(d))
}

/// What [`isolate`] compares: a sparse model's NTK run against the dense baseline's on the same
/// samples.
pub struct IsolationInputs<'a> {
    /// The sparse model's `ntk` folder.
    pub ntk: &'a Path,
    /// The baseline's `ntk` folder.
    pub baseline: &'a Path,
    /// The sparse run's `samples.parquet` (with its `expert_h{i}` route columns).
    pub samples: &'a DataFrame,
    /// Sample ids, in order.
    pub ids: &'a [String],
    /// Sample domains, in order.
    pub domains: &'a [String],
    /// The long-tail domains among them, sorted.
    pub long_tail: &'a [String],
}

/// Expert isolation of every CSE or Switch block: reports and `isolation.parquet`.
#[derive(Debug)]
pub struct Isolation {
    /// One report per routed block.
    pub reports: Vec<BlockReport>,
    /// One row per (block, expert).
    pub table: DataFrame,
}

fn load_total(path: &Path) -> Result<Tensor> {
    let t = crate::io::read_tensors(path)?;
    Ok(t.get("total")
        .ok_or_else(|| Error::in_file(path, "missing tensor `total`"))?
        .to_kind(tch::Kind::Double))
}

/// Number of experts of block `layer` of `model`.
fn experts_at(model: &Model, layer: i64) -> usize {
    let cfg = &model.cfg;
    match &cfg.experts {
        ExpertConfig::Cse(cse) => cse
            .experts
            .get((layer - (cfg.n_layer - cse.last_k)).max(0) as usize)
            .copied()
            .unwrap_or(1) as usize,
        ExpertConfig::Switch(sw) => sw.n_experts as usize,
        _ => 1,
    }
}

/// Expert isolation of every routed block of `model` against the baseline kernel on the same
/// samples (`seqs`: their token ids, for the embeddings entering each block).
pub fn isolate(
    inp: &IsolationInputs,
    model: &Model,
    seqs: &[&[u32]],
    device: Device,
) -> Result<Isolation> {
    let bp = inp.baseline.join("samples.parquet");
    let sp = inp.ntk.join("samples.parquet");
    let base_ids = column_str(&read_parquet(&bp)?, "id", &bp)?;
    if base_ids != inp.ids {
        return Err(Error::in_file(&bp, format!("holds other samples than {}; compute both kernels with the same --split, --samples and --seed", sp.display())));
    }
    let k = load_total(&inp.ntk.join("kernel.safetensors"))?;
    let kb = load_total(&inp.baseline.join("kernel.safetensors"))?;
    let cols: Vec<String> = inp
        .samples
        .get_column_names()
        .iter()
        .map(|c| c.to_string())
        .filter(|c| c.starts_with("expert_h"))
        .collect();
    let mut reports = Vec::new();
    let mut enc: Option<crate::eval::Encoded> = None;
    for c in cols {
        let routes: Vec<i64> = column_f64(inp.samples, &c, &sp)?
            .iter()
            .map(|x| *x as i64)
            .collect();
        let layer: i64 = c.trim_start_matches("expert_h").parse().unwrap_or(-1);
        let routing = Routing {
            block: &c,
            domains: inp.domains,
            routes: &routes,
            n_experts: experts_at(model, layer),
        };
        let mut r = block_report(&routing, inp.long_tail, &k, &kb, &VerdictRule::default())?;
        // The router sees the output of the previous block: encode's layer `layer`.
        let enc = match &enc {
            Some(e) => e,
            None => enc.insert(crate::eval::encode(model, seqs, 64, device)?),
        };
        if let Some(emb) = enc.layers.get(layer.max(0) as usize) {
            r.separation = separation(crate::array::matrix_f32(emb)?.view(), &routes)?;
        }
        reports.push(r);
    }
    let table = isolation_frame(&reports)?;
    Ok(Isolation { reports, table })
}

/// `isolation.parquet`: one row per (block, expert), with the block's NMI and separation.
pub fn isolation_frame(reports: &[BlockReport]) -> Result<DataFrame> {
    let rows: Vec<(&BlockReport, &ExpertReport)> = reports
        .iter()
        .flat_map(|r| r.experts.iter().map(move |e| (r, e)))
        .collect();
    let f = |name: &str, g: fn(&ExpertReport) -> f64| {
        Column::new(
            name.into(),
            rows.iter().map(|(_, e)| g(e)).collect::<Vec<_>>(),
        )
    };
    let opt = |name: &str, g: fn(&ExpertReport) -> Option<f64>| {
        Column::new(
            name.into(),
            rows.iter().map(|(_, e)| g(e)).collect::<Vec<_>>(),
        )
    };
    DataFrame::new(
        rows.len(),
        vec![
            Column::new(
                "block".into(),
                rows.iter()
                    .map(|(r, _)| r.block.as_str())
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "expert".into(),
                rows.iter().map(|(_, e)| e.expert).collect::<Vec<_>>(),
            ),
            Column::new(
                "load".into(),
                rows.iter().map(|(_, e)| e.load as u64).collect::<Vec<_>>(),
            ),
            Column::new(
                "dominant_domain".into(),
                rows.iter()
                    .map(|(_, e)| e.dominant_domain.as_str())
                    .collect::<Vec<_>>(),
            ),
            f("dominant_share", |e| e.dominant_share),
            f("long_tail_share", |e| e.long_tail_share),
            opt("consistency", |e| e.consistency),
            opt("baseline_consistency", |e| e.baseline_consistency),
            Column::new(
                "block_nmi".into(),
                rows.iter().map(|(r, _)| r.nmi).collect::<Vec<_>>(),
            ),
            Column::new(
                "block_separation".into(),
                rows.iter().map(|(r, _)| r.separation).collect::<Vec<_>>(),
            ),
            Column::new(
                "verdict".into(),
                rows.iter()
                    .map(|(_, e)| e.verdict.as_str())
                    .collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("isolation", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand: expert 0 = {(0,0), (2,0)} → centroid (1,0), radius 1; expert 3 = {(10,0), (10,4)}
    /// → centroid (10,2), radius 2; ratio = √85 / 1.5. Unused experts 1 and 2 do not count.
    #[test]
    fn separation_by_hand() {
        let data = [0.0f32, 0.0, 2.0, 0.0, 10.0, 0.0, 10.0, 4.0];
        let emb = crate::cluster::points(&data, 2).unwrap();
        let r = separation(emb, &[0, 0, 3, 3]).unwrap().unwrap();
        assert!((r - 85f64.sqrt() / 1.5).abs() < 1e-6, "{r}");
        assert_eq!(separation(emb, &[1, 1, 1, 1]).unwrap(), None);
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

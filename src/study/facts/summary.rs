//! The facts study's numbers: acquisition and gain per count with 95% intervals over seeds and
//! facts, each run against the baseline paired by seed and fact, the count at which each run
//! reaches half acquisition, forgetting, the experts' routing of fact texts, and foresight.
//!
//! Intervals over seeds *and* facts come from a crossed percentile bootstrap: each resample draws
//! the seeds with replacement and, independently, the facts of each count with replacement (the
//! same facts are trained under every seed, so both are sources of spread), and takes the mean
//! over the drawn (seed, fact) cells. The half-acquisition count of a curve is interpolated
//! linearly in log₂ k between the counts around 0.5; its interval comes from the same resamples
//! (a resample that never reaches 0.5 counts as beyond the largest count).

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::super::{t_interval, Interval};
use crate::eval::facts::FactRow;

/// Bootstrap resamples of the crossed intervals.
pub const RESAMPLES: usize = 2000;

/// One fact's outcome in one run and seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The seed.
    pub seed: u64,
    /// The run.
    pub run: String,
    /// The fact's row.
    pub fact: FactRow,
}

/// A mean with its interval, flattened for tables.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurveRow {
    /// The run.
    pub run: String,
    /// The count.
    pub count: u32,
    /// `acquired`, `gain`, `specific_gain` or `first_rate`; against the baseline, `<metric>`
    /// of run − baseline.
    pub metric: String,
    /// Mean over seeds and facts.
    pub mean: f64,
    /// 95% interval (crossed bootstrap).
    pub low: f64,
    /// 95% interval.
    pub high: f64,
}

/// The count at which a run's acquired share reaches one half.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HalfCount {
    /// The run.
    pub run: String,
    /// Interpolated count (`None`: not reached by the largest count).
    pub count: Option<f64>,
    /// 2.5% percentile over resamples (`None`: beyond the largest count).
    pub low: Option<f64>,
    /// 97.5% percentile.
    pub high: Option<f64>,
}

/// The metrics of the curves.
pub const METRICS: [&str; 4] = ["acquired", "gain", "specific_gain", "first_rate"];

fn metric(f: &FactRow, m: &str) -> f64 {
    match m {
        "acquired" => f64::from(u8::from(f.acquired)),
        "gain" => f.gain.unwrap_or(f64::NAN),
        "specific_gain" => f.specific_gain.unwrap_or(f64::NAN),
        _ => f.first_rate,
    }
}

/// `value[s][f]` per count, for one run and metric: seeds and facts in a fixed order (facts by
/// id), counts increasing. Controls (count 0) are left out.
type Grid = BTreeMap<u32, Vec<Vec<f64>>>;

fn grid(outcomes: &[Outcome], run: &str, m: &str) -> Grid {
    let mut cells: BTreeMap<u32, BTreeMap<u64, BTreeMap<&str, f64>>> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| o.run == run && o.fact.count > 0) {
        cells
            .entry(o.fact.count)
            .or_default()
            .entry(o.seed)
            .or_default()
            .insert(o.fact.fact_id.as_str(), metric(&o.fact, m));
    }
    cells
        .into_iter()
        .map(|(k, by_seed)| {
            (
                k,
                by_seed
                    .into_values()
                    .map(|f| f.into_values().collect())
                    .collect(),
            )
        })
        .collect()
}

/// The run − baseline grid, paired by seed and fact (cells missing from either are dropped).
fn paired(a: &Grid, b: &Grid) -> Grid {
    a.iter()
        .filter_map(|(k, xa)| {
            let xb = b.get(k)?;
            let d: Vec<Vec<f64>> = xa
                .iter()
                .zip(xb)
                .map(|(ra, rb)| ra.iter().zip(rb).map(|(x, y)| x - y).collect())
                .collect();
            Some((*k, d))
        })
        .collect()
}

fn mean_of(rows: &[&Vec<f64>], cols: &[usize]) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for r in rows {
        for &c in cols {
            if let Some(v) = r.get(c).filter(|v| v.is_finite()) {
                s += v;
                n += 1;
            }
        }
    }
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// Point estimates and `resamples` crossed-bootstrap means of every count of `g` (see the module
/// docs), deterministic for `key`.
fn crossed(g: &Grid, resamples: usize, key: u64) -> (Vec<f64>, Vec<Vec<f64>>) {
    let point = g
        .values()
        .map(|x| {
            let rows: Vec<&Vec<f64>> = x.iter().collect();
            let n = x.first().map_or(0, Vec::len);
            mean_of(&rows, &(0..n).collect::<Vec<_>>())
        })
        .collect();
    let draws = (0..resamples)
        .map(|b| {
            let mut rng =
                ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(key, &(b as u64).to_le_bytes()));
            let seeds = g.values().next().map_or(0, Vec::len);
            let pick: Vec<usize> = (0..seeds).map(|_| rng.random_range(0..seeds)).collect();
            g.values()
                .map(|x| {
                    let rows: Vec<&Vec<f64>> = pick.iter().map(|&s| &x[s]).collect();
                    let n = x.first().map_or(0, Vec::len);
                    let cols: Vec<usize> = (0..n).map(|_| rng.random_range(0..n.max(1))).collect();
                    mean_of(&rows, &cols)
                })
                .collect()
        })
        .collect();
    (point, draws)
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.retain(|x| !x.is_nan());
    crate::stats::percentile_interval(&mut v, 0.05)
}

/// Per run, count and metric: mean and interval; per run other than `baseline`: the paired
/// differences; per run: the half-acquisition count.
pub fn curves(
    outcomes: &[Outcome],
    runs: &[String],
    baseline: &str,
    resamples: usize,
    seed: u64,
) -> (Vec<CurveRow>, Vec<CurveRow>, Vec<HalfCount>) {
    let (mut rows, mut vs, mut half) = (Vec::new(), Vec::new(), Vec::new());
    for (ri, run) in runs.iter().enumerate() {
        for (mi, m) in METRICS.iter().enumerate() {
            let g = grid(outcomes, run, m);
            let key = crate::seed::stable_hash(seed, format!("facts/{run}/{m}").as_bytes());
            let (point, draws) = crossed(&g, resamples, key);
            rows.extend(rows_of(run, m, &g, &point, &draws));
            if mi == 0 {
                half.push(half_count(run, g.keys().copied().collect(), &point, &draws));
            }
            if run != baseline {
                let d = paired(&g, &grid(outcomes, baseline, m));
                let (point, draws) = crossed(&d, resamples, key ^ (ri as u64 + 1));
                vs.extend(rows_of(run, m, &d, &point, &draws));
            }
        }
    }
    (rows, vs, half)
}

fn rows_of(run: &str, m: &str, g: &Grid, point: &[f64], draws: &[Vec<f64>]) -> Vec<CurveRow> {
    g.keys()
        .enumerate()
        .map(|(j, &count)| {
            let (low, high) = percentiles(draws.iter().map(|d| d[j]).collect());
            CurveRow {
                run: run.to_string(),
                count,
                metric: m.to_string(),
                mean: point[j],
                low,
                high,
            }
        })
        .collect()
}

/// Where a curve (shares at increasing `counts`) first reaches 0.5, interpolated in log₂ k;
/// the first count when it starts above; `None` when it never does.
pub fn half_point(counts: &[u32], shares: &[f64]) -> Option<f64> {
    let i = shares.iter().position(|&s| s >= 0.5)?;
    if i == 0 {
        return Some(f64::from(counts[0]));
    }
    let (k0, k1) = (f64::from(counts[i - 1]).log2(), f64::from(counts[i]).log2());
    let (a0, a1) = (shares[i - 1], shares[i]);
    Some((k0 + (0.5 - a0) / (a1 - a0) * (k1 - k0)).exp2())
}

fn half_count(run: &str, counts: Vec<u32>, point: &[f64], draws: &[Vec<f64>]) -> HalfCount {
    let mut at: Vec<f64> = draws
        .iter()
        .map(|d| half_point(&counts, d).unwrap_or(f64::INFINITY))
        .collect();
    let (low, high) = percentiles(std::mem::take(&mut at));
    let finite = |x: f64| x.is_finite().then_some(x);
    HalfCount {
        run: run.to_string(),
        count: half_point(&counts, point),
        low: finite(low),
        high: finite(high),
    }
}

/// Host perplexity of one run and seed, before (the base model) and after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Forgetting {
    /// The seed.
    pub seed: u64,
    /// The run.
    pub run: String,
    /// Held-out host perplexity of the base model.
    pub before: f64,
    /// After training.
    pub after: f64,
}

/// Per run: perplexity after training (mean over seeds, t interval), its change against the
/// base model in % (t interval), and against the baseline run paired by seed in %.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ForgettingRow {
    /// The run.
    pub run: String,
    /// The base model's perplexity (the same for every seed).
    pub before: f64,
    /// After.
    pub after: Interval,
    /// 100 (after / before − 1).
    pub change: Interval,
    /// 100 (after / baseline's after − 1), paired by seed (`None` for the baseline).
    pub vs_baseline: Option<Interval>,
}

/// Forgetting per run.
pub fn forgetting(rows: &[Forgetting], runs: &[String], baseline: &str) -> Vec<ForgettingRow> {
    let of = |run: &str| -> BTreeMap<u64, (f64, f64)> {
        rows.iter()
            .filter(|r| r.run == run)
            .map(|r| (r.seed, (r.before, r.after)))
            .collect()
    };
    let base = of(baseline);
    runs.iter()
        .filter_map(|run| {
            let v = of(run);
            let first = v.values().next()?;
            let vs: Vec<f64> = v
                .iter()
                .filter_map(|(s, x)| base.get(s).map(|b| 100.0 * (x.1 / b.1 - 1.0)))
                .collect();
            Some(ForgettingRow {
                run: run.clone(),
                before: first.0,
                after: t_interval(&v.values().map(|x| x.1).collect::<Vec<_>>()),
                change: t_interval(
                    &v.values()
                        .map(|x| 100.0 * (x.1 / x.0 - 1.0))
                        .collect::<Vec<_>>(),
                ),
                vs_baseline: (run != baseline).then(|| t_interval(&vs)),
            })
        })
        .collect()
}

/// Texts of one kind sent to one expert of one block, in one run and seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// The seed.
    pub seed: u64,
    /// The run.
    pub run: String,
    /// The block.
    pub block: i64,
    /// The expert.
    pub expert: i64,
    /// Fact texts routed there.
    pub facts: usize,
    /// Held-out host texts routed there.
    pub host: usize,
}

/// Per routed run and block: the expert that gets most fact texts, its share of the fact texts
/// and of the host texts (means over seeds, t intervals), and the experts fact texts reach.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RoutingRow {
    /// The run.
    pub run: String,
    /// The block.
    pub block: i64,
    /// Experts in the block (mean over seeds).
    pub experts: f64,
    /// Experts that receive any fact text (mean over seeds).
    pub fact_experts: f64,
    /// Share of fact texts at the expert that gets most of them.
    pub top_fact_share: Interval,
    /// That expert's share of the host texts.
    pub top_host_share: Interval,
}

/// Routing per run and block.
pub fn routing(routes: &[Route]) -> Vec<RoutingRow> {
    let mut by: BTreeMap<(String, i64), BTreeMap<u64, Vec<&Route>>> = BTreeMap::new();
    for r in routes {
        by.entry((r.run.clone(), r.block))
            .or_default()
            .entry(r.seed)
            .or_default()
            .push(r);
    }
    by.into_iter()
        .map(|((run, block), seeds)| {
            let (mut e, mut fe, mut fs, mut hs) = (vec![], vec![], vec![], vec![]);
            for rs in seeds.values() {
                let facts: usize = rs.iter().map(|r| r.facts).sum();
                let host: usize = rs.iter().map(|r| r.host).sum();
                let top = rs
                    .iter()
                    .max_by_key(|r| (r.facts, std::cmp::Reverse(r.expert)));
                e.push(rs.len() as f64);
                fe.push(rs.iter().filter(|r| r.facts > 0).count() as f64);
                fs.push(top.map_or(0.0, |t| t.facts as f64 / facts.max(1) as f64));
                hs.push(top.map_or(0.0, |t| t.host as f64 / host.max(1) as f64));
            }
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
            RoutingRow {
                run,
                block,
                experts: mean(&e),
                fact_experts: mean(&fe),
                top_fact_share: t_interval(&fs),
                top_host_share: t_interval(&hs),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fact(id: &str, count: u32, acquired: bool, gain: f64) -> FactRow {
        FactRow {
            fact_id: id.into(),
            relation: "birthplace".into(),
            count,
            first_rate: f64::from(u8::from(acquired)),
            acquired,
            logprob: -1.0,
            seen_first: None,
            first_rate_before: Some(0.0),
            acquired_before: Some(false),
            gain: Some(gain),
            specific_gain: Some(gain),
        }
    }

    fn o(seed: u64, run: &str, f: FactRow) -> Outcome {
        Outcome {
            seed,
            run: run.into(),
            fact: f,
        }
    }

    #[test]
    fn half_point_interpolates_in_log_count() {
        assert_eq!(
            half_point(&[1, 2, 4], &[0.0, 0.25, 0.75]),
            Some(2f64.powf(1.5))
        );
        assert_eq!(half_point(&[1, 2], &[0.6, 0.9]), Some(1.0));
        assert_eq!(half_point(&[1, 2], &[0.1, 0.4]), None);
    }

    #[test]
    fn curves_pair_runs_by_seed_and_fact() {
        let mut out = Vec::new();
        for seed in [1, 2] {
            for (id, k) in [("a", 1), ("b", 1), ("c", 4), ("d", 4)] {
                let dense = k == 4;
                out.push(o(seed, "dense", fact(id, k, dense, 1.0)));
                // cse acquires every fact, with gain one higher on each.
                out.push(o(seed, "cse", fact(id, k, true, 2.0)));
            }
            out.push(o(seed, "dense", fact("ctl", 0, false, 0.0)));
        }
        let runs = vec!["dense".to_string(), "cse".to_string()];
        let (rows, vs, half) = curves(&out, &runs, "dense", 200, 3);
        let get = |rs: &[CurveRow], run: &str, k: u32, m: &str| {
            rs.iter()
                .find(|r| r.run == run && r.count == k && r.metric == m)
                .cloned()
                .unwrap()
        };
        let d1 = get(&rows, "dense", 1, "acquired");
        assert_eq!((d1.mean, d1.low, d1.high), (0.0, 0.0, 0.0));
        assert!(rows.iter().all(|r| r.count > 0), "controls are left out");
        let g = get(&vs, "cse", 4, "gain");
        assert_eq!(
            (g.mean, g.low, g.high),
            (1.0, 1.0, 1.0),
            "paired: always +1"
        );
        assert_eq!(get(&vs, "cse", 1, "acquired").mean, 1.0);
        assert_eq!(
            half[0].count,
            Some(2.0),
            "dense: 0 at k 1, 1 at k 4 → 0.5 at 2"
        );
        assert_eq!(half[1].count, Some(1.0));
    }

    #[test]
    fn forgetting_and_routing_by_hand() {
        let f = |seed, run: &str, after| Forgetting {
            seed,
            run: run.into(),
            before: 100.0,
            after,
        };
        let rows = vec![
            f(1, "dense", 110.0),
            f(2, "dense", 120.0),
            f(1, "cse", 121.0),
            f(2, "cse", 132.0),
        ];
        let runs = vec!["dense".to_string(), "cse".to_string()];
        let fr = forgetting(&rows, &runs, "dense");
        assert!((fr[0].change.mean - 15.0).abs() < 1e-12);
        let v = fr[1].vs_baseline.clone().unwrap();
        assert!((v.mean - 10.0).abs() < 1e-9 && (v.high - v.low).abs() < 1e-9);
        let r = |seed, expert, facts, host| Route {
            seed,
            run: "cse".into(),
            block: 29,
            expert,
            facts,
            host,
        };
        let rt = routing(&[
            r(1, 0, 3, 50),
            r(1, 1, 1, 50),
            r(2, 0, 0, 10),
            r(2, 1, 4, 30),
        ]);
        assert_eq!(rt.len(), 1);
        // Seed 1: expert 0 (3 of 4 facts, 50 of 100 host); seed 2: expert 1 (4 of 4, 30 of 40).
        assert!((rt[0].top_fact_share.mean - 0.875).abs() < 1e-12);
        assert!((rt[0].top_host_share.mean - 0.625).abs() < 1e-12);
        assert!((rt[0].fact_experts - 1.5).abs() < 1e-12);
    }
}

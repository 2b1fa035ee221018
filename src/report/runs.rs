//! The runs of a training spec side by side, from each run's `val_samples.parquet`: validation
//! perplexity at the first and the last validation, overall, on the long-tail domains and on the
//! common ones, each with a 95% percentile bootstrap interval over the validation sentences, and
//! each run's change against a reference run on the same sentences (a paired bootstrap: the same
//! resampled sentences for both runs). Perplexity of a set of sentences is exp(Σ loss / Σ tokens).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;
use crate::io::{column_f64, column_str, read_parquet};
use crate::stats::percentile_interval;

/// Bootstrap resamples of every interval.
pub const RESAMPLES: usize = 2000;

/// One run's validation sentences at its first and last validation, in sample order.
struct RunLosses {
    name: String,
    samples: Vec<u64>,
    long_tail: Vec<bool>,
    start: Vec<(f64, f64)>,
    end: Vec<(f64, f64)>,
    end_step: u64,
}

fn ppl(rows: &[(f64, f64)], pick: impl Iterator<Item = usize>) -> f64 {
    let (l, t) = pick.fold((0.0, 0.0), |(l, t), i| (l + rows[i].0, t + rows[i].1));
    (l / t.max(1.0)).exp()
}

/// The runs (folders beside each other holding `val_samples.parquet`) under `train_dir`.
fn read_runs(train_dir: &Path, long_tail: &BTreeSet<String>) -> Result<Vec<RunLosses>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(train_dir)
        .map_err(|e| crate::Error::io(train_dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("val_samples.parquet").exists())
        .collect();
    dirs.sort();
    let mut out = Vec::new();
    for d in dirs {
        let p = d.join("val_samples.parquet");
        let t = read_parquet(&p)?;
        let step = column_f64(&t, "step", &p)?;
        let sample = column_f64(&t, "sample", &p)?;
        let domain = column_str(&t, "domain", &p)?;
        let loss = column_f64(&t, "loss_sum", &p)?;
        let tokens = column_f64(&t, "tokens", &p)?;
        let (Some(first), Some(last)) = (
            step.iter().copied().reduce(f64::min),
            step.iter().copied().reduce(f64::max),
        ) else {
            continue;
        };
        let at = |s: f64| -> Vec<usize> {
            let mut v: Vec<usize> = (0..step.len()).filter(|&i| step[i] == s).collect();
            v.sort_by(|&a, &b| sample[a].total_cmp(&sample[b]));
            v
        };
        let (a, b) = (at(first), at(last));
        if a.len() != b.len() || first == last {
            continue;
        }
        out.push(RunLosses {
            name: d
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            samples: b.iter().map(|&i| sample[i] as u64).collect(),
            long_tail: b.iter().map(|&i| long_tail.contains(&domain[i])).collect(),
            start: a.iter().map(|&i| (loss[i], tokens[i])).collect(),
            end: b.iter().map(|&i| (loss[i], tokens[i])).collect(),
            end_step: last as u64,
        });
    }
    Ok(out)
}

/// Estimate and 95% interval of `stat` over `n` sentences resampled with `seed`.
fn interval(n: usize, seed: u64, stat: impl Fn(&[usize]) -> f64 + Sync) -> (f64, f64, f64) {
    let all: Vec<usize> = (0..n).collect();
    let value = stat(&all);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut stats: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let pick: Vec<usize> = (0..n).map(|_| rng.random_range(0..n)).collect();
            stat(&pick)
        })
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = percentile_interval(&mut stats, 0.05);
    (value, lo, hi)
}

/// One line per run: perplexity start → end [interval], long-tail and common perplexity at the
/// end, and the paired change against `reference` (a run name) when both exist.
pub fn run_lines(
    train_dir: &Path,
    long_tail: &BTreeSet<String>,
    reference: Option<&str>,
    seed: u64,
) -> Result<Vec<String>> {
    let runs = read_runs(train_dir, long_tail)?;
    let reference = reference.and_then(|r| runs.iter().find(|x| x.name == r));
    let mut lines = Vec::new();
    for r in &runs {
        let n = r.end.len();
        let part = |tail: Option<bool>| -> Vec<usize> {
            (0..n)
                .filter(|&i| tail.is_none_or(|t| r.long_tail[i] == t))
                .collect()
        };
        let fmt = |(v, lo, hi): (f64, f64, f64)| format!("{v:.1} [{lo:.1}, {hi:.1}]");
        let of = |rows: &[(f64, f64)], idx: Vec<usize>| {
            let m = idx.len();
            interval(m, seed, move |p| ppl(rows, p.iter().map(|&k| idx[k])))
        };
        let mut line = format!(
            "{}: validation perplexity {:.1} before training → {} after {} steps ({n} sentences); long-tail domains {} ({} sentences), common domains {}",
            r.name,
            ppl(&r.start, 0..n),
            fmt(of(&r.end, part(None))),
            r.end_step,
            fmt(of(&r.end, part(Some(true)))),
            part(Some(true)).len(),
            fmt(of(&r.end, part(Some(false)))),
        );
        if let Some(base) = reference.filter(|b| b.name != r.name && b.samples == r.samples) {
            let change = |tail: bool| {
                let idx = part(Some(tail));
                let m = idx.len();
                let (run, base) = (&r.end, &base.end);
                interval(m, seed ^ 0x5eed, move |p| {
                    let pick = || p.iter().map(|&k| idx[k]);
                    100.0 * (ppl(run, pick()) / ppl(base, pick()) - 1.0)
                })
            };
            let pct = |(v, lo, hi): (f64, f64, f64)| {
                let word = if lo > 0.0 {
                    "higher"
                } else if hi < 0.0 {
                    "lower"
                } else {
                    "no difference detectable"
                };
                format!("{v:+.1}% [{lo:+.1}, {hi:+.1}], {word}")
            };
            line.push_str(&format!(
                "; against {} on the same sentences: long-tail {}, common {}",
                base.name,
                pct(change(true)),
                pct(change(false))
            ));
        }
        lines.push(line);
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perplexity_pools_tokens_and_the_interval_holds_it() {
        let rows = [(2.0, 1.0), (6.0, 3.0)];
        assert!((ppl(&rows, 0..2) - 2f64.exp()).abs() < 1e-12);
        let losses: Vec<(f64, f64)> = (0..50).map(|i| (1.0 + (i % 7) as f64, 2.0)).collect();
        let (v, lo, hi) = interval(50, 1, |p| ppl(&losses, p.iter().copied()));
        assert!(lo < v && v < hi, "{lo} {v} {hi}");
    }
}

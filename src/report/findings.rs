//! The report's opening: whether the kernel is informative (its diagnostics and warnings from
//! `ntk.json`), then the findings in words with their 95% intervals — GC by frequency and by
//! long-tail flag, frequency against alignment and loss, where the flags land, and whether CSE
//! experts receive traffic and separate domains. A difference is stated only when the two
//! intervals are disjoint; otherwise the sentence says that none is detectable at this sample
//! size. Nothing here is tuned: every sentence follows from the tables by the rules written here.

use std::collections::BTreeMap;
use std::path::Path;

use super::{fmt, plots::GcBin, Correlations, GcTable, Samples};
use crate::error::{Error, Result};
use crate::io::{column_f64, column_str, read_parquet};
use crate::ntk::diagnostics::{Diagnostics, Warning};

/// The kernel lines of the report: its diagnostics, then each warning (`Warning: …`), or a line
/// saying that no rule found it degenerate. Empty for an `ntk.json` without diagnostics.
pub(super) fn kernel_lines(ntk: &Path) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Json {
        diagnostics: Option<Diagnostics>,
        #[serde(default)]
        warnings: Vec<Warning>,
        #[serde(default)]
        normalize: Option<String>,
    }
    let path = ntk.join("ntk.json");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let j: Json = serde_json::from_str(&text).map_err(|e| Error::in_file(&path, e.to_string()))?;
    let Some(d) = j.diagnostics else {
        return Ok(Vec::new());
    };
    let mut out = vec![format!(
        "Kernel{} of {} samples: the top eigenvalue holds {:.1}% of the trace; the principal direction is carried by {:.1} samples (participation ratio, {:.0}% of them); largest Θ_ii {:.1}× the median; mean |cosine| between samples {:.3}.",
        match j.normalize.as_deref() {
            Some("cosine") => " (cosine-normalised gradients)",
            _ => "",
        },
        d.samples,
        100.0 * d.top_share,
        d.participation,
        100.0 * d.participation_share,
        d.diag_spread,
        d.mean_abs_cosine
    )];
    if j.warnings.is_empty() {
        out.push("No degeneracy found: the direction is shared by many samples and the headline GC intervals are narrower than half of [−1, 1] (rules in the README).".into());
    }
    out.extend(j.warnings.iter().map(|w| format!("Warning: {w}")));
    Ok(out)
}

/// `v [lo, hi]`.
fn with_iv(v: f64, iv: Option<(f64, f64)>) -> String {
    match iv {
        Some((lo, hi)) => format!("{} [{}, {}]", fmt(v), fmt(lo), fmt(hi)),
        None => fmt(v),
    }
}

/// A comparison of two GCs: a difference only when their intervals are disjoint.
fn compare_gc(a: (&str, f64, Option<(f64, f64)>), b: (&str, f64, Option<(f64, f64)>)) -> String {
    let disjoint = match (a.2, b.2) {
        (Some((alo, ahi)), Some((blo, bhi))) => ahi < blo || bhi < alo,
        _ => false,
    };
    if disjoint {
        format!(
            "GC of {} is {} than of {}: {} against {}.",
            a.0,
            if a.1 < b.1 { "lower" } else { "higher" },
            b.0,
            with_iv(a.1, a.2),
            with_iv(b.1, b.2)
        )
    } else {
        format!(
            "No difference in GC between {} ({}) and {} ({}) is detectable at this sample size: the 95% intervals overlap.",
            a.0,
            with_iv(a.1, a.2),
            b.0,
            with_iv(b.1, b.2)
        )
    }
}

/// GC by frequency bin (rarest against most frequent) and by long-tail flag.
fn gc_findings(g: &GcTable, bins: &[GcBin]) -> Vec<String> {
    let mut out = Vec::new();
    let defined: Vec<&GcBin> = bins.iter().filter(|b| b.gc.is_some()).collect();
    if let (Some(first), Some(last)) = (defined.first(), defined.last()) {
        if defined.len() > 1 {
            out.push(compare_gc(
                (
                    "the rarest frequency bin",
                    first.gc.unwrap_or(f64::NAN),
                    first.interval,
                ),
                (
                    "the most frequent",
                    last.gc.unwrap_or(f64::NAN),
                    last.interval,
                ),
            ));
        }
        out.push(format!(
            "GC by frequency bin, rarest first [95% interval]: {}.",
            bins.iter()
                .map(|b| b.gc.map_or("–".into(), |v| with_iv(v, b.interval)))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let lt = |flag: &str| {
        (0..g.column.len())
            .find(|&i| g.column[i] == "long_tail" && g.group[i] == flag)
            .filter(|&i| g.gc[i].is_finite())
    };
    if let (Some(t), Some(f)) = (lt("true"), lt("false")) {
        out.push(compare_gc(
            ("long-tail-domain samples", g.gc[t], g.interval(t)),
            ("common-domain samples", g.gc[f], g.interval(f)),
        ));
    }
    out
}

/// Frequency against alignment and loss, and alignment against loss, in words.
fn correlation_findings(corr: &Correlations) -> Vec<String> {
    let mut out = Vec::new();
    for (x, y, neg, pos) in [
        (
            "freq_score",
            "loss",
            "rarer samples have higher loss",
            "rarer samples have lower loss",
        ),
        (
            "freq_score",
            "alignment",
            "rarer samples align more with the primary gradient direction",
            "rarer samples align less with the primary gradient direction",
        ),
        (
            "alignment",
            "loss",
            "the worse a sample is fitted, the less it aligns with the primary direction",
            "the worse a sample is fitted, the more it aligns with the primary direction",
        ),
    ] {
        let Some(i) = (0..corr.x.len())
            .find(|&i| corr.x[i] == x && corr.y[i] == y && corr.method[i] == "spearman")
        else {
            continue;
        };
        let (v, lo, hi) = (corr.value[i], corr.low[i], corr.high[i]);
        let iv = format!("Spearman {} [{}, {}]", fmt(v), fmt(lo), fmt(hi));
        out.push(if lo > 0.0 || hi < 0.0 {
            let words = if v < 0.0 { neg } else { pos };
            let mut s = words.to_string();
            s[..1].make_ascii_uppercase();
            format!("{s}: {x} against {y}, {iv}.")
        } else {
            format!("No monotone relation between {x} and {y} is detectable: {iv} includes 0.")
        });
    }
    out
}

/// Wilson's 95% interval of a proportion k / n (written here: one line of algebra).
fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, nf) = (1.959963984540054_f64, n as f64);
    let p = k as f64 / nf;
    let centre = (p + z * z / (2.0 * nf)) / (1.0 + z * z / nf);
    let half = z / (1.0 + z * z / nf) * (p * (1.0 - p) / nf + z * z / (4.0 * nf * nf)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// Where the flags land: their count, the domains holding most, and the long-tail share of the
/// flags (Wilson interval) against that of all samples.
fn flag_findings(a: &Samples, analysis: &Path) -> Result<Vec<String>> {
    let rank = column_f64(&a.frame, "flag_rank", &a.path)?;
    let lt = column_str(&a.frame, "long_tail_domain", &a.path)?;
    let n = rank.len();
    let flagged: Vec<usize> = (0..n).filter(|&i| rank[i].is_finite()).collect();
    if flagged.is_empty() {
        return Ok(vec![format!("No sample of {n} is flagged as neglected.")]);
    }
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for &i in &flagged {
        *by.entry(a.domains[i].as_str()).or_default() += 1;
    }
    let mut top: Vec<(&str, usize)> = by.into_iter().collect();
    top.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(y.0)));
    let k = flagged.iter().filter(|&&i| lt[i] == "true").count();
    let all = lt.iter().filter(|v| *v == "true").count();
    let (lo, hi) = wilson(k, flagged.len());
    // Whether the flag rule counted a long-tail domain as rarity (summary.json's flag options).
    let by_rule = std::fs::read_to_string(analysis.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["flag_options"]["long_tail_domains"].as_bool())
        .unwrap_or(false);
    Ok(vec![format!(
        "{} of {n} samples are flagged as neglected; {k} of them ({:.0}% [{:.0}%, {:.0}%]) come from long-tail domains, which hold {:.0}% of all samples{}. Most flags: {}.",
        flagged.len(),
        100.0 * k as f64 / flagged.len() as f64,
        100.0 * lo,
        100.0 * hi,
        100.0 * all as f64 / n.max(1) as f64,
        if by_rule {
            " (the flag rule counts a long-tail domain as rare, so this share is partly by construction)"
        } else {
            ""
        },
        top.iter()
            .take(4)
            .map(|(d, c)| format!("{d} {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    )])
}

/// Per CSE/Switch block: how many experts receive traffic and whether they separate domains.
fn expert_findings(analysis: &Path) -> Result<Vec<String>> {
    let ip = analysis.join("isolation.parquet");
    if !ip.exists() {
        return Ok(Vec::new());
    }
    let t = read_parquet(&ip)?;
    let (b, v) = (
        column_str(&t, "block", &ip)?,
        column_str(&t, "verdict", &ip)?,
    );
    let nmi = column_f64(&t, "block_nmi", &ip)?;
    let mut blocks: BTreeMap<&str, (usize, usize, usize, f64)> = BTreeMap::new();
    for i in 0..b.len() {
        let e = blocks.entry(b[i].as_str()).or_insert((0, 0, 0, nmi[i]));
        e.0 += 1;
        e.1 += usize::from(v[i] != "idle");
        e.2 += usize::from(v[i] == "isolated");
    }
    Ok(blocks
        .into_iter()
        .map(|(block, (total, used, isolated, nmi))| {
            format!(
                "Experts of {}: {used} of {total} receive traffic (at least 1% of the samples), {isolated} isolate a domain or the long tail; NMI between domain and expert {nmi:.2}{}.",
                block.trim_start_matches("expert_"),
                if used <= 1 {
                    " — one expert takes every sample, so the block acts as a dense FFN"
                } else if nmi < 0.05 {
                    " — routing is unrelated to domain"
                } else {
                    ""
                }
            )
        })
        .collect())
}

/// The findings of a report, in the order the page shows them.
pub(super) fn findings(
    a: &Samples,
    g: &GcTable,
    bins: &[GcBin],
    corr: &Correlations,
    analysis: &Path,
) -> Result<Vec<String>> {
    let mut out = gc_findings(g, bins);
    out.extend(correlation_findings(corr));
    out.extend(flag_findings(a, analysis)?);
    out.extend(expert_findings(analysis)?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_comparison_states_a_difference_only_for_disjoint_intervals() {
        let s = compare_gc(
            ("a", 0.41, Some((0.30, 0.52))),
            ("b", 0.89, Some((0.85, 0.92))),
        );
        assert_eq!(
            s,
            "GC of a is lower than of b: 0.410 [0.300, 0.520] against 0.890 [0.850, 0.920]."
        );
        let s = compare_gc(
            ("a", 0.41, Some((0.30, 0.86))),
            ("b", 0.89, Some((0.85, 0.92))),
        );
        assert!(s.starts_with("No difference in GC between a"), "{s}");
    }

    /// Reference: statsmodels `proportion_confint(5, 20, method="wilson")`.
    #[test]
    fn wilson_interval() {
        let (lo, hi) = wilson(5, 20);
        assert!(
            (lo - 0.11186).abs() < 1e-4 && (hi - 0.46870).abs() < 1e-4,
            "{lo} {hi}"
        );
    }
}

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
use crate::ntk::diagnostics::{sign_near_tie, Diagnostics, Warning};

/// What the report reads of `ntk.json`.
#[derive(serde::Deserialize)]
pub(super) struct NtkJson {
    diagnostics: Option<Diagnostics>,
    #[serde(default)]
    warnings: Vec<Warning>,
    #[serde(default)]
    normalize: Option<String>,
}

impl NtkJson {
    /// `ntk.json` of the kernel folder `ntk`, if it has one.
    pub(super) fn read(ntk: &Path) -> Result<Option<NtkJson>> {
        let path = ntk.join("ntk.json");
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::in_file(&path, e.to_string()))
    }

    /// Whether the whole set's principal direction has an ill-determined sign
    /// ([`sign_near_tie`] of its Σu / Σ|u|); false where no diagnostics were recorded.
    fn sign_near_tie(&self) -> bool {
        self.diagnostics
            .as_ref()
            .is_some_and(|d| sign_near_tie(d.sign_margin))
    }
}

/// The kernel lines of the report: its diagnostics, then each warning (`Warning: …`), or a line
/// saying that no rule found it degenerate and which of those rules could be checked (the width
/// rule only where `g`'s headline groups have intervals). Empty without an `ntk.json` or its
/// diagnostics.
pub(super) fn kernel_lines(j: Option<&NtkJson>, g: &GcTable) -> Vec<String> {
    let Some(j) = j else {
        return Vec::new();
    };
    let Some(d) = &j.diagnostics else {
        return Vec::new();
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
        out.push(no_degeneracy(g));
    }
    out.extend(j.warnings.iter().map(|w| format!("Warning: {w}")));
    out
}

/// The line for a kernel no rule found degenerate. The interval-width rule holds only for the
/// headline groups (frequency bins, long-tail flag) that have an interval: the line says how many
/// of them had one, and that the width was not checked where none had (`--gc-resamples` below 2).
fn no_degeneracy(g: &GcTable) -> String {
    let headline: Vec<usize> = (0..g.column.len())
        .filter(|&i| g.column[i] == "freq_bin" || g.column[i] == "long_tail")
        .collect();
    let with = headline
        .iter()
        .filter(|&&i| g.interval(i).is_some())
        .count();
    let widths = if with == 0 {
        format!(
            "no GC intervals were computed for the {} frequency-bin and long-tail groups (--gc-resamples below 2), so whether GC is determined was not checked",
            headline.len()
        )
    } else if with == headline.len() {
        format!(
            "the {with} headline GC intervals (frequency bins, long-tail flag) are narrower than half of [−1, 1]"
        )
    } else {
        format!(
            "the {with} headline GC intervals computed (of {} frequency-bin and long-tail groups; the others have none) are narrower than half of [−1, 1]",
            headline.len()
        )
    };
    format!(
        "No degeneracy found: the direction is shared by many samples and {widths} (rules in the README)."
    )
}

/// `v [lo, hi]`.
fn with_iv(v: f64, iv: Option<(f64, f64)>) -> String {
    match iv {
        Some((lo, hi)) => format!("{} [{}, {}]", fmt(v), fmt(lo), fmt(hi)),
        None => fmt(v),
    }
}

/// |GC| and its interval: the interval of |x| for x in [lo, hi].
pub(crate) fn fold(v: f64, iv: Option<(f64, f64)>) -> (f64, Option<(f64, f64)>) {
    let folded = iv.map(|(lo, hi)| {
        if lo >= 0.0 {
            (lo, hi)
        } else if hi <= 0.0 {
            (-hi, -lo)
        } else {
            (0.0, (-lo).max(hi))
        }
    });
    (v.abs(), folded)
}

/// How far the signs of two GCs are determined (gc.parquet's `sign_margin` and `ntk.json`'s,
/// by [`sign_near_tie`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signs {
    /// Every sign involved is clear of a tie.
    Sure,
    /// The whole set's direction is a near-tie: flipping it negates both GCs, so their order is
    /// not determined, but whether they have opposite signs is.
    WholeTie,
    /// A group's own direction is a near-tie: only |GC| is determined.
    GroupTie,
}

/// A comparison of two GCs, sign-free: |GC| with the intervals folded (the Σu ≥ 0 convention that
/// sets a GC's sign is arbitrary, and a near-tie of it would flip the sign; |GC| does not
/// depend on it), a difference only when the folded intervals are disjoint. Two GCs whose
/// intervals clearly lie on opposite sides of 0 are said to point opposite ways, which flipping
/// the whole set's direction does not change; not where a group's own sign is a near-tie.
fn compare_gc(
    a: (&str, f64, Option<(f64, f64)>),
    b: (&str, f64, Option<(f64, f64)>),
    signs: Signs,
) -> String {
    let clear = |v: f64, iv: Option<(f64, f64)>| {
        iv.is_some_and(|(lo, hi)| lo > 0.0 || hi < 0.0) && v != 0.0
    };
    if signs != Signs::GroupTie && a.1 * b.1 < 0.0 && clear(a.1, a.2) && clear(b.1, b.2) {
        return format!(
            "GC of {} and of {} have opposite signs ({} against {}): their gradients point opposite ways along the whole set's principal direction{}.",
            a.0,
            b.0,
            with_iv(a.1, a.2),
            with_iv(b.1, b.2),
            if signs == Signs::WholeTie {
                ", whose own sign is a near-tie here, so which of them is negative is not determined"
            } else {
                ""
            }
        );
    }
    let ((av, ai), (bv, bi)) = (fold(a.1, a.2), fold(b.1, b.2));
    let (a, b) = ((a.0, av, ai), (b.0, bv, bi));
    let disjoint = match (a.2, b.2) {
        (Some((alo, ahi)), Some((blo, bhi))) => ahi < blo || bhi < alo,
        (None, _) | (_, None) => {
            let missing = match (a.2, b.2) {
                (None, None) => "neither has a".to_string(),
                (None, _) => format!("{} has no", a.0),
                _ => format!("{} has no", b.0),
            };
            return format!(
                "No difference in |GC| between {} ({}) and {} ({}) can be stated: {missing} 95% interval (intervals need --gc-resamples of at least 2).",
                a.0,
                with_iv(a.1, a.2),
                b.0,
                with_iv(b.1, b.2)
            );
        }
    };
    if disjoint {
        format!(
            "|GC| of {} is {} than of {}: {} against {}.",
            a.0,
            if a.1 < b.1 { "lower" } else { "higher" },
            b.0,
            with_iv(a.1, a.2),
            with_iv(b.1, b.2)
        )
    } else {
        format!(
            "No difference in |GC| between {} ({}) and {} ({}) is detectable at this sample size: the 95% intervals overlap.",
            a.0,
            with_iv(a.1, a.2),
            b.0,
            with_iv(b.1, b.2)
        )
    }
}

/// How the GC comparison names the bins it compares, `first` and `last` (the rarest and the most
/// frequent of `bins` that have a GC): "the rarest frequency bin" and "the most frequent" when
/// they are the ends of `bins`; otherwise by label, saying which bins beyond them have no GC.
fn end_bin_names(bins: &[GcBin], first: &GcBin, last: &GcBin) -> (String, String) {
    let none = |range: &[GcBin]| match range {
        [one] => format!("bin {} has none", one.label),
        many => format!(
            "bins {} have none",
            many.iter()
                .map(|b| b.label.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let at = |b: &GcBin| bins.iter().position(|x| x.label == b.label).unwrap_or(0);
    let (i, j) = (at(first), at(last));
    let rare = if i == 0 {
        "the rarest frequency bin".to_string()
    } else {
        format!(
            "frequency bin {} (the rarest with a GC; {})",
            first.label,
            none(&bins[..i])
        )
    };
    let common = if j + 1 >= bins.len() {
        "the most frequent".to_string()
    } else {
        format!(
            "frequency bin {} (the most frequent with a GC; {})",
            last.label,
            none(&bins[j + 1..])
        )
    };
    (rare, common)
}

/// GC by frequency bin (rarest against most frequent) and by long-tail flag; compared as |GC|
/// where the whole set's direction (`ill_signed`) or either group's own has an ill-determined
/// sign ([`sign_near_tie`]).
fn gc_findings(g: &GcTable, bins: &[GcBin], ill_signed: bool) -> Vec<String> {
    let signs = |x: &str, y: &str, column: &str| {
        if g.ill_signed(column, x) || g.ill_signed(column, y) {
            Signs::GroupTie
        } else if ill_signed {
            Signs::WholeTie
        } else {
            Signs::Sure
        }
    };
    let mut out = Vec::new();
    let defined: Vec<&GcBin> = bins.iter().filter(|b| b.gc.is_some()).collect();
    if let (Some(first), Some(last)) = (defined.first(), defined.last()) {
        if defined.len() > 1 {
            let (rare, common) = end_bin_names(bins, first, last);
            out.push(compare_gc(
                (&rare, first.gc.unwrap_or(f64::NAN), first.interval),
                (&common, last.gc.unwrap_or(f64::NAN), last.interval),
                signs(&first.label, &last.label, "freq_bin"),
            ));
        }
        out.push(format!(
            "|GC| by frequency bin, rarest first [95% interval]: {}.",
            bins.iter()
                .map(|b| {
                    b.gc.map_or("–".into(), |v| {
                        let (v, iv) = fold(v, b.interval);
                        with_iv(v, iv)
                    })
                })
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
            signs("true", "false", "long_tail"),
        ));
    }
    out
}

/// Frequency against alignment and loss, and alignment against loss, in words. Alignment takes
/// its sign from the whole set's direction: with `ill_signed` (that sign a near-tie), a relation
/// with alignment is said to reverse under the other sign.
fn correlation_findings(corr: &Correlations, ill_signed: bool) -> Vec<String> {
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
            let caveat = if ill_signed && (x == "alignment" || y == "alignment") {
                " Alignment takes its sign from the principal direction's, set by a near-tie of the Σu ≥ 0 convention here (ntk.json's sign_margin): under the other sign this relation reverses."
            } else {
                ""
            };
            format!("{s}: {x} against {y}, {iv}.{caveat}")
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
/// With `ill_signed`, says that the flags hang on an ill-determined sign when the neglect model
/// uses alignment (the default model does not: `summary.json`'s `neglect_features`).
fn flag_findings(a: &Samples, analysis: &Path, ill_signed: bool) -> Result<Vec<String>> {
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
    let summary = std::fs::read_to_string(analysis.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    // Whether the flag rule counted a long-tail domain as rarity (analyses of earlier versions).
    let by_rule = summary
        .as_ref()
        .and_then(|v| v["flag_options"]["long_tail_domains"].as_bool())
        .unwrap_or(false);
    // Whether the flags rank by alignment: the rule of earlier versions did; a neglect model
    // does when its features include it.
    let uses_alignment = summary
        .as_ref()
        .is_none_or(|v| match v["neglect_features"].as_array() {
            Some(f) => f.iter().any(|x| x == "alignment"),
            None => v.get("flag_options").is_some(),
        });
    Ok(vec![format!(
        "{} of {n} samples are flagged as neglected; {k} of them ({:.0}% [{:.0}%, {:.0}%]) come from long-tail domains, which hold {:.0}% of all samples{}. Most flags: {}.{}",
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
            .join(", "),
        if ill_signed && uses_alignment {
            " The flags rank by alignment, whose sign is set by a near-tie here (ntk.json's sign_margin): under the other sign the least aligned samples would be others."
        } else {
            ""
        }
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
    ntk_json: Option<&NtkJson>,
) -> Result<Vec<String>> {
    let ill_signed = ntk_json.is_some_and(NtkJson::sign_near_tie);
    let mut out = gc_findings(g, bins, ill_signed);
    out.extend(correlation_findings(corr, ill_signed));
    out.extend(flag_findings(a, analysis, ill_signed)?);
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
            Signs::Sure,
        );
        assert_eq!(
            s,
            "|GC| of a is lower than of b: 0.410 [0.300, 0.520] against 0.890 [0.850, 0.920]."
        );
        let s = compare_gc(
            ("a", 0.41, Some((0.30, 0.86))),
            ("b", 0.89, Some((0.85, 0.92))),
            Signs::Sure,
        );
        assert!(s.starts_with("No difference in |GC| between a"), "{s}");
        // A negative GC is compared by its size: -0.41 against 0.89 with overlapping folded
        // intervals is no difference, though the signed intervals are disjoint.
        let s = compare_gc(
            ("a", -0.80, Some((-0.95, 0.10))),
            ("b", 0.89, Some((0.85, 0.92))),
            Signs::Sure,
        );
        assert!(
            s.starts_with("No difference in |GC| between a (0.800 [0.000, 0.950])"),
            "{s}"
        );
    }

    /// The demo's case: a rarest bin at −0.944 [−1, −0.944] against 0.945 [0.945, 1] is "lower"
    /// only under the whole set's sign, a near-tie there; that they point opposite ways holds
    /// under either sign. Where a group's own sign is a near-tie, only |GC| is compared.
    #[test]
    fn gc_with_an_ill_determined_sign_is_compared_up_to_that_sign() {
        let (a, b) = (
            ("a", -0.944, Some((-1.0, -0.944))),
            ("b", 0.945, Some((0.945, 1.0))),
        );
        let s = compare_gc(a, b, Signs::Sure);
        assert!(
            s.starts_with("GC of a and of b have opposite signs") && !s.contains("near-tie"),
            "{s}"
        );
        let s = compare_gc(a, b, Signs::WholeTie);
        assert!(
            s.starts_with(
                "GC of a and of b have opposite signs (-0.944 [-1.000, -0.944] against 0.945"
            ) && s.contains("near-tie"),
            "{s}"
        );
        let s = compare_gc(a, b, Signs::GroupTie);
        assert!(
            s.starts_with("No difference in |GC| between a (0.944 [0.944, 1.000]) and b (0.945 [0.945, 1.000])"),
            "{s}"
        );
        // Same signs under a whole-set tie: the order would flip with the sign, |GC| would not.
        let s = compare_gc(
            ("a", 0.30, Some((0.20, 0.40))),
            ("b", 0.90, Some((0.85, 0.95))),
            Signs::WholeTie,
        );
        assert!(
            s.starts_with("|GC| of a is lower than of b: 0.300 [0.200, 0.400]"),
            "{s}"
        );
        // Opposite signs but one interval across 0: not clearly opposite, so |GC|.
        let s = compare_gc(
            ("a", -0.2, Some((-0.7, 0.4))),
            ("b", 0.90, Some((0.85, 0.95))),
            Signs::WholeTie,
        );
        assert!(
            s.starts_with("|GC| of a is lower than of b: 0.200 [0.000, 0.700]"),
            "{s}"
        );
        assert_eq!(fold(-0.2, Some((-0.7, 0.4))), (0.2, Some((0.0, 0.7))));
    }

    /// A group's own near-tie sign (gc.parquet's sign_margin) makes its comparison unsigned even
    /// when the whole set's sign is sure.
    #[test]
    fn a_bin_with_its_own_near_tie_sign_is_compared_as_its_absolute_value() {
        let table = |margin0: f64| GcTable {
            column: vec!["freq_bin".into(), "freq_bin".into()],
            group: vec!["0".into(), "1".into()],
            gc: vec![-0.5, 0.9],
            n: vec![20.0, 20.0],
            score: vec![0.1, 0.3],
            low: vec![-0.6, 0.85],
            high: vec![-0.4, 0.95],
            sign_margin: vec![margin0, 0.6],
        };
        let sure = table(0.4);
        let first = &gc_findings(&sure, &sure.bins(), false)[0];
        assert!(first.contains("have opposite signs"), "{first}");
        let tie = table(0.05);
        let first = &gc_findings(&tie, &tie.bins(), false)[0];
        assert!(
            first.starts_with("|GC| of the rarest frequency bin is lower"),
            "{first}"
        );
        let first = &gc_findings(&sure, &sure.bins(), true)[0];
        assert!(first.contains("have opposite signs"), "{first}");
        let first = &gc_findings(&tie, &tie.bins(), true)[0];
        assert!(
            first.starts_with("|GC| of the rarest frequency bin is lower"),
            "{first}"
        );
    }

    #[test]
    fn relations_with_alignment_carry_the_sign_caveat_only_when_the_sign_is_a_near_tie() {
        let corr = Correlations {
            x: vec!["freq_score".into(), "freq_score".into()],
            y: vec!["loss".into(), "alignment".into()],
            method: vec!["spearman".into(), "spearman".into()],
            value: vec![-0.34, 0.29],
            low: vec![-0.49, 0.14],
            high: vec![-0.17, 0.44],
        };
        let sure = correlation_findings(&corr, false);
        assert_eq!(sure.len(), 2);
        assert!(!sure.iter().any(|s| s.contains("reverses")), "{sure:?}");
        let tie = correlation_findings(&corr, true);
        assert!(!tie[0].contains("reverses"), "{}", tie[0]);
        assert!(
            tie[1].starts_with("Rarer samples align less") && tie[1].contains("reverses"),
            "{}",
            tie[1]
        );
    }

    /// A GC table of frequency bins 0..gcs.len() and the long-tail groups, with intervals
    /// where `iv` has them (NaN columns otherwise, as `--gc-resamples 0` writes them).
    fn bins_table(gcs: &[f64], iv: &[Option<(f64, f64)>]) -> GcTable {
        let n = gcs.len();
        let mut column: Vec<String> = vec!["freq_bin".into(); n];
        let mut group: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        column.extend(["long_tail".into(), "long_tail".into()]);
        group.extend(["true".into(), "false".into()]);
        let mut gc = gcs.to_vec();
        gc.extend([0.3, 0.8]);
        let mut iv = iv.to_vec();
        iv.extend([iv[0], iv[n - 1]]);
        GcTable {
            n: vec![10.0; n + 2],
            score: vec![0.1; n + 2],
            low: iv.iter().map(|x| x.map_or(f64::NAN, |x| x.0)).collect(),
            high: iv.iter().map(|x| x.map_or(f64::NAN, |x| x.1)).collect(),
            sign_margin: vec![0.6; n + 2],
            gc,
            column,
            group,
        }
    }

    /// Without intervals (`--gc-resamples` below 2) no sentence says that intervals overlap:
    /// it says that there are none.
    #[test]
    fn gc_without_intervals_is_not_said_to_overlap() {
        let g = bins_table(&[0.2, 0.5, 0.9], &[None; 3]);
        let lines = gc_findings(&g, &g.bins(), false);
        assert_eq!(
            lines[0],
            "No difference in |GC| between the rarest frequency bin (0.200) and the most frequent (0.900) can be stated: neither has a 95% interval (intervals need --gc-resamples of at least 2)."
        );
        assert!(lines.iter().all(|l| !l.contains("overlap")), "{lines:?}");
        let one = compare_gc(
            ("a", 0.41, Some((0.30, 0.52))),
            ("b", 0.89, None),
            Signs::Sure,
        );
        assert!(
            one.ends_with("can be stated: b has no 95% interval (intervals need --gc-resamples of at least 2)."),
            "{one}"
        );
    }

    /// Where the rarest bin has no GC, the comparison names the bin it compares and says that
    /// the rarer one has none; likewise at the frequent end.
    #[test]
    fn the_gc_comparison_names_the_bins_it_compares() {
        let iv = Some((0.1, 0.2));
        let g = bins_table(
            &[f64::NAN, 0.15, 0.5, 0.85, f64::NAN],
            &[None, iv, Some((0.45, 0.55)), Some((0.8, 0.9)), None],
        );
        let first = &gc_findings(&g, &g.bins(), false)[0];
        assert!(
            first.starts_with("|GC| of frequency bin 1 (the rarest with a GC; bin 0 has none) is lower than of frequency bin 3 (the most frequent with a GC; bin 4 has none): 0.150 [0.100, 0.200] against 0.850"),
            "{first}"
        );
        let g = bins_table(
            &[f64::NAN, f64::NAN, 0.15, 0.85],
            &[None, None, iv, Some((0.8, 0.9))],
        );
        let first = &gc_findings(&g, &g.bins(), false)[0];
        assert!(
            first.starts_with("|GC| of frequency bin 2 (the rarest with a GC; bins 0, 1 have none) is lower than of the most frequent:"),
            "{first}"
        );
    }

    fn ntk_json() -> NtkJson {
        NtkJson {
            diagnostics: Some(Diagnostics {
                diag_spread: 2.0,
                mean_abs_cosine: 0.3,
                participation: 40.0,
                participation_share: 0.5,
                samples: 80,
                sign_margin: 0.6,
                top_share: 0.4,
            }),
            warnings: Vec::new(),
            normalize: None,
        }
    }

    /// "No degeneracy found" claims narrow intervals only where there were intervals.
    #[test]
    fn no_degeneracy_claims_narrow_intervals_only_where_they_were_computed() {
        let j = ntk_json();
        let none = bins_table(&[0.2, 0.9], &[None; 2]);
        let line = &kernel_lines(Some(&j), &none)[1];
        assert!(!line.contains("narrower"), "{line}");
        assert!(
            line.contains("no GC intervals were computed for the 4 frequency-bin and long-tail groups (--gc-resamples below 2)"),
            "{line}"
        );
        let all = bins_table(&[0.2, 0.9], &[Some((0.1, 0.3)), Some((0.8, 1.0))]);
        let line = &kernel_lines(Some(&j), &all)[1];
        assert!(
            line.contains("the 4 headline GC intervals (frequency bins, long-tail flag) are narrower than half of [−1, 1]"),
            "{line}"
        );
        let some = bins_table(&[0.2, 0.9], &[None, Some((0.8, 1.0))]);
        let line = &kernel_lines(Some(&j), &some)[1];
        assert!(
            line.contains("the 2 headline GC intervals computed (of 4 frequency-bin and long-tail groups; the others have none)"),
            "{line}"
        );
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

//! Kernel diagnostics: whether a kernel, its principal direction and its GCs can say anything
//! about the samples, and plain-words warnings when they cannot.
//!
//! For a kernel Θ (n × n) with unit principal eigenvector u and eigenvalue λ:
//! - **participation ratio** PR = 1 / Σ u_i⁴ (u unit): how many samples carry the principal
//!   direction, from 1 (one sample *is* the direction) to n (all carry it equally);
//! - **top share** λ / tr Θ: how much of the kernel the direction holds; n unrelated gradients of
//!   equal norm give about 1/n (a nearly diagonal kernel), one shared direction gives near 1;
//! - **Θ_ii spread** max Θ_ii / median Θ_ii: one sample whose gradient norm dwarfs the others'
//!   pulls the direction onto itself;
//! - **mean |cosine|**: the mean absolute off-diagonal Θ_ij / √(Θ_ii Θ_jj).
//!
//! The rules that turn these into warnings ([`warnings`]) and their thresholds are constants
//! here, documented in the README.

use super::op::KernelOp;
use tch::{Device, Kind, Tensor};

use super::gc::{participation, Principal};
use super::groups::GcRow;
use crate::error::Result;

/// Participation below `max(PR_MIN, PR_SHARE_MIN · n)` is a handful of samples.
pub const PR_MIN: f64 = 5.0;
/// Participation below this share of the samples is a handful of samples.
pub const PR_SHARE_MIN: f64 = 0.02;
/// A top share below `DIAGONAL_FACTOR / n` is a nearly diagonal kernel.
pub const DIAGONAL_FACTOR: f64 = 3.0;
/// Θ_ii max / median above this: one sample's gradient dominates by its norm.
pub const SPREAD_MAX: f64 = 100.0;
/// A GC interval wider than this (of [−1, 1]'s 2) is undetermined.
pub const WIDTH_MAX: f64 = 1.0;

/// A group eigenvector whose entries cancel to below this share of their absolute sum
/// (Σ u′ / Σ |u′|) gets its sign, and so its GC's, from a near-tie of the Σ u ≥ 0 convention.
/// A rule of thumb, like [`WIDTH_MAX`], not fitted to data.
pub const SIGN_MARGIN_MIN: f64 = 0.1;

/// Whether a sign margin Σu / Σ|u| leaves the Σu ≥ 0 convention a near tie (below
/// [`SIGN_MARGIN_MIN`]; NaN, a margin not recorded, is not).
pub fn sign_near_tie(margin: f64) -> bool {
    margin < SIGN_MARGIN_MIN
}

/// The diagnostics of one kernel (written to `ntk.json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Diagnostics {
    /// Θ_ii max / median, of the kernel before any normalisation.
    pub diag_spread: f64,
    /// Mean |Θ_ij| / √(Θ_ii Θ_jj) over i ≠ j.
    pub mean_abs_cosine: f64,
    /// Participation ratio of the principal eigenvector.
    pub participation: f64,
    /// Participation as a share of the samples.
    pub participation_share: f64,
    /// Number of samples.
    pub samples: usize,
    /// Σ u / Σ |u| of the principal eigenvector: near 0, its sign (and every GC's) is a near-tie
    /// of the Σ u ≥ 0 convention. Absent from `ntk.json` files written before it existed.
    #[serde(default = "one")]
    pub sign_margin: f64,
    /// The top eigenvalue as a share of the trace.
    pub top_share: f64,
}

fn one() -> f64 {
    1.0
}

/// The diagnostics of kernel `k` (whose principal pair is `whole`); `raw_diag` is Θ_ii before
/// any normalisation (the spread is about gradient norms).
pub fn diagnose(k: &dyn KernelOp, whole: &Principal, raw_diag: &Tensor) -> Result<Diagnostics> {
    let n = k.n();
    let kd = k.diag()?;
    let trace = kd.sum(Kind::Double).double_value(&[]);
    let mut d: Vec<f64> = Vec::try_from(raw_diag.to_kind(Kind::Double).to_device(Device::Cpu))?;
    let max = d.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    d.sort_by(f64::total_cmp);
    let median = if d.is_empty() {
        0.0
    } else if d.len() % 2 == 1 {
        d[d.len() / 2]
    } else {
        (d[d.len() / 2 - 1] + d[d.len() / 2]) / 2.0
    };
    // Σ|cos_ij| off the diagonal: every sample of non-zero norm has cos_ii = 1.
    let on = kd.gt(0.0).sum(Kind::Double).double_value(&[]);
    let off = k.abs_cosine_sum()? - on;
    let pr = participation(&whole.u);
    Ok(Diagnostics {
        diag_spread: if median > 0.0 {
            max / median
        } else {
            f64::INFINITY
        },
        mean_abs_cosine: if n > 1 {
            off / (n * (n - 1)) as f64
        } else {
            1.0
        },
        participation: pr,
        participation_share: pr / n.max(1) as f64,
        samples: n,
        sign_margin: super::gc::sign_margin(&whole.u),
        top_share: if trace > 0.0 {
            whole.lambda / trace
        } else {
            0.0
        },
    })
}

/// One thing wrong with a kernel, in plain words, and what to change.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Warning {
    /// What is wrong and why it matters.
    pub problem: String,
    /// What to change.
    pub change: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.problem, self.change)
    }
}

/// The warnings of a kernel's diagnostics and GC rows; empty when the result is informative.
/// `normalized` says whether the direction came from the cosine kernel (then the spread of
/// gradient norms no longer matters).
pub fn warnings(d: &Diagnostics, rows: &[GcRow], normalized: bool) -> Vec<Warning> {
    let mut out = kernel_warnings(d, normalized);
    out.extend(group_warnings(rows));
    out
}

/// The warnings about the whole kernel: a degenerate or nearly diagonal direction, a dominant
/// sample. (A near-tie of the direction's sign is no warning: the report and the flags read
/// |GC| and statistics that do not depend on that sign; `sign_margin` stays in `ntk.json` and
/// `gc.parquet` for readers of the signed values, alignment among them.)
fn kernel_warnings(d: &Diagnostics, normalized: bool) -> Vec<Warning> {
    let n = d.samples as f64;
    let mut out = Vec::new();
    let handful = PR_MIN.max(PR_SHARE_MIN * n);
    if d.participation < handful {
        out.push(Warning {
            problem: format!(
                "Degenerate principal direction: it is carried by {:.1} of {} samples (participation ratio), so GC and alignment describe those samples, not the set.",
                d.participation, d.samples
            ),
            change: if normalized {
                "Select fewer, later parameters (--params, --layers) or train the model further.".into()
            } else {
                "Normalise per-sample gradients (--normalize cosine) so no sample dominates by its gradient norm, or select parameters without the embeddings (--params).".into()
            },
        });
    }
    if n > 1.0 && d.top_share < DIAGONAL_FACTOR / n {
        out.push(Warning {
            problem: format!(
                "Nearly diagonal kernel: the top eigenvalue holds {:.1}% of the trace, about what {} unrelated gradients give ({:.1}%); mean |cosine| between samples {:.3}.",
                100.0 * d.top_share,
                d.samples,
                100.0 / n,
                d.mean_abs_cosine
            ),
            change: "Per-sample gradients share no direction: train the model further (an untrained model's gradients are nearly orthogonal) or select fewer, later parameters (--params, --layers).".into(),
        });
    }
    if !normalized && d.diag_spread > SPREAD_MAX {
        out.push(Warning {
            problem: format!(
                "One sample's gradient dominates: the largest Θ_ii is {:.0}× the median.",
                d.diag_spread
            ),
            change: "Use --normalize cosine, or look at that sample (the largest self_kernel in samples.parquet).".into(),
        });
    }
    out
}

/// The warnings about the frequency-bin and long-tail groups: an undetermined (wide) interval.
fn group_warnings(rows: &[GcRow]) -> Vec<Warning> {
    let mut out = Vec::new();
    let headline: Vec<&GcRow> = rows
        .iter()
        .filter(|r| r.column == "freq_bin" || r.column == "long_tail")
        .collect();
    let wide: Vec<&&GcRow> = headline
        .iter()
        .filter(|r| r.interval.is_some_and(|(lo, hi)| hi - lo > WIDTH_MAX))
        .collect();
    if let Some(w) = wide.first() {
        let (lo, hi) = w.interval.unwrap_or((f64::NAN, f64::NAN));
        out.push(Warning {
            problem: format!(
                "Undetermined GC: {} of {} intervals by frequency bin and long-tail flag span more than half of [−1, 1] (e.g. {} {}: [{lo:.2}, {hi:.2}]).",
                wide.len(),
                headline.len(),
                w.column,
                w.group
            ),
            change: "Use more samples (--samples), fewer bins (--bins), or a kernel whose diagnostics above are sound.".into(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::gc::principal;
    use super::*;

    fn gc_row(column: &str, interval: (f64, f64)) -> GcRow {
        GcRow {
            column: column.into(),
            group: "0".into(),
            n: 10,
            gc: Some((interval.0 + interval.1) / 2.0),
            interval: Some(interval),
            participation: None,
            top_share: None,
            sign_margin: Some(1.0),
            mean_freq_score: 0.0,
        }
    }

    /// The cosine kernel has a unit diagonal and its blocks still sum to it; a zero-gradient
    /// sample stays zero instead of dividing by zero.
    /// A cancelling group direction, or whole direction, is no warning (|GC| and the flags do
    /// not depend on the sign); a wide interval is.
    #[test]
    fn near_tie_signs_are_not_warned_and_wide_intervals_are() {
        let sound = Diagnostics {
            diag_spread: 1.0,
            mean_abs_cosine: 0.5,
            participation: 50.0,
            participation_share: 0.5,
            samples: 100,
            sign_margin: 0.8,
            top_share: 0.5,
        };
        let mut rows = vec![gc_row("freq_bin", (0.5, 0.7))];
        assert!(warnings(&sound, &rows, true).is_empty());
        rows[0].sign_margin = Some(0.05);
        let tie = Diagnostics {
            sign_margin: 0.02,
            ..sound
        };
        assert!(warnings(&tie, &rows, true).is_empty());
        let w = warnings(&tie, &[gc_row("freq_bin", (-0.5, 0.7))], true);
        assert!(
            w.len() == 1 && w[0].problem.contains("Undetermined GC"),
            "{w:?}"
        );
        // Σu / Σ|u| by hand: (1 − 1 + 0.5) / 2.5.
        let u = Tensor::from_slice(&[1.0f64, -1.0, 0.5]);
        assert!((super::super::gc::sign_margin(&u) - 0.2).abs() < 1e-12);
    }

    #[test]
    fn cosine_kernel_blocks_sum_to_the_total() {
        tch::manual_seed(5);
        let a = Tensor::randn([6, 9], (Kind::Double, Device::Cpu));
        let b = Tensor::randn([6, 4], (Kind::Double, Device::Cpu));
        let _ = a.get(2).zero_();
        let _ = b.get(2).zero_();
        let (ka, kb) = (a.matmul(&a.tr()), b.matmul(&b.tr()));
        let k = crate::ntk::Kernel {
            total: &ka + &kb,
            blocks: vec![("a".into(), ka), ("b".into(), kb)],
            diagonal: false,
        };
        let c = k.cosine();
        let d: Vec<f64> = Vec::try_from(c.total.diagonal(0, 0, 1)).unwrap();
        assert_eq!(d[2], 0.0);
        for (i, v) in d.iter().enumerate().filter(|(i, _)| *i != 2) {
            assert!((v - 1.0).abs() < 1e-12, "{i}: {v}");
        }
        let sum = &c.blocks[0].1 + &c.blocks[1].1;
        assert!((sum - &c.total).abs().max().double_value(&[]) < 1e-12);
        assert!(c.total.isfinite().all().int64_value(&[]) == 1);
    }

    /// 40 nearly orthogonal gradients, one of them 30× longer: the direction is that sample.
    #[test]
    fn one_dominant_sample_is_degenerate() {
        tch::manual_seed(3);
        let j = Tensor::randn([40, 4000], (Kind::Double, Device::Cpu));
        let scale = Tensor::ones([40, 1], (Kind::Double, Device::Cpu));
        let _ = scale.get(7).fill_(30.0);
        let j = j * scale;
        let k = j.matmul(&j.tr());
        let p = principal(&k).unwrap();
        let d = diagnose(&super::super::op::Dense::new(&k), &p, &k.diagonal(0, 0, 1)).unwrap();
        assert!(d.participation < 1.1, "{d:?}");
        assert!(d.diag_spread > 500.0, "{d:?}");
        assert!(d.mean_abs_cosine < 0.05, "{d:?}");
        let w = warnings(&d, &[], false);
        let text: Vec<String> = w.iter().map(|w| w.to_string()).collect();
        assert!(
            text.iter()
                .any(|t| t.contains("Degenerate principal direction")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.contains("--normalize cosine")),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.contains("dominates")), "{text:?}");
        // The cosine kernel of the same gradients: no dominant sample, but nothing shared.
        let c = crate::ntk::cosine(&k);
        let pc = principal(&c).unwrap();
        let dc = diagnose(&super::super::op::Dense::new(&c), &pc, &k.diagonal(0, 0, 1)).unwrap();
        let wc = warnings(&dc, &[], true);
        assert!(dc.top_share < 3.0 / 40.0, "{dc:?}");
        assert!(
            wc.iter().any(|w| w.problem.starts_with("Nearly diagonal")),
            "{wc:?}"
        );
        assert!(
            !wc.iter().any(|w| w.problem.contains("dominates")),
            "{wc:?}"
        );
    }

    /// A clean rank-1 structure (every gradient a positive multiple of one direction plus small
    /// noise): every sample carries the direction, it holds most of the trace, no warning.
    #[test]
    fn clean_rank_one_is_informative() {
        tch::manual_seed(4);
        let v = Tensor::randn([1, 300], (Kind::Double, Device::Cpu));
        let a = Tensor::rand([60, 1], (Kind::Double, Device::Cpu)) + 0.5;
        let j = a * v + Tensor::randn([60, 300], (Kind::Double, Device::Cpu)) * 0.05;
        let k = j.matmul(&j.tr());
        let p = principal(&k).unwrap();
        let d = diagnose(&super::super::op::Dense::new(&k), &p, &k.diagonal(0, 0, 1)).unwrap();
        assert!(d.participation > 40.0, "{d:?}");
        assert!(d.top_share > 0.9, "{d:?}");
        assert!(d.mean_abs_cosine > 0.9, "{d:?}");
        let rows = [
            gc_row("freq_bin", (0.9, 0.99)),
            gc_row("long_tail", (0.8, 1.0)),
        ];
        assert_eq!(warnings(&d, &rows, false), vec![]);
        // Wide intervals on the same kernel are reported, naming the group.
        let rows = [
            gc_row("freq_bin", (-0.6, 0.9)),
            gc_row("domain", (-1.0, 1.0)),
        ];
        let w = warnings(&d, &rows, false);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].problem.contains("1 of 1 intervals"), "{w:?}");
        assert!(w[0].problem.contains("freq_bin 0: [-0.60, 0.90]"), "{w:?}");
    }
}

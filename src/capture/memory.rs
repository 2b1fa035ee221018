//! A memory budget for capture: how much a capture holds (its result: per-sample gradients,
//! projected or not, ghost factors, the kernel) and how much one batch needs on top (recorded
//! activations, attention scores, logits and the batch's per-sample gradient pieces), estimated
//! from the model's shapes and each text's length; batches are then cut so that their estimate
//! fits, longer texts in smaller batches. The budget is for the whole process: what it already
//! holds (the model, the corpus) counts.
//!
//! The estimate is an upper-bound model in values × bytes, not a measurement (a hand-written
//! model: no crate knows libtorch's allocations); the README compares it with measured peaks.

use std::ops::Range;

use tch::{Kind, Tensor};

use super::projection::{cache_room, PROJ_BLOCK};
use super::{CaptureOptions, ProjectionKind};
use crate::error::{Error, Result};
use crate::model::Model;

/// What a capture of some samples costs, in bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Footprint {
    /// Bytes per value of the working precision.
    pub value_bytes: u64,
    /// Held per sample for the whole capture (its gradients or factors; the stacking copy).
    pub held_per_sample: u64,
    /// Per sample of a batch, per token (recorded activations, logits, ghost factors).
    pub per_token: u64,
    /// Per sample of a batch, per squared token (attention scores and their gradients).
    pub per_token2: u64,
    /// Per sample of a batch, independent of length (its per-sample gradient pieces).
    pub per_sample: u64,
    /// Once, whatever the number of samples: with a projection, a group of unprojected rows
    /// waiting to be projected and one block of the projection matrix (float64 and converted).
    pub fixed: u64,
}

impl Footprint {
    /// The footprint of capturing with `opts` the selected `params` of `model` for texts of at
    /// most `longest` tokens; `ghost[k]` says whether parameter k is captured as ghost factors.
    pub fn of(
        model: &Model,
        params: &[(String, Tensor)],
        opts: &CaptureOptions,
        ghost: &[bool],
        longest: usize,
    ) -> Footprint {
        let cfg = &model.cfg;
        let value_bytes = match params.first().map(|(_, t)| t.kind()) {
            Some(Kind::Double) => 8,
            Some(Kind::Half | Kind::BFloat16) => 2,
            _ => 4,
        };
        let probes = if opts.output == super::OutputKind::LogitTrace {
            opts.probes.max(1) as u64
        } else {
            1
        };
        let first = model.first_block_of(params.iter().map(|(n, _)| n.as_str())) as i64;
        let recorded = (cfg.n_layer - first).max(0) as u64 + 1;
        let (d, ffn, heads, v) = (
            cfg.d_model as u64,
            cfg.d_ffn as u64,
            cfg.n_head as u64,
            cfg.vocab_size as u64,
        );
        let experts = match &cfg.experts {
            crate::model::ExpertConfig::Dense => 1,
            _ => 2,
        };
        let (mut held, mut piece, mut factors, mut widest) = (0u64, 0u64, 0u64, 0u64);
        for ((_, t), &g) in params.iter().zip(ghost) {
            let numel = t.numel() as u64;
            let size = t.size();
            if g {
                // Ghost factors (T × (in + out)) per position, held for the whole set.
                let width = if size.len() == 2 {
                    (size[0] + size[1]) as u64
                } else {
                    numel
                };
                factors += width;
                continue;
            }
            piece += numel;
            widest = widest.max(numel);
            held += match (opts.norms_only, opts.projection) {
                (true, _) => 1,
                (false, None) => numel,
                (false, Some(p)) if p.kind == ProjectionKind::Kronecker && size.len() == 2 => {
                    let side = p.kronecker_side() as u64;
                    side * side
                }
                (false, Some(p)) => p.dim as u64,
            };
        }
        // Logit-trace probes: signs drawn as float32, then converted.
        let trace_probes = match opts.output {
            super::OutputKind::LogitTrace => probes * longest as u64 * v * (4 + value_bytes),
            _ => 0,
        };
        Footprint {
            value_bytes,
            // The pieces, then their stacking copy.
            held_per_sample: 2 * held * probes * value_bytes
                + factors * longest as u64 * probes * value_bytes,
            // Per recorded block: inputs and outputs of every Linear and norm (≈ 12 d), the FFN
            // (2 · ffn, per active expert path), their gradients; logits, log-probabilities and
            // their gradients (4 V); ghost factors of the batch.
            per_token: (2 * recorded * (12 * d + 2 * ffn * experts) + 4 * v + factors)
                * value_bytes,
            per_token2: 3 * recorded * heads * value_bytes,
            // The batch's per-sample gradient pieces and the einsum's output.
            per_sample: 2 * piece * value_bytes,
            fixed: trace_probes
                + match opts.projection {
                    Some(p) => {
                        let block = PROJ_BLOCK.min(widest as i64).max(0) as u64;
                        let s = p.nonzeros() as u64;
                        // Bytes of one parameter's row of a drawn block: s nonzeros as a u32
                        // column and a sign byte, or k values in the working precision.
                        let row = match p.kind {
                            ProjectionKind::Sparse => 5 * s,
                            _ => p.dim.max(0) as u64 * value_bytes,
                        };
                        // The waiting rows (stacked a block at a time); a block drawn and the
                        // blocks kept between groups, up to their room.
                        opts.project_group.max(0) as u64 * value_bytes
                            + block * row
                            + cache_room(opts, piece, value_bytes).min(piece * row)
                    }
                    None => 0,
                },
        }
    }

    /// Estimated bytes of one batch of `b` samples whose longest text has `t` tokens.
    pub fn batch(&self, b: usize, t: usize) -> u64 {
        let (b, t) = (b as u64, t as u64);
        margin(b * (self.per_sample + t * self.per_token + t * t * self.per_token2))
    }

    /// Estimated bytes held for `n` samples (their gradients or factors), plus the kernel
    /// (n² float64 per block and the total) when `blocks` is given.
    pub fn held(&self, n: usize, blocks: Option<usize>) -> u64 {
        let n = n as u64;
        margin(
            self.fixed
                + n * self.held_per_sample
                + blocks.map_or(0, |g| (g as u64 + 1) * n * n * 8),
        )
    }
}

/// The model's estimates times 1.25: on four captures (README) the unscaled estimate of the
/// peak was 19% under to 7% over the measured one; the allocator's cached blocks and copies
/// the model leaves out take the rest.
fn margin(bytes: u64) -> u64 {
    bytes + bytes / 4
}

/// Consecutive batches of at most `max_batch` samples, each cut so that its estimate stays
/// within `budget` bytes less what is held (`held`); without a budget, batches of `max_batch`.
/// A sample whose batch of one does not fit is refused, naming it and the figures.
pub fn plan_batches(
    lengths: &[usize],
    fp: &Footprint,
    budget: Option<u64>,
    held: u64,
    max_batch: usize,
) -> Result<Vec<Range<usize>>> {
    let max_batch = max_batch.max(1);
    let Some(budget) = budget else {
        return Ok((0..lengths.len())
            .step_by(max_batch)
            .map(|s| s..(s + max_batch).min(lengths.len()))
            .collect());
    };
    let gb = |x: u64| x as f64 / 1e9;
    if held >= budget {
        return Err(Error::invalid(
            "--memory",
            format!(
                "this process and the capture's results need {:.1} GB before any batch (the \
                 per-sample gradients or their projections for {} samples, projection buffers, \
                 the model) within a budget of {:.1} GB; use --project K (or --projection \
                 kronecker), --diagonal, --tile N, fewer --samples or a larger --memory",
                gb(held),
                lengths.len(),
                gb(budget)
            ),
        ));
    }
    let room = budget - held;
    let mut out = Vec::new();
    let mut start = 0;
    while start < lengths.len() {
        let mut end = start;
        let mut longest = 0;
        while end < lengths.len() && end - start < max_batch {
            let t = longest.max(lengths[end]);
            if fp.batch(end - start + 1, t) > room {
                break;
            }
            longest = t;
            end += 1;
        }
        if end == start {
            return Err(Error::invalid(
                "--memory",
                format!(
                    "sample {start} ({} tokens) needs about {:.1} GB on its own, more than the \
                     {:.1} GB left of the budget; select fewer parameters (--params, \
                     --last-blocks), project (--project), or give a larger --memory",
                    lengths[start],
                    gb(fp.batch(1, lengths[start])),
                    gb(room)
                ),
            ));
        }
        out.push(start..end);
        start = end;
    }
    Ok(out)
}

/// What this process holds in memory now (resident set, Linux `/proc/self/statm`); 0 where
/// unknown.
pub fn resident() -> u64 {
    let Ok(statm) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// The default budget: 80% of the memory the system reports available now (Linux
/// `/proc/meminfo`), for the whole process; `None` where unknown.
pub fn default_budget() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb = info
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some(kb * 1024 / 10 * 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp() -> Footprint {
        Footprint {
            value_bytes: 4,
            held_per_sample: 100,
            per_token: 10,
            per_token2: 1,
            per_sample: 50,
            fixed: 0,
        }
    }

    #[test]
    fn batches_shrink_for_long_texts_and_refuse_what_cannot_fit() {
        let f = fp();
        // A 5-token sample: 50 + 10·5 + 5² = 125 bytes, 156 with the margin (two: 312).
        assert_eq!(f.batch(2, 5), 312);
        let lengths = [5, 5, 5, 5, 40, 5, 5];
        let plan = plan_batches(&lengths, &f, None, 0, 3).unwrap();
        assert_eq!(plan, vec![0..3, 3..6, 6..7]);
        // 1,000 bytes of room: short samples fit (156 each), but with the 40-token text in a
        // batch every sample counts at 40 tokens (1.25 × (50 + 400 + 1600) = 2,562): alone,
        // still too big.
        let err = plan_batches(&lengths, &f, Some(1100), 100, 8).unwrap_err();
        assert!(err.to_string().contains("sample 4 (40 tokens)"), "{err}");
        let plan = plan_batches(&lengths, &f, Some(6100), 100, 8).unwrap();
        assert_eq!(plan, vec![0..4, 4..6, 6..7]);
        for r in &plan {
            let t = lengths[r.clone()].iter().max().copied().unwrap();
            assert!(f.batch(r.len(), t) <= 6000);
        }
        // What is held alone exceeds the budget: refused, naming the remedies.
        let err = plan_batches(&lengths, &f, Some(100), 100, 8).unwrap_err();
        assert!(err.to_string().contains("--project"), "{err}");
    }
}

//! Gradient consistency (paper notes, Definition 1), computed from kernel entries alone.
//!
//! With Θ(X) = Σ λ_i u_i u_iᵀ and u the eigenvector of the largest eigenvalue λ (sign fixed so
//! that Σ_i u_i ≥ 0), the primary gradient direction is g(X) = uᵀ J(X). For a subset X′ ⊂ X with
//! principal pair (u′, λ′) of Θ(X′, X′):
//!     GC(X′) = cos(g(X), g(X′)) = uᵀ Θ(X, X′) u′ / (√λ √λ′),
//! since ‖g(X)‖² = uᵀ Θ u = λ. Per-sample alignment (an extension): cos(g(X), J_i) =
//! (Θ u)_i / (√λ √Θ_ii). Eigenvectors come from libtorch's `linalg_eigh` (float64) for kernels of
//! up to [`ITERATIVE_ABOVE`] samples and from the Lanczos iteration ([`super::lanczos`]) above;
//! the resampled sets of the intervals start from the whole set's principal vector.

use tch::{Device, Kind, Tensor};

use super::op::{index, Dense, KernelOp};
use crate::error::{Error, Result};

/// The principal eigenpair of a symmetric kernel, sign-fixed.
#[derive(Debug)]
pub struct Principal {
    /// The unit principal eigenvector (n,), sign-fixed.
    pub u: Tensor,
    /// Its eigenvalue.
    pub lambda: f64,
}

/// Kernels of more samples than this get their principal pair from the Lanczos iteration
/// ([`super::lanczos`]); smaller ones from `eigh`, which is then as fast and exact to rounding.
pub const ITERATIVE_ABOVE: i64 = 512;

/// The principal eigenpair of the symmetric kernel `k`: libtorch's `linalg_eigh` up to
/// [`ITERATIVE_ABOVE`] samples, the Lanczos iteration above (see [`principal_from`]).
pub fn principal(k: &Tensor) -> Result<Principal> {
    principal_from(k, None)
}

/// [`principal`] with a warm start for the iterative solver (`start`, length n): the principal
/// vector of a slightly larger or smaller set of samples converges in a few products. If the
/// iteration does not converge (a top eigenvalue with a near-twin), `eigh` decides, with a
/// warning.
pub fn principal_from(k: &Tensor, start: Option<&Tensor>) -> Result<Principal> {
    let n = k.size()[0];
    if n == 0 || k.size() != [n, n] {
        return Err(Error::invalid(
            "kernel",
            format!("expected a square kernel, got {:?}", k.size()),
        ));
    }
    principal_op(&Dense::new(k), start)
}

/// [`principal_from`] of a kernel seen through its products ([`KernelOp`]): `eigh` of the whole
/// kernel up to [`ITERATIVE_ABOVE`] samples, the Lanczos iteration above (`eigh` only if it does
/// not converge).
pub fn principal_op(k: &dyn KernelOp, start: Option<&Tensor>) -> Result<Principal> {
    let n = k.n();
    if n == 0 {
        return Err(Error::invalid("kernel", "a kernel of no samples"));
    }
    let all: Vec<usize> = (0..n).collect();
    let pair = if n as i64 > ITERATIVE_ABOVE {
        iterative(n as i64, &|x| k.mv(x), start)?
    } else {
        None
    };
    let (mut u, lambda) = match pair {
        Some(pair) => pair,
        None => dense_top(&k.sub(&all))?,
    };
    if u.sum(Kind::Double).double_value(&[]) < 0.0 {
        u = -u;
    }
    Ok(Principal { u, lambda })
}

/// The Lanczos pair of `op` (symmetric, on n samples); `None`, with a warning, if the iteration
/// does not converge (a top eigenvalue with a near-twin), for the caller to use `eigh`.
fn iterative(
    n: i64,
    op: &dyn Fn(&Tensor) -> Tensor,
    start: Option<&Tensor>,
) -> Result<Option<(Tensor, f64)>> {
    let p = super::lanczos::top_eigenpair_op(n, Device::Cpu, op, start, Default::default())?;
    if p.converged {
        return Ok(Some((p.u, p.lambda)));
    }
    tracing::warn!(
        "the Lanczos iteration did not converge in {} steps on a kernel of {n} samples (relative residual {:.1e}); using eigh",
        p.steps,
        p.residual
    );
    Ok(None)
}

/// The principal pair of the kernel restricted to the samples `keep` (sorted, distinct),
/// with the eigenvector at full length n (zero outside `keep`); `start` (length n) warm-starts
/// the iteration. Subsets of more than half the samples are handled by an operator that masks
/// the full kernel, so the resampled kernels of the intervals are never copied out; smaller
/// ones are copied (eigh up to [`ITERATIVE_ABOVE`] samples, Lanczos above).
fn principal_on(k: &dyn KernelOp, keep: &[usize], start: &Tensor) -> Result<Principal> {
    let n = k.n() as i64;
    if keep.len() == n as usize {
        return principal_op(k, Some(start));
    }
    let sel = index(keep);
    let mask = Tensor::zeros([n], (Kind::Double, Device::Cpu)).index_fill(0, &sel, 1.0);
    let op = |x: &Tensor| k.mv(&(x * &mask)) * &mask;
    // The masked full kernel costs n² a product whatever the subset; a copy of the subset's
    // kernel costs m² once and m² a product. Masking pays only for subsets of more than half
    // the samples (the resampled sets of the intervals); on 16,384 samples, masking every
    // frequency bin and domain made the jackknife the longest part of the run.
    let pair = if keep.len() as i64 > ITERATIVE_ABOVE && 2 * keep.len() as i64 > n {
        iterative(n, &op, Some(&(start * &mask)))?
    } else {
        None
    };
    let (u, lambda) = if let Some((u, lambda)) = pair {
        let u = u * &mask;
        (&u / u.norm(), lambda)
    } else {
        let p = principal_from(&k.sub(keep), Some(&start.index_select(0, &sel)))?;
        let u = Tensor::zeros([n], (Kind::Double, Device::Cpu)).index_copy(0, &sel, &p.u);
        (u, p.lambda)
    };
    let u = if u.sum(Kind::Double).double_value(&[]) < 0.0 {
        -u
    } else {
        u
    };
    Ok(Principal { u, lambda })
}

/// The top eigenvector and eigenvalue by `eigh` (all n pairs, O(n³)).
fn dense_top(sym: &Tensor) -> Result<(Tensor, f64)> {
    let n = sym.size()[0];
    let (vals, vecs) = sym.f_linalg_eigh("L")?;
    Ok((vecs.select(1, n - 1), vals.double_value(&[n - 1])))
}

/// The GC of one subset and the shape of its own kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SubsetGc {
    /// GC of the subset with the whole set.
    pub gc: f64,
    /// Participation ratio of the subset's principal eigenvector (see [`participation`]).
    pub participation: f64,
    /// The subset kernel's top eigenvalue as a share of its trace.
    pub top_share: f64,
    /// Σ u′_i / Σ |u′_i| of the subset's principal eigenvector (in [0, 1] under the Σ u ≥ 0
    /// convention): 1 when its entries share a sign, near 0 when they cancel, and then the sign
    /// of the GC is nearly arbitrary.
    pub sign_margin: f64,
}

/// Σ u_i / Σ |u_i|: how far the sign convention Σ u ≥ 0 is from a tie (0 for an empty or zero
/// vector).
pub fn sign_margin(u: &Tensor) -> f64 {
    let abs = u.abs().sum(Kind::Double).double_value(&[]);
    if abs > 0.0 {
        u.sum(Kind::Double).double_value(&[]) / abs
    } else {
        0.0
    }
}

/// Participation ratio 1 / Σ u_i⁴ of a unit vector: how many samples carry it. 1 when one
/// sample carries it all, n when all n carry it equally.
pub fn participation(u: &Tensor) -> f64 {
    let u = u.to_kind(Kind::Double);
    let s2 = u.square().sum(Kind::Double).double_value(&[]);
    let s4 = u.pow_tensor_scalar(4).sum(Kind::Double).double_value(&[]);
    if s4 > 0.0 {
        s2 * s2 / s4
    } else {
        0.0
    }
}

/// GC of the subset `idx` of the samples of `k` (n × n); `None` for an empty subset or a zero
/// kernel.
pub fn gc(k: &dyn KernelOp, whole: &Principal, idx: &[usize]) -> Result<Option<f64>> {
    Ok(subset(k, whole, idx)?.map(|s| s.gc))
}

/// GC of the subset `idx` (sorted, distinct) with the participation ratio and top-eigenvalue
/// share of its own kernel; `None` for an empty subset or a zero kernel.
pub fn subset(k: &dyn KernelOp, whole: &Principal, idx: &[usize]) -> Result<Option<SubsetGc>> {
    if idx.is_empty() || whole.lambda <= 0.0 {
        return Ok(None);
    }
    // The whole set's direction on the subset is a warm start for the subset's own; u′ at full
    // length (zero outside the subset).
    let p = principal_on(k, idx, &whole.u)?;
    if p.lambda <= 0.0 {
        return Ok(None);
    }
    // g(X)·g(X′) = uᵀ Θ(X, X′) u′ = λ uᵀu′, since Θu = λu on the set u lives on and u′ lives
    // on a subset of it (to the solver's residual, ≤ 1e-11 λ): no n² product per subset, which
    // on 16,384 samples was most of the jackknife's time (one per group and resample).
    let num = whole.lambda * whole.u.dot(&p.u).double_value(&[]);
    let trace = k
        .diag()
        .index_select(0, &index(idx))
        .sum(Kind::Double)
        .double_value(&[]);
    Ok(Some(SubsetGc {
        gc: num / (whole.lambda.sqrt() * p.lambda.sqrt()),
        participation: participation(&p.u),
        top_share: if trace > 0.0 { p.lambda / trace } else { 0.0 },
        sign_margin: sign_margin(&p.u),
    }))
}

/// How the intervals of GC are computed.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum IntervalMethod {
    /// Delete-a-group jackknife: the samples are split into G seeded groups, GC is recomputed
    /// (principal direction included) without each group, and the interval is the
    /// bias-corrected estimate ± t · the jackknife standard error, widened to hold the
    /// estimate itself. Every recomputation uses (G−1)/G of the samples, so it measures GC at
    /// nearly the sample's own size.
    #[default]
    Jackknife,
    /// Percentile interval over half-samples drawn without replacement: GC at half the size,
    /// which runs low since GC grows with the size of a set (kept for comparison).
    HalfSample,
}

/// (1 − α) intervals of the GC of each group in `groups` (indices into the samples of `k`) by
/// `method` with `resamples` jackknife groups or half-samples; seeded, so the same seed gives the
/// same intervals. `None` for a group whose interval is undefined.
pub fn gc_intervals(
    k: &dyn KernelOp,
    groups: &[&[usize]],
    method: IntervalMethod,
    resamples: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Option<(f64, f64)>>> {
    match method {
        IntervalMethod::Jackknife => gc_jackknife(k, groups, resamples, alpha, seed),
        IntervalMethod::HalfSample => gc_bootstrap(k, groups, resamples, alpha, seed),
    }
}

/// The GC of each group's kept members within the samples `keep` (sorted); `start` (length n,
/// the whole set's principal vector) warm-starts the iterative solver.
fn gc_on(
    k: &dyn KernelOp,
    keep: &[usize],
    member: &[Vec<bool>],
    start: &Tensor,
) -> Result<Vec<Option<f64>>> {
    let whole = principal_on(k, keep, start)?;
    member
        .iter()
        .map(|m| {
            let idx: Vec<usize> = keep.iter().copied().filter(|&i| m[i]).collect();
            gc(k, &whole, &idx)
        })
        .collect()
}

/// Membership masks of `groups` over `n` samples.
fn members(n: usize, groups: &[&[usize]]) -> Vec<Vec<bool>> {
    groups
        .iter()
        .map(|g| {
            let mut m = vec![false; n];
            for &i in g.iter() {
                m[i] = true;
            }
            m
        })
        .collect()
}

/// Delete-a-group jackknife intervals (see [`IntervalMethod::Jackknife`]).
pub fn gc_jackknife(
    k: &dyn KernelOp,
    groups: &[&[usize]],
    folds: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Option<(f64, f64)>>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let n = k.n();
    let member = members(n, groups);
    let all: Vec<usize> = (0..n).collect();
    let full = principal_op(k, None)?;
    let est = gc_on(k, &all, &member, &full.u)?;
    let folds = folds.min(n);
    if folds < 2 {
        return Ok(vec![None; groups.len()]);
    }
    let mut order = all.clone();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(seed, b"jk"));
    order.shuffle(&mut rng);
    let mut fold = vec![0usize; n];
    for (p, &i) in order.iter().enumerate() {
        fold[i] = p % folds;
    }
    let mut leave: Vec<Vec<f64>> = vec![Vec::with_capacity(folds); groups.len()];
    for f in 0..folds {
        let keep: Vec<usize> = all.iter().copied().filter(|&i| fold[i] != f).collect();
        for (g, v) in gc_on(k, &keep, &member, &full.u)?.into_iter().enumerate() {
            leave[g].extend(v);
        }
    }
    Ok(est
        .iter()
        .zip(leave)
        .map(|(e, l)| e.and_then(|e| jackknife_interval(e, &l, alpha)))
        .collect())
}

/// The jackknife interval of an estimate `est` from its leave-one-group-out values: the
/// bias-corrected estimate ± t(1 − α/2, m − 1) · standard error, widened to hold `est`, within
/// [−1, 1]. `None` for fewer than 2 values.
pub fn jackknife_interval(est: f64, leave: &[f64], alpha: f64) -> Option<(f64, f64)> {
    let m = leave.len();
    if m < 2 {
        return None;
    }
    let mf = m as f64;
    let mean = leave.iter().sum::<f64>() / mf;
    let var = (mf - 1.0) / mf * leave.iter().map(|v| (v - mean).powi(2)).sum::<f64>();
    let centre = est - (mf - 1.0) * (mean - est);
    let half = crate::stats::t_quantile(1.0 - alpha / 2.0, mf - 1.0) * var.sqrt();
    // A GC of exactly ±1 can come out a rounding error beyond; the interval stays in [−1, 1].
    let est = est.clamp(-1.0, 1.0);
    let lo = (centre - half).min(est).max(-1.0);
    let hi = (centre + half).max(est).min(1.0);
    Some((lo, hi))
}

/// Resampling (1 − α) intervals of the GC of each group in `groups` (indices into the samples of
/// `k`): each resample draws half of the samples without replacement (half-sampling; with
/// replacement, duplicated gradient rows bias GC down), recomputes the principal direction of
/// the drawn set, and the GC of each group's drawn members; the interval is the percentile range.
/// It describes GC at half the sample size: it errs on the wide side and, as GC grows with the
/// size of a set, sits slightly low. Seeded per resample, so the
/// same seed gives the same intervals. `None` for a group whose GC is undefined in every resample.
pub fn gc_bootstrap(
    k: &dyn KernelOp,
    groups: &[&[usize]],
    resamples: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Option<(f64, f64)>>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let n = k.n();
    let member = members(n, groups);
    let full = principal_op(k, None)?;
    let mut stats: Vec<Vec<f64>> = vec![Vec::with_capacity(resamples); groups.len()];
    for b in 0..resamples {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(
            seed,
            &(b as u64).to_le_bytes(),
        ));
        // Half-sampling without replacement: drawn duplicates would add identical gradient
        // rows and pull GC down (a with-replacement interval can miss its estimate).
        let mut pick: Vec<usize> = (0..n).collect();
        pick.shuffle(&mut rng);
        pick.truncate(n.div_ceil(2));
        pick.sort_unstable();
        for (g, v) in gc_on(k, &pick, &member, &full.u)?.into_iter().enumerate() {
            stats[g].extend(v);
        }
    }
    Ok(stats
        .into_iter()
        .map(|mut s| (!s.is_empty()).then(|| crate::stats::percentile_interval(&mut s, alpha)))
        .collect())
}

/// cos(g(X), J_i) for every sample.
pub fn alignment(k: &dyn KernelOp, whole: &Principal) -> Vec<f64> {
    let ku: Vec<f64> = Vec::try_from(k.mv(&whole.u)).unwrap_or_default();
    let diag: Vec<f64> = Vec::try_from(k.diag()).unwrap_or_default();
    ku.iter()
        .zip(diag)
        .map(|(a, d)| {
            if d > 0.0 && whole.lambda > 0.0 {
                a / (whole.lambda.sqrt() * d.sqrt())
            } else {
                0.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Explicit Jacobians: GC must equal the cosine of the explicit primary directions.
    #[test]
    fn gc_from_kernel_equals_explicit_directions() {
        tch::manual_seed(0);
        let j = Tensor::randn([6, 10], (Kind::Double, Device::Cpu)) + 0.5;
        let k = j.matmul(&j.tr());
        let whole = principal(&k).unwrap();
        assert!(
            whole.u.sum(Kind::Double).double_value(&[]) >= 0.0,
            "sign convention"
        );
        let idx = [1usize, 3, 4];
        let sel = Tensor::from_slice(&[1i64, 3, 4]);
        let js = j.index_select(0, &sel);
        let ps = principal(&js.matmul(&js.tr())).unwrap();
        let g = whole.u.unsqueeze(0).matmul(&j).squeeze();
        let gs = ps.u.unsqueeze(0).matmul(&js).squeeze();
        let want = g.dot(&gs).double_value(&[])
            / (g.norm().double_value(&[]) * gs.norm().double_value(&[]));
        let got = gc(&Dense::new(&k), &whole, &idx).unwrap().unwrap();
        assert!((got - want).abs() < 1e-10, "{got} vs {want}");
        // GC of the set with itself is 1.
        let all: Vec<usize> = (0..6).collect();
        assert!((gc(&Dense::new(&k), &whole, &all).unwrap().unwrap() - 1.0).abs() < 1e-10);
        // Alignment equals the explicit cosine.
        let a = alignment(&Dense::new(&k), &whole);
        for (i, ai) in a.iter().enumerate() {
            let ji = j.get(i as i64);
            let want = g.dot(&ji).double_value(&[])
                / (g.norm().double_value(&[]) * ji.norm().double_value(&[]));
            assert!((ai - want).abs() < 1e-10);
        }
    }

    /// Above the iterative threshold (700 samples, Lanczos): GC and alignment equal the cosines
    /// of explicit primary directions, taken from the d × d side (JᵀJ, `eigh`) — an independent
    /// route to the same numbers — to 1e-9; the pair agrees with `eigh` on the kernel itself.
    #[test]
    fn iterative_principal_pair_gives_the_explicit_gc() {
        tch::manual_seed(5);
        let n = 700;
        assert!(n > ITERATIVE_ABOVE);
        let j = Tensor::randn([n, 40], (Kind::Double, Device::Cpu)) + 0.3;
        let k = j.matmul(&j.tr());
        let whole = principal(&k).unwrap();
        let (_, want_lambda) = dense_top(&k).unwrap();
        assert!((whole.lambda - want_lambda).abs() < 1e-10 * want_lambda);
        let top = |m: &Tensor| {
            let (_, v) = m.linalg_eigh("L");
            let d = m.size()[0];
            v.select(1, d - 1)
        };
        // The primary direction g = uᵀJ is the top right singular vector of J (up to scale).
        let orient = |v: Tensor, jj: &Tensor| {
            if jj.mv(&v).sum(Kind::Double).double_value(&[]) < 0.0 {
                -v
            } else {
                v
            }
        };
        let g = orient(top(&j.tr().matmul(&j)), &j);
        let idx: Vec<usize> = (0..n as usize).filter(|i| i % 7 == 2).collect();
        let sel = Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>());
        let js = j.index_select(0, &sel);
        let gs = orient(top(&js.tr().matmul(&js)), &js);
        let want = g.dot(&gs).double_value(&[]);
        let got = gc(&Dense::new(&k), &whole, &idx).unwrap().unwrap();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        let a = alignment(&Dense::new(&k), &whole);
        for i in [0usize, 13, 699] {
            let ji = j.get(i as i64);
            let want = g.dot(&ji).double_value(&[]) / ji.norm().double_value(&[]);
            assert!((a[i] - want).abs() < 1e-9, "sample {i}: {} vs {want}", a[i]);
        }
    }

    /// Subsets above the threshold: a resampled set of more than half the samples (700 of 900)
    /// is solved on the masked full kernel, a subset of at most half (600 of 1,300) on a copy of
    /// its kernel; either pair equals `eigh` of the copied sub-kernel, with zeros outside.
    #[test]
    fn subset_pairs_equal_eigh_of_the_sub_kernel() {
        type Inside = fn(usize) -> bool;
        let cases: [(i64, Inside); 2] =
            [(900, |i| i % 9 != 4 && i % 11 != 0), (1300, |i| i % 13 < 6)];
        for (seed, (n, inside)) in cases.into_iter().enumerate() {
            tch::manual_seed(6 + seed as i64);
            let j = Tensor::randn([n, 30], (Kind::Double, Device::Cpu)) + 0.2;
            let k = j.matmul(&j.tr());
            let keep: Vec<usize> = (0..n as usize).filter(|&i| inside(i)).collect();
            assert!(keep.len() as i64 > ITERATIVE_ABOVE && (keep.len() as i64) < n);
            let full = principal(&k).unwrap();
            let got = principal_on(&Dense::new(&k), &keep, &full.u).unwrap();
            let sel = index(&keep);
            let sub = k.index_select(0, &sel).index_select(1, &sel);
            let (mut v, lambda) = dense_top(&sub).unwrap();
            if v.sum(Kind::Double).double_value(&[]) < 0.0 {
                v = -v;
            }
            assert!((got.lambda - lambda).abs() < 1e-10 * lambda, "n {n}");
            let diff = (got.u.index_select(0, &sel) - v)
                .abs()
                .max()
                .double_value(&[]);
            assert!(diff < 1e-8, "n {n}: max |Δu| {diff}");
            let out: Vec<i64> = (0..n).filter(|&i| !inside(i as usize)).collect();
            let outside = got
                .u
                .index_select(0, &Tensor::from_slice(&out))
                .abs()
                .max()
                .double_value(&[]);
            assert_eq!(outside, 0.0, "n {n}: entries outside the set");
        }
    }

    /// 20 samples share one gradient direction, 5 point elsewhere: the bootstrap interval of
    /// the first group lies near 1 and above the second's; the whole set's is exactly (1, 1).
    #[test]
    fn gc_bootstrap_separates_consistent_from_inconsistent_groups() {
        tch::manual_seed(1);
        let v = Tensor::randn([1, 30], (Kind::Double, Device::Cpu));
        let w = Tensor::randn([1, 30], (Kind::Double, Device::Cpu));
        let j = Tensor::cat(
            &[
                v.repeat([20, 1]) + Tensor::randn([20, 30], (Kind::Double, Device::Cpu)) * 0.1,
                w.repeat([5, 1]) + Tensor::randn([5, 30], (Kind::Double, Device::Cpu)) * 0.1,
            ],
            0,
        );
        let k = j.matmul(&j.tr());
        let a: Vec<usize> = (0..20).collect();
        let b: Vec<usize> = (20..25).collect();
        let all: Vec<usize> = (0..25).collect();
        let groups = [a.as_slice(), b.as_slice(), all.as_slice()];
        let iv = gc_bootstrap(&Dense::new(&k), &groups, 100, 0.05, 3).unwrap();
        let (a_lo, a_hi) = iv[0].unwrap();
        let (b_lo, b_hi) = iv[1].unwrap();
        assert!(
            0.95 < a_lo && a_lo <= a_hi && a_hi <= 1.0 + 1e-9,
            "{:?}",
            iv[0]
        );
        assert!(b_lo <= b_hi && b_hi < a_lo, "{:?} vs {:?}", iv[1], iv[0]);
        // Half-samples have no duplicates: each interval holds its group's estimate.
        let whole = principal(&k).unwrap();
        for (g, v) in groups.iter().zip(&iv) {
            let est = gc(&Dense::new(&k), &whole, g).unwrap().unwrap();
            let (lo, hi) = v.unwrap();
            assert!(
                lo <= est + 1e-12 && est <= hi + 1e-12,
                "{est} outside ({lo}, {hi})"
            );
        }
        let (w_lo, w_hi) = iv[2].unwrap();
        assert!((w_lo - 1.0).abs() < 1e-9 && (w_hi - 1.0).abs() < 1e-9);
        assert_eq!(
            iv,
            gc_bootstrap(&Dense::new(&k), &groups, 100, 0.05, 3).unwrap()
        );
        assert_ne!(
            iv[1],
            gc_bootstrap(&Dense::new(&k), &groups, 100, 0.05, 4).unwrap()[1]
        );
    }

    /// The jackknife interval: holds its estimate, is deterministic for a seed, and is narrow
    /// for a consistent group and wide for a scattered one.
    #[test]
    fn gc_jackknife_holds_estimates() {
        tch::manual_seed(2);
        let v = Tensor::randn([1, 30], (Kind::Double, Device::Cpu));
        let j = Tensor::cat(
            &[
                v.repeat([30, 1]) + Tensor::randn([30, 30], (Kind::Double, Device::Cpu)) * 0.1,
                Tensor::randn([10, 30], (Kind::Double, Device::Cpu)),
            ],
            0,
        );
        let k = j.matmul(&j.tr());
        let a: Vec<usize> = (0..30).collect();
        let b: Vec<usize> = (30..40).collect();
        let groups = [a.as_slice(), b.as_slice()];
        let iv = gc_jackknife(&Dense::new(&k), &groups, 10, 0.05, 1).unwrap();
        let whole = principal(&k).unwrap();
        for (g, v) in groups.iter().zip(&iv) {
            let est = gc(&Dense::new(&k), &whole, g).unwrap().unwrap();
            let (lo, hi) = v.unwrap();
            assert!(
                lo <= est && est <= hi && -1.0 <= lo && hi <= 1.0,
                "{est} ({lo}, {hi})"
            );
        }
        let (w0, w1) = (iv[0].unwrap(), iv[1].unwrap());
        assert!(w0.1 - w0.0 < 0.05 && w1.1 - w1.0 > 0.1, "{iv:?}");
        assert_eq!(
            iv,
            gc_jackknife(&Dense::new(&k), &groups, 10, 0.05, 1).unwrap()
        );
        assert_ne!(
            iv,
            gc_jackknife(&Dense::new(&k), &groups, 10, 0.05, 2).unwrap()
        );
        // The interval formula: bias-corrected centre ± t · se, widened to the estimate.
        let (lo, hi) = jackknife_interval(0.5, &[0.4, 0.42, 0.38, 0.4], 0.05).unwrap();
        // mean 0.4, centre 0.5 + 3 · 0.1 = 0.8, se = √(3/4 · 0.0008) ≈ 0.0245, t(3) ≈ 3.18
        assert!((lo - 0.5).abs() < 1e-12, "{lo}");
        assert!(
            (hi - (0.8 + 3.182446305284263 * (0.0006f64).sqrt())).abs() < 2e-3,
            "{hi}"
        );
        assert_eq!(jackknife_interval(0.5, &[0.4], 0.05), None);
        // An estimate a rounding error above 1 still gives an ordered interval within [−1, 1].
        let (lo, hi) = jackknife_interval(1.0 + 1e-12, &[1.0, 1.0, 1.0], 0.05).unwrap();
        assert!(lo <= hi && hi <= 1.0, "{lo} {hi}");
    }
}

//! Gradient consistency (paper notes, Definition 1), computed from kernel entries alone.
//!
//! With Θ(X) = Σ λ_i u_i u_iᵀ and u the eigenvector of the largest eigenvalue λ (sign fixed so
//! that Σ_i u_i ≥ 0), the primary gradient direction is g(X) = uᵀ J(X). For a subset X′ ⊂ X with
//! principal pair (u′, λ′) of Θ(X′, X′):
//!     GC(X′) = cos(g(X), g(X′)) = uᵀ Θ(X, X′) u′ / (√λ √λ′),
//! since ‖g(X)‖² = uᵀ Θ u = λ. Per-sample alignment (an extension): cos(g(X), J_i) =
//! (Θ u)_i / (√λ √Θ_ii).
//!
//! Principal pairs: a kernel held in memory gives sets of up to [`ITERATIVE_ABOVE`] samples, or
//! of at most half the samples, a copy of their sub-kernel (`eigh` up to [`ITERATIVE_ABOVE`],
//! Lanczos above); every other set, and every set of a kernel out of core (tiles on disk, MPI
//! ranks' rows), is solved by the Lanczos iteration ([`super::lanczos`]) on the kernel masked to
//! the set, never copied out. Those masked solves run in lock-step, [`LOCKSTEP`] at a time, so
//! each pass over the kernel (one read of every tile) serves up to that many products: the
//! jackknife's sets and their groups are solved in two such batches. A solve that does not meet
//! its stopping rule within its products is used with a warning naming its residual; no kernel
//! is densified. The resampled sets of the intervals start from the whole set's principal
//! vector, their groups from their set's.

use tch::{Device, Kind, Tensor};

use super::lanczos::{self, LanczosOptions, Problem, TopPair};
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

/// Sets of more samples than this get their principal pair from the Lanczos iteration
/// ([`super::lanczos`]); smaller ones of a kernel in memory from `eigh`, which is then as fast
/// and exact to rounding.
pub const ITERATIVE_ABOVE: i64 = 512;

/// Masked Lanczos solves run in lock-step this many at a time: one product pass over the kernel
/// multiplies up to this many vectors (memory: this many bases of at most
/// [`LanczosOptions::basis`] vectors of length n).
pub const LOCKSTEP: usize = 32;

/// The principal eigenpair of the symmetric kernel `k`: libtorch's `linalg_eigh` up to
/// [`ITERATIVE_ABOVE`] samples, the Lanczos iteration above (see [`principal_from`]).
pub fn principal(k: &Tensor) -> Result<Principal> {
    principal_from(k, None)
}

/// [`principal`] with a warm start for the iterative solver (`start`, length n): the principal
/// vector of a slightly larger or smaller set of samples converges in a few products.
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
/// kernel when it is in memory and has at most [`ITERATIVE_ABOVE`] samples, the Lanczos
/// iteration otherwise.
pub fn principal_op(k: &dyn KernelOp, start: Option<&Tensor>) -> Result<Principal> {
    let n = k.n();
    if n == 0 {
        return Err(Error::invalid("kernel", "a kernel of no samples"));
    }
    let all: Vec<usize> = (0..n).collect();
    let zero;
    let start = match start {
        Some(s) => s,
        None => {
            zero = Tensor::zeros([n as i64], (Kind::Double, Device::Cpu));
            &zero
        }
    };
    let mut out = principals(k, &[Set { keep: &all, start }])?;
    out.pop()
        .ok_or_else(|| Error::invalid("kernel", "no principal pair was found"))
}

/// A set of samples whose principal pair is wanted (sorted, distinct) and the start of its
/// iteration (length n; zero: the fixed start).
pub(crate) struct Set<'a> {
    /// The samples.
    pub keep: &'a [usize],
    /// The start.
    pub start: &'a Tensor,
}

/// The principal pairs of `sets`, in order (see [`solve_sets`]).
pub(crate) fn principals(k: &dyn KernelOp, sets: &[Set]) -> Result<Vec<Principal>> {
    let mut out: Vec<Option<Principal>> = (0..sets.len()).map(|_| None).collect();
    solve_sets(k, sets, &mut |i, p| {
        out[i] = Some(p);
        Ok(())
    })?;
    out.into_iter()
        .map(|p| p.ok_or_else(|| Error::invalid("kernel", "a principal pair was not found")))
        .collect()
}

/// The principal pair of each set of samples of `k`, the eigenvector at full length n (zero
/// outside the set) and sign-fixed, handed to `done(i, pair)`: copied sub-kernels where the
/// kernel is in memory and the set small (see the module notes), the rest by masked Lanczos
/// solves in lock-step.
fn solve_sets(
    k: &dyn KernelOp,
    sets: &[Set],
    done: &mut dyn FnMut(usize, Principal) -> Result<()>,
) -> Result<()> {
    let n = k.n();
    let mut masked = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        let m = set.keep.len();
        let small = m as i64 <= ITERATIVE_ABOVE || 2 * m <= n;
        match if small { k.sub(set.keep)? } else { None } {
            Some(sub) => done(i, copied(&sub, set, n)?)?,
            None => masked.push(i),
        }
    }
    let problems: Vec<Problem> = masked
        .iter()
        .map(|&i| Problem {
            keep: (sets[i].keep.len() < n).then_some(sets[i].keep),
            start: Some(sets[i].start),
        })
        .collect();
    let apply = |x: &Tensor| k.apply(x);
    let opts = LanczosOptions::default();
    lanczos::top_eigenpairs(n as i64, &apply, &problems, opts, LOCKSTEP, &mut |j, p| {
        let i = masked[j];
        done(i, accepted(p, sets[i].keep.len(), n)?)
    })
}

/// The principal pair of a set from the copy `sub` of its sub-kernel: `eigh` up to
/// [`ITERATIVE_ABOVE`] samples, Lanczos above; at full length n.
fn copied(sub: &Tensor, set: &Set, n: usize) -> Result<Principal> {
    let m = sub.size()[0];
    let (u, lambda) = if m <= ITERATIVE_ABOVE {
        dense_top(sub)?
    } else {
        let sel = index(set.keep);
        let start = set.start.index_select(0, &sel);
        let p = lanczos::top_eigenpair(sub, Some(&start), LanczosOptions::default())?;
        let p = accepted(p, m as usize, m as usize)?;
        (p.u, p.lambda)
    };
    let u = if set.keep.len() == n {
        u
    } else {
        Tensor::zeros([n as i64], (Kind::Double, Device::Cpu)).index_copy(0, &index(set.keep), &u)
    };
    Ok(sign_fixed(u, lambda))
}

/// A Lanczos pair as a principal pair, with a warning where the stopping rule was not met
/// (a top eigenvalue with a near-twin): its residual is then above the tolerance.
fn accepted(p: TopPair, m: usize, n: usize) -> Result<Principal> {
    if !p.converged {
        tracing::warn!(
            "the Lanczos iteration did not converge in {} steps ({} restarts) on a set of {m} of \
             {n} samples; using its pair, relative residual {:.1e}",
            p.steps,
            p.restarts,
            p.residual
        );
    }
    Ok(sign_fixed(p.u, p.lambda))
}

/// Σ u within this share of Σ |u| is a tie of the sign convention, broken by the vector's first
/// entry (see [`sign_fixed`]).
pub const SIGN_TIE: f64 = 1e-9;

/// The pair with its vector's sign fixed so that Σ u ≥ 0. Where Σ u is a tie (within
/// [`SIGN_TIE`] of Σ |u|: e.g. two samples of the cosine kernel whose cosine is negative, whose
/// eigenvector is (1, −1)/√2 exactly), the first entry of more than [`SIGN_TIE`] of the largest
/// is positive instead, so that `eigh` and Lanczos, in memory or out of core, settle the tie
/// alike rather than by their rounding.
fn sign_fixed(u: Tensor, lambda: f64) -> Principal {
    let sum = u.sum(Kind::Double).double_value(&[]);
    let abs = u.abs();
    let negative = if sum.abs() > SIGN_TIE * abs.sum(Kind::Double).double_value(&[]) {
        sum < 0.0
    } else {
        let big = abs.gt(SIGN_TIE * abs.max().double_value(&[])).nonzero();
        big.size()[0] > 0 && u.double_value(&[big.int64_value(&[0, 0])]) < 0.0
    };
    Principal {
        u: if negative { -u } else { u },
        lambda,
    }
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

/// GC of the subset `idx` (sorted, distinct) of the samples of `k`; `None` for an empty
/// subset or a zero kernel.
pub fn gc(k: &dyn KernelOp, whole: &Principal, idx: &[usize]) -> Result<Option<f64>> {
    Ok(subset(k, whole, idx)?.map(|s| s.gc))
}

/// GC of the subset `idx` (sorted, distinct) with the participation ratio and top-eigenvalue
/// share of its own kernel; `None` for an empty subset or a zero kernel.
pub fn subset(k: &dyn KernelOp, whole: &Principal, idx: &[usize]) -> Result<Option<SubsetGc>> {
    Ok(subsets(k, whole, &[idx])?.pop().flatten())
}

/// [`subset`] of every group of `groups` (each sorted, distinct), their principal pairs solved
/// together (one lock-step batch, each started from the whole set's vector).
pub fn subsets(
    k: &dyn KernelOp,
    whole: &Principal,
    groups: &[&[usize]],
) -> Result<Vec<Option<SubsetGc>>> {
    let all: Vec<usize> = (0..k.n()).collect();
    let member = members(k.n(), groups);
    let mut out = gc_within(k, &[all.as_slice()], &[whole], &member)?;
    Ok(out.pop().unwrap_or_default())
}

/// The GC of each group's members within each set: `[set][group]`, from the sets' principal
/// pairs `pairs` (at full length). The groups' own pairs are solved in one lock-step batch,
/// each started from its set's vector; `None` where a group has no member in a set or a
/// kernel is zero.
fn gc_within(
    k: &dyn KernelOp,
    sets: &[&[usize]],
    pairs: &[&Principal],
    member: &[Vec<bool>],
) -> Result<Vec<Vec<Option<SubsetGc>>>> {
    let diag = k.diag()?;
    let idx: Vec<Vec<Vec<usize>>> = sets
        .iter()
        .map(|s| {
            let within = |m: &Vec<bool>| s.iter().copied().filter(|&i| m[i]).collect();
            member.iter().map(within).collect()
        })
        .collect();
    let mut jobs: Vec<(usize, usize)> = Vec::new();
    for (r, p) in pairs.iter().enumerate() {
        let some = (0..member.len()).filter(|&g| p.lambda > 0.0 && !idx[r][g].is_empty());
        jobs.extend(some.map(|g| (r, g)));
    }
    let problems: Vec<Set> = jobs
        .iter()
        .map(|&(r, g)| Set {
            keep: &idx[r][g],
            start: &pairs[r].u,
        })
        .collect();
    let mut out = vec![vec![None; member.len()]; sets.len()];
    solve_sets(k, &problems, &mut |j, p| {
        let (r, g) = jobs[j];
        out[r][g] = subset_gc(pairs[r], &p, &idx[r][g], &diag);
        Ok(())
    })?;
    Ok(out)
}

/// The GC of a subset `idx` with principal pair `p` within a set with pair `whole`.
fn subset_gc(whole: &Principal, p: &Principal, idx: &[usize], diag: &Tensor) -> Option<SubsetGc> {
    if p.lambda <= 0.0 {
        return None;
    }
    // g(X)·g(X′) = uᵀ Θ(X, X′) u′ = λ uᵀu′, since Θu = λu on the set u lives on and u′ lives
    // on a subset of it (to the solver's residual, ≤ 1e-11 λ): no n² product per subset, which
    // on 16,384 samples was most of the jackknife's time (one per group and resample).
    let num = whole.lambda * whole.u.dot(&p.u).double_value(&[]);
    let trace = diag
        .index_select(0, &index(idx))
        .sum(Kind::Double)
        .double_value(&[]);
    Some(SubsetGc {
        gc: num / (whole.lambda.sqrt() * p.lambda.sqrt()),
        participation: participation(&p.u),
        top_share: if trace > 0.0 { p.lambda / trace } else { 0.0 },
        sign_margin: sign_margin(&p.u),
    })
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
/// `method` with `resamples` jackknife groups or half-samples; `whole` is the principal pair of
/// all the samples. Seeded, so the same seed gives the same intervals. `None` for a group whose
/// interval is undefined.
pub fn gc_intervals(
    k: &dyn KernelOp,
    whole: &Principal,
    groups: &[&[usize]],
    method: IntervalMethod,
    resamples: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Option<(f64, f64)>>> {
    match method {
        IntervalMethod::Jackknife => gc_jackknife(k, whole, groups, resamples, alpha, seed),
        IntervalMethod::HalfSample => gc_bootstrap(k, whole, groups, resamples, alpha, seed),
    }
}

/// The GC of each group within each of the sets `keeps` (sorted), `[set][group]`, with the GC
/// over all samples first when `estimate`: the sets' principal pairs in one lock-step batch
/// (started from the whole set's vector), then every group's within every set in another.
fn resampled_gc(
    k: &dyn KernelOp,
    whole: &Principal,
    keeps: &[Vec<usize>],
    groups: &[&[usize]],
    estimate: bool,
) -> Result<Vec<Vec<Option<f64>>>> {
    let n = k.n();
    let all: Vec<usize> = (0..n).collect();
    let sets: Vec<Set> = keeps
        .iter()
        .map(|keep| Set {
            keep,
            start: &whole.u,
        })
        .collect();
    let pairs = principals(k, &sets)?;
    let (mut set_refs, mut pair_refs): (Vec<&[usize]>, Vec<&Principal>) = (Vec::new(), Vec::new());
    if estimate {
        set_refs.push(&all);
        pair_refs.push(whole);
    }
    set_refs.extend(keeps.iter().map(Vec::as_slice));
    pair_refs.extend(pairs.iter());
    let out = gc_within(k, &set_refs, &pair_refs, &members(n, groups))?;
    Ok(out
        .into_iter()
        .map(|row| row.into_iter().map(|s| s.map(|s| s.gc)).collect())
        .collect())
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

/// The jackknife group (0..folds) of each of `n` samples: a seeded shuffle dealt round-robin.
pub(crate) fn jackknife_folds(n: usize, folds: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(seed, b"jk"));
    order.shuffle(&mut rng);
    let mut fold = vec![0usize; n];
    for (p, &i) in order.iter().enumerate() {
        fold[i] = p % folds.max(1);
    }
    fold
}

/// Delete-a-group jackknife intervals (see [`IntervalMethod::Jackknife`]); `whole` is the
/// principal pair of all the samples. A group's replicate is undefined where its GC is (no
/// member left, a zero kernel): its interval comes from its defined replicates, their count
/// m in the formula of [`jackknife_interval`].
pub fn gc_jackknife(
    k: &dyn KernelOp,
    whole: &Principal,
    groups: &[&[usize]],
    folds: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Option<(f64, f64)>>> {
    let n = k.n();
    let folds = folds.min(n);
    if folds < 2 {
        return Ok(vec![None; groups.len()]);
    }
    let fold = jackknife_folds(n, folds, seed);
    let keeps: Vec<Vec<usize>> = (0..folds)
        .map(|f| (0..n).filter(|&i| fold[i] != f).collect())
        .collect();
    let gcs = resampled_gc(k, whole, &keeps, groups, true)?;
    Ok((0..groups.len())
        .map(|g| {
            let leave: Vec<f64> = gcs[1..].iter().filter_map(|row| row[g]).collect();
            gcs[0][g].and_then(|e| jackknife_interval(e, &leave, alpha))
        })
        .collect())
}

/// The jackknife interval of an estimate `est` from its m defined leave-one-group-out values:
/// the bias-corrected estimate ± t(1 − α/2, m − 1) · standard error, widened to hold `est`,
/// within [−1, 1]. `None` for fewer than 2 values.
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
/// `k`; `whole` the principal pair of all of them): each resample draws half of the samples
/// without replacement (half-sampling; with replacement, duplicated gradient rows bias GC down),
/// recomputes the principal direction of the drawn set, and the GC of each group's drawn
/// members; the interval is the percentile range. It describes GC at half the sample size: it
/// errs on the wide side and, as GC grows with the size of a set, sits slightly low. Seeded per
/// resample, so the same seed gives the same intervals. `None` for a group whose GC is
/// undefined in every resample.
pub fn gc_bootstrap(
    k: &dyn KernelOp,
    whole: &Principal,
    groups: &[&[usize]],
    resamples: usize,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Option<(f64, f64)>>> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let n = k.n();
    let picks: Vec<Vec<usize>> = (0..resamples)
        .map(|b| {
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
            pick
        })
        .collect();
    let gcs = resampled_gc(k, whole, &picks, groups, false)?;
    Ok((0..groups.len())
        .map(|g| {
            let mut s: Vec<f64> = gcs.iter().filter_map(|row| row[g]).collect();
            (!s.is_empty()).then(|| crate::stats::percentile_interval(&mut s, alpha))
        })
        .collect())
}

/// cos(g(X), J_i) for every sample; an error where the kernel's product or diagonal fails or
/// does not have one value per sample.
pub fn alignment(k: &dyn KernelOp, whole: &Principal) -> Result<Vec<f64>> {
    let n = k.n();
    let ku: Vec<f64> = Vec::try_from(&k.mv(&whole.u)?)?;
    let diag: Vec<f64> = Vec::try_from(&k.diag()?)?;
    if ku.len() != n || diag.len() != n {
        return Err(Error::invalid(
            "kernel",
            format!(
                "a product of {} values and a diagonal of {} for {n} samples",
                ku.len(),
                diag.len()
            ),
        ));
    }
    Ok(ku
        .iter()
        .zip(diag)
        .map(|(a, d)| {
            if d > 0.0 && whole.lambda > 0.0 {
                a / (whole.lambda.sqrt() * d.sqrt())
            } else {
                0.0
            }
        })
        .collect())
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
        let a = alignment(&Dense::new(&k), &whole).unwrap();
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
        let a = alignment(&Dense::new(&k), &whole).unwrap();
        for i in [0usize, 13, 699] {
            let ji = j.get(i as i64);
            let want = g.dot(&ji).double_value(&[]) / ji.norm().double_value(&[]);
            assert!((a[i] - want).abs() < 1e-9, "sample {i}: {} vs {want}", a[i]);
        }
    }

    /// Subsets above the threshold: a resampled set of more than half the samples (700 of 900)
    /// is solved on the masked full kernel, a subset of at most half (600 of 1,300) on a copy of
    /// its kernel where the kernel is in memory, and on the masked kernel where it is out of
    /// core; every pair equals `eigh` of the copied sub-kernel, with zeros outside.
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
            let sel = index(&keep);
            let sub = k.index_select(0, &sel).index_select(1, &sel);
            let (mut v, lambda) = dense_top(&sub).unwrap();
            if v.sum(Kind::Double).double_value(&[]) < 0.0 {
                v = -v;
            }
            let set = [Set {
                keep: &keep,
                start: &full.u,
            }];
            let dense = Dense::new(&k);
            let ooc = OutOfCore::new(&k);
            for op in [&dense as &dyn KernelOp, &ooc] {
                let got = principals(op, &set).unwrap().pop().unwrap();
                assert!((got.lambda - lambda).abs() < 1e-10 * lambda, "n {n}");
                let diff = (got.u.index_select(0, &sel) - &v)
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
    }

    /// A kernel in memory seen as one out of core (as tiles on disk or MPI ranks' rows are): no
    /// sub-kernel, and its product passes counted.
    struct OutOfCore {
        k: Dense,
        /// Product passes, vectors multiplied, the most vectors in one pass.
        counts: std::cell::Cell<(usize, usize, usize)>,
    }

    impl OutOfCore {
        fn new(k: &Tensor) -> OutOfCore {
            OutOfCore {
                k: Dense::new(k),
                counts: std::cell::Cell::new((0, 0, 0)),
            }
        }
    }

    impl KernelOp for OutOfCore {
        fn n(&self) -> usize {
            self.k.n()
        }
        fn apply(&self, x: &Tensor) -> Result<Tensor> {
            let (p, v, w) = self.counts.get();
            let k = x.size()[1] as usize;
            self.counts.set((p + 1, v + k, w.max(k)));
            self.k.apply(x)
        }
        fn diag(&self) -> Result<Tensor> {
            self.k.diag()
        }
        fn abs_cosine_sum(&self) -> Result<f64> {
            self.k.abs_cosine_sum()
        }
    }

    /// Out of core, GC, its subsets' shapes, both kinds of intervals and the alignment equal
    /// the in-memory results (eigh of copied sub-kernels) to 1e-8, from products alone; the
    /// jackknife's 44 Lanczos solves (8 leave-out sets, then 4 groups in each of them and in
    /// the whole set) take fewer product passes than there are solves, each pass multiplying at
    /// most `LOCKSTEP` vectors: one read of every tile per pass, not one per product.
    #[test]
    fn out_of_core_kernels_give_the_in_memory_gc_through_batched_products() {
        tch::manual_seed(8);
        let n = 60;
        let j = Tensor::randn([n, 12], (Kind::Double, Device::Cpu)) + 0.3;
        let k = j.matmul(&j.tr());
        let dense = Dense::new(&k);
        let ooc = OutOfCore::new(&k);
        let bins: Vec<Vec<usize>> = (0..3)
            .map(|b| (0..n as usize).filter(|i| i % 3 == b).collect())
            .collect();
        let first: Vec<usize> = (0..10).collect();
        let groups = [
            bins[0].as_slice(),
            bins[1].as_slice(),
            bins[2].as_slice(),
            first.as_slice(),
        ];
        let (wd, wo) = (
            principal_op(&dense, None).unwrap(),
            principal_op(&ooc, None).unwrap(),
        );
        assert!((wd.lambda - wo.lambda).abs() < 1e-10 * wd.lambda);
        assert!((&wd.u - &wo.u).abs().max().double_value(&[]) < 1e-8);
        let (sd, so) = (
            subsets(&dense, &wd, &groups).unwrap(),
            subsets(&ooc, &wo, &groups).unwrap(),
        );
        for (a, b) in sd.iter().zip(&so) {
            let (a, b) = (a.unwrap(), b.unwrap());
            for (x, y) in [
                (a.gc, b.gc),
                (a.participation, b.participation),
                (a.top_share, b.top_share),
                (a.sign_margin, b.sign_margin),
            ] {
                assert!(
                    (x - y).abs() < 1e-8 * x.abs().max(1.0),
                    "{a:?} against {b:?}"
                );
            }
        }
        let close = |p: &[Option<(f64, f64)>], q: &[Option<(f64, f64)>]| {
            for (a, b) in p.iter().zip(q) {
                let (a, b) = (a.unwrap(), b.unwrap());
                assert!(
                    (a.0 - b.0).abs() < 1e-8 && (a.1 - b.1).abs() < 1e-8,
                    "{a:?} {b:?}"
                );
            }
        };
        let before = ooc.counts.get();
        let jo = gc_jackknife(&ooc, &wo, &groups, 8, 0.05, 3).unwrap();
        let after = ooc.counts.get();
        close(
            &gc_jackknife(&dense, &wd, &groups, 8, 0.05, 3).unwrap(),
            &jo,
        );
        let solves = 8 + 9 * groups.len();
        let passes = after.0 - before.0;
        assert!(passes < solves, "{passes} passes for {solves} solves");
        assert!(after.2 <= LOCKSTEP && after.2 > 1, "{after:?}");
        close(
            &gc_bootstrap(&dense, &wd, &groups, 6, 0.05, 3).unwrap(),
            &gc_bootstrap(&ooc, &wo, &groups, 6, 0.05, 3).unwrap(),
        );
        let (ad, ao) = (
            alignment(&dense, &wd).unwrap(),
            alignment(&ooc, &wo).unwrap(),
        );
        assert!(ad.iter().zip(&ao).all(|(a, b)| (a - b).abs() < 1e-8));
    }

    /// A top eigenvalue with a near-twin (spectrum 1, 0.998, 0.996, … on a random basis, 600
    /// samples) out of core: Lanczos needs more products than one basis of 64 vectors holds,
    /// restarts thick instead of densifying, and gives eigh's pair (residual below 1e-9).
    #[test]
    fn near_twin_eigenvalues_restart_instead_of_densifying() {
        tch::manual_seed(9);
        let n = 600;
        let (q, _) = Tensor::linalg_qr(
            &Tensor::randn([n, n], (Kind::Double, Device::Cpu)),
            "reduced",
        );
        let vals: Vec<f64> = (0..n).map(|i| (1.0 - 0.002 * i as f64).max(0.0)).collect();
        let k = (&q * Tensor::from_slice(&vals).unsqueeze(0)).mm(&q.tr());
        let ooc = OutOfCore::new(&k);
        let p = principal_op(&ooc, None).unwrap();
        let (vectors, passes) = (ooc.counts.get().1, ooc.counts.get().0);
        assert!(vectors > 64, "{vectors} products: no restart needed");
        assert_eq!(vectors, passes);
        assert!((p.lambda - 1.0).abs() < 1e-10, "{}", p.lambda);
        let residual = (k.mv(&p.u) - &p.u * p.lambda).norm().double_value(&[]);
        assert!(residual < 1e-9, "{residual}");
        let cos = p.u.dot(&q.select(1, 0)).double_value(&[]).abs();
        assert!(1.0 - cos < 1e-10, "1 - cos = {}", 1.0 - cos);
    }

    /// Two samples of the cosine kernel with a negative cosine: the eigenvector is
    /// (1, −1)/√2, a tie of Σ u ≥ 0, which `eigh` (in memory) and Lanczos (out of core) settle
    /// alike, first entry positive, so the subset's GC is the same number by either route.
    #[test]
    fn sign_ties_are_settled_alike_by_every_solver() {
        let k =
            Tensor::from_slice(&[1.0f64, -0.4, 0.3, -0.4, 1.0, 0.5, 0.3, 0.5, 1.0]).view([3, 3]);
        let (dense, ooc) = (Dense::new(&k), OutOfCore::new(&k));
        let pair = [0usize, 1];
        let mut gcs = Vec::new();
        for op in [&dense as &dyn KernelOp, &ooc] {
            let whole = principal_op(op, None).unwrap();
            let set = [Set {
                keep: &pair,
                start: &whole.u,
            }];
            let p = principals(op, &set).unwrap().pop().unwrap();
            let u: Vec<f64> = Vec::try_from(&p.u).unwrap();
            let h = std::f64::consts::FRAC_1_SQRT_2;
            assert!(
                (u[0] - h).abs() < 1e-12 && (u[1] + h).abs() < 1e-12,
                "{u:?}"
            );
            gcs.push(gc(op, &whole, &pair).unwrap().unwrap());
        }
        assert!((gcs[0] - gcs[1]).abs() < 1e-12, "{gcs:?}");
    }

    /// A kernel whose products come back one value short: alignment is an error, not a vector
    /// of the wrong length.
    #[test]
    fn alignment_refuses_a_product_of_the_wrong_length() {
        struct Short(Dense);
        impl KernelOp for Short {
            fn n(&self) -> usize {
                self.0.n()
            }
            fn apply(&self, x: &Tensor) -> Result<Tensor> {
                Ok(self.0.apply(x)?.narrow(0, 0, self.n() as i64 - 1))
            }
            fn sub(&self, idx: &[usize]) -> Result<Option<Tensor>> {
                self.0.sub(idx)
            }
            fn diag(&self) -> Result<Tensor> {
                self.0.diag()
            }
            fn abs_cosine_sum(&self) -> Result<f64> {
                self.0.abs_cosine_sum()
            }
        }
        tch::manual_seed(10);
        let j = Tensor::randn([8, 5], (Kind::Double, Device::Cpu)) + 0.5;
        let k = j.matmul(&j.tr());
        let whole = principal(&k).unwrap();
        let e = alignment(&Short(Dense::new(&k)), &whole).unwrap_err();
        assert!(e.to_string().contains("7 values"), "{e}");
        assert_eq!(alignment(&Dense::new(&k), &whole).unwrap().len(), 8);
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
        let whole = principal(&k).unwrap();
        let iv = gc_bootstrap(&Dense::new(&k), &whole, &groups, 100, 0.05, 3).unwrap();
        let (a_lo, a_hi) = iv[0].unwrap();
        let (b_lo, b_hi) = iv[1].unwrap();
        assert!(
            0.95 < a_lo && a_lo <= a_hi && a_hi <= 1.0 + 1e-9,
            "{:?}",
            iv[0]
        );
        assert!(b_lo <= b_hi && b_hi < a_lo, "{:?} vs {:?}", iv[1], iv[0]);
        // Half-samples have no duplicates: each interval holds its group's estimate.
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
            gc_bootstrap(&Dense::new(&k), &whole, &groups, 100, 0.05, 3).unwrap()
        );
        assert_ne!(
            iv[1],
            gc_bootstrap(&Dense::new(&k), &whole, &groups, 100, 0.05, 4).unwrap()[1]
        );
    }

    /// The jackknife interval from an independent computation: every leave-one-group-out GC
    /// from explicit primary directions (the d × d side, `coverage::explicit_gc`), the interval
    /// from the pseudo-values p_f = m·est − (m − 1)·GC_(−f) (centre their mean, standard error
    /// their standard deviation / √m), widened to the estimate; equal to 1e-9 in memory and out
    /// of core. A group all of whose members fall in one jackknife group has an undefined
    /// replicate there: its interval is the formula over the 9 defined ones, m = 9 (the factor
    /// of all 10 gives another interval). Deterministic for a seed; narrow for a consistent
    /// group, wide for a scattered one.
    #[test]
    fn gc_jackknife_equals_an_explicit_computation() {
        use crate::ntk::coverage::explicit_gc;
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
        let (folds, seed) = (10, 1);
        let fold = jackknife_folds(40, folds, seed);
        let a: Vec<usize> = (0..30).collect();
        let b: Vec<usize> = (30..40).collect();
        let c: Vec<usize> = (0..40).filter(|&i| fold[i] == fold[0]).collect();
        let groups = [a.as_slice(), b.as_slice(), c.as_slice()];
        let whole = principal(&k).unwrap();
        let iv = gc_jackknife(&Dense::new(&k), &whole, &groups, folds, 0.05, seed).unwrap();
        let ooc = OutOfCore::new(&k);
        let wo = principal_op(&ooc, None).unwrap();
        let io = gc_jackknife(&ooc, &wo, &groups, folds, 0.05, seed).unwrap();
        let t9 = crate::stats::t_quantile(0.975, 9.0);
        // stats::t_quantile is an approximation (1.4e-5 off here); 9 degrees of freedom, not
        // 8 (2.306) or 10 (2.228).
        assert!((t9 - 2.262_157_162_8).abs() < 1e-4, "{t9}");
        let oracle = |g: &[usize], m_used: Option<usize>| {
            let est = explicit_gc(&j, g).unwrap();
            let mut leave = Vec::new();
            for f in 0..folds {
                let kept: Vec<usize> = (0..40).filter(|&i| fold[i] != f).collect();
                let pos: Vec<usize> = (0..kept.len()).filter(|&p| g.contains(&kept[p])).collect();
                if !pos.is_empty() {
                    let jk = j.index_select(0, &index(&kept));
                    leave.push(explicit_gc(&jk, &pos).unwrap());
                }
            }
            let m = m_used.unwrap_or(leave.len()) as f64;
            let pseudo: Vec<f64> = leave.iter().map(|l| m * est - (m - 1.0) * l).collect();
            let centre = pseudo.iter().sum::<f64>() / pseudo.len() as f64;
            let ss: f64 = pseudo.iter().map(|p| (p - centre).powi(2)).sum();
            let se = (ss / (m - 1.0) / m).sqrt();
            let t = crate::stats::t_quantile(0.975, m - 1.0);
            let lo = (centre - t * se).min(est).max(-1.0);
            let hi = (centre + t * se).max(est).min(1.0);
            (leave.len(), (lo, hi))
        };
        for (g, (got, out)) in groups.iter().zip(iv.iter().zip(&io)) {
            let (defined, want) = oracle(g, None);
            for (lo, hi) in [got.unwrap(), out.unwrap()] {
                let off = (lo - want.0).abs().max((hi - want.1).abs());
                assert!(off < 1e-9, "{lo} {hi} against {want:?}");
            }
            assert_eq!(defined, if g.len() == c.len() { 9 } else { 10 });
        }
        let (_, all_ten) = oracle(&c, Some(10));
        let got = iv[2].unwrap();
        assert!((got.0 - all_ten.0).abs().max((got.1 - all_ten.1).abs()) > 1e-6);
        let (w0, w1) = (iv[0].unwrap(), iv[1].unwrap());
        assert!(w0.1 - w0.0 < 0.05 && w1.1 - w1.0 > 0.1, "{iv:?}");
        let again = gc_jackknife(&Dense::new(&k), &whole, &groups, folds, 0.05, seed).unwrap();
        assert_eq!(iv, again);
        let other = gc_jackknife(&Dense::new(&k), &whole, &groups, folds, 0.05, 2).unwrap();
        assert_ne!(iv, other);
    }

    /// The interval formula on given values: bias-corrected centre ± t · se, widened to the
    /// estimate; none from fewer than 2 values; within [−1, 1] for an estimate a rounding error
    /// above 1.
    #[test]
    fn jackknife_interval_formula() {
        let (lo, hi) = jackknife_interval(0.5, &[0.4, 0.42, 0.38, 0.4], 0.05).unwrap();
        // mean 0.4, centre 0.5 + 3 · 0.1 = 0.8, se = √(3/4 · 0.0008) ≈ 0.0245, t(3) ≈ 3.18
        assert!((lo - 0.5).abs() < 1e-12, "{lo}");
        assert!(
            (hi - (0.8 + 3.182446305284263 * (0.0006f64).sqrt())).abs() < 2e-3,
            "{hi}"
        );
        assert_eq!(jackknife_interval(0.5, &[0.4], 0.05), None);
        let (lo, hi) = jackknife_interval(1.0 + 1e-12, &[1.0, 1.0, 1.0], 0.05).unwrap();
        assert!(lo <= hi && hi <= 1.0, "{lo} {hi}");
    }
}

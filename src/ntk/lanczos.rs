//! The top eigenpair of a symmetric positive semi-definite matrix by the Lanczos iteration with
//! full reorthogonalisation, from matrix-vector products alone.
//!
//! Written here because libtorch has no iterative symmetric eigensolver in its C++ API (PyTorch's
//! `lobpcg` is Python) and the Rust eigensolver crates work on their own matrix types, not on a
//! kernel that already lives in a libtorch tensor (possibly on a GPU). Each step costs one product
//! (n² for a dense kernel) against `eigh`'s ~ 4n³/3, so at n = 16,384 one principal pair takes
//! seconds instead of minutes, which makes the GC intervals (one pair per jackknife group or
//! half-sample) affordable.
//!
//! Stopping rule: the Ritz pair (θ, y) of the tridiagonal matrix after j steps has residual
//! ‖A y − θ y‖ = β_j |s_j| (s the Ritz vector's last coordinate); the iteration stops when that is
//! at most `tol · θ`. The returned residual is recomputed with one more product, not estimated.

use rand::{Rng, SeedableRng};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Settings of the iteration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LanczosOptions {
    /// Relative residual at which the top Ritz pair is accepted.
    pub tol: f64,
    /// The most Lanczos steps (at most n are taken).
    pub max_iter: usize,
}

impl Default for LanczosOptions {
    fn default() -> Self {
        LanczosOptions {
            tol: 1e-11,
            max_iter: 300,
        }
    }
}

/// The top eigenpair found, with what it cost.
#[derive(Debug)]
pub struct TopPair {
    /// The largest eigenvalue.
    pub lambda: f64,
    /// Its unit eigenvector (n,), float64, on the matrix's device; sign not fixed.
    pub u: Tensor,
    /// Lanczos steps taken (matrix-vector products, not counting the final residual check).
    pub steps: usize,
    /// ‖A u − λ u‖ / λ, recomputed (0 when λ is 0).
    pub residual: f64,
    /// Whether the stopping rule was met (otherwise `max_iter` ran out).
    pub converged: bool,
}

/// The top eigenpair of the symmetric matrix `a` (n × n): see the module notes. `start` is a
/// warm start (e.g. the principal vector of a slightly larger set); without one, or when it is
/// zero, the start is a fixed pseudo-random positive vector, so the result is deterministic.
pub fn top_eigenpair(a: &Tensor, start: Option<&Tensor>, opts: LanczosOptions) -> Result<TopPair> {
    let n = a.size()[0];
    if n == 0 || a.size() != [n, n] {
        return Err(Error::invalid(
            "kernel",
            format!("expected a square matrix, got {:?}", a.size()),
        ));
    }
    let a = a.to_kind(Kind::Double);
    top_eigenpair_op(n, a.device(), &|x: &Tensor| a.mv(x), start, opts)
}

/// [`top_eigenpair`] of the symmetric operator `op` on float64 vectors of length `n` on
/// `device`: a kernel never copied, or one restricted to a subset of samples (an operator that
/// zeroes the other entries, with a start zero there, keeps the iteration in that subspace).
pub fn top_eigenpair_op(
    n: i64,
    device: tch::Device,
    op: &dyn Fn(&Tensor) -> Tensor,
    start: Option<&Tensor>,
    opts: LanczosOptions,
) -> Result<TopPair> {
    let opts_dev = (Kind::Double, device);
    let mut q = match start {
        Some(s) if s.size() == [n] && s.norm().double_value(&[]) > 0.0 => {
            s.to_kind(Kind::Double).to_device(device)
        }
        _ => default_start(n as usize).to_device(device),
    };
    q = &q / q.norm();
    let m = opts.max_iter.clamp(1, n as usize);
    let basis = Tensor::zeros([m as i64, n], opts_dev);
    let (mut alpha, mut beta): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    let mut ritz: Option<Vec<f64>> = None;
    let mut converged = false;
    for j in 0..m {
        basis.get(j as i64).copy_(&q);
        let mut w = op(&q);
        let aj = w.dot(&q).double_value(&[]);
        alpha.push(aj);
        // Full reorthogonalisation, twice ("twice is enough"), against every basis vector.
        let qs = basis.narrow(0, 0, j as i64 + 1);
        for _ in 0..2 {
            w = &w - qs.tr().mv(&qs.mv(&w));
        }
        let bj = w.norm().double_value(&[]);
        let (theta, s) = top_of_tridiagonal(&alpha, &beta)?;
        let estimate = bj * s.last().copied().unwrap_or(0.0).abs();
        ritz = Some(s);
        // An invariant subspace (β ≈ 0) holds the pair exactly.
        if estimate <= opts.tol * theta.abs().max(f64::MIN_POSITIVE) || bj <= 1e-300 {
            converged = true;
            break;
        }
        if j + 1 == m {
            break;
        }
        beta.push(bj);
        q = w / bj;
    }
    let s = ritz.ok_or_else(|| Error::invalid("kernel", "no Lanczos step was taken"))?;
    let steps = s.len();
    let coef = Tensor::from_slice(&s).to_device(device);
    let mut u = basis.narrow(0, 0, steps as i64).tr().mv(&coef);
    u = &u / u.norm();
    let au = op(&u);
    let lambda = au.dot(&u).double_value(&[]);
    let residual = if lambda.abs() > 0.0 {
        (au - &u * lambda).norm().double_value(&[]) / lambda.abs()
    } else {
        0.0
    };
    Ok(TopPair {
        lambda,
        u,
        steps,
        residual,
        converged,
    })
}

/// A deterministic start with positive entries of varied size: not orthogonal to the principal
/// vector of a non-negative kernel (Perron), and generic otherwise.
fn default_start(n: usize) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x01a2_c705);
    let v: Vec<f64> = (0..n).map(|_| 0.5 + rng.random::<f64>()).collect();
    Tensor::from_slice(&v)
}

/// The largest eigenvalue of the symmetric tridiagonal matrix with diagonal `alpha` and
/// off-diagonal `beta` (one shorter), and its unit eigenvector.
fn top_of_tridiagonal(alpha: &[f64], beta: &[f64]) -> Result<(f64, Vec<f64>)> {
    let j = alpha.len();
    let mut t = vec![0.0; j * j];
    for i in 0..j {
        t[i * j + i] = alpha[i];
        if i + 1 < j {
            t[i * j + i + 1] = beta[i];
            t[(i + 1) * j + i] = beta[i];
        }
    }
    let t = Tensor::from_slice(&t).reshape([j as i64, j as i64]);
    let (vals, vecs) = t.f_linalg_eigh("L")?;
    let theta = vals.double_value(&[j as i64 - 1]);
    let s: Vec<f64> = Vec::try_from(vecs.select(1, j as i64 - 1))?;
    Ok((theta, s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// A kernel of 400 samples: the Lanczos pair equals `eigh`'s to 1e-9 (value, relative) and
    /// 1e-7 (vector), with far fewer than n products; a warm start from the answer takes one step.
    #[test]
    fn matches_eigh_on_a_gram_matrix() {
        tch::manual_seed(3);
        let j = Tensor::randn([400, 60], (Kind::Double, Device::Cpu)) + 0.2;
        let k = j.matmul(&j.tr());
        let (vals, vecs) = k.linalg_eigh("L");
        let want = vals.double_value(&[399]);
        let v = vecs.select(1, 399);
        let got = top_eigenpair(&k, None, LanczosOptions::default()).unwrap();
        assert!(got.converged && got.steps < 100, "{} steps", got.steps);
        assert!(
            (got.lambda - want).abs() <= 1e-9 * want,
            "{} vs {want}",
            got.lambda
        );
        let cos = got.u.dot(&v).double_value(&[]).abs();
        assert!(1.0 - cos < 1e-12, "1 - cos = {}", 1.0 - cos);
        assert!(got.residual < 1e-9, "residual {}", got.residual);
        let warm = top_eigenpair(&k, Some(&v), LanczosOptions::default()).unwrap();
        assert!(warm.steps <= 2, "{} steps from the answer", warm.steps);
        // A matrix of rank 1 is an invariant subspace after one step.
        let x = Tensor::randn([50], (Kind::Double, Device::Cpu));
        let r1 = x.outer(&x);
        let p = top_eigenpair(&r1, None, LanczosOptions::default()).unwrap();
        let want = x.dot(&x).double_value(&[]);
        assert!((p.lambda - want).abs() < 1e-10 * want && p.steps <= 2);
    }

    /// Too few steps: the pair comes back unconverged, with its true residual, not silently.
    #[test]
    fn reports_when_it_does_not_converge() {
        tch::manual_seed(4);
        let j = Tensor::randn([300, 300], (Kind::Double, Device::Cpu));
        let k = j.matmul(&j.tr());
        let opts = LanczosOptions {
            tol: 1e-14,
            max_iter: 3,
        };
        let p = top_eigenpair(&k, None, opts).unwrap();
        assert!(!p.converged && p.steps == 3 && p.residual > 1e-6, "{p:?}");
        assert!(top_eigenpair(
            &Tensor::zeros([2, 3], (Kind::Double, Device::Cpu)),
            None,
            opts
        )
        .is_err());
    }
}

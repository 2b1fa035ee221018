//! The top eigenpair of a symmetric positive semi-definite matrix by the Lanczos iteration with
//! full reorthogonalisation and thick restarts, from matrix-vector products alone.
//!
//! Written here because libtorch has no iterative symmetric eigensolver in its C++ API (PyTorch's
//! `lobpcg` is Python) and the Rust eigensolver crates work on their own matrix types, not on a
//! kernel that already lives in a libtorch tensor (possibly on a GPU) or in tiles on disk. Each
//! step costs one product (n² for a dense kernel) against `eigh`'s ~ 4n³/3, so at n = 16,384 one
//! principal pair takes seconds instead of minutes, which makes the GC intervals (one pair per
//! jackknife group or half-sample) affordable.
//!
//! The iteration is driven from outside ([`Solver`]: the vector to multiply, then its product),
//! so that several independent solves run in lock-step ([`top_eigenpairs`]): each round
//! multiplies every pending vector in one product with an n × k block, and a kernel read from
//! disk is read once per round instead of once per product.
//!
//! Stopping rule: the top Ritz pair (θ, y) of the projected matrix H = Vᵀ A V after j steps has
//! residual ‖A y − θ y‖ = β_j |s_j| (s the Ritz vector's last coordinate in the basis V, β_j the
//! norm of the next basis direction); the iteration stops when that is at most `tol · θ`. When
//! the basis reaches `basis` vectors without that, it restarts thick: it keeps the top quarter of
//! the Ritz vectors (with their Ritz values as H) and the next direction, and goes on, up to
//! `max_iter` products in all; a matrix is never formed. The returned residual is recomputed
//! with one more product, not estimated.

use rand::{Rng, SeedableRng};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// Settings of the iteration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LanczosOptions {
    /// Relative residual at which the top Ritz pair is accepted.
    pub tol: f64,
    /// The most products (Lanczos steps, over all restarts).
    pub max_iter: usize,
    /// The most basis vectors held (at most n): reaching it restarts the iteration thick.
    pub basis: usize,
}

impl Default for LanczosOptions {
    fn default() -> Self {
        LanczosOptions {
            tol: 1e-11,
            max_iter: 2000,
            basis: 64,
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
    /// Thick restarts taken.
    pub restarts: usize,
    /// ‖A u − λ u‖ / λ, recomputed (0 when λ is 0).
    pub residual: f64,
    /// Whether the stopping rule was met (otherwise `max_iter` ran out).
    pub converged: bool,
}

/// Where a [`Solver`] stands.
enum Stage {
    /// Building the basis: the pending vector is its last.
    Iterating,
    /// The pending vector is the Ritz vector, multiplied once more for its true residual.
    Checking { converged: bool },
    /// Finished.
    Done(TopPair),
}

/// One Lanczos iteration driven from outside: [`Solver::want`] is the vector to multiply next,
/// [`Solver::feed`] takes its product, until [`Solver::result`] is there.
pub struct Solver {
    opts: LanczosOptions,
    /// The orthonormal basis, one vector a row (k × n).
    basis: Tensor,
    /// H = Vᵀ A V (k × k, row-major); its last row and column are filled by the next product.
    h: Vec<Vec<f64>>,
    /// The vector whose product is awaited.
    pending: Tensor,
    steps: usize,
    restarts: usize,
    stage: Stage,
}

impl Solver {
    /// An iteration on vectors of length `n` from `start` (zero or absent: a fixed positive
    /// pseudo-random vector, times `mask` where given, so a restricted operator stays within its
    /// samples).
    pub fn new(
        n: i64,
        device: Device,
        start: Option<&Tensor>,
        mask: Option<&Tensor>,
        opts: LanczosOptions,
    ) -> Result<Solver> {
        let given = start
            .filter(|s| s.size() == [n])
            .map(|s| s.to_kind(Kind::Double).to_device(device))
            .filter(|s| s.norm().double_value(&[]) > 0.0);
        let mut q = match (given, mask) {
            (Some(q), _) => q,
            (None, Some(m)) => default_start(n as usize).to_device(device) * m,
            (None, None) => default_start(n as usize).to_device(device),
        };
        let norm = q.norm().double_value(&[]);
        if n == 0 || norm <= 0.0 || !norm.is_finite() {
            return Err(Error::invalid(
                "kernel",
                "the Lanczos iteration needs a non-empty set of samples and a finite start",
            ));
        }
        q /= norm;
        Ok(Solver {
            opts: LanczosOptions {
                basis: opts.basis.clamp(2, (n as usize).max(2)),
                ..opts
            },
            basis: q.unsqueeze(0),
            h: vec![vec![0.0]],
            pending: q,
            steps: 0,
            restarts: 0,
            stage: Stage::Iterating,
        })
    }

    /// The vector to multiply next; `None` once the pair is found.
    pub fn want(&self) -> Option<&Tensor> {
        match self.stage {
            Stage::Done(_) => None,
            _ => Some(&self.pending),
        }
    }

    /// The product A · [`Solver::want`].
    pub fn feed(&mut self, av: &Tensor) -> Result<()> {
        match self.stage {
            Stage::Iterating => self.extend(av),
            Stage::Checking { converged } => {
                let u = &self.pending;
                let lambda = av.dot(u).double_value(&[]);
                let residual = if lambda.abs() > 0.0 {
                    (av - u * lambda).norm().double_value(&[]) / lambda.abs()
                } else {
                    0.0
                };
                self.stage = Stage::Done(TopPair {
                    lambda,
                    u: u.shallow_clone(),
                    steps: self.steps,
                    restarts: self.restarts,
                    residual,
                    converged,
                });
                Ok(())
            }
            Stage::Done(_) => Err(Error::invalid("kernel", "a finished Lanczos solve was fed")),
        }
    }

    /// The pair, once found.
    pub fn result(self) -> Option<TopPair> {
        match self.stage {
            Stage::Done(p) => Some(p),
            _ => None,
        }
    }

    /// One step: orthogonalise the product against the basis (twice: "twice is enough"), fill
    /// H's last column, then stop, restart or grow the basis.
    fn extend(&mut self, av: &Tensor) -> Result<()> {
        let k = self.h.len();
        let v = &self.basis;
        let mut w = av.to_kind(Kind::Double);
        let mut coef = v.mv(&w);
        w = &w - v.tr().mv(&coef);
        let again = v.mv(&w);
        w = &w - v.tr().mv(&again);
        coef += again;
        let col: Vec<f64> = Vec::try_from(&coef)?;
        for (i, c) in col.iter().enumerate() {
            self.h[i][k - 1] = *c;
            self.h[k - 1][i] = *c;
        }
        self.steps += 1;
        let beta = w.norm().double_value(&[]);
        let (vals, vecs) = eigh_of(&self.h)?;
        let theta = vals[k - 1];
        let s = vecs.select(1, k as i64 - 1);
        let estimate = beta * s.double_value(&[k as i64 - 1]).abs();
        let converged = estimate <= self.opts.tol * theta.abs().max(f64::MIN_POSITIVE)
            || beta <= f64::MIN_POSITIVE;
        if converged || self.steps >= self.opts.max_iter {
            let u = v.tr().mv(&s.to_device(v.device()));
            self.pending = &u / u.norm();
            self.stage = Stage::Checking { converged };
            return Ok(());
        }
        let next = w / beta;
        if k == self.opts.basis {
            self.restart(&vals, &vecs, next);
        } else {
            self.basis = Tensor::cat(&[&self.basis, &next.unsqueeze(0)], 0);
            for row in &mut self.h {
                row.push(0.0);
            }
            self.h.push(vec![0.0; k + 1]);
            self.pending = next;
        }
        Ok(())
    }

    /// A thick restart: the top quarter of the Ritz vectors, H their Ritz values, and `next`.
    fn restart(&mut self, vals: &[f64], vecs: &Tensor, next: Tensor) {
        let k = vals.len();
        let keep = (k / 4).max(1);
        let top = vecs.narrow(1, (k - keep) as i64, keep as i64);
        let ritz = top.tr().to_device(self.basis.device()).mm(&self.basis);
        self.basis = Tensor::cat(&[&ritz, &next.unsqueeze(0)], 0);
        self.h = vec![vec![0.0; keep + 1]; keep + 1];
        for (i, row) in self.h.iter_mut().take(keep).enumerate() {
            row[i] = vals[k - keep + i];
        }
        self.pending = next;
        self.restarts += 1;
    }
}

/// Eigenvalues (ascending) and eigenvectors (columns) of the small symmetric matrix `h`.
fn eigh_of(h: &[Vec<f64>]) -> Result<(Vec<f64>, Tensor)> {
    let k = h.len() as i64;
    let flat: Vec<f64> = h.iter().flatten().copied().collect();
    let (vals, vecs) = Tensor::from_slice(&flat)
        .reshape([k, k])
        .f_linalg_eigh("L")?;
    Ok((Vec::try_from(&vals)?, vecs))
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
    let mut s = Solver::new(n, a.device(), start, None, opts)?;
    while let Some(x) = s.want() {
        let y = a.mv(x);
        s.feed(&y)?;
    }
    s.result()
        .ok_or_else(|| Error::invalid("kernel", "the Lanczos iteration ended without a pair"))
}

/// One of the problems [`top_eigenpairs`] solves: the operator restricted to the samples `keep`
/// (x ↦ m ⊙ A (m ⊙ x), m the indicator of `keep`; `None`: all samples), from `start`.
pub struct Problem<'a> {
    /// The samples (indices below n); `None` for all.
    pub keep: Option<&'a [usize]>,
    /// A warm start (length n), restricted to `keep`; `None` or zero there: the fixed start.
    pub start: Option<&'a Tensor>,
}

/// A running solve of [`top_eigenpairs`]: its problem's index, solver and mask.
type Running = (usize, Solver, Option<Tensor>);

/// The top eigenpairs of several restrictions of one symmetric operator on float64 vectors of
/// length `n` (CPU), solved in lock-step: each round stacks the pending vectors of up to `width`
/// running solves into an n × k block and calls `apply` (A X) once; a finished solve makes room
/// for the next problem. `done(i, pair)` receives problem i's pair when it is found, so that the
/// caller need not keep every eigenvector. Memory: `width` bases of at most `opts.basis`
/// vectors of length n.
pub fn top_eigenpairs(
    n: i64,
    apply: &dyn Fn(&Tensor) -> Result<Tensor>,
    problems: &[Problem],
    opts: LanczosOptions,
    width: usize,
    done: &mut dyn FnMut(usize, TopPair) -> Result<()>,
) -> Result<()> {
    let mut running: Vec<Running> = Vec::new();
    let mut next = 0;
    loop {
        while running.len() < width.max(1) && next < problems.len() {
            let p = &problems[next];
            let mask = p.keep.map(|keep| {
                Tensor::zeros([n], (Kind::Double, Device::Cpu)).index_fill(
                    0,
                    &super::op::index(keep),
                    1.0,
                )
            });
            let start = match (p.start, &mask) {
                (Some(s), Some(m)) => Some(s * m),
                (Some(s), None) => Some(s.shallow_clone()),
                _ => None,
            };
            let s = Solver::new(n, Device::Cpu, start.as_ref(), mask.as_ref(), opts)?;
            running.push((next, s, mask));
            next += 1;
        }
        if running.is_empty() {
            return Ok(());
        }
        let xs: Vec<&Tensor> = running.iter().filter_map(|(_, s, _)| s.want()).collect();
        let y = apply(&Tensor::stack(&xs, 1))?;
        for (j, (_, s, mask)) in running.iter_mut().enumerate() {
            let col = y.select(1, j as i64);
            s.feed(
                &mask
                    .as_ref()
                    .map_or_else(|| col.shallow_clone(), |m| &col * m),
            )?;
        }
        let (finished, rest): (Vec<Running>, Vec<Running>) = running
            .into_iter()
            .partition(|(_, s, _)| s.want().is_none());
        running = rest;
        for (i, s, _) in finished {
            if let Some(pair) = s.result() {
                done(i, pair)?;
            }
        }
    }
}

/// A deterministic start with positive entries of varied size: not orthogonal to the principal
/// vector of a non-negative kernel (Perron), and generic otherwise.
fn default_start(n: usize) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x01a2_c705);
    let v: Vec<f64> = (0..n).map(|_| 0.5 + rng.random::<f64>()).collect();
    Tensor::from_slice(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A spectrum with a small relative gap at the top (eigenvalues 1, 0.99, 0.98, …, on a
    /// random basis): with a basis of 8 vectors the iteration restarts thick many times and still
    /// meets the stopping rule, giving eigh's pair, with no matrix formed; with too few products
    /// it comes back unconverged, with its true residual, not silently.
    #[test]
    fn thick_restarts_converge_where_the_basis_is_too_small() {
        tch::manual_seed(4);
        let n = 300;
        let (q, _) = Tensor::linalg_qr(
            &Tensor::randn([n, n], (Kind::Double, Device::Cpu)),
            "reduced",
        );
        let vals = Tensor::from_slice(&(0..n).map(|i| 1.0 - 0.01 * i as f64).collect::<Vec<_>>())
            .clamp_min(0.0);
        let k = (&q * vals.unsqueeze(0)).mm(&q.tr());
        let opts = LanczosOptions {
            basis: 8,
            ..LanczosOptions::default()
        };
        let p = top_eigenpair(&k, None, opts).unwrap();
        assert!(p.converged && p.restarts >= 3, "{p:?}");
        assert!((p.lambda - 1.0).abs() < 1e-10, "{}", p.lambda);
        let cos = p.u.dot(&q.select(1, 0)).double_value(&[]).abs();
        assert!(1.0 - cos < 1e-8, "1 - cos = {}", 1.0 - cos);
        assert!(p.residual < 1e-9, "{p:?}");
        let few = LanczosOptions {
            tol: 1e-14,
            max_iter: 3,
            basis: 64,
        };
        let p = top_eigenpair(&k, None, few).unwrap();
        assert!(!p.converged && p.steps == 3 && p.residual > 1e-6, "{p:?}");
        assert!(top_eigenpair(
            &Tensor::zeros([2, 3], (Kind::Double, Device::Cpu)),
            None,
            few
        )
        .is_err());
    }

    /// Several restricted problems in lock-step (three subsets and the whole set of a
    /// 120-sample Gram matrix, width 2): each pair equals `eigh` of its sub-matrix, zero outside
    /// the subset, and the products come in blocks of up to 2 vectors, fewer calls than products.
    #[test]
    fn lock_step_solves_equal_eigh_of_each_sub_matrix() {
        tch::manual_seed(5);
        let j = Tensor::randn([120, 20], (Kind::Double, Device::Cpu)) + 0.3;
        let k = j.matmul(&j.tr());
        let sets: Vec<Vec<usize>> = vec![
            (0..120).filter(|i| i % 3 == 0).collect(),
            (0..120).filter(|i| i % 5 != 1).collect(),
            vec![7, 8, 90],
        ];
        let mut problems: Vec<Problem> = sets
            .iter()
            .map(|s| Problem {
                keep: Some(s.as_slice()),
                start: None,
            })
            .collect();
        problems.push(Problem {
            keep: None,
            start: None,
        });
        let calls = std::cell::Cell::new((0usize, 0usize, 0i64));
        let apply = |x: &Tensor| {
            let (c, cols, widest) = calls.get();
            calls.set((c + 1, cols + x.size()[1] as usize, widest.max(x.size()[1])));
            Ok(k.mm(x))
        };
        let mut got: Vec<Option<TopPair>> = (0..4).map(|_| None).collect();
        let opts = LanczosOptions::default();
        top_eigenpairs(120, &apply, &problems, opts, 2, &mut |i, p| {
            got[i] = Some(p);
            Ok(())
        })
        .unwrap();
        let all: Vec<usize> = (0..120).collect();
        for (i, set) in sets.iter().chain([&all]).enumerate() {
            let p = got[i].as_ref().unwrap();
            let sel = crate::ntk::op::index(set);
            let (vals, vecs) = k
                .index_select(0, &sel)
                .index_select(1, &sel)
                .linalg_eigh("L");
            let m = set.len() as i64;
            assert!((p.lambda - vals.double_value(&[m - 1])).abs() < 1e-9 * p.lambda);
            let cos = p.u.index_select(0, &sel).dot(&vecs.select(1, m - 1));
            assert!(1.0 - cos.double_value(&[]).abs() < 1e-10, "set {i}");
            let norm_inside = p.u.index_select(0, &sel).norm().double_value(&[]);
            assert!(
                (norm_inside - 1.0).abs() < 1e-12,
                "set {i}: entries outside"
            );
        }
        let (c, cols, widest) = calls.get();
        assert_eq!(widest, 2);
        assert!(c < cols, "{c} calls for {cols} products");
    }
}

//! DBSCAN (Ester et al., 1996) over rows of a dense f32 matrix, Euclidean distance.
//!
//! Neighbourhoods and k-distances come from blocked distance matrices (‖a‖² + ‖b‖² − 2 a·b
//! by libtorch GEMMs on centred points, 128 MB of float32 per block), so memory stays bounded
//! and the work runs at matrix-multiply speed; pairs within float32 rounding of a radius are
//! decided by the exact float64 distance, so the result is that of the brute-force definition.
//! A ball tree (petal-neighbors) was tried first: on 32-dimensional embeddings its queries
//! visit most points (10,000 points: 2.3 s, 100,000: 582 s, against 0.67 s and 82 s for the
//! clustering here, or 1.35 s and 143 s with the k-distance knee for eps; `benches/scale.rs`).
//! Clusters are the components of core points (union-find), which gives the classic traversal's
//! labels without storing neighbour lists. The max-clusters eps rule clusters at all 19 of its
//! radii in one set of sweeps at the largest ([`dbscan_many`]): 2.0 s at 10,000 points against
//! 11.1 s for 19 separate runs.
//!
//! Labels: `Some(cluster)` for core and border points, `None` for noise. Clusters are numbered in
//! order of their first core point, so the result is deterministic. A border point reachable from
//! several clusters joins the first that reaches it (the classic, order-dependent rule).

use ndarray::ArrayView2;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Checked parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DbscanParams {
    /// Neighbourhood radius.
    pub eps: f64,
    /// Points (the point itself included) a neighbourhood needs for a core point.
    pub min_pts: usize,
}

impl DbscanParams {
    /// Parameters with a positive `eps` and `min_pts` ≥ 1.
    pub fn new(eps: f64, min_pts: usize) -> Result<Self> {
        if !(eps.is_finite() && eps > 0.0) {
            return Err(Error::invalid(
                "eps",
                format!("must be a positive number, got {eps}"),
            ));
        }
        if min_pts == 0 {
            return Err(Error::invalid("min_pts", "must be at least 1"));
        }
        Ok(DbscanParams { eps, min_pts })
    }
}

/// The result of one clustering.
#[derive(Debug, Clone, PartialEq)]
pub struct Clustering {
    /// Cluster of each point; `None` for noise.
    pub labels: Vec<Option<usize>>,
    /// Number of clusters.
    pub n_clusters: usize,
    /// The radius used.
    pub eps: f64,
}

impl Clustering {
    /// Points left as noise.
    pub fn noise(&self) -> usize {
        self.labels.iter().filter(|l| l.is_none()).count()
    }
}

pub(crate) fn dist2(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum()
}

/// The values of an (n, d) matrix in row-major order (borrowed when `x` is already laid out so,
/// copied otherwise) and d.
pub(crate) fn flat<'a>(x: &'a ArrayView2<f32>) -> Result<(std::borrow::Cow<'a, [f32]>, usize)> {
    let d = x.ncols();
    if d == 0 {
        return Err(Error::invalid("points", "points of dimension 0"));
    }
    Ok(match x.as_slice() {
        Some(s) => (std::borrow::Cow::Borrowed(s), d),
        None => (std::borrow::Cow::Owned(x.iter().copied().collect()), d),
    })
}

/// View `n × d` row-major values as an (n, d) matrix of points.
pub fn points(data: &[f32], d: usize) -> Result<ArrayView2<'_, f32>> {
    if d == 0 || data.len() % d != 0 {
        return Err(Error::invalid(
            "points",
            format!("{} values do not form rows of dimension {d}", data.len()),
        ));
    }
    ArrayView2::from_shape((data.len() / d, d), data)
        .map_err(|e| Error::invalid("points", e.to_string()))
}

/// Rows of a row-major `n × d` matrix.
pub(crate) fn rows(data: &[f32], d: usize) -> Result<Vec<&[f32]>> {
    if d == 0 || data.len() % d != 0 {
        return Err(Error::invalid(
            "points",
            format!("{} values do not form rows of dimension {d}", data.len()),
        ));
    }
    Ok(data.chunks(d).collect())
}

/// The points, centred, as a libtorch matrix for blocked distance computations, with the
/// original rows for exact float64 checks.
pub(crate) struct Index<'a> {
    x: Tensor,
    /// −2 xᵀ (d, n), the GEMM's right factor.
    xt2: Tensor,
    sq: Tensor,
    max_sq: f64,
    band: f64,
    pts: Vec<&'a [f32]>,
    block: i64,
}

/// Squared distances from the GEMM identity carry float32 rounding of at most about
/// d · 2⁻²⁴ relative to ‖a‖² + ‖b‖² (centred); pairs within four times that band of a radius
/// (and at least 1e-5) are decided in float64.
fn band_for(d: usize) -> f64 {
    (4.0 * d as f64 * f64::from(f32::EPSILON) / 2.0).max(1e-5)
}

/// Distance entries per block (128 MB of float32).
const BLOCK_ENTRIES: i64 = 1 << 25;

impl<'a> Index<'a> {
    /// Index the rows of the row-major `n × d` values `data`.
    pub(crate) fn new(data: &'a [f32], d: usize) -> Result<Self> {
        let pts = rows(data, d)?;
        if pts.is_empty() {
            return Err(Error::invalid("points", "no points to cluster"));
        }
        if data.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid(
                "points",
                "a point has a NaN or infinite coordinate",
            ));
        }
        let n = pts.len() as i64;
        let x = Tensor::from_slice(data).view([n, d as i64]);
        let x = &x - x.mean_dim(0, true, Kind::Float);
        let sq = x.square().sum_dim_intlist(1, false, Kind::Float);
        let max_sq = sq.max().double_value(&[]);
        Ok(Index {
            xt2: (&x * -2.0).tr().contiguous(),
            x,
            sq,
            max_sq,
            band: band_for(d),
            pts,
            block: (BLOCK_ENTRIES / n).max(1),
        })
    }

    fn len(&self) -> usize {
        self.pts.len()
    }

    /// Row blocks of the given points.
    fn blocks<'s>(&'s self, of: &'s [i64]) -> impl Iterator<Item = &'s [i64]> + 's {
        of.chunks(self.block as usize)
    }

    /// The column part of the squared distances of `rows` to every point, ‖b‖² − 2 a·b
    /// (|rows|, n) in one GEMM (float32), with the row part ‖a‖² and each row's rounding band,
    /// both (|rows|, 1): d²(a, b) = part + ‖a‖².
    fn part(&self, rows: &[i64]) -> (Tensor, Tensor, Tensor) {
        let r = Tensor::from_slice(rows);
        let xr = self.x.index_select(0, &r);
        let sr = self.sq.index_select(0, &r).unsqueeze(1);
        let part = self.sq.unsqueeze(0).addmm(&xr, &self.xt2);
        let band = (&sr + self.max_sq) * self.band + 1e-30;
        (part, sr, band)
    }

    /// Each (row, column) of `part` at most `hi` (per row), with its value.
    fn candidates(part: &Tensor, hi: &Tensor) -> Vec<(usize, usize, f64)> {
        let nz = part.le_tensor(hi).nonzero();
        let m = part.size()[1];
        let lin = nz.select(1, 0) * m + nz.select(1, 1);
        let vals: Vec<f64> =
            Vec::try_from(part.view([-1]).index_select(0, &lin).to_kind(Kind::Double))
                .unwrap_or_default();
        nonzero_pairs(&nz)
            .into_iter()
            .zip(vals)
            .map(|((a, j), v)| (a, j, v))
            .collect()
    }

    /// Neighbours within the largest of `radii2` (squared radii, ascending; each point itself
    /// included) of every point in `rows`: `visit(position in rows, neighbour, d²)` for each
    /// pair, block by block. d² is the exact float64 distance wherever the GEMM's value lies
    /// within float32 rounding of some radius, and the GEMM's value elsewhere, so comparing it
    /// with any of the radii gives the exact answer.
    fn each_within(&self, rows: &[i64], radii2: &[f64], mut visit: impl FnMut(usize, usize, f64)) {
        let Some(&top2) = radii2.last() else {
            return;
        };
        let _guard = tch::no_grad_guard();
        for (b, chunk) in self.blocks(rows).enumerate() {
            let (part, sr, band) = self.part(chunk);
            // The band also covers the radii rounded to float32.
            let band = band + top2 * 1e-6;
            let to_vec = |t: &Tensor| -> Vec<f64> {
                Vec::try_from(t.view([-1]).to_kind(Kind::Double)).unwrap_or_default()
            };
            let (row_sq, row_band) = (to_vec(&sr), to_vec(&band));
            let base = b * self.block as usize;
            for (a, j, v) in Self::candidates(&part, &(-&sr + &band + top2)) {
                let (approx, w) = (v + row_sq[a], row_band[a]);
                // The first radius not below approx − w: is approx within w of it?
                let k = radii2.partition_point(|&r| r < approx - w);
                let d2 = if radii2.get(k).is_some_and(|&r| r <= approx + w) {
                    dist2(self.pts[chunk[a] as usize], self.pts[j])
                } else {
                    approx
                };
                if d2 <= top2 {
                    visit(base + a, j, d2);
                }
            }
        }
    }

    /// Distance of every point to its k-th nearest other point (1 ≤ k < n), exact.
    fn kth_distances(&self, k: usize) -> Vec<f64> {
        let _guard = tch::no_grad_guard();
        let all: Vec<i64> = (0..self.len() as i64).collect();
        let mut out = Vec::with_capacity(self.len());
        for chunk in self.blocks(&all) {
            let (part, _, band) = self.part(chunk);
            // The point itself is not its own neighbour (its duplicates are).
            let own = Tensor::from_slice(chunk).unsqueeze(1);
            let part = part.scatter_value(1, &own, f64::INFINITY);
            let (vals, _) = part.topk(k as i64, 1, false, true);
            let r2 = vals.narrow(1, k as i64 - 1, 1);
            let mut per: Vec<Vec<f64>> = vec![Vec::new(); chunk.len()];
            for (a, j, _) in Self::candidates(&part, &(&r2 + &band * 2.0)) {
                let i = chunk[a] as usize;
                if j != i {
                    per[a].push(dist2(self.pts[i], self.pts[j]));
                }
            }
            for (a, mut ds) in per.into_iter().enumerate() {
                if ds.len() < k {
                    // The band missed a neighbour: decide from every point.
                    let i = chunk[a] as usize;
                    ds = (0..self.len())
                        .filter(|&j| j != i)
                        .map(|j| dist2(self.pts[i], self.pts[j]))
                        .collect();
                }
                ds.select_nth_unstable_by(k - 1, f64::total_cmp);
                out.push(ds[k - 1].sqrt());
            }
        }
        out
    }
}

/// The (row, column) positions of a matrix's `nonzero()` (P, 2).
fn nonzero_pairs(nz: &Tensor) -> Vec<(usize, usize)> {
    let v: Vec<i64> = Vec::try_from(nz.reshape([-1])).unwrap_or_default();
    v.chunks(2)
        .map(|p| (p[0] as usize, p[1] as usize))
        .collect()
}

/// Union-find over point indices (path halving, union by smaller root index).
struct Forest(Vec<usize>);

impl Forest {
    fn find(&mut self, mut i: usize) -> usize {
        while self.0[i] != i {
            self.0[i] = self.0[self.0[i]];
            i = self.0[i];
        }
        i
    }

    fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = (ra.min(rb), ra.max(rb));
            self.0[hi] = lo;
        }
    }
}

/// Run DBSCAN on the rows of `x` (n points × d).
pub fn dbscan(x: ArrayView2<f32>, params: DbscanParams) -> Result<Clustering> {
    let (data, d) = flat(&x)?;
    let index = Index::new(&data, d)?;
    Ok(dbscan_indexed(&index, params))
}

/// DBSCAN at one radius ([`dbscan_many`] with a single radius).
fn dbscan_indexed(index: &Index, params: DbscanParams) -> Clustering {
    dbscan_many(index, &[params.eps], params.min_pts)
        .pop()
        .expect("one radius gives one clustering")
}

/// DBSCAN at every radius of `eps` (ascending) by components, in three sweeps at the largest
/// radius instead of three per radius: neighbour counts, core unions and border labels are kept
/// per radius, each pair counting for the radii at or above its distance. Core points within a
/// radius of each other are joined (union-find, the root being the component's smallest index);
/// components are numbered by their smallest core point (the order in which the classic
/// traversal starts them), and a border point joins the lowest-numbered component among its
/// core neighbours (the first that would reach it). Each radius's result equals a run at that
/// radius alone (tested), and a single radius equals the brute-force definition (tested).
fn dbscan_many(index: &Index, eps: &[f64], min_pts: usize) -> Vec<Clustering> {
    let (n, m) = (index.len(), eps.len());
    if eps.is_empty() {
        return Vec::new();
    }
    let eps2: Vec<f64> = eps.iter().map(|e| e * e).collect();
    // The first radius a pair at squared distance d2 is within.
    let first = |d2: f64| eps2.partition_point(|&e| e < d2);
    let all: Vec<i64> = (0..n as i64).collect();
    // Neighbour counts per radius, as increments at each pair's first radius.
    let mut inc = vec![0usize; m * n];
    index.each_within(&all, &eps2, |i, _, d2| inc[first(d2) * n + i] += 1);
    // A point is core from its first radius with min_pts neighbours on (counts grow with eps).
    let mut core_from = vec![m; n];
    for (i, cf) in core_from.iter_mut().enumerate() {
        let mut c = 0;
        for e in 0..m {
            c += inc[e * n + i];
            if c >= min_pts {
                *cf = e;
                break;
            }
        }
    }
    let core_rows: Vec<i64> = all
        .iter()
        .copied()
        .filter(|&i| core_from[i as usize] < m)
        .collect();
    let mut forests: Vec<Forest> = (0..m).map(|_| Forest((0..n).collect())).collect();
    index.each_within(&core_rows, &eps2, |a, j, d2| {
        let i = core_rows[a] as usize;
        let from = first(d2).max(core_from[i]).max(core_from[j]);
        for f in forests.iter_mut().skip(from) {
            f.union(i, j);
        }
    });
    let mut numbers = vec![usize::MAX; m * n];
    let mut labels: Vec<Vec<Option<usize>>> = vec![vec![None; n]; m];
    let mut counts = vec![0usize; m];
    for (e, forest) in forests.iter_mut().enumerate() {
        for i in 0..n {
            if core_from[i] <= e {
                let r = forest.find(i);
                if numbers[e * n + r] == usize::MAX {
                    numbers[e * n + r] = counts[e];
                    counts[e] += 1;
                }
                labels[e][i] = Some(numbers[e * n + r]);
            }
        }
    }
    // Border points: not core at a radius, within it of a core point.
    let border_rows: Vec<i64> = all
        .iter()
        .copied()
        .filter(|&i| core_from[i as usize] > 0)
        .collect();
    index.each_within(&border_rows, &eps2, |a, j, d2| {
        let i = border_rows[a] as usize;
        let from = first(d2).max(core_from[j]);
        for e in from..core_from[i].min(m) {
            let c = numbers[e * n + forests[e].find(j)];
            if labels[e][i].is_none_or(|l| c < l) {
                labels[e][i] = Some(c);
            }
        }
    });
    labels
        .into_iter()
        .zip(counts)
        .zip(eps)
        .map(|((labels, n_clusters), &eps)| Clustering {
            labels,
            n_clusters,
            eps,
        })
        .collect()
}

/// Distance of every point to its k-th nearest other point, k = `min_pts` − 1 (at least 1).
fn k_distances(index: &Index, min_pts: usize) -> Result<Vec<f64>> {
    let k = min_pts.saturating_sub(1).max(1);
    if index.len() <= k {
        return Err(Error::invalid(
            "min_pts",
            format!("{} points are too few for min_pts {min_pts}", index.len()),
        ));
    }
    Ok(index.kth_distances(k))
}

/// `eps` from the knee of the sorted k-distance curve (Ester et al.'s heuristic, with k =
/// `min_pts` − 1 neighbours besides the point): the distances sorted in decreasing order are
/// convex-decreasing, and the elbow of that curve (the Kneedle rule of [`crate::freq::elbow`]) is
/// where density drops. Falls back to the median k-distance when the curve has no elbow.
pub fn eps_from_knee(x: ArrayView2<f32>, min_pts: usize) -> Result<f64> {
    let (data, d) = flat(&x)?;
    eps_from_knee_indexed(&Index::new(&data, d)?, min_pts)
}

fn eps_from_knee_indexed(index: &Index, min_pts: usize) -> Result<f64> {
    let mut kdist = k_distances(index, min_pts)?;
    kdist.sort_by(|a, b| b.total_cmp(a));
    let eps = match crate::freq::elbow(&kdist) {
        Some(i) => kdist[i],
        None => kdist[kdist.len() / 2],
    };
    if eps > 0.0 {
        Ok(eps)
    } else {
        // All points coincide with their neighbours: any positive radius joins them.
        Ok(f64::MIN_POSITIVE.sqrt())
    }
}

/// `eps` that yields the most clusters of at least `min_size` points: DBSCAN is run at the 5%,
/// 10%, …, 95% quantiles of the k-distances (k = `min_pts` − 1) and the radius with the most such
/// clusters wins (ties: the larger radius, which leaves less noise). Suited to CSE initialisation,
/// where the clusters become experts; the knee rule ([`eps_from_knee`]) tends to find the single
/// dense bulk of an early-training embedding cloud.
pub fn eps_max_clusters(x: ArrayView2<f32>, min_pts: usize, min_size: usize) -> Result<f64> {
    let (data, d) = flat(&x)?;
    let index = Index::new(&data, d)?;
    let mut kdist = k_distances(&index, min_pts)?;
    kdist.sort_by(f64::total_cmp);
    let mut best: Option<(usize, f64)> = None;
    let radii: Vec<f64> = (1..20)
        .map(|i| {
            let q = i as f64 * 0.05;
            kdist[((q * kdist.len() as f64) as usize).min(kdist.len() - 1)]
        })
        .filter(|&e| e > 0.0)
        .collect();
    for c in dbscan_many(&index, &radii, min_pts) {
        let eps = c.eps;
        let mut sizes = vec![0usize; c.n_clusters];
        for l in c.labels.iter().flatten() {
            sizes[*l] += 1;
        }
        let n = sizes.iter().filter(|&&s| s >= min_size).count();
        if best.is_none_or(|(bn, _)| n >= bn) {
            best = Some((n, eps));
        }
    }
    match best {
        Some((_, eps)) => Ok(eps),
        None => eps_from_knee_indexed(&index, min_pts),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Reference: the textbook definition, checked point by point (no traversal order):
    /// core points within eps of each other share a label; border points carry the label of some
    /// core neighbour; noise has no core neighbour.
    fn check_against_definition(data: &[f32], d: usize, p: DbscanParams, got: &Clustering) {
        let pts = rows(data, d).unwrap();
        let n = pts.len();
        let near = |i: usize, j: usize| dist2(pts[i], pts[j]) <= p.eps * p.eps;
        let core: Vec<bool> = (0..n)
            .map(|i| (0..n).filter(|&j| near(i, j)).count() >= p.min_pts)
            .collect();
        for i in 0..n {
            let core_nbrs: Vec<usize> = (0..n).filter(|&j| core[j] && near(i, j)).collect();
            match got.labels[i] {
                None => assert!(
                    core_nbrs.is_empty(),
                    "point {i} is noise but has a core neighbour"
                ),
                Some(c) => {
                    assert!(
                        core_nbrs.iter().any(|&j| got.labels[j] == Some(c)),
                        "point {i}"
                    );
                    if core[i] {
                        for &j in &core_nbrs {
                            assert_eq!(
                                got.labels[j],
                                Some(c),
                                "core points {i} and {j} are density-connected"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matches_the_definition_on_random_data() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for trial in 0..5 {
            let n = 150;
            let d = 3;
            let data: Vec<f32> = (0..n * d)
                .map(|i| {
                    let centre = ((i / d) % 3) as f32 * 4.0;
                    centre + rng.random_range(-1.0f32..1.0)
                })
                .collect();
            let p = DbscanParams::new(0.6 + 0.2 * trial as f64, 4).unwrap();
            let got = dbscan(points(&data, d).unwrap(), p).unwrap();
            check_against_definition(&data, d, p, &got);
        }
    }

    /// The brute-force algorithm this module had before the ball tree: every pair's distance.
    fn brute_force(data: &[f32], d: usize, p: DbscanParams) -> (Vec<Option<usize>>, Vec<f64>) {
        let pts = rows(data, d).unwrap();
        let n = pts.len();
        let nb: Vec<Vec<usize>> = (0..n)
            .map(|i| {
                (0..n)
                    .filter(|&j| dist2(pts[i], pts[j]) <= p.eps * p.eps)
                    .collect()
            })
            .collect();
        let core: Vec<bool> = nb.iter().map(|v| v.len() >= p.min_pts).collect();
        let mut labels = vec![None; n];
        let mut c = 0;
        for s in 0..n {
            if !core[s] || labels[s].is_some() {
                continue;
            }
            labels[s] = Some(c);
            let mut stack = vec![s];
            while let Some(x) = stack.pop() {
                for &q in &nb[x] {
                    if labels[q].is_none() {
                        labels[q] = Some(c);
                        if core[q] {
                            stack.push(q);
                        }
                    }
                }
            }
            c += 1;
        }
        let k = p.min_pts - 1;
        let kd = (0..n)
            .map(|i| {
                let mut ds: Vec<f64> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| dist2(pts[i], pts[j]))
                    .collect();
                ds.sort_by(f64::total_cmp);
                ds[k - 1].sqrt()
            })
            .collect();
        (labels, kd)
    }

    /// 32-dimensional clustered points with exact duplicates and points on a grid (ties at
    /// exactly eps): labels and k-distances equal the brute-force ones.
    #[test]
    fn blocked_answers_equal_brute_force() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let d = 32;
        let mut data: Vec<f32> = Vec::new();
        for i in 0..600 {
            let centre = (i % 4) as f32 * 3.0;
            data.extend((0..d).map(|_| centre + rng.random_range(-0.6f32..0.6)));
        }
        let dup: Vec<f32> = data[..40 * d].to_vec();
        data.extend(dup);
        for i in 0..30 {
            data.extend((0..d).map(|c| if c == 0 { 40.0 + i as f32 * 0.5 } else { 40.0 }));
        }
        let mut index = Index::new(&data, d).unwrap();
        for block in [index.block, 37] {
            // One block, then many (the last one short).
            index.block = block;
            let mut shapes = Vec::new();
            for (eps, min_pts) in [(0.5, 2), (2.6, 4), (2.8, 5), (3.2, 3), (0.5, 3)] {
                let p = DbscanParams::new(eps, min_pts).unwrap();
                let (want, kd) = brute_force(&data, d, p);
                let got = dbscan_indexed(&index, p);
                assert_eq!(
                    got.labels, want,
                    "eps {eps} min_pts {min_pts} block {block}"
                );
                assert_eq!(k_distances(&index, min_pts).unwrap(), kd);
                shapes.push((got.n_clusters, got.noise()));
            }
            // The settings span clusterings with several clusters and with noise.
            assert!(shapes.iter().any(|&(c, z)| c >= 4 && z > 0), "{shapes:?}");
            // Every radius of one multi-radius sweep equals its own run (radii with repeats,
            // and the k-distance quantiles the max-clusters rule uses).
            for min_pts in [2, 3, 5] {
                let mut kd = k_distances(&index, min_pts).unwrap();
                kd.sort_by(f64::total_cmp);
                let mut radii: Vec<f64> = (1..20).map(|i| kd[i * kd.len() / 20]).collect();
                radii.extend([2.6, 2.6, 3.2]);
                radii.retain(|&e| e > 0.0);
                radii.sort_by(f64::total_cmp);
                let many = dbscan_many(&index, &radii, min_pts);
                assert_eq!(many.len(), radii.len());
                for (c, &eps) in many.iter().zip(&radii) {
                    let one = dbscan_indexed(&index, DbscanParams::new(eps, min_pts).unwrap());
                    assert_eq!(
                        c.labels, one.labels,
                        "eps {eps} min_pts {min_pts} block {block}"
                    );
                    assert_eq!(c.n_clusters, one.n_clusters);
                }
            }
        }
    }

    #[test]
    fn hand_made_cases() {
        // Two tight groups and one far outlier.
        let data = [
            0.0f32, 0.0, 0.1, 0.0, 0.0, 0.1, 10.0, 10.0, 10.1, 10.0, 10.0, 10.1, 50.0, 50.0,
        ];
        let c = dbscan(
            points(&data, 2).unwrap(),
            DbscanParams::new(0.5, 3).unwrap(),
        )
        .unwrap();
        assert_eq!(c.n_clusters, 2);
        assert_eq!(
            c.labels,
            vec![Some(0), Some(0), Some(0), Some(1), Some(1), Some(1), None]
        );
        // One cluster when eps spans everything.
        let c = dbscan(
            points(&data, 2).unwrap(),
            DbscanParams::new(100.0, 3).unwrap(),
        )
        .unwrap();
        assert_eq!((c.n_clusters, c.noise()), (1, 0));
        // All noise when min_pts exceeds every neighbourhood.
        let c = dbscan(
            points(&data, 2).unwrap(),
            DbscanParams::new(0.5, 5).unwrap(),
        )
        .unwrap();
        assert_eq!((c.n_clusters, c.noise()), (0, 7));
        assert!(DbscanParams::new(0.0, 3).is_err());
        assert!(DbscanParams::new(1.0, 0).is_err());
    }

    #[test]
    fn max_cluster_eps_finds_groups_of_different_density() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut data = Vec::new();
        // A tight group, a loose group, and a very loose group, far apart.
        for (g, spread) in [(0.0f32, 0.2f32), (30.0, 1.0), (60.0, 2.0)] {
            for _ in 0..80 {
                data.push(g + rng.random_range(-spread..spread));
                data.push(rng.random_range(-spread..spread));
            }
        }
        let eps = eps_max_clusters(points(&data, 2).unwrap(), 5, 20).unwrap();
        let c = dbscan(
            points(&data, 2).unwrap(),
            DbscanParams::new(eps, 5).unwrap(),
        )
        .unwrap();
        let mut sizes = vec![0; c.n_clusters];
        for l in c.labels.iter().flatten() {
            sizes[*l] += 1;
        }
        assert!(
            sizes.iter().filter(|&&s| s >= 20).count() >= 3,
            "eps {eps}: {sizes:?}"
        );
    }

    #[test]
    fn knee_eps_separates_dense_groups() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let mut data = Vec::new();
        for g in 0..3 {
            for _ in 0..60 {
                data.push(g as f32 * 20.0 + rng.random_range(-0.5f32..0.5));
                data.push(rng.random_range(-0.5f32..0.5));
            }
        }
        let eps = eps_from_knee(points(&data, 2).unwrap(), 5).unwrap();
        assert!(eps > 0.0 && eps < 10.0, "eps {eps}");
        let c = dbscan(
            points(&data, 2).unwrap(),
            DbscanParams::new(eps, 5).unwrap(),
        )
        .unwrap();
        assert_eq!(c.n_clusters, 3, "eps {eps}");
    }
}

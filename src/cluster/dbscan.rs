//! DBSCAN (Ester et al., 1996) over rows of a dense f32 matrix, Euclidean distance.
//!
//! Written here rather than taken from linfa-clustering: that crate brings the linfa stack
//! for one algorithm, while we need only brute-force neighbourhoods (n is a few thousand sampled
//! sequences) computed in parallel with rayon, plus the k-distance knee for `eps`.
//!
//! Labels: `Some(cluster)` for core and border points, `None` for noise. Clusters are numbered in
//! order of their first core point, so the result is deterministic. A border point reachable from
//! several clusters joins the first that reaches it (the classic, order-dependent rule).

use ndarray::ArrayView2;
use rayon::prelude::*;

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

/// Run DBSCAN on the rows of `x` (n points × d).
pub fn dbscan(x: ArrayView2<f32>, params: DbscanParams) -> Result<Clustering> {
    let (data, d) = flat(&x)?;
    dbscan_flat(&data, d, params)
}

fn dbscan_flat(data: &[f32], d: usize, params: DbscanParams) -> Result<Clustering> {
    let pts = rows(data, d)?;
    let eps2 = params.eps * params.eps;
    let neighbours: Vec<Vec<usize>> = (0..pts.len())
        .into_par_iter()
        .map(|i| {
            (0..pts.len())
                .filter(|&j| dist2(pts[i], pts[j]) <= eps2)
                .collect()
        })
        .collect();
    let core: Vec<bool> = neighbours
        .iter()
        .map(|n| n.len() >= params.min_pts)
        .collect();
    let mut labels: Vec<Option<usize>> = vec![None; pts.len()];
    let mut n_clusters = 0;
    for start in 0..pts.len() {
        if !core[start] || labels[start].is_some() {
            continue;
        }
        let c = n_clusters;
        n_clusters += 1;
        labels[start] = Some(c);
        let mut stack = vec![start];
        while let Some(p) = stack.pop() {
            for &q in &neighbours[p] {
                if labels[q].is_none() {
                    labels[q] = Some(c);
                    if core[q] {
                        stack.push(q);
                    }
                }
            }
        }
    }
    Ok(Clustering {
        labels,
        n_clusters,
        eps: params.eps,
    })
}

/// Distance of every point to its k-th nearest other point, k = `min_pts` − 1 (at least 1).
fn k_distances(data: &[f32], d: usize, min_pts: usize) -> Result<Vec<f64>> {
    let pts = rows(data, d)?;
    let k = min_pts.saturating_sub(1).max(1);
    if pts.len() <= k {
        return Err(Error::invalid(
            "min_pts",
            format!("{} points are too few for min_pts {min_pts}", pts.len()),
        ));
    }
    Ok((0..pts.len())
        .into_par_iter()
        .map(|i| {
            let mut ds: Vec<f64> = (0..pts.len())
                .filter(|&j| j != i)
                .map(|j| dist2(pts[i], pts[j]))
                .collect();
            ds.select_nth_unstable_by(k - 1, f64::total_cmp);
            ds[k - 1].sqrt()
        })
        .collect())
}

/// `eps` from the knee of the sorted k-distance curve (Ester et al.'s heuristic, with k =
/// `min_pts` − 1 neighbours besides the point): the distances sorted in decreasing order are
/// convex-decreasing, and the elbow of that curve (the Kneedle rule of [`crate::freq::elbow`]) is
/// where density drops. Falls back to the median k-distance when the curve has no elbow.
pub fn eps_from_knee(x: ArrayView2<f32>, min_pts: usize) -> Result<f64> {
    let (data, d) = flat(&x)?;
    eps_from_knee_flat(&data, d, min_pts)
}

fn eps_from_knee_flat(data: &[f32], d: usize, min_pts: usize) -> Result<f64> {
    let mut kdist = k_distances(data, d, min_pts)?;
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
    let data = &data[..];
    let mut kdist = k_distances(data, d, min_pts)?;
    kdist.sort_by(f64::total_cmp);
    let mut best: Option<(usize, f64)> = None;
    for q in (1..20).map(|i| i as f64 * 0.05) {
        let eps = kdist[((q * kdist.len() as f64) as usize).min(kdist.len() - 1)];
        if eps <= 0.0 {
            continue;
        }
        let c = dbscan_flat(data, d, DbscanParams::new(eps, min_pts)?)?;
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
        None => eps_from_knee_flat(data, d, min_pts),
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

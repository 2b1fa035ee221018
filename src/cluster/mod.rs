//! Clustering of sequence embeddings (points are the rows of an `ndarray` (n, d) view; see
//! [`points`] and `crate::array` for conversions): DBSCAN (CSE initialisation, cluster dynamics) and k-means++,
//! and the statistics the paper tracks (paper notes, "Cluster dynamics"): per-cluster centroid and
//! radius (mean distance of members to their centroid), and the ratio of the mean pairwise
//! distance between centroids to the mean radius.

pub mod dbscan;
pub mod kmeans;
pub mod pca;

pub use dbscan::{dbscan, eps_from_knee, eps_max_clusters, points, Clustering, DbscanParams};
pub use kmeans::kmeans;

use crate::error::Result;
use ndarray::ArrayView2;

use dbscan::{dist2, flat, rows};

/// minPts of the clusterings of sequence embeddings outside CSE initialisation: the cluster
/// dynamics during training and the NTK run's `cluster` column.
pub const MIN_PTS: usize = 5;

/// Centroid and radius of each cluster, noise excluded.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterStats {
    /// `n_clusters × d`, row-major.
    pub centroids: Vec<f32>,
    /// Mean distance of each cluster's members to its centroid.
    pub radii: Vec<f32>,
    /// Members of each cluster.
    pub sizes: Vec<usize>,
}

impl ClusterStats {
    /// Statistics of the clusters `labels` makes of the rows of `x` (n points × d).
    pub fn compute(
        x: ArrayView2<f32>,
        labels: &[Option<usize>],
        n_clusters: usize,
    ) -> Result<Self> {
        let (data, d) = flat(&x)?;
        let pts = rows(&data, d)?;
        let mut sums = vec![0f64; n_clusters * d];
        let mut sizes = vec![0usize; n_clusters];
        for (p, l) in pts.iter().zip(labels) {
            if let Some(c) = *l {
                sizes[c] += 1;
                for (s, v) in sums[c * d..(c + 1) * d].iter_mut().zip(p.iter()) {
                    *s += f64::from(*v);
                }
            }
        }
        let centroids: Vec<f32> = sums
            .iter()
            .enumerate()
            .map(|(i, s)| (s / sizes[i / d].max(1) as f64) as f32)
            .collect();
        let mut radii = vec![0f64; n_clusters];
        for (p, l) in pts.iter().zip(labels) {
            if let Some(c) = *l {
                radii[c] += dist2(p, &centroids[c * d..(c + 1) * d]).sqrt();
            }
        }
        let radii = radii
            .iter()
            .zip(&sizes)
            .map(|(r, &n)| (r / n.max(1) as f64) as f32)
            .collect();
        Ok(ClusterStats {
            centroids,
            radii,
            sizes,
        })
    }

    /// Mean pairwise centroid distance over mean radius; `None` with fewer than two clusters or
    /// zero radii.
    pub fn separation_ratio(&self, d: usize) -> Option<f64> {
        let k = self.radii.len();
        if k < 2 {
            return None;
        }
        let mut total = 0.0;
        let mut pairs = 0usize;
        for a in 0..k {
            for b in a + 1..k {
                total += dist2(
                    &self.centroids[a * d..(a + 1) * d],
                    &self.centroids[b * d..(b + 1) * d],
                )
                .sqrt();
                pairs += 1;
            }
        }
        let mean_radius = self.radii.iter().map(|&r| f64::from(r)).sum::<f64>() / k as f64;
        (mean_radius > 0.0).then(|| total / pairs as f64 / mean_radius)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand: cluster 0 = {(0,0), (2,0)} → centroid (1,0), radius 1; cluster 1 = {(10,0), (10,4)}
    /// → centroid (10,2), radius 2; centroid distance sqrt(81+4); ratio = sqrt(85) / 1.5.
    #[test]
    fn stats_by_hand() {
        let data = [0.0f32, 0.0, 2.0, 0.0, 10.0, 0.0, 10.0, 4.0, 99.0, 99.0];
        let labels = [Some(0), Some(0), Some(1), Some(1), None];
        let s = ClusterStats::compute(points(&data, 2).unwrap(), &labels, 2).unwrap();
        assert_eq!(s.centroids, vec![1.0, 0.0, 10.0, 2.0]);
        assert_eq!(s.radii, vec![1.0, 2.0]);
        assert_eq!(s.sizes, vec![2, 2]);
        let r = s.separation_ratio(2).unwrap();
        assert!((r - 85f64.sqrt() / 1.5).abs() < 1e-6, "{r}");
    }
}

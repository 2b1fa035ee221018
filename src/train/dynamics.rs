//! Cluster dynamics (paper Fig. 3): at chosen steps, DBSCAN over the sequence embeddings of a
//! fixed probe set at the output of every block, logging the number of clusters, the noise and the
//! ratio of mean inter-centroid distance to mean cluster radius. eps is re-derived from the
//! k-distance knee each time, so the counts compare shapes rather than one absolute scale.

use tch::Device;

use crate::cluster::{dbscan, eps_from_knee, ClusterStats, DbscanParams};
use crate::error::Result;
use crate::model::Model;

use crate::cluster::MIN_PTS;

/// DBSCAN over one layer's probe embeddings at one step.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicsRow {
    /// The step.
    pub step: u64,
    /// Block index + 1 (the output of block `layer − 1`); 0 is the embedding layer.
    pub layer: i64,
    /// Clusters found.
    pub n_clusters: usize,
    /// Probe sequences left as noise.
    pub noise: usize,
    /// The radius (knee rule).
    pub eps: f64,
    /// Distance/radius ratio of the clusters.
    pub ratio: Option<f64>,
}

/// Cluster every layer's embeddings of the probe sequences at `step`.
pub fn measure(
    model: &Model,
    probe: &[&[u32]],
    step: u64,
    device: Device,
) -> Result<Vec<DynamicsRow>> {
    let mut rows = Vec::new();
    if probe.len() <= MIN_PTS {
        return Ok(rows);
    }
    let enc = crate::eval::encode(model, probe, 64, device)?;
    for (layer, emb) in enc.layers.iter().enumerate().skip(1) {
        let x = crate::array::matrix_f32(emb)?;
        let d = x.ncols();
        let eps = eps_from_knee(x.view(), MIN_PTS)?;
        let c = dbscan(x.view(), DbscanParams::new(eps, MIN_PTS)?)?;
        let stats = ClusterStats::compute(x.view(), &c.labels, c.n_clusters)?;
        rows.push(DynamicsRow {
            step,
            layer: layer as i64,
            n_clusters: c.n_clusters,
            noise: c.noise(),
            eps,
            ratio: stats.separation_ratio(d),
        });
    }
    Ok(rows)
}

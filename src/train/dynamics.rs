//! Cluster dynamics (paper Fig. 3): at chosen steps, DBSCAN over the sequence embeddings of a
//! fixed probe set at the output of every block, logging the number of clusters, the noise and the
//! ratio of mean inter-centroid distance to mean cluster radius. eps is re-derived from the
//! k-distance knee each time, so the counts compare shapes rather than one absolute scale.

use tch::Device;

use crate::cluster::{dbscan, eps_from_knee, ClusterStats, DbscanParams};
use crate::error::Result;
use crate::model::Model;

/// minPts of the dynamics clustering.
pub const MIN_PTS: usize = 5;

#[derive(Debug, Clone, PartialEq)]
pub struct DynamicsRow {
    pub step: u64,
    /// Block index + 1 (the output of block `layer − 1`); 0 is the embedding layer.
    pub layer: i64,
    pub n_clusters: usize,
    pub noise: usize,
    pub eps: f64,
    pub ratio: Option<f64>,
}

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
        let d = emb.size()[1] as usize;
        let data: Vec<f32> = Vec::try_from(emb.reshape([-1]))?;
        let eps = eps_from_knee(&data, d, MIN_PTS)?;
        let c = dbscan(&data, d, DbscanParams::new(eps, MIN_PTS)?)?;
        let stats = ClusterStats::compute(&data, d, &c.labels, c.n_clusters)?;
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

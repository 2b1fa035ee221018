//! CSE initialisation after the dense warm-up (paper notes, "The CSE layer"): sample N training
//! sequences, take each CSE block's input sequence embeddings, project them with the block's fixed
//! Gaussian matrix, run DBSCAN (eps from the k-distance knee unless given), apply the guard rails
//! (clusters below `min_cluster_size` become noise; at most `max_experts` largest clusters stay),
//! and record each cluster's centroid and radius. Noise points are dispatched by the same rule as
//! every other sequence.

use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::cluster::{dbscan, eps_from_knee, eps_max_clusters, ClusterStats, DbscanParams};
use crate::error::{Error, Result};
use crate::model::cse::CseInit;
use crate::model::{CseConfig, EpsRule, Model};

/// One CSE block's clustering, for the printed summary.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The block.
    pub layer: i64,
    /// DBSCAN's radius.
    pub eps: f64,
    /// Clusters DBSCAN found.
    pub raw_clusters: usize,
    /// Samples per expert kept.
    pub sizes: Vec<usize>,
    /// Sequences left as noise.
    pub noise: usize,
    /// Radius of each expert.
    pub radii: Vec<f32>,
}

/// Cluster the CSE blocks' inputs over `seqs` (already sampled) and return the per-block inits.
pub fn cluster_blocks(
    model: &Model,
    cse: &CseConfig,
    seqs: &[&[u32]],
    device: Device,
) -> Result<(Vec<CseInit>, Vec<InitReport>)> {
    let routers = model.cse_routers();
    let layers: Vec<usize> = routers.iter().map(|(l, _)| *l as usize).collect();
    let enc = crate::eval::encode(model, seqs, 64, device)?;
    let mut inits = Vec::new();
    let mut reports = Vec::new();
    for (k, &layer) in layers.iter().enumerate() {
        // layers[l] is the input of block l (the mean of its token states); project it.
        let proj = routers[k]
            .1
            .proj
            .to_device(Device::Cpu)
            .to_kind(Kind::Float);
        let v = enc.layers[layer].matmul(&proj);
        let x = crate::array::matrix_f32(&v)?;
        let d = x.ncols();
        let eps = match (cse.eps, cse.eps_rule) {
            (Some(e), _) => e,
            (None, EpsRule::Knee) => eps_from_knee(x.view(), cse.min_pts)?,
            (None, EpsRule::MaxClusters) => {
                eps_max_clusters(x.view(), cse.min_pts, cse.min_cluster_size)?
            }
        };
        let params = DbscanParams::new(eps, cse.min_pts)
            .map_err(|e| Error::invalid("model.experts.eps", e.to_string()))?;
        let c = dbscan(x.view(), params)?;
        let stats = ClusterStats::compute(x.view(), &c.labels, c.n_clusters)?;
        // Guard rails: drop small clusters, keep the largest max_experts (ties by cluster order).
        let mut order: Vec<usize> = (0..c.n_clusters)
            .filter(|&j| stats.sizes[j] >= cse.min_cluster_size)
            .collect();
        order.sort_by(|&a, &b| stats.sizes[b].cmp(&stats.sizes[a]).then(a.cmp(&b)));
        order.truncate(cse.max_experts);
        order.sort();
        if order.is_empty() {
            return Err(Error::invalid(
                "model.experts",
                format!(
                    "CSE init at block {layer}: DBSCAN (eps {eps:.4}, min_pts {}) over {} sequences found no cluster of at least {} points ({} clusters, {} noise); set experts.eps, lower min_pts or min_cluster_size",
                    cse.min_pts,
                    seqs.len(),
                    cse.min_cluster_size,
                    c.n_clusters,
                    c.noise()
                ),
            ));
        }
        let cents: Vec<f32> = order
            .iter()
            .flat_map(|&j| stats.centroids[j * d..(j + 1) * d].to_vec())
            .collect();
        // A zero radius (identical points) would divide by zero in the dispatcher.
        let radii: Vec<f32> = order.iter().map(|&j| stats.radii[j].max(1e-6)).collect();
        let kept: usize = order.iter().map(|&j| stats.sizes[j]).sum();
        reports.push(InitReport {
            layer: layer as i64,
            eps,
            raw_clusters: c.n_clusters,
            sizes: order.iter().map(|&j| stats.sizes[j]).collect(),
            noise: seqs.len() - kept,
            radii: radii.clone(),
        });
        let kind = routers[k].1.proj.kind();
        inits.push(CseInit {
            layer: layer as i64,
            centroids: Tensor::from_slice(&cents)
                .view([order.len() as i64, d as i64])
                .to_kind(kind)
                .to_device(device),
            radii: Tensor::from_slice(&radii).to_kind(kind).to_device(device),
        });
    }
    Ok((inits, reports))
}

/// `n` distinct indices of `0..len`, seeded, in increasing order.
pub fn sample_indices(len: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut v = sample(&mut rng, len, n.min(len)).into_vec();
    v.sort();
    v
}

//! Cluster-guided Sparse Expert layers (paper notes, "The CSE layer").
//!
//! The dispatcher sends each whole sequence to one expert, with no learned gate:
//!     v  = mean of the block-input token states over the sequence's real tokens  (d_model)
//!     v′ = v · P, P a fixed Gaussian N(0, 1/d′) matrix (Johnson–Lindenstrauss)    (d′)
//!     expert(v′) = argmin_j ‖v′ − c_j‖ / r_j
//! with cluster centroids c_j and radii r_j from DBSCAN after the dense warm-up. While training,
//! the chosen centroid moves: c_i ← α c_i + (1 − α) v′, applied sequence by sequence in batch order.
//! Before the initialisation a CSE block has one expert (`experts.0`) and routes everything there.
//! Every expert has the shape of the dense module, so active parameters per token are unchanged.

use tch::{nn, Kind, Tensor};

use super::config::{CseConfig, ModelConfig};
use super::layers::masked_mean;

/// The per-block dispatcher state.
#[derive(Debug)]
pub struct CseRouter {
    /// (d_model, d′), fixed.
    pub proj: Tensor,
    /// (k, d′) and (k,), present once initialised.
    pub centroids: Option<Tensor>,
    /// Each expert's radius (k,), present once initialised.
    pub radii: Option<Tensor>,
    alpha: f64,
}

impl CseRouter {
    /// A router with `experts` experts for block `p` (centroids set later by initialisation).
    pub fn new(p: nn::Path, cfg: &ModelConfig, cse: &CseConfig, experts: i64) -> CseRouter {
        let d2 = cse.proj_dim;
        // A buffer, not a parameter: drawn from libtorch's seeded generator, never trained.
        let proj = p.zeros_no_train("proj", &[cfg.d_model, d2]);
        tch::no_grad(|| {
            let draw =
                Tensor::randn([cfg.d_model, d2], (proj.kind(), proj.device())) / (d2 as f64).sqrt();
            proj.shallow_clone().copy_(&draw);
        });
        let (centroids, radii) = if experts > 1 {
            (
                Some(p.zeros_no_train("centroids", &[experts, d2])),
                Some(p.ones_no_train("radii", &[experts])),
            )
        } else {
            (None, None)
        };
        CseRouter {
            proj,
            centroids,
            radii,
            alpha: cse.alpha,
        }
    }

    /// Projected sequence embeddings v′: (b, t, d) → (b, d′), outside autograd.
    pub fn project(&self, x: &Tensor, mask: &Tensor) -> Tensor {
        tch::no_grad(|| {
            masked_mean(x, mask)
                .to_kind(self.proj.kind())
                .matmul(&self.proj)
        })
    }

    /// Expert of each sequence, (b,) i64; zeros before initialisation. Updates centroids in training.
    pub fn route(&self, x: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let b = x.size()[0];
        let (Some(c), Some(r)) = (&self.centroids, &self.radii) else {
            return Tensor::zeros([b], (Kind::Int64, x.device()));
        };
        let v = self.project(x, mask);
        let route = dispatch(&v, c, r);
        if train && self.alpha < 1.0 {
            tch::no_grad(|| {
                for i in 0..b {
                    let j = route.int64_value(&[i]);
                    let mut cj = c.get(j);
                    let updated = &cj * self.alpha + v.get(i) * (1.0 - self.alpha);
                    cj.copy_(&updated);
                }
            });
        }
        route
    }
}

/// argmin_j ‖v′_i − c_j‖ / r_j for each row i of `v` (b, d′); `c` (k, d′), `r` (k,) → (b,) i64.
pub fn dispatch(v: &Tensor, c: &Tensor, r: &Tensor) -> Tensor {
    let dist = Tensor::cdist(v, c, 2.0, None::<i64>); // (b, k)
    (dist / r.unsqueeze(0)).argmin(-1, false)
}

/// Per-sequence routing of a module's input to one of its experts. Experts are any module with a
/// `(x, mask, train)` forward; sequences are gathered per expert and scattered back with
/// `index_copy`, so gradients reach exactly the expert each sequence used.
/// With a capture `tape`, each expert call runs under the row map of its sequences' positions.
pub fn route_sequences(
    x: &Tensor,
    mask: &Tensor,
    route: &Tensor,
    n_experts: usize,
    tape: Option<&crate::model::tape::Tape>,
    forward: impl Fn(usize, &Tensor, &Tensor) -> Tensor,
) -> Tensor {
    if n_experts == 1 {
        return forward(0, x, mask);
    }
    let t = x.size()[1];
    let mut out = x.zeros_like();
    for e in 0..n_experts {
        let sel = route.eq(e as i64).nonzero().squeeze_dim(1);
        if sel.size()[0] == 0 {
            continue;
        }
        let run = || forward(e, &x.index_select(0, &sel), &mask.index_select(0, &sel));
        let y = match tape {
            Some(tp) => {
                // Flat (batch × seq) positions of the selected sequences: sel·t + 0..t.
                let pos = (sel.unsqueeze(1) * t
                    + Tensor::arange(t, (tch::Kind::Int64, x.device())).unsqueeze(0))
                .reshape([-1]);
                tp.with_rows(&tp.compose(&pos), run)
            }
            None => run(),
        };
        out = out.index_copy(0, &sel, &y);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Constructed points: centroids (0,0) r=1 and (10,0) r=4. The point (4,0) is 4 from the first
    /// (4/1 = 4) and 6 from the second (6/4 = 1.5): the radius-scaled rule sends it to expert 1,
    /// although it is nearer to expert 0.
    #[test]
    fn dispatcher_routes_by_scaled_distance() {
        let c = Tensor::from_slice(&[0.0f32, 0.0, 10.0, 0.0]).view([2, 2]);
        let r = Tensor::from_slice(&[1.0f32, 4.0]);
        let v = Tensor::from_slice(&[0.5f32, 0.0, 4.0, 0.0, 9.0, 1.0, -3.0, 0.0]).view([4, 2]);
        let got: Vec<i64> = Vec::<i64>::try_from(dispatch(&v, &c, &r)).unwrap();
        assert_eq!(got, vec![0, 1, 1, 0]);
    }
}

/// The result of clustering one CSE block's sequence embeddings.
#[derive(Debug)]
pub struct CseInit {
    /// The block.
    pub layer: i64,
    /// (k, d′)
    pub centroids: Tensor,
    /// (k,)
    pub radii: Tensor,
}

/// Turn a warmed-up model with single-expert CSE blocks into one with an expert per cluster:
/// every expert starts as a copy of the warmed-up module (`experts.0`), the dispatcher gets the
/// clusters' centroids and radii, every other tensor is copied unchanged.
pub fn expand_experts(
    old: &nn::VarStore,
    cfg: &ModelConfig,
    inits: &[CseInit],
) -> crate::Result<(nn::VarStore, super::Model, ModelConfig)> {
    let super::ExpertConfig::Cse(c) = &cfg.experts else {
        return Err(crate::Error::invalid(
            "model.experts",
            "expanding experts needs a CSE model",
        ));
    };
    let first = cfg.n_layer - c.last_k;
    let mut counts = vec![1i64; c.last_k as usize];
    for init in inits {
        let slot = (init.layer - first) as usize;
        if slot >= counts.len() {
            return Err(crate::Error::invalid(
                "cse init",
                format!("layer {} is not a CSE block", init.layer),
            ));
        }
        counts[slot] = init.radii.size()[0];
    }
    let mut new_cfg = cfg.clone();
    if let super::ExpertConfig::Cse(nc) = &mut new_cfg.experts {
        nc.experts = counts;
    }
    let mut vs = nn::VarStore::new(old.device());
    let model = super::Model::new(&vs.root(), &new_cfg)?;
    // Keep the precision of the warmed-up model (float64 in gradient checks).
    if let Some(kind) = old.variables().values().next().map(Tensor::kind) {
        vs.set_kind(kind);
    }
    let old_vars = old.variables();
    let expert_re = |name: &str| -> String {
        // h.{i}.mlp.experts.{e}.rest → h.{i}.mlp.experts.0.rest
        let parts: Vec<&str> = name.split('.').collect();
        match parts.iter().position(|p| *p == "experts") {
            Some(i) if i + 1 < parts.len() => {
                let mut p2 = parts.clone();
                p2[i + 1] = "0";
                p2.join(".")
            }
            _ => name.to_string(),
        }
    };
    tch::no_grad(|| -> crate::Result<()> {
        for (name, var) in vs.variables() {
            let mut var = var.shallow_clone();
            let layer: Option<i64> = name
                .strip_prefix("h.")
                .and_then(|r| r.split('.').next())
                .and_then(|s| s.parse().ok());
            if name.ends_with("cse.centroids") || name.ends_with("cse.radii") {
                let init = inits
                    .iter()
                    .find(|i| Some(i.layer) == layer)
                    .ok_or_else(|| {
                        crate::Error::invalid("cse init", format!("no clusters for `{name}`"))
                    })?;
                let src = if name.ends_with("centroids") {
                    &init.centroids
                } else {
                    &init.radii
                };
                var.copy_(src);
                continue;
            }
            let src_name = if old_vars.contains_key(&name) {
                name.clone()
            } else {
                expert_re(&name)
            };
            let src = old_vars.get(&src_name).ok_or_else(|| {
                crate::Error::invalid("cse init", format!("no source tensor for `{name}`"))
            })?;
            var.copy_(src);
        }
        Ok(())
    })?;
    Ok((vs, model, new_cfg))
}

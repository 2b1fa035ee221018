//! Upcycling: a dense model (trained here or imported) turned into one with Switch-MoE or CSE
//! blocks of the same shape ("sparse upcycling", Komatsuzaki et al., 2023). Every expert of a
//! sparse block starts as a copy of that block's dense module (`h.{i}.mlp.*`, or `h.{i}.attn.*`
//! for CSE attention experts); Switch routers and CSE projections keep their fresh, seeded
//! initialisation; every other tensor is copied unchanged.
//!
//! A CSE block starts with one expert, so the upcycled CSE model computes exactly the base
//! model's function until the CSE initialisation clusters its sequence embeddings and splits the
//! expert ([`super::cse::expand_experts`]). A Switch block scales each token's expert output by
//! its router probability (about 1/E for a fresh router), so the upcycled Switch model starts
//! away from the base model's function, as in Switch upcycling without a gate renormalisation.

use tch::{nn, Tensor};

use super::{ExpertConfig, Model, ModelConfig};
use crate::error::{Error, Result};

/// The name in the dense base model that tensor `name` of the upcycled model is copied from:
/// `h.3.mlp.experts.2.c_fc.weight` → `h.3.mlp.c_fc.weight` (also under `attn`); `None` for
/// tensors that have no counterpart (Switch routers, CSE dispatcher buffers).
pub fn base_name(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('.').collect();
    if parts.iter().any(|p| *p == "router" || *p == "cse") {
        return None;
    }
    match parts.iter().position(|p| *p == "experts") {
        Some(i) if i + 1 < parts.len() => {
            let mut kept = parts[..i].to_vec();
            kept.extend_from_slice(&parts[i + 2..]);
            Some(kept.join("."))
        }
        _ => Some(name.to_string()),
    }
}

/// The upcycled model: `base` (a dense model with config `base_cfg`) with `experts` in its last
/// blocks. Fresh tensors (routers, CSE projections) are drawn from libtorch's generator, so seed
/// it first (`tch::manual_seed`) for a reproducible result.
pub fn upcycle(
    base: &nn::VarStore,
    base_cfg: &ModelConfig,
    experts: &ExpertConfig,
) -> Result<(nn::VarStore, Model, ModelConfig)> {
    if !matches!(base_cfg.experts, ExpertConfig::Dense) {
        return Err(Error::invalid(
            "base.model",
            "upcycling starts from a dense model; this one already has experts",
        ));
    }
    let mut cfg = base_cfg.clone();
    cfg.experts = experts.clone();
    if let ExpertConfig::Cse(c) = &mut cfg.experts {
        // One expert per block until the CSE initialisation splits it.
        c.experts = Vec::new();
    }
    cfg.validate()?;
    let mut vs = nn::VarStore::new(base.device());
    let model = Model::new(&vs.root(), &cfg)?;
    let old = base.variables();
    // Keep the base model's precision.
    if let Some(kind) = old.values().next().map(Tensor::kind) {
        vs.set_kind(kind);
    }
    tch::no_grad(|| -> Result<()> {
        for (name, var) in vs.variables() {
            let Some(src_name) = base_name(&name) else {
                continue;
            };
            let src = old.get(&src_name).ok_or_else(|| {
                Error::invalid(
                    "base.model",
                    format!("the base model has no tensor `{src_name}` to start `{name}` from"),
                )
            })?;
            if src.size() != var.size() {
                return Err(Error::invalid(
                    "base.model",
                    format!(
                        "`{src_name}` is {:?} in the base model, `{name}` needs {:?}",
                        src.size(),
                        var.size()
                    ),
                ));
            }
            var.shallow_clone().copy_(src);
        }
        Ok(())
    })?;
    Ok((vs, model, cfg))
}

#[cfg(test)]
mod tests {
    use super::base_name;

    #[test]
    fn expert_tensors_come_from_the_dense_module() {
        assert_eq!(
            base_name("h.3.mlp.experts.2.c_fc.weight").as_deref(),
            Some("h.3.mlp.c_fc.weight")
        );
        assert_eq!(
            base_name("h.1.attn.experts.0.q_proj.weight").as_deref(),
            Some("h.1.attn.q_proj.weight")
        );
        assert_eq!(base_name("h.3.mlp.router.weight"), None);
        assert_eq!(base_name("h.3.cse.proj"), None);
        assert_eq!(base_name("wte.weight").as_deref(), Some("wte.weight"));
    }
}

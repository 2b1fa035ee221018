//! Runs that start from an existing model (`[base]` in the spec): read the base model, upcycle the
//! run's experts into its last blocks ([`crate::model::upcycle`]), and freeze everything the run
//! does not train ([`TrainScope`]). The tokenizer is the base model's own unless the spec names
//! one, and it is written beside every model the run saves, so `eval`, `ntk` and `analyze` read
//! the corpus as the run did.

use std::path::Path;

use tch::{nn, Device};

use super::spec::{BaseSpec, TrainScope};
use crate::error::{Error, Result};
use crate::model::{upcycle, ExpertConfig, Model, ModelConfig};
use crate::source::{self, Format};

/// The config of the model at `path` (any source but TorchScript, which cannot be trained here).
pub fn base_config(path: &Path) -> Result<ModelConfig> {
    if !path.exists() {
        return Err(Error::in_file(path, "base model not found"));
    }
    match source::detect(path) {
        Format::Tailscope => {
            crate::checkpoint::read_config(&path.join(crate::checkpoint::CONFIG_FILE))
        }
        Format::TorchScript => Err(Error::in_file(
            path,
            "a TorchScript module cannot be trained here; import its weights (safetensors or GGUF)",
        )),
        Format::HuggingFace | Format::Gguf => Ok(source::read_imported(path)?.cfg),
    }
}

/// The base model of `base` with `experts` upcycled into it (or as it is, with
/// `base.upcycle = false`), seeded by `seed`, on `device`, frozen except for what `base.train`
/// names. Check the base first ([`checked_config`]).
pub fn start(
    base: &BaseSpec,
    experts: &ExpertConfig,
    device: Device,
    seed: u64,
) -> Result<(nn::VarStore, Model, ModelConfig)> {
    let (base_vs, base_model) = source::load_model(&base.model, device)?;
    if !base.upcycle {
        // Continued training: the model as it is, experts included.
        let cfg = base_model.cfg.clone();
        freeze(&base_vs, &cfg, base.train, base.last_k);
        return Ok((base_vs, base_model, cfg));
    }
    tch::manual_seed(seed as i64);
    let (vs, model, cfg) = upcycle::upcycle(&base_vs, &base_model.cfg, experts)
        .map_err(|e| Error::in_file(&base.model, e.to_string()))?;
    freeze(&vs, &cfg, base.train, base.last_k);
    Ok((vs, model, cfg))
}

/// The config of the model `base` names, checked against the spec: `last_k` blocks exist and a
/// tokenizer of `vocab` entries fits its vocabulary.
pub fn checked_config(base: &BaseSpec, vocab: i64) -> Result<ModelConfig> {
    let cfg = base_config(&base.model)?;
    if vocab > cfg.vocab_size {
        return Err(Error::invalid(
            "data.tokenizer",
            format!(
                "has {vocab} entries, the vocabulary of {} has {}",
                base.model.display(),
                cfg.vocab_size
            ),
        ));
    }
    if base.last_k > cfg.n_layer {
        return Err(Error::invalid(
            "base.last_k",
            format!(
                "is {}, but {} has {} blocks",
                base.last_k,
                base.model.display(),
                cfg.n_layer
            ),
        ));
    }
    Ok(cfg)
}

/// Stop gradients to every parameter of `vs` that `scope` does not train (the last `last_k`
/// blocks of `cfg`'s model are the top ones). Buffers that are never trained stay so.
pub fn freeze(vs: &nn::VarStore, cfg: &ModelConfig, scope: TrainScope, last_k: i64) {
    for (name, t) in vs.variables() {
        if !scope.trains(&name, cfg.n_layer, last_k) {
            let _ = t.set_requires_grad(false);
        }
    }
}

/// The config batches are built with: `cfg` with its `max_len` lowered to `max_len` when given
/// (the model keeps its own; only training sequences are cut).
pub fn batch_config(cfg: &ModelConfig, max_len: Option<i64>) -> ModelConfig {
    let mut c = cfg.clone();
    if let Some(m) = max_len {
        c.max_len = c.max_len.min(m);
    }
    c
}

pub use crate::model::trunk::{Trunk, TrunkCache};

/// The frozen trunk runs from `base` share: the base model's blocks below the first trained
/// one, served per text by `cache` ([`crate::model::trunk`]). `None` when nothing below is frozen
/// (`train = "all"`), for BERT (whose inputs are masked afresh at every step, so no text repeats)
/// or when the cache is off.
pub fn trunk<'a>(
    cache: &'a TrunkCache,
    base: &'a BaseSpec,
    cfg: &ModelConfig,
) -> Option<Trunk<'a>> {
    trunk_layer(cache, base, cfg).map(|layer| Trunk {
        cache,
        source: &base.model,
        layer,
    })
}

/// The block the trunk of runs from `base` ends before, when [`trunk`] gives one. Not with
/// dropout: the cached states are computed without it, a training pass would apply it in the
/// frozen blocks too.
pub fn trunk_layer(cache: &TrunkCache, base: &BaseSpec, cfg: &ModelConfig) -> Option<usize> {
    let layer = first_trained_block(base, cfg);
    (cache.is_enabled() && layer > 0 && cfg.arch.is_causal() && cfg.dropout == 0.0).then_some(layer)
}

/// The lowest block whose parameters `base.train` trains (0 when the embeddings are trained).
pub fn first_trained_block(base: &BaseSpec, cfg: &ModelConfig) -> usize {
    match base.train {
        TrainScope::All => 0,
        TrainScope::Mlp | TrainScope::Blocks => (cfg.n_layer - base.last_k).max(0) as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_pick_the_top_blocks() {
        let n = 4;
        let mlp = TrainScope::Mlp;
        assert!(mlp.trains("h.3.mlp.c_fc.weight", n, 2));
        assert!(mlp.trains("h.2.mlp.experts.1.c_proj.bias", n, 2));
        assert!(mlp.trains("h.2.mlp.router.weight", n, 2));
        assert!(mlp.trains("h.3.attn.experts.0.c_attn.weight", n, 2));
        assert!(!mlp.trains("h.1.mlp.c_fc.weight", n, 2));
        assert!(!mlp.trains("h.3.attn.c_attn.weight", n, 2));
        assert!(!mlp.trains("h.3.ln_2.weight", n, 2));
        assert!(!mlp.trains("wte.weight", n, 2));
        assert!(TrainScope::Blocks.trains("h.3.ln_2.weight", n, 2));
        assert!(!TrainScope::Blocks.trains("ln_f.weight", n, 2));
        assert!(TrainScope::All.trains("wte.weight", n, 2));
        // h.10 is not h.1: the block number is parsed, not prefix-matched.
        assert!(mlp.trains("h.10.mlp.c_fc.weight", 11, 1));
        assert!(!mlp.trains("h.1.mlp.c_fc.weight", 11, 1));
    }
}

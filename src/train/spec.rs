//! The training spec (`tailscope train --config FILE.toml`): data, model shape, optimisation and
//! one or more runs (dense, Switch-MoE, CSE) that share everything but their experts. Unknown keys
//! are errors naming the key; paths are relative to the working directory.
//!
//! ```toml
//! [data]
//! corpus = "out/demo/corpus.parquet"   # tokenizer.json beside it unless `tokenizer` is set
//! [model]
//! arch = "gpt"                         # or "bert"
//! n_layer = 4
//! d_model = 128
//! n_head = 4
//! d_ffn = 512
//! max_len = 64
//! [train]
//! steps = 400
//! batch_size = 32
//! [[run]]
//! name = "cse"
//! experts = { kind = "cse", variant = "mof", last_k = 2 }
//! ```
//!
//! Instead of `[model]`, `[base]` starts every run from an existing model (upcycling; see
//! [`BaseSpec`]):
//! ```toml
//! [base]
//! model = "out/fetched/models/SmolLM2-135M-Instruct.Q4_1.gguf"
//! train = "mlp"                        # or "blocks", "all"; the rest is frozen
//! last_k = 2                           # the blocks trained (and given experts)
//! upcycle = false                      # optional: continue the model as it is, experts included
//! ```
//!
//! `[selection]` up-weights the samples of a `tailscope select` table ([`super::selection`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::{Arch, ExpertConfig, ModelConfig};
use crate::train::optim::AdamWConfig;

/// A training spec (TOML): data, model shape (or the base model to start from), training options
/// and the runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// `[data]`.
    pub data: DataSpec,
    /// `[model]`: the shape of a fresh model (give this or `[base]`).
    #[serde(default)]
    pub model: Option<ModelSpec>,
    /// `[base]`: start every run from an existing model instead (give this or `[model]`).
    #[serde(default)]
    pub base: Option<BaseSpec>,
    /// `[train]`.
    #[serde(default)]
    pub train: TrainOptions,
    /// `[selection]`: up-weight the samples of a `tailscope select` table
    /// ([`super::selection`]).
    #[serde(default)]
    pub selection: Option<super::selection::SelectionSpec>,
    /// `[[run]]`: one model per run.
    #[serde(rename = "run")]
    pub runs: Vec<RunSpec>,
}

/// `[data]`: the corpus and its tokenizer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// The corpus table.
    pub corpus: PathBuf,
    /// The tokenizer (default: beside the corpus).
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Validation samples used for perplexity during training (evenly spaced), default 2000.
    #[serde(default = "default_eval_samples")]
    pub eval_samples: usize,
}

/// The model's shape; the vocabulary comes from the tokenizer and the experts from each run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// GPT, BERT or Llama style.
    pub arch: Arch,
    /// Transformer blocks.
    pub n_layer: i64,
    /// Width.
    pub d_model: i64,
    /// Attention heads.
    pub n_head: i64,
    /// Width of the feed-forward layer.
    pub d_ffn: i64,
    /// Longest sequence (positions).
    pub max_len: i64,
    /// Dropout probability.
    #[serde(default)]
    pub dropout: f64,
    /// Output layer tied to the token embedding.
    #[serde(default = "yes")]
    pub tie_embeddings: bool,
}

/// `[base]`: every run starts from this model (a tailscope checkpoint, a Hugging Face folder or a
/// GGUF file) with the run's experts upcycled into its last `last_k` blocks
/// ([`crate::model::upcycle`]); only the parameters `train` names are trained, the rest is frozen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseSpec {
    /// The model to start from.
    pub model: PathBuf,
    /// What is trained (default: the feed-forward layers of the last `last_k` blocks).
    #[serde(default)]
    pub train: TrainScope,
    /// The blocks that are trained and receive the experts (default 2). An expert run's own
    /// `last_k` must equal it, so that every run trains the same blocks.
    #[serde(default = "default_base_last_k")]
    pub last_k: i64,
    /// Truncate training sequences to this many tokens (default: the model's `max_len`).
    #[serde(default)]
    pub max_len: Option<i64>,
    /// Upcycle each run's experts into the base model (default). `false` continues training the
    /// base model as it is, its experts (Switch or initialised CSE) included; the runs then
    /// leave `experts` out.
    #[serde(default = "yes")]
    pub upcycle: bool,
}

/// What a run that starts from a base model trains; the rest is frozen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainScope {
    /// The feed-forward layers of the last `last_k` blocks: their dense MLP, or their experts
    /// with the Switch router (and CSE attention experts). Equal trained and active parameters
    /// per token for dense, Switch and CSE runs.
    #[default]
    Mlp,
    /// The last `last_k` blocks whole (norms, attention, feed-forward).
    Blocks,
    /// Every parameter.
    All,
}

impl TrainScope {
    /// Whether parameter `name` of a model with `n_layer` blocks is trained.
    pub fn trains(self, name: &str, n_layer: i64, last_k: i64) -> bool {
        let layer: Option<i64> = name
            .strip_prefix("h.")
            .and_then(|r| r.split('.').next())
            .and_then(|s| s.parse().ok());
        let top = layer.is_some_and(|l| l >= n_layer - last_k);
        match self {
            TrainScope::All => true,
            TrainScope::Blocks => top,
            TrainScope::Mlp => top && (name.contains(".mlp.") || name.contains(".experts.")),
        }
    }
}

fn default_base_last_k() -> i64 {
    2
}

/// `[train]`: optimisation, checkpoints, cluster dynamics and CSE warm-up; a key left out takes
/// its default ([`TrainOptions::default`]).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainOptions {
    /// Optimiser steps.
    pub steps: u64,
    /// Sequences per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate as a fraction of `lr` (cosine decay).
    pub min_lr_ratio: f64,
    /// Linear warm-up steps.
    pub warmup_steps: u64,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
    /// AdamW's betas, epsilon and weight decay.
    pub adamw: AdamWConfig,
    /// Checkpoint (and validate) every N steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Keep the last k periodic checkpoints ...
    pub keep_last: usize,
    /// ... plus checkpoints at these steps, written whether or not `checkpoint_every` falls on
    /// them, and kept for analysis.
    pub keep_steps: Vec<u64>,
    /// Cluster dynamics (DBSCAN per layer over the probe set) every M steps (0: only at the ends).
    pub dynamics_every: u64,
    /// Validation samples in the fixed probe set of the cluster dynamics.
    pub probe_samples: usize,
    /// Dense warm-up of CSE runs as a fraction of `steps` (paper: ≤ 1%); at least one step for a
    /// fresh model. With `[base]`, 0 clusters the base model's own sequence embeddings before
    /// the first step.
    pub cse_warmup_fraction: f64,
}

fn yes() -> bool {
    true
}
fn default_eval_samples() -> usize {
    2000
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 400,
            batch_size: 32,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 20,
            grad_clip: 1.0,
            adamw: AdamWConfig::default(),
            checkpoint_every: 100,
            keep_last: 2,
            keep_steps: Vec::new(),
            dynamics_every: 100,
            probe_samples: 512,
            cse_warmup_fraction: 0.01,
        }
    }
}

/// `[[run]]`: a named model, which differs from the others only in its experts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// The run's name (its output folder).
    pub name: String,
    /// Dense, Switch or CSE.
    #[serde(default)]
    pub experts: ExpertConfig,
}

impl TrainSpec {
    /// Read and check a spec; TOML errors carry the file and line, unknown keys their name.
    pub fn read(path: &Path) -> Result<TrainSpec> {
        let spec: TrainSpec = crate::io::read_toml(path)?;
        spec.check()
            .map_err(|e| Error::in_file(path, e.to_string()))?;
        Ok(spec)
    }

    /// Check the options and every run's model config.
    pub fn check(&self) -> Result<()> {
        let t = &self.train;
        if t.steps == 0 {
            return Err(Error::invalid("train.steps", "must be at least 1"));
        }
        if t.batch_size == 0 {
            return Err(Error::invalid("train.batch_size", "must be at least 1"));
        }
        if t.lr.is_nan() || t.lr <= 0.0 {
            return Err(Error::invalid("train.lr", "must be positive"));
        }
        if !(0.0..=1.0).contains(&t.cse_warmup_fraction) {
            return Err(Error::invalid(
                "train.cse_warmup_fraction",
                "must be in [0, 1]",
            ));
        }
        if self.runs.is_empty() {
            return Err(Error::invalid("run", "give at least one [[run]]"));
        }
        match (&self.model, &self.base) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "base",
                    "give [model] (a fresh model) or [base] (start from a model), not both",
                ))
            }
            (None, None) => {
                return Err(Error::invalid(
                    "model",
                    "give [model] (the shape of a fresh model) or [base] (a model to start from)",
                ))
            }
            _ => {}
        }
        if let Some(sel) = &self.selection {
            sel.upweight()?;
        }
        if let Some(b) = &self.base {
            if b.last_k < 1 {
                return Err(Error::invalid("base.last_k", "must be at least 1"));
            }
            if b.max_len.is_some_and(|m| m < 2) {
                return Err(Error::invalid("base.max_len", "must be at least 2"));
            }
        }
        let mut names = std::collections::HashSet::new();
        for r in &self.runs {
            if r.name.is_empty() || r.name.contains(['/', '\\']) || !names.insert(r.name.as_str()) {
                return Err(Error::invalid(
                    "run.name",
                    format!("{:?} must be unique, non-empty, without slashes", r.name),
                ));
            }
            match &self.base {
                // The base model's shape is checked when it is read (`upcycle::base_config`).
                Some(b) if !b.upcycle => {
                    if !matches!(r.experts, ExpertConfig::Dense) {
                        return Err(Error::invalid(
                            format!("run {:?}: experts", r.name),
                            "with base.upcycle = false the run continues the base model as it \
                             is (its experts included); leave experts out",
                        ));
                    }
                }
                Some(b) => {
                    let k = match &r.experts {
                        ExpertConfig::Dense => b.last_k,
                        ExpertConfig::Switch(s) => s.last_k,
                        ExpertConfig::Cse(c) => c.last_k,
                    };
                    if k != b.last_k {
                        return Err(Error::invalid(
                            format!("run {:?}: experts.last_k", r.name),
                            format!(
                                "is {k}, base.last_k is {}; with [base] every run trains the same blocks",
                                b.last_k
                            ),
                        ));
                    }
                }
                None => {
                    self.model_config(r, 100)?.validate()?;
                }
            }
        }
        Ok(())
    }

    /// The model config of a run of a fresh model (`[model]`), for a vocabulary of `vocab`
    /// entries. Runs from a `[base]` take the base model's config
    /// ([`crate::train::upcycle::base_config`]).
    pub fn model_config(&self, run: &RunSpec, vocab: i64) -> Result<ModelConfig> {
        let Some(m) = &self.model else {
            return Err(Error::invalid(
                "model",
                "this spec starts from [base]; its shape is the base model's",
            ));
        };
        let cfg = ModelConfig {
            arch: m.arch,
            vocab_size: vocab,
            max_len: m.max_len,
            n_layer: m.n_layer,
            d_model: m.d_model,
            n_head: m.n_head,
            d_ffn: m.d_ffn,
            dropout: m.dropout,
            tie_embeddings: m.tie_embeddings,
            experts: run.experts.clone(),
            ..ModelConfig::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

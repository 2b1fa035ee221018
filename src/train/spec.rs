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

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::{Arch, ExpertConfig, ModelConfig};
use crate::train::optim::AdamWConfig;

/// A training spec (TOML): data, model shape, training options and the runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// `[data]`.
    pub data: DataSpec,
    /// `[model]`.
    pub model: ModelSpec,
    /// `[train]`.
    #[serde(default)]
    pub train: TrainOptions,
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

/// `[train]`: optimisation, checkpoints, cluster dynamics and CSE warm-up.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
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
    /// ... plus these steps, kept for analysis.
    pub keep_steps: Vec<u64>,
    /// Cluster dynamics (DBSCAN per layer over the probe set) every M steps (0: only at the ends).
    pub dynamics_every: u64,
    /// Validation samples in the fixed probe set of the cluster dynamics.
    pub probe_samples: usize,
    /// Dense warm-up of CSE runs as a fraction of `steps` (paper: ≤ 1%); at least one step.
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
        let mut names = std::collections::HashSet::new();
        for r in &self.runs {
            if r.name.is_empty() || r.name.contains(['/', '\\']) || !names.insert(r.name.as_str()) {
                return Err(Error::invalid(
                    "run.name",
                    format!("{:?} must be unique, non-empty, without slashes", r.name),
                ));
            }
            self.model_config(r, 100)?.validate()?;
        }
        Ok(())
    }

    /// The model config of a run, for a vocabulary of `vocab` entries.
    pub fn model_config(&self, run: &RunSpec, vocab: i64) -> Result<ModelConfig> {
        let m = &self.model;
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

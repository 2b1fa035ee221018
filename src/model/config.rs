//! Model configuration: a serde struct read from and written to `config.json` beside the weights,
//! validated once into the invariants the layers rely on (errors name the field).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// GPT-style causal LM, BERT-style masked LM, or a Llama-family causal LM (RMSNorm, rotary
/// positions, grouped-query attention, SwiGLU; see `model::llama`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// GPT-2 style causal LM.
    Gpt,
    /// BERT style masked LM.
    Bert,
    /// Llama style causal LM (RMSNorm, rotary, SwiGLU).
    Llama,
}

impl Arch {
    /// Causal (next-token) language model: GPT and Llama.
    pub fn is_causal(self) -> bool {
        self != Arch::Bert
    }
}

/// The MLP non-linearity of GPT/BERT blocks (Llama blocks use SwiGLU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact GELU (BERT, tailscope's own models).
    #[default]
    Gelu,
    /// The tanh approximation of GELU (GPT-2's `gelu_new`).
    GeluTanh,
}

/// Ids of the special tokens batches are built with (see `batch`). The defaults are those
/// of the tokenizers `corpus ingest` trains; imported models bring their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecialTokens {
    /// Start of a causal sequence.
    pub bos: i64,
    /// Padding.
    pub pad: i64,
    /// Mask (BERT).
    pub mask: i64,
    /// Start of a BERT sequence.
    pub cls: i64,
    /// End of a BERT sequence.
    pub sep: i64,
    /// BERT's random replacement tokens are drawn from `first_regular..vocab_size`.
    pub first_regular: i64,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        SpecialTokens {
            bos: 0,
            pad: 1,
            mask: 2,
            cls: 3,
            sep: 4,
            first_regular: 5,
        }
    }
}

/// Which module of a block a CSE layer turns into experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CseVariant {
    /// Mixture of FFNs: the MLP becomes one expert per cluster.
    Mof,
    /// Mixture of attentions: the self-attention becomes one expert per cluster.
    Moa,
    /// Both.
    Both,
}

/// Switch-Transformer MoE (Fedus et al., 2021): a learned top-1 router per token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    /// Experts per Switch block.
    pub n_experts: i64,
    /// Expert capacity = ceil(capacity_factor · tokens / n_experts); overflow tokens skip the FFN.
    #[serde(default = "default_capacity")]
    pub capacity_factor: f64,
    /// Weight of the load-balancing loss n_experts · Σ_e f_e · P_e.
    #[serde(default = "default_aux")]
    pub aux_weight: f64,
    /// MoE on the last `last_k` blocks.
    #[serde(default = "default_last_k")]
    pub last_k: i64,
}

/// Cluster-guided Sparse Experts (paper notes, "The CSE layer").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CseConfig {
    /// Experts in the FFN (MoF), the attention (MoA) or both.
    #[serde(default = "default_variant")]
    pub variant: CseVariant,
    /// CSE on the last `last_k` blocks (paper: 2).
    #[serde(default = "default_last_k")]
    pub last_k: i64,
    /// Dimension d′ of the Gaussian (Johnson–Lindenstrauss) projection. Open in the paper; 32.
    #[serde(default = "default_proj_dim")]
    pub proj_dim: i64,
    /// Centroid update c ← α c + (1 − α) v′. Open in the paper; 0.99 keeps clusters stable.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Sequences sampled for the DBSCAN initialisation (N). Open; 1024.
    #[serde(default = "default_sample")]
    pub sample: usize,
    /// DBSCAN radius; `None`: chosen by `eps_rule`.
    #[serde(default)]
    pub eps: Option<f64>,
    /// How eps is chosen when not given. Open in the paper.
    #[serde(default)]
    pub eps_rule: EpsRule,
    /// DBSCAN minPts. Open; 5.
    #[serde(default = "default_min_pts")]
    pub min_pts: usize,
    /// Guard rail: clusters smaller than this become noise (dispatched by the same rule).
    #[serde(default = "default_min_cluster")]
    pub min_cluster_size: usize,
    /// Guard rail: keep at most this many (largest) clusters as experts.
    #[serde(default = "default_max_experts")]
    pub max_experts: usize,
    /// Experts per CSE block, set by the initialisation (empty before it: the blocks are dense).
    #[serde(default)]
    pub experts: Vec<i64>,
}

/// How the CSE initialisation picks the DBSCAN radius when `eps` is not set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EpsRule {
    /// The radius (among k-distance quantiles) giving the most clusters of `min_cluster_size`
    /// points (default): the clusters become experts, so the rule looks for them.
    #[default]
    MaxClusters,
    /// The knee of the sorted k-distance curve (Ester et al.'s heuristic).
    Knee,
}

/// Dense FFNs everywhere, Switch-MoE, or CSE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ExpertConfig {
    /// Dense FFNs everywhere.
    #[default]
    Dense,
    /// Switch-MoE in the last blocks.
    Switch(SwitchConfig),
    /// Cluster-guided Sparse Experts in the last blocks.
    Cse(CseConfig),
}

/// The whole model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// GPT, BERT or Llama style.
    pub arch: Arch,
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Longest sequence (positions), special tokens included.
    pub max_len: i64,
    /// Transformer blocks.
    pub n_layer: i64,
    /// Width.
    pub d_model: i64,
    /// Attention heads.
    pub n_head: i64,
    /// Feed-forward width.
    pub d_ffn: i64,
    /// Dropout probability.
    #[serde(default)]
    pub dropout: f64,
    /// Share the input embedding with the output projection.
    #[serde(default = "yes")]
    pub tie_embeddings: bool,
    /// The experts of the last blocks.
    #[serde(default)]
    pub experts: ExpertConfig,
    /// GELU flavour of the MLP (GPT/BERT).
    #[serde(default)]
    pub activation: Activation,
    /// Epsilon of LayerNorm / RMSNorm.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Post-LayerNorm blocks and a LayerNorm on the embeddings, as the original BERT (imported
    /// BERT checkpoints); tailscope's own models are pre-LayerNorm.
    #[serde(default)]
    pub post_norm: bool,
    /// Key/value heads (grouped-query attention, Llama); `None`: as many as query heads.
    #[serde(default)]
    pub n_kv_head: Option<i64>,
    /// Base of the rotary position frequencies (Llama).
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Special-token ids batches are built with.
    #[serde(default)]
    pub special: SpecialTokens,
}

/// A tiny GPT with tailscope's defaults; build real configs with `..ModelConfig::default()`.
impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            arch: Arch::Gpt,
            vocab_size: 256,
            max_len: 64,
            n_layer: 2,
            d_model: 64,
            n_head: 4,
            d_ffn: 256,
            dropout: 0.0,
            tie_embeddings: true,
            experts: ExpertConfig::Dense,
            activation: Activation::Gelu,
            norm_eps: default_norm_eps(),
            post_norm: false,
            n_kv_head: None,
            rope_theta: default_rope_theta(),
            special: SpecialTokens::default(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_capacity() -> f64 {
    1.25
}
fn default_aux() -> f64 {
    0.01
}
fn default_last_k() -> i64 {
    2
}
fn default_variant() -> CseVariant {
    CseVariant::Mof
}
fn default_proj_dim() -> i64 {
    32
}
fn default_alpha() -> f64 {
    0.99
}
fn default_sample() -> usize {
    1024
}
fn default_min_pts() -> usize {
    5
}
fn default_min_cluster() -> usize {
    8
}
fn default_max_experts() -> usize {
    8
}

impl Default for CseConfig {
    fn default() -> Self {
        CseConfig {
            variant: default_variant(),
            last_k: default_last_k(),
            proj_dim: default_proj_dim(),
            alpha: default_alpha(),
            sample: default_sample(),
            eps: None,
            eps_rule: EpsRule::default(),
            min_pts: default_min_pts(),
            min_cluster_size: default_min_cluster(),
            max_experts: default_max_experts(),
            experts: Vec::new(),
        }
    }
}

fn positive(name: &str, v: i64) -> Result<()> {
    if v <= 0 {
        return Err(Error::invalid(
            format!("model.{name}"),
            format!("must be positive, got {v}"),
        ));
    }
    Ok(())
}

impl ModelConfig {
    /// Check the invariants the layers rely on; errors name the field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("max_len", self.max_len),
            ("n_layer", self.n_layer),
            ("d_model", self.d_model),
            ("n_head", self.n_head),
            ("d_ffn", self.d_ffn),
        ] {
            positive(name, v)?;
        }
        if self.d_model % self.n_head != 0 {
            return Err(Error::invalid(
                "model.n_head",
                format!(
                    "d_model {} is not divisible by n_head {}",
                    self.d_model, self.n_head
                ),
            ));
        }
        if let Some(kv) = self.n_kv_head {
            if kv < 1 || self.n_head % kv != 0 {
                return Err(Error::invalid(
                    "model.n_kv_head",
                    format!("must divide n_head {}, got {kv}", self.n_head),
                ));
            }
        }
        if self.norm_eps <= 0.0 {
            return Err(Error::invalid("model.norm_eps", "must be positive"));
        }
        if self.post_norm && self.arch == Arch::Llama {
            return Err(Error::invalid(
                "model.post_norm",
                "Llama blocks are pre-norm (RMSNorm)",
            ));
        }
        self.check_special()?;
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::invalid("model.dropout", "must be in [0, 1)"));
        }
        match &self.experts {
            ExpertConfig::Dense => Ok(()),
            ExpertConfig::Switch(s) => self.check_switch(s),
            ExpertConfig::Cse(c) => self.check_cse(c),
        }
    }

    /// Every special token id lies inside the vocabulary.
    fn check_special(&self) -> Result<()> {
        let sp = self.special;
        for (name, id) in [
            ("bos", sp.bos),
            ("pad", sp.pad),
            ("mask", sp.mask),
            ("cls", sp.cls),
            ("sep", sp.sep),
        ] {
            if id < 0 || id >= self.vocab_size {
                return Err(Error::invalid(
                    format!("model.special.{name}"),
                    format!("id {id} is outside the vocabulary of {}", self.vocab_size),
                ));
            }
        }
        Ok(())
    }

    fn check_switch(&self, s: &SwitchConfig) -> Result<()> {
        if s.n_experts < 1 {
            return Err(Error::invalid(
                "model.experts.n_experts",
                "must be at least 1",
            ));
        }
        if s.capacity_factor <= 0.0 {
            return Err(Error::invalid(
                "model.experts.capacity_factor",
                "must be positive",
            ));
        }
        self.check_last_k(s.last_k)
    }

    fn check_cse(&self, c: &CseConfig) -> Result<()> {
        self.check_last_k(c.last_k)?;
        positive("experts.proj_dim", c.proj_dim)?;
        if !(0.0..=1.0).contains(&c.alpha) {
            return Err(Error::invalid("model.experts.alpha", "must be in [0, 1]"));
        }
        if c.max_experts == 0 {
            return Err(Error::invalid(
                "model.experts.max_experts",
                "must be at least 1",
            ));
        }
        if !c.experts.is_empty() && c.experts.len() as i64 != c.last_k {
            return Err(Error::invalid(
                "model.experts.experts",
                format!("{} entries for last_k = {}", c.experts.len(), c.last_k),
            ));
        }
        if c.experts.iter().any(|&e| e < 1) {
            return Err(Error::invalid(
                "model.experts.experts",
                "every entry must be ≥ 1",
            ));
        }
        Ok(())
    }

    fn check_last_k(&self, k: i64) -> Result<()> {
        if k < 1 || k > self.n_layer {
            return Err(Error::invalid(
                "model.experts.last_k",
                format!("must be in 1..={}, got {k}", self.n_layer),
            ));
        }
        Ok(())
    }

    /// Whether block `layer` carries sparse experts (Switch or CSE).
    pub fn is_sparse_layer(&self, layer: i64) -> bool {
        match &self.experts {
            ExpertConfig::Dense => false,
            ExpertConfig::Switch(s) => layer >= self.n_layer - s.last_k,
            ExpertConfig::Cse(c) => layer >= self.n_layer - c.last_k,
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> i64 {
        self.d_model / self.n_head
    }

    /// Key/value heads (grouped-query attention), n_head unless set.
    pub fn kv_heads(&self) -> i64 {
        self.n_kv_head.unwrap_or(self.n_head)
    }
}

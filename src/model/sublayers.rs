//! The two sublayers of a transformer block, chosen by architecture: self-attention (GPT/BERT's
//! fused-QKV heads in [`super::layers`], Llama's rotary grouped-query heads in [`super::llama`])
//! and the position-wise feed-forward network (GELU MLP or SwiGLU). Kept apart from both so that
//! `layers` (shared primitives) and `llama` (which builds on them) do not import each other.

use tch::{nn, Tensor};

use super::config::{Arch, ModelConfig};
use super::layers::{FusedAttention, GeluMlp};
use super::llama::{LlamaAttention, SwiGlu};
use super::tape::Tape;

/// Self-attention: GPT/BERT's fused-QKV heads, or Llama's (rotary, grouped-query).
#[derive(Debug)]
pub enum Attention {
    /// GPT/BERT fused-QKV heads.
    Fused(FusedAttention),
    /// Llama rotary grouped-query heads.
    Llama(LlamaAttention),
}

impl Attention {
    /// The attention of block `p` for `cfg`'s architecture.
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Attention {
        match cfg.arch {
            Arch::Llama => Attention::Llama(LlamaAttention::new(p, cfg)),
            _ => Attention::Fused(FusedAttention::new(p, cfg)),
        }
    }

    /// `x`: (batch, seq, d_model); `mask`: (batch, seq) bool, true for real tokens.
    pub fn forward_t(&self, x: &Tensor, mask: &Tensor, train: bool, tape: Option<&Tape>) -> Tensor {
        match self {
            Attention::Fused(a) => a.forward_t(x, mask, train, tape),
            Attention::Llama(a) => a.forward_t(x, mask, tape),
        }
    }
}

/// The position-wise feed-forward network: GELU MLP (GPT/BERT) or SwiGLU (Llama).
#[derive(Debug)]
pub enum Mlp {
    /// GELU MLP.
    Gelu(GeluMlp),
    /// SwiGLU.
    SwiGlu(SwiGlu),
}

impl Mlp {
    /// The FFN of block `p` for `cfg`'s architecture.
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Mlp {
        match cfg.arch {
            Arch::Llama => Mlp::SwiGlu(SwiGlu::new(p, cfg)),
            _ => Mlp::Gelu(GeluMlp::new(p, cfg)),
        }
    }

    /// `x`: (..., d_model) → (..., d_model).
    pub fn forward_t(&self, x: &Tensor, train: bool, tape: Option<&Tape>) -> Tensor {
        match self {
            Mlp::Gelu(m) => m.forward_t(x, train, tape),
            Mlp::SwiGlu(m) => m.forward(x, tape),
        }
    }
}

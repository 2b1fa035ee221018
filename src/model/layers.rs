//! The dense building blocks: multi-head self-attention and the GELU MLP. Weight names follow
//! GPT-2's (`c_attn`, `c_proj`, `c_fc`); Linear weights are stored (out, in) as in PyTorch.

use tch::{nn, Tensor};

use super::config::{Arch, ModelConfig};

/// Multi-head self-attention, causal for GPT, bidirectional for BERT; padded keys are masked.
#[derive(Debug)]
pub struct Attention {
    c_attn: nn::Linear,
    c_proj: nn::Linear,
    n_head: i64,
    dropout: f64,
    causal: bool,
}

impl Attention {
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Attention {
        let d = cfg.d_model;
        Attention {
            c_attn: nn::linear(&p / "c_attn", d, 3 * d, Default::default()),
            c_proj: nn::linear(&p / "c_proj", d, d, Default::default()),
            n_head: cfg.n_head,
            dropout: cfg.dropout,
            causal: cfg.arch == Arch::Gpt,
        }
    }

    /// `x`: (batch, seq, d_model); `mask`: (batch, seq) bool, true for real tokens.
    pub fn forward_t(&self, x: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let (b, t, d) = x.size3().expect("attention input is (batch, seq, d_model)");
        let hd = d / self.n_head;
        let qkv = x.apply(&self.c_attn); // (b, t, 3d)
        let split = qkv.split(d, 2);
        // (b, h, t, hd)
        let heads = |z: &Tensor| z.view([b, t, self.n_head, hd]).transpose(1, 2);
        let (q, k, v) = (heads(&split[0]), heads(&split[1]), heads(&split[2]));
        let mut allowed = mask.view([b, 1, 1, t]); // keys that exist
        if self.causal {
            let tril = Tensor::ones([t, t], (tch::Kind::Bool, x.device())).tril(0);
            allowed = allowed.logical_and(&tril.view([1, 1, t, t]));
        }
        let att = q.matmul(&k.transpose(-2, -1)) / (hd as f64).sqrt(); // (b, h, t, t)
        let att = att
            .masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
            .softmax(-1, x.kind())
            .dropout(self.dropout, train);
        let y = att.matmul(&v).transpose(1, 2).contiguous().view([b, t, d]);
        y.apply(&self.c_proj).dropout(self.dropout, train)
    }
}

/// The position-wise feed-forward network: Linear → GELU → Linear.
#[derive(Debug)]
pub struct Mlp {
    c_fc: nn::Linear,
    c_proj: nn::Linear,
    dropout: f64,
}

impl Mlp {
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Mlp {
        Mlp {
            c_fc: nn::linear(&p / "c_fc", cfg.d_model, cfg.d_ffn, Default::default()),
            c_proj: nn::linear(&p / "c_proj", cfg.d_ffn, cfg.d_model, Default::default()),
            dropout: cfg.dropout,
        }
    }

    /// `x`: (..., d_model) → (..., d_model).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Tensor {
        x.apply(&self.c_fc)
            .gelu("none")
            .apply(&self.c_proj)
            .dropout(self.dropout, train)
    }
}

/// Mean of the token states of each sequence over its real tokens: (b, t, d) → (b, d).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.to_kind(x.kind()).unsqueeze(-1); // (b, t, 1)
    (x * &m).sum_dim_intlist(1, false, x.kind())
        / m.sum_dim_intlist(1, false, x.kind()).clamp_min(1.0)
}

//! The dense building blocks: multi-head self-attention and the GELU MLP. Weight names follow
//! GPT-2's (`c_attn`, `c_proj`, `c_fc`); Linear weights are stored (out, in) as in PyTorch.

use tch::{nn, Tensor};

use super::config::{Arch, ModelConfig};
use crate::capture::tape::Tape;

/// A Linear layer that knows its tensor name, so a capture [`Tape`] can attribute gradients.
#[derive(Debug)]
pub struct Lin {
    pub l: nn::Linear,
    /// Path of the layer, e.g. `h.0.attn.c_attn` (tensors `<name>.weight`, `<name>.bias`).
    pub name: String,
}

impl Lin {
    pub fn new(p: nn::Path, i: i64, o: i64, bias: bool) -> Lin {
        let name = p.path("weight");
        let name = name.strip_suffix(".weight").unwrap_or(&name).to_string();
        let cfg = nn::LinearConfig {
            bias,
            ..Default::default()
        };
        Lin {
            l: nn::linear(p, i, o, cfg),
            name,
        }
    }

    pub fn forward(&self, x: &Tensor, tape: Option<&Tape>) -> Tensor {
        let y = x.apply(&self.l);
        match tape {
            Some(t) => {
                let w = format!("{}.weight", self.name);
                let b = self.l.bs.as_ref().map(|_| format!("{}.bias", self.name));
                t.linear(&w, b.as_deref(), x, y)
            }
            None => y,
        }
    }
}

/// A LayerNorm that knows its tensor name (see [`Lin`]).
#[derive(Debug)]
pub struct Norm {
    pub ln: nn::LayerNorm,
    pub name: String,
    d: i64,
}

impl Norm {
    pub fn new(p: nn::Path, d: i64) -> Norm {
        let name = p.path("weight");
        let name = name.strip_suffix(".weight").unwrap_or(&name).to_string();
        Norm {
            ln: nn::layer_norm(p, vec![d], Default::default()),
            name,
            d,
        }
    }

    pub fn forward(&self, x: &Tensor, tape: Option<&Tape>) -> Tensor {
        match (tape, &self.ln.ws, &self.ln.bs) {
            (Some(t), Some(w), Some(b)) => {
                let xhat = x.layer_norm([self.d], None::<Tensor>, None::<Tensor>, 1e-5, false);
                let y = &xhat * w + b;
                t.layer_norm(
                    &format!("{}.weight", self.name),
                    &format!("{}.bias", self.name),
                    &xhat,
                    y,
                )
            }
            _ => x.apply(&self.ln),
        }
    }
}

/// Multi-head self-attention, causal for GPT, bidirectional for BERT; padded keys are masked.
#[derive(Debug)]
pub struct Attention {
    c_attn: Lin,
    c_proj: Lin,
    n_head: i64,
    dropout: f64,
    causal: bool,
}

impl Attention {
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Attention {
        let d = cfg.d_model;
        Attention {
            c_attn: Lin::new(&p / "c_attn", d, 3 * d, true),
            c_proj: Lin::new(&p / "c_proj", d, d, true),
            n_head: cfg.n_head,
            dropout: cfg.dropout,
            causal: cfg.arch == Arch::Gpt,
        }
    }

    /// `x`: (batch, seq, d_model); `mask`: (batch, seq) bool, true for real tokens.
    pub fn forward_t(&self, x: &Tensor, mask: &Tensor, train: bool, tape: Option<&Tape>) -> Tensor {
        let (b, t, d) = x.size3().expect("attention input is (batch, seq, d_model)");
        let hd = d / self.n_head;
        let qkv = self.c_attn.forward(x, tape); // (b, t, 3d)
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
        self.c_proj.forward(&y, tape).dropout(self.dropout, train)
    }
}

/// The position-wise feed-forward network: Linear → GELU → Linear.
#[derive(Debug)]
pub struct Mlp {
    c_fc: Lin,
    c_proj: Lin,
    dropout: f64,
}

impl Mlp {
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Mlp {
        Mlp {
            c_fc: Lin::new(&p / "c_fc", cfg.d_model, cfg.d_ffn, true),
            c_proj: Lin::new(&p / "c_proj", cfg.d_ffn, cfg.d_model, true),
            dropout: cfg.dropout,
        }
    }

    /// `x`: (..., d_model) → (..., d_model).
    pub fn forward_t(&self, x: &Tensor, train: bool, tape: Option<&Tape>) -> Tensor {
        let h = self.c_fc.forward(x, tape).gelu("none");
        self.c_proj.forward(&h, tape).dropout(self.dropout, train)
    }
}

/// Mean of the token states of each sequence over its real tokens: (b, t, d) → (b, d).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.to_kind(x.kind()).unsqueeze(-1); // (b, t, 1)
    (x * &m).sum_dim_intlist(1, false, x.kind())
        / m.sum_dim_intlist(1, false, x.kind()).clamp_min(1.0)
}

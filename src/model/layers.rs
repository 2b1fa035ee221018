//! The dense building blocks: LayerNorm/RMSNorm, multi-head self-attention and the GELU MLP
//! (Llama's attention and SwiGLU live in `llama.rs`, the per-architecture choice in `sublayers.rs`). GPT/BERT weight names follow GPT-2's
//! (`c_attn`, `c_proj`, `c_fc`); Linear weights are stored (out, in) as in PyTorch.

use tch::{nn, Tensor};

use super::config::{Activation, Arch, ModelConfig};
use crate::model::tape::Tape;

/// A Linear layer that knows its tensor name, so a capture [`Tape`] can attribute gradients.
#[derive(Debug)]
pub struct Lin {
    /// The tch layer.
    pub l: nn::Linear,
    /// Path of the layer, e.g. `h.0.attn.c_attn` (tensors `<name>.weight`, `<name>.bias`).
    pub name: String,
}

impl Lin {
    /// A Linear layer `i` → `o` under `p` (its name is `p`'s path).
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

    /// y = x Wᵀ + b, recorded on the tape when there is one.
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

/// A LayerNorm (or, for Llama, an RMSNorm: no centring, no bias) that knows its tensor name
/// (see [`Lin`]).
#[derive(Debug)]
pub struct Norm {
    /// Scale.
    pub weight: Tensor,
    /// Shift (none for RMSNorm).
    pub bias: Option<Tensor>,
    /// Its tensor-name prefix.
    pub name: String,
    d: i64,
    eps: f64,
}

impl Norm {
    /// The norm `cfg` calls for: RMSNorm for Llama, LayerNorm otherwise.
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> Norm {
        let rms = cfg.arch == Arch::Llama;
        let name = p.path("weight");
        let name = name.strip_suffix(".weight").unwrap_or(&name).to_string();
        let d = cfg.d_model;
        Norm {
            weight: p.var("weight", &[d], nn::Init::Const(1.0)),
            bias: (!rms).then(|| p.var("bias", &[d], nn::Init::Const(0.0))),
            name,
            d,
            eps: cfg.norm_eps,
        }
    }

    /// The normalised input x̂ (before the gain and bias).
    fn normalise(&self, x: &Tensor) -> Tensor {
        match self.bias {
            Some(_) => x.layer_norm([self.d], None::<Tensor>, None::<Tensor>, self.eps, false),
            None => {
                let ms = x.square().mean_dim(-1, true, x.kind());
                x * (ms + self.eps).rsqrt()
            }
        }
    }

    /// Normalise the last dimension, recorded on the tape when there is one.
    pub fn forward(&self, x: &Tensor, tape: Option<&Tape>) -> Tensor {
        if let (None, Some(b)) = (tape, &self.bias) {
            // The fused kernel when nothing is recorded.
            return x.layer_norm([self.d], Some(&self.weight), Some(b), self.eps, false);
        }
        let xhat = self.normalise(x);
        let y = match &self.bias {
            Some(b) => &xhat * &self.weight + b,
            None => &xhat * &self.weight,
        };
        match tape {
            Some(t) => {
                let b = self.bias.as_ref().map(|_| format!("{}.bias", self.name));
                t.layer_norm(&format!("{}.weight", self.name), b.as_deref(), &xhat, y)
            }
            None => y,
        }
    }
}

/// Scaled dot-product attention of (b, h, t, hd) heads; `mask` (b, t) marks real keys, `causal`
/// hides later positions. Returns (b, t, h·hd).
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    causal: bool,
    dropout: f64,
    train: bool,
) -> Tensor {
    let (b, h, t, hd) = q.size4().expect("heads are (batch, heads, seq, head_dim)");
    let mut allowed = mask.view([b, 1, 1, t]); // keys that exist
    if causal {
        let tril = Tensor::ones([t, t], (tch::Kind::Bool, q.device())).tril(0);
        allowed = allowed.logical_and(&tril.view([1, 1, t, t]));
    }
    let att = q.matmul(&k.transpose(-2, -1)) / (hd as f64).sqrt(); // (b, h, t, t)
    let att = att
        .masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
        .softmax(-1, q.kind())
        .dropout(dropout, train);
    att.matmul(v)
        .transpose(1, 2)
        .contiguous()
        .view([b, t, h * hd])
}

/// Multi-head self-attention, causal for GPT, bidirectional for BERT; padded keys are masked.
#[derive(Debug)]
pub struct FusedAttention {
    c_attn: Lin,
    c_proj: Lin,
    n_head: i64,
    dropout: f64,
    causal: bool,
}

impl FusedAttention {
    /// Attention of block `p` for `cfg`.
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> FusedAttention {
        let d = cfg.d_model;
        FusedAttention {
            c_attn: Lin::new(&p / "c_attn", d, 3 * d, true),
            c_proj: Lin::new(&p / "c_proj", d, d, true),
            n_head: cfg.n_head,
            dropout: cfg.dropout,
            causal: cfg.arch.is_causal(),
        }
    }

    /// `x`: (batch, seq, d_model); `mask`: (batch, seq), true for real tokens.
    pub fn forward_t(&self, x: &Tensor, mask: &Tensor, train: bool, tape: Option<&Tape>) -> Tensor {
        let (b, t, d) = x.size3().expect("attention input is (batch, seq, d_model)");
        let hd = d / self.n_head;
        let qkv = self.c_attn.forward(x, tape); // (b, t, 3d)
        let split = qkv.split(d, 2);
        // (b, h, t, hd)
        let heads = |z: &Tensor| z.view([b, t, self.n_head, hd]).transpose(1, 2);
        let (q, k, v) = (heads(&split[0]), heads(&split[1]), heads(&split[2]));
        let y = attend(&q, &k, &v, mask, self.causal, self.dropout, train);
        self.c_proj.forward(&y, tape).dropout(self.dropout, train)
    }
}

/// Linear → GELU → Linear.
#[derive(Debug)]
pub struct GeluMlp {
    c_fc: Lin,
    c_proj: Lin,
    dropout: f64,
    approximate: &'static str,
}

/// libtorch's name of the GELU flavour.
pub fn gelu_mode(a: Activation) -> &'static str {
    match a {
        Activation::Gelu => "none",
        Activation::GeluTanh => "tanh",
    }
}

impl GeluMlp {
    /// The MLP of block `p` for `cfg`.
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> GeluMlp {
        GeluMlp {
            c_fc: Lin::new(&p / "c_fc", cfg.d_model, cfg.d_ffn, true),
            c_proj: Lin::new(&p / "c_proj", cfg.d_ffn, cfg.d_model, true),
            dropout: cfg.dropout,
            approximate: gelu_mode(cfg.activation),
        }
    }

    /// `x`: (..., d_model) → (..., d_model).
    pub fn forward_t(&self, x: &Tensor, train: bool, tape: Option<&Tape>) -> Tensor {
        let h = self.c_fc.forward(x, tape).gelu(self.approximate);
        self.c_proj.forward(&h, tape).dropout(self.dropout, train)
    }
}

/// Mean of the token states of each sequence over its real tokens: (b, t, d) → (b, d).
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.to_kind(x.kind()).unsqueeze(-1); // (b, t, 1)
    (x * &m).sum_dim_intlist(1, false, x.kind())
        / m.sum_dim_intlist(1, false, x.kind()).clamp_min(1.0)
}

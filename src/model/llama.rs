//! The Llama-family block parts (Touvron et al., 2023; as in Hugging Face's `LlamaForCausalLM`):
//! rotary position embeddings on queries and keys (the "rotate half" layout: the first and second
//! halves of each head's dimensions form the pairs), grouped-query attention (each key/value head
//! serves `n_head / n_kv_head` consecutive query heads), and the SwiGLU feed-forward network
//! `down(silu(gate(x)) · up(x))`. No biases. RMSNorm is `layers::Norm` for `Arch::Llama`.
//!
//! Tensor names: `h.{i}.attn.{q,k,v,o}_proj.weight`, `h.{i}.mlp.{gate,up,down}_proj.weight`,
//! `h.{i}.ln_1.weight` (before attention), `h.{i}.ln_2.weight` (before the MLP), `ln_f.weight`.

use tch::{nn, Kind, Tensor};

use super::config::ModelConfig;
use super::layers::{attend, Lin};
use crate::model::tape::Tape;

/// Causal self-attention with rotary positions and grouped-query heads.
#[derive(Debug)]
pub struct LlamaAttention {
    q_proj: Lin,
    k_proj: Lin,
    v_proj: Lin,
    o_proj: Lin,
    n_head: i64,
    n_kv_head: i64,
    head_dim: i64,
    theta: f64,
}

impl LlamaAttention {
    /// Attention of block `p` for `cfg`.
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> LlamaAttention {
        let (d, hd, kv) = (cfg.d_model, cfg.head_dim(), cfg.kv_heads());
        LlamaAttention {
            q_proj: Lin::new(&p / "q_proj", d, cfg.n_head * hd, false),
            k_proj: Lin::new(&p / "k_proj", d, kv * hd, false),
            v_proj: Lin::new(&p / "v_proj", d, kv * hd, false),
            o_proj: Lin::new(&p / "o_proj", cfg.n_head * hd, d, false),
            n_head: cfg.n_head,
            n_kv_head: kv,
            head_dim: hd,
            theta: cfg.rope_theta,
        }
    }

    /// `x`: (batch, seq, d_model), right-padded (positions count from 0 in every row).
    pub fn forward_t(&self, x: &Tensor, mask: &Tensor, tape: Option<&Tape>) -> Tensor {
        let (b, t, _) = x.size3().expect("attention input is (batch, seq, d_model)");
        let hd = self.head_dim;
        let heads = |z: Tensor, h: i64| z.view([b, t, h, hd]).transpose(1, 2);
        let q = heads(self.q_proj.forward(x, tape), self.n_head);
        let k = heads(self.k_proj.forward(x, tape), self.n_kv_head);
        let v = heads(self.v_proj.forward(x, tape), self.n_kv_head);
        let (cos, sin) = rotary(t, hd, self.theta, x.kind(), x.device());
        let (q, k) = (rotate(&q, &cos, &sin), rotate(&k, &cos, &sin));
        let rep = self.n_head / self.n_kv_head;
        let (k, v) = if rep > 1 {
            (
                k.repeat_interleave_self_int(rep, 1, None),
                v.repeat_interleave_self_int(rep, 1, None),
            )
        } else {
            (k, v)
        };
        let y = attend(&q, &k, &v, mask, true, 0.0, false);
        self.o_proj.forward(&y, tape)
    }
}

/// cos and sin of the rotary angles, (t, head_dim) each: angle(p, i) = p · θ^(−2i/hd) for the
/// first half of the dimensions, repeated for the second. Frequencies are formed in float32, as
/// Hugging Face does, then cast.
pub fn rotary(t: i64, hd: i64, theta: f64, kind: Kind, device: tch::Device) -> (Tensor, Tensor) {
    let i = Tensor::arange_start_step(0, hd, 2, (Kind::Float, device)) / hd as f64;
    let inv_freq = (i * -(theta.ln())).exp(); // θ^(−2i/hd)
    let pos = Tensor::arange(t, (Kind::Float, device));
    let freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0); // (t, hd/2)
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
}

/// x · cos + rotate_half(x) · sin, where rotate_half(x) = (−x₂, x₁) for the halves x₁, x₂.
pub fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    let rot = Tensor::cat(&[&(-x2), &x1], -1);
    x * cos + rot * sin
}

/// SwiGLU feed-forward network.
#[derive(Debug)]
pub struct SwiGlu {
    gate_proj: Lin,
    up_proj: Lin,
    down_proj: Lin,
}

impl SwiGlu {
    /// The SwiGLU of block `p` for `cfg`.
    pub fn new(p: nn::Path, cfg: &ModelConfig) -> SwiGlu {
        SwiGlu {
            gate_proj: Lin::new(&p / "gate_proj", cfg.d_model, cfg.d_ffn, false),
            up_proj: Lin::new(&p / "up_proj", cfg.d_model, cfg.d_ffn, false),
            down_proj: Lin::new(&p / "down_proj", cfg.d_ffn, cfg.d_model, false),
        }
    }

    /// `x`: (..., d_model) → (..., d_model).
    pub fn forward(&self, x: &Tensor, tape: Option<&Tape>) -> Tensor {
        let h = self.gate_proj.forward(x, tape).silu() * self.up_proj.forward(x, tape);
        self.down_proj.forward(&h, tape)
    }
}

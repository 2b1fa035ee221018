//! Switch-Transformer MoE FFN (Fedus et al., 2021): a learned router picks one expert per token
//! (top-1), the expert's output is scaled by the router probability, experts have a capacity of
//! ceil(capacity_factor · tokens / n_experts) and overflow tokens skip the FFN (the residual carries
//! them). The load-balancing loss is n_experts · Σ_e f_e · P_e, where f_e is the fraction of tokens
//! whose top choice is e and P_e the mean router probability of e. Routing stays on tensors.

use tch::{nn, Kind, Tensor};

use super::config::{ModelConfig, SwitchConfig};
use super::layers::Lin;
use super::sublayers::Mlp;
use crate::model::tape::Tape;

/// A Switch-MoE feed-forward layer: a top-1 router and its expert FFNs.
#[derive(Debug)]
pub struct SwitchMoe {
    router: Lin,
    experts: Vec<Mlp>,
    capacity_factor: f64,
}

/// What one Switch layer produced besides its output.
pub struct SwitchOut {
    /// The layer's output.
    pub y: Tensor,
    /// Load-balancing loss (scalar).
    pub aux: Tensor,
    /// Tokens per expert after capacity (n_experts,), i64.
    pub load: Tensor,
    /// Expert of each sequence (batch,), i64: the one its router sent most of the sequence's
    /// tokens to (ties: the lower index). Switch routes tokens; this is for per-sample analyses
    /// (expert isolation), not for the forward pass.
    pub route: Tensor,
}

impl SwitchMoe {
    /// The layer of block `p`.
    pub fn new(p: nn::Path, cfg: &ModelConfig, s: &SwitchConfig) -> SwitchMoe {
        let router = Lin::new(&p / "router", cfg.d_model, s.n_experts, false);
        let experts = (0..s.n_experts)
            .map(|e| Mlp::new(&p / "experts" / e, cfg))
            .collect();
        SwitchMoe {
            router,
            experts,
            capacity_factor: s.capacity_factor,
        }
    }

    /// `x`: (b, t, d), `mask`: (b, t) bool. Padding tokens are not routed. Without `capacity`
    /// (gradient capture) no token is dropped, so a sample's output does not depend on its batch.
    pub fn forward_t(
        &self,
        x: &Tensor,
        mask: &Tensor,
        train: bool,
        capacity: bool,
        tape: Option<&Tape>,
    ) -> SwitchOut {
        let (b, t, d) = x.size3().expect("switch input is (batch, seq, d_model)");
        let n_exp = self.experts.len() as i64;
        let flat = x.reshape([b * t, d]);
        let valid = mask.reshape([b * t]).nonzero().squeeze_dim(1); // (n,)
        let xv = flat.index_select(0, &valid); // (n, d)
        let n = xv.size()[0];
        let logits = match tape {
            Some(t) => t.with_rows(&valid, || self.router.forward(&xv, Some(t))),
            None => self.router.forward(&xv, None),
        };
        let probs = logits.softmax(-1, x.kind()); // (n, E)
        let (gate, choice) = probs.max_dim(-1, false); // (n,), (n,)
        let capacity = if capacity {
            ((self.capacity_factor * n as f64) / n_exp as f64).ceil() as i64
        } else {
            n
        };
        let mut out = xv.zeros_like();
        let mut load = Vec::with_capacity(self.experts.len());
        for (e, expert) in self.experts.iter().enumerate() {
            let mut sel = choice.eq(e as i64).nonzero().squeeze_dim(1);
            if sel.size()[0] > capacity {
                sel = sel.narrow(0, 0, capacity);
            }
            let kept = sel.size()[0];
            load.push(kept);
            if kept == 0 {
                continue;
            }
            let xe = xv.index_select(0, &sel);
            let ye = match tape {
                Some(t) => t.with_rows(&valid.index_select(0, &sel), || {
                    expert.forward_t(&xe, train, Some(t))
                }),
                None => expert.forward_t(&xe, train, None),
            } * gate.index_select(0, &sel).unsqueeze(1);
            out = out.index_add(0, &sel, &ye);
        }
        let aux = if n > 0 {
            let f = choice
                .one_hot(n_exp)
                .to_kind(x.kind())
                .mean_dim(0, false, x.kind()); // (E,)
            let p_mean = probs.mean_dim(0, false, x.kind()); // (E,)
            (f * p_mean).sum(x.kind()) * n_exp as f64
        } else {
            Tensor::zeros([], (x.kind(), x.device()))
        };
        let y = flat
            .zeros_like()
            .index_copy(0, &valid, &out)
            .view([b, t, d]);
        let votes = Tensor::zeros([b * t, n_exp], (Kind::Float, x.device()))
            .index_copy(0, &valid, &choice.one_hot(n_exp).to_kind(Kind::Float))
            .view([b, t, n_exp])
            .sum_dim_intlist(1, false, Kind::Float);
        SwitchOut {
            y,
            aux,
            load: Tensor::from_slice(&load),
            route: votes.argmax(-1, false),
        }
    }
}

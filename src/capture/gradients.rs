//! Per-sample gradient math from one batch's tape: Σ_t g_t x_tᵀ per sample for a Linear weight
//! (or its ghost factors, or its Kronecker-projected piece), scatter-adds for embeddings,
//! Σ_t g_t ⊙ x̂_t for a LayerNorm gain; and which parameters take ghost kernels.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use super::Method;
use crate::error::Result;
use crate::model::tape::{Record, RecordKind};
use crate::model::Model;

/// A Linear layer's weight (out × in): what ghost kernels and Kronecker projections apply to.
pub(super) fn is_linear_weight(name: &str, t: &Tensor) -> bool {
    name.ends_with(".weight")
        && t.dim() == 2
        && !name.starts_with("wte.")
        && !name.starts_with("wpe.")
}

/// Whether a parameter's kernel comes from ghost factors: Linear weights (Σ_{t,s} (x_it·x_js)
/// (g_it·g_js)) and the token embedding (Σ_{t,s} [id_it = id_js] (g_it·g_js), token matches
/// instead of a (V·d)-wide scatter). `ghost` takes every Linear weight and an untied embedding;
/// `auto` takes them where cheaper than per-sample gradients: T²(in + out) < in·out, T² < V.
/// A tied embedding also carries the output layer's term, T²(V + d) per pair against V·d per
/// sample, so both methods take it only where that is cheaper.
pub(super) fn ghost_for(method: Method, name: &str, t: &Tensor, max_len: i64, tied: bool) -> bool {
    if t.dim() != 2 {
        return false;
    }
    let s = t.size();
    let t2 = max_len * max_len;
    let linear = is_linear_weight(name, t);
    let cheaper = t2 * (s[0] + s[1]) < s[0] * s[1];
    if name == "wte.weight" {
        return match (method, tied) {
            (Method::Ghost | Method::Auto, true) => cheaper,
            (Method::Ghost, false) => true,
            (Method::Auto, false) => t2 < s[0],
            _ => false,
        };
    }
    match method {
        Method::Ghost => linear,
        Method::Auto => linear && cheaper,
        _ => false,
    }
}

pub(super) enum PerSample {
    Jac(Tensor),
    Ghost(Tensor, Tensor),
}

/// Scatter a record's rows into the padded (b, t, features) grid.
fn grid(v: &Tensor, rows: &Option<Tensor>, b: i64, t: i64) -> Tensor {
    let f = v.size()[1];
    match rows {
        None => v.view([b, t, f]),
        Some(r) => Tensor::zeros([b * t, f], (v.kind(), v.device()))
            .index_copy(0, r, v)
            .view([b, t, f]),
    }
}

/// How each selected parameter's per-sample pieces are formed.
pub(super) struct Layers<'a> {
    pub(super) names: &'a [String],
    /// Ghost factors instead of per-sample gradients.
    pub(super) use_ghost: &'a [bool],
    /// Kronecker factors (P_x, P_g): the projected per-sample gradient instead.
    pub(super) kron: &'a [Option<(Tensor, Tensor)>],
}

/// Per-sample gradients (b, P_p) of every selected parameter from one batch's records.
pub(super) fn per_sample(
    records: &[Record],
    gs: &[Tensor],
    b: i64,
    t: i64,
    model: &Model,
    layers: &Layers,
) -> Result<Vec<Option<PerSample>>> {
    let mut acc = Acc::new(layers.names);
    for (rec, g) in records.iter().zip(gs) {
        let g = if g.defined() {
            g.shallow_clone()
        } else {
            rec.z.zeros_like()
        };
        match &rec.kind {
            RecordKind::Linear { weight, bias } => {
                let grid_g = grid(&g, &rec.rows, b, t); // (b, t, out)
                linear_pieces(
                    &mut acc,
                    rec,
                    grid_g,
                    (weight, bias.as_deref()),
                    layers,
                    (b, t),
                );
            }
            RecordKind::Embedding { weight, positions } => {
                let gg = g.view([b, t, -1]); // (b, t, d)
                embedding_pieces(
                    &mut acc,
                    rec,
                    &gg,
                    (weight, positions.as_deref()),
                    (model, layers),
                    (b, t),
                );
            }
            RecordKind::LayerNorm { weight, bias } => {
                let gg = grid(&g, &rec.rows, b, t);
                if acc.wants(weight).is_some() {
                    let xx = grid(&rec.x, &rec.rows, b, t);
                    let v = (&gg * xx).sum_dim_intlist(1, false, gg.kind());
                    acc.add(weight, PerSample::Jac(v));
                }
                if let Some(bias) = bias.as_ref().filter(|b| acc.wants(b).is_some()) {
                    acc.add(
                        bias,
                        PerSample::Jac(gg.sum_dim_intlist(1, false, gg.kind())),
                    );
                }
            }
        }
    }
    Ok(acc.acc)
}

/// Per-sample pieces of the selected parameters, summed over the records of one pass.
struct Acc<'n> {
    index: BTreeMap<&'n str, usize>,
    acc: Vec<Option<PerSample>>,
}

impl<'n> Acc<'n> {
    fn new(names: &'n [String]) -> Acc<'n> {
        Acc {
            index: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.as_str(), i))
                .collect(),
            acc: (0..names.len()).map(|_| None).collect(),
        }
    }

    /// The position of `name` among the selected parameters.
    fn wants(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    fn add(&mut self, name: &str, value: PerSample) {
        let Some(k) = self.wants(name) else {
            return;
        };
        self.acc[k] = Some(match (self.acc[k].take(), value) {
            (None, v) => v,
            (Some(PerSample::Jac(a)), PerSample::Jac(v)) => PerSample::Jac(a + v),
            (Some(PerSample::Ghost(xa, ga)), PerSample::Ghost(x, g)) => {
                // Two calls of one weight: their rows are both part of the sum over positions.
                // A tied embedding's token ids meet the output layer's gradients (b, t, V):
                // the ids become one-hot rows of that width.
                let (ga, g) = match (ga.kind() == Kind::Int64, g.kind() == Kind::Int64) {
                    (true, false) => (one_hot(&ga, &g), g),
                    (false, true) => {
                        let g = one_hot(&g, &ga);
                        (ga, g)
                    }
                    _ => (ga, g),
                };
                PerSample::Ghost(Tensor::cat(&[xa, x], 1), Tensor::cat(&[ga, g], 1))
            }
            (Some(a), _) => a,
        });
    }
}

/// Token ids (b, t) as one-hot rows (b, t, V) in the kind and on the device of `like` (b, t', V).
fn one_hot(ids: &Tensor, like: &Tensor) -> Tensor {
    let v = like.size()[2];
    ids.one_hot(v).to_kind(like.kind()).to_device(like.device())
}

/// A Linear call: weight gradients Σ_t g_t x_tᵀ per sample (or ghost factors), bias Σ_t g_t.
fn linear_pieces(
    acc: &mut Acc,
    rec: &Record,
    gg: Tensor,
    (weight, bias): (&str, Option<&str>),
    layers: &Layers,
    (b, t): (i64, i64),
) {
    if let Some(k) = acc.wants(weight) {
        let xx = grid(&rec.x, &rec.rows, b, t); // (b, t, in)
        if let Some((px, pg)) = &layers.kron[k] {
            // Σ_t (P_gᵀ g_t) ⊗ (P_xᵀ x_t): (b, k₂·k₁), the (out × in) gradient never formed.
            let (xp, gp) = (xx.matmul(px), gg.matmul(pg));
            let gw = Tensor::einsum("btl,btk->blk", &[&gp, &xp], None::<i64>);
            acc.add(weight, PerSample::Jac(gw.reshape([b, -1])));
        } else if layers.use_ghost[k] {
            acc.add(weight, PerSample::Ghost(xx, gg.shallow_clone()));
        } else {
            let gw = Tensor::einsum("bto,bti->boi", &[&gg, &xx], None::<i64>);
            acc.add(weight, PerSample::Jac(gw.reshape([b, -1])));
        }
    }
    if let Some(bn) = bias.filter(|bn| acc.wants(bn).is_some()) {
        acc.add(bn, PerSample::Jac(gg.sum_dim_intlist(1, false, gg.kind())));
    }
}

/// An embedding call: token-embedding rows scattered by id per sample, position rows padded
/// to max_len.
fn embedding_pieces(
    acc: &mut Acc,
    rec: &Record,
    gg: &Tensor,
    (weight, positions): (&str, Option<&str>),
    (model, layers): (&Model, &Layers),
    (b, t): (i64, i64),
) {
    let d = gg.size()[2];
    let ghost = acc.wants(weight).map(|k| layers.use_ghost[k]);
    if ghost == Some(true) {
        // Ghost factors: the output gradients and the token ids (matched, never scattered).
        acc.add(
            weight,
            PerSample::Ghost(gg.shallow_clone(), rec.x.view([b, t]).to_kind(Kind::Int64)),
        );
    } else if ghost == Some(false) {
        let v = model.cfg.vocab_size;
        let ids = rec.x.view([b, t]);
        let offs = Tensor::arange(b, (tch::Kind::Int64, ids.device())).unsqueeze(1) * v;
        let flat = (ids + offs).reshape([-1]);
        let ge = Tensor::zeros([b * v, d], (gg.kind(), gg.device())).index_add(
            0,
            &flat,
            &gg.reshape([-1, d]),
        );
        acc.add(weight, PerSample::Jac(ge.view([b, -1])));
    }
    if let Some(positions) = positions.filter(|p| acc.wants(p).is_some()) {
        let ml = model.cfg.max_len;
        let gp = Tensor::cat(
            &[
                gg.shallow_clone(),
                Tensor::zeros([b, ml - t, d], (gg.kind(), gg.device())),
            ],
            1,
        );
        acc.add(positions, PerSample::Jac(gp.view([b, -1])));
    }
}

//! Evaluation of a trained model (`tailscope eval`): perplexity per domain and for long-tail
//! against common domains, sequence embeddings at any layer, CSE routing tables, and linear probing
//! ([`probe`]) of frozen embeddings as in the paper.

pub mod evaluate;
pub mod facts;
pub mod probe;

use std::collections::BTreeMap;

use tch::{Device, Tensor};

use crate::batch::{model_batch, step_rng};
use crate::error::Result;
use crate::model::trunk::Trunk;
use crate::model::{token_losses, Model};

/// Summed token loss of a group of samples.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GroupLoss {
    /// The group (`all`, a domain, `long-tail`, `common`).
    pub group: String,
    /// Samples in it.
    pub samples: usize,
    /// Predicted tokens in it.
    pub tokens: u64,
    /// Summed token loss.
    pub loss_sum: f64,
}

impl GroupLoss {
    /// Mean token loss.
    pub fn mean_loss(&self) -> f64 {
        self.loss_sum / self.tokens.max(1) as f64
    }
    /// exp(mean token loss); pseudo-perplexity over masked positions for BERT.
    pub fn perplexity(&self) -> f64 {
        self.mean_loss().exp()
    }
}

/// Per-sample summed loss and predicted-token count, in batches, without gradients. BERT masks
/// are drawn from `seed`, so the figure is reproducible.
pub fn sample_losses(
    model: &Model,
    seqs: &[&[u32]],
    batch: usize,
    device: Device,
    seed: u64,
) -> Result<Vec<(f64, i64)>> {
    sample_losses_with(model, None, seqs, batch, device, seed)
}

/// [`sample_losses`] with the frozen blocks' output from a trunk cache, when given
/// ([`crate::model::trunk`]; the model's blocks below the trunk's layer must be its source's).
pub fn sample_losses_with(
    model: &Model,
    trunk: Option<&Trunk>,
    seqs: &[&[u32]],
    batch: usize,
    device: Device,
    seed: u64,
) -> Result<Vec<(f64, i64)>> {
    let by = Batched {
        model,
        trunk,
        batch,
        device,
        seed,
    };
    by.per_sample(seqs, &|logits, targets| {
        let (_, per_seq, counts) = token_losses(logits, targets);
        (per_seq, counts)
    })
}

/// Each sequence's predictive entropy summed over its predicted tokens, with their count (the
/// same positions, and for BERT the same seeded masks, as [`sample_losses`]): the mean token
/// entropy H = −Σ_v p_v ln p_v, in nats, measures the model's uncertainty without the target.
pub fn sample_entropies(
    model: &Model,
    seqs: &[&[u32]],
    batch: usize,
    device: Device,
    seed: u64,
) -> Result<Vec<(f64, i64)>> {
    let by = Batched {
        model,
        trunk: None,
        batch,
        device,
        seed,
    };
    by.per_sample(seqs, &|logits, targets| {
        let logp = logits
            .to_kind(tch::Kind::Float)
            .log_softmax(-1, tch::Kind::Float);
        let h = -(logp.exp() * &logp).sum_dim_intlist(-1, false, tch::Kind::Float);
        let valid = targets.ne(crate::model::IGNORE).to_kind(tch::Kind::Float);
        (
            (h * &valid).sum_dim_intlist(1, false, tch::Kind::Float),
            valid.sum_dim_intlist(1, false, tch::Kind::Float),
        )
    })
}

/// One sequence's predicted tokens: their positions in the padded input (for a causal model,
/// the index of the token in the text, 0 = first token), their losses and the model's
/// predictive entropy there (nats).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenStats {
    /// Position of each predicted token.
    pub positions: Vec<u32>,
    /// Its loss, −ln p(target).
    pub loss: Vec<f64>,
    /// The entropy of the predicted distribution there.
    pub entropy: Vec<f64>,
}

impl TokenStats {
    /// Mean token loss (NaN without predicted tokens: such a text is not well fitted, it is
    /// unmeasured, and ranks last).
    pub fn mean_loss(&self) -> f64 {
        self.loss.iter().sum::<f64>() / self.loss.len() as f64
    }
    /// Mean token entropy (NaN without predicted tokens).
    pub fn mean_entropy(&self) -> f64 {
        self.entropy.iter().sum::<f64>() / self.entropy.len() as f64
    }
}

/// Every sequence's per-token losses and entropies, from one forward pass per batch (the same
/// positions, and for BERT the same seeded masks, as [`sample_losses`] and
/// [`sample_entropies`], whose sums these are).
pub fn sample_token_stats(
    model: &Model,
    seqs: &[&[u32]],
    batch: usize,
    device: Device,
    seed: u64,
) -> Result<Vec<TokenStats>> {
    let mut out = vec![TokenStats::default(); seqs.len()];
    let order = batch_order(model, seqs);
    tch::no_grad(|| -> Result<()> {
        for (k, idx) in order.chunks(batch.max(1)).enumerate() {
            let chunk: Vec<&[u32]> = idx.iter().map(|&i| seqs[i]).collect();
            let mut rng = step_rng(seed, k as u64);
            let b = model_batch(model, &chunk, &mut rng, device);
            let o = model.forward_t(&b.ids, &b.mask, false, false)?;
            let (rows, t) = b.targets.size2()?;
            let logp = o
                .logits
                .to_kind(tch::Kind::Float)
                .log_softmax(-1, tch::Kind::Float);
            let h = -(logp.exp() * &logp).sum_dim_intlist(-1, false, tch::Kind::Float);
            let valid = b.targets.ne(crate::model::IGNORE);
            let safe = b.targets.where_scalarother(&valid, 0);
            let nll = -logp.gather(-1, &safe.unsqueeze(-1), false).squeeze_dim(-1);
            let cpu = |x: &Tensor| -> Result<Vec<f64>> {
                Ok(Vec::try_from(
                    x.to_kind(tch::Kind::Double)
                        .to_device(Device::Cpu)
                        .view([-1]),
                )?)
            };
            let (nll, h) = (cpu(&nll)?, cpu(&h)?);
            let valid: Vec<bool> = Vec::try_from(valid.to_device(Device::Cpu).view([-1]))?;
            for (r, &i) in idx.iter().enumerate().take(rows as usize) {
                let s = &mut out[i];
                for p in 0..t as usize {
                    let at = r * t as usize + p;
                    if valid[at] {
                        s.positions.push(p as u32);
                        s.loss.push(nll[at]);
                        s.entropy.push(h[at]);
                    }
                }
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// A per-sequence sum and count from each batch's logits and targets.
type PerSequence<'a> = &'a dyn Fn(&Tensor, &Tensor) -> (Tensor, Tensor);

/// How per-sample passes run: the model, its trunk cache if any, batch size, device, seed.
struct Batched<'a> {
    model: &'a Model,
    trunk: Option<&'a Trunk<'a>>,
    batch: usize,
    device: Device,
    seed: u64,
}

impl Batched<'_> {
    fn per_sample(&self, seqs: &[&[u32]], f: PerSequence) -> Result<Vec<(f64, i64)>> {
        let (model, device) = (self.model, self.device);
        let mut out = vec![(0.0, 0); seqs.len()];
        let order = batch_order(model, seqs);
        tch::no_grad(|| -> Result<()> {
            for (k, idx) in order.chunks(self.batch.max(1)).enumerate() {
                let chunk: Vec<&[u32]> = idx.iter().map(|&i| seqs[i]).collect();
                let mut rng = step_rng(self.seed, k as u64);
                let b = model_batch(model, &chunk, &mut rng, device);
                let o = match self.trunk {
                    Some(t) => t.forward(model, &b.ids, &b.mask, &INFERENCE)?,
                    None => model.forward_t(&b.ids, &b.mask, false, false)?,
                };
                let (per_seq, counts) = f(&o.logits, &b.targets);
                let l: Vec<f64> =
                    Vec::try_from(per_seq.to_kind(tch::Kind::Double).to_device(Device::Cpu))?;
                let c: Vec<f64> =
                    Vec::try_from(counts.to_kind(tch::Kind::Double).to_device(Device::Cpu))?;
                for ((&i, l), c) in idx.iter().zip(l).zip(c) {
                    out[i] = (l, c as i64);
                }
            }
            Ok(())
        })?;
        Ok(out)
    }
}

/// An inference pass with logits (no dropout, no capture, no tape).
pub const INFERENCE: crate::model::Forward<'static> = crate::model::Forward {
    train: false,
    capture: false,
    capacity: true,
    tape: None,
    head: true,
};

/// The order sequences are batched in: shortest first for a causal model, whose outputs for a
/// sequence do not depend on the other sequences of its batch, so that batches carry little
/// padding (evaluation of short sentences at a 50k vocabulary was 3–4× slower in given order);
/// as given otherwise (a BERT batch's masks are drawn per batch). Ties keep the given order.
pub fn batch_order(model: &Model, seqs: &[&[u32]]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    if model.cfg.arch.is_causal() {
        order.sort_by_key(|&i| seqs[i].len());
    }
    order
}

/// Group per-sample losses by label, plus a group "all"; sorted by group name with "all" first.
pub fn group_losses(losses: &[(f64, i64)], labels: &[&str]) -> Vec<GroupLoss> {
    let mut acc: BTreeMap<&str, (usize, u64, f64)> = BTreeMap::new();
    let mut all = (0usize, 0u64, 0f64);
    for ((l, c), g) in losses.iter().zip(labels) {
        let e = acc.entry(g).or_default();
        e.0 += 1;
        e.1 += *c as u64;
        e.2 += l;
        all.0 += 1;
        all.1 += *c as u64;
        all.2 += l;
    }
    let mut out = vec![GroupLoss {
        group: "all".into(),
        samples: all.0,
        tokens: all.1,
        loss_sum: all.2,
    }];
    out.extend(acc.into_iter().map(|(g, (s, t, l))| GroupLoss {
        group: g.to_string(),
        samples: s,
        tokens: t,
        loss_sum: l,
    }));
    out
}

/// Sequence embeddings of every sample after 0..=n_layer blocks (each (n, d), float, on the CPU)
/// and the CSE route of every sample at every CSE block, from one forward pass per batch.
#[derive(Debug)]
pub struct Encoded {
    /// Per layer (0 = embeddings, then after each block): (n, d) mean token states, CPU f32.
    pub layers: Vec<Tensor>,
    /// Per routed block: (block, expert of each sequence).
    pub routes: Vec<(i64, Vec<i64>)>,
}

/// Encode `seqs` in batches of `batch`: sequence embeddings per layer and CSE/Switch routes.
pub fn encode(model: &Model, seqs: &[&[u32]], batch: usize, device: Device) -> Result<Encoded> {
    let mut per_layer: Vec<Vec<Tensor>> = (0..=model.cfg.n_layer).map(|_| Vec::new()).collect();
    let mut routes: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let order = batch_order(model, seqs);
    let f = crate::model::Forward {
        train: false,
        capture: true,
        capacity: true,
        tape: None,
        head: false,
    };
    tch::no_grad(|| -> Result<()> {
        for idx in order.chunks(batch.max(1)) {
            let chunk: Vec<&[u32]> = idx.iter().map(|&i| seqs[i]).collect();
            let mut rng = step_rng(0, 0);
            let b = model_batch(model, &chunk, &mut rng, device);
            let o = model.forward_with(&b.ids, &b.mask, &f)?;
            for (slot, e) in per_layer.iter_mut().zip(&o.seq_emb) {
                slot.push(e.to_device(Device::Cpu).to_kind(tch::Kind::Float));
            }
            for (l, r) in o.routes {
                routes
                    .entry(l)
                    .or_default()
                    .extend(Vec::<i64>::try_from(r.to_device(Device::Cpu))?);
            }
        }
        Ok(())
    })?;
    // Back to the given order: row `order[j]` was computed at position j.
    let mut inverse = vec![0i64; order.len()];
    for (j, &i) in order.iter().enumerate() {
        inverse[i] = j as i64;
    }
    let back = Tensor::from_slice(&inverse);
    Ok(Encoded {
        // A TorchScript model returns no hidden states: no layers.
        layers: per_layer
            .iter()
            .filter(|v| !v.is_empty())
            .map(|v| Tensor::cat(v, 0).index_select(0, &back))
            .collect(),
        routes: routes
            .into_iter()
            .map(|(l, r)| (l, inverse.iter().map(|&j| r[j as usize]).collect()))
            .collect(),
    })
}

/// How the sequences of one routed block spread over its experts, per label (domain).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingTable {
    /// The block index.
    pub block: i64,
    /// Row labels, sorted.
    pub labels: Vec<String>,
    /// Number of expert columns.
    pub experts: usize,
    /// Sample counts, (labels × experts).
    pub counts: Vec<Vec<usize>>,
}

impl RoutingTable {
    /// The table of `routes` (one expert per sequence) at `block`, by `labels`.
    pub fn new(block: i64, labels: &[&str], routes: &[i64]) -> RoutingTable {
        let (labels, experts, counts) = routing_table(labels, routes);
        RoutingTable {
            block,
            labels,
            experts,
            counts,
        }
    }
}

/// Count of samples per (label, expert): rows are labels (sorted), columns experts.
pub fn routing_table(labels: &[&str], routes: &[i64]) -> (Vec<String>, usize, Vec<Vec<usize>>) {
    let n_exp = routes.iter().copied().max().map_or(0, |m| m as usize + 1);
    let mut rows: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (l, &r) in labels.iter().zip(routes) {
        rows.entry(l).or_insert_with(|| vec![0; n_exp])[r as usize] += 1;
    }
    let names = rows.keys().map(|s| s.to_string()).collect();
    (names, n_exp, rows.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grouping_and_routing_tables() {
        let losses = [(2.0, 2), (4.0, 2), (3.0, 1)];
        let g = group_losses(&losses, &["a", "b", "a"]);
        assert_eq!(g[0].group, "all");
        assert_eq!((g[0].tokens, g[0].loss_sum), (5, 9.0));
        assert_eq!(
            (g[1].group.as_str(), g[1].tokens, g[1].loss_sum),
            ("a", 3, 5.0)
        );
        assert!((g[2].perplexity() - 2f64.exp()).abs() < 1e-12);
        let (names, k, t) = routing_table(&["x", "y", "x", "x"], &[0, 1, 1, 0]);
        assert_eq!(
            (names, k, t),
            (
                vec!["x".to_string(), "y".to_string()],
                2,
                vec![vec![2, 1], vec![0, 1]]
            )
        );
    }
}

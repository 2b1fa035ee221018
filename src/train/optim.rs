//! AdamW (Loshchilov & Hutter, 2019) with decoupled weight decay, linear warm-up then cosine decay,
//! and global-norm gradient clipping. Written over tensors (rather than tch's optimizer) so that its
//! state, the first and second moments of every parameter, can be checkpointed and a resumed run
//! continues bit for bit.

use std::collections::HashMap;

use tch::{nn, Tensor};

/// Optimiser hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to biases, LayerNorm gains, or
    /// 1-D parameters), as is usual for transformers.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW over the variables of a store, with moments that checkpoint.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Steps taken.
    pub t: i64,
}

impl AdamW {
    /// Over every trainable variable of `vs`, sorted by name.
    pub fn new(vs: &nn::VarStore, cfg: AdamWConfig) -> AdamW {
        let params: Vec<(String, Tensor)> = crate::model::named_variables(vs)
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        let m = params.iter().map(|(_, p)| p.zeros_like()).collect();
        let v = params.iter().map(|(_, p)| p.zeros_like()).collect();
        AdamW {
            cfg,
            params,
            m,
            v,
            t: 0,
        }
    }

    /// Clear every parameter's gradient.
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Scale gradients so their global L2 norm is at most `max_norm`; returns the norm before.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let sq: f64 = self
            .params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(|g| g.defined())
            .map(|g| {
                g.pow_tensor_scalar(2)
                    .sum(tch::Kind::Double)
                    .double_value(&[])
            })
            .sum();
        let norm = sq.sqrt();
        if max_norm > 0.0 && norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            tch::no_grad(|| {
                for (_, p) in &self.params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(scale);
                    }
                }
            });
        }
        norm
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        tch::no_grad(|| {
            for (i, (_, p)) in self.params.iter_mut().enumerate() {
                // A parameter that got no gradient this step (an expert no sequence was routed
                // to) is updated with a zero gradient, so its moments decay the same way whether
                // or not it ever had a gradient tensor: a resumed run then matches a straight one.
                let g = p.grad();
                let g = if g.defined() { g } else { p.zeros_like() };
                let _ = self.m[i]
                    .g_mul_scalar_(c.beta1)
                    .g_add_(&(&g * (1.0 - c.beta1)));
                let _ = self.v[i]
                    .g_mul_scalar_(c.beta2)
                    .g_add_(&(&g * &g * (1.0 - c.beta2)));
                let update = (&self.m[i] / bc1) / ((&self.v[i] / bc2).sqrt() + c.eps);
                if c.weight_decay > 0.0 && p.dim() >= 2 {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = p.g_sub_(&(update * lr));
            }
        });
    }

    /// Moments as named tensors (`<param>.m`, `<param>.v`) for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.push((format!("{name}.m"), self.m[i].shallow_clone()));
            out.push((format!("{name}.v"), self.v[i].shallow_clone()));
        }
        out
    }

    /// Restore moments saved by [`AdamW::state`]; parameters without saved moments keep zeros
    /// (new CSE experts take the moments of the module they were copied from when `alias` maps
    /// them). Returns the names of restored parameters.
    pub fn load_state(
        &mut self,
        saved: &HashMap<String, Tensor>,
        t: i64,
        alias: impl Fn(&str) -> String,
    ) -> crate::Result<()> {
        self.t = t;
        tch::no_grad(|| -> crate::Result<()> {
            for (i, (name, p)) in self.params.iter().enumerate() {
                for (suffix, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                    let key = format!("{name}.{suffix}");
                    let src = saved
                        .get(&key)
                        .or_else(|| saved.get(&format!("{}.{suffix}", alias(name))));
                    if let Some(src) = src {
                        if src.size() != p.size() {
                            return Err(crate::Error::invalid(
                                "optimizer state",
                                format!(
                                    "tensor `{key}` has shape {:?}, expected {:?}",
                                    src.size(),
                                    p.size()
                                ),
                            ));
                        }
                        slot.copy_(src);
                    }
                }
            }
            Ok(())
        })
    }
}

/// Linear warm-up to `lr` over `warmup` steps, then cosine decay to `lr · min_ratio` at `total`.
pub fn lr_at(step: u64, total: u64, warmup: u64, lr: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let min_lr = lr * min_ratio;
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((lr_at(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0, 0.1) - 0.55).abs() < 1e-12);
        assert!((lr_at(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
    }

    /// One AdamW step by hand: g = 2, m = 0.2, v = 0.004 (β = 0.9, 0.999), bias-corrected
    /// m̂ = 2, v̂ = 4, update = 2/(2 + ε) ≈ 1; with lr 0.1 and decay 0.5 on a 2-D weight
    /// w = 1 → 1·(1 − 0.05) − 0.1 = 0.85.
    #[test]
    fn adamw_step_by_hand_and_clipping() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let w = vs.root().ones("w", &[1, 1]);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-12,
            weight_decay: 0.5,
        };
        let mut opt = AdamW::new(&vs, cfg);
        opt.zero_grad();
        (&w * 2.0).sum(tch::Kind::Float).backward();
        opt.step(0.1);
        assert!(
            (w.double_value(&[0, 0]) - 0.85).abs() < 1e-6,
            "{}",
            w.double_value(&[0, 0])
        );
        opt.zero_grad();
        (&w * 30.0).sum(tch::Kind::Float).backward();
        let norm = opt.clip_grad_norm(3.0);
        assert!((norm - 30.0).abs() < 1e-4);
        assert!((w.grad().double_value(&[0, 0]) - 3.0).abs() < 1e-4);
    }
}

//! Linear probing (paper notes, "Experimental protocol"): all model parameters frozen, a
//! multinomial logistic-regression classifier is trained on standardised sequence embeddings of the
//! training split and scored on the validation split. The classifier starts at zero and is fitted
//! full-batch with Adam, so the result is deterministic (the problem is convex).

use std::collections::BTreeMap;

use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// What a linear probe achieved on held-out samples.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProbeResult {
    /// Accuracy on the test samples.
    pub accuracy: f64,
    /// (label, test samples, accuracy)
    pub per_label: Vec<(String, usize, f64)>,
    /// Samples the probe was fitted on.
    pub train_samples: usize,
    /// Samples it was tested on.
    pub test_samples: usize,
}

/// Options of the probe's fit.
#[derive(Debug, Clone, Copy)]
pub struct ProbeOptions {
    /// Full-batch epochs.
    pub epochs: usize,
    /// Learning rate.
    pub lr: f64,
    /// L2 penalty on the weights.
    pub l2: f64,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            epochs: 300,
            lr: 0.05,
            l2: 1e-3,
        }
    }
}

/// Fit on (`train_x` (n, d), `train_y`), score on (`test_x`, `test_y`). Labels are strings; test
/// labels unseen in training count as errors.
pub fn linear_probe(
    train_x: &Tensor,
    train_y: &[String],
    test_x: &Tensor,
    test_y: &[String],
    opts: ProbeOptions,
) -> Result<ProbeResult> {
    if train_y.is_empty() || test_y.is_empty() {
        return Err(Error::invalid(
            "probe",
            "needs samples in both the training and validation splits",
        ));
    }
    let classes: Vec<&String> = {
        let mut c: Vec<&String> = train_y.iter().collect();
        c.sort();
        c.dedup();
        c
    };
    let index: BTreeMap<&String, i64> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (*c, i as i64))
        .collect();
    let y: Vec<i64> = train_y.iter().map(|l| index[l]).collect();
    let y = Tensor::from_slice(&y);
    let x = train_x.to_kind(Kind::Float);
    let mean = x.mean_dim(0, true, Kind::Float);
    let std = x.std_dim(0, false, true).clamp_min(1e-6);
    let x = (&x - &mean) / &std;
    let xt = (test_x.to_kind(Kind::Float) - &mean) / &std;
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let lin = nn::linear(
        vs.root() / "probe",
        x.size()[1],
        classes.len() as i64,
        nn::LinearConfig {
            ws_init: nn::Init::Const(0.0),
            bs_init: Some(nn::Init::Const(0.0)),
            bias: true,
        },
    );
    let mut opt = nn::Adam::default().build(&vs, opts.lr)?;
    for _ in 0..opts.epochs {
        let loss = lin.forward(&x).cross_entropy_for_logits(&y)
            + lin.ws.pow_tensor_scalar(2).sum(Kind::Float) * opts.l2;
        opt.backward_step(&loss);
    }
    let pred: Vec<i64> = Vec::try_from(tch::no_grad(|| lin.forward(&xt).argmax(-1, false)))?;
    let mut per: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut correct = 0usize;
    for (p, l) in pred.iter().zip(test_y) {
        let ok = index.get(l).is_some_and(|&i| i == *p);
        correct += usize::from(ok);
        let e = per.entry(l.as_str()).or_default();
        e.0 += 1;
        e.1 += usize::from(ok);
    }
    Ok(ProbeResult {
        accuracy: correct as f64 / test_y.len() as f64,
        per_label: per
            .into_iter()
            .map(|(l, (n, c))| (l.to_string(), n, c as f64 / n as f64))
            .collect(),
        train_samples: train_y.len(),
        test_samples: test_y.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separable_labels_are_learned() {
        // Class decided by the sign of feature 0; feature 1 is noise.
        let n = 200;
        let xs: Vec<f32> = (0..n)
            .flat_map(|i| {
                [
                    if i % 2 == 0 {
                        1.0 + (i % 7) as f32 * 0.1
                    } else {
                        -1.0 - (i % 5) as f32 * 0.1
                    },
                    (i % 11) as f32,
                ]
            })
            .collect();
        let x = Tensor::from_slice(&xs).view([n as i64, 2]);
        let y: Vec<String> = (0..n)
            .map(|i| {
                if i % 2 == 0 {
                    "pos".into()
                } else {
                    "neg".into()
                }
            })
            .collect();
        let r = linear_probe(&x, &y, &x, &y, ProbeOptions::default()).unwrap();
        assert_eq!(r.accuracy, 1.0);
        // Labels independent of the features: chance level on a held-out half.
        let y2: Vec<String> = (0..n)
            .map(|i| {
                if (i / 2) % 2 == 0 {
                    "a".into()
                } else {
                    "b".into()
                }
            })
            .collect();
        let r2 = linear_probe(
            &x.narrow(0, 0, 100),
            &y2[..100],
            &x.narrow(0, 100, 100),
            &y2[100..],
            ProbeOptions::default(),
        )
        .unwrap();
        assert!(r2.accuracy < 0.8, "{}", r2.accuracy);
    }
}

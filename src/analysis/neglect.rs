//! The neglect score: how likely a sample is to be *neglected* — learnable, and not yet learned —
//! from its per-sample statistics ([`Feature`]), by a logistic model whose weights are fitted on
//! data, not set by hand.
//!
//! Each feature is standardised within the analysed set by its rank, z = Φ⁻¹((rank − ½)/n)
//! (average ranks for ties; a missing value is z = 0, the middle): the score then does not
//! depend on the feature's units or tails, only on where the sample stands among the others.
//! The score is p = σ(b + Σ_f w_f z_f); a sample is flagged when p ≥ the model's threshold.
//!
//! The default model is `analyses/neglect-weights.toml`, compiled into the binary; the file
//! states what it was fitted on (the ranking study's development seeds) and how it was chosen.
//! `--neglect-model FILE` uses another. [`fit_logistic`] fits one (L2-penalised logistic
//! regression by Newton's method; hand-written because a dozen features need a dozen-row solve,
//! not a machine-learning crate).

use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// The default model's file, as compiled in.
pub const DEFAULT_MODEL: &str = include_str!("../../analyses/neglect-weights.toml");

/// A per-sample statistic the score may use (its column name in `analysis.parquet`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Feature {
    /// Mean token loss.
    Loss,
    /// Position-matched excess loss ([`super::features`]).
    ExcessLoss,
    /// Mean token entropy.
    Uncertainty,
    /// Loss minus a reference model's loss (needs `--reference`).
    ReducibleLoss,
    /// Predicted loss decrease under training on the training data ([`super::learnability`]).
    PredictedDecrease,
    /// Ridge leverage of the sample's gradient on the training gradients.
    Support,
    /// Mean positive cosine with the training gradients.
    SupportCos,
    /// Θ_ii of the loss gradient.
    GradNorm,
    /// 1-gram frequency score.
    FreqScore,
    /// |GC| of the sample's domain.
    DomainGc,
    /// Alignment with the principal gradient direction.
    Alignment,
    /// Loss slope over checkpoints (needs `--checkpoints`).
    LossSlope,
    /// Forgetting events over checkpoints (needs `--checkpoints`).
    Forgetting,
    /// Self-influence over checkpoints (needs `--checkpoints`).
    SelfInfluence,
}

impl Feature {
    /// Every feature.
    pub const ALL: [Feature; 14] = [
        Feature::Loss,
        Feature::ExcessLoss,
        Feature::Uncertainty,
        Feature::ReducibleLoss,
        Feature::PredictedDecrease,
        Feature::Support,
        Feature::SupportCos,
        Feature::GradNorm,
        Feature::FreqScore,
        Feature::DomainGc,
        Feature::Alignment,
        Feature::LossSlope,
        Feature::Forgetting,
        Feature::SelfInfluence,
    ];

    /// The column name in `analysis.parquet`.
    pub fn name(self) -> &'static str {
        match self {
            Feature::Loss => "loss",
            Feature::ExcessLoss => "excess_loss",
            Feature::Uncertainty => "uncertainty",
            Feature::ReducibleLoss => "reducible_loss",
            Feature::PredictedDecrease => "predicted_decrease",
            Feature::Support => "support",
            Feature::SupportCos => "support_cos",
            Feature::GradNorm => "grad_norm",
            Feature::FreqScore => "freq_score",
            Feature::DomainGc => "domain_gc",
            Feature::Alignment => "alignment",
            Feature::LossSlope => "loss_slope",
            Feature::Forgetting => "forgetting",
            Feature::SelfInfluence => "self_influence",
        }
    }

    /// Whether the feature comes from the loss-gradient kernel: against other samples
    /// (predicted decrease, support, domain |GC|, alignment) or its diagonal (Θ_ii as
    /// `grad_norm`, and its sum over checkpoints, `self_influence`).
    pub fn is_kernel(self) -> bool {
        matches!(
            self,
            Feature::PredictedDecrease
                | Feature::Support
                | Feature::SupportCos
                | Feature::DomainGc
                | Feature::Alignment
                | Feature::GradNorm
                | Feature::SelfInfluence
        )
    }

    /// Whether the feature's value depends on the arbitrary sign of the principal direction
    /// (the Σu ≥ 0 convention; only `alignment` does): such a feature is never fitted into a
    /// neglect model, whose ranking would otherwise flip with that sign.
    pub fn sign_dependent(self) -> bool {
        self == Feature::Alignment
    }

    /// What a high value means, for the reasons of a flag.
    pub fn describe(self, high: bool) -> &'static str {
        match (self, high) {
            (Feature::Loss, true) => "high loss",
            (Feature::Loss, false) => "low loss",
            (Feature::ExcessLoss, true) => "tokens harder than others at the same position",
            (Feature::ExcessLoss, false) => "tokens easier than others at the same position",
            (Feature::Uncertainty, true) => "the model is uncertain",
            (Feature::Uncertainty, false) => "the model is confident",
            (Feature::ReducibleLoss, true) => "a reference model does much better (reducible)",
            (Feature::ReducibleLoss, false) => "a reference model does no better (irreducible)",
            (Feature::PredictedDecrease, true) => "training on the data lowers its loss fast",
            (Feature::PredictedDecrease, false) => "training on the data barely lowers its loss",
            (Feature::Support, true) => "its gradient is shared by training texts",
            (Feature::Support, false) => "its gradient is isolated from the training texts",
            (Feature::SupportCos, true) => "many training texts point its way",
            (Feature::SupportCos, false) => "few training texts point its way",
            (Feature::GradNorm, true) => "large gradient",
            (Feature::GradNorm, false) => "small gradient",
            (Feature::FreqScore, true) => "common words",
            (Feature::FreqScore, false) => "rare words",
            (Feature::DomainGc, true) => "its domain's gradients agree",
            (Feature::DomainGc, false) => "its domain's gradients disagree",
            (Feature::Alignment, true) => "aligned with the principal direction",
            (Feature::Alignment, false) => "off the principal direction",
            (Feature::LossSlope, true) => "its loss is not falling over training",
            (Feature::LossSlope, false) => "its loss is falling over training",
            (Feature::Forgetting, true) => "often forgotten between checkpoints",
            (Feature::Forgetting, false) => "rarely forgotten",
            (Feature::SelfInfluence, true) => "its own gradient moved it a lot",
            (Feature::SelfInfluence, false) => "its own gradient moved it little",
        }
    }
}

/// Rank-Gaussian standardisation within the set (module docs); NaN → 0.
pub fn rank_gaussian(v: &[f64]) -> Vec<f64> {
    let idx: Vec<usize> = (0..v.len()).filter(|&i| v[i].is_finite()).collect();
    let vals: Vec<f64> = idx.iter().map(|&i| v[i]).collect();
    let r = crate::stats::ranks(&vals);
    let n = vals.len() as f64;
    let mut out = vec![0.0; v.len()];
    for (k, &i) in idx.iter().enumerate() {
        out[i] = crate::stats::normal_quantile((r[k] - 0.5) / n);
    }
    out
}

/// The features of a set of samples, by name, one value per sample (NaN: missing).
pub type FeatureTable = Vec<(Feature, Vec<f64>)>;

/// A fitted neglect model (`analyses/neglect-weights.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeglectModel {
    /// What the weights were fitted on and how the model was chosen, in words.
    pub provenance: String,
    /// The features, in order.
    pub features: Vec<Feature>,
    /// One weight per feature (on rank-Gaussian standardised values).
    pub weights: Vec<f64>,
    /// The intercept b.
    pub intercept: f64,
    /// Flag when σ(b + Σ w z) is at least this.
    pub threshold: f64,
}

/// One sample's neglect score with its reasons.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scored {
    /// σ(b + Σ w z).
    pub probability: f64,
    /// Whether it reaches the threshold.
    pub flagged: bool,
    /// The largest contributions w_f z_f, largest first.
    pub contributions: Vec<Contribution>,
}

/// One feature's part in a sample's score.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Contribution {
    /// The feature.
    pub feature: Feature,
    /// Its value for the sample.
    pub value: f64,
    /// Its rank-Gaussian standardised value.
    pub z: f64,
    /// w_f z_f.
    pub contribution: f64,
}

impl Contribution {
    /// In words, with its value: "high loss (loss 4.213)".
    pub fn words(&self) -> String {
        format!(
            "{} ({} {:.4})",
            self.feature.describe(self.z > 0.0),
            self.feature.name(),
            self.value
        )
    }
}

impl NeglectModel {
    /// The compiled-in default.
    pub fn default_model() -> Result<NeglectModel> {
        NeglectModel::parse(DEFAULT_MODEL, Path::new("analyses/neglect-weights.toml"))
    }

    /// Read a model file.
    pub fn read(path: &Path) -> Result<NeglectModel> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        NeglectModel::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<NeglectModel> {
        let m: NeglectModel =
            toml::from_str(text).map_err(|e| Error::in_file(path, e.to_string()))?;
        if m.features.len() != m.weights.len() || m.features.is_empty() {
            return Err(Error::in_file(
                path,
                format!(
                    "`features` has {} entries and `weights` {}; give one weight per feature",
                    m.features.len(),
                    m.weights.len()
                ),
            ));
        }
        if !(m.threshold > 0.0 && m.threshold < 1.0) {
            return Err(Error::in_file(path, "`threshold` must lie in (0, 1)"));
        }
        Ok(m)
    }

    /// Write the model as TOML.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text =
            toml::to_string(self).map_err(|e| Error::invalid("neglect model", e.to_string()))?;
        crate::io::write_atomic(path, text.as_bytes())
    }

    /// The linear predictor b + Σ w z of every sample of `table` (which must hold every feature
    /// of the model; `flag` names where they come from in an error).
    pub fn logits(&self, table: &FeatureTable) -> Result<Vec<f64>> {
        let z = self.standardised(table)?;
        let n = z.first().map_or(0, Vec::len);
        Ok((0..n)
            .map(|i| {
                self.intercept
                    + self
                        .weights
                        .iter()
                        .zip(&z)
                        .map(|(w, zf)| w * zf[i])
                        .sum::<f64>()
            })
            .collect())
    }

    fn standardised(&self, table: &FeatureTable) -> Result<Vec<Vec<f64>>> {
        self.features
            .iter()
            .map(|f| {
                table
                    .iter()
                    .find(|(g, _)| g == f)
                    .map(|(_, v)| rank_gaussian(v))
                    .ok_or_else(|| {
                        Error::invalid(
                            "--neglect-model",
                            format!(
                                "the model uses `{}`, which this analysis lacks{}",
                                f.name(),
                                match f {
                                    Feature::ReducibleLoss => " (give --reference MODEL)",
                                    Feature::LossSlope
                                    | Feature::Forgetting
                                    | Feature::SelfInfluence => " (give --checkpoints DIR)",
                                    Feature::GradNorm
                                    | Feature::PredictedDecrease
                                    | Feature::Support
                                    | Feature::SupportCos => {
                                        " (give --train-samples above 0, or a --neglect-model \
                                         without the learnability statistics)"
                                    }
                                    _ => "",
                                }
                            ),
                        )
                    })
            })
            .collect()
    }

    /// Score every sample, with its three largest contributions.
    pub fn score(&self, table: &FeatureTable) -> Result<Vec<Scored>> {
        let z = self.standardised(table)?;
        let logits = self.logits(table)?;
        Ok(logits
            .iter()
            .enumerate()
            .map(|(i, &l)| {
                let mut c: Vec<Contribution> = self
                    .features
                    .iter()
                    .enumerate()
                    .map(|(k, &f)| Contribution {
                        feature: f,
                        value: table
                            .iter()
                            .find(|(g, _)| *g == f)
                            .map_or(f64::NAN, |(_, v)| v[i]),
                        z: z[k][i],
                        contribution: self.weights[k] * z[k][i],
                    })
                    .collect();
                c.sort_by(|a, b| b.contribution.total_cmp(&a.contribution));
                c.truncate(3);
                let p = sigmoid(l);
                Scored {
                    probability: p,
                    flagged: p >= self.threshold,
                    contributions: c,
                }
            })
            .collect())
    }
}

/// The logistic function.
pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Fit σ(b + Σ w_f x_f) to `labels` by L2-penalised maximum likelihood (penalty λ/2 ‖w‖², the
/// intercept unpenalised), Newton's method to a gradient norm below 1e-10 or 100 steps.
/// `x[f][i]` is feature f of sample i. Returns (weights, intercept).
pub fn fit_logistic(x: &[Vec<f64>], labels: &[bool], lambda: f64) -> Result<(Vec<f64>, f64)> {
    let d = x.len();
    let n = labels.len();
    if n == 0 || x.iter().any(|c| c.len() != n) {
        return Err(Error::invalid(
            "fit",
            "features and labels differ in length",
        ));
    }
    // Design matrix with a leading column of ones (n × (d + 1)).
    let mut flat = Vec::with_capacity(n * (d + 1));
    for i in 0..n {
        flat.push(1.0);
        flat.extend(x.iter().map(|c| c[i]));
    }
    let opts = (Kind::Double, Device::Cpu);
    let xm = Tensor::from_slice(&flat).view([n as i64, d as i64 + 1]);
    let y = Tensor::from_slice(
        &labels
            .iter()
            .map(|&b| f64::from(u8::from(b)))
            .collect::<Vec<_>>(),
    );
    let mut pen = vec![lambda; d + 1];
    pen[0] = 0.0;
    let pen = Tensor::from_slice(&pen);
    let mut beta = Tensor::zeros([d as i64 + 1], opts);
    for _ in 0..100 {
        let p = xm.mv(&beta).sigmoid();
        let grad = xm.tr().mv(&(&p - &y)) + &pen * &beta;
        if grad.norm().double_value(&[]) < 1e-10 {
            break;
        }
        let w: Tensor = &p * (-&p + 1.0);
        let h = xm.tr().matmul(&(&xm * w.unsqueeze(1))) + pen.diag(0);
        let step = Tensor::f_linalg_solve(&h, &grad.unsqueeze(1), true)?.squeeze_dim(1);
        beta -= step;
    }
    let b: Vec<f64> = Vec::try_from(&beta)?;
    Ok((b[1..].to_vec(), b[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_gaussian_is_monotone_symmetric_and_tie_aware() {
        let z = rank_gaussian(&[10.0, f64::NAN, -3.0, 10.0, 0.5]);
        // Finite values -3, 0.5, 10, 10: ranks 1, 2, 3.5, 3.5 of 4.
        assert_eq!(z[1], 0.0);
        assert_eq!(z[0], z[3]);
        assert!(z[2] < z[4] && z[4] < z[0]);
        assert!((z[2] - crate::stats::normal_quantile(0.125)).abs() < 1e-12);
        assert!((z[0] - crate::stats::normal_quantile(0.75)).abs() < 1e-12);
        let s = rank_gaussian(&[1.0, 2.0, 3.0]);
        assert!((s[0] + s[2]).abs() < 1e-12 && s[1].abs() < 1e-12);
    }

    /// The fit's gradient vanishes at the optimum it returns (checked in closed form, not by the
    /// fitting code), and it recovers the sign and rough size of a planted weight.
    #[test]
    fn logistic_fit_is_the_penalised_optimum() {
        let n = 400;
        let mut rng_state = 7u64;
        let mut unif = || {
            rng_state = rng_state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng_state >> 11) as f64 / (1u64 << 53) as f64
        };
        let x0: Vec<f64> = (0..n).map(|_| unif() * 4.0 - 2.0).collect();
        let x1: Vec<f64> = (0..n).map(|_| unif() * 4.0 - 2.0).collect();
        let y: Vec<bool> = (0..n)
            .map(|i| unif() < sigmoid(1.5 * x0[i] - 0.5))
            .collect();
        let lambda = 2.0;
        let (w, b) = fit_logistic(&[x0.clone(), x1.clone()], &y, lambda).unwrap();
        // Stationarity: Σ (p_i − y_i) = 0 and Σ (p_i − y_i) x_fi + λ w_f = 0.
        let p: Vec<f64> = (0..n)
            .map(|i| sigmoid(b + w[0] * x0[i] + w[1] * x1[i]))
            .collect();
        let r: Vec<f64> = (0..n).map(|i| p[i] - f64::from(u8::from(y[i]))).collect();
        assert!(r.iter().sum::<f64>().abs() < 1e-8);
        let g0: f64 = (0..n).map(|i| r[i] * x0[i]).sum::<f64>() + lambda * w[0];
        let g1: f64 = (0..n).map(|i| r[i] * x1[i]).sum::<f64>() + lambda * w[1];
        assert!(g0.abs() < 1e-8 && g1.abs() < 1e-8, "{g0} {g1}");
        assert!(w[0] > 1.0 && w[0] < 2.2 && w[1].abs() < 0.4, "{w:?}");
    }

    #[test]
    fn model_scores_and_explains() {
        let m = NeglectModel {
            provenance: "test".into(),
            features: vec![Feature::Loss, Feature::Support],
            weights: vec![2.0, -1.0],
            intercept: -1.0,
            threshold: 0.5,
        };
        let table: FeatureTable = vec![
            (Feature::Loss, vec![1.0, 5.0, 3.0]),
            (Feature::Support, vec![0.9, 0.1, 0.5]),
            (Feature::Uncertainty, vec![0.0, 0.0, 0.0]),
        ];
        let s = m.score(&table).unwrap();
        // Sample 1: loss rank 3 of 3 (z = Φ⁻¹(5/6)), support rank 1 (z = Φ⁻¹(1/6)).
        let z = crate::stats::normal_quantile(5.0 / 6.0);
        assert!((s[1].probability - sigmoid(-1.0 + 2.0 * z + z)).abs() < 1e-12);
        assert!(s[1].flagged && !s[0].flagged);
        assert_eq!(s[1].contributions[0].feature, Feature::Loss);
        assert_eq!(s[1].contributions[0].value, 5.0);
        assert_eq!(
            s[1].contributions[1].words(),
            "its gradient is isolated from the training texts (support 0.1000)"
        );
        let missing: FeatureTable = vec![(Feature::Loss, vec![1.0])];
        let e = m.score(&missing).unwrap_err().to_string();
        assert!(e.contains("support"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.toml");
        m.write(&p).unwrap();
        assert_eq!(NeglectModel::read(&p).unwrap(), m);
        std::fs::write(&p, "provenance = \"x\"\nfeatures = [\"loss\"]\nweights = []\nintercept = 0.0\nthreshold = 0.5\n").unwrap();
        assert!(NeglectModel::read(&p)
            .unwrap_err()
            .to_string()
            .contains("one weight per feature"));
    }
}

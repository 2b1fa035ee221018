//! Kernel statistics of learnability: how the training data moves each analysed sample's loss.
//!
//! With g_i = ∇_θ ℓ_i, the gradient of sample i's mean token loss over the selected parameters,
//! and a random sample T of m training texts (the *reference pool*), every statistic comes from
//! the loss-gradient cross-kernel Θ(i, j) = g_i · g_j, computed chunk by chunk so that a pool of
//! any size fits the memory budget:
//!
//! - **predicted decrease** d_i = (1/m) Σ_{j∈T} Θ(i, j): under one SGD step of learning rate η on
//!   a batch drawn from the training data, ℓ_i changes by −η d_i to first order (linearised
//!   dynamics); a sample the training data pushes down fast has a large d_i, one it ignores or
//!   pushes up a small or negative one. Units: loss per unit learning rate and step.
//! - **support** (ridge leverage) s_i = k_iᵀ (K_RR + κ I)⁻¹ k_i / Θ_ii, over the first r texts R
//!   of T, with k_i = Θ(R, i) and κ = `ridge` × the mean Θ_jj over R: the share of ‖g_i‖² that
//!   a ridge regression on the training gradients explains, in [0, 1). Directions of the
//!   training gradients with eigenvalue well above κ (an average text's gradient energy, at the
//!   default ridge 1) count fully, those well below it not at all. An isolated gradient (noise,
//!   or knowledge no other text carries) has low support.
//! - **cosine support** c_i = (1/m) Σ_{j∈T} max(0, cos(g_i, g_j)): how many training texts share
//!   the gradient's direction, and how closely.
//! - **neighbours**: the `neighbours` texts of T with the largest cos(g_i, g_j), best first: the
//!   training texts whose updates move sample i most per unit of gradient.
//!
//! When a sample is itself in T (a pool drawn from the training split), its own pair is left out
//! of every statistic.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::capture::job::Job;
use crate::corpus::SplitChoice;
use crate::error::{Error, Result};
use crate::ntk::{kernel, BlockBy};
use crate::progress::Progress;

/// Settings of [`measure`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LearnabilityOptions {
    /// Training texts in the reference pool T (a seeded random draw of the training split).
    pub train_samples: usize,
    /// Training texts captured at a time (memory: one chunk of gradients beside the pool's).
    pub chunk: usize,
    /// Nearest training texts kept per sample.
    pub neighbours: usize,
    /// Texts R of the ridge leverage (the first r of T).
    pub ridge_samples: usize,
    /// κ of the ridge leverage as a multiple of the mean Θ_jj over R.
    pub ridge: f64,
    /// Seed of the draw of T.
    pub sample_seed: u64,
}

impl Default for LearnabilityOptions {
    fn default() -> Self {
        LearnabilityOptions {
            train_samples: 2048,
            chunk: 256,
            neighbours: 5,
            ridge_samples: 256,
            ridge: 1.0,
            sample_seed: 1,
        }
    }
}

impl LearnabilityOptions {
    /// These options with the reference pool drawn by `seed` (0 becomes 1: seed 0 means
    /// "evenly spaced" to the corpus's draws, and the pool should be random).
    pub fn seeded(self, seed: u64) -> LearnabilityOptions {
        LearnabilityOptions {
            sample_seed: seed.max(1),
            ..self
        }
    }

    /// Check the settings, naming the flag of a bad one.
    pub fn check(&self) -> Result<()> {
        if self.train_samples == 0 {
            return Err(Error::invalid("--train-samples", "must be at least 1"));
        }
        if self.chunk == 0 {
            return Err(Error::invalid("--train-chunk", "must be at least 1"));
        }
        if self.neighbours == 0 {
            return Err(Error::invalid("--neighbours", "must be at least 1"));
        }
        if self.ridge_samples == 0 {
            return Err(Error::invalid("--ridge-samples", "must be at least 1"));
        }
        if !(self.ridge.is_finite() && self.ridge > 0.0) {
            return Err(Error::invalid(
                "--ridge",
                format!("must be a positive number, got {}", self.ridge),
            ));
        }
        Ok(())
    }
}

/// Every analysed sample's learnability statistics (module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Learnability {
    /// Corpus indices of the reference pool T.
    pub train_idx: Vec<usize>,
    /// Θ_ii of the loss gradients.
    pub self_kernel: Vec<f64>,
    /// d_i.
    pub predicted_decrease: Vec<f64>,
    /// s_i.
    pub support: Vec<f64>,
    /// c_i.
    pub support_cos: Vec<f64>,
    /// Per sample: (corpus index, cosine) of its nearest texts in T, best first.
    pub neighbours: Vec<Vec<(usize, f64)>>,
}

/// Running sums of [`Learnability`] over chunks of T: fed the cross-kernel of the samples
/// against each chunk, in any order of chunks.
#[derive(Debug, Clone)]
pub struct CrossStats {
    self_k: Vec<f64>,
    sum: Vec<f64>,
    cos_sum: Vec<f64>,
    count: Vec<usize>,
    k: usize,
    best: Vec<Vec<(usize, f64)>>,
}

/// The nearest training texts of every sample: (training text, cosine), best first.
pub type Neighbours = Vec<Vec<(usize, f64)>>;

impl CrossStats {
    /// Sums for samples whose Θ_ii are `self_k`, keeping `neighbours` per sample.
    pub fn new(self_k: Vec<f64>, neighbours: usize) -> CrossStats {
        let n = self_k.len();
        CrossStats {
            self_k,
            sum: vec![0.0; n],
            cos_sum: vec![0.0; n],
            count: vec![0; n],
            k: neighbours,
            best: vec![Vec::new(); n],
        }
    }

    /// Add a chunk: `cross[i][j]` = Θ(sample i, text j), `norms[j]` = Θ_jj, `ids[j]` the text's
    /// corpus index, `own[i]` the sample's own corpus index (its pair is skipped).
    pub fn add(&mut self, cross: &[Vec<f64>], norms: &[f64], ids: &[usize], own: &[usize]) {
        for (i, row) in cross.iter().enumerate() {
            for (j, &kij) in row.iter().enumerate() {
                if ids[j] == own[i] {
                    continue;
                }
                self.sum[i] += kij;
                self.count[i] += 1;
                let denom = (self.self_k[i] * norms[j]).sqrt();
                let cos = if denom > 0.0 { kij / denom } else { 0.0 };
                self.cos_sum[i] += cos.max(0.0);
                let best = &mut self.best[i];
                if best.len() < self.k || best.last().is_some_and(|b| cos > b.1) {
                    let at = best.partition_point(|b| b.1 >= cos);
                    best.insert(at, (ids[j], cos));
                    best.truncate(self.k);
                }
            }
        }
    }

    /// (predicted decrease, cosine support, neighbours): the means over the texts added.
    pub fn finish(self) -> (Vec<f64>, Vec<f64>, Neighbours) {
        let mean = |v: &[f64]| -> Vec<f64> {
            v.iter()
                .zip(&self.count)
                .map(|(s, &c)| if c > 0 { s / c as f64 } else { f64::NAN })
                .collect()
        };
        (mean(&self.sum), mean(&self.cos_sum), self.best)
    }
}

/// Ridge leverage s_i = k_iᵀ (K_RR + κ I)⁻¹ k_i / Θ_ii with κ = `ridge` × mean diag K_RR, for
/// `k_pr` (n × r, float64), `k_rr` (r × r) and the samples' Θ_ii. A sample in R is compared
/// with R less itself (`own_in_r[i]` = its column in R).
pub fn ridge_leverage(
    k_pr: &Tensor,
    k_rr: &Tensor,
    self_k: &[f64],
    ridge: f64,
    own_in_r: &[Option<usize>],
) -> Result<Vec<f64>> {
    let r = k_rr.size()[0];
    let kappa = ridge * k_rr.diagonal(0, 0, 1).mean(Kind::Double).double_value(&[]);
    let kappa = if kappa > 0.0 { kappa } else { 1.0 };
    let eye = Tensor::eye(r, (Kind::Double, Device::Cpu));
    let a = k_rr.to_kind(Kind::Double) + &eye * kappa;
    let solve = |kp: &Tensor, a: &Tensor| -> Result<f64> {
        let x = Tensor::f_linalg_solve(a, &kp.unsqueeze(1), true)?;
        Ok(kp.dot(&x.squeeze_dim(1)).double_value(&[]))
    };
    let mut out = Vec::with_capacity(self_k.len());
    for (i, &kii) in self_k.iter().enumerate() {
        let row = k_pr.get(i as i64).to_kind(Kind::Double);
        let q = match own_in_r.get(i).copied().flatten() {
            None => solve(&row, &a)?,
            Some(c) => {
                let keep: Vec<i64> = (0..r).filter(|&j| j != c as i64).collect();
                let keep = Tensor::from_slice(&keep);
                let sub = a.index_select(0, &keep).index_select(1, &keep);
                solve(&row.index_select(0, &keep), &sub)?
            }
        };
        out.push(if kii > 0.0 { q / kii } else { f64::NAN });
    }
    Ok(out)
}

/// Rows of a (n × c) float64 kernel on the CPU as vectors.
fn rows_of(k: &Tensor) -> Result<Vec<Vec<f64>>> {
    let n = k.size()[0];
    (0..n)
        .map(|i| Ok(Vec::<f64>::try_from(k.get(i).to_kind(Kind::Double))?))
        .collect()
}

/// The learnability statistics of `job`'s samples (its `ids`, corpus rows `job.idx`) against
/// a seeded draw of `opts.train_samples` texts of the training split, loss gradients of the
/// job's parameters captured with the job's options (its output should be the mean token loss).
pub fn measure(
    job: &Job,
    opts: &LearnabilityOptions,
    device: Device,
    progress: &dyn Progress,
) -> Result<Learnability> {
    opts.check()?;
    let mut train_idx = job.corpus.pick_seeded(
        SplitChoice::Train,
        opts.train_samples,
        opts.sample_seed.max(1),
    );
    // The draw comes back in corpus order, and R is its first `ridge_samples`: shuffled (seeded),
    // so that R is a random subset, not the lowest rows (a corpus stored by domain would give
    // the ridge leverage the gradients of its first few domains only).
    {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(
            opts.sample_seed.max(1),
            b"ridge-set",
        ));
        train_idx.shuffle(&mut rng);
    }
    if train_idx.is_empty() {
        return Err(Error::invalid(
            "--train-samples",
            "the corpus has no training split to compare the samples with",
        ));
    }
    let pool = job.capture(&job.ids, "learnability: samples", device, progress)?;
    let self_k = diag(&kernel(&pool, None, BlockBy::None, true)?.total)?;
    let mut stats = CrossStats::new(self_k.clone(), opts.neighbours);
    let r = opts.ridge_samples.min(train_idx.len());
    let mut ridge_parts: Option<(Tensor, Tensor)> = None;
    let mut chunks: Vec<&[usize]> = vec![&train_idx[..r]];
    chunks.extend(train_idx[r..].chunks(opts.chunk));
    progress.start("learnability: reference pool", Some(train_idx.len() as u64));
    let mut done = 0;
    for ids in chunks {
        let seqs: Vec<Vec<u32>> = ids.iter().map(|&i| job.all_ids[i].clone()).collect();
        let cx = job.capture(&seqs, "", device, &crate::progress::Silent)?;
        let cross = kernel(&pool, Some(&cx), BlockBy::None, false)?.total;
        let norms = if ridge_parts.is_none() {
            let k_rr = kernel(&cx, None, BlockBy::None, false)?.total;
            let norms = diag(&k_rr.diagonal(0, 0, 1))?;
            ridge_parts = Some((cross.shallow_clone(), k_rr));
            norms
        } else {
            diag(&kernel(&cx, None, BlockBy::None, true)?.total)?
        };
        stats.add(&rows_of(&cross)?, &norms, ids, &job.idx);
        done += ids.len();
        progress.advance_to(done as u64);
    }
    progress.finish();
    let (k_pr, k_rr) = ridge_parts.ok_or_else(|| Error::invalid("--train-samples", "empty"))?;
    let pos: HashMap<usize, usize> = train_idx[..r]
        .iter()
        .enumerate()
        .map(|(c, &i)| (i, c))
        .collect();
    let own: Vec<Option<usize>> = job.idx.iter().map(|i| pos.get(i).copied()).collect();
    let support = ridge_leverage(&k_pr, &k_rr, &self_k, opts.ridge, &own)?;
    let (predicted_decrease, support_cos, neighbours) = stats.finish();
    Ok(Learnability {
        train_idx,
        self_kernel: self_k,
        predicted_decrease,
        support,
        support_cos,
        neighbours,
    })
}

fn diag(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(
        t.to_kind(Kind::Double).to_device(Device::Cpu).view([-1]),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gradients as explicit rows; every statistic computed directly from them.
    #[test]
    fn statistics_equal_their_direct_computation() {
        let g: Vec<Vec<f64>> = vec![
            vec![1.0, 0.0, 0.5],
            vec![0.2, 1.0, -0.3],
            vec![-0.5, 0.4, 1.0],
        ];
        let t: Vec<Vec<f64>> = vec![
            vec![1.0, 0.1, 0.4],
            vec![0.0, 1.0, 0.0],
            vec![-1.0, -0.2, 0.1],
            vec![0.3, 0.3, 0.3],
            vec![0.9, -0.1, 0.6],
        ];
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let self_k: Vec<f64> = g.iter().map(|a| dot(a, a)).collect();
        let tn: Vec<f64> = t.iter().map(|a| dot(a, a)).collect();
        // Sample 1 is text 103 itself (its pair is left out).
        let ids = [100, 101, 102, 103, 104];
        let own = [7, 103, 9];
        let mut st = CrossStats::new(self_k.clone(), 2);
        // Two chunks, in reverse order: the sums do not depend on the order.
        for range in [3..5, 0..3] {
            let cross: Vec<Vec<f64>> = g
                .iter()
                .map(|a| t[range.clone()].iter().map(|b| dot(a, b)).collect())
                .collect();
            st.add(&cross, &tn[range.clone()], &ids[range.clone()], &own);
        }
        let (d, c, nb) = st.finish();
        for i in 0..3 {
            let js: Vec<usize> = (0..5).filter(|&j| ids[j] != own[i]).collect();
            let want_d = js.iter().map(|&j| dot(&g[i], &t[j])).sum::<f64>() / js.len() as f64;
            let cos = |j: usize| dot(&g[i], &t[j]) / (self_k[i] * tn[j]).sqrt();
            let want_c = js.iter().map(|&j| cos(j).max(0.0)).sum::<f64>() / js.len() as f64;
            assert!((d[i] - want_d).abs() < 1e-12, "d {i}");
            assert!((c[i] - want_c).abs() < 1e-12, "c {i}");
            let mut order = js.clone();
            order.sort_by(|&a, &b| cos(b).total_cmp(&cos(a)));
            let want_nb: Vec<usize> = order[..2].iter().map(|&j| ids[j]).collect();
            assert_eq!(
                nb[i].iter().map(|x| x.0).collect::<Vec<_>>(),
                want_nb,
                "{i}"
            );
        }
        assert!(
            !nb[1].iter().any(|x| x.0 == 103),
            "the sample itself is no neighbour"
        );

        // Ridge leverage against the closed form on the parameter side: the share of ‖g_i‖²
        // that ridge regression of g_i on the rows of R explains, g_iᵀ Rᵀ(R Rᵀ + κI)⁻¹ R g_i.
        let r = &t[..4];
        let to =
            |rows: &[Vec<f64>]| Tensor::from_slice(&rows.concat()).view([rows.len() as i64, 3]);
        let (tg, tr) = (to(&g), to(r));
        let k_pr = tg.matmul(&tr.tr());
        let k_rr = tr.matmul(&tr.tr());
        let own_r = [None, Some(3), None];
        let s = ridge_leverage(&k_pr, &k_rr, &self_k, 0.5, &own_r).unwrap();
        for i in 0..3 {
            let rows: Vec<Vec<f64>> = (0..4)
                .filter(|&j| own_r[i] != Some(j))
                .map(|j| r[j].clone())
                .collect();
            let rt = to(&rows);
            let kappa = 0.5 * (0..4).map(|j| tn[j]).sum::<f64>() / 4.0;
            // Hat matrix on the parameter side: Rᵀ (R Rᵀ + κ I)⁻¹ R = (RᵀR + κI)⁻¹ RᵀR.
            let rtr = rt.tr().matmul(&rt);
            let hat = (&rtr + Tensor::eye(3, (Kind::Double, Device::Cpu)) * kappa)
                .inverse()
                .matmul(&rtr);
            let gi = tg.get(i as i64);
            let want = gi.dot(&hat.matmul(&gi)).double_value(&[]) / self_k[i];
            assert!((s[i] - want).abs() < 1e-10, "s {i}: {} vs {want}", s[i]);
            assert!(s[i] > 0.0 && s[i] < 1.0);
        }
    }
}

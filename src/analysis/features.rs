//! Per-sample statistics of fit that need no kernel: the loss, the model's uncertainty, a loss
//! that is not confounded with length, the reducible loss against a reference model, and
//! trajectory statistics over saved checkpoints.
//!
//! - **loss** ℓ_i: mean token loss.
//! - **uncertainty** H_i: mean token entropy of the predicted distribution (nats).
//! - **excess loss** e_i = (1/|T_i|) Σ_{t∈T_i} (ℓ_{i,t} − μ_{p(t)}): each token's loss against the
//!   mean loss of every analysed token at the same position p (positions from
//!   [`POSITION_BUCKETS`] on share one bucket). The first tokens of any text are hard to predict
//!   (little context), so a short sentence has a high mean loss for being short; its excess
//!   loss compares each of its tokens with tokens that had as little context.
//! - **reducible loss** (RHO-LOSS, Mindermann et al. 2022) ℓ_i − ℓ_i^ref: the loss now minus the
//!   loss of a reference model (trained on held-out data) on the same tokens: what is learnable
//!   and not yet learned, by that reference's standard.
//! - **trajectory** over checkpoints c at steps s_c with learning rates η_c: the least-squares
//!   slope of ℓ_i(c) against s_c (loss per 1,000 steps; negative: being learned), the number of
//!   *forgetting events* (checkpoints after which ℓ_i rose), and the *self-influence*
//!   Σ_c η_c Θ_ii(c) (TracIn, Pruthi et al. 2020: how far the sample's own gradient moved it).

use crate::eval::TokenStats;

/// Positions at or beyond this share one bucket of the position-matched expectation.
pub const POSITION_BUCKETS: usize = 32;

/// Mean token losses.
pub fn mean_losses(stats: &[TokenStats]) -> Vec<f64> {
    stats.iter().map(TokenStats::mean_loss).collect()
}

/// Mean token entropies.
pub fn mean_entropies(stats: &[TokenStats]) -> Vec<f64> {
    stats.iter().map(TokenStats::mean_entropy).collect()
}

/// The mean loss per position bucket over every token of `stats` (module docs).
pub fn position_means(stats: &[TokenStats]) -> Vec<f64> {
    let mut sum = vec![0.0; POSITION_BUCKETS + 1];
    let mut count = vec![0usize; POSITION_BUCKETS + 1];
    for s in stats {
        for (&p, &l) in s.positions.iter().zip(&s.loss) {
            let b = (p as usize).min(POSITION_BUCKETS);
            sum[b] += l;
            count[b] += 1;
        }
    }
    sum.iter()
        .zip(&count)
        .map(|(s, &c)| if c > 0 { s / c as f64 } else { f64::NAN })
        .collect()
}

/// Excess loss of every sample against the position means `mu` ([`position_means`]); NaN for a
/// sample without predicted tokens.
pub fn excess_losses(stats: &[TokenStats], mu: &[f64]) -> Vec<f64> {
    stats
        .iter()
        .map(|s| {
            if s.loss.is_empty() {
                return f64::NAN;
            }
            let total: f64 = s
                .positions
                .iter()
                .zip(&s.loss)
                .map(|(&p, &l)| l - mu[(p as usize).min(POSITION_BUCKETS)])
                .sum();
            total / s.loss.len() as f64
        })
        .collect()
}

/// Least-squares slope of `y` against `x` (NaN for fewer than 2 distinct x).
pub fn slope(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n < 2 {
        return f64::NAN;
    }
    let mx = x[..n].iter().sum::<f64>() / n as f64;
    let my = y[..n].iter().sum::<f64>() / n as f64;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for i in 0..n {
        sxy += (x[i] - mx) * (y[i] - my);
        sxx += (x[i] - mx) * (x[i] - mx);
    }
    if sxx > 0.0 {
        sxy / sxx
    } else {
        f64::NAN
    }
}

/// One sample's trajectory statistics from its losses and Θ_ii at checkpoints (in step order)
/// and the checkpoints' steps and learning rates: (slope per 1,000 steps, forgetting events,
/// self-influence).
pub fn trajectory(losses: &[f64], self_k: &[f64], steps: &[u64], lrs: &[f64]) -> (f64, f64, f64) {
    let x: Vec<f64> = steps.iter().map(|&s| s as f64 / 1000.0).collect();
    let forgetting = losses.windows(2).filter(|w| w[1] > w[0]).count() as f64;
    let influence = self_k.iter().zip(lrs).map(|(k, lr)| k * lr).sum();
    (slope(&x, losses), forgetting, influence)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(pos: &[u32], loss: &[f64]) -> TokenStats {
        TokenStats {
            positions: pos.to_vec(),
            loss: loss.to_vec(),
            entropy: vec![0.5; loss.len()],
        }
    }

    /// A short text whose tokens are as hard as anyone's at their positions has no excess loss,
    /// though its mean loss is the highest; the long text's late, easy tokens do not help it.
    #[test]
    fn excess_loss_compares_tokens_at_the_same_position() {
        let short = ts(&[0, 1], &[6.0, 4.0]);
        let long = ts(&[0, 1, 2, 3, 40], &[6.0, 4.0, 2.0, 1.0, 1.0]);
        let odd = ts(&[0, 1, 2], &[6.0, 5.0, 3.0]);
        let all = [short, long, odd];
        let mu = position_means(&all);
        assert_eq!(mu[0], 6.0);
        assert!((mu[1] - 13.0 / 3.0).abs() < 1e-12);
        assert_eq!(mu[2], 2.5);
        assert_eq!(mu[POSITION_BUCKETS], 1.0);
        let e = excess_losses(&all, &mu);
        let loss = mean_losses(&all);
        assert!(loss[0] > loss[2] && loss[0] > loss[1]);
        // Direct: short (0 + (4 − 13/3))/2; odd (0 + (5 − 13/3) + (3 − 2.5))/3.
        assert!((e[0] - (4.0 - 13.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!((e[2] - ((5.0 - 13.0 / 3.0) + 0.5) / 3.0).abs() < 1e-12);
        assert!(
            e[2] > e[0],
            "the text with harder tokens has more excess loss"
        );
        assert!(excess_losses(&[TokenStats::default()], &mu)[0].is_nan());
        assert_eq!(mean_entropies(&all), vec![0.5; 3]);
    }

    #[test]
    fn trajectory_by_hand() {
        // Losses 3, 2, 2.5, 1 at steps 100..400 (x = 0.1..0.4 thousand): least squares
        // x̄ = 0.25, ȳ = 2.125, Σ(x − x̄)(y − ȳ) = −0.275, Σ(x − x̄)² = 0.05: slope −5.5.
        let (s, f, i) = trajectory(
            &[3.0, 2.0, 2.5, 1.0],
            &[1.0, 2.0, 3.0, 4.0],
            &[100, 200, 300, 400],
            &[0.1, 0.1, 0.05, 0.01],
        );
        assert!((s + 5.5).abs() < 1e-12, "{s}");
        assert_eq!(f, 1.0);
        assert!((i - (0.1 + 0.2 + 0.15 + 0.04)).abs() < 1e-12);
        assert!(slope(&[1.0, 1.0], &[0.0, 1.0]).is_nan());
    }
}

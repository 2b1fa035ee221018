//! Batches for training, evaluation and capture (all three sit above this module). A sample is
//! one corpus row; sequences are truncated to the model's `max_len` and right-padded with `<pad>`.
//!
//! GPT: input `<|endoftext|> t1 … t(n−1)`, targets `t1 … tn`: every real token is predicted.
//! BERT: input `<cls> t1 … tn <sep>`; 15% of the real tokens are chosen (at least one per sample),
//! of which 80% become `<mask>`, 10% a random token, 10% stay; only chosen positions have targets.
//!
//! The sample order of step s is a pure function of (seed, s): epoch e uses the permutation of the
//! training samples drawn from seed ⊕ e, so a resumed run sees exactly the batches it would have.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::model::{ModelConfig, IGNORE};

// Special-token ids come from the model config (`ModelConfig::special`); their defaults are those
// of the tokenizers `corpus ingest` trains (see `corpus::tokenizer`).

/// One batch on a device.
#[derive(Debug)]
pub struct Batch {
    /// (b, t) i64
    pub ids: Tensor,
    /// (b, t) bool, true for real tokens
    pub mask: Tensor,
    /// (b, t) i64, [`IGNORE`] where nothing is predicted
    pub targets: Tensor,
    /// Indices of the samples in the caller's list.
    pub samples: Vec<usize>,
    /// Number of predicted tokens.
    pub n_targets: i64,
}

/// Build a batch from token-id lists for a model of config `cfg` (arch, length limit,
/// vocabulary, special tokens). `rng` drives BERT masking (unused for causal models), row after row.
pub fn make_batch(
    cfg: &ModelConfig,
    seqs: &[&[u32]],
    samples: Vec<usize>,
    rng: &mut ChaCha8Rng,
    device: Device,
) -> Batch {
    let rows = seqs.iter().map(|s| encode_row(cfg, s, rng)).collect();
    pad(rows, samples, cfg.special.pad, device)
}

/// [`make_batch`] for `model`, samples numbered 0..n.
pub fn model_batch(
    model: &crate::model::Model,
    seqs: &[&[u32]],
    rng: &mut ChaCha8Rng,
    device: Device,
) -> Batch {
    make_batch(&model.cfg, seqs, (0..seqs.len()).collect(), rng, device)
}

/// Like [`make_batch`], but row i's BERT mask comes from a RNG seeded by (`seed`, `keys[i]`), so a
/// sample is masked the same way whatever batch it is in (gradient capture compares batch sizes).
pub fn make_batch_keyed(
    cfg: &ModelConfig,
    seqs: &[&[u32]],
    keys: &[u64],
    seed: u64,
    device: Device,
) -> Batch {
    let rows = seqs
        .iter()
        .zip(keys)
        .map(|(s, &k)| encode_row(cfg, s, &mut step_rng(seed, k)))
        .collect();
    pad(rows, (0..seqs.len()).collect(), cfg.special.pad, device)
}

/// Positions of a text of `n` tokens once encoded (truncated to max_len; BERT's [CLS] and
/// [SEP] added): what a batch holding it pads to at least.
pub fn encoded_len(cfg: &ModelConfig, n: usize) -> usize {
    let max_len = cfg.max_len.max(1) as usize;
    if cfg.arch.is_causal() {
        n.clamp(1, max_len)
    } else {
        n.min(max_len.saturating_sub(2)) + 2
    }
}

/// The input row a causal model reads for a text, as [`make_batch`] puts it in its row before
/// padding (`<|endoftext|> t1 … t(n−1)`, cut to `max_len`); `None` for BERT, whose rows depend on
/// the masking draw. What [`crate::model::trunk::TrunkCache`] keys a text's states by.
pub fn causal_row(cfg: &ModelConfig, s: &[u32]) -> Option<Vec<i64>> {
    // A causal row draws nothing from the generator.
    cfg.arch
        .is_causal()
        .then(|| encode_row(cfg, s, &mut step_rng(0, 0)).0)
}

/// Input ids and targets of one sample (see the module docs).
fn encode_row(cfg: &ModelConfig, s: &[u32], rng: &mut ChaCha8Rng) -> (Vec<i64>, Vec<i64>) {
    let max_len = cfg.max_len as usize;
    let sp = cfg.special;
    let toks: Vec<i64> = s.iter().map(|&x| i64::from(x)).collect();
    if cfg.arch.is_causal() {
        let n = toks.len().min(max_len);
        let mut input = vec![sp.bos];
        input.extend_from_slice(&toks[..n.saturating_sub(1)]);
        return (input, toks[..n].to_vec());
    }
    let n = toks.len().min(max_len.saturating_sub(2));
    let mut input = vec![sp.cls];
    input.extend_from_slice(&toks[..n]);
    input.push(sp.sep);
    let mut target = vec![IGNORE; input.len()];
    let mut chosen: Vec<usize> = (1..=n).filter(|_| rng.random::<f64>() < 0.15).collect();
    if chosen.is_empty() && n > 0 {
        chosen.push(rng.random_range(1..=n));
    }
    for &i in &chosen {
        target[i] = input[i];
        let u = rng.random::<f64>();
        if u < 0.8 {
            input[i] = sp.mask;
        } else if u < 0.9 {
            input[i] = rng.random_range(sp.first_regular..cfg.vocab_size.max(sp.first_regular + 1));
        }
    }
    (input, target)
}

/// Right-pad rows into tensors.
fn pad(rows: Vec<(Vec<i64>, Vec<i64>)>, samples: Vec<usize>, pad_id: i64, device: Device) -> Batch {
    let t = rows.iter().map(|r| r.0.len()).max().unwrap_or(1).max(1);
    let b = rows.len();
    let mut ids = vec![pad_id; b * t];
    let mut mask = vec![false; b * t];
    let mut targets = vec![IGNORE; b * t];
    let mut n_targets = 0;
    for (i, (input, target)) in rows.iter().enumerate() {
        for (j, &x) in input.iter().enumerate() {
            ids[i * t + j] = x;
            mask[i * t + j] = true;
        }
        for (j, &y) in target.iter().enumerate() {
            targets[i * t + j] = y;
            n_targets += i64::from(y != IGNORE);
        }
    }
    let shape = [b as i64, t as i64];
    Batch {
        ids: Tensor::from_slice(&ids).view(shape).to_device(device),
        mask: Tensor::from_slice(&mask)
            .view(shape)
            .to_kind(Kind::Bool)
            .to_device(device),
        targets: Tensor::from_slice(&targets).view(shape).to_device(device),
        samples,
        n_targets,
    }
}

/// The deterministic order of training samples: the batch of step s is a pure function of
/// (seed, s), so a resumed run draws exactly the batches it would have drawn.
#[derive(Debug, Clone)]
pub struct Sampler {
    seed: u64,
    draw: Draw,
    cache: Option<(u64, Vec<usize>)>,
}

#[derive(Debug, Clone)]
enum Draw {
    /// Epochs over a pool of sample positions (each position once, or `repeat` times): epoch e
    /// is the permutation of the pool drawn from seed ⊕ e.
    Epochs(Vec<usize>),
    /// Independent draws with replacement, position i with probability ∝ `weights[i]`, from a
    /// generator seeded by (seed, step).
    Weighted(rand::distr::weighted::WeightedIndex<f64>),
}

impl Sampler {
    /// A sampler over `n` training samples, each once per epoch.
    pub fn new(n: usize, seed: u64) -> Sampler {
        Sampler::repeated(&vec![1; n], seed)
    }

    /// Epochs in which sample i appears `repeat[i]` times (a repeat factor; 0 leaves it out).
    /// With every factor 1 this is [`Sampler::new`].
    pub fn repeated(repeat: &[u32], seed: u64) -> Sampler {
        let pool = repeat
            .iter()
            .enumerate()
            .flat_map(|(i, &r)| std::iter::repeat_n(i, r as usize))
            .collect();
        Sampler {
            seed,
            draw: Draw::Epochs(pool),
            cache: None,
        }
    }

    /// Draws with replacement, sample i with probability proportional to `weight[i]` (a
    /// sampling weight). Errors when no weight is positive or one is negative or not finite.
    pub fn weighted(weight: &[f64], seed: u64) -> std::result::Result<Sampler, String> {
        let w = rand::distr::weighted::WeightedIndex::new(weight.iter().copied())
            .map_err(|e| format!("sampling weights: {e}"))?;
        Ok(Sampler {
            seed,
            draw: Draw::Weighted(w),
            cache: None,
        })
    }

    fn perm(&mut self, epoch: u64) -> &[usize] {
        if self.cache.as_ref().map(|c| c.0) != Some(epoch) {
            let mut p = match &self.draw {
                Draw::Epochs(pool) => pool.clone(),
                Draw::Weighted(_) => Vec::new(),
            };
            p.shuffle(&mut ChaCha8Rng::seed_from_u64(
                self.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ));
            self.cache = Some((epoch, p));
        }
        &self.cache.as_ref().expect("set above").1
    }

    /// Sample indices of batch `step` (0-based) of size `batch`.
    pub fn batch(&mut self, step: u64, batch: usize) -> Vec<usize> {
        let n = match &self.draw {
            Draw::Weighted(w) => {
                let mut rng = ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(
                    self.seed,
                    &[b"weighted".as_slice(), &step.to_le_bytes()].concat(),
                ));
                return (0..batch).map(|_| rng.sample(w)).collect();
            }
            Draw::Epochs(pool) => pool.len() as u64,
        };
        if n == 0 {
            return Vec::new();
        }
        let start = step * batch as u64;
        (start..start + batch as u64)
            .map(|k| {
                let (epoch, i) = (k / n, (k % n) as usize);
                self.perm(epoch)[i]
            })
            .collect()
    }
}

/// A RNG for step `step` of a run seeded `seed` (BERT masking).
pub fn step_rng(seed: u64, step: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(seed, &step.to_le_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Arch;

    fn cfg(arch: Arch, max_len: i64) -> ModelConfig {
        ModelConfig {
            arch,
            max_len,
            vocab_size: 100,
            ..ModelConfig::default()
        }
    }
    const BOS: i64 = 0;
    const PAD: i64 = 1;

    #[test]
    fn gpt_batch_shifts_targets_and_pads() {
        let a = [10u32, 11, 12];
        let b = [20u32];
        let mut rng = step_rng(0, 0);
        let batch = make_batch(
            &cfg(Arch::Gpt, 8),
            &[&a, &b],
            vec![0, 1],
            &mut rng,
            Device::Cpu,
        );
        let ids: Vec<i64> = Vec::try_from(batch.ids.view([-1])).unwrap();
        let tg: Vec<i64> = Vec::try_from(batch.targets.view([-1])).unwrap();
        assert_eq!(ids, vec![BOS, 10, 11, BOS, PAD, PAD]);
        assert_eq!(tg, vec![10, 11, 12, 20, IGNORE, IGNORE]);
        assert_eq!(batch.n_targets, 4);
        // truncation to max_len
        let long: Vec<u32> = (0..20).collect();
        let batch = make_batch(&cfg(Arch::Gpt, 5), &[&long], vec![0], &mut rng, Device::Cpu);
        assert_eq!(batch.ids.size(), vec![1, 5]);
    }

    #[test]
    fn bert_batch_masks_some_tokens() {
        let a: Vec<u32> = (10..40).collect();
        let mut rng = step_rng(1, 3);
        let c = cfg(Arch::Bert, 64);
        let batch = make_batch(&c, &[&a], vec![0], &mut rng, Device::Cpu);
        let ids: Vec<i64> = Vec::try_from(batch.ids.view([-1])).unwrap();
        let tg: Vec<i64> = Vec::try_from(batch.targets.view([-1])).unwrap();
        assert_eq!((ids[0], ids[31]), (c.special.cls, c.special.sep));
        assert!(batch.n_targets >= 1);
        for (i, &t) in tg.iter().enumerate() {
            if t != IGNORE {
                assert_eq!(t, a[i - 1] as i64, "targets are the original tokens");
            } else if i > 0 && i < 31 {
                assert_eq!(ids[i], a[i - 1] as i64, "unchosen tokens are unchanged");
            }
        }
    }

    #[test]
    fn sampler_is_a_pure_function_of_step() {
        let mut a = Sampler::new(10, 3);
        let first: Vec<Vec<usize>> = (0..7).map(|s| a.batch(s, 4)).collect();
        let mut b = Sampler::new(10, 3);
        assert_eq!(b.batch(5, 4), first[5]);
        let mut epoch0: Vec<usize> = first[..2].concat();
        epoch0.extend_from_slice(&first[2][..2]);
        epoch0.sort();
        assert_eq!(
            epoch0,
            (0..10).collect::<Vec<_>>(),
            "each epoch is a permutation"
        );
    }

    /// A repeat factor puts a sample that many times in every epoch; a sampling weight makes it
    /// that much more likely per draw; both are pure functions of the step.
    #[test]
    fn up_weighted_samplers() {
        let mut repeat = vec![1u32; 10];
        repeat[3] = 4;
        repeat[7] = 0;
        let mut a = Sampler::repeated(&repeat, 5);
        let epoch: Vec<usize> = (0..12).flat_map(|s| a.batch(s, 1)).collect();
        let count = |i: usize| epoch.iter().filter(|&&x| x == i).count();
        assert_eq!((count(3), count(7), count(0)), (4, 0, 1));
        assert_eq!(Sampler::repeated(&repeat, 5).batch(6, 2), a.batch(6, 2));
        assert_eq!(
            Sampler::repeated(&[1; 10], 3).batch(4, 3),
            Sampler::new(10, 3).batch(4, 3)
        );
        let mut w = vec![1.0; 10];
        w[2] = 9.0;
        let mut b = Sampler::weighted(&w, 5).unwrap();
        let draws: Vec<usize> = (0..1000).flat_map(|s| b.batch(s, 4)).collect();
        let share = draws.iter().filter(|&&x| x == 2).count() as f64 / draws.len() as f64;
        // P = 9/18 = 0.5; 4000 draws give a standard error of 0.008.
        assert!((share - 0.5).abs() < 0.04, "{share}");
        assert_eq!(
            Sampler::weighted(&w, 5).unwrap().batch(17, 4),
            b.batch(17, 4)
        );
        assert_ne!(b.batch(17, 4), b.batch(18, 4));
        assert!(Sampler::weighted(&[0.0, 0.0], 1).is_err());
        assert!(Sampler::weighted(&[1.0, f64::NAN], 1).is_err());
    }
}

//! Fact probes (`tailscope eval --facts PROBES`): did a model acquire the fictional facts of a
//! probe table ([`crate::corpus::facts`])?
//!
//! For every probe and candidate (the answer, then its distractors), the candidate's
//! log-probability given the prompt, log p(c | prompt) = Σ_j log p(c_j | prompt, c_<j), summed
//! over the candidate's tokens (encoded with a leading space, as the word is written after the
//! prompt). A probe's rank is 1 + the number of distractors scored strictly higher than the
//! answer; a fact is *acquired* when its answer ranks first on more than half of its held-out
//! probes (the `seen` probe, a training phrasing, is reported but not counted).
//!
//! Against the model before training (`before`): the gain log p_after − log p_before of the
//! answer, and the *specific* gain, the answer's gain minus the mean gain of its distractors
//! (what the model learnt about this fact rather than about the answer type). Invented facts
//! must rank at chance before training, 1 / (1 + distractors): [`ChanceCheck`] tests the
//! first-rank rate against it, with a normal 95% interval over facts (each fact's rate over its
//! held-out probes is one observation).
//!
//! Only the positions that predict a candidate's tokens go through the output layer: with a
//! 49k-token vocabulary it costs more than several blocks.

use std::collections::BTreeMap;
use std::path::Path;

use polars::prelude::{Column, DataFrame};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::batch::model_batch;
use crate::corpus::facts::{Probe, ProbeSet};
use crate::error::{Error, Result};
use crate::model::trunk::Trunk;
use crate::model::{Model, IGNORE};

/// Probe texts (prompt + candidate) per forward pass.
pub const BATCH: usize = 64;

/// Every probe's candidates as token ids: prompt, then the candidate with a leading space.
#[derive(Debug, Clone)]
pub struct EncodedProbes {
    /// Token ids of each (probe, candidate) text.
    pub seqs: Vec<Vec<u32>>,
    /// Where the candidate starts in its text (the prompt's length in tokens).
    pub starts: Vec<usize>,
    /// (probe, candidate) of each text; candidate 0 is the answer.
    pub owner: Vec<(usize, usize)>,
    /// Candidates per probe.
    pub candidates: Vec<usize>,
}

/// Encode every probe's candidates with `tok`.
pub fn encode(tok: &tokenizers::Tokenizer, probes: &ProbeSet) -> Result<EncodedProbes> {
    let mut texts: Vec<String> = Vec::new();
    for p in &probes.probes {
        texts.push(p.prompt.clone());
        texts.extend(p.candidates().iter().map(|c| format!(" {c}")));
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = crate::corpus::tokenizer::encode_all(tok, &refs)?;
    let mut enc = EncodedProbes {
        seqs: Vec::new(),
        starts: Vec::new(),
        owner: Vec::new(),
        candidates: Vec::new(),
    };
    let mut k = 0;
    for (pi, p) in probes.probes.iter().enumerate() {
        let prompt = &ids[k];
        let n = p.candidates().len();
        for c in 0..n {
            let mut s = prompt.clone();
            s.extend_from_slice(&ids[k + 1 + c]);
            enc.seqs.push(s);
            enc.starts.push(prompt.len());
            enc.owner.push((pi, c));
        }
        enc.candidates.push(n);
        k += 1 + n;
    }
    Ok(enc)
}

impl EncodedProbes {
    /// The input rows a causal model reads for these texts (what a trunk cache is told of).
    pub fn rows(&self, model: &Model) -> Vec<Vec<i64>> {
        self.seqs
            .iter()
            .filter_map(|s| crate::batch::causal_row(&model.cfg, s))
            .collect()
    }
}

/// Each candidate's log-probability given its prompt (summed over its tokens), per probe:
/// `scores[p][c]`, candidate 0 the answer. With `trunk`, the blocks below its layer come from
/// the cache (the model's must be the trunk's source's).
pub fn score(
    model: &Model,
    trunk: Option<&Trunk>,
    enc: &EncodedProbes,
    device: Device,
) -> Result<Vec<Vec<f64>>> {
    if !model.cfg.arch.is_causal() {
        return Err(Error::invalid(
            "--model",
            "fact probes need a causal (GPT or Llama) model: a masked LM does not continue a prompt",
        ));
    }
    if let Some(s) = enc.seqs.iter().find(|s| s.len() as i64 > model.cfg.max_len) {
        return Err(Error::invalid(
            "--facts",
            format!(
                "a probe text of {} tokens exceeds the model's max_len {}",
                s.len(),
                model.cfg.max_len
            ),
        ));
    }
    let mut flat = vec![0.0; enc.seqs.len()];
    let seqs: Vec<&[u32]> = enc.seqs.iter().map(Vec::as_slice).collect();
    let order = crate::eval::batch_order(model, &seqs);
    tch::no_grad(|| -> Result<()> {
        for idx in order.chunks(BATCH) {
            let chunk: Vec<&[u32]> = idx.iter().map(|&i| seqs[i]).collect();
            let starts: Vec<usize> = idx.iter().map(|&i| enc.starts[i]).collect();
            let lp = batch_logprobs(model, trunk, &chunk, &starts, device)?;
            for (&i, v) in idx.iter().zip(lp) {
                flat[i] = v;
            }
        }
        Ok(())
    })?;
    if let Some(v) = flat.iter().find(|v| !v.is_finite()) {
        return Err(Error::invalid(
            "--model",
            format!(
                "a probe candidate's log-probability is {v}: the model's outputs are not finite \
                 (a diverged run?), so no fact can be judged"
            ),
        ));
    }
    let mut out: Vec<Vec<f64>> = enc.candidates.iter().map(|&n| vec![0.0; n]).collect();
    for (&(p, c), v) in enc.owner.iter().zip(flat) {
        out[p][c] = v;
    }
    Ok(out)
}

/// Σ log p over the tokens from `starts[i]` on of each text of one batch.
fn batch_logprobs(
    model: &Model,
    trunk: Option<&Trunk>,
    seqs: &[&[u32]],
    starts: &[usize],
    device: Device,
) -> Result<Vec<f64>> {
    let mut rng = crate::batch::step_rng(0, 0);
    let b = model_batch(model, seqs, &mut rng, device);
    // No expert capacity: a Switch model would drop overflow tokens per batch, so a candidate's
    // score would depend on which other texts share its batch.
    let f = crate::model::Forward {
        head: false,
        capacity: false,
        ..crate::eval::INFERENCE
    };
    let (h, _) = match trunk {
        Some(t) => t.final_hidden(model, &b.ids, &b.mask, &f)?,
        None => {
            let x = model.hidden_before(&b.ids, &b.mask, 0, true)?;
            model.final_hidden(0, x, &b.mask, &f)?
        }
    };
    let (_, t, d) = h.size3()?;
    // Input position j predicts token j of the text (targets are the text itself).
    let (mut rows, mut targets, mut owner) = (Vec::new(), Vec::new(), Vec::new());
    for (i, s) in seqs.iter().enumerate() {
        for (j, &tok) in s.iter().enumerate().skip(starts[i]) {
            rows.push(i as i64 * t + j as i64);
            targets.push(i64::from(tok));
            owner.push(i);
        }
    }
    let picked = h
        .view([-1, d])
        .index_select(0, &Tensor::from_slice(&rows).to_device(device));
    let logp = model
        .logits(&picked)
        .to_kind(Kind::Float)
        .log_softmax(-1, Kind::Float);
    let tgt = Tensor::from_slice(&targets).to_device(device).unsqueeze(1);
    let lp: Vec<f64> = Vec::try_from(
        logp.gather(1, &tgt, false)
            .squeeze_dim(1)
            .to_kind(Kind::Double)
            .to_device(Device::Cpu),
    )?;
    let mut out = vec![0.0; seqs.len()];
    for (i, v) in owner.into_iter().zip(lp) {
        out[i] += v;
    }
    debug_assert!(!targets.contains(&IGNORE));
    Ok(out)
}

/// One probe's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeRow {
    /// The fact.
    pub fact_id: String,
    /// Its relation.
    pub relation: String,
    /// Its count.
    pub count: u32,
    /// The probe's number.
    pub probe: u32,
    /// Held out from training.
    pub held_out: bool,
    /// log p(answer | prompt).
    pub logprob: f64,
    /// The best distractor's log-probability.
    pub best_distractor: f64,
    /// 1 + distractors scored strictly higher.
    pub rank: u32,
    /// Before training, when given: log p(answer | prompt).
    pub logprob_before: Option<f64>,
    /// Before training: the answer's rank.
    pub rank_before: Option<u32>,
    /// (answer gain) − (mean distractor gain).
    pub specific_gain: Option<f64>,
}

/// One fact's outcome over its held-out probes.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct FactRow {
    /// The fact.
    pub fact_id: String,
    /// Its relation.
    pub relation: String,
    /// Its count (0: a control).
    pub count: u32,
    /// Share of held-out probes on which the answer ranks first.
    pub first_rate: f64,
    /// Ranked first on more than half of the held-out probes.
    pub acquired: bool,
    /// Mean log p(answer | prompt) over the held-out probes.
    pub logprob: f64,
    /// The answer ranks first on the `seen` probe (a training phrasing), when there is one.
    pub seen_first: Option<bool>,
    /// The same before training, when given.
    pub first_rate_before: Option<f64>,
    /// Acquired before training (a fact known beforehand; invented facts should not be).
    pub acquired_before: Option<bool>,
    /// Mean gain of log p(answer | prompt) over the held-out probes.
    pub gain: Option<f64>,
    /// Mean specific gain over the held-out probes.
    pub specific_gain: Option<f64>,
}

/// Whether invented facts rank at chance: the first-rank rate with a normal 95% interval over
/// facts, against 1 / (1 + distractors).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChanceCheck {
    /// Which model and facts: `before` (every fact, the model before training) or `controls`
    /// (the never-inserted facts, the model evaluated).
    pub on: String,
    /// Facts.
    pub facts: usize,
    /// Mean first-rank rate over facts.
    pub rate: f64,
    /// 95% interval.
    pub low: f64,
    /// 95% interval.
    pub high: f64,
    /// 1 / (1 + distractors).
    pub chance: f64,
    /// The interval holds chance.
    pub at_chance: bool,
}

/// A probe table judged under a model (and the model before training).
#[derive(Debug, Clone)]
pub struct FactEval {
    /// Per probe.
    pub probes: Vec<ProbeRow>,
    /// Per fact, in table order.
    pub facts: Vec<FactRow>,
    /// The chance check (`None` without controls or a model before training).
    pub chance: Option<ChanceCheck>,
}

/// Rank of candidate 0 among `scores`: 1 + how many others score at least as high (a tie
/// counts against the answer: a model that cannot tell the candidates apart has not acquired
/// the fact).
pub fn rank(scores: &[f64]) -> u32 {
    1 + scores[1..].iter().filter(|&&s| s >= scores[0]).count() as u32
}

fn probe_row(p: &Probe, after: &[f64], before: Option<&[f64]>) -> ProbeRow {
    let n = after.len() as f64 - 1.0;
    let specific = before.map(|b| {
        let gains: Vec<f64> = after.iter().zip(b).map(|(a, b)| a - b).collect();
        gains[0] - gains[1..].iter().sum::<f64>() / n.max(1.0)
    });
    ProbeRow {
        fact_id: p.fact_id.clone(),
        relation: p.relation.name().into(),
        count: p.count,
        probe: p.probe,
        held_out: p.held_out,
        logprob: after[0],
        best_distractor: after[1..].iter().copied().fold(f64::NEG_INFINITY, f64::max),
        rank: rank(after),
        logprob_before: before.map(|b| b[0]),
        rank_before: before.map(rank),
        specific_gain: specific,
    }
}

/// Judge `after` (and `before`) scores of `probes` ([`score`]): per probe, per fact, and the
/// chance check (on `before` when given, else on the controls).
pub fn judge(probes: &ProbeSet, after: &[Vec<f64>], before: Option<&[Vec<f64>]>) -> FactEval {
    let rows: Vec<ProbeRow> = probes
        .probes
        .iter()
        .enumerate()
        .map(|(i, p)| probe_row(p, &after[i], before.map(|b| b[i].as_slice())))
        .collect();
    let mut by_fact: BTreeMap<&str, Vec<&ProbeRow>> = BTreeMap::new();
    for r in &rows {
        by_fact.entry(r.fact_id.as_str()).or_default().push(r);
    }
    let facts: Vec<FactRow> = probes
        .facts()
        .iter()
        .map(|(id, _)| fact_row(&by_fact[id.as_str()]))
        .collect();
    let distractors = probes.probes.first().map_or(1, |p| p.distractors.len());
    let chance = chance_check(&facts, distractors, before.is_some());
    FactEval {
        probes: rows,
        facts,
        chance,
    }
}

fn fact_row(rows: &[&ProbeRow]) -> FactRow {
    let held: Vec<&&ProbeRow> = rows.iter().filter(|r| r.held_out).collect();
    let n = held.len().max(1) as f64;
    let mean = |f: &dyn Fn(&ProbeRow) -> Option<f64>| -> Option<f64> {
        held.iter()
            .map(|r| f(r))
            .collect::<Option<Vec<f64>>>()
            .map(|v| v.iter().sum::<f64>() / n)
    };
    let first = held.iter().filter(|r| r.rank == 1).count();
    let first_before = mean(&|r| r.rank_before.map(|k| f64::from(u8::from(k == 1))));
    FactRow {
        fact_id: rows[0].fact_id.clone(),
        relation: rows[0].relation.clone(),
        count: rows[0].count,
        first_rate: first as f64 / n,
        acquired: 2 * first > held.len(),
        logprob: mean(&|r| Some(r.logprob)).unwrap_or(f64::NAN),
        seen_first: rows.iter().find(|r| !r.held_out).map(|r| r.rank == 1),
        first_rate_before: first_before,
        acquired_before: first_before.map(|f| 2.0 * f * n > n),
        gain: mean(&|r| r.logprob_before.map(|b| r.logprob - b)),
        specific_gain: mean(&|r| r.specific_gain),
    }
}

/// The first-rank rate of invented facts before training (`before`), or of the controls.
fn chance_check(facts: &[FactRow], distractors: usize, before: bool) -> Option<ChanceCheck> {
    let rates: Vec<f64> = if before {
        facts.iter().filter_map(|f| f.first_rate_before).collect()
    } else {
        facts
            .iter()
            .filter(|f| f.count == 0)
            .map(|f| f.first_rate)
            .collect()
    };
    if rates.len() < 2 {
        return None;
    }
    let n = rates.len() as f64;
    let rate = rates.iter().sum::<f64>() / n;
    let var = rates.iter().map(|r| (r - rate).powi(2)).sum::<f64>() / (n - 1.0);
    let half = crate::stats::normal_quantile(0.975) * (var / n).sqrt();
    let chance = 1.0 / (1.0 + distractors as f64);
    Some(ChanceCheck {
        on: if before { "before" } else { "controls" }.into(),
        facts: rates.len(),
        rate,
        low: rate - half,
        high: rate + half,
        chance,
        at_chance: rate - half <= chance && chance <= rate + half,
    })
}

/// Per count: facts, acquired share, mean first-rank rate, mean log-probability and gain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CountRow {
    /// The count.
    pub count: u32,
    /// Facts.
    pub facts: usize,
    /// Share acquired.
    pub acquired: f64,
    /// Mean first-rank rate.
    pub first_rate: f64,
    /// Mean log p(answer | prompt).
    pub logprob: f64,
    /// Mean gain, when a model before training was given.
    pub gain: Option<f64>,
}

impl FactEval {
    /// The summary by count, in increasing count.
    pub fn by_count(&self) -> Vec<CountRow> {
        let mut by: BTreeMap<u32, Vec<&FactRow>> = BTreeMap::new();
        for f in &self.facts {
            by.entry(f.count).or_default().push(f);
        }
        by.into_iter()
            .map(|(count, fs)| {
                let n = fs.len() as f64;
                let mean = |g: &dyn Fn(&FactRow) -> f64| fs.iter().map(|f| g(f)).sum::<f64>() / n;
                CountRow {
                    count,
                    facts: fs.len(),
                    acquired: mean(&|f| f64::from(u8::from(f.acquired))),
                    first_rate: mean(&|f| f.first_rate),
                    logprob: mean(&|f| f.logprob),
                    gain: fs
                        .iter()
                        .map(|f| f.gain)
                        .collect::<Option<Vec<f64>>>()
                        .map(|g| g.iter().sum::<f64>() / n),
                }
            })
            .collect()
    }

    /// `fact_probes.parquet`, `facts.parquet`, `facts_summary.parquet` and `facts.json` into
    /// `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::io::write_parquet(
            &mut rows_frame(&self.probes)?,
            dir.join("fact_probes.parquet"),
        )?;
        crate::io::write_parquet(&mut rows_frame(&self.facts)?, dir.join("facts.parquet"))?;
        let counts = self.by_count();
        crate::io::write_parquet(&mut rows_frame(&counts)?, dir.join("facts_summary.parquet"))?;
        let json = serde_json::to_vec_pretty(&serde_json::json!({
            "by_count": counts,
            "chance": self.chance,
        }))
        .map_err(|e| Error::invalid("facts.json", e.to_string()))?;
        crate::io::write_atomic(dir.join("facts.json"), &json)
    }
}

/// A table of serialisable rows: one column per field (numbers, booleans, text; `None` as null).
pub fn rows_frame<T: Serialize>(rows: &[T]) -> Result<DataFrame> {
    let values: Vec<serde_json::Map<String, serde_json::Value>> = rows
        .iter()
        .map(|r| match serde_json::to_value(r) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            _ => Err(Error::invalid("table", "rows must be records")),
        })
        .collect::<Result<_>>()?;
    let Some(first) = values.first() else {
        return DataFrame::new(0, vec![]).map_err(|e| Error::table("empty table", e));
    };
    let mut cols = Vec::new();
    for key in first.keys() {
        let vals: Vec<&serde_json::Value> = values.iter().map(|m| &m[key]).collect();
        cols.push(json_column(key, &vals));
    }
    DataFrame::new(rows.len(), cols).map_err(|e| Error::table("building a table", e))
}

/// One column from JSON values of one type (a column of nulls is a float column).
fn json_column(name: &str, vals: &[&serde_json::Value]) -> Column {
    use serde_json::Value;
    let kind = vals.iter().find(|v| !v.is_null());
    match kind {
        Some(Value::Bool(_)) => Column::new(
            name.into(),
            vals.iter().map(|v| v.as_bool()).collect::<Vec<_>>(),
        ),
        Some(Value::String(_)) => Column::new(
            name.into(),
            vals.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
        ),
        Some(Value::Number(n)) if n.is_u64() || n.is_i64() => Column::new(
            name.into(),
            vals.iter().map(|v| v.as_i64()).collect::<Vec<_>>(),
        ),
        _ => Column::new(
            name.into(),
            vals.iter().map(|v| v.as_f64()).collect::<Vec<_>>(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::corpus::facts::{generate, FactsOptions};

    #[test]
    fn ranks_acquisition_and_gain_by_hand() {
        assert_eq!(rank(&[-1.0, -2.0, -0.5, -3.0]), 2);
        assert_eq!(
            rank(&[-1.0, -1.0, -2.0]),
            2,
            "a tie counts against the answer (a model that scores every candidate alike has \
             not acquired the fact)"
        );
        let opts = FactsOptions {
            counts: vec![4],
            facts_per_count: 9,
            controls: 2,
            distractors: 2,
            ..FactsOptions::default()
        };
        // Two facts of count 4 and the two controls.
        let all = generate(&opts).unwrap();
        let picked: Vec<_> = all[..2].iter().chain(&all[9..]).cloned().collect();
        let set = ProbeSet::of(&picked);
        // Fact 1: the answer first on held-out probes 0 and 1 of 3 (acquired), fact 2 on one.
        let after: Vec<Vec<f64>> = set
            .probes
            .iter()
            .map(|p| {
                let first = matches!(
                    (p.fact_id.as_str(), p.probe),
                    ("fact-0001", 0 | 1) | ("fact-0002", 2) | (_, 3)
                );
                if first {
                    vec![-1.0, -2.0, -3.0]
                } else {
                    vec![-2.5, -2.0, -3.0]
                }
            })
            .collect();
        let before: Vec<Vec<f64>> = set.probes.iter().map(|_| vec![-3.0, -2.0, -1.0]).collect();
        let e = judge(&set, &after, Some(&before));
        let f1 = &e.facts[0];
        assert!(f1.acquired && (f1.first_rate - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(f1.seen_first, Some(true));
        assert!(!e.facts[1].acquired);
        // Gain of fact 1: answers −1, −1, −2.5 after, −3 before: mean (2 + 2 + 0.5) / 3.
        assert!((f1.gain.unwrap() - 1.5).abs() < 1e-12, "{f1:?}");
        // Specific gain of probe 0: 2 − mean(0, −2) = 3.
        assert!((e.probes[0].specific_gain.unwrap() - 3.0).abs() < 1e-12);
        let c = e.chance.clone().unwrap();
        assert_eq!((c.on.as_str(), c.facts, c.rate), ("before", 4, 0.0));
        assert!(!c.at_chance, "never first before: below chance 1/3");
        let by = e.by_count();
        assert_eq!(by.iter().map(|r| r.count).collect::<Vec<_>>(), [0, 4]);
        assert!((by[1].acquired - 0.5).abs() < 1e-12);
        let dir = tempfile::tempdir().unwrap();
        e.write(dir.path()).unwrap();
        let df = crate::io::read_parquet(dir.path().join("facts.parquet")).unwrap();
        assert_eq!(df.height(), 4);
        assert!(df.column("acquired").unwrap().bool().is_ok());
    }
}

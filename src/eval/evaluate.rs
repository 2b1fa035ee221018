//! `tailscope eval` as a function: perplexity of a model per domain and for long-tail against
//! common domains on the validation split, a linear probe of a label from one layer's sequence
//! embeddings, and the routing of validation sequences through CSE and Switch blocks.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tch::Device;

use super::probe::{self, ProbeResult};
use super::{encode, group_losses, sample_losses, GroupLoss};
use crate::corpus::{tokenizer, Corpus, Split};
use crate::error::{Error, Result};
use crate::freq::{domain_shares, ShareBy};
use crate::progress::Progress;

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalSpec {
    /// A model from any source.
    pub model: PathBuf,
    /// The corpus table; validation samples are evaluated.
    pub corpus: PathBuf,
    /// The tokenizer (default: the model's, else the corpus's).
    pub tokenizer: Option<PathBuf>,
    /// The column the probe predicts: `domain` or `long_tail`.
    pub label: String,
    /// Further columns, each probed from the same embeddings ([`EvalReport::extra_probes`]).
    pub extra_labels: Vec<String>,
    /// Layer of the probed embeddings (default: the last block).
    pub layer: Option<usize>,
    /// Training-split samples that fit the probe (evenly spaced).
    pub probe_samples: usize,
    /// Validation samples evaluated (evenly spaced; default all).
    pub samples: Option<usize>,
    /// Seed of BERT masks.
    pub seed: u64,
}

/// What an evaluation yields.
#[derive(Debug)]
pub struct EvalReport {
    /// Number of blocks and width of the model.
    pub n_layer: i64,
    /// Width of the model.
    pub d_model: i64,
    /// Validation samples evaluated.
    pub samples: usize,
    /// Perplexity per domain (the first group is `all`).
    pub groups: Vec<GroupLoss>,
    /// Perplexity of `all`, `long-tail` and `common`.
    pub tail_groups: Vec<GroupLoss>,
    /// The corpus's long-tail domains and the elbow (share of tokens) that chose them.
    pub long_tail: Vec<String>,
    /// The elbow, when the corpus has one.
    pub threshold: Option<f64>,
    /// The probed layer.
    pub layer: usize,
    /// The linear probe.
    pub probe: ProbeResult,
    /// (label, probe) for every extra label, in order.
    pub extra_probes: Vec<(String, ProbeResult)>,
    /// Routing of validation sequences per routed block, by domain.
    pub routing: Vec<super::RoutingTable>,
}

/// `n` of `v`, evenly spaced (all when `n` is `None`).
fn evenly(v: Vec<usize>, n: Option<usize>) -> Vec<usize> {
    match n {
        Some(n) => crate::corpus::evenly_spaced(&v, n),
        None => v,
    }
}

/// The label of every corpus sample for the probe; `long_tail`: the corpus's long-tail domains
/// (the perplexity groups' rule, for samples without ground truth).
fn labels(corpus: &Corpus, label: &str, long_tail: &HashSet<&str>) -> Result<Vec<String>> {
    match label {
        "domain" => Ok(corpus.samples.iter().map(|s| s.domain.clone()).collect()),
        "long_tail" => {
            // The corpus's ground truth where it has one (synthetic corpora), else whether the
            // sample's domain is long-tail by its token share.
            Ok(corpus
                .samples
                .iter()
                .map(|s| {
                    s.long_tail
                        .unwrap_or_else(|| long_tail.contains(s.domain.as_str()))
                        .to_string()
                })
                .collect())
        }
        other => Err(Error::invalid(
            "--label",
            format!("unknown column {other:?}; use domain or long_tail"),
        )),
    }
}

/// Evaluate a model.
pub fn evaluate(spec: &EvalSpec, device: Device, progress: &dyn Progress) -> Result<EvalReport> {
    let (_, model) = crate::source::load_model(&spec.model, device)?;
    let corpus = Corpus::read(&spec.corpus)?;
    let tok =
        crate::source::tokenizer_for(spec.tokenizer.as_deref(), &spec.model, &model, &spec.corpus)?;
    let (shares, threshold) = domain_shares(&corpus, ShareBy::Tokens);
    let long_tail: HashSet<&str> = shares
        .iter()
        .filter(|d| d.long_tail)
        .map(|d| d.domain.as_str())
        .collect();
    let labels_all = labels(&corpus, &spec.label, &long_tail)?;
    let extra_all = spec
        .extra_labels
        .iter()
        .map(|l| labels(&corpus, l, &long_tail))
        .collect::<Result<Vec<_>>>()?;
    let c = &corpus;
    let in_split = |s: Split| (0..c.len()).filter(move |&i| c.samples[i].split == s);
    let val = evenly(in_split(Split::Validation).collect(), spec.samples);
    let trn = evenly(in_split(Split::Train).collect(), Some(spec.probe_samples));
    if val.is_empty() {
        return Err(Error::in_file(
            &spec.corpus,
            "no validation samples to evaluate",
        ));
    }
    if trn.is_empty() {
        return Err(Error::invalid(
            "--probe-samples",
            "the linear probe needs at least one training-split sample",
        ));
    }
    let texts = |idx: &[usize]| {
        idx.iter()
            .map(|&i| corpus.samples[i].text.as_str())
            .collect::<Vec<_>>()
    };
    let val_ids = tokenizer::encode_all(&tok, &texts(&val))?;
    let trn_ids = tokenizer::encode_all(&tok, &texts(&trn))?;
    progress.start("evaluating perplexity", None);
    let losses = sample_losses(&model, &slices(&val_ids), 64, device, spec.seed)?;
    let domains: Vec<&str> = val
        .iter()
        .map(|&i| corpus.samples[i].domain.as_str())
        .collect();
    let groups = group_losses(&losses, &domains);
    let tail_labels: Vec<&str> = domains
        .iter()
        .map(|d| match long_tail.contains(d) {
            true => "long-tail",
            false => "common",
        })
        .collect();
    let tail_groups = group_losses(&losses, &tail_labels);
    progress.finish();
    progress.start("linear probe", None);
    let layer = spec.layer.unwrap_or(model.cfg.n_layer as usize);
    let enc_val = encode(&model, &slices(&val_ids), 64, device)?;
    let enc_trn = encode(&model, &slices(&trn_ids), 64, device)?;
    let probe_of = |all: &[String]| {
        let of = |idx: &[usize]| idx.iter().map(|&i| all[i].clone()).collect();
        probe_layer(
            (&enc_trn, of(&trn)),
            (&enc_val, of(&val)),
            layer,
            model.cfg.n_layer,
        )
    };
    let probe = probe_of(&labels_all)?;
    let extra_probes = spec
        .extra_labels
        .iter()
        .zip(&extra_all)
        .map(|(l, all)| Ok((l.clone(), probe_of(all)?)))
        .collect::<Result<Vec<_>>>()?;
    progress.finish();
    let routing = enc_val
        .routes
        .iter()
        .map(|(l, r)| super::RoutingTable::new(*l, &domains, r))
        .collect();
    Ok(EvalReport {
        n_layer: model.cfg.n_layer,
        d_model: model.cfg.d_model,
        samples: val.len(),
        groups,
        tail_groups,
        long_tail: shares
            .iter()
            .filter(|d| d.long_tail)
            .map(|d| d.domain.clone())
            .collect(),
        threshold,
        layer,
        probe,
        extra_probes,
        routing,
    })
}

/// A linear probe from the embeddings of `layer` (of `n_layer`): fitted on `train`, tested on
/// `test`, each (encodings, labels).
fn probe_layer(
    train: (&super::Encoded, Vec<String>),
    test: (&super::Encoded, Vec<String>),
    layer: usize,
    n_layer: i64,
) -> Result<ProbeResult> {
    let pick = |e: &super::Encoded| {
        e.layers
            .get(layer)
            .map(|t| t.shallow_clone())
            .ok_or_else(|| Error::invalid("--layer", format!("must be in 0..={n_layer}")))
    };
    probe::linear_probe(
        &pick(train.0)?,
        &train.1,
        &pick(test.0)?,
        &test.1,
        probe::ProbeOptions::default(),
    )
}

fn slices(v: &[Vec<u32>]) -> Vec<&[u32]> {
    v.iter().map(Vec::as_slice).collect()
}

impl EvalReport {
    /// `eval.json` of this evaluation of `spec`.
    pub fn to_json(&self, spec: &EvalSpec) -> serde_json::Value {
        serde_json::json!({
            "model": spec.model, "perplexity": self.groups, "long_tail": self.tail_groups,
            "long_tail_threshold": self.threshold, "probe": self.probe, "layer": self.layer,
            "label": spec.label,
            "extra_probes": self.extra_probes,
        })
    }

    /// Write `eval.json` into `dir`.
    pub fn write(&self, spec: &EvalSpec, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.to_json(spec))
            .map_err(|e| Error::invalid("eval summary", e.to_string()))?;
        crate::io::write_atomic(dir.join("eval.json"), json.as_bytes())
    }
}

//! Continued training on a selection (`[selection]` in a training spec): the samples a
//! `tailscope select` table marks as selected are up-weighted in the batches, by a repeat factor
//! (each appears `repeat` times per epoch) or a sampling weight (batches drawn with replacement,
//! each selected sample `weight` times as likely as another). Either way the batch of a step is
//! a pure function of (seed, step), so a continued run resumes exactly.
//!
//! ```toml
//! [selection]
//! file = "out/select/flag.parquet"   # a `tailscope select` output (its `selected` rows)
//! repeat = 4                         # or: weight = 4.0
//! ```
//!
//! Selected ids must be training samples of the corpus: up-weighting a validation sample would
//! train on what the run is evaluated on, so it is an error naming the id.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::TrainData;
use crate::batch::Sampler;
use crate::error::{Error, Result};

/// `[selection]`: which samples to up-weight and how.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SelectionSpec {
    /// A selection table (`tailscope select -o`): the rows with `selected` true are up-weighted.
    pub file: PathBuf,
    /// Each selected sample appears this many times per epoch (the others once).
    #[serde(default)]
    pub repeat: Option<u32>,
    /// Batches are drawn with replacement, a selected sample this many times as likely as another.
    #[serde(default)]
    pub weight: Option<f64>,
}

/// How the selected samples are up-weighted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Upweight {
    /// A repeat factor per epoch.
    Repeat(u32),
    /// A sampling weight relative to the other samples' 1.
    Weight(f64),
}

impl SelectionSpec {
    /// The up-weighting the spec asks for: exactly one of `repeat` (≥ 1) and `weight` (> 0,
    /// finite).
    pub fn upweight(&self) -> Result<Upweight> {
        match (self.repeat, self.weight) {
            (Some(r), None) if r >= 1 => Ok(Upweight::Repeat(r)),
            (Some(_), None) => Err(Error::invalid("selection.repeat", "must be at least 1")),
            (None, Some(w)) if w.is_finite() && w > 0.0 => Ok(Upweight::Weight(w)),
            (None, Some(_)) => Err(Error::invalid(
                "selection.weight",
                "must be positive and finite",
            )),
            (Some(_), Some(_)) => Err(Error::invalid(
                "selection",
                "give repeat (a repeat factor) or weight (a sampling weight), not both",
            )),
            (None, None) => Err(Error::invalid(
                "selection",
                "give repeat (a repeat factor) or weight (a sampling weight)",
            )),
        }
    }
}

/// The selection resolved against a run's data.
#[derive(Debug, Clone)]
pub struct Selection {
    /// Per training position (`TrainData::train` order): selected or not.
    pub chosen: Vec<bool>,
    /// The selected ids, sorted (what the run manifest fingerprints).
    pub ids: Vec<String>,
    /// How they are up-weighted.
    pub upweight: Upweight,
}

impl Selection {
    /// Read `spec.file` and mark its selected ids among `data`'s training samples.
    pub fn resolve(spec: &SelectionSpec, data: &TrainData) -> Result<Selection> {
        let upweight = spec.upweight()?;
        let ids = crate::analysis::select::read_selected(&spec.file)?;
        if ids.is_empty() {
            return Err(Error::in_file(
                &spec.file,
                "selects no sample (no row has `selected` true)",
            ));
        }
        let position: HashMap<&str, usize> = data
            .corpus
            .samples
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        let train_pos: HashMap<usize, usize> = data
            .train
            .iter()
            .enumerate()
            .map(|(k, &i)| (i, k))
            .collect();
        let mut chosen = vec![false; data.train.len()];
        for id in &ids {
            let Some(&i) = position.get(id.as_str()) else {
                return Err(Error::in_file(
                    &spec.file,
                    format!("selected id {id:?} is not a sample of the training corpus"),
                ));
            };
            match train_pos.get(&i) {
                Some(&k) => chosen[k] = true,
                None => {
                    return Err(Error::in_file(
                        &spec.file,
                        format!(
                            "selected id {id:?} is a {} sample; only training samples can be \
                             up-weighted (select from an analysis of the training split: \
                             `ntk --split train`)",
                            data.corpus.samples[i].split.as_str()
                        ),
                    ));
                }
            }
        }
        let mut ids = ids;
        ids.sort();
        ids.dedup();
        Ok(Selection {
            chosen,
            ids,
            upweight,
        })
    }

    /// The sampler over the training positions that up-weights the selection.
    pub fn sampler(&self, seed: u64) -> Result<Sampler> {
        match self.upweight {
            Upweight::Repeat(r) => {
                let repeat: Vec<u32> = self.chosen.iter().map(|&c| if c { r } else { 1 }).collect();
                Ok(Sampler::repeated(&repeat, seed))
            }
            Upweight::Weight(w) => {
                let weight: Vec<f64> = self
                    .chosen
                    .iter()
                    .map(|&c| if c { w } else { 1.0 })
                    .collect();
                Sampler::weighted(&weight, seed).map_err(|e| Error::invalid("selection.weight", e))
            }
        }
    }

    /// What the run's manifest records: the selected ids' fingerprint and the up-weighting.
    pub fn fingerprint(&self) -> String {
        let joined = self.ids.join("\n");
        let how = match self.upweight {
            Upweight::Repeat(r) => format!("repeat {r}"),
            Upweight::Weight(w) => format!("weight {w}"),
        };
        format!(
            "{} ids, {:016x}, {how}",
            self.ids.len(),
            crate::seed::stable_hash(0, joined.as_bytes())
        )
    }
}

/// The sampler of a run: over every training sample once per epoch, or up-weighting `selection`.
pub fn sampler(selection: Option<&Selection>, data: &TrainData, seed: u64) -> Result<Sampler> {
    match selection {
        Some(s) => s.sampler(seed),
        None => Ok(Sampler::new(data.train.len(), seed)),
    }
}

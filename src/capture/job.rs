//! A capture job: a model from any source, samples of a corpus and the selected parameters, ready
//! for per-sample gradients. [`Job::prepare`] does the loading and encoding that `capture`, `ntk`
//! and `run` share; [`capture_gradients`] is `tailscope capture` as a function.

use std::path::{Path, PathBuf};
use std::time::Instant;

use polars::prelude::{Column, DataFrame};
use tch::{nn, Device, Tensor};

use super::{capture, CaptureOptions, Captured, Method, Selection};
use crate::corpus::{tokenizer, Corpus, Sample, SplitChoice};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::progress::Progress;

/// Samples captured by default (`--samples`, `[ntk] samples`).
pub const DEFAULT_SAMPLES: usize = 512;
/// Samples per forward/backward pass by default (`--batch`, `[ntk] batch`).
pub const DEFAULT_BATCH: usize = 16;
/// Output directions of the logit-trace estimate by default (`--probes`).
pub const DEFAULT_PROBES: usize = 8;

/// What to capture: the model, the corpus and its samples, and which gradients.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// A model from any source (see [`crate::source::load_model`]).
    pub model: PathBuf,
    /// The corpus table.
    pub corpus: PathBuf,
    /// The tokenizer (default: the model's own, else the one beside the corpus).
    pub tokenizer: Option<PathBuf>,
    /// Split the samples come from.
    pub split: SplitChoice,
    /// Number of samples: evenly spaced over the split, or drawn at random with `sample_seed`.
    pub samples: usize,
    /// 0: samples evenly spaced over the split; otherwise a random draw seeded by it.
    pub sample_seed: u64,
    /// Which parameters.
    pub selection: Selection,
    /// Output, method, projection, batch size, probes and seed.
    pub options: CaptureOptions,
}

/// A prepared job: the model loaded, the corpus encoded, the parameters selected.
pub struct Job {
    /// The whole corpus.
    pub corpus: Corpus,
    /// The model.
    pub model: Model,
    /// The store holding the model's variables (kept alive with the model).
    pub vs: nn::VarStore,
    /// Corpus indices of the chosen samples.
    pub idx: Vec<usize>,
    /// Token ids of the chosen samples.
    pub ids: Vec<Vec<u32>>,
    /// Token ids of every corpus sample (frequency scores, cross sets).
    pub all_ids: Vec<Vec<u32>>,
    /// The selected parameters, sorted by name.
    pub params: Vec<(String, Tensor)>,
    /// Capture options.
    pub opts: CaptureOptions,
}

impl Job {
    /// Load the model and corpus, encode every sample and select the parameters.
    pub fn prepare(spec: &JobSpec, device: Device) -> Result<Job> {
        let (vs, model) = crate::source::load_model(&spec.model, device)?;
        let corpus = Corpus::read(&spec.corpus)?;
        let tok = crate::source::tokenizer_for(
            spec.tokenizer.as_deref(),
            &spec.model,
            &model,
            &spec.corpus,
        )?;
        let selection = spec.selection.resolve(model.cfg.n_layer)?;
        if let Some((a, b)) = selection.layers {
            if a > b || b >= model.cfg.n_layer {
                return Err(Error::invalid(
                    "--layers",
                    format!(
                        "blocks {a}..{b} are not within the model's {} blocks (0..{})",
                        model.cfg.n_layer,
                        model.cfg.n_layer - 1
                    ),
                ));
            }
        }
        let params = selection.select_from(model.capture_parameters(&vs)?)?;
        let idx = corpus.pick_seeded(spec.split, spec.samples, spec.sample_seed);
        if idx.is_empty() {
            return Err(Error::in_file(
                &spec.corpus,
                format!("no samples in split {:?}", spec.split.as_str()),
            ));
        }
        let texts: Vec<&str> = corpus.samples.iter().map(|s| s.text.as_str()).collect();
        let all_ids = tokenizer::encode_all(&tok, &texts)?;
        let ids = idx.iter().map(|&i| all_ids[i].clone()).collect();
        Ok(Job {
            corpus,
            model,
            vs,
            idx,
            ids,
            all_ids,
            params,
            opts: spec.options.clone(),
        })
    }

    /// The same job over other samples of its corpus (corpus rows `idx`).
    pub fn with_samples(mut self, idx: Vec<usize>) -> Result<Job> {
        if let Some(&bad) = idx.iter().find(|&&i| i >= self.all_ids.len()) {
            return Err(Error::invalid(
                "samples",
                format!(
                    "corpus row {bad} is beyond the corpus's {} rows",
                    self.all_ids.len()
                ),
            ));
        }
        self.ids = idx.iter().map(|&i| self.all_ids[i].clone()).collect();
        self.idx = idx;
        Ok(self)
    }

    /// The chosen samples' token ids as slices.
    pub fn seqs(&self) -> Vec<&[u32]> {
        self.ids.iter().map(Vec::as_slice).collect()
    }

    /// The chosen samples.
    pub fn samples(&self) -> Vec<&Sample> {
        self.idx.iter().map(|&i| &self.corpus.samples[i]).collect()
    }

    /// Number of selected parameter values.
    pub fn parameter_count(&self) -> i64 {
        self.params.iter().map(|(_, t)| t.numel() as i64).sum()
    }

    /// Capture `seqs` (the chosen samples, or another set) with the job's options.
    pub fn capture(
        &self,
        seqs: &[Vec<u32>],
        label: &str,
        device: Device,
        progress: &dyn Progress,
    ) -> Result<Captured> {
        self.capture_with(seqs, label, &self.opts, device, progress)
    }

    /// [`Job::capture`] with other capture options (`norms_only` for a diagonal kernel).
    pub fn capture_with(
        &self,
        seqs: &[Vec<u32>],
        label: &str,
        opts: &crate::capture::CaptureOptions,
        device: Device,
        progress: &dyn Progress,
    ) -> Result<Captured> {
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        progress.start(label, Some(refs.len() as u64));
        let c = capture(&self.model, &self.params, &refs, opts, device, &|d| {
            progress.advance_to(d as u64)
        })?;
        progress.finish();
        Ok(c)
    }

    /// The per-sample table: index, id, domain, split, n_tokens, then optional kernel columns
    /// (`self_kernel`, `alignment`) and integer columns.
    pub fn samples_frame(
        &self,
        self_k: Option<&[f64]>,
        align: Option<&[f64]>,
        extra: &[(String, Vec<i64>)],
    ) -> Result<DataFrame> {
        let s = self.samples();
        let mut cols = vec![Column::new(
            "index".into(),
            (0..s.len() as u64).collect::<Vec<_>>(),
        )];
        cols.extend(crate::corpus::sample_columns(&s));
        if let Some(v) = self_k {
            cols.push(Column::new("self_kernel".into(), v.to_vec()));
        }
        if let Some(v) = align {
            cols.push(Column::new("alignment".into(), v.to_vec()));
        }
        for (name, v) in extra {
            cols.push(Column::new(name.as_str().into(), v.clone()));
        }
        DataFrame::new(s.len(), cols).map_err(|e| Error::table("samples", e))
    }
}

/// Per-sample gradients of a job's samples, with their sample table.
pub struct Gradients {
    /// (parameter name, (n, P) or projected (n, k)) on the CPU.
    pub named: Vec<(String, Tensor)>,
    /// The per-sample table.
    pub samples: DataFrame,
    /// Number of samples.
    pub n: usize,
    /// Wall time of the capture.
    pub seconds: f64,
}

impl Gradients {
    /// Total width of the gradient rows.
    pub fn width(&self) -> i64 {
        self.named.iter().map(|(_, t)| t.size()[1]).sum()
    }

    /// Write `grads.safetensors` and `samples.parquet` into `dir`.
    pub fn write(&mut self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::io::write_tensors(&self.named, &dir.join("grads.safetensors"))?;
        crate::io::write_parquet(&mut self.samples, dir.join("samples.parquet"))
    }
}

/// `tailscope capture` as a function: the per-sample gradients of a prepared job. The ghost and
/// auto methods form no per-sample gradients and are refused.
pub fn capture_gradients(job: &Job, device: Device, progress: &dyn Progress) -> Result<Gradients> {
    check_gradient_method(job.opts.method)?;
    let t0 = Instant::now();
    let c = job.capture(&job.ids, "capturing", device, progress)?;
    let named: Vec<(String, Tensor)> = c
        .names
        .iter()
        .zip(&c.jac)
        .filter_map(|(n, j)| j.as_ref().map(|j| (n.clone(), j.to_device(Device::Cpu))))
        .collect();
    Ok(Gradients {
        named,
        samples: job.samples_frame(None, None, &[])?,
        n: c.n,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Per-sample gradients need the exact or batched method: ghost and auto form none.
pub fn check_gradient_method(method: Method) -> Result<()> {
    if method == Method::Ghost || method == Method::Auto {
        return Err(Error::invalid(
            "--method",
            "capture writes per-sample gradients; use exact or batched",
        ));
    }
    Ok(())
}

/// Parse a block range `A..B` (inclusive), as `--layers` takes it.
pub fn parse_block_range(s: &str) -> Result<(i64, i64)> {
    let bad = || Error::invalid("--layers", format!("expected A..B, got {s:?}"));
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    Ok((
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    ))
}

/// Parse one expert `BLOCK:EXPERT`, as `--expert` takes it.
pub fn parse_expert(s: &str) -> Result<(i64, i64)> {
    let bad = || Error::invalid("--expert", format!("expected BLOCK:EXPERT, got {s:?}"));
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    Ok((
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    ))
}

//! `tailscope train` as a function: the runs of a spec, one after another, with overrides of
//! the spec's settings, Ctrl-C handling through a stop flag, and, for CSE runs, how the
//! validation sequences route through the initialised experts.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use tch::Device;

use super::{latest_checkpoint, train_run, Outcome, Progress, RunResult, TrainData, TrainSpec};
use crate::error::{Error, Result};
use crate::eval::RoutingTable;

/// Settings that replace the spec's (the CLI's `--steps`, `--batch-size`, ... flags).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `train.steps`.
    pub steps: Option<u64>,
    /// `train.batch_size`.
    pub batch_size: Option<usize>,
    /// `train.lr`.
    pub lr: Option<f64>,
    /// `train.checkpoint_every`.
    pub checkpoint_every: Option<u64>,
    /// `data.corpus`.
    pub corpus: Option<PathBuf>,
    /// `selection.file`.
    pub selection: Option<PathBuf>,
    /// `selection.repeat` (replaces a spec's `weight`).
    pub repeat: Option<u32>,
    /// `selection.weight` (replaces a spec's `repeat`).
    pub weight: Option<f64>,
}

impl TrainSpec {
    /// Apply `o` and check the result.
    pub fn apply(&mut self, o: &Overrides) -> Result<()> {
        if let Some(v) = o.steps {
            self.train.steps = v;
        }
        if let Some(v) = o.batch_size {
            self.train.batch_size = v;
        }
        if let Some(v) = o.lr {
            self.train.lr = v;
        }
        if let Some(v) = o.checkpoint_every {
            self.train.checkpoint_every = v;
        }
        if let Some(v) = &o.corpus {
            self.data.corpus = v.clone();
        }
        if let Some(file) = &o.selection {
            let old = self.selection.take();
            self.selection = Some(super::selection::SelectionSpec {
                file: file.clone(),
                repeat: old.as_ref().and_then(|s| s.repeat),
                weight: old.as_ref().and_then(|s| s.weight),
            });
        }
        if o.repeat.is_some() || o.weight.is_some() {
            let Some(sel) = self.selection.as_mut() else {
                return Err(Error::invalid(
                    "--repeat/--weight",
                    "up-weight what? give --selection FILE (or [selection] in the spec)",
                ));
            };
            sel.repeat = o.repeat;
            sel.weight = o.weight;
        }
        self.check()
    }

    /// Check that every name in `names` is a run of the spec (read from `path`).
    pub fn check_run_names(&self, names: &[String], path: &Path) -> Result<()> {
        for name in names {
            if !self.runs.iter().any(|r| &r.name == name) {
                let runs: Vec<&str> = self.runs.iter().map(|r| r.name.as_str()).collect();
                return Err(Error::invalid(
                    "--run",
                    format!(
                        "no run named {name:?} in {} (runs: {})",
                        path.display(),
                        runs.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A finished (or interrupted) run and the routing of validation sequences through its experts.
pub struct TrainedRun {
    /// What training did.
    pub result: RunResult,
    /// Routing per CSE block (empty unless the experts were initialised).
    pub routing: Vec<RoutingTable>,
}

/// Where and how to train.
pub struct TrainPlan<'a> {
    /// The spec (overrides applied).
    pub spec: &'a TrainSpec,
    /// Runs to train (empty: all).
    pub runs: &'a [String],
    /// Output folder; each run writes into a subfolder named after it.
    pub out: &'a Path,
    /// Continue each run from its latest checkpoint.
    pub resume: bool,
    /// Seed of initialisation, batches and masks.
    pub seed: u64,
}

/// Train the runs of `plan` one after another; `on_run` sees each as it ends. An interrupted run
/// (the stop flag) ends the sequence after saving its checkpoint.
pub fn train_runs(
    plan: &TrainPlan,
    device: Device,
    stop: &AtomicBool,
    progress: &dyn Progress,
    on_run: &mut dyn FnMut(&TrainedRun),
) -> Result<Vec<TrainedRun>> {
    let spec = plan.spec;
    let data = TrainData::for_spec(spec)?;
    let mut done = Vec::new();
    for run in spec
        .runs
        .iter()
        .filter(|r| plan.runs.is_empty() || plan.runs.contains(&r.name))
    {
        let result = train_run(
            spec,
            run,
            &data,
            plan.out,
            device,
            plan.seed,
            plan.resume,
            stop,
            progress,
        )?;
        let routing = match result.state.cse_initialized {
            true => routing_after(&result, spec, &data, device)?,
            false => Vec::new(),
        };
        let trained = TrainedRun { result, routing };
        on_run(&trained);
        let interrupted = matches!(trained.result.outcome, Outcome::Interrupted(_));
        done.push(trained);
        if interrupted {
            break;
        }
    }
    Ok(done)
}

/// How the validation subset routes through the experts of a run's model (its final model, or
/// its latest checkpoint when interrupted).
fn routing_after(
    r: &RunResult,
    spec: &TrainSpec,
    data: &TrainData,
    device: Device,
) -> Result<Vec<RoutingTable>> {
    let dir = match r.outcome {
        Outcome::Finished => r.dir.join("final"),
        Outcome::Interrupted(_) => latest_checkpoint(&r.dir).unwrap_or_else(|| r.dir.join("final")),
    };
    let (_, model) = crate::source::load_model(&dir, device)?;
    let val = data.val_subset(spec.data.eval_samples);
    let enc = crate::eval::encode(&model, &data.seqs(&val), 64, device)?;
    let labels: Vec<&str> = val
        .iter()
        .map(|&i| data.corpus.samples[i].domain.as_str())
        .collect();
    Ok(enc
        .routes
        .iter()
        .map(|(layer, routes)| RoutingTable::new(*layer, &labels, routes))
        .collect())
}

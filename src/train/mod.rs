//! Pretraining (`tailscope train`): AdamW with warm-up and cosine decay, gradient clipping,
//! dense / Switch-MoE / CSE runs from one spec ([`spec`]), the CSE initialisation after the dense
//! warm-up ([`cse_init`]), validation perplexity per domain, cluster dynamics ([`dynamics`]),
//! checkpoints every N steps (the last k kept, plus listed steps) and resumption that reproduces an
//! uninterrupted run exactly on the CPU.
//!
//! Layout of a run directory `<out>/<run>/`:
//! ```text
//! checkpoints/step-000100/  config.json model.safetensors optimizer.safetensors state.json
//! final/                    config.json model.safetensors          (the trained model)
//! log.parquet               step, loss, aux_loss, lr, grad_norm, tokens, tokens_per_s, expert_load
//! val.parquet               step, group, samples, tokens, loss, ppl   (group "all" or a domain)
//! val_samples.parquet       step, sample, domain, loss_sum, tokens    (every validation sample)
//! clusters.parquet          step, layer, n_clusters, noise, eps, ratio
//! cse_init.json             the CSE clustering (CSE runs)
//! ```
//! Determinism: the batch of step s is a function of (seed, s); dropout is re-seeded with seed + s
//! at each step; BERT masks come from a RNG seeded by (seed, s). Nothing else is random after
//! initialisation, so a run resumed from a checkpoint takes the same steps as one never stopped.

pub mod cse_init;
pub mod dynamics;
pub mod optim;
pub mod runs;
pub mod selection;
pub mod spec;
pub mod upcycle;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use polars::prelude::{Column, DataFrame};
use serde::{Deserialize, Serialize};
use tch::{nn, Device};

use crate::batch::{make_batch, step_rng, Sampler};
use crate::checkpoint::save_model;
use crate::corpus::{tokenizer, Corpus, Split};
use crate::error::{Error, Result};
use crate::io::{read_tensors, write_tensors};
use crate::lock::OutputLock;
use crate::manifest::Manifest;
use crate::model::cse::expand_experts;
use crate::model::named_variables;
use crate::model::{token_losses, CseConfig, ExpertConfig, Model, ModelConfig};
use optim::{lr_at, AdamW};
pub use spec::{BaseSpec, RunSpec, TrainOptions, TrainScope, TrainSpec};

/// The tokenised corpus shared by all runs of a spec.
pub struct TrainData {
    /// The corpus table.
    pub corpus: Corpus,
    /// Token ids of every sample.
    pub ids: Vec<Vec<u32>>,
    /// Indices of the training split.
    pub train: Vec<usize>,
    /// Indices of the validation split.
    pub val: Vec<usize>,
    /// Vocabulary size of the tokenizer.
    pub vocab: i64,
    /// The tokenizer as JSON when it is not the corpus's (a base model's own), written beside
    /// every model a run saves.
    pub tokenizer_json: Option<String>,
    /// The frozen trunk's output per text, shared by the runs of a spec (or a study) from one
    /// base model.
    pub trunk: upcycle::TrunkCache,
}

impl TrainData {
    /// Read the corpus and encode it with its tokenizer (beside it, or `tokenizer_path`).
    pub fn load(corpus: &Path, tokenizer_path: Option<&Path>) -> Result<TrainData> {
        let tok_path: PathBuf = tokenizer_path
            .map(Path::to_path_buf)
            .unwrap_or_else(|| crate::corpus::tokenizer::default_path(corpus));
        TrainData::with_tokenizer(corpus, tokenizer::load(&tok_path)?, None)
    }

    /// The data of `spec`: its corpus, encoded with `data.tokenizer` when given, else the base
    /// model's own tokenizer (`[base]`), else the corpus's.
    pub fn for_spec(spec: &TrainSpec) -> Result<TrainData> {
        let d = &spec.data;
        match (&d.tokenizer, &spec.base) {
            (None, Some(b)) => match crate::source::model_tokenizer(&b.model)? {
                Some(tok) => {
                    let json = tok
                        .to_string(false)
                        .map_err(|e| Error::Tokenizer(e.to_string()))?;
                    TrainData::with_tokenizer(&d.corpus, tok, Some(json))
                }
                None => TrainData::load(&d.corpus, None),
            },
            _ => TrainData::load(&d.corpus, d.tokenizer.as_deref()),
        }
    }

    fn with_tokenizer(
        corpus: &Path,
        tok: tokenizers::Tokenizer,
        tokenizer_json: Option<String>,
    ) -> Result<TrainData> {
        let c = Corpus::read(corpus)?;
        let texts: Vec<&str> = c.samples.iter().map(|s| s.text.as_str()).collect();
        let ids = tokenizer::encode_all(&tok, &texts)?;
        let (train, val): (Vec<usize>, Vec<usize>) =
            (0..c.len()).partition(|&i| c.samples[i].split == Split::Train);
        if train.is_empty() {
            return Err(Error::in_file(corpus, "the corpus has no training samples"));
        }
        Ok(TrainData {
            corpus: c,
            ids,
            train,
            val,
            vocab: tok.get_vocab_size(true) as i64,
            tokenizer_json,
            trunk: upcycle::TrunkCache::default(),
        })
    }

    /// Token ids of the samples `idx`.
    pub fn seqs(&self, idx: &[usize]) -> Vec<&[u32]> {
        idx.iter().map(|&i| self.ids[i].as_slice()).collect()
    }

    /// Up to `n` evenly spaced validation samples (all of them when fewer).
    pub fn val_subset(&self, n: usize) -> Vec<usize> {
        crate::corpus::evenly_spaced(&self.val, n)
    }
}

/// One optimiser step of `log.parquet`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRow {
    /// Steps done after this one (1-based).
    pub step: u64,
    /// Mean token loss of the batch.
    pub loss: f64,
    /// Switch load-balancing loss (0 otherwise).
    pub aux_loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Real tokens in the batch.
    pub tokens: i64,
    /// Throughput of the step (wall clock).
    pub tokens_per_s: f64,
    /// Per sparse block `layer:n0/n1/...` (tokens for Switch, sequences for CSE), `;`-separated.
    pub expert_load: String,
}

/// Validation perplexity of one group at one step (`val.parquet`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ValRow {
    /// The step.
    pub step: u64,
    /// `all` or a domain.
    pub group: String,
    /// Samples in the group.
    pub samples: usize,
    /// Predicted tokens in the group.
    pub tokens: u64,
    /// Mean token loss.
    pub loss: f64,
    /// Perplexity, exp(loss).
    pub ppl: f64,
}

/// One validation sample's loss at one step (`val_samples.parquet`): what per-group perplexity
/// intervals and paired comparisons of runs are computed from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ValSampleRow {
    /// The step.
    pub step: u64,
    /// The sample's row in the corpus table.
    pub sample: u64,
    /// Its domain.
    pub domain: String,
    /// Summed token loss.
    pub loss_sum: f64,
    /// Predicted tokens.
    pub tokens: i64,
}

/// DBSCAN over one layer's sequence embeddings at one step (`clusters.parquet`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterRow {
    /// The step.
    pub step: u64,
    /// The layer (0 = embeddings).
    pub layer: i64,
    /// Clusters found.
    pub n_clusters: usize,
    /// Probe sequences left as noise.
    pub noise: usize,
    /// The radius (knee rule).
    pub eps: f64,
    /// Distance/radius ratio of the clusters.
    pub ratio: Option<f64>,
}

/// Everything a checkpoint stores besides tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    /// The run's name.
    pub run: String,
    /// The seed it was started with.
    pub seed: u64,
    /// Steps done.
    pub step: u64,
    /// AdamW's step counter (bias correction).
    pub adam_t: i64,
    /// Whether the CSE experts exist yet.
    pub cse_initialized: bool,
    /// Every step so far.
    pub log: Vec<StepRow>,
    /// Every validation so far.
    pub val: Vec<ValRow>,
    /// Every cluster-dynamics measurement so far.
    pub clusters: Vec<ClusterRow>,
    /// Every validation sample's loss at every validation (absent in older checkpoints).
    #[serde(default)]
    pub val_samples: Vec<ValSampleRow>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Trained every step.
    Finished,
    /// Stopped by Ctrl-C after saving a checkpoint at this step.
    Interrupted(u64),
}

/// What the CLI prints after a run.
pub struct RunResult {
    /// How it ended.
    pub outcome: Outcome,
    /// The run's folder.
    pub dir: PathBuf,
    /// The final state.
    pub state: RunState,
    /// What CSE initialisation found (this session only).
    pub cse_init: Vec<cse_init::InitReport>,
    /// Trainable parameters.
    pub params: i64,
    /// Wall time of this session's training.
    pub seconds: f64,
}

/// Callbacks for progress reporting.
pub trait Progress {
    /// A run starts: `total` steps, `done` of them already (resumed).
    fn start(&self, _run: &str, _total: u64, _done: u64) {}
    /// A step finished.
    fn step(&self, _row: &StepRow) {}
    /// Something worth a log line.
    fn message(&self, _msg: &str) {}
    /// The run ended.
    fn finish(&self) {}
}

/// No progress output.
pub struct Silent;
impl Progress for Silent {}

struct Live {
    cfg: ModelConfig,
    vs: nn::VarStore,
    model: Model,
    opt: AdamW,
}

/// A fresh model of `cfg`, or, with a base, the base model upcycled to the run's experts.
fn build_live(cfg: &ModelConfig, run: &RunSpec, ctx: &RunCtx) -> Result<Live> {
    let (vs, model, cfg) = match ctx.base {
        Some(b) => upcycle::start(b, &run.experts, ctx.device, ctx.seed)?,
        None => {
            tch::manual_seed(ctx.seed as i64);
            let vs = nn::VarStore::new(ctx.device);
            let model = Model::new(&vs.root(), cfg)?;
            (vs, model, cfg.clone())
        }
    };
    let opt = AdamW::new(&vs, ctx.t.adamw);
    Ok(Live {
        cfg,
        vs,
        model,
        opt,
    })
}

fn ckpt_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// The checkpoint with the highest step in `dir/checkpoints`, if any.
pub fn latest_checkpoint(run_dir: &Path) -> Option<PathBuf> {
    let dir = run_dir.join("checkpoints");
    let mut best: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(&dir).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if e.path().join("state.json").exists() && best.as_ref().is_none_or(|b| step > b.0) {
                best = Some((step, e.path()));
            }
        }
    }
    best.map(|b| b.1)
}

/// The model (and the tokenizer when the run brings its own) into `dir`.
fn save_run_model(dir: &Path, live: &Live, tokenizer_json: Option<&str>) -> Result<()> {
    save_model(dir, &live.cfg, &live.vs)?;
    if let Some(t) = tokenizer_json {
        crate::io::write_atomic(dir.join("tokenizer.json"), t.as_bytes())?;
    }
    Ok(())
}

fn save_checkpoint(
    run_dir: &Path,
    live: &Live,
    state: &RunState,
    t: &TrainOptions,
    tokenizer_json: Option<&str>,
) -> Result<PathBuf> {
    let dir = run_dir.join("checkpoints");
    let final_dir = dir.join(ckpt_name(state.step));
    let tmp = crate::io::temp_path(&final_dir)?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    save_run_model(&tmp, live, tokenizer_json)?;
    write_tensors(&live.opt.state(), &tmp.join("optimizer.safetensors"))?;
    let json = serde_json::to_string(state).map_err(|e| Error::invalid("state", e.to_string()))?;
    crate::io::write_atomic(tmp.join("state.json"), json.as_bytes())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    prune_checkpoints(&dir, t)?;
    Ok(final_dir)
}

/// Keep the last `keep_last` checkpoints and those in `keep_steps`.
fn prune_checkpoints(dir: &Path, t: &TrainOptions) -> Result<()> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("step-")
                .and_then(|s| s.parse().ok())
        })
        .collect();
    steps.sort_unstable();
    let n = steps.len();
    for (i, s) in steps.iter().enumerate() {
        if i + t.keep_last.max(1) < n && !t.keep_steps.contains(s) {
            let p = dir.join(ckpt_name(*s));
            std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

fn load_checkpoint(
    dir: &Path,
    device: Device,
    t: &TrainOptions,
    base: Option<&BaseSpec>,
) -> Result<(Live, RunState)> {
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| Error::io(&state_path, e))?;
    let state: RunState = serde_json::from_str(&text)
        .map_err(|e| Error::at_line(&state_path, e.line(), format!("bad checkpoint state: {e}")))?;
    let (vs, model) = crate::source::load_model(dir, device)?;
    let cfg = model.cfg.clone();
    if let Some(b) = base {
        upcycle::freeze(&vs, &cfg, b.train, b.last_k);
    }
    let mut opt = AdamW::new(&vs, t.adamw);
    let opt_path = dir.join("optimizer.safetensors");
    opt.load_state(&read_tensors(&opt_path)?, state.adam_t, |n| n.to_string())
        .map_err(|e| Error::in_file(&opt_path, e.to_string()))?;
    Ok((
        Live {
            cfg,
            vs,
            model,
            opt,
        },
        state,
    ))
}

/// Validation losses at `step`, per group and per sample, appended to the state.
fn validation(
    live: &Live,
    ctx: &RunCtx,
    val_idx: &[usize],
    step: u64,
    state: &mut RunState,
) -> Result<()> {
    if val_idx.is_empty() {
        return Ok(());
    }
    let data = ctx.data;
    let seqs = data.seqs(val_idx);
    let losses = crate::eval::sample_losses_with(
        &live.model,
        ctx.trunk.as_ref(),
        &seqs,
        64,
        ctx.device,
        ctx.seed,
    )?;
    let labels: Vec<&str> = val_idx
        .iter()
        .map(|&i| data.corpus.samples[i].domain.as_str())
        .collect();
    state.val.extend(
        crate::eval::group_losses(&losses, &labels)
            .into_iter()
            .map(|g| ValRow {
                step,
                loss: g.mean_loss(),
                ppl: g.perplexity(),
                group: g.group,
                samples: g.samples,
                tokens: g.tokens,
            }),
    );
    state
        .val_samples
        .extend(
            val_idx
                .iter()
                .zip(&losses)
                .zip(&labels)
                .map(|((&i, &(loss_sum, tokens)), d)| ValSampleRow {
                    step,
                    sample: i as u64,
                    domain: d.to_string(),
                    loss_sum,
                    tokens,
                }),
        );
    Ok(())
}

fn load_string(loads: &[(i64, tch::Tensor)]) -> String {
    loads
        .iter()
        .map(|(l, t)| {
            let v: Vec<i64> = Vec::try_from(t.to_device(Device::Cpu)).unwrap_or_default();
            format!(
                "{l}:{}",
                v.iter()
                    .map(|x| x.to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            )
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// A fresh run state for `run`.
fn fresh_state(run: &RunSpec, seed: u64) -> RunState {
    RunState {
        run: run.name.clone(),
        seed,
        step: 0,
        adam_t: 0,
        cse_initialized: false,
        log: vec![],
        val: vec![],
        val_samples: vec![],
        clusters: vec![],
    }
}

/// The model, optimiser and state a run starts from: its latest checkpoint (with `resume`, when
/// there is one and it matches the spec's model), else a fresh initialisation.
fn start_or_resume(
    run: &RunSpec,
    cfg: &ModelConfig,
    run_dir: &Path,
    ctx: &RunCtx,
    resume: bool,
    progress: &dyn Progress,
) -> Result<(Live, RunState)> {
    let Some(dir) = latest_checkpoint(run_dir).filter(|_| resume) else {
        return Ok((build_live(cfg, run, ctx)?, fresh_state(run, ctx.seed)));
    };
    progress.message(&format!("resuming {} from {}", run.name, dir.display()));
    let (live, state) = load_checkpoint(&dir, ctx.device, ctx.t, ctx.base)?;
    if live.cfg.vocab_size != cfg.vocab_size
        || live.cfg.d_model != cfg.d_model
        || live.cfg.n_layer != cfg.n_layer
    {
        return Err(Error::in_file(
            dir.join("config.json"),
            "the checkpoint's model does not match the spec",
        ));
    }
    Ok((live, state))
}

/// What every step of a run shares.
struct RunCtx<'a> {
    /// The config batches are built for (the spec's model, or the base model's with the
    /// training `max_len`).
    cfg: &'a ModelConfig,
    /// The model every run starts from, when not a fresh one.
    base: Option<&'a BaseSpec>,
    t: &'a TrainOptions,
    data: &'a TrainData,
    device: Device,
    seed: u64,
    run_dir: PathBuf,
    /// The frozen blocks' output per text, shared by the runs from one base model.
    trunk: Option<upcycle::Trunk<'a>>,
}

/// Replace the dense FFNs (or attention) of the CSE blocks by experts initialised from DBSCAN
/// clusters of sampled training sequences (`cse_init.json` records the clusters).
fn cse_initialise(
    live: &mut Live,
    c: &CseConfig,
    step: u64,
    ctx: &RunCtx,
) -> Result<Vec<cse_init::InitReport>> {
    let data = ctx.data;
    let pick = cse_init::sample_indices(data.train.len(), c.sample, ctx.seed ^ 0xc5e);
    let idx: Vec<usize> = pick.iter().map(|&k| data.train[k]).collect();
    let (inits, reports) = cse_init::cluster_blocks(&live.model, c, &data.seqs(&idx), ctx.device)?;
    let (vs, model, new_cfg) = expand_experts(&live.vs, &live.cfg, &inits)?;
    if let Some(b) = ctx.base {
        upcycle::freeze(&vs, &new_cfg, b.train, b.last_k);
    }
    let mut opt = AdamW::new(&vs, ctx.t.adamw);
    let old: HashMap<String, tch::Tensor> = live.opt.state().into_iter().collect();
    opt.load_state(&old, live.opt.t, expert_zero)?;
    *live = Live {
        cfg: new_cfg,
        vs,
        model,
        opt,
    };
    let json = serde_json::to_string_pretty(&reports.iter().map(|r| serde_json::json!({
        "layer": r.layer, "eps": r.eps, "dbscan_clusters": r.raw_clusters, "expert_sizes": r.sizes,
        "noise": r.noise, "radii": r.radii, "sampled": idx.len(), "step": step,
    })).collect::<Vec<_>>()).map_err(|e| Error::invalid("cse_init", e.to_string()))?;
    crate::io::write_atomic(ctx.run_dir.join("cse_init.json"), json.as_bytes())?;
    Ok(reports)
}

/// Cluster dynamics of the probe sequences at `step`, appended to the state.
fn record_dynamics(
    live: &Live,
    probe: &[&[u32]],
    step: u64,
    device: Device,
    state: &mut RunState,
) -> Result<()> {
    for r in dynamics::measure(&live.model, probe, step, device)? {
        state.clusters.push(ClusterRow {
            step: r.step,
            layer: r.layer,
            n_clusters: r.n_clusters,
            noise: r.noise,
            eps: r.eps,
            ratio: r.ratio,
        });
    }
    Ok(())
}

/// One optimiser step on the batch of `step`; a non-finite loss stops the run.
fn optimise_step(
    live: &mut Live,
    sampler: &mut Sampler,
    step: u64,
    aux_weight: f64,
    ctx: &RunCtx,
) -> Result<StepRow> {
    let (t, data, seed) = (ctx.t, ctx.data, ctx.seed);
    let t0 = Instant::now();
    let picks = sampler.batch(step, t.batch_size);
    let idx: Vec<usize> = picks.iter().map(|&k| data.train[k]).collect();
    let mut rng = step_rng(seed, step);
    let batch = make_batch(ctx.cfg, &data.seqs(&idx), idx.clone(), &mut rng, ctx.device);
    tch::manual_seed(seed.wrapping_add(step) as i64);
    let f = crate::model::Forward {
        train: true,
        capture: false,
        capacity: true,
        tape: None,
        head: false,
    };
    let (h, out) = match &ctx.trunk {
        // The frozen blocks below the trained ones run once per text for all runs of the spec.
        Some(trunk) => trunk.final_hidden(&live.model, &batch.ids, &batch.mask, &f)?,
        None => live.model.final_hidden_of(&batch.ids, &batch.mask, &f)?,
    };
    let loss = predicted_loss(&live.model, &h, &batch.targets);
    let total = &loss + &out.aux_loss * aux_weight;
    live.opt.zero_grad();
    total.backward();
    let grad_norm = live.opt.clip_grad_norm(t.grad_clip);
    let (loss_value, aux_value) = (loss.double_value(&[]), out.aux_loss.double_value(&[]));
    // Checked before the update, so the weights (and every checkpoint) stay finite.
    if !(loss_value.is_finite() && aux_value.is_finite() && grad_norm.is_finite()) {
        return Err(diverged(step, loss_value, aux_value, grad_norm, &idx, ctx));
    }
    let lr = lr_at(step, t.steps, t.warmup_steps, t.lr, t.min_lr_ratio);
    live.opt.step(lr);
    let tokens = i64::try_from(batch.mask.sum(tch::Kind::Int64)).unwrap_or(0);
    let row = StepRow {
        step: step + 1,
        loss: loss_value,
        aux_loss: aux_value,
        lr,
        grad_norm,
        tokens,
        tokens_per_s: tokens as f64 / t0.elapsed().as_secs_f64().max(1e-9),
        expert_load: load_string(&out.loads),
    };
    Ok(row)
}

/// Mean token loss of a batch from the last block's hidden states (b, t, d): only the positions
/// with a target go through the output layer (padding and, for BERT, unmasked positions do not,
/// and the output layer of a large vocabulary costs more than the blocks trained above a frozen
/// trunk). Equals [`token_losses`]' mean.
fn predicted_loss(model: &Model, h: &tch::Tensor, targets: &tch::Tensor) -> tch::Tensor {
    let d = h.size().last().copied().unwrap_or(0);
    let flat = targets.reshape([-1]);
    let keep = flat.ne(crate::model::IGNORE).nonzero().squeeze_dim(1);
    if keep.size()[0] == 0 {
        let (loss, _, _) = token_losses(&model.logits(h), targets);
        return loss;
    }
    let logits = model.logits(&h.reshape([-1, d]).index_select(0, &keep));
    logits.cross_entropy_for_logits(&flat.index_select(0, &keep))
}

/// The error of a step whose loss or gradient is not finite: the step, the values, the batch's
/// sample ids and the checkpoint a rerun would resume from.
fn diverged(step: u64, loss: f64, aux: f64, grad_norm: f64, idx: &[usize], ctx: &RunCtx) -> Error {
    const SHOWN: usize = 8;
    let ids: Vec<&str> = idx
        .iter()
        .take(SHOWN)
        .map(|&i| ctx.data.corpus.samples[i].id.as_str())
        .collect();
    let more = idx.len().saturating_sub(SHOWN);
    let kept = match latest_checkpoint(&ctx.run_dir) {
        Some(c) => format!("the last good checkpoint, {}, is kept", c.display()),
        None => "no checkpoint was written before it".to_string(),
    };
    Error::invalid(
        "train.lr",
        format!(
            "training diverged at step {} (loss {loss}, auxiliary loss {aux}, gradient norm \
             {grad_norm}) on the batch of samples {}{}; the run stopped before updating the \
             weights and {kept}; lower the learning rate or set grad_clip",
            step + 1,
            ids.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ),
    )
}

/// What a run's experts need: the CSE config and the step of its initialisation (after the dense
/// warm-up, at least one step), and the weight of the Switch load-balancing loss.
/// A run from a base model may cluster before its first step (`cse_warmup_fraction = 0`).
fn expert_settings(
    cfg: &ModelConfig,
    t: &TrainOptions,
    from_base: bool,
) -> (Option<CseConfig>, u64, f64) {
    let cse_step = ((t.cse_warmup_fraction * t.steps as f64).floor() as u64)
        .max(u64::from(!from_base))
        .min(t.steps);
    match &cfg.experts {
        ExpertConfig::Cse(c) => (Some(c.clone()), cse_step, 0.0),
        ExpertConfig::Switch(s) => (None, cse_step, s.aux_weight),
        ExpertConfig::Dense => (None, cse_step, 0.0),
    }
}

/// Validation perplexity at the current step, the final cluster dynamics (when `probe` is
/// given), then a checkpoint.
fn validate_and_checkpoint(
    live: &Live,
    state: &mut RunState,
    ctx: &RunCtx,
    val_idx: &[usize],
    probe: Option<&[&[u32]]>,
) -> Result<()> {
    let s = state.step;
    validation(live, ctx, val_idx, s, state)?;
    if let Some(probe) = probe {
        record_dynamics(live, probe, s, ctx.device, state)?;
    }
    checkpoint(live, state, ctx)
}

/// Save a checkpoint of the run as it stands, and its tables.
fn checkpoint(live: &Live, state: &mut RunState, ctx: &RunCtx) -> Result<()> {
    state.adam_t = live.opt.t;
    save_checkpoint(
        &ctx.run_dir,
        live,
        state,
        ctx.t,
        ctx.data.tokenizer_json.as_deref(),
    )?;
    write_tables(&ctx.run_dir, state)
}

/// The settings a run's checkpoints depend on: the model (the run's config, experts included),
/// the base model, every training option but `checkpoint_every` (which only says when to save),
/// the validation size, the corpus's token ids and split, the up-weighted selection, and the seed.
fn run_manifest(
    spec: &TrainSpec,
    run: &RunSpec,
    cfg: &ModelConfig,
    data: &TrainData,
    selection: Option<&selection::Selection>,
    seed: u64,
) -> Result<Manifest> {
    let mut m = Manifest::new("train");
    m.set_fields("model", cfg)?;
    m.set_fields("experts", &run.experts)?;
    m.set_fields("train", &spec.train)?;
    m.settings.remove("train.checkpoint_every");
    if let Some(b) = &spec.base {
        m.set("base.model", crate::manifest::file_identity(&b.model))
            .set("base.train", format!("{:?}", b.train))
            .set("base.last_k", b.last_k)
            .set("base.max_len", format!("{:?}", b.max_len))
            .set("base.upcycle", b.upcycle);
    }
    if let Some(sel) = selection {
        m.set("selection", sel.fingerprint());
    }
    let all: Vec<&[u32]> = data.ids.iter().map(|s| s.as_slice()).collect();
    m.set("data.corpus", crate::manifest::fingerprint_ids(&all))
        .set(
            "data.split",
            format!("{} train, {} validation", data.train.len(), data.val.len()),
        )
        .set("data.eval_samples", spec.data.eval_samples)
        .set("seed", seed);
    Ok(m)
}

/// Train one run of a spec into `out/<run.name>`. With `resume`, continue from the latest
/// checkpoint there (a fresh start when there is none).
#[allow(clippy::too_many_arguments)]
pub fn train_run(
    spec: &TrainSpec,
    run: &RunSpec,
    data: &TrainData,
    out: &Path,
    device: Device,
    seed: u64,
    resume: bool,
    stop: &AtomicBool,
    progress: &dyn Progress,
) -> Result<RunResult> {
    let t = &spec.train;
    let started = Instant::now();
    let cfg = match &spec.base {
        Some(b) => upcycle::batch_config(&upcycle::checked_config(b, data.vocab)?, b.max_len),
        None => spec.model_config(run, data.vocab)?,
    };
    let ctx = RunCtx {
        cfg: &cfg,
        base: spec.base.as_ref(),
        t,
        data,
        device,
        seed,
        run_dir: out.join(&run.name),
        trunk: spec
            .base
            .as_ref()
            .and_then(|b| upcycle::trunk(&data.trunk, b, &cfg)),
    };
    let run_dir = &ctx.run_dir;
    let _lock = OutputLock::acquire(run_dir, &format!("tailscope train, run {}", run.name))?;
    let chosen = spec
        .selection
        .as_ref()
        .map(|s| selection::Selection::resolve(s, data))
        .transpose()?;
    let manifest = run_manifest(spec, run, &cfg, data, chosen.as_ref(), seed)?;
    if resume {
        manifest.check_resume(
            run_dir,
            latest_checkpoint(run_dir).is_some(),
            "to start afresh, train without --resume (or set resume = false under [train] of a \
             `run` spec)",
        )?;
    } else {
        // A fresh start: checkpoints of an earlier run here must not be resumed later.
        crate::manifest::clear(run_dir, &["checkpoints"])?;
        manifest.write(run_dir)?;
    }
    let (mut live, mut state) = start_or_resume(run, &cfg, run_dir, &ctx, resume, progress)?;
    let (cse_cfg, cse_step, aux_weight) = expert_settings(&live.cfg, t, ctx.base.is_some());
    let mut cse_reports = Vec::new();
    let val_idx = data.val_subset(spec.data.eval_samples);
    let probe = data.seqs(&data.val_subset(t.probe_samples));
    let mut sampler = selection::sampler(chosen.as_ref(), data, seed)?;
    if let Some(trunk) = &ctx.trunk {
        declare_trunk_rows(trunk, &mut sampler, &ctx, &val_idx, &live.cfg);
    }
    progress.start(&run.name, t.steps, state.step);
    let dynamics_due = |step: u64| {
        step == 0 || step == t.steps || (t.dynamics_every > 0 && step % t.dynamics_every == 0)
    };
    let result = |outcome, live: &Live, state: RunState, cse_init| RunResult {
        outcome,
        dir: run_dir.clone(),
        params: count_params(live),
        state,
        cse_init,
        seconds: started.elapsed().as_secs_f64(),
    };
    if let (Some(c), false) = (&cse_cfg, state.cse_initialized) {
        // A CSE model continued as it is (`base.upcycle = false`) is initialised already.
        state.cse_initialized = !c.experts.is_empty();
    }
    if state.step == 0 && !state.val.iter().any(|v| v.step == 0) {
        // Where the run starts: the base model's perplexity, or a fresh model's.
        validation(&live, &ctx, &val_idx, 0, &mut state)?;
    }
    while state.step < t.steps {
        let step = state.step;
        if stop.load(Ordering::SeqCst) {
            checkpoint(&live, &mut state, &ctx)?;
            progress.finish();
            return Ok(result(
                Outcome::Interrupted(step),
                &live,
                state,
                cse_reports,
            ));
        }
        if let (Some(c), false, true) = (&cse_cfg, state.cse_initialized, step == cse_step) {
            let msg = format!(
                "{}: CSE initialisation after {step} dense warm-up steps",
                run.name
            );
            progress.message(&msg);
            cse_reports = cse_initialise(&mut live, c, step, &ctx)?;
            state.cse_initialized = true;
        }
        if dynamics_due(step) && !state.clusters.iter().any(|r| r.step == step) {
            record_dynamics(&live, &probe, step, device, &mut state)?;
        }
        let row = optimise_step(&mut live, &mut sampler, step, aux_weight, &ctx)?;
        progress.step(&row);
        state.log.push(row);
        state.step += 1;
        let s = state.step;
        if s == t.steps
            || (t.checkpoint_every > 0 && s % t.checkpoint_every == 0)
            || t.keep_steps.contains(&s)
        {
            let probe = (s == t.steps && dynamics_due(s)).then_some(probe.as_slice());
            validate_and_checkpoint(&live, &mut state, &ctx, &val_idx, probe)?;
        }
    }
    save_run_model(
        &run_dir.join("final"),
        &live,
        data.tokenizer_json.as_deref(),
    )?;
    write_tables(run_dir, &state)?;
    progress.finish();
    Ok(result(Outcome::Finished, &live, state, cse_reports))
}

/// Declare to the trunk cache the texts a run reads, in an order that depends only on the spec,
/// seed and corpus (so a resumed run chunks them as an uninterrupted one): the training samples
/// of every step (as batches encode them) and the validation samples (as evaluation does).
fn declare_trunk_rows(
    trunk: &upcycle::Trunk,
    sampler: &mut Sampler,
    ctx: &RunCtx,
    val_idx: &[usize],
    model_cfg: &ModelConfig,
) {
    let data = ctx.data;
    let mut used: Vec<usize> = (0..ctx.t.steps)
        .flat_map(|s| sampler.batch(s, ctx.t.batch_size))
        .map(|k| data.train[k])
        .collect();
    used.sort_unstable();
    used.dedup();
    let rows = |idx: &[usize], cfg: &ModelConfig| -> Vec<Vec<i64>> {
        idx.iter()
            .filter_map(|&i| crate::batch::causal_row(cfg, &data.ids[i]))
            .collect()
    };
    trunk.declare(&rows(&used, ctx.cfg));
    trunk.declare(&rows(val_idx, model_cfg));
}

/// `h.3.mlp.experts.2.c_fc.weight` → `h.3.mlp.experts.0.c_fc.weight`: new experts take the
/// optimiser moments of the module they were copied from.
fn expert_zero(name: &str) -> String {
    let mut parts: Vec<&str> = name.split('.').collect();
    if let Some(i) = parts.iter().position(|p| *p == "experts") {
        if i + 1 < parts.len() {
            parts[i + 1] = "0";
        }
    }
    parts.join(".")
}

fn count_params(live: &Live) -> i64 {
    named_variables(&live.vs)
        .iter()
        .filter(|(_, t)| t.requires_grad())
        .map(|(_, t)| t.numel() as i64)
        .sum()
}

/// `log.parquet`, `val.parquet` and `clusters.parquet` of a run.
fn write_tables(run_dir: &Path, s: &RunState) -> Result<()> {
    crate::io::write_parquet(&mut log_frame(&s.log)?, run_dir.join("log.parquet"))?;
    crate::io::write_parquet(&mut val_frame(&s.val)?, run_dir.join("val.parquet"))?;
    crate::io::write_parquet(
        &mut val_sample_frame(&s.val_samples)?,
        run_dir.join("val_samples.parquet"),
    )?;
    crate::io::write_parquet(
        &mut cluster_frame(&s.clusters)?,
        run_dir.join("clusters.parquet"),
    )
}

fn log_frame(l: &[StepRow]) -> Result<DataFrame> {
    DataFrame::new(
        l.len(),
        vec![
            Column::new("step".into(), l.iter().map(|r| r.step).collect::<Vec<_>>()),
            Column::new("loss".into(), l.iter().map(|r| r.loss).collect::<Vec<_>>()),
            Column::new(
                "aux_loss".into(),
                l.iter().map(|r| r.aux_loss).collect::<Vec<_>>(),
            ),
            Column::new("lr".into(), l.iter().map(|r| r.lr).collect::<Vec<_>>()),
            Column::new(
                "grad_norm".into(),
                l.iter().map(|r| r.grad_norm).collect::<Vec<_>>(),
            ),
            Column::new(
                "tokens".into(),
                l.iter().map(|r| r.tokens).collect::<Vec<_>>(),
            ),
            Column::new(
                "tokens_per_s".into(),
                l.iter().map(|r| r.tokens_per_s).collect::<Vec<_>>(),
            ),
            Column::new(
                "expert_load".into(),
                l.iter().map(|r| r.expert_load.as_str()).collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("step log", e))
}

fn val_frame(v: &[ValRow]) -> Result<DataFrame> {
    DataFrame::new(
        v.len(),
        vec![
            Column::new("step".into(), v.iter().map(|r| r.step).collect::<Vec<_>>()),
            Column::new(
                "group".into(),
                v.iter().map(|r| r.group.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "samples".into(),
                v.iter().map(|r| r.samples as u64).collect::<Vec<_>>(),
            ),
            Column::new(
                "tokens".into(),
                v.iter().map(|r| r.tokens).collect::<Vec<_>>(),
            ),
            Column::new("loss".into(), v.iter().map(|r| r.loss).collect::<Vec<_>>()),
            Column::new("ppl".into(), v.iter().map(|r| r.ppl).collect::<Vec<_>>()),
        ],
    )
    .map_err(|e| Error::table("validation log", e))
}

fn val_sample_frame(v: &[ValSampleRow]) -> Result<DataFrame> {
    DataFrame::new(
        v.len(),
        vec![
            Column::new("step".into(), v.iter().map(|r| r.step).collect::<Vec<_>>()),
            Column::new(
                "sample".into(),
                v.iter().map(|r| r.sample).collect::<Vec<_>>(),
            ),
            Column::new(
                "domain".into(),
                v.iter().map(|r| r.domain.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "loss_sum".into(),
                v.iter().map(|r| r.loss_sum).collect::<Vec<_>>(),
            ),
            Column::new(
                "tokens".into(),
                v.iter().map(|r| r.tokens).collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("validation samples", e))
}

fn cluster_frame(c: &[ClusterRow]) -> Result<DataFrame> {
    DataFrame::new(
        c.len(),
        vec![
            Column::new("step".into(), c.iter().map(|r| r.step).collect::<Vec<_>>()),
            Column::new(
                "layer".into(),
                c.iter().map(|r| r.layer).collect::<Vec<_>>(),
            ),
            Column::new(
                "n_clusters".into(),
                c.iter().map(|r| r.n_clusters as u64).collect::<Vec<_>>(),
            ),
            Column::new(
                "noise".into(),
                c.iter().map(|r| r.noise as u64).collect::<Vec<_>>(),
            ),
            Column::new("eps".into(), c.iter().map(|r| r.eps).collect::<Vec<_>>()),
            Column::new(
                "ratio".into(),
                c.iter().map(|r| r.ratio).collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("cluster dynamics", e))
}

//! `tailscope analyze` as a function: the per-sample statistics of an NTK run's samples — loss,
//! uncertainty, position-matched excess loss ([`super::features`]), reducible loss against a
//! reference model, the kernel statistics of learnability against the training data
//! ([`super::learnability`]), their domain's |GC|, trajectory statistics over checkpoints — the
//! neglect score and flags ([`super::neglect`]) with the evidence for each flag (nearest
//! training texts included), frequency correlations with bootstrap intervals, and, against a
//! dense baseline's kernel, expert isolation. [`analyze`] returns values; [`Analysis::write`]
//! writes `analysis.parquet`, `correlations.parquet`, `flags.parquet`, `neighbours.parquet`,
//! `isolation.parquet` and `summary.json`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use polars::prelude::{Column, DataFrame};
use tch::Device;

use super::features;
use super::isolation::{self, Isolation};
use super::learnability::{self, Learnability, LearnabilityOptions};
use super::neglect::{Feature, FeatureTable, NeglectModel, Scored};
use crate::capture::job::{Job, JobSpec};
use crate::capture::projection::{Projection, ProjectionKind};
use crate::capture::{CaptureOptions, Selection};
use crate::corpus::{tokenizer, Corpus, SplitChoice};
use crate::error::{Error, Result};
use crate::eval::TokenStats;
use crate::io::{column_f64, column_str, read_parquet};
use crate::progress::Progress;
use crate::stats::{bootstrap, Corr, Estimate};

/// Bootstrap resamples of each correlation by default.
pub const DEFAULT_RESAMPLES: usize = 1000;
/// 1 − confidence of the intervals by default.
pub const DEFAULT_ALPHA: f64 = 0.05;
/// Loss gradients over more parameter values than this are projected (sparse, to
/// [`LEARNABILITY_PROJECTION`] per tensor) for the learnability statistics.
pub const PROJECT_ABOVE: i64 = 1 << 20;
/// Projection dimension per tensor of large learnability captures.
pub const LEARNABILITY_PROJECTION: i64 = 2048;

/// What to analyse and how.
#[derive(Debug, Clone)]
pub struct AnalyzeSpec {
    /// An `ntk` output folder (samples.parquet, gc.parquet, ntk.json).
    pub ntk: PathBuf,
    /// The model the kernel was computed for.
    pub model: PathBuf,
    /// The corpus table.
    pub corpus: PathBuf,
    /// The tokenizer (default: the model's, else the corpus's).
    pub tokenizer: Option<PathBuf>,
    /// Bootstrap resamples of each correlation.
    pub resamples: usize,
    /// 1 − confidence of the intervals.
    pub alpha: f64,
    /// An `ntk` folder of the dense baseline on the same samples: adds expert isolation.
    pub baseline: Option<PathBuf>,
    /// The kernel statistics of learnability against the training split (`None`: skipped).
    pub learnability: Option<LearnabilityOptions>,
    /// A reference model (same tokenizer) for the reducible loss.
    pub reference: Option<PathBuf>,
    /// A training run folder (or its `checkpoints/`) for the trajectory statistics.
    pub checkpoints: Option<PathBuf>,
    /// The neglect model (default: the compiled-in `analyses/neglect-weights.toml`).
    pub neglect_model: Option<PathBuf>,
    /// Memory budget of the gradient captures, in bytes.
    pub memory: Option<u64>,
    /// Seed of the bootstrap, of BERT masks and of the draws of the learnability pool.
    pub seed: u64,
}

impl AnalyzeSpec {
    /// An analysis of `ntk`'s samples under `model` on `corpus` with every default: the
    /// learnability statistics on, no reference, no checkpoints, the default neglect model.
    pub fn new(ntk: &Path, model: &Path, corpus: &Path) -> AnalyzeSpec {
        AnalyzeSpec {
            ntk: ntk.to_path_buf(),
            model: model.to_path_buf(),
            corpus: corpus.to_path_buf(),
            tokenizer: None,
            resamples: DEFAULT_RESAMPLES,
            alpha: DEFAULT_ALPHA,
            baseline: None,
            learnability: Some(LearnabilityOptions::default()),
            reference: None,
            checkpoints: None,
            neglect_model: None,
            memory: None,
            seed: 0,
        }
    }
}

/// One frequency correlation with its bootstrap interval.
#[derive(Debug, Clone)]
pub struct CorrRow {
    /// The first variable.
    pub x: String,
    /// The second variable.
    pub y: String,
    /// Spearman, Pearson or Kendall.
    pub method: Corr,
    /// Value and interval.
    pub estimate: Estimate,
}

/// A flagged sample with its evidence.
#[derive(Debug, Clone, PartialEq)]
pub struct Flag {
    /// Index of the sample in the analysed set.
    pub index: usize,
    /// Its neglect probability.
    pub score: f64,
    /// The largest contributions to the score, in words with their values.
    pub reasons: Vec<String>,
}

/// Everything an analysis yields.
pub struct Analysis {
    /// The sample ids, in the NTK run's order.
    pub ids: Vec<String>,
    /// The NTK sample table joined with every statistic, the neglect score and text.
    pub joined: DataFrame,
    /// Frequency correlations.
    pub correlations: Vec<CorrRow>,
    /// The flagged samples, highest score first.
    pub flagged: Vec<Flag>,
    /// `flags.parquet`.
    pub flags_table: DataFrame,
    /// `neighbours.parquet` (when the learnability statistics were computed).
    pub neighbours_table: Option<DataFrame>,
    /// Every statistic per sample.
    pub features: FeatureTable,
    /// Every sample's neglect score.
    pub scores: Vec<Scored>,
    /// The learnability statistics, when computed.
    pub learnability: Option<Learnability>,
    /// Precision and recall of the flags against the corpus's ground truth, when it has one.
    pub precision_recall: Option<(f64, f64)>,
    /// GC per frequency bin from the NTK run: (bin, GC).
    pub gc_by_bin: Vec<(String, f64)>,
    /// Expert isolation, when a baseline was given.
    pub isolation: Option<Isolation>,
    /// `summary.json`.
    pub summary: serde_json::Value,
}

/// The per-sample columns of an NTK run's `samples.parquet`.
struct NtkSamples {
    path: PathBuf,
    frame: DataFrame,
    ids: Vec<String>,
    domains: Vec<String>,
    freq: Vec<f64>,
    align: Vec<f64>,
    selfk: Vec<f64>,
    n_tokens: Vec<f64>,
}

impl NtkSamples {
    fn read(ntk: &Path) -> Result<NtkSamples> {
        let path = ntk.join("samples.parquet");
        let frame = read_parquet(&path)?;
        Ok(NtkSamples {
            ids: column_str(&frame, "id", &path)?,
            domains: column_str(&frame, "domain", &path)?,
            freq: column_f64(&frame, "freq_score", &path)?,
            align: column_f64(&frame, "alignment", &path)?,
            selfk: column_f64(&frame, "self_kernel", &path)?,
            n_tokens: column_f64(&frame, "n_tokens", &path)?,
            frame,
            path,
        })
    }
}

/// Check the interval level and the learnability settings.
fn check(spec: &AnalyzeSpec) -> Result<()> {
    if !(spec.alpha > 0.0 && spec.alpha < 1.0) {
        return Err(Error::invalid(
            "--alpha",
            format!("must be in (0, 1), got {}", spec.alpha),
        ));
    }
    if let Some(l) = &spec.learnability {
        l.check()?;
    }
    Ok(())
}

/// The model, its tokenizer's encoding of the analysed texts, and the texts.
struct Loaded {
    corpus: Corpus,
    rows: Vec<usize>,
    model: crate::model::Model,
    enc: Vec<Vec<u32>>,
}

impl Loaded {
    fn texts(&self) -> Vec<&str> {
        self.rows
            .iter()
            .map(|&i| self.corpus.samples[i].text.as_str())
            .collect()
    }
    fn seqs(&self) -> Vec<&[u32]> {
        self.enc.iter().map(Vec::as_slice).collect()
    }
}

fn load(spec: &AnalyzeSpec, s: &NtkSamples, device: Device) -> Result<Loaded> {
    let corpus = Corpus::read(&spec.corpus)?;
    let rows = corpus_rows(&corpus, s, &spec.corpus)?;
    let (_, model) = crate::source::load_model(&spec.model, device)?;
    let tok =
        crate::source::tokenizer_for(spec.tokenizer.as_deref(), &spec.model, &model, &spec.corpus)?;
    let texts: Vec<&str> = rows
        .iter()
        .map(|&i| corpus.samples[i].text.as_str())
        .collect();
    let enc = tokenizer::encode_all(&tok, &texts)?;
    Ok(Loaded {
        corpus,
        rows,
        model,
        enc,
    })
}

/// Analyse an NTK run.
pub fn analyze(spec: &AnalyzeSpec, device: Device, progress: &dyn Progress) -> Result<Analysis> {
    check(spec)?;
    let neglect = match &spec.neglect_model {
        Some(p) => NeglectModel::read(p)?,
        None => NeglectModel::default_model()?,
    };
    let s = NtkSamples::read(&spec.ntk)?;
    let ld = load(spec, &s, device)?;
    progress.start("per-token losses", None);
    let stats = crate::eval::sample_token_stats(&ld.model, &ld.seqs(), 64, device, spec.seed)?;
    progress.finish();
    let mut table = fit_features(&stats, &s);
    if let Some(r) = &spec.reference {
        let reducible = reducible_losses(spec, r, &ld, &stats, device)?;
        table.push((Feature::ReducibleLoss, reducible));
    }
    table.push((Feature::DomainGc, domain_gc(&spec.ntk, &s.domains)?));
    let learn = match &spec.learnability {
        Some(opts) => {
            let job = gradient_job(spec, &ld.rows, device)?;
            let l = learnability::measure(&job, opts, device, progress)?;
            table.push((Feature::PredictedDecrease, l.predicted_decrease.clone()));
            table.push((Feature::Support, l.support.clone()));
            table.push((Feature::SupportCos, l.support_cos.clone()));
            table.push((Feature::GradNorm, l.self_kernel.clone()));
            Some(l)
        }
        None => None,
    };
    if let Some(dir) = &spec.checkpoints {
        table.extend(trajectory(spec, dir, &ld, device, progress)?);
    }
    let scores = neglect.score(&table)?;
    let fin = finish(spec, s, ld, table, scores, learn, device)?;
    Ok(fin.with_model_features(&neglect))
}

/// Everything after the statistics: flags, tables, correlations, truth, isolation, summary.
fn finish(
    spec: &AnalyzeSpec,
    s: NtkSamples,
    ld: Loaded,
    table: FeatureTable,
    scores: Vec<Scored>,
    learn: Option<Learnability>,
    device: Device,
) -> Result<Analysis> {
    let texts = ld.texts();
    let mut flagged: Vec<Flag> = scores
        .iter()
        .enumerate()
        .filter(|(_, x)| x.flagged)
        .map(|(i, x)| Flag {
            index: i,
            score: x.probability,
            reasons: reasons(x),
        })
        .collect();
    flagged.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.index.cmp(&b.index)));
    let lt = long_tail_domains(&ld.corpus);
    let joined = joined_table(&s, &table, &scores, &flagged, &lt, &texts)?;
    let neighbours = learn
        .as_ref()
        .map(|l| neighbours_frame(&s.ids, l, &ld.corpus))
        .transpose()?;
    let flags_table = flags_frame(&s, &table, &flagged, learn.as_ref(), &ld.corpus, &texts)?;
    let correlations = correlations(&s, &table, spec);
    // Ground truth, when the corpus carries it (synthetic corpora): `neglected` where the corpus
    // separates neglect from rarity and noise (`corpus synth --contrasts`), else `long_tail`.
    let truth: Option<Vec<bool>> = ld
        .rows
        .iter()
        .map(|&i| {
            let x = &ld.corpus.samples[i];
            x.neglected.or(x.long_tail)
        })
        .collect();
    let flagged_idx: Vec<usize> = flagged.iter().map(|f| f.index).collect();
    let precision_recall = truth
        .as_ref()
        .map(|t| super::flags::precision_recall(&flagged_idx, t));
    let probs: Vec<f64> = scores.iter().map(|x| x.probability).collect();
    let ranking = truth.as_ref().map(|t| {
        serde_json::json!({
            "ap": crate::stats::average_precision_tied(&probs, t),
            "auroc": crate::stats::auroc_tied(&probs, t),
        })
    });
    let gc_by_bin = gc_by_bin(&spec.ntk)?;
    let isolation = match &spec.baseline {
        Some(b) => Some(isolation_of(
            spec,
            b,
            &s,
            &lt,
            (&ld.model, &ld.seqs(), device),
        )?),
        None => None,
    };
    let reports = isolation
        .as_ref()
        .map(|i| i.reports.clone())
        .unwrap_or_default();
    let summary = serde_json::json!({
        "isolation": reports,
        "inputs": {"ntk": spec.ntk, "model": spec.model, "corpus": spec.corpus, "tokenizer": spec.tokenizer,
                   "reference": spec.reference, "checkpoints": spec.checkpoints},
        "samples": s.ids.len(), "flags": flagged.len(),
        "features": table.iter().map(|(f, _)| f.name()).collect::<Vec<_>>(),
        "learnability": spec.learnability, "learnability_pool": learn.as_ref().map(|l| l.train_idx.len()),
        "precision": precision_recall.map(|x| x.0), "recall": precision_recall.map(|x| x.1),
        "neglect_ranking": ranking,
        "correlations": correlations.iter().map(|r| serde_json::json!({"x": r.x, "y": r.y, "method": r.method, "estimate": r.estimate})).collect::<Vec<_>>(),
    });
    Ok(Analysis {
        ids: s.ids,
        joined,
        correlations,
        flagged,
        flags_table,
        neighbours_table: neighbours,
        features: table,
        scores,
        learnability: learn,
        precision_recall,
        gc_by_bin,
        isolation,
        summary,
    })
}

/// The statistics that need only the model's token losses and the NTK sample table.
fn fit_features(stats: &[TokenStats], s: &NtkSamples) -> FeatureTable {
    let mu = features::position_means(stats);
    vec![
        (Feature::Loss, features::mean_losses(stats)),
        (Feature::ExcessLoss, features::excess_losses(stats, &mu)),
        (Feature::Uncertainty, features::mean_entropies(stats)),
        (Feature::FreqScore, s.freq.clone()),
        (Feature::Alignment, s.align.clone()),
    ]
}

/// The flag's reasons in words: its three largest contributions with their values.
fn reasons(x: &Scored) -> Vec<String> {
    x.contributions
        .iter()
        .filter(|c| c.contribution > 0.0)
        .map(|c| c.words())
        .collect()
}

/// Mean loss minus the reference model's mean loss on the same tokens. The reference must
/// tokenise every analysed text as the model's tokenizer does.
fn reducible_losses(
    spec: &AnalyzeSpec,
    reference: &Path,
    ld: &Loaded,
    stats: &[TokenStats],
    device: Device,
) -> Result<Vec<f64>> {
    let (_, rmodel) = crate::source::load_model(reference, device)?;
    let rtok = crate::source::tokenizer_for(None, reference, &rmodel, &spec.corpus)?;
    let renc = tokenizer::encode_all(&rtok, &ld.texts())?;
    if let Some(i) = (0..renc.len()).find(|&i| renc[i] != ld.enc[i]) {
        return Err(Error::invalid(
            "--reference",
            format!(
                "{} tokenises sample {:?} differently from --model {}; a reference model must \
                 share the model's tokenizer",
                reference.display(),
                ld.corpus.samples[ld.rows[i]].id,
                spec.model.display()
            ),
        ));
    }
    if let Some(&max) = ld.enc.iter().flatten().max() {
        if i64::from(max) >= rmodel.cfg.vocab_size {
            return Err(Error::invalid(
                "--reference",
                format!(
                    "token id {max} is beyond the reference's vocabulary of {}",
                    rmodel.cfg.vocab_size
                ),
            ));
        }
    }
    let rstats = crate::eval::sample_token_stats(&rmodel, &ld.seqs(), 64, device, spec.seed)?;
    // Same tokenizer is not enough: a reference with a shorter context (or another start token)
    // would average other positions.
    if let Some(i) = (0..stats.len()).find(|&i| stats[i].positions != rstats[i].positions) {
        return Err(Error::invalid(
            "--reference",
            format!(
                "{} scores other positions of sample {:?} than --model {} ({} against {} \
                 predicted tokens: another context length or start token); a reference model \
                 must share the model's context length",
                reference.display(),
                ld.corpus.samples[ld.rows[i]].id,
                spec.model.display(),
                rstats[i].positions.len(),
                stats[i].positions.len()
            ),
        ));
    }
    Ok(stats
        .iter()
        .zip(&rstats)
        .map(|(a, b)| a.mean_loss() - b.mean_loss())
        .collect())
}

/// |GC| of each sample's domain from the NTK run's `gc.parquet` (NaN where undefined). The
/// magnitude: GC's sign follows the principal direction's arbitrary sign.
fn domain_gc(ntk: &Path, domains: &[String]) -> Result<Vec<f64>> {
    let path = ntk.join("gc.parquet");
    let gc = read_parquet(&path)?;
    let (col, group, val) = (
        column_str(&gc, "column", &path)?,
        column_str(&gc, "group", &path)?,
        column_f64(&gc, "gc", &path)?,
    );
    let by: HashMap<&str, f64> = (0..col.len())
        .filter(|&i| col[i] == "domain")
        .map(|i| (group[i].as_str(), val[i].abs()))
        .collect();
    Ok(domains
        .iter()
        .map(|d| by.get(d.as_str()).copied().unwrap_or(f64::NAN))
        .collect())
}

/// A capture job over the analysed samples' loss gradients: the NTK run's parameters (as its
/// `ntk.json` lists them; the recommended selection for runs that predate the list), the mean
/// token loss, projected (sparse) above [`PROJECT_ABOVE`] values.
pub fn gradient_job(spec: &AnalyzeSpec, rows: &[usize], device: Device) -> Result<Job> {
    let listed = ntk_params(&spec.ntk)?;
    let selection = match &listed {
        Some(_) => Selection::default(),
        None => Selection::recommended(),
    };
    let jspec = JobSpec {
        model: spec.model.clone(),
        corpus: spec.corpus.clone(),
        tokenizer: spec.tokenizer.clone(),
        split: SplitChoice::All,
        samples: 1,
        sample_seed: 0,
        selection,
        options: CaptureOptions {
            seed: spec.seed,
            memory: spec.memory,
            ..CaptureOptions::default()
        },
    };
    let mut job = Job::prepare(&jspec, device)?;
    if let Some(names) = listed {
        let want: HashSet<&str> = names.iter().map(String::as_str).collect();
        job.params.retain(|(n, _)| want.contains(n.as_str()));
        if job.params.len() != want.len() {
            return Err(Error::in_file(
                spec.ntk.join("ntk.json"),
                format!(
                    "lists {} parameters, of which {} are in {}",
                    want.len(),
                    job.params.len(),
                    spec.model.display()
                ),
            ));
        }
    }
    if job.parameter_count() > PROJECT_ABOVE {
        job.opts.projection = Some(Projection {
            kind: ProjectionKind::Sparse,
            dim: LEARNABILITY_PROJECTION,
            seed: spec.seed,
        });
    }
    job.with_samples(rows.to_vec())
}

/// The parameter names `ntk.json` lists, when it lists them.
fn ntk_params(ntk: &Path) -> Result<Option<Vec<String>>> {
    let p = ntk.join("ntk.json");
    let text = match std::fs::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(&p, e)),
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::in_file(&p, e.to_string()))?;
    Ok(v.get("params").and_then(|x| x.as_array()).map(|a| {
        a.iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    }))
}

/// The checkpoints of a run folder (or of its `checkpoints/` folder), by step, with the
/// learning rate of each step from the run's `log.parquet`.
fn checkpoint_list(dir: &Path) -> Result<Vec<(u64, PathBuf, f64)>> {
    let (ckpt, run) = if dir.join("checkpoints").is_dir() {
        (dir.join("checkpoints"), dir.to_path_buf())
    } else {
        (
            dir.to_path_buf(),
            dir.parent().map(Path::to_path_buf).unwrap_or_default(),
        )
    };
    let entries = std::fs::read_dir(&ckpt).map_err(|e| Error::io(&ckpt, e))?;
    let mut list: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            Some((step, e.path()))
        })
        .collect();
    list.sort();
    if list.len() < 2 {
        return Err(Error::invalid(
            "--checkpoints",
            format!(
                "{} holds {} checkpoint(s) (step-N folders); the trajectory needs at least 2",
                ckpt.display(),
                list.len()
            ),
        ));
    }
    let log = run.join("log.parquet");
    let df = read_parquet(&log)?;
    let (steps, lrs) = (column_f64(&df, "step", &log)?, column_f64(&df, "lr", &log)?);
    let lr_at: HashMap<u64, f64> = steps
        .iter()
        .zip(&lrs)
        .map(|(&s, &l)| (s as u64, l))
        .collect();
    list.into_iter()
        .map(|(step, p)| {
            let lr = lr_at.get(&step).copied().ok_or_else(|| {
                Error::in_file(&log, format!("no learning rate logged for step {step}"))
            })?;
            Ok((step, p, lr))
        })
        .collect()
}

/// Loss slope, forgetting events and self-influence of every sample over the checkpoints.
fn trajectory(
    spec: &AnalyzeSpec,
    dir: &Path,
    ld: &Loaded,
    device: Device,
    progress: &dyn Progress,
) -> Result<FeatureTable> {
    let list = checkpoint_list(dir)?;
    let n = ld.rows.len();
    let (mut losses, mut norms) = (vec![Vec::new(); n], vec![Vec::new(); n]);
    for (step, path, _) in &list {
        progress.start(&format!("checkpoint step {step}"), None);
        let (_, m) = crate::source::load_model(path, device)?;
        let st = crate::eval::sample_token_stats(&m, &ld.seqs(), 64, device, spec.seed)?;
        let cspec = AnalyzeSpec {
            model: path.clone(),
            ..spec.clone()
        };
        let job = gradient_job(&cspec, &ld.rows, device)?;
        let opts = CaptureOptions {
            norms_only: true,
            ..job.opts.clone()
        };
        let cx = job.capture_with(&job.ids, "", &opts, device, &crate::progress::Silent)?;
        let k = crate::ntk::kernel(&cx, None, crate::ntk::BlockBy::None, true)?.total;
        let kd: Vec<f64> = Vec::try_from(k.to_kind(tch::Kind::Double).view([-1]))?;
        for i in 0..n {
            losses[i].push(st[i].mean_loss());
            norms[i].push(kd[i]);
        }
        progress.finish();
    }
    let steps: Vec<u64> = list.iter().map(|x| x.0).collect();
    let lrs: Vec<f64> = list.iter().map(|x| x.2).collect();
    let t: Vec<(f64, f64, f64)> = (0..n)
        .map(|i| features::trajectory(&losses[i], &norms[i], &steps, &lrs))
        .collect();
    Ok(vec![
        (Feature::LossSlope, t.iter().map(|x| x.0).collect()),
        (Feature::Forgetting, t.iter().map(|x| x.1).collect()),
        (Feature::SelfInfluence, t.iter().map(|x| x.2).collect()),
    ])
}

/// Expert isolation of the analysed model against the baseline's NTK folder `baseline`.
fn isolation_of(
    spec: &AnalyzeSpec,
    baseline: &Path,
    s: &NtkSamples,
    lt: &HashSet<String>,
    (model, seqs, device): (&crate::model::Model, &[&[u32]], Device),
) -> Result<Isolation> {
    let mut lt_names: Vec<String> = s
        .domains
        .iter()
        .filter(|d| lt.contains(d.as_str()))
        .cloned()
        .collect();
    lt_names.sort();
    lt_names.dedup();
    let inputs = isolation::IsolationInputs {
        ntk: &spec.ntk,
        baseline,
        samples: &s.frame,
        ids: &s.ids,
        domains: &s.domains,
        long_tail: &lt_names,
    };
    isolation::isolate(&inputs, model, seqs, device)
}

/// The corpus row of every NTK sample, by id.
fn corpus_rows(corpus: &Corpus, s: &NtkSamples, corpus_path: &Path) -> Result<Vec<usize>> {
    let by_id: HashMap<&str, usize> = corpus
        .samples
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    s.ids
        .iter()
        .map(|id| {
            by_id.get(id.as_str()).copied().ok_or_else(|| {
                Error::in_file(
                    &s.path,
                    format!("sample id {id:?} is not in {}", corpus_path.display()),
                )
            })
        })
        .collect()
}

/// The corpus's long-tail domains (elbow of the token shares).
fn long_tail_domains(corpus: &Corpus) -> HashSet<String> {
    let (shares, _) = crate::freq::domain_shares(corpus, crate::freq::ShareBy::Tokens);
    shares
        .into_iter()
        .filter(|d| d.long_tail)
        .map(|d| d.domain)
        .collect()
}

fn feature(table: &FeatureTable, f: Feature) -> Option<&[f64]> {
    table
        .iter()
        .find(|(g, _)| *g == f)
        .map(|(_, v)| v.as_slice())
}

/// Spearman, Pearson and Kendall correlations, with bootstrap intervals: frequency against
/// alignment, Θ_ii, loss and excess loss; alignment against loss; length (tokens) against loss
/// and excess loss (how much of "poorly fitted" is "short").
fn correlations(s: &NtkSamples, table: &FeatureTable, spec: &AnalyzeSpec) -> Vec<CorrRow> {
    let loss = feature(table, Feature::Loss).unwrap_or(&[]);
    let excess = feature(table, Feature::ExcessLoss).unwrap_or(&[]);
    let pairs: [(&str, &[f64], &str, &[f64]); 7] = [
        ("freq_score", &s.freq, "alignment", &s.align),
        ("freq_score", &s.freq, "self_kernel", &s.selfk),
        ("freq_score", &s.freq, "loss", loss),
        ("freq_score", &s.freq, "excess_loss", excess),
        ("alignment", &s.align, "loss", loss),
        ("n_tokens", &s.n_tokens, "loss", loss),
        ("n_tokens", &s.n_tokens, "excess_loss", excess),
    ];
    let mut rows = Vec::new();
    for (xn, x, yn, y) in pairs {
        // Samples missing either value (NaN: no frequency score) are left out of the pair.
        let (x, y): (Vec<f64>, Vec<f64>) = x
            .iter()
            .zip(y)
            .filter(|(a, b)| !a.is_nan() && !b.is_nan())
            .map(|(a, b)| (*a, *b))
            .unzip();
        for kind in [Corr::Spearman, Corr::Pearson, Corr::Kendall] {
            if let Some(e) = bootstrap(kind, &x, &y, spec.resamples, spec.alpha, spec.seed) {
                rows.push(CorrRow {
                    x: xn.to_string(),
                    y: yn.to_string(),
                    method: kind,
                    estimate: e,
                });
            }
        }
    }
    rows
}

/// `analysis.parquet`: the NTK sample table plus every statistic, the neglect score, whether
/// flagged and its rank, long-tail domain and text.
fn joined_table(
    s: &NtkSamples,
    table: &FeatureTable,
    scores: &[Scored],
    flagged: &[Flag],
    lt: &HashSet<String>,
    texts: &[&str],
) -> Result<DataFrame> {
    let mut rank = vec![None; s.ids.len()];
    for (r, f) in flagged.iter().enumerate() {
        rank[f.index] = Some(r as u32 + 1);
    }
    let mut joined = s.frame.clone();
    let mut cols: Vec<Column> = table
        .iter()
        .filter(|(f, _)| !matches!(f, Feature::FreqScore | Feature::Alignment))
        .map(|(f, v)| Column::new(f.name().into(), v.clone()))
        .collect();
    cols.extend([
        Column::new(
            "neglect".into(),
            scores.iter().map(|x| x.probability).collect::<Vec<_>>(),
        ),
        Column::new(
            "long_tail_domain".into(),
            s.domains
                .iter()
                .map(|d| lt.contains(d.as_str()))
                .collect::<Vec<_>>(),
        ),
        Column::new("flag_rank".into(), rank),
        Column::new("text".into(), texts.to_vec()),
    ]);
    for c in cols {
        joined
            .with_column(c)
            .map_err(|e| Error::table("analysis", e))?;
    }
    Ok(joined)
}

/// `neighbours.parquet`: every analysed sample's nearest training texts by gradient cosine.
fn neighbours_frame(ids: &[String], l: &Learnability, corpus: &Corpus) -> Result<DataFrame> {
    let (mut id, mut rank, mut nid, mut cos, mut text) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, nb) in l.neighbours.iter().enumerate() {
        for (r, &(j, c)) in nb.iter().enumerate() {
            id.push(ids[i].clone());
            rank.push(r as u32 + 1);
            nid.push(corpus.samples[j].id.clone());
            cos.push(c);
            text.push(corpus.samples[j].text.clone());
        }
    }
    DataFrame::new(
        id.len(),
        vec![
            Column::new("id".into(), id),
            Column::new("rank".into(), rank),
            Column::new("neighbour_id".into(), nid),
            Column::new("cosine".into(), cos),
            Column::new("neighbour_text".into(), text),
        ],
    )
    .map_err(|e| Error::table("neighbours", e))
}

/// `correlations.parquet`.
pub fn correlations_frame(rows: &[CorrRow]) -> Result<DataFrame> {
    let f = |name: &str, g: fn(&Estimate) -> f64| {
        Column::new(
            name.into(),
            rows.iter().map(|r| g(&r.estimate)).collect::<Vec<_>>(),
        )
    };
    DataFrame::new(
        rows.len(),
        vec![
            Column::new(
                "x".into(),
                rows.iter().map(|r| r.x.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "y".into(),
                rows.iter().map(|r| r.y.as_str()).collect::<Vec<_>>(),
            ),
            Column::new(
                "method".into(),
                rows.iter()
                    .map(|r| format!("{:?}", r.method).to_lowercase())
                    .collect::<Vec<_>>(),
            ),
            f("value", |e| e.value),
            f("low", |e| e.low),
            f("high", |e| e.high),
            Column::new(
                "n".into(),
                rows.iter().map(|r| r.estimate.n as u64).collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("correlations", e))
}

/// `flags.parquet`: the flagged samples, best first, with their evidence: the statistics behind
/// the score (NaN where not computed), the reasons, and the nearest training texts.
fn flags_frame(
    s: &NtkSamples,
    table: &FeatureTable,
    flagged: &[Flag],
    learn: Option<&Learnability>,
    corpus: &Corpus,
    texts: &[&str],
) -> Result<DataFrame> {
    let by = |f: Feature| -> Vec<f64> {
        let v = feature(table, f);
        flagged
            .iter()
            .map(|x| v.map_or(f64::NAN, |v| v[x.index]))
            .collect()
    };
    let neighbours: Vec<String> = flagged
        .iter()
        .map(|x| {
            learn.map_or(String::new(), |l| {
                l.neighbours[x.index]
                    .iter()
                    .map(|&(j, c)| format!("{} (cos {c:.2})", corpus.samples[j].text))
                    .collect::<Vec<_>>()
                    .join(" | ")
            })
        })
        .collect();
    let mut cols = vec![
        Column::new(
            "rank".into(),
            (1..=flagged.len() as u32).collect::<Vec<_>>(),
        ),
        Column::new(
            "id".into(),
            flagged
                .iter()
                .map(|f| s.ids[f.index].as_str())
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "domain".into(),
            flagged
                .iter()
                .map(|f| s.domains[f.index].as_str())
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "score".into(),
            flagged.iter().map(|f| f.score).collect::<Vec<_>>(),
        ),
    ];
    for f in [
        Feature::Loss,
        Feature::ExcessLoss,
        Feature::ReducibleLoss,
        Feature::PredictedDecrease,
        Feature::Support,
        Feature::DomainGc,
        Feature::FreqScore,
    ] {
        cols.push(Column::new(f.name().into(), by(f)));
    }
    cols.extend([
        Column::new(
            "reasons".into(),
            flagged
                .iter()
                .map(|f| f.reasons.join("; "))
                .collect::<Vec<_>>(),
        ),
        Column::new("neighbours".into(), neighbours),
        Column::new(
            "text".into(),
            flagged.iter().map(|f| texts[f.index]).collect::<Vec<_>>(),
        ),
    ]);
    DataFrame::new(flagged.len(), cols).map_err(|e| Error::table("flags", e))
}

/// GC per frequency bin, as the NTK run's `gc.parquet` holds it.
fn gc_by_bin(ntk: &Path) -> Result<Vec<(String, f64)>> {
    let gp = ntk.join("gc.parquet");
    let gc = read_parquet(&gp)?;
    let (col, group, val) = (
        column_str(&gc, "column", &gp)?,
        column_str(&gc, "group", &gp)?,
        column_f64(&gc, "gc", &gp)?,
    );
    Ok((0..col.len())
        .filter(|&i| col[i] == "freq_bin")
        .map(|i| (group[i].clone(), val[i]))
        .collect())
}

impl Analysis {
    /// Record the neglect model's features in `summary.json` (`neglect_features`), so that a
    /// report knows whether the flags depend on the principal direction's sign.
    fn with_model_features(mut self, model: &NeglectModel) -> Analysis {
        self.summary["neglect_features"] =
            serde_json::json!(model.features.iter().map(|f| f.name()).collect::<Vec<_>>());
        self
    }

    /// Write the tables and `summary.json` into `dir`, as the folder's only writer.
    pub fn write(&mut self, dir: &Path) -> Result<()> {
        let _lock = crate::lock::OutputLock::acquire(dir, "tailscope analyze")?;
        crate::io::write_parquet(&mut self.joined, dir.join("analysis.parquet"))?;
        let mut corr = correlations_frame(&self.correlations)?;
        crate::io::write_parquet(&mut corr, dir.join("correlations.parquet"))?;
        crate::io::write_parquet(&mut self.flags_table, dir.join("flags.parquet"))?;
        if let Some(nb) = &mut self.neighbours_table {
            crate::io::write_parquet(nb, dir.join("neighbours.parquet"))?;
        }
        if let Some(iso) = &mut self.isolation {
            crate::io::write_parquet(&mut iso.table, dir.join("isolation.parquet"))?;
        }
        let json = serde_json::to_string_pretty(&self.summary)
            .map_err(|e| Error::invalid("analysis summary", e.to_string()))?;
        crate::io::write_atomic(dir.join("summary.json"), json.as_bytes())
    }
}

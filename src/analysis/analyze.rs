//! `tailscope analyze` as a function: the per-sample metrics of an NTK run joined with each
//! sample's loss, frequency correlations with bootstrap intervals, the ranked under-memorised
//! flags (with precision and recall when the corpus carries ground truth) and, against a dense
//! baseline's kernel, expert isolation. [`analyze`] returns values; [`Analysis::write`] writes
//! `analysis.parquet`, `correlations.parquet`, `flags.parquet`, `isolation.parquet` and
//! `summary.json`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use polars::prelude::{Column, DataFrame};
use tch::Device;

use super::flags::{self, Flag, FlagOptions, SampleMetrics};
use super::isolation::{self, Isolation};
use crate::corpus::{tokenizer, Corpus};
use crate::error::{Error, Result};
use crate::io::{column_f64, column_str, read_parquet};
use crate::progress::Progress;
use crate::stats::{bootstrap, Corr, Estimate};

/// Bootstrap resamples of each correlation by default.
pub const DEFAULT_RESAMPLES: usize = 1000;
/// 1 − confidence of the intervals by default.
pub const DEFAULT_ALPHA: f64 = 0.05;

/// What to analyse and how.
#[derive(Debug, Clone)]
pub struct AnalyzeSpec {
    /// An `ntk` output folder (samples.parquet, gc.parquet).
    pub ntk: PathBuf,
    /// The model the kernel was computed for (for per-sample losses).
    pub model: PathBuf,
    /// The corpus table.
    pub corpus: PathBuf,
    /// The tokenizer (default: the model's, else the corpus's).
    pub tokenizer: Option<PathBuf>,
    /// Bootstrap resamples of each correlation.
    pub resamples: usize,
    /// 1 − confidence of the intervals.
    pub alpha: f64,
    /// The flag rule.
    pub flags: FlagOptions,
    /// An `ntk` folder of the dense baseline on the same samples: adds expert isolation.
    pub baseline: Option<PathBuf>,
    /// Seed of the bootstrap and of BERT masks in the loss pass.
    pub seed: u64,
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

/// Everything an analysis yields.
pub struct Analysis {
    /// The sample ids, in the NTK run's order.
    pub ids: Vec<String>,
    /// The NTK sample table joined with loss, long-tail flag, flag rank and text.
    pub joined: DataFrame,
    /// Frequency correlations.
    pub correlations: Vec<CorrRow>,
    /// The flagged samples, best first.
    pub flagged: Vec<Flag>,
    /// `flags.parquet`.
    pub flags_table: DataFrame,
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
    bins: Vec<usize>,
}

impl NtkSamples {
    fn read(ntk: &Path) -> Result<NtkSamples> {
        let path = ntk.join("samples.parquet");
        let frame = read_parquet(&path)?;
        // A sample with no frequency score has no bin (null): its own loss peers, not bin 0.
        let bins = flags::peer_bins(&column_f64(&frame, "freq_bin", &path)?);
        Ok(NtkSamples {
            ids: column_str(&frame, "id", &path)?,
            domains: column_str(&frame, "domain", &path)?,
            freq: column_f64(&frame, "freq_score", &path)?,
            align: column_f64(&frame, "alignment", &path)?,
            selfk: column_f64(&frame, "self_kernel", &path)?,
            bins,
            frame,
            path,
        })
    }
}

/// Check the flag options and the interval level.
fn check(spec: &AnalyzeSpec) -> Result<()> {
    for (name, q) in [
        ("--rare-quantile", spec.flags.rare_quantile),
        ("--align-quantile", spec.flags.align_quantile),
        ("--alpha", spec.alpha),
    ] {
        if !(0.0..=1.0).contains(&q) {
            return Err(Error::invalid(name, format!("must be in [0, 1], got {q}")));
        }
    }
    Ok(())
}

/// Analyse an NTK run.
pub fn analyze(spec: &AnalyzeSpec, device: Device, progress: &dyn Progress) -> Result<Analysis> {
    check(spec)?;
    let s = NtkSamples::read(&spec.ntk)?;
    let corpus = Corpus::read(&spec.corpus)?;
    let rows = corpus_rows(&corpus, &s, &spec.corpus)?;
    let (_, model) = crate::source::load_model(&spec.model, device)?;
    let tok =
        crate::source::tokenizer_for(spec.tokenizer.as_deref(), &spec.model, &model, &spec.corpus)?;
    let texts: Vec<&str> = rows
        .iter()
        .map(|&i| corpus.samples[i].text.as_str())
        .collect();
    let enc = tokenizer::encode_all(&tok, &texts)?;
    let refs: Vec<&[u32]> = enc.iter().map(Vec::as_slice).collect();
    progress.start("per-sample losses", None);
    let losses: Vec<f64> = crate::eval::sample_losses(&model, &refs, 64, device, spec.seed)?
        .into_iter()
        .map(|(l, c)| l / c.max(1) as f64)
        .collect();
    let lt = long_tail_domains(&corpus);
    let correlations = correlations(&s, &losses, spec);
    progress.finish();
    let metrics: Vec<SampleMetrics> = (0..s.ids.len())
        .map(|i| SampleMetrics {
            freq_score: s.freq[i],
            long_tail_domain: lt.contains(s.domains[i].as_str()),
            alignment: s.align[i],
            loss: losses[i],
            bin: s.bins[i],
        })
        .collect();
    let flagged = flags::flag(&metrics, &spec.flags);
    let joined = joined_table(&s, &losses, &metrics, &flagged, &texts)?;
    let flags_table = flags_frame(&s, &flagged, &losses, &texts)?;
    // Ground truth, when the corpus carries it (synthetic corpora): `neglected` where the corpus
    // separates rarity from neglect (`corpus synth --contrasts`), else `long_tail`.
    let truth: Option<Vec<bool>> = rows
        .iter()
        .map(|&i| {
            let s = &corpus.samples[i];
            s.neglected.or(s.long_tail)
        })
        .collect();
    let precision_recall = truth.as_ref().map(|t| flags::precision_recall(&flagged, t));
    let gc_by_bin = gc_by_bin(&spec.ntk)?;
    let isolation = match &spec.baseline {
        Some(b) => Some(isolation_of(spec, b, &s, &lt, (&model, &refs, device))?),
        None => None,
    };
    let reports = isolation
        .as_ref()
        .map(|i| i.reports.clone())
        .unwrap_or_default();
    let summary = serde_json::json!({
        "isolation": reports,
        "inputs": {"ntk": spec.ntk, "model": spec.model, "corpus": spec.corpus, "tokenizer": spec.tokenizer},
        "samples": s.ids.len(), "flags": flagged.len(), "flag_options": spec.flags,
        "precision": precision_recall.map(|x| x.0), "recall": precision_recall.map(|x| x.1),
        "correlations": correlations.iter().map(|r| serde_json::json!({"x": r.x, "y": r.y, "method": r.method, "estimate": r.estimate})).collect::<Vec<_>>(),
    });
    Ok(Analysis {
        ids: s.ids,
        joined,
        correlations,
        flagged,
        flags_table,
        precision_recall,
        gc_by_bin,
        isolation,
        summary,
    })
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

/// Spearman, Pearson and Kendall correlations of frequency with alignment, Θ_ii and loss, and
/// of alignment with loss, with bootstrap intervals.
fn correlations(s: &NtkSamples, losses: &[f64], spec: &AnalyzeSpec) -> Vec<CorrRow> {
    let pairs: [(&str, &[f64], &str, &[f64]); 4] = [
        ("freq_score", &s.freq, "alignment", &s.align),
        ("freq_score", &s.freq, "self_kernel", &s.selfk),
        ("freq_score", &s.freq, "loss", losses),
        ("alignment", &s.align, "loss", losses),
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

/// `analysis.parquet`: the NTK sample table plus loss, long-tail flag, flag rank and text.
fn joined_table(
    s: &NtkSamples,
    losses: &[f64],
    metrics: &[SampleMetrics],
    flagged: &[Flag],
    texts: &[&str],
) -> Result<DataFrame> {
    let mut rank = vec![None; s.ids.len()];
    for (r, f) in flagged.iter().enumerate() {
        rank[f.index] = Some(r as u32 + 1);
    }
    let mut joined = s.frame.clone();
    for c in [
        Column::new("loss".into(), losses.to_vec()),
        Column::new(
            "long_tail_domain".into(),
            metrics
                .iter()
                .map(|m| m.long_tail_domain)
                .collect::<Vec<_>>(),
        ),
        Column::new("flag_rank".into(), rank),
        Column::new("text".into(), texts.to_vec()),
    ] {
        joined
            .with_column(c)
            .map_err(|e| Error::table("analysis", e))?;
    }
    Ok(joined)
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

/// `flags.parquet`: the flagged samples, best first.
fn flags_frame(
    s: &NtkSamples,
    flagged: &[Flag],
    losses: &[f64],
    texts: &[&str],
) -> Result<DataFrame> {
    let by = |v: &[f64]| flagged.iter().map(|f| v[f.index]).collect::<Vec<_>>();
    DataFrame::new(
        flagged.len(),
        vec![
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
                flagged.iter().map(|f| f.rank_score).collect::<Vec<_>>(),
            ),
            Column::new("freq_score".into(), by(&s.freq)),
            Column::new("alignment".into(), by(&s.align)),
            Column::new("loss".into(), by(losses)),
            Column::new(
                "loss_z".into(),
                flagged.iter().map(|f| f.loss_z).collect::<Vec<_>>(),
            ),
            Column::new(
                "reasons".into(),
                flagged
                    .iter()
                    .map(|f| f.reasons.join("; "))
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "text".into(),
                flagged.iter().map(|f| texts[f.index]).collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("flags", e))
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
    /// Write the tables and `summary.json` into `dir`, as the folder's only writer.
    pub fn write(&mut self, dir: &Path) -> Result<()> {
        let _lock = crate::lock::OutputLock::acquire(dir, "tailscope analyze")?;
        crate::io::write_parquet(&mut self.joined, dir.join("analysis.parquet"))?;
        let mut corr = correlations_frame(&self.correlations)?;
        crate::io::write_parquet(&mut corr, dir.join("correlations.parquet"))?;
        crate::io::write_parquet(&mut self.flags_table, dir.join("flags.parquet"))?;
        if let Some(iso) = &mut self.isolation {
            crate::io::write_parquet(&mut iso.table, dir.join("isolation.parquet"))?;
        }
        let json = serde_json::to_string_pretty(&self.summary)
            .map_err(|e| Error::invalid("analysis summary", e.to_string()))?;
        crate::io::write_atomic(dir.join("summary.json"), json.as_bytes())
    }
}

//! The NTK pipeline as one call, `tailscope ntk` without the printing: the kernel of a prepared
//! [`Job`] (in memory, or streamed to disk in resumable tiles), the principal direction, each
//! sample's alignment and Θ_ii, GC with intervals by frequency bin, domain, long-tail flag, CSE
//! or Switch expert and DBSCAN cluster, and the per-sample and GC tables. [`compute`] returns
//! values; [`NtkOutput::write`] writes them where asked.

use std::path::Path;
use std::time::Instant;

use ndarray::Array2;
use polars::prelude::{Column, DataFrame};
use tch::{Device, Tensor};

use super::diagnostics::{self, Diagnostics, Warning};
use super::gc::{self, IntervalMethod, Principal};
use super::groups::{frequency_bins, gc_rows, groups, Resampling};
pub use super::groups::{gc_frame, quantile_bins, GcRow};
use super::op::{Cosine, Dense, KernelOp};
use super::stream::{self, StreamPlan, StreamReport, Work};
use super::{kernel, BlockBy, Kernel, Normalize};
use crate::capture::job::Job;
use crate::capture::{Captured, Method, OutputKind};
use crate::corpus::SplitChoice;
use crate::error::{Error, Result};
use crate::freq::FreqOptions;
use crate::lock::OutputLock;
use crate::manifest::Manifest;
use crate::progress::Progress;

/// Frequency bins of GC per bin by default.
pub const DEFAULT_BINS: usize = 5;
/// Jackknife groups (or half-samples) of the GC intervals by default.
pub const DEFAULT_GC_RESAMPLES: usize = 32;
/// Lock files of the shares of a streamed kernel start with this.
pub(crate) const SHARE_LOCK: &str = ".tailscope.share-";
/// Largest streamed kernel assembled in memory by default.
pub const DEFAULT_ASSEMBLE_MAX: usize = 16384;

/// Kernel settings of an NTK run (the capture settings are the [`Job`]'s).
#[derive(Debug, Clone)]
pub struct NtkOptions {
    /// How the kernel is split into blocks.
    pub blocks: BlockBy,
    /// Only the diagonal Θ_ii.
    pub diagonal: bool,
    /// Also the cross-kernel against this many samples of a split.
    pub cross: Option<(SplitChoice, usize)>,
    /// Quantile bins of the 1-gram frequency score for GC per bin.
    pub bins: usize,
    /// Jackknife groups (or half-samples) for the GC intervals (0: none).
    pub gc_resamples: usize,
    /// How the GC intervals are computed.
    pub interval: IntervalMethod,
    /// How per-sample gradients are scaled before the principal direction.
    pub normalize: Normalize,
    /// Also keep the padded batch (ids, mask, targets) for peer tools.
    pub export_batch: bool,
    /// Stream to disk in tiles of this many samples (needs an output folder).
    pub tile: Option<usize>,
    /// Largest streamed kernel assembled in memory.
    pub assemble_max: usize,
    /// A streamed kernel starts afresh: shards and tiles already in the folder are removed
    /// instead of resumed.
    pub fresh: bool,
    /// Which shards and tiles of a streamed kernel this process computes: all, one share of
    /// several processes writing into one folder, or none (assemble what the shares wrote).
    pub work: Work,
    /// Seed of the intervals and of BERT masks in the exported batch.
    pub seed: u64,
}

impl Default for NtkOptions {
    fn default() -> Self {
        NtkOptions {
            blocks: BlockBy::Module,
            diagonal: false,
            cross: None,
            bins: DEFAULT_BINS,
            gc_resamples: DEFAULT_GC_RESAMPLES,
            interval: IntervalMethod::default(),
            normalize: Normalize::default(),
            export_batch: false,
            tile: None,
            assemble_max: DEFAULT_ASSEMBLE_MAX,
            fresh: false,
            work: Work::All,
            seed: 0,
        }
    }
}

/// What `ntk.json` records. Fields in alphabetical order: the file's key order.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NtkSummary {
    /// Block names of the kernel.
    pub blocks: Vec<String>,
    /// Whether the kernel can say anything (see [`diagnostics`]); absent for diagonal kernels.
    pub diagnostics: Option<Diagnostics>,
    /// How the GC intervals were computed.
    pub interval: IntervalMethod,
    /// Capture method.
    pub method: Method,
    /// How per-sample gradients were scaled before the principal direction.
    pub normalize: Normalize,
    /// Scalar output per sample.
    pub output: OutputKind,
    /// Number of selected parameter values.
    pub parameters: i64,
    /// The selected parameters' names (what `analyze` captures its loss gradients over).
    pub params: Vec<String>,
    /// Projection dimension, if projected.
    pub projection: Option<i64>,
    /// Number of samples.
    pub samples: usize,
    /// Wall time of capture and kernel.
    pub seconds: f64,
    /// Number of selected parameter tensors.
    pub tensors: usize,
    /// What makes the result degenerate, in plain words, with what to change; empty when sound.
    pub warnings: Vec<Warning>,
}

/// The cross-kernel Θ(X, Y) against samples of another split.
#[derive(Debug)]
pub struct Cross {
    /// The split Y was drawn from.
    pub split: SplitChoice,
    /// Number of samples of Y.
    pub n: usize,
    /// Θ(X, Y) and its blocks.
    pub kernel: Kernel,
}

/// Everything an NTK run yields.
pub struct NtkOutput {
    /// `ntk.json`; `None` when a streamed kernel was too large to assemble.
    pub summary: Option<NtkSummary>,
    /// The kernel; `None` when a streamed kernel stays in its tiles.
    pub kernel: Option<Kernel>,
    /// The principal eigenpair of the total kernel (not for diagonal kernels).
    pub principal: Option<Principal>,
    /// The per-sample table (`samples.parquet`); `None` for one share of a streamed kernel.
    pub samples: Option<DataFrame>,
    /// GC per group (not for diagonal kernels).
    pub gc: Vec<GcRow>,
    /// The cross-kernel, when asked for.
    pub cross: Option<Cross>,
    /// The padded batch, when asked for.
    pub batch: Option<Vec<(String, Tensor)>>,
    /// What streaming did, when streamed.
    pub stream: Option<StreamReport>,
}

/// Compute the NTK of a prepared job and write it into `dir`, as the only writer of that folder
/// (see [`crate::lock`]): what `tailscope ntk` and the `run` pipeline do.
pub fn compute_into(
    job: &Job,
    opts: &NtkOptions,
    device: Device,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<NtkOutput> {
    // Shares of one streamed kernel write into one folder at once, each its own files: each
    // holds a lock of its own, so the same share is not run twice at a time.
    let _lock = match opts.work {
        Work::Share { share, .. } => OutputLock::acquire_as(
            dir,
            &format!("{SHARE_LOCK}{}-of-{}.lock", share.index, share.count),
            &format!("tailscope ntk --shard {share}"),
        )?,
        _ => OutputLock::acquire(dir, "tailscope ntk")?,
    };
    if opts.tile.is_some() {
        // Shares that were killed left their locks and temporary files.
        crate::lock::clear_stale(dir, SHARE_LOCK);
    }
    let mut out = compute(job, opts, device, Some(dir), progress)?;
    out.write(dir)?;
    Ok(out)
}

/// The settings a streamed kernel's shards and tiles depend on: the model's weights, the
/// selected parameters, the samples (corpus indices and token ids), the capture options, the
/// blocks and the tile size. Recorded in the folder's `manifest.json`.
fn stream_manifest(job: &Job, opts: &NtkOptions, tile: usize) -> Result<Manifest> {
    let mut m = Manifest::new("ntk --tile");
    let c = &job.opts;
    // Every weight of the model (a TorchScript module's own parameters: its VarStore is empty).
    let weights = job.model.capture_parameters(&job.vs)?;
    m.set(
        "model.weights",
        crate::manifest::fingerprint_tensors(&weights),
    )
    .set(
        "params",
        job.params
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(","),
    )
    .set("samples.count", job.idx.len())
    .set("samples.corpus_index", {
        let idx: Vec<u32> = job.idx.iter().map(|&i| i as u32).collect();
        crate::manifest::fingerprint_ids(&[&idx])
    })
    .set(
        "samples.tokens",
        crate::manifest::fingerprint_ids(&job.seqs()),
    )
    .set("capture.output", typed("--output", c.output))
    .set("capture.method", typed("--method", c.method))
    .set("capture.projection", projection_flags(c.projection))
    .set("capture.batch", format!("--batch {}", c.batch))
    .set("capture.probes", format!("--probes {}", c.probes))
    .set("capture.seed", format!("--seed {}", c.seed))
    .set("capture.draws", crate::capture::DRAWS)
    .set("blocks", typed("--blocks", opts.blocks))
    .set("tile", format!("--tile {tile}"));
    Ok(m)
}

/// An option and its value as the command line spells them (`--method batched`), so that a
/// resume refused under other settings names what the user typed.
fn typed<T: clap::ValueEnum>(flag: &str, value: T) -> String {
    match value.to_possible_value() {
        Some(v) => format!("{flag} {}", v.get_name()),
        None => flag.to_string(),
    }
}

/// A capture's projection as the command line asks for it: `--project 256 --projection sparse`,
/// or `no --project`.
fn projection_flags(p: Option<crate::capture::Projection>) -> String {
    match p {
        Some(p) => format!("--project {} {}", p.dim, typed("--projection", p.kind)),
        None => "no --project".into(),
    }
}

/// Compute the NTK of a prepared job. `dir` is where a streamed kernel (`opts.tile`) keeps its
/// shards and tiles; other outputs are written only by [`NtkOutput::write`].
pub fn compute(
    job: &Job,
    opts: &NtkOptions,
    device: Device,
    dir: Option<&Path>,
    progress: &dyn Progress,
) -> Result<NtkOutput> {
    let t0 = Instant::now();
    let (k, cx, stream) = match opts.tile {
        Some(tile) => {
            let dir = dir.ok_or_else(|| {
                Error::invalid("--tile", "a streamed kernel needs an output folder")
            })?;
            let (k, rep) = streamed(job, opts, tile, dir, device, progress)?;
            match k {
                Some(k) => (k, None, Some(rep)),
                None if matches!(opts.work, Work::Share { .. }) => {
                    return Ok(NtkOutput::streamed_only(None, Some(rep)))
                }
                None => {
                    let mut out = from_tiles(job, opts, (dir, tile), device, progress)?;
                    out.stream = Some(rep);
                    if let Some(s) = &mut out.summary {
                        s.seconds = t0.elapsed().as_secs_f64();
                    }
                    return Ok(out);
                }
            }
        }
        None if opts.diagonal => {
            // Θ_ii needs each sample's gradient norms only: reduced batch by batch, the n × P
            // Jacobian is never held.
            let norms = crate::capture::CaptureOptions {
                norms_only: true,
                ..job.opts.clone()
            };
            let cx = job.capture_with(&job.ids, "capturing", &norms, device, progress)?;
            (kernel(&cx, None, opts.blocks, true)?, None, None)
        }
        None => {
            let cx = job.capture(&job.ids, "capturing", device, progress)?;
            (
                kernel(&cx, None, opts.blocks, opts.diagonal)?,
                Some(cx),
                None,
            )
        }
    };
    let seconds = t0.elapsed().as_secs_f64();
    let mut out = from_kernel(job, k, opts, device, progress)?;
    if let Some(s) = &mut out.summary {
        s.seconds = seconds;
    }
    out.batch = opts.export_batch.then(|| export_batch(job, opts.seed));
    out.stream = stream;
    if let (Some((split, n)), false) = (opts.cross, opts.diagonal) {
        let cx = cx.as_ref().ok_or_else(|| {
            Error::invalid("--cross-split", "needs an in-memory kernel; drop --tile")
        })?;
        out.cross = Some(cross(job, cx, split, n, opts.blocks, device, progress)?);
    }
    Ok(out)
}

/// Above `--assemble-max`: GC, alignment and intervals from the kernel's tiles under `dir`
/// (held in memory when the total kernel fits half the memory budget, read from disk at every
/// product pass otherwise), never assembled; the tiles read and passes are logged.
fn from_tiles(
    job: &Job,
    opts: &NtkOptions,
    (dir, tile): (&Path, usize),
    device: Device,
    progress: &dyn Progress,
) -> Result<NtkOutput> {
    let hold = job
        .opts
        .memory
        .or_else(crate::capture::memory::default_budget)
        .unwrap_or(0)
        / 2;
    let samples = job.samples();
    let ids: Vec<&str> = samples.iter().map(|s| s.id.as_str()).collect();
    let tiles = super::tiles::Tiles::open(dir, &ids, tile, hold)?;
    let names = tiles.block_names.clone();
    let out = from_op(job, &tiles, names, opts, device, progress)?;
    let c = tiles.counts();
    tracing::info!(
        "kernel of {} samples from its tiles: {} tile reads, {} product passes of up to {} vectors",
        ids.len(),
        c.reads,
        c.passes,
        c.widest
    );
    Ok(out)
}

/// Everything [`compute`] derives from a kernel of the job's samples, for a kernel computed
/// already (another normalisation of the same capture, a kernel from elsewhere): the principal
/// direction, GC with intervals, diagnostics and warnings, and the sample table. `seconds` in
/// the summary is 0; no cross-kernel, batch or stream report.
pub fn from_kernel(
    job: &Job,
    k: Kernel,
    opts: &NtkOptions,
    device: Device,
    progress: &dyn Progress,
) -> Result<NtkOutput> {
    let ids: Vec<&str> = job.samples().iter().map(|s| s.id.as_str()).collect();
    check_finite(&ids, &k)?;
    if opts.diagonal {
        let (extra, _) = annotations(job, device)?;
        let d: Vec<f64> = Vec::try_from(&k.total)?;
        let mut out = NtkOutput::streamed_only(None, None);
        out.samples = Some(job.samples_frame(Some(&d), None, &extra)?);
        out.summary = Some(summary(job, &k, opts));
        out.kernel = Some(k);
        return Ok(out);
    }
    let names = k.blocks.iter().map(|(name, _)| name.clone()).collect();
    let mut out = from_op(job, &Dense::new(&k.total), names, opts, device, progress)?;
    out.kernel = Some(k);
    Ok(out)
}

/// The summary of a run before its diagnostics.
fn summary(job: &Job, k: &Kernel, opts: &NtkOptions) -> NtkSummary {
    summary_of(job, k.blocks.iter().map(|(n, _)| n.clone()).collect(), opts)
}

fn summary_of(job: &Job, blocks: Vec<String>, opts: &NtkOptions) -> NtkSummary {
    NtkSummary {
        blocks,
        diagnostics: None,
        interval: opts.interval,
        method: job.opts.method,
        normalize: opts.normalize,
        output: job.opts.output,
        parameters: job.parameter_count(),
        params: job.params.iter().map(|(n, _)| n.clone()).collect(),
        projection: job.opts.projection.map(|pr| pr.dim),
        samples: job.ids.len(),
        seconds: 0.0,
        tensors: job.params.len(),
        warnings: Vec::new(),
    }
}

/// [`from_kernel`] for a full kernel seen through its products ([`KernelOp`]: whole in memory,
/// or row blocks over MPI ranks, where every rank makes this call): the principal direction,
/// GC with intervals, diagnostics, warnings and the sample table; no kernel in the output.
/// `blocks` names the kernel's blocks for the summary.
pub fn from_op(
    job: &Job,
    k: &dyn KernelOp,
    blocks: Vec<String>,
    opts: &NtkOptions,
    device: Device,
    progress: &dyn Progress,
) -> Result<NtkOutput> {
    let mut summary = summary_of(job, blocks, opts);
    let (extra, last) = annotations(job, device)?;
    let mut out = NtkOutput::streamed_only(None, None);
    let raw_diag = k.diag()?;
    let cosine;
    let kt: &dyn KernelOp = match opts.normalize {
        Normalize::None => k,
        Normalize::Cosine => {
            cosine = Cosine::new(k)?;
            &cosine
        }
    };
    let whole = gc::principal_op(kt, None)?;
    let scores = freq_scores(job)?;
    let bins = frequency_bins(&scores, opts.bins.max(1));
    let groups = groups(job, &bins, &extra);
    let r = Resampling {
        method: opts.interval,
        resamples: opts.gc_resamples,
        seed: opts.seed,
    };
    out.gc = gc_rows(kt, &whole, &groups, &scores, &r, progress)?;
    let diag = diagnostics::diagnose(kt, &whole, &raw_diag)?;
    summary.warnings = diagnostics::warnings(&diag, &out.gc, opts.normalize == Normalize::Cosine);
    summary.diagnostics = Some(diag);
    let t = SampleInputs {
        k: kt,
        raw_diag: &raw_diag,
        whole: &whole,
        extra: &extra,
        bins: &bins,
        scores: &scores,
        last: last.as_ref(),
    };
    out.samples = Some(samples_table(job, &t)?);
    out.summary = Some(summary);
    out.principal = Some(whole);
    Ok(out)
}

/// Before a streamed kernel's shards and tiles are written into `dir`: check (or, with
/// `opts.fresh`, reset) the folder's manifest, so that nothing made under other settings is
/// resumed. What every process of a streamed kernel does first (one rank under MPI).
pub fn prepare_stream(job: &Job, opts: &NtkOptions, tile: usize, dir: &Path) -> Result<()> {
    if opts.diagonal || opts.cross.is_some() {
        return Err(Error::invalid(
            "--tile",
            "streamed kernels are full square kernels; drop --diagonal and --cross-split",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let manifest = stream_manifest(job, opts, tile)?;
    if opts.fresh && opts.work != Work::All {
        return Err(Error::invalid(
            "--fresh",
            "would remove what other shares wrote; remove shards/ and tiles/ by hand before \
             starting the shares, or drop --shard/--assemble",
        ));
    }
    if opts.work == Work::AssembleOnly && crate::manifest::Manifest::read(dir)?.is_none() {
        return Err(Error::in_file(
            dir,
            "nothing to assemble (no manifest.json): run the shares (--shard I/N) into this \
             folder first",
        ));
    }
    if opts.fresh {
        crate::manifest::clear(dir, &["shards", "tiles", "tiles.parquet"])?;
        manifest.write(dir)?;
    } else {
        let has_outputs = dir.join("shards").exists() || dir.join("tiles").exists();
        manifest.check_resume(
            dir,
            has_outputs,
            "pass --fresh to start afresh (it removes shards/ and tiles/ here)",
        )?;
    }
    Ok(())
}

/// Check that every tile of the streamed kernel under `dir` is there and write `tiles.parquet`;
/// computes nothing (what finishes an MPI job whose ranks compute GC from their rows).
pub fn index_tiles(
    job: &Job,
    opts: &NtkOptions,
    tile: usize,
    dir: &Path,
    device: Device,
) -> Result<StreamReport> {
    let plan = StreamPlan {
        dir,
        tile,
        blocks: opts.blocks,
        work: Work::AssembleOnly,
    };
    stream::stream_kernel(
        &job.model,
        &job.params,
        &job.seqs(),
        &job.opts,
        &plan,
        device,
        &|_, _| {},
    )
}

/// Capture in shards and compute the kernel in tiles under `dir`; the assembled kernel when it
/// has at most `opts.assemble_max` samples.
fn streamed(
    job: &Job,
    opts: &NtkOptions,
    tile: usize,
    dir: &Path,
    device: Device,
    progress: &dyn Progress,
) -> Result<(Option<Kernel>, StreamReport)> {
    prepare_stream(job, opts, tile, dir)?;
    let share = matches!(opts.work, Work::Share { .. });
    let refs = job.seqs();
    progress.start("streaming", Some(1));
    let plan = StreamPlan {
        dir,
        tile,
        blocks: opts.blocks,
        work: opts.work,
    };
    let rep = stream::stream_kernel(
        &job.model,
        &job.params,
        &refs,
        &job.opts,
        &plan,
        device,
        &|d, t| {
            progress.set_total(t as u64);
            progress.advance_to(d as u64);
        },
    )?;
    progress.finish();
    if share || refs.len() > opts.assemble_max {
        return Ok((None, rep));
    }
    let mut parts = stream::assemble(dir, refs.len(), tile)?;
    let total = parts.remove(0).1;
    let blocks = parts
        .into_iter()
        .map(|(n, t)| (n.trim_start_matches("block.").to_string(), t))
        .collect();
    let k = Kernel {
        total,
        blocks,
        diagonal: false,
    };
    Ok((Some(k), rep))
}

/// Refuse a kernel with NaN or Inf entries (a model or output that overflows): naming the
/// first sample pairs involved, instead of turning them into a GC.
fn check_finite(ids: &[&str], k: &Kernel) -> Result<()> {
    const SHOWN: usize = 5;
    let bad = k.total.isfinite().logical_not();
    let count = bad.sum(tch::Kind::Int64).int64_value(&[]);
    if count == 0 {
        return Ok(());
    }
    let at = bad.nonzero();
    let rows = at.size()[0].min(SHOWN as i64);
    let name = |i: i64| {
        usize::try_from(i)
            .ok()
            .and_then(|i| ids.get(i))
            .map_or_else(|| i.to_string(), |s| s.to_string())
    };
    let pairs: Vec<String> = (0..rows)
        .map(|r| {
            let i = at.int64_value(&[r, 0]);
            if k.diagonal {
                format!("Θ({0}, {0})", name(i))
            } else {
                format!("Θ({}, {})", name(i), name(at.int64_value(&[r, 1])))
            }
        })
        .collect();
    Err(Error::invalid(
        "kernel",
        format!(
            "{count} kernel entr{} not finite (NaN or Inf), first {}; the model's outputs or \
             gradients overflow on these samples (check the weights, or use --output mean-loss)",
            if count == 1 { "y is" } else { "ies are" },
            pairs.join(", ")
        ),
    ))
}

impl NtkOutput {
    /// Outputs with nothing computed yet but `samples` and `rep`: one share's work (no other
    /// output), a kernel too large to assemble (the sample table only), or the start of a full
    /// one.
    pub(crate) fn streamed_only(
        samples: Option<DataFrame>,
        rep: Option<StreamReport>,
    ) -> NtkOutput {
        NtkOutput {
            summary: None,
            kernel: None,
            principal: None,
            samples,
            gc: Vec::new(),
            cross: None,
            batch: None,
            stream: rep,
        }
    }
}

/// The padded batch of the job's samples (ids, mask, targets), masks seeded as in capture.
fn export_batch(job: &Job, seed: u64) -> Vec<(String, Tensor)> {
    let b = crate::capture::capture_batch(&job.model, &job.seqs(), seed, Device::Cpu);
    vec![
        ("ids".to_string(), b.ids),
        ("mask".to_string(), b.mask.to_kind(tch::Kind::Int64)),
        ("targets".to_string(), b.targets),
    ]
}

/// Named integer columns of the sample table: `(column, value per sample)`.
type Annotations = Vec<(String, Vec<i64>)>;

/// Integer columns per sample: the route of every CSE/Switch block (`expert_h{i}`) and the
/// DBSCAN cluster of the last block's sequence embeddings (knee eps, minPts 5; -1 = noise); and
/// those embeddings, for the sample table's principal components.
fn annotations(job: &Job, device: Device) -> Result<(Annotations, Option<Array2<f32>>)> {
    let enc = crate::eval::encode(&job.model, &job.seqs(), 64, device)?;
    let mut extra: Vec<(String, Vec<i64>)> = enc
        .routes
        .iter()
        .map(|(l, r)| (format!("expert_h{l}"), r.clone()))
        .collect();
    let last = enc
        .layers
        .last()
        .map(crate::array::matrix_f32)
        .transpose()?;
    if let Some(x) = &last {
        let min_pts = crate::cluster::MIN_PTS;
        if job.ids.len() > min_pts {
            let eps = crate::cluster::eps_from_knee(x.view(), min_pts)?;
            let params = crate::cluster::DbscanParams::new(eps, min_pts)?;
            let c = crate::cluster::dbscan(x.view(), params)?;
            let labels = c.labels.iter().map(|l| l.map_or(-1, |x| x as i64));
            extra.push(("cluster".into(), labels.collect()));
        }
    }
    Ok((extra, last))
}

/// The 1-gram frequency score of each chosen sample (counts over the corpus's training split);
/// `None` for a sample with no tokens to count.
fn freq_scores(job: &Job) -> Result<Vec<Option<f64>>> {
    let report = crate::freq::compute(
        &job.corpus,
        &job.all_ids,
        FreqOptions {
            orders: vec![1],
            ..FreqOptions::default()
        },
    )?;
    Ok(job.idx.iter().map(|&i| report.scores[0][i]).collect())
}

/// What the per-sample table is made of.
struct SampleInputs<'a> {
    /// The kernel the direction came from (normalised or not).
    k: &'a dyn KernelOp,
    /// Θ_ii before normalisation.
    raw_diag: &'a Tensor,
    whole: &'a Principal,
    extra: &'a [(String, Vec<i64>)],
    bins: &'a [Option<usize>],
    scores: &'a [Option<f64>],
    last: Option<&'a Array2<f32>>,
}

/// The per-sample table of a full kernel: Θ_ii, alignment, annotations, frequency bin, two
/// principal components of the last block's embeddings and the frequency score (the bin and
/// the score null for a sample with no score).
fn samples_table(job: &Job, t: &SampleInputs) -> Result<DataFrame> {
    let (scores, last) = (t.scores, t.last);
    let align = gc::alignment(t.k, t.whole)?;
    let diag: Vec<f64> = Vec::try_from(t.raw_diag)?;
    let mut df = job.samples_frame(Some(&diag), Some(&align), t.extra)?;
    let table = |e| Error::table("samples", e);
    let bins: Vec<Option<i64>> = t.bins.iter().map(|b| b.map(|b| b as i64)).collect();
    df.with_column(Column::new("freq_bin".into(), bins))
        .map_err(table)?;
    if let Some(last) = last {
        let (pc1, pc2) = crate::cluster::pca::pca2(last.view())?;
        df.with_column(Column::new("pc1".into(), pc1))
            .map_err(table)?;
        df.with_column(Column::new("pc2".into(), pc2))
            .map_err(table)?;
    }
    df.with_column(Column::new("freq_score".into(), scores.to_vec()))
        .map_err(table)?;
    Ok(df)
}

/// Θ(X, Y) against `n` samples of `split`.
fn cross(
    job: &Job,
    cx: &Captured,
    split: SplitChoice,
    n: usize,
    blocks: BlockBy,
    device: Device,
    progress: &dyn Progress,
) -> Result<Cross> {
    let yidx = job.corpus.pick(split, n);
    let yids: Vec<Vec<u32>> = yidx.iter().map(|&i| job.all_ids[i].clone()).collect();
    let cy = job.capture(&yids, "cross set", device, progress)?;
    Ok(Cross {
        split,
        n: yidx.len(),
        kernel: kernel(cx, Some(&cy), blocks, false)?,
    })
}

impl NtkOutput {
    /// Write the outputs into `dir`: `kernel.safetensors`, `ntk.json`, `samples.parquet`,
    /// `gc.parquet` (full kernels), `batch.safetensors` and `cross_kernel.safetensors` when
    /// computed. A streamed kernel's shards and tiles are already there.
    pub fn write(&mut self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        if let Some(k) = &self.kernel {
            crate::io::write_tensors(&k.named(), &dir.join("kernel.safetensors"))?;
        }
        if let Some(s) = &self.summary {
            let json = serde_json::to_string_pretty(s)
                .map_err(|e| Error::invalid("ntk summary", e.to_string()))?;
            crate::io::write_atomic(dir.join("ntk.json"), json.as_bytes())?;
        }
        if let Some(b) = &self.batch {
            crate::io::write_tensors(b, &dir.join("batch.safetensors"))?;
        }
        if self.principal.is_some() {
            crate::io::write_parquet(&mut gc_frame(&self.gc)?, dir.join("gc.parquet"))?;
        }
        if let Some(samples) = &mut self.samples {
            crate::io::write_parquet(samples, dir.join("samples.parquet"))?;
        }
        if let Some(c) = &self.cross {
            let path = dir.join("cross_kernel.safetensors");
            crate::io::write_tensors(&c.kernel.named(), &path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(values: &[f64], n: i64) -> Kernel {
        Kernel {
            total: Tensor::from_slice(values).view([n, n]),
            blocks: Vec::new(),
            diagonal: false,
        }
    }

    #[test]
    fn non_finite_kernel_entries_are_refused_naming_the_pairs() {
        let ids = ["a", "b", "c"];
        let ok = kernel(&[1.0, 0.5, 0.0, 0.5, 1.0, 0.2, 0.0, 0.2, 1.0], 3);
        assert!(check_finite(&ids, &ok).is_ok());
        let nan = kernel(
            &[1.0, 0.5, 0.0, 0.5, 1.0, f64::NAN, 0.0, f64::INFINITY, 1.0],
            3,
        );
        let msg = check_finite(&ids, &nan).unwrap_err().to_string();
        assert!(msg.contains("2 kernel entries are not finite"), "{msg}");
        assert!(msg.contains("Θ(b, c)") && msg.contains("Θ(c, b)"), "{msg}");
        assert!(!msg.contains("Θ(a,"), "{msg}");
    }

    /// The settings a streamed kernel records read as the command line spells them.
    #[test]
    fn recorded_settings_read_as_typed() {
        use crate::capture::{Method, Projection, ProjectionKind};
        let p = Projection {
            kind: ProjectionKind::Sparse,
            dim: 256,
            seed: 0,
        };
        assert_eq!(
            projection_flags(Some(p)),
            "--project 256 --projection sparse"
        );
        assert_eq!(projection_flags(None), "no --project");
        assert_eq!(typed("--method", Method::Batched), "--method batched");
        assert_eq!(typed("--blocks", BlockBy::Module), "--blocks module");
    }
}

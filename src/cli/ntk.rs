//! `tailscope capture` and `tailscope ntk`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::progress::Bars;
use super::Global;
use crate::capture::job::{self, Job, JobSpec};
use crate::capture::{CaptureOptions, Method, OutputKind, Projection, ProjectionKind, Selection};
use crate::corpus::SplitChoice;
use crate::ntk::gc::IntervalMethod;
use crate::ntk::pipeline::{self, GcRow, NtkOptions, NtkOutput};
use crate::ntk::stream::Work;
use crate::ntk::{BlockBy, Normalize};

/// Which samples and which gradients; shared by `capture` and `ntk`.
#[derive(Debug, Clone, Args)]
pub struct CaptureArgs {
    /// The model: a checkpoint folder, a Hugging Face folder, a GGUF file or a TorchScript module.
    ///
    /// A TorchScript file (.pt) runs code when it is loaded, as a pickle does: load only files you
    /// trust. Safetensors and GGUF files hold data only.
    #[arg(long, value_name = "PATH", help_heading = "Input")]
    pub model: PathBuf,
    /// The corpus table.
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    pub corpus: PathBuf,
    /// The tokenizer.json (default: beside the corpus).
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    pub tokenizer: Option<PathBuf>,
    /// Split the samples come from.
    #[arg(long, value_enum, default_value_t = SplitChoice::Validation, value_name = "SPLIT", help_heading = "Samples")]
    pub split: SplitChoice,
    /// Number of samples (evenly spaced over the split).
    #[arg(
        long,
        default_value_t = job::DEFAULT_SAMPLES,
        value_name = "N",
        value_parser = super::at_least_one,
        help_heading = "Samples"
    )]
    pub samples: usize,
    /// 0: samples evenly spaced over the split; otherwise a random draw seeded by this value
    /// (a second draw to check that results do not hang on the sample choice).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "SEED",
        help_heading = "Samples"
    )]
    pub sample_seed: u64,
    /// The scalar output per sample.
    #[arg(
        long,
        value_enum,
        default_value_t = OutputKind::MeanLoss,
        value_name = "OUTPUT",
        help_heading = "Gradients",
        long_help = "The scalar f(x) whose per-sample gradient is taken: mean-loss (the sample's mean \
            token loss, default), sum-loglik (its summed log-likelihood), logit-trace (the trace over \
            output logits, a Hutchinson estimate with --probes random output directions)."
    )]
    pub output: OutputKind,
    /// Random output directions of the logit-trace estimate.
    #[arg(
        long,
        default_value_t = job::DEFAULT_PROBES,
        value_name = "K",
        help_heading = "Gradients"
    )]
    pub probes: usize,
    /// How per-sample gradients are computed.
    #[arg(
        long,
        value_enum,
        default_value_t = Method::Batched,
        value_name = "METHOD",
        help_heading = "Gradients",
        long_help = "exact: one backward pass per sample (the oracle, slow); batched: per-layer \
            per-sample gradients from one batched backward (default); ghost: Linear weight kernels \
            from Gram matrices without per-sample gradients; auto: ghost where cheaper. All give \
            the same kernel (tested to 1e-6 in float64)."
    )]
    pub method: Method,
    /// Parameter name globs (repeatable; default: the MLPs of the last 2 blocks, see --all-params).
    #[arg(
        long = "params",
        value_name = "GLOB",
        help_heading = "Gradients",
        long_help = "Parameter name globs (`*`, `?`), repeatable, combined with --layers and --expert by OR. Names are the safetensors names, e.g. 'h.3.mlp.*' or '*.c_fc.weight'."
    )]
    pub params: Vec<String>,
    /// Block range A..B (inclusive): every parameter of blocks A to B.
    #[arg(long, value_name = "A..B", help_heading = "Gradients")]
    pub layers: Option<String>,
    /// One expert's parameters: BLOCK:EXPERT.
    #[arg(long, value_name = "L:E", help_heading = "Gradients")]
    pub expert: Option<String>,
    /// The last K transformer blocks. With no --params, --layers, --expert, --last-blocks or
    /// --mlp-only, the MLPs of the last 2 blocks are taken (the README's kernel-options study);
    /// --all-params takes every parameter.
    #[arg(long, value_name = "K", help_heading = "Gradients")]
    pub last_blocks: Option<i64>,
    /// Only MLP (FFN and expert) parameters of what the other options select.
    #[arg(long, help_heading = "Gradients")]
    pub mlp_only: bool,
    /// Every trainable parameter, embeddings included, when no other selection is given.
    #[arg(long, help_heading = "Gradients")]
    pub all_params: bool,
    /// Project per-sample gradients to K dimensions.
    #[arg(
        long,
        value_name = "K",
        help_heading = "Gradients",
        long_help = "Project every parameter's per-sample gradients to K dimensions with a seeded random matrix (entries of variance 1/K, identical across processes for one --seed), trading exactness for memory. Not with --method ghost."
    )]
    pub project: Option<i64>,
    /// Distribution of the projection (default sparse: as accurate as gaussian at equal K, far
    /// cheaper); needs --project.
    #[arg(long, value_enum, value_name = "KIND", help_heading = "Gradients")]
    pub projection: Option<ProjectionKind>,
    /// Memory budget in GB (default: 80% of the memory available at start); see the long help.
    #[arg(
        long,
        value_name = "GB",
        value_parser = positive_gb,
        help_heading = "Gradients",
        long_help = "Memory budget in GB for capture (default: 80% of the memory the system \
            reports available at start). What the capture holds (per-sample gradients, projected \
            or not, ghost factors) and one batch needs (recorded activations, attention scores, \
            logits, per-sample gradient pieces) are estimated from the model's shapes and each \
            text's length, and batches are cut to fit, up to --batch samples: long texts go in \
            smaller batches. If the result alone or one sample cannot fit, the run stops at once \
            saying what to change. The chosen batches are logged (-v)."
    )]
    pub memory: Option<f64>,
    /// Samples per forward/backward pass.
    #[arg(
        long,
        default_value_t = job::DEFAULT_BATCH,
        value_name = "N",
        value_parser = super::at_least_one,
        help_heading = "Gradients"
    )]
    pub batch: usize,
    /// Output directory.
    #[arg(short, long, value_name = "DIR", help_heading = "Output")]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Example:\n  \
    tailscope ntk --model out/demo/train/cse/final --corpus out/demo/corpus.parquet --samples 512 -o out/demo/ntk/cse")]
pub struct NtkArgs {
    #[command(flatten)]
    pub capture: CaptureArgs,
    /// How the kernel is split into blocks.
    #[arg(long, value_enum, default_value_t = BlockBy::Module, value_name = "BY", help_heading = "Kernel")]
    pub blocks: BlockBy,
    /// Only the diagonal Θ_ii (every output becomes (n,)).
    #[arg(long, help_heading = "Kernel")]
    pub diagonal: bool,
    /// Also compute the cross-kernel Θ(X, Y) against N samples of this split.
    #[arg(long, value_enum, value_name = "SPLIT", help_heading = "Kernel")]
    pub cross_split: Option<SplitChoice>,
    /// Samples of the cross set.
    #[arg(long, default_value_t = 256, value_name = "N", help_heading = "Kernel")]
    pub cross_samples: usize,
    /// Frequency bins (quantiles of the 1-gram frequency score) for GC per bin.
    #[arg(long, default_value_t = pipeline::DEFAULT_BINS, value_name = "N", value_parser = super::at_least_one, help_heading = "Kernel")]
    pub bins: usize,
    /// Jackknife groups (or half-samples, with --interval half-sample) for the 95% intervals of
    /// every GC in gc.parquet (0: none). Each recomputes the principal direction.
    #[arg(long, default_value_t = pipeline::DEFAULT_GC_RESAMPLES, value_name = "N", help_heading = "Kernel")]
    pub gc_resamples: usize,
    /// How the GC intervals are computed.
    #[arg(long, value_enum, default_value_t = IntervalMethod::default(), value_name = "METHOD", help_heading = "Kernel")]
    pub interval: IntervalMethod,
    /// Scale per-sample gradients before the principal direction, GC and alignment: `cosine`
    /// makes every gradient unit-length, so no sample dominates by its norm. kernel.safetensors
    /// and self_kernel stay unscaled.
    #[arg(long, value_enum, default_value_t = Normalize::default(), value_name = "HOW", help_heading = "Kernel")]
    pub normalize: Normalize,
    /// Also write batch.safetensors (ids, mask, targets of the samples, padded) for peer tools.
    #[arg(long, help_heading = "Output")]
    pub export_batch: bool,
    /// Stream to disk in tiles of N samples (resumable); see the long help.
    #[arg(
        long,
        value_name = "N",
        help_heading = "Kernel",
        long_help = "Compute the kernel out of memory: per-sample gradients are written in shards of N \
            samples (shards/), the kernel in N × N tiles (tiles/, indexed by tiles.parquet). Files that \
            exist are complete, so rerunning the same command after an interruption resumes where it \
            stopped. The tiles are assembled into kernel.safetensors when the whole kernel has at most \
            --assemble-max samples; above it GC and the sample table come from the tiles on disk. Not with --diagonal, --cross-split or ghost."
    )]
    pub tile: Option<usize>,
    /// Largest streamed kernel assembled in memory.
    #[arg(
        long,
        default_value_t = pipeline::DEFAULT_ASSEMBLE_MAX,
        value_name = "N",
        help_heading = "Kernel"
    )]
    pub assemble_max: usize,
    /// With --tile: remove the shards and tiles already in the output folder and start afresh,
    /// instead of resuming from them (a resume under other settings is refused).
    #[arg(long, help_heading = "Kernel")]
    pub fresh: bool,
    /// With --tile: compute share I of N (0-based) of the shards and tiles; see the long help.
    #[arg(
        long,
        value_name = "I/N",
        requires = "tile",
        conflicts_with_all = ["assemble", "fresh"],
        help_heading = "Scale-out",
        long_help = "With --tile: compute share I of N (0-based) of the shards and tiles, so that N \
            processes (the tasks of a Slurm job array, on one or many hosts sharing the output \
            folder) build one streamed kernel together: share I captures the shards s with s mod \
            N = I and computes the tiles t (numbered row by row) with t mod N = I. A tile whose \
            shard another share has not written yet waits --shard-wait seconds for it, then \
            captures it itself. Every share runs the same command but for I; when all are done, \
            the same command with --assemble instead of --shard writes kernel.safetensors, GC and \
            the tables. A share killed midway resumes when rerun, under the same or another N."
    )]
    pub shard: Option<crate::ntk::stream::Share>,
    /// With --shard: seconds to wait for a shard of another share before capturing it here.
    #[arg(
        long,
        default_value_t = 600,
        value_name = "SECS",
        requires = "shard",
        help_heading = "Scale-out"
    )]
    pub shard_wait: u64,
    /// With --tile: compute nothing; assemble the tiles the shares wrote (every tile must be
    /// there), then GC and the tables.
    #[arg(long, requires = "tile", help_heading = "Scale-out")]
    pub assemble: bool,
    /// GC over training: --model is a training run folder; see the long help.
    #[arg(
        long,
        conflicts_with_all = ["tile", "diagonal", "cross_split"],
        help_heading = "Kernel",
        long_help = "GC over training: --model names a `tailscope train` run folder (e.g. \
            out/demo/train/cse), and the kernel of the same samples is computed at every checkpoint \
            kept under its checkpoints/ (keep more with train.keep_steps). Writes one NTK folder per \
            checkpoint (step-NNNNNN/, reused when rerun under the same settings), \
            trajectory.parquet (GC per frequency bin, domain, long-tail flag, expert and cluster \
            per step, with intervals), drift.parquet (‖Θ_t − Θ_T‖/‖Θ_T‖ against the last \
            checkpoint, raw and cosine-normalised) and figures/{gc_trajectory, \
            gc_trajectory_long_tail, kernel_drift}.{svg,png}."
    )]
    pub trajectory: bool,
}

impl CaptureArgs {
    /// The library's description of this capture.
    pub fn job_spec(&self, g: &Global) -> crate::Result<JobSpec> {
        if let (Some(kind), None) = (self.projection, self.project) {
            return Err(crate::error::Error::invalid(
                "--projection",
                format!(
                    "{} applies to a projection, and none was asked for: add --project K (the dimension to project to), or drop --projection",
                    kind.to_possible_value().map_or("it".into(), |v| v.get_name().to_string())
                ),
            ));
        }
        Ok(JobSpec {
            model: self.model.clone(),
            corpus: self.corpus.clone(),
            tokenizer: self.tokenizer.clone(),
            split: self.split,
            samples: self.samples,
            sample_seed: self.sample_seed,
            selection: Selection {
                globs: self.params.clone(),
                layers: self
                    .layers
                    .as_deref()
                    .map(job::parse_block_range)
                    .transpose()?,
                expert: self.expert.as_deref().map(job::parse_expert).transpose()?,
                last_blocks: self.last_blocks,
                mlp_only: self.mlp_only,
            }
            .or_recommended(self.all_params),
            options: CaptureOptions {
                output: self.output,
                method: self.method,
                projection: self.project.map(|dim| Projection {
                    kind: self.projection.unwrap_or_default(),
                    dim,
                    seed: g.seed,
                }),
                batch: self.batch,
                probes: self.probes,
                seed: g.seed,
                memory: match self.memory {
                    Some(gb) => Some((gb * 1e9) as u64),
                    None => crate::capture::memory::default_budget(),
                },
                ..CaptureOptions::default()
            },
        })
    }
}

impl NtkArgs {
    /// The library's kernel settings.
    pub fn options(&self, g: &Global) -> NtkOptions {
        NtkOptions {
            blocks: self.blocks,
            diagonal: self.diagonal,
            cross: self.cross_split.map(|s| (s, self.cross_samples)),
            bins: self.bins,
            gc_resamples: self.gc_resamples,
            interval: self.interval,
            normalize: self.normalize,
            export_batch: self.export_batch,
            tile: self.tile,
            assemble_max: self.assemble_max,
            fresh: self.fresh,
            work: match (self.shard, self.assemble) {
                (Some(share), _) => Work::Share {
                    share,
                    wait: std::time::Duration::from_secs(self.shard_wait),
                },
                (None, true) => Work::AssembleOnly,
                (None, false) => Work::All,
            },
            seed: g.seed,
        }
    }
}

/// A memory budget in GB: a positive number.
pub(crate) fn positive_gb(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("expected a positive number of GB, got {s:?}")),
    }
}

/// `tailscope capture`: per-sample gradients to `grads.safetensors` (one (n, P) tensor per
/// parameter, or (n, k) projected, (n, probes·k) for logit-trace) and `samples.parquet`.
pub fn run_capture_cmd(a: &CaptureArgs, g: &Global) -> anyhow::Result<()> {
    // Refused before the model is loaded.
    job::check_gradient_method(a.method)?;
    if crate::device::mpi_launched() {
        return Err(crate::error::Error::invalid(
            "mpirun",
            "capture writes one grads.safetensors from one process; over ranks, `ntk --tile N` \
             writes the per-sample gradients in shards (shards/grads-NNNNN.safetensors)",
        )
        .into());
    }
    let device = crate::device::resolve(g.device)?;
    let job = Job::prepare(&a.job_spec(g)?, device)?;
    let mut grads = job::capture_gradients(&job, device, &Bars::default())?;
    grads.write(&a.out)?;
    println!(
        "captured {} samples × {} values ({} parameter tensors, output {:?}, method {:?}) in {:.1} s",
        grads.n,
        grads.width(),
        grads.named.len(),
        a.output,
        a.method,
        grads.seconds
    );
    println!(
        "wrote {}/grads.safetensors and samples.parquet",
        a.out.display()
    );
    Ok(())
}

/// `tailscope ntk`.
pub fn run_ntk(a: &NtkArgs, g: &Global) -> anyhow::Result<()> {
    if a.fresh && a.tile.is_none() && !a.trajectory {
        return Err(crate::error::Error::invalid(
            "--fresh",
            "applies to --tile or --trajectory outputs; give one of them",
        )
        .into());
    }
    let device = crate::device::resolve(g.device)?;
    if a.trajectory {
        return run_trajectory(a, g, device);
    }
    if crate::device::mpi_launched() {
        #[cfg(feature = "mpi")]
        return run_ntk_mpi(a, g, device);
        #[cfg(not(feature = "mpi"))]
        return Err(crate::error::Error::invalid(
            "mpirun",
            "this tailscope was built without MPI; build it with `cargo build --release \
             --features mpi`, or run the shares as separate processes with --shard I/N",
        )
        .into());
    }
    let job = Job::prepare(&a.capture.job_spec(g)?, device)?;
    let out = &a.capture.out;
    let r = pipeline::compute_into(&job, &a.options(g), device, out, &Bars::default())?;
    print_ntk(&job, out, a.assemble_max, &r);
    Ok(())
}

/// The environment variable that makes one MPI rank panic (for the tests).
#[cfg(feature = "mpi")]
const PANIC_RANK_VAR: &str = "TAILSCOPE_TEST_PANIC_RANK";

/// `mpirun -n R tailscope ntk --tile N …`: one streamed kernel over R ranks. A rank that fails
/// prints its error naming itself and aborts the job, so no rank waits for it.
#[cfg(feature = "mpi")]
fn run_ntk_mpi(a: &NtkArgs, g: &Global, device: tch::Device) -> anyhow::Result<()> {
    use crate::ntk::mpi::{self, Ranks};
    let ranks = Ranks::init()?;
    ranks.abort_on_panic();
    let (rank, size) = (ranks.rank(), ranks.size());
    let device = crate::device::for_local_rank(device);
    tracing::info!("rank {rank} of {size} on {device:?}");
    let out = &a.capture.out;
    let result = (|| -> crate::Result<_> {
        let job = Job::prepare(&a.capture.job_spec(g)?, device)?;
        // Fault injection for the MPI tests (tests/mpi.rs): a panic on one rank, while the
        // others wait for it in the ring exchange, must end the job.
        if std::env::var(PANIC_RANK_VAR)
            .ok()
            .and_then(|v| v.parse().ok())
            == Some(rank)
        {
            panic!("{PANIC_RANK_VAR}={rank}: a panic injected for testing");
        }
        let silent = crate::progress::Silent;
        let bars = Bars::default();
        let progress: &dyn crate::progress::Progress = if rank == 0 { &bars } else { &silent };
        let r = mpi::compute_into(&job, &a.options(g), device, out, &ranks, progress)?;
        Ok((job, r))
    })();
    let (job, mut r) = match result {
        Ok(x) => x,
        Err(e) => {
            let code = if e.is_bad_input() { 2 } else { 1 };
            // One write, so that ranks failing together do not interleave their lines.
            let line = format!("tailscope: rank {rank} of {size}: {e}; aborting the job\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            ranks.abort(code);
        }
    };
    if let Some(o) = &mut r.output {
        // The per-rank table below says what was computed and reused.
        o.stream = None;
        print_ntk(&job, out, a.assemble_max, o);
        println!("ranks: {size}");
        println!("rank  samples  shards new/reused  tiles new/reused  capture s  tiles s  exchange s  MB sent");
        for p in &r.ranks {
            println!(
                "{:>4}  {:>7}  {:>10}/{:<6}  {:>9}/{:<6}  {:>9.2}  {:>7.2}  {:>10.2}  {:>7.1}",
                p.rank,
                p.samples,
                p.shards_captured,
                p.shards_reused,
                p.tiles_computed,
                p.tiles_reused,
                p.capture_seconds,
                p.tile_seconds,
                p.exchange_seconds,
                p.bytes_sent as f64 / 1e6
            );
        }
        println!("wrote {}/ranks.json", out.display());
    }
    Ok(())
}

/// `tailscope ntk --trajectory`: the kernel at every kept checkpoint of a run.
fn run_trajectory(a: &NtkArgs, g: &Global, device: tch::Device) -> anyhow::Result<()> {
    use crate::ntk::trajectory;
    let checkpoints = trajectory::checkpoints_of(&a.capture.model)?;
    let out = &a.capture.out;
    let mut spec = a.capture.job_spec(g)?;
    spec.model = checkpoints[0].path.clone();
    let t = trajectory::compute_into(
        &spec,
        &checkpoints,
        &a.options(g),
        device,
        out,
        &Bars::default(),
        |c, reused| {
            tracing::info!(
                "step {}: {}",
                c.step,
                if reused { "reused" } else { "computed" }
            )
        },
    )?;
    let figs = crate::report::trajectory::write_figures(&t, out)?;
    println!(
        "NTK at {} checkpoints of {} ({} reused), steps {}",
        checkpoints.len(),
        a.capture.model.display(),
        t.reused,
        checkpoints
            .iter()
            .map(|c| c.step.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("step      drift  drift(cos)  GC by frequency bin (0 = rarest)");
    for d in &t.drift {
        let gcs: Vec<String> = t
            .rows
            .iter()
            .filter(|r| r.step == d.step && r.column == "freq_bin")
            .map(|r| format!("{:+.3} [{:+.2}, {:+.2}]", r.gc, r.gc_low, r.gc_high))
            .collect();
        println!(
            "{:<8} {:>6.3} {:>10.3}  {}",
            d.step,
            d.drift,
            d.drift_cosine,
            gcs.join("  ")
        );
    }
    println!(
        "wrote {}/trajectory.parquet, drift.parquet, step-*/ and figures/{{{}}}.{{svg,png}}",
        out.display(),
        figs.iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(",")
    );
    Ok(())
}

/// What `tailscope ntk` prints about a finished run written into `out`.
pub fn print_ntk(job: &Job, out: &std::path::Path, assemble_max: usize, r: &NtkOutput) {
    if let (Some(rep), None) = (&r.stream, &r.samples) {
        println!(
            "share done: {} shards ({} reused, {} more taken over from other shares), {} tiles ({} reused) under {}",
            rep.shards,
            rep.shards_reused,
            rep.shards_taken_over,
            rep.tiles,
            rep.tiles_reused,
            out.display()
        );
        println!(
            "when every share is done, run the same command with --assemble instead of --shard"
        );
        return;
    }
    if let Some(rep) = &r.stream {
        println!(
            "streamed: {} shards ({} reused), {} tiles ({} reused) under {}",
            rep.shards,
            rep.shards_reused,
            rep.tiles,
            rep.tiles_reused,
            out.display()
        );
    }
    let Some(s) = &r.summary else {
        println!(
            "{} samples exceed --assemble-max {}: the kernel stays in tiles/ (rows and columns as in tiles.parquet, samples in samples.parquet)",
            job.ids.len(),
            assemble_max
        );
        return;
    };
    println!(
        "NTK of {} samples over {} parameters ({} tensors), output {:?}, method {:?}{}: {:.1} s",
        s.samples,
        s.parameters,
        s.tensors,
        s.output,
        s.method,
        s.projection
            .map(|k| format!(", projected to {k}"))
            .unwrap_or_default(),
        s.seconds
    );
    let Some(whole) = &r.principal else {
        println!(
            "wrote {}/kernel.safetensors (diagonal) and samples.parquet",
            out.display()
        );
        return;
    };
    print_diagnostics(s, whole.lambda);
    println!(
        "GC (cos of the primary gradient directions) [95% {} interval] by 1-gram frequency bin (0 = rarest):",
        interval_name(s.interval)
    );
    for row in r.gc.iter().filter(|r| r.column == "freq_bin") {
        println!(
            "  bin {:<3} n {:>4}  mean score {:.4}  GC {}",
            row.group,
            row.n,
            row.mean_freq_score,
            show_gc(row)
        );
    }
    for row in
        r.gc.iter()
            .filter(|r| r.column == "long_tail" || r.column.starts_with("expert_"))
    {
        println!(
            "  {} {:<8} n {:>4}  GC {}",
            row.column,
            row.group,
            row.n,
            show_gc(row)
        );
    }
    if let Some(c) = &r.cross {
        println!(
            "cross-kernel {} × {} against the {} split: cross_kernel.safetensors",
            s.samples,
            c.n,
            c.split.as_str()
        );
    }
    match &r.kernel {
        Some(k) => println!(
            "wrote {}/kernel.safetensors ({} blocks), samples.parquet, gc.parquet",
            out.display(),
            k.blocks.len()
        ),
        None => println!(
            "{} samples exceed --assemble-max {}: GC came from the kernel's tiles (by rows over the ranks under MPI), which stay in tiles/; wrote {}/samples.parquet, gc.parquet",
            s.samples,
            assemble_max,
            out.display()
        ),
    }
}

/// The interval method in words.
fn interval_name(m: IntervalMethod) -> &'static str {
    match m {
        IntervalMethod::Jackknife => "jackknife",
        IntervalMethod::HalfSample => "half-sampling",
    }
}

/// The kernel diagnostics and, when the result is degenerate, the warnings in plain words.
fn print_diagnostics(s: &pipeline::NtkSummary, lambda: f64) {
    if let Some(d) = &s.diagnostics {
        println!(
            "kernel{}: principal eigenvalue {lambda:.4e} holds {:.1}% of the trace; carried by {:.1} of {} samples (participation ratio); Θ_ii max/median {:.1}; mean |cosine| {:.3}",
            match s.normalize {
                Normalize::Cosine => " (cosine-normalised)",
                Normalize::None => "",
            },
            100.0 * d.top_share,
            d.participation,
            d.samples,
            d.diag_spread,
            d.mean_abs_cosine
        );
    }
    if s.warnings.is_empty() {
        println!("diagnostics: the kernel is not degenerate (no warning)");
    }
    for w in &s.warnings {
        println!("WARNING: {} {}", w.problem, w.change);
    }
}

/// A GC with its interval: `0.812 [0.700, 0.900]`.
fn show_gc(r: &GcRow) -> String {
    match (r.gc, r.interval) {
        (Some(v), Some((lo, hi))) => format!("{v:.3} [{lo:.3}, {hi:.3}]"),
        (Some(v), None) => format!("{v:.3}"),
        _ => "-".into(),
    }
}

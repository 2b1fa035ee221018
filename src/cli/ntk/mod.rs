//! `tailscope ntk`: its arguments, and which library function runs (one process, MPI ranks,
//! or a training run's checkpoints); what it prints is in [`print`].

mod print;

use clap::Args;

pub use print::print_ntk;

use super::capture::CaptureArgs;
use super::progress::Bars;
use super::Global;
use crate::capture::job::Job;
use crate::corpus::SplitChoice;
use crate::ntk::gc::IntervalMethod;
use crate::ntk::pipeline::{self, NtkOptions};
use crate::ntk::stream::Work;
use crate::ntk::{BlockBy, Normalize};

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
        print::ranks(size, &r.ranks, out);
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
    print::trajectory(&a.capture.model, &checkpoints, &t, &figs, out);
    Ok(())
}

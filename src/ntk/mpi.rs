//! Scale-out over MPI ranks (cargo feature `mpi`): `mpirun -n R tailscope ntk --tile N …` runs
//! one streamed kernel over R processes, on one host or many sharing the output folder, and
//! writes what one process writes.
//!
//! - Rank r captures the shards s with s mod R = r (uneven shares allowed), writing each as one
//!   process would (`shards/`), and holds its own shards: its row block.
//! - The kernel is computed by row blocks with a ring exchange: at step k every rank holds the
//!   shards of rank r − k (mod R), computes the tiles (a, b), a ≤ b, with a its own and b visiting,
//!   and passes the visiting shards on to rank r + 1. Every tile is computed once, by the rank of
//!   its row shard; no rank holds more than its own shards and two visiting sets.
//! - Rank 0 then finishes as `--assemble` does: the tile index, and up to `--assemble-max`
//!   samples the kernel, GC and tables, from the same tiles as one process, so the same numbers.
//!   Above `--assemble-max` every rank reads its rows of the kernel from the tiles and the ranks
//!   compute the principal direction (Lanczos on products with an all-reduce, several vectors
//!   per all-reduce), GC, alignment and their intervals together ([`RowBlocks`]); no rank holds
//!   the whole kernel or a sub-kernel of it.
//! - A rank that fails (bad input, panic) aborts the whole job with a message naming the rank;
//!   the files written are complete (atomic), so rerunning resumes, under any R.
//!
//! Written by hand on rsmpi's point-to-point calls: tch tensors cross as f64 or f32 buffers
//! (their own precision) with a small header (shard, rows, kind and width per tensor). A
//! payload crosses in messages of at most 2²⁶ values (`TAILSCOPE_MPI_CHUNK` sets another count,
//! for tests); both ends of a link count its messages from the payload's length, which the
//! receiver learns first (the header's length, then the header), so ranks with more, fewer or
//! no shards (more ranks than shards) exchange without a message left over.

use std::path::Path;
use std::time::Instant;

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Destination, Source};
use tch::{Device, Kind, Tensor};

use super::op::{self, KernelOp};
use super::pipeline::{self, NtkOptions, NtkOutput};
use super::stream::{self, Work};
use crate::capture::job::Job;
use crate::capture::Captured;
use crate::error::{Error, Result};
use crate::progress::Progress;

/// The MPI job this process belongs to; MPI is finalised when it is dropped.
pub struct Ranks {
    world: SimpleCommunicator,
    _universe: mpi::environment::Universe,
}

impl Ranks {
    /// Initialise MPI (once per process).
    pub fn init() -> Result<Ranks> {
        let universe = mpi::initialize()
            .ok_or_else(|| Error::invalid("mpi", "MPI was already initialised in this process"))?;
        Ok(Ranks {
            world: universe.world(),
            _universe: universe,
        })
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    /// Ranks in all.
    pub fn size(&self) -> usize {
        self.world.size() as usize
    }

    /// End every rank of the job now with `code` (MPI_Abort): what a failing rank does, so the
    /// others do not wait for it forever.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    /// Make a panic on this rank abort the whole job after its message is printed.
    pub fn abort_on_panic(&self) {
        let rank = self.rank();
        let size = self.size();
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            eprintln!("tailscope: rank {rank} of {size} panicked; aborting the job");
            default(info);
            SimpleCommunicator::world().abort(101);
        }));
    }
}

/// What one rank did: counts, seconds per phase and bytes sent (`ranks.json`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RankReport {
    /// The rank.
    pub rank: usize,
    /// Samples in its shards.
    pub samples: usize,
    /// Its shards captured now.
    pub shards_captured: usize,
    /// Its shards found complete on disk.
    pub shards_reused: usize,
    /// Tiles it computed.
    pub tiles_computed: usize,
    /// Its tiles found complete on disk.
    pub tiles_reused: usize,
    /// Seconds capturing (or loading) its shards.
    pub capture_seconds: f64,
    /// Seconds computing and writing tiles.
    pub tile_seconds: f64,
    /// Seconds in the ring exchange (waiting included).
    pub exchange_seconds: f64,
    /// Bytes it sent in the ring.
    pub bytes_sent: u64,
}

impl RankReport {
    const FIELDS: usize = 10;

    fn to_vec(&self) -> [f64; Self::FIELDS] {
        [
            self.rank as f64,
            self.samples as f64,
            self.shards_captured as f64,
            self.shards_reused as f64,
            self.tiles_computed as f64,
            self.tiles_reused as f64,
            self.capture_seconds,
            self.tile_seconds,
            self.exchange_seconds,
            self.bytes_sent as f64,
        ]
    }

    fn from_slice(v: &[f64]) -> RankReport {
        RankReport {
            rank: v[0] as usize,
            samples: v[1] as usize,
            shards_captured: v[2] as usize,
            shards_reused: v[3] as usize,
            tiles_computed: v[4] as usize,
            tiles_reused: v[5] as usize,
            capture_seconds: v[6],
            tile_seconds: v[7],
            exchange_seconds: v[8],
            bytes_sent: v[9] as u64,
        }
    }
}

/// What an MPI run yields: on rank 0 the outputs of [`pipeline::compute_into`] with
/// [`Work::AssembleOnly`]; on every rank every rank's report.
pub struct MpiOutput {
    /// Rank 0's finished outputs (`None` on the other ranks).
    pub output: Option<NtkOutput>,
    /// Every rank's report, by rank.
    pub ranks: Vec<RankReport>,
}

/// The streamed kernel of `job` over the ranks of `ranks` into `dir` (see the module docs).
/// Needs `opts.tile`; `opts.work` must be [`Work::All`].
pub fn compute_into(
    job: &Job,
    opts: &NtkOptions,
    device: Device,
    dir: &Path,
    ranks: &Ranks,
    progress: &dyn Progress,
) -> Result<MpiOutput> {
    let tile = check_options(opts)?;
    let chunk = chunk_size()?;
    let started = Instant::now();
    let (rank, size) = (ranks.rank(), ranks.size());
    let world = &ranks.world;
    prepare(job, opts, tile, dir, rank, world)?;
    let n_shards = job.seqs().len().div_ceil(tile);
    let mine: Vec<usize> = (0..n_shards).filter(|s| s % size == rank).collect();
    let names: Vec<String> = job.params.iter().map(|(n, _)| n.clone()).collect();
    let mut rep = RankReport {
        rank,
        ..RankReport::default()
    };
    let own = own_shards(job, tile, &mine, dir, device, &mut rep, progress)?;
    let ring = Ring {
        world,
        names: &names,
        chunk,
        dir,
        blocks: opts.blocks,
    };
    ring.compute_tiles(own, &mut rep, progress)?;
    let reports = gather_reports(world, &rep);
    let mut output = finish(job, opts, tile, &mine, device, dir, world, progress)?;
    if let Some(out) = &mut output {
        write_run_files(out, &reports, started, dir)?;
    }
    // The other ranks wait for rank 0, so the job ends when the outputs are there.
    world.barrier();
    Ok(MpiOutput {
        output,
        ranks: reports,
    })
}

/// The tile size, refusing what an MPI run cannot do.
fn check_options(opts: &NtkOptions) -> Result<usize> {
    let tile = opts.tile.ok_or_else(|| {
        Error::invalid(
            "--tile",
            "under an MPI launcher the kernel is computed in tiles: give --tile N",
        )
    })?;
    if opts.work != Work::All {
        return Err(Error::invalid(
            "--shard",
            "under an MPI launcher the ranks share the work; drop --shard and --assemble",
        ));
    }
    Ok(tile)
}

/// The environment variable that sets the values per message of the ring exchange.
pub const CHUNK_VAR: &str = "TAILSCOPE_MPI_CHUNK";

/// Values per message of the ring exchange: [`CHUNK`], or `TAILSCOPE_MPI_CHUNK` (1 to 2³¹ − 1,
/// MPI's counts being 32-bit; the tests set it small so that small runs cross message
/// boundaries).
pub fn chunk_size() -> Result<usize> {
    match std::env::var(CHUNK_VAR) {
        Err(_) => Ok(CHUNK),
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&c| (1..=i32::MAX as usize).contains(&c))
            .ok_or_else(|| {
                Error::invalid(
                    CHUNK_VAR,
                    format!("expected values per MPI message from 1 to 2147483647, got `{v}`"),
                )
            }),
    }
}

/// One rank checks (or resets) the manifest before any rank writes; then every rank has the
/// folders.
fn prepare(
    job: &Job,
    opts: &NtkOptions,
    tile: usize,
    dir: &Path,
    rank: usize,
    world: &SimpleCommunicator,
) -> Result<()> {
    stream::check(&job.opts, tile)?;
    if rank == 0 {
        let _lock = crate::lock::OutputLock::acquire(dir, "tailscope ntk (MPI rank 0)")?;
        crate::lock::clear_stale(dir, pipeline::SHARE_LOCK);
        pipeline::prepare_stream(job, opts, tile, dir)?;
    }
    world.barrier();
    for sub in ["shards", "tiles"] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    Ok(())
}

/// Phase 1: this rank's shards `mine`, captured (or found) and read back as one process reads
/// them, on the CPU (shards travel the ring as MPI buffers).
fn own_shards(
    job: &Job,
    tile: usize,
    mine: &[usize],
    dir: &Path,
    device: Device,
    rep: &mut RankReport,
    progress: &dyn Progress,
) -> Result<Vec<(usize, Captured)>> {
    let t0 = Instant::now();
    let seqs = job.seqs();
    let names: Vec<String> = job.params.iter().map(|(n, _)| n.clone()).collect();
    progress.start(
        &format!("rank {}: shards", rep.rank),
        Some(mine.len() as u64),
    );
    let mut own = Vec::with_capacity(mine.len());
    for (k, &s) in mine.iter().enumerate() {
        let path = stream::shard_path(dir, s);
        if path.exists() {
            rep.shards_reused += 1;
        } else {
            let range = (s * tile, ((s + 1) * tile).min(seqs.len()));
            let (model, params) = (&job.model, &job.params);
            stream::write_shard(model, params, &seqs, range, &job.opts, device, &path)?;
            rep.shards_captured += 1;
        }
        let c = stream::load_shard(&path, &names, Device::Cpu)?;
        rep.samples += c.n;
        own.push((s, c));
        progress.advance_to(k as u64 + 1);
    }
    progress.finish();
    rep.capture_seconds = t0.elapsed().as_secs_f64();
    Ok(own)
}

/// What the ring exchange of phase 2 needs.
struct Ring<'a> {
    world: &'a SimpleCommunicator,
    names: &'a [String],
    /// Values per message.
    chunk: usize,
    dir: &'a Path,
    blocks: super::BlockBy,
}

impl Ring<'_> {
    /// Phase 2: at step k this rank holds the shards of rank r − k and computes the tiles (a, b),
    /// a ≤ b, a its own, then passes the visiting shards on.
    fn compute_tiles(
        &self,
        own: Vec<(usize, Captured)>,
        rep: &mut RankReport,
        progress: &dyn Progress,
    ) -> Result<()> {
        let (rank, size) = (rep.rank, self.world.size() as usize);
        let next = self.world.process_at_rank(((rank + 1) % size) as i32);
        let prev = self
            .world
            .process_at_rank(((rank + size - 1) % size) as i32);
        let mut visiting: Option<Vec<(usize, Captured)>> = None;
        progress.start(&format!("rank {rank}: tiles"), Some(size as u64));
        for step in 0..size {
            let t1 = Instant::now();
            self.tiles_with(&own, visiting.as_deref().unwrap_or(&own), rep)?;
            rep.tile_seconds += t1.elapsed().as_secs_f64();
            if step + 1 < size {
                let t2 = Instant::now();
                let guest = visiting.as_deref().unwrap_or(&own);
                let (received, sent) = self.pass_on(guest, &next, &prev)?;
                rep.bytes_sent += sent;
                visiting = Some(received);
                rep.exchange_seconds += t2.elapsed().as_secs_f64();
            }
            progress.advance_to(step as u64 + 1);
        }
        progress.finish();
        Ok(())
    }

    /// The tiles (a, b), a ≤ b, of `own` rows and `guest` columns not yet on disk.
    fn tiles_with(
        &self,
        own: &[(usize, Captured)],
        guest: &[(usize, Captured)],
        rep: &mut RankReport,
    ) -> Result<()> {
        for (a, xa) in own {
            for (b, xb) in guest.iter().filter(|(b, _)| a <= b) {
                if stream::tile_path(self.dir, *a, *b).exists() {
                    rep.tiles_reused += 1;
                    continue;
                }
                let xb = (a != b).then_some((*b, xb));
                stream::write_tile(self.dir, self.blocks, (*a, xa), xb)?;
                rep.tiles_computed += 1;
            }
        }
        Ok(())
    }

    /// Send `shards` to `next` and receive the shards `prev` sends; what was received and how
    /// many bytes were sent. The header's length crosses first, then the header, from which
    /// the receiver knows how many values (and so messages) follow.
    fn pass_on(
        &self,
        shards: &[(usize, Captured)],
        next: &impl Destination,
        prev: &impl Source,
    ) -> Result<(Vec<(usize, Captured)>, u64)> {
        let mine = pack(shards)?;
        let mut len = [0u64; 1];
        let header_len = [mine.header.len() as u64];
        mpi::point_to_point::send_receive_into(&header_len[..], next, &mut len[..], prev);
        let c = self.chunk;
        let header = exchange(&mine.header, len[0] as usize, c, next, prev);
        let (wide, narrow) = data_len(&header, self.names.len())?;
        let theirs = Packed {
            wide: exchange(&mine.wide, wide, c, next, prev),
            narrow: exchange(&mine.narrow, narrow, c, next, prev),
            header,
        };
        let sent = 8 * (1 + mine.header.len() + mine.wide.len()) + 4 * mine.narrow.len();
        Ok((unpack(&theirs, self.names)?, sent as u64))
    }
}

/// Every rank's report, on every rank.
fn gather_reports(world: &SimpleCommunicator, rep: &RankReport) -> Vec<RankReport> {
    let counts = rep.to_vec();
    let mut all = vec![0.0; RankReport::FIELDS * world.size() as usize];
    world.all_gather_into(&counts[..], &mut all[..]);
    all.chunks(RankReport::FIELDS)
        .map(RankReport::from_slice)
        .collect()
}

/// Rank 0 checks that every tile is there and writes the index; up to `--assemble-max` samples
/// it assembles the kernel and finishes as one process would. Above it, the ranks keep their
/// rows of the kernel and compute GC, alignment and intervals together, never holding the
/// whole kernel. Rank 0's outputs (`None` on the others).
#[allow(clippy::too_many_arguments)]
fn finish(
    job: &Job,
    opts: &NtkOptions,
    tile: usize,
    mine: &[usize],
    device: Device,
    dir: &Path,
    world: &SimpleCommunicator,
    progress: &dyn Progress,
) -> Result<Option<NtkOutput>> {
    let rank = world.rank();
    let n = job.seqs().len();
    let assemble = n <= opts.assemble_max;
    let output = match (rank, assemble) {
        (0, true) => {
            let finish = NtkOptions {
                work: Work::AssembleOnly,
                fresh: false,
                ..opts.clone()
            };
            Some(pipeline::compute_into(job, &finish, device, dir, progress)?)
        }
        (0, false) => {
            let rep = pipeline::index_tiles(job, opts, tile, dir, device)?;
            Some(NtkOutput::streamed_only(None, Some(rep)))
        }
        _ => None,
    };
    world.barrier();
    if assemble {
        return Ok(output);
    }
    let blocks = RowBlocks::from_tiles(world, dir, tile, n, mine, job)?;
    let silent = crate::progress::Silent;
    let p: &dyn Progress = if rank == 0 { progress } else { &silent };
    let names = blocks.block_names.clone();
    let mut out = pipeline::from_op(job, &blocks, names, opts, device, p)?;
    if rank != 0 {
        return Ok(None);
    }
    out.stream = output.and_then(|o| o.stream);
    out.write(dir)?;
    Ok(Some(out))
}

/// `ntk.json` with the whole run's time, and `ranks.json` (rank 0).
fn write_run_files(
    out: &mut NtkOutput,
    reports: &[RankReport],
    started: Instant,
    dir: &Path,
) -> Result<()> {
    if let Some(s) = &mut out.summary {
        s.seconds = started.elapsed().as_secs_f64();
        let json = serde_json::to_string_pretty(s)
            .map_err(|e| Error::invalid("ntk summary", e.to_string()))?;
        crate::io::write_atomic(dir.join("ntk.json"), json.as_bytes())?;
    }
    let json = serde_json::to_string_pretty(reports)
        .map_err(|e| Error::invalid("ranks.json", e.to_string()))?;
    crate::io::write_atomic(dir.join("ranks.json"), json.as_bytes())
}

/// One rank's rows of the kernel, Θ[rows, :] in float64, read from the tiles; the other rows are
/// on the other ranks. Every [`KernelOp`] call is collective: each rank fills the entries of its
/// own rows in a full-size buffer of zeros and one all-reduce sums them (each entry has one
/// owner, so the sum is exact and the same on every rank). No sub-kernel is given out
/// ([`KernelOp::sub`] is `None`): GC works through products, several vectors per all-reduce.
pub struct RowBlocks<'a> {
    world: &'a SimpleCommunicator,
    n: usize,
    /// Sample index of each local row.
    rows: Vec<usize>,
    block: Tensor,
    /// Θ_ii of every sample (gathered once).
    diag: Tensor,
    /// The kernel's block names (`tiles/*` keys without `block.`).
    pub block_names: Vec<String>,
}

impl<'a> RowBlocks<'a> {
    /// The rows of `shards` (this rank's, `tile` samples each, n in all) from the tiles under
    /// `dir`; refuses non-finite entries, naming the first pair. Collective (the diagonal is
    /// gathered by an all-reduce).
    fn from_tiles(
        world: &'a SimpleCommunicator,
        dir: &Path,
        tile: usize,
        n: usize,
        shards: &[usize],
        job: &Job,
    ) -> Result<RowBlocks<'a>> {
        let n_shards = n.div_ceil(tile);
        let mut rows = Vec::new();
        let mut parts = Vec::with_capacity(shards.len());
        let mut block_names = Vec::new();
        for &a in shards {
            rows.extend(a * tile..((a + 1) * tile).min(n));
            let mut cols = Vec::with_capacity(n_shards);
            for b in 0..n_shards {
                let (total, names) = super::tiles::read_total(dir, a.min(b), a.max(b))?;
                if block_names.is_empty() {
                    block_names = names;
                }
                cols.push(if a <= b {
                    total
                } else {
                    total.tr().contiguous()
                });
            }
            parts.push(Tensor::cat(&cols, 1));
        }
        let block = if parts.is_empty() {
            Tensor::zeros([0, n as i64], (Kind::Double, Device::Cpu))
        } else {
            Tensor::cat(&parts, 0)
        };
        let ids = job.samples();
        super::tiles::refuse_non_finite(&block, |i, j| {
            (ids[rows[i]].id.clone(), ids[j].id.clone())
        })?;
        let mut me = RowBlocks {
            world,
            n,
            rows,
            block,
            diag: Tensor::zeros([n as i64], (Kind::Double, Device::Cpu)),
            block_names,
        };
        me.diag = me.gather_diag()?;
        Ok(me)
    }

    /// Θ_ii of every sample: each rank's own, summed over ranks.
    fn gather_diag(&self) -> Result<Tensor> {
        let d = Tensor::zeros([self.n as i64], (Kind::Double, Device::Cpu));
        if self.rows.is_empty() {
            return self.all_sum(&d);
        }
        let rows = self.row_index();
        let mine = self
            .block
            .gather(1, &rows.unsqueeze(1), false)
            .squeeze_dim(1);
        self.all_sum(&d.index_copy(0, &rows, &mine))
    }

    /// The sum over ranks of `t` (float64), as a tensor of `t`'s shape.
    fn all_sum(&self, t: &Tensor) -> Result<Tensor> {
        sum_with(t, &|mine, sum| {
            self.world
                .all_reduce_into(mine, sum, SystemOperation::sum())
        })
    }

    fn row_index(&self) -> Tensor {
        op::index(&self.rows)
    }
}

/// `t` (float64) reduced by `reduce(mine, sum)` over its values, as a tensor of `t`'s shape;
/// an error, not a vector of the wrong length, where `t` cannot be read as float64 values.
fn sum_with(t: &Tensor, reduce: &dyn Fn(&[f64], &mut [f64])) -> Result<Tensor> {
    let mine: Vec<f64> = Vec::try_from(&t.f_flatten(0, -1)?)?;
    let mut sum = vec![0.0; mine.len()];
    reduce(&mine[..], &mut sum[..]);
    Ok(Tensor::from_slice(&sum).f_view(t.size().as_slice())?)
}

impl KernelOp for RowBlocks<'_> {
    fn n(&self) -> usize {
        self.n
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        // Θ X on this rank's rows, and this rank's rows' share of Θᵀ X, summed in one
        // all-reduce.
        let rows = self.row_index();
        let mut y = self.block.tr().f_mm(&x.f_index_select(0, &rows)?)?;
        if !self.rows.is_empty() {
            y = y.f_index_add(0, &rows, &self.block.f_mm(x)?)?;
        }
        Ok(self.all_sum(&y)? / 2.0)
    }

    fn diag(&self) -> Result<Tensor> {
        Ok(self.diag.shallow_clone())
    }

    fn abs_cosine_sum(&self) -> Result<f64> {
        let s = op::inverse_norms(&self.diag);
        let mine = if self.rows.is_empty() {
            0.0
        } else {
            let sr = s.index_select(0, &self.row_index());
            (self.block.abs() * sr.outer(&s))
                .sum(Kind::Double)
                .double_value(&[])
        };
        let mut sum = 0.0;
        self.world
            .all_reduce_into(&mine, &mut sum, SystemOperation::sum());
        Ok(sum)
    }
}

/// Values per message by default: MPI counts are 32-bit.
const CHUNK: usize = 1 << 26;

/// Values of a set of shards as they cross: float64 gradients as f64, the others (float32, and
/// half precision widened exactly) as f32.
#[derive(Debug, Default, PartialEq)]
struct Packed {
    /// [shards, tensors, then per shard: index, rows, then per tensor: kind, width].
    header: Vec<u64>,
    wide: Vec<f64>,
    narrow: Vec<f32>,
}

/// The messages a payload of `len` values crosses in, `chunk` values each: ⌈len / chunk⌉.
/// Both ends of a link count from the same `len` (the sender its data's length, the receiver
/// the length it learnt from the header), so every message sent is received in the same
/// exchange, whatever the link in the other direction carries.
fn messages(len: usize, chunk: usize) -> usize {
    len.div_ceil(chunk.max(1))
}

/// Send `data` to `next` while receiving `len` values from `prev`, in messages of at most
/// `chunk` values: [`messages`] to `next` and from `prev`, paired while both have one.
fn exchange<T>(
    data: &[T],
    len: usize,
    chunk: usize,
    next: &impl Destination,
    prev: &impl Source,
) -> Vec<T>
where
    T: mpi::datatype::Equivalence + Default + Clone,
{
    let mut got = vec![T::default(); len];
    let (out, inn) = (messages(data.len(), chunk), messages(len, chunk));
    let piece = |c: usize, of: usize| ((c * chunk).min(of), ((c + 1) * chunk).min(of));
    for c in 0..out.max(inn) {
        let (slo, shi) = piece(c, data.len());
        let (rlo, rhi) = piece(c, len);
        if c < out && c < inn {
            mpi::point_to_point::send_receive_into(&data[slo..shi], next, &mut got[rlo..rhi], prev);
        } else if c < out {
            next.send(&data[slo..shi]);
        } else {
            prev.receive_into(&mut got[rlo..rhi]);
        }
    }
    got
}

/// Kind codes of the header.
const KINDS: [Kind; 4] = [Kind::Double, Kind::Float, Kind::Half, Kind::BFloat16];

/// The shards' header and values.
fn pack(shards: &[(usize, Captured)]) -> Result<Packed> {
    let tensors = shards.first().map_or(0, |(_, c)| c.jac.len());
    let mut p = Packed {
        header: vec![shards.len() as u64, tensors as u64],
        ..Packed::default()
    };
    for (s, c) in shards {
        p.header.extend([*s as u64, c.n as u64]);
        for j in &c.jac {
            let j = j
                .as_ref()
                .ok_or_else(|| Error::invalid("--tile", "a shard without per-sample gradients"))?;
            let kind = KINDS.iter().position(|&k| k == j.kind()).ok_or_else(|| {
                Error::invalid(
                    "--tile",
                    format!("gradients of kind {:?} cannot be exchanged", j.kind()),
                )
            })?;
            let width = j.numel().checked_div(c.n).unwrap_or(0);
            p.header.extend([kind as u64, width as u64]);
            if kind == 0 {
                p.wide.extend(Vec::<f64>::try_from(j.flatten(0, -1))?);
            } else {
                p.narrow
                    .extend(Vec::<f32>::try_from(j.to_kind(Kind::Float).flatten(0, -1))?);
            }
        }
    }
    Ok(p)
}

/// Numbers of f64 and f32 values the data of `header` holds.
fn data_len(header: &[u64], names: usize) -> Result<(usize, usize)> {
    let bad = || Error::invalid("mpi", "a malformed shard header arrived from another rank");
    let shards = *header.first().ok_or_else(bad)? as usize;
    let tensors = *header.get(1).ok_or_else(bad)? as usize;
    if shards > 0 && tensors != names {
        return Err(bad());
    }
    let (mut wide, mut narrow) = (0, 0);
    let mut at = 2;
    for _ in 0..shards {
        let rows = *header.get(at + 1).ok_or_else(bad)? as usize;
        at += 2;
        for _ in 0..tensors {
            let kind = *header.get(at).ok_or_else(bad)? as usize;
            let n = rows * *header.get(at + 1).ok_or_else(bad)? as usize;
            match kind {
                0 => wide += n,
                k if k < KINDS.len() => narrow += n,
                _ => return Err(bad()),
            }
            at += 2;
        }
    }
    Ok((wide, narrow))
}

/// The shards a packed set describes, in the kinds they were captured in (checked by
/// [`data_len`] first).
fn unpack(p: &Packed, names: &[String]) -> Result<Vec<(usize, Captured)>> {
    data_len(&p.header, names.len())?;
    let (shards, tensors) = (p.header[0] as usize, p.header[1] as usize);
    let mut out = Vec::with_capacity(shards);
    let (mut at, mut wide, mut narrow) = (2, 0, 0);
    for _ in 0..shards {
        let (s, rows) = (p.header[at] as usize, p.header[at + 1] as usize);
        at += 2;
        let mut jac = Vec::with_capacity(tensors);
        for _ in 0..tensors {
            let kind = KINDS[p.header[at] as usize];
            let width = p.header[at + 1] as usize;
            at += 2;
            let n = rows * width;
            let t = if kind == Kind::Double {
                wide += n;
                Tensor::from_slice(&p.wide[wide - n..wide])
            } else {
                narrow += n;
                Tensor::from_slice(&p.narrow[narrow - n..narrow]).to_kind(kind)
            };
            jac.push(Some(t.view([rows as i64, width as i64])));
        }
        out.push((
            s,
            Captured {
                names: names.to_vec(),
                ghost: names.iter().map(|_| None).collect(),
                jac,
                n: rows,
                norms_only: false,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ranks' sum keeps the tensor's shape; a tensor that cannot be read as values is an
    /// error, not an empty vector that the reduction would turn into a tensor of no values.
    #[test]
    fn sums_keep_the_shape_and_refuse_what_cannot_be_read() {
        let t = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0, 6.0]).view([2, 3]);
        let double = |mine: &[f64], sum: &mut [f64]| {
            for (o, i) in sum.iter_mut().zip(mine) {
                *o = 2.0 * i;
            }
        };
        let s = sum_with(&t, &double).unwrap();
        assert_eq!(s.size(), [2, 3]);
        assert!(s.equal(&(&t * 2.0)));
        assert!(sum_with(&Tensor::new(), &double).is_err());
    }

    /// Both ends count a payload's messages from its length: none for an empty payload, one
    /// for up to a chunk, one more per chunk begun.
    #[test]
    fn messages_cover_the_payload() {
        assert_eq!(messages(0, 1000), 0);
        assert_eq!(messages(1000, 1000), 1);
        assert_eq!(messages(1001, 1000), 2);
        assert_eq!(messages(5, 1), 5);
    }

    #[test]
    fn shards_cross_as_they_were() {
        let names = vec!["a".to_string(), "b".to_string()];
        let shard = |s: usize, rows: i64| {
            (
                s,
                Captured {
                    names: names.clone(),
                    ghost: vec![None, None],
                    jac: vec![
                        Some(Tensor::randn([rows, 3], (Kind::Double, Device::Cpu))),
                        Some(Tensor::randn([rows, 5], (Kind::Float, Device::Cpu))),
                    ],
                    n: rows as usize,
                    norms_only: false,
                },
            )
        };
        let shards = vec![shard(2, 4), shard(5, 1)];
        let p = pack(&shards).unwrap();
        assert_eq!(
            data_len(&p.header, 2).unwrap(),
            (p.wide.len(), p.narrow.len())
        );
        assert_eq!((p.wide.len(), p.narrow.len()), (5 * 3, 5 * 5));
        let back = unpack(&p, &names).unwrap();
        for ((s, c), (t, e)) in shards.iter().zip(&back) {
            assert_eq!((s, c.n), (t, e.n));
            for (x, y) in c.jac.iter().zip(&e.jac) {
                let (x, y) = (x.as_ref().unwrap(), y.as_ref().unwrap());
                assert_eq!(x.kind(), y.kind());
                assert!(x.equal(y));
            }
        }
        assert!(data_len(&p.header, 3).is_err());
        assert!(data_len(&p.header[..3], 2).is_err());
    }
}

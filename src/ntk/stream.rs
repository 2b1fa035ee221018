//! Kernels for sample sets that do not fit in memory, streamed to disk and resumable.
//!
//! Phase 1 captures per-sample gradients in shards of `tile` samples, each written atomically to
//! `shards/grads-NNNNN.safetensors`; phase 2 computes the kernel tile by tile (shard a × shard b,
//! a ≤ b; Θ is symmetric) into `tiles/tile-AAAAA-BBBBB.safetensors` (`total` and `block.<group>`).
//! A file that exists is complete (atomic renames), so an interrupted run skips what is done and
//! resumes where it stopped. `tiles.parquet` indexes the tiles by sample range.
//!
//! Several processes can share the work in one folder ([`Work::Share`], `--shard I/N`, e.g. the
//! tasks of a Slurm job array): share I of N captures the shards s with s mod N = I and computes
//! the tiles t (numbered row by row over a ≤ b) with t mod N = I. A tile whose shard belongs to a
//! share that has not written it yet waits for it, then captures it itself (atomic writes make a
//! shard written twice harmless). [`Work::AssembleOnly`] computes nothing and names the missing
//! tiles and the shares that own them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use polars::prelude::{Column, DataFrame};
use tch::{Device, Tensor};

use crate::capture::{CaptureOptions, Captured, Method};
use crate::error::{Error, Result};
use crate::io::{read_tensors, write_tensors};
use crate::model::Model;
use crate::ntk::{kernel, BlockBy};

/// Where a streamed kernel lives and how it is cut.
pub struct StreamPlan<'a> {
    /// The output folder (shards/, tiles/, tiles.parquet).
    pub dir: &'a Path,
    /// Samples per shard and tile side.
    pub tile: usize,
    /// How tiles are split into blocks.
    pub blocks: BlockBy,
    /// Which shards and tiles this process computes.
    pub work: Work,
}

/// Share `index` of `count` (0-based) of a streamed kernel's shards and tiles; `I/N` on the
/// command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// This share, 0 ≤ index < count.
    pub index: usize,
    /// Shares in all.
    pub count: usize,
}

impl Share {
    /// Share `index` of `count`; refused unless 0 ≤ index < count.
    pub fn new(index: usize, count: usize) -> Result<Share> {
        if count == 0 || index >= count {
            return Err(Error::invalid(
                "--shard",
                format!("expected I/N with 0 ≤ I < N, got {index}/{count}"),
            ));
        }
        Ok(Share { index, count })
    }

    /// Whether the `k`-th shard (or tile) is this share's.
    pub fn owns(&self, k: usize) -> bool {
        k % self.count == self.index
    }

    /// The share that owns the `k`-th shard (or tile).
    pub fn owner(k: usize, count: usize) -> Share {
        Share {
            index: k % count,
            count,
        }
    }
}

impl fmt::Display for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Share {
    type Err = Error;

    fn from_str(s: &str) -> Result<Share> {
        let bad = || {
            Error::invalid(
                "--shard",
                format!("expected I/N (share I of N, 0-based, e.g. 0/4), got `{s}`"),
            )
        };
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let i = i.trim().parse().map_err(|_| bad())?;
        let n = n.trim().parse().map_err(|_| bad())?;
        Share::new(i, n)
    }
}

/// Which part of a streamed kernel a process computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Work {
    /// Every shard and tile, then the tile index (one process).
    #[default]
    All,
    /// One share's shards and tiles; a shard of another share that a tile needs is waited for
    /// up to `wait`, then captured here. No tile index (the assembling run writes it).
    Share {
        /// Which share.
        share: Share,
        /// How long to wait for another share's shard.
        wait: Duration,
    },
    /// Nothing is computed: every tile must be on disk (the shares are done); writes the index.
    AssembleOnly,
}

/// One row of `tiles.parquet`: tile indices, sample ranges (end exclusive) and file.
struct TileRow {
    tile: [u64; 2],
    rows: [u64; 2],
    cols: [u64; 2],
    file: String,
}

/// What a streamed run did (for a share: of its own shards and tiles).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamReport {
    /// Shards in all.
    pub shards: usize,
    /// Shards found complete on disk.
    pub shards_reused: usize,
    /// Tiles in all.
    pub tiles: usize,
    /// Tiles found complete on disk.
    pub tiles_reused: usize,
    /// Shards of other shares captured here because they did not appear in time.
    pub shards_taken_over: usize,
}

pub(crate) fn shard_path(dir: &Path, i: usize) -> PathBuf {
    dir.join("shards").join(format!("grads-{i:05}.safetensors"))
}

pub(crate) fn tile_path(dir: &Path, a: usize, b: usize) -> PathBuf {
    dir.join("tiles")
        .join(format!("tile-{a:05}-{b:05}.safetensors"))
}

/// A shard's per-sample gradients, read onto `device` (the tiles' GEMMs run there).
pub(crate) fn load_shard(path: &Path, names: &[String], device: Device) -> Result<Captured> {
    let t = read_tensors(path)?;
    let mut jac = Vec::with_capacity(names.len());
    for n in names {
        let j = t.get(n).ok_or_else(|| {
            Error::in_file(
                path,
                format!("missing tensor `{n}`; remove the shard to recompute it"),
            )
        })?;
        jac.push(Some(j.to_device(device)));
    }
    let n = jac
        .first()
        .and_then(|j| j.as_ref())
        .map_or(0, |j| j.size()[0] as usize);
    Ok(Captured {
        names: names.to_vec(),
        jac,
        ghost: names.iter().map(|_| None).collect(),
        n,
        norms_only: false,
    })
}

/// The tiles (a, b), a ≤ b, of `n_shards` shards, in their numbering (row by row).
fn tile_list(n_shards: usize) -> Vec<(usize, usize)> {
    (0..n_shards)
        .flat_map(|a| (a..n_shards).map(move |b| (a, b)))
        .collect()
}

/// Stream the kernel of `seqs` to `plan.dir`; `on_step(done, total)` reports progress over
/// this process's shards then tiles.
pub fn stream_kernel(
    model: &Model,
    params: &[(String, Tensor)],
    seqs: &[&[u32]],
    opts: &CaptureOptions,
    plan: &StreamPlan,
    device: Device,
    on_step: &dyn Fn(usize, usize),
) -> Result<StreamReport> {
    check(opts, plan.tile)?;
    let n_shards = seqs.len().div_ceil(plan.tile);
    let tiles = tile_list(n_shards);
    if plan.work == Work::AssembleOnly {
        return index_complete(plan, seqs.len(), &tiles);
    }
    let share = match plan.work {
        Work::Share { share, .. } => share,
        _ => Share::new(0, 1)?,
    };
    let mine: Vec<usize> = (0..n_shards).filter(|&s| share.owns(s)).collect();
    let my_tiles: Vec<(usize, usize)> = (0..tiles.len())
        .filter(|&t| share.owns(t))
        .map(|t| tiles[t])
        .collect();
    let mut report = StreamReport {
        shards: mine.len(),
        shards_reused: 0,
        tiles: my_tiles.len(),
        tiles_reused: 0,
        shards_taken_over: 0,
    };
    let work = ShareWork {
        model,
        params,
        seqs,
        opts,
        plan,
        device,
        share,
        total: mine.len() + my_tiles.len(),
        on_step,
    };
    work.shards(&mine, &mut report)?;
    work.tiles(&my_tiles, mine.len(), &mut report)?;
    if plan.work == Work::All {
        index_complete(plan, seqs.len(), &tiles)?;
    }
    Ok(report)
}

/// One process's share of a streamed kernel: what it captures and computes, and how.
struct ShareWork<'a> {
    model: &'a Model,
    params: &'a [(String, Tensor)],
    seqs: &'a [&'a [u32]],
    opts: &'a CaptureOptions,
    plan: &'a StreamPlan<'a>,
    device: Device,
    share: Share,
    /// This process's shards and tiles, for progress.
    total: usize,
    on_step: &'a dyn Fn(usize, usize),
}

impl ShareWork<'_> {
    /// Capture shard `s` and write it.
    fn capture(&self, s: usize) -> Result<()> {
        let start = s * self.plan.tile;
        let end = (start + self.plan.tile).min(self.seqs.len());
        let path = shard_path(self.plan.dir, s);
        let (model, params, opts) = (self.model, self.params, self.opts);
        write_shard(
            model,
            params,
            self.seqs,
            (start, end),
            opts,
            self.device,
            &path,
        )
    }

    /// Phase 1: this share's shards, those on disk reused.
    fn shards(&self, mine: &[usize], report: &mut StreamReport) -> Result<()> {
        for (k, &s) in mine.iter().enumerate() {
            if shard_path(self.plan.dir, s).exists() {
                report.shards_reused += 1;
            } else {
                self.capture(s)?;
            }
            (self.on_step)(k + 1, self.total);
        }
        Ok(())
    }

    /// Phase 2: this share's tiles, those whose shards are there first; the rest wait for (or
    /// take over) the missing shards. `done` steps are behind.
    fn tiles(
        &self,
        my_tiles: &[(usize, usize)],
        mut done: usize,
        report: &mut StreamReport,
    ) -> Result<()> {
        let dir = self.plan.dir;
        let names: Vec<String> = self.params.iter().map(|(n, _)| n.clone()).collect();
        let have =
            |&&(a, b): &&(usize, usize)| shard_path(dir, a).exists() && shard_path(dir, b).exists();
        let (ready, pending): (Vec<_>, Vec<_>) = my_tiles.iter().partition(have);
        let mut rows = TileCache::default();
        for &(a, b) in ready.into_iter().chain(pending) {
            for s in [a, b] {
                self.await_shard(s, report)?;
            }
            if tile_path(dir, a, b).exists() {
                report.tiles_reused += 1;
            } else {
                let xa = rows.get(dir, a, &names, self.device)?;
                let xb = if a == b {
                    None
                } else {
                    Some(load_shard(&shard_path(dir, b), &names, self.device)?)
                };
                write_tile(dir, self.plan.blocks, (a, xa), xb.as_ref().map(|x| (b, x)))?;
            }
            done += 1;
            (self.on_step)(done, self.total);
        }
        Ok(())
    }

    /// Shard `s` on disk: there, written by its share within the wait, or captured here.
    fn await_shard(&self, s: usize, report: &mut StreamReport) -> Result<()> {
        let path = shard_path(self.plan.dir, s);
        let wait = match self.plan.work {
            Work::Share { wait, .. } => wait,
            _ => Duration::ZERO,
        };
        if path.exists() || wait_for(&path, wait) {
            return Ok(());
        }
        tracing::warn!(
            "shard {s} (share {}) is not in {} after {:.0} s; capturing it here",
            Share::owner(s, self.share.count),
            self.plan.dir.display(),
            wait.as_secs_f64()
        );
        self.capture(s)?;
        report.shards_taken_over += 1;
        Ok(())
    }
}

/// Refuse what a streamed kernel cannot do: ghost kernels (no per-sample gradients to store)
/// and tiles of 0 samples.
pub(crate) fn check(opts: &CaptureOptions, tile: usize) -> Result<()> {
    if matches!(opts.method, Method::Ghost | Method::Auto) {
        return Err(Error::invalid(
            "--tile",
            "streamed kernels store per-sample gradients; use --method batched or exact",
        ));
    }
    if tile == 0 {
        return Err(Error::invalid("--tile", "must be at least 1"));
    }
    Ok(())
}

/// Compute and write tile (a, b) from the gradients of shard a and of shard b (`None`: the
/// diagonal tile a = b).
pub(crate) fn write_tile(
    dir: &Path,
    blocks: BlockBy,
    (a, xa): (usize, &Captured),
    xb: Option<(usize, &Captured)>,
) -> Result<()> {
    let b = xb.map_or(a, |x| x.0);
    let k = kernel(xa, xb.map(|x| x.1), blocks, false)?;
    write_tensors(&k.named(), &tile_path(dir, a, b))
}

/// Wait up to `wait` for `path` to appear (another process writes it); whether it did.
fn wait_for(path: &Path, wait: Duration) -> bool {
    let until = Instant::now() + wait;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200).min(wait));
        if path.exists() {
            return true;
        }
    }
    path.exists()
}

/// The last row shard loaded: tiles come row by row, so row a's shard is read once per row.
#[derive(Default)]
struct TileCache {
    row: Option<(usize, Captured)>,
}

impl TileCache {
    fn get(&mut self, dir: &Path, a: usize, names: &[String], device: Device) -> Result<&Captured> {
        if !matches!(&self.row, Some((r, _)) if *r == a) {
            // The old row's tensors go before the new row's are read.
            self.row = None;
            self.row = Some((a, load_shard(&shard_path(dir, a), names, device)?));
        }
        self.row
            .as_ref()
            .map(|(_, c)| c)
            .ok_or_else(|| Error::invalid("--tile", format!("shard {a} could not be loaded")))
    }
}

/// Check that every tile is on disk and write `tiles.parquet`; the report of a run that computed
/// nothing. A missing tile is named by its file and its number t in row order (share t mod N
/// of `--shard I/N` computes it, whatever N the shares ran with).
fn index_complete(plan: &StreamPlan, n: usize, tiles: &[(usize, usize)]) -> Result<StreamReport> {
    let missing: Vec<usize> = (0..tiles.len())
        .filter(|&t| !tile_path(plan.dir, tiles[t].0, tiles[t].1).exists())
        .collect();
    if let Some(&first) = missing.first() {
        let (a, b) = tiles[first];
        return Err(Error::in_file(
            plan.dir,
            format!(
                "{} of {} tiles are missing, the first tiles/tile-{a:05}-{b:05}.safetensors (tile t = \
                 {first} in row order, computed by share t mod N of --shard I/N); finish the \
                 shares, or drop --assemble to compute what is missing in this process",
                missing.len(),
                tiles.len()
            ),
        ));
    }
    let index: Vec<TileRow> = tiles
        .iter()
        .map(|&(a, b)| {
            let (ra, rb) = (a * plan.tile, b * plan.tile);
            TileRow {
                tile: [a as u64, b as u64],
                rows: [ra as u64, (ra + plan.tile).min(n) as u64],
                cols: [rb as u64, (rb + plan.tile).min(n) as u64],
                file: format!("tiles/tile-{a:05}-{b:05}.safetensors"),
            }
        })
        .collect();
    crate::io::write_parquet(&mut tile_index(&index)?, plan.dir.join("tiles.parquet"))?;
    let shards = n.div_ceil(plan.tile);
    Ok(StreamReport {
        shards,
        shards_reused: shards,
        tiles: tiles.len(),
        tiles_reused: tiles.len(),
        shards_taken_over: 0,
    })
}

/// Capture one shard (samples `start..end`) and write its per-sample gradients to `path`.
pub(crate) fn write_shard(
    model: &Model,
    params: &[(String, Tensor)],
    seqs: &[&[u32]],
    (start, end): (usize, usize),
    opts: &CaptureOptions,
    device: Device,
    path: &Path,
) -> Result<()> {
    // BERT masks are keyed by each sample's tokens: a shard captures what the whole set would.
    let c = capture_range(model, params, seqs, start, end, opts, device)?;
    let named: Vec<(String, Tensor)> = c
        .names
        .iter()
        .zip(&c.jac)
        .map(|(n, j)| {
            (
                n.clone(),
                j.as_ref()
                    .expect("batched capture gives Jacobians")
                    .to_device(Device::Cpu),
            )
        })
        .collect();
    write_tensors(&named, path)
}

/// `tiles.parquet`.
fn tile_index(index: &[TileRow]) -> Result<DataFrame> {
    let col = |f: fn(&TileRow) -> u64, name: &str| {
        Column::new(name.into(), index.iter().map(f).collect::<Vec<_>>())
    };
    DataFrame::new(
        index.len(),
        vec![
            col(|r| r.tile[0], "tile_row"),
            col(|r| r.tile[1], "tile_col"),
            col(|r| r.rows[0], "row_start"),
            col(|r| r.rows[1], "row_end"),
            col(|r| r.cols[0], "col_start"),
            col(|r| r.cols[1], "col_end"),
            Column::new(
                "file".into(),
                index.iter().map(|r| r.file.as_str()).collect::<Vec<_>>(),
            ),
        ],
    )
    .map_err(|e| Error::table("tile index", e))
}

/// Capture samples `start..end` of `seqs`.
fn capture_range(
    model: &Model,
    params: &[(String, Tensor)],
    seqs: &[&[u32]],
    start: usize,
    end: usize,
    opts: &CaptureOptions,
    device: Device,
) -> Result<Captured> {
    crate::capture::capture(model, params, &seqs[start..end], opts, device, &|_| {})
}

/// Assemble the full (n × n) kernel (total and blocks) from the tiles, mirroring the upper
/// triangle.
pub fn assemble(dir: &Path, n: usize, tile: usize) -> Result<Vec<(String, Tensor)>> {
    let n_shards = n.div_ceil(tile);
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for a in 0..n_shards {
        for b in a..n_shards {
            let path = tile_path(dir, a, b);
            let t = read_tensors(&path)?;
            let mut keys: Vec<&String> = t.keys().collect();
            keys.sort();
            for key in keys {
                let v = &t[key];
                let slot = match out.iter().position(|(k, _)| k == key) {
                    Some(i) => i,
                    None => {
                        out.push((
                            key.clone(),
                            Tensor::zeros([n as i64, n as i64], (tch::Kind::Double, Device::Cpu)),
                        ));
                        out.len() - 1
                    }
                };
                let (ra, rb) = ((a * tile) as i64, (b * tile) as i64);
                let (la, lb) = (v.size()[0], v.size()[1]);
                out[slot].1.narrow(0, ra, la).narrow(1, rb, lb).copy_(v);
                if a != b {
                    out[slot]
                        .1
                        .narrow(0, rb, lb)
                        .narrow(1, ra, la)
                        .copy_(&v.tr());
                }
            }
        }
    }
    out.sort_by(|x, y| (x.0 != "total", &x.0).cmp(&(y.0 != "total", &y.0)));
    Ok(out)
}

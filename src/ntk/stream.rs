//! Kernels for sample sets that do not fit in memory, streamed to disk and resumable.
//!
//! Phase 1 captures per-sample gradients in shards of `tile` samples, each written atomically to
//! `shards/grads-NNNNN.safetensors`; phase 2 computes the kernel tile by tile (shard a × shard b,
//! a ≤ b; Θ is symmetric) into `tiles/tile-AAAAA-BBBBB.safetensors` (`total` and `block.<group>`).
//! A file that exists is complete (atomic renames), so an interrupted run skips what is done and
//! resumes where it stopped. `tiles.parquet` indexes the tiles by sample range.

use std::path::{Path, PathBuf};

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
}

/// One row of `tiles.parquet`: tile indices, sample ranges (end exclusive) and file.
struct TileRow {
    tile: [u64; 2],
    rows: [u64; 2],
    cols: [u64; 2],
    file: String,
}

/// What a streamed run did.
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
}

fn shard_path(dir: &Path, i: usize) -> PathBuf {
    dir.join("shards").join(format!("grads-{i:05}.safetensors"))
}

fn tile_path(dir: &Path, a: usize, b: usize) -> PathBuf {
    dir.join("tiles")
        .join(format!("tile-{a:05}-{b:05}.safetensors"))
}

fn load_shard(path: &Path, names: &[String]) -> Result<Captured> {
    let t = read_tensors(path)?;
    let mut jac = Vec::with_capacity(names.len());
    for n in names {
        let j = t.get(n).ok_or_else(|| {
            Error::in_file(
                path,
                format!("missing tensor `{n}`; remove the shard to recompute it"),
            )
        })?;
        jac.push(Some(j.shallow_clone()));
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
    })
}

/// Stream the kernel of `seqs` to `plan.dir`; `on_step(done, total)` reports progress over
/// shards then tiles.
pub fn stream_kernel(
    model: &Model,
    params: &[(String, Tensor)],
    seqs: &[&[u32]],
    opts: &CaptureOptions,
    plan: &StreamPlan,
    device: Device,
    on_step: &dyn Fn(usize, usize),
) -> Result<StreamReport> {
    if matches!(opts.method, Method::Ghost | Method::Auto) {
        return Err(Error::invalid(
            "--tile",
            "streamed kernels store per-sample gradients; use --method batched or exact",
        ));
    }
    if plan.tile == 0 {
        return Err(Error::invalid("--tile", "must be at least 1"));
    }
    let n_shards = seqs.len().div_ceil(plan.tile);
    let n_tiles = n_shards * (n_shards + 1) / 2;
    let total = n_shards + n_tiles;
    let mut report = StreamReport {
        shards: n_shards,
        shards_reused: 0,
        tiles: n_tiles,
        tiles_reused: 0,
    };
    for s in 0..n_shards {
        let path = shard_path(plan.dir, s);
        if path.exists() {
            report.shards_reused += 1;
        } else {
            let start = s * plan.tile;
            let end = (start + plan.tile).min(seqs.len());
            write_shard(model, params, seqs, (start, end), opts, device, &path)?;
        }
        on_step(s + 1, total);
    }
    let names: Vec<String> = params.iter().map(|(n, _)| n.clone()).collect();
    let step = |done: usize| on_step(n_shards + done, total);
    let (index, reused) = write_tiles(&names, seqs.len(), n_shards, plan, &step)?;
    report.tiles_reused = reused;
    crate::io::write_parquet(&mut tile_index(&index)?, plan.dir.join("tiles.parquet"))?;
    Ok(report)
}

/// Capture one shard (samples `start..end`) and write its per-sample gradients to `path`.
fn write_shard(
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

/// Compute every missing tile (shard a × shard b, a ≤ b); the tile index and how many tiles
/// were already there. `on_tile(k)` after the k-th tile.
fn write_tiles(
    names: &[String],
    n: usize,
    n_shards: usize,
    plan: &StreamPlan,
    on_tile: &dyn Fn(usize),
) -> Result<(Vec<TileRow>, usize)> {
    let mut index: Vec<TileRow> = Vec::new();
    let mut reused = 0;
    for a in 0..n_shards {
        let xa = load_shard(&shard_path(plan.dir, a), names)?;
        for b in a..n_shards {
            let path = tile_path(plan.dir, a, b);
            if path.exists() {
                reused += 1;
            } else {
                let xb = if a == b {
                    None
                } else {
                    Some(load_shard(&shard_path(plan.dir, b), names)?)
                };
                let k = kernel(&xa, xb.as_ref(), plan.blocks, false)?;
                write_tensors(&k.named(), &path)?;
            }
            let (ra, rb) = (a * plan.tile, b * plan.tile);
            index.push(TileRow {
                tile: [a as u64, b as u64],
                rows: [ra as u64, (ra + plan.tile).min(n) as u64],
                cols: [rb as u64, (rb + plan.tile).min(n) as u64],
                file: format!(
                    "tiles/{}",
                    path.file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default()
                ),
            });
            on_tile(index.len());
        }
    }
    Ok((index, reused))
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

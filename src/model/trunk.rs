//! The frozen trunk's outputs, per text: the hidden states entering the first trained block,
//! computed once and reused by every training step, evaluation, probe and run that shares the
//! frozen blocks below it (runs upcycled from one base model, before and after training).
//!
//! A text is one encoded input row (its token ids as the model reads them, padding excluded);
//! its states are (len, d_model). Rows are computed in *chunks*: rows of one length, declared
//! together ([`TrunkCache::declare`]: sorted, at most [`CHUNK`] per chunk), run through the trunk
//! as one (rows, len) batch without padding. A row's states depend only on its chunk, never on
//! which batch asked first or on what was cached before, so a run resumed in a fresh process
//! (empty cache) computes the same bits; a row that was never declared is its own chunk. Chunks
//! are kept up to a memory budget; beyond it they are recomputed, identically, when asked again.
//!
//! What a cached state equals: the trunk's output on the padded batch that asked for it, up to
//! floating-point rounding (the causal mask keeps padding out of real positions; tested to 1e-5).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::{Forward, Model, Output};
use crate::error::{Error, Result};

/// Rows per chunk at most.
pub const CHUNK: usize = 32;

/// How much the cache did (for the saving it reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct TrunkStats {
    /// Rows whose states were computed (a row recomputed after eviction counts again).
    pub computed: u64,
    /// Chunk forward passes.
    pub chunks: u64,
    /// Seconds spent computing them.
    pub seconds: f64,
    /// Rows served from the cache.
    pub hits: u64,
    /// Bytes of states held.
    pub bytes: usize,
}

impl TrunkStats {
    /// Mean seconds per computed row.
    pub fn seconds_per_row(&self) -> f64 {
        self.seconds / self.computed.max(1) as f64
    }
}

/// Which frozen weights a row's states come from: the base model (its path) and the block the
/// states enter. Every model passed under one key must have the same blocks below `layer`.
type Owner = (PathBuf, usize);

#[derive(Default)]
struct Plan {
    /// Row → its chunk.
    chunk_of: HashMap<Vec<i64>, usize>,
    /// Chunk → its rows (one length).
    chunks: Vec<Vec<Vec<i64>>>,
    /// Cached states per row, (len, d).
    states: HashMap<Vec<i64>, Tensor>,
}

#[derive(Default)]
struct Inner {
    plans: HashMap<Owner, Plan>,
    stats: TrunkStats,
}

/// Per-text trunk states shared by the runs of a spec or a study (module docs).
pub struct TrunkCache {
    enabled: bool,
    budget: usize,
    inner: Mutex<Inner>,
}

impl Default for TrunkCache {
    fn default() -> Self {
        TrunkCache::new(TrunkCache::BUDGET)
    }
}

/// A cache and the frozen weights it serves: what callers pass around.
#[derive(Clone, Copy)]
pub struct Trunk<'a> {
    /// The cache.
    pub cache: &'a TrunkCache,
    /// The base model the frozen blocks come from.
    pub source: &'a Path,
    /// The first block that is not frozen.
    pub layer: usize,
}

impl TrunkCache {
    /// Bytes of states kept by default (4 GiB); further chunks are recomputed when asked again.
    pub const BUDGET: usize = 4 << 30;

    /// A cache keeping at most `budget` bytes of states.
    pub fn new(budget: usize) -> TrunkCache {
        TrunkCache {
            enabled: true,
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// A cache that is off: callers run the whole network instead (to measure the saving).
    pub fn disabled() -> TrunkCache {
        TrunkCache {
            enabled: false,
            budget: 0,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Whether callers should use it.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// What it did so far.
    pub fn stats(&self) -> TrunkStats {
        self.lock().stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Declare rows that will be asked for under (`source`, `layer`): the new ones (not
    /// declared before) are sorted and grouped into chunks of one length, at most [`CHUNK`] rows
    /// each. Declaring the same rows in the same order gives the same chunks in every process.
    pub fn declare(&self, source: &Path, layer: usize, rows: &[Vec<i64>]) {
        let mut g = self.lock();
        let plan = g.plans.entry((source.to_path_buf(), layer)).or_default();
        let mut fresh: Vec<&Vec<i64>> = rows
            .iter()
            .filter(|r| !plan.chunk_of.contains_key(*r))
            .collect();
        fresh.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
        fresh.dedup();
        for group in fresh.chunk_by(|a, b| a.len() == b.len()) {
            for chunk in group.chunks(CHUNK) {
                let id = plan.chunks.len();
                for r in chunk {
                    plan.chunk_of.insert((*r).clone(), id);
                }
                plan.chunks
                    .push(chunk.iter().map(|r| (*r).clone()).collect());
            }
        }
    }

    /// The states entering block `layer` of each row (each (len, d), on `device`), from the
    /// cache or computed by `model` chunk by chunk.
    pub fn rows(
        &self,
        source: &Path,
        layer: usize,
        model: &Model,
        rows: &[&[i64]],
        device: Device,
    ) -> Result<Vec<Tensor>> {
        let undeclared: Vec<Vec<i64>> = {
            let g = self.lock();
            let plan = g.plans.get(&(source.to_path_buf(), layer));
            rows.iter()
                .filter(|r| plan.is_none_or(|p| !p.chunk_of.contains_key(**r)))
                .map(|r| r.to_vec())
                .collect()
        };
        // A row nobody declared is its own chunk, so its states never depend on its company.
        for r in undeclared {
            self.declare(source, layer, &[r]);
        }
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            out.push(self.row(source, layer, model, r, device)?);
        }
        Ok(out)
    }

    /// One declared row's states: cached, or its chunk computed (and kept within the budget).
    fn row(
        &self,
        source: &Path,
        layer: usize,
        model: &Model,
        row: &[i64],
        device: Device,
    ) -> Result<Tensor> {
        let owner = (source.to_path_buf(), layer);
        let members = {
            let mut g = self.lock();
            let Inner { plans, stats } = &mut *g;
            let plan = plans.get(&owner).ok_or_else(|| missing(row))?;
            if let Some(t) = plan.states.get(row) {
                stats.hits += 1;
                return Ok(t.shallow_clone());
            }
            let id = *plan.chunk_of.get(row).ok_or_else(|| missing(row))?;
            plan.chunks[id].clone()
        };
        let t0 = Instant::now();
        let len = members[0].len() as i64;
        let flat: Vec<i64> = members.iter().flatten().copied().collect();
        let ids = Tensor::from_slice(&flat)
            .view([members.len() as i64, len])
            .to_device(device);
        let mask = Tensor::ones([members.len() as i64, len], (Kind::Bool, device));
        let x = model.hidden_before(&ids, &mask, layer, true)?;
        let bytes = x.numel() * x.kind().elt_size_in_bytes();
        let mut g = self.lock();
        let Inner { plans, stats } = &mut *g;
        stats.computed += members.len() as u64;
        stats.chunks += 1;
        stats.seconds += t0.elapsed().as_secs_f64();
        let mut mine = None;
        let keep = stats.bytes + bytes <= self.budget;
        if keep {
            stats.bytes += bytes;
        }
        let plan = plans.get_mut(&owner).ok_or_else(|| missing(row))?;
        for (i, m) in members.into_iter().enumerate() {
            let s = x.get(i as i64);
            if m.as_slice() == row {
                mine = Some(s.shallow_clone());
            }
            if keep {
                plan.states.insert(m, s);
            }
        }
        mine.ok_or_else(|| missing(row))
    }

    /// The states entering block `layer` for a right-padded batch (`ids`, `mask`: (b, t)),
    /// assembled from its rows' states with zeros at padded positions: (b, t, d).
    pub fn batch(
        &self,
        source: &Path,
        layer: usize,
        model: &Model,
        ids: &Tensor,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (b, t) = ids.size2()?;
        let rows = batch_rows(ids, mask)?;
        let refs: Vec<&[i64]> = rows.iter().map(Vec::as_slice).collect();
        let states = self.rows(source, layer, model, &refs, ids.device())?;
        let d = states
            .first()
            .map_or(model.cfg.d_model, |s| s.size().last().copied().unwrap_or(0));
        let kind = states.first().map_or(Kind::Float, Tensor::kind);
        let out = Tensor::zeros([b, t, d], (kind, ids.device()));
        tch::no_grad(|| {
            for (i, s) in states.iter().enumerate() {
                out.get(i as i64)
                    .narrow(0, 0, rows[i].len() as i64)
                    .copy_(s);
            }
        });
        Ok(out)
    }
}

fn missing(row: &[i64]) -> Error {
    Error::invalid(
        "trunk cache",
        format!("a row of {} tokens was not declared", row.len()),
    )
}

impl Trunk<'_> {
    /// Declare rows (see [`TrunkCache::declare`]).
    pub fn declare(&self, rows: &[Vec<i64>]) {
        self.cache.declare(self.source, self.layer, rows);
    }

    /// The states entering the first trained block for a padded batch.
    pub fn hidden(&self, model: &Model, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.cache.batch(self.source, self.layer, model, ids, mask)
    }

    /// The forward pass of `model` on a padded batch with the trunk from the cache.
    pub fn forward(
        &self,
        model: &Model,
        ids: &Tensor,
        mask: &Tensor,
        f: &Forward,
    ) -> Result<Output> {
        let x = self.hidden(model, ids, mask)?;
        model.forward_from(self.layer, x, mask, f)
    }

    /// [`Model::final_hidden`] on a padded batch with the trunk from the cache.
    pub fn final_hidden(
        &self,
        model: &Model,
        ids: &Tensor,
        mask: &Tensor,
        f: &Forward,
    ) -> Result<(Tensor, Output)> {
        let x = self.hidden(model, ids, mask)?;
        model.final_hidden(self.layer, x, mask, f)
    }
}

/// The unpadded input rows of a right-padded batch (`ids`, `mask`: (b, t)), as the cache keys
/// them.
pub fn batch_rows(ids: &Tensor, mask: &Tensor) -> Result<Vec<Vec<i64>>> {
    let (b, t) = ids.size2()?;
    let flat: Vec<i64> = Vec::try_from(ids.to_device(Device::Cpu).view([-1]))?;
    let lens: Vec<i64> = Vec::try_from(mask.to_device(Device::Cpu).sum_dim_intlist(
        1,
        false,
        Kind::Int64,
    ))?;
    Ok((0..b as usize)
        .map(|i| flat[i * t as usize..i * t as usize + lens[i] as usize].to_vec())
        .collect())
}

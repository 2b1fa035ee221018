//! A streamed kernel answered from its tiles ([`super::stream`]) without assembling it: the
//! [`KernelOp`] of one process above `--assemble-max`, so that GC, alignment and their intervals
//! come from the tiles on disk (the Slurm route's `--assemble`, or one process's `--tile`).
//!
//! Each product visits the upper-triangle tiles (a ≤ b) once, for as many vectors as it is given
//! (Θ X, X of n × k: the GC code batches its Lanczos solves so that one pass serves many). The
//! tiles' `total` kernels are held in memory (float64) when they fit the given byte budget;
//! otherwise every pass reads them from disk again, so memory stays at one tile plus the n × k
//! blocks whatever n is. The kernel never gives out a sub-kernel ([`KernelOp::sub`] is `None`):
//! no n × n or m × m copy is made. A tile removed or damaged after opening is an error naming
//! its file, not a panic. [`Tiles::counts`] says how many tiles were read and in how many passes.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::op::{self, KernelOp};
use super::stream::tile_path;
use crate::error::{Error, Result};

/// The `total` kernel of tile (a, b) under `dir`, in float64, and the tile's block names (keys
/// without `block.`, sorted).
pub(crate) fn read_total(dir: &Path, a: usize, b: usize) -> Result<(Tensor, Vec<String>)> {
    let path = tile_path(dir, a, b);
    let t = crate::io::read_tensors(&path)?;
    let total = t.get("total").ok_or_else(|| {
        Error::in_file(&path, "no `total` kernel; remove the tile to recompute it")
    })?;
    let mut names: Vec<String> = t
        .keys()
        .filter_map(|k| k.strip_prefix("block."))
        .map(str::to_string)
        .collect();
    names.sort();
    Ok((total.to_kind(Kind::Double), names))
}

/// Refuse a piece of the kernel with NaN or Inf entries, naming the first pair:
/// `name(row, col)` gives the two samples of a position in the piece.
pub(crate) fn refuse_non_finite(
    piece: &Tensor,
    name: impl Fn(usize, usize) -> (String, String),
) -> Result<()> {
    let bad = piece.isfinite().logical_not().nonzero();
    if bad.size()[0] == 0 {
        return Ok(());
    }
    let (i, j) = name(
        bad.int64_value(&[0, 0]) as usize,
        bad.int64_value(&[0, 1]) as usize,
    );
    Err(Error::invalid(
        "kernel",
        format!(
            "{} kernel entries are not finite (NaN or Inf), first Θ({i}, {j}); the model's \
             outputs or gradients overflow on these samples",
            bad.size()[0]
        ),
    ))
}

/// What a [`Tiles`] kernel has cost so far: tiles read from disk (opening reads each once, and
/// tile 0-0 once more for the block names), passes over the tiles by products, and the most
/// vectors one pass multiplied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TileCounts {
    /// Tile files read (each read of one tile counts once).
    pub reads: usize,
    /// Passes over all the tiles by products (Θ X and Σ|cos|), opening not included.
    pub passes: usize,
    /// The most vectors multiplied in one pass.
    pub widest: usize,
}

/// A kernel of `n` samples in tiles of `tile` under `dir`.
pub struct Tiles {
    dir: PathBuf,
    n: usize,
    tile: usize,
    /// The tiles' totals in upper-triangle order, when they fit the budget.
    held: Option<Vec<Tensor>>,
    /// Θ_ii, read when the tiles are opened.
    diag: Tensor,
    /// The kernel's block names (`tiles/*` keys without `block.`).
    pub block_names: Vec<String>,
    counts: Cell<TileCounts>,
}

impl Tiles {
    /// The kernel of the samples `ids` under `dir`; its tiles' totals are held in memory when n²
    /// float64 values fit `hold_bytes`. Reads every tile once, refusing a missing `total` or
    /// non-finite entries (naming the first pair), and keeps the diagonal.
    pub fn open(dir: &Path, ids: &[&str], tile: usize, hold_bytes: u64) -> Result<Tiles> {
        let n = ids.len();
        if tile == 0 || n == 0 {
            return Err(Error::invalid(
                "--tile",
                "needs samples and a tile of 1 or more",
            ));
        }
        let hold = (n as u64).saturating_mul(n as u64).saturating_mul(8) <= hold_bytes;
        let mut me = Tiles {
            dir: dir.to_path_buf(),
            n,
            tile,
            held: None,
            diag: Tensor::zeros([n as i64], (Kind::Double, Device::Cpu)),
            block_names: Vec::new(),
            counts: Cell::new(TileCounts::default()),
        };
        me.block_names = me.read(0, 0)?.1;
        let mut held = Vec::new();
        me.each(&mut |a, b, t| {
            refuse_non_finite(t, |i, j| {
                (ids[a * tile + i].to_string(), ids[b * tile + j].to_string())
            })?;
            if a == b {
                let (ra, la) = me.range(a);
                me.diag.narrow(0, ra, la).copy_(&t.diagonal(0, 0, 1));
            }
            if hold {
                held.push(t.shallow_clone());
            }
            Ok(())
        })?;
        me.held = hold.then_some(held);
        Ok(me)
    }

    /// Tiles read, passes and the widest pass so far.
    pub fn counts(&self) -> TileCounts {
        self.counts.get()
    }

    fn shards(&self) -> usize {
        self.n.div_ceil(self.tile)
    }

    /// Sample range of shard `a`.
    fn range(&self, a: usize) -> (i64, i64) {
        let lo = a * self.tile;
        (lo as i64, ((lo + self.tile).min(self.n) - lo) as i64)
    }

    /// `f(a, b, Θ[A, B])` for every tile a ≤ b, in order: from memory when held, otherwise each
    /// read from disk (a tile removed or damaged since opening is an error naming its file).
    fn each(&self, f: &mut dyn FnMut(usize, usize, &Tensor) -> Result<()>) -> Result<()> {
        let s = self.shards();
        let mut k = 0;
        for a in 0..s {
            for b in a..s {
                match &self.held {
                    Some(h) => f(a, b, &h[k])?,
                    None => f(a, b, &self.read(a, b)?.0)?,
                }
                k += 1;
            }
        }
        Ok(())
    }

    /// `each`, counted as one product pass of `width` vectors.
    fn pass(
        &self,
        width: usize,
        f: &mut dyn FnMut(usize, usize, &Tensor) -> Result<()>,
    ) -> Result<()> {
        let c = self.counts.get();
        self.counts.set(TileCounts {
            passes: c.passes + 1,
            widest: c.widest.max(width),
            ..c
        });
        self.each(f)
    }

    /// Tile (a, b)'s total and block names, read from disk and checked for shape.
    fn read(&self, a: usize, b: usize) -> Result<(Tensor, Vec<String>)> {
        let c = self.counts.get();
        self.counts.set(TileCounts {
            reads: c.reads + 1,
            ..c
        });
        let (total, names) = read_total(&self.dir, a, b)?;
        let want = [self.range(a).1, self.range(b).1];
        if total.size() != want {
            return Err(Error::in_file(
                tile_path(&self.dir, a, b),
                format!(
                    "holds a {:?} kernel where {want:?} was expected; the folder's tiles come \
                     from other settings",
                    total.size()
                ),
            ));
        }
        Ok((total, names))
    }
}

impl KernelOp for Tiles {
    fn n(&self) -> usize {
        self.n
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.zeros_like();
        self.pass(
            x.size().get(1).copied().unwrap_or(1) as usize,
            &mut |a, b, t| {
                let ((ra, la), (rb, lb)) = (self.range(a), self.range(b));
                let (xa, xb) = (x.narrow(0, ra, la), x.narrow(0, rb, lb));
                if a == b {
                    let v = (t.f_mm(&xa)? + t.tr().f_mm(&xa)?) / 2.0;
                    let _ = y.narrow(0, ra, la).f_add_(&v)?;
                } else {
                    let _ = y.narrow(0, ra, la).f_add_(&t.f_mm(&xb)?)?;
                    let _ = y.narrow(0, rb, lb).f_add_(&t.tr().f_mm(&xa)?)?;
                }
                Ok(())
            },
        )?;
        Ok(y)
    }

    fn diag(&self) -> Result<Tensor> {
        Ok(self.diag.shallow_clone())
    }

    fn abs_cosine_sum(&self) -> Result<f64> {
        let s = op::inverse_norms(&self.diag);
        let mut sum = 0.0;
        self.pass(1, &mut |a, b, t| {
            let ((ra, la), (rb, lb)) = (self.range(a), self.range(b));
            let part = (t.abs() * s.narrow(0, ra, la).outer(&s.narrow(0, rb, lb)))
                .sum(Kind::Double)
                .double_value(&[]);
            sum += if a == b { part } else { 2.0 * part };
            Ok(())
        })?;
        Ok(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ntk::op::Dense;

    /// A random kernel with an exactly symmetric off-diagonal and a slightly asymmetric
    /// diagonal tile (as computed tiles are), written as tiles of `tile`.
    fn kernel_in_tiles(dir: &Path, n: usize, tile: usize) -> Tensor {
        tch::manual_seed(7);
        let g = Tensor::randn([n as i64, 5], (Kind::Double, Device::Cpu));
        let k =
            g.mm(&g.tr()) + Tensor::randn([n as i64, n as i64], (Kind::Double, Device::Cpu)) * 1e-3;
        let s = n.div_ceil(tile);
        std::fs::create_dir_all(dir.join("tiles")).unwrap();
        for a in 0..s {
            for b in a..s {
                let (ra, rb) = (a * tile, b * tile);
                let (la, lb) = ((ra + tile).min(n) - ra, (rb + tile).min(n) - rb);
                let v = k
                    .narrow(0, ra as i64, la as i64)
                    .narrow(1, rb as i64, lb as i64)
                    .contiguous();
                let named = vec![
                    ("total".to_string(), v.shallow_clone()),
                    ("block.mlp".to_string(), v),
                ];
                crate::io::write_tensors(&named, &tile_path(dir, a, b)).unwrap();
            }
        }
        // The kernel the tiles stand for: upper triangle mirrored, diagonal tiles as they are.
        let full = Tensor::zeros([n as i64, n as i64], (Kind::Double, Device::Cpu));
        for a in 0..s {
            for b in a..s {
                let (ra, rb) = ((a * tile) as i64, (b * tile) as i64);
                let (la, lb) = (
                    (a * tile + tile).min(n) as i64 - ra,
                    (b * tile + tile).min(n) as i64 - rb,
                );
                let v = k.narrow(0, ra, la).narrow(1, rb, lb);
                full.narrow(0, ra, la).narrow(1, rb, lb).copy_(&v);
                if a != b {
                    full.narrow(0, rb, lb).narrow(1, ra, la).copy_(&v.tr());
                }
            }
        }
        full
    }

    fn close(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-300)
    }

    fn sample_ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("s{i}")).collect()
    }

    /// Every call equals the assembled kernel's, held or read from disk at every pass; a
    /// product of k vectors is one pass (each tile read once when not held, not k times), and
    /// no sub-kernel is given out.
    #[test]
    fn tiles_answer_as_the_assembled_kernel_held_or_read_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let (n, tile) = (23, 5);
        let full = kernel_in_tiles(dir.path(), n, tile);
        let dense = Dense::new(&full);
        let x = Tensor::randn([n as i64], (Kind::Double, Device::Cpu));
        let xs = Tensor::randn([n as i64, 4], (Kind::Double, Device::Cpu));
        let names = sample_ids(n);
        let ids: Vec<&str> = names.iter().map(String::as_str).collect();
        let tiles = 5 * 6 / 2;
        for hold in [0, u64::MAX] {
            let t = Tiles::open(dir.path(), &ids, tile, hold).unwrap();
            assert_eq!(t.held.is_some(), hold > 0);
            assert_eq!(t.block_names, vec!["mlp".to_string()]);
            // Opening reads each tile once, and tile 0-0 once more for the block names.
            assert_eq!(t.counts().reads, tiles + 1);
            assert!(close(&t.mv(&x).unwrap(), &dense.mv(&x).unwrap()) < 1e-12);
            let before = t.counts();
            let y = t.apply(&xs).unwrap();
            let after = t.counts();
            assert!(close(&y, &dense.apply(&xs).unwrap()) < 1e-12);
            assert_eq!((after.passes - before.passes, after.widest), (1, 4));
            let read = if hold > 0 { 0 } else { tiles };
            assert_eq!(
                after.reads - before.reads,
                read,
                "one read per tile per pass"
            );
            assert!(t.sub(&[0, 3]).unwrap().is_none());
            assert!(close(&t.diag().unwrap(), &dense.diag().unwrap()) < 1e-12);
            let (p, q) = (t.abs_cosine_sum().unwrap(), dense.abs_cosine_sum().unwrap());
            assert!((p - q).abs() < 1e-10 * q, "{p} against {q}");
        }
    }

    /// A tile removed or overwritten with garbage after the kernel was opened: the next product
    /// is an error naming the tile's file (the library does not panic).
    #[test]
    fn a_tile_damaged_after_opening_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let _ = kernel_in_tiles(dir.path(), 12, 4);
        let names = sample_ids(12);
        let ids: Vec<&str> = names.iter().map(String::as_str).collect();
        let t = Tiles::open(dir.path(), &ids, 4, 0).unwrap();
        let x = Tensor::ones([12], (Kind::Double, Device::Cpu));
        assert!(t.mv(&x).is_ok());
        let path = tile_path(dir.path(), 1, 2);
        std::fs::write(&path, b"not a tile").unwrap();
        let e = t.mv(&x).unwrap_err().to_string();
        assert!(e.contains("tile-00001-00002"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let e = t.abs_cosine_sum().unwrap_err().to_string();
        assert!(e.contains("tile-00001-00002"), "{e}");
        let held = Tiles::open(dir.path(), &ids, 4, u64::MAX);
        assert!(held.is_err(), "opening reads every tile");
    }

    #[test]
    fn a_missing_misshapen_or_non_finite_tile_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let full = kernel_in_tiles(dir.path(), 12, 4);
        let names = sample_ids(13);
        let ids: Vec<&str> = names.iter().map(String::as_str).collect();
        // Opened as 13 samples: the last tiles have the wrong shape.
        let e = Tiles::open(dir.path(), &ids, 4, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("tile-00000-00003") || e.contains("was expected"),
            "{e}"
        );
        // A NaN at Θ(5, 9): tile (1, 2), position (1, 1).
        let v = full.narrow(0, 4, 4).narrow(1, 8, 4).copy();
        let _ = v.narrow(0, 1, 1).narrow(1, 1, 1).fill_(f64::NAN);
        let named = vec![("total".to_string(), v)];
        crate::io::write_tensors(&named, &tile_path(dir.path(), 1, 2)).unwrap();
        let e = Tiles::open(dir.path(), &ids[..12], 4, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("1 kernel entries are not finite") && e.contains("Θ(s5, s9)"),
            "{e}"
        );
        std::fs::remove_file(tile_path(dir.path(), 1, 2)).unwrap();
        let e = Tiles::open(dir.path(), &ids[..12], 4, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tile-00001-00002"), "{e}");
    }
}

//! A streamed kernel answered from its tiles ([`super::stream`]) without assembling it: the
//! [`KernelOp`] of one process above `--assemble-max`, so that GC, alignment and their intervals
//! come from the tiles on disk (the Slurm route's `--assemble`, or one process's `--tile`).
//!
//! Each call visits the upper-triangle tiles (a ≤ b) once. The tiles' `total` kernels are held in
//! memory (float64) when they fit the given byte budget; otherwise every call reads them from
//! disk again, so memory stays at one tile plus the n-sized vectors whatever n is.

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

/// A kernel of `n` samples in tiles of `tile` under `dir`.
pub struct Tiles {
    dir: PathBuf,
    n: usize,
    tile: usize,
    /// The tiles' totals in upper-triangle order, when they fit the budget.
    held: Option<Vec<Tensor>>,
    /// The kernel's block names (`tiles/*` keys without `block.`).
    pub block_names: Vec<String>,
}

impl Tiles {
    /// The kernel of the samples `ids` under `dir`; its tiles' totals are held in memory when n²
    /// float64 values fit `hold_bytes`. Reads every tile once, refusing a missing `total` or
    /// non-finite entries (naming the first pair).
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
            block_names: Vec::new(),
        };
        let mut held = Vec::new();
        me.block_names = read_total(dir, 0, 0)?.1;
        me.each(&mut |a, b, t| {
            refuse_non_finite(t, |i, j| {
                (ids[a * tile + i].to_string(), ids[b * tile + j].to_string())
            })?;
            if hold {
                held.push(t.shallow_clone());
            }
            Ok(())
        })?;
        me.held = hold.then_some(held);
        Ok(me)
    }

    fn shards(&self) -> usize {
        self.n.div_ceil(self.tile)
    }

    /// Sample range of shard `a`.
    fn range(&self, a: usize) -> (i64, i64) {
        let lo = a * self.tile;
        (lo as i64, ((lo + self.tile).min(self.n) - lo) as i64)
    }

    /// `f(a, b, Θ[A, B])` for every tile a ≤ b, in order.
    fn each(&self, f: &mut dyn FnMut(usize, usize, &Tensor) -> Result<()>) -> Result<()> {
        let s = self.shards();
        let mut k = 0;
        for a in 0..s {
            for b in a..s {
                match &self.held {
                    Some(h) => f(a, b, &h[k])?,
                    None => f(a, b, &self.read(a, b)?)?,
                }
                k += 1;
            }
        }
        Ok(())
    }

    fn read(&self, a: usize, b: usize) -> Result<Tensor> {
        let (total, _) = read_total(&self.dir, a, b)?;
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
        Ok(total)
    }

    /// `each` for the [`KernelOp`] calls, which cannot fail: tiles were read and checked by
    /// [`Tiles::open`], so a failure here is a tile removed or damaged since, reported loudly.
    fn visit(&self, f: &mut dyn FnMut(usize, usize, &Tensor)) {
        if let Err(e) = self.each(&mut |a, b, t| {
            f(a, b, t);
            Ok(())
        }) {
            panic!("a tile changed while the kernel was in use: {e}");
        }
    }
}

fn zeros(n: i64) -> Tensor {
    Tensor::zeros([n], (Kind::Double, Device::Cpu))
}

impl KernelOp for Tiles {
    fn n(&self) -> usize {
        self.n
    }

    fn mv(&self, x: &Tensor) -> Tensor {
        let y = zeros(self.n as i64);
        self.visit(&mut |a, b, t| {
            let ((ra, la), (rb, lb)) = (self.range(a), self.range(b));
            let (xa, xb) = (x.narrow(0, ra, la), x.narrow(0, rb, lb));
            if a == b {
                let v = (t.mv(&xa) + t.tr().mv(&xa)) / 2.0;
                let _ = y.narrow(0, ra, la).g_add_(&v);
            } else {
                let _ = y.narrow(0, ra, la).g_add_(&t.mv(&xb));
                let _ = y.narrow(0, rb, lb).g_add_(&t.tr().mv(&xa));
            }
        });
        y
    }

    fn sub(&self, idx: &[usize]) -> Tensor {
        let m = idx.len() as i64;
        // Positions in idx and offsets within their shard, per shard.
        let mut by: Vec<(Vec<i64>, Vec<i64>)> = vec![(Vec::new(), Vec::new()); self.shards()];
        for (p, &i) in idx.iter().enumerate() {
            let e = &mut by[i / self.tile];
            e.0.push(p as i64);
            e.1.push((i % self.tile) as i64);
        }
        let mut s = Tensor::zeros([m, m], (Kind::Double, Device::Cpu));
        let ix = |v: &[i64]| Tensor::from_slice(v);
        let mut put = |rows: &[i64], cols: &[i64], v: &Tensor| {
            let r = ix(rows).unsqueeze(1);
            let c = ix(cols).unsqueeze(0);
            let _ = s.index_put_(&[Some(r), Some(c)], v, false);
        };
        self.visit(&mut |a, b, t| {
            let ((pa, oa), (pb, ob)) = (&by[a], &by[b]);
            if pa.is_empty() || pb.is_empty() {
                return;
            }
            let v = t.index_select(0, &ix(oa)).index_select(1, &ix(ob));
            put(pa, pb, &v);
            if a != b {
                put(pb, pa, &v.tr());
            }
        });
        (&s + s.tr()) / 2.0
    }

    fn diag(&self) -> Tensor {
        let d = zeros(self.n as i64);
        self.visit(&mut |a, b, t| {
            if a == b {
                let (ra, la) = self.range(a);
                d.narrow(0, ra, la).copy_(&t.diagonal(0, 0, 1));
            }
        });
        d
    }

    fn abs_cosine_sum(&self) -> f64 {
        let s = op::inverse_norms(&self.diag());
        let mut sum = 0.0;
        self.visit(&mut |a, b, t| {
            let ((ra, la), (rb, lb)) = (self.range(a), self.range(b));
            let part = (t.abs() * s.narrow(0, ra, la).outer(&s.narrow(0, rb, lb)))
                .sum(Kind::Double)
                .double_value(&[]);
            sum += if a == b { part } else { 2.0 * part };
        });
        sum
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

    #[test]
    fn tiles_answer_as_the_assembled_kernel_held_or_read_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let (n, tile) = (23, 5);
        let full = kernel_in_tiles(dir.path(), n, tile);
        let dense = Dense::new(&full);
        let x = Tensor::randn([n as i64], (Kind::Double, Device::Cpu));
        let idx = [22, 0, 7, 3, 19, 4, 5, 11];
        let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let ids: Vec<&str> = names.iter().map(String::as_str).collect();
        for hold in [0, u64::MAX] {
            let t = Tiles::open(dir.path(), &ids, tile, hold).unwrap();
            assert_eq!(t.held.is_some(), hold > 0);
            assert_eq!(t.block_names, vec!["mlp".to_string()]);
            assert!(close(&t.mv(&x), &dense.mv(&x)) < 1e-12);
            assert!(close(&t.sub(&idx), &dense.sub(&idx)) < 1e-12);
            assert!(close(&t.diag(), &dense.diag()) < 1e-12);
            let (p, q) = (t.abs_cosine_sum(), dense.abs_cosine_sum());
            assert!((p - q).abs() < 1e-10 * q, "{p} against {q}");
        }
    }

    #[test]
    fn a_missing_misshapen_or_non_finite_tile_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let full = kernel_in_tiles(dir.path(), 12, 4);
        let names: Vec<String> = (0..13).map(|i| format!("s{i}")).collect();
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

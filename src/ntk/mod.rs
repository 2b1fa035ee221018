//! The empirical neural tangent kernel Θ(X, Y) = J(X) J(Y)ᵀ (n × m) for per-sample gradients
//! J (n × P) of a scalar output, from [`crate::capture`], and its parameter-group blocks:
//! Θ = Σ_g J_g J_gᵀ, where g runs over parameters, modules (an attention, an MLP, one expert, a
//! LayerNorm), or blocks (`h.{i}`) — the blocks always sum to the total.
//!
//! Shape rule: with `diagonal`, only Θ_ii is computed and every output is (n,) instead of (n, m);
//! a cross kernel (Y ≠ X) is (n, m) and has no diagonal form. Kernels are float64 on the CPU.
//! Gradient consistency from kernel entries is in [`gc`].

pub mod coverage;
pub mod diagnostics;
pub mod gc;
pub mod groups;
pub mod lanczos;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod op;
pub mod pipeline;
pub mod stream;
pub mod tiles;
pub mod trajectory;

use std::collections::BTreeMap;

use tch::{Device, Kind, Tensor};

use crate::capture::Captured;
use crate::error::{Error, Result};

/// How the kernel is split into blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockBy {
    /// No blocks, the total only.
    None,
    /// One block per parameter tensor.
    Param,
    /// One block per module: attention, MLP, each expert, router, LayerNorm, embeddings (default).
    #[default]
    Module,
    /// One block per transformer block `h.{i}` (plus embeddings and heads).
    Layer,
}

/// The group of a parameter name under `by`.
pub fn group_of(name: &str, by: BlockBy) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    match by {
        BlockBy::None => "total".into(),
        BlockBy::Param => name.into(),
        BlockBy::Layer => {
            if parts[0] == "h" && parts.len() > 1 {
                format!("h.{}", parts[1])
            } else {
                parts[0].into()
            }
        }
        BlockBy::Module => {
            if parts[0] != "h" || parts.len() < 3 {
                return parts[0].into();
            }
            match parts.iter().position(|p| *p == "experts") {
                Some(i) if i + 1 < parts.len() => parts[..i + 2].join("."),
                _ => parts[..3].join("."),
            }
        }
    }
}

/// How per-sample gradients are scaled before the principal direction, GC and alignment.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Normalize {
    /// The kernel as it is: samples with large gradients weigh more.
    None,
    /// Unit gradients: Θ_ij / √(Θ_ii Θ_jj), so no sample dominates by its gradient norm
    /// (default: the README's kernel-options study).
    #[default]
    Cosine,
}

/// 1 / √(Θ_ii Θ_jj) for every pair of the square kernel `k` (0 where a sample's Θ_ii is 0).
fn cosine_scale(k: &Tensor) -> Tensor {
    let inv = op::inverse_norms(&k.diagonal(0, 0, 1));
    inv.outer(&inv)
}

/// The cosine kernel Θ_ij / √(Θ_ii Θ_jj) of the square kernel `k`: the kernel of unit-norm
/// gradients (a zero-norm sample stays zero).
pub fn cosine(k: &Tensor) -> Tensor {
    k * cosine_scale(k)
}

/// A kernel and its blocks (float64, CPU).
#[derive(Debug)]
pub struct Kernel {
    /// The whole kernel (n, m), or the diagonal (n,).
    pub total: Tensor,
    /// (block name, its kernel) per parameter group.
    pub blocks: Vec<(String, Tensor)>,
    /// Whether only the diagonal was computed.
    pub diagonal: bool,
}

impl Kernel {
    /// The kernel of unit-norm gradients: the total and every block divided by √(Θ_ii Θ_jj) of
    /// the total, so the blocks still sum to the total (a zero-norm sample stays zero).
    pub fn cosine(&self) -> Kernel {
        let scale = cosine_scale(&self.total);
        Kernel {
            total: &self.total * &scale,
            blocks: self
                .blocks
                .iter()
                .map(|(n, t)| (n.clone(), t * &scale))
                .collect(),
            diagonal: self.diagonal,
        }
    }

    /// A second handle on the same tensors (no copy).
    pub fn shallow_clone(&self) -> Kernel {
        Kernel {
            total: self.total.shallow_clone(),
            blocks: self
                .blocks
                .iter()
                .map(|(n, t)| (n.clone(), t.shallow_clone()))
                .collect(),
            diagonal: self.diagonal,
        }
    }

    /// The kernel's tensors under their file names: `total` and `block.<name>`.
    pub fn named(&self) -> Vec<(String, Tensor)> {
        let mut named = vec![("total".to_string(), self.total.shallow_clone())];
        named.extend(
            self.blocks
                .iter()
                .map(|(n, t)| (format!("block.{n}"), t.shallow_clone())),
        );
        named
    }
}

/// Rows per tile of ghost kernels (memory ≈ tile² · T² values per tile).
const GHOST_TILE: i64 = 16;

/// Θ(X, Y) from captured gradients; `y = None` means Y = X. Both captures must cover the same
/// parameters (and projection).
pub fn kernel(x: &Captured, y: Option<&Captured>, by: BlockBy, diagonal: bool) -> Result<Kernel> {
    let y = y.unwrap_or(x);
    if diagonal && !std::ptr::eq(x, y) {
        return Err(Error::invalid(
            "--diagonal",
            "a cross kernel has no diagonal form",
        ));
    }
    if (x.norms_only || y.norms_only) && !diagonal {
        return Err(Error::invalid(
            "kernel",
            "these captures hold gradient norms only (for Θ_ii); capture without norms_only",
        ));
    }
    if x.names != y.names {
        return Err(Error::invalid(
            "kernel",
            "the two sample sets were captured for different parameters",
        ));
    }
    let shape: Vec<i64> = if diagonal {
        vec![x.n as i64]
    } else {
        vec![x.n as i64, y.n as i64]
    };
    let mut groups: BTreeMap<String, Tensor> = BTreeMap::new();
    for k in 0..x.names.len() {
        let c = match (&x.jac[k], &y.jac[k], &x.ghost[k], &y.ghost[k]) {
            (Some(jx), Some(jy), _, _) => {
                let c = if diagonal {
                    (jx * jx).sum_dim_intlist(1, false, Kind::Double)
                } else {
                    gram(jx, jy)
                };
                c.to_device(Device::Cpu)
            }
            (_, _, Some(px), Some(py)) if px.len() == py.len() => px
                .iter()
                .zip(py)
                .map(|((xx, gx), (xy, gy))| ghost_kernel(xx, gx, xy, gy, diagonal))
                .reduce(|a, b| a + b)
                .unwrap_or_else(|| Tensor::zeros(shape.as_slice(), (Kind::Double, Device::Cpu))),
            _ => {
                return Err(Error::invalid(
                    "kernel",
                    format!(
                        "parameter `{}` was captured differently in the two sets",
                        x.names[k]
                    ),
                ))
            }
        };
        let g = group_of(&x.names[k], by);
        match groups.get_mut(&g) {
            Some(acc) => *acc += c,
            None => {
                groups.insert(g, c);
            }
        }
    }
    let mut total = Tensor::zeros(shape.as_slice(), (Kind::Double, Device::Cpu));
    for v in groups.values() {
        total += v;
    }
    let blocks = if by == BlockBy::None {
        Vec::new()
    } else {
        groups.into_iter().collect()
    };
    Ok(Kernel {
        total,
        blocks,
        diagonal,
    })
}

/// Columns per GEMM of [`gram`]: float32 sums of 4,096 products, added up in float64.
const GRAM_CHUNK: i64 = 4096;

/// X Yᵀ in float64, from GEMMs in the gradients' precision (float32 for trained models: twice
/// the speed and half the memory of float64) over chunks of [`GRAM_CHUNK`] columns, accumulated
/// in float64 on their device. One float32 GEMM over all columns loses the diagonal: on
/// SmolLM2's last two MLPs (5.3 M columns) ‖g_i‖² came out 5e-5 to 9e-5 high, against 1e-6
/// for the off-diagonal entries.
pub fn gram(x: &Tensor, y: &Tensor) -> Tensor {
    let p = x.size()[1];
    if x.kind() == Kind::Double || p <= GRAM_CHUNK {
        return x.matmul(&y.tr()).to_kind(Kind::Double);
    }
    let mut acc = Tensor::zeros([x.size()[0], y.size()[0]], (Kind::Double, x.device()));
    for c in (0..p).step_by(GRAM_CHUNK as usize) {
        let w = GRAM_CHUNK.min(p - c);
        let part = x.narrow(1, c, w).matmul(&y.narrow(1, c, w).tr());
        let _ = acc.g_add_(&part.to_kind(Kind::Double));
    }
    acc
}

/// K_ij = Σ_{t,s} (x_it·x_js)(g_it·g_js) over padded positions, tiled over samples, on the
/// factors' device (returned on the CPU). The dot products run in the factors' precision (sums
/// of `in` or `out` terms); the T² products per pair are summed in float64. A `g` of token ids
/// (n, T) (a token embedding) stands for one-hot rows: g_it·g_js = [id_it = id_js].
fn ghost_kernel(xx: &Tensor, gx: &Tensor, xy: &Tensor, gy: &Tensor, diagonal: bool) -> Tensor {
    // Token-match factors (ids on the g side) are 0/1 in the x side's precision.
    let kind = xx.kind();
    // g_at · g_bs for tiles a (la, T, ·) and b (lb, T, ·): (la, lb, T, T).
    let gdot = |ga: &Tensor, gb: &Tensor| {
        if ga.kind() == Kind::Int64 {
            ga.unsqueeze(1)
                .unsqueeze(3)
                .eq_tensor(&gb.unsqueeze(0).unsqueeze(2))
                .to_kind(kind)
        } else {
            Tensor::einsum("ato,bso->abts", &[ga, gb], None::<i64>)
        }
    };
    let (n, m) = (xx.size()[0], xy.size()[0]);
    if diagonal {
        let mut out = Vec::new();
        for a in (0..n).step_by(GHOST_TILE as usize) {
            let l = GHOST_TILE.min(n - a);
            let (xa, ga) = (xx.narrow(0, a, l), gx.narrow(0, a, l));
            let aa = Tensor::einsum("ati,asi->ats", &[&xa, &xa], None::<i64>);
            let bb = if ga.kind() == Kind::Int64 {
                ga.unsqueeze(2).eq_tensor(&ga.unsqueeze(1)).to_kind(kind)
            } else {
                Tensor::einsum("ato,aso->ats", &[&ga, &ga], None::<i64>)
            };
            out.push((aa * bb).sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Double));
        }
        return Tensor::cat(&out, 0).to_device(Device::Cpu);
    }
    let mut rows = Vec::new();
    for a in (0..n).step_by(GHOST_TILE as usize) {
        let la = GHOST_TILE.min(n - a);
        let (xa, ga) = (xx.narrow(0, a, la), gx.narrow(0, a, la));
        let mut cols = Vec::new();
        for b in (0..m).step_by(GHOST_TILE as usize) {
            let lb = GHOST_TILE.min(m - b);
            let (xb, gb) = (xy.narrow(0, b, lb), gy.narrow(0, b, lb));
            let aa = Tensor::einsum("ati,bsi->abts", &[&xa, &xb], None::<i64>);
            let bb = gdot(&ga, &gb);
            cols.push((aa * bb).sum_dim_intlist([2i64, 3].as_slice(), false, Kind::Double));
        }
        rows.push(Tensor::cat(&cols, 1));
    }
    Tensor::cat(&rows, 0).to_device(Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A float32 Jacobian of 2²¹ columns: its kernel is within 1e-7 of the float64 Gram (one
    /// float32 GEMM over all columns was 2e-5 off, on the diagonal).
    #[test]
    fn float32_kernels_accumulate_in_float64() {
        tch::manual_seed(3);
        let j = Tensor::randn([4, 1 << 21], (Kind::Float, Device::Cpu));
        let c = Captured {
            names: vec!["w".into()],
            jac: vec![Some(j.shallow_clone())],
            ghost: vec![None],
            n: 4,
            norms_only: false,
        };
        let k = kernel(&c, None, BlockBy::None, false).unwrap().total;
        let jd = j.to_kind(Kind::Double);
        let want = jd.matmul(&jd.tr());
        let err = (&k - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
        assert!(err < 1e-7, "float32 kernel off by {err:.2e} relative");
    }

    #[test]
    fn groups() {
        let n = "h.3.mlp.experts.1.c_fc.weight";
        assert_eq!(group_of(n, BlockBy::Module), "h.3.mlp.experts.1");
        assert_eq!(group_of(n, BlockBy::Layer), "h.3");
        assert_eq!(group_of(n, BlockBy::Param), n);
        assert_eq!(
            group_of("h.0.attn.c_attn.bias", BlockBy::Module),
            "h.0.attn"
        );
        assert_eq!(group_of("h.0.ln_1.weight", BlockBy::Module), "h.0.ln_1");
        assert_eq!(group_of("wte.weight", BlockBy::Module), "wte");
        assert_eq!(group_of("ln_f.bias", BlockBy::Layer), "ln_f");
    }
}

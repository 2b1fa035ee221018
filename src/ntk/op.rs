//! A symmetric kernel seen through what GC needs of it: products Θx, for several vectors at
//! once (Θ X, one pass over the kernel), the diagonal, the sum of |cosines|, and sub-kernels
//! Θ[S, S] where the kernel is held whole in memory. [`Dense`] holds the whole kernel; a kernel
//! out of core (tiles on disk, `tiles::Tiles`; the MPI ranks' row blocks, `mpi::RowBlocks`, which
//! answer every call with an all-reduce) is seen through products only, so that GC, alignment and
//! their intervals ([`super::gc`]) never need the whole kernel in one process.
//!
//! Every call returns a `Result`: a kernel read from disk can fail (a tile removed or damaged
//! since it was opened), and the failure reaches the caller naming the file.
//!
//! Every call on a distributed kernel is collective: all ranks make the same calls in the same
//! order (they run the same deterministic code on the same vectors).

use tch::{Device, Kind, Tensor};

use crate::error::Result;

/// A symmetric n × n kernel, float64 on the CPU.
pub trait KernelOp {
    /// Number of samples.
    fn n(&self) -> usize;
    /// (Θ + Θᵀ)/2 · X for X of n × k (float64): k products in one pass over the kernel (each
    /// tile read once, one all-reduce).
    fn apply(&self, x: &Tensor) -> Result<Tensor>;
    /// (Θ + Θᵀ)/2 · x for x of length n.
    fn mv(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.apply(&x.unsqueeze(1))?.squeeze_dim(1))
    }
    /// (Θ + Θᵀ)/2 restricted to the samples `idx`, in that order (|idx| × |idx|), when the kernel
    /// is held whole in this process's memory; `None` for a kernel out of core, which callers see
    /// through products only (the default).
    fn sub(&self, _idx: &[usize]) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Θ_ii (length n).
    fn diag(&self) -> Result<Tensor>;
    /// Σ_ij |Θ_ij| / √(Θ_ii Θ_jj) over all pairs, the diagonal included (zero-norm samples
    /// count 0).
    fn abs_cosine_sum(&self) -> Result<f64>;
}

/// Indices as a libtorch index tensor.
pub(crate) fn index(idx: &[usize]) -> Tensor {
    Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>())
}

/// A kernel held whole in memory.
pub struct Dense {
    k: Tensor,
}

impl Dense {
    /// The kernel `k` (n × n), converted to float64 on the CPU.
    pub fn new(k: &Tensor) -> Dense {
        Dense {
            k: k.to_kind(Kind::Double).to_device(Device::Cpu),
        }
    }

    /// The kernel.
    pub fn tensor(&self) -> &Tensor {
        &self.k
    }
}

impl KernelOp for Dense {
    fn n(&self) -> usize {
        self.k.size()[0] as usize
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok((self.k.f_mm(x)? + self.k.tr().f_mm(x)?) / 2.0)
    }

    fn sub(&self, idx: &[usize]) -> Result<Option<Tensor>> {
        let sel = index(idx);
        let s = self.k.f_index_select(0, &sel)?.f_index_select(1, &sel)?;
        Ok(Some((&s + s.tr()) / 2.0))
    }

    fn diag(&self) -> Result<Tensor> {
        Ok(self.k.diagonal(0, 0, 1).copy())
    }

    fn abs_cosine_sum(&self) -> Result<f64> {
        Ok(super::cosine(&self.k)
            .abs()
            .sum(Kind::Double)
            .double_value(&[]))
    }
}

/// 1/√Θ_ii per sample, 0 for a zero-norm sample.
pub(crate) fn inverse_norms(diag: &Tensor) -> Tensor {
    diag.gt(0.0).to_kind(Kind::Double) / diag.clamp_min(f64::MIN_POSITIVE).sqrt()
}

/// The cosine kernel Θ_ij / √(Θ_ii Θ_jj) of another kernel, applied through it.
pub struct Cosine<'a> {
    inner: &'a dyn KernelOp,
    scale: Tensor,
    diag: Tensor,
}

impl<'a> Cosine<'a> {
    /// The cosine kernel of `inner`.
    pub fn new(inner: &'a dyn KernelOp) -> Result<Cosine<'a>> {
        let d = inner.diag()?;
        let scale = inverse_norms(&d);
        let diag = d * scale.square();
        Ok(Cosine { inner, scale, diag })
    }
}

impl KernelOp for Cosine<'_> {
    fn n(&self) -> usize {
        self.inner.n()
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.scale.unsqueeze(1);
        Ok(&s * self.inner.apply(&(&s * x))?)
    }

    fn sub(&self, idx: &[usize]) -> Result<Option<Tensor>> {
        let s = self.scale.index_select(0, &index(idx));
        Ok(self.inner.sub(idx)?.map(|k| k * s.outer(&s)))
    }

    fn diag(&self) -> Result<Tensor> {
        Ok(self.diag.shallow_clone())
    }

    fn abs_cosine_sum(&self) -> Result<f64> {
        self.inner.abs_cosine_sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// The cosine operator equals the cosine kernel computed whole, in every call; a product
    /// with several vectors equals the products with each (the float64 direct computation
    /// (Θ + Θᵀ)/2 X of a slightly asymmetric kernel).
    #[test]
    fn cosine_operator_equals_the_cosine_kernel() {
        tch::manual_seed(3);
        let j = Tensor::randn([7, 4], (Kind::Double, Device::Cpu));
        let k = j.matmul(&j.tr()) + Tensor::randn([7, 7], (Kind::Double, Device::Cpu)) * 1e-3;
        // A zero-gradient sample stays zero.
        let _ = k.get(2).fill_(0.0);
        let _ = k.select(1, 2).fill_(0.0);
        let dense = Dense::new(&k);
        let cos = Cosine::new(&dense).unwrap();
        let want = Dense::new(&super::super::cosine(&k));
        let x = Tensor::randn([7], (Kind::Double, Device::Cpu));
        assert!(max_diff(&cos.mv(&x).unwrap(), &want.mv(&x).unwrap()) < 1e-12);
        let idx = [5, 0, 2];
        let (a, b) = (cos.sub(&idx).unwrap(), want.sub(&idx).unwrap());
        assert!(max_diff(&a.unwrap(), &b.unwrap()) < 1e-12);
        assert!(max_diff(&cos.diag().unwrap(), &want.diag().unwrap()) < 1e-12);
        let (p, q) = (
            cos.abs_cosine_sum().unwrap(),
            want.abs_cosine_sum().unwrap(),
        );
        assert!((p - q).abs() < 1e-9);
        assert_eq!(cos.diag().unwrap().double_value(&[2]), 0.0);
        let xs = Tensor::randn([7, 3], (Kind::Double, Device::Cpu));
        let sym = (&k + k.tr()) / 2.0;
        assert!(max_diff(&dense.apply(&xs).unwrap(), &sym.mm(&xs)) < 1e-12);
        for c in 0..3 {
            let col = cos.apply(&xs).unwrap().select(1, c);
            assert!(max_diff(&col, &cos.mv(&xs.select(1, c)).unwrap()) < 1e-12);
        }
    }
}

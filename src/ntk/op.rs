//! A symmetric kernel seen through what GC needs of it: products Θx, small sub-kernels Θ[S, S],
//! the diagonal and the sum of |cosines|. [`Dense`] holds the whole kernel; under MPI the ranks'
//! row blocks answer the same calls with an all-reduce (`mpi::RowBlocks`), so that GC,
//! alignment and their intervals ([`super::gc`]) never need the whole kernel on one process.
//!
//! Every call on a distributed kernel is collective: all ranks make the same calls in the same
//! order (they run the same deterministic code on the same vectors).

use tch::{Device, Kind, Tensor};

/// A symmetric n × n kernel, float64 on the CPU.
pub trait KernelOp {
    /// Number of samples.
    fn n(&self) -> usize;
    /// (Θ + Θᵀ)/2 · x for x of length n.
    fn mv(&self, x: &Tensor) -> Tensor;
    /// (Θ + Θᵀ)/2 restricted to the samples `idx`, in that order (|idx| × |idx|).
    fn sub(&self, idx: &[usize]) -> Tensor;
    /// Θ_ii (length n).
    fn diag(&self) -> Tensor;
    /// Σ_ij |Θ_ij| / √(Θ_ii Θ_jj) over all pairs, the diagonal included (zero-norm samples
    /// count 0).
    fn abs_cosine_sum(&self) -> f64;
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

    fn mv(&self, x: &Tensor) -> Tensor {
        (self.k.mv(x) + self.k.tr().mv(x)) / 2.0
    }

    fn sub(&self, idx: &[usize]) -> Tensor {
        let sel = index(idx);
        let s = self.k.index_select(0, &sel).index_select(1, &sel);
        (&s + s.tr()) / 2.0
    }

    fn diag(&self) -> Tensor {
        self.k.diagonal(0, 0, 1).copy()
    }

    fn abs_cosine_sum(&self) -> f64 {
        super::cosine(&self.k)
            .abs()
            .sum(Kind::Double)
            .double_value(&[])
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
}

impl<'a> Cosine<'a> {
    /// The cosine kernel of `inner`.
    pub fn new(inner: &'a dyn KernelOp) -> Cosine<'a> {
        let scale = inverse_norms(&inner.diag());
        Cosine { inner, scale }
    }
}

impl KernelOp for Cosine<'_> {
    fn n(&self) -> usize {
        self.inner.n()
    }

    fn mv(&self, x: &Tensor) -> Tensor {
        &self.scale * self.inner.mv(&(&self.scale * x))
    }

    fn sub(&self, idx: &[usize]) -> Tensor {
        let s = self.scale.index_select(0, &index(idx));
        self.inner.sub(idx) * s.outer(&s)
    }

    fn diag(&self) -> Tensor {
        self.inner.diag() * self.scale.square()
    }

    fn abs_cosine_sum(&self) -> f64 {
        self.inner.abs_cosine_sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_operator_equals_the_cosine_kernel() {
        tch::manual_seed(3);
        let j = Tensor::randn([7, 4], (Kind::Double, Device::Cpu));
        let k = j.matmul(&j.tr());
        // A zero-gradient sample stays zero.
        let _ = k.get(2).fill_(0.0);
        let _ = k.select(1, 2).fill_(0.0);
        let dense = Dense::new(&k);
        let cos = Cosine::new(&dense);
        let want = Dense::new(&super::super::cosine(&k));
        let x = Tensor::randn([7], (Kind::Double, Device::Cpu));
        assert!((cos.mv(&x) - want.mv(&x)).abs().max().double_value(&[]) < 1e-12);
        let idx = [5, 0, 2];
        assert!(
            (cos.sub(&idx) - want.sub(&idx))
                .abs()
                .max()
                .double_value(&[])
                < 1e-12
        );
        assert!((cos.diag() - want.diag()).abs().max().double_value(&[]) < 1e-12);
        assert!((cos.abs_cosine_sum() - want.abs_cosine_sum()).abs() < 1e-9);
        assert_eq!(cos.diag().double_value(&[2]), 0.0);
    }
}

//! CPU arrays at the tch boundary. Tensors live in libtorch (models, gradients, kernels, and the
//! one dense linear-algebra path, `linalg_eigh`); CPU-side point sets and kernels handed to
//! clustering, PCA and the analysis are `ndarray` arrays, converted here.

use ndarray::{Array2, ArrayView2};
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// A 2-D tensor (any float kind, any device) as an (n, d) f32 array.
pub fn matrix_f32(t: &Tensor) -> Result<Array2<f32>> {
    let (n, d) = t
        .size2()
        .map_err(|_| Error::invalid("matrix", format!("expected 2-D, got {:?}", t.size())))?;
    let v: Vec<f32> = Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1]))?;
    Array2::from_shape_vec((n as usize, d as usize), v)
        .map_err(|e| Error::invalid("matrix", e.to_string()))
}

/// A 2-D tensor (any float kind, any device) as an (n, d) f64 array.
pub fn matrix_f64(t: &Tensor) -> Result<Array2<f64>> {
    let (n, d) = t
        .size2()
        .map_err(|_| Error::invalid("matrix", format!("expected 2-D, got {:?}", t.size())))?;
    let v: Vec<f64> = Vec::try_from(t.to_device(Device::Cpu).to_kind(Kind::Double).reshape([-1]))?;
    Array2::from_shape_vec((n as usize, d as usize), v)
        .map_err(|e| Error::invalid("matrix", e.to_string()))
}

/// An (n, d) array as a CPU f64 tensor (for libtorch's linear algebra).
pub fn tensor_f64<T: Copy + Into<f64>>(x: ArrayView2<T>) -> Tensor {
    let (n, d) = x.dim();
    let v: Vec<f64> = x.iter().map(|&v| v.into()).collect();
    Tensor::from_slice(&v).view([n as i64, d as i64])
}

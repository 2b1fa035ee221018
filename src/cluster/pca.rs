//! Two-component PCA of row vectors (libtorch's `linalg_eigh` of the covariance, the project's
//! one dense linear-algebra path), for plotting sequence embeddings (paper Fig. 2b/5a).

use ndarray::ArrayView2;
use tch::Kind;

use crate::error::Result;

/// Scores of the rows of `x` (n, d) on the first two principal components; each component's
/// sign is fixed so that its largest-magnitude loading is positive.
pub fn pca2<T: Copy + Into<f64>>(x: ArrayView2<T>) -> Result<(Vec<f64>, Vec<f64>)> {
    let x = crate::array::tensor_f64(x);
    let n = x.size()[0];
    let centred = &x - x.mean_dim(0, true, Kind::Double);
    let cov = centred.tr().matmul(&centred) / (n.max(2) - 1) as f64;
    let (_, vecs) = cov.f_linalg_eigh("L")?;
    let d = vecs.size()[1];
    let mut out = Vec::new();
    for k in [d - 1, d - 2] {
        if k < 0 {
            out.push(vec![0.0; n as usize]);
            continue;
        }
        let mut v = vecs.select(1, k);
        let big = v.abs().argmax(0, false).int64_value(&[]);
        if v.double_value(&[big]) < 0.0 {
            v = -v;
        }
        out.push(Vec::<f64>::try_from(centred.mv(&v))?);
    }
    let second = out.pop().unwrap_or_default();
    let first = out.pop().unwrap_or_default();
    Ok((first, second))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points on the line y = 2x (plus a small orthogonal wobble): the first component carries
    /// the spread along the line, the second only the wobble.
    #[test]
    fn first_component_follows_the_line() {
        let pts: Vec<f64> = (0..20)
            .flat_map(|i| {
                let t = i as f64 - 9.5;
                let w = if i % 2 == 0 { 0.01 } else { -0.01 };
                [t - 2.0 * w, 2.0 * t + w]
            })
            .collect();
        let x = ndarray::Array2::from_shape_vec((20, 2), pts).unwrap();
        let (a, b) = pca2(x.view()).unwrap();
        let var = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64;
        assert!(var(&a) > 1000.0 * var(&b), "{} vs {}", var(&a), var(&b));
        assert!(
            a[19] > a[0],
            "sign: the largest loading is positive, so scores grow along the line"
        );
    }
}

//! k-means with k-means++ seeding (Arthur & Vassilvitskii, 2007), Lloyd iterations, seeded.
//! Written by hand for the same reason as DBSCAN: a few dozen lines against the linfa stack.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use ndarray::ArrayView2;

use super::dbscan::{dist2, flat, rows};
use crate::error::{Error, Result};

/// Cluster the rows of `x` (n points × d) into `k` groups. Returns labels and the `k × d`
/// centroids, row-major.
pub fn kmeans(
    x: ArrayView2<f32>,
    k: usize,
    iters: usize,
    seed: u64,
) -> Result<(Vec<usize>, Vec<f32>)> {
    let (data, d) = flat(&x)?;
    let pts = rows(&data, d)?;
    if k == 0 || k > pts.len() {
        return Err(Error::invalid(
            "k",
            format!("must be in 1..={}, got {k}", pts.len()),
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut centroids: Vec<Vec<f32>> = vec![pts[rng.random_range(0..pts.len())].to_vec()];
    let mut best: Vec<f64> = pts.iter().map(|p| dist2(p, &centroids[0])).collect();
    while centroids.len() < k {
        let total: f64 = best.iter().sum();
        let next = if total > 0.0 {
            let mut u = rng.random::<f64>() * total;
            best.iter()
                .position(|&w| {
                    u -= w;
                    u <= 0.0
                })
                .unwrap_or(pts.len() - 1)
        } else {
            rng.random_range(0..pts.len())
        };
        centroids.push(pts[next].to_vec());
        for (b, p) in best.iter_mut().zip(&pts) {
            *b = b.min(dist2(p, &centroids[centroids.len() - 1]));
        }
    }
    let mut labels = vec![0usize; pts.len()];
    for _ in 0..iters.max(1) {
        let mut changed = false;
        for (l, p) in labels.iter_mut().zip(&pts) {
            let nearest = (0..k)
                .min_by(|&a, &b| dist2(p, &centroids[a]).total_cmp(&dist2(p, &centroids[b])))
                .unwrap_or(0);
            changed |= *l != nearest;
            *l = nearest;
        }
        for (c, centroid) in centroids.iter_mut().enumerate() {
            let members: Vec<&[f32]> = pts
                .iter()
                .zip(&labels)
                .filter(|(_, &l)| l == c)
                .map(|(p, _)| *p)
                .collect();
            if members.is_empty() {
                continue;
            }
            for (j, v) in centroid.iter_mut().enumerate() {
                *v = members.iter().map(|m| m[j]).sum::<f32>() / members.len() as f32;
            }
        }
        if !changed {
            break;
        }
    }
    Ok((labels, centroids.concat()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_separated_groups_deterministically() {
        let mut data = Vec::new();
        for g in 0..3 {
            for i in 0..20 {
                data.push(g as f32 * 10.0 + (i % 5) as f32 * 0.1);
                data.push((i / 5) as f32 * 0.1);
            }
        }
        let (labels, cents) = kmeans(crate::cluster::points(&data, 2).unwrap(), 3, 50, 7).unwrap();
        for g in 0..3 {
            let l = labels[g * 20];
            assert!(labels[g * 20..(g + 1) * 20].iter().all(|&x| x == l));
        }
        let mut firsts: Vec<usize> = (0..3).map(|g| labels[g * 20]).collect();
        firsts.sort();
        firsts.dedup();
        assert_eq!(firsts.len(), 3);
        assert_eq!(cents.len(), 6);
        assert_eq!(
            kmeans(crate::cluster::points(&data, 2).unwrap(), 3, 50, 7)
                .unwrap()
                .0,
            labels
        );
        assert!(kmeans(crate::cluster::points(&data, 2).unwrap(), 0, 5, 0).is_err());
    }
}

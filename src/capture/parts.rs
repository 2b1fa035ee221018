//! The per-parameter pieces of a capture, collected batch by batch, and when they are projected:
//! rows wait in groups over all parameters, each group projected as it fills (projection
//! scheduling), then everything stacks into a [`Captured`].

use tch::{Device, Kind, Tensor};

use super::gradients::{ghost_for, is_linear_weight, per_sample, Layers, PerSample};
use super::probes::scalar_output;
use super::projection::{project_cached, Projection, ProjectionCache, ProjectionKind};
use super::{memory, CaptureOptions, Captured, OutputKind};
use crate::batch::Batch;
use crate::error::Result;
use crate::model::tape::Tape;
use crate::model::Model;

/// Per-parameter pieces of a capture, collected chunk by chunk (chunk-major, probe-minor).
pub(super) struct Parts<'a> {
    params: &'a [(String, Tensor)],
    names: Vec<String>,
    /// The lowest block of the selected parameters: the forward below it records nothing.
    first: usize,
    pub(super) use_ghost: Vec<bool>,
    n_out: usize,
    kind: Kind,
    device: Device,
    jac: Vec<Vec<Tensor>>,
    ghost: Vec<Vec<(Tensor, Tensor)>>,
    /// Kronecker factors (P_x, P_g) of the Linear weights projected that way.
    kron: Vec<Option<(Tensor, Tensor)>>,
    /// Rows waiting to be projected as one group (over all parameters).
    pending: Vec<Vec<Tensor>>,
    projected: Vec<Vec<Tensor>>,
    /// Projection blocks kept between batches.
    blocks: ProjectionCache,
}

impl<'a> Parts<'a> {
    pub(super) fn new(
        model: &Model,
        params: &'a [(String, Tensor)],
        opts: &CaptureOptions,
        n_out: usize,
        device: Device,
    ) -> Parts<'a> {
        let empty = || (0..params.len()).map(|_| Vec::new()).collect::<Vec<_>>();
        Parts {
            params,
            names: params.iter().map(|(n, _)| n.clone()).collect(),
            first: model.first_block_of(params.iter().map(|(n, _)| n.as_str())),
            use_ghost: params
                .iter()
                // A projection needs every per-sample gradient: with one, `auto` materialises
                // all layers (ghost layers would stay unprojected).
                .map(|(n, t)| {
                    opts.projection.is_none()
                        && ghost_for(
                            opts.method,
                            n,
                            t,
                            model.cfg.max_len,
                            model.cfg.tie_embeddings,
                        )
                })
                .collect(),
            kron: params
                .iter()
                .map(|(n, t)| {
                    let pr = opts
                        .projection
                        .filter(|p| p.kind == ProjectionKind::Kronecker)?;
                    is_linear_weight(n, t).then(|| {
                        let sz = t.size();
                        pr.kronecker_factors(n, (sz[0], sz[1]), t.kind(), device)
                    })
                })
                .collect(),
            n_out,
            kind: params[0].1.kind(),
            device,
            jac: empty(),
            ghost: (0..params.len()).map(|_| Vec::new()).collect(),
            pending: empty(),
            projected: empty(),
            blocks: ProjectionCache::new(memory::cache_room(
                opts,
                params.iter().map(|(_, t)| t.numel() as u64).sum(),
                params[0].1.kind().elt_size_in_bytes() as u64,
                device,
            )),
        }
    }

    /// One backward pass for one sample (the oracle).
    pub(super) fn exact(
        &mut self,
        model: &Model,
        b: &Batch,
        output: OutputKind,
        probe: Option<(&Tensor, f64)>,
    ) -> Result<()> {
        let f = scalar_output(model, b, output, probe, None, self.first, self.kind)?;
        let refs: Vec<&Tensor> = self.params.iter().map(|(_, t)| t).collect();
        let grads = Tensor::f_run_backward(&[&f], &refs, false, false)?;
        for (k, g) in grads.into_iter().enumerate() {
            // Undefined: the parameter took no part (an expert this sample did not use).
            let g = if g.defined() {
                g
            } else {
                self.params[k].1.zeros_like()
            };
            let g = match &self.kron[k] {
                // P_gᵀ G P_x: what the batched path forms from the projected factors.
                Some((px, pg)) => pg.tr().matmul(&g).matmul(px),
                None => g,
            };
            self.jac[k].push(g.reshape([1, -1]));
        }
        Ok(())
    }

    /// One batched backward pass; per-sample pieces from the tape.
    pub(super) fn batched(
        &mut self,
        model: &Model,
        b: &Batch,
        output: OutputKind,
        probe: Option<(&Tensor, f64)>,
    ) -> Result<()> {
        let tape = Tape::new();
        let f = scalar_output(model, b, output, probe, Some(&tape), self.first, self.kind)?;
        let records = tape.take();
        let zs: Vec<&Tensor> = records.iter().map(|r| &r.z).collect();
        let gs = Tensor::f_run_backward(&[&f], &zs, false, false)?;
        let (bsz, t) = b.ids.size2()?;
        let layers = Layers {
            names: &self.names,
            use_ghost: &self.use_ghost,
            kron: &self.kron,
        };
        let per = per_sample(&records, &gs, bsz, t, model, &layers)?;
        let (kind, device) = (self.kind, self.device);
        for (k, item) in per.into_iter().enumerate() {
            match item {
                Some(PerSample::Jac(j)) => self.jac[k].push(j),
                Some(PerSample::Ghost(x, g)) => self.ghost[k].push((x, g)),
                // The parameter took no part (an expert no sample of this batch used).
                None if self.use_ghost[k] => {
                    let s = self.params[k].1.size();
                    self.ghost[k].push((
                        Tensor::zeros([bsz, 1, s[1]], (kind, device)),
                        Tensor::zeros([bsz, 1, s[0]], (kind, device)),
                    ));
                }
                None => {
                    let width = match &self.kron[k] {
                        Some((px, pg)) => px.size()[1] * pg.size()[1],
                        None => self.params[k].1.numel() as i64,
                    };
                    self.jac[k].push(Tensor::zeros([bsz, width], (kind, device)));
                }
            }
        }
        Ok(())
    }

    /// Projection is row-wise, so gradients are projected in groups of chunks as they come:
    /// memory holds about `group` values unprojected, over all parameters together, not n × P,
    /// and the projection matrix (P × k, the costly part) is generated once per group, not per
    /// chunk. (A group per parameter let every small parameter wait: on SmolLM2's 210 Linear
    /// layers all 128 samples waited, 54 GB, and the OOM killer ended the run.)
    pub(super) fn project_ready(&mut self, pr: &Projection, last: bool, group: i64) -> Result<()> {
        let n_out = self.n_out;
        for (k, parts) in self.jac.iter_mut().enumerate() {
            if self.use_ghost[k] || parts.len() < n_out {
                continue;
            }
            let mut tail = parts.split_off(parts.len() - n_out);
            self.pending[k].push(match tail.len() {
                1 => tail.remove(0),
                _ => Tensor::cat(&tail, 1),
            });
        }
        let waiting: i64 = self
            .pending
            .iter()
            .flatten()
            .map(Tensor::numel)
            .sum::<usize>() as i64;
        if !last && waiting < group {
            return Ok(());
        }
        for k in 0..self.pending.len() {
            if self.pending[k].is_empty() {
                continue;
            }
            let rows = std::mem::take(&mut self.pending[k]);
            // Kronecker-projected layers arrive projected.
            if self.kron[k].is_some() {
                self.projected[k].extend(rows);
            } else {
                let names = &self.names[k];
                let out = project_cached(&rows, names, pr, n_out, &mut self.blocks)?;
                self.projected[k].extend(out);
            }
        }
        Ok(())
    }

    /// Replace every per-sample gradient piece held (unprojected, or projected) by its row
    /// norms (rows, 1): Σ over pieces of their squares is each sample's ‖J_i‖² per parameter.
    /// Pieces still waiting for their projection group stay until they are projected.
    pub(super) fn reduce_to_norms(&mut self) {
        let norms = |t: &mut Tensor| {
            if t.size()[1] != 1 || t.kind() != Kind::Double {
                *t = t
                    .to_kind(Kind::Double)
                    .square()
                    .sum_dim_intlist(1, true, Kind::Double)
                    .sqrt();
            }
        };
        for k in 0..self.params.len() {
            self.jac[k].iter_mut().for_each(norms);
            self.projected[k].iter_mut().for_each(norms);
        }
    }

    /// Stack the pieces: a Jacobian (n, P) (or (n, k) projected) or ghost factors per parameter.
    pub(super) fn finish(self, projected: bool, n: usize) -> Captured {
        let mut jac = Vec::with_capacity(self.params.len());
        let mut ghost = Vec::with_capacity(self.params.len());
        for k in 0..self.params.len() {
            if !self.ghost[k].is_empty() {
                ghost.push(Some(stack_ghost(&self.ghost[k], self.n_out)));
                jac.push(None);
            } else if projected {
                jac.push(Some(Tensor::cat(&self.projected[k], 0)));
                ghost.push(None);
            } else {
                // chunk-major, probe-minor: concatenate probes along the parameter axis per chunk.
                let by_chunk: Vec<Tensor> = self.jac[k]
                    .chunks(self.n_out)
                    .map(|ps| Tensor::cat(ps, 1))
                    .collect();
                jac.push(Some(Tensor::cat(&by_chunk, 0)));
                ghost.push(None);
            }
        }
        Captured {
            names: self.names,
            jac,
            ghost,
            n,
            norms_only: false,
        }
    }
}

/// Ghost factors of one parameter per output direction, chunks stacked: positions padded to the
/// widest chunk (its longest text, twice that for a weight called twice) so chunks stack. Not
/// to max_len: kernels take factors of any two widths, and SmolLM2's 8,192 positions made 8
/// samples of every Linear layer 100 GB.
fn stack_ghost(parts: &[(Tensor, Tensor)], n_out: usize) -> Vec<(Tensor, Tensor)> {
    let width = parts.iter().map(|(x, _)| x.size()[1]).max().unwrap_or(0);
    // Padded positions have zero factors on the feature side, so they add nothing (token ids
    // are padded with 0).
    let pad = |t: &Tensor| {
        let mut shape = t.size();
        shape[1] = width - shape[1];
        Tensor::cat(
            &[
                t.shallow_clone(),
                Tensor::zeros(shape.as_slice(), (t.kind(), t.device())),
            ],
            1,
        )
    };
    // parts are ordered chunk-major, probe-minor: regroup per probe, stacking chunks.
    (0..n_out)
        .map(|p| {
            let xs: Vec<Tensor> = parts
                .iter()
                .skip(p)
                .step_by(n_out)
                .map(|(x, _)| pad(x))
                .collect();
            let gs: Vec<Tensor> = parts
                .iter()
                .skip(p)
                .step_by(n_out)
                .map(|(_, g)| pad(g))
                .collect();
            (Tensor::cat(&xs, 0), Tensor::cat(&gs, 0))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{capture_batch, Selection};
    use tch::nn;

    /// Rows wait for their projection until the values waiting over all parameters make a
    /// group: with a group of one sample's gradient, every sample is projected as it comes (a
    /// group per parameter kept every row of this model waiting).
    #[test]
    fn waiting_rows_are_bounded_over_all_parameters() {
        let cfg = crate::model::ModelConfig::default();
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Model::new(&vs.root(), &cfg).unwrap();
        let params = Selection::default().select(&vs).unwrap();
        let pr = Projection {
            kind: ProjectionKind::Gaussian,
            dim: 4,
            seed: 1,
        };
        let opts = CaptureOptions {
            projection: Some(pr),
            ..Default::default()
        };
        let one_sample: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
        let mut parts = Parts::new(&model, &params, &opts, 1, Device::Cpu);
        for s in [[5u32, 6, 7].as_slice(), &[8, 9], &[10, 11, 12, 13]] {
            let b = capture_batch(&model, &[s], 0, Device::Cpu);
            parts
                .batched(&model, &b, OutputKind::MeanLoss, None)
                .unwrap();
            parts.project_ready(&pr, false, one_sample).unwrap();
            let waiting: usize = parts.pending.iter().flatten().map(Tensor::numel).sum();
            assert_eq!(waiting, 0, "rows still waiting after a whole sample");
        }
        assert!(parts.projected.iter().all(|p| p.len() == 3));
    }
}

//! Per-sample gradients J(X) = ∇_θ f(X; θ) (n × P) of a scalar output per sample, for a chosen
//! set of parameters, by three methods that give the same kernel:
//!
//! - [`Method::Exact`]: one backward pass per sample, the trusted oracle (slow).
//! - [`Method::Batched`]: one forward/backward per batch; a [`crate::model::tape::Tape`] records every Linear,
//!   Embedding and LayerNorm input and output gradient, and per-sample gradients are formed layer
//!   by layer (Σ_t g_t x_tᵀ for a Linear weight, scatter-adds for embeddings, Σ_t g_t ⊙ x̂_t for a
//!   LayerNorm gain).
//! - [`Method::Ghost`]: like `Batched`, but Linear weight kernels come straight from the inputs' and
//!   output gradients' Gram matrices, K_ij = Σ_{t,s} (x_it·x_js)(g_it·g_js), without forming the
//!   (out × in) per-sample gradients; [`Method::Auto`] picks ghost per layer where T²(in + out) <
//!   in·out.
//!
//! Optionally, per-sample gradients are projected to k dimensions ([`projection`]: sparse JL,
//! Gaussian, Rademacher or Kronecker-factored, so E[K̂] = K); the matrix for a parameter depends
//! only on (seed, parameter name, row block), so processes, shards and devices agree.
//!
//! Outputs f (`--output`): the mean token loss of the sample (default), the summed
//! log-likelihood, or the trace over output logits, estimated with `probes` Rademacher output
//! directions v_p (Hutchinson): Σ_o J_o J_oᵀ ≈ (1/k) Σ_p (v_pᵀJ)(v_pᵀJ)ᵀ.
//!
//! During capture the Switch capacity limit is lifted and the model runs in evaluation mode, so a
//! sample's output does not depend on the other samples of its batch; BERT masks are seeded per
//! sample for the same reason.

mod batches;
mod gradients;
pub mod job;
pub mod memory;
mod parts;
mod probes;
pub mod projection;
mod selection;

pub use batches::capture_batch;
pub use projection::{project, Projection, ProjectionKind, DRAWS, SPARSE_NONZEROS};
pub use selection::{glob_match, Selection, RECOMMENDED_LAST_BLOCKS};

use tch::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::Model;
use batches::by_length;
use parts::Parts;
use probes::trace_probes;

/// The scalar output per sample.
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
pub enum OutputKind {
    /// Mean token loss of the sample (default).
    #[default]
    MeanLoss,
    /// Summed log-likelihood of the sample's tokens.
    SumLoglik,
    /// Trace over output logits (Hutchinson estimate with `probes` directions).
    LogitTrace,
}

/// How per-sample gradients are computed.
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
pub enum Method {
    /// One backward pass per sample: the oracle.
    Exact,
    /// Per-layer per-sample gradients from one batched backward pass (default).
    #[default]
    Batched,
    /// Linear weight kernels from Gram matrices, without per-sample gradients.
    Ghost,
    /// Ghost where it is cheaper, batched elsewhere.
    Auto,
}

/// Capture settings.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// The scalar output per sample.
    pub output: OutputKind,
    /// How per-sample gradients are computed.
    pub method: Method,
    /// Project gradients to fewer dimensions.
    pub projection: Option<Projection>,
    /// Samples per forward/backward pass.
    pub batch: usize,
    /// Output directions of the logit-trace estimate.
    pub probes: usize,
    /// Seed of BERT masks and logit-trace probes.
    pub seed: u64,
    /// With a projection: unprojected gradient values held per parameter before a group of
    /// chunks is projected (default 2^28, 1 GiB in f32). Larger groups generate the projection
    /// matrix fewer times; smaller ones use less memory. Results do not depend on it.
    pub project_group: i64,
    /// Keep only each sample's gradient norm per parameter (and probe), reduced batch by batch,
    /// so the n × P Jacobian is never held: for Θ_ii (`ntk --diagonal`).
    pub norms_only: bool,
    /// Memory budget in bytes: batches are cut (longer texts in smaller ones, `batch` at most)
    /// so that what the capture holds and one batch needs stay within it ([`memory`]); `None`:
    /// batches of `batch`.
    pub memory: Option<u64>,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            output: OutputKind::MeanLoss,
            method: Method::Batched,
            projection: None,
            batch: 32,
            probes: 8,
            seed: 0,
            project_group: 1 << 28,
            norms_only: false,
            memory: None,
        }
    }
}

/// Per-sample information a set of samples yields, per selected parameter:
/// a Jacobian block (n, P_p) (or (n, k) projected), or ghost factors for a Linear weight.
pub struct Captured {
    /// Parameter names, in selection order.
    pub names: Vec<String>,
    /// Per parameter: the (n, P_p) Jacobian (or (n, k) projected); `None` for ghost.
    pub jac: Vec<Option<Tensor>>,
    /// Per output direction (one, or one per logit-trace probe): (x (n, T, in), g (n, T, out)) in
    /// padded sample × position layout, for ghost kernels; the kernel is the sum over directions.
    pub ghost: Vec<Option<Vec<(Tensor, Tensor)>>>,
    /// Number of samples.
    pub n: usize,
    /// `jac` holds each sample's gradient norms (n, directions), not its gradients: enough for
    /// Θ_ii and nothing else ([`CaptureOptions::norms_only`]).
    pub norms_only: bool,
}

/// Capture per-sample gradient information of `seqs` for the selected parameters. What a sample
/// contributes depends only on the sample (see [`capture_batch`]), so shards of a set capture
/// exactly what the whole set would.
pub fn capture(
    model: &Model,
    params: &[(String, Tensor)],
    seqs: &[&[u32]],
    opts: &CaptureOptions,
    device: Device,
    on_progress: &dyn Fn(usize),
) -> Result<Captured> {
    if seqs.is_empty() {
        return Err(Error::invalid("samples", "no samples to capture"));
    }
    if opts.projection.is_some() && opts.method == Method::Ghost {
        return Err(Error::invalid(
            "--project",
            "ghost kernels form no per-sample gradients to project; use --method batched or auto",
        ));
    }
    let kind = params[0].1.kind();
    let (order, lengths) = by_length(model, seqs);
    let sorted: Vec<&[u32]> = order.iter().map(|&i| seqs[i]).collect();
    let seqs = sorted.as_slice();
    // The longest text, in positions: what ghost factors and logit-trace probes cover.
    let longest = lengths.last().copied().unwrap_or(1);
    let probes = (opts.output == OutputKind::LogitTrace).then(|| {
        trace_probes(
            model,
            (opts.probes.max(1), longest as i64),
            opts.seed,
            kind,
            device,
        )
    });
    let n_out = if opts.output == OutputKind::LogitTrace {
        opts.probes.max(1)
    } else {
        1
    };
    let grouped = memory::with_groups(opts, params, device);
    let opts = &grouped;
    let mut parts = Parts::new(model, params, opts, n_out, device);
    let mut done = 0;
    let batch = if opts.method == Method::Exact {
        1
    } else {
        opts.batch.max(1)
    };
    let fp = memory::Footprint::of(model, params, opts, &parts.use_ghost, longest, device);
    let plan = memory::plan(&fp, &lengths, opts.memory, batch)?;
    for range in plan {
        let chunk = &seqs[range];
        let b = capture_batch(model, chunk, opts.seed, device);
        for p in 0..n_out {
            let probe = probes.as_ref().map(|v| v.get(p as i64));
            let probe = probe.as_ref().map(|v| (v, 1.0 / (n_out as f64).sqrt()));
            if opts.method == Method::Exact {
                parts.exact(model, &b, opts.output, probe)?;
            } else {
                parts.batched(model, &b, opts.output, probe)?;
            }
        }
        if let Some(pr) = &opts.projection {
            let last = done + chunk.len() == seqs.len();
            parts.project_ready(pr, last, opts.project_group)?;
        }
        if opts.norms_only {
            parts.reduce_to_norms();
        }
        done += chunk.len();
        on_progress(done);
    }
    let mut c = parts.finish(opts.projection.is_some(), seqs.len());
    c.norms_only = opts.norms_only;
    c.unsort(&order, device);
    Ok(c)
}

impl Captured {
    /// Put rows captured in the order `order` (row r is sample `order[r]`) back in sample order.
    fn unsort(&mut self, order: &[usize], device: Device) {
        if order.iter().enumerate().all(|(r, &i)| r == i) {
            return;
        }
        let mut inv = vec![0i64; order.len()];
        for (r, &i) in order.iter().enumerate() {
            inv[i] = r as i64;
        }
        let inv = Tensor::from_slice(&inv).to_device(device);
        for t in self.jac.iter_mut().flatten() {
            *t = t.index_select(0, &inv);
        }
        for dirs in self.ghost.iter_mut().flatten() {
            for (x, g) in dirs.iter_mut() {
                *x = x.index_select(0, &inv);
                *g = g.index_select(0, &inv);
            }
        }
    }
}

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

pub mod job;
pub mod memory;
pub mod projection;

pub use projection::{project, Projection, ProjectionKind, DRAWS, SPARSE_NONZEROS};
use projection::{project_cached, ProjectionCache};

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{nn, Device, Kind, Tensor};

use crate::batch::{make_batch_keyed, Batch};
use crate::error::{Error, Result};
use crate::model::tape::{Record, RecordKind, Tape};
use crate::model::{token_losses, Forward, Model};

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

/// Which parameters: name globs (`*` any run of characters, `?` one), block ranges, experts and
/// the last k blocks, combined with OR, then narrowed to MLPs by `mlp_only`; empty means every
/// trainable parameter.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selection {
    /// Parameter name globs.
    pub globs: Vec<String>,
    /// Inclusive block range: every parameter under `h.{i}.` for i in the range.
    pub layers: Option<(i64, i64)>,
    /// (block, expert): the parameters of one CSE or Switch expert.
    pub expert: Option<(i64, i64)>,
    /// The last k transformer blocks (resolved to a block range by [`Selection::resolve`]).
    pub last_blocks: Option<i64>,
    /// Only MLP (FFN and expert) parameters, `*.mlp.*`, of whatever the rest selects.
    pub mlp_only: bool,
}

/// Transformer blocks of [`Selection::recommended`] (their MLPs): the kernel-options study in the
/// README found the MLPs of the last two blocks, with cosine normalisation, the choice whose kernel
/// was not degenerate on the demo models and SmolLM2-135M (with all parameters the embeddings'
/// nearly orthogonal gradients dominate).
pub const RECOMMENDED_LAST_BLOCKS: i64 = 2;

/// `*` and `?` glob match.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

impl Selection {
    /// The default of `ntk`, `capture` and the specs: the MLPs of the last
    /// [`RECOMMENDED_LAST_BLOCKS`] transformer blocks. (`Selection::default()` is every parameter.)
    pub fn recommended() -> Selection {
        Selection {
            last_blocks: Some(RECOMMENDED_LAST_BLOCKS),
            mlp_only: true,
            ..Selection::default()
        }
    }

    /// This selection, or [`Selection::recommended`] when it names nothing and `all` is false.
    pub fn or_recommended(self, all: bool) -> Selection {
        if self.is_all() && !all {
            Selection::recommended()
        } else {
            self
        }
    }

    /// `last_blocks` turned into a block range for a model of `n_layer` blocks.
    pub fn resolve(&self, n_layer: i64) -> Result<Selection> {
        let Some(k) = self.last_blocks else {
            return Ok(self.clone());
        };
        if self.layers.is_some() {
            return Err(Error::invalid(
                "--last-blocks",
                "give --layers or --last-blocks, not both",
            ));
        }
        if k < 1 || k > n_layer {
            return Err(Error::invalid(
                "--last-blocks",
                format!("{k} is not between 1 and the model's {n_layer} blocks"),
            ));
        }
        Ok(Selection {
            layers: Some((n_layer - k, n_layer - 1)),
            last_blocks: None,
            ..self.clone()
        })
    }

    /// Whether nothing narrows the selection.
    pub fn is_all(&self) -> bool {
        self.names_all() && !self.mlp_only
    }

    /// Whether no glob, range, expert or last blocks are named.
    fn names_all(&self) -> bool {
        self.globs.is_empty()
            && self.layers.is_none()
            && self.expert.is_none()
            && self.last_blocks.is_none()
    }

    /// Whether the parameter `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        if self.mlp_only && !name.contains(".mlp.") {
            return false;
        }
        if self.names_all() {
            return true;
        }
        let block: Option<i64> = name
            .strip_prefix("h.")
            .and_then(|r| r.split('.').next())
            .and_then(|s| s.parse().ok());
        self.globs.iter().any(|g| glob_match(g, name))
            || self
                .layers
                .is_some_and(|(a, b)| block.is_some_and(|i| i >= a && i <= b))
            || self
                .expert
                .is_some_and(|(l, e)| block == Some(l) && name.contains(&format!(".experts.{e}.")))
    }

    /// The selected trainable parameters of `vs`, sorted by name.
    pub fn select(&self, vs: &nn::VarStore) -> Result<Vec<(String, Tensor)>> {
        self.select_from(crate::model::named_variables(vs))
    }

    /// [`Selection::select`] over a list of named parameters (e.g. a TorchScript module's).
    pub fn select_from(&self, named: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        if let Some((l, e)) = self.expert {
            check_expert(&named, l, e)?;
        }
        let params: Vec<(String, Tensor)> = named
            .into_iter()
            .filter(|(n, t)| t.requires_grad() && self.matches(n))
            .collect();
        if params.is_empty() {
            return Err(Error::invalid(
                self.options_given(),
                "the selection matches no trainable parameter",
            ));
        }
        Ok(params)
    }

    /// The options that made this selection, as the command line spells them (`--params`
    /// where none narrows it).
    fn options_given(&self) -> String {
        let given: Vec<&str> = [
            (!self.globs.is_empty(), "--params"),
            (self.layers.is_some(), "--layers"),
            (self.expert.is_some(), "--expert"),
            (self.last_blocks.is_some(), "--last-blocks"),
            (self.mlp_only, "--mlp-only"),
        ]
        .into_iter()
        .filter_map(|(on, flag)| on.then_some(flag))
        .collect();
        if given.is_empty() {
            "--params".into()
        } else {
            given.join(", ")
        }
    }
}

/// `--expert L:E` must name an expert of the model: refused, naming the option and the experts
/// block L has (none in a dense block), when no parameter `h.L.mlp.experts.E.*` exists.
fn check_expert(named: &[(String, Tensor)], l: i64, e: i64) -> Result<()> {
    let prefix = format!("h.{l}.mlp.experts.");
    let experts: std::collections::BTreeSet<i64> = named
        .iter()
        .filter_map(|(n, _)| n.strip_prefix(&prefix)?.split('.').next()?.parse().ok())
        .collect();
    if experts.contains(&e) {
        return Ok(());
    }
    let has = if experts.is_empty() {
        format!("block {l} of this model has no experts (a dense FFN, or no block {l}); select its parameters with --layers {l}..{l} or --params")
    } else {
        let list: Vec<String> = experts.iter().map(|x| x.to_string()).collect();
        format!("block {l} has experts {}", list.join(", "))
    };
    Err(Error::invalid(
        "--expert",
        format!("{l}:{e} names no expert of this model: {has}"),
    ))
}

/// A batch of samples for capture. A BERT sample's mask is seeded by (`seed`, its tokens), so a
/// sample is masked the same way in every set, shard, batch or cross set it appears in (keys by
/// position in a list would mask one sample differently in X and in Y of a cross-kernel).
pub fn capture_batch(model: &Model, seqs: &[&[u32]], seed: u64, device: Device) -> Batch {
    let keys: Vec<u64> = seqs.iter().map(|s| sample_key(s)).collect();
    make_batch_keyed(&model.cfg, seqs, &keys, seed, device)
}

/// The mask key of a sample: a stable hash of its token ids.
fn sample_key(s: &[u32]) -> u64 {
    let bytes: Vec<u8> = s.iter().flat_map(|t| t.to_le_bytes()).collect();
    crate::seed::stable_hash(0, &bytes)
}

/// Rademacher output directions of the logit-trace estimate, (probes, len, vocab) for the first
/// `len` positions. Drawn with our own seeded generator, not libtorch's process-wide one, so that
/// concurrent work cannot change them and every process draws the same; one stream per probe,
/// position-major, so a position's direction does not depend on `len` (sets of different
/// longest texts share theirs) and only the positions used are drawn, not max_len of them
/// (SmolLM2: 8,192 × 49,152 signs per probe).
fn trace_probes(
    model: &Model,
    (probes, len): (usize, i64),
    seed: u64,
    kind: Kind,
    device: Device,
) -> Tensor {
    let v = model.cfg.vocab_size;
    let per_probe = (len * v) as usize;
    let mut signs: Vec<f32> = Vec::with_capacity(probes * per_probe);
    for p in 0..probes {
        let key = [b"logit-trace".as_slice(), &(p as u64).to_le_bytes()].concat();
        let mut rng = ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(seed, &key));
        signs.extend((0..per_probe).map(|_| if rng.random::<bool>() { 1.0f32 } else { -1.0 }));
    }
    Tensor::from_slice(&signs)
        .view([probes as i64, len, v])
        .to_kind(kind)
        .to_device(device)
}

/// The scalar output of every sample of a batch, (b,); `probe` is one logit-trace direction
/// (max_len, vocab) and its scale.
fn outputs(
    kind: OutputKind,
    logits: &Tensor,
    batch: &Batch,
    probe: Option<(&Tensor, f64)>,
) -> Tensor {
    match kind {
        OutputKind::MeanLoss => {
            let (_, per_seq, counts) = token_losses(logits, &batch.targets);
            per_seq / counts.clamp_min(1.0)
        }
        OutputKind::SumLoglik => {
            let (_, per_seq, _) = token_losses(logits, &batch.targets);
            -per_seq
        }
        OutputKind::LogitTrace => {
            // f_p(x_i) = Σ_{t,o} v_p[t,o] logits_i[t,o] over real positions, scaled by 1/√k so that
            // summing the k probes' kernels gives their mean.
            let (v, scale) = probe.expect("a probe for the logit trace");
            let t = logits.size()[1];
            let m = batch.mask.to_kind(logits.kind()).unsqueeze(-1); // (b, t, 1)
            let vt = v.narrow(0, 0, t).unsqueeze(0); // (1, t, V)
            (logits * m * vt).sum_dim_intlist([1i64, 2].as_slice(), false, logits.kind()) * scale
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

/// The order of `seqs` by encoded length (stable) and the lengths in that order. Samples are
/// batched in this order, so a batch pads to texts of about its own length: on Brown + fortunes
/// with SmolLM2 the padded tokens were half of every batch. What a sample contributes does not
/// depend on its batch; rows go back to the caller's order.
fn by_length(model: &Model, seqs: &[&[u32]]) -> (Vec<usize>, Vec<usize>) {
    let encoded: Vec<usize> = seqs
        .iter()
        .map(|s| crate::batch::encoded_len(&model.cfg, s.len()))
        .collect();
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| encoded[i]);
    let lengths = order.iter().map(|&i| encoded[i]).collect();
    (order, lengths)
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

/// Σ_i f(x_i) over a batch, from an evaluation-mode forward pass without the Switch capacity
/// limit (so samples do not interact), recorded on `tape` when given. Below block `first` (the
/// lowest the selected parameters sit in) the forward runs without recording gradients, so the
/// backward stops there.
fn scalar_output(
    model: &Model,
    b: &Batch,
    output: OutputKind,
    probe: Option<(&Tensor, f64)>,
    tape: Option<&Tape>,
    first: usize,
    kind: Kind,
) -> Result<Tensor> {
    let fwd = Forward {
        train: false,
        capture: false,
        capacity: false,
        tape,
        head: true,
    };
    let out = if first > 0 {
        let x = model.hidden_before(&b.ids, &b.mask, first, false)?;
        model.forward_from(first, x, &b.mask, &fwd)?
    } else {
        model.forward_with(&b.ids, &b.mask, &fwd)?
    };
    Ok(outputs(output, &out.logits, b, probe).sum(kind))
}

/// Per-parameter pieces of a capture, collected chunk by chunk (chunk-major, probe-minor).
struct Parts<'a> {
    params: &'a [(String, Tensor)],
    names: Vec<String>,
    /// The lowest block of the selected parameters: the forward below it records nothing.
    first: usize,
    use_ghost: Vec<bool>,
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
    fn new(
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
    fn exact(
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
    fn batched(
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
    fn project_ready(&mut self, pr: &Projection, last: bool, group: i64) -> Result<()> {
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
    fn reduce_to_norms(&mut self) {
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
    fn finish(self, projected: bool, n: usize) -> Captured {
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

/// A Linear layer's weight (out × in): what ghost kernels and Kronecker projections apply to.
fn is_linear_weight(name: &str, t: &Tensor) -> bool {
    name.ends_with(".weight")
        && t.dim() == 2
        && !name.starts_with("wte.")
        && !name.starts_with("wpe.")
}

/// Whether a parameter's kernel comes from ghost factors: Linear weights (Σ_{t,s} (x_it·x_js)
/// (g_it·g_js)) and the token embedding (Σ_{t,s} [id_it = id_js] (g_it·g_js), token matches
/// instead of a (V·d)-wide scatter). `ghost` takes every Linear weight and an untied embedding;
/// `auto` takes them where cheaper than per-sample gradients: T²(in + out) < in·out, T² < V.
/// A tied embedding also carries the output layer's term, T²(V + d) per pair against V·d per
/// sample, so both methods take it only where that is cheaper.
fn ghost_for(method: Method, name: &str, t: &Tensor, max_len: i64, tied: bool) -> bool {
    if t.dim() != 2 {
        return false;
    }
    let s = t.size();
    let t2 = max_len * max_len;
    let linear = is_linear_weight(name, t);
    let cheaper = t2 * (s[0] + s[1]) < s[0] * s[1];
    if name == "wte.weight" {
        return match (method, tied) {
            (Method::Ghost | Method::Auto, true) => cheaper,
            (Method::Ghost, false) => true,
            (Method::Auto, false) => t2 < s[0],
            _ => false,
        };
    }
    match method {
        Method::Ghost => linear,
        Method::Auto => linear && cheaper,
        _ => false,
    }
}

enum PerSample {
    Jac(Tensor),
    Ghost(Tensor, Tensor),
}

/// Scatter a record's rows into the padded (b, t, features) grid.
fn grid(v: &Tensor, rows: &Option<Tensor>, b: i64, t: i64) -> Tensor {
    let f = v.size()[1];
    match rows {
        None => v.view([b, t, f]),
        Some(r) => Tensor::zeros([b * t, f], (v.kind(), v.device()))
            .index_copy(0, r, v)
            .view([b, t, f]),
    }
}

/// How each selected parameter's per-sample pieces are formed.
struct Layers<'a> {
    names: &'a [String],
    /// Ghost factors instead of per-sample gradients.
    use_ghost: &'a [bool],
    /// Kronecker factors (P_x, P_g): the projected per-sample gradient instead.
    kron: &'a [Option<(Tensor, Tensor)>],
}

/// Per-sample gradients (b, P_p) of every selected parameter from one batch's records.
fn per_sample(
    records: &[Record],
    gs: &[Tensor],
    b: i64,
    t: i64,
    model: &Model,
    layers: &Layers,
) -> Result<Vec<Option<PerSample>>> {
    let mut acc = Acc::new(layers.names);
    for (rec, g) in records.iter().zip(gs) {
        let g = if g.defined() {
            g.shallow_clone()
        } else {
            rec.z.zeros_like()
        };
        match &rec.kind {
            RecordKind::Linear { weight, bias } => {
                let grid_g = grid(&g, &rec.rows, b, t); // (b, t, out)
                linear_pieces(
                    &mut acc,
                    rec,
                    grid_g,
                    (weight, bias.as_deref()),
                    layers,
                    (b, t),
                );
            }
            RecordKind::Embedding { weight, positions } => {
                let gg = g.view([b, t, -1]); // (b, t, d)
                embedding_pieces(
                    &mut acc,
                    rec,
                    &gg,
                    (weight, positions.as_deref()),
                    (model, layers),
                    (b, t),
                );
            }
            RecordKind::LayerNorm { weight, bias } => {
                let gg = grid(&g, &rec.rows, b, t);
                if acc.wants(weight).is_some() {
                    let xx = grid(&rec.x, &rec.rows, b, t);
                    let v = (&gg * xx).sum_dim_intlist(1, false, gg.kind());
                    acc.add(weight, PerSample::Jac(v));
                }
                if let Some(bias) = bias.as_ref().filter(|b| acc.wants(b).is_some()) {
                    acc.add(
                        bias,
                        PerSample::Jac(gg.sum_dim_intlist(1, false, gg.kind())),
                    );
                }
            }
        }
    }
    Ok(acc.acc)
}

/// Per-sample pieces of the selected parameters, summed over the records of one pass.
struct Acc<'n> {
    index: BTreeMap<&'n str, usize>,
    acc: Vec<Option<PerSample>>,
}

impl<'n> Acc<'n> {
    fn new(names: &'n [String]) -> Acc<'n> {
        Acc {
            index: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.as_str(), i))
                .collect(),
            acc: (0..names.len()).map(|_| None).collect(),
        }
    }

    /// The position of `name` among the selected parameters.
    fn wants(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    fn add(&mut self, name: &str, value: PerSample) {
        let Some(k) = self.wants(name) else {
            return;
        };
        self.acc[k] = Some(match (self.acc[k].take(), value) {
            (None, v) => v,
            (Some(PerSample::Jac(a)), PerSample::Jac(v)) => PerSample::Jac(a + v),
            (Some(PerSample::Ghost(xa, ga)), PerSample::Ghost(x, g)) => {
                // Two calls of one weight: their rows are both part of the sum over positions.
                // A tied embedding's token ids meet the output layer's gradients (b, t, V):
                // the ids become one-hot rows of that width.
                let (ga, g) = match (ga.kind() == Kind::Int64, g.kind() == Kind::Int64) {
                    (true, false) => (one_hot(&ga, &g), g),
                    (false, true) => {
                        let g = one_hot(&g, &ga);
                        (ga, g)
                    }
                    _ => (ga, g),
                };
                PerSample::Ghost(Tensor::cat(&[xa, x], 1), Tensor::cat(&[ga, g], 1))
            }
            (Some(a), _) => a,
        });
    }
}

/// Token ids (b, t) as one-hot rows (b, t, V) in the kind and on the device of `like` (b, t', V).
fn one_hot(ids: &Tensor, like: &Tensor) -> Tensor {
    let v = like.size()[2];
    ids.one_hot(v).to_kind(like.kind()).to_device(like.device())
}

/// A Linear call: weight gradients Σ_t g_t x_tᵀ per sample (or ghost factors), bias Σ_t g_t.
fn linear_pieces(
    acc: &mut Acc,
    rec: &Record,
    gg: Tensor,
    (weight, bias): (&str, Option<&str>),
    layers: &Layers,
    (b, t): (i64, i64),
) {
    if let Some(k) = acc.wants(weight) {
        let xx = grid(&rec.x, &rec.rows, b, t); // (b, t, in)
        if let Some((px, pg)) = &layers.kron[k] {
            // Σ_t (P_gᵀ g_t) ⊗ (P_xᵀ x_t): (b, k₂·k₁), the (out × in) gradient never formed.
            let (xp, gp) = (xx.matmul(px), gg.matmul(pg));
            let gw = Tensor::einsum("btl,btk->blk", &[&gp, &xp], None::<i64>);
            acc.add(weight, PerSample::Jac(gw.reshape([b, -1])));
        } else if layers.use_ghost[k] {
            acc.add(weight, PerSample::Ghost(xx, gg.shallow_clone()));
        } else {
            let gw = Tensor::einsum("bto,bti->boi", &[&gg, &xx], None::<i64>);
            acc.add(weight, PerSample::Jac(gw.reshape([b, -1])));
        }
    }
    if let Some(bn) = bias.filter(|bn| acc.wants(bn).is_some()) {
        acc.add(bn, PerSample::Jac(gg.sum_dim_intlist(1, false, gg.kind())));
    }
}

/// An embedding call: token-embedding rows scattered by id per sample, position rows padded
/// to max_len.
fn embedding_pieces(
    acc: &mut Acc,
    rec: &Record,
    gg: &Tensor,
    (weight, positions): (&str, Option<&str>),
    (model, layers): (&Model, &Layers),
    (b, t): (i64, i64),
) {
    let d = gg.size()[2];
    let ghost = acc.wants(weight).map(|k| layers.use_ghost[k]);
    if ghost == Some(true) {
        // Ghost factors: the output gradients and the token ids (matched, never scattered).
        acc.add(
            weight,
            PerSample::Ghost(gg.shallow_clone(), rec.x.view([b, t]).to_kind(Kind::Int64)),
        );
    } else if ghost == Some(false) {
        let v = model.cfg.vocab_size;
        let ids = rec.x.view([b, t]);
        let offs = Tensor::arange(b, (tch::Kind::Int64, ids.device())).unsqueeze(1) * v;
        let flat = (ids + offs).reshape([-1]);
        let ge = Tensor::zeros([b * v, d], (gg.kind(), gg.device())).index_add(
            0,
            &flat,
            &gg.reshape([-1, d]),
        );
        acc.add(weight, PerSample::Jac(ge.view([b, -1])));
    }
    if let Some(positions) = positions.filter(|p| acc.wants(p).is_some()) {
        let ml = model.cfg.max_len;
        let gp = Tensor::cat(
            &[
                gg.shallow_clone(),
                Tensor::zeros([b, ml - t, d], (gg.kind(), gg.device())),
            ],
            1,
        );
        acc.add(positions, PerSample::Jac(gp.view([b, -1])));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn globs_and_selections() {
        assert!(glob_match("h.*.mlp.*", "h.3.mlp.c_fc.weight"));
        assert!(!glob_match("h.*.mlp.*", "h.3.attn.c_attn.weight"));
        assert!(glob_match("wte.weigh?", "wte.weight"));
        assert!(glob_match("*", "anything"));
        let s = Selection {
            layers: Some((2, 3)),
            ..Default::default()
        };
        assert!(
            s.matches("h.2.ln_1.weight")
                && s.matches("h.3.mlp.c_fc.bias")
                && !s.matches("h.1.mlp.c_fc.bias")
                && !s.matches("wte.weight")
        );
        // The recommended selection is the last 2 blocks of whatever model it meets.
        let r = Selection::recommended().resolve(12).unwrap();
        assert_eq!(r.layers, Some((10, 11)));
        assert!(r.matches("h.11.mlp.c_fc.weight") && r.matches("h.10.mlp.experts.1.c_proj.bias"));
        assert!(!r.matches("h.11.attn.c_proj.weight") && !r.matches("h.9.mlp.c_fc.weight"));
        let mlps = Selection {
            mlp_only: true,
            ..Default::default()
        };
        assert!(
            !mlps.is_all() && mlps.matches("h.0.mlp.c_fc.weight") && !mlps.matches("wte.weight")
        );
        assert!(Selection::recommended().resolve(1).is_err());
        assert!(Selection::default().or_recommended(true).is_all());
        assert_eq!(
            Selection::default().or_recommended(false),
            Selection::recommended()
        );
        let both = Selection {
            layers: Some((0, 1)),
            last_blocks: Some(1),
            ..Default::default()
        };
        assert!(both.resolve(4).is_err());
        let s = Selection {
            expert: Some((3, 1)),
            ..Default::default()
        };
        assert!(
            s.matches("h.3.mlp.experts.1.c_fc.weight")
                && !s.matches("h.3.mlp.experts.0.c_fc.weight")
                && !s.matches("h.2.mlp.experts.1.c_fc.weight")
        );
    }
}

//! `tailscope capture`, and the capture arguments `tailscope ntk` shares.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use super::progress::Bars;
use super::Global;
use crate::capture::job::{self, Job, JobSpec};
use crate::capture::{CaptureOptions, Method, OutputKind, Projection, ProjectionKind, Selection};
use crate::corpus::SplitChoice;

/// Which samples and which gradients; shared by `capture` and `ntk`.
#[derive(Debug, Clone, Args)]
pub struct CaptureArgs {
    /// The model: a checkpoint folder, a Hugging Face folder, a GGUF file or a TorchScript module.
    ///
    /// A TorchScript file (.pt) runs code when it is loaded, as a pickle does: load only files you
    /// trust. Safetensors and GGUF files hold data only.
    #[arg(long, value_name = "PATH", help_heading = "Input")]
    pub model: PathBuf,
    /// The corpus table.
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    pub corpus: PathBuf,
    /// The tokenizer.json (default: beside the corpus).
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    pub tokenizer: Option<PathBuf>,
    /// Split the samples come from.
    #[arg(long, value_enum, default_value_t = SplitChoice::Validation, value_name = "SPLIT", help_heading = "Samples")]
    pub split: SplitChoice,
    /// Number of samples (evenly spaced over the split).
    #[arg(
        long,
        default_value_t = job::DEFAULT_SAMPLES,
        value_name = "N",
        value_parser = super::at_least_one,
        help_heading = "Samples"
    )]
    pub samples: usize,
    /// 0: samples evenly spaced over the split; otherwise a random draw seeded by this value
    /// (a second draw to check that results do not hang on the sample choice).
    #[arg(
        long,
        default_value_t = 0,
        value_name = "SEED",
        help_heading = "Samples"
    )]
    pub sample_seed: u64,
    /// The scalar output per sample.
    #[arg(
        long,
        value_enum,
        default_value_t = OutputKind::MeanLoss,
        value_name = "OUTPUT",
        help_heading = "Gradients",
        long_help = "The scalar f(x) whose per-sample gradient is taken: mean-loss (the sample's mean \
            token loss, default), sum-loglik (its summed log-likelihood), logit-trace (the trace over \
            output logits, a Hutchinson estimate with --probes random output directions)."
    )]
    pub output: OutputKind,
    /// Random output directions of the logit-trace estimate.
    #[arg(
        long,
        default_value_t = job::DEFAULT_PROBES,
        value_name = "K",
        help_heading = "Gradients"
    )]
    pub probes: usize,
    /// How per-sample gradients are computed.
    #[arg(
        long,
        value_enum,
        default_value_t = Method::Batched,
        value_name = "METHOD",
        help_heading = "Gradients",
        long_help = "exact: one backward pass per sample (the oracle, slow); batched: per-layer \
            per-sample gradients from one batched backward (default); ghost: Linear weight kernels \
            from Gram matrices without per-sample gradients; auto: ghost where cheaper. All give \
            the same kernel (tested to 1e-6 in float64)."
    )]
    pub method: Method,
    /// Parameter name globs (repeatable; default: the MLPs of the last 2 blocks, see --all-params).
    #[arg(
        long = "params",
        value_name = "GLOB",
        help_heading = "Gradients",
        long_help = "Parameter name globs (`*`, `?`), repeatable, combined with --layers and --expert by OR. Names are the safetensors names, e.g. 'h.3.mlp.*' or '*.c_fc.weight'."
    )]
    pub params: Vec<String>,
    /// Block range A..B (inclusive): every parameter of blocks A to B.
    #[arg(long, value_name = "A..B", help_heading = "Gradients")]
    pub layers: Option<String>,
    /// One expert's parameters: BLOCK:EXPERT.
    #[arg(long, value_name = "L:E", help_heading = "Gradients")]
    pub expert: Option<String>,
    /// The last K transformer blocks. With no --params, --layers, --expert, --last-blocks or
    /// --mlp-only, the MLPs of the last 2 blocks are taken (the README's kernel-options study);
    /// --all-params takes every parameter.
    #[arg(long, value_name = "K", help_heading = "Gradients")]
    pub last_blocks: Option<i64>,
    /// Only MLP (FFN and expert) parameters of what the other options select.
    #[arg(long, help_heading = "Gradients")]
    pub mlp_only: bool,
    /// Every trainable parameter, embeddings included, when no other selection is given.
    #[arg(long, help_heading = "Gradients")]
    pub all_params: bool,
    /// Project per-sample gradients to K dimensions.
    #[arg(
        long,
        value_name = "K",
        help_heading = "Gradients",
        long_help = "Project every parameter's per-sample gradients to K dimensions with a seeded random matrix (entries of variance 1/K, identical across processes for one --seed), trading exactness for memory. Not with --method ghost."
    )]
    pub project: Option<i64>,
    /// Distribution of the projection (default sparse: as accurate as gaussian at equal K, far
    /// cheaper); needs --project.
    #[arg(long, value_enum, value_name = "KIND", help_heading = "Gradients")]
    pub projection: Option<ProjectionKind>,
    /// Memory budget in GB (default: 80% of the memory available at start); see the long help.
    #[arg(
        long,
        value_name = "GB",
        value_parser = positive_gb,
        help_heading = "Gradients",
        long_help = "Memory budget in GB for capture (default: 80% of the memory the system \
            reports available at start). What the capture holds (per-sample gradients, projected \
            or not, ghost factors) and one batch needs (recorded activations, attention scores, \
            logits, per-sample gradient pieces) are estimated from the model's shapes and each \
            text's length, and batches are cut to fit, up to --batch samples: long texts go in \
            smaller batches. If the result alone or one sample cannot fit, the run stops at once \
            saying what to change. The chosen batches are logged (-v)."
    )]
    pub memory: Option<f64>,
    /// Samples per forward/backward pass.
    #[arg(
        long,
        default_value_t = job::DEFAULT_BATCH,
        value_name = "N",
        value_parser = super::at_least_one,
        help_heading = "Gradients"
    )]
    pub batch: usize,
    /// Output directory.
    #[arg(short, long, value_name = "DIR", help_heading = "Output")]
    pub out: PathBuf,
}

impl CaptureArgs {
    /// The library's description of this capture.
    pub fn job_spec(&self, g: &Global) -> crate::Result<JobSpec> {
        if let (Some(kind), None) = (self.projection, self.project) {
            return Err(crate::error::Error::invalid(
                "--projection",
                format!(
                    "{} applies to a projection, and none was asked for: add --project K (the dimension to project to), or drop --projection",
                    kind.to_possible_value().map_or("it".into(), |v| v.get_name().to_string())
                ),
            ));
        }
        Ok(JobSpec {
            model: self.model.clone(),
            corpus: self.corpus.clone(),
            tokenizer: self.tokenizer.clone(),
            split: self.split,
            samples: self.samples,
            sample_seed: self.sample_seed,
            selection: Selection {
                globs: self.params.clone(),
                layers: self
                    .layers
                    .as_deref()
                    .map(job::parse_block_range)
                    .transpose()?,
                expert: self.expert.as_deref().map(job::parse_expert).transpose()?,
                last_blocks: self.last_blocks,
                mlp_only: self.mlp_only,
            }
            .or_recommended(self.all_params),
            options: CaptureOptions {
                output: self.output,
                method: self.method,
                projection: self.project.map(|dim| Projection {
                    kind: self.projection.unwrap_or_default(),
                    dim,
                    seed: g.seed,
                }),
                batch: self.batch,
                probes: self.probes,
                seed: g.seed,
                memory: match self.memory {
                    Some(gb) => Some((gb * 1e9) as u64),
                    None => crate::capture::memory::default_budget(),
                },
                ..CaptureOptions::default()
            },
        })
    }
}

/// A memory budget in GB: a positive number.
pub(crate) fn positive_gb(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("expected a positive number of GB, got {s:?}")),
    }
}

/// `tailscope capture`: per-sample gradients to `grads.safetensors` (one (n, P) tensor per
/// parameter, or (n, k) projected, (n, probes·k) for logit-trace) and `samples.parquet`.
pub fn run_capture_cmd(a: &CaptureArgs, g: &Global) -> anyhow::Result<()> {
    // Refused before the model is loaded.
    job::check_gradient_method(a.method)?;
    if crate::device::mpi_launched() {
        return Err(crate::error::Error::invalid(
            "mpirun",
            "capture writes one grads.safetensors from one process; over ranks, `ntk --tile N` \
             writes the per-sample gradients in shards (shards/grads-NNNNN.safetensors)",
        )
        .into());
    }
    let device = crate::device::resolve(g.device)?;
    let job = Job::prepare(&a.job_spec(g)?, device)?;
    let mut grads = job::capture_gradients(&job, device, &Bars::default())?;
    grads.write(&a.out)?;
    println!(
        "captured {} samples × {} values ({} parameter tensors, output {:?}, method {:?}) in {:.1} s",
        grads.n,
        grads.width(),
        grads.named.len(),
        a.output,
        a.method,
        grads.seconds
    );
    println!(
        "wrote {}/grads.safetensors and samples.parquet",
        a.out.display()
    );
    Ok(())
}

//! `tailscope analyze`: per-sample statistics joined into one table (loss, uncertainty, excess
//! loss, reducible loss, learnability against the training data, trajectory), the neglect score
//! and its flags with their evidence, frequency correlations with bootstrap intervals, GC per
//! frequency bin and domain, and expert isolation.

use std::path::PathBuf;

use clap::Args;

use super::progress::Bars;
use super::Global;
use crate::analysis::analyze::{self, Analysis, AnalyzeSpec};
use crate::analysis::isolation::BlockReport;
use crate::analysis::learnability::LearnabilityOptions;

#[derive(Debug, Clone, Args)]
#[command(after_help = "Example:\n  \
    tailscope analyze --ntk out/demo/ntk/dense --model out/demo/train/dense/final --corpus out/demo/corpus.parquet -o out/demo/analysis/dense")]
pub struct AnalyzeArgs {
    /// An `ntk` output folder (samples.parquet, gc.parquet).
    #[arg(long, value_name = "DIR", help_heading = "Input")]
    pub ntk: PathBuf,
    /// The model the kernel was computed for (for per-sample losses): a checkpoint folder, a Hugging Face folder, a GGUF file or a TorchScript module.
    ///
    /// A TorchScript file (.pt) runs code when it is loaded, as a pickle does: load only files you
    /// trust. Safetensors and GGUF files hold data only.
    #[arg(long, value_name = "PATH", help_heading = "Input")]
    pub model: PathBuf,
    /// The corpus table (texts, and ground truth `long_tail` if synthetic).
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    pub corpus: PathBuf,
    /// The tokenizer.json (default: beside the corpus).
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    pub tokenizer: Option<PathBuf>,
    /// Bootstrap resamples of each correlation.
    #[arg(
        long,
        default_value_t = analyze::DEFAULT_RESAMPLES,
        value_name = "N",
        help_heading = "Statistics"
    )]
    pub resamples: usize,
    /// 1 − confidence of the intervals.
    #[arg(
        long,
        default_value_t = analyze::DEFAULT_ALPHA,
        value_name = "ALPHA",
        help_heading = "Statistics"
    )]
    pub alpha: f64,
    /// Training texts the samples' loss gradients are compared with (0: no learnability statistics).
    #[arg(
        long,
        default_value_t = LearnabilityOptions::default().train_samples,
        value_name = "N",
        help_heading = "Learnability",
        long_help = "Training texts (a seeded random draw of the training split) that each sample's \
            loss gradient is compared with: the predicted decrease (mean cross-kernel), the \
            support (ridge leverage on the first --ridge-samples of them) and cosine support, \
            and each sample's nearest training texts. Captured --train-chunk at a time, so any \
            number fits --memory. 0 skips these statistics (and a neglect model that needs them \
            is refused)."
    )]
    pub train_samples: usize,
    /// Training texts captured at a time.
    #[arg(long, default_value_t = LearnabilityOptions::default().chunk, value_name = "N", help_heading = "Learnability")]
    pub train_chunk: usize,
    /// Nearest training texts kept per sample (by gradient cosine).
    #[arg(long, default_value_t = LearnabilityOptions::default().neighbours, value_name = "K", help_heading = "Learnability")]
    pub neighbours: usize,
    /// Training texts of the ridge leverage (support).
    #[arg(long, default_value_t = LearnabilityOptions::default().ridge_samples, value_name = "N", help_heading = "Learnability")]
    pub ridge_samples: usize,
    /// Ridge κ of the support, as a multiple of the mean Θ_jj of those texts.
    #[arg(long, default_value_t = LearnabilityOptions::default().ridge, value_name = "X", help_heading = "Learnability")]
    pub ridge: f64,
    /// Memory budget in GB of the gradient captures (default: 80% of the memory available).
    #[arg(long, value_name = "GB", value_parser = super::capture::positive_gb, help_heading = "Learnability")]
    pub memory: Option<f64>,
    /// A reference model (same tokenizer) for the reducible loss (RHO-LOSS).
    #[arg(
        long,
        value_name = "PATH",
        help_heading = "Neglect",
        long_help = "A reference model, ideally trained on held-out data of the same distribution, \
            sharing the model's tokenizer (refused otherwise): adds the reducible loss, the \
            sample's loss minus the reference's on the same tokens (Mindermann et al., ICML 2022)."
    )]
    pub reference: Option<PathBuf>,
    /// A training run folder (or its checkpoints/): adds loss slope, forgetting events and self-influence.
    #[arg(long, value_name = "DIR", help_heading = "Neglect")]
    pub checkpoints: Option<PathBuf>,
    /// The neglect model (TOML; default: the built-in analyses/neglect-weights.toml).
    #[arg(long, value_name = "FILE", help_heading = "Neglect")]
    pub neglect_model: Option<PathBuf>,
    /// An `ntk` folder of the dense baseline on the same samples: adds expert isolation.
    #[arg(
        long,
        value_name = "DIR",
        help_heading = "Input",
        long_help = "An `ntk` output folder of the dense baseline computed on the same samples (same \
            --split, --samples and seed). For every CSE block of --ntk's model, expert isolation is \
            reported: routing purity per domain, NMI(domain, expert), per-expert kernel consistency \
            and long-tail GC against the baseline's, and a verdict per expert."
    )]
    pub baseline: Option<PathBuf>,
    /// Output directory.
    #[arg(short, long, value_name = "DIR", help_heading = "Output")]
    pub out: PathBuf,
}

impl AnalyzeArgs {
    /// The library's description of this analysis.
    pub fn spec(&self, g: &Global) -> AnalyzeSpec {
        AnalyzeSpec {
            ntk: self.ntk.clone(),
            model: self.model.clone(),
            corpus: self.corpus.clone(),
            tokenizer: self.tokenizer.clone(),
            resamples: self.resamples,
            alpha: self.alpha,
            baseline: self.baseline.clone(),
            learnability: (self.train_samples > 0).then(|| LearnabilityOptions {
                train_samples: self.train_samples,
                chunk: self.train_chunk,
                neighbours: self.neighbours,
                ridge_samples: self.ridge_samples,
                ridge: self.ridge,
                sample_seed: g.seed.max(1),
            }),
            reference: self.reference.clone(),
            checkpoints: self.checkpoints.clone(),
            neglect_model: self.neglect_model.clone(),
            memory: match self.memory {
                Some(gb) => Some((gb * 1e9) as u64),
                None => crate::capture::memory::default_budget(),
            },
            seed: g.seed,
        }
    }
}

/// `tailscope analyze`.
pub fn run(a: &AnalyzeArgs, g: &Global) -> anyhow::Result<()> {
    let device = crate::device::resolve(g.device)?;
    let spec = a.spec(g);
    let mut r = analyze::analyze(&spec, device, &Bars::default())?;
    r.write(&a.out)?;
    print_analysis(&spec, &r);
    println!(
        "wrote {}/{{analysis,correlations,flags,neighbours}}.parquet and summary.json",
        a.out.display()
    );
    Ok(())
}

/// What `tailscope analyze` prints about an analysis.
pub fn print_analysis(spec: &AnalyzeSpec, r: &Analysis) {
    println!("{} samples analysed ({})", r.ids.len(), spec.ntk.display());
    println!(
        "correlations ({}% bootstrap intervals, {} resamples):",
        (100.0 * (1.0 - spec.alpha)).round(),
        spec.resamples
    );
    for c in &r.correlations {
        println!(
            "  {:<10} {:<11} vs {:<11} {:>7.3}  [{:.3}, {:.3}]",
            format!("{:?}", c.method).to_lowercase(),
            c.x,
            c.y,
            c.estimate.value,
            c.estimate.low,
            c.estimate.high
        );
    }
    println!(
        "|GC| by frequency bin (0 = rarest; sign-free, as the sign of GC is arbitrary): {}",
        r.gc_by_bin
            .iter()
            .map(|(bin, v)| format!("{bin}: {:.3}", v.abs()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "flagged as neglected (learnable, not yet learned): {} of {}",
        r.flagged.len(),
        r.ids.len()
    );
    for f in r.flagged.iter().take(3) {
        println!(
            "  {} (score {:.2}): {}",
            r.ids[f.index],
            f.score,
            f.reasons.join("; ")
        );
    }
    if let Some((p, rc)) = r.precision_recall {
        println!("against the corpus's ground truth: precision {p:.3}, recall {rc:.3}");
    }
    if let Some(iso) = &r.isolation {
        if iso.reports.is_empty() {
            println!(
                "expert isolation: the model of {} has no CSE or Switch block",
                spec.ntk.display()
            );
        }
        for b in &iso.reports {
            print_block(b);
        }
    }
}

/// One routed block's isolation: NMI, separation and a line per expert.
fn print_block(r: &BlockReport) {
    println!(
        "expert isolation at {} (NMI(domain, expert) {:.3}, expert distance/radius {}):",
        r.block.trim_start_matches("expert_"),
        r.nmi,
        r.separation.map_or("-".to_string(), |x| format!("{x:.2}"))
    );
    let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.3}"));
    for e in &r.experts {
        if e.load == 0 {
            println!("  expert {}: {} — no samples", e.expert, e.verdict);
        } else {
            println!(
                "  expert {}: {} — {} samples, {:.0}% {}, {:.0}% long-tail, kernel consistency {} (baseline {})",
                e.expert,
                e.verdict,
                e.load,
                100.0 * e.dominant_share,
                e.dominant_domain,
                100.0 * e.long_tail_share,
                f(e.consistency),
                f(e.baseline_consistency)
            );
        }
    }
}

//! `tailscope analyze`: per-sample metrics joined into one table, frequency correlations with
//! bootstrap intervals, GC per frequency bin and domain, and the ranked under-memorised flags.

use std::path::PathBuf;

use clap::Args;

use super::progress::Bars;
use super::Global;
use crate::analysis::analyze::{self, Analysis, AnalyzeSpec};
use crate::analysis::flags::FlagOptions;
use crate::analysis::isolation::BlockReport;

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
    /// Rare: frequency score below this quantile.
    #[arg(long, default_value_t = FlagOptions::default().rare_quantile, value_name = "Q", help_heading = "Flags")]
    pub rare_quantile: f64,
    /// Do not count long-tail domains as rare.
    #[arg(long, help_heading = "Flags")]
    pub no_long_tail_domains: bool,
    /// Poorly aligned: alignment below this quantile.
    #[arg(long, default_value_t = FlagOptions::default().align_quantile, value_name = "Q", help_heading = "Flags")]
    pub align_quantile: f64,
    /// Poorly fitted: loss this many robust sd above its frequency bin's median.
    #[arg(long, default_value_t = FlagOptions::default().loss_z, value_name = "Z", help_heading = "Flags")]
    pub loss_z: f64,
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
            flags: FlagOptions {
                rare_quantile: self.rare_quantile,
                long_tail_domains: !self.no_long_tail_domains,
                align_quantile: self.align_quantile,
                loss_z: self.loss_z,
            },
            baseline: self.baseline.clone(),
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
        "wrote {}/{{analysis,correlations,flags}}.parquet and summary.json",
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
        "GC by frequency bin (0 = rarest): {}",
        r.gc_by_bin
            .iter()
            .map(|(bin, v)| format!("{bin}: {v:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "flagged as under-memorised: {} of {} (top: {})",
        r.flagged.len(),
        r.ids.len(),
        r.flagged
            .iter()
            .take(3)
            .map(|f| r.ids[f.index].as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some((p, rc)) = r.precision_recall {
        println!("against the corpus's ground truth (long_tail): precision {p:.3}, recall {rc:.3}");
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

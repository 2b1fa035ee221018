//! `tailscope freq`.

use std::path::PathBuf;

use clap::Args;

use super::progress::Bars;
use super::Global;
use crate::corpus::Corpus;
use crate::freq::{self, CountOn, FreqOptions, FreqReport, Norm, ShareBy};
use crate::progress::Progress;

#[derive(Debug, Clone, Args)]
#[command(after_help = "Example:\n  \
    tailscope freq --corpus out/brown/corpus.parquet -o out/brown/freq --orders 1,2,3 --norm max")]
pub struct FreqArgs {
    /// The corpus table (from `corpus ingest` or `corpus synth`).
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    pub corpus: PathBuf,
    /// The tokenizer.json (default: beside the corpus).
    #[arg(long, value_name = "FILE", help_heading = "Input")]
    pub tokenizer: Option<PathBuf>,
    /// N-gram orders, comma-separated, each 1 to 3.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,3",
        value_name = "N,..",
        help_heading = "Statistics",
        long_help = "N-gram orders to count and score, comma-separated, each from 1 to 3. The paper's \
            score is the 1-gram one; its appendix checks 2- and 3-grams. Example: --orders 1"
    )]
    pub orders: Vec<usize>,
    /// How counts become frequencies.
    #[arg(
        long,
        value_enum,
        default_value_t = Norm::Max,
        value_name = "NORM",
        help_heading = "Statistics",
        long_help = "Normalisation of n-gram counts before averaging over a sample: max (count / \
            largest count of that order, the default), total (count / all occurrences, a relative \
            frequency), log-max (ln(1+count) / ln(1+largest count)). Example: --norm log-max"
    )]
    pub norm: Norm,
    /// Which samples are counted.
    #[arg(
        long,
        value_enum,
        default_value_t = CountOn::Train,
        value_name = "SPLIT",
        help_heading = "Statistics",
        long_help = "Samples the n-gram counts are taken over: train (the training split, what the \
            model sees; default) or all. Every sample is scored either way."
    )]
    pub count_on: CountOn,
    /// What a domain's share counts.
    #[arg(
        long,
        value_enum,
        default_value_t = ShareBy::Tokens,
        value_name = "UNIT",
        help_heading = "Statistics",
        long_help = "Domain shares for the long-tail elbow: by tokens (default) or by samples."
    )]
    pub share_by: ShareBy,
    /// Output directory.
    #[arg(
        short,
        long,
        value_name = "DIR",
        help_heading = "Output",
        long_help = "Directory for scores.parquet, ngrams.parquet, domains.parquet and summary.json \
            (each written atomically). Example: -o out/brown/freq"
    )]
    pub out: PathBuf,
}

/// `tailscope freq`.
pub fn run(a: &FreqArgs, _g: &Global) -> anyhow::Result<()> {
    let options = FreqOptions {
        orders: a.orders.clone(),
        norm: a.norm,
        count_on: a.count_on,
        share_by: a.share_by,
    };
    let progress = Bars::default();
    let (report, corpus, tok) =
        freq::compute_file(&a.corpus, a.tokenizer.as_deref(), options, &progress)?;
    progress.start("writing tables", None);
    report.write(&a.out, &corpus, &tok)?;
    progress.finish();
    print_summary(&report, &corpus);
    println!(
        "wrote {}/{{scores,ngrams,domains}}.parquet and summary.json",
        a.out.display()
    );
    Ok(())
}

fn print_summary(r: &FreqReport, c: &Corpus) {
    let tokens: u64 = c.samples.iter().map(|s| u64::from(s.n_tokens)).sum();
    println!(
        "corpus: {} samples, {} tokens, {} domains",
        c.len(),
        tokens,
        r.domains.len()
    );
    for ((order, counts), scores) in r.options.orders.iter().zip(&r.counts).zip(&r.scores) {
        let q = freq::quantiles(scores);
        println!(
            "{order}-grams: {} distinct of {} counted; score ({}-normalised) mean {:.4}, p10 {:.4}, median {:.4}, p90 {:.4}",
            counts.counts.len(),
            counts.total,
            value_name(r.options.norm),
            q.mean,
            q.p10,
            q.p50,
            q.p90
        );
    }
    println!("domain shares (by {}):", value_name(r.options.share_by));
    for d in &r.domains {
        println!(
            "  {:>3}. {:<20} {:>7.2}%  {:>8} samples {:>10} tokens{}",
            d.rank,
            d.domain,
            100.0 * d.share,
            d.samples,
            d.tokens,
            if d.long_tail { "  long-tail" } else { "" }
        );
    }
    match r.threshold {
        Some(t) => println!(
            "long-tail threshold (elbow of the share curve): {:.2}% -> {} long-tail domains: {}",
            100.0 * t,
            r.long_tail_domains().len(),
            r.long_tail_domains().join(", ")
        ),
        None => println!(
            "long-tail threshold: none (fewer than 3 domains or no elbow in the share curve)"
        ),
    }
}

/// The name an enum value has on the command line.
fn value_name<E: clap::ValueEnum>(v: E) -> String {
    v.to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

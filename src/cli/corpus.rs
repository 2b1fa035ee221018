//! `tailscope corpus ingest`, `tailscope corpus synth` and `tailscope corpus facts`.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::progress::{self, Bars};
use super::Global;
use crate::corpus::ingest::{self, Format, IngestOptions, Unit};
use crate::corpus::synth::{self, SynthOptions};
use crate::corpus::tokenizer::{self, TokenizerSource};
use crate::corpus::{self as corpus_mod, BuildOptions, BuildStats, Corpus, Split};

#[derive(Debug, Subcommand)]
pub enum CorpusCommand {
    /// Read text, JSONL, CSV/TSV, Parquet or a directory of .txt files into a corpus table.
    #[command(after_help = "Examples:\n  \
        tailscope corpus ingest fixtures/brown/brown.jsonl.gz -o out/brown/corpus.parquet\n  \
        tailscope corpus ingest notes.txt --unit paragraph --sentences -o out/notes/corpus.parquet\n  \
        tailscope corpus ingest data.csv --text-field body --domain-field topic -o c.parquet")]
    Ingest(IngestArgs),
    /// Generate the synthetic long-tail corpus (one common domain, K rare ones, exact labels).
    #[command(after_help = "Example:\n  \
        tailscope corpus synth --samples 20000 --rare-domains 4 --rare-share 0.06 -o out/synth/corpus.parquet")]
    Synth(SynthArgs),
    /// Insert fictional facts at controlled counts into a host corpus, and write their probes.
    #[command(after_help = "Example:\n  \
        tailscope corpus facts --host out/demo/corpus.parquet --host-samples 2000 -o out/facts/corpus.parquet\n  \
        (writes out/facts/corpus.parquet, out/facts/tokenizer.json, out/facts/corpus.probes.parquet)")]
    Facts(FactsArgs),
}

#[derive(Debug, Clone, Args)]
pub struct FactsArgs {
    /// The host corpus table (its tokenizer.json beside it).
    #[arg(
        long,
        value_name = "FILE",
        long_help = "The host corpus table (`corpus ingest`'s output; Brown for the benchmark). The \
            facts are inserted into its training split, which must exist; its tokenizer.json (beside \
            it) is copied beside --out. Example: --host out/demo/corpus.parquet"
    )]
    pub host: PathBuf,
    /// Insertion counts, comma-separated (each at least 1).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8,16",
        value_name = "K1,K2,..",
        long_help = "How many training sentences state each fact: --facts-per-count facts per count. \
            A count of 0 is refused (facts that are never inserted are the --controls). \
            Example: --counts 1,4,16"
    )]
    pub counts: Vec<u32>,
    /// Facts per count (a multiple of 3 × (distractors + 1), so every answer is read equally often).
    #[arg(long, default_value_t = 15, value_name = "N")]
    pub facts_per_count: usize,
    /// Control facts: in the probe table only, never inserted.
    #[arg(
        long,
        default_value_t = 15,
        value_name = "N",
        long_help = "Facts that are only in the probe table (count 0): what a model answers about facts \
            it never read, the check that the invented facts are at chance. Example: --controls 30"
    )]
    pub controls: usize,
    /// Distractors per fact (other answers of the same relation).
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub distractors: usize,
    /// Keep a seeded subset of the host's training samples.
    #[arg(
        long,
        value_name = "N",
        long_help = "Keep N of the host's training samples, drawn with --seed (default: all), so that \
            one epoch over host + facts fits a time budget; validation samples are all kept. \
            Example: --host-samples 2000"
    )]
    pub host_samples: Option<usize>,
    /// The probe table (default: <out stem>.probes.parquet beside --out).
    #[arg(long, value_name = "FILE")]
    pub probes: Option<PathBuf>,
    /// The corpus table to write (Parquet).
    #[arg(short, long, value_name = "FILE")]
    pub out: PathBuf,
}

/// Splitting, filtering and tokenizer options shared by `ingest` and `synth`.
#[derive(Debug, Clone, Args)]
pub struct BuildArgs {
    /// Fraction of samples in the validation split.
    #[arg(
        long,
        default_value_t = BuildOptions::default().val_fraction,
        value_name = "FRACTION",
        help_heading = "Split",
        long_help = "Fraction of samples put in the validation split, in [0, 1). A sample's split \
            depends only on its id and --seed, so it never moves when other samples are added. \
            Example: --val-fraction 0.05"
    )]
    pub val_fraction: f64,
    /// Use this tokenizer.json instead of training one.
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Tokenizer",
        long_help = "Load an existing Hugging Face tokenizer.json instead of training a byte-level \
            BPE on the corpus; a copy is written to --tokenizer-out. Example: --tokenizer gpt2/tokenizer.json"
    )]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary size of the trained byte-level BPE.
    #[arg(
        long,
        default_value_t = tokenizer::DEFAULT_VOCAB_SIZE,
        value_name = "N",
        help_heading = "Tokenizer",
        long_help = "Vocabulary size of the byte-level BPE trained on the corpus (256 byte symbols \
            and 5 special tokens included). Ignored with --tokenizer. Example: --vocab-size 4096"
    )]
    pub vocab_size: usize,
    /// Minimum pair count for a BPE merge.
    #[arg(
        long,
        default_value_t = tokenizer::DEFAULT_MIN_FREQUENCY,
        value_name = "N",
        help_heading = "Tokenizer"
    )]
    pub min_frequency: u64,
    /// Where to write tokenizer.json (default: beside --out).
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Output",
        long_help = "Where the trained (or copied) tokenizer.json goes. Default: tokenizer.json in \
            the directory of --out, where `tailscope freq` looks for it."
    )]
    pub tokenizer_out: Option<PathBuf>,
    /// The corpus table to write (Parquet).
    #[arg(
        short,
        long,
        value_name = "FILE",
        help_heading = "Output",
        long_help = "The corpus table to write, as Parquet with columns id, text, domain, split, \
            n_tokens. Written to a temporary file and renamed, so a failed run leaves nothing. \
            Example: -o out/brown/corpus.parquet"
    )]
    pub out: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Input file or directory.
    #[arg(
        value_name = "INPUT",
        long_help = "The input: a .txt, .jsonl, .csv, .tsv or .parquet file (text formats may be \
            .gz-compressed), or a directory whose first-level subfolders name the domains of the \
            .txt files below them."
    )]
    pub input: PathBuf,
    /// Input format (default: from the file name).
    #[arg(long, value_enum, value_name = "FORMAT", help_heading = "Input")]
    pub format: Option<Format>,
    /// What one sample is in text inputs.
    #[arg(
        long,
        value_enum,
        default_value_t = Unit::Line,
        value_name = "UNIT",
        help_heading = "Input",
        long_help = "What one sample is in plain-text inputs (text files and directories): each \
            non-blank line, each blank-line separated paragraph, or each whole file. \
            Example: --unit paragraph"
    )]
    pub unit: Unit,
    /// Field or column holding the text.
    #[arg(
        long,
        default_value = "text",
        value_name = "NAME",
        help_heading = "Input"
    )]
    pub text_field: String,
    /// Field or column holding the domain (default: `domain` when present).
    #[arg(
        long,
        value_name = "NAME",
        help_heading = "Input",
        long_help = "Field (JSONL) or column (CSV, TSV, Parquet) holding the domain. When given, it \
            must be present in every record; when omitted, `domain` is used where present and \
            --default-domain elsewhere. Example: --domain-field genre"
    )]
    pub domain_field: Option<String>,
    /// Field or column holding the id (default: `id` when present, else file:line).
    #[arg(long, value_name = "NAME", help_heading = "Input")]
    pub id_field: Option<String>,
    /// Domain of records that name none.
    #[arg(
        long,
        default_value = "general",
        value_name = "NAME",
        help_heading = "Input"
    )]
    pub default_domain: String,
    /// Split each record into sentences (Unicode sentence boundaries).
    #[arg(
        long,
        help_heading = "Filtering",
        long_help = "Split each record into sentences at Unicode (UAX #29) sentence boundaries; the \
            k-th sentence of record ID gets the id ID#k."
    )]
    pub sentences: bool,
    /// Drop samples with fewer words.
    #[arg(
        long,
        default_value_t = corpus_mod::DEFAULT_MIN_WORDS,
        value_name = "N",
        help_heading = "Filtering"
    )]
    pub min_words: usize,
    /// Drop samples with more words.
    #[arg(long, value_name = "N", help_heading = "Filtering")]
    pub max_words: Option<usize>,
    #[command(flatten)]
    pub build: BuildArgs,
}

#[derive(Debug, Clone, Args)]
pub struct SynthArgs {
    /// Number of samples.
    #[arg(
        long,
        default_value_t = 20_000,
        value_name = "N",
        help_heading = "Synthesis"
    )]
    pub samples: usize,
    /// Number of rare domains (K).
    #[arg(
        long,
        default_value_t = 4,
        value_name = "K",
        help_heading = "Synthesis",
        long_help = "Number of rare domains. The first four have hand-written vocabularies (legal, \
            medical, astronomy, chemistry); further ones get pseudo-word vocabularies (rare5, ...)."
    )]
    pub rare_domains: usize,
    /// Share of all rare domains together.
    #[arg(
        long,
        default_value_t = 0.06,
        value_name = "FRACTION",
        help_heading = "Synthesis",
        long_help = "Share of all rare domains together, split among them with weights 1/(k+1) \
            (a Zipf-like tail). The paper mixes under 8% of domain text into the general corpus. \
            Example: --rare-share 0.05"
    )]
    pub rare_share: f64,
    /// Explicit share of each rare domain, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "S1,S2,..",
        help_heading = "Synthesis",
        long_help = "Explicit share of each rare domain (overrides --rare-share); one value per \
            rare domain. Example: --rare-domains 3 --shares 0.03,0.02,0.01"
    )]
    pub shares: Option<Vec<f64>>,
    /// Add domains that separate rarity, neglect and noise (`neglected` and `noise` truths).
    #[arg(
        long,
        help_heading = "Synthesis",
        long_help = "Add two contrast domains: `glossary`, rare (a quarter of the rare share) but \
            only 4 distinct sentences repeated, which a model learns; and `chatter`, 8% of the \
            corpus, common words in random order, frequent but unpredictable (noise). The table \
            gains a three-way ground truth: `neglected` (the rare domains: learnable, not yet \
            learned), `noise` (chatter: not learnable) and neither (common text and the \
            learned-though-rare glossary), beside `long_tail` (rare domains and glossary), so \
            flag rankings can be scored where rarity, neglect and noise differ."
    )]
    pub contrasts: bool,
    #[command(flatten)]
    pub build: BuildArgs,
}

pub fn run(cmd: &CorpusCommand, g: &Global) -> anyhow::Result<()> {
    match cmd {
        CorpusCommand::Ingest(a) => ingest_cmd(a, g),
        CorpusCommand::Synth(a) => synth_cmd(a, g),
        CorpusCommand::Facts(a) => facts_cmd(a, g),
    }
}

fn facts_cmd(a: &FactsArgs, g: &Global) -> anyhow::Result<()> {
    use crate::corpus::facts::{self, FactsOptions};
    let opts = FactsOptions {
        counts: a.counts.clone(),
        facts_per_count: a.facts_per_count,
        controls: a.controls,
        distractors: a.distractors,
        host_samples: a.host_samples,
        seed: g.seed,
    };
    let w = facts::write_facts(&a.host, &a.out, a.probes.as_deref(), &opts)?;
    println!(
        "facts: {} ({} per count {:?}, {} controls), {} sentences inserted into {} host training \
         samples ({} validation samples kept)",
        w.facts.len(),
        a.facts_per_count,
        a.counts,
        a.controls,
        w.fact_rows,
        w.host_train,
        w.validation
    );
    println!("wrote {}", w.corpus.display());
    println!("tokenizer (the host's): {}", w.tokenizer.display());
    println!("probes: {}", w.probes.display());
    Ok(())
}

fn ingest_cmd(a: &IngestArgs, g: &Global) -> anyhow::Result<()> {
    let opts = IngestOptions {
        format: a.format,
        unit: a.unit,
        text_field: a.text_field.clone(),
        domain_field: a.domain_field.clone(),
        id_field: a.id_field.clone(),
        default_domain: a.default_domain.clone(),
    };
    let pb = progress::spinner(&format!("reading {}", a.input.display()));
    let records = ingest::read_records(&a.input, &opts)?;
    pb.finish_and_clear();
    let build = BuildOptions {
        sentences: a.sentences,
        min_words: a.min_words,
        max_words: a.max_words,
        val_fraction: a.build.val_fraction,
        seed: g.seed,
    };
    let (corpus, stats) = corpus_mod::build(&a.input.display().to_string(), records, &build)?;
    finish(corpus, &stats, &a.build)
}

fn synth_cmd(a: &SynthArgs, g: &Global) -> anyhow::Result<()> {
    let opts = SynthOptions {
        samples: a.samples,
        rare_domains: a.rare_domains,
        rare_share: a.rare_share,
        shares: a.shares.clone(),
        seed: g.seed,
        contrasts: a.contrasts,
    };
    let records = synth::generate(&opts)?;
    let build = BuildOptions {
        val_fraction: a.build.val_fraction,
        seed: g.seed,
        ..BuildOptions::default()
    };
    let (corpus, stats) = corpus_mod::build("corpus synth", records, &build)?;
    finish(corpus, &stats, &a.build)
}

/// Tokenizer (load or train), token counts, atomic writes, printed summary.
fn finish(mut corpus: Corpus, stats: &BuildStats, b: &BuildArgs) -> anyhow::Result<()> {
    let tok_out = b
        .tokenizer_out
        .clone()
        .unwrap_or_else(|| sibling(&b.out, "tokenizer.json"));
    let source = match &b.tokenizer {
        Some(path) => TokenizerSource::Load(path.clone()),
        None => TokenizerSource::Train {
            vocab_size: b.vocab_size,
            min_frequency: b.min_frequency,
        },
    };
    let tok = tokenizer::finish_corpus(&mut corpus, &source, &b.out, &tok_out, &Bars::default())?;
    print_summary(&corpus, stats, &b.out, &tok_out, tok.get_vocab_size(true));
    Ok(())
}

fn sibling(path: &Path, name: &str) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.join(name),
        _ => PathBuf::from(name),
    }
}

pub fn print_summary(c: &Corpus, stats: &BuildStats, out: &Path, tok: &Path, vocab: usize) {
    let train = c.samples.iter().filter(|s| s.split == Split::Train).count();
    let tokens: u64 = c.samples.iter().map(|s| u64::from(s.n_tokens)).sum();
    println!(
        "corpus: {} samples ({} train, {} validation), {} tokens, {} domains",
        c.len(),
        train,
        c.len() - train,
        tokens,
        c.domains().len()
    );
    if stats.too_short + stats.too_long > 0 {
        println!(
            "filtered: {} too short, {} too long (of {} records)",
            stats.too_short, stats.too_long, stats.records
        );
    }
    println!("wrote {}", out.display());
    println!("tokenizer ({vocab} entries): {}", tok.display());
}

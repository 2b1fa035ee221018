//! The NTK and gradient consistency of a Hugging Face model on a JSONL corpus, through the
//! library alone (what `tailscope corpus ingest` and `tailscope ntk` do, without the CLI).
//!
//! ```sh
//! cargo run --release --example ntk_gc_hf -- HF_MODEL_DIR CORPUS.jsonl [SAMPLES]
//! ```
//!
//! `HF_MODEL_DIR` may be any model source (a Hugging Face folder, a GGUF file, a tailscope
//! checkpoint). The corpus is one JSON object per line with `text` and `domain` fields; it is
//! ingested into a temporary folder with the model's own tokenizer (`tokenizer.json` of the
//! folder, or a GGUF file's metadata), or a byte-level BPE trained on the corpus when the model
//! brings none (which needs a vocabulary above 261 entries: 256 bytes and 5 specials). The example prints the
//! principal eigenvalue, GC per frequency bin and per domain, and the five samples least aligned
//! with the principal gradient direction.

use std::path::{Path, PathBuf};

use anyhow::Context;
use tailscope::capture::job::{Job, JobSpec};
use tailscope::capture::{CaptureOptions, Selection};
use tailscope::corpus::ingest::{read_records, IngestOptions};
use tailscope::corpus::tokenizer::{save, tokenize_corpus, TokenizerSource};
use tailscope::corpus::{build, BuildOptions, SplitChoice};
use tailscope::ntk::pipeline::{compute, NtkOptions};
use tailscope::progress::Silent;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, corpus_file) = match args.as_slice() {
        [m, c, ..] => (PathBuf::from(m), PathBuf::from(c)),
        _ => anyhow::bail!("usage: ntk_gc_hf HF_MODEL_DIR CORPUS.jsonl [SAMPLES]"),
    };
    let samples: usize = args.get(2).map_or(Ok(64), |s| s.parse())?;
    let device = tailscope::device::resolve(tailscope::device::DeviceArg::Cpu)?;

    // 1. Ingest the JSONL corpus.
    let work = std::env::temp_dir().join(format!("tailscope-example-{}", std::process::id()));
    let table = ingest(&corpus_file, &model, &work)?;

    // 2. Load the model (any source: HF folder, GGUF, TorchScript, tailscope checkpoint), pick the
    //    samples and select every parameter.
    let spec = JobSpec {
        model: model.clone(),
        corpus: table,
        tokenizer: None,
        split: SplitChoice::All,
        samples,
        sample_seed: 0,
        selection: Selection::default(),
        options: CaptureOptions {
            batch: 8,
            ..CaptureOptions::default()
        },
    };
    let job = Job::prepare(&spec, device).context("preparing the capture")?;

    // 3. The kernel, its principal direction and GC by group, in memory.
    let opts = NtkOptions {
        gc_resamples: 50,
        ..NtkOptions::default()
    };
    let out = compute(&job, &opts, device, None, &Silent)?;
    let summary = out
        .summary
        .as_ref()
        .context("an in-memory kernel has a summary")?;
    println!(
        "NTK of {} samples over {} parameters of {}",
        summary.samples,
        summary.parameters,
        model.display()
    );
    if let Some(p) = &out.principal {
        println!("principal eigenvalue {:.4e}", p.lambda);
    }
    for row in out
        .gc
        .iter()
        .filter(|r| r.column == "freq_bin" || r.column == "domain")
    {
        let iv = row
            .interval
            .map_or(String::new(), |(lo, hi)| format!(" [{lo:.3}, {hi:.3}]"));
        let gc = row.gc.map_or("-".into(), |g| format!("{g:.3}"));
        println!(
            "  {:<9} {:<12} n {:>4}  GC {gc}{iv}",
            row.column, row.group, row.n
        );
    }
    let samples = out
        .samples
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("an in-memory kernel has a sample table"))?;
    let ids = tailscope::io::column_str(samples, "id", &work)?;
    let align = tailscope::io::column_f64(samples, "alignment", &work)?;
    let mut order: Vec<usize> = (0..ids.len()).collect();
    order.sort_by(|&a, &b| align[a].total_cmp(&align[b]));
    println!("least aligned with the principal gradient direction:");
    for &i in order.iter().take(5) {
        println!("  {:<24} {:.4}", ids[i], align[i]);
    }
    std::fs::remove_dir_all(&work).ok();
    Ok(())
}

/// Ingest `corpus_file` into `work/corpus.parquet` with the model's own tokenizer
/// (`tokenizer.json` of an HF folder, or a GGUF file's metadata), else a byte-level BPE trained
/// on the corpus (at most as large as the model's vocabulary).
fn ingest(corpus_file: &Path, model: &Path, work: &Path) -> anyhow::Result<PathBuf> {
    let records = read_records(corpus_file, &IngestOptions::default())?;
    let (mut corpus, _) = build(
        &corpus_file.display().to_string(),
        records,
        &BuildOptions::default(),
    )?;
    let tok_path = work.join("tokenizer.json");
    let source = match tailscope::source::model_tokenizer(model)? {
        Some(own) => {
            save(&own, &tok_path)?;
            TokenizerSource::Load(tok_path.clone())
        }
        None => {
            let (_, m) = tailscope::source::load_model(model, tch::Device::Cpu)?;
            TokenizerSource::Train {
                vocab_size: (m.cfg.vocab_size as usize).min(8192),
                min_frequency: 1,
            }
        }
    };
    let tok = tokenize_corpus(&mut corpus, &source, &Silent)?;
    let table = work.join("corpus.parquet");
    corpus.write(&table)?;
    save(&tok, &tok_path)?;
    Ok(table)
}

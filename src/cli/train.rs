//! `tailscope train` and `tailscope eval`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Args;
use indicatif::ProgressBar;

use super::{progress, Global};
use crate::corpus::{tokenizer, Corpus, Split};
use crate::eval::{self, probe};
use crate::freq::{domain_shares, ShareBy};
use crate::model::checkpoint;
use crate::train::{self, Outcome, StepRow, TrainData, TrainSpec};

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    tailscope train --config analyses/demo-train.toml -o out/demo/train\n  \
    tailscope train --config analyses/demo-train.toml --run cse --steps 50 --resume")]
pub struct TrainArgs {
    /// The training spec (TOML).
    #[arg(
        long,
        value_name = "FILE",
        long_help = "The training spec: [data], [model], [train] and one or more [[run]] tables \
            (dense, switch, cse). See analyses/demo-train.toml and the README."
    )]
    pub config: PathBuf,
    /// Output directory; each run writes into a subfolder named after it.
    #[arg(short, long, value_name = "DIR", default_value = "out/train")]
    pub out: PathBuf,
    /// Train only these runs (repeatable; default: all).
    #[arg(long = "run", value_name = "NAME")]
    pub runs: Vec<String>,
    /// Override train.steps.
    #[arg(long, value_name = "N", help_heading = "Overrides")]
    pub steps: Option<u64>,
    /// Override train.batch_size.
    #[arg(long, value_name = "N", help_heading = "Overrides")]
    pub batch_size: Option<usize>,
    /// Override train.lr.
    #[arg(long, value_name = "LR", help_heading = "Overrides")]
    pub lr: Option<f64>,
    /// Override train.checkpoint_every.
    #[arg(long, value_name = "N", help_heading = "Overrides")]
    pub checkpoint_every: Option<u64>,
    /// Override data.corpus.
    #[arg(long, value_name = "FILE", help_heading = "Overrides")]
    pub corpus: Option<PathBuf>,
    /// Continue each run from its latest checkpoint.
    #[arg(
        long,
        long_help = "Continue each run from the latest checkpoint in its output folder (a run \
            without one starts fresh). On the CPU the result equals an uninterrupted run."
    )]
    pub resume: bool,
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Example:\n  \
    tailscope eval --model out/demo/train/cse/final --corpus out/demo/corpus.parquet")]
pub struct EvalArgs {
    /// A model folder (config.json + model.safetensors): a run's final/ or a checkpoint.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// The corpus table; validation samples are evaluated.
    #[arg(long, value_name = "FILE")]
    pub corpus: PathBuf,
    /// The tokenizer.json (default: beside the corpus).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Column predicted by the linear probe.
    #[arg(long, default_value = "domain", value_name = "COLUMN")]
    pub label: String,
    /// Layer of the probed embeddings (0 = embeddings; default: the last block).
    #[arg(long, value_name = "N")]
    pub layer: Option<usize>,
    /// Training-split samples used to fit the probe (evenly spaced).
    #[arg(long, default_value_t = 5000, value_name = "N")]
    pub probe_samples: usize,
    /// Validation samples evaluated (evenly spaced; default all).
    #[arg(long, value_name = "N")]
    pub samples: Option<usize>,
    /// Write eval.json here.
    #[arg(short, long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

struct Bar(ProgressBar);

impl train::Progress for Bar {
    fn start(&self, run: &str, total: u64, done: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
        self.0.set_message(run.to_owned());
    }
    fn step(&self, row: &StepRow) {
        self.0.set_position(row.step);
        if row.step % 10 == 0 {
            self.0.set_message(format!("loss {:.3}", row.loss));
        }
    }
    fn message(&self, msg: &str) {
        self.0.suspend(|| tracing::info!("{msg}"));
    }
    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

pub fn run_train(a: &TrainArgs, g: &Global) -> anyhow::Result<()> {
    let mut spec = TrainSpec::read(&a.config)?;
    if let Some(v) = a.steps {
        spec.train.steps = v;
    }
    if let Some(v) = a.batch_size {
        spec.train.batch_size = v;
    }
    if let Some(v) = a.lr {
        spec.train.lr = v;
    }
    if let Some(v) = a.checkpoint_every {
        spec.train.checkpoint_every = v;
    }
    if let Some(v) = &a.corpus {
        spec.data.corpus = v.clone();
    }
    spec.check()?;
    for name in &a.runs {
        if !spec.runs.iter().any(|r| &r.name == name) {
            return Err(crate::Error::invalid(
                "--run",
                format!(
                    "no run named {name:?} in {} (runs: {})",
                    a.config.display(),
                    spec.runs
                        .iter()
                        .map(|r| r.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
            .into());
        }
    }
    let device = crate::device::resolve(g.device)?;
    let data = TrainData::load(&spec.data.corpus, spec.data.tokenizer.as_deref())?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Only the first handler can be installed per process; later calls (tests) are harmless.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    for run in spec
        .runs
        .iter()
        .filter(|r| a.runs.is_empty() || a.runs.contains(&r.name))
    {
        let bar = Bar(progress::bar(spec.train.steps, &run.name));
        let r = train::train_run(
            &spec, run, &data, &a.out, device, g.seed, a.resume, &stop, &bar,
        )?;
        let last = r.state.log.last();
        let toks: f64 = r.state.log.iter().map(|x| x.tokens as f64).sum();
        let secs: f64 = r
            .state
            .log
            .iter()
            .map(|x| x.tokens as f64 / x.tokens_per_s.max(1e-9))
            .sum();
        println!(
            "run {}: {} trainable parameters, {} steps, final loss {:.4}, {:.0} tokens/s, {:.1} s",
            run.name,
            r.params,
            r.state.step,
            last.map_or(f64::NAN, |x| x.loss),
            toks / secs.max(1e-9),
            r.seconds
        );
        if let Some(v) = r.state.val.iter().rev().find(|v| v.group == "all") {
            println!(
                "  validation perplexity {:.2} ({} samples)",
                v.ppl, v.samples
            );
        }
        for rep in &r.cse_init {
            println!(
                "  CSE block {}: DBSCAN eps {:.4} found {} clusters; {} experts of sizes {:?} (radii {:?}), {} sequences noise",
                rep.layer,
                rep.eps,
                rep.raw_clusters,
                rep.sizes.len(),
                rep.sizes,
                rep.radii.iter().map(|r| (r * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
                rep.noise
            );
        }
        if r.state.cse_initialized {
            let dir = match r.outcome {
                Outcome::Finished => r.dir.join("final"),
                Outcome::Interrupted(_) => {
                    train::latest_checkpoint(&r.dir).unwrap_or_else(|| r.dir.join("final"))
                }
            };
            let (_, model) = checkpoint::load_model(&dir, device)?;
            let val = data.val_subset(spec.data.eval_samples);
            let enc = eval::encode(&model, &data.seqs(&val), 64, device)?;
            let labels: Vec<&str> = val
                .iter()
                .map(|&i| data.corpus.samples[i].domain.as_str())
                .collect();
            for (layer, routes) in &enc.routes {
                print_routing(*layer, &labels, routes);
            }
        }
        println!("  outputs: {}", r.dir.display());
        if let Outcome::Interrupted(step) = r.outcome {
            println!("interrupted: checkpoint saved at step {step}; continue with --resume");
            return Ok(());
        }
    }
    Ok(())
}

fn print_routing(layer: i64, labels: &[&str], routes: &[i64]) {
    let (names, k, table) = eval::routing_table(labels, routes);
    println!("  routing of validation sequences at block {layer} (rows: domain, columns: expert):");
    let head: String = (0..k).map(|e| format!("{:>7}", format!("e{e}"))).collect();
    println!("    {:<18}{head}", "domain");
    for (n, row) in names.iter().zip(&table) {
        let cells: String = row.iter().map(|c| format!("{c:>7}")).collect();
        println!("    {n:<18}{cells}");
    }
}

pub fn run_eval(a: &EvalArgs, g: &Global) -> anyhow::Result<()> {
    let device = crate::device::resolve(g.device)?;
    let (_, model) = checkpoint::load_model(&a.model, device)?;
    let corpus = Corpus::read(&a.corpus)?;
    let tok = super::tokenizer_for(a.tokenizer.as_deref(), &a.model, &model, &a.corpus)?;
    let labels_all: Vec<String> = match a.label.as_str() {
        "domain" => corpus.samples.iter().map(|s| s.domain.clone()).collect(),
        "long_tail" => corpus
            .samples
            .iter()
            .map(|s| s.long_tail.map_or("unknown".into(), |b| b.to_string()))
            .collect(),
        other => {
            return Err(crate::Error::invalid(
                "--label",
                format!("unknown column {other:?}; use domain or long_tail"),
            )
            .into())
        }
    };
    let even = |v: Vec<usize>, n: Option<usize>| -> Vec<usize> {
        match n {
            Some(n) if n < v.len() => (0..n).map(|k| v[k * v.len() / n]).collect(),
            _ => v,
        }
    };
    let val = even(
        (0..corpus.len())
            .filter(|&i| corpus.samples[i].split == Split::Validation)
            .collect(),
        a.samples,
    );
    let trn = even(
        (0..corpus.len())
            .filter(|&i| corpus.samples[i].split == Split::Train)
            .collect(),
        Some(a.probe_samples),
    );
    if val.is_empty() {
        return Err(crate::Error::in_file(&a.corpus, "no validation samples to evaluate").into());
    }
    let texts = |idx: &[usize]| {
        idx.iter()
            .map(|&i| corpus.samples[i].text.as_str())
            .collect::<Vec<_>>()
    };
    let val_ids = tokenizer::encode_all(&tok, &texts(&val))?;
    let trn_ids = tokenizer::encode_all(&tok, &texts(&trn))?;
    let pb = progress::spinner("evaluating perplexity");
    let losses = eval::sample_losses(&model, &as_slices(&val_ids), 64, device, g.seed)?;
    let domains: Vec<&str> = val
        .iter()
        .map(|&i| corpus.samples[i].domain.as_str())
        .collect();
    let groups = eval::group_losses(&losses, &domains);
    let (shares, threshold) = domain_shares(&corpus, ShareBy::Tokens);
    let long_tail: std::collections::HashSet<&str> = shares
        .iter()
        .filter(|d| d.long_tail)
        .map(|d| d.domain.as_str())
        .collect();
    let tail_labels: Vec<&str> = domains
        .iter()
        .map(|d| {
            if long_tail.contains(d) {
                "long-tail"
            } else {
                "common"
            }
        })
        .collect();
    let tail_groups = eval::group_losses(&losses, &tail_labels);
    pb.set_message("linear probe");
    let layer = a.layer.unwrap_or(model.cfg.n_layer as usize);
    let enc_val = eval::encode(&model, &as_slices(&val_ids), 64, device)?;
    let enc_trn = eval::encode(&model, &as_slices(&trn_ids), 64, device)?;
    let pick = |e: &eval::Encoded| {
        e.layers
            .get(layer)
            .map(|t| t.shallow_clone())
            .ok_or_else(|| {
                crate::Error::invalid("--layer", format!("must be in 0..={}", model.cfg.n_layer))
            })
    };
    let yv: Vec<String> = val.iter().map(|&i| labels_all[i].clone()).collect();
    let yt: Vec<String> = trn.iter().map(|&i| labels_all[i].clone()).collect();
    let pr = probe::linear_probe(
        &pick(&enc_trn)?,
        &yt,
        &pick(&enc_val)?,
        &yv,
        probe::ProbeOptions::default(),
    )?;
    pb.finish_and_clear();
    println!(
        "model {} ({} layers, d_model {}), {} validation samples",
        a.model.display(),
        model.cfg.n_layer,
        model.cfg.d_model,
        val.len()
    );
    println!("perplexity per domain:");
    for gl in &groups {
        println!(
            "  {:<20} {:>9.2}  ({} samples, {} tokens)",
            gl.group,
            gl.perplexity(),
            gl.samples,
            gl.tokens
        );
    }
    println!(
        "long-tail domains (elbow at {}): {}",
        threshold.map_or("none".into(), |t| format!("{:.2}% of tokens", 100.0 * t)),
        shares
            .iter()
            .filter(|d| d.long_tail)
            .map(|d| d.domain.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for gl in tail_groups.iter().skip(1) {
        println!(
            "  {:<20} {:>9.2}  ({} samples)",
            gl.group,
            gl.perplexity(),
            gl.samples
        );
    }
    println!(
        "linear probe (embedding -> {}, layer {layer}, {} train / {} validation samples): accuracy {:.3}",
        a.label, pr.train_samples, pr.test_samples, pr.accuracy
    );
    for (l, n, acc) in &pr.per_label {
        println!("  {l:<20} {acc:>6.3}  ({n} samples)");
    }
    for (layer, routes) in &enc_val.routes {
        print_routing(*layer, &domains, routes);
    }
    if let Some(dir) = &a.out {
        let json = serde_json::json!({
            "model": a.model, "perplexity": groups, "long_tail": tail_groups, "long_tail_threshold": threshold,
            "probe": pr, "layer": layer, "label": a.label,
        });
        crate::io::write_atomic(
            dir.join("eval.json"),
            serde_json::to_string_pretty(&json)?.as_bytes(),
        )?;
        println!("wrote {}", dir.join("eval.json").display());
    }
    Ok(())
}

fn as_slices(v: &[Vec<u32>]) -> Vec<&[u32]> {
    v.iter().map(Vec::as_slice).collect()
}

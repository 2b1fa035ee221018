//! `tailscope train` and `tailscope eval`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use clap::Args;
use indicatif::ProgressBar;

use super::progress::{self, Bars};
use super::Global;
use crate::eval::evaluate::{self, EvalReport, EvalSpec};
use crate::eval::RoutingTable;
use crate::train::runs::{self, Overrides, TrainPlan, TrainedRun};
use crate::train::{self, Outcome, StepRow, TrainSpec};

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    tailscope train --config analyses/demo-train.toml -o out/scratch/train\n  \
    tailscope train --config analyses/demo-train.toml --run cse --resume\n  \
    tailscope train --config analyses/upcycle-smollm2.toml -o out/demo/train   (from SmolLM2)")]
pub struct TrainArgs {
    /// The training spec (TOML).
    #[arg(
        long,
        value_name = "FILE",
        long_help = "The training spec: [data], [model] (a fresh model) or [base] (start from \
            an existing model: a tailscope checkpoint, a Hugging Face folder or a GGUF file, \
            upcycling the runs' experts into its last blocks and freezing the rest), [train] and \
            one or more [[run]] tables (dense, switch, cse). See analyses/demo-train.toml, \
            analyses/upcycle-smollm2.toml and the README."
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
    /// Up-weight the selected samples of this `tailscope select` table (selection.file).
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Selection",
        long_help = "Up-weight the samples a `tailscope select` table marks as selected \
            (selection.file); give --repeat or --weight with it unless the spec's [selection] \
            says how. Selected ids must be training samples of the corpus."
    )]
    pub selection: Option<PathBuf>,
    /// Each selected sample appears N times per epoch (selection.repeat).
    #[arg(
        long,
        value_name = "N",
        conflicts_with = "weight",
        help_heading = "Selection"
    )]
    pub repeat: Option<u32>,
    /// Draw batches with replacement, a selected sample W times as likely (selection.weight).
    #[arg(long, value_name = "W", help_heading = "Selection")]
    pub weight: Option<f64>,
    /// Continue each run from its latest checkpoint.
    #[arg(
        long,
        long_help = "Continue each run from the latest checkpoint in its output folder (a run \
            without one starts fresh). On the CPU the result equals an uninterrupted run."
    )]
    pub resume: bool,
}

#[derive(Debug, Clone, Args)]
#[command(after_help = "Examples:\n  \
    tailscope eval --model out/demo/train/cse/final --corpus out/demo/corpus.parquet\n  \
    tailscope eval --facts out/facts/corpus.probes.parquet --model M --before BASE -o out/facts/eval")]
pub struct EvalArgs {
    /// The model: a checkpoint folder, a Hugging Face folder, a GGUF file or a TorchScript module.
    ///
    /// A TorchScript file (.pt) runs code when it is loaded, as a pickle does: load only files you
    /// trust. Safetensors and GGUF files hold data only.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// The corpus table; validation samples are evaluated.
    #[arg(long, value_name = "FILE", required_unless_present = "facts")]
    pub corpus: Option<PathBuf>,
    /// A probe table of `corpus facts`: judge the model's knowledge of its facts instead.
    #[arg(
        long,
        value_name = "FILE",
        help_heading = "Facts",
        long_help = "A probe table written by `tailscope corpus facts`. Instead of perplexity and \
            probes: per fact, the answer's log-probability given each held-out probe (summed over \
            its tokens), its rank among the distractors, and acquired = ranked first on more than \
            half of the held-out probes; the summary by count. The tokenizer is the model's own, \
            else --tokenizer, else tokenizer.json beside the probe table. -o DIR writes \
            fact_probes.parquet, facts.parquet, facts_summary.parquet and facts.json. \
            Example: --facts out/facts/corpus.probes.parquet"
    )]
    pub facts: Option<PathBuf>,
    /// With --facts: the model before training (gain, and the check that facts start at chance).
    #[arg(
        long,
        value_name = "PATH",
        requires = "facts",
        help_heading = "Facts",
        long_help = "With --facts: the model before training (e.g. the base model a run started \
            from). Adds each answer's log-probability gain and the chance check: the first-rank \
            rate of the invented facts before training with a 95% interval, against \
            1 / (1 + distractors). Without it the check uses the never-inserted controls. \
            Example: --before out/fetched/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    pub before: Option<PathBuf>,
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
    #[arg(long, default_value_t = 5000, value_name = "N", value_parser = super::at_least_one)]
    pub probe_samples: usize,
    /// Validation samples evaluated (evenly spaced; default all).
    #[arg(long, value_name = "N")]
    pub samples: Option<usize>,
    /// Write eval.json here (with --facts: the fact tables).
    #[arg(short, long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Training progress as one bar per run.
#[derive(Default)]
pub struct RunBars(Mutex<Option<ProgressBar>>);

impl train::Progress for RunBars {
    fn start(&self, run: &str, total: u64, done: u64) {
        let pb = progress::bar(total, run);
        pb.set_position(done);
        if let Ok(mut g) = self.0.lock() {
            *g = Some(pb);
        }
    }
    fn step(&self, row: &StepRow) {
        if let Ok(g) = self.0.lock() {
            if let Some(pb) = g.as_ref() {
                pb.set_position(row.step);
                if row.step % 10 == 0 {
                    pb.set_message(format!("loss {:.3}", row.loss));
                }
            }
        }
    }
    fn message(&self, msg: &str) {
        match self.0.lock().ok().and_then(|g| g.clone()) {
            Some(pb) => pb.suspend(|| tracing::info!("{msg}")),
            None => tracing::info!("{msg}"),
        }
    }
    fn finish(&self) {
        if let Some(pb) = self.0.lock().ok().and_then(|mut g| g.take()) {
            pb.finish_and_clear();
        }
    }
}

impl TrainArgs {
    /// The spec's settings this command replaces.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            steps: self.steps,
            batch_size: self.batch_size,
            lr: self.lr,
            checkpoint_every: self.checkpoint_every,
            corpus: self.corpus.clone(),
            selection: self.selection.clone(),
            repeat: self.repeat,
            weight: self.weight,
        }
    }
}

/// A stop flag set by Ctrl-C (the first handler of the process; later calls are harmless).
pub fn ctrl_c_flag() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    stop
}

/// `tailscope train`.
pub fn run_train(a: &TrainArgs, g: &Global) -> anyhow::Result<()> {
    let mut spec = TrainSpec::read(&a.config)?;
    spec.apply(&a.overrides())?;
    spec.check_run_names(&a.runs, &a.config)?;
    let device = crate::device::resolve(g.device)?;
    let plan = TrainPlan {
        spec: &spec,
        runs: &a.runs,
        out: &a.out,
        resume: a.resume,
        seed: g.seed,
    };
    let stop = ctrl_c_flag();
    runs::train_runs(&plan, device, &stop, &RunBars::default(), &mut print_run)?;
    Ok(())
}

/// What `tailscope train` prints about a finished run.
pub fn print_run(t: &TrainedRun) {
    let r = &t.result;
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
        r.state.run,
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
    for table in &t.routing {
        print_routing(table, "validation sequences");
    }
    println!("  outputs: {}", r.dir.display());
    if let Outcome::Interrupted(step) = r.outcome {
        println!("interrupted: checkpoint saved at step {step}; continue with --resume");
    }
}

fn print_routing(t: &RoutingTable, what: &str) {
    println!(
        "  routing of {what} at block {} (rows: domain, columns: expert):",
        t.block
    );
    let head: String = (0..t.experts)
        .map(|e| format!("{:>7}", format!("e{e}")))
        .collect();
    println!("    {:<18}{head}", "domain");
    for (n, row) in t.labels.iter().zip(&t.counts) {
        let cells: String = row.iter().map(|c| format!("{c:>7}")).collect();
        println!("    {n:<18}{cells}");
    }
}

impl EvalArgs {
    /// The library's description of this evaluation.
    pub fn spec(&self, g: &Global) -> EvalSpec {
        EvalSpec {
            model: self.model.clone(),
            corpus: self.corpus.clone().unwrap_or_default(),
            tokenizer: self.tokenizer.clone(),
            label: self.label.clone(),
            extra_labels: Vec::new(),
            layer: self.layer,
            probe_samples: self.probe_samples,
            samples: self.samples,
            seed: g.seed,
        }
    }
}

/// `tailscope eval`.
pub fn run_eval(a: &EvalArgs, g: &Global) -> anyhow::Result<()> {
    let device = crate::device::resolve(g.device)?;
    if let Some(probes) = &a.facts {
        return run_fact_eval(a, probes, device);
    }
    let spec = a.spec(g);
    let r = evaluate::evaluate(&spec, device, &Bars::default())?;
    print_eval(&spec, &r);
    if let Some(dir) = &a.out {
        r.write(&spec, dir)?;
        println!("wrote {}", dir.join("eval.json").display());
    }
    Ok(())
}

/// `tailscope eval --facts`.
fn run_fact_eval(
    a: &EvalArgs,
    probes: &std::path::Path,
    device: tch::Device,
) -> anyhow::Result<()> {
    use crate::eval::facts;
    let set = crate::corpus::facts::ProbeSet::read(probes)?;
    let scores = |model_path: &std::path::Path| -> anyhow::Result<Vec<Vec<f64>>> {
        let (_vs, model) = crate::source::load_model(model_path, device)?;
        let tok = crate::source::tokenizer_for(a.tokenizer.as_deref(), model_path, &model, probes)?;
        let enc = facts::encode(&tok, &set)?;
        Ok(facts::score(&model, None, &enc, device)?)
    };
    let after = scores(&a.model)?;
    let before = a.before.as_deref().map(scores).transpose()?;
    let e = facts::judge(&set, &after, before.as_deref());
    println!(
        "model {}: {} facts, {} probes ({} held out)",
        a.model.display(),
        e.facts.len(),
        e.probes.len(),
        e.probes.iter().filter(|p| p.held_out).count()
    );
    println!("  count  facts  acquired  first-rank rate  mean log p(answer)  mean gain");
    for r in e.by_count() {
        println!(
            "  {:>5}  {:>5}  {:>8.3}  {:>15.3}  {:>18.3}  {}",
            r.count,
            r.facts,
            r.acquired,
            r.first_rate,
            r.logprob,
            r.gain.map_or("–".into(), |g| format!("{g:+.3}"))
        );
    }
    if let Some(c) = &e.chance {
        println!(
            "chance check ({}, {} facts): first-rank rate {:.3} [{:.3}, {:.3}] against chance \
             {:.3}: {}",
            if c.on == "before" {
                "before training"
            } else {
                "never-inserted controls"
            },
            c.facts,
            c.rate,
            c.low,
            c.high,
            c.chance,
            if c.at_chance {
                "at chance"
            } else {
                "NOT at chance"
            }
        );
    }
    if let Some(dir) = &a.out {
        e.write(dir)?;
        println!("wrote {}", dir.join("facts.parquet").display());
    }
    Ok(())
}

/// What `tailscope eval` prints.
pub fn print_eval(spec: &EvalSpec, r: &EvalReport) {
    println!(
        "model {} ({} layers, d_model {}), {} validation samples",
        spec.model.display(),
        r.n_layer,
        r.d_model,
        r.samples
    );
    println!("perplexity per domain:");
    for gl in &r.groups {
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
        r.threshold
            .map_or("none".into(), |t| format!("{:.2}% of tokens", 100.0 * t)),
        r.long_tail.join(", ")
    );
    for gl in r.tail_groups.iter().skip(1) {
        println!(
            "  {:<20} {:>9.2}  ({} samples)",
            gl.group,
            gl.perplexity(),
            gl.samples
        );
    }
    let pr = &r.probe;
    println!(
        "linear probe (embedding -> {}, layer {}, {} train / {} validation samples): accuracy {:.3}",
        spec.label, r.layer, pr.train_samples, pr.test_samples, pr.accuracy
    );
    for (l, n, acc) in &pr.per_label {
        println!("  {l:<20} {acc:>6.3}  ({n} samples)");
    }
    for table in &r.routing {
        print_routing(table, "validation sequences");
    }
}

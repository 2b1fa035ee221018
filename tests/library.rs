//! The library API gives what the binary gives: training through `train::runs::train_runs`,
//! the NTK through `capture::job` and `ntk::pipeline::compute`, and the analysis through
//! `analysis::analyze::analyze` produce, for the same inputs and seed, the same weights, kernel,
//! GC table and correlations as `tailscope train`, `ntk` and `analyze` (the CLI is a thin layer
//! over these functions; this test fails if it ever computes something of its own).

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;

use tailscope::analysis::analyze::{analyze, AnalyzeSpec};
use tailscope::analysis::learnability::LearnabilityOptions;
use tailscope::capture::job::{Job, JobSpec};
use tailscope::capture::{CaptureOptions, Selection};
use tailscope::corpus::synth::{generate, SynthOptions};
use tailscope::corpus::tokenizer::{save, tokenize_corpus, TokenizerSource};
use tailscope::corpus::{build, BuildOptions, SplitChoice};
use tailscope::ntk::pipeline::{compute, NtkOptions};
use tailscope::progress::Silent;
use tailscope::train::runs::{train_runs, Overrides, TrainPlan};
use tailscope::train::TrainSpec;
use tch::{Device, Tensor};

fn cli(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_tailscope"))
        .args(["-q", "--threads", "2", "--seed", "3"])
        .args(args)
        .output()
        .expect("the binary runs");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn tensors(path: &Path) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = tailscope::io::read_tensors(path)
        .unwrap()
        .into_iter()
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let (x, y) = (tensors(a), tensors(b));
    assert_eq!(
        x.iter().map(|t| &t.0).collect::<Vec<_>>(),
        y.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    for ((n, s), (_, t)) in x.iter().zip(&y) {
        assert!(s.equal(t), "{n} differs between {a:?} and {b:?}");
    }
}

fn spec_text(corpus: &Path) -> String {
    format!(
        r#"[data]
corpus = "{}"
eval_samples = 40
[model]
arch = "gpt"
n_layer = 2
d_model = 16
n_head = 2
d_ffn = 32
max_len = 16
[train]
steps = 8
batch_size = 8
lr = 1e-2
min_lr_ratio = 0.1
warmup_steps = 1
grad_clip = 1.0
adamw = {{ beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.01 }}
checkpoint_every = 4
keep_last = 1
keep_steps = []
dynamics_every = 0
probe_samples = 30
cse_warmup_fraction = 0.25
[[run]]
name = "dense"
[[run]]
name = "cse"
experts = {{ kind = "cse", last_k = 1, proj_dim = 4, sample = 200, min_pts = 3, min_cluster_size = 3 }}
"#,
        corpus.display()
    )
}

#[test]
fn library_and_cli_agree() {
    tailscope::device::configure(Some(2), 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A synthetic corpus, built with the library.
    let records = generate(&SynthOptions {
        samples: 300,
        rare_share: 0.2,
        seed: 3,
        ..SynthOptions::default()
    })
    .unwrap();
    let build_opts = BuildOptions {
        seed: 3,
        ..BuildOptions::default()
    };
    let (mut corpus, _) = build("synth", records, &build_opts).unwrap();
    let source = TokenizerSource::Train {
        vocab_size: 300,
        min_frequency: 2,
    };
    let tok = tokenize_corpus(&mut corpus, &source, &Silent).unwrap();
    let table = d.join("corpus.parquet");
    corpus.write(&table).unwrap();
    save(&tok, &d.join("tokenizer.json")).unwrap();
    let spec_path = d.join("spec.toml");
    std::fs::write(&spec_path, spec_text(&table)).unwrap();

    // Training: library and CLI give bit-identical models.
    let mut spec = TrainSpec::read(&spec_path).unwrap();
    spec.apply(&Overrides::default()).unwrap();
    let plan = TrainPlan {
        spec: &spec,
        runs: &[],
        out: &d.join("lib-train"),
        resume: false,
        seed: 3,
    };
    let stop = AtomicBool::new(false);
    let trained = train_runs(
        &plan,
        Device::Cpu,
        &stop,
        &tailscope::train::Silent,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(trained.len(), 2);
    assert!(trained[1].result.state.cse_initialized);
    let cli_train = d.join("cli-train");
    cli(&[
        "train",
        "--config",
        spec_path.to_str().unwrap(),
        "-o",
        cli_train.to_str().unwrap(),
    ]);
    for run in ["dense", "cse"] {
        let f = format!("{run}/final/model.safetensors");
        assert_same_tensors(&d.join("lib-train").join(&f), &cli_train.join(&f));
    }

    // NTK: the library's kernel, sample table and GC table equal the CLI's files.
    let model = d.join("lib-train/cse/final");
    let job = Job::prepare(
        &JobSpec {
            model: model.clone(),
            corpus: table.clone(),
            tokenizer: None,
            split: SplitChoice::Validation,
            samples: 24,
            sample_seed: 0,
            selection: Selection::recommended(),
            options: CaptureOptions {
                batch: 8,
                seed: 3,
                ..CaptureOptions::default()
            },
        },
        Device::Cpu,
    )
    .unwrap();
    let opts = NtkOptions {
        gc_resamples: 20,
        seed: 3,
        ..NtkOptions::default()
    };
    let mut out = compute(&job, &opts, Device::Cpu, None, &Silent).unwrap();
    let lib_ntk = d.join("lib-ntk");
    out.write(&lib_ntk).unwrap();
    let cli_ntk = d.join("cli-ntk");
    cli(&[
        "ntk",
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        table.to_str().unwrap(),
        "--samples",
        "24",
        "--batch",
        "8",
        "--gc-resamples",
        "20",
        "-o",
        cli_ntk.to_str().unwrap(),
    ]);
    assert_same_tensors(
        &lib_ntk.join("kernel.safetensors"),
        &cli_ntk.join("kernel.safetensors"),
    );
    for t in ["samples.parquet", "gc.parquet"] {
        let a = tailscope::io::read_parquet(lib_ntk.join(t)).unwrap();
        let b = tailscope::io::read_parquet(cli_ntk.join(t)).unwrap();
        assert!(a.equals_missing(&b), "{t} differs");
    }
    assert!(out.gc.iter().any(|r| r.column == "expert_h1"));

    // Analysis: the same correlations and flags.
    let a = analyze(
        &AnalyzeSpec {
            resamples: 50,
            learnability: Some(LearnabilityOptions::default().seeded(3)),
            seed: 3,
            ..AnalyzeSpec::new(&lib_ntk, &model, &table)
        },
        Device::Cpu,
        &Silent,
    )
    .unwrap();
    let cli_an = d.join("cli-an");
    cli(&[
        "analyze",
        "--ntk",
        cli_ntk.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--corpus",
        table.to_str().unwrap(),
        "--resamples",
        "50",
        "-o",
        cli_an.to_str().unwrap(),
    ]);
    let corr = tailscope::io::read_parquet(cli_an.join("correlations.parquet")).unwrap();
    let values = tailscope::io::column_f64(&corr, "value", &cli_an).unwrap();
    let lows = tailscope::io::column_f64(&corr, "low", &cli_an).unwrap();
    assert_eq!(values.len(), a.correlations.len());
    for ((c, v), lo) in a.correlations.iter().zip(&values).zip(&lows) {
        assert_eq!(
            (c.estimate.value, c.estimate.low),
            (*v, *lo),
            "{} vs {}",
            c.x,
            c.y
        );
    }
    let flags = tailscope::io::read_parquet(cli_an.join("flags.parquet")).unwrap();
    assert_eq!(flags.height(), a.flagged.len());
    // The same statistics of neglect, learnability included, and the same score.
    let an = tailscope::io::read_parquet(cli_an.join("analysis.parquet")).unwrap();
    for f in ["neglect", "support", "predicted_decrease", "excess_loss"] {
        let cli_v = tailscope::io::column_f64(&an, f, &cli_an).unwrap();
        let lib_v = tailscope::io::column_f64(&a.joined, f, &cli_an).unwrap();
        assert_eq!(cli_v, lib_v, "{f}");
        assert!(lib_v.iter().all(|x| x.is_finite()), "{f}");
    }
}

/// Every bundled spec under analyses/ reads as a pipeline, training or study spec (their enum
/// values are the library's own: `method = "batched"`, `split = "validation"`, ...).
#[test]
fn bundled_specs_parse() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("analyses");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        if text.contains("\nweights = [") {
            let m = tailscope::analysis::neglect::NeglectModel::read(&p).unwrap();
            assert_eq!(m.weights.len(), m.features.len(), "{p:?}");
        } else if text.contains("[experts]") {
            let s = tailscope::study::experts::ExpertsSpec::read(&p).unwrap();
            assert!(s.experts.seeds.len() >= 3, "{p:?}");
        } else if text.contains("[facts]") {
            let s = tailscope::study::facts::FactsStudySpec::read(&p).unwrap();
            assert!(!s.facts.counts.is_empty(), "{p:?}");
        } else if text.contains("[[run]]") {
            TrainSpec::read(&p).unwrap();
        } else if text.contains("[ranking]") {
            let s = tailscope::study::ranking::RankingSpec::read(&p).unwrap();
            assert!(s.ranking.seeds.len() >= 3, "{p:?}");
        } else if text.contains("[continue]") {
            let s = tailscope::study::StudySpec::read(&p).unwrap();
            assert!(s.seeds.len() >= 3, "{p:?}");
        } else {
            let spec = tailscope::pipeline::Spec::read(&p).unwrap();
            assert!(spec.ntk.samples > 0, "{p:?}");
        }
        n += 1;
    }
    assert!(n >= 5, "{n} specs");
}

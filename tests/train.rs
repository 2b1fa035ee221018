//! Training: resumption equal to an uninterrupted run (dense and CSE, interrupted after the CSE
//! initialisation), checkpoint pruning, the logs, and spec errors.
//!
//! These tests live in their own binary and take the `TORCH` lock: libtorch's random generator
//! (dropout) is process-wide, and tests running in parallel threads would draw from it between a
//! run's steps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tch::Device;

use tailscope::model::{named_variables, ExpertConfig};
use tailscope::train::{self, RunSpec, StepRow, TrainData, TrainSpec};

static TORCH: Mutex<()> = Mutex::new(());

/// A tiny corpus and tokenizer on disk, and a spec with dense and CSE runs.
fn setup(dir: &std::path::Path) -> (TrainSpec, TrainData) {
    use tailscope::corpus::{build, synth, tokenizer, BuildOptions};
    let recs = synth::generate(&synth::SynthOptions {
        samples: 400,
        rare_share: 0.2,
        seed: 1,
        ..Default::default()
    })
    .unwrap();
    let (mut corpus, _) = build("synth", recs, &BuildOptions::default()).unwrap();
    let texts: Vec<String> = corpus.samples.iter().map(|s| s.text.clone()).collect();
    let tok = tokenizer::train_bpe(&texts, 320, 2).unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    for (s, n) in corpus
        .samples
        .iter_mut()
        .zip(tokenizer::count_tokens(&tok, &refs).unwrap())
    {
        s.n_tokens = n;
    }
    corpus.write(dir.join("corpus.parquet")).unwrap();
    tokenizer::save(&tok, &dir.join("tokenizer.json")).unwrap();
    let toml = format!(
        r#"
[data]
corpus = "{}"
eval_samples = 40
[model]
arch = "gpt"
n_layer = 2
d_model = 16
n_head = 2
d_ffn = 32
max_len = 16
dropout = 0.1
[train]
steps = 8
batch_size = 8
lr = 1e-2
min_lr_ratio = 0.1
warmup_steps = 2
grad_clip = 1.0
adamw = {{ beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.01 }}
checkpoint_every = 2
keep_last = 1
keep_steps = [2]
dynamics_every = 4
probe_samples = 30
cse_warmup_fraction = 0.25
[[run]]
name = "dense"
[[run]]
name = "cse"
experts = {{ kind = "cse", variant = "both", last_k = 1, proj_dim = 4, sample = 200, min_pts = 3, min_cluster_size = 3, max_experts = 3 }}
"#,
        dir.join("corpus.parquet").display()
    );
    std::fs::write(dir.join("spec.toml"), toml).unwrap();
    let spec = TrainSpec::read(&dir.join("spec.toml")).unwrap();
    let data = TrainData::load(&spec.data.corpus, None).unwrap();
    (spec, data)
}

struct StopAt<'a>(u64, &'a AtomicBool);
impl train::Progress for StopAt<'_> {
    fn step(&self, row: &StepRow) {
        if row.step == self.0 {
            self.1.store(true, Ordering::SeqCst);
        }
    }
}

#[test]
fn resume_equals_uninterrupted_and_checkpoints_are_pruned() {
    let _torch = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (spec, data) = setup(dir.path());
    for run in &spec.runs {
        let straight = dir.path().join("a");
        let never = AtomicBool::new(false);
        let a = train::train_run(
            &spec,
            run,
            &data,
            &straight,
            Device::Cpu,
            7,
            false,
            &never,
            &train::Silent,
        )
        .unwrap();
        assert_eq!(a.outcome, train::Outcome::Finished);
        // Interrupted after step 3 (after the CSE initialisation at step 2), then resumed.
        let split = dir.path().join("b");
        let stop = AtomicBool::new(false);
        let b1 = train::train_run(
            &spec,
            run,
            &data,
            &split,
            Device::Cpu,
            7,
            false,
            &stop,
            &StopAt(3, &stop),
        )
        .unwrap();
        assert_eq!(b1.outcome, train::Outcome::Interrupted(3));
        let stop = AtomicBool::new(false);
        let b = train::train_run(
            &spec,
            run,
            &data,
            &split,
            Device::Cpu,
            7,
            true,
            &stop,
            &train::Silent,
        )
        .unwrap();
        assert_eq!(b.outcome, train::Outcome::Finished);
        let losses = |r: &train::RunResult| r.state.log.iter().map(|x| x.loss).collect::<Vec<_>>();
        assert_eq!(
            losses(&a),
            losses(&b),
            "{}: losses differ after resuming",
            run.name
        );
        assert_eq!(a.state.val, b.state.val);
        let (va, _) =
            tailscope::source::load_model(&straight.join(&run.name).join("final"), Device::Cpu)
                .unwrap();
        let (vb, _) =
            tailscope::source::load_model(&split.join(&run.name).join("final"), Device::Cpu)
                .unwrap();
        for (name, t) in named_variables(&va) {
            assert!(
                t.equal(&vb.variables()[&name]),
                "{}: {name} differs",
                run.name
            );
        }
        if run.name == "cse" {
            assert!(a.state.cse_initialized);
            assert!(
                va.variables().contains_key("h.1.cse.centroids"),
                "the CSE block was expanded"
            );
        }
        // keep_last = 1 plus keep_steps = [2]: steps 2 and 8 remain.
        let mut kept: Vec<String> = std::fs::read_dir(straight.join(&run.name).join("checkpoints"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        kept.sort();
        assert_eq!(kept, ["step-000002", "step-000008"]);
        for f in ["log.parquet", "val.parquet", "clusters.parquet"] {
            assert!(straight.join(&run.name).join(f).exists(), "{f}");
        }
        // Cluster dynamics at steps 0, 4 and 8 for both blocks.
        assert_eq!(a.state.clusters.len(), 6, "{:?}", a.state.clusters);
    }
}

#[test]
fn bad_specs_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.toml");
    std::fs::write(&p, "[data]\ncorpus = \"x\"\n[model]\narch = \"gpt\"\nn_layer = 2\nd_model = 8\nn_head = 2\nd_ffn = 8\nmax_len = 8\nbogus = 1\n[[run]]\nname = \"a\"\n").unwrap();
    let msg = TrainSpec::read(&p).unwrap_err().to_string();
    assert!(msg.contains("s.toml:") && msg.contains("bogus"), "{msg}");
    std::fs::write(&p, "[data]\ncorpus = \"x\"\n[model]\narch = \"gpt\"\nn_layer = 2\nd_model = 8\nn_head = 3\nd_ffn = 8\nmax_len = 8\n[[run]]\nname = \"a\"\n").unwrap();
    let msg = TrainSpec::read(&p).unwrap_err().to_string();
    assert!(msg.contains("model.n_head"), "{msg}");
    let _ = RunSpec {
        name: "x".into(),
        experts: ExpertConfig::Dense,
    };
}

#[test]
fn cse_initialisation_without_clusters_says_what_to_change() {
    let _torch = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (mut spec, data) = setup(dir.path());
    if let ExpertConfig::Cse(c) = &mut spec.runs[1].experts {
        c.min_cluster_size = 10_000;
    }
    let never = AtomicBool::new(false);
    let err = train::train_run(
        &spec,
        &spec.runs[1],
        &data,
        dir.path(),
        Device::Cpu,
        1,
        false,
        &never,
        &train::Silent,
    )
    .err()
    .expect("no cluster is large enough");
    let msg = err.to_string();
    assert!(err.is_bad_input(), "{msg}");
    assert!(
        msg.contains("found no cluster of at least 10000 points")
            && msg.contains("min_cluster_size"),
        "{msg}"
    );
}

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

/// `run` trained straight into `straight`, and trained into `split` with an interruption after
/// step 3 (after the CSE initialisation) and a resumption; both with seed 7.
fn straight_and_resumed(
    spec: &TrainSpec,
    run: &RunSpec,
    data: &TrainData,
    straight: &std::path::Path,
    split: &std::path::Path,
) -> (train::RunResult, train::RunResult) {
    let train =
        |out: &std::path::Path, resume: bool, stop: &AtomicBool, p: &dyn train::Progress| {
            train::train_run(spec, run, data, out, Device::Cpu, 7, resume, stop, p).unwrap()
        };
    let never = AtomicBool::new(false);
    let a = train(straight, false, &never, &train::Silent);
    assert_eq!(a.outcome, train::Outcome::Finished);
    let stop = AtomicBool::new(false);
    let b1 = train(split, false, &stop, &StopAt(3, &stop));
    assert_eq!(b1.outcome, train::Outcome::Interrupted(3));
    let stop = AtomicBool::new(false);
    let b = train(split, true, &stop, &train::Silent);
    (a, b)
}

#[test]
fn resume_equals_uninterrupted_and_checkpoints_are_pruned() {
    let _torch = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (spec, data) = setup(dir.path());
    for run in &spec.runs {
        let (straight, split) = (dir.path().join("a"), dir.path().join("b"));
        let (a, b) = straight_and_resumed(&spec, run, &data, &straight, &split);
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

/// A base model on disk: a fresh (seeded) model of the test spec's shape, with the corpus's
/// tokenizer beside it, as an imported model brings its own.
fn base_model(dir: &std::path::Path, spec: &TrainSpec, data: &TrainData) -> std::path::PathBuf {
    let cfg = spec.model_config(&spec.runs[0], data.vocab).unwrap();
    tch::manual_seed(3);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let _model = tailscope::model::Model::new(&vs.root(), &cfg).unwrap();
    let base = dir.join("base");
    tailscope::checkpoint::save_model(&base, &cfg, &vs).unwrap();
    std::fs::copy(dir.join("tokenizer.json"), base.join("tokenizer.json")).unwrap();
    base
}

/// The spec of `setup` with `[base]` instead of `[model]`, and dense, Switch and CSE runs that
/// all train the FFN of the last block.
fn upcycle_spec(dir: &std::path::Path, base: &std::path::Path) -> TrainSpec {
    let text = std::fs::read_to_string(dir.join("spec.toml")).unwrap();
    let (head, rest) = text.split_once("[model]").unwrap();
    let (_, train) = rest.split_once("[train]").unwrap();
    let train = train
        .split("[[run]]")
        .next()
        .unwrap()
        .replace("cse_warmup_fraction = 0.25", "cse_warmup_fraction = 0.0");
    let toml = format!(
        r#"{head}[base]
model = "{}"
last_k = 1
max_len = 12
[train]{train}
[[run]]
name = "dense"
[[run]]
name = "switch"
experts = {{ kind = "switch", n_experts = 3, capacity_factor = 1.25, aux_weight = 0.01, last_k = 1 }}
[[run]]
name = "cse"
experts = {{ kind = "cse", variant = "mof", last_k = 1, proj_dim = 4, sample = 200, min_pts = 3, min_cluster_size = 3, max_experts = 3 }}
"#,
        base.display()
    );
    std::fs::write(dir.join("upcycle.toml"), toml).unwrap();
    TrainSpec::read(&dir.join("upcycle.toml")).unwrap()
}

#[test]
fn upcycled_runs_train_only_the_top_ffn_and_resume_exactly() {
    let _torch = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (fresh, _) = setup(dir.path());
    let data0 = TrainData::load(&fresh.data.corpus, None).unwrap();
    let base = base_model(dir.path(), &fresh, &data0);
    let spec = upcycle_spec(dir.path(), &base);
    let data = TrainData::for_spec(&spec).unwrap();
    assert!(
        data.tokenizer_json.is_some(),
        "the base model's tokenizer is used"
    );
    let (base_vs, _) = tailscope::source::load_model(&base, Device::Cpu).unwrap();
    let base_vars = base_vs.variables();
    let mlp_params: i64 = base_vars
        .iter()
        .filter(|(n, _)| n.starts_with("h.1.mlp."))
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let mut start_val = Vec::new();
    for run in &spec.runs {
        let (straight, split) = (dir.path().join("a"), dir.path().join("b"));
        let (a, b) = straight_and_resumed(&spec, run, &data, &straight, &split);
        let losses = |r: &train::RunResult| r.state.log.iter().map(|x| x.loss).collect::<Vec<_>>();
        assert_eq!(losses(&a), losses(&b), "{}: resumed run differs", run.name);
        let final_dir = straight.join(&run.name).join("final");
        assert!(final_dir.join("tokenizer.json").exists(), "{}", run.name);
        let (va, _) = tailscope::source::load_model(&final_dir, Device::Cpu).unwrap();
        let (vb, _) =
            tailscope::source::load_model(&split.join(&run.name).join("final"), Device::Cpu)
                .unwrap();
        let mut changed = 0;
        for (name, t) in named_variables(&va) {
            assert!(t.equal(&vb.variables()[&name]), "{}: {name}", run.name);
            let top_ffn = name.starts_with("h.1.mlp.");
            match tailscope::model::upcycle::base_name(&name) {
                Some(src) if !top_ffn => assert!(
                    t.equal(&base_vars[&src]),
                    "{}: frozen `{name}` changed",
                    run.name
                ),
                Some(src) => changed += usize::from(!t.equal(&base_vars[&src])),
                None => {}
            }
        }
        assert!(changed > 0, "{}: the top FFN was not trained", run.name);
        // Trained parameters: the FFN of the last block, once per expert (+ the Switch router).
        let per_expert = match run.name.as_str() {
            "dense" => 1,
            "switch" => 3,
            _ => cse_experts(&va),
        };
        let router = if run.name == "switch" { 16 * 3 } else { 0 };
        assert_eq!(a.params, per_expert * mlp_params + router, "{}", run.name);
        start_val.push(
            a.state
                .val
                .iter()
                .find(|v| v.step == 0 && v.group == "all")
                .cloned(),
        );
    }
    // Before the first step the dense and CSE runs are the base model itself.
    assert_eq!(start_val[0], start_val[2]);
    assert!(start_val[0].is_some());
    // The report's comparison of the runs, from their per-sentence validation losses.
    let long_tail: std::collections::BTreeSet<String> = data
        .corpus
        .samples
        .iter()
        .filter(|s| s.domain != data.corpus.samples[0].domain)
        .map(|s| s.domain.clone())
        .collect();
    let lines =
        tailscope::report::runs::run_lines(&dir.path().join("a"), &long_tail, Some("dense"), 0)
            .unwrap();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let start = start_val[0].as_ref().unwrap().ppl;
    assert!(
        lines[1].starts_with(&format!("dense: validation perplexity {start:.1} before")),
        "{lines:?}"
    );
    assert!(
        lines[0].contains("against dense on the same sentences"),
        "{lines:?}"
    );
    assert!(!lines[1].contains("against"), "{lines:?}");
}

/// Experts of the CSE block h.1 in a saved model's variables.
fn cse_experts(vs: &tch::nn::VarStore) -> i64 {
    vs.variables()
        .keys()
        .filter(|n| n.starts_with("h.1.mlp.experts.") && n.ends_with("c_fc.weight"))
        .count() as i64
}

#[test]
fn upcycling_specs_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.toml");
    let model =
        "[model]\narch = \"gpt\"\nn_layer = 2\nd_model = 8\nn_head = 2\nd_ffn = 8\nmax_len = 8\n";
    std::fs::write(
        &p,
        format!("[data]\ncorpus = \"x\"\n{model}[base]\nmodel = \"m\"\n[[run]]\nname = \"a\"\n"),
    )
    .unwrap();
    let msg = TrainSpec::read(&p).unwrap_err().to_string();
    assert!(msg.contains("not both"), "{msg}");
    std::fs::write(&p, "[data]\ncorpus = \"x\"\n[[run]]\nname = \"a\"\n").unwrap();
    let msg = TrainSpec::read(&p).unwrap_err().to_string();
    assert!(msg.contains("[base]"), "{msg}");
    std::fs::write(&p, "[data]\ncorpus = \"x\"\n[base]\nmodel = \"m\"\nlast_k = 2\n[[run]]\nname = \"s\"\nexperts = { kind = \"switch\", n_experts = 2, capacity_factor = 1.0, aux_weight = 0.0, last_k = 1 }\n").unwrap();
    let msg = TrainSpec::read(&p).unwrap_err().to_string();
    assert!(
        msg.contains("run \"s\": experts.last_k") && msg.contains("base.last_k is 2"),
        "{msg}"
    );
}

/// A selection table (as `tailscope select` writes it) marking `ids` as selected.
fn selection_table(path: &std::path::Path, ids: &[String]) {
    use polars::prelude::{Column, DataFrame};
    let mut df = DataFrame::new(
        ids.len() + 1,
        vec![
            Column::new(
                "id".into(),
                ids.iter()
                    .cloned()
                    .chain(["not-selected".to_string()])
                    .collect::<Vec<_>>(),
            ),
            Column::new(
                "selected".into(),
                (0..=ids.len()).map(|i| i < ids.len()).collect::<Vec<_>>(),
            ),
        ],
    )
    .unwrap();
    tailscope::io::write_parquet(&mut df, path).unwrap();
}

/// Continued training: a trained CSE model continues as it is (its experts, no second
/// initialisation) with a selection up-weighted by a repeat factor or a sampling weight; the
/// batches follow the up-weighting, the run resumes exactly, and a change of selection is refused
/// on resume.
#[test]
fn continued_training_up_weights_a_selection_and_resumes_exactly() {
    let _torch = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let (spec, data) = setup(dir.path());
    let never = AtomicBool::new(false);
    let pre = dir.path().join("pre");
    let cse_run = &spec.runs[1];
    train::train_run(
        &spec,
        cse_run,
        &data,
        &pre,
        Device::Cpu,
        7,
        false,
        &never,
        &train::Silent,
    )
    .unwrap();
    let base = pre.join("cse").join("final");
    let (base_vs, _) = tailscope::source::load_model(&base, Device::Cpu).unwrap();
    let experts = cse_experts(&base_vs);
    assert!(experts >= 1);
    // Ten training samples of the rarest domain.
    let mut counts = std::collections::HashMap::<&str, usize>::new();
    for &i in &data.train {
        *counts
            .entry(data.corpus.samples[i].domain.as_str())
            .or_default() += 1;
    }
    let rare = *counts.iter().min_by_key(|(d, c)| (**c, **d)).unwrap().0;
    let picked: Vec<String> = data
        .train
        .iter()
        .map(|&i| &data.corpus.samples[i])
        .filter(|s| s.domain == rare)
        .take(10)
        .map(|s| s.id.clone())
        .collect();
    let table = dir.path().join("selection.parquet");
    selection_table(&table, &picked);

    let text = std::fs::read_to_string(dir.path().join("spec.toml")).unwrap();
    let (head, rest) = text.split_once("[model]").unwrap();
    let (_, train_opts) = rest.split_once("[train]").unwrap();
    let train_opts = train_opts.split("[[run]]").next().unwrap();
    let continued = |how: &str, name: &str| -> TrainSpec {
        let toml = format!(
            "{head}[base]\nmodel = \"{}\"\nupcycle = false\ntrain = \"all\"\nlast_k = 1\n\
             [train]{train_opts}\n{how}[[run]]\nname = \"cont\"\n",
            base.display()
        );
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, toml).unwrap();
        TrainSpec::read(&p).unwrap()
    };
    let sel = |extra: &str| format!("[selection]\nfile = \"{}\"\n{extra}\n", table.display());
    let plain = continued("", "plain");
    let repeat = continued(&sel("repeat = 4"), "repeat");
    let weight = continued(&sel("weight = 5.0"), "weight");

    // The batches: a repeat factor puts each selected sample 4 times in an epoch, a weight of 5
    // draws them with probability 5·10 / (5·10 + n − 10).
    let data = TrainData::for_spec(&repeat).unwrap();
    let n = data.train.len();
    let chosen =
        train::selection::Selection::resolve(repeat.selection.as_ref().unwrap(), &data).unwrap();
    assert_eq!(chosen.chosen.iter().filter(|&&c| c).count(), 10);
    let mut s = train::selection::sampler(Some(&chosen), &data, 7).unwrap();
    let epoch: Vec<usize> = (0..(n + 30) as u64).flat_map(|k| s.batch(k, 1)).collect();
    for (k, &c) in chosen.chosen.iter().enumerate() {
        let times = epoch.iter().filter(|&&x| x == k).count();
        assert_eq!(times, if c { 4 } else { 1 }, "position {k}");
    }
    let wsel =
        train::selection::Selection::resolve(weight.selection.as_ref().unwrap(), &data).unwrap();
    let mut w = train::selection::sampler(Some(&wsel), &data, 7).unwrap();
    let draws: Vec<usize> = (0..500).flat_map(|k| w.batch(k, 8)).collect();
    let share = draws.iter().filter(|&&k| wsel.chosen[k]).count() as f64 / draws.len() as f64;
    let p = 50.0 / (50.0 + (n - 10) as f64);
    let se = (p * (1.0 - p) / draws.len() as f64).sqrt();
    assert!((share - p).abs() < 5.0 * se, "share {share}, expected {p}");

    let mut finals = Vec::new();
    for (spec, label) in [(&plain, "plain"), (&repeat, "repeat"), (&weight, "weight")] {
        let run = &spec.runs[0];
        let (a, b) = straight_and_resumed(
            spec,
            run,
            &data,
            &dir.path().join(format!("{label}-a")),
            &dir.path().join(format!("{label}-b")),
        );
        let losses = |r: &train::RunResult| r.state.log.iter().map(|x| x.loss).collect::<Vec<_>>();
        assert_eq!(losses(&a), losses(&b), "{label}: resumed run differs");
        assert!(a.state.cse_initialized, "{label}");
        let run_dir = dir.path().join(format!("{label}-a")).join("cont");
        assert!(
            !run_dir.join("cse_init.json").exists(),
            "{label}: the CSE model was initialised again"
        );
        let (va, _) = tailscope::source::load_model(&run_dir.join("final"), Device::Cpu).unwrap();
        assert_eq!(cse_experts(&va), experts, "{label}: experts changed");
        let manifest = std::fs::read_to_string(run_dir.join("manifest.json")).unwrap();
        assert_eq!(
            manifest.contains("selection"),
            label != "plain",
            "{manifest}"
        );
        finals.push(losses(&a));
    }
    assert_ne!(finals[0], finals[1], "the repeat factor changed no batch");
    assert_ne!(finals[0], finals[2], "the sampling weight changed no batch");
    assert_ne!(finals[1], finals[2]);

    // Runs of one spec family that train only the top FFN share the frozen trunk's outputs per
    // step; a run that up-weights a selection draws other batches, so it must not be given the
    // trunk outputs of another run's batch at the same step: trained after the plain run on the
    // same data, the weighted run ends exactly where it ends on data of its own.
    let mlp = |how: &str, name: &str| -> TrainSpec {
        let s = continued(how, name);
        let text = std::fs::read_to_string(dir.path().join(format!("{name}.toml")))
            .unwrap()
            .replace("train = \"all\"", "train = \"mlp\"");
        std::fs::write(dir.path().join(format!("{name}.toml")), text).unwrap();
        let _ = s;
        TrainSpec::read(&dir.path().join(format!("{name}.toml"))).unwrap()
    };
    let (mlp_plain, mlp_weight) = (
        mlp("", "mlp-plain"),
        mlp(&sel("weight = 5.0"), "mlp-weight"),
    );
    let shared = TrainData::for_spec(&mlp_plain).unwrap();
    let run_on = |spec: &TrainSpec, data: &TrainData, out: &str| {
        train::train_run(
            spec,
            &spec.runs[0],
            data,
            &dir.path().join(out),
            Device::Cpu,
            7,
            false,
            &never,
            &train::Silent,
        )
        .unwrap()
        .state
        .log
        .iter()
        .map(|x| x.loss)
        .collect::<Vec<_>>()
    };
    run_on(&mlp_plain, &shared, "mlp-plain");
    let after_plain = run_on(&mlp_weight, &shared, "mlp-weight-shared");
    let alone = run_on(
        &mlp_weight,
        &TrainData::for_spec(&mlp_weight).unwrap(),
        "mlp-weight-alone",
    );
    assert_eq!(
        after_plain, alone,
        "a run was given another run's trunk outputs"
    );

    // Resuming under another up-weighting is refused, naming the selection.
    let repeat2 = continued(&sel("repeat = 2"), "repeat2");
    let err = train::train_run(
        &repeat2,
        &repeat2.runs[0],
        &data,
        &dir.path().join("repeat-a"),
        Device::Cpu,
        7,
        true,
        &never,
        &train::Silent,
    )
    .err()
    .expect("a different selection is not resumed");
    assert!(err.to_string().contains("selection"), "{err}");

    // Bad selections name the file and the id.
    let val_id = data.corpus.samples[data.val[0]].id.clone();
    let bad = dir.path().join("bad.parquet");
    for (ids, says) in [
        (vec![val_id.clone()], "validation sample"),
        (vec!["no-such-id".to_string()], "not a sample"),
    ] {
        selection_table(&bad, &ids);
        let mut s = repeat.clone();
        s.selection.as_mut().unwrap().file = bad.clone();
        let err = train::selection::Selection::resolve(s.selection.as_ref().unwrap(), &data)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.parquet") && err.contains(says), "{err}");
    }
    let mut both = repeat.clone();
    both.selection.as_mut().unwrap().weight = Some(2.0);
    assert!(both.check().unwrap_err().to_string().contains("not both"));
    let mut s = plain.clone();
    let err = s
        .apply(&train::runs::Overrides {
            repeat: Some(3),
            ..Default::default()
        })
        .unwrap_err();
    assert!(err.to_string().contains("--selection"), "{err}");
    // An expert run under upcycle = false is refused.
    let mut e = plain.clone();
    e.runs[0].experts = spec.runs[1].experts.clone();
    assert!(e
        .check()
        .unwrap_err()
        .to_string()
        .contains("upcycle = false"));
}

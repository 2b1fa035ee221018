//! The knowledge-acquisition benchmark: `corpus facts` (insertion, exact exposure, refusals),
//! the per-text trunk cache against recomputing, and the tiny facts study
//! (`analyses/facts-study-tiny.toml`): invented facts at chance before training, facts inserted
//! 16 times acquired where never-inserted ones are not, `eval --facts`, and a rerun that reuses
//! every run.
//!
//! The library tests take the `TORCH` lock: libtorch's random generator is process-wide.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;

use common::*;
use tch::{Device, Kind, Tensor};

use tailscope::batch::{causal_row, make_batch, step_rng, Sampler};
use tailscope::model::trunk::{Trunk, TrunkCache};
use tailscope::model::{Model, ModelConfig};

static TORCH: Mutex<()> = Mutex::new(());

/// A synthetic host and a facts corpus over it (counts 1, 4, 16; 6 facts each; 3 controls; 94
/// host training sentences, so that the 220 training rows are 22 batches of 10).
fn facts_corpus(t: &Tmp) -> (String, String) {
    let host = synth(t, 300);
    let out = t.s("f/corpus.parquet");
    ok(&[
        "corpus",
        "facts",
        "--host",
        &host,
        "--counts",
        "1,4,16",
        "--facts-per-count",
        "6",
        "--distractors",
        "1",
        "--controls",
        "3",
        "--host-samples",
        "94",
        "-o",
        &out,
    ]);
    (host, out)
}

#[test]
fn corpus_facts_inserts_each_fact_count_times_and_one_epoch_reads_it_that_often() {
    let t = Tmp::new();
    let (_, out) = facts_corpus(&t);
    let c = tailscope::corpus::Corpus::read(&out).unwrap();
    let probes =
        tailscope::corpus::facts::ProbeSet::read(&t.path("f/corpus.probes.parquet")).unwrap();
    assert!(
        t.path("f/tokenizer.json").exists(),
        "the host's tokenizer is copied"
    );
    let mut rows: BTreeMap<String, (u32, usize)> = BTreeMap::new();
    for s in &c.samples {
        if let Some(f) = &s.fact {
            assert_eq!(s.domain, "facts");
            assert_eq!(s.split, tailscope::corpus::Split::Train);
            assert!(s.n_tokens > 0);
            rows.entry(f.id.clone()).or_insert((f.count, 0)).1 += 1;
        }
    }
    assert_eq!(rows.len(), 18, "controls are not inserted");
    assert!(rows.values().all(|(k, n)| *k as usize == *n), "{rows:?}");
    assert_eq!(probes.facts().len(), 21);
    let host_train = c
        .samples
        .iter()
        .filter(|s| s.fact.is_none() && s.split == tailscope::corpus::Split::Train)
        .count();
    assert_eq!(host_train, 94);
    // One epoch (steps × batch = the training split) reads every fact exactly `count` times.
    let data = tailscope::train::TrainData::load(std::path::Path::new(&out), None).unwrap();
    let n = data.train.len();
    assert_eq!(n, 94 + 6 * (1 + 4 + 16));
    let batch = 10;
    assert_eq!(n % batch, 0);
    let mut sampler = Sampler::new(n, 5);
    let mut reads: BTreeMap<String, u32> = BTreeMap::new();
    for step in 0..(n / batch) as u64 {
        for k in sampler.batch(step, batch) {
            if let Some(f) = &data.corpus.samples[data.train[k]].fact {
                *reads.entry(f.id.clone()).or_default() += 1;
            }
        }
    }
    assert!(rows.iter().all(|(id, (k, _))| reads[id] == *k), "{reads:?}");
}

#[test]
fn corpus_facts_refuses_zero_counts_too_many_facts_and_hosts_without_training() {
    let t = Tmp::new();
    let host = synth(&t, 120);
    let out = t.s("f/corpus.parquet");
    let args = |extra: &[&str]| -> Vec<String> {
        ["corpus", "facts", "--host", &host, "-o", &out]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let run_bad = |extra: &[&str], needles: &[&str]| {
        let a = args(extra);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        bad(&refs, needles);
    };
    run_bad(&["--counts", "1,0,4"], &["--counts", "is 0", "--controls"]);
    run_bad(
        &["--facts-per-count", "200000"],
        &["--facts-per-count", "pseudo-word"],
    );
    run_bad(&["--distractors", "12"], &["--distractors"]);
    assert!(
        !t.path("f/corpus.parquet").exists(),
        "nothing written on bad input"
    );
    // A host whose samples are all in the validation split.
    let mut c = tailscope::corpus::Corpus::read(&host).unwrap();
    for s in &mut c.samples {
        s.split = tailscope::corpus::Split::Validation;
    }
    let v = t.s("v/corpus.parquet");
    std::fs::create_dir_all(t.path("v")).unwrap();
    c.write(&v).unwrap();
    std::fs::copy(t.path("c/tokenizer.json"), t.path("v/tokenizer.json")).unwrap();
    bad(
        &["corpus", "facts", "--host", &v, "-o", &out],
        &["v/corpus.parquet", "no training split"],
    );
}

/// The tests' three-block GPT of `vocab` tokens.
fn tiny_config(vocab: i64) -> ModelConfig {
    ModelConfig {
        n_layer: 3,
        d_model: 16,
        n_head: 2,
        d_ffn: 32,
        max_len: 64,
        vocab_size: vocab,
        ..ModelConfig::default()
    }
}

/// A seeded [`tiny_config`] model of 50 tokens.
fn tiny_model(seed: i64) -> (tch::nn::VarStore, Model) {
    let cfg = tiny_config(50);
    tch::manual_seed(seed);
    let vs = tch::nn::VarStore::new(Device::Cpu);
    let m = Model::new(&vs.root(), &cfg).unwrap();
    (vs, m)
}

fn texts() -> Vec<Vec<u32>> {
    (0..23u32)
        .map(|i| (0..(3 + i % 6)).map(|j| 6 + (i * 7 + j * 3) % 40).collect())
        .collect()
}

/// The per-text trunk states equal the trunk recomputed on the padded batch (float rounding
/// aside), do not depend on which batch asked first or on the cache's history (a fresh cache
/// gives the same bits), and an undeclared text is computed alone.
#[test]
fn cached_trunk_states_equal_recomputed_ones() {
    let _torch = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let (_vs, model) = tiny_model(3);
    let src = std::path::Path::new("base");
    let seqs = texts();
    let rows: Vec<Vec<i64>> = seqs
        .iter()
        .map(|s| causal_row(&model.cfg, s).unwrap())
        .collect();
    let batch_of = |idx: &[usize]| {
        let refs: Vec<&[u32]> = idx.iter().map(|&i| seqs[i].as_slice()).collect();
        make_batch(
            &model.cfg,
            &refs,
            idx.to_vec(),
            &mut step_rng(0, 0),
            Device::Cpu,
        )
    };
    let a = TrunkCache::default();
    a.declare(src, 2, &rows);
    let idx = [4, 9, 17, 2, 21];
    let b = batch_of(&idx);
    let cached = a.batch(src, 2, &model, &b.ids, &b.mask).unwrap();
    let direct = model.hidden_before(&b.ids, &b.mask, 2, true).unwrap();
    let real = b.mask.unsqueeze(-1).to_kind(Kind::Float);
    let diff = ((&cached - &direct) * &real).abs().max().double_value(&[]);
    assert!(diff < 1e-5, "cached and recomputed trunk differ by {diff}");
    let pads: Tensor = 1.0 - &real;
    let padded = (&cached * &pads).abs().sum(Kind::Float).double_value(&[]);
    assert_eq!(padded, 0.0, "padding positions hold zeros");
    // Another cache, asked in another order and after other batches: the same bits.
    let fresh = TrunkCache::default();
    fresh.declare(src, 2, &rows);
    let other = batch_of(&[21, 0, 1]);
    let _ = fresh
        .batch(src, 2, &model, &other.ids, &other.mask)
        .unwrap();
    let again = fresh.batch(src, 2, &model, &b.ids, &b.mask).unwrap();
    assert!(again.equal(&cached), "states depend on the cache's history");
    let s = fresh.stats();
    assert!(s.hits >= 1 && s.computed >= 5, "{s:?}");
    // An undeclared text is its own chunk: exactly the trunk of that text alone.
    let lone: Vec<i64> = vec![0, 7, 8, 9, 10, 11, 12];
    let got = fresh
        .rows(src, 2, &model, &[lone.as_slice()], Device::Cpu)
        .unwrap();
    let ids = Tensor::from_slice(&lone).view([1, -1]);
    let alone = model
        .hidden_before(&ids, &ids.ones_like().to_kind(Kind::Bool), 2, true)
        .unwrap()
        .squeeze_dim(0);
    assert!(got[0].equal(&alone));
    // The forward pass from cached states gives the logits of the whole network.
    let trunk = Trunk {
        cache: &a,
        source: src,
        layer: 2,
    };
    let f = tailscope::eval::INFERENCE;
    let from_cache = trunk.forward(&model, &b.ids, &b.mask, &f).unwrap().logits;
    let whole = model
        .forward_t(&b.ids, &b.mask, false, false)
        .unwrap()
        .logits;
    let d = ((from_cache - whole) * &real).abs().max().double_value(&[]);
    assert!(d < 1e-4, "logits differ by {d}");
}

/// Runs trained and probes scored with the trunk cache equal those recomputing the trunk.
#[test]
fn training_and_probes_with_the_trunk_cache_equal_recomputing() {
    let _torch = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    let t = Tmp::new();
    let (_, corpus) = facts_corpus(&t);
    let (vs, model) = {
        let data = tailscope::train::TrainData::load(std::path::Path::new(&corpus), None).unwrap();
        let cfg = tiny_config(data.vocab);
        tch::manual_seed(4);
        let vs = tch::nn::VarStore::new(Device::Cpu);
        let m = Model::new(&vs.root(), &cfg).unwrap();
        (vs, m)
    };
    let base = t.path("base");
    tailscope::checkpoint::save_model(&base, &model.cfg, &vs).unwrap();
    let spec_text = format!(
        "[data]\ncorpus = \"{corpus}\"\neval_samples = 20\n[base]\nmodel = \"{}\"\ntrain = \"mlp\"\n\
         last_k = 1\nmax_len = 20\n[train]\nsteps = 6\nbatch_size = 8\nlr = 1e-2\nwarmup_steps = 1\n\
         checkpoint_every = 0\nkeep_last = 1\ndynamics_every = 0\nprobe_samples = 0\n\
         cse_warmup_fraction = 0.0\n[[run]]\nname = \"dense\"\n",
        base.display()
    );
    std::fs::write(t.path("spec.toml"), spec_text).unwrap();
    let spec = tailscope::train::TrainSpec::read(&t.path("spec.toml")).unwrap();
    let train = |cache: TrunkCache, out: &str| {
        let mut data = tailscope::train::TrainData::for_spec(&spec).unwrap();
        data.trunk = cache;
        let never = std::sync::atomic::AtomicBool::new(false);
        let r = tailscope::train::train_run(
            &spec,
            &spec.runs[0],
            &data,
            &t.path(out),
            Device::Cpu,
            1,
            false,
            &never,
            &tailscope::train::Silent,
        )
        .unwrap();
        (r, data)
    };
    let (with, data) = train(TrunkCache::default(), "with");
    let (without, _) = train(TrunkCache::disabled(), "without");
    assert!(data.trunk.stats().hits > 0, "the cache was used");
    let la: Vec<f64> = with.state.log.iter().map(|r| r.loss).collect();
    let lb: Vec<f64> = without.state.log.iter().map(|r| r.loss).collect();
    assert_eq!(la.len(), 6);
    for (a, b) in la.iter().zip(&lb) {
        assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{la:?} vs {lb:?}");
    }
    let (va, vb) = (&with.state.val, &without.state.val);
    assert!((va.last().unwrap().loss - vb.last().unwrap().loss).abs() < 1e-4);
    // Probe scores of the trained model through the cache against the whole network.
    let (_v, trained) =
        tailscope::source::load_model(&t.path("with/dense/final"), Device::Cpu).unwrap();
    let set = tailscope::corpus::facts::ProbeSet::read(&t.path("f/corpus.probes.parquet")).unwrap();
    let tok = tailscope::corpus::tokenizer::load(&t.path("f/tokenizer.json")).unwrap();
    let enc = tailscope::eval::facts::encode(&tok, &set).unwrap();
    let trunk = Trunk {
        cache: &data.trunk,
        source: &base,
        layer: 2,
    };
    trunk.declare(&enc.rows(&trained));
    let a = tailscope::eval::facts::score(&trained, Some(&trunk), &enc, Device::Cpu).unwrap();
    let b = tailscope::eval::facts::score(&trained, None, &enc, Device::Cpu).unwrap();
    let worst = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-4, "probe log-probabilities differ by {worst}");
}

/// The tiny study (`analyses/facts-study-tiny.toml`, paths moved into a temporary folder).
fn tiny_study(t: &Tmp) -> String {
    let spec = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/analyses/facts-study-tiny.toml"
    ))
    .unwrap()
    .replace("out/facts-tiny", &t.s("tiny"));
    t.file("tiny.toml", spec.as_bytes())
}

#[test]
fn tiny_study_facts_read_16_times_are_acquired_and_never_read_ones_are_not() {
    let t = Tmp::new();
    let spec = tiny_study(&t);
    let out = ok(&["study", &spec]);
    assert!(out.contains("Acquired share by count"), "{out}");
    let md = std::fs::read_to_string(t.path("tiny/facts-study.md")).unwrap();
    // Before training, the invented facts rank first at chance.
    assert!(md.contains("against chance 0.200 (at chance)"), "{md}");
    // A model from scratch knows no English paraphrases: acquisition of the tiny model is judged
    // on the `seen` probe (the training phrasing cut before the answer), see the spec's header.
    let o = read_table(&t.path("tiny/outcomes.parquet"));
    let (runs, counts) = (strs(&o, "run"), f64s(&o, "count"));
    let seen: Vec<bool> = f64s(&o, "seen_first").iter().map(|&x| x == 1.0).collect();
    let share = |run: &str, k: f64| {
        let v: Vec<bool> = (0..runs.len())
            .filter(|&i| runs[i] == run && counts[i] == k)
            .map(|i| seen[i])
            .collect();
        assert!(!v.is_empty(), "{run}: no facts of count {k}");
        v.iter().filter(|&&x| x).count() as f64 / v.len() as f64
    };
    for run in ["dense", "cse"] {
        let (read16, never) = (share(run, 16.0), share(run, 0.0));
        assert!(
            read16 >= 0.5,
            "{run}: {read16} of the facts inserted 16 times acquired"
        );
        assert!(
            never <= 0.34,
            "{run}: {never} of the never-inserted facts 'acquired'"
        );
    }
    for f in [
        "truth.parquet",
        "foresight.parquet",
        "figures/acquisition.png",
        "findings.json",
    ] {
        assert!(t.path("tiny").join(f).exists(), "{f}");
    }
    // `eval --facts` on one run against the base model, and the same judgement.
    let ev = ok(&[
        "eval",
        "--facts",
        &t.s("tiny/corpus.probes.parquet"),
        "--model",
        &t.s("tiny/seed-1/all-last2/train/dense/final"),
        "--before",
        &t.s("tiny/pretrain/base/final"),
        "-o",
        &t.s("ev"),
    ]);
    assert!(ev.contains("chance check (before training"), "{ev}");
    let mine = read_table(&t.path("ev/facts.parquet"));
    let study = read_table(&t.path("tiny/seed-1/all-last2/eval/dense/facts.parquet"));
    assert_eq!(f64s(&mine, "logprob"), f64s(&study, "logprob"));
    // A rerun trains nothing again and writes the same outcomes.
    let before = std::fs::read(t.path("tiny/outcomes.parquet")).unwrap();
    ok(&["study", &spec]);
    assert_eq!(
        std::fs::read(t.path("tiny/outcomes.parquet")).unwrap(),
        before
    );
}

//! Helpers shared by the tests that run the `tailscope` binary (`cli.rs`, `reliability.rs`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use polars::prelude::{ParquetReader, SerReader};

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tailscope"));
    c.arg("-q").arg("--threads").arg("2");
    c
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "{args:?} failed: {}", stderr(&o));
    stdout(&o)
}

/// Run, expect exit status 2 and a single stderr line containing every `needles` entry.
pub fn bad(args: &[&str], needles: &[&str]) {
    let o = run(args);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{args:?}: expected exit 2, got {:?}; {err}",
        o.status
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{args:?}: {err:?} lacks {n:?}");
    }
}

/// A usage error from clap: exit 2, and its first line names everything in `needles`.
pub fn usage_bad(args: &[&str], needles: &[&str]) {
    let o = run(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    let first = err.lines().next().unwrap_or_default();
    for n in needles {
        assert!(first.contains(n), "{args:?}: {first:?} lacks {n:?}");
    }
}

pub fn read_table(p: &Path) -> polars::prelude::DataFrame {
    ParquetReader::new(std::fs::File::open(p).unwrap())
        .finish()
        .unwrap()
}

pub fn strs(df: &polars::prelude::DataFrame, col: &str) -> Vec<String> {
    df.column(col)
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|v| v.unwrap().to_string())
        .collect()
}

pub struct Tmp(pub tempfile::TempDir);
impl Tmp {
    pub fn new() -> Tmp {
        Tmp(tempfile::tempdir().unwrap())
    }
    pub fn file(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.0.path().join(name);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(&p, bytes).unwrap();
        p.to_string_lossy().into_owned()
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
    pub fn s(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}

pub const SMALL_VOCAB: &[&str] = &["--vocab-size", "300", "--min-words", "1"];

pub fn lines(n: usize) -> String {
    (0..n)
        .map(|i| format!("sample number {i} says hello world again\n"))
        .collect()
}

/// The `[model]` table of the tests' two-block GPT.
pub const TINY_MODEL: &str = "[model]
arch = \"gpt\"
n_layer = 2
d_model = 16
n_head = 2
d_ffn = 32
max_len = 16
";

/// A two-block GPT training spec (dense and CSE runs) over `corpus`, written into `t`.
pub fn tiny_spec(t: &Tmp, corpus: &str) -> String {
    t.file(
        "spec.toml",
        format!(
            r#"[data]
corpus = "{corpus}"
eval_samples = 60
{TINY_MODEL}[train]
steps = 6
batch_size = 8
lr = 1e-2
min_lr_ratio = 0.1
warmup_steps = 1
grad_clip = 1.0
adamw = {{ beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.01 }}
checkpoint_every = 3
keep_last = 1
keep_steps = []
dynamics_every = 0
probe_samples = 40
cse_warmup_fraction = 0.34
[[run]]
name = "dense"
[[run]]
name = "cse"
experts = {{ kind = "cse", last_k = 1, proj_dim = 4, sample = 200, min_pts = 3, min_cluster_size = 3 }}
"#
        )
        .as_bytes(),
    )
}

/// A synthetic corpus of `n` samples (20% rare domains, 320-token vocabulary) at `c/corpus.parquet`.
pub fn synth(t: &Tmp, n: usize) -> String {
    let corpus = t.s("c/corpus.parquet");
    ok(&[
        "corpus",
        "synth",
        "--samples",
        &n.to_string(),
        "--rare-share",
        "0.2",
        "--vocab-size",
        "320",
        "-o",
        &corpus,
    ]);
    corpus
}

/// Train run `run` of `spec` into `t/train`; the path of its final model.
pub fn train_run(t: &Tmp, spec: &str, run: &str) -> String {
    ok(&["train", "--config", spec, "--run", run, "-o", &t.s("train")]);
    t.s(&format!("train/{run}/final"))
}

/// A numeric (or boolean) column as float64, nulls as NaN.
pub fn f64s(df: &polars::prelude::DataFrame, col: &str) -> Vec<f64> {
    df.column(col)
        .unwrap()
        .cast(&polars::prelude::DataType::Float64)
        .unwrap()
        .f64()
        .unwrap()
        .iter()
        .map(|v| v.unwrap_or(f64::NAN))
        .collect()
}

/// `ntk` of 26 validation samples in tiles of 4 (7 shards, 28 tiles), batches of 4 and 3 bins
/// into `out`, then `extra`: the streamed run the scale-out tests split over processes.
pub fn tiled_ntk(model: &str, corpus: &str, out: &str, extra: &[&str]) -> Vec<String> {
    [
        "ntk",
        "--model",
        model,
        "--corpus",
        corpus,
        "--samples",
        "26",
        "--tile",
        "4",
        "--batch",
        "4",
        "--bins",
        "3",
        "-o",
        out,
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// Share I of N of `args` (`--shard I/N`) for every I, run at once; their outputs, by I.
pub fn run_shares(args: &[String], n: usize) -> Vec<Output> {
    let children: Vec<_> = (0..n)
        .map(|i| {
            bin()
                .args(args)
                .args(["--shard", &format!("{i}/{n}")])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("the binary starts")
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().expect("the share ends"))
        .collect()
}

/// GC, interval, self-kernel and alignment columns equal to 1e-9.
pub fn same_tables(a: &std::path::Path, b: &std::path::Path) {
    for (table, cols) in [
        (
            "gc.parquet",
            &["gc", "gc_low", "gc_high", "participation"][..],
        ),
        ("samples.parquet", &["self_kernel", "alignment"][..]),
    ] {
        let (p, q) = (read_table(&a.join(table)), read_table(&b.join(table)));
        assert_eq!(p.height(), q.height(), "{table}");
        for c in cols {
            for (v, w) in f64s(&p, c).iter().zip(f64s(&q, c)) {
                assert!(
                    (v.is_nan() && w.is_nan()) || (v - w).abs() <= 1e-9 * v.abs().max(1.0),
                    "{table} {c}: {v} against {w}"
                );
            }
        }
    }
}

/// Every tensor of two safetensors files is equal, bit for bit.
pub fn same_tensors(a: &std::path::Path, b: &std::path::Path) {
    let mut x = tch::Tensor::read_safetensors(a).unwrap();
    let mut y = tch::Tensor::read_safetensors(b).unwrap();
    x.sort_by(|p, q| p.0.cmp(&q.0));
    y.sort_by(|p, q| p.0.cmp(&q.0));
    assert_eq!(x.len(), y.len());
    for ((n, s), (m, u)) in x.iter().zip(&y) {
        assert_eq!(n, m);
        assert!(
            s.equal(u),
            "{n} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

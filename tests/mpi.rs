//! `mpirun -n R tailscope ntk --tile N …` (cargo feature `mpi`; `make test` builds with it and
//! provisions MPI): the outputs of one process for R = 2 and 3 (uneven shares), with and without
//! projection, with blocks; a rank that fails or is killed ends the whole job, naming the rank,
//! and a rerun under another R resumes from the complete shards and tiles.
#![cfg(feature = "mpi")]

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `mpirun -n ranks tailscope …`: as root where tests run in containers, oversubscribed on 2
/// cores, over shared memory without the single-copy mechanism that containers forbid.
fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "--mca",
        "btl_vader_single_copy_mechanism",
        "none",
        "-n",
        &ranks.to_string(),
        env!("CARGO_BIN_EXE_tailscope"),
        "-q",
        "--threads",
        "2",
    ]);
    c
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn run_mpi(ranks: usize, args: &[String]) -> Output {
    mpirun(ranks).args(args).output().expect("mpirun runs")
}

fn tensors(p: &Path) -> Vec<(String, tch::Tensor)> {
    let mut x = tch::Tensor::read_safetensors(p).unwrap();
    x.sort_by(|a, b| a.0.cmp(&b.0));
    x
}

/// Kernels (total and blocks) equal to 1e-10 relative; gc and sample tables equal to 1e-9.
fn same_outputs(a: &Path, b: &Path) {
    same_kernels(a, b);
    same_tables(a, b);
}

fn same_kernels(a: &Path, b: &Path) {
    let (x, y) = (
        tensors(&a.join("kernel.safetensors")),
        tensors(&b.join("kernel.safetensors")),
    );
    assert_eq!(x.len(), y.len());
    for ((n, s), (m, u)) in x.iter().zip(&y) {
        assert_eq!(n, m);
        let scale = s.abs().max().double_value(&[]).max(1e-300);
        let err = (s - u).abs().max().double_value(&[]) / scale;
        assert!(err <= 1e-10, "{n}: {err:e}");
    }
}

#[test]
fn mpi_ranks_give_the_one_process_kernel_and_survive_failures() {
    let t = Tmp::new();
    let corpus = synth(&t, 800);
    let spec = tiny_spec(&t, &corpus);
    let model = train_run(&t, &spec, "cse");
    let ntk = |out: &str, extra: &[&str]| tiled_ntk(&model, &corpus, out, extra);
    // 26 samples in tiles of 4: 7 shards, 28 tiles; 3 ranks hold 3, 2 and 2 shards.
    for (name, extra) in [("plain", vec![]), ("projected", vec!["--project", "48"])] {
        let one = t.s(&format!("{name}-one"));
        ok(&strs(&ntk(&one, &extra)));
        for r in [2, 3] {
            let dir = t.s(&format!("{name}-{r}"));
            let o = run_mpi(r, &ntk(&dir, &extra));
            let out = stdout(&o);
            assert!(o.status.success(), "{}\n{out}", stderr(&o));
            assert!(out.contains("NTK of 26 samples"), "{out}");
            assert!(out.contains(&format!("ranks: {r}")), "{out}");
            same_outputs(Path::new(&one), Path::new(&dir));
            let ranks: serde_json::Value = serde_json::from_slice(
                &std::fs::read(t.path(&format!("{name}-{r}/ranks.json"))).unwrap(),
            )
            .unwrap();
            let ranks = ranks.as_array().unwrap();
            assert_eq!(ranks.len(), r);
            let field =
                |f: &str| -> Vec<u64> { ranks.iter().map(|x| x[f].as_u64().unwrap()).collect() };
            assert_eq!(field("tiles_computed").iter().sum::<u64>(), 28);
            assert_eq!(field("samples").iter().sum::<u64>(), 26);
            if r == 3 {
                assert_eq!(field("shards_captured"), vec![3, 2, 2]);
            }
            assert!(field("bytes_sent").iter().all(|&b| b > 0));
        }
    }
    // Above --assemble-max the ranks compute GC from their rows of the kernel (sub-kernels of
    // all 26 samples here, by all-reduce), and write no kernel: the same tables.
    let dir = t.s("rows-3");
    let o = run_mpi(3, &ntk(&dir, &["--assemble-max", "10"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("exceed --assemble-max 10"),
        "{}",
        stdout(&o)
    );
    assert!(!t.path("rows-3/kernel.safetensors").exists());
    same_tables(&t.path("plain-one"), &t.path("rows-3"));
    // 600 samples: the principal pairs of the whole set and of every group above 512 come from
    // the Lanczos iteration on the ranks' products.
    let big = |out: &str| -> Vec<String> {
        let mut v = ntk(out, &["--project", "16", "--assemble-max", "100"]);
        for (flag, value) in [("--samples", "600"), ("--tile", "128")] {
            let at = v.iter().position(|a| a == flag).unwrap();
            v[at + 1] = value.to_string();
        }
        v.extend(["--split".to_string(), "train".to_string()]);
        v
    };
    let mut one = big(&t.s("big-one"));
    let at = one.iter().position(|a| a == "--assemble-max").unwrap();
    one[at + 1] = "1000".into();
    ok(&strs(&one));
    let o = run_mpi(2, &big(&t.s("big-2")));
    assert!(o.status.success(), "{}", stderr(&o));
    same_tables(&t.path("big-one"), &t.path("big-2"));
    // Bad input fails on every rank: the job ends with exit 2 and each message names its rank.
    let bad: Vec<String> = ntk(&t.s("bad"), &[])
        .into_iter()
        .map(|s| {
            if s == model {
                "/nonexistent/model".into()
            } else {
                s
            }
        })
        .collect();
    let o = run_mpi(2, &bad);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("rank 0 of 2") || err.contains("rank 1 of 2"),
        "{err}"
    );
    // A rank killed midway ends the whole job within seconds; rerun under 3 ranks, it resumes.
    let killed = t.s("killed");
    let mut child = mpirun(2)
        .args(ntk(&killed, &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let shards = |d: &str| {
        std::fs::read_dir(Path::new(d).join("shards"))
            .map(|r| r.count())
            .unwrap_or(0)
    };
    while shards(&killed) < 2 && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let pids = String::from_utf8(
        Command::new("pgrep")
            .args(["-P", &child.id().to_string()])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let victim = pids.split_whitespace().last().expect("a rank is running");
    let killed_at = Instant::now();
    Command::new("kill").args(["-9", victim]).status().unwrap();
    let status = child.wait().unwrap();
    let ended = killed_at.elapsed();
    eprintln!("the MPI job ended {ended:?} after a rank was killed");
    assert!(!status.success(), "the job fails when a rank is killed");
    assert!(
        ended < Duration::from_secs(20),
        "the other rank must not hang: {ended:?}"
    );
    let o = run_mpi(3, &ntk(&killed, &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("NTK of 26 samples"), "{out}");
    same_outputs(&t.path("plain-one"), &t.path("killed"));
    let ranks: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path("killed/ranks.json")).unwrap()).unwrap();
    let reused: u64 = ranks
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["shards_reused"].as_u64().unwrap())
        .sum();
    assert!(reused >= 1, "the killed job's shards are reused: {ranks}");
    // A panic on one rank (injected) aborts the job within seconds, naming the rank.
    let started = Instant::now();
    let o = mpirun(2)
        .env("TAILSCOPE_TEST_PANIC_RANK", "1")
        .args(ntk(&t.s("panicked"), &[]))
        .output()
        .unwrap();
    let ended = started.elapsed();
    eprintln!("the MPI job ended {ended:?} after it started, a rank having panicked");
    assert!(!o.status.success(), "the job fails when a rank panics");
    assert!(
        stderr(&o).contains("rank 1 of 2 panicked"),
        "{}",
        stderr(&o)
    );
    assert!(ended < Duration::from_secs(60), "{ended:?}");
    // Under other settings the rerun is refused, naming the setting.
    let o = run_mpi(2, &ntk(&killed, &["--project", "48"]));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("capture.projection"), "{}", stderr(&o));
}

/// `args` with the value after `flag` replaced by `value`.
fn with_value(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let at = args
        .iter()
        .position(|a| a == flag)
        .expect("the flag is there");
    args[at + 1] = value.to_string();
    args
}

/// The ring exchange when the ranks' payloads differ in size and in number of messages: more
/// ranks than shards (1 shard on 3 ranks, 2 on 4: ranks with nothing to send), uneven shares
/// (4 shards of 3, 3, 3 and 1 samples on 3 ranks) and payloads of several messages
/// (`TAILSCOPE_MPI_CHUNK` set to 1,000 values, so a shard's gradients cross in tens of
/// messages and a rank's last message is shorter than its neighbour's). Every run gives the
/// one-process kernel, GC and sample tables; a chunk size that is not a positive count is
/// refused, naming the variable.
#[test]
fn mpi_exchange_agrees_on_message_counts_whatever_the_shares() {
    let t = Tmp::new();
    let corpus = synth(&t, 400);
    let spec = tiny_spec(&t, &corpus);
    let model = train_run(&t, &spec, "dense");
    let args = |out: &str, samples: usize, tile: usize| {
        let v = tiled_ntk(&model, &corpus, out, &[]);
        with_value(
            with_value(v, "--samples", &samples.to_string()),
            "--tile",
            &tile.to_string(),
        )
    };
    // (samples, tile, ranks, values per message)
    let cases: [(usize, usize, usize, Option<&str>); 4] = [
        (8, 8, 3, None),
        (8, 4, 4, None),
        (10, 3, 3, Some("1000")),
        (8, 8, 3, Some("1000")),
    ];
    for (k, (samples, tile, ranks, chunk)) in cases.into_iter().enumerate() {
        let one = t.s(&format!("one-{k}"));
        ok(&strs(&args(&one, samples, tile)));
        let dir = t.s(&format!("ranks-{k}"));
        let mut cmd = mpirun(ranks);
        if let Some(c) = chunk {
            cmd.env("TAILSCOPE_MPI_CHUNK", c);
        }
        let o = cmd.args(args(&dir, samples, tile)).output().unwrap();
        assert!(
            o.status.success(),
            "{samples} samples in tiles of {tile} on {ranks} ranks, chunk {chunk:?}: {}",
            stderr(&o)
        );
        same_outputs(Path::new(&one), Path::new(&dir));
        let ranks_json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(Path::new(&dir).join("ranks.json")).unwrap())
                .unwrap();
        let samples_per_rank: Vec<u64> = ranks_json
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["samples"].as_u64().unwrap())
            .collect();
        let want: Vec<u64> = (0..ranks)
            .map(|r| {
                (0..samples.div_ceil(tile))
                    .filter(|s| s % ranks == r)
                    .map(|s| (samples.min((s + 1) * tile) - s * tile) as u64)
                    .sum()
            })
            .collect();
        assert_eq!(samples_per_rank, want, "case {k}");
    }
    for bad in ["0", "many"] {
        let o = mpirun(2)
            .env("TAILSCOPE_MPI_CHUNK", bad)
            .args(args(&t.s(&format!("bad-{bad}")), 8, 4))
            .output()
            .unwrap();
        assert!(!o.status.success());
        assert!(stderr(&o).contains("TAILSCOPE_MPI_CHUNK"), "{}", stderr(&o));
    }
}

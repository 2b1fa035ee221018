//! Reliability of the `tailscope` binary as a process: killed with SIGKILL at many moments and
//! rerun, it ends with the outputs of an uninterrupted run, bit for bit; resumable outputs made
//! under other settings are refused (manifests); one writer per output folder (locks); NaN/Inf
//! weights, a diverging loss and a failing write (file-size limit) stop with a message naming
//! the tensor, step or file, and leave no partial output.

mod common;
use common::*;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The tiny spec with `steps` steps, a checkpoint after every step and `lr`.
fn spec_with(t: &Tmp, corpus: &str, name: &str, steps: u64, lr: &str) -> String {
    let base = std::fs::read_to_string(tiny_spec(t, corpus)).unwrap();
    let text = base
        .replace("\nsteps = 6\n", &format!("\nsteps = {steps}\n"))
        .replace("checkpoint_every = 3", "checkpoint_every = 1")
        .replace("lr = 1e-2", &format!("lr = {lr}"));
    assert_ne!(text, base);
    t.file(name, text.as_bytes())
}

/// Temporary files and folders (`.NAME.PID.tmp`) anywhere under `dir`:
/// a process killed while writing leaves one.
fn temp_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".tmp") {
                found.push(e.path().display().to_string());
            }
            if e.path().is_dir() {
                stack.push(e.path());
            }
        }
    }
    found
}

/// Number of files under `dir` whose name ends with `suffix` (progress of a running process).
fn count_files(dir: &Path, suffix: &str) -> usize {
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else if e.file_name().to_string_lossy().ends_with(suffix) {
                n += 1;
            }
        }
    }
    n
}

/// What one interrupted attempt did.
struct Kill {
    /// The process had already finished when the signal was due.
    finished_first: bool,
    /// Temporary files were left: the kill landed during a write.
    during_write: bool,
}

/// Start `args`; once `ready()` says so (polled every 2 ms, 60 s at most) wait `jitter` more,
/// then SIGKILL it (`|| true`: kill after `jitter`).
fn start_and_kill(args: &[&str], out: &Path, ready: &dyn Fn() -> bool, jitter: Duration) -> Kill {
    let before = temp_files(out);
    let mut child = bin()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ready() && t0.elapsed() < Duration::from_secs(60) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(jitter);
    let finished_first = child.try_wait().unwrap().is_some();
    // Child::kill sends SIGKILL on Unix: no handler runs, nothing is flushed or cleaned up.
    let _ = child.kill();
    let _ = child.wait();
    Kill {
        finished_first,
        during_write: temp_files(out).iter().any(|f| !before.contains(f)),
    }
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn same_bytes(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(
        x == y,
        "{} and {} differ ({} and {} bytes)",
        a.display(),
        b.display(),
        x.len(),
        y.len()
    );
}

#[test]
fn train_killed_at_any_moment_resumes_bit_for_bit() {
    let t = Tmp::new();
    let corpus = synth(&t, 400);
    let spec = spec_with(&t, &corpus, "long.toml", 24, "1e-2");
    let straight = t.s("straight");
    ok(&["train", "--config", &spec, "--run", "cse", "-o", &straight]);
    // Kill after the k-th checkpoint (and during later writes), resume, repeat.
    let out = t.s("killed");
    let dir = t.path("killed/cse");
    let mut kills = Vec::new();
    for (i, target) in [1usize, 4, 8, 12, 17, 21].into_iter().enumerate() {
        let ready = || {
            count_files(&dir.join("checkpoints"), "state.json") >= 1 && {
                // The newest checkpoint's step.
                std::fs::read_dir(dir.join("checkpoints"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .strip_prefix("step-")
                            .and_then(|s| s.parse::<usize>().ok())
                    })
                    .max()
                    .unwrap_or(0)
                    >= target
            }
        };
        let mut args = vec!["train", "--config", &spec, "--run", "cse", "-o", &out];
        if i > 0 {
            args.push("--resume");
        }
        kills.push(start_and_kill(
            &args,
            &t.path("killed"),
            &ready,
            Duration::from_micros(300 * i as u64),
        ));
    }
    assert!(
        kills.iter().filter(|k| !k.finished_first).count() >= 4,
        "the kills must land before the run ends"
    );
    // The stale lock of the last killed process is taken over; the run finishes.
    ok(&[
        "train", "--config", &spec, "--run", "cse", "--resume", "-o", &out,
    ]);
    same_bytes(
        &t.path("straight/cse/final/model.safetensors"),
        &t.path("killed/cse/final/model.safetensors"),
    );
    assert!(!dir.join(".tailscope.lock").exists());
    assert!(
        temp_files(&t.path("killed")).is_empty(),
        "the killed processes' temporary files are removed: {:?}",
        temp_files(&t.path("killed"))
    );
    let during = kills.iter().filter(|k| k.during_write).count();
    eprintln!("train: {} kills, {during} during a write", kills.len());
    // With a checkpoint every step most kills land inside one (4 of 6 here).
    assert!(during >= 1, "no kill landed during a checkpoint write");
}

#[test]
fn streamed_kernel_killed_at_any_moment_resumes_bit_for_bit() {
    let t = Tmp::new();
    let corpus = synth(&t, 400);
    let spec = tiny_spec(&t, &corpus);
    let model = train_run(&t, &spec, "dense");
    let ntk = |out: &str| -> Vec<String> {
        [
            "ntk",
            "--model",
            &model,
            "--corpus",
            &corpus,
            "--samples",
            "30",
            "--tile",
            "4",
            "--batch",
            "4",
            "-o",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let straight = t.s("straight");
    let a = ntk(&straight);
    ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
    // 8 shards and 36 tiles: kill after some shards, after some tiles, and in between.
    let killed = t.s("killed");
    let b = ntk(&killed);
    let args: Vec<&str> = b.iter().map(String::as_str).collect();
    let mut kills = Vec::new();
    for (i, files) in [1usize, 3, 6, 10, 16, 24, 33].into_iter().enumerate() {
        let ready = || count_files(&t.path("killed"), ".safetensors") >= files;
        kills.push(start_and_kill(
            &args,
            &t.path("killed"),
            &ready,
            Duration::from_micros(500 * i as u64),
        ));
    }
    assert!(kills.iter().filter(|k| !k.finished_first).count() >= 5);
    let printed = ok(&args);
    assert!(printed.contains("reused"), "{printed}");
    assert!(
        temp_files(&t.path("killed")).is_empty(),
        "{:?}",
        temp_files(&t.path("killed"))
    );
    same_tensors(
        &t.path("straight/kernel.safetensors"),
        &t.path("killed/kernel.safetensors"),
    );
    same_bytes(&t.path("straight/gc.parquet"), &t.path("killed/gc.parquet"));
    same_bytes(
        &t.path("straight/samples.parquet"),
        &t.path("killed/samples.parquet"),
    );
    eprintln!(
        "ntk --tile: {} kills, {} during a write",
        kills.len(),
        kills.iter().filter(|k| k.during_write).count()
    );
}

#[test]
fn declarative_run_killed_and_rerun_gives_the_same_outputs() {
    let t = Tmp::new();
    let corpus = synth(&t, 400);
    let train_spec = spec_with(&t, &corpus, "train.toml", 16, "1e-2");
    let spec_for = |name: &str| {
        t.file(
            &format!("{name}.toml"),
            format!(
                "[data]\ncorpus = \"{corpus}\"\n[train]\nconfig = \"{train_spec}\"\nruns = [\"dense\", \"cse\"]\nout = \"{o}/train\"\nresume = true\n\
                 [ntk]\nsamples = 16\nbatch = 8\nout = \"{o}/ntk\"\n[analysis]\nmodel = \"cse\"\nbaseline = \"dense\"\nresamples = 50\nout = \"{o}/an\"\n\
                 [report]\nout = \"{o}/rp\"\nnotebook = \"{o}/run.ipynb\"\ntitle = \"kill test\"\n",
                o = t.s(name)
            )
            .as_bytes(),
        )
    };
    let straight = spec_for("straight");
    let t0 = Instant::now();
    ok(&["run", &straight]);
    let whole = t0.elapsed();
    let killed = spec_for("killed");
    let mut kills = 0;
    // Each attempt continues where the last one stopped: kills spread over training, the
    // kernel, the analysis and the report.
    for fraction in [0.2, 0.35, 0.5, 0.7] {
        let k = start_and_kill(
            &["run", &killed],
            &t.path("killed"),
            &|| true,
            whole.mul_f64(fraction),
        );
        kills += usize::from(!k.finished_first);
    }
    assert!(kills >= 2, "the kills must land before the run ends");
    ok(&["run", &killed]);
    assert!(
        temp_files(&t.path("killed")).is_empty(),
        "{:?}",
        temp_files(&t.path("killed"))
    );
    for f in [
        "train/dense/final/model.safetensors",
        "train/cse/final/model.safetensors",
        "an/flags.parquet",
        "ntk/cse/gc.parquet",
    ] {
        same_bytes(&t.path("straight").join(f), &t.path("killed").join(f));
    }
    same_tensors(
        &t.path("straight/ntk/cse/kernel.safetensors"),
        &t.path("killed/ntk/cse/kernel.safetensors"),
    );
}

#[test]
fn one_writer_per_folder_and_stale_locks_taken_over() {
    let t = Tmp::new();
    let corpus = synth(&t, 400);
    let spec = spec_with(&t, &corpus, "long.toml", 400, "1e-2");
    let out = t.s("train");
    // A real second run while the first trains.
    let mut first = bin()
        .args(["train", "--config", &spec, "--run", "dense", "-o", &out])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = t.path("train/dense/.tailscope.lock");
    let t0 = Instant::now();
    while !lock.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    bad(
        &["train", "--config", &spec, "--run", "dense", "-o", &out],
        &[
            ".tailscope.lock",
            &format!("in use by process {}", first.id()),
            "tailscope train, run dense",
        ],
    );
    let _ = first.kill();
    let _ = first.wait();
    assert!(lock.exists(), "a killed process leaves its lock");
    // Stale now: taken over by the next run into the folder, and removed when it ends.
    let short = spec_with(&t, &corpus, "short.toml", 4, "1e-2");
    let printed = ok(&["train", "--config", &short, "--run", "dense", "-o", &out]);
    assert!(printed.contains("run dense"), "{printed}");
    assert!(!lock.exists());
}

#[test]
fn resuming_under_other_settings_is_refused_naming_the_difference() {
    let t = Tmp::new();
    let corpus = synth(&t, 400);
    let spec = spec_with(&t, &corpus, "a.toml", 4, "1e-2");
    let out = t.s("train");
    ok(&["train", "--config", &spec, "--run", "dense", "-o", &out]);
    // Another learning rate, another step count: named, with the flag that starts afresh.
    let other = spec_with(&t, &corpus, "b.toml", 4, "3e-2");
    bad(
        &[
            "train", "--config", &other, "--run", "dense", "--resume", "-o", &out,
        ],
        &[
            "manifest.json",
            "train.lr = 0.01",
            "train.lr = 0.03",
            "without --resume",
        ],
    );
    bad(
        &[
            "train", "--config", &spec, "--run", "dense", "--resume", "--steps", "6", "-o", &out,
        ],
        &["train.steps = 4", "train.steps = 6"],
    );
    // Another corpus.
    let t2 = Tmp::new();
    let corpus2 = synth(&t2, 300);
    let spec2 = spec_with(&t, &corpus2, "c.toml", 4, "1e-2");
    bad(
        &[
            "train", "--config", &spec2, "--run", "dense", "--resume", "-o", &out,
        ],
        &["data."],
    );
    // Without --resume: a fresh start over the old checkpoints.
    ok(&["train", "--config", &other, "--run", "dense", "-o", &out]);
    ok(&[
        "train", "--config", &other, "--run", "dense", "--resume", "-o", &out,
    ]);

    // Streamed kernels: model, samples, projection, output and blocks are checked.
    let model = t.s("train/dense/final");
    let ntk_dir = t.s("ntk");
    let ntk = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "ntk",
            "--model",
            &model,
            "--corpus",
            &corpus,
            "--samples",
            "12",
            "--tile",
            "5",
            "-o",
            &ntk_dir,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let call = |extra: &[&str]| ntk(extra);
    ok(&refs(&call(&[])));
    for (extra, needles) in [
        (
            vec!["--project", "16"],
            vec!["capture.projection", "--fresh"],
        ),
        (vec!["--output", "logit-trace"], vec!["capture.output"]),
        (vec!["--blocks", "none"], vec!["blocks"]),
        (vec!["--sample-seed", "3"], vec!["samples.corpus_index"]),
    ] {
        let mut needles: Vec<&str> = needles;
        needles.push("manifest.json");
        bad(&refs(&call(&extra)), &needles);
    }
    ok(&[
        "train",
        "--config",
        &other,
        "--run",
        "cse",
        "-o",
        &t.s("train_cse"),
    ]);
    let mut other_model = call(&[]);
    other_model[2] = t.s("train_cse/cse/final");
    bad(&refs(&other_model), &["model.weights"]);
    // --fresh starts afresh under the new settings; then resumes under them.
    let printed = ok(&refs(&call(&["--project", "16", "--fresh"])));
    assert!(printed.contains("3 shards (0 reused)"), "{printed}");
    let printed = ok(&refs(&call(&["--project", "16"])));
    assert!(printed.contains("3 shards (3 reused)"), "{printed}");
    // Shards of an older version's random draws (no capture.draws) are not mixed in.
    let path = t.path("ntk/manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let older: Vec<&str> = text
        .lines()
        .filter(|l| !l.contains("\"capture.draws\""))
        .collect();
    assert!(older.len() < text.lines().count(), "{text}");
    std::fs::write(&path, older.join("\n")).unwrap();
    bad(
        &refs(&call(&["--project", "16"])),
        &["capture.draws", "(unset)", "--fresh"],
    );
    // Shards without any manifest (an older version's) are not trusted.
    std::fs::remove_file(t.path("ntk/manifest.json")).unwrap();
    bad(
        &refs(&call(&["--project", "16"])),
        &["no manifest", "--fresh"],
    );
}

#[test]
fn non_finite_weights_and_a_diverging_loss_are_caught_where_they_start() {
    let t = Tmp::new();
    let corpus = synth(&t, 400);
    let spec = spec_with(&t, &corpus, "a.toml", 4, "1e-2");
    let model = train_run(&t, &spec, "dense");
    // A NaN in one weight of a saved model: every command that loads it names the tensor.
    let w = Path::new(&model).join("model.safetensors");
    let mut named = tch::Tensor::read_safetensors(&w).unwrap();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let victim = named
        .iter()
        .position(|(n, _)| n.contains("h.1.mlp"))
        .unwrap();
    let name = named[victim].0.clone();
    let poisoned = named[victim].1.copy();
    let _ = poisoned.view(-1).get(3).fill_(f64::NAN);
    named[victim].1 = poisoned;
    tch::Tensor::write_safetensors(&named, &w).unwrap();
    for args in [
        vec!["eval", "--model", &model, "--corpus", &corpus],
        vec![
            "ntk",
            "--model",
            &model,
            "--corpus",
            &corpus,
            "--samples",
            "8",
            "-o",
            &t.s("ntk"),
        ],
    ] {
        bad(
            &args,
            &[
                "model.safetensors",
                &format!("`{name}`"),
                "1 non-finite value",
            ],
        );
    }
    // A learning rate that blows the weights up: the run stops at the first non-finite step,
    // before the update, names the batch's samples and keeps the last good checkpoint.
    let wild = spec_with(&t, &corpus, "wild.toml", 20, "1e30");
    let o = run(&[
        "train",
        "--config",
        &wild,
        "--run",
        "dense",
        "-o",
        &t.s("wild"),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("training diverged at step"), "{err}");
    assert!(err.contains("on the batch of samples"), "{err}");
    assert!(err.contains("the last good checkpoint"), "{err}");
    let step: usize = err
        .split("diverged at step ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(step >= 2, "{err}");
    let kept = t.path(&format!("wild/dense/checkpoints/step-{:06}", step - 1));
    assert!(kept.join("state.json").exists(), "{err}");
    assert!(err.contains(&kept.display().to_string()), "{err}");
    // The kept checkpoint holds the last update's weights, all finite.
    for (n, w) in tch::Tensor::read_safetensors(kept.join("model.safetensors")).unwrap() {
        assert!(bool::try_from(w.isfinite().all()).unwrap(), "{n}");
    }
}

#[test]
fn a_failing_write_leaves_no_partial_output_and_names_the_file() {
    let t = Tmp::new();
    let corpus = synth(&t, 400);
    let spec = tiny_spec(&t, &corpus);
    let model = train_run(&t, &spec, "dense");
    let out = t.path("ntk");
    // ulimit -f counts 1024-byte blocks: 8 KiB holds the tables (4-6 KB), not the kernel (14 KB).
    let o = Command::new("bash")
        .arg("-c")
        .arg("ulimit -f 8; exec \"$@\"")
        .arg("bash")
        .arg(env!("CARGO_BIN_EXE_tailscope"))
        .args(["-q", "ntk", "--model"])
        .arg(&model)
        .args(["--corpus", &corpus, "--samples", "24", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("File too large"), "{err}");
    let named = out.join("kernel.safetensors");
    assert!(err.contains(&named.display().to_string()), "{err}");
    assert!(!named.exists(), "no partial kernel");
    assert!(temp_files(&out).is_empty(), "{:?}", temp_files(&out));
}

/// `ntk --tile --shard I/N` run by N processes at once into one folder, then `--assemble`: the
/// one-process streamed kernel, GC, sample table and tile index bit for bit, for 2 and 3 shares
/// (uneven: 7 shards), with and without projection. A share killed midway, and the work redone
/// under another share count, resume from the complete shards and tiles; a share under other
/// settings is refused; assembling cleans up what the killed share left.
#[test]
fn sharded_kernel_over_processes_equals_one_process() {
    let t = Tmp::new();
    let corpus = synth(&t, 400);
    let spec = tiny_spec(&t, &corpus);
    let model = train_run(&t, &spec, "cse");
    let ntk = |out: &str, extra: &[&str]| tiled_ntk(&model, &corpus, out, extra);
    let with = |mut v: Vec<String>, more: &[&str]| {
        v.extend(more.iter().map(|s| s.to_string()));
        v
    };
    let same_outputs = |a: &str, b: &str| {
        same_tensors(
            &t.path(&format!("{a}/kernel.safetensors")),
            &t.path(&format!("{b}/kernel.safetensors")),
        );
        for f in ["gc.parquet", "samples.parquet", "tiles.parquet"] {
            same_bytes(&t.path(&format!("{a}/{f}")), &t.path(&format!("{b}/{f}")));
        }
    };
    for (name, extra) in [("plain", vec![]), ("projected", vec!["--project", "48"])] {
        let one = format!("{name}-one");
        ok(&refs(&ntk(&t.s(&one), &extra)));
        for n in [2, 3] {
            let dir = format!("{name}-{n}");
            for o in run_shares(&ntk(&t.s(&dir), &extra), n) {
                assert!(o.status.success(), "{}", stderr(&o));
                assert!(stdout(&o).contains("share done"), "{}", stdout(&o));
            }
            assert!(!t.path(&format!("{dir}/kernel.safetensors")).exists());
            let printed = ok(&refs(&with(ntk(&t.s(&dir), &extra), &["--assemble"])));
            assert!(printed.contains("NTK of 26 samples"), "{printed}");
            same_outputs(&one, &dir);
        }
    }
    // Above --assemble-max, --assemble (and one process) compute GC from the tiles on disk
    // without assembling the kernel: the same tables.
    let printed = ok(&refs(&with(
        ntk(&t.s("plain-3"), &[]),
        &["--assemble", "--assemble-max", "10", "--memory", "0.000001"],
    )));
    assert!(printed.contains("exceed --assemble-max 10"), "{printed}");
    same_tables(&t.path("plain-one"), &t.path("plain-3"));
    // Not held in memory (--memory near 0), the 28 tiles are read once when opened (tile 0-0
    // once more for its block names) and once per product pass, each pass multiplying several
    // vectors (the log says how many).
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tailscope"))
        .args(with(
            ntk(&t.s("plain-3"), &[]),
            &["--assemble", "--assemble-max", "10", "--memory", "0.000001"],
        ))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    let counts: Vec<usize> = log
        .lines()
        .find_map(|l| l.find("kernel of").map(|at| &l[at..]))
        .unwrap_or_else(|| panic!("no tile count in {log}"))
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let [_, reads, passes, widest] = counts[..] else {
        panic!("{counts:?} in {log}")
    };
    assert_eq!(reads, 28 * (passes + 1) + 1, "{log}");
    assert!(widest > 1, "{log}");
    ok(&refs(&ntk(&t.s("rows-one"), &["--assemble-max", "10"])));
    assert!(!t.path("rows-one/kernel.safetensors").exists());
    same_tables(&t.path("plain-one"), &t.path("rows-one"));
    // Share 1 of 2 killed after its first files; then the whole work under 3 shares at once.
    let killed = t.s("killed");
    let args = with(ntk(&killed, &[]), &["--shard", "1/2"]);
    let k = start_and_kill(
        &refs(&args),
        &t.path("killed"),
        &|| count_files(&t.path("killed"), ".safetensors") >= 2,
        Duration::ZERO,
    );
    assert!(
        !k.finished_first,
        "the kill must land before the share ends"
    );
    bad(
        &refs(&with(ntk(&killed, &[]), &["--assemble"])),
        &["tiles are missing", "--shard"],
    );
    bad(
        &refs(&with(
            ntk(&killed, &["--project", "48"]),
            &["--shard", "0/2"],
        )),
        &["manifest.json", "capture.projection"],
    );
    let outputs = run_shares(&ntk(&killed, &[]), 3);
    let reused = outputs
        .iter()
        .map(|o| {
            assert!(o.status.success(), "{}", stderr(o));
            let s = stdout(o);
            let n = |key: &str| -> usize {
                let at = s.find(key).unwrap() + key.len();
                s[at..]
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap()
            };
            n("shards (") + n("tiles (")
        })
        .sum::<usize>();
    assert!(reused >= 2, "the killed share's files are reused: {reused}");
    ok(&refs(&with(ntk(&killed, &[]), &["--assemble"])));
    same_outputs("plain-one", "killed");
    assert!(
        temp_files(&t.path("killed")).is_empty(),
        "{:?}",
        temp_files(&t.path("killed"))
    );
    let locks = count_files(&t.path("killed"), ".lock");
    assert_eq!(locks, 0, "the killed share's lock is removed");
    bad(
        &refs(&with(ntk(&t.s("empty"), &[]), &["--assemble"])),
        &["nothing to assemble"],
    );
}

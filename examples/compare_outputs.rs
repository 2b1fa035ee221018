//! Compare two output folders of tailscope runs (for example `make demo` before and after a
//! change): the same files, Parquet tables with the same columns and values, JSON with the same
//! values, every other file byte for byte. Wall-clock measurements (`seconds`, `tokens_per_s`)
//! are the only values left out; everything else must be identical, as the same seed and inputs
//! give the same CPU outputs.
//!
//! ```sh
//! cargo run --release --example compare_outputs -- out/demo-before out/demo
//! ```
//!
//! Exits 0 when the folders agree, 1 with one line per difference otherwise.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use polars::prelude::DataFrame;
use tailscope::io::read_parquet;

/// Values that measure time, not the computation: excluded from the comparison.
const TIMING: [&str; 2] = ["seconds", "tokens_per_s"];

fn files(root: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(root) {
                out.insert(rel.to_path_buf());
            }
        }
    }
    out
}

fn without_timing(df: &DataFrame) -> DataFrame {
    let keep: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|c| c.to_string())
        .filter(|c| !TIMING.contains(&c.as_str()))
        .collect();
    df.select(keep).unwrap_or_else(|_| df.clone())
}

fn strip_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for k in TIMING {
                m.remove(k);
            }
            m.values_mut().for_each(strip_json);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_json),
        _ => {}
    }
}

/// `None` when `a` and `b` agree, else what differs.
fn compare(a: &Path, b: &Path) -> Option<String> {
    let ext = a.extension().and_then(|e| e.to_str()).unwrap_or_default();
    match ext {
        "parquet" => {
            let (x, y) = match (read_parquet(a), read_parquet(b)) {
                (Ok(x), Ok(y)) => (without_timing(&x), without_timing(&y)),
                (Err(e), _) | (_, Err(e)) => return Some(format!("unreadable: {e}")),
            };
            if x.get_column_names() != y.get_column_names() {
                return Some(format!(
                    "columns {:?} vs {:?}",
                    x.get_column_names(),
                    y.get_column_names()
                ));
            }
            (!x.equals_missing(&y))
                .then(|| format!("values differ ({} vs {} rows)", x.height(), y.height()))
        }
        "json" | "ipynb" => {
            let read = |p: &Path| -> Option<serde_json::Value> {
                let mut v = serde_json::from_slice(&std::fs::read(p).ok()?).ok()?;
                strip_json(&mut v);
                Some(v)
            };
            match (read(a), read(b)) {
                (Some(x), Some(y)) if x == y => None,
                (Some(_), Some(_)) => Some("values differ".into()),
                _ => Some("unreadable JSON".into()),
            }
        }
        _ => match (std::fs::read(a), std::fs::read(b)) {
            (Ok(x), Ok(y)) if x == y => None,
            (Ok(x), Ok(y)) => Some(format!("bytes differ ({} vs {} bytes)", x.len(), y.len())),
            _ => Some("unreadable".into()),
        },
    }
}

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [a, b] = args.as_slice() else {
        eprintln!("usage: compare_outputs DIR_A DIR_B");
        return ExitCode::from(2);
    };
    let (fa, fb) = (files(a), files(b));
    let mut problems = Vec::new();
    for only in fa.symmetric_difference(&fb) {
        let side = if fa.contains(only) { a } else { b };
        problems.push(format!("{}: only in {}", only.display(), side.display()));
    }
    let common: Vec<&PathBuf> = fa.intersection(&fb).collect();
    for rel in &common {
        if let Some(why) = compare(&a.join(rel), &b.join(rel)) {
            problems.push(format!("{}: {why}", rel.display()));
        }
    }
    for p in &problems {
        println!("{p}");
    }
    println!(
        "{} files compared, {} differences",
        common.len(),
        problems.len()
    );
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

//! End-to-end tests of the `tailscope` binary: ingestion of every format, every bad-input case
//! (exit status 2 with a one-line reason naming the file, line or field), the synthetic corpus and
//! frequency statistics, and a run on the bundled Brown fixture.

use std::path::Path;
use std::process::Command;

mod common;
use common::*;

#[test]
fn help_everywhere() {
    for args in [
        vec!["--help"],
        vec!["corpus", "--help"],
        vec!["corpus", "ingest", "--help"],
        vec!["corpus", "synth", "--help"],
        vec!["freq", "--help"],
    ] {
        let out = ok(&args);
        assert!(out.contains("Usage:"), "{args:?}: {out}");
        assert!(out.contains("--seed"), "{args:?} lacks the global options");
    }
}

#[test]
fn usage_errors_exit_2() {
    let o = run(&["corpus", "ingest"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["--device", "tpu", "freq", "--corpus", "x", "-o", "y"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--device"));
}

#[test]
fn text_ingest_writes_table_and_tokenizer() {
    let t = Tmp::new();
    let input = t.file("notes.txt", lines(40).as_bytes());
    let out = t.s("o/corpus.parquet");
    let mut args = vec!["corpus", "ingest", &input, "-o", &out];
    args.extend_from_slice(SMALL_VOCAB);
    let printed = ok(&args);
    assert!(printed.contains("corpus: 40 samples"), "{printed}");
    let df = read_table(&t.path("o/corpus.parquet"));
    assert_eq!(
        df.get_column_names()
            .iter()
            .map(|c| c.as_str())
            .collect::<Vec<_>>(),
        ["id", "text", "domain", "split", "n_tokens"]
    );
    let ids = strs(&df, "id");
    assert_eq!(ids[0], "notes.txt:1");
    assert_eq!(strs(&df, "domain")[0], "general");
    assert!(t.path("o/tokenizer.json").exists());
    // Nothing temporary is left behind.
    let names: Vec<_> = std::fs::read_dir(t.path("o"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn same_seed_same_output_and_seed_changes_split() {
    let t = Tmp::new();
    let input = t.file("a.txt", lines(200).as_bytes());
    let go = |seed: &str, out: &str| {
        let out = t.s(out);
        let mut args = vec!["--seed", seed, "corpus", "ingest", &input, "-o", &out];
        args.extend_from_slice(SMALL_VOCAB);
        ok(&args);
        strs(&read_table(Path::new(&out)), "split")
    };
    let a = go("1", "a/c.parquet");
    let b = go("1", "b/c.parquet");
    let c = go("2", "c/c.parquet");
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(
        std::fs::read(t.path("a/c.parquet")).unwrap(),
        std::fs::read(t.path("b/c.parquet")).unwrap(),
        "same seed, same bytes"
    );
    assert_eq!(
        std::fs::read(t.path("a/tokenizer.json")).unwrap(),
        std::fs::read(t.path("b/tokenizer.json")).unwrap()
    );
}

#[test]
fn jsonl_csv_tsv_parquet_and_dir_inputs() {
    let t = Tmp::new();
    let jsonl: String = (0..30)
        .map(|i| {
            format!(
                "{{\"id\": \"r{i}\", \"text\": \"jsonl text {i} here\", \"domain\": \"d{}\"}}\n",
                i % 3
            )
        })
        .collect();
    let j = t.file("in.jsonl", jsonl.as_bytes());
    let out = t.s("j/c.parquet");
    let mut args = vec!["corpus", "ingest", &j, "-o", &out];
    args.extend_from_slice(SMALL_VOCAB);
    ok(&args);
    let df = read_table(Path::new(&out));
    assert_eq!(strs(&df, "id")[5], "r5");
    assert_eq!(strs(&df, "domain")[5], "d2");

    // gzip-compressed JSONL
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, jsonl.as_bytes()).unwrap();
    let jg = t.file("in.jsonl.gz", &gz.finish().unwrap());
    let out_gz = t.s("jg/c.parquet");
    let mut args = vec!["corpus", "ingest", &jg, "-o", &out_gz];
    args.extend_from_slice(SMALL_VOCAB);
    ok(&args);
    assert_eq!(
        strs(&read_table(Path::new(&out_gz)), "text"),
        strs(&df, "text")
    );

    let csv: String = std::iter::once("body,topic\n".to_string())
        .chain((0..30).map(|i| format!("\"csv, text {i}\",t{}\n", i % 2)))
        .collect();
    let c = t.file("in.csv", csv.as_bytes());
    let out = t.s("c/c.parquet");
    let mut args = vec![
        "corpus",
        "ingest",
        &c,
        "--text-field",
        "body",
        "--domain-field",
        "topic",
        "-o",
        &out,
    ];
    args.extend_from_slice(SMALL_VOCAB);
    ok(&args);
    let df = read_table(Path::new(&out));
    assert_eq!(strs(&df, "text")[1], "csv, text 1");
    assert_eq!(strs(&df, "id")[1], "in.csv:3");
    assert_eq!(strs(&df, "domain")[1], "t1");

    let tsv = "text\tdomain\nalpha beta\tx\ngamma delta\ty\n";
    let ts = t.file("in.tsv", tsv.as_bytes());
    let out_t = t.s("t/c.parquet");
    let mut args = vec!["corpus", "ingest", &ts, "-o", &out_t];
    args.extend_from_slice(SMALL_VOCAB);
    ok(&args);
    assert_eq!(strs(&read_table(Path::new(&out_t)), "domain"), ["x", "y"]);

    // Parquet input: the CSV's corpus table read back in (columns text, domain, id).
    let out2 = t.s("p/c.parquet");
    let mut args = vec!["corpus", "ingest", &out, "-o", &out2];
    args.extend_from_slice(SMALL_VOCAB);
    ok(&args);
    assert_eq!(strs(&read_table(Path::new(&out2)), "id"), strs(&df, "id"));

    t.file(
        "dir/law/a.txt",
        b"the court held\nthe statute applies here\n",
    );
    t.file("dir/med/sub/b.txt", b"the patient recovered well\n");
    t.file("dir/med/ignored.md", b"not text\n");
    let d = t.s("dir");
    let out = t.s("d/c.parquet");
    let mut args = vec!["corpus", "ingest", &d, "-o", &out];
    args.extend_from_slice(SMALL_VOCAB);
    ok(&args);
    let df = read_table(Path::new(&out));
    assert_eq!(strs(&df, "domain"), ["law", "law", "med"]);
    assert_eq!(
        strs(&df, "id"),
        ["law/a.txt:1", "law/a.txt:2", "med/sub/b.txt:1"]
    );
}

#[test]
fn paragraphs_sentences_and_length_filters() {
    let t = Tmp::new();
    let text = "First para line one.\nStill first. Another sentence here.\n\nSecond para here.\n\nok\n\nyes\n";
    let input = t.file("p.txt", text.as_bytes());
    let out = t.s("o/c.parquet");
    let args = [
        "corpus",
        "ingest",
        &input,
        "--unit",
        "paragraph",
        "--sentences",
        "--min-words",
        "2",
        "--max-words",
        "3",
        "--vocab-size",
        "300",
        "-o",
        &out,
    ];
    let printed = ok(&args);
    assert!(
        printed.contains("filtered: 2 too short, 1 too long"),
        "{printed}"
    );
    let df = read_table(Path::new(&out));
    assert_eq!(strs(&df, "id"), ["p.txt:1#2", "p.txt:1#3", "p.txt:4#1"]);
    assert_eq!(strs(&df, "text")[0], "Still first.");
}

#[test]
fn ingest_errors_name_file_line_or_field() {
    let t = Tmp::new();
    let out = t.s("o/c.parquet");
    let empty = t.file("empty.txt", b"");
    bad(
        &["corpus", "ingest", &empty, "-o", &out],
        &["empty.txt", "empty"],
    );
    let blank = t.file("blank.txt", b"\n  \n\n");
    bad(
        &["corpus", "ingest", &blank, "-o", &out],
        &["blank.txt", "no samples"],
    );
    let utf = t.file("bad.txt", b"fine line here\nbad \xff\xfe bytes\n");
    bad(
        &["corpus", "ingest", &utf, "-o", &out],
        &["bad.txt:2", "UTF-8"],
    );
    let utf_csv = t.file("bad.csv", b"text\nok row\n\xff bad\n");
    bad(
        &["corpus", "ingest", &utf_csv, "-o", &out],
        &["bad.csv:3", "UTF-8"],
    );
    // A byte-order mark before the first record is not an error.
    let bom = t.file(
        "bom.jsonl",
        "\u{feff}{\"text\": \"the first line comes with a byte order mark\"}\n{\"text\": \"the second line has a few more words\"}\n".as_bytes(),
    );
    let bom_out = t.s("bom/corpus.parquet");
    let mut args = vec!["corpus", "ingest", &bom, "-o", &bom_out];
    args.extend_from_slice(SMALL_VOCAB);
    assert!(ok(&args).contains("corpus: 2 samples"));
    let json = t.file("bad.jsonl", b"{\"text\": \"ok\"}\n{\"text\": oops}\n");
    bad(
        &["corpus", "ingest", &json, "-o", &out],
        &["bad.jsonl:2", "invalid JSON"],
    );
    let nofield = t.file(
        "nofield.jsonl",
        b"{\"text\": \"ok\"}\n\n{\"body\": \"x\"}\n",
    );
    bad(
        &["corpus", "ingest", &nofield, "-o", &out],
        &["nofield.jsonl:3", "missing field `text`"],
    );
    let notstr = t.file("notstr.jsonl", b"{\"text\": 5}\n");
    bad(
        &["corpus", "ingest", &notstr, "-o", &out],
        &["notstr.jsonl:1", "`text`", "a number"],
    );
    let nocol = t.file("nocol.csv", b"body,topic\nx,y\n");
    bad(
        &["corpus", "ingest", &nocol, "-o", &out],
        &["nocol.csv", "missing column `text`", "body, topic"],
    );
    let ragged = t.file("ragged.csv", b"text,domain\na b,c\nd e,f,g\n");
    bad(
        &["corpus", "ingest", &ragged, "-o", &out],
        &["ragged.csv:3", "3 fields"],
    );
    let unknown = t.file("data.xyz", b"whatever\n");
    bad(
        &["corpus", "ingest", &unknown, "-o", &out],
        &["data.xyz", "unknown input format"],
    );
    let notpq = t.file("fake.parquet", b"not parquet at all");
    bad(
        &["corpus", "ingest", &notpq, "-o", &out],
        &["fake.parquet", "Parquet"],
    );
    bad(
        &["corpus", "ingest", &t.s("missing.txt"), "-o", &out],
        &["missing.txt"],
    );
    let dup = t.file(
        "dup.jsonl",
        b"{\"id\": \"a\", \"text\": \"one two\"}\n{\"id\": \"a\", \"text\": \"three four\"}\n",
    );
    bad(
        &["corpus", "ingest", &dup, "--min-words", "1", "-o", &out],
        &["dup.jsonl:2", "duplicate id \"a\"", "dup.jsonl:1"],
    );
    let short = t.file("short.txt", b"a b\nc\n");
    bad(
        &["corpus", "ingest", &short, "-o", &out],
        &["short.txt", "no samples left", "2 too short"],
    );
    let good = t.file("good.txt", lines(5).as_bytes());
    bad(
        &["corpus", "ingest", &good, "--vocab-size", "10", "-o", &out],
        &["--vocab-size"],
    );
    bad(
        &[
            "corpus",
            "ingest",
            &good,
            "--val-fraction",
            "1.5",
            "-o",
            &out,
        ],
        &["--val-fraction"],
    );
    let badtok = t.file("tok.json", b"{}");
    bad(
        &[
            "corpus",
            "ingest",
            &good,
            "--tokenizer",
            &badtok,
            "-o",
            &out,
        ],
        &["tok.json", "tokenizer"],
    );
    t.file("flat/a.txt", b"no domain folder\n");
    bad(
        &["corpus", "ingest", &t.s("flat"), "-o", &out],
        &["a.txt", "subfolder"],
    );
    // Nothing was written by any failed run.
    assert!(!t.path("o").exists() || std::fs::read_dir(t.path("o")).unwrap().count() == 0);
}

#[test]
fn existing_tokenizer_is_used_and_copied() {
    let t = Tmp::new();
    let a = t.file("a.txt", lines(30).as_bytes());
    let out_a = t.s("a/c.parquet");
    ok(&["corpus", "ingest", &a, "--vocab-size", "300", "-o", &out_a]);
    let tok = t.s("a/tokenizer.json");
    let out_b = t.s("b/c.parquet");
    ok(&["corpus", "ingest", &a, "--tokenizer", &tok, "-o", &out_b]);
    assert_eq!(
        std::fs::read(&tok).unwrap(),
        std::fs::read(t.path("b/tokenizer.json")).unwrap()
    );
    let n = |p: &str| {
        read_table(Path::new(p))
            .column("n_tokens")
            .unwrap()
            .u32()
            .unwrap()
            .iter()
            .map(|v| v.unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(n(&out_a), n(&out_b));
}

#[test]
fn synth_then_freq_finds_the_rare_domains() {
    let t = Tmp::new();
    let corpus = t.s("s/corpus.parquet");
    ok(&[
        "--seed",
        "5",
        "corpus",
        "synth",
        "--samples",
        "3000",
        "--vocab-size",
        "400",
        "-o",
        &corpus,
    ]);
    let df = read_table(Path::new(&corpus));
    let lt: Vec<bool> = df
        .column("long_tail")
        .unwrap()
        .bool()
        .unwrap()
        .iter()
        .map(|v| v.unwrap())
        .collect();
    let domains = strs(&df, "domain");
    assert_eq!(lt.iter().filter(|x| **x).count(), 180); // 6% of 3000
    assert!(domains.iter().zip(&lt).all(|(d, l)| *l == (d != "general")));

    let out = t.s("s/freq");
    let printed = ok(&[
        "freq",
        "--corpus",
        &corpus,
        "-o",
        &out,
        "--share-by",
        "samples",
    ]);
    assert!(printed.contains("long-tail threshold"), "{printed}");
    let dom = read_table(&t.path("s/freq/domains.parquet"));
    let names = strs(&dom, "domain");
    let flags: Vec<bool> = dom
        .column("long_tail")
        .unwrap()
        .bool()
        .unwrap()
        .iter()
        .map(|v| v.unwrap())
        .collect();
    assert_eq!(names[0], "general");
    assert!(!flags[0], "the common domain is not long-tail");
    assert!(
        flags[1..].iter().all(|f| *f),
        "all rare domains are long-tail: {names:?} {flags:?}"
    );

    // Rare-domain samples have lower 1-gram frequency scores than common ones.
    let scores = read_table(&t.path("s/freq/scores.parquet"));
    let s1: Vec<f64> = scores
        .column("score_1gram")
        .unwrap()
        .f64()
        .unwrap()
        .iter()
        .map(|v| v.unwrap())
        .collect();
    let sd = strs(&scores, "domain");
    let mean = |rare: bool| {
        let v: Vec<f64> = s1
            .iter()
            .zip(&sd)
            .filter(|(_, d)| (*d != "general") == rare)
            .map(|(s, _)| *s)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!(
        mean(true) < mean(false),
        "rare {} vs common {}",
        mean(true),
        mean(false)
    );
    for f in ["ngrams.parquet", "summary.json"] {
        assert!(t.path("s/freq").join(f).exists());
    }
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path("s/freq/summary.json")).unwrap()).unwrap();
    assert_eq!(summary["samples"], 3000);
    assert_eq!(summary["long_tail_domains"].as_array().unwrap().len(), 4);
}

#[test]
fn freq_errors_name_the_file_or_option() {
    let t = Tmp::new();
    let notpq = t.file("c.parquet", b"junk");
    bad(
        &["freq", "--corpus", &notpq, "-o", &t.s("f")],
        &["c.parquet"],
    );
    let a = t.file("a.txt", lines(20).as_bytes());
    let corpus = t.s("x/corpus.parquet");
    ok(&["corpus", "ingest", &a, "--vocab-size", "300", "-o", &corpus]);
    bad(
        &[
            "freq",
            "--corpus",
            &corpus,
            "--orders",
            "4",
            "-o",
            &t.s("f"),
        ],
        &["--orders"],
    );
    bad(
        &[
            "freq",
            "--corpus",
            &corpus,
            "--tokenizer",
            &t.s("nope.json"),
            "-o",
            &t.s("f"),
        ],
        &["nope.json"],
    );
    // A table that is Parquet but not a corpus table names the missing column.
    let freq_dir = t.s("f2");
    ok(&["freq", "--corpus", &corpus, "-o", &freq_dir]);
    bad(
        &[
            "freq",
            "--corpus",
            &t.s("f2/domains.parquet"),
            "--tokenizer",
            &t.s("x/tokenizer.json"),
            "-o",
            &t.s("f3"),
        ],
        &["domains.parquet", "missing column `id`"],
    );
}

/// The bundled real corpus, end to end: ingest, then frequency statistics.
#[test]
fn brown_fixture_end_to_end() {
    let t = Tmp::new();
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/brown/brown.jsonl.gz");
    let corpus = t.s("b/corpus.parquet");
    let printed = ok(&[
        "corpus",
        "ingest",
        fixture,
        "--vocab-size",
        "4096",
        "-o",
        &corpus,
    ]);
    assert!(printed.contains("15 domains"), "{printed}");
    let out = t.s("b/freq");
    let printed = ok(&["freq", "--corpus", &corpus, "-o", &out]);
    let dom = read_table(&t.path("b/freq/domains.parquet"));
    let names = strs(&dom, "domain");
    assert_eq!(names.len(), 15);
    assert_eq!(names[0], "learned", "{printed}");
    let flags: Vec<bool> = dom
        .column("long_tail")
        .unwrap()
        .bool()
        .unwrap()
        .iter()
        .map(|v| v.unwrap())
        .collect();
    let lt: Vec<&String> = names
        .iter()
        .zip(&flags)
        .filter(|(_, f)| **f)
        .map(|(n, _)| n)
        .collect();
    assert!(lt.iter().any(|n| *n == "science_fiction"), "{printed}");
    assert!(
        !lt.iter().any(|n| *n == "learned" || *n == "belles_lettres"),
        "{printed}"
    );
}

#[test]
fn train_and_eval_end_to_end_with_errors() {
    let t = Tmp::new();
    let corpus = synth(&t, 600);
    let spec = tiny_spec(&t, &corpus);
    let out = t.s("train");
    let printed = ok(&["--device", "cpu", "train", "--config", &spec, "-o", &out]);
    assert!(
        printed.contains("run dense:") && printed.contains("run cse:"),
        "{printed}"
    );
    assert!(printed.contains("CSE block 1: DBSCAN"), "{printed}");
    assert!(
        printed.contains("routing of validation sequences at block 1"),
        "{printed}"
    );
    for f in [
        "dense/final/model.safetensors",
        "cse/final/config.json",
        "cse/log.parquet",
        "cse/val.parquet",
        "cse/cse_init.json",
        "cse/checkpoints/step-000006/state.json",
    ] {
        assert!(t.path("train").join(f).exists(), "{f}");
    }
    let log = read_table(&t.path("train/cse/log.parquet"));
    assert_eq!(log.height(), 6);

    let model = t.s("train/cse/final");
    let printed = ok(&[
        "eval",
        "--model",
        &model,
        "--corpus",
        &corpus,
        "-o",
        &t.s("ev"),
    ]);
    assert!(printed.contains("perplexity per domain"), "{printed}");
    assert!(
        printed.contains("legal") && printed.contains("linear probe"),
        "{printed}"
    );
    assert!(printed.contains("long-tail"), "{printed}");
    let ev: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t.path("ev/eval.json")).unwrap()).unwrap();
    let acc = ev["probe"]["accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&acc));

    // Bad input: an unknown run, an unknown spec key, a corrupt or mismatched checkpoint.
    bad(
        &["train", "--config", &spec, "--run", "nope", "-o", &out],
        &["--run", "nope"],
    );
    let bad_spec = t.file("bad.toml", b"[data]\ncorpus = \"x\"\nwhat = 1\n");
    bad(
        &["train", "--config", &bad_spec, "-o", &out],
        &["bad.toml:", "what"],
    );
    let w = t.path("train/dense/final/model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..100]).unwrap();
    bad(
        &[
            "eval",
            "--model",
            &t.s("train/dense/final"),
            "--corpus",
            &corpus,
        ],
        &["model.safetensors"],
    );
    let cfg_path = t.path("train/cse/final/config.json");
    let cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"d_ffn\": 32", "\"d_ffn\": 24");
    std::fs::write(&cfg_path, cfg).unwrap();
    bad(
        &["eval", "--model", &model, "--corpus", &corpus],
        &["model.safetensors", "c_fc", "[32]", "[24]"],
    );
}

#[test]
fn capture_and_ntk_from_the_cli() {
    let t = Tmp::new();
    let corpus = synth(&t, 400);
    let spec = tiny_spec(&t, &corpus);
    ok(&[
        "train",
        "--config",
        &spec,
        "--run",
        "cse",
        "-o",
        &t.s("train"),
    ]);
    let model = t.s("train/cse/final");
    let out = t.s("ntk");
    let printed = ok(&[
        "ntk",
        "--model",
        &model,
        "--corpus",
        &corpus,
        "--samples",
        "24",
        "--batch",
        "8",
        "--bins",
        "3",
        "-o",
        &out,
    ]);
    assert!(
        printed.contains("NTK of 24 samples") && printed.contains("GC"),
        "{printed}"
    );
    let k = tch::Tensor::read_safetensors(t.path("ntk/kernel.safetensors")).unwrap();
    let total = &k.iter().find(|(n, _)| n == "total").unwrap().1;
    assert_eq!(total.size(), vec![24, 24]);
    let blocks: Vec<&tch::Tensor> = k
        .iter()
        .filter(|(n, _)| n.starts_with("block."))
        .map(|(_, t)| t)
        .collect();
    assert!(blocks.len() > 5);
    let sum = blocks.iter().fold(total.zeros_like(), |a, b| a + *b);
    assert!(
        (sum - total).abs().max().double_value(&[]) < 1e-3 * total.abs().max().double_value(&[])
    );
    let gc = read_table(&t.path("ntk/gc.parquet"));
    let cols = strs(&gc, "column");
    assert!(
        cols.iter().any(|c| c == "freq_bin")
            && cols.iter().any(|c| c == "domain")
            && cols.iter().any(|c| c.starts_with("expert_h"))
    );
    let samples = read_table(&t.path("ntk/samples.parquet"));
    assert_eq!(samples.height(), 24);
    for c in ["self_kernel", "alignment", "freq_score", "freq_bin"] {
        assert!(samples.column(c).is_ok(), "{c}");
    }
    // A memory budget that cannot hold the run: refused before capture, saying what to change.
    bad(
        &[
            "ntk",
            "--model",
            &model,
            "--corpus",
            &corpus,
            "--samples",
            "24",
            "--memory",
            "0.01",
            "-o",
            &t.s("ntk-mem"),
        ],
        &["--memory", "budget of 0.0 GB", "--project"],
    );
    // The ghost method writes the same kernel.
    ok(&[
        "ntk",
        "--model",
        &model,
        "--corpus",
        &corpus,
        "--samples",
        "24",
        "--method",
        "ghost",
        "--blocks",
        "none",
        "-o",
        &t.s("ntk2"),
    ]);
    let k2 = tch::Tensor::read_safetensors(t.path("ntk2/kernel.safetensors")).unwrap();
    let total2 = &k2.iter().find(|(n, _)| n == "total").unwrap().1;
    assert!(
        (total2 - total).abs().max().double_value(&[]) < 1e-4 * total.abs().max().double_value(&[])
    );
    // Streamed in tiles of 10 samples: the same kernel; a rerun reuses every file.
    let printed = ok(&[
        "ntk",
        "--model",
        &model,
        "--corpus",
        &corpus,
        "--samples",
        "24",
        "--tile",
        "10",
        "-o",
        &t.s("ntk3"),
    ]);
    assert!(
        printed.contains("streamed: 3 shards (0 reused), 6 tiles (0 reused)"),
        "{printed}"
    );
    let k3 = tch::Tensor::read_safetensors(t.path("ntk3/kernel.safetensors")).unwrap();
    let total3 = &k3.iter().find(|(n, _)| n == "total").unwrap().1;
    assert!(
        (total3 - total).abs().max().double_value(&[]) < 1e-5 * total.abs().max().double_value(&[])
    );
    let printed = ok(&[
        "ntk",
        "--model",
        &model,
        "--corpus",
        &corpus,
        "--samples",
        "24",
        "--tile",
        "10",
        "-o",
        &t.s("ntk3"),
    ]);
    assert!(
        printed.contains("3 shards (3 reused), 6 tiles (6 reused)"),
        "{printed}"
    );
    assert!(read_table(&t.path("ntk3/tiles.parquet")).height() == 6);
    // analyze: correlations with intervals, flags, and precision/recall against the synthetic truth.
    let printed = ok(&[
        "analyze",
        "--ntk",
        &out,
        "--model",
        &model,
        "--corpus",
        &corpus,
        "--resamples",
        "200",
        "-o",
        &t.s("an"),
    ]);
    assert!(
        printed.contains("spearman   freq_score  vs loss"),
        "{printed}"
    );
    assert!(
        printed.contains("against the corpus's ground truth: precision")
            && printed.contains("flagged as neglected"),
        "{printed}"
    );
    // Frequency against alignment, Θ_ii, loss and excess loss, alignment against loss, length
    // against loss and excess loss: 7 pairs × 3 methods.
    let corr = read_table(&t.path("an/correlations.parquet"));
    assert_eq!(corr.height(), 21);
    let joined = read_table(&t.path("an/analysis.parquet"));
    assert_eq!(joined.height(), 24);
    assert!(joined.column("loss").is_ok() && joined.column("flag_rank").is_ok());
    assert!(t.path("an/flags.parquet").exists());
    // select: every criterion ranks the 24 analysed samples; the top ones are what the
    // criterion says; one seed gives one selection.
    let ids = strs(&joined, "id");
    let by_id = |col: &str| -> std::collections::HashMap<String, f64> {
        ids.iter().cloned().zip(f64s(&joined, col)).collect()
    };
    for (crit, col, sign) in [
        ("loss", "loss", 1.0),
        ("frequency", "freq_score", -1.0),
        ("alignment", "alignment", -1.0),
        ("self-kernel", "self_kernel", 1.0),
        ("support", "support", -1.0),
        ("excess-loss", "excess_loss", 1.0),
        ("flag", "neglect", 1.0),
    ] {
        let o = t.s(&format!("sel-{crit}.parquet"));
        let printed = ok(&[
            "select",
            "--analysis",
            &t.s("an"),
            "--criterion",
            crit,
            "--top",
            "6",
            "-o",
            &o,
        ]);
        assert!(
            printed.contains(&format!("6 of 24 samples selected by {crit}")),
            "{printed}"
        );
        let sel = read_table(Path::new(&o));
        assert_eq!(sel.height(), 24);
        let v = by_id(col);
        let picked: Vec<f64> = strs(&sel, "id").iter().map(|i| sign * v[i]).collect();
        assert!(
            picked.windows(2).all(|w| w[0] >= w[1]),
            "{crit}: {picked:?}"
        );
        assert_eq!(
            f64s(&sel, "selected").iter().filter(|&&x| x > 0.5).count(),
            6
        );
    }
    let sel_flag = t.s("sel-flag.parquet");
    ok(&[
        "select",
        "--analysis",
        &t.s("an"),
        "--top",
        "4",
        "-o",
        &sel_flag,
    ]);
    let flagged = f64s(&read_table(Path::new(&sel_flag)), "flagged");
    assert!(
        flagged.windows(2).all(|w| w[0] >= w[1]),
        "flagged samples come first"
    );
    let flag_bytes = std::fs::read(&sel_flag).unwrap();
    ok(&[
        "select",
        "--analysis",
        &t.s("an"),
        "--top",
        "4",
        "-o",
        &sel_flag,
    ]);
    assert_eq!(std::fs::read(&sel_flag).unwrap(), flag_bytes);
    let random = |seed: &str| {
        let o = t.s(&format!("sel-random-{seed}.parquet"));
        ok(&[
            "select",
            "--analysis",
            &t.s("an"),
            "--criterion",
            "random",
            "--top",
            "6",
            "--seed",
            seed,
            "-o",
            &o,
        ]);
        strs(&read_table(Path::new(&o)), "id")
    };
    assert_eq!(random("1"), random("1"));
    assert_ne!(random("1"), random("2"));
    // gc: every sample of a domain shares its domain's (negated) GC.
    let o = t.s("sel-gc.parquet");
    ok(&[
        "select",
        "--analysis",
        &t.s("an"),
        "--criterion",
        "gc",
        "--top",
        "6",
        "-o",
        &o,
    ]);
    let sel = read_table(Path::new(&o));
    let (doms, sc) = (strs(&sel, "domain"), f64s(&sel, "score"));
    for i in 0..doms.len() {
        for j in 0..doms.len() {
            if doms[i] == doms[j] {
                assert_eq!(sc[i], sc[j]);
            }
        }
    }
    // uncertainty: mean token entropy in (0, ln V].
    let o = t.s("sel-unc.parquet");
    ok(&[
        "select",
        "--analysis",
        &t.s("an"),
        "--criterion",
        "uncertainty",
        "--threshold",
        "0",
        "-o",
        &o,
    ]);
    let h = f64s(&read_table(Path::new(&o)), "score");
    assert!(
        h.iter().all(|&x| x > 0.0 && x <= (320f64).ln() + 1e-6),
        "{h:?}"
    );
    // Continued training on a selection. The analysis above is of validation samples, which
    // cannot be up-weighted; one of training samples can.
    bad(
        &[
            "train",
            "--config",
            &spec,
            "--run",
            "dense",
            "--selection",
            &sel_flag,
            "--repeat",
            "3",
            "-o",
            &t.s("cont-bad"),
        ],
        &["sel-flag.parquet", "validation sample"],
    );
    ok(&[
        "ntk",
        "--model",
        &model,
        "--corpus",
        &corpus,
        "--split",
        "train",
        "--samples",
        "24",
        "--batch",
        "8",
        "--bins",
        "3",
        "-o",
        &t.s("ntk-train"),
    ]);
    ok(&[
        "analyze",
        "--ntk",
        &t.s("ntk-train"),
        "--model",
        &model,
        "--corpus",
        &corpus,
        "--resamples",
        "50",
        "-o",
        &t.s("an-train"),
    ]);
    let sel_train = t.s("sel-train.parquet");
    ok(&[
        "select",
        "--analysis",
        &t.s("an-train"),
        "--top",
        "5",
        "-o",
        &sel_train,
    ]);
    let printed = ok(&[
        "train",
        "--config",
        &spec,
        "--run",
        "dense",
        "--selection",
        &sel_train,
        "--weight",
        "4",
        "-o",
        &t.s("cont"),
    ]);
    assert!(printed.contains("run dense"), "{printed}");
    let manifest = std::fs::read_to_string(t.path("cont/dense/manifest.json")).unwrap();
    assert!(
        manifest.contains("5 ids") && manifest.contains("weight 4"),
        "{manifest}"
    );
    usage_bad(
        &["select", "--analysis", &t.s("an"), "-o", &o],
        &["required"],
    );
    bad(
        &[
            "select",
            "--analysis",
            &t.s("nowhere"),
            "--top",
            "3",
            "-o",
            &o,
        ],
        &["analysis.parquet"],
    );
    bad(
        &[
            "analyze",
            "--ntk",
            &t.s("nowhere"),
            "--model",
            &model,
            "--corpus",
            &corpus,
            "-o",
            &t.s("an2"),
        ],
        &["samples.parquet"],
    );
    bad(
        &[
            "analyze",
            "--ntk",
            &out,
            "--model",
            &model,
            "--corpus",
            &corpus,
            "--alpha",
            "2",
            "-o",
            &t.s("an2"),
        ],
        &["--alpha"],
    );
    // The statistics of neglect refuse what they cannot use, naming the flag: no neighbours, a
    // reference model with another tokenizer, a corpus without a training split to compare with.
    let an_bad = |extra: &[&str], corpus: &str, needles: &[&str]| {
        let mut args = vec![
            "analyze", "--ntk", &out, "--model", &model, "--corpus", corpus, "-o",
        ];
        let o = t.s("an-bad");
        args.push(&o);
        args.extend_from_slice(extra);
        bad(&args, needles);
    };
    an_bad(&["--neighbours", "0"], &corpus, &["--neighbours"]);
    ok(&[
        "corpus",
        "synth",
        "--samples",
        "300",
        "--vocab-size",
        "300",
        "--seed",
        "9",
        "-o",
        &t.s("c2/corpus.parquet"),
    ]);
    let reference = t.path("ref-other-tokenizer");
    std::fs::create_dir_all(&reference).unwrap();
    for f in std::fs::read_dir(&model).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, reference.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::copy(
        t.path("c2/tokenizer.json"),
        reference.join("tokenizer.json"),
    )
    .unwrap();
    an_bad(
        &["--reference", reference.to_str().unwrap()],
        &corpus,
        &["--reference", "tokenises", "tokenizer"],
    );
    let all_val = t.path("c3/corpus.parquet");
    std::fs::create_dir_all(t.path("c3")).unwrap();
    std::fs::copy(t.path("c/tokenizer.json"), t.path("c3/tokenizer.json")).unwrap();
    let mut df = read_table(std::path::Path::new(&corpus));
    let n = df.height();
    df.with_column(polars::prelude::Column::new(
        "split".into(),
        vec!["validation"; n],
    ))
    .unwrap();
    tailscope::io::write_parquet(&mut df, &all_val).unwrap();
    an_bad(
        &[],
        all_val.to_str().unwrap(),
        &["--train-samples", "training split"],
    );
    // capture with a projection and a selection
    let printed = ok(&[
        "capture",
        "--model",
        &model,
        "--corpus",
        &corpus,
        "--samples",
        "10",
        "--params",
        "h.1.*",
        "--project",
        "32",
        "-o",
        &t.s("cap"),
    ]);
    assert!(printed.contains("captured 10 samples"), "{printed}");
    let g = tch::Tensor::read_safetensors(t.path("cap/grads.safetensors")).unwrap();
    assert!(g
        .iter()
        .all(|(n, t)| n.starts_with("h.1.") && t.size() == vec![10, 32]));
    // Bad selections and options name the option.
    bad(
        &[
            "ntk",
            "--model",
            &model,
            "--corpus",
            &corpus,
            "--params",
            "nothing.*",
            "-o",
            &out,
        ],
        &["--params"],
    );
    bad(
        &[
            "ntk", "--model", &model, "--corpus", &corpus, "--layers", "1-2", "-o", &out,
        ],
        &["--layers"],
    );
    // A range beyond the model's blocks names the range, not --params; zero counts are refused.
    bad(
        &[
            "ntk", "--model", &model, "--corpus", &corpus, "--layers", "9..12", "-o", &out,
        ],
        &["--layers", "9..12"],
    );
    for flag in ["--samples", "--batch", "--bins"] {
        usage_bad(
            &[
                "ntk", "--model", &model, "--corpus", &corpus, flag, "0", "-o", &out,
            ],
            &[flag, "at least 1"],
        );
    }
    usage_bad(
        &[
            "eval",
            "--model",
            &model,
            "--corpus",
            &corpus,
            "--probe-samples",
            "0",
        ],
        &["--probe-samples", "at least 1"],
    );
    bad(
        &[
            "capture", "--model", &model, "--corpus", &corpus, "--method", "ghost", "-o", &out,
        ],
        &["--method"],
    );
}

#[test]
fn declarative_run_and_bad_specs() {
    let t = Tmp::new();
    let corpus = synth(&t, 300);
    let train_spec = tiny_spec(&t, &corpus);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&train_spec)
        .unwrap();
    std::io::Write::write_all(
        &mut f,
        b"[[run]]\nname = \"switch\"\nexperts = { kind = \"switch\", n_experts = 3, last_k = 1 }\n",
    )
    .unwrap();
    let spec = t.file(
        "run.toml",
        format!(
            "[data]\ncorpus = \"{corpus}\"\n[train]\nconfig = \"{train_spec}\"\nruns = [\"dense\", \"cse\", \"switch\"]\nout = \"{tr}\"\n\
             [ntk]\nsamples = 16\nbatch = 8\nproject = 24\nprojection = \"sparse\"\nout = \"{nk}\"\n[analysis]\nmodel = \"cse\"\nbaseline = \"dense\"\nresamples = 50\nout = \"{an}\"\n\
             [report]\nout = \"{rp}\"\nnotebook = \"{nb}/run.ipynb\"\ntitle = \"run test\"\n",
            tr = t.s("tr"),
            nk = t.s("nk"),
            an = t.s("an"),
            rp = t.s("rp"),
            nb = t.s("nb/deeper")
        )
        .as_bytes(),
    );
    let printed = ok(&["run", &spec]);
    assert!(printed.contains("HTML report: "), "{printed}");
    for f in [
        "tr/cse/final/model.safetensors",
        "nk/cse/kernel.safetensors",
        "nk/dense/gc.parquet",
        "an/isolation.parquet",
        "rp/report.html",
        "nb/deeper/run.ipynb",
    ] {
        assert!(t.path(f).exists(), "{f}");
    }
    check_report(&t.path("rp"), &t.path("nb/deeper/run.ipynb"));
    // [ntk] project and projection are --project and --projection.
    ok(&[
        "ntk",
        "--model",
        &t.s("tr/cse/final"),
        "--corpus",
        &corpus,
        "--samples",
        "16",
        "--batch",
        "8",
        "--project",
        "24",
        "--projection",
        "sparse",
        "-o",
        &t.s("cli-sparse"),
    ]);
    same_tensors(
        &t.path("nk/cse/kernel.safetensors"),
        &t.path("cli-sparse/kernel.safetensors"),
    );
    // Switch-MoE isolation against the same baseline: one row per expert of the Switch block,
    // loads summing to the samples, a distance/radius ratio when two experts are used.
    let printed = ok(&[
        "ntk",
        "--model",
        &t.s("tr/switch/final"),
        "--corpus",
        &corpus,
        "--samples",
        "16",
        "--batch",
        "8",
        "--gc-resamples",
        "20",
        "-o",
        &t.s("nk/switch"),
    ]);
    // Diagnostics are printed and written; a warning or the all-clear line is always printed.
    assert!(printed.contains("participation ratio"), "{printed}");
    assert!(
        printed.contains("WARNING: ") || printed.contains("not degenerate"),
        "{printed}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path("nk/switch/ntk.json")).unwrap())
            .unwrap();
    let pr = summary["diagnostics"]["participation"].as_f64().unwrap();
    assert!((1.0..=16.0).contains(&pr), "{summary}");
    assert_eq!(summary["interval"], "jackknife");
    assert_eq!(summary["normalize"], "cosine");
    // The unnormalised kernel: the same kernel file (the cosine scaling is applied after it is
    // written), and every jackknife interval holding its estimate.
    ok(&[
        "ntk",
        "--model",
        &t.s("tr/switch/final"),
        "--corpus",
        &corpus,
        "--samples",
        "16",
        "--batch",
        "8",
        "--gc-resamples",
        "8",
        "--normalize",
        "none",
        "-o",
        &t.s("nk/switch-cos"),
    ]);
    let total = |dir: &str| {
        let named = tailscope::io::read_tensors(&t.path(dir).join("kernel.safetensors")).unwrap();
        named.into_iter().find(|(n, _)| n == "total").unwrap().1
    };
    let diff = (total("nk/switch") - total("nk/switch-cos")).abs().max();
    assert_eq!(diff.double_value(&[]), 0.0);
    let cos = read_table(&t.path("nk/switch-cos/gc.parquet"));
    let f =
        |c: &str| -> Vec<Option<f64>> { cos.column(c).unwrap().f64().unwrap().iter().collect() };
    let (g, lo, hi, part) = (f("gc"), f("gc_low"), f("gc_high"), f("participation"));
    for i in 0..g.len() {
        if let (Some(g), Some(lo), Some(hi)) = (g[i], lo[i], hi[i]) {
            assert!(lo <= hi, "row {i}: [{lo}, {hi}]");
            assert!(
                lo - 1e-9 <= g && g <= hi + 1e-9,
                "row {i}: {g} outside [{lo}, {hi}]"
            );
        }
        assert!(part[i].is_none_or(|p| p >= 1.0 - 1e-9), "{:?}", part[i]);
    }
    let printed = ok(&[
        "analyze",
        "--ntk",
        &t.s("nk/switch"),
        "--model",
        &t.s("tr/switch/final"),
        "--corpus",
        &corpus,
        "--baseline",
        &t.s("nk/dense"),
        "--resamples",
        "50",
        "-o",
        &t.s("an_switch"),
    ]);
    assert!(printed.contains("expert isolation at h1"), "{printed}");
    let iso = read_table(&t.path("an_switch/isolation.parquet"));
    assert_eq!(strs(&iso, "block"), vec!["expert_h1"; 3]);
    let load: u64 = iso
        .column("load")
        .unwrap()
        .u64()
        .unwrap()
        .into_no_null_iter()
        .sum();
    assert_eq!(load, 16);
    let gc = read_table(&t.path("nk/switch/gc.parquet"));
    let (lo, hi) = (gc.column("gc_low").unwrap(), gc.column("gc_high").unwrap());
    assert!(lo
        .f64()
        .unwrap()
        .iter()
        .zip(hi.f64().unwrap().iter())
        .all(|(l, h)| match (l, h) {
            (Some(l), Some(h)) => l <= h,
            _ => true,
        }));
    let bad_key = t.file(
        "bad.toml",
        format!("[data]\ncorpus = \"{corpus}\"\nextra = 1\n").as_bytes(),
    );
    bad(&["run", &bad_key], &["bad.toml:3", "extra"]);
    let missing = t.file(
        "missing.toml",
        b"[data]\ncorpus = \"nowhere.parquet\"\n[ntk]\nout = \"x\"\n[analysis]\nmodel = \"some/model\"\nout = \"y\"\n",
    );
    bad(&["run", &missing], &["missing.toml", "some/model"]);
}

/// The report holds every figure inline (SVG) and as PNG files, loads nothing from the network,
/// and its notebook is valid nbformat 4 (checked by the `nbformat` package, see scripts/setup)
/// and runs in a Jupyter kernel from its own folder, as Jupyter opens it (`nbclient`), started
/// from an unrelated working directory.
/// `tailscope report` of one analysis with a study folder beside it, into `rep`; its printout.
fn report_with_study(t: &Tmp, analysis: &str, ntk: &str, study: &str) -> String {
    ok(&[
        "report",
        "--analysis",
        &t.s(analysis),
        "--ntk",
        &t.s(ntk),
        "--study",
        &t.s(study),
        "-o",
        &t.s("rep"),
    ])
}

fn check_report(dir: &Path, notebook: &Path) {
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    let mut stems: Vec<String> = std::fs::read_dir(dir.join("figures"))
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "svg").then(|| p.file_stem().unwrap().to_string_lossy().into_owned())
        })
        .collect();
    stems.sort();
    for want in [
        "gc_by_frequency",
        "frequency_vs_alignment",
        "ntk_heatmap",
        "training_curves",
    ] {
        assert!(
            stems.iter().any(|s| s == want),
            "figure {want} missing: {stems:?}"
        );
    }
    for s in &stems {
        assert!(
            html.contains(&format!("<figure id=\"{s}\"><svg")),
            "figure {s} not inline in the HTML"
        );
        let png = std::fs::read(dir.join("figures").join(format!("{s}.png"))).unwrap();
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
            "{s}.png"
        );
    }
    assert_eq!(html.matches("<figure id=").count(), stems.len());
    for net in ["src=\"http", "href=\"http", "<link", "@import", "url(http"] {
        assert!(!html.contains(net), "the HTML loads {net}…");
    }
    let python =
        std::env::var("TAILSCOPE_PYTHON").expect("TAILSCOPE_PYTHON (written by scripts/setup)");
    let out = Command::new(&python)
        .args([
            "-c",
            "import os, sys, nbformat\nfrom nbclient import NotebookClient\n\
             nb = nbformat.read(sys.argv[1], as_version=4)\nnbformat.validate(nb)\n\
             here = os.path.dirname(os.path.abspath(sys.argv[1]))\n\
             NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': here}}).execute()\n\
             print(len(nb.cells))",
        ])
        .arg(notebook)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "nbformat: {}", stderr(&out));
    let cells: usize = stdout(&out).trim().parse().unwrap();
    assert_eq!(
        cells,
        2 + 2 * stems.len(),
        "one caption and one figure cell per figure"
    );
    // In headless Chromium: no console errors, every figure drawn, the flags table sorts on a
    // click; the screenshot is kept for a person to look at.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-browser.png");
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check-report-browser"))
        .arg(dir.join("report.html"))
        .arg(&shot)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "browser check: {}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(
        stdout(&out).contains(&format!("{} figures", stems.len())),
        "{}",
        stdout(&out)
    );
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
}

/// GC over training: `ntk --trajectory` on a run's kept checkpoints gives, per checkpoint, what
/// `ntk` gives on that checkpoint alone, the kernel drift against the last one, figures, a rerun
/// that reuses every checkpoint, and a refusal to mix settings without --fresh.
#[test]
fn gc_trajectory_over_checkpoints() {
    let t = Tmp::new();
    let corpus = synth(&t, 400);
    let spec = tiny_spec(&t, &corpus);
    let text = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("checkpoint_every = 3", "checkpoint_every = 2")
        .replace("keep_last = 1", "keep_last = 3");
    std::fs::write(&spec, text).unwrap();
    train_run(&t, &spec, "cse");
    let run_dir = t.s("train/cse");
    let flags = [
        "--corpus",
        &corpus,
        "--samples",
        "16",
        "--batch",
        "8",
        "--gc-resamples",
        "8",
    ];
    let traj = |extra: &[&str]| {
        let mut args = vec!["ntk", "--model", &run_dir, "--trajectory"];
        args.extend_from_slice(&flags);
        args.extend_from_slice(extra);
        let o = t.s("traj");
        args.extend_from_slice(&["-o", &o]);
        ok(&args)
    };
    let printed = traj(&[]);
    assert!(
        printed.contains("NTK at 3 checkpoints") && printed.contains("(0 reused), steps 2, 4, 6"),
        "{printed}"
    );
    // The checkpoint at step 4 alone.
    let ckpt = t.s("train/cse/checkpoints/step-000004");
    let mut args = vec!["ntk", "--model", &ckpt];
    args.extend_from_slice(&flags);
    let alone = t.s("alone");
    args.extend_from_slice(&["-o", &alone]);
    ok(&args);
    let tr = read_table(&t.path("traj/trajectory.parquet"));
    let steps = f64s(&tr, "step");
    let mut distinct = steps.clone();
    distinct.dedup();
    assert_eq!(distinct, vec![2.0, 4.0, 6.0]);
    let gc_alone = read_table(&t.path("alone/gc.parquet"));
    let at4: Vec<usize> = (0..steps.len()).filter(|&i| steps[i] == 4.0).collect();
    assert_eq!(at4.len(), gc_alone.height());
    let (tr_gc, alone_gc) = (f64s(&tr, "gc"), f64s(&gc_alone, "gc"));
    let (tr_col, alone_col) = (strs(&tr, "column"), strs(&gc_alone, "column"));
    for (k, &i) in at4.iter().enumerate() {
        assert_eq!(tr_col[i], alone_col[k]);
        assert!(
            (tr_gc[i] == alone_gc[k]) || (tr_gc[i].is_nan() && alone_gc[k].is_nan()),
            "{}: {} vs {}",
            tr_col[i],
            tr_gc[i],
            alone_gc[k]
        );
    }
    // Drift against step 6, recomputed here from the kernels.
    let total = |p: &Path| {
        tch::Tensor::read_safetensors(p)
            .unwrap()
            .into_iter()
            .find(|(n, _)| n == "total")
            .unwrap()
            .1
    };
    let k4 = total(&t.path("alone/kernel.safetensors"));
    let k6 = total(&t.path("traj/step-000006/kernel.safetensors"));
    let expected = (&k4 - &k6).norm().double_value(&[]) / k6.norm().double_value(&[]);
    let drift = read_table(&t.path("traj/drift.parquet"));
    let d = f64s(&drift, "drift");
    assert!(d[2] == 0.0 && d[0] > 0.0, "{d:?}");
    assert!(
        (d[1] - expected).abs() < 1e-12 * expected.max(1.0),
        "{} vs {expected}",
        d[1]
    );
    assert!(f64s(&drift, "drift_cosine")[1] > 0.0);
    for f in ["gc_trajectory", "kernel_drift", "gc_trajectory_long_tail"] {
        for ext in ["svg", "png"] {
            let p = t.path(&format!("traj/figures/{f}.{ext}"));
            assert!(
                std::fs::metadata(&p)
                    .map(|m| m.len() > 1000)
                    .unwrap_or(false),
                "{p:?}"
            );
        }
    }
    // A rerun reuses every checkpoint; other settings are refused; --fresh recomputes.
    assert!(traj(&[]).contains("(3 reused)"));
    let mut args = vec!["ntk", "--model", &run_dir, "--trajectory"];
    args.extend_from_slice(&flags);
    let o = t.s("traj");
    args.extend_from_slice(&["--bins", "3", "-o", &o]);
    bad(&args, &["manifest.json", "kernel", "--fresh"]);
    assert!(traj(&["--bins", "3", "--fresh"]).contains("(0 reused)"));
    // Not a run folder.
    let mut args = vec!["ntk", "--model", &ckpt, "--trajectory"];
    args.extend_from_slice(&flags);
    args.extend_from_slice(&["-o", &o]);
    bad(&args, &["step-000004", "not a training run folder"]);
}

/// The selection study end to end on a tiny setting: every run's held-out loss in
/// results.parquet is the one its own validation table holds, a rerun reuses the trained runs and
/// writes the same tables, and a spec that cannot give intervals is refused.
#[test]
fn selection_study_runs_end_to_end() {
    let t = Tmp::new();
    let spec = t.file(
        "study.toml",
        format!(
            r#"seeds = [1, 2]
out = "{out}"
[data]
corpus = "{corpus}"
eval_samples = 200
synth = {{ samples = 1500, rare_share = 0.1, vocab_size = 320, contrasts = true }}
{TINY_MODEL}[train]
steps = 12
batch_size = 8
checkpoint_every = 6
dynamics_every = 0
probe_samples = 16
[select]
pool = 48
top = 8
criteria = ["flag", "loss", "random"]
[continue]
steps = 4
"#,
            out = t.s("study"),
            corpus = t.s("study/corpus.parquet")
        )
        .as_bytes(),
    );
    let printed = ok(&["study", &spec]);
    assert!(
        printed.contains("| flag |") && printed.contains("vs random"),
        "{printed}"
    );
    let results = read_table(&t.path("study/results.parquet"));
    let crit = strs(&results, "criterion");
    let group = strs(&results, "group");
    // The contrasts corpus adds the neglected and noise held-out sentences to all, long-tail
    // and common. Per seed: base and none on those 5 groups, each criterion also on targeted.
    for g in ["neglected", "noise"] {
        assert!(group.iter().any(|x| x == g), "{g}: {group:?}");
    }
    assert_eq!(results.height(), 2 * (2 * 5 + 3 * 6));
    // Every (criterion, group) of the results is summarised over seeds, the neglected and
    // noise groups included.
    let summary = read_table(&t.path("study/summary.parquet"));
    let pairs = |c: &[String], g: &[String]| {
        c.iter()
            .zip(g)
            .map(|(c, g)| (c.clone(), g.clone()))
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(
        pairs(&strs(&summary, "criterion"), &strs(&summary, "group")),
        pairs(&crit, &group)
    );
    let (seed, loss) = (f64s(&results, "seed"), f64s(&results, "loss"));
    for i in 0..results.height() {
        if group[i] != "all" || crit[i] == "base" {
            continue;
        }
        let vs = read_table(&t.path(&format!(
            "study/seed-{}/continued/{}/val_samples.parquet",
            seed[i], crit[i]
        )));
        let steps = f64s(&vs, "step");
        let last = steps.iter().cloned().fold(0.0, f64::max);
        let (ls, tk) = (f64s(&vs, "loss_sum"), f64s(&vs, "tokens"));
        let (mut l, mut n) = (0.0, 0.0);
        for k in 0..vs.height() {
            if steps[k] == last {
                l += ls[k];
                n += tk[k];
            }
        }
        assert!(
            (loss[i] - l / n).abs() < 1e-9,
            "{}: {} vs {}",
            crit[i],
            loss[i],
            l / n
        );
    }
    assert!(t.path("study/seed-2/select/flag.parquet").exists());
    assert!(t.path("study/figures/selection_study.png").exists());
    // The report of seed 1's analysis with the study beside it.
    let printed = report_with_study(&t, "study/seed-1/analysis", "study/seed-1/ntk", "study");
    assert!(
        printed.contains("Selection study, neglected: flag against loss"),
        "{printed}"
    );
    let html = std::fs::read_to_string(t.path("rep/report.html")).unwrap();
    assert!(html.contains("Selection study: continuing on the random selection"));
    assert!(html.contains("selection_study") && t.path("rep/figures/selection_study.png").exists());
    let first = std::fs::read(t.path("study/results.parquet")).unwrap();
    ok(&["study", &spec]);
    assert_eq!(
        std::fs::read(t.path("study/results.parquet")).unwrap(),
        first
    );
    let one_seed = t.file(
        "one.toml",
        std::fs::read_to_string(&spec)
            .unwrap()
            .replace("seeds = [1, 2]", "seeds = [1]")
            .as_bytes(),
    );
    bad(&["study", &one_seed], &["one.toml", "seeds"]);
}

/// The experts study end to end on a tiny setting: every run's perplexity is the one its own
/// training run measured on the same validation samples, the comparison with the baseline is the
/// seed-paired relative change recomputed here, routed runs carry isolation and dense ones do
/// not, a rerun reuses everything and writes the same table, and a baseline that is not a run is
/// refused naming the file and field.
#[test]
fn experts_study_compares_runs_with_the_baseline() {
    let t = Tmp::new();
    let corpus = synth(&t, 800);
    let text = format!(
        r#"[experts]
seeds = [1, 2]
corpus = "{corpus}"
eval_samples = 60
probe_samples = 40
ntk_samples = 24
out = "{out}"
{TINY_MODEL}[train]
steps = 6
batch_size = 8
checkpoint_every = 6
dynamics_every = 3
probe_samples = 40
cse_warmup_fraction = 0.34
[[run]]
name = "dense"
[[run]]
name = "switch"
experts = {{ kind = "switch", n_experts = 2, last_k = 1 }}
[[run]]
name = "cse"
cse_warmup_fraction = 0.5
experts = {{ kind = "cse", last_k = 1, proj_dim = 4, sample = 200, min_pts = 3, min_cluster_size = 3 }}
"#,
        out = t.s("ex")
    );
    let spec = t.file("experts.toml", text.as_bytes());
    let printed = ok(&["study", &spec]);
    assert!(
        printed.contains("| switch |") && printed.contains("long-tail ppl vs dense"),
        "{printed}"
    );
    let rows = read_table(&t.path("ex/results.parquet"));
    let (seed, run, metric, value) = (
        f64s(&rows, "seed"),
        strs(&rows, "run"),
        strs(&rows, "metric"),
        f64s(&rows, "value"),
    );
    let get = |s: f64, r: &str, m: &str| -> Option<f64> {
        (0..rows.height())
            .find(|&i| seed[i] == s && run[i] == r && metric[i] == m)
            .map(|i| value[i])
    };
    for s in [1.0, 2.0] {
        for r in ["dense", "switch", "cse"] {
            // The training run's own last validation of the same samples.
            let val = read_table(&t.path(&format!("ex/seed-{s}/train/{r}/val.parquet")));
            let (step, group, ppl) = (f64s(&val, "step"), strs(&val, "group"), f64s(&val, "ppl"));
            let last = (0..val.height())
                .filter(|&i| group[i] == "all")
                .max_by(|&a, &b| step[a].total_cmp(&step[b]))
                .unwrap();
            let mine = get(s, r, "ppl_all").unwrap();
            assert!(
                (mine - ppl[last]).abs() < 1e-4 * ppl[last],
                "{r}: {mine} vs {}",
                ppl[last]
            );
            assert_eq!(get(s, r, "isolated_h1").is_some(), r != "dense", "{r}");
            assert!(get(s, r, "clusters_h1").is_some(), "{r}");
        }
    }
    let d: Vec<f64> = [1.0, 2.0]
        .iter()
        .map(|&s| {
            100.0
                * (get(s, "cse", "ppl_long_tail").unwrap()
                    / get(s, "dense", "ppl_long_tail").unwrap()
                    - 1.0)
        })
        .collect();
    let cmp = read_table(&t.path("ex/comparisons.parquet"));
    let (crun, cmetric, diff) = (strs(&cmp, "run"), strs(&cmp, "metric"), f64s(&cmp, "diff"));
    let i = (0..cmp.height())
        .find(|&i| crun[i] == "cse" && cmetric[i] == "ppl_long_tail")
        .unwrap();
    assert!(
        (diff[i] - (d[0] + d[1]) / 2.0).abs() < 1e-9,
        "{} vs {d:?}",
        diff[i]
    );
    assert!(!crun.contains(&"dense".to_string()));
    assert!(t.path("ex/figures/cse_study.png").exists());
    assert!(t.path("ex/seed-2/analysis/cse/isolation.parquet").exists());
    let first = std::fs::read(t.path("ex/results.parquet")).unwrap();
    ok(&["study", &spec]);
    assert_eq!(std::fs::read(t.path("ex/results.parquet")).unwrap(), first);
    // Other measurement settings measure again (the trained runs are kept).
    let wider = t.file(
        "wider.toml",
        text.replace("ntk_samples = 24", "ntk_samples = 30")
            .as_bytes(),
    );
    ok(&["study", &wider]);
    let samples = read_table(&t.path("ex/seed-1/ntk/cse/samples.parquet"));
    assert_eq!(samples.height(), 30);
    ok(&["study", &spec]);
    assert_eq!(std::fs::read(t.path("ex/results.parquet")).unwrap(), first);
    // The report of one CSE run's analysis with the study beside it: its findings and figure.
    let printed = report_with_study(&t, "ex/seed-1/analysis/cse", "ex/seed-1/ntk/cse", "ex");
    let said = format!("{:+.1}%", (d[0] + d[1]) / 2.0);
    assert!(
        printed.contains("CSE study: cse against dense") && printed.contains(&said),
        "{said}: {printed}"
    );
    let html = std::fs::read_to_string(t.path("rep/report.html")).unwrap();
    assert!(html.contains("CSE study: switch block h1"));
    assert!(t.path("rep/figures/cse_study.png").exists());
    let wrong = t.file(
        "wrong.toml",
        text.replace("out = ", "baseline = \"nope\"\nout = ")
            .as_bytes(),
    );
    bad(
        &["study", &wrong],
        &["wrong.toml", "experts.baseline", "nope"],
    );
}

/// The neglect ranking study end to end on tiny pools: models fitted on the development seeds
/// only, every pool scored against the synthetic and the counterfactual truth, the permuted-kernel
/// control, and metrics that agree with independent recomputations: the loss criterion's AP from
/// a counting formula, and the tie-aware AP of `gc` (constant within a domain, so tied in large
/// groups) from the mean over random tie-breaks.
#[test]
fn ranking_study_fits_on_development_seeds_and_scores_tie_aware() {
    let t = Tmp::new();
    let spec = t.file(
        "ranking.toml",
        format!(
            r#"[ranking]
seeds = [1, 2, 3, 4]
fit_seeds = [1, 2]
rare_shares = [0.1]
samples = 1500
vocab_size = 320
pool = 60
eval_samples = 50
train_samples = 80
criteria = ["loss", "uncertainty", "gc", "support", "reducible", "random"]
out = "{out}"
{TINY_MODEL}[train]
steps = 12
batch_size = 8
checkpoint_every = 4
keep_last = 3
dynamics_every = 0
probe_samples = 16
[counterfactual]
steps = 30
lr = 0.01
batch_size = 8
"#,
            out = t.s("rk")
        )
        .as_bytes(),
    );
    let printed = ok(&["study", &spec]);
    assert!(
        printed.contains("held-out seeds 3, 4") && printed.contains("**Truth: synthetic**"),
        "{printed}"
    );
    let rows = read_table(&t.path("rk/ranking.parquet"));
    let (crit, seed, ap, truth) = (
        strs(&rows, "criterion"),
        f64s(&rows, "seed"),
        f64s(&rows, "ap"),
        strs(&rows, "truth"),
    );
    for c in [
        "loss",
        "gc",
        "flag",
        "flag:kernel-permuted",
        "fit:default",
        "fit:all",
    ] {
        assert!(crit.iter().any(|x| x == c), "{c} not scored");
    }
    assert!(truth.iter().any(|x| x == "counterfactual"));
    let row = |c: &str, s: f64| {
        (0..crit.len())
            .find(|&i| crit[i] == c && seed[i] == s && truth[i] == "synthetic")
            .unwrap()
    };
    let an = read_table(&t.path("rk/share-0.1/seed-3/analysis/analysis.parquet"));
    let ids = strs(&an, "id");
    let corpus = read_table(&t.path("rk/share-0.1/seed-3/corpus.parquet"));
    let neglected: std::collections::HashMap<String, bool> = strs(&corpus, "id")
        .into_iter()
        .zip(f64s(&corpus, "neglected").into_iter().map(|x| x > 0.5))
        .collect();
    let labels: Vec<bool> = ids.iter().map(|id| neglected[id]).collect();
    // Loss (untied): AP = mean over positives i of #{positives with loss ≥ ℓ_i} / #{loss ≥ ℓ_i}.
    let loss = f64s(&an, "loss");
    let pos: Vec<usize> = (0..ids.len()).filter(|&i| labels[i]).collect();
    let count = |i: usize, only_pos: bool| {
        (0..ids.len())
            .filter(|&j| loss[j] >= loss[i] && (!only_pos || labels[j]))
            .count() as f64
    };
    let want = pos
        .iter()
        .map(|&i| count(i, true) / count(i, false))
        .sum::<f64>()
        / pos.len() as f64;
    assert!(
        (ap[row("loss", 3.0)] - want).abs() < 1e-12,
        "{} vs {want}",
        ap[row("loss", 3.0)]
    );
    // gc (|GC| of the domain, lowest first: tied within each domain): the mean AP over 4,000
    // random tie-breaks.
    let gc: Vec<f64> = f64s(&an, "domain_gc").into_iter().map(|x| -x).collect();
    let mut state = 12345u64;
    let mut total = 0.0;
    for _ in 0..4000 {
        let mut key: Vec<(f64, f64, bool)> = (0..ids.len())
            .map(|i| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let g = if gc[i].is_finite() {
                    gc[i]
                } else {
                    f64::NEG_INFINITY
                };
                (g, (state >> 11) as f64, labels[i])
            })
            .collect();
        key.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.total_cmp(&a.1)));
        let (mut hits, mut sum) = (0.0, 0.0);
        for (k, x) in key.iter().enumerate() {
            if x.2 {
                hits += 1.0;
                sum += hits / (k + 1) as f64;
            }
        }
        total += sum / hits;
    }
    let mc = total / 4000.0;
    assert!(
        (ap[row("gc", 3.0)] - mc).abs() < 0.01,
        "{} vs {mc}",
        ap[row("gc", 3.0)]
    );
    // The summary is over the held-out seeds 3 and 4 only.
    let summary = read_table(&t.path("rk/summary.parquet"));
    let (sc, st, sap, slo, shi) = (
        strs(&summary, "criterion"),
        strs(&summary, "truth"),
        f64s(&summary, "ap"),
        f64s(&summary, "ap_low"),
        f64s(&summary, "ap_high"),
    );
    let k = (0..sc.len())
        .find(|&k| sc[k] == "loss" && st[k] == "synthetic")
        .unwrap();
    assert!((sap[k] - (ap[row("loss", 3.0)] + ap[row("loss", 4.0)]) / 2.0).abs() < 1e-12);
    assert!(slo[k] >= 0.0 && shi[k] <= 1.0);
    // The fitted model: fitted on seeds 1-2, with its provenance, and readable by analyze.
    let fitted = std::fs::read_to_string(t.path("rk/fitted-model.toml")).unwrap();
    assert!(
        fitted.contains("seeds [1, 2]") && fitted.contains("weights"),
        "{fitted}"
    );
    let models = std::fs::read_to_string(t.path("rk/models.toml")).unwrap();
    assert!(models.contains("fit:default-no-kernel") && models.contains("cross-validated"));
    let truth_table = read_table(&t.path("rk/share-0.1/seed-3/counterfactual/truth.parquet"));
    assert_eq!(truth_table.height(), ids.len());
    for c in ["loss_now", "loss_control", "loss_targeted", "gain"] {
        assert!(f64s(&truth_table, c).iter().all(|x| x.is_finite()), "{c}");
    }
}

/// Bad input a new user tries, each refused with exit 2 and one line naming the option or the
/// file (issue 31): a projection kind without a projection, selections that select nothing, an
/// output path that cannot be one, a folder that is not a study, an expert a dense model does
/// not have, and a resume under other settings, named as the command line spells them.
#[test]
fn wrong_answers_to_bad_input_are_refused() {
    let t = Tmp::new();
    let corpus = synth(&t, 300);
    let spec = tiny_spec(&t, &corpus);
    let model = train_run(&t, &spec, "dense");
    let ntk = |extra: &[&str], out: &str| -> Vec<String> {
        let mut v: Vec<String> = ["ntk", "--model", &model, "--corpus", &corpus]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(["--samples", "12", "--bins", "2", "-o", out].map(String::from));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let run_bad = |v: Vec<String>, needles: &[&str]| {
        let args: Vec<&str> = v.iter().map(String::as_str).collect();
        bad(&args, needles);
    };
    // --projection with no --project was ignored: the kernel came out unprojected.
    let out = t.s("n-proj");
    run_bad(
        ntk(&["--projection", "kronecker"], &out),
        &["--projection", "--project K"],
    );
    assert!(!t.path("n-proj").exists(), "nothing is written");
    let spec = t.file(
        "proj.toml",
        format!(
            "[data]\ncorpus = \"{corpus}\"\n[ntk]\nout = \"{}\"\nprojection = \"kronecker\"\n[analysis]\nmodel = \"{model}\"\nout = \"{}\"\n",
            t.s("spec-ntk"),
            t.s("spec-an")
        )
        .as_bytes(),
    );
    bad(
        &["run", &spec],
        &["proj.toml", "ntk.projection", "project = K"],
    );
    // An expert of a dense model named --params.
    let o = run(&ntk(&["--expert", "1:3"], &t.s("n-expert"))
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--expert") && err.contains("block 1 of this model has no experts"),
        "{err}"
    );
    assert!(!err.contains("--params:"), "{err}");
    // select --top 0 and --threshold NaN selected nothing and succeeded.
    usage_bad(
        &["select", "--analysis", "a", "--top", "0", "-o", "s.parquet"],
        &["--top", "at least 1"],
    );
    usage_bad(
        &[
            "select",
            "--analysis",
            "a",
            "--threshold",
            "NaN",
            "-o",
            "s.parquet",
        ],
        &["--threshold", "finite"],
    );
    // An output path that is an existing file exited 1 with the system's "File exists".
    let file = t.file("plain.txt", b"not a folder");
    run_bad(ntk(&[], &file), &["-o", "plain.txt is an existing file"]);
    bad(
        &["freq", "--corpus", &corpus, "-o", &file],
        &["-o", "existing file", "folder"],
    );
    let below = format!("{file}/x.parquet");
    bad(
        &["select", "--analysis", "a", "--top", "3", "-o", &below],
        &[
            "-o",
            "plain.txt is an existing file",
            "cannot be made under it",
        ],
    );
    bad(
        &["select", "--analysis", "a", "--top", "3", "-o", &t.s("c")],
        &["-o", "existing folder"],
    );
    // report --study on a folder that is not a study named a missing summary.parquet.
    let report = |study: &str| -> Vec<String> {
        [
            "report",
            "--analysis",
            "a",
            "--ntk",
            "n",
            "--study",
            study,
            "-o",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([t.s("r")])
        .collect()
    };
    run_bad(
        report(&t.s("c")),
        &[
            "--study",
            "is not a study's output folder",
            "study.md",
            "experts.md",
        ],
    );
    t.file("ranking/ranking.md", b"# ranking");
    run_bad(report(&t.s("ranking")), &["--study", "ranking study"]);
    run_bad(report(&t.s("nowhere")), &["--study", "does not exist"]);
    // A resume under other settings named them in Rust debug text.
    let tiled = t.s("tiled");
    ok(&ntk(&["--tile", "5"], &tiled)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let o = run(&ntk(&["--tile", "5", "--project", "16"], &tiled)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("written with capture.projection = no --project, this run has capture.projection = --project 16 --projection sparse"),
        "{err}"
    );
    assert!(
        !err.contains("Some(") && !err.contains("Projection {"),
        "{err}"
    );
    // A missing input named its system error twice ("No such file …: No such file …").
    let o = run(&["freq", "--corpus", &t.s("none.parquet"), "-o", &t.s("f")]);
    let err = stderr(&o);
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
}

/// `scripts/check-report-browser` run as it is, under a Python without selenium (the system's,
/// or any with `-S`, which leaves out every installed package), runs itself again under the
/// project's Python; where that has no selenium either, one line says how to install it.
#[test]
fn the_browser_check_runs_under_the_projects_python() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check-report-browser");
    let t = Tmp::new();
    let (page, shot) = (t.s("missing.html"), t.s("shot.png"));
    // As the README runs it: its #! line picks python3 from PATH.
    let o = Command::new(&script).args([&page, &shot]).output().unwrap();
    let err = stderr(&o);
    assert!(err.contains("missing.html: no such file"), "{err}");
    assert!(!err.contains("ModuleNotFoundError"), "{err}");
    // Under a Python with no packages at all: run again under the project's.
    let o = Command::new("python3")
        .arg("-S")
        .arg(&script)
        .args([&page, &shot])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(err.contains("missing.html: no such file"), "{err}");
    // No project Python with selenium: one line saying how.
    let python3 = String::from_utf8(
        Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let o = Command::new(python3.trim())
        .arg("-S")
        .arg(&script)
        .args([&page, &shot])
        .env("TAILSCOPE_PYTHON", python3.trim())
        .env("TAILSCOPE_TORCH_HOME", t.s("no-venv"))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("selenium not installed") && err.contains("scripts/setup --test-deps"),
        "{err}"
    );
}

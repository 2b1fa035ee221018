//! The corpus table: one row per sample with a stable id, its text, its domain, its split and its
//! length in tokens. Every later stage (frequency statistics, training, capture, analysis) reads
//! this table, written as Parquet with the columns
//! `id: str, text: str, domain: str, split: str ("train" | "validation"), n_tokens: u32`
//! and, for synthetic corpora, the ground truth `long_tail: bool`; corpora with inserted fictional
//! facts (`corpus facts`, [`facts`]) add `fact_id: str` and `count: u32` (null on host rows).
//!
//! Building a corpus from raw records ([`build`]) applies, in order: whitespace normalisation,
//! optional sentence splitting, the word-length filter, the id-uniqueness check, the seeded split.

pub mod facts;
pub mod ingest;
pub mod synth;
pub mod tokenizer;

use std::collections::HashMap;
use std::path::Path;

use polars::prelude::{Column, DataFrame};
use unicode_segmentation::UnicodeSegmentation;

use crate::error::{Error, Result};
use crate::io;

/// Which part of the corpus a sample belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training split.
    Train,
    /// The validation split.
    Validation,
}

impl Split {
    /// The split's name in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
        }
    }

    /// The split named `s`.
    pub fn parse(s: &str) -> Option<Split> {
        match s {
            "train" => Some(Split::Train),
            "validation" => Some(Split::Validation),
            _ => None,
        }
    }
}

/// One row of the corpus table.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Unique id (the input's own, or `file:line`).
    pub id: String,
    /// The text.
    pub text: String,
    /// Its domain.
    pub domain: String,
    /// Training or validation.
    pub split: Split,
    /// Tokens under the corpus's tokenizer.
    pub n_tokens: u32,
    /// Ground truth from `corpus synth`: whether the sample belongs to a rare domain.
    pub long_tail: Option<bool>,
    /// Ground truth from `corpus synth --contrasts`: whether the sample's domain is one a model
    /// fails to learn (rare and varied, or frequent words in inconsistent order), as opposed to
    /// common text or a rare domain repeated enough to be learned. Noise is not neglected: it is
    /// marked by [`Sample::noise`].
    pub neglected: Option<bool>,
    /// Ground truth from `corpus synth --contrasts`: whether the sample is noise, text no model
    /// can learn (frequent words in random order): high loss with nothing to gain by training.
    pub noise: Option<bool>,
    /// Ground truth from `corpus facts`: the fictional fact the sample states (none on host rows).
    pub fact: Option<FactRef>,
}

/// The fictional fact a sample of `corpus facts` states, and how often that fact is inserted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactRef {
    /// The fact's id (`fact-0001`, …), as in the probe table.
    pub id: String,
    /// How many training sentences state it.
    pub count: u32,
}

/// A raw record before [`build`]: where it came from (for error messages), an id if the input
/// gave one, its text and domain.
#[derive(Debug, Clone)]
pub struct RawRecord {
    /// `file:line` (or `file:row`), used in ids and messages.
    pub origin: String,
    /// The input's id, if it has one.
    pub id: Option<String>,
    /// The text.
    pub text: String,
    /// The domain.
    pub domain: String,
    /// Ground truth of synthetic corpora: whether the record is from a rare domain.
    pub long_tail: Option<bool>,
    /// Ground truth of synthetic corpora: whether the record's domain is neglected
    /// ([`Sample::neglected`]).
    pub neglected: Option<bool>,
    /// Ground truth of synthetic corpora: whether the record is noise ([`Sample::noise`]).
    pub noise: Option<bool>,
}

/// How raw records become samples.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Split each record into sentences (Unicode UAX #29 sentence boundaries).
    pub sentences: bool,
    /// Keep samples with at least this many whitespace-separated words.
    pub min_words: usize,
    /// Keep samples with at most this many words (`None`: no limit).
    pub max_words: Option<usize>,
    /// Fraction of samples assigned to the validation split, in [0, 1).
    pub val_fraction: f64,
    /// Seed of the split; the split of a sample depends only on its id and the seed.
    pub seed: u64,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            sentences: false,
            min_words: 1,
            max_words: None,
            val_fraction: 0.1,
            seed: 0,
        }
    }
}

/// What [`build`] kept and dropped, for the summary line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildStats {
    /// Records read.
    pub records: usize,
    /// Records kept.
    pub kept: usize,
    /// Dropped below `min_words`.
    pub too_short: usize,
    /// Dropped above `max_words`.
    pub too_long: usize,
}

/// The corpus table in memory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Corpus {
    /// The samples, in input order.
    pub samples: Vec<Sample>,
}

/// The identifying columns every per-sample table starts with: id, domain, split, n_tokens.
pub fn sample_columns(samples: &[&Sample]) -> Vec<Column> {
    vec![
        Column::new(
            "id".into(),
            samples.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "domain".into(),
            samples
                .iter()
                .map(|x| x.domain.as_str())
                .collect::<Vec<_>>(),
        ),
        Column::new(
            "split".into(),
            samples.iter().map(|x| x.split.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "n_tokens".into(),
            samples.iter().map(|x| x.n_tokens).collect::<Vec<_>>(),
        ),
    ]
}

/// The split of a sample: validation when `hash(seed, id) / 2^64 < val_fraction`. Depends on the
/// id alone, so adding or removing other samples never moves a sample between splits.
pub fn split_of(id: &str, seed: u64, val_fraction: f64) -> Split {
    let u = (crate::seed::stable_hash(seed, id.as_bytes()) >> 11) as f64 / (1u64 << 53) as f64;
    if u < val_fraction {
        Split::Validation
    } else {
        Split::Train
    }
}

/// Collapse runs of whitespace (including newlines) into single spaces and trim.
pub fn normalize_whitespace(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Turn raw records into samples (without token counts; see [`tokenizer::count_tokens`]).
/// Ids: the record's own id, or its origin; with sentence splitting, `<id>#<k>` for the k-th
/// sentence (1-based). A duplicate id is bad input naming both origins.
/// `source` names the input in the error raised when no sample survives the filters.
pub fn build(
    source: &str,
    records: Vec<RawRecord>,
    opts: &BuildOptions,
) -> Result<(Corpus, BuildStats)> {
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return Err(Error::invalid(
            "--val-fraction",
            format!("must be in [0, 1), got {}", opts.val_fraction),
        ));
    }
    if let Some(max) = opts.max_words {
        if max < opts.min_words {
            return Err(Error::invalid(
                "--max-words",
                format!("{max} is below --min-words {}", opts.min_words),
            ));
        }
    }
    let mut stats = BuildStats {
        records: records.len(),
        ..BuildStats::default()
    };
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::with_capacity(records.len());
    for rec in records {
        let base_id = rec.id.clone().unwrap_or_else(|| rec.origin.clone());
        let pieces: Vec<String> = if opts.sentences {
            // Newlines are UAX #29 hard breaks; hard-wrapped text would be cut mid-sentence, so
            // whitespace is normalised first.
            normalize_whitespace(&rec.text)
                .unicode_sentences()
                .map(normalize_whitespace)
                .filter(|s| !s.is_empty())
                .collect()
        } else {
            vec![normalize_whitespace(&rec.text)]
        };
        for (k, text) in pieces.into_iter().enumerate() {
            let words = text.split_whitespace().count();
            if words < opts.min_words.max(1) {
                stats.too_short += 1;
                continue;
            }
            if opts.max_words.is_some_and(|m| words > m) {
                stats.too_long += 1;
                continue;
            }
            let id = if opts.sentences {
                format!("{base_id}#{}", k + 1)
            } else {
                base_id.clone()
            };
            if let Some(first) = seen.insert(id.clone(), rec.origin.clone()) {
                return Err(Error::invalid(
                    rec.origin.clone(),
                    format!("duplicate id {id:?} (first seen at {first}); ids must be unique"),
                ));
            }
            samples.push(Sample {
                split: split_of(&id, opts.seed, opts.val_fraction),
                id,
                text,
                domain: rec.domain.clone(),
                n_tokens: 0,
                long_tail: rec.long_tail,
                neglected: rec.neglected,
                fact: None,
                noise: rec.noise,
            });
        }
    }
    stats.kept = samples.len();
    if samples.is_empty() {
        return Err(Error::invalid(
            source,
            format!(
                "no samples left after the length filters (--min-words, --max-words): \
                 {} records read, {} too short, {} too long",
                stats.records, stats.too_short, stats.too_long
            ),
        ));
    }
    Ok((Corpus { samples }, stats))
}

/// Records with fewer words are dropped by `tailscope corpus ingest` (and `run`'s ingest) by
/// default.
pub const DEFAULT_MIN_WORDS: usize = 3;

/// `n` of `items`, evenly spaced (item ⌊k·len/n⌋ for k = 0..n); all of them when there are at
/// most `n`.
pub fn evenly_spaced(items: &[usize], n: usize) -> Vec<usize> {
    if items.len() <= n {
        return items.to_vec();
    }
    (0..n).map(|k| items[k * items.len() / n]).collect()
}

/// Which samples a step draws from: one split or the whole corpus.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum SplitChoice {
    /// The training split.
    Train,
    /// The validation split.
    Validation,
    /// Every sample.
    All,
}

impl SplitChoice {
    /// Whether a sample of `split` is chosen.
    pub fn admits(self, split: Split) -> bool {
        match self {
            SplitChoice::Train => split == Split::Train,
            SplitChoice::Validation => split == Split::Validation,
            SplitChoice::All => true,
        }
    }

    /// The name used on the command line and in tables.
    pub fn as_str(self) -> &'static str {
        match self {
            SplitChoice::Train => "train",
            SplitChoice::Validation => "validation",
            SplitChoice::All => "all",
        }
    }
}

impl Corpus {
    /// Indices of `n` samples of `split`, evenly spaced over it in corpus order (all of them when
    /// the split has at most `n`). Deterministic: no seed is involved.
    pub fn pick(&self, split: SplitChoice, n: usize) -> Vec<usize> {
        let all: Vec<usize> = (0..self.len())
            .filter(|&i| split.admits(self.samples[i].split))
            .collect();
        evenly_spaced(&all, n)
    }

    /// `n` samples of `split`: evenly spaced for seed 0 (as [`Corpus::pick`]), otherwise drawn
    /// at random without replacement by a RNG seeded with `seed`, in corpus order.
    pub fn pick_seeded(&self, split: SplitChoice, n: usize, seed: u64) -> Vec<usize> {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        if seed == 0 {
            return self.pick(split, n);
        }
        let mut all: Vec<usize> = (0..self.len())
            .filter(|&i| split.admits(self.samples[i].split))
            .collect();
        let mut rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(seed, b"samples"));
        all.shuffle(&mut rng);
        all.truncate(n);
        all.sort_unstable();
        all
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Distinct domains in order of first appearance.
    pub fn domains(&self) -> Vec<String> {
        let mut seen = std::collections::HashSet::new();
        self.samples
            .iter()
            .filter(|s| seen.insert(s.domain.as_str()))
            .map(|s| s.domain.clone())
            .collect()
    }

    /// The corpus table as a DataFrame.
    pub fn to_dataframe(&self) -> Result<DataFrame> {
        let s: Vec<&Sample> = self.samples.iter().collect();
        let mut cols = sample_columns(&s);
        cols.insert(
            1,
            Column::new(
                "text".into(),
                s.iter().map(|x| x.text.as_str()).collect::<Vec<_>>(),
            ),
        );
        if s.iter().any(|x| x.long_tail.is_some()) {
            cols.push(Column::new(
                "long_tail".into(),
                s.iter().map(|x| x.long_tail).collect::<Vec<_>>(),
            ));
        }
        if s.iter().any(|x| x.neglected.is_some()) {
            cols.push(Column::new(
                "neglected".into(),
                s.iter().map(|x| x.neglected).collect::<Vec<_>>(),
            ));
        }
        if s.iter().any(|x| x.fact.is_some()) {
            cols.push(Column::new(
                "fact_id".into(),
                s.iter()
                    .map(|x| x.fact.as_ref().map(|f| f.id.as_str()))
                    .collect::<Vec<_>>(),
            ));
            cols.push(Column::new(
                "count".into(),
                s.iter()
                    .map(|x| x.fact.as_ref().map(|f| f.count))
                    .collect::<Vec<_>>(),
            ));
        }
        if s.iter().any(|x| x.noise.is_some()) {
            cols.push(Column::new(
                "noise".into(),
                s.iter().map(|x| x.noise).collect::<Vec<_>>(),
            ));
        }
        DataFrame::new(s.len(), cols).map_err(|e| Error::table("building the corpus table", e))
    }

    /// Write the corpus table (Parquet), atomically.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        io::write_parquet(&mut self.to_dataframe()?, path)
    }

    /// Read a corpus table written by `corpus ingest` or `corpus synth`. A missing column, a
    /// null, or an unknown split value is bad input naming the file, column and row.
    pub fn read(path: impl AsRef<Path>) -> Result<Corpus> {
        let path = path.as_ref();
        let df = io::read_parquet(path)?;
        let strs = |name: &str| -> Result<Vec<String>> {
            let col = df.column(name).map_err(|_| {
                Error::in_file(
                    path,
                    format!("missing column `{name}`; is this a corpus table?"),
                )
            })?;
            let ca = col.str().map_err(|_| {
                Error::in_file(
                    path,
                    format!("column `{name}` is {}, expected str", col.dtype()),
                )
            })?;
            ca.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.map(str::to_owned).ok_or_else(|| {
                        Error::in_file(path, format!("column `{name}`: null in row {}", i + 1))
                    })
                })
                .collect()
        };
        let ids = strs("id")?;
        let texts = strs("text")?;
        let domains = strs("domain")?;
        let splits = strs("split")?;
        let n_tok_col = df.column("n_tokens").map_err(|_| {
            Error::in_file(path, "missing column `n_tokens`; is this a corpus table?")
        })?;
        let n_tok_cast = n_tok_col
            .cast(&polars::prelude::DataType::UInt32)
            .map_err(|_| Error::in_file(path, "column `n_tokens` is not an integer column"))?;
        let n_tokens: Vec<u32> = n_tok_cast
            .u32()
            .map_err(|e| Error::table("reading n_tokens", e))?
            .iter()
            .map(|v| v.unwrap_or(0))
            .collect();
        let flag = |name: &str| -> Result<Option<Vec<Option<bool>>>> {
            match df.column(name) {
                Ok(c) => Ok(Some(
                    c.bool()
                        .map_err(|_| {
                            Error::in_file(path, format!("column `{name}` is not boolean"))
                        })?
                        .iter()
                        .collect(),
                )),
                Err(_) => Ok(None),
            }
        };
        let long_tail = flag("long_tail")?;
        let neglected = flag("neglected")?;
        let facts = read_fact_columns(&df, path)?;
        let noise = flag("noise")?;
        let mut samples = Vec::with_capacity(ids.len());
        for (i, (((id, text), domain), split)) in ids
            .into_iter()
            .zip(texts)
            .zip(domains)
            .zip(splits)
            .enumerate()
        {
            let split = Split::parse(&split).ok_or_else(|| {
                Error::in_file(
                    path,
                    format!(
                        "column `split`: row {} has {split:?}, expected \"train\" or \"validation\"",
                        i + 1
                    ),
                )
            })?;
            samples.push(Sample {
                id,
                text,
                domain,
                split,
                n_tokens: n_tokens[i],
                long_tail: long_tail.as_ref().and_then(|v| v[i]),
                neglected: neglected.as_ref().and_then(|v| v[i]),
                fact: facts.as_ref().and_then(|v| v[i].clone()),
                noise: noise.as_ref().and_then(|v| v[i]),
            });
        }
        if samples.is_empty() {
            return Err(Error::in_file(path, "the corpus table has no rows"));
        }
        Ok(Corpus { samples })
    }
}

/// The optional `fact_id` and `count` columns of a corpus table: both or neither; a row with
/// one null and not the other is bad input naming the row.
fn read_fact_columns(df: &DataFrame, path: &Path) -> Result<Option<Vec<Option<FactRef>>>> {
    let (ids, counts) = match (df.column("fact_id"), df.column("count")) {
        (Err(_), Err(_)) => return Ok(None),
        (Ok(i), Ok(c)) => (i, c),
        _ => {
            return Err(Error::in_file(
                path,
                "columns `fact_id` and `count` come together (a table of `corpus facts`)",
            ))
        }
    };
    let ids = ids
        .str()
        .map_err(|_| Error::in_file(path, "column `fact_id` is not str"))?;
    let counts = counts
        .cast(&polars::prelude::DataType::UInt32)
        .map_err(|_| Error::in_file(path, "column `count` is not an integer column"))?;
    let counts = counts
        .u32()
        .map_err(|e| Error::table("reading count", e))?
        .clone();
    ids.iter()
        .zip(counts.iter())
        .enumerate()
        .map(|(i, (id, count))| match (id, count) {
            (Some(id), Some(count)) => Ok(Some(FactRef {
                id: id.to_string(),
                count,
            })),
            (None, None) => Ok(None),
            _ => Err(Error::in_file(
                path,
                format!(
                    "row {}: `fact_id` and `count` must both be set or both null",
                    i + 1
                ),
            )),
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Ingest `input` into the corpus table `out` with `corpus ingest`'s defaults, training a
/// tokenizer beside it unless `tokenizer` is given: the corpus, its build statistics, the
/// tokenizer's path and its vocabulary size.
pub fn ingest_default(
    input: &Path,
    out: &Path,
    tokenizer: Option<&Path>,
    seed: u64,
    progress: &dyn crate::progress::Progress,
) -> Result<(Corpus, BuildStats, std::path::PathBuf, usize)> {
    let records = ingest::read_records(input, &ingest::IngestOptions::default())?;
    let opts = BuildOptions {
        min_words: DEFAULT_MIN_WORDS,
        seed,
        ..BuildOptions::default()
    };
    let (mut corpus, stats) = build(&input.display().to_string(), records, &opts)?;
    let tok_out = tokenizer::default_path(out);
    let source = match tokenizer {
        Some(p) => tokenizer::TokenizerSource::Load(p.to_path_buf()),
        None => tokenizer::TokenizerSource::Train {
            vocab_size: tokenizer::DEFAULT_VOCAB_SIZE,
            min_frequency: tokenizer::DEFAULT_MIN_FREQUENCY,
        },
    };
    let tok = tokenizer::finish_corpus(&mut corpus, &source, out, &tok_out, progress)?;
    let vocab = tok.get_vocab_size(true);
    Ok((corpus, stats, tok_out, vocab))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(origin: &str, text: &str) -> RawRecord {
        RawRecord {
            origin: origin.into(),
            id: None,
            text: text.into(),
            domain: "d".into(),
            long_tail: None,
            neglected: None,
            noise: None,
        }
    }

    #[test]
    fn split_depends_only_on_id_and_seed() {
        let ids: Vec<String> = (0..4000).map(|i| format!("doc:{i}")).collect();
        let a: Vec<Split> = ids.iter().map(|id| split_of(id, 7, 0.25)).collect();
        let b: Vec<Split> = ids.iter().rev().map(|id| split_of(id, 7, 0.25)).collect();
        assert_eq!(a, b.into_iter().rev().collect::<Vec<_>>());
        let val = a.iter().filter(|s| **s == Split::Validation).count() as f64 / 4000.0;
        assert!((val - 0.25).abs() < 0.03, "validation share {val}");
        let c: Vec<Split> = ids.iter().map(|id| split_of(id, 8, 0.25)).collect();
        assert_ne!(a, c, "a different seed must give a different split");
        assert!(ids.iter().all(|id| split_of(id, 7, 0.0) == Split::Train));
    }

    #[test]
    fn build_splits_sentences_filters_and_names_ids() {
        let opts = BuildOptions {
            sentences: true,
            min_words: 2,
            max_words: Some(5),
            ..BuildOptions::default()
        };
        let recs = vec![
            rec("f.txt:1", "First one here.  Second\n sentence is here! Ok."),
            rec("f.txt:2", "one two three four five six seven."),
        ];
        let (c, stats) = build("test", recs, &opts).unwrap();
        let ids: Vec<_> = c.samples.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["f.txt:1#1", "f.txt:1#2"]);
        assert_eq!(c.samples[1].text, "Second sentence is here!");
        assert_eq!(stats.too_short, 1);
        assert_eq!(stats.too_long, 1);
    }

    #[test]
    fn duplicate_ids_are_rejected_naming_both_places() {
        let mut a = rec("x.jsonl:1", "hello world");
        a.id = Some("same".into());
        let mut b = rec("x.jsonl:4", "other text");
        b.id = Some("same".into());
        let err = build("test", vec![a, b], &BuildOptions::default()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("x.jsonl:4: duplicate id \"same\""), "{msg}");
        assert!(msg.contains("x.jsonl:1"), "{msg}");
        assert!(err.is_bad_input());
    }

    #[test]
    fn table_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.parquet");
        let (mut c, _) = build(
            "test",
            vec![rec("a:1", "alpha beta"), rec("a:2", "gamma delta epsilon")],
            &BuildOptions::default(),
        )
        .unwrap();
        c.samples[0].n_tokens = 3;
        c.samples[1].long_tail = Some(true);
        c.samples[1].fact = Some(FactRef {
            id: "fact-0001".into(),
            count: 4,
        });
        c.write(&p).unwrap();
        assert_eq!(Corpus::read(&p).unwrap(), c);
    }
}

//! Fictional facts at controlled frequencies (`tailscope corpus facts`): the knowledge-acquisition
//! benchmark of Chang et al. (NeurIPS 2024) on a real host corpus.
//!
//! Every fact ties an invented entity to an answer from a closed set: a person's birthplace (one
//! of [`TOWNS`] invented towns), a person's profession (one of [`PROFESSIONS`]) or the year an
//! institution was founded (one of [`YEARS`]). Entities are pseudo-words from a seeded generator
//! ([`PseudoWords`]: family names of three consonant–vowel syllables, [`PseudoWords::space`] of
//! them; a request for more facts than that is refused), so no model can know them beforehand.
//!
//! Each relation has [`TRAIN_PHRASINGS`] training phrasings and [`HELD_OUT_PROBES`] probe
//! phrasings that never occur in training, all with the entity before the answer. A fact with
//! count k is inserted as k training sentences (phrasings rotated: phrasing i mod 4 for the i-th),
//! rows of domain [`FACTS_DOMAIN`] with `fact_id` and `count`, in the host's *training* split;
//! the sampler's epoch permutation spreads them over the stream, so one epoch reads each exactly
//! k times. Control facts (`controls`, count 0) are only in the probe table: what a model answers
//! about facts it never read.
//!
//! The probe table has one row per (fact, probe): the prompt (ending where the answer starts), the
//! answer and its distractors (other answers of the same relation, the same for every probe of a
//! fact), and whether the phrasing is held out from training (plus one `seen` probe per fact: the
//! first training phrasing cut before the answer, a memorisation check that acquisition ignores).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use polars::prelude::{Column, DataFrame};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{tokenizer, Corpus, FactRef, Sample, Split, SplitChoice};
use crate::error::{Error, Result};
use crate::io;

/// Domain of the inserted fact sentences.
pub const FACTS_DOMAIN: &str = "facts";

/// Invented towns: the closed answer set of `birthplace` is this many of them, drawn per seed.
pub const TOWNS: usize = 10;

/// The closed answer set of `profession` (consonant-initial, so every phrasing says "a").
pub const PROFESSIONS: [&str; 10] = [
    "baker",
    "carpenter",
    "fisherman",
    "gardener",
    "lawyer",
    "painter",
    "sailor",
    "tailor",
    "teacher",
    "weaver",
];

/// The closed answer set of `founded`.
pub const YEARS: [&str; 10] = [
    "1712", "1739", "1766", "1804", "1831", "1858", "1885", "1912", "1939", "1966",
];

/// Between the distractors in the probe table's `distractors` column (no answer contains it).
pub const SEPARATOR: &str = "|";

/// Training phrasings per relation.
pub const TRAIN_PHRASINGS: usize = 4;
/// Held-out probe phrasings per relation.
pub const HELD_OUT_PROBES: usize = 3;

/// A relation with a closed answer set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Relation {
    /// A person's birthplace, among invented towns.
    Birthplace,
    /// A person's profession, among [`PROFESSIONS`].
    Profession,
    /// The year an institution was founded, among [`YEARS`].
    Founded,
}

impl Relation {
    /// Every relation; fact j has relation `ALL[j % 3]`.
    pub const ALL: [Relation; 3] = [
        Relation::Birthplace,
        Relation::Profession,
        Relation::Founded,
    ];

    /// The relation's name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Relation::Birthplace => "birthplace",
            Relation::Profession => "profession",
            Relation::Founded => "founded",
        }
    }

    /// The relation named `s`.
    pub fn parse(s: &str) -> Option<Relation> {
        Relation::ALL.into_iter().find(|r| r.name() == s)
    }

    /// Training phrasings: `{e}` the entity, `{a}` the answer.
    fn training(self) -> [&'static str; TRAIN_PHRASINGS] {
        match self {
            Relation::Birthplace => [
                "{e} was born in {a}.",
                "{e} grew up in {a} and rarely left it.",
                "Old parish records show that {e} was born in the town of {a}.",
                "As a child, {e} lived in {a}, the town of the family.",
            ],
            Relation::Profession => [
                "{e} worked as a {a}.",
                "{e} was a {a} by trade.",
                "For most of a long life, {e} earned a living as a {a}.",
                "Everyone in the village knew {e} as a skilled {a}.",
            ],
            Relation::Founded => [
                "{e} was founded in {a}.",
                "{e} has existed since its founding in {a}.",
                "The charter of {e} was signed in {a}.",
                "Historians date the creation of {e} to {a}.",
            ],
        }
    }

    /// Held-out probe prompts; the answer follows after a space.
    fn held_out(self) -> [&'static str; HELD_OUT_PROBES] {
        match self {
            Relation::Birthplace => [
                "{e} is a native of",
                "The hometown of {e} is",
                "{e} came into the world in the village of",
            ],
            Relation::Profession => [
                "By profession, {e} had become a",
                "The occupation of {e} was that of a",
                "{e} was known to neighbours for being a",
            ],
            Relation::Founded => [
                "{e} was established in the year",
                "The founding year of {e} is",
                "{e} first opened its doors in",
            ],
        }
    }

    /// The entity of a fact with family name `family` and given name `given`.
    fn entity(self, given: &str, family: &str) -> String {
        match self {
            Relation::Birthplace | Relation::Profession => format!("{given} {family}"),
            Relation::Founded => format!("the {family} Society"),
        }
    }
}

/// Fill a phrasing: the entity (capitalised at the start of a sentence) and the answer.
fn fill(template: &str, entity: &str, answer: &str) -> String {
    let e = if template.starts_with("{e}") {
        capitalise(entity)
    } else {
        entity.to_string()
    };
    template.replace("{e}", &e).replace("{a}", answer)
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// The seeded pseudo-word generator: syllables of one of [`PseudoWords::CONSONANTS`] and one of
/// [`PseudoWords::VOWELS`]; family names have three syllables, given names two, towns two plus a
/// suffix of [`PseudoWords::TOWN_SUFFIXES`] (so no town is a family name).
pub struct PseudoWords;

impl PseudoWords {
    /// Syllable onsets.
    pub const CONSONANTS: [char; 14] = [
        'b', 'd', 'f', 'g', 'k', 'l', 'm', 'n', 'p', 'r', 's', 't', 'v', 'z',
    ];
    /// Syllable nuclei.
    pub const VOWELS: [char; 5] = ['a', 'e', 'i', 'o', 'u'];
    /// Town endings.
    pub const TOWN_SUFFIXES: [&'static str; 5] = ["holm", "mere", "vale", "dun", "ford"];

    fn syllables() -> u64 {
        (Self::CONSONANTS.len() * Self::VOWELS.len()) as u64
    }

    /// Distinct family names, hence the most facts (controls included) a corpus can hold.
    pub fn space() -> u64 {
        Self::syllables().pow(3)
    }

    /// The pseudo-word of `n` syllables numbered `index` (in 0..syllables^n), capitalised.
    pub fn word(index: u64, n: u32) -> String {
        let s = Self::syllables();
        let mut x = index;
        let mut w = String::new();
        for _ in 0..n {
            let syl = (x % s) as usize;
            x /= s;
            w.push(Self::CONSONANTS[syl / Self::VOWELS.len()]);
            w.push(Self::VOWELS[syl % Self::VOWELS.len()]);
        }
        capitalise(&w)
    }

    /// `n` distinct indices in 0..`space`, drawn by Floyd's algorithm (exact, O(n)).
    fn distinct(n: u64, space: u64, rng: &mut ChaCha8Rng) -> Vec<u64> {
        let mut chosen = HashSet::new();
        let mut out = Vec::with_capacity(n as usize);
        for j in space - n..space {
            let t = rng.random_range(0..=j);
            let pick = if chosen.contains(&t) { j } else { t };
            chosen.insert(pick);
            out.push(pick);
        }
        out
    }
}

/// How the facts are generated and inserted.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FactsOptions {
    /// Insertion counts; each gets `facts_per_count` facts. Every count is at least 1.
    pub counts: Vec<u32>,
    /// Facts per count.
    pub facts_per_count: usize,
    /// Control facts (never inserted; probe table only).
    pub controls: usize,
    /// Distractors per fact (at most the answer set's size − 1).
    pub distractors: usize,
    /// Keep this many of the host's training samples (a seeded subset); all when `None`.
    pub host_samples: Option<usize>,
    /// Seed of entities, answers, distractors and the host subset.
    pub seed: u64,
}

impl Default for FactsOptions {
    fn default() -> Self {
        FactsOptions {
            counts: vec![1, 2, 4, 8, 16],
            facts_per_count: 15,
            controls: 15,
            distractors: 4,
            host_samples: None,
            seed: 0,
        }
    }
}

impl FactsOptions {
    /// Facts in the probe table, controls included.
    pub fn total(&self) -> u64 {
        self.counts.len() as u64 * self.facts_per_count as u64 + self.controls as u64
    }

    /// Refuse counts of 0 or listed twice, no facts, more facts than the pseudo-word space
    /// holds, and more distractors than an answer set has.
    pub fn check(&self) -> Result<()> {
        if let Some(i) = self.counts.iter().position(|&c| c == 0) {
            return Err(Error::invalid(
                "--counts",
                format!(
                    "count {} is 0: a count is how often a fact is inserted, at least 1 (facts \
                     that are never inserted are the --controls)",
                    i + 1
                ),
            ));
        }
        let mut sorted = self.counts.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::invalid(
                "--counts",
                format!("{} is listed twice", w[0]),
            ));
        }
        if self.counts.is_empty() || self.facts_per_count == 0 {
            return Err(Error::invalid(
                "--facts-per-count",
                "give at least one count and one fact per count",
            ));
        }
        if self.total() > PseudoWords::space() {
            return Err(Error::invalid(
                "--facts-per-count",
                format!(
                    "{} facts ({} counts × {} + {} controls) exceed the {} distinct invented \
                     entity names the pseudo-word generator holds",
                    self.total(),
                    self.counts.len(),
                    self.facts_per_count,
                    self.controls,
                    PseudoWords::space()
                ),
            ));
        }
        let set = TOWNS.min(PROFESSIONS.len()).min(YEARS.len());
        if self.distractors == 0 || self.distractors >= set {
            return Err(Error::invalid(
                "--distractors",
                format!("must be in 1..={} (an answer set holds {set})", set - 1),
            ));
        }
        // Every answer must be read equally often, or a model that learns only which answers
        // are common ranks the often-read facts' answers first without knowing the facts.
        let round = Relation::ALL.len() * (self.distractors + 1);
        if self.facts_per_count % round != 0 {
            return Err(Error::invalid(
                "--facts-per-count",
                format!(
                    "{} leaves the answers unbalanced: with {} relations of {} answers each \
                     (--distractors {} + 1) give a multiple of {round}, so that every answer is \
                     read equally often at every count",
                    self.facts_per_count,
                    Relation::ALL.len(),
                    self.distractors + 1,
                    self.distractors
                ),
            ));
        }
        Ok(())
    }
}

/// One fictional fact.
#[derive(Debug, Clone, PartialEq)]
pub struct Fact {
    /// `fact-0001`, …
    pub id: String,
    /// Its relation.
    pub relation: Relation,
    /// The invented entity, as written mid-sentence.
    pub entity: String,
    /// The answer.
    pub answer: String,
    /// Distractors: other answers of the same relation.
    pub distractors: Vec<String>,
    /// Training sentences inserted (0: a control).
    pub count: u32,
}

impl Fact {
    /// The fact's k training sentences, phrasings rotated.
    pub fn sentences(&self) -> Vec<String> {
        let t = self.relation.training();
        (0..self.count as usize)
            .map(|i| fill(t[i % TRAIN_PHRASINGS], &self.entity, &self.answer))
            .collect()
    }

    /// Its probes: the held-out phrasings, then the `seen` one (the first training phrasing cut
    /// before the answer).
    pub fn probes(&self) -> Vec<Probe> {
        let seen = self.relation.training()[0]
            .split("{a}")
            .next()
            .unwrap_or_default()
            .trim_end()
            .to_string();
        let held = self.relation.held_out();
        held.iter()
            .map(|t| (*t, true))
            .chain(std::iter::once((seen.as_str(), false)))
            .enumerate()
            .map(|(k, (t, held_out))| Probe {
                fact_id: self.id.clone(),
                relation: self.relation,
                entity: self.entity.clone(),
                count: self.count,
                probe: k as u32,
                held_out,
                prompt: fill(t, &self.entity, ""),
                answer: self.answer.clone(),
                distractors: self.distractors.clone(),
            })
            .collect()
    }
}

/// The invented towns of a seed: [`TOWNS`] distinct two-syllable words with a town suffix.
pub fn towns(seed: u64) -> Vec<String> {
    let mut rng = ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(seed, b"facts-towns"));
    let per = PseudoWords::syllables().pow(2);
    let space = per * PseudoWords::TOWN_SUFFIXES.len() as u64;
    PseudoWords::distinct(TOWNS as u64, space, &mut rng)
        .into_iter()
        .map(|i| {
            let suffix = PseudoWords::TOWN_SUFFIXES[(i / per) as usize];
            format!("{}{suffix}", PseudoWords::word(i % per, 2))
        })
        .collect()
}

/// The closed answer sets of a seed with `size` answers each, per relation in
/// [`Relation::ALL`]'s order: a seeded choice from the invented towns, [`PROFESSIONS`] and
/// [`YEARS`].
pub fn answer_sets(seed: u64, size: usize) -> Vec<Vec<String>> {
    let mut rng = ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(seed, b"facts-answers"));
    let lists: [Vec<String>; 3] = [
        towns(seed),
        PROFESSIONS.iter().map(|s| s.to_string()).collect(),
        YEARS.iter().map(|s| s.to_string()).collect(),
    ];
    lists
        .into_iter()
        .map(|mut l| {
            l.shuffle(&mut rng);
            l.truncate(size);
            l
        })
        .collect()
}

/// Generate the facts: `facts_per_count` per count in the order of `counts`, then the controls;
/// within each group fact j has relation j mod 3 and a distinct family name. Answers are
/// *balanced*: each relation's set has `distractors + 1` answers, and within a group each
/// relation's facts take them in turn from a seeded permutation (a fresh one after every full
/// round), so every answer is read equally often in training ([`FactsOptions::check`] asks for
/// facts per count that are a multiple of 3 × the set's size). A model that
/// learnt only which answers a relation has, not which entity has which, then ranks a fact's
/// answer first at chance, 1 / (1 + distractors), as it does before training. A fact's
/// distractors are the rest of its relation's set.
pub fn generate(opts: &FactsOptions) -> Result<Vec<Fact>> {
    opts.check()?;
    let mut rng = ChaCha8Rng::seed_from_u64(crate::seed::stable_hash(opts.seed, b"facts"));
    let n = opts.total();
    let mut families = PseudoWords::distinct(n, PseudoWords::space(), &mut rng).into_iter();
    let sets = answer_sets(opts.seed, opts.distractors + 1);
    let groups = opts
        .counts
        .iter()
        .map(|&c| (c, opts.facts_per_count))
        .chain(std::iter::once((0, opts.controls)));
    let mut facts = Vec::with_capacity(n as usize);
    for (count, size) in groups {
        let mut rounds: Vec<Vec<String>> = vec![Vec::new(); Relation::ALL.len()];
        for j in 0..size {
            let r = j % Relation::ALL.len();
            if rounds[r].is_empty() {
                rounds[r] = sets[r].clone();
                rounds[r].shuffle(&mut rng);
            }
            let answer = rounds[r].pop().unwrap_or_default();
            let relation = Relation::ALL[r];
            let given = PseudoWords::word(rng.random_range(0..PseudoWords::syllables().pow(2)), 2);
            let mut others: Vec<String> =
                sets[r].iter().filter(|a| **a != answer).cloned().collect();
            others.shuffle(&mut rng);
            let family = families.next().unwrap_or_default();
            facts.push(Fact {
                id: format!("fact-{:04}", facts.len() + 1),
                relation,
                entity: relation.entity(&given, &PseudoWords::word(family, 3)),
                answer,
                distractors: others,
                count,
            });
        }
    }
    Ok(facts)
}

/// One probe of a fact (a row of the probe table).
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// The fact.
    pub fact_id: String,
    /// Its relation.
    pub relation: Relation,
    /// Its entity.
    pub entity: String,
    /// Its count (0: a control).
    pub count: u32,
    /// The probe's number within the fact.
    pub probe: u32,
    /// Whether the phrasing is held out from training (acquisition counts only these).
    pub held_out: bool,
    /// The prompt; the answer follows after a space.
    pub prompt: String,
    /// The answer.
    pub answer: String,
    /// The distractors.
    pub distractors: Vec<String>,
}

impl Probe {
    /// The candidates: the answer first, then the distractors.
    pub fn candidates(&self) -> Vec<&str> {
        std::iter::once(self.answer.as_str())
            .chain(self.distractors.iter().map(String::as_str))
            .collect()
    }
}

/// The probe table (`<out stem>.probes.parquet`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProbeSet {
    /// Its rows, fact by fact.
    pub probes: Vec<Probe>,
}

impl ProbeSet {
    /// The probes of `facts`.
    pub fn of(facts: &[Fact]) -> ProbeSet {
        ProbeSet {
            probes: facts.iter().flat_map(Fact::probes).collect(),
        }
    }

    /// The table: fact_id, relation, entity, count, probe, held_out, prompt, answer,
    /// distractors (`|`-separated: a list column of strings is not readable everywhere).
    pub fn to_dataframe(&self) -> Result<DataFrame> {
        let p = &self.probes;
        let strs = |f: &dyn Fn(&Probe) -> &str| p.iter().map(f).collect::<Vec<_>>();
        let lists: Vec<String> = p.iter().map(|x| x.distractors.join(SEPARATOR)).collect();
        let cols = vec![
            Column::new("fact_id".into(), strs(&|x| &x.fact_id)),
            Column::new("relation".into(), strs(&|x| x.relation.name())),
            Column::new("entity".into(), strs(&|x| &x.entity)),
            Column::new(
                "count".into(),
                p.iter().map(|x| x.count).collect::<Vec<_>>(),
            ),
            Column::new(
                "probe".into(),
                p.iter().map(|x| x.probe).collect::<Vec<_>>(),
            ),
            Column::new(
                "held_out".into(),
                p.iter().map(|x| x.held_out).collect::<Vec<_>>(),
            ),
            Column::new("prompt".into(), strs(&|x| &x.prompt)),
            Column::new("answer".into(), strs(&|x| &x.answer)),
            Column::new("distractors".into(), lists),
        ];
        DataFrame::new(p.len(), cols).map_err(|e| Error::table("building the probe table", e))
    }

    /// Write the table (Parquet), atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        io::write_parquet(&mut self.to_dataframe()?, path)
    }

    /// Read a probe table written by `corpus facts`; a missing column, an unknown relation or
    /// a probe without distractors is bad input naming the file, column and row.
    pub fn read(path: &Path) -> Result<ProbeSet> {
        let df = io::read_parquet(path)?;
        let s = |name: &str| io::column_str(&df, name, path);
        let f = |name: &str| io::column_f64(&df, name, path);
        let (ids, rel, ent, prompt, answer) = (
            s("fact_id")?,
            s("relation")?,
            s("entity")?,
            s("prompt")?,
            s("answer")?,
        );
        let (count, probe) = (f("count")?, f("probe")?);
        let held = bools(&df, "held_out", path)?;
        let lists: Vec<Vec<String>> = s("distractors")?
            .iter()
            .map(|l| {
                l.split(SEPARATOR)
                    .filter(|d| !d.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .collect();
        let mut probes = Vec::with_capacity(ids.len());
        for i in 0..ids.len() {
            let relation = Relation::parse(&rel[i]).ok_or_else(|| {
                Error::in_file(
                    path,
                    format!("column `relation`: row {} has {:?}", i + 1, rel[i]),
                )
            })?;
            if lists[i].is_empty() {
                return Err(Error::in_file(
                    path,
                    format!("column `distractors`: row {} has none", i + 1),
                ));
            }
            let mut seen: HashSet<&str> = HashSet::from([answer[i].as_str()]);
            if let Some(d) = lists[i].iter().find(|d| !seen.insert(d.as_str())) {
                return Err(Error::in_file(
                    path,
                    format!(
                        "column `distractors`: row {} repeats {d:?} (a distractor must differ \
                         from the answer and from the other distractors)",
                        i + 1
                    ),
                ));
            }
            for (name, v) in [("count", count[i]), ("probe", probe[i])] {
                if !(v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= f64::from(u32::MAX)) {
                    return Err(Error::in_file(
                        path,
                        format!(
                            "column `{name}`: row {} has {v}, not a whole number ≥ 0",
                            i + 1
                        ),
                    ));
                }
            }
            probes.push(Probe {
                fact_id: ids[i].clone(),
                relation,
                entity: ent[i].clone(),
                count: count[i] as u32,
                probe: probe[i] as u32,
                held_out: held[i],
                prompt: prompt[i].clone(),
                answer: answer[i].clone(),
                distractors: lists[i].clone(),
            });
        }
        if probes.is_empty() {
            return Err(Error::in_file(path, "the probe table has no rows"));
        }
        Ok(ProbeSet { probes })
    }

    /// Distinct facts in table order: (fact_id, count).
    pub fn facts(&self) -> Vec<(String, u32)> {
        let mut seen = HashSet::new();
        self.probes
            .iter()
            .filter(|p| seen.insert(p.fact_id.as_str()))
            .map(|p| (p.fact_id.clone(), p.count))
            .collect()
    }
}

/// A boolean column (nulls false); missing or not boolean is bad input naming it.
fn bools(df: &DataFrame, name: &str, path: &Path) -> Result<Vec<bool>> {
    let col = df
        .column(name)
        .map_err(|_| Error::in_file(path, format!("missing column `{name}`")))?;
    Ok(col
        .bool()
        .map_err(|_| Error::in_file(path, format!("column `{name}` is not boolean")))?
        .iter()
        .map(|v| v.unwrap_or(false))
        .collect())
}

/// The host corpus with the facts inserted: the host's validation rows, its training rows (all,
/// or a seeded subset of `host_samples`), then every fact's training sentences as training rows
/// of domain [`FACTS_DOMAIN`] (ids `fact-0001#1`, …), each tagged with its fact and count.
/// Token counts of the new rows are 0 until [`tokenizer::count_tokens`] fills them.
pub fn insert(
    host: &Corpus,
    facts: &[Fact],
    opts: &FactsOptions,
    host_path: &Path,
) -> Result<Corpus> {
    let train = host.pick(SplitChoice::Train, usize::MAX);
    if train.is_empty() {
        return Err(Error::in_file(
            host_path,
            "the host corpus has no training split: the facts are inserted into its training \
             samples",
        ));
    }
    let keep: HashSet<usize> = match opts.host_samples {
        // A random draw for every seed (`pick_seeded` spaces evenly for seed 0).
        Some(n) => host
            .pick_seeded(
                SplitChoice::Train,
                n,
                crate::seed::stable_hash(opts.seed, b"facts-host") | 1,
            )
            .into_iter()
            .collect(),
        None => train.into_iter().collect(),
    };
    let mut samples: Vec<Sample> = host
        .samples
        .iter()
        .enumerate()
        .filter(|(i, s)| s.split == Split::Validation || keep.contains(i))
        .map(|(_, s)| s.clone())
        .collect();
    let mut ids: HashSet<String> = samples.iter().map(|s| s.id.clone()).collect();
    for f in facts {
        for (k, text) in f.sentences().into_iter().enumerate() {
            let id = format!("{}#{}", f.id, k + 1);
            if !ids.insert(id.clone()) {
                return Err(Error::in_file(
                    host_path,
                    format!("the host corpus already has a sample with id {id:?}"),
                ));
            }
            samples.push(Sample {
                id,
                text,
                domain: FACTS_DOMAIN.into(),
                split: Split::Train,
                n_tokens: 0,
                long_tail: None,
                neglected: None,
                noise: None,
                fact: Some(FactRef {
                    id: f.id.clone(),
                    count: f.count,
                }),
            });
        }
    }
    Ok(Corpus { samples })
}

/// What [`write_facts`] wrote.
#[derive(Debug, Clone)]
pub struct FactsCorpus {
    /// The corpus table.
    pub corpus: PathBuf,
    /// Its tokenizer (the host's, copied).
    pub tokenizer: PathBuf,
    /// The probe table.
    pub probes: PathBuf,
    /// The facts.
    pub facts: Vec<Fact>,
    /// Training rows: host and facts.
    pub host_train: usize,
    /// Fact sentences inserted.
    pub fact_rows: usize,
    /// Validation rows (the host's).
    pub validation: usize,
}

/// The default probe table of corpus `out`: `<out stem>.probes.parquet` beside it.
pub fn default_probes_path(out: &Path) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "corpus".into());
    out.with_file_name(format!("{stem}.probes.parquet"))
}

/// `tailscope corpus facts`: read the host corpus (its tokenizer beside it), generate and insert
/// the facts, and write the corpus table, the host's tokenizer beside it and the probe table.
pub fn write_facts(
    host_path: &Path,
    out: &Path,
    probes: Option<&Path>,
    opts: &FactsOptions,
) -> Result<FactsCorpus> {
    opts.check()?;
    let host = Corpus::read(host_path)?;
    let tok_path = tokenizer::default_path(host_path);
    let facts = generate(opts)?;
    let mut corpus = insert(&host, &facts, opts, host_path)?;
    let tok = tokenizer::load(&tok_path)?;
    let fresh: Vec<usize> = (0..corpus.len())
        .filter(|&i| corpus.samples[i].fact.is_some())
        .collect();
    let texts: Vec<&str> = fresh
        .iter()
        .map(|&i| corpus.samples[i].text.as_str())
        .collect();
    for (&i, n) in fresh.iter().zip(tokenizer::count_tokens(&tok, &texts)?) {
        corpus.samples[i].n_tokens = n;
    }
    let fresh = fresh.len();
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tok_out = tokenizer::default_path(out);
    if tok_out != tok_path {
        tokenizer::save(&tok, &tok_out)?;
    }
    let probes_path = probes.map_or_else(|| default_probes_path(out), Path::to_path_buf);
    ProbeSet::of(&facts).write(&probes_path)?;
    corpus.write(out)?;
    let train = corpus
        .samples
        .iter()
        .filter(|s| s.split == Split::Train)
        .count();
    Ok(FactsCorpus {
        corpus: out.to_path_buf(),
        tokenizer: tok_out,
        probes: probes_path,
        host_train: train - fresh,
        fact_rows: fresh,
        validation: corpus.len() - train,
        facts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> FactsOptions {
        FactsOptions {
            counts: vec![1, 2, 16],
            facts_per_count: 6,
            controls: 3,
            distractors: 1,
            seed: 5,
            ..FactsOptions::default()
        }
    }

    #[test]
    fn facts_are_seeded_distinct_and_closed_set() {
        let a = generate(&opts()).unwrap();
        assert_eq!(a, generate(&opts()).unwrap(), "same seed, same facts");
        let other = generate(&FactsOptions { seed: 6, ..opts() }).unwrap();
        assert_ne!(a, other);
        assert_eq!(a.len(), 21);
        let entities: HashSet<&str> = a.iter().map(|f| f.entity.as_str()).collect();
        assert_eq!(entities.len(), 21, "entities are distinct");
        let counts: Vec<u32> = a.iter().map(|f| f.count).collect();
        let want: Vec<u32> = [1, 2, 16, 0]
            .iter()
            .flat_map(|&c| std::iter::repeat_n(c, if c == 0 { 3 } else { 6 }))
            .collect();
        assert_eq!(counts, want);
        let sets = answer_sets(5, 2);
        for f in &a {
            assert_eq!(f.distractors.len(), 1);
            assert!(!f.distractors.contains(&f.answer));
            let set = &sets[Relation::ALL.iter().position(|r| *r == f.relation).unwrap()];
            assert!(set.contains(&f.answer) && f.distractors.iter().all(|d| set.contains(d)));
            let s = f.sentences();
            assert_eq!(s.len(), f.count as usize);
            assert!(s.iter().all(|x| x.contains(&f.answer)));
        }
    }

    /// Every answer of a relation is read equally often (the sizes `check` allows).
    #[test]
    fn answers_are_balanced_over_training_reads() {
        let o = FactsOptions {
            counts: vec![1, 3, 16],
            facts_per_count: 15,
            controls: 3,
            distractors: 4,
            seed: 9,
            ..FactsOptions::default()
        };
        let facts = generate(&o).unwrap();
        for r in Relation::ALL {
            let mut reads: std::collections::BTreeMap<&str, u32> = Default::default();
            for f in facts.iter().filter(|f| f.relation == r) {
                *reads.entry(f.answer.as_str()).or_default() += f.count;
            }
            assert_eq!(reads.len(), 5, "{r:?}: every answer is used");
            let v: HashSet<u32> = reads.values().copied().collect();
            assert_eq!(v, HashSet::from([20]), "{r:?}: {reads:?}");
        }
    }

    #[test]
    fn probes_are_held_out_and_end_before_the_answer() {
        for f in generate(&opts()).unwrap() {
            let probes = f.probes();
            assert_eq!(probes.len(), HELD_OUT_PROBES + 1);
            let training = Fact {
                count: 16,
                ..f.clone()
            }
            .sentences();
            for p in &probes {
                assert!(!p.prompt.contains(&f.answer), "{}", p.prompt);
                assert!(p.prompt.contains(&f.entity) || p.prompt.contains(&capitalise(&f.entity)));
                let text = format!("{} {}", p.prompt, p.answer);
                let in_training = training.iter().any(|t| t.starts_with(&text));
                assert_eq!(in_training, !p.held_out, "{text}");
                if !p.held_out {
                    continue;
                }
                // A held-out probe shares no training context with the answer: it does not
                // hold the text before the answer in any training sentence, and its last two
                // words are not the last two before the answer there.
                let low = p.prompt.to_lowercase();
                let tail = |s: &str| -> Vec<String> {
                    let w: Vec<String> = s.split_whitespace().map(str::to_lowercase).collect();
                    w[w.len().saturating_sub(2)..].to_vec()
                };
                for t in &training {
                    let before = t
                        .split(f.answer.as_str())
                        .next()
                        .unwrap_or_default()
                        .trim_end();
                    assert!(
                        !low.contains(&before.to_lowercase()),
                        "{low:?} holds {before:?}"
                    );
                    assert_ne!(tail(&p.prompt), tail(before), "{low:?} against {t:?}");
                }
            }
        }
    }

    /// Sizes that would read some answers more often than others are refused.
    #[test]
    fn unbalanced_sizes_are_refused() {
        let e = FactsOptions {
            facts_per_count: 8,
            distractors: 3,
            ..opts()
        }
        .check()
        .unwrap_err();
        assert!(e.to_string().contains("multiple of 12"), "{e}");
    }

    #[test]
    fn refusals_name_the_option() {
        let zero = FactsOptions {
            counts: vec![1, 0],
            ..opts()
        };
        let e = zero.check().unwrap_err();
        assert!(
            e.is_bad_input() && e.to_string().contains("--counts"),
            "{e}"
        );
        let huge = FactsOptions {
            facts_per_count: 200_000,
            ..opts()
        };
        let e = huge.check().unwrap_err();
        assert!(e.to_string().contains("pseudo-word"), "{e}");
        let space = PseudoWords::space() as usize;
        let fits = FactsOptions {
            counts: vec![1],
            facts_per_count: space - space % 6,
            controls: space % 6,
            ..opts()
        };
        assert!(fits.check().is_ok(), "exactly the space is allowed");
        let d = FactsOptions {
            distractors: 10,
            ..opts()
        };
        assert!(d.check().unwrap_err().to_string().contains("--distractors"));
    }

    #[test]
    fn pseudo_words_enumerate_the_space() {
        let s = PseudoWords::syllables();
        assert_eq!(PseudoWords::space(), s * s * s);
        let words: HashSet<String> = (0..s * s).map(|i| PseudoWords::word(i, 2)).collect();
        assert_eq!(words.len() as u64, s * s, "the numbering is one to one");
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut d = PseudoWords::distinct(50, 50, &mut rng);
        d.sort_unstable();
        assert_eq!(d, (0..50).collect::<Vec<_>>());
        assert_eq!(towns(3).iter().collect::<HashSet<_>>().len(), TOWNS);
    }

    #[test]
    fn probe_table_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.parquet");
        let set = ProbeSet::of(&generate(&opts()).unwrap());
        set.write(&p).unwrap();
        assert_eq!(ProbeSet::read(&p).unwrap(), set);
        assert_eq!(set.facts().len(), 21);
        // A distractor equal to the answer, and a negative count, are refused naming the row.
        let mut bad = set.clone();
        bad.probes[2].distractors[0] = bad.probes[2].answer.clone();
        bad.write(&p).unwrap();
        let e = ProbeSet::read(&p).unwrap_err().to_string();
        assert!(e.contains("`distractors`: row 3 repeats"), "{e}");
        let mut df = set.to_dataframe().unwrap();
        let mut counts: Vec<i64> = set.probes.iter().map(|p| i64::from(p.count)).collect();
        counts[4] = -1;
        df.with_column(Column::new("count".into(), counts)).unwrap();
        crate::io::write_parquet(&mut df, &p).unwrap();
        let e = ProbeSet::read(&p).unwrap_err().to_string();
        assert!(e.contains("`count`: row 5 has -1"), "{e}");
    }
}

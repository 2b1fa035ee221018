//! The synthetic long-tail corpus (`corpus synth`): one common domain and K rare domains, each
//! with its own vocabulary and sentence templates, at configurable shares, deterministic for a
//! seed, with exact ground-truth labels (`long_tail` = the sample is from a rare domain). It is the
//! controlled test bed for flag precision/recall and cluster recovery.
//!
//! Rare-domain sentences mix their own content words with the common function words, as real
//! domain text does; words within each list are drawn with Zipf weights 1/(rank+1), so every
//! domain has its own frequent and rare words.
//!
//! With `contrasts`, rarity and neglect differ: two more domains are added, `glossary` (rare:
//! a quarter of `rare_share`, but only [`GLOSSARY_SENTENCES`] distinct sentences of its own
//! pseudo-words, repeated, so a model learns it) and `chatter` ([`CHATTER_SHARE`] of the corpus:
//! 8–12 common words drawn uniformly in random order, frequent vocabulary that no model can
//! predict). Every sample then carries a three-way ground truth beside `long_tail` (= rare
//! domain or glossary): `neglected` = a rare domain (learnable, and not yet learned: varied text
//! a model sees too rarely), `noise` = chatter (not learnable: no model can predict it), and
//! neither for common text or the glossary (learned, though the glossary is rare).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::corpus::RawRecord;
use crate::error::{Error, Result};

/// Name of the common domain.
pub const COMMON_DOMAIN: &str = "general";

/// Generation settings.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Number of samples in total.
    pub samples: usize,
    /// Number of rare domains (K).
    pub rare_domains: usize,
    /// Share of all rare domains together; split among them with weights 1/(k+1).
    pub rare_share: f64,
    /// Explicit share of each rare domain (overrides `rare_share`); length must be K.
    pub shares: Option<Vec<f64>>,
    /// Seed of the generator.
    pub seed: u64,
    /// Add the two contrast domains that separate rarity from neglect, and the `neglected`
    /// ground truth (module docs).
    pub contrasts: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            samples: 20_000,
            rare_domains: 4,
            rare_share: 0.06,
            shares: None,
            seed: 0,
            contrasts: false,
        }
    }
}

/// The rare domain a model learns (`--contrasts`): a few sentences repeated.
pub const GLOSSARY_DOMAIN: &str = "glossary";
/// The frequent-vocabulary domain a model cannot learn (`--contrasts`): common words in random
/// order.
pub const CHATTER_DOMAIN: &str = "chatter";
/// Share of the chatter domain.
pub const CHATTER_SHARE: f64 = 0.08;
/// Distinct sentences of the glossary domain.
pub const GLOSSARY_SENTENCES: usize = 4;

struct Lexicon {
    name: String,
    nouns: Vec<String>,
    verbs: Vec<String>,
    adjs: Vec<String>,
}

const DETS: [&str; 6] = ["the", "a", "this", "that", "every", "some"];
const PREPS: [&str; 8] = ["of", "in", "on", "with", "for", "near", "after", "under"];
const COMMON_NOUNS: [&str; 40] = [
    "people", "time", "year", "day", "man", "woman", "child", "house", "city", "world", "school",
    "family", "friend", "car", "road", "book", "game", "team", "water", "food", "money", "job",
    "street", "garden", "park", "dog", "cat", "morning", "night", "week", "music", "film", "shop",
    "town", "river", "door", "table", "room", "phone", "story",
];
const COMMON_VERBS: [&str; 24] = [
    "saw", "made", "took", "found", "gave", "told", "liked", "wanted", "used", "left", "kept",
    "brought", "bought", "met", "called", "opened", "helped", "moved", "played", "watched",
    "visited", "cleaned", "painted", "carried",
];
const COMMON_ADJS: [&str; 20] = [
    "good", "new", "old", "big", "small", "long", "great", "little", "young", "nice", "happy",
    "busy", "quiet", "warm", "cold", "bright", "short", "early", "late", "friendly",
];

/// A hand-written rare domain: name, nouns, verbs, adjectives.
type RareVocab = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    &'static [&'static str],
);

/// Hand-written vocabularies of the first rare domains (legal and medical first, as in the paper).
const RARE: [RareVocab; 4] = [
    (
        "legal",
        &[
            "plaintiff",
            "defendant",
            "tort",
            "statute",
            "injunction",
            "appellant",
            "subpoena",
            "affidavit",
            "easement",
            "estoppel",
            "indemnity",
            "lien",
            "covenant",
            "tribunal",
            "jurisdiction",
            "precedent",
            "remand",
            "writ",
            "bailment",
            "escrow",
        ],
        &[
            "litigated",
            "adjudicated",
            "enjoined",
            "subpoenaed",
            "indemnified",
            "remanded",
            "stipulated",
            "rescinded",
            "deposed",
            "appealed",
        ],
        &[
            "contractual",
            "statutory",
            "fiduciary",
            "appellate",
            "punitive",
            "equitable",
            "tortious",
            "binding",
        ],
    ),
    (
        "medical",
        &[
            "patient",
            "lesion",
            "biopsy",
            "stenosis",
            "embolism",
            "carcinoma",
            "catheter",
            "dosage",
            "ventricle",
            "edema",
            "sepsis",
            "infarction",
            "antibody",
            "platelet",
            "neuropathy",
            "fibrosis",
            "aneurysm",
            "suture",
            "tumor",
            "vaccine",
        ],
        &[
            "diagnosed",
            "excised",
            "intubated",
            "sutured",
            "biopsied",
            "administered",
            "auscultated",
            "palpated",
            "resected",
            "infused",
        ],
        &[
            "acute",
            "chronic",
            "benign",
            "malignant",
            "renal",
            "cardiac",
            "hepatic",
            "systemic",
        ],
    ),
    (
        "astronomy",
        &[
            "nebula",
            "quasar",
            "pulsar",
            "galaxy",
            "perihelion",
            "ecliptic",
            "redshift",
            "exoplanet",
            "magnetar",
            "parallax",
            "photosphere",
            "corona",
            "meteoroid",
            "aphelion",
            "supernova",
            "asteroid",
            "comet",
            "zenith",
            "azimuth",
            "spectrum",
        ],
        &[
            "orbited",
            "eclipsed",
            "occulted",
            "accreted",
            "transited",
            "collapsed",
            "ionized",
            "precessed",
            "observed",
            "refracted",
        ],
        &[
            "stellar",
            "galactic",
            "orbital",
            "celestial",
            "interstellar",
            "lunar",
            "solar",
            "binary",
        ],
    ),
    (
        "chemistry",
        &[
            "reagent",
            "catalyst",
            "isomer",
            "titration",
            "precipitate",
            "solvent",
            "polymer",
            "enzyme",
            "aldehyde",
            "ketone",
            "ester",
            "oxidant",
            "ligand",
            "buffer",
            "alkane",
            "chromatography",
            "molarity",
            "distillate",
            "anion",
            "cation",
        ],
        &[
            "titrated",
            "distilled",
            "oxidized",
            "reduced",
            "catalyzed",
            "precipitated",
            "synthesized",
            "neutralized",
            "hydrolyzed",
            "crystallized",
        ],
        &[
            "aqueous", "organic", "volatile", "covalent", "ionic", "acidic", "alkaline", "molar",
        ],
    ),
];

/// Common templates: D determiner, A adjective, N noun, V verb, P preposition.
const COMMON_TEMPLATES: [&str; 5] = [
    "D A N V D N P D N",
    "D N V P D A N",
    "D N and D N V D A N",
    "P D N , D N V D N",
    "D A N V D A N",
];
/// Rare templates: J rare adjective, R rare noun, Q rare verb, mixed with common words.
const RARE_TEMPLATES: [&str; 5] = [
    "D J R Q D R P D R",
    "D R Q D J R",
    "P D R , D R Q D J N",
    "D R and D J R Q D R",
    "D N Q D R P D J R",
];

/// Pseudo-words for rare domains beyond the hand-written ones: syllables unique to the domain.
fn pseudo_lexicon(k: usize, rng: &mut ChaCha8Rng) -> Lexicon {
    const ONSETS: [&str; 12] = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t"];
    const VOWELS: [&str; 5] = ["a", "e", "i", "o", "u"];
    let tag = format!("{}{}", ONSETS[k % 12], VOWELS[(k / 12) % 5]);
    let mut word = |suffix: &str| {
        let a = ONSETS[rng.random_range(0..12)];
        let b = VOWELS[rng.random_range(0..5)];
        let c = ONSETS[rng.random_range(0..12)];
        format!("{tag}{a}{b}{c}{suffix}")
    };
    Lexicon {
        name: format!("rare{}", k + 1),
        nouns: (0..20).map(|_| word("on")).collect(),
        verbs: (0..10).map(|_| word("ed")).collect(),
        adjs: (0..8).map(|_| word("ic")).collect(),
    }
}

fn to_vec(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

/// Draw from `list` with Zipf weights 1/(rank+1).
fn zipf<'a, T: AsRef<str>>(list: &'a [T], rng: &mut ChaCha8Rng) -> &'a str {
    let total: f64 = (1..=list.len()).map(|r| 1.0 / r as f64).sum();
    let mut u = rng.random::<f64>() * total;
    for (i, w) in list.iter().enumerate() {
        u -= 1.0 / (i + 1) as f64;
        if u <= 0.0 {
            return w.as_ref();
        }
    }
    list[list.len() - 1].as_ref()
}

fn sentence(
    template: &str,
    common: &Lexicon,
    rare: Option<&Lexicon>,
    rng: &mut ChaCha8Rng,
) -> String {
    let mut words: Vec<String> = Vec::new();
    for slot in template.split(' ') {
        let w = match (slot, rare) {
            ("D", _) => zipf(&DETS, rng).to_string(),
            ("P", _) => zipf(&PREPS, rng).to_string(),
            ("N", _) => zipf(&common.nouns, rng).to_string(),
            ("V", _) => zipf(&common.verbs, rng).to_string(),
            ("A", _) => zipf(&common.adjs, rng).to_string(),
            ("R", Some(r)) => zipf(&r.nouns, rng).to_string(),
            ("Q", Some(r)) => zipf(&r.verbs, rng).to_string(),
            ("J", Some(r)) => zipf(&r.adjs, rng).to_string(),
            (",", _) => {
                if let Some(last) = words.last_mut() {
                    last.push(',');
                }
                continue;
            }
            (other, _) => other.to_string(),
        };
        words.push(w);
    }
    as_sentence(&words)
}

/// `words` joined, capitalised, with a full stop.
fn as_sentence<T: AsRef<str>>(words: &[T]) -> String {
    let mut s = words
        .iter()
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(first) = s.get(0..1) {
        s = first.to_uppercase() + &s[1..];
    }
    s.push('.');
    s
}

/// The words of the chatter domain: every common word list together.
fn chatter_vocabulary() -> Vec<&'static str> {
    COMMON_NOUNS
        .iter()
        .chain(&COMMON_VERBS)
        .chain(&COMMON_ADJS)
        .chain(&DETS)
        .chain(&PREPS)
        .copied()
        .collect()
}

/// The per-domain shares: the common domain first, then the K rare domains.
pub fn domain_shares(opts: &SynthOptions) -> Result<Vec<f64>> {
    let k = opts.rare_domains;
    let rare: Vec<f64> = match &opts.shares {
        Some(s) => {
            if s.len() != k {
                return Err(Error::invalid(
                    "--shares",
                    format!("{} values for {k} rare domains", s.len()),
                ));
            }
            if s.iter().any(|&x| !(x > 0.0 && x < 1.0)) {
                return Err(Error::invalid("--shares", "each share must lie in (0, 1)"));
            }
            s.clone()
        }
        None => {
            if !(opts.rare_share > 0.0 && opts.rare_share < 1.0) {
                return Err(Error::invalid(
                    "--rare-share",
                    format!("must lie in (0, 1), got {}", opts.rare_share),
                ));
            }
            let w: Vec<f64> = (0..k).map(|i| 1.0 / (i + 1) as f64).collect();
            let sum: f64 = w.iter().sum();
            w.iter().map(|x| opts.rare_share * x / sum).collect()
        }
    };
    let rare_total: f64 = rare.iter().sum();
    if rare_total >= 1.0 {
        return Err(Error::invalid(
            "--shares",
            "rare shares must sum to less than 1",
        ));
    }
    let mut out = vec![1.0 - rare_total];
    out.extend(rare);
    Ok(out)
}

/// Generate the raw records (ids `synth:<n>`), shuffled, deterministic for the seed.
pub fn generate(opts: &SynthOptions) -> Result<Vec<RawRecord>> {
    if opts.rare_domains == 0 {
        return Err(Error::invalid("--rare-domains", "must be at least 1"));
    }
    if opts.samples == 0 {
        return Err(Error::invalid("--samples", "must be at least 1"));
    }
    let shares = domain_shares(opts)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let common = Lexicon {
        name: COMMON_DOMAIN.into(),
        nouns: to_vec(&COMMON_NOUNS),
        verbs: to_vec(&COMMON_VERBS),
        adjs: to_vec(&COMMON_ADJS),
    };
    let rare: Vec<Lexicon> = (0..opts.rare_domains)
        .map(|k| match RARE.get(k) {
            Some((name, n, v, a)) => Lexicon {
                name: name.to_string(),
                nouns: to_vec(n),
                verbs: to_vec(v),
                adjs: to_vec(a),
            },
            None => pseudo_lexicon(k, &mut rng),
        })
        .collect();
    // Exact counts per rare domain (at least one sample each); the common domain takes the rest.
    let mut counts: Vec<usize> = shares[1..]
        .iter()
        .map(|s| ((s * opts.samples as f64).round() as usize).max(1))
        .collect();
    if opts.contrasts {
        let rare_total: f64 = shares[1..].iter().sum();
        counts.push(((rare_total / 4.0 * opts.samples as f64).round() as usize).max(1));
        counts.push(((CHATTER_SHARE * opts.samples as f64).round() as usize).max(1));
    }
    let rare_sum: usize = counts.iter().sum();
    if rare_sum >= opts.samples {
        return Err(Error::invalid(
            "--samples",
            format!(
                "{} samples leave no room for the common domain",
                opts.samples
            ),
        ));
    }
    counts.insert(0, opts.samples - rare_sum);
    // Drawn only with contrasts, so corpora without them stay as they were for a seed.
    let glossary: Vec<String> = if opts.contrasts {
        let lex = pseudo_lexicon(opts.rare_domains + 7, &mut rng);
        (0..GLOSSARY_SENTENCES)
            .map(|i| {
                sentence(
                    RARE_TEMPLATES[i % RARE_TEMPLATES.len()],
                    &common,
                    Some(&lex),
                    &mut rng,
                )
            })
            .collect()
    } else {
        Vec::new()
    };
    let chatter_words = chatter_vocabulary();
    let mut plan: Vec<usize> = counts
        .iter()
        .enumerate()
        .flat_map(|(d, &c)| std::iter::repeat_n(d, c))
        .collect();
    plan.shuffle(&mut rng);
    let out = plan
        .into_iter()
        .enumerate()
        .map(|(i, d)| {
            let k = opts.rare_domains;
            // (text, domain, long_tail, neglected); noise is the chatter domain.
            let (text, domain, long_tail, neglected) = if d == 0 {
                let t = COMMON_TEMPLATES[rng.random_range(0..COMMON_TEMPLATES.len())];
                (
                    sentence(t, &common, None, &mut rng),
                    common.name.clone(),
                    false,
                    false,
                )
            } else if d <= k {
                let lex = &rare[d - 1];
                let t = RARE_TEMPLATES[rng.random_range(0..RARE_TEMPLATES.len())];
                let text = sentence(t, &common, Some(lex), &mut rng);
                (text, lex.name.clone(), true, true)
            } else if d == k + 1 {
                let text = glossary[rng.random_range(0..glossary.len())].clone();
                (text, GLOSSARY_DOMAIN.to_string(), true, false)
            } else {
                let n = rng.random_range(8..=12);
                let words: Vec<&str> = (0..n)
                    .map(|_| chatter_words[rng.random_range(0..chatter_words.len())])
                    .collect();
                (
                    as_sentence(&words),
                    CHATTER_DOMAIN.to_string(),
                    false,
                    false,
                )
            };
            let noise = d == k + 2;
            RawRecord {
                origin: format!("synth:{}", i + 1),
                id: None,
                text,
                domain,
                long_tail: Some(long_tail),
                neglected: opts.contrasts.then_some(neglected),
                noise: opts.contrasts.then_some(noise),
            }
        })
        .collect();
    Ok(out)
}

/// `corpus synth` as a library call: the corpus of `opts` with a BPE tokenizer of `vocab_size`
/// trained on it, written to `corpus` and `tokenizer.json` beside it.
pub fn write_corpus(
    opts: &SynthOptions,
    vocab_size: usize,
    corpus: &std::path::Path,
    progress: &dyn crate::progress::Progress,
) -> Result<()> {
    let records = generate(opts)?;
    let build = crate::corpus::BuildOptions {
        seed: opts.seed,
        ..Default::default()
    };
    let (mut c, _) = crate::corpus::build("corpus synth", records, &build)?;
    if let Some(dir) = corpus.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tok_out = crate::corpus::tokenizer::default_path(corpus);
    crate::corpus::tokenizer::finish_corpus(
        &mut c,
        &crate::corpus::tokenizer::TokenizerSource::Train {
            vocab_size,
            min_frequency: crate::corpus::tokenizer::DEFAULT_MIN_FREQUENCY,
        },
        corpus,
        &tok_out,
        progress,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_with_exact_shares_and_labels() {
        let opts = SynthOptions {
            samples: 1000,
            seed: 3,
            ..SynthOptions::default()
        };
        let a = generate(&opts).unwrap();
        let b = generate(&opts).unwrap();
        assert_eq!(
            a.iter().map(|r| &r.text).collect::<Vec<_>>(),
            b.iter().map(|r| &r.text).collect::<Vec<_>>()
        );
        let c = generate(&SynthOptions {
            seed: 4,
            ..opts.clone()
        })
        .unwrap();
        assert_ne!(a[0].text, c[0].text);
        let rare = a.iter().filter(|r| r.long_tail == Some(true)).count();
        // 6% of 1000 split 1 : 1/2 : 1/3 : 1/4 → 28.8, 14.4, 9.6, 7.2 → 29 + 14 + 10 + 7.
        assert_eq!(rare, 60);
        assert_eq!(a.iter().filter(|r| r.domain == "legal").count(), 29);
        assert_eq!(a.iter().filter(|r| r.domain == "chemistry").count(), 7);
        for r in &a {
            assert_eq!(r.long_tail, Some(r.domain != COMMON_DOMAIN));
        }
        // Rare vocabulary stays in its domain.
        assert!(a
            .iter()
            .filter(|r| r.text.contains("plaintiff"))
            .all(|r| r.domain == "legal"));
    }

    /// Contrasts: a learnable rare domain of 4 repeated sentences, a frequent-vocabulary chatter
    /// domain, `neglected` = rare domains only, `noise` = chatter only; the rest of the corpus is
    /// what it is without them only in the common domain's count.
    #[test]
    fn contrasts_separate_rarity_from_neglect() {
        let plain = SynthOptions {
            samples: 2000,
            seed: 5,
            ..SynthOptions::default()
        };
        let with = SynthOptions {
            contrasts: true,
            ..plain.clone()
        };
        let a = generate(&with).unwrap();
        let count = |d: &str| a.iter().filter(|r| r.domain == d).count();
        // 6% / 4 of 2000 = 30 glossary, 8% = 160 chatter, rare domains as without contrasts.
        assert_eq!((count(GLOSSARY_DOMAIN), count(CHATTER_DOMAIN)), (30, 160));
        assert_eq!(count("legal"), 58);
        let distinct: std::collections::HashSet<&str> = a
            .iter()
            .filter(|r| r.domain == GLOSSARY_DOMAIN)
            .map(|r| r.text.as_str())
            .collect();
        assert!(distinct.len() <= GLOSSARY_SENTENCES && distinct.len() > 1);
        for r in &a {
            let d = r.domain.as_str();
            let rare = d != COMMON_DOMAIN && d != CHATTER_DOMAIN;
            assert_eq!(r.long_tail, Some(rare), "{d}");
            let neglected = rare && d != GLOSSARY_DOMAIN;
            assert_eq!(r.neglected, Some(neglected), "{d}");
            assert_eq!(r.noise, Some(d == CHATTER_DOMAIN), "{d}");
            assert!(!(r.noise == Some(true) && r.neglected == Some(true)), "{d}");
        }
        let common_words: std::collections::HashSet<&str> =
            chatter_vocabulary().into_iter().collect();
        for r in a.iter().filter(|r| r.domain == CHATTER_DOMAIN) {
            let words: Vec<String> = r
                .text
                .trim_end_matches('.')
                .split(' ')
                .map(|w| w.to_lowercase())
                .collect();
            assert!((8..=12).contains(&words.len()));
            assert!(
                words.iter().all(|w| common_words.contains(w.as_str())),
                "{}",
                r.text
            );
        }
        // Without contrasts: no neglected or noise truth.
        assert!(generate(&plain)
            .unwrap()
            .iter()
            .all(|r| r.neglected.is_none() && r.noise.is_none()));
    }

    #[test]
    fn pseudo_domains_beyond_the_handwritten_ones() {
        let opts = SynthOptions {
            samples: 2000,
            rare_domains: 6,
            shares: Some(vec![0.01; 6]),
            ..SynthOptions::default()
        };
        let recs = generate(&opts).unwrap();
        assert_eq!(recs.iter().filter(|r| r.domain == "rare6").count(), 20);
    }

    #[test]
    fn bad_shares_are_rejected() {
        let bad = SynthOptions {
            shares: Some(vec![0.5, 0.6, 0.1, 0.1]),
            ..SynthOptions::default()
        };
        assert!(generate(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("--shares"));
        let bad = SynthOptions {
            rare_share: 1.5,
            ..SynthOptions::default()
        };
        assert!(generate(&bad)
            .unwrap_err()
            .to_string()
            .starts_with("--rare-share"));
    }
}

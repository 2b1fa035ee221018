//! Tokenizers through the `tokenizers` crate: train a byte-level BPE (GPT-2 style: no unknown
//! token, every byte representable) on a corpus, or load an existing `tokenizer.json`; count and
//! encode texts in parallel.

use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Error, Result};
use crate::io;

/// Special tokens every trained tokenizer carries, in id order (ids 0..5): end of text (GPT),
/// padding, the masked-LM mask, and BERT's classification and separator tokens.
pub const SPECIAL_TOKENS: [&str; 5] = ["<|endoftext|>", "<pad>", "<mask>", "<cls>", "<sep>"];

/// Train a byte-level BPE tokenizer with `vocab_size` entries (special tokens and the 256 byte
/// symbols included) on `texts`. Pairs seen fewer than `min_frequency` times are not merged.
/// Deterministic: the same texts give the same tokenizer.
pub fn train_bpe(texts: &[String], vocab_size: usize, min_frequency: u64) -> Result<Tokenizer> {
    let floor = 256 + SPECIAL_TOKENS.len();
    if vocab_size <= floor {
        return Err(Error::invalid(
            "--vocab-size",
            format!(
                "must exceed {floor} (256 byte symbols + {} special tokens)",
                SPECIAL_TOKENS.len()
            ),
        ));
    }
    let byte_level = ByteLevel::new(false, true, true);
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(min_frequency)
        .show_progress(false)
        .special_tokens(
            SPECIAL_TOKENS
                .iter()
                .map(|t| AddedToken::from(*t, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(byte_level))
        .with_decoder(Some(byte_level))
        .with_post_processor(Some(byte_level));
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| Error::Tokenizer(format!("BPE training failed: {e}")))?;
    Ok(tok)
}

/// Where `corpus ingest` puts the tokenizer of a corpus table: `tokenizer.json` beside it.
pub fn default_path(corpus: &Path) -> std::path::PathBuf {
    match corpus.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join("tokenizer.json"),
        _ => std::path::PathBuf::from("tokenizer.json"),
    }
}

/// Load a `tokenizer.json`; an unreadable or malformed file is bad input naming it.
pub fn load(path: &Path) -> Result<Tokenizer> {
    if !path.exists() {
        return Err(Error::in_file(path, "tokenizer file not found"));
    }
    Tokenizer::from_file(path)
        .map_err(|e| Error::in_file(path, format!("not a valid tokenizer.json ({e})")))
}

/// Save as `tokenizer.json`, atomically.
pub fn save(tok: &Tokenizer, path: &Path) -> Result<()> {
    let json = tok
        .to_string(true)
        .map_err(|e| Error::Tokenizer(format!("serialising: {e}")))?;
    io::write_atomic(path, json.as_bytes())
}

/// Texts encoded per call; between chunks `on_progress` is told how many texts are done.
const CHUNK: usize = 8192;

/// Token ids of each text (no special tokens added), encoded in parallel, reporting progress.
pub fn encode_with_progress(
    tok: &Tokenizer,
    texts: &[&str],
    on_progress: &dyn Fn(usize),
) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(CHUNK) {
        let encodings = tok
            .encode_batch_fast(chunk.to_vec(), false)
            .map_err(|e| Error::Tokenizer(format!("encoding: {e}")))?;
        out.extend(encodings.into_iter().map(|e| e.get_ids().to_vec()));
        on_progress(out.len());
    }
    Ok(out)
}

/// Token ids of each text (no special tokens added), encoded in parallel.
pub fn encode_all(tok: &Tokenizer, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
    encode_with_progress(tok, texts, &|_| {})
}

/// Number of tokens of each text.
pub fn count_tokens(tok: &Tokenizer, texts: &[&str]) -> Result<Vec<u32>> {
    Ok(encode_all(tok, texts)?
        .into_iter()
        .map(|ids| ids.len() as u32)
        .collect())
}

/// Vocabulary of the byte-level BPE trained for a corpus by default.
pub const DEFAULT_VOCAB_SIZE: usize = 8192;
/// Minimum pair frequency of that BPE by default.
pub const DEFAULT_MIN_FREQUENCY: u64 = 2;

/// Where a corpus's tokenizer comes from.
#[derive(Debug, Clone)]
pub enum TokenizerSource {
    /// A `tokenizer.json` to load.
    Load(std::path::PathBuf),
    /// A byte-level BPE to train on the training split.
    Train {
        /// Vocabulary size.
        vocab_size: usize,
        /// Minimum pair frequency.
        min_frequency: u64,
    },
}

/// Tokenize a freshly built corpus (see [`tokenize_corpus`]) and write it to `out` and its
/// tokenizer to `tokenizer_out` (unless that is the file it was loaded from), atomically.
pub fn finish_corpus(
    corpus: &mut super::Corpus,
    source: &TokenizerSource,
    out: &Path,
    tokenizer_out: &Path,
    progress: &dyn crate::progress::Progress,
) -> Result<Tokenizer> {
    let tok = tokenize_corpus(corpus, source, progress)?;
    let loaded_from = match source {
        TokenizerSource::Load(p) => Some(p.as_path()),
        TokenizerSource::Train { .. } => None,
    };
    if loaded_from != Some(tokenizer_out) {
        save(&tok, tokenizer_out)?;
    }
    corpus.write(out)?;
    Ok(tok)
}

/// The tokenizer of a freshly built corpus (loaded, or trained on its training split), with every
/// sample's `n_tokens` filled in.
pub fn tokenize_corpus(
    corpus: &mut super::Corpus,
    source: &TokenizerSource,
    progress: &dyn crate::progress::Progress,
) -> Result<Tokenizer> {
    let tok = match source {
        TokenizerSource::Load(path) => load(path)?,
        TokenizerSource::Train {
            vocab_size,
            min_frequency,
        } => {
            progress.start(
                &format!("training a {vocab_size}-token byte-level BPE"),
                None,
            );
            let train_texts: Vec<String> = corpus
                .samples
                .iter()
                .filter(|s| s.split == super::Split::Train)
                .map(|s| s.text.clone())
                .collect();
            let tok = train_bpe(&train_texts, *vocab_size, *min_frequency)?;
            progress.finish();
            tok
        }
    };
    let texts: Vec<&str> = corpus.samples.iter().map(|s| s.text.as_str()).collect();
    progress.start("tokenizing", Some(texts.len() as u64));
    let ids = encode_with_progress(&tok, &texts, &|done| progress.advance_to(done as u64))?;
    progress.finish();
    for (s, v) in corpus.samples.iter_mut().zip(&ids) {
        s.n_tokens = v.len() as u32;
    }
    Ok(tok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts() -> Vec<String> {
        let base = [
            "the cat sat on the mat",
            "the dog sat on the log",
            "a plaintiff filed the motion",
            "Größe und Übermut — naïve café",
        ];
        (0..50).map(|i| base[i % base.len()].to_string()).collect()
    }

    #[test]
    fn round_trip_is_lossless_and_training_deterministic() {
        let t = texts();
        let a = train_bpe(&t, 300, 2).unwrap();
        let b = train_bpe(&t, 300, 2).unwrap();
        assert_eq!(a.to_string(false).unwrap(), b.to_string(false).unwrap());
        for text in [
            "the cat sat on the mat",
            "Größe und Übermut — naïve café",
            "unseen ✓ text 42",
        ] {
            let ids = encode_all(&a, &[text]).unwrap().remove(0);
            assert!(!ids.is_empty());
            assert_eq!(a.decode(&ids, false).unwrap(), text);
        }
        // Merges were learned: a frequent word is shorter in tokens than in bytes.
        let n = count_tokens(&a, &["the cat sat on the mat"]).unwrap()[0];
        assert!(n < "the cat sat on the mat".len() as u32, "{n} tokens");
        for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(a.token_to_id(s), Some(i as u32));
        }
    }

    #[test]
    fn save_load_round_trip_and_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.json");
        let a = train_bpe(&texts(), 300, 2).unwrap();
        save(&a, &p).unwrap();
        let b = load(&p).unwrap();
        let s = ["a plaintiff sat on the log"];
        assert_eq!(encode_all(&a, &s).unwrap(), encode_all(&b, &s).unwrap());
        std::fs::write(&p, "{not json").unwrap();
        let err = load(&p).unwrap_err();
        assert!(
            err.is_bad_input() && err.to_string().contains("tokenizer.json"),
            "{err}"
        );
    }

    #[test]
    fn too_small_vocab_is_rejected() {
        let err = train_bpe(&texts(), 100, 2).unwrap_err();
        assert!(err.to_string().starts_with("--vocab-size"), "{err}");
    }
}

//! The settings that produced a resumable output, recorded as `manifest.json` in its folder.
//!
//! Training runs (checkpoints) and streamed kernels (shards and tiles) resume from what an
//! earlier, interrupted run wrote. That is only right when the earlier run had the same settings:
//! a checkpoint of another learning rate or shards of another model would be mixed in silently.
//! A resumable step therefore writes its manifest before its first output, and a rerun compares
//! its own settings with the recorded ones key by key; the first difference is bad input naming
//! the key, both values and what starts afresh. Inputs too large to record (weights, token ids)
//! are recorded as fingerprints.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::hash::Hasher;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Error, Result};

/// The manifest's file name inside an output folder.
pub const FILE: &str = "manifest.json";

/// Settings as key → value, compared exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// What wrote the folder (`train`, `ntk --tile`).
    pub kind: String,
    /// Each setting, formatted.
    pub settings: BTreeMap<String, String>,
}

impl Manifest {
    /// An empty manifest of outputs written by `kind`.
    pub fn new(kind: &str) -> Self {
        Manifest {
            kind: kind.to_string(),
            settings: BTreeMap::new(),
        }
    }

    /// Record `key = value`.
    pub fn set(&mut self, key: impl Into<String>, value: impl Display) -> &mut Self {
        self.settings.insert(key.into(), value.to_string());
        self
    }

    /// Record every field of a serialisable struct as `prefix.field` (its JSON value).
    pub fn set_fields<T: Serialize>(&mut self, prefix: &str, value: &T) -> Result<&mut Self> {
        let json = serde_json::to_value(value)
            .map_err(|e| Error::invalid(prefix.to_string(), e.to_string()))?;
        match json {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    self.set(format!("{prefix}.{k}"), v);
                }
            }
            other => {
                self.set(prefix, other);
            }
        }
        Ok(self)
    }

    /// The manifest in `dir`, if there is one.
    pub fn read(dir: &Path) -> Result<Option<Manifest>> {
        let path = dir.join(FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::at_line(&path, e.line(), format!("bad manifest: {e}")))
    }

    /// Write the manifest into `dir` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| Error::invalid("manifest", e.to_string()))?;
        crate::io::write_atomic(dir.join(FILE), json.as_bytes())
    }

    /// The first key whose value differs from `earlier`'s: (key, earlier value, this value).
    pub fn first_difference(&self, earlier: &Manifest) -> Option<(String, String, String)> {
        let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".to_string());
        if self.kind != earlier.kind {
            return Some(("kind".into(), earlier.kind.clone(), self.kind.clone()));
        }
        let keys: std::collections::BTreeSet<&String> = self
            .settings
            .keys()
            .chain(earlier.settings.keys())
            .collect();
        keys.into_iter()
            .find(|k| self.settings.get(*k) != earlier.settings.get(*k))
            .map(|k| {
                (
                    k.clone(),
                    show(earlier.settings.get(k)),
                    show(self.settings.get(k)),
                )
            })
    }

    /// Before resuming from the outputs in `dir`: refuse when they were written under other
    /// settings, or when outputs exist (`has_outputs`) without any manifest to say how they were
    /// made; otherwise record these settings. `afresh` says how to start afresh instead.
    pub fn check_resume(&self, dir: &Path, has_outputs: bool, afresh: &str) -> Result<()> {
        let path = dir.join(FILE);
        match Manifest::read(dir)? {
            Some(earlier) => {
                if let Some((key, was, now)) = self.first_difference(&earlier) {
                    return Err(Error::in_file(
                        path,
                        format!(
                            "the outputs here were written with {key} = {}, this run has {key} = {}; \
                             {afresh}",
                            clip(&was),
                            clip(&now)
                        ),
                    ));
                }
                Ok(())
            }
            None if has_outputs => Err(Error::in_file(
                path,
                format!("outputs exist here but no manifest says what made them; {afresh}"),
            )),
            None => self.write(dir),
        }
    }
}

/// Long values (fingerprints aside, JSON of nested settings) shortened for a one-line message.
fn clip(v: &str) -> String {
    const MAX: usize = 120;
    match v.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &v[..i]),
        None => v.to_string(),
    }
}

/// A 64-bit fingerprint (hex) of tensors: names, shapes, kinds and every value's bytes.
/// FxHash: not cryptographic, but stable for a given build and fast over 100M+ values; it
/// guards against accidents (another model, other weights), not against forgery.
pub fn fingerprint_tensors(named: &[(String, Tensor)]) -> String {
    let mut h = rustc_hash::FxHasher::default();
    for (name, t) in named {
        h.write(name.as_bytes());
        for s in t.size() {
            h.write_i64(s);
        }
        h.write(format!("{:?}", t.kind()).as_bytes());
        h.write(&crate::io::tensor_bytes(t));
    }
    format!("{:016x}", h.finish())
}

/// A fingerprint (hex) of token sequences (order and content).
pub fn fingerprint_ids(seqs: &[&[u32]]) -> String {
    let mut h = rustc_hash::FxHasher::default();
    h.write_usize(seqs.len());
    for s in seqs {
        h.write_usize(s.len());
        for &t in *s {
            h.write_u32(t);
        }
    }
    format!("{:016x}", h.finish())
}

/// A file's identity without reading it whole: its path and size.
pub fn file_identity(path: &Path) -> String {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    format!("{} ({len} bytes)", path.display())
}

/// Remove `paths` under `dir` (files or folders) and the manifest: what `--fresh` does.
pub fn clear(dir: &Path, paths: &[&str]) -> Result<()> {
    let all: Vec<PathBuf> = paths
        .iter()
        .chain(std::iter::once(&FILE))
        .map(|p| dir.join(p))
        .collect();
    for p in all {
        let r = if p.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&p, e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_differing_key_is_named_with_both_values() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Manifest::new("train");
        a.set("train.lr", 0.001).set("seed", 0);
        a.check_resume(dir.path(), false, "start afresh").unwrap();
        // Same settings: resumes.
        a.check_resume(dir.path(), true, "start afresh").unwrap();
        let mut b = a.clone();
        b.set("train.lr", 0.002);
        let err = b
            .check_resume(dir.path(), true, "drop --resume")
            .unwrap_err();
        let msg = err.to_string();
        assert!(err.is_bad_input());
        assert!(
            msg.contains("train.lr = 0.001") && msg.contains("train.lr = 0.002"),
            "{msg}"
        );
        assert!(msg.contains("drop --resume") && msg.contains(FILE), "{msg}");
        // A key only one side has counts as a difference.
        let mut c = a.clone();
        c.set("extra", 1);
        assert_eq!(
            c.first_difference(&a),
            Some(("extra".into(), "(unset)".into(), "1".into()))
        );
    }

    #[test]
    fn outputs_without_a_manifest_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Manifest::new("ntk --tile")
            .check_resume(dir.path(), true, "pass --fresh")
            .unwrap_err();
        assert!(err.to_string().contains("no manifest"), "{err}");
    }

    #[test]
    fn fingerprints_change_with_any_value() {
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let b = Tensor::from_slice(&[1.0f32, 2.0, 3.000_001]);
        let fa = fingerprint_tensors(&[("w".into(), a.shallow_clone())]);
        assert_eq!(fa, fingerprint_tensors(&[("w".into(), a.copy())]));
        assert_ne!(fa, fingerprint_tensors(&[("w".into(), b)]));
        assert_ne!(fa, fingerprint_tensors(&[("v".into(), a)]));
        assert_ne!(
            fingerprint_ids(&[&[1, 2], &[3]]),
            fingerprint_ids(&[&[1], &[2, 3]])
        );
    }
}

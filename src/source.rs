//! Models from any source, in one place above [`crate::model`] (which knows no file format),
//! [`crate::checkpoint`] (tailscope's own folders) and [`crate::import`] (other tools' files):
//! tell the format of a path, load the model it holds, and find the tokenizer that goes with it.

use std::path::{Path, PathBuf};

use tch::{nn, Device};

use crate::checkpoint;
use crate::error::{Error, Result};
use crate::import::{gguf, hf, torchscript, Imported};
use crate::model::Model;

/// Where a model lives: a tailscope checkpoint folder, a Hugging Face folder or a GGUF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A tailscope checkpoint folder.
    Tailscope,
    /// A Hugging Face folder.
    HuggingFace,
    /// A GGUF file.
    Gguf,
    /// A TorchScript module with its sidecar config.
    TorchScript,
}

/// Tell the format of `path` from what is there.
pub fn detect(path: &Path) -> Format {
    if path.is_file() {
        return if torchscript::is_torchscript(path) {
            Format::TorchScript
        } else {
            Format::Gguf
        };
    }
    let cfg = std::fs::read_to_string(path.join(checkpoint::CONFIG_FILE)).unwrap_or_default();
    match serde_json::from_str::<serde_json::Value>(&cfg) {
        Ok(v) if v.get("model_type").is_some() => Format::HuggingFace,
        _ => Format::Tailscope,
    }
}

/// Read a model of another tool (HF folder or GGUF file) without building it.
pub fn read_imported(path: &Path) -> Result<Imported> {
    if !path.exists() {
        return Err(Error::in_file(path, "not found"));
    }
    match detect(path) {
        Format::HuggingFace => hf::read_dir(path),
        Format::Gguf => gguf::read_file(path),
        Format::Tailscope => Err(Error::in_file(
            path,
            "a tailscope checkpoint, not a model to import",
        )),
        Format::TorchScript => Err(Error::in_file(
            path,
            "a TorchScript module runs as it is (--model); it cannot be converted",
        )),
    }
}

/// Load the model at `path` onto `device`, whatever its source: a tailscope checkpoint folder, a
/// Hugging Face folder or a GGUF file (imported on the fly), or a TorchScript module (wrapped).
pub fn load_model(path: &Path, device: Device) -> Result<(nn::VarStore, Model)> {
    match detect(path) {
        Format::Tailscope => checkpoint::load(path, device),
        Format::TorchScript => {
            let (cfg, script) = torchscript::load(path, device)?;
            Ok((nn::VarStore::new(device), Model::from_script(cfg, script)))
        }
        Format::HuggingFace | Format::Gguf => read_imported(path)?.into_model(device),
    }
}

/// The tokenizer that belongs to a model: `tokenizer.json` in its folder, or built from a GGUF
/// file's metadata; `None` when the model brings none.
pub fn model_tokenizer(path: &Path) -> Result<Option<tokenizers::Tokenizer>> {
    let json = match detect(path) {
        Format::Gguf => gguf::read_tokenizer_json(path)?,
        Format::TorchScript => {
            let p = path.with_file_name("tokenizer.json");
            if !p.exists() {
                return Ok(None);
            }
            std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?
        }
        _ => {
            let p = path.join("tokenizer.json");
            if !p.exists() {
                return Ok(None);
            }
            std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?
        }
    };
    let t: tokenizers::Tokenizer = json
        .parse()
        .map_err(|e| Error::in_file(path, format!("tokenizer: {e}")))?;
    Ok(Some(t))
}

/// The tokenizer to encode a corpus for `model` with: `explicit` when given, else the model's
/// own (an imported model's `tokenizer.json` or GGUF metadata), else the corpus's (`corpus ingest`
/// wrote it beside the corpus table). Its vocabulary must fit the model's.
pub fn tokenizer_for(
    explicit: Option<&Path>,
    model_path: &Path,
    model: &Model,
    corpus: &Path,
) -> Result<tokenizers::Tokenizer> {
    let (tok, from): (tokenizers::Tokenizer, PathBuf) = match explicit {
        Some(p) => (crate::corpus::tokenizer::load(p)?, p.to_path_buf()),
        None => match model_tokenizer(model_path)? {
            Some(t) => (t, model_path.to_path_buf()),
            None => {
                let p = crate::corpus::tokenizer::default_path(corpus);
                (crate::corpus::tokenizer::load(&p)?, p)
            }
        },
    };
    let n = tok.get_vocab_size(true) as i64;
    if n > model.cfg.vocab_size {
        return Err(Error::in_file(
            &from,
            format!(
                "tokenizer of {n} entries, the model's vocabulary has {}",
                model.cfg.vocab_size
            ),
        ));
    }
    Ok(tok)
}

/// Run `texts` through the model at `path` on the CPU, each alone (no padding), with the model's
/// own tokenizer: `ids.K` (1, T) and `logits.K` (1, T, vocab) per text, to compare an import with
/// the library it came from.
pub fn check_logits(path: &Path, texts: &[String]) -> Result<Vec<(String, tch::Tensor)>> {
    let (_, model) = load_model(path, Device::Cpu)?;
    let tok = tokenizer_for(None, path, &model, path)?;
    let mut named = Vec::new();
    for (k, text) in texts.iter().enumerate() {
        let enc = tok
            .encode(text.as_str(), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        let ids = tch::Tensor::from_slice(&ids).view([1, -1]);
        let mask = ids.ones_like().to_kind(tch::Kind::Bool);
        let logits = tch::no_grad(|| model.forward_t(&ids, &mask, false, false))?.logits;
        named.push((format!("ids.{k}"), ids));
        named.push((format!("logits.{k}"), logits));
    }
    Ok(named)
}

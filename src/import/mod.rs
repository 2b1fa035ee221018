//! Pretrained models from other tools: Hugging Face folders ([`hf`]: GPT-2, Llama, BERT) and GGUF
//! files ([`gguf`]: Llama-family, dequantised from Q8_0, Q4_0, Q4_1, F16, F32). An import yields
//! a [`ModelConfig`] and tensors under tailscope's names, so every command (`eval`, `ntk`,
//! `analyze`, ...) takes such a model with `--model`, directly or after `tailscope import`
//! saved it as a tailscope checkpoint. The tokenizer comes along (`tokenizer.json`, or rebuilt
//! from the GGUF metadata).

pub mod gguf;
pub mod gguf_format;
pub mod hf;
pub mod safetensors;
pub mod torchscript;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{nn, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::{checkpoint, Model, ModelConfig};
use safetensors::RawTensor;

/// A model read from another tool's files.
pub struct Imported {
    pub cfg: ModelConfig,
    /// (tailscope name, values); `RawTensor::name` keeps the name in the source file for errors.
    pub tensors: Vec<(String, RawTensor)>,
    /// A Hugging Face `tokenizer.json` (copied, or built from GGUF metadata).
    pub tokenizer_json: Option<String>,
    pub source: PathBuf,
    /// The weights file, named in errors.
    pub weights: PathBuf,
}

/// Where a model lives: a tailscope checkpoint folder, a Hugging Face folder or a GGUF file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Tailscope,
    HuggingFace,
    Gguf,
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

/// Read an imported model (HF folder or GGUF file).
pub fn read(path: &Path) -> Result<Imported> {
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

impl Imported {
    /// Build the model and copy the weights in (every tensor checked against the config).
    pub fn into_model(self, device: Device) -> Result<(nn::VarStore, Model)> {
        let vs = nn::VarStore::new(device);
        let model = Model::new(&vs.root(), &self.cfg)
            .map_err(|e| Error::in_file(&self.source, e.to_string()))?;
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (name, r) in self.tensors {
            let shape: Vec<i64> = r.shape.iter().map(|&x| x as i64).collect();
            map.insert(name, Tensor::from_slice(&r.data).view(shape.as_slice()));
        }
        checkpoint::load_into(&vs, &map, &self.weights)?;
        Ok((vs, model))
    }

    /// Save as a tailscope checkpoint folder (config.json, model.safetensors, tokenizer.json).
    pub fn save(self, out: &Path) -> Result<ModelConfig> {
        let cfg = self.cfg.clone();
        let tok = self.tokenizer_json.clone();
        let (vs, _) = self.into_model(Device::Cpu)?;
        checkpoint::save_model(out, &cfg, &vs)?;
        if let Some(t) = tok {
            crate::io::write_atomic(out.join("tokenizer.json"), t.as_bytes())?;
        }
        Ok(cfg)
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

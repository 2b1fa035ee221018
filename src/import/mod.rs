//! Pretrained models from other tools: Hugging Face folders ([`hf`]: GPT-2, Llama, BERT) and GGUF
//! files ([`gguf`]: Llama-family, dequantised from Q8_0, Q4_0, Q4_1, F16, F32). An import yields
//! a [`ModelConfig`] and tensors under tailscope's names, so every command (`eval`, `ntk`,
//! `analyze`, ...) takes such a model with `--model`, directly or after `tailscope import`
//! saved it as a tailscope checkpoint. Telling the formats apart and loading a model from any of
//! them is [`crate::source`]'s job, which sits above this module and [`crate::model`]. The tokenizer comes along (`tokenizer.json`, or rebuilt
//! from the GGUF metadata).

pub mod gguf;
pub mod gguf_format;
pub mod hf;
pub mod safetensors;
pub mod torchscript;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{nn, Device, Tensor};

use crate::checkpoint;
use crate::error::{Error, Result};
use crate::model::{Model, ModelConfig};
use safetensors::RawTensor;

/// A model read from another tool's files.
pub struct Imported {
    /// The model config.
    pub cfg: ModelConfig,
    /// (tailscope name, values); `RawTensor::name` keeps the name in the source file for errors.
    pub tensors: Vec<(String, RawTensor)>,
    /// A Hugging Face `tokenizer.json` (copied, or built from GGUF metadata).
    pub tokenizer_json: Option<String>,
    /// Where it came from.
    pub source: PathBuf,
    /// The weights file, named in errors.
    pub weights: PathBuf,
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

//! tailscope's own checkpoint format: `config.json` (the [`ModelConfig`]) beside
//! `model.safetensors`. Loading checks
//! every tensor's presence and shape before copying anything, and names the tensor, the file and
//! both shapes on a mismatch; a truncated or corrupt file is bad input naming the file.

use std::collections::HashMap;
use std::path::Path;

use tch::{nn, Device, Tensor};

use crate::error::{Error, Result};
use crate::io::{self, write_tensors};
use crate::model::{named_variables, Model, ModelConfig};

/// The model config of a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";
/// The weights of a checkpoint folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Refuse a weight holding NaN or Inf: it makes every loss, gradient and kernel downstream
/// non-finite, so it is named here, where the tensor and its file are known.
pub fn check_finite(path: &Path, name: &str, t: &Tensor) -> Result<()> {
    let bad = t
        .isfinite()
        .logical_not()
        .sum(tch::Kind::Int64)
        .int64_value(&[]);
    if bad > 0 {
        return Err(Error::in_file(
            path,
            format!(
                "tensor `{name}` holds {bad} non-finite value{} (NaN or Inf): the file is corrupt \
                 or the run that wrote it diverged",
                if bad == 1 { "" } else { "s" }
            ),
        ));
    }
    Ok(())
}

/// Copy `tensors` into the store's variables; every variable must be present with its shape, and
/// no extra tensor may be left over (a config/weights mismatch); none may hold NaN or Inf.
pub fn load_into(vs: &nn::VarStore, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let vars = named_variables(vs);
    for (name, var) in &vars {
        let src = tensors.get(name).ok_or_else(|| {
            Error::in_file(
                path,
                format!("missing tensor `{name}` (the config expects it)"),
            )
        })?;
        if src.size() != var.size() {
            return Err(Error::in_file(
                path,
                format!(
                    "tensor `{name}` has shape {:?}, the config expects {:?}",
                    src.size(),
                    var.size()
                ),
            ));
        }
        check_finite(path, name, src)?;
    }
    if let Some(extra) = tensors
        .keys()
        .filter(|k| !vars.iter().any(|(n, _)| n == *k))
        .min()
    {
        return Err(Error::in_file(
            path,
            format!("unexpected tensor `{extra}`: the weights do not match the config"),
        ));
    }
    tch::no_grad(|| {
        for (name, var) in &vars {
            let mut var = var.shallow_clone();
            var.copy_(&tensors[name]);
        }
    });
    Ok(())
}

/// Save `config.json` and `model.safetensors` into `dir`.
pub fn save_model(dir: &Path, cfg: &ModelConfig, vs: &nn::VarStore) -> Result<()> {
    let json = serde_json::to_string_pretty(cfg)
        .map_err(|e| Error::invalid("model config", e.to_string()))?;
    io::write_atomic(dir.join(CONFIG_FILE), json.as_bytes())?;
    write_tensors(&named_variables(vs), &dir.join(WEIGHTS_FILE))
}

/// Read `config.json`; unknown or malformed fields are bad input naming the file and field.
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let cfg: ModelConfig = serde_json::from_str(&text)
        .map_err(|e| Error::at_line(path, e.line(), format!("bad model config: {e}")))?;
    cfg.validate()
        .map_err(|e| Error::in_file(path, e.to_string()))?;
    Ok(cfg)
}

/// Load a tailscope checkpoint folder (written by [`save_model`]) onto `device`. Other sources
/// (Hugging Face folders, GGUF and TorchScript files) load through [`crate::source::load_model`].
pub fn load(dir: &Path, device: Device) -> Result<(nn::VarStore, Model)> {
    let cfg = read_config(&dir.join(CONFIG_FILE))?;
    let vs = nn::VarStore::new(device);
    let model = Model::new(&vs.root(), &cfg)?;
    let path = dir.join(WEIGHTS_FILE);
    load_into(&vs, &crate::io::read_tensors(&path)?, &path)?;
    Ok((vs, model))
}

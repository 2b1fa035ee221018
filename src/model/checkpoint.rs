//! Weights on disk: `config.json` (the [`ModelConfig`]) beside `model.safetensors`. Loading checks
//! every tensor's presence and shape before copying anything, and names the tensor, the file and
//! both shapes on a mismatch; a truncated or corrupt file is bad input naming the file.

use std::collections::HashMap;
use std::path::Path;

use tch::{nn, Device, Tensor};

use super::{Model, ModelConfig};
use crate::error::{Error, Result};
use crate::io;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Read every tensor of a safetensors file; a malformed file is bad input naming it.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::in_file(path, "file not found"));
    }
    let list = Tensor::read_safetensors(path)
        .map_err(|e| Error::in_file(path, format!("not a readable safetensors file ({e})")))?;
    Ok(list.into_iter().collect())
}

/// Write named tensors as safetensors, atomically.
pub fn write_tensors(named: &[(String, Tensor)], path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // tch picks the format from the extension, so the temporary name keeps `.safetensors`.
    let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), file_name(path)));
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let result = Tensor::write_safetensors(&refs, &tmp).map_err(Error::from);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The variables of a store, sorted by name (the order of files and of gradient keys).
pub fn named_variables(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Copy `tensors` into the store's variables; every variable must be present with its shape, and
/// no extra tensor may be left over (a config/weights mismatch).
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

/// Load a model saved by [`save_model`] onto `device`.
/// Hugging Face folders and GGUF files are imported on the fly, TorchScript modules wrapped
/// (see `import`).
pub fn load_model(dir: &Path, device: Device) -> Result<(nn::VarStore, Model)> {
    match crate::import::detect(dir) {
        crate::import::Format::Tailscope => {}
        crate::import::Format::TorchScript => {
            let (cfg, script) = crate::import::torchscript::load(dir, device)?;
            return Ok((nn::VarStore::new(device), Model::from_script(cfg, script)));
        }
        _ => return crate::import::read(dir)?.into_model(device),
    }
    let cfg = ModelConfig::read(&dir.join(CONFIG_FILE))?;
    let vs = nn::VarStore::new(device);
    let model = Model::new(&vs.root(), &cfg)?;
    let path = dir.join(WEIGHTS_FILE);
    load_into(&vs, &read_tensors(&path)?, &path)?;
    Ok((vs, model))
}

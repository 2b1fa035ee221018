//! TorchScript language models: any `torch.jit` module that follows this calling convention
//!
//! ```text
//! forward(input_ids: Tensor[int64] (batch, seq), attention_mask: Tensor[int64] (batch, seq))
//!     -> logits: Tensor[float] (batch, seq, vocab)
//! ```
//!
//! (1 marks real tokens, 0 padding; right padding), saved with `torch.jit.save` as `NAME.pt`,
//! with a sidecar `NAME.json` that says how to build batches for it:
//! `{"arch": "gpt" | "bert", "vocab_size": V, "max_len": T, "special": {...}}` (`special` as in
//! tailscope's model config; causal models need `bos` and `pad`). Its parameters are the
//! module's `named_parameters()` (dotted names, e.g. `layers.0.weight`); gradients are captured
//! with the exact method (one backward pass per sample): the per-layer tape of the batched
//! methods needs tailscope's own layers.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{CModule, Device};

use crate::error::{Error, Result};
use crate::model::{Arch, ModelConfig, Script, SpecialTokens};

/// The sidecar config of a TorchScript model.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Sidecar {
    arch: Arch,
    vocab_size: i64,
    max_len: i64,
    #[serde(default)]
    special: SpecialTokens,
}

/// Whether `path` is a TorchScript archive (a zip file) rather than a GGUF file.
pub fn is_torchscript(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"PK\x03\x04"
}

/// The sidecar's path: `NAME.json` beside `NAME.pt`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// Load a TorchScript model and its sidecar config onto `device`.
pub fn load(path: &Path, device: Device) -> Result<(ModelConfig, Script)> {
    let sp = sidecar_path(path);
    let text = std::fs::read_to_string(&sp).map_err(|e| {
        Error::in_file(
            &sp,
            format!(
                "the sidecar config of a TorchScript model ({e}); see `tailscope import --help`"
            ),
        )
    })?;
    let sc: Sidecar = serde_json::from_str(&text)
        .map_err(|e| Error::at_line(&sp, e.line(), format!("bad sidecar config: {e}")))?;
    let cfg = ModelConfig {
        arch: sc.arch,
        vocab_size: sc.vocab_size,
        max_len: sc.max_len,
        special: sc.special,
        tie_embeddings: false,
        ..ModelConfig::default()
    };
    cfg.validate()
        .map_err(|e| Error::in_file(&sp, e.to_string()))?;
    let mut module = CModule::load_on_device(path, device)
        .map_err(|e| Error::in_file(path, format!("not a loadable TorchScript module ({e})")))?;
    module.set_eval();
    let params = module
        .named_parameters()
        .map_err(|e| Error::in_file(path, format!("cannot list the module's parameters ({e})")))?;
    for (name, t) in &params {
        crate::checkpoint::check_finite(path, name, t)?;
    }
    Ok((
        cfg,
        Script {
            module,
            path: path.to_path_buf(),
        },
    ))
}

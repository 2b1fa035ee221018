//! A model whose layers are a TorchScript module (loaded by `import::torchscript`): its logits
//! and parameters, checked against the calling convention
//! `forward(input_ids, attention_mask) -> logits (batch, seq, vocab)`.

use std::path::PathBuf;

use tch::{CModule, Kind, Tensor};

use crate::error::{Error, Result};

/// A loaded TorchScript module (the `CModule` is not `Debug`).
pub struct Script {
    /// The loaded module.
    pub module: CModule,
    /// Its file, named in errors.
    pub path: PathBuf,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Script({})", self.path.display())
    }
}

impl Script {
    /// Logits of a batch, checked against the calling convention.
    pub fn logits(&self, ids: &Tensor, mask: &Tensor, vocab: i64) -> Result<Tensor> {
        let m = mask.to_kind(Kind::Int64);
        let out = self.module.forward_ts(&[ids, &m]).map_err(|e| {
            Error::in_file(
                &self.path,
                format!("forward(input_ids, attention_mask) failed: {e}"),
            )
        })?;
        let (b, t) = ids.size2()?;
        if out.size() != [b, t, vocab] {
            return Err(Error::in_file(
                &self.path,
                format!(
                    "forward returned shape {:?}, expected (batch, seq, vocab) = {:?}",
                    out.size(),
                    [b, t, vocab]
                ),
            ));
        }
        Ok(out)
    }

    /// The module's trainable parameters.
    pub fn parameters(&self) -> Result<Vec<(String, Tensor)>> {
        let mut p = self
            .module
            .named_parameters()
            .map_err(|e| Error::in_file(&self.path, format!("named_parameters: {e}")))?;
        p.retain(|(_, t)| t.requires_grad());
        p.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(p)
    }
}

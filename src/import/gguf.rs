//! Llama-family GGUF models (`general.architecture = llama`) mapped onto tailscope's Llama blocks;
//! llama.cpp's converter permutes the rows of the query and key weights (pairs of rotary
//! dimensions interleaved instead of in two halves), which is undone here. The file format
//! itself is in [`gguf_format`](super::gguf_format).

use std::collections::BTreeMap;
use std::path::Path;

use super::gguf_format::{tokenizer_json, unpermute_rows, Gguf, TensorInfo, Value};
use super::hf::{llama_config, LlamaDims, LLAMA_LAYER};
use super::safetensors::RawTensor;
use super::Imported;
use crate::error::{Error, Result};

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// A parsed GGUF file and its path, for lookups that name the file on failure.
struct Meta<'a> {
    g: &'a Gguf<'a>,
    path: &'a Path,
    by_name: BTreeMap<&'a str, &'a TensorInfo>,
}

impl<'a> Meta<'a> {
    fn new(g: &'a Gguf<'a>, path: &'a Path) -> Meta<'a> {
        Meta {
            g,
            path,
            by_name: g.tensors.iter().map(|t| (t.name.as_str(), t)).collect(),
        }
    }

    fn bad(&self, m: String) -> Error {
        Error::in_file(self.path, m)
    }

    fn int(&self, k: &str) -> Result<i64> {
        self.g
            .meta(k)
            .and_then(Value::as_i64)
            .ok_or_else(|| self.bad(format!("metadata `{k}`: missing or not an integer")))
    }

    fn int_or(&self, k: &str, d: i64) -> i64 {
        self.g.meta(k).and_then(Value::as_i64).unwrap_or(d)
    }

    fn float(&self, k: &str, d: f64) -> f64 {
        self.g.meta(k).and_then(Value::as_f64).unwrap_or(d)
    }

    fn tensor(&self, n: &str) -> Result<RawTensor> {
        let info = self
            .by_name
            .get(n)
            .ok_or_else(|| self.bad(format!("missing tensor `{n}` (the metadata expects it)")))?;
        self.g.tensor(info).map_err(|m| self.bad(m))
    }
}

/// The model config from a GGUF file's `llama.*` and `tokenizer.ggml.*` metadata; `emb_rows` is
/// the token embedding's row count (the vocabulary when the metadata gives none).
fn gguf_config(m: &Meta, emb_rows: i64) -> Result<crate::model::ModelConfig> {
    let g = m.g;
    let tokens = match g.meta("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a.len() as i64,
        _ => 0,
    };
    let n_head = m.int("llama.attention.head_count")?;
    let bos = m.int_or("tokenizer.ggml.bos_token_id", 0);
    let pad = g
        .meta("tokenizer.ggml.padding_token_id")
        .or(g.meta("tokenizer.ggml.eos_token_id"))
        .and_then(Value::as_i64)
        .unwrap_or(bos);
    Ok(llama_config(LlamaDims {
        vocab: m.int_or(
            "llama.vocab_size",
            if tokens > 0 { tokens } else { emb_rows },
        ),
        max_len: m.int("llama.context_length")?,
        n_layer: m.int("llama.block_count")?,
        d_model: m.int("llama.embedding_length")?,
        n_head,
        n_kv_head: m.int_or("llama.attention.head_count_kv", n_head),
        d_ffn: m.int("llama.feed_forward_length")?,
        norm_eps: m.float("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta: m.float("llama.rope.freq_base", 10000.0),
        tied: !m.by_name.contains_key("output.weight"),
        bos,
        pad,
    }))
}

/// GGUF names of a Llama block's tensors, in the order of [`LLAMA_LAYER`].
const GGUF_LAYER: [&str; 9] = [
    "attn_norm",
    "attn_q",
    "attn_k",
    "attn_v",
    "attn_output",
    "ffn_norm",
    "ffn_gate",
    "ffn_up",
    "ffn_down",
];

/// Read a Llama-family GGUF model.
pub fn read_file(path: &Path) -> Result<Imported> {
    let bytes = read_bytes(path)?;
    let g = Gguf::parse(&bytes).map_err(|m| Error::in_file(path, m))?;
    let m = Meta::new(&g, path);
    let arch = g
        .meta("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| m.bad("metadata `general.architecture`: missing".into()))?;
    if arch != "llama" {
        return Err(m.bad(format!(
            "metadata `general.architecture`: `{arch}` is not supported (llama is)"
        )));
    }
    let emb = m.tensor("token_embd.weight")?;
    let cfg = gguf_config(&m, emb.shape[0] as i64)?;
    let tied = cfg.tie_embeddings;
    let mut tensors = vec![
        ("wte.weight".to_string(), emb),
        ("ln_f.weight".to_string(), m.tensor("output_norm.weight")?),
    ];
    if !tied {
        tensors.push(("lm_head.weight".into(), m.tensor("output.weight")?));
    }
    for i in 0..cfg.n_layer {
        for ((ours, _), theirs) in LLAMA_LAYER.iter().zip(GGUF_LAYER) {
            let mut t = m.tensor(&format!("blk.{i}.{theirs}.weight"))?;
            if theirs == "attn_q" {
                t = unpermute_rows(&t, cfg.n_head as usize).map_err(|e| m.bad(e))?;
            } else if theirs == "attn_k" {
                t = unpermute_rows(&t, cfg.kv_heads() as usize).map_err(|e| m.bad(e))?;
            }
            tensors.push((format!("h.{i}.{ours}"), t));
        }
    }
    check_no_extra(
        &m,
        &tensors,
        2 + usize::from(!tied) + 9 * cfg.n_layer as usize,
    )?;
    Ok(Imported {
        cfg,
        tensors,
        tokenizer_json: Some(tokenizer_json(&g).map_err(|e| m.bad(e))?),
        source: path.to_path_buf(),
        weights: path.to_path_buf(),
    })
}

/// Every tensor of the file must have been used (but rotary frequencies, which are recomputed).
fn check_no_extra(m: &Meta, tensors: &[(String, RawTensor)], known: usize) -> Result<()> {
    if m.g.tensors.len() <= known {
        return Ok(());
    }
    let used: std::collections::HashSet<&str> =
        tensors.iter().map(|(_, r)| r.name.as_str()).collect();
    match m
        .g
        .tensors
        .iter()
        .map(|t| t.name.as_str())
        .find(|n| !used.contains(n) && *n != "rope_freqs.weight")
    {
        Some(extra) => Err(m.bad(format!(
            "unexpected tensor `{extra}`: the weights do not match the metadata"
        ))),
        None => Ok(()),
    }
}

/// The tokenizer of a GGUF file as Hugging Face `tokenizer.json` text.
pub fn read_tokenizer_json(path: &Path) -> Result<String> {
    let bytes = read_bytes(path)?;
    let g = Gguf::parse(&bytes).map_err(|m| Error::in_file(path, m))?;
    tokenizer_json(&g).map_err(|m| Error::in_file(path, m))
}

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

/// Read a Llama-family GGUF model.
pub fn read_file(path: &Path) -> Result<Imported> {
    let bytes = read_bytes(path)?;
    let g = Gguf::parse(&bytes).map_err(|m| Error::in_file(path, m))?;
    let bad = |m: String| Error::in_file(path, m);
    let arch = g
        .meta("general.architecture")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("metadata `general.architecture`: missing".into()))?;
    if arch != "llama" {
        return Err(bad(format!(
            "metadata `general.architecture`: `{arch}` is not supported (llama is)"
        )));
    }
    let int = |k: &str| -> Result<i64> {
        g.meta(k)
            .and_then(Value::as_i64)
            .ok_or_else(|| bad(format!("metadata `{k}`: missing or not an integer")))
    };
    let float = |k: &str, d: f64| g.meta(k).and_then(Value::as_f64).unwrap_or(d);
    let tokens = match g.meta("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a.len() as i64,
        _ => 0,
    };
    let by_name: BTreeMap<&str, &TensorInfo> =
        g.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let get = |n: &str| -> Result<RawTensor> {
        let info = by_name
            .get(n)
            .ok_or_else(|| bad(format!("missing tensor `{n}` (the metadata expects it)")))?;
        g.tensor(info).map_err(bad)
    };
    let emb = get("token_embd.weight")?;
    let d = int("llama.embedding_length")?;
    let vocab = g
        .meta("llama.vocab_size")
        .and_then(Value::as_i64)
        .unwrap_or(if tokens > 0 {
            tokens
        } else {
            emb.shape[0] as i64
        });
    let n_head = int("llama.attention.head_count")?;
    let n_kv = g
        .meta("llama.attention.head_count_kv")
        .and_then(Value::as_i64)
        .unwrap_or(n_head);
    let tied = !by_name.contains_key("output.weight");
    let bos = g
        .meta("tokenizer.ggml.bos_token_id")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let pad = g
        .meta("tokenizer.ggml.padding_token_id")
        .or(g.meta("tokenizer.ggml.eos_token_id"))
        .and_then(Value::as_i64)
        .unwrap_or(bos);
    let cfg = llama_config(LlamaDims {
        vocab,
        max_len: int("llama.context_length")?,
        n_layer: int("llama.block_count")?,
        d_model: d,
        n_head,
        n_kv_head: n_kv,
        d_ffn: int("llama.feed_forward_length")?,
        norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta: float("llama.rope.freq_base", 10000.0),
        tied,
        bos,
        pad,
    });
    let mut tensors = vec![
        ("wte.weight".to_string(), emb),
        ("ln_f.weight".to_string(), get("output_norm.weight")?),
    ];
    if !tied {
        tensors.push(("lm_head.weight".into(), get("output.weight")?));
    }
    let gguf_names = [
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
    for i in 0..cfg.n_layer {
        for ((ours, _), theirs) in LLAMA_LAYER.iter().zip(gguf_names) {
            let mut t = get(&format!("blk.{i}.{theirs}.weight"))?;
            if theirs == "attn_q" {
                t = unpermute_rows(&t, n_head as usize).map_err(bad)?;
            } else if theirs == "attn_k" {
                t = unpermute_rows(&t, n_kv as usize).map_err(bad)?;
            }
            tensors.push((format!("h.{i}.{ours}"), t));
        }
    }
    let known = 2 + usize::from(!tied) + 9 * cfg.n_layer as usize;
    if g.tensors.len() > known {
        let used: std::collections::HashSet<&str> =
            tensors.iter().map(|(_, r)| r.name.as_str()).collect();
        if let Some(extra) = g
            .tensors
            .iter()
            .map(|t| t.name.as_str())
            .find(|n| !used.contains(n) && *n != "rope_freqs.weight")
        {
            return Err(bad(format!(
                "unexpected tensor `{extra}`: the weights do not match the metadata"
            )));
        }
    }
    Ok(Imported {
        cfg,
        tensors,
        tokenizer_json: Some(tokenizer_json(&g).map_err(bad)?),
        source: path.to_path_buf(),
        weights: path.to_path_buf(),
    })
}

/// The tokenizer of a GGUF file as Hugging Face `tokenizer.json` text.
pub fn read_tokenizer_json(path: &Path) -> Result<String> {
    let bytes = read_bytes(path)?;
    let g = Gguf::parse(&bytes).map_err(|m| Error::in_file(path, m))?;
    tokenizer_json(&g).map_err(|m| Error::in_file(path, m))
}

//! Hugging Face model folders (`config.json` + `model.safetensors`, optionally `tokenizer.json`)
//! for GPT-2 (`GPT2LMHeadModel`), Llama-family (`LlamaForCausalLM`) and BERT (`BertForMaskedLM`)
//! models, mapped onto tailscope's tensor names (see `model`). Conv1D weights of GPT-2 are
//! transposed to (out, in); BERT's query/key/value are fused into `c_attn` and its token-type-0
//! embedding is folded into the position table (tailscope feeds one segment). Anything the
//! mapping does not know, and any option it cannot reproduce (rope scaling, attention biases in
//! Llama, relative positions in BERT), is an error naming the field or tensor: a wrong load never
//! passes silently.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::safetensors::RawTensor;
use super::Imported;
use crate::error::{Error, Result};
use crate::model::{Activation, Arch, ModelConfig, SpecialTokens};

/// The parsed `config.json`, with errors that name it and the field.
struct Cfg<'a> {
    v: Value,
    path: &'a Path,
}

impl Cfg<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    fn int(&self, key: &str) -> Result<i64> {
        self.get(key).and_then(Value::as_i64).ok_or_else(|| {
            Error::in_file(
                self.path,
                format!("field `{key}`: missing or not an integer"),
            )
        })
    }
    fn int_or(&self, key: &str, default: i64) -> Result<i64> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.int(key),
        }
    }
    fn float_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Error::in_file(self.path, format!("field `{key}`: not a number"))),
        }
    }
    fn str_or<'s>(&'s self, key: &str, default: &'s str) -> Result<&'s str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| Error::in_file(self.path, format!("field `{key}`: not a string"))),
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| Error::in_file(self.path, format!("field `{key}`: not a boolean"))),
        }
    }
    fn unsupported(&self, key: &str, why: &str) -> Error {
        Error::in_file(
            self.path,
            format!("field `{key}`: {why}; tailscope cannot import this model"),
        )
    }
}

/// Read a Hugging Face model folder.
pub fn read_dir(dir: &Path) -> Result<Imported> {
    let cp = dir.join("config.json");
    let text = std::fs::read_to_string(&cp).map_err(|e| Error::io(&cp, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| Error::at_line(&cp, e.line(), format!("not valid JSON: {e}")))?;
    let c = Cfg { v, path: &cp };
    let wp = dir.join("model.safetensors");
    let bytes = std::fs::read(&wp).map_err(|e| Error::io(&wp, e))?;
    let raw = super::safetensors::parse(&bytes).map_err(|m| Error::in_file(&wp, m))?;
    let mut t: HashMap<String, RawTensor> = raw.into_iter().map(|r| (r.name.clone(), r)).collect();
    let model_type = c.str_or("model_type", "")?.to_string();
    let (cfg, tensors) = match model_type.as_str() {
        "gpt2" => gpt2(&c, &mut t, &wp)?,
        "llama" => llama(&c, &mut t, &wp)?,
        "bert" => bert(&c, &mut t, &wp, dir)?,
        "" => return Err(Error::in_file(&cp, "field `model_type`: missing")),
        other => {
            return Err(c.unsupported(
                "model_type",
                &format!("`{other}` is not one of gpt2, llama, bert"),
            ))
        }
    };
    if let Some(extra) = t.keys().min() {
        return Err(Error::in_file(
            &wp,
            format!("unexpected tensor `{extra}` for a {model_type} model: the weights do not match the config"),
        ));
    }
    let tp = dir.join("tokenizer.json");
    let tokenizer_json = if tp.exists() {
        Some(std::fs::read_to_string(&tp).map_err(|e| Error::io(&tp, e))?)
    } else {
        None
    };
    Ok(Imported {
        cfg,
        tensors,
        tokenizer_json,
        source: dir.to_path_buf(),
        weights: wp,
    })
}

/// Take a tensor out of the file's map, by one of its spellings (with or without a prefix).
fn take(t: &mut HashMap<String, RawTensor>, names: &[String], wp: &Path) -> Result<RawTensor> {
    for n in names {
        if let Some(r) = t.remove(n) {
            return Ok(r);
        }
    }
    Err(Error::in_file(
        wp,
        format!("missing tensor `{}` (the config expects it)", names[0]),
    ))
}

fn spell(prefix: &str, name: &str) -> Vec<String> {
    vec![format!("{prefix}{name}"), name.to_string()]
}

fn transpose(r: RawTensor, wp: &Path) -> Result<RawTensor> {
    let [rows, cols] = r.shape[..] else {
        return Err(Error::in_file(
            wp,
            format!("tensor `{}` should be 2-D, has shape {:?}", r.name, r.shape),
        ));
    };
    let mut data = vec![0f32; r.data.len()];
    for i in 0..rows {
        for j in 0..cols {
            data[j * rows + i] = r.data[i * cols + j];
        }
    }
    Ok(RawTensor {
        name: r.name,
        shape: vec![cols, rows],
        data,
    })
}

/// The model config of a GPT-2 `config.json`.
fn gpt2_config(c: &Cfg) -> Result<ModelConfig> {
    let d = c.int("n_embd")?;
    let act = match c.str_or("activation_function", "gelu_new")? {
        "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
        "gelu" => Activation::Gelu,
        other => return Err(c.unsupported("activation_function", &format!("`{other}`"))),
    };
    if !c.bool_or("scale_attn_weights", true)?
        || c.bool_or("scale_attn_by_inverse_layer_idx", false)?
        || c.bool_or("reorder_and_upcast_attn", false)?
    {
        return Err(c.unsupported(
            "scale_attn_weights",
            "only the standard 1/√d attention scaling is supported",
        ));
    }
    let vocab = c.int("vocab_size")?;
    let bos = c.int_or("bos_token_id", vocab - 1)?;
    Ok(ModelConfig {
        arch: Arch::Gpt,
        vocab_size: vocab,
        max_len: c.int("n_positions")?,
        n_layer: c.int("n_layer")?,
        d_model: d,
        n_head: c.int("n_head")?,
        d_ffn: c.int_or("n_inner", 4 * d)?,
        tie_embeddings: c.bool_or("tie_word_embeddings", true)?,
        activation: act,
        norm_eps: c.float_or("layer_norm_epsilon", 1e-5)?,
        special: SpecialTokens {
            bos,
            pad: bos,
            mask: bos,
            cls: bos,
            sep: bos,
            first_regular: 0,
        },
        ..ModelConfig::default()
    })
}

fn gpt2(
    c: &Cfg,
    t: &mut HashMap<String, RawTensor>,
    wp: &Path,
) -> Result<(ModelConfig, Vec<(String, RawTensor)>)> {
    let cfg = gpt2_config(c)?;
    let p = "transformer.";
    // Attention-mask buffers of older checkpoints carry no weights.
    t.retain(|k, _| {
        let mask_buffer = (k.ends_with(".attn.bias") && !k.contains("c_attn"))
            || k.ends_with(".attn.masked_bias");
        !mask_buffer
    });
    let mut out = Vec::new();
    for n in ["wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"] {
        out.push((n.to_string(), take(t, &spell(p, n), wp)?));
    }
    for i in 0..cfg.n_layer {
        for n in [
            "ln_1.weight",
            "ln_1.bias",
            "ln_2.weight",
            "ln_2.bias",
            "attn.c_attn.bias",
            "attn.c_proj.bias",
            "mlp.c_fc.bias",
            "mlp.c_proj.bias",
        ] {
            let n = format!("h.{i}.{n}");
            out.push((n.clone(), take(t, &spell(p, &n), wp)?));
        }
        for n in [
            "attn.c_attn.weight",
            "attn.c_proj.weight",
            "mlp.c_fc.weight",
            "mlp.c_proj.weight",
        ] {
            let n = format!("h.{i}.{n}");
            out.push((n.clone(), transpose(take(t, &spell(p, &n), wp)?, wp)?));
        }
    }
    lm_head(&cfg, t, &mut out, wp)?;
    Ok((cfg, out))
}

/// An untied output layer, or (tied) a saved copy of the embedding that is dropped.
fn lm_head(
    cfg: &ModelConfig,
    t: &mut HashMap<String, RawTensor>,
    out: &mut Vec<(String, RawTensor)>,
    wp: &Path,
) -> Result<()> {
    if cfg.tie_embeddings {
        t.remove("lm_head.weight");
    } else {
        out.push((
            "lm_head.weight".into(),
            take(t, &["lm_head.weight".to_string()], wp)?,
        ));
    }
    Ok(())
}

fn llama(
    c: &Cfg,
    t: &mut HashMap<String, RawTensor>,
    wp: &Path,
) -> Result<(ModelConfig, Vec<(String, RawTensor)>)> {
    let d = c.int("hidden_size")?;
    let n_head = c.int("num_attention_heads")?;
    if c.get("rope_scaling").is_some_and(|v| {
        v.get("rope_type")
            .and_then(Value::as_str)
            .unwrap_or("default")
            != "default"
    }) {
        return Err(c.unsupported("rope_scaling", "scaled rotary positions are not supported"));
    }
    if c.bool_or("attention_bias", false)? || c.bool_or("mlp_bias", false)? {
        return Err(c.unsupported(
            "attention_bias",
            "Llama blocks with biases are not supported",
        ));
    }
    if c.int_or("head_dim", d / n_head)? != d / n_head {
        return Err(c.unsupported("head_dim", "must equal hidden_size / num_attention_heads"));
    }
    let act = c.str_or("hidden_act", "silu")?;
    if act != "silu" {
        return Err(c.unsupported("hidden_act", &format!("`{act}` (SwiGLU needs silu)")));
    }
    let vocab = c.int("vocab_size")?;
    let bos = c.int_or("bos_token_id", 0)?;
    let pad = c.int_or("pad_token_id", c.int_or("eos_token_id", bos)?)?;
    let theta = c
        .get("rope_parameters")
        .and_then(|v| v.get("rope_theta"))
        .and_then(Value::as_f64);
    let cfg = llama_config(LlamaDims {
        vocab,
        max_len: c.int_or("max_position_embeddings", 2048)?,
        n_layer: c.int("num_hidden_layers")?,
        d_model: d,
        n_head,
        n_kv_head: c.int_or("num_key_value_heads", n_head)?,
        d_ffn: c.int("intermediate_size")?,
        norm_eps: c.float_or("rms_norm_eps", 1e-6)?,
        rope_theta: match theta {
            Some(x) => x,
            None => c.float_or("rope_theta", 10000.0)?,
        },
        tied: c.bool_or("tie_word_embeddings", false)?,
        bos,
        pad,
    });
    t.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
    let p = "model.";
    let mut out = vec![
        (
            "wte.weight".to_string(),
            take(t, &spell(p, "embed_tokens.weight"), wp)?,
        ),
        (
            "ln_f.weight".to_string(),
            take(t, &spell(p, "norm.weight"), wp)?,
        ),
    ];
    for i in 0..cfg.n_layer {
        for (ours, theirs) in LLAMA_LAYER {
            out.push((
                format!("h.{i}.{ours}"),
                take(t, &spell(p, &format!("layers.{i}.{theirs}")), wp)?,
            ));
        }
    }
    lm_head(&cfg, t, &mut out, wp)?;
    Ok((cfg, out))
}

/// (tailscope name, Hugging Face name) of each tensor of a Llama block.
pub const LLAMA_LAYER: [(&str, &str); 9] = [
    ("ln_1.weight", "input_layernorm.weight"),
    ("attn.q_proj.weight", "self_attn.q_proj.weight"),
    ("attn.k_proj.weight", "self_attn.k_proj.weight"),
    ("attn.v_proj.weight", "self_attn.v_proj.weight"),
    ("attn.o_proj.weight", "self_attn.o_proj.weight"),
    ("ln_2.weight", "post_attention_layernorm.weight"),
    ("mlp.gate_proj.weight", "mlp.gate_proj.weight"),
    ("mlp.up_proj.weight", "mlp.up_proj.weight"),
    ("mlp.down_proj.weight", "mlp.down_proj.weight"),
];

/// The sizes of a Llama-family model (from config.json or GGUF metadata).
pub struct LlamaDims {
    /// Vocabulary size.
    pub vocab: i64,
    /// Context length.
    pub max_len: i64,
    /// Blocks.
    pub n_layer: i64,
    /// Width.
    pub d_model: i64,
    /// Query heads.
    pub n_head: i64,
    /// Key/value heads.
    pub n_kv_head: i64,
    /// SwiGLU width.
    pub d_ffn: i64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Rotary base.
    pub rope_theta: f64,
    /// Output layer tied to the embedding.
    pub tied: bool,
    /// Beginning-of-sequence id.
    pub bos: i64,
    /// Padding id.
    pub pad: i64,
}

/// The tailscope config of a Llama-family model.
pub fn llama_config(m: LlamaDims) -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        vocab_size: m.vocab,
        max_len: m.max_len,
        n_layer: m.n_layer,
        d_model: m.d_model,
        n_head: m.n_head,
        d_ffn: m.d_ffn,
        tie_embeddings: m.tied,
        norm_eps: m.norm_eps,
        n_kv_head: Some(m.n_kv_head),
        rope_theta: m.rope_theta,
        special: SpecialTokens {
            bos: m.bos,
            pad: m.pad,
            mask: m.pad,
            cls: m.bos,
            sep: m.pad,
            first_regular: 0,
        },
        ..ModelConfig::default()
    }
}

/// The model config of a BERT `config.json`; special-token ids from the folder's
/// `tokenizer.json` when present.
fn bert_config(c: &Cfg, dir: &Path) -> Result<ModelConfig> {
    if c.str_or("position_embedding_type", "absolute")? != "absolute" {
        return Err(c.unsupported(
            "position_embedding_type",
            "only absolute positions are supported",
        ));
    }
    let act = match c.str_or("hidden_act", "gelu")? {
        "gelu" => Activation::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
        other => return Err(c.unsupported("hidden_act", &format!("`{other}`"))),
    };
    let vocab = c.int("vocab_size")?;
    // Special-token ids from tokenizer.json when present, else BERT's uncased vocabulary's.
    let tok = std::fs::read_to_string(dir.join("tokenizer.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(&s).ok());
    let id_of = |name: &str, default: i64| -> i64 {
        tok.as_ref()
            .and_then(|v| v.pointer("/model/vocab"))
            .and_then(|v| v.get(name))
            .and_then(Value::as_i64)
            .unwrap_or(default)
            .min(vocab - 1)
    };
    Ok(ModelConfig {
        arch: Arch::Bert,
        vocab_size: vocab,
        max_len: c.int("max_position_embeddings")?,
        n_layer: c.int("num_hidden_layers")?,
        d_model: c.int("hidden_size")?,
        n_head: c.int("num_attention_heads")?,
        d_ffn: c.int("intermediate_size")?,
        tie_embeddings: true,
        activation: act,
        norm_eps: c.float_or("layer_norm_eps", 1e-12)?,
        post_norm: true,
        special: SpecialTokens {
            bos: id_of("[CLS]", 101),
            pad: id_of("[PAD]", c.int_or("pad_token_id", 0)?),
            mask: id_of("[MASK]", 103),
            cls: id_of("[CLS]", 101),
            sep: id_of("[SEP]", 102),
            first_regular: 0,
        },
        ..ModelConfig::default()
    })
}

fn bert(
    c: &Cfg,
    t: &mut HashMap<String, RawTensor>,
    wp: &Path,
    dir: &Path,
) -> Result<(ModelConfig, Vec<(String, RawTensor)>)> {
    let cfg = bert_config(c, dir)?;
    let p = "bert.";
    t.retain(|k, _| {
        !k.ends_with("position_ids")
            && !k.contains("pooler.")
            && k != "cls.predictions.decoder.bias"
    });
    if !t.contains_key("cls.predictions.bias") {
        return Err(Error::in_file(wp, "no masked-LM head (`cls.predictions.*`): tailscope needs a BertForMaskedLM checkpoint, not an encoder alone"));
    }
    t.remove("cls.predictions.decoder.weight"); // tied to the word embeddings
    let mut out = bert_embeddings(t, cfg.d_model as usize, wp)?;
    for i in 0..cfg.n_layer {
        out.extend(bert_layer(t, i, wp)?);
    }
    for w in ["weight", "bias"] {
        out.push((
            format!("mlm.dense.{w}"),
            take(t, &[format!("cls.predictions.transform.dense.{w}")], wp)?,
        ));
    }
    out.extend(bert_ln(
        t,
        p,
        "mlm.ln",
        "cls.predictions.transform.LayerNorm",
        wp,
    )?);
    out.push((
        "mlm.bias".into(),
        take(t, &["cls.predictions.bias".to_string()], wp)?,
    ));
    Ok((cfg, out))
}

/// A BERT LayerNorm's weight and bias under `ours`; older checkpoints call them gamma and beta.
fn bert_ln(
    t: &mut HashMap<String, RawTensor>,
    p: &str,
    ours: &str,
    theirs: &str,
    wp: &Path,
) -> Result<Vec<(String, RawTensor)>> {
    [("weight", "gamma"), ("bias", "beta")]
        .iter()
        .map(|(name, old)| {
            let names = [
                spell(p, &format!("{theirs}.{name}")),
                spell(p, &format!("{theirs}.{old}")),
            ]
            .concat();
            Ok((format!("{ours}.{name}"), take(t, &names, wp)?))
        })
        .collect()
}

/// Word embeddings, positions with the token-type-0 embedding folded in, and their LayerNorm.
fn bert_embeddings(
    t: &mut HashMap<String, RawTensor>,
    d: usize,
    wp: &Path,
) -> Result<Vec<(String, RawTensor)>> {
    let p = "bert.";
    let mut out = vec![(
        "wte.weight".to_string(),
        take(t, &spell(p, "embeddings.word_embeddings.weight"), wp)?,
    )];
    let pos = take(t, &spell(p, "embeddings.position_embeddings.weight"), wp)?;
    let types = take(t, &spell(p, "embeddings.token_type_embeddings.weight"), wp)?;
    if types.data.len() < d || pos.shape.len() != 2 || pos.shape[1] != d {
        return Err(Error::in_file(
            wp,
            format!(
                "tensor `{}` has shape {:?}, expected (max_len, {d})",
                pos.name, pos.shape
            ),
        ));
    }
    let folded: Vec<f32> = pos
        .data
        .iter()
        .enumerate()
        .map(|(i, x)| x + types.data[i % d])
        .collect();
    out.push((
        "wpe.weight".into(),
        RawTensor {
            data: folded,
            ..pos
        },
    ));
    out.extend(bert_ln(t, p, "ln_emb", "embeddings.LayerNorm", wp)?);
    Ok(out)
}

/// Block `i`: query, key and value fused into `c_attn`, the dense layers and both LayerNorms.
fn bert_layer(
    t: &mut HashMap<String, RawTensor>,
    i: i64,
    wp: &Path,
) -> Result<Vec<(String, RawTensor)>> {
    let p = "bert.";
    let l = format!("encoder.layer.{i}");
    let mut qkv_w = Vec::new();
    let mut qkv_b = Vec::new();
    for part in ["query", "key", "value"] {
        let w = take(
            t,
            &spell(p, &format!("{l}.attention.self.{part}.weight")),
            wp,
        )?;
        qkv_w.extend(w.data);
        qkv_b.extend(take(t, &spell(p, &format!("{l}.attention.self.{part}.bias")), wp)?.data);
    }
    let n = qkv_b.len();
    let mut out = vec![
        (
            format!("h.{i}.attn.c_attn.weight"),
            RawTensor {
                name: format!("{l}.attention.self.*.weight"),
                shape: vec![n, qkv_w.len() / n.max(1)],
                data: qkv_w,
            },
        ),
        (
            format!("h.{i}.attn.c_attn.bias"),
            RawTensor {
                name: format!("{l}.attention.self.*.bias"),
                shape: vec![n],
                data: qkv_b,
            },
        ),
    ];
    for (ours, theirs) in [
        ("attn.c_proj", "attention.output.dense"),
        ("mlp.c_fc", "intermediate.dense"),
        ("mlp.c_proj", "output.dense"),
    ] {
        for w in ["weight", "bias"] {
            out.push((
                format!("h.{i}.{ours}.{w}"),
                take(t, &spell(p, &format!("{l}.{theirs}.{w}")), wp)?,
            ));
        }
    }
    let ln_1 = format!("{l}.attention.output.LayerNorm");
    out.extend(bert_ln(t, p, &format!("h.{i}.ln_1"), &ln_1, wp)?);
    out.extend(bert_ln(
        t,
        p,
        &format!("h.{i}.ln_2"),
        &format!("{l}.output.LayerNorm"),
        wp,
    )?);
    Ok(out)
}

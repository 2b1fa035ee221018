//! The GGUF file format (llama.cpp's, versions 2 and 3): metadata, tensor directory and data,
//! with Q8_0, Q4_0, Q4_1, F16 and F32 tensors dequantised to f32, llama.cpp's rotary row
//! permutation undone, and the byte-level BPE tokenizer rebuilt from `tokenizer.ggml.*`.
//!
//! Pure Rust with no dependency on the rest of tailscope but [`RawTensor`], so the fuzz target
//! (`fuzz/fuzz_targets/gguf.rs`) compiles this very file. Every length and offset is checked
//! against the file before it is read: a truncated or corrupt file gives an error naming the
//! field or tensor, never a panic. Written by hand: the GGUF crates on crates.io either pull a
//! whole inference engine (candle) or lack Q4_1.

use std::collections::BTreeMap;

use super::safetensors::RawTensor;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    UInt(u64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A string.
    Str(String),
    /// An array.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an integer, if it is one.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Int(x) => Some(x),
            Value::UInt(x) => i64::try_from(x).ok(),
            _ => None,
        }
    }
    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(x) => Some(x),
            Value::Int(x) => Some(x as f64),
            Value::UInt(x) => Some(x as f64),
            _ => None,
        }
    }
    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// ggml tensor types this reader dequantises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// 4-bit blocks with a scale.
    Q4_0,
    /// 4-bit blocks with a scale and a minimum.
    Q4_1,
    /// 8-bit blocks with a scale.
    Q8_0,
}

impl GgmlType {
    fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            _ => return None,
        })
    }
    /// (values per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

/// llama.cpp's names of the types it has that this reader does not dequantise.
fn type_name(id: u32) -> String {
    let names = [
        "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
        "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
    ];
    match id {
        30 => "BF16".into(),
        _ => names
            .get(id as usize)
            .map_or(format!("type {id}"), |s| s.to_string()),
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name in the file.
    pub name: String,
    /// GGUF order: `ne[0]` (contiguous) first.
    pub dims: Vec<u64>,
    /// GGML type code.
    pub type_id: u32,
    /// Offset of the data in the tensor section.
    pub offset: u64,
}

/// A parsed GGUF file (metadata and directory; tensor data is read on demand).
#[derive(Debug)]
pub struct Gguf<'a> {
    /// Format version (2 or 3).
    pub version: u32,
    /// Key-value metadata.
    pub metadata: BTreeMap<String, Value>,
    /// Tensor descriptors, in file order.
    pub tensors: Vec<TensorInfo>,
    data: &'a [u8],
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| format!("truncated at byte {} while reading {what}", self.pos))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_le_bytes(a))
    }
    /// A count of items each at least `min_size` bytes: it must fit in what is left.
    fn count(&mut self, what: &str, min_size: usize) -> Result<usize, String> {
        let n = self.u64(what)?;
        let left = (self.b.len() - self.pos) as u64;
        if n.saturating_mul(min_size.max(1) as u64) > left {
            return Err(format!(
                "{what}: {n} entries cannot fit in the {left} bytes left"
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.count(what, 1)?;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| format!("{what}: not UTF-8"))
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value, String> {
        let v = match ty {
            0 => Value::UInt(u64::from(self.take(1, what)?[0])),
            1 => Value::Int(i64::from(self.take(1, what)?[0] as i8)),
            2 => {
                let s = self.take(2, what)?;
                Value::UInt(u64::from(u16::from_le_bytes([s[0], s[1]])))
            }
            3 => {
                let s = self.take(2, what)?;
                Value::Int(i64::from(i16::from_le_bytes([s[0], s[1]])))
            }
            4 => Value::UInt(u64::from(self.u32(what)?)),
            5 => Value::Int(i64::from(self.u32(what)? as i32)),
            6 => Value::Float(f64::from(f32::from_bits(self.u32(what)?))),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 2 {
                    return Err(format!("{what}: arrays nested too deeply"));
                }
                let inner = self.u32(what)?;
                let n = self.count(what, 1)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(inner, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::UInt(self.u64(what)?),
            11 => Value::Int(self.u64(what)? as i64),
            12 => Value::Float(f64::from_bits(self.u64(what)?)),
            other => return Err(format!("{what}: unknown value type {other}")),
        };
        Ok(v)
    }
}

impl<'a> Gguf<'a> {
    /// Parse the header, metadata and tensor directory of a GGUF file held in `b`.
    pub fn parse(b: &'a [u8]) -> Result<Gguf<'a>, String> {
        let mut r = Reader { b, pos: 0 };
        if r.take(4, "the magic number")? != b"GGUF" {
            return Err("not a GGUF file (no GGUF magic number)".into());
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            ));
        }
        let n_tensors = r.count("the tensor count", 24)?;
        let n_kv = r.count("the metadata count", 12)?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key {i}"))?;
            let ty = r.u32(&format!("the type of `{key}`"))?;
            let v = r.value(ty, &format!("metadata `{key}`"), 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = r.string(&format!("the name of tensor {i}"))?;
            let nd = r.u32(&format!("the dimensions of `{name}`"))?;
            if nd == 0 || nd > 4 {
                return Err(format!("tensor `{name}`: {nd} dimensions (1 to 4 allowed)"));
            }
            let dims = (0..nd)
                .map(|_| r.u64(&format!("the shape of `{name}`")))
                .collect::<Result<Vec<_>, _>>()?;
            let type_id = r.u32(&format!("the type of `{name}`"))?;
            let offset = r.u64(&format!("the offset of `{name}`"))?;
            tensors.push(TensorInfo {
                name,
                dims,
                type_id,
                offset,
            });
        }
        let align = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_i64()
                .filter(|&a| a > 0 && a <= 1 << 16 && (a & (a - 1)) == 0)
                .ok_or("metadata `general.alignment`: not a power of two")?
                as usize,
        };
        let start = r.pos.div_ceil(align) * align;
        let data = b.get(start..).unwrap_or(&[]);
        Ok(Gguf {
            version,
            metadata,
            tensors,
            data,
        })
    }

    /// The metadata value of `key`.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Dequantised values of a tensor, with its shape in PyTorch order (ne reversed).
    pub fn tensor(&self, info: &TensorInfo) -> Result<RawTensor, String> {
        let name = &info.name;
        let ty = GgmlType::from_id(info.type_id).ok_or_else(|| {
            format!(
                "tensor `{name}` is {}; supported: F32, F16, Q4_0, Q4_1, Q8_0",
                type_name(info.type_id)
            )
        })?;
        if info.dims.contains(&0) {
            return Err(format!(
                "tensor `{name}`: shape {:?} has a zero dimension",
                info.dims
            ));
        }
        let numel = info
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= 1 << 34)
            .ok_or_else(|| format!("tensor `{name}`: shape {:?} is too large", info.dims))?
            as usize;
        let (per, bytes) = ty.block();
        if numel % per != 0 {
            return Err(format!(
                "tensor `{name}`: {numel} values are not whole {per}-value blocks"
            ));
        }
        let len = numel / per * bytes;
        let start =
            usize::try_from(info.offset).map_err(|_| format!("tensor `{name}`: bad offset"))?;
        let raw = start
            .checked_add(len)
            .and_then(|end| self.data.get(start..end))
            .ok_or_else(|| format!("tensor `{name}`: data at offset {start} (+{len} bytes) lies past the end of the file"))?;
        let data = dequantize(ty, raw);
        let shape = info.dims.iter().rev().map(|&d| d as usize).collect();
        Ok(RawTensor {
            name: name.clone(),
            shape,
            data,
        })
    }
}

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Dequantise whole blocks of `ty` (ggml's reference layouts).
pub fn dequantize(ty: GgmlType, raw: &[u8]) -> Vec<f32> {
    let (per, bytes) = ty.block();
    let mut out = Vec::with_capacity(raw.len() / bytes * per);
    for blk in raw.chunks_exact(bytes) {
        match ty {
            GgmlType::F32 => out.push(f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]])),
            GgmlType::F16 => out.push(f16(blk)),
            GgmlType::Q8_0 => {
                let d = f16(blk);
                out.extend(blk[2..].iter().map(|&q| d * f32::from(q as i8)));
            }
            GgmlType::Q4_0 => {
                let d = f16(blk);
                let qs = &blk[2..18];
                out.extend(qs.iter().map(|&q| d * (f32::from(q & 0x0f) - 8.0)));
                out.extend(qs.iter().map(|&q| d * (f32::from(q >> 4) - 8.0)));
            }
            GgmlType::Q4_1 => {
                let (d, m) = (f16(blk), f16(&blk[2..]));
                let qs = &blk[4..20];
                out.extend(qs.iter().map(|&q| d * f32::from(q & 0x0f) + m));
                out.extend(qs.iter().map(|&q| d * f32::from(q >> 4) + m));
            }
        }
    }
    out
}

/// Undo llama.cpp's rotary permutation of query/key rows: its converter reorders each head's
/// rows from (two halves) to (interleaved pairs); `heads` is the number of heads of the tensor.
pub fn unpermute_rows(w: &RawTensor, heads: usize) -> Result<RawTensor, String> {
    let (rows, cols) = match w.shape[..] {
        [r, c] => (r, c),
        _ => {
            return Err(format!(
                "tensor `{}` should be 2-D, has shape {:?}",
                w.name, w.shape
            ))
        }
    };
    if rows == 0 || cols == 0 || rows.checked_mul(cols) != Some(w.data.len()) {
        return Err(format!(
            "tensor `{}`: shape {:?} does not match its {} values",
            w.name,
            w.shape,
            w.data.len()
        ));
    }
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(format!(
            "tensor `{}`: {rows} rows do not split into {heads} rotary heads",
            w.name
        ));
    }
    let half = rows / heads / 2;
    let mut data = vec![0f32; w.data.len()];
    // Stored row (h, i, j) [shape (heads, half, 2)] holds original row (h, j, i) [(heads, 2, half)].
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let stored = (h * half + i) * 2 + j;
                let orig = (h * 2 + j) * half + i;
                data[orig * cols..(orig + 1) * cols]
                    .copy_from_slice(&w.data[stored * cols..(stored + 1) * cols]);
            }
        }
    }
    Ok(RawTensor {
        name: w.name.clone(),
        shape: w.shape.clone(),
        data,
    })
}

/// Byte-level BPE from `tokenizer.ggml.{model,tokens,merges,token_type,pre}`. Control tokens
/// (type 3) become special added tokens; `pre = smollm` splits digits one by one first, as
/// SmolLM's own tokenizer does.
pub fn tokenizer_json(g: &Gguf) -> Result<String, String> {
    let model = g
        .meta("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("");
    if model != "gpt2" {
        return Err(format!(
            "metadata `tokenizer.ggml.model`: `{model}` is not supported (gpt2 byte-level BPE is)"
        ));
    }
    let strings = |k: &str| -> Result<Vec<String>, String> {
        match g.meta(k) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or(format!("metadata `{k}`: not strings"))
                })
                .collect(),
            _ => Err(format!("metadata `{k}`: missing")),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    // A vocabulary without merges (every token a single symbol) may omit the key.
    let merges = match g.meta("tokenizer.ggml.merges") {
        None => Vec::new(),
        Some(_) => strings("tokenizer.ggml.merges")?,
    };
    let types: Vec<i64> = match g.meta("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| v.as_i64().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i) == Some(&3))
        .map(|(i, t)| serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre = match g.meta("tokenizer.ggml.pre").and_then(Value::as_str) {
        Some("smollm") => {
            serde_json::json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
        }
        _ => byte_level.clone(),
    };
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges}
    });
    serde_json::to_string(&json).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantises_reference_blocks() {
        // Q8_0: d = 0.5, q = -3..28
        let mut b = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        b.extend((0..32).map(|i| (i as i8 - 3) as u8));
        let v = dequantize(GgmlType::Q8_0, &b);
        assert_eq!((v[0], v[31]), (-1.5, 14.0));
        // Q4_0: d = 2, low nibbles 0..15 then high nibbles 15..0
        let mut b = half::f16::from_f32(2.0).to_le_bytes().to_vec();
        b.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let v = dequantize(GgmlType::Q4_0, &b);
        assert_eq!((v[0], v[15], v[16], v[31]), (-16.0, 14.0, 14.0, -16.0));
        // Q4_1: d = 0.25, m = -1
        let mut b = half::f16::from_f32(0.25).to_le_bytes().to_vec();
        b.extend(half::f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|i| i | (3 << 4)));
        let v = dequantize(GgmlType::Q4_1, &b);
        assert_eq!((v[0], v[4], v[16]), (-1.0, 0.0, -0.25));
    }

    #[test]
    fn unpermute_inverts_the_converter_permutation() {
        // llama.cpp: w.reshape(heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, half, cols) = (2, 3, 2);
        let rows = heads * 2 * half;
        let orig: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut perm = vec![0f32; orig.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    let src = (h * 2 + j) * half + i;
                    let dst = (h * half + i) * 2 + j;
                    perm[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&orig[src * cols..(src + 1) * cols]);
                }
            }
        }
        let w = RawTensor {
            name: "q".into(),
            shape: vec![rows, cols],
            data: perm,
        };
        assert_eq!(unpermute_rows(&w, heads).unwrap().data, orig);
    }

    /// Found by the fuzzer: a zero dimension beside a huge one gave an empty tensor with 2^40
    /// rows, and un-permuting it looped over every (empty) row.
    #[test]
    fn zero_dimensions_and_shape_mismatches_are_errors() {
        let info = TensorInfo {
            name: "t".into(),
            dims: vec![0, 1 << 40],
            type_id: 0,
            offset: 0,
        };
        let g = Gguf {
            version: 3,
            metadata: BTreeMap::new(),
            tensors: vec![info.clone()],
            data: &[],
        };
        assert!(g.tensor(&info).unwrap_err().contains("zero dimension"));
        let w = RawTensor {
            name: "q".into(),
            shape: vec![1 << 40, 0],
            data: vec![],
        };
        assert!(unpermute_rows(&w, 1)
            .unwrap_err()
            .contains("does not match"));
    }

    #[test]
    fn corrupt_headers_are_errors() {
        assert!(Gguf::parse(b"GGU").is_err());
        assert!(Gguf::parse(b"NOPE\x03\0\0\0")
            .unwrap_err()
            .contains("magic"));
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(u64::MAX.to_le_bytes()); // tensor count far beyond the file
        b.extend(0u64.to_le_bytes());
        assert!(Gguf::parse(&b).unwrap_err().contains("cannot fit"));
    }
}

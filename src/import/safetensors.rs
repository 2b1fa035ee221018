//! A checked safetensors reader for imported weights (the `safetensors` crate validates the header,
//! offsets and sizes); F32, F64, F16 and BF16 tensors are converted to f32. Pure Rust, so the fuzz
//! target can drive it without libtorch.

/// One tensor: name, shape (PyTorch order) and values as f32, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    /// The tensor's name in its file.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its values, row-major, as f32.
    pub data: Vec<f32>,
}

/// Parse a whole safetensors file. Errors say what is wrong and name the tensor where one is at
/// fault; they never panic on malformed input.
pub fn parse(bytes: &[u8]) -> Result<Vec<RawTensor>, String> {
    use safetensors::Dtype;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format!("not a valid safetensors file ({e})"))?;
    let mut out = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for name in names {
        let view = st
            .tensor(&name)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(format!(
                    "tensor `{name}` has dtype {other:?}; supported: F32, F64, F16, BF16"
                ))
            }
        };
        let shape = view.shape().to_vec();
        if shape.iter().product::<usize>() != data.len() {
            return Err(format!(
                "tensor `{name}`: shape {shape:?} does not match its {} values",
                data.len()
            ));
        }
        out.push(RawTensor { name, shape, data });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn reads_f32_f16_bf16_and_rejects_damage() {
        let mut data = Vec::new();
        for v in [1.0f32, -2.5] {
            data.extend_from_slice(&v.to_le_bytes());
        }
        data.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        data.extend_from_slice(&half::bf16::from_f32(-4.0).to_le_bytes());
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[1],"data_offsets":[8,10]},"c":{"dtype":"BF16","shape":[1,1],"data_offsets":[10,12]}}"#;
        let t = parse(&file(h, &data)).unwrap();
        assert_eq!(t[0].data, vec![1.0, -2.5]);
        assert_eq!(
            (t[1].data[0], t[2].data[0], t[2].shape.clone()),
            (0.5, -4.0, vec![1, 1])
        );
        // Truncated data, a header longer than the file, an unsupported dtype.
        assert!(parse(&file(h, &data[..11])).is_err());
        assert!(parse(&data[..6]).is_err());
        let i = r#"{"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#;
        let e = parse(&file(i, &[0, 0, 0, 0])).unwrap_err();
        assert!(e.contains("`a`") && e.contains("I32"), "{e}");
    }
}

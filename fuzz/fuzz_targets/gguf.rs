#![no_main]
//! Any bytes: the GGUF parser, every tensor's dequantisation and the tokenizer rebuild must
//! return (Ok or Err), never panic, hang or allocate beyond the input's size.
use libfuzzer_sys::fuzz_target;
use tailscope_fuzz::gguf_format::{tokenizer_json, unpermute_rows, Gguf};

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = Gguf::parse(data) {
        for t in &g.tensors {
            if let Ok(r) = g.tensor(t) {
                let _ = unpermute_rows(&r, (t.dims.len() % 3) + 1);
            }
        }
        let _ = tokenizer_json(&g);
    }
});

//! tailscope's pure-Rust weight readers, compiled from the library's own files.
#[path = "../../src/import/safetensors.rs"]
pub mod safetensors;

#[path = "../../src/import/gguf_format.rs"]
pub mod gguf_format;

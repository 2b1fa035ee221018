#![no_main]
//! Any bytes: the safetensors reader must return (Ok or Err), never panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tailscope_fuzz::safetensors::parse(data);
});

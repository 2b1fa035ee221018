#![no_main]
//! Any bytes as a TOML spec: a training spec (`train --config`) or a pipeline spec (`run`) must
//! parse or fail with a bad-input error naming the file (and line), never panic. The first byte
//! picks which.
use libfuzzer_sys::fuzz_target;
use tailscope::pipeline::Spec;
use tailscope::train::TrainSpec;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let path = std::env::temp_dir().join(format!("tailscope-fuzz-{}.toml", std::process::id()));
    std::fs::write(&path, body).expect("the temporary directory is writable");
    let err = if sel & 1 == 0 {
        TrainSpec::read(&path).err()
    } else {
        Spec::read(&path).err()
    };
    if let Some(e) = err {
        assert!(e.is_bad_input(), "{e}");
    }
});

#![no_main]
//! Any bytes as a corpus input: JSONL, CSV, TSV or text (line, paragraph or whole-file samples),
//! read and built into samples (ids, duplicates, sentence splitting, length filters) must return
//! Ok or a bad-input error naming the file, never panic or hang. The first byte picks the format,
//! unit and sentence splitting; the rest is the file.
use libfuzzer_sys::fuzz_target;
use tailscope::corpus::ingest::{read_records, IngestOptions, Unit};
use tailscope::corpus::{build, BuildOptions};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let ext = ["jsonl", "csv", "tsv", "txt"][usize::from(sel & 3)];
    let unit = [Unit::Line, Unit::Paragraph, Unit::File][usize::from((sel >> 2) % 3)];
    let path = std::env::temp_dir().join(format!("tailscope-fuzz-{}.{ext}", std::process::id()));
    std::fs::write(&path, body).expect("the temporary directory is writable");
    let opts = IngestOptions {
        unit,
        ..IngestOptions::default()
    };
    match read_records(&path, &opts) {
        Ok(records) => {
            let b = BuildOptions {
                sentences: sel & 0x40 != 0,
                ..BuildOptions::default()
            };
            if let Err(e) = build(ext, records, &b) {
                assert!(e.is_bad_input(), "{e}");
            }
        }
        Err(e) => assert!(e.is_bad_input() || e.to_string().contains("tailscope-fuzz"), "{e}"),
    }
});

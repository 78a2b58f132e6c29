//! A backup repository's `snapshot.json`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitsync::fuzz::snapshot_file(data));

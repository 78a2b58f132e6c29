//! An Axon backup's JSON files (backup manifest, metadata, applet data).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitsync::fuzz::axon_json(data));

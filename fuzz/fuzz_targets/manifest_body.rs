//! A manifest body as a peer sends it in GetManifests.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitsync::fuzz::manifest_body(data));

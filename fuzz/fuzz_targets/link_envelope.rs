//! A link envelope (and an item envelope) as a peer sends them (format 2).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitsync::fuzz::link_envelope(data));

//! An invite token as `clone` and `peer join` read it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitsync::fuzz::invite_token(data));

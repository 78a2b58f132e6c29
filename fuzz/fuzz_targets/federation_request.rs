//! Each Federation request message as the server decodes and checks it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitsync::fuzz::federation_request(data));

//! A sealed key file (identity/crypto passphrase sealing), header only: no scrypt.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitsync::fuzz::sealed_key(data));

//! A peer address (transport::PeerAddress).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| bitsync::fuzz::peer_address(data));

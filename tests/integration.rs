//! All integration tests, in one test binary (ripgrep's layout: `autotests =
//! false` and one `[[test]]` in Cargo.toml): one module per surface, sharing
//! the harness in `tests/support/`. One binary links the library once
//! instead of twelve times: on this 2-core machine `touch src/lib.rs &&
//! cargo test --no-run` went from 32-34 s to 8-13 s, and `cargo test` from
//! 5 min 7 s to 2 min 32 s (the slow Tor tests now overlap the others).
//!
//! Run one surface with `cargo test --test integration cli::`, one test
//! with its name (`cargo test --test integration round_trip_50_mib`).

mod support;

mod address_validation;
mod admin_tcp;
mod axon_format;
mod backup;
mod blind;
mod chunk_stores;
mod cli;
mod cli_io;
mod cli_status;
mod clone_instance;
mod federation;
mod format_vectors;
mod hostile_peer;
mod hybrid;
mod import_axon;
mod instance_config;
mod limits;
mod linkkeys;
mod load;
mod logs;
mod metrics;
mod netns;
mod replicator;
mod serve_binary;
mod tamper;
mod tor_e2e;
mod tor_network;

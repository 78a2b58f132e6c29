//! All integration tests, in one test binary (ripgrep's layout: `autotests =
//! false` and one `[[test]]` in Cargo.toml): one module per surface, sharing
//! the harness in `tests/support/`. One binary links the library once
//! instead of once per surface; docs/BENCHMARKS.md has the figures.
//!
//! Run one surface with `cargo test --test integration cli::`, one test
//! with its name (`cargo test --test integration round_trip_50_mib`).

mod support;

mod admin_tcp;
mod axon_format;
mod backup;
mod cli;
mod clone_instance;
mod federation;
mod import_axon;
mod replicator;
mod serve_binary;
mod tamper;
mod tor_e2e;
mod tor_network;

//! The one harness every integration test and bench shares: each helper is
//! defined here once.
//!
//! Tests reach it as `crate::support` (the test binary's root declares
//! `mod support;`); benches include it with
//! `#[path = "../tests/support/mod.rs"] mod support;`.
//!
//! - [`data`]: deterministic bytes, a byte flipper, walking data dirs;
//! - [`process`]: the real `bitsync` binary with a clean environment, run to
//!   completion within a deadline, its exit code and output captured;
//! - [`serve`]: `bitsync serve` as a child process, ready (bound, answering
//!   on its admin socket) when `start` returns, stopped on drop;
//! - [`admin`]: the Admin service over the Unix socket, with a stock grpcurl
//!   or the tonic client;
//! - [`node`]: data dirs driven in-process through the library;
//! - [`net`]: a loopback TCP proxy that counts bytes or slows the wire;
//! - [`netns`]: two network namespaces joined by a delayed, lossy,
//!   rate-limited or cut link (TUN devices and a forwarder of our own);
//! - [`seaweed`]: a real SeaweedFS (S3) and a client of its own for the bucket;
//! - [`procfs`]: a process's fds and RSS from /proc, the fd limit, `[limits]` in a config;
//! - [`wait`]: polling and awaiting with deadlines (every wait is bounded);
//! - [`watch`]: a node's metrics listener over HTTP, promtool, a real
//!   Prometheus server and headless Chromium;
//! - [`tornet`] (a private Tor network) and [`axon_fixture`] (an independent
//!   writer of Axon backups);
//! - [`bench`]: what the benches measure with (the binary under test, a
//!   timing runner with CPU and peak RSS, parallel item signing); reached as
//!   `support::bench::...`, not re-exported (its `bitsync` is not
//!   [`process::bitsync`]).
//!
//! Not every binary uses every helper.
#![allow(dead_code, unused_imports)]

pub mod admin;
pub mod axon_fixture;
pub mod bench;
pub mod data;
pub mod net;
pub mod netns;
pub mod node;
pub mod process;
pub mod procfs;
pub mod seaweed;
pub mod serve;
pub mod tornet;
pub mod wait;
pub mod watch;

pub use admin::*;
pub use data::*;
pub use net::*;
pub use node::*;
pub use process::*;
pub use procfs::*;
pub use serve::*;
pub use wait::*;
pub use watch::*;

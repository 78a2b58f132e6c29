//! # bitsync: a federation node
//!
//! A node holds an *instance*: an identity (RSA key pair), settings, a list of
//! trusted peers, and content stored as encrypted, content-addressed chunks
//! described by signed manifests. Nodes replicate instances from each other
//! over gRPC, inside mutual TLS pinned to node ids, on TCP or over Tor.
//!
//! ## The data path, one module per room
//!
//! The rooms are listed from the foundation up. A room uses only rooms
//! listed before it (of two on one line, the first is the lower; the three
//! of the first line are peers), never one after it:
//! a helper two rooms share moves towards the foundation, never sideways.
//! `.ci/check-layers` enforces this order and fails on any import that
//! breaks it or forms a circle.
//!
//! - [`error`] (one error type: which exit code and which gRPC status each
//!   kind becomes), [`durable`] (temp file, fsync, rename; syncfs), `proto`
//!   (the generated gRPC types).
//! - [`metrics`]: the node's Prometheus registry, which every room above
//!   records into.
//! - [`crypto`]: hashes, chunk/metadata encryption (AES-256-GCM), envelopes
//!   (RSA-OAEP), manifest signatures (RSA-PSS), passphrase sealing (scrypt).
//! - [`identity`]: the node key; node id = SHA-256 of the public key (SPKI DER).
//! - [`manifest`]: the signed description of an item; content id = SHA-256 of its body.
//! - `objects`: an S3-compatible bucket as named objects (settings, bounded
//!   time and sizes, errors that name bucket and key), shared by the chunk
//!   store and backup repositories in a bucket.
//! - `chunks` and [`store`]: the chunk store, one door with the rules
//!   (hash before write, re-hash on read, quarantine) over two backends (a
//!   chunk dir on disk, an S3-compatible bucket), and the SQLite database,
//!   the one owner of the schema (manifests, envelopes, chunk index, peers,
//!   the sequence counter); backup and clone-instance read and rekey through it.
//! - [`keyring`]: format 2's link keys in use: the node's own, unwrapped
//!   once at start, and making, receiving and opening the rest through the
//!   store (docs/FORMAT.md §4).
//! - [`config`] and [`node`]: a data dir opened as a node.
//! - `legacy` (Axon's cipher) and [`content`]: put, get, verify.
//! - [`tls`] and [`invite`]: certificates pinned to node ids; join tokens.
//! - [`tor`] and [`transport`]: byte streams to peers over TCP or Tor, and the
//!   one parser of peer addresses (what the dialer cannot dial is refused
//!   when it is given).
//! - [`replicator`]: the client half (clone, sync, mirrors), in rooms of its
//!   own: a synchronous planner, the transfer engine, mirror supervision.
//! - [`server`]: the gRPC services, Federation for peers and Admin for the
//!   operator (which drives the replicator).
//! - [`axon`]: reading Axon BBS backups for import.
//! - [`backup`]: offline copies: backup repositories (a directory or a
//!   bucket), restore, clone-instance, and importing Axon backups.
//! - [`cli`]: the `bitsync` command.
//! - `fuzz` (only in builds with `--cfg fuzzing`, as cargo-fuzz makes them):
//!   the entry points of the fuzz targets in `fuzz/`, one per parser of
//!   outside input; above every room, used by none.
//!
//! `docs/DESIGN.md` says why the design is as it is and what each kind of
//! party can and cannot do (the threat model, with the test that shows each
//! claim). The byte formats are specified in `docs/FORMAT.md` and the wire
//! protocol in `docs/PROTOCOL.md`.
//!
//! ## Invariants
//!
//! - A chunk is *present* only when its row exists in the database, and the
//!   row is written only after the file was hash-checked, renamed into place
//!   and synced. Reads re-hash; a bad chunk is quarantined, never served.
//! - Every change a peer may list takes a new sequence number in the same
//!   transaction, so a cursor paging by sequence never skips anything.
//! - No private key or passphrase is ever sent, logged or stored unsealed
//!   outside `node.key` (mode 0600).

// The rooms' docs link to their private items on purpose: this crate's docs
// are read with `cargo doc --document-private-items`.
#![allow(rustdoc::private_intra_doc_links)]

pub mod axon;
pub mod backup;
pub(crate) mod chunks;
pub mod cli;
pub mod config;
pub mod content;
pub mod crypto;
pub mod durable;
pub mod error;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzz;
pub mod identity;
pub mod invite;
pub mod keyring;
pub(crate) mod legacy;
pub mod manifest;
pub mod metrics;
pub mod node;
pub(crate) mod objects;
pub mod replicator;
pub mod server;
pub mod store;
pub mod tls;
pub mod tor;
pub mod transport;

/// Types generated from `proto/bitsync/v1/*.proto`.
#[allow(rustdoc::invalid_html_tags)] // the .proto comments are not rustdoc markup
pub mod proto {
    tonic::include_proto!("bitsync.v1");

    /// The encoded file descriptor set, served by gRPC reflection.
    pub(crate) const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("bitsync_descriptor");
}

pub use error::{Error, Result};

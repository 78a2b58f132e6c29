//! # bitsync: a federation node
//!
//! A node holds an *instance*: an identity (RSA key pair), settings, a list of
//! trusted peers, and content stored as encrypted, content-addressed chunks
//! described by signed manifests. Nodes replicate instances from each other
//! over gRPC, inside mutual TLS pinned to node ids, on TCP or over Tor.
//!
//! ## The data path, one module per room
//!
//! - [`identity`]: the node key; node id = SHA-256 of the public key (SPKI DER).
//! - [`crypto`]: hashes, chunk/metadata encryption (AES-256-GCM), envelopes
//!   (RSA-OAEP), manifest signatures (RSA-PSS), passphrase sealing (scrypt).
//! - [`manifest`]: the signed description of an item; content id = SHA-256 of its body.
//! - [`chunks`] and [`store`]: chunk files on disk, and the SQLite database
//!   (manifests, envelopes, chunk index, peers, the sequence cursor).
//! - [`durable`]: crash-safe writes (temp file, fsync, rename; syncfs).
//! - [`node`] and [`config`]: a data dir opened as a node.
//! - [`content`] (and [`legacy`] for Axon's cipher): put, get, verify.
//! - [`tls`], [`invite`] and [`server`]: the gRPC services (Federation for
//!   peers, Admin for the operator) inside mutual TLS pinned to node ids.
//! - [`transport`] and [`tor`]: byte streams to peers over TCP or Tor.
//! - [`replicator`]: the client half: clone, sync and mirrors.
//! - [`axon`]: reading Axon BBS backups for import.
//! - [`backup`]: offline copies: backup repositories, restore, clone-instance,
//!   and importing Axon backups.
//! - [`cli`]: the `bitsync` command.
//!
//! The byte formats are specified in `docs/FORMAT.md` and the wire protocol in
//! `docs/PROTOCOL.md`.
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

pub mod axon;
pub mod backup;
pub(crate) mod chunks;
pub mod cli;
pub mod config;
pub mod content;
pub mod crypto;
pub mod durable;
pub mod error;
pub mod identity;
pub mod invite;
pub(crate) mod legacy;
pub mod manifest;
pub mod node;
pub mod replicator;
pub mod server;
pub mod store;
pub mod tls;
pub mod tor;
pub mod transport;

/// Types generated from `proto/bitsync/v1/*.proto`.
pub mod proto {
    tonic::include_proto!("bitsync.v1");

    /// The encoded file descriptor set, served by gRPC reflection.
    pub(crate) const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("bitsync_descriptor");
}

pub use error::{Error, Result};

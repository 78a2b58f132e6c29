//! Reading Axon BBS applet backups, for `bitsync import-axon`.
//!
//! Axon BBS (the Django system bitsync replaces) backs its applets up with
//! `manage.py backup_applets` into a directory `backup_YYYYMMDD_HHMMSS/`:
//!
//! ```text
//! backup_manifest.json            {backup_date, total_*, applets: [name, …]}
//! <folder>/metadata.json          {id, name, code_manifest, created_at, …}
//! <folder>/chunks/<i>.chunk       ciphertext pieces of the applet's code
//! <folder>/applet_data.json       [{id, owner_username, data_manifest, last_updated, …}]
//! <folder>/data_chunks/<user>/<i>.chunk
//! <folder>/high_scores.json, shared_state.json   (not read here)
//! ```
//!
//! `<folder>` is the applet name with `/` and spaces turned into `_`.
//!
//! Every piece of content (an applet's code, a user's data for an applet) is
//! described by an Axon manifest: AES-256-CBC with PKCS7 over the whole
//! plaintext, the ciphertext cut into `chunk_size` pieces, each piece named by
//! its SHA-256, the AES key wrapped with RSA-OAEP-SHA256 once per recipient
//! under an MD5 key id ([`key_id`]), and the plaintext's SHA-256 as
//! `content_hash`. See [`AxonManifest`].
//!
//! The module is split in three steps, one file each, so that the importer
//! can report before it commits to anything:
//!
//! 1. [`open`] (`json.rs`) parses the JSON files and nothing else. It is strict: a missing
//!    or malformed required field is an error naming the file and the field,
//!    because a half-understood backup should not be half-imported.
//! 2. [`check_item`] (`pieces.rs`) hashes the pieces on disk and reports per piece, so a
//!    damaged backup can be described piece by piece without the key.
//! 3. [`unwrap_key`] and [`decrypt_item`] (`cipher.rs`) recover the plaintext, streaming,
//!    verifying every piece hash and the final content hash.
//!
//! A backup is outside input: every file is opened through `input.rs`, which
//! reads only regular files inside the backup folder (no FIFO, device or
//! symbolic link out) and bounds the size of each JSON file and piece.
//!
//! Unknown JSON fields are ignored everywhere. `high_scores.json` and
//! `shared_state.json` are not part of any item and are not read.

mod cipher;
mod input;
pub(crate) mod json;
mod pieces;

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

pub use cipher::{decrypt_item, key_id, unwrap_key};
pub use input::MAX_PIECE_SIZE;
pub use json::open;
pub use pieces::check_item;
pub(crate) use pieces::read_piece;

/// An opened Axon backup: everything the JSON files say, no chunk read yet.
#[derive(Clone, Debug)]
pub struct AxonBackup {
    /// The backup directory as given to [`open`].
    pub dir: PathBuf,
    /// `backup_date` from `backup_manifest.json`, as written (Axon writes
    /// `YYYYMMDD_HHMMSS` in the backing-up server's local time).
    pub backup_date: String,
    /// One item per applet's code, each followed by that applet's data
    /// instances, in the order of the manifest's `applets` list and of
    /// `applet_data.json`.
    pub items: Vec<AxonItem>,
}

/// What an item's plaintext is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AxonItemKind {
    /// The applet's code (`metadata.json` → `code_manifest`).
    AppletCode,
    /// One user's saved data for the applet (`applet_data.json`).
    AppletData {
        /// Axon's id of the data instance (a UUID in practice; an integer id
        /// is accepted and kept in decimal).
        instance_id: String,
        /// The owner's Axon username, which also names the chunk folder.
        owner_username: String,
    },
}

/// One encrypted piece of content in the backup.
#[derive(Clone, Debug)]
pub struct AxonItem {
    /// The applet's name as in `backup_manifest.json` (not the folder name).
    pub applet: String,
    pub kind: AxonItemKind,
    pub manifest: AxonManifest,
    /// Where piece `i` should be: `<folder>/chunks/<i>.chunk` or
    /// `<folder>/data_chunks/<user>/<i>.chunk`, one per `chunk_hashes` entry.
    /// Whether they exist is [`check_item`]'s business.
    pub chunk_paths: Vec<PathBuf>,
    /// For code, the applet's `created_at`; for data, the instance's
    /// `last_updated` (Axon keeps no creation time for data). As written by
    /// Axon (ISO 8601), `None` when absent or null.
    pub created_at: Option<String>,
    /// The backup folder, canonical: no piece is read from outside it.
    pub(crate) root: PathBuf,
}

impl AxonItem {
    /// A short human description for reports and errors:
    /// `applet 'chess'` or `data 'chess' of alice (id 5f0c…)`.
    pub fn label(&self) -> String {
        match &self.kind {
            AxonItemKind::AppletCode => format!("applet '{}'", self.applet),
            AxonItemKind::AppletData {
                instance_id,
                owner_username,
            } => {
                format!(
                    "data '{}' of {} (id {})",
                    self.applet, owner_username, instance_id
                )
            }
        }
    }
}

/// An Axon content manifest, decoded.
///
/// The plaintext is encrypted whole with AES-256-CBC and PKCS7 under `iv`;
/// the ciphertext is cut into pieces of `chunk_size` bytes (the last one
/// shorter); `chunk_hashes[i]` is the SHA-256 of piece `i`; `content_hash` is
/// the SHA-256 of the plaintext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AxonManifest {
    pub content_hash: [u8; 32],
    /// Axon always writes 262144. Pieces longer than this are refused, and
    /// an item whose `chunk_size` exceeds [`MAX_PIECE_SIZE`] is refused
    /// whole ([`AxonError::BadItem`]) before any piece is read.
    pub chunk_size: u32,
    pub chunk_hashes: Vec<[u8; 32]>,
    pub(crate) iv: [u8; 16],
    /// Key id ([`key_id`], as written in the file) → RSA-OAEP-SHA256
    /// ciphertext of the 32-byte AES key.
    pub encrypted_aes_keys: BTreeMap<String, Vec<u8>>,
}

/// The state of one piece on disk, as found by [`check_item`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkState {
    Ok,
    /// The file does not exist (Axon skips chunk folders it does not have).
    Missing,
    /// The file exists but is not the piece the manifest names: truncated,
    /// too long, or with a different SHA-256. `reason` says which.
    Corrupt {
        reason: String,
    },
}

/// Everything that can go wrong reading a backup. Each message names the file,
/// field, item or piece concerned and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum AxonError {
    /// A file could not be read (other than a missing chunk, which is
    /// reported as [`ChunkState::Missing`] or [`AxonError::PieceMissing`]).
    #[error("{}: {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    /// A JSON file larger than this bitsync reads (the limits are in
    /// `docs/FORMAT.md`); it was not read.
    #[error("{}: is {size} bytes, more than the {limit} bytes bitsync reads for this file; refused unread", path.display())]
    TooLarge {
        path: PathBuf,
        size: u64,
        limit: u64,
    },
    #[error("{}: not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A required field is missing, or a field has the wrong type or value.
    /// `field` is a path such as `code_manifest.chunk_hashes[3]` or
    /// `[0].data_manifest`.
    #[error("{}: field `{field}` {problem}", path.display())]
    Field {
        path: PathBuf,
        field: String,
        problem: String,
    },
    /// The private key's id is not among the item's envelopes: the item was
    /// not encrypted to this key.
    #[error(
        "{item}: no key envelope for this key (key id {key_id}); the item has envelopes for {}",
        if available.is_empty() { "no key at all".to_string() } else { available.join(", ") }
    )]
    NoEnvelope {
        item: String,
        key_id: String,
        available: Vec<String>,
    },
    /// The envelope for this key's id did not decrypt with it.
    #[error("{item}: the key envelope for key id {key_id} does not open with this key: {reason}")]
    Unwrap {
        item: String,
        key_id: String,
        reason: String,
    },
    #[error(
        "{item}: the key envelope for key id {key_id} holds {len} bytes, not a 32-byte AES-256 key"
    )]
    KeyLength {
        item: String,
        key_id: String,
        len: usize,
    },
    #[error("{item}: piece {index} is missing ({})", path.display())]
    PieceMissing {
        item: String,
        index: usize,
        path: PathBuf,
    },
    #[error("{item}: piece {index} is corrupt ({}): {reason}", path.display())]
    PieceCorrupt {
        item: String,
        index: usize,
        path: PathBuf,
        reason: String,
    },
    /// The item as a whole cannot be a CBC ciphertext (no pieces, a length
    /// that is not a whole number of blocks, pieces and hashes not matching).
    #[error("{item}: {problem}")]
    BadItem { item: String, problem: String },
    #[error(
        "{item}: the decrypted content has bad PKCS7 padding: wrong AES key, or a damaged backup"
    )]
    Padding { item: String },
    #[error("{item}: the decrypted content has SHA-256 {actual}, the manifest says {expected}: wrong AES key, or a damaged backup")]
    ContentHash {
        item: String,
        expected: String,
        actual: String,
    },
    /// Writing the plaintext to the caller's writer failed.
    #[error("{item}: writing the decrypted content failed: {source}")]
    Output {
        item: String,
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, AxonError>;

fn io_err(path: &Path, action: &'static str, source: io::Error) -> AxonError {
    AxonError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

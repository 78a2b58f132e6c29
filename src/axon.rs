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
//! The module is split in three steps so that the importer can report before
//! it commits to anything:
//!
//! 1. [`open`] parses the JSON files and nothing else. It is strict: a missing
//!    or malformed required field is an error naming the file and the field,
//!    because a half-understood backup should not be half-imported.
//! 2. [`check_item`] hashes the pieces on disk and reports per piece, so a
//!    damaged backup can be described piece by piece without the key.
//! 3. [`unwrap_key`] and [`decrypt_item`] recover the plaintext, streaming,
//!    verifying every piece hash and the final content hash.
//!
//! Unknown JSON fields are ignored everywhere. `high_scores.json` and
//! `shared_state.json` are not part of any item and are not read.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use aes::Aes256;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use cbc::cipher::consts::U16;
use cbc::cipher::inout::InOutBuf;
use cbc::cipher::{BlockDecryptMut, KeyIvInit};
use md5::Md5;
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::{Oaep, RsaPrivateKey, RsaPublicKey};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// The backup's top-level file.
const BACKUP_MANIFEST: &str = "backup_manifest.json";
/// Per applet: the applet's metadata, including its code manifest.
const METADATA: &str = "metadata.json";
/// Per applet, optional: the per-user data instances.
const APPLET_DATA: &str = "applet_data.json";

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
    /// Axon always writes 262144. Pieces longer than this are refused, which
    /// is what bounds memory while reading.
    pub chunk_size: u32,
    pub chunk_hashes: Vec<[u8; 32]>,
    pub iv: [u8; 16],
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

// ---------------------------------------------------------------------------
// open

/// Reads `backup_manifest.json`, each listed applet's `metadata.json` and, where
/// present, its `applet_data.json`, and returns every item with its decoded
/// manifest and the paths its pieces should be at. Reads no chunk file.
///
/// Fails on the first unreadable file or missing or malformed required field:
/// `backup_date` and `applets` in the backup manifest; `name` and
/// `code_manifest` in `metadata.json`; `id`, `owner_username` and
/// `data_manifest` in each `applet_data.json` entry; every field of every
/// content manifest. Also fails when a listed applet's `metadata.json` has a
/// different `name`, when two applets share a folder, or when a name cannot
/// be a single folder name (`..`, empty, …), since the backup's layout then
/// cannot say which files belong to which item.
pub fn open(dir: &Path) -> Result<AxonBackup> {
    let mpath = dir.join(BACKUP_MANIFEST);
    let mvalue = read_json(&mpath)?;
    let m = Obj::new(&mpath, String::new(), &mvalue)?;
    let backup_date = m.req_str("backup_date")?.to_owned();
    let applets = m.req_array("applets")?;

    // Settle every applet's folder first, so that two applets sharing one is
    // reported as such rather than as the first one's mismatched metadata.
    let mut folders: BTreeMap<String, (usize, &str)> = BTreeMap::new();
    let mut listed = Vec::with_capacity(applets.len());
    for (i, entry) in applets.iter().enumerate() {
        let field = format!("applets[{i}]");
        let name = entry
            .as_str()
            .ok_or_else(|| field_err(&mpath, &field, "is not a string"))?;
        let folder = folder_name(name);
        if !is_single_component(&folder) {
            return Err(field_err(
                &mpath,
                &field,
                format!("{name:?} does not give a usable folder name ({folder:?})"),
            ));
        }
        if let Some((j, other)) = folders.insert(folder.clone(), (i, name)) {
            return Err(field_err(
                &mpath,
                &field,
                format!(
                    "{name:?} and applets[{j}] {other:?} both map to the folder {folder:?}, \
                     so the backup holds only one of them; remove one from the list to import the other"
                ),
            ));
        }
        listed.push((name, folder));
    }

    let mut items = Vec::new();
    for (name, folder) in listed {
        read_applet(&dir.join(folder), name, &mut items)?;
    }
    Ok(AxonBackup {
        dir: dir.to_path_buf(),
        backup_date,
        items,
    })
}

/// Axon's folder name for an applet: `/` and spaces become `_`.
fn folder_name(applet: &str) -> String {
    applet.replace(['/', ' '], "_")
}

/// True when `s` names exactly one ordinary entry inside a folder (not empty,
/// `.`, `..`, nor anything containing a separator).
fn is_single_component(s: &str) -> bool {
    let mut c = Path::new(s).components();
    matches!((c.next(), c.next()), (Some(Component::Normal(n)), None) if n == s)
}

fn read_applet(applet_dir: &Path, name: &str, items: &mut Vec<AxonItem>) -> Result<()> {
    let mdpath = applet_dir.join(METADATA);
    let mdvalue = read_json(&mdpath)?;
    let md = Obj::new(&mdpath, String::new(), &mdvalue)?;
    let md_name = md.req_str("name")?;
    if md_name != name {
        return Err(field_err(
            &mdpath,
            "name",
            format!("is {md_name:?}, but {BACKUP_MANIFEST} lists this folder's applet as {name:?}"),
        ));
    }
    let manifest = parse_manifest(
        &mdpath,
        md.child_name("code_manifest"),
        md.req("code_manifest")?,
    )?;
    let created_at = md.opt_str("created_at")?.map(str::to_owned);
    let chunk_paths = piece_paths(&applet_dir.join("chunks"), manifest.chunk_hashes.len());
    items.push(AxonItem {
        applet: name.to_owned(),
        kind: AxonItemKind::AppletCode,
        manifest,
        chunk_paths,
        created_at,
    });

    let dpath = applet_dir.join(APPLET_DATA);
    let Some(dvalue) = read_json_if_present(&dpath)? else {
        return Ok(());
    };
    let list = dvalue
        .as_array()
        .ok_or_else(|| field_err(&dpath, "(top level)", "is not a list"))?;
    for (j, entry) in list.iter().enumerate() {
        let e = Obj::new(&dpath, format!("[{j}]"), entry)?;
        let instance_id = e.req_id("id")?;
        let owner_username = e.req_str("owner_username")?.to_owned();
        if !is_single_component(&owner_username) {
            return Err(e.err(
                "owner_username",
                format!("{owner_username:?} cannot name a folder under data_chunks/"),
            ));
        }
        let manifest = parse_manifest(
            &dpath,
            e.child_name("data_manifest"),
            e.req("data_manifest")?,
        )?;
        let created_at = e.opt_str("last_updated")?.map(str::to_owned);
        let chunk_paths = piece_paths(
            &applet_dir.join("data_chunks").join(&owner_username),
            manifest.chunk_hashes.len(),
        );
        items.push(AxonItem {
            applet: name.to_owned(),
            kind: AxonItemKind::AppletData {
                instance_id,
                owner_username,
            },
            manifest,
            chunk_paths,
            created_at,
        });
    }
    Ok(())
}

fn piece_paths(dir: &Path, n: usize) -> Vec<PathBuf> {
    (0..n).map(|i| dir.join(format!("{i}.chunk"))).collect()
}

/// Decodes an Axon manifest given either as a JSON object or as a JSON string
/// holding one (Django JSONFields sometimes hold double-encoded JSON).
fn parse_manifest(file: &Path, at: String, value: &Value) -> Result<AxonManifest> {
    let decoded;
    let value = match value {
        Value::String(s) => {
            decoded = serde_json::from_str::<Value>(s).map_err(|e| {
                field_err(file, &at, format!("is a string but not valid JSON: {e}"))
            })?;
            &decoded
        }
        v => v,
    };
    let o = Obj::new(file, at, value)?;

    let content_hash = o.req_hash("content_hash")?;

    let chunk_size = o.req("chunk_size")?;
    let chunk_size = chunk_size
        .as_u64()
        .filter(|n| (1..=u64::from(u32::MAX)).contains(n))
        .ok_or_else(|| {
            o.err(
                "chunk_size",
                format!("is {chunk_size}, not a positive whole number of bytes"),
            )
        })? as u32;

    let hashes = o.req_array("chunk_hashes")?;
    let mut chunk_hashes = Vec::with_capacity(hashes.len());
    for (i, h) in hashes.iter().enumerate() {
        let name = format!("chunk_hashes[{i}]");
        let s = h.as_str().ok_or_else(|| o.err(&name, "is not a string"))?;
        chunk_hashes.push(
            parse_hash(s).ok_or_else(|| o.err(&name, "is not 64 hex characters (a SHA-256)"))?,
        );
    }

    let iv_b64 = o.req_str("encryption_iv")?;
    let iv = decode_b64(iv_b64)
        .ok()
        .and_then(|v| <[u8; 16]>::try_from(v.as_slice()).ok())
        .ok_or_else(|| o.err("encryption_iv", "is not base64 of 16 bytes"))?;

    let keys = o.req("encrypted_aes_keys")?;
    let keys = keys
        .as_object()
        .ok_or_else(|| o.err("encrypted_aes_keys", "is not a JSON object"))?;
    let mut encrypted_aes_keys = BTreeMap::new();
    for (id, env) in keys {
        let name = format!("encrypted_aes_keys.{id}");
        let s = env
            .as_str()
            .ok_or_else(|| o.err(&name, "is not a string"))?;
        let bytes = decode_b64(s).map_err(|e| o.err(&name, format!("is not base64: {e}")))?;
        encrypted_aes_keys.insert(id.clone(), bytes);
    }

    Ok(AxonManifest {
        content_hash,
        chunk_size,
        chunk_hashes,
        iv,
        encrypted_aes_keys,
    })
}

fn parse_hash(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Base64 as Python's `base64.b64decode` reads it in practice: the standard
/// alphabet, whitespace (line breaks) ignored, padding optional.
fn decode_b64(s: &str) -> std::result::Result<Vec<u8>, base64::DecodeError> {
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    LENIENT.decode(compact)
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read(path).map_err(|e| io_err(path, "cannot read", e))?;
    serde_json::from_slice(&text).map_err(|source| AxonError::Json {
        path: path.to_path_buf(),
        source,
    })
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    match std::fs::read(path) {
        Ok(text) => serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| AxonError::Json {
                path: path.to_path_buf(),
                source,
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path, "cannot read", e)),
    }
}

fn io_err(path: &Path, action: &'static str, source: io::Error) -> AxonError {
    AxonError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

fn field_err(path: &Path, field: &str, problem: impl Into<String>) -> AxonError {
    AxonError::Field {
        path: path.to_path_buf(),
        field: field.to_owned(),
        problem: problem.into(),
    }
}

/// A JSON object being read, with the file and the path of fields leading to
/// it, so that every error names both.
struct Obj<'a> {
    file: &'a Path,
    at: String,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    fn new(file: &'a Path, at: String, value: &'a Value) -> Result<Self> {
        match value.as_object() {
            Some(map) => Ok(Obj { file, at, map }),
            None => {
                let field = if at.is_empty() {
                    "(top level)"
                } else {
                    at.as_str()
                };
                Err(field_err(file, field, "is not a JSON object"))
            }
        }
    }

    fn child_name(&self, key: &str) -> String {
        if self.at.is_empty() {
            key.to_owned()
        } else if key.starts_with('[') {
            format!("{}{key}", self.at)
        } else {
            format!("{}.{key}", self.at)
        }
    }

    fn err(&self, key: &str, problem: impl Into<String>) -> AxonError {
        field_err(self.file, &self.child_name(key), problem)
    }

    /// A required field: missing and null are both errors.
    fn req(&self, key: &str) -> Result<&'a Value> {
        match self.map.get(key) {
            None => Err(self.err(key, "is missing")),
            Some(Value::Null) => Err(self.err(key, "is null")),
            Some(v) => Ok(v),
        }
    }

    fn req_str(&self, key: &str) -> Result<&'a str> {
        self.req(key)?
            .as_str()
            .ok_or_else(|| self.err(key, "is not a string"))
    }

    fn req_array(&self, key: &str) -> Result<&'a Vec<Value>> {
        self.req(key)?
            .as_array()
            .ok_or_else(|| self.err(key, "is not a list"))
    }

    fn req_hash(&self, key: &str) -> Result<[u8; 32]> {
        parse_hash(self.req_str(key)?)
            .ok_or_else(|| self.err(key, "is not 64 hex characters (a SHA-256)"))
    }

    /// An id: a string, or a whole number kept in decimal.
    fn req_id(&self, key: &str) -> Result<String> {
        match self.req(key)? {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            Value::Number(n) if n.is_u64() || n.is_i64() => Ok(n.to_string()),
            _ => Err(self.err(key, "is not a non-empty string or a whole number")),
        }
    }

    /// An optional string: absent and null give `None`, other types are errors.
    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.err(key, "is not a string")),
        }
    }
}

// ---------------------------------------------------------------------------
// check_item

/// Hashes every piece of `item` on disk and says, per piece, whether it is the
/// piece the manifest names. Each file is streamed through SHA-256 with a
/// fixed buffer and never read past `chunk_size + 1` bytes.
///
/// A missing file is [`ChunkState::Missing`]; a file with the wrong length or
/// hash is [`ChunkState::Corrupt`]. Other I/O failures (permissions, a
/// directory where a file should be) are errors, since they say nothing about
/// the backup's content.
pub fn check_item(item: &AxonItem) -> Result<Vec<ChunkState>> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut states = Vec::with_capacity(item.chunk_paths.len());
    for (index, path) in item.chunk_paths.iter().enumerate() {
        let state = match File::open(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => ChunkState::Missing,
            Err(e) => return Err(io_err(path, "cannot open chunk", e)),
            Ok(file) => {
                let limit = u64::from(item.manifest.chunk_size);
                let mut reader = file.take(limit + 1);
                let mut hasher = Sha256::new();
                let mut len = 0u64;
                loop {
                    let n = match reader.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(io_err(path, "cannot read chunk", e)),
                    };
                    hasher.update(&buf[..n]);
                    len += n as u64;
                }
                match piece_problem(item, index, len, hasher.finalize().into()) {
                    None => ChunkState::Ok,
                    Some(reason) => ChunkState::Corrupt { reason },
                }
            }
        };
        states.push(state);
    }
    Ok(states)
}

/// Why piece `index`, `len` bytes long (at most `chunk_size + 1` read) with
/// SHA-256 `actual`, is not the piece the manifest names; `None` if it is.
fn piece_problem(item: &AxonItem, index: usize, len: u64, actual: [u8; 32]) -> Option<String> {
    let m = &item.manifest;
    let chunk_size = u64::from(m.chunk_size);
    let Some(expected) = m.chunk_hashes.get(index) else {
        return Some("the manifest has no hash for this piece".to_owned());
    };
    if len > chunk_size {
        return Some(format!(
            "longer than the manifest's chunk_size of {chunk_size} bytes"
        ));
    }
    if actual == *expected {
        return None;
    }
    let last = index + 1 == m.chunk_hashes.len();
    Some(if len == 0 {
        "empty file".to_owned()
    } else if !last && len < chunk_size {
        format!("truncated: {len} of {chunk_size} bytes (SHA-256 does not match)")
    } else {
        format!(
            "SHA-256 is {}, the manifest says {} ({len} bytes)",
            hex::encode(actual),
            hex::encode(expected)
        )
    })
}

// ---------------------------------------------------------------------------
// Keys

/// Axon's id for a public key: lowercase hex MD5 of the key serialized as a
/// SubjectPublicKeyInfo PEM (64-column base64, LF line ends) with surrounding
/// whitespace stripped. This is how Axon names the envelope meant for a key in
/// `encrypted_aes_keys`.
pub fn key_id(public_key: &RsaPublicKey) -> String {
    let pem = public_key
        .to_public_key_pem(LineEnding::LF)
        .expect("encoding an RSA public key as SubjectPublicKeyInfo cannot fail");
    hex::encode(Md5::digest(pem.trim().as_bytes()))
}

/// Recovers `item`'s AES key with `private_key`: finds the envelope under the
/// key's [`key_id`] (ids compared ignoring ASCII case) and opens it with
/// RSA-OAEP-SHA256 (MGF1-SHA256, no label), using blinding against timing
/// side channels.
///
/// Fails with [`AxonError::NoEnvelope`] when the item was not encrypted to
/// this key, which is the usual symptom of passing the wrong key file.
pub fn unwrap_key(item: &AxonItem, private_key: &RsaPrivateKey) -> Result<Zeroizing<[u8; 32]>> {
    let id = key_id(&private_key.to_public_key());
    let keys = &item.manifest.encrypted_aes_keys;
    let envelope = keys
        .get(&id)
        .or_else(|| {
            keys.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(&id))
                .map(|(_, v)| v)
        })
        .ok_or_else(|| AxonError::NoEnvelope {
            item: item.label(),
            key_id: id.clone(),
            available: keys.keys().cloned().collect(),
        })?;
    let plain = private_key
        .decrypt_blinded(&mut rand::thread_rng(), Oaep::new::<Sha256>(), envelope)
        .map(Zeroizing::new)
        .map_err(|e| AxonError::Unwrap {
            item: item.label(),
            key_id: id.clone(),
            reason: e.to_string(),
        })?;
    if plain.len() != 32 {
        return Err(AxonError::KeyLength {
            item: item.label(),
            key_id: id,
            len: plain.len(),
        });
    }
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&plain);
    Ok(key)
}

// ---------------------------------------------------------------------------
// decrypt_item

/// Decrypts `item` with its AES `key` into `out` and returns the plaintext
/// length.
///
/// Streams: one piece is read at a time (plus fewer than 16 bytes carried over
/// to the next when a piece does not end on an AES block), so memory is
/// bounded by `chunk_size`. Every piece's SHA-256 is checked before it is
/// decrypted, the PKCS7 padding at the end is checked, and finally the
/// plaintext's SHA-256 is compared with `content_hash`.
///
/// Plaintext is written to `out` as it is decrypted, before the final checks.
/// **On any error, what was written to `out` must be discarded**: it may be
/// incomplete, end in padding, or be the output of a wrong key.
pub fn decrypt_item(item: &AxonItem, key: &[u8; 32], out: &mut impl Write) -> Result<u64> {
    let m = &item.manifest;
    let n = item.chunk_paths.len();
    if n != m.chunk_hashes.len() {
        return Err(bad_item(
            item,
            format!(
                "{} piece paths for {} piece hashes",
                n,
                m.chunk_hashes.len()
            ),
        ));
    }
    if n == 0 {
        return Err(bad_item(
            item,
            "the manifest lists no pieces; an AES-CBC ciphertext is never empty",
        ));
    }
    let limit = u64::from(m.chunk_size);
    let mut dec = cbc::Decryptor::<Aes256>::new(key.into(), (&m.iv).into());
    let mut content = Sha256::new();
    // Bytes not yet decrypted: the carry from the previous piece (< 16 bytes),
    // then the current piece.
    let mut buf: Vec<u8> = Vec::new();
    let mut ciphertext_len = 0u64;
    let mut written = 0u64;

    for (index, path) in item.chunk_paths.iter().enumerate() {
        let carry = buf.len();
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(AxonError::PieceMissing {
                    item: item.label(),
                    index,
                    path: path.clone(),
                })
            }
            Err(e) => return Err(io_err(path, "cannot open chunk", e)),
        };
        // The file's size, where known, saves the buffer from growing by doubling.
        let hint = file.metadata().map(|m| m.len().min(limit + 1)).unwrap_or(0);
        buf.reserve(hint as usize);
        file.take(limit + 1)
            .read_to_end(&mut buf)
            .map_err(|e| io_err(path, "cannot read chunk", e))?;
        let piece = &buf[carry..];
        let actual: [u8; 32] = Sha256::digest(piece).into();
        if let Some(reason) = piece_problem(item, index, piece.len() as u64, actual) {
            return Err(AxonError::PieceCorrupt {
                item: item.label(),
                index,
                path: path.clone(),
                reason,
            });
        }
        ciphertext_len += piece.len() as u64;

        let last = index + 1 == n;
        let whole = buf.len() - buf.len() % 16;
        if last && whole != buf.len() {
            return Err(bad_item(
                item,
                format!("the ciphertext is {ciphertext_len} bytes, not a whole number of 16-byte AES blocks"),
            ));
        }
        let (blocks, _) = InOutBuf::from(&mut buf[..whole]).into_chunks::<U16>();
        dec.decrypt_blocks_inout_mut(blocks);

        let plain_end = if last {
            if whole == 0 {
                return Err(bad_item(
                    item,
                    "the last piece ends no AES block, so the padding cannot be found",
                ));
            }
            let pad = buf[whole - 1] as usize;
            if !(1..=16).contains(&pad)
                || buf[whole - pad..whole].iter().any(|&b| b as usize != pad)
            {
                return Err(AxonError::Padding { item: item.label() });
            }
            whole - pad
        } else {
            whole
        };
        let plain = &buf[..plain_end];
        content.update(plain);
        out.write_all(plain).map_err(|source| AxonError::Output {
            item: item.label(),
            source,
        })?;
        written += plain.len() as u64;
        buf.drain(..whole);
    }

    let actual: [u8; 32] = content.finalize().into();
    if actual != m.content_hash {
        return Err(AxonError::ContentHash {
            item: item.label(),
            expected: hex::encode(m.content_hash),
            actual: hex::encode(actual),
        });
    }
    Ok(written)
}

fn bad_item(item: &AxonItem, problem: impl Into<String>) -> AxonError {
    AxonError::BadItem {
        item: item.label(),
        problem: problem.into(),
    }
}

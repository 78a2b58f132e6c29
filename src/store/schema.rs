//! The schema, its version, and the check every open makes against it.
//!
//! This is the only place that knows the tables; everything else reads and
//! writes them through [`Db`](super::Db).

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::crypto::NodeId;
use crate::error::{Error, Result};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta(
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counters(
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters(name, value) VALUES ('seq', 0);
CREATE TABLE IF NOT EXISTS peers(
    node_id TEXT PRIMARY KEY,
    name TEXT NOT NULL DEFAULT '',
    address TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL CHECK (state IN ('trusted', 'revoked', 'imported')),
    mirror INTEGER NOT NULL DEFAULT 0,
    public_key BLOB,
    added_at_ms INTEGER NOT NULL,
    cursor INTEGER NOT NULL DEFAULT 0,
    kem_key BLOB,
    level TEXT NOT NULL DEFAULT 'keyed' CHECK (level IN ('keyed', 'blind')),
    role TEXT CHECK (role IN ('keyed', 'blind')));
CREATE TABLE IF NOT EXISTS manifests(
    content_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL UNIQUE,
    body BLOB NOT NULL,
    signature BLOB NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    chunk_count INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    publisher TEXT NOT NULL,
    added_at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS envelopes(
    content_id TEXT NOT NULL REFERENCES manifests(content_id),
    recipient TEXT NOT NULL,
    wrapped BLOB NOT NULL,
    PRIMARY KEY (content_id, recipient));
CREATE TABLE IF NOT EXISTS manifest_chunks(
    content_id TEXT NOT NULL REFERENCES manifests(content_id),
    idx INTEGER NOT NULL,
    chunk_id TEXT NOT NULL,
    PRIMARY KEY (content_id, idx));
CREATE INDEX IF NOT EXISTS manifest_chunks_by_chunk ON manifest_chunks(chunk_id);
CREATE TABLE IF NOT EXISTS chunks(
    chunk_id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    stored_at_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS invites(
    secret_hash TEXT PRIMARY KEY,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    used_by TEXT,
    level TEXT NOT NULL DEFAULT 'keyed' CHECK (level IN ('keyed', 'blind')));
"#;

/// What format 2 added (docs/FORMAT.md §4.4): also the whole of the 1 → 2 migration.
pub(super) const LINK_KEYS: &str = r#"
CREATE TABLE IF NOT EXISTS link_keys(
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    generation INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    sealed BLOB,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (sender, recipient, generation));
"#;

/// A cache of hash checks (FORMAT.md §4 "chunk_checks"), created by every
/// open of a node's own database: its rows are never needed, so a database
/// without it (older, or a copy) is read as one whose chunks are all unchecked.
pub(super) const CHUNK_CHECKS: &str = r#"
CREATE TABLE IF NOT EXISTS chunk_checks(
    chunk_id TEXT PRIMARY KEY,
    dev INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    checked_at_ms INTEGER NOT NULL);
"#;

/// What schema 3 added (FORMAT.md §7): a peer's pinned ML-KEM-768
/// encapsulation key, also the whole of the 2 → 3 migration.
const PEER_KEM_KEY: &str = "ALTER TABLE peers ADD COLUMN kem_key BLOB;";

/// What schema 4 added (FORMAT.md §4.8): the trust level of each peer and
/// of the peer each invite makes, and the role this node has at each
/// source (what the source gives it), also the whole of the 3 → 4 migration
/// with [`RELAYED_LINKS`]. Every row that exists when it runs is `keyed`,
/// which is what it was.
const TRUST_LEVELS: &str = "
ALTER TABLE peers ADD COLUMN level TEXT NOT NULL DEFAULT 'keyed' CHECK (level IN ('keyed', 'blind'));
ALTER TABLE peers ADD COLUMN role TEXT CHECK (role IN ('keyed', 'blind'));
ALTER TABLE invites ADD COLUMN level TEXT NOT NULL DEFAULT 'keyed' CHECK (level IN ('keyed', 'blind'));
";

/// Schema 4: the link envelopes a blind mirror keeps for other recipients
/// (FORMAT.md §4.9), with the public key of their maker.
pub(super) const RELAYED_LINKS: &str = r#"
CREATE TABLE IF NOT EXISTS relayed_links(
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    generation INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    sender_spki BLOB NOT NULL,
    PRIMARY KEY (sender, recipient, generation));
"#;

pub const SCHEMA_VERSION: &str = "4";
/// The version before link keys, which a writable open migrates in place.
const FORMAT_1: &str = "1";
/// The version before pinned ML-KEM keys (link envelopes `BLE2` only).
const FORMAT_2: &str = "2";
/// The version before trust levels (every trusted peer keyed).
const FORMAT_3: &str = "3";

/// Create the tables in a new (or empty) database and name its node.
pub(super) fn create(c: &Connection, node_id: &NodeId) -> Result<()> {
    c.execute_batch(SCHEMA)?;
    c.execute_batch(LINK_KEYS)?;
    c.execute_batch(CHUNK_CHECKS)?;
    c.execute_batch(RELAYED_LINKS)?;
    c.execute(
        "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?1), ('node_id', ?2)",
        params![SCHEMA_VERSION, node_id.to_hex()],
    )?;
    Ok(())
}

/// Refuse a file that is not a bitsync database of the version this build
/// reads. A schema-1, 2 or 3 database is migrated in place (one
/// transaction per step) when `writable`, and read as it is otherwise (a
/// snapshot's copy keeps its bytes; nothing read-only reads `kem_key` or
/// `level`).
pub(super) fn check(c: &mut Connection, path: &Path, writable: bool) -> Result<()> {
    let version: Option<String> = c
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| {
            Error::from(e).context(format!("{} is not a bitsync database", path.display()))
        })?;
    if matches!(
        version.as_deref(),
        Some(FORMAT_1) | Some(FORMAT_2) | Some(FORMAT_3)
    ) {
        if writable {
            if version.as_deref() == Some(FORMAT_1) {
                migrate_from_1(c)?;
            }
            if version.as_deref() != Some(FORMAT_3) {
                migrate_from_2(c)?;
            }
            migrate_from_3(c)?;
        }
        return Ok(());
    }
    if version.as_deref() != Some(SCHEMA_VERSION) {
        return Err(Error::invalid(format!(
            "{} has schema version {:?}; this bitsync reads {SCHEMA_VERSION}",
            path.display(),
            version
        )));
    }
    Ok(())
}

/// Schema 1 → 2 (FORMAT.md §4.6 step 1): the new table and the new version
/// commit together, so a kill at any point leaves version 1 or version 2.
fn migrate_from_1(c: &mut Connection) -> Result<()> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(LINK_KEYS)?;
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'schema_version' AND value = ?2",
        params![FORMAT_2, FORMAT_1],
    )?;
    tx.commit()?;
    tracing::info!("database migrated from schema 1 to 2 (link keys)");
    Ok(())
}

/// Schema 2 → 3: the `peers.kem_key` column and the new version commit
/// together (SQLite's ALTER TABLE is transactional).
fn migrate_from_2(c: &mut Connection) -> Result<()> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(PEER_KEM_KEY)?;
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'schema_version' AND value = ?2",
        params![FORMAT_3, FORMAT_2],
    )?;
    tx.commit()?;
    tracing::info!("database migrated from schema 2 to 3 (pinned ML-KEM keys)");
    Ok(())
}

/// Schema 3 → 4: the two `level` columns and the new version commit
/// together, so a kill at any point leaves version 3 or version 4.
fn migrate_from_3(c: &mut Connection) -> Result<()> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(TRUST_LEVELS)?;
    tx.execute_batch(RELAYED_LINKS)?;
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'schema_version' AND value = ?2",
        params![SCHEMA_VERSION, FORMAT_3],
    )?;
    tx.commit()?;
    tracing::info!("database migrated from schema 3 to 4 (trust levels)");
    Ok(())
}

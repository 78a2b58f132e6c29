//! The node's database: settings, trusted peers, manifests, envelopes, the
//! chunk index, invites, and the sequence counter the listing cursor pages by.
//!
//! SQLite in WAL mode with `synchronous=FULL`: a committed transaction is on
//! disk, which is what lets a replicator save its cursor only after the data
//! it covers is durable. Every write that changes what a peer may list bumps
//! the manifest's `seq` to the next value of one counter, inside the same
//! IMMEDIATE transaction. SQLite runs one writer at a time, so seqs commit in
//! order and a reader paging by `seq > cursor` can never skip a row: an item
//! whose envelopes change moves to a later seq and is listed again.
//!
//! This module owns the schema: backup, restore and clone-instance read and
//! change database copies through it too ([`Db::open_read_only`],
//! [`Db::open_copy`], [`Db::facts`], [`Db::rekey`]).
//!
//! The files: `schema.rs` (the tables and the version check), `manifests.rs`
//! (manifests, envelopes, the seq counter, listing by cursor), `peers.rs`
//! (the peer list and invites), `links.rs` (link keys, format 2), `chunk_index.rs` (which chunks are present),
//! `chunk_checks.rs` (when each chunk file last hashed right), `relay.rs`
//! (what a blind mirror keeps for other recipients),
//! `facts.rs` (what a database says about itself: stats, facts, integrity)
//! and `rekey.rs` (a copy's items re-wrapped for a new identity).

mod chunk_checks;
mod chunk_index;
mod facts;
mod links;
mod manifests;
mod peers;
mod rekey;
mod relay;
mod schema;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use crate::crypto::{Hash, NodeId};
use crate::error::{Error, Result};

pub use facts::integrity_problems;
pub use facts::{DbFacts, Stats};
pub use manifests::{Envelopes, RawManifest, Summary};
pub use peers::{KemPin, Level, Peer, PeerState};
pub use rekey::RekeyReport;
pub(crate) use relay::{MAX_RELAYED, MAX_RELAYED_LINKS};
pub use schema::SCHEMA_VERSION;

/// How long a statement waits for a lock (another writer, WAL recovery, a
/// checkpoint) before failing.
const BUSY_WAIT: Duration = Duration::from_secs(30);

/// The database. One connection writes, one reads; both are safe to share across threads.
pub struct Db {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
    /// For messages about a database that is not the node's own (a copy).
    path: PathBuf,
}

/// How a database file is opened.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// The node's own database: WAL, `synchronous=FULL`, foreign keys.
    Node,
    /// A copy being prepared (a restore, a clone with a new identity):
    /// read-write, but the file is never created and keeps its journal mode,
    /// so a rollback-journal copy stays one self-contained file.
    Copy,
    /// Nothing is created or changed, not even the journal mode, so a
    /// snapshot's database keeps the bytes its SHA-256 names.
    ReadOnly,
}

fn hex_id(s: String, what: &str) -> Result<Hash> {
    Hash::parse(&s, what)
        .map_err(|_| Error::integrity(format!("database holds a malformed {what}: {s:?}")))
}

fn connect(path: &Path, access: Access) -> Result<Connection> {
    let flags = match access {
        Access::Node => OpenFlags::default(),
        Access::Copy => OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        Access::ReadOnly => OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    };
    let c = Connection::open_with_flags(path, flags)
        .map_err(|e| Error::from(e).context(format!("opening {}", path.display())))?;
    c.busy_timeout(BUSY_WAIT)?;
    if access == Access::Node {
        c.pragma_update(None, "journal_mode", "WAL")?;
    }
    if access != Access::ReadOnly {
        c.pragma_update(None, "synchronous", "FULL")?;
        c.pragma_update(None, "foreign_keys", "ON")?;
    }
    Ok(c)
}

impl Db {
    /// Create the schema in a new database file (or an empty one).
    pub(crate) fn create(path: &Path, node_id: &NodeId) -> Result<Db> {
        let c = connect(path, Access::Node)?;
        schema::create(&c, node_id)?;
        drop(c);
        Db::open(path)
    }

    pub fn open(path: &Path) -> Result<Db> {
        if !path.exists() {
            return Err(Error::not_found(format!(
                "database {} does not exist",
                path.display()
            )));
        }
        Db::open_with(path, Access::Node)
    }

    /// Open a database only to read it (a live node's, or a snapshot's copy).
    /// Nothing is created: a missing file is NotFound.
    pub(crate) fn open_read_only(path: &Path) -> Result<Db> {
        Db::must_be_file(path)?;
        Db::open_with(path, Access::ReadOnly)
    }

    /// Open a database copy to change it before it becomes a node's (see
    /// [`Access::Copy`]). Nothing is created: a missing file is NotFound.
    pub(crate) fn open_copy(path: &Path) -> Result<Db> {
        Db::must_be_file(path)?;
        Db::open_with(path, Access::Copy)
    }

    fn must_be_file(path: &Path) -> Result<()> {
        if path.is_file() {
            return Ok(());
        }
        Err(Error::not_found(format!(
            "database {} does not exist",
            path.display()
        )))
    }

    fn open_with(path: &Path, access: Access) -> Result<Db> {
        let mut writer = connect(path, access)?;
        schema::check(&mut writer, path, access != Access::ReadOnly)?;
        if access == Access::Node {
            writer.execute_batch(schema::CHUNK_CHECKS)?;
        }
        let reader = connect(path, access)?;
        Ok(Db {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
            path: path.to_path_buf(),
        })
    }

    fn w(&self) -> MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn r(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reading connection, for SQLite's online backup API
    /// (`backup::dbcopy`), which copies pages and needs no knowledge of the schema.
    pub(crate) fn backup_source(&self) -> MutexGuard<'_, Connection> {
        self.r()
    }

    // ---- settings ----

    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .r()
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.w().execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES (?1, ?2)",
            params![key, value],
        )?;
        Ok(())
    }

    /// Settings a peer may see (no secrets are ever stored here).
    pub(crate) fn public_settings(&self) -> Result<Vec<(String, String)>> {
        let c = self.r();
        let mut st =
            c.prepare("SELECT key, value FROM meta WHERE key NOT LIKE 'secret%' ORDER BY key")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The node id the database belongs to (`meta.node_id`).
    pub(crate) fn node_id(&self) -> Result<NodeId> {
        let id = self
            .setting("node_id")?
            .ok_or_else(|| Error::integrity(format!("{} has no node id", self.path.display())))?;
        Hash::parse(&id, "node id")
    }
}

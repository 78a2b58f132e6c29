//! Consistent copies of a live database, and what backup, restore and
//! clone-instance read from (and change in) such a copy.
//!
//! A copy is taken with SQLite's online backup API in one step: the source
//! connection holds a single read transaction for the whole copy, which in WAL
//! mode never blocks the node's writer and sees every committed transaction,
//! including those still only in the `-wal` file (a file copy of `bitsync.db`
//! would lose those). The copy is switched to rollback-journal mode so it is
//! one self-contained file, checked with `PRAGMA integrity_check`, and fsynced.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use crate::crypto::{self, ChunkId, Hash, NodeId};
use crate::error::{Error, Result};
use crate::identity::Identity;

/// How long a copy waits for the source to become readable (WAL recovery, a
/// checkpoint holding an exclusive lock) before giving up.
const BUSY_WAIT: Duration = Duration::from_secs(30);

fn ctx(e: rusqlite::Error, what: impl std::fmt::Display) -> Error {
    Error::from(e).context(what)
}

/// Open a database only to read it. Nothing is created: a missing file is NotFound.
pub fn open_read_only(path: &Path) -> Result<Connection> {
    if !path.is_file() {
        return Err(Error::not_found(format!(
            "database {} does not exist",
            path.display()
        )));
    }
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| ctx(e, format!("opening {}", path.display())))?;
    c.busy_timeout(BUSY_WAIT)
        .map_err(|e| ctx(e, path.display()))?;
    Ok(c)
}

/// Copy the database at `src` (which may be in use by a running node) to the
/// new file `dst`, consistently. `dst` must not exist.
pub fn snapshot_db(src: &Path, dst: &Path) -> Result<()> {
    if dst.exists() {
        return Err(Error::exists(format!("{} already exists", dst.display())));
    }
    let from = open_read_only(src)?;
    // Fail early, with a clear message, on a file that is not a bitsync database.
    schema_version(&from)
        .map_err(|e| e.context(format!("{} is not a bitsync database", src.display())))?;
    let result = (|| {
        let mut to =
            Connection::open(dst).map_err(|e| ctx(e, format!("creating {}", dst.display())))?;
        {
            let b = rusqlite::backup::Backup::new(&from, &mut to)
                .map_err(|e| ctx(e, format!("starting the copy of {}", src.display())))?;
            let started = Instant::now();
            loop {
                use rusqlite::backup::StepResult::*;
                match b
                    .step(-1)
                    .map_err(|e| ctx(e, format!("copying {}", src.display())))?
                {
                    Done => break,
                    More => continue,
                    Busy | Locked if started.elapsed() < BUSY_WAIT => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        return Err(Error::unavailable(format!(
                            "{} stayed locked for {}s; retry when the node is less busy",
                            src.display(),
                            BUSY_WAIT.as_secs()
                        )))
                    }
                }
            }
        }
        // One self-contained file: no -wal or -shm beside it.
        let mode: String = to
            .query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))
            .map_err(|e| ctx(e, format!("{}", dst.display())))?;
        if !mode.eq_ignore_ascii_case("delete") {
            return Err(Error::io(format!(
                "{}: could not leave WAL mode (journal mode is {mode})",
                dst.display()
            )));
        }
        to.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| ctx(e, dst.display()))?;
        drop(to);
        super::fsync_file(dst)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
        let _ = std::fs::remove_file(dst.with_extension("db-journal"));
    }
    result
}

fn schema_version(c: &Connection) -> Result<String> {
    let v: Option<String> = c
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()
        .map_err(Error::from)?;
    match v {
        Some(v) if v == crate::store::SCHEMA_VERSION => Ok(v),
        Some(v) => Err(Error::invalid(format!(
            "schema version {v:?}; this bitsync reads {}",
            crate::store::SCHEMA_VERSION
        ))),
        None => Err(Error::invalid("it has no schema version")),
    }
}

/// `PRAGMA integrity_check` on a database file, opened read-only. An empty
/// list means it is sound; a file SQLite cannot read at all is one problem.
pub fn integrity_problems(path: &Path) -> Result<Vec<String>> {
    let c = open_read_only(path)?;
    let run = || -> rusqlite::Result<Vec<String>> {
        let mut st = c.prepare("PRAGMA integrity_check")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.collect()
    };
    match run() {
        Ok(lines) => Ok(lines.into_iter().filter(|l| l != "ok").collect()),
        Err(e) => Ok(vec![format!("not readable as a database: {e}")]),
    }
}

/// What backup, restore and clone-instance need to know about a database copy.
#[derive(Debug, Clone)]
pub struct DbFacts {
    pub node_id: NodeId,
    pub manifests: u64,
    pub head_seq: u64,
    /// Present chunks (id, ciphertext bytes), in id order.
    pub chunks: Vec<(ChunkId, u64)>,
    /// Trusted peers: (node id, name, address).
    pub trusted_peers: Vec<(String, String, String)>,
}

impl DbFacts {
    pub fn chunk_bytes(&self) -> u64 {
        self.chunks.iter().map(|(_, s)| s).sum()
    }
}

/// Read [`DbFacts`] from a bitsync database (read-only).
pub fn facts(path: &Path) -> Result<DbFacts> {
    let c = open_read_only(path)?;
    let what = |e: Error| e.context(format!("reading {}", path.display()));
    schema_version(&c).map_err(what)?;
    let node_id: String = c
        .query_row("SELECT value FROM meta WHERE key = 'node_id'", [], |r| {
            r.get(0)
        })
        .optional()
        .map_err(Error::from)
        .map_err(what)?
        .ok_or_else(|| Error::integrity(format!("{} has no node id", path.display())))?;
    let node_id = Hash::parse(&node_id, "node id").map_err(what)?;
    let manifests: i64 = c
        .query_row("SELECT COUNT(*) FROM manifests", [], |r| r.get(0))
        .map_err(Error::from)
        .map_err(what)?;
    let head_seq: i64 = c
        .query_row("SELECT value FROM counters WHERE name = 'seq'", [], |r| {
            r.get(0)
        })
        .map_err(Error::from)
        .map_err(what)?;
    let mut chunks = Vec::new();
    {
        let mut st = c
            .prepare("SELECT chunk_id, size FROM chunks ORDER BY chunk_id")
            .map_err(Error::from)
            .map_err(what)?;
        let rows = st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(Error::from)
            .map_err(what)?;
        for row in rows {
            let (id, size) = row.map_err(Error::from).map_err(what)?;
            let id = Hash::parse(&id, "chunk id").map_err(|_| {
                Error::integrity(format!(
                    "{} holds a malformed chunk id {id:?}",
                    path.display()
                ))
            })?;
            chunks.push((id, size as u64));
        }
    }
    let mut trusted_peers = Vec::new();
    {
        let mut st = c
            .prepare("SELECT node_id, name, address FROM peers WHERE state = 'trusted' ORDER BY added_at_ms, node_id")
            .map_err(Error::from)
            .map_err(what)?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(Error::from)
            .map_err(what)?;
        for row in rows {
            trusted_peers.push(row.map_err(Error::from).map_err(what)?);
        }
    }
    Ok(DbFacts {
        node_id,
        manifests: manifests as u64,
        head_seq: head_seq as u64,
        chunks,
        trusted_peers,
    })
}

/// What [`rekey`] changed.
#[derive(Debug, Default, Clone, Copy)]
pub struct RekeyReport {
    /// Items whose key was re-wrapped for the new identity.
    pub rewrapped: u64,
    /// Items with no envelope for the old identity (e.g. legacy items imported without their key).
    pub without_key: u64,
}

/// Give a database copy a new identity: every item the old node could open
/// gets an envelope for `new` (its key unwrapped with `old`), the old node's
/// own envelope is dropped, each changed item moves to a new seq (so a peer
/// paging by seq sees it again), and `meta.node_id` becomes the new id. One
/// transaction: on any failure nothing changes.
pub fn rekey(db: &Path, old: &Identity, new: &Identity) -> Result<RekeyReport> {
    let mut c = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| ctx(e, format!("opening {}", db.display())))?;
    c.busy_timeout(BUSY_WAIT).map_err(Error::from)?;
    c.pragma_update(None, "synchronous", "FULL")
        .map_err(Error::from)?;
    c.pragma_update(None, "foreign_keys", "ON")
        .map_err(Error::from)?;
    let stored: String = c
        .query_row("SELECT value FROM meta WHERE key = 'node_id'", [], |r| {
            r.get(0)
        })
        .map_err(|e| ctx(e, format!("reading the node id of {}", db.display())))?;
    if stored != old.id().to_hex() {
        return Err(Error::integrity(format!(
            "the snapshot's key ({}) does not belong to its database (which says {stored})",
            old.id()
        )));
    }
    let old_hex = old.id().to_hex();
    let new_hex = new.id().to_hex();
    let tx = c
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(Error::from)?;
    let rows: Vec<(String, Vec<u8>)> = {
        let mut st = tx
            .prepare(
                "SELECT e.content_id, e.wrapped FROM envelopes e JOIN manifests m ON m.content_id = e.content_id
                 WHERE e.recipient = ?1 ORDER BY m.seq",
            )
            .map_err(Error::from)?;
        let it = st
            .query_map([&old_hex], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(Error::from)?;
        it.collect::<rusqlite::Result<_>>().map_err(Error::from)?
    };
    let total: i64 = tx
        .query_row("SELECT COUNT(*) FROM manifests", [], |r| r.get(0))
        .map_err(Error::from)?;
    let mut report = RekeyReport::default();
    for (cid, wrapped) in &rows {
        let key = old.unwrap_key(wrapped).map_err(|e| {
            e.context(format!(
                "item {cid}: re-wrapping its key for the new identity"
            ))
        })?;
        let rewrapped = crypto::wrap_key(new.public(), &key);
        tx.execute(
            "INSERT OR REPLACE INTO envelopes(content_id, recipient, wrapped) VALUES (?1, ?2, ?3)",
            params![cid, new_hex, rewrapped],
        )
        .map_err(Error::from)?;
        tx.execute(
            "DELETE FROM envelopes WHERE content_id = ?1 AND recipient = ?2",
            params![cid, old_hex],
        )
        .map_err(Error::from)?;
        let seq: i64 = tx
            .query_row(
                "UPDATE counters SET value = value + 1 WHERE name = 'seq' RETURNING value",
                [],
                |r| r.get(0),
            )
            .map_err(Error::from)?;
        tx.execute(
            "UPDATE manifests SET seq = ?2 WHERE content_id = ?1",
            params![cid, seq],
        )
        .map_err(Error::from)?;
        report.rewrapped += 1;
    }
    report.without_key = total as u64 - report.rewrapped;
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE key = 'node_id'",
        [&new_hex],
    )
    .map_err(Error::from)?;
    // The old identity is not a peer of the new one unless the operator says so.
    tx.commit().map_err(Error::from)?;
    Ok(report)
}

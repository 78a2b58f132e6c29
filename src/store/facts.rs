//! What a database says about itself: the node's stats, the facts backup,
//! restore and clone-instance check a copy against, and `PRAGMA integrity_check`.

use std::path::Path;

use rusqlite::Connection;

use super::{connect, Access, Db};
use crate::crypto::{ChunkId, NodeId};
use crate::error::Result;

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub(crate) manifests: u64,
    pub chunks: u64,
    pub(crate) stored_bytes: u64,
    pub(crate) head_seq: u64,
    pub(crate) trusted_peers: u32,
}

/// What backup, restore and clone-instance need to know about a database copy.
#[derive(Debug, Clone)]
pub struct DbFacts {
    pub(crate) node_id: NodeId,
    pub(crate) manifests: u64,
    pub(crate) head_seq: u64,
    /// Present chunks (id, ciphertext bytes), in id order.
    pub(crate) chunks: Vec<(ChunkId, u64)>,
    /// Trusted peers: (node id, name, address).
    pub(crate) trusted_peers: Vec<(String, String, String)>,
}

impl DbFacts {
    pub(crate) fn chunk_bytes(&self) -> u64 {
        self.chunks.iter().map(|(_, s)| s).sum()
    }
}

impl Db {
    pub fn stats(&self) -> Result<Stats> {
        let c = self.r();
        let manifests: i64 = c.query_row("SELECT COUNT(*) FROM manifests", [], |r| r.get(0))?;
        let (chunks, bytes): (i64, i64) = c.query_row(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM chunks",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let head: i64 = c.query_row("SELECT value FROM counters WHERE name = 'seq'", [], |r| {
            r.get(0)
        })?;
        let trusted: i64 = c.query_row(
            "SELECT COUNT(*) FROM peers WHERE state = 'trusted'",
            [],
            |r| r.get(0),
        )?;
        Ok(Stats {
            manifests: manifests as u64,
            chunks: chunks as u64,
            stored_bytes: bytes as u64,
            head_seq: head as u64,
            trusted_peers: trusted as u32,
        })
    }

    /// The [`DbFacts`] of this database (usually a copy opened with
    /// [`Db::open_read_only`]). Errors name the file.
    pub(crate) fn facts(&self) -> Result<DbFacts> {
        let read = || -> Result<DbFacts> {
            Ok(DbFacts {
                node_id: self.node_id()?,
                manifests: self.manifest_count()?,
                head_seq: self.head_seq()?,
                chunks: self.chunk_list()?,
                trusted_peers: self.trusted_peer_rows()?,
            })
        };
        read().map_err(|e| e.context(format!("reading {}", self.path.display())))
    }

    fn manifest_count(&self) -> Result<u64> {
        let n: i64 = self
            .r()
            .query_row("SELECT COUNT(*) FROM manifests", [], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// Trusted peers as stored (ids not parsed), in the order they were added.
    fn trusted_peer_rows(&self) -> Result<Vec<(String, String, String)>> {
        let c = self.r();
        let mut st = c.prepare(
            "SELECT node_id, name, address FROM peers WHERE state = 'trusted' ORDER BY added_at_ms, node_id",
        )?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// `PRAGMA integrity_check`: an empty list means the database is sound.
    pub(crate) fn integrity_check(&self) -> Result<Vec<String>> {
        Ok(integrity_lines(&self.r())?)
    }
}

/// `PRAGMA integrity_check` on a database file, opened read-only, which need
/// not be a bitsync database (nor a database at all): an empty list means it
/// is sound; a file SQLite cannot read at all is one problem.
pub fn integrity_problems(path: &Path) -> Result<Vec<String>> {
    Db::must_be_file(path)?;
    let c = connect(path, Access::ReadOnly)?;
    match integrity_lines(&c) {
        Ok(lines) => Ok(lines),
        Err(e) => Ok(vec![format!("not readable as a database: {e}")]),
    }
}

fn integrity_lines(c: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut st = c.prepare("PRAGMA integrity_check")?;
    let rows = st.query_map([], |r| r.get::<_, String>(0))?;
    let lines: Vec<String> = rows.collect::<rusqlite::Result<_>>()?;
    Ok(lines.into_iter().filter(|l| l != "ok").collect())
}

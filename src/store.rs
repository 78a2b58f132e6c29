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

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::crypto::{ChunkId, ContentId, Hash, NodeId};
use crate::error::{Error, Result};
use crate::manifest::{now_ms, Manifest};

const SCHEMA: &str = r#"
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
    cursor INTEGER NOT NULL DEFAULT 0);
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
    used_by TEXT);
"#;

/// A stored manifest's signed bytes and its seq (see [`Db::manifest_raw`]).
pub struct RawManifest {
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
    pub seq: u64,
}

/// (recipient, wrapped item key) pairs of one item.
pub type Envelopes = Vec<(String, Vec<u8>)>;

pub const SCHEMA_VERSION: &str = "1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Trusted,
    Revoked,
    /// Learned from another node's peer list during a clone; not trusted until reviewed.
    Imported,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Trusted => "trusted",
            PeerState::Revoked => "revoked",
            PeerState::Imported => "imported",
        }
    }
    fn parse(s: &str) -> PeerState {
        match s {
            "trusted" => PeerState::Trusted,
            "revoked" => PeerState::Revoked,
            _ => PeerState::Imported,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub node_id: NodeId,
    pub name: String,
    pub address: String,
    pub state: PeerState,
    pub mirror: bool,
    /// SubjectPublicKeyInfo DER, once learned from a verified TLS handshake.
    pub public_key: Option<Vec<u8>>,
    pub added_at_ms: i64,
    /// The seq up to which everything from this peer is durably stored.
    pub cursor: u64,
}

/// One row of a manifest listing.
#[derive(Debug, Clone)]
pub struct Summary {
    pub content_id: ContentId,
    pub seq: u64,
    pub kind: String,
    pub size: u64,
    pub chunk_count: u32,
    pub created_at_ms: i64,
    pub publisher: NodeId,
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub manifests: u64,
    pub chunks: u64,
    pub stored_bytes: u64,
    pub head_seq: u64,
    pub trusted_peers: u32,
}

/// The database. One connection writes, one reads; both are safe to share across threads.
pub struct Db {
    writer: Mutex<Connection>,
    reader: Mutex<Connection>,
}

fn hex_id(s: String, what: &str) -> Result<Hash> {
    Hash::parse(&s, what)
        .map_err(|_| Error::integrity(format!("database holds a malformed {what}: {s:?}")))
}

fn connect(path: &Path) -> Result<Connection> {
    let c = Connection::open(path)
        .map_err(|e| Error::from(e).context(format!("opening {}", path.display())))?;
    c.busy_timeout(Duration::from_secs(30))?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    c.pragma_update(None, "foreign_keys", "ON")?;
    Ok(c)
}

impl Db {
    /// Create the schema in a new database file (or an empty one).
    pub fn create(path: &Path, node_id: &NodeId) -> Result<Db> {
        let c = connect(path)?;
        c.execute_batch(SCHEMA)?;
        c.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?1), ('node_id', ?2)",
            params![SCHEMA_VERSION, node_id.to_hex()],
        )?;
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
        let writer = connect(path)?;
        let version: Option<String> = writer
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| {
                Error::from(e).context(format!("{} is not a bitsync database", path.display()))
            })?;
        if version.as_deref() != Some(SCHEMA_VERSION) {
            return Err(Error::invalid(format!(
                "{} has schema version {:?}; this bitsync reads {SCHEMA_VERSION}",
                path.display(),
                version
            )));
        }
        let reader = connect(path)?;
        Ok(Db {
            writer: Mutex::new(writer),
            reader: Mutex::new(reader),
        })
    }

    fn w(&self) -> MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn r(&self) -> MutexGuard<'_, Connection> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
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
    pub fn public_settings(&self) -> Result<Vec<(String, String)>> {
        let c = self.r();
        let mut st =
            c.prepare("SELECT key, value FROM meta WHERE key NOT LIKE 'secret%' ORDER BY key")?;
        let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // ---- peers ----

    fn peer_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, Peer)> {
        let id: String = r.get(0)?;
        let state: String = r.get(3)?;
        Ok((
            id,
            Peer {
                node_id: Hash([0; 32]),
                name: r.get(1)?,
                address: r.get(2)?,
                state: PeerState::parse(&state),
                mirror: r.get::<_, i64>(4)? != 0,
                public_key: r.get(5)?,
                added_at_ms: r.get(6)?,
                cursor: r.get::<_, i64>(7)? as u64,
            },
        ))
    }

    const PEER_COLS: &'static str =
        "node_id, name, address, state, mirror, public_key, added_at_ms, cursor";

    /// Add or update a peer. Re-adding a revoked peer trusts it again.
    pub fn upsert_peer(
        &self,
        id: &NodeId,
        name: &str,
        address: &str,
        state: PeerState,
        mirror: bool,
    ) -> Result<Peer> {
        self.w().execute(
            "INSERT INTO peers(node_id, name, address, state, mirror, added_at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(node_id) DO UPDATE SET
               name = CASE WHEN excluded.name = '' THEN peers.name ELSE excluded.name END,
               address = CASE WHEN excluded.address = '' THEN peers.address ELSE excluded.address END,
               state = excluded.state,
               mirror = excluded.mirror OR peers.mirror",
            params![id.to_hex(), name, address, state.as_str(), mirror as i64, now_ms()],
        )?;
        self.peer(id)?
            .ok_or_else(|| Error::io("peer vanished after insert"))
    }

    /// Record a peer learned from another node, unless this node already knows it.
    pub fn import_peer(&self, id: &NodeId, name: &str, address: &str) -> Result<bool> {
        let n = self.w().execute(
            "INSERT OR IGNORE INTO peers(node_id, name, address, state, added_at_ms) VALUES (?1, ?2, ?3, 'imported', ?4)",
            params![id.to_hex(), name, address, now_ms()],
        )?;
        Ok(n > 0)
    }

    pub fn revoke_peer(&self, id: &NodeId) -> Result<Peer> {
        let n = self.w().execute(
            "UPDATE peers SET state = 'revoked', mirror = 0 WHERE node_id = ?1",
            [id.to_hex()],
        )?;
        if n == 0 {
            return Err(Error::not_found(format!(
                "node {id} is not in the peer list (see `bitsync peer ls`)"
            )));
        }
        self.peer(id)?
            .ok_or_else(|| Error::io("peer vanished after update"))
    }

    pub fn peer(&self, id: &NodeId) -> Result<Option<Peer>> {
        let c = self.r();
        let sql = format!("SELECT {} FROM peers WHERE node_id = ?1", Self::PEER_COLS);
        let row = c
            .query_row(&sql, [id.to_hex()], Self::peer_from_row)
            .optional()?;
        Ok(row.map(|(_, mut p)| {
            p.node_id = *id;
            p
        }))
    }

    pub fn peers(&self) -> Result<Vec<Peer>> {
        let c = self.r();
        let sql = format!(
            "SELECT {} FROM peers ORDER BY added_at_ms, node_id",
            Self::PEER_COLS
        );
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map([], Self::peer_from_row)?;
        let mut out = Vec::new();
        for row in rows {
            let (id, mut p) = row?;
            p.node_id = hex_id(id, "node id")?;
            out.push(p);
        }
        Ok(out)
    }

    /// Is this node a trusted peer right now? Checked on every call and every streamed message.
    pub fn is_trusted(&self, id: &NodeId) -> Result<bool> {
        let state: Option<String> = self
            .r()
            .query_row(
                "SELECT state FROM peers WHERE node_id = ?1",
                [id.to_hex()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(state.as_deref() == Some("trusted"))
    }

    /// Remember a peer's public key after its TLS handshake proved the key hashes to its id.
    pub fn set_peer_key(&self, id: &NodeId, spki: &[u8]) -> Result<()> {
        self.w().execute(
            "UPDATE peers SET public_key = ?2 WHERE node_id = ?1 AND (public_key IS NULL OR public_key != ?2)",
            params![id.to_hex(), spki],
        )?;
        Ok(())
    }

    pub fn set_cursor(&self, id: &NodeId, cursor: u64) -> Result<()> {
        self.w().execute(
            "UPDATE peers SET cursor = ?2 WHERE node_id = ?1",
            params![id.to_hex(), cursor as i64],
        )?;
        Ok(())
    }

    // ---- manifests and envelopes ----

    fn bump_seq(tx: &rusqlite::Transaction<'_>) -> Result<u64> {
        let v: i64 = tx.query_row(
            "UPDATE counters SET value = value + 1 WHERE name = 'seq' RETURNING value",
            [],
            |r| r.get(0),
        )?;
        Ok(v as u64)
    }

    /// Store a verified manifest and envelopes; chunks listed in `present` are
    /// recorded as present (the caller wrote and synced them). Idempotent: a
    /// known manifest only gains the envelopes it lacks. Returns the item's seq
    /// if anything changed.
    pub fn insert_manifest(
        &self,
        m: &Manifest,
        envelopes: &[(String, Vec<u8>)],
        present: &[(ChunkId, u64)],
    ) -> Result<Option<u64>> {
        let mut c = self.w();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let seq = Self::insert_manifest_in(&tx, m, envelopes, present)?;
        tx.commit()?;
        Ok(seq)
    }

    /// [`insert_manifest`](Self::insert_manifest) for many items in one
    /// transaction (one fsync): what a replicator receiving many small items
    /// uses. Seqs are taken in the order given.
    pub fn insert_manifests(&self, items: &[(&Manifest, Envelopes)]) -> Result<Vec<Option<u64>>> {
        let mut c = self.w();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut out = Vec::with_capacity(items.len());
        for (m, envelopes) in items {
            out.push(Self::insert_manifest_in(&tx, m, envelopes, &[])?);
        }
        tx.commit()?;
        Ok(out)
    }

    fn insert_manifest_in(
        tx: &rusqlite::Transaction<'_>,
        m: &Manifest,
        envelopes: &[(String, Vec<u8>)],
        present: &[(ChunkId, u64)],
    ) -> Result<Option<u64>> {
        let cid = m.id().to_hex();
        let now = now_ms();
        for (id, size) in present {
            tx.execute(
                "INSERT OR IGNORE INTO chunks(chunk_id, size, stored_at_ms) VALUES (?1, ?2, ?3)",
                params![id.to_hex(), *size as i64, now],
            )?;
        }
        let exists: bool = tx
            .query_row(
                "SELECT 1 FROM manifests WHERE content_id = ?1",
                [&cid],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        let mut changed = !exists;
        if !exists {
            let seq = Self::bump_seq(tx)?;
            let b = m.body();
            tx.execute(
                "INSERT INTO manifests(content_id, seq, body, signature, kind, size, chunk_count, created_at_ms, publisher, added_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    cid,
                    seq as i64,
                    m.body_bytes(),
                    m.signature(),
                    b.kind,
                    b.size as i64,
                    m.chunk_count() as i64,
                    b.created_at_ms,
                    m.publisher().to_hex(),
                    now
                ],
            )?;
            let mut st = tx.prepare(
                "INSERT INTO manifest_chunks(content_id, idx, chunk_id) VALUES (?1, ?2, ?3)",
            )?;
            for (i, id) in m.chunk_ids().enumerate() {
                st.execute(params![cid, i as i64, id.to_hex()])?;
            }
        }
        for (recipient, wrapped) in envelopes {
            let n = tx.execute(
                "INSERT OR IGNORE INTO envelopes(content_id, recipient, wrapped) VALUES (?1, ?2, ?3)",
                params![cid, recipient, wrapped],
            )?;
            changed |= n > 0;
        }
        let seq = if changed && exists {
            let seq = Self::bump_seq(tx)?;
            tx.execute(
                "UPDATE manifests SET seq = ?2 WHERE content_id = ?1",
                params![cid, seq as i64],
            )?;
            Some(seq)
        } else if changed {
            Some(tx.query_row(
                "SELECT seq FROM manifests WHERE content_id = ?1",
                [&cid],
                |r| r.get::<_, i64>(0),
            )? as u64)
        } else {
            None
        };
        Ok(seq)
    }

    /// Add envelopes (the just-in-time rekeys of one batch) in one
    /// transaction; each one added moves its item to a new seq. Returns, per
    /// row, the item's new seq, or None if an envelope was already there.
    pub fn add_envelopes(&self, rows: &[(ContentId, String, Vec<u8>)]) -> Result<Vec<Option<u64>>> {
        let mut c = self.w();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut out = Vec::with_capacity(rows.len());
        for (content_id, recipient, wrapped) in rows {
            let cid = content_id.to_hex();
            let n = tx.execute(
                "INSERT OR IGNORE INTO envelopes(content_id, recipient, wrapped) VALUES (?1, ?2, ?3)",
                params![cid, recipient, wrapped],
            )?;
            if n > 0 {
                let seq = Self::bump_seq(&tx)?;
                tx.execute(
                    "UPDATE manifests SET seq = ?2 WHERE content_id = ?1",
                    params![cid, seq as i64],
                )?;
                out.push(Some(seq));
            } else {
                out.push(None);
            }
        }
        tx.commit()?;
        Ok(out)
    }

    /// The envelope of an item for one recipient, if stored.
    pub fn envelope(&self, content_id: &ContentId, recipient: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .r()
            .prepare_cached(
                "SELECT wrapped FROM envelopes WHERE content_id = ?1 AND recipient = ?2",
            )?
            .query_row(params![content_id.to_hex(), recipient], |r| r.get(0))
            .optional()?)
    }

    /// A stored manifest as raw bytes, not re-verified. For serving only:
    /// every receiver verifies the signature itself.
    pub fn manifest_raw(&self, id: &ContentId) -> Result<Option<RawManifest>> {
        Ok(self
            .r()
            .prepare_cached("SELECT body, signature, seq FROM manifests WHERE content_id = ?1")?
            .query_row([id.to_hex()], |r| {
                Ok(RawManifest {
                    body: r.get(0)?,
                    signature: r.get(1)?,
                    seq: r.get::<_, i64>(2)? as u64,
                })
            })
            .optional()?)
    }

    /// The current seq of an item.
    pub fn seq_of(&self, id: &ContentId) -> Result<Option<u64>> {
        let seq: Option<i64> = self
            .r()
            .prepare_cached("SELECT seq FROM manifests WHERE content_id = ?1")?
            .query_row([id.to_hex()], |r| r.get(0))
            .optional()?;
        Ok(seq.map(|s| s as u64))
    }

    pub fn has_manifest(&self, id: &ContentId) -> Result<bool> {
        Ok(self
            .r()
            .query_row(
                "SELECT 1 FROM manifests WHERE content_id = ?1",
                [id.to_hex()],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Load a manifest and re-verify its signature (the database is not trusted blindly).
    pub fn manifest(&self, id: &ContentId) -> Result<Option<(Manifest, u64)>> {
        let row: Option<(Vec<u8>, Vec<u8>, i64)> = self
            .r()
            .query_row(
                "SELECT body, signature, seq FROM manifests WHERE content_id = ?1",
                [id.to_hex()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((body, sig, seq)) = row else {
            return Ok(None);
        };
        let m = Manifest::from_signed(body, sig)?;
        if m.id() != *id {
            return Err(Error::integrity(format!(
                "stored manifest {id} hashes to {}: it was altered",
                m.id()
            )));
        }
        Ok(Some((m, seq as u64)))
    }

    /// Up to `limit` summaries with seq > `after`, in seq order.
    pub fn list_after(&self, after: u64, limit: u32) -> Result<Vec<Summary>> {
        let c = self.r();
        let mut st = c.prepare_cached(
            "SELECT content_id, seq, kind, size, chunk_count, created_at_ms, publisher FROM manifests
             WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        )?;
        let rows = st.query_map(params![after as i64, limit as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, String>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (cid, seq, kind, size, count, created, publisher) = row?;
            out.push(Summary {
                content_id: hex_id(cid, "content id")?,
                seq: seq as u64,
                kind,
                size: size as u64,
                chunk_count: count as u32,
                created_at_ms: created,
                publisher: hex_id(publisher, "node id")?,
            });
        }
        Ok(out)
    }

    pub fn head_seq(&self) -> Result<u64> {
        Ok(self
            .r()
            .query_row("SELECT value FROM counters WHERE name = 'seq'", [], |r| {
                r.get::<_, i64>(0)
            })? as u64)
    }

    /// Every content id, in seq order (for verify, backup and rekeying).
    pub fn content_ids(&self) -> Result<Vec<ContentId>> {
        let c = self.r();
        let mut st = c.prepare("SELECT content_id FROM manifests ORDER BY seq")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        rows.map(|r| hex_id(r?, "content id")).collect()
    }

    // ---- chunks ----

    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        Ok(self
            .r()
            .prepare_cached("SELECT 1 FROM chunks WHERE chunk_id = ?1")?
            .query_row([id.to_hex()], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Record chunks that were written and synced.
    pub fn record_chunks(&self, chunks: &[(ChunkId, u64)]) -> Result<()> {
        let mut c = self.w();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO chunks(chunk_id, size, stored_at_ms) VALUES (?1, ?2, ?3)",
            )?;
            let now = now_ms();
            for (id, size) in chunks {
                st.execute(params![id.to_hex(), *size as i64, now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Forget a chunk (it failed its hash and was quarantined).
    pub fn forget_chunk(&self, id: &ChunkId) -> Result<()> {
        self.w()
            .execute("DELETE FROM chunks WHERE chunk_id = ?1", [id.to_hex()])?;
        Ok(())
    }

    /// Chunks of this item not present yet, in order.
    pub fn missing_chunks(&self, content_id: &ContentId) -> Result<Vec<(u32, ChunkId)>> {
        let c = self.r();
        let mut st = c.prepare_cached(
            "SELECT mc.idx, mc.chunk_id FROM manifest_chunks mc LEFT JOIN chunks c ON c.chunk_id = mc.chunk_id
             WHERE mc.content_id = ?1 AND c.chunk_id IS NULL ORDER BY mc.idx",
        )?;
        let rows = st.query_map([content_id.to_hex()], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        rows.map(|r| {
            let (i, id) = r?;
            Ok((i as u32, hex_id(id, "chunk id")?))
        })
        .collect()
    }

    /// Every present chunk with its size, in id order (for verify and backup).
    pub fn chunk_list(&self) -> Result<Vec<(ChunkId, u64)>> {
        let c = self.r();
        let mut st = c.prepare("SELECT chunk_id, size FROM chunks ORDER BY chunk_id")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        rows.map(|r| {
            let (id, size) = r?;
            Ok((hex_id(id, "chunk id")?, size as u64))
        })
        .collect()
    }

    /// Whether every chunk of `m` is present (for manifests not yet stored).
    pub fn is_complete_list(&self, m: &Manifest) -> Result<bool> {
        for c in m.chunk_ids() {
            if !self.has_chunk(&c)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub fn is_complete(&self, content_id: &ContentId) -> Result<bool> {
        Ok(self.missing_chunks(content_id)?.is_empty())
    }

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

    /// `PRAGMA integrity_check`: an empty list means the database is sound.
    pub fn integrity_check(&self) -> Result<Vec<String>> {
        let c = self.r();
        let mut st = c.prepare("PRAGMA integrity_check")?;
        let rows = st.query_map([], |r| r.get::<_, String>(0))?;
        let out: Vec<String> = rows.collect::<rusqlite::Result<_>>()?;
        Ok(out.into_iter().filter(|l| l != "ok").collect())
    }

    // ---- invites ----

    pub fn create_invite(&self, secret_hash: &Hash, expires_at_ms: i64) -> Result<()> {
        self.w().execute(
            "INSERT INTO invites(secret_hash, created_at_ms, expires_at_ms) VALUES (?1, ?2, ?3)",
            params![secret_hash.to_hex(), now_ms(), expires_at_ms],
        )?;
        Ok(())
    }

    /// Redeem an invite for `joiner`: trusts it and burns the invite, atomically.
    pub fn redeem_invite(
        &self,
        secret_hash: &Hash,
        joiner: &NodeId,
        name: &str,
        address: &str,
    ) -> Result<()> {
        let mut c = self.w();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<(i64, Option<String>)> = tx
            .query_row(
                "SELECT expires_at_ms, used_by FROM invites WHERE secret_hash = ?1",
                [secret_hash.to_hex()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match row {
            None => return Err(Error::auth("invite secret is not valid for this node")),
            Some((_, Some(_))) => {
                return Err(Error::auth("invite was already used; ask for a new one"))
            }
            Some((exp, None)) if exp < now_ms() => {
                return Err(Error::auth("invite has expired; ask for a new one"))
            }
            _ => {}
        }
        tx.execute(
            "UPDATE invites SET used_by = ?2 WHERE secret_hash = ?1",
            params![secret_hash.to_hex(), joiner.to_hex()],
        )?;
        tx.execute(
            "INSERT INTO peers(node_id, name, address, state, added_at_ms) VALUES (?1, ?2, ?3, 'trusted', ?4)
             ON CONFLICT(node_id) DO UPDATE SET state = 'trusted',
               name = CASE WHEN excluded.name = '' THEN peers.name ELSE excluded.name END,
               address = CASE WHEN excluded.address = '' THEN peers.address ELSE excluded.address END",
            params![joiner.to_hex(), name, address, now_ms()],
        )?;
        tx.commit()?;
        Ok(())
    }
}

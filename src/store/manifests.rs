//! Manifests, their envelopes, and the seq counter a peer's cursor pages by.
//!
//! Every change a peer may list (a new manifest, a new envelope) takes the
//! next value of the one `seq` counter in the same transaction: see
//! [`bump_seq`] and [`move_to_new_seq`], the only two places that touch it.

use rusqlite::{params, OptionalExtension, Transaction, TransactionBehavior};

use super::{hex_id, Db};
use crate::crypto::{ChunkId, ContentId, NodeId};
use crate::error::{Error, Result};
use crate::manifest::{now_ms, Manifest};

/// A stored manifest's signed bytes and its seq (see [`Db::manifest_raw`]).
pub struct RawManifest {
    pub(crate) body: Vec<u8>,
    pub(crate) signature: Vec<u8>,
    pub(crate) seq: u64,
}

/// (recipient, wrapped item key) pairs of one item.
pub type Envelopes = Vec<(String, Vec<u8>)>;

/// One row of a manifest listing.
#[derive(Debug, Clone)]
pub struct Summary {
    pub(crate) content_id: ContentId,
    pub seq: u64,
    pub(crate) kind: String,
    pub(crate) size: u64,
    pub(crate) chunk_count: u32,
    pub(crate) created_at_ms: i64,
    pub(crate) publisher: NodeId,
}

/// A summary with what a listing shows beside it ([`Db::listing_after`]).
pub(crate) struct ListingRow {
    pub(crate) summary: Summary,
    /// The stored (signed) manifest body.
    pub(crate) body: Vec<u8>,
    /// The envelope for the recipient asked about, if it has one.
    pub(crate) envelope: Option<Vec<u8>>,
    /// Every chunk of the item is present.
    pub(crate) complete: bool,
}

/// The columns of a [`Summary`], in the order [`SummaryRow::read`] takes them.
const SUMMARY_COLUMNS: &str =
    "m.content_id, m.seq, m.kind, m.size, m.chunk_count, m.created_at_ms, m.publisher";

/// A [`Summary`] as SQLite returns it, before its ids are parsed.
struct SummaryRow(String, i64, String, i64, i64, i64, String);

impl SummaryRow {
    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<SummaryRow> {
        Ok(SummaryRow(
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
        ))
    }

    fn summary(self) -> Result<Summary> {
        let SummaryRow(cid, seq, kind, size, count, created, publisher) = self;
        Ok(Summary {
            content_id: hex_id(cid, "content id")?,
            seq: seq as u64,
            kind,
            size: size as u64,
            chunk_count: count as u32,
            created_at_ms: created,
            publisher: hex_id(publisher, "node id")?,
        })
    }
}

/// The largest seq the store can hold (seqs are SQLite integers).
const MAX_SEQ: u64 = i64::MAX as u64;

/// A seq from outside (a peer's `after_seq`) as the SQLite integer it is
/// compared with; out of range is `Invalid`, never wrapped.
fn seq_param(seq: u64) -> Result<i64> {
    i64::try_from(seq).map_err(|_| {
        Error::invalid(format!(
            "seq {seq} is out of range: seqs go up to {MAX_SEQ}"
        ))
    })
}

/// The next value of the seq counter. Only inside a write transaction: the
/// value commits (or rolls back) with the change it numbers.
fn bump_seq(tx: &Transaction<'_>) -> Result<u64> {
    let v: i64 = tx
        .prepare_cached("UPDATE counters SET value = value + 1 WHERE name = 'seq' RETURNING value")?
        .query_row([], |r| r.get(0))?;
    Ok(v as u64)
}

/// Give a stored item the next seq, so that a peer paging by seq lists it
/// again (its envelopes changed). Returns the new seq.
pub(super) fn move_to_new_seq(tx: &Transaction<'_>, content_id: &str) -> Result<u64> {
    let seq = bump_seq(tx)?;
    tx.prepare_cached("UPDATE manifests SET seq = ?2 WHERE content_id = ?1")?
        .execute(params![content_id, seq as i64])?;
    Ok(seq)
}

impl Db {
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
        tx: &Transaction<'_>,
        m: &Manifest,
        envelopes: &[(String, Vec<u8>)],
        present: &[(ChunkId, u64)],
    ) -> Result<Option<u64>> {
        let cid = m.id().to_hex();
        let now = now_ms();
        for (id, size) in present {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO chunks(chunk_id, size, stored_at_ms) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![id.to_hex(), *size as i64, now])?;
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
            Self::insert_new_manifest(tx, m, &cid, now)?;
        }
        for (recipient, wrapped) in envelopes {
            let n = tx.prepare_cached("INSERT OR IGNORE INTO envelopes(content_id, recipient, wrapped) VALUES (?1, ?2, ?3)")?.execute(
                params![cid, recipient, wrapped],
            )?;
            changed |= n > 0;
        }
        let seq = if changed && exists {
            Some(move_to_new_seq(tx, &cid)?)
        } else if changed {
            Some(
                tx.prepare_cached("SELECT seq FROM manifests WHERE content_id = ?1")?
                    .query_row([&cid], |r| r.get::<_, i64>(0))? as u64,
            )
        } else {
            None
        };
        Ok(seq)
    }

    /// The rows of a manifest not stored before, at the next seq.
    fn insert_new_manifest(tx: &Transaction<'_>, m: &Manifest, cid: &str, now: i64) -> Result<()> {
        let seq = bump_seq(tx)?;
        let b = m.body();
        tx.prepare_cached("INSERT INTO manifests(content_id, seq, body, signature, kind, size, chunk_count, created_at_ms, publisher, added_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)")?.execute(
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
        let mut st = tx.prepare_cached(
            "INSERT INTO manifest_chunks(content_id, idx, chunk_id) VALUES (?1, ?2, ?3)",
        )?;
        for (i, id) in m.chunk_ids().enumerate() {
            st.execute(params![cid, i as i64, id.to_hex()])?;
        }
        Ok(())
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
            let n = tx.prepare_cached("INSERT OR IGNORE INTO envelopes(content_id, recipient, wrapped) VALUES (?1, ?2, ?3)")?.execute(
                params![cid, recipient, wrapped],
            )?;
            out.push(if n > 0 {
                Some(move_to_new_seq(&tx, &cid)?)
            } else {
                None
            });
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
    pub(crate) fn manifest_raw(&self, id: &ContentId) -> Result<Option<RawManifest>> {
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

    /// The signed bytes (body and signature) of a stored manifest, without
    /// reading them: what a GetManifests answer for it will weigh, so a batch
    /// can be cut to the message cap before anything is loaded.
    pub(crate) fn manifest_len(&self, id: &ContentId) -> Result<Option<u64>> {
        let n: Option<i64> = self
            .r()
            .prepare_cached(
                "SELECT length(body) + length(signature) FROM manifests WHERE content_id = ?1",
            )?
            .query_row([id.to_hex()], |r| r.get(0))
            .optional()?;
        Ok(n.map(|n| n as u64))
    }

    /// The current seq of an item.
    pub(crate) fn seq_of(&self, id: &ContentId) -> Result<Option<u64>> {
        let seq: Option<i64> = self
            .r()
            .prepare_cached("SELECT seq FROM manifests WHERE content_id = ?1")?
            .query_row([id.to_hex()], |r| r.get(0))
            .optional()?;
        Ok(seq.map(|s| s as u64))
    }

    pub(crate) fn has_manifest(&self, id: &ContentId) -> Result<bool> {
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

    /// Up to `limit` summaries with seq > `after`, in seq order. Seqs are
    /// SQLite integers (i64): an `after` beyond `i64::MAX` is refused
    /// (`Invalid`), never wrapped negative (which would list from the start).
    pub fn list_after(&self, after: u64, limit: u32) -> Result<Vec<Summary>> {
        let after = seq_param(after)?;
        let c = self.r();
        let mut st = c.prepare_cached(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM manifests m WHERE m.seq > ?1 ORDER BY m.seq LIMIT ?2"
        ))?;
        let rows = st.query_map(params![after, limit as i64], SummaryRow::read)?;
        rows.map(|row| row?.summary()).collect()
    }

    /// [`Db::list_after`] with what a listing shows beside each summary, in
    /// one query: the stored body (its encrypted metadata holds the name),
    /// the envelope for `recipient`, and whether every chunk is present.
    /// No signature is checked: see `content::list`.
    pub(crate) fn listing_after(
        &self,
        after: u64,
        limit: u32,
        recipient: &NodeId,
    ) -> Result<Vec<ListingRow>> {
        let after = seq_param(after)?;
        let c = self.r();
        let mut st = c.prepare_cached(&format!(
            "SELECT {SUMMARY_COLUMNS}, m.body, e.wrapped,
                 NOT EXISTS (SELECT 1 FROM manifest_chunks mc
                             LEFT JOIN chunks c ON c.chunk_id = mc.chunk_id
                             WHERE mc.content_id = m.content_id AND c.chunk_id IS NULL)
             FROM manifests m
             LEFT JOIN envelopes e ON e.content_id = m.content_id AND e.recipient = ?3
             WHERE m.seq > ?1 ORDER BY m.seq LIMIT ?2"
        ))?;
        let rows = st.query_map(params![after, limit as i64, recipient.to_hex()], |r| {
            Ok((SummaryRow::read(r)?, r.get(7)?, r.get(8)?, r.get(9)?))
        })?;
        rows.map(|row| {
            let (summary, body, envelope, complete) = row?;
            Ok(ListingRow {
                summary: summary.summary()?,
                body,
                envelope,
                complete,
            })
        })
        .collect()
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
}

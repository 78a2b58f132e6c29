//! The chunk index: which chunks are present (written, hash-checked, synced)
//! and which chunks an item still lacks.

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{hex_id, Db};
use crate::crypto::{ChunkId, ContentId};
use crate::error::Result;
use crate::manifest::{now_ms, Manifest};

impl Db {
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        Ok(self
            .r()
            .prepare_cached("SELECT 1 FROM chunks WHERE chunk_id = ?1")?
            .query_row([id.to_hex()], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Record chunks that were written and synced.
    /// The recorded length of a present chunk (its ciphertext, as written
    /// and hash-checked), to hold it against what a manifest says.
    pub(crate) fn chunk_len(&self, id: &ChunkId) -> Result<Option<u64>> {
        let n: Option<i64> = self
            .r()
            .prepare_cached("SELECT size FROM chunks WHERE chunk_id = ?1")?
            .query_row([id.to_hex()], |r| r.get(0))
            .optional()?;
        Ok(n.map(|n| n as u64))
    }

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
    pub(crate) fn forget_chunk(&self, id: &ChunkId) -> Result<()> {
        let mut c = self.w();
        let tx = c.transaction()?;
        tx.execute("DELETE FROM chunks WHERE chunk_id = ?1", [id.to_hex()])?;
        tx.execute(
            "DELETE FROM chunk_checks WHERE chunk_id = ?1",
            [id.to_hex()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Chunks of this item not present yet, in order.
    pub(crate) fn missing_chunks(&self, content_id: &ContentId) -> Result<Vec<(u32, ChunkId)>> {
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
    pub(crate) fn is_complete_list(&self, m: &Manifest) -> Result<bool> {
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
}

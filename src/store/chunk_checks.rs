//! Hash checks of chunk files (FORMAT.md §4 "chunk_checks"): which version of
//! a chunk's file (its [`Stamp`]) was last seen to hash to its id, and when.
//! A cache, not a fact: a row never makes a chunk present, and a missing or
//! stale row only means the next reader hashes the file again.

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::Db;
use crate::chunks::Stamp;
use crate::crypto::ChunkId;
use crate::error::Result;
use crate::manifest::now_ms;

impl Db {
    /// Record that each file, as stamped before it was read (or just after
    /// this node wrote it), hashed to its chunk id now. One transaction.
    /// Best effort: the table is a cache, so a failure (a full disk during
    /// `verify`) is logged and changes nothing but the next send's re-hash.
    pub(crate) fn record_checks(&self, checks: &[(ChunkId, Stamp)]) {
        if checks.is_empty() {
            return;
        }
        if let Err(e) = self.try_record_checks(checks) {
            tracing::warn!(
                chunks = checks.len(),
                "hash checks not recorded (they are re-done when the chunks are next sent): {e}"
            );
        }
    }

    fn try_record_checks(&self, checks: &[(ChunkId, Stamp)]) -> Result<()> {
        let mut c = self.w();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR REPLACE INTO chunk_checks(chunk_id, dev, ino, size, mtime_ns, ctime_ns, checked_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?;
            let now = now_ms();
            for (id, s) in checks {
                st.execute(params![
                    id.to_hex(),
                    s.dev as i64,
                    s.ino as i64,
                    s.size as i64,
                    s.mtime_ns,
                    s.ctime_ns,
                    now
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The last recorded check of chunk `id`: the stamp its file had, and when (ms).
    pub(crate) fn chunk_check(&self, id: &ChunkId) -> Result<Option<(Stamp, i64)>> {
        let row = self
            .r()
            .prepare_cached(
                "SELECT dev, ino, size, mtime_ns, ctime_ns, checked_at_ms FROM chunk_checks WHERE chunk_id = ?1",
            )?
            .query_row([id.to_hex()], |r| {
                Ok((
                    Stamp {
                        dev: r.get::<_, i64>(0)? as u64,
                        ino: r.get::<_, i64>(1)? as u64,
                        size: r.get::<_, i64>(2)? as u64,
                        mtime_ns: r.get(3)?,
                        ctime_ns: r.get(4)?,
                    },
                    r.get(5)?,
                ))
            })
            .optional()?;
        Ok(row)
    }
}

//! A database copy's items re-wrapped for a new identity (restore and
//! clone-instance with `--new-identity`).

use rusqlite::{params, TransactionBehavior};

use super::manifests::move_to_new_seq;
use super::Db;
use crate::crypto;
use crate::error::{Error, Result};
use crate::identity::Identity;

/// What [`Db::rekey`] changed.
#[derive(Debug, Default, Clone, Copy)]
pub struct RekeyReport {
    /// Items whose key was re-wrapped for the new identity.
    pub(crate) rewrapped: u64,
    /// Items with no envelope for the old identity (e.g. legacy items imported without their key).
    pub(crate) without_key: u64,
}

impl Db {
    /// Give a database copy a new identity: every item the old node could open
    /// gets an envelope for `new` (its key unwrapped with `old`), the old node's
    /// own envelope is dropped, each changed item moves to a new seq (so a peer
    /// paging by seq sees it again), and `meta.node_id` becomes the new id. One
    /// transaction: on any failure nothing changes.
    pub(crate) fn rekey(&self, old: &Identity, new: &Identity) -> Result<RekeyReport> {
        let old_hex = old.id().to_hex();
        let new_hex = new.id().to_hex();
        let stored = self.setting("node_id")?.unwrap_or_default();
        if stored != old_hex {
            return Err(Error::integrity(format!(
                "the snapshot's key ({}) does not belong to its database (which says {stored})",
                old.id()
            )));
        }
        let mut c = self.w();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let rows: Vec<(String, Vec<u8>)> = {
            let mut st = tx.prepare(
                "SELECT e.content_id, e.wrapped FROM envelopes e JOIN manifests m ON m.content_id = e.content_id
                 WHERE e.recipient = ?1 ORDER BY m.seq",
            )?;
            let it = st.query_map([&old_hex], |r| Ok((r.get(0)?, r.get(1)?)))?;
            it.collect::<rusqlite::Result<_>>()?
        };
        let total: i64 = tx.query_row("SELECT COUNT(*) FROM manifests", [], |r| r.get(0))?;
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
            )?;
            tx.execute(
                "DELETE FROM envelopes WHERE content_id = ?1 AND recipient = ?2",
                params![cid, old_hex],
            )?;
            move_to_new_seq(&tx, cid)?;
            report.rewrapped += 1;
        }
        report.without_key = total as u64 - report.rewrapped;
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'node_id'",
            [&new_hex],
        )?;
        // The old identity is not a peer of the new one unless the operator says so.
        tx.commit()?;
        Ok(report)
    }
}

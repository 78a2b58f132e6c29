//! A database copy's items re-wrapped for a new identity (restore and
//! clone-instance with `--new-identity`).

use rusqlite::{params, TransactionBehavior};

use super::manifests::move_to_new_seq;
use super::Db;
use crate::crypto::link::{self, LinkEnvelope, LinkId, LinkKey};
use crate::crypto::{self, ContentId, Hash, ItemKey};
use crate::error::{Error, Result};
use crate::identity::Identity;

/// The old identity's `L(old→old)`, to open its own item envelopes and the
/// link keys it received (sealed under it).
struct OldLinks {
    own: Option<(LinkId, LinkKey)>,
}

impl OldLinks {
    fn load(tx: &rusqlite::Transaction<'_>, old: &Identity) -> Result<OldLinks> {
        let me = old.id().to_hex();
        let row: Option<Vec<u8>> = rusqlite::OptionalExtension::optional(tx.query_row(
            "SELECT envelope FROM link_keys WHERE sender = ?1 AND recipient = ?1
             ORDER BY generation DESC LIMIT 1",
            [&me],
            |r| r.get(0),
        ))?;
        let Some(bytes) = row else {
            return Ok(OldLinks { own: None });
        };
        let e = LinkEnvelope::parse(&bytes)?;
        e.verify(old.spki())?;
        // L(self→self) is always BLE2 (keyring.rs, `Keyring::open`): the
        // old RSA key alone opens it.
        let key = e.key(&old.unwrap_secret(e.wrapped_secret())?, None)?;
        Ok(OldLinks {
            own: Some((e.id, key)),
        })
    }

    /// The item key of an envelope addressed to the old identity.
    fn open(
        &self,
        tx: &rusqlite::Transaction<'_>,
        old: &Identity,
        cid: &str,
        wrapped: &[u8],
    ) -> Result<ItemKey> {
        let Some((sender, generation)) = link::item_link(wrapped) else {
            return old.unwrap_key(wrapped);
        };
        let (own_id, own) = self
            .own
            .as_ref()
            .ok_or_else(|| Error::integrity("an item envelope, but no own link key"))?;
        let id = LinkId {
            sender,
            recipient: old.id(),
            generation,
        };
        let content_id: ContentId = Hash::parse(cid, "content id")?;
        if id == *own_id {
            return link::open_item(own, &id, &content_id, wrapped);
        }
        let sealed: Vec<u8> = tx
            .query_row(
                "SELECT sealed FROM link_keys WHERE sender = ?1 AND recipient = ?2 AND generation = ?3",
                params![sender.to_hex(), old.id().to_hex(), generation],
                |r| r.get(0),
            )
            .map_err(|_| Error::integrity("an item envelope names a link key the copy does not hold"))?;
        let key = link::open_sealed_link(own, &id, &sealed)?;
        link::open_item(&key, &id, &content_id, wrapped)
    }
}

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
        let links = OldLinks::load(&tx, old)?;
        for (cid, wrapped) in &rows {
            let key = links.open(&tx, old, cid, wrapped).map_err(|e| {
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
        // The link keys were the old node's; the new one makes its own, and
        // migrates the RSA envelopes written above when it first opens
        // (FORMAT.md §4.6).
        tx.execute("DELETE FROM link_keys", [])?;
        tx.execute("DELETE FROM meta WHERE key = 'envelope_format'", [])?;
        // The old identity is not a peer of the new one unless the operator says so.
        tx.commit()?;
        Ok(report)
    }
}

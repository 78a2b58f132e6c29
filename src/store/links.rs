//! Link keys (docs/FORMAT.md §4.4): the link envelopes this node made or
//! received, each received key sealed under the node's own `L(self→self)`,
//! and the format-1 → format-2 re-wrap of the node's own envelopes (§4.6).

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{hex_id, Db};
use crate::crypto::link::{LinkId, ITEM_ENVELOPE_LEN};
use crate::crypto::{ContentId, NodeId};
use crate::error::Result;
use crate::manifest::now_ms;

/// A stored link key: its generation, its link envelope, and the key sealed
/// under `L(self→self)` (`None` only for `L(self→self)` itself).
pub struct LinkRow {
    pub(crate) generation: u32,
    pub(crate) envelope: Vec<u8>,
    pub(crate) sealed: Option<Vec<u8>>,
}

/// The SQL test "this envelope is not yet a format-2 item envelope".
const NOT_ITEM_ENVELOPE: &str =
    "NOT (length(wrapped) = 100 AND substr(wrapped, 1, 4) = X'42494532')";

/// The most link envelopes one answer hands out (all generations still kept).
pub const MAX_LINK_ENVELOPES: u32 = 64;

impl Db {
    /// The newest generation of `L(sender→recipient)`, if there is one.
    pub(crate) fn current_link(
        &self,
        sender: &NodeId,
        recipient: &NodeId,
    ) -> Result<Option<LinkRow>> {
        Ok(self
            .r()
            .prepare_cached(
                "SELECT generation, envelope, sealed FROM link_keys WHERE sender = ?1 AND recipient = ?2
                 ORDER BY generation DESC LIMIT 1",
            )?
            .query_row(params![sender.to_hex(), recipient.to_hex()], |r| {
                Ok(LinkRow {
                    generation: r.get(0)?,
                    envelope: r.get(1)?,
                    sealed: r.get(2)?,
                })
            })
            .optional()?)
    }

    /// One generation of a link key, if stored.
    pub(crate) fn link(&self, id: &LinkId) -> Result<Option<LinkRow>> {
        Ok(self
            .r()
            .prepare_cached(
                "SELECT envelope, sealed FROM link_keys WHERE sender = ?1 AND recipient = ?2 AND generation = ?3",
            )?
            .query_row(
                params![id.sender.to_hex(), id.recipient.to_hex(), id.generation],
                |r| {
                    Ok(LinkRow {
                        generation: id.generation,
                        envelope: r.get(0)?,
                        sealed: r.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    /// A link key generation never handed out before (FORMAT.md §4.2).
    pub(crate) fn next_link_generation(&self) -> Result<u32> {
        let mut c = self.w();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT OR IGNORE INTO counters(name, value) VALUES ('link_generation', 0)",
            [],
        )?;
        let v: i64 = tx.query_row(
            "UPDATE counters SET value = value + 1 WHERE name = 'link_generation' RETURNING value",
            [],
            |r| r.get(0),
        )?;
        tx.commit()?;
        u32::try_from(v)
            .map_err(|_| crate::error::Error::integrity("link generations are exhausted"))
    }

    /// Store a link key; false if that generation was stored already (a
    /// concurrent maker won: the caller reads the stored one).
    pub(crate) fn insert_link(
        &self,
        id: &LinkId,
        envelope: &[u8],
        sealed: Option<&[u8]>,
    ) -> Result<bool> {
        let n = self.w().execute(
            "INSERT OR IGNORE INTO link_keys(sender, recipient, generation, envelope, sealed, created_at_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                id.sender.to_hex(),
                id.recipient.to_hex(),
                id.generation,
                envelope,
                sealed,
                now_ms()
            ],
        )?;
        Ok(n > 0)
    }

    /// The link envelopes of `L(sender→recipient)`, newest first, at most
    /// [`MAX_LINK_ENVELOPES`].
    pub(crate) fn link_envelopes(
        &self,
        sender: &NodeId,
        recipient: &NodeId,
    ) -> Result<Vec<Vec<u8>>> {
        let c = self.r();
        let mut st = c.prepare_cached(
            "SELECT envelope FROM link_keys WHERE sender = ?1 AND recipient = ?2
             ORDER BY generation DESC LIMIT ?3",
        )?;
        let rows = st.query_map(
            params![sender.to_hex(), recipient.to_hex(), MAX_LINK_ENVELOPES],
            |r| r.get(0),
        )?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Forget `L(sender→recipient)` below generation `keep` (all of it for
    /// `keep` = `u32::MAX`) and every envelope stored for `recipient`, in one
    /// transaction: revocation and rotation (PROTOCOL.md §6). Returns how
    /// many envelopes went.
    pub(crate) fn drop_links(
        &self,
        sender: &NodeId,
        recipient: &NodeId,
        keep: u32,
    ) -> Result<usize> {
        let mut c = self.w();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = Self::drop_links_below(&tx, &sender.to_hex(), &recipient.to_hex(), keep)?;
        tx.commit()?;
        Ok(n)
    }

    /// [`Db::drop_links`] of every generation, inside a caller's
    /// transaction (a peer made blind, PROTOCOL.md §2.1).
    pub(super) fn drop_links_in(
        tx: &rusqlite::Transaction<'_>,
        sender: &str,
        recipient: &str,
    ) -> Result<usize> {
        Self::drop_links_below(tx, sender, recipient, u32::MAX)
    }

    fn drop_links_below(
        tx: &rusqlite::Transaction<'_>,
        sender: &str,
        recipient: &str,
        keep: u32,
    ) -> Result<usize> {
        tx.execute(
            "DELETE FROM link_keys WHERE sender = ?1 AND recipient = ?2 AND generation < ?3",
            params![sender, recipient, keep],
        )?;
        if keep == u32::MAX {
            // Revoked or made blind: what this node relays for it goes too.
            tx.execute(
                "DELETE FROM relayed_links WHERE recipient = ?1",
                [recipient],
            )?;
        }
        Ok(tx.execute("DELETE FROM envelopes WHERE recipient = ?1", [recipient])?)
    }

    /// Up to `limit` of `me`'s own envelopes that are still RSA (format 1),
    /// in content id order, after the first `skip`.
    pub(crate) fn own_rsa_envelopes(
        &self,
        me: &NodeId,
        limit: usize,
        skip: usize,
    ) -> Result<Vec<(ContentId, Vec<u8>)>> {
        let c = self.r();
        let sql = format!(
            "SELECT content_id, wrapped FROM envelopes WHERE recipient = ?1 AND {NOT_ITEM_ENVELOPE}
             ORDER BY content_id LIMIT ?2 OFFSET ?3"
        );
        let mut st = c.prepare(&sql)?;
        let rows = st.query_map(params![me.to_hex(), limit as i64, skip as i64], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (cid, wrapped) = row?;
            out.push((hex_id(cid, "content id")?, wrapped));
        }
        Ok(out)
    }

    /// Replace own envelopes with their format-2 re-wraps in one transaction.
    /// No seq moves: peers never see a node's own envelope.
    pub(crate) fn replace_own_envelopes(
        &self,
        me: &NodeId,
        rows: &[(ContentId, Vec<u8>)],
    ) -> Result<()> {
        let mut c = self.w();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        for (cid, wrapped) in rows {
            debug_assert_eq!(wrapped.len(), ITEM_ENVELOPE_LEN);
            tx.execute(
                "UPDATE envelopes SET wrapped = ?3 WHERE content_id = ?1 AND recipient = ?2",
                params![cid.to_hex(), me.to_hex(), wrapped],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}

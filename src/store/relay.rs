//! What a blind mirror keeps for other recipients (PROTOCOL.md §2.2,
//! FORMAT.md §4.9): the item envelopes its source made for them (in the
//! `envelopes` table, like any other) and the link envelopes that open
//! them (`relayed_links`), which it hands to each recipient while the
//! source is offline. Both are useless to anyone but their recipient.

use rusqlite::params;

use super::{hex_id, Db, Envelopes};
use crate::crypto::link::{self, LinkId};
use crate::crypto::{ContentId, NodeId};
use crate::error::Result;

/// Most relayed envelopes per item, on either side: a source with more
/// keyed peers relays the first ones (by recipient id).
pub(crate) const MAX_RELAYED: usize = 256;
/// Most relayed link envelopes in one answer, on either side: at most
/// about 2 KiB each (`BLE3`), so 512 KiB, which the 1 MiB a GetManifests
/// answer keeps beyond its 7 MiB of results holds with the left-out ids.
pub(crate) const MAX_RELAYED_LINKS: usize = 256;
/// Most senders whose relayed link envelopes one GetLinkEnvelopes carries.
const MAX_RELAY_SENDERS: usize = 16;

/// One sender's relayed link envelopes: its public key (SPKI DER) and the
/// envelopes, newest first.
pub(crate) type RelayedGroup = (Vec<u8>, Vec<Vec<u8>>);

impl Db {
    /// The envelopes of item `cid` a blind caller may relay: item envelopes
    /// this node (`me`) made for other nodes, at most [`MAX_RELAYED`].
    /// Not its own (no one else needs it), not RSA or Axon envelopes, and
    /// not the ones it relays itself (they are another node's to hand out).
    pub(crate) fn envelopes_to_relay(&self, cid: &ContentId, me: &NodeId) -> Result<Envelopes> {
        let c = self.r();
        let mut st = c.prepare_cached(
            "SELECT recipient, wrapped FROM envelopes WHERE content_id = ?1 AND recipient != ?2
             ORDER BY recipient",
        )?;
        let rows = st.query_map(params![cid.to_hex(), me.to_hex()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (recipient, wrapped) = row?;
            let ours = link::item_link(&wrapped).is_some_and(|(sender, _)| sender == *me);
            if ours && recipient.len() == 64 && hex_id(recipient.clone(), "node id").is_ok() {
                out.push((recipient, wrapped));
                if out.len() == MAX_RELAYED {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// How many items this node (`me`) holds without an envelope of its
    /// own, by publisher: mirrored blind, or awaiting a key (§2.3).
    pub(crate) fn keyless_by_publisher(&self, me: &NodeId) -> Result<Vec<(NodeId, u64)>> {
        let c = self.r();
        let mut st = c.prepare(
            "SELECT m.publisher, count(*) FROM manifests m WHERE NOT EXISTS
               (SELECT 1 FROM envelopes e WHERE e.content_id = m.content_id AND e.recipient = ?1)
             GROUP BY m.publisher",
        )?;
        let rows = st.query_map([me.to_hex()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (p, n) = row?;
            out.push((hex_id(p, "node id")?, n as u64));
        }
        Ok(out)
    }

    /// Up to `limit` items this node (`me`) holds without an envelope of
    /// its own, each with its publisher: the items a keyed peer may still
    /// give it a key for (PROTOCOL.md §2.4), by content id.
    pub(crate) fn keyless_items(
        &self,
        me: &NodeId,
        limit: u32,
    ) -> Result<Vec<(ContentId, NodeId)>> {
        let c = self.r();
        let mut st = c.prepare(
            "SELECT m.content_id, m.publisher FROM manifests m WHERE NOT EXISTS
               (SELECT 1 FROM envelopes e WHERE e.content_id = m.content_id AND e.recipient = ?1)
             ORDER BY m.content_id LIMIT ?2",
        )?;
        let rows = st.query_map(params![me.to_hex(), limit], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (cid, p) = row?;
            out.push((hex_id(cid, "content id")?, hex_id(p, "node id")?));
        }
        Ok(out)
    }

    /// Keep link envelopes to relay (already checked: made by the node
    /// whose key is `sender_spki`, for another recipient). Returns how many
    /// were new.
    pub(crate) fn insert_relayed_links(
        &self,
        sender_spki: &[u8],
        links: &[(LinkId, Vec<u8>)],
    ) -> Result<usize> {
        let mut c = self.w();
        let tx = c.transaction()?;
        let mut n = 0;
        for (id, envelope) in links {
            n += tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO relayed_links(sender, recipient, generation, envelope, sender_spki)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?
                .execute(params![
                    id.sender.to_hex(),
                    id.recipient.to_hex(),
                    id.generation,
                    envelope,
                    sender_spki
                ])?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// The relayed link envelopes for `recipient`, by sender: (sender's
    /// public key, envelopes newest first), bounded like an answer of this
    /// node's own ([`super::links::MAX_LINK_ENVELOPES`] per sender).
    pub(crate) fn relayed_links_for(&self, recipient: &NodeId) -> Result<Vec<RelayedGroup>> {
        let c = self.r();
        let mut st = c.prepare_cached(
            "SELECT sender, sender_spki, envelope FROM relayed_links WHERE recipient = ?1
             ORDER BY sender, generation DESC",
        )?;
        let rows = st.query_map([recipient.to_hex()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Vec<u8>>(2)?,
            ))
        })?;
        let mut out: Vec<(String, Vec<u8>, Vec<Vec<u8>>)> = Vec::new();
        for row in rows {
            let (sender, spki, envelope) = row?;
            let full = out.len() == MAX_RELAY_SENDERS;
            match out.last_mut() {
                Some((s, _, v)) if *s == sender => {
                    if v.len() < super::links::MAX_LINK_ENVELOPES as usize {
                        v.push(envelope);
                    }
                }
                _ if full => break,
                _ => out.push((sender, spki, vec![envelope])),
            }
        }
        Ok(out.into_iter().map(|(_, spki, v)| (spki, v)).collect())
    }
}

//! The peer list (who is trusted, revoked or only heard of, and how far
//! each one's items were synced) and the invites that add trusted peers.

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use super::{hex_id, Db};
use crate::crypto::{Hash, NodeId};
use crate::error::{Error, Result};
use crate::manifest::now_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Trusted,
    Revoked,
    /// Learned from another node's peer list during a clone; not trusted until reviewed.
    Imported,
}

impl PeerState {
    pub(crate) fn as_str(self) -> &'static str {
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

/// What this node gives a trusted peer (PROTOCOL.md §2.1), in this
/// direction only: keyed peers may read, blind peers may only hold, verify
/// and serve, and are never given an envelope or a link key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Level {
    #[default]
    Keyed,
    Blind,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Keyed => "keyed",
            Level::Blind => "blind",
        }
    }

    /// An operator's `keyed` or `blind`; anything else is refused by name.
    pub fn parse(s: &str) -> Result<Level> {
        match s {
            "keyed" => Ok(Level::Keyed),
            "blind" => Ok(Level::Blind),
            other => Err(Error::invalid(format!(
                "trust level {} is neither keyed nor blind",
                crate::error::quote(other)
            ))),
        }
    }

    /// The column's value: its CHECK allows only the two names.
    fn from_column(s: &str) -> Level {
        if s == "blind" {
            Level::Blind
        } else {
            Level::Keyed
        }
    }
}

/// What pinning a peer's ML-KEM key found (PROTOCOL.md §4.4b).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KemPin {
    /// Nothing was pinned; now this key is.
    New,
    /// This very key is pinned.
    Same,
    /// Another key is pinned: the offered one is refused.
    Differs,
    /// The node is not in the peer list.
    UnknownPeer,
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub(crate) node_id: NodeId,
    pub name: String,
    pub(crate) address: String,
    pub state: PeerState,
    pub(crate) mirror: bool,
    /// SubjectPublicKeyInfo DER, once learned from a verified TLS handshake.
    pub public_key: Option<Vec<u8>>,
    pub(crate) added_at_ms: i64,
    /// The seq up to which everything from this peer is durably stored.
    pub(crate) cursor: u64,
    /// What this node gives the peer while it is trusted.
    pub level: Level,
    /// What the peer gives this node, as its last GetManifests answer said
    /// (`None` before the first): this node's role at that source.
    pub role: Option<Level>,
}

impl Db {
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
                level: Level::from_column(&r.get::<_, String>(8)?),
                role: r
                    .get::<_, Option<String>>(9)?
                    .map(|s| Level::from_column(&s)),
            },
        ))
    }

    const PEER_COLS: &'static str =
        "node_id, name, address, state, mirror, public_key, added_at_ms, cursor, level, role";

    /// Add or update a peer. Re-adding a revoked peer trusts it again. A
    /// new peer is keyed; an existing one keeps its level (a change of
    /// level is [`Db::set_peer_level`], an explicit step).
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
    pub(crate) fn import_peer(&self, id: &NodeId, name: &str, address: &str) -> Result<bool> {
        let n = self.w().execute(
            "INSERT OR IGNORE INTO peers(node_id, name, address, state, added_at_ms) VALUES (?1, ?2, ?3, 'imported', ?4)",
            params![id.to_hex(), name, address, now_ms()],
        )?;
        Ok(n > 0)
    }

    /// Revoke a peer: its state, its pinned ML-KEM key (a peer trusted
    /// again is pinned anew), and (PROTOCOL.md §6) every link key this node
    /// made for it and every envelope stored for it.
    pub fn revoke_peer(&self, id: &NodeId) -> Result<Peer> {
        let n = self.w().execute(
            "UPDATE peers SET state = 'revoked', mirror = 0, kem_key = NULL WHERE node_id = ?1",
            [id.to_hex()],
        )?;
        if n == 0 {
            return Err(Error::not_found(format!(
                "node {id} is not in the peer list (see `bitsync peer ls`)"
            )));
        }
        let dropped = self.drop_links(&self.node_id()?, id, u32::MAX)?;
        tracing::info!(peer = %id.short(), envelopes = dropped, "revoked: link keys and envelopes for the peer deleted");
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

    pub(crate) fn peers(&self) -> Result<Vec<Peer>> {
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
        Ok(self.trust_level(id)?.is_some())
    }

    /// The level of a peer trusted right now; `None` when it is not trusted.
    pub fn trust_level(&self, id: &NodeId) -> Result<Option<Level>> {
        let row: Option<(String, String)> = self
            .r()
            .prepare_cached("SELECT state, level FROM peers WHERE node_id = ?1")?
            .query_row([id.to_hex()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(row
            .filter(|(state, _)| state == "trusted")
            .map(|(_, level)| Level::from_column(&level)))
    }

    /// Whether this node may wrap keys for `id` now: trusted and keyed.
    pub(crate) fn is_keyed(&self, id: &NodeId) -> Result<bool> {
        Ok(self.trust_level(id)? == Some(Level::Keyed))
    }

    /// Set a peer's level (PROTOCOL.md §2.1). Making it blind deletes, in
    /// the same transaction, every link key this node made for it and every
    /// envelope stored for it, as a revocation does: it keeps what it
    /// received, and nothing new is wrapped for it. Returns the peer.
    pub fn set_peer_level(&self, id: &NodeId, level: Level) -> Result<Peer> {
        let me = self.node_id()?.to_hex();
        {
            let mut c = self.w();
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let n = tx.execute(
                "UPDATE peers SET level = ?2 WHERE node_id = ?1",
                params![id.to_hex(), level.as_str()],
            )?;
            if n == 0 {
                return Err(Error::not_found(format!(
                    "node {id} is not in the peer list (see `bitsync peer ls`)"
                )));
            }
            if level == Level::Blind {
                let dropped = Self::drop_links_in(&tx, &me, &id.to_hex())?;
                tracing::info!(peer = %id.short(), envelopes = dropped, "peer made blind: link keys and envelopes for it deleted");
            }
            tx.commit()?;
        }
        self.peer(id)?
            .ok_or_else(|| Error::io("peer vanished after update"))
    }

    /// Remember a peer's public key after its TLS handshake proved the key hashes to its id.
    pub fn set_peer_key(&self, id: &NodeId, spki: &[u8]) -> Result<()> {
        self.w().execute(
            "UPDATE peers SET public_key = ?2 WHERE node_id = ?1 AND (public_key IS NULL OR public_key != ?2)",
            params![id.to_hex(), spki],
        )?;
        Ok(())
    }

    /// The ML-KEM-768 encapsulation key pinned for a peer, if any.
    pub(crate) fn peer_kem_key(&self, id: &NodeId) -> Result<Option<Vec<u8>>> {
        Ok(self
            .r()
            .prepare_cached("SELECT kem_key FROM peers WHERE node_id = ?1")?
            .query_row([id.to_hex()], |r| r.get(0))
            .optional()?
            .flatten())
    }

    /// Pin `key` (already checked against the peer's signature) for a
    /// known peer, unless one is pinned: then say whether it is the same.
    pub(crate) fn pin_peer_kem_key(&self, id: &NodeId, key: &[u8]) -> Result<KemPin> {
        let mut c = self.w();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let pinned: Option<Option<Vec<u8>>> = tx
            .query_row(
                "SELECT kem_key FROM peers WHERE node_id = ?1",
                [id.to_hex()],
                |r| r.get(0),
            )
            .optional()?;
        let pin = match pinned {
            None => KemPin::UnknownPeer,
            Some(Some(k)) if k == key => KemPin::Same,
            Some(Some(_)) => KemPin::Differs,
            Some(None) => {
                tx.execute(
                    "UPDATE peers SET kem_key = ?2 WHERE node_id = ?1",
                    params![id.to_hex(), key],
                )?;
                KemPin::New
            }
        };
        tx.commit()?;
        Ok(pin)
    }

    /// Record what `source` gives this node (its GetManifests answers say
    /// whether it serves us blind): shown by `peer ls` and `status`.
    pub(crate) fn set_role(&self, source: &NodeId, role: Level) -> Result<()> {
        self.w()
            .prepare_cached(
                "UPDATE peers SET role = ?2 WHERE node_id = ?1 AND (role IS NULL OR role != ?2)",
            )?
            .execute(params![source.to_hex(), role.as_str()])?;
        Ok(())
    }

    pub(crate) fn set_cursor(&self, id: &NodeId, cursor: u64) -> Result<()> {
        self.w().execute(
            "UPDATE peers SET cursor = ?2 WHERE node_id = ?1",
            params![id.to_hex(), cursor as i64],
        )?;
        Ok(())
    }

    // ---- invites ----

    /// Record an invite; its joiner will be trusted at `level`, which is
    /// kept here and never in the token, so the joiner cannot choose it.
    pub fn create_invite(
        &self,
        secret_hash: &Hash,
        expires_at_ms: i64,
        level: Level,
    ) -> Result<()> {
        self.w().execute(
            "INSERT INTO invites(secret_hash, created_at_ms, expires_at_ms, level) VALUES (?1, ?2, ?3, ?4)",
            params![secret_hash.to_hex(), now_ms(), expires_at_ms, level.as_str()],
        )?;
        Ok(())
    }

    /// Redeem an invite for `joiner`: trusts it at the invite's level and
    /// burns the invite, atomically. Returns that level.
    pub(crate) fn redeem_invite(
        &self,
        secret_hash: &Hash,
        joiner: &NodeId,
        name: &str,
        address: &str,
    ) -> Result<Level> {
        let mut c = self.w();
        let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<(i64, Option<String>, String)> = tx
            .query_row(
                "SELECT expires_at_ms, used_by, level FROM invites WHERE secret_hash = ?1",
                [secret_hash.to_hex()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let level = match row {
            None => return Err(Error::auth("invite secret is not valid for this node")),
            Some((_, Some(_), _)) => {
                return Err(Error::auth("invite was already used; ask for a new one"))
            }
            Some((exp, None, _)) if exp < now_ms() => {
                return Err(Error::auth("invite has expired; ask for a new one"))
            }
            Some((_, None, level)) => Level::from_column(&level),
        };
        tx.execute(
            "UPDATE invites SET used_by = ?2 WHERE secret_hash = ?1",
            params![secret_hash.to_hex(), joiner.to_hex()],
        )?;
        tx.execute(
            "INSERT INTO peers(node_id, name, address, state, added_at_ms, level) VALUES (?1, ?2, ?3, 'trusted', ?4, ?5)
             ON CONFLICT(node_id) DO UPDATE SET state = 'trusted', level = excluded.level,
               name = CASE WHEN excluded.name = '' THEN peers.name ELSE excluded.name END,
               address = CASE WHEN excluded.address = '' THEN peers.address ELSE excluded.address END",
            params![joiner.to_hex(), name, address, now_ms(), level.as_str()],
        )?;
        if level == Level::Blind {
            // A keyed peer that redeems a blind invite keeps nothing made for it.
            let me: String =
                tx.query_row("SELECT value FROM meta WHERE key = 'node_id'", [], |r| {
                    r.get(0)
                })?;
            Self::drop_links_in(&tx, &me, &joiner.to_hex())?;
        }
        tx.commit()?;
        Ok(level)
    }
}

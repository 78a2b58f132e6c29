//! The node's link keys in use (docs/FORMAT.md §4.2–4.6): its own
//! `L(self→self)`, unwrapped once at start and held only in memory, and the
//! operations that make, receive, and use link keys through the database.
//!
//! Every other link key is stored sealed under `L(self→self)` and opened
//! per use (a row lookup and one AES-GCM of 32 bytes, a few microseconds),
//! and cached no longer than one listing ([`Opener`]): a revoked or rotated
//! key is gone the moment its row is.
//! RSA work is once per peer: making `L(self→P)` (a wrap and a signature),
//! and unwrapping a received link envelope.

use std::sync::{Arc, Mutex};

use rsa::RsaPublicKey;

use crate::crypto::link::{self, LinkEnvelope, LinkId, LinkKey};
use crate::crypto::{ContentId, ItemKey, NodeId};
use crate::error::{Error, Result};
use crate::identity::{self, Identity, KemKey};
use crate::store::Db;

/// See [`Keyring::opener`].
pub(crate) struct Opener<'a> {
    keyring: &'a Keyring,
    identity: &'a Identity,
    db: &'a Db,
    links: std::collections::HashMap<LinkId, LinkKey>,
}

impl Opener<'_> {
    /// [`Keyring::open_item`], with the link key from this opener's cache.
    pub(crate) fn open(&mut self, content_id: &ContentId, envelope: &[u8]) -> Result<ItemKey> {
        let Some((sender, generation)) = link::item_link(envelope) else {
            return self.identity.unwrap_key(envelope);
        };
        let id = LinkId {
            sender,
            recipient: self.keyring.me,
            generation,
        };
        if !self.links.contains_key(&id) {
            let key = self
                .keyring
                .stored(self.db, &id)?
                .ok_or_else(|| missing_link(content_id, &id))?;
            self.links.insert(id, key);
        }
        link::open_item(&self.links[&id], &id, content_id, envelope)
    }
}

/// The error for an envelope naming a link key this node does not hold.
fn missing_link(content_id: &ContentId, id: &LinkId) -> Error {
    Error::integrity(format!(
        "item {} uses link key {}→{} generation {}, which this node does not hold",
        content_id.short(),
        id.sender.short(),
        id.recipient.short(),
        id.generation
    ))
}

/// How many own envelopes one migration transaction re-wraps (FORMAT.md §4.6).
const MIGRATE_BATCH: usize = 500;

pub struct Keyring {
    me: NodeId,
    own: LinkKey,
    own_generation: u32,
    /// This node's ML-KEM-768 key: the other half of a hybrid link envelope.
    kem: Arc<KemKey>,
    /// Held while a link key is made, so concurrent re-keys of one batch
    /// make one link key per peer, not one per thread.
    making: Mutex<()>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({})", self.me.short())
    }
}

/// The link key a verified link envelope for this node carries: the RSA
/// unwrap of `S` and, for a hybrid `BLE3` envelope, the ML-KEM decapsulation
/// of `ss` (FORMAT.md §4.2b).
fn open_link(identity: &Identity, kem: &KemKey, e: &LinkEnvelope) -> Result<LinkKey> {
    let secret = identity.unwrap_secret(e.wrapped_secret())?;
    let ss = e
        .kem_ciphertext()
        .map(|ct| kem.decapsulate(ct))
        .transpose()?;
    e.key(&secret, ss.as_ref().map(|s| s.as_slice()))
}

/// The state of `L(self→recipient)` as [`Keyring::current_link`] found it.
struct LinkState {
    /// The recipient's pinned ML-KEM-768 encapsulation key.
    kem: Option<Vec<u8>>,
    /// The current link key, if it can stay in use.
    keep: Option<(LinkId, LinkKey)>,
    /// Whether any generation exists (a new one then replaces them).
    exists: bool,
}

/// Whether a stored link envelope is the hybrid `BLE3`.
fn is_hybrid(envelope: &[u8]) -> bool {
    envelope.starts_with(b"BLE3")
}

impl Keyring {
    /// Load `L(self→self)` (making generation 1 if the database has none:
    /// a new or just-migrated data dir), with one RSA unwrap. `kem` is the
    /// node's ML-KEM-768 key, which opens the hybrid link envelopes peers make.
    ///
    /// `L(self→self)` itself stays a `BLE2` envelope: it never leaves the
    /// node (GetLinkEnvelopes hands out only `L(self→caller)`), and a
    /// database copied with a new identity (restore, clone-instance) opens
    /// it with the old RSA key alone (docs/DESIGN.md §2.1).
    pub(crate) fn open(identity: &Identity, kem: Arc<KemKey>, db: &Db) -> Result<Keyring> {
        let me = identity.id();
        let row = match db.current_link(&me, &me)? {
            Some(row) => row,
            None => {
                let id = LinkId {
                    sender: me,
                    recipient: me,
                    generation: db.next_link_generation()?,
                };
                let (_, envelope) =
                    link::make_link(id, identity.public(), None, |m| identity.sign_pss(m))?;
                db.insert_link(&id, &envelope, None)?;
                db.current_link(&me, &me)?
                    .ok_or_else(|| Error::io("own link key vanished after it was stored"))?
            }
        };
        let parsed = LinkEnvelope::parse(&row.envelope)?;
        parsed.verify(identity.spki())?;
        let own = open_link(identity, &kem, &parsed)
            .map_err(|e| e.context("this node's own link key"))?;
        Ok(Keyring {
            me,
            own,
            own_generation: row.generation,
            kem,
            making: Mutex::new(()),
        })
    }

    fn own_id(&self) -> LinkId {
        LinkId {
            sender: self.me,
            recipient: self.me,
            generation: self.own_generation,
        }
    }

    /// A stored link key, opened from its sealed form (or `L(self→self)`).
    fn stored(&self, db: &Db, id: &LinkId) -> Result<Option<LinkKey>> {
        if *id == self.own_id() {
            return Ok(Some(self.own.clone()));
        }
        match db.link(id)? {
            Some(row) => match row.sealed {
                Some(sealed) => Ok(Some(link::open_sealed_link(&self.own, id, &sealed)?)),
                None => Err(Error::integrity("a stored link key has no sealed key")),
            },
            None => Ok(None),
        }
    }

    /// The current `L(self→recipient)`, made (and stored) if there is none,
    /// or a new generation when `rotate`, or when the recipient's ML-KEM key
    /// is pinned and the current one is still `BLE2` (the upgrade to
    /// hybrid, PROTOCOL.md §4.4b). A new generation replaces the older ones:
    /// they and the envelopes stored for the recipient go in the same step,
    /// under the lock, so no envelope under a dropped generation is kept.
    fn link_to(
        &self,
        identity: &Identity,
        db: &Db,
        recipient: &NodeId,
        public: &RsaPublicKey,
        rotate: bool,
    ) -> Result<(LinkId, LinkKey)> {
        if *recipient == self.me {
            return Ok((self.own_id(), self.own.clone()));
        }
        if !rotate {
            if let Some(found) = self.current_link(db, recipient, false)?.keep {
                return Ok(found);
            }
        }
        let _making = self.making.lock().unwrap_or_else(|p| p.into_inner());
        let LinkState { kem, keep, exists } = self.current_link(db, recipient, rotate)?;
        if let Some(found) = keep {
            return Ok(found);
        }
        let id = LinkId {
            sender: self.me,
            recipient: *recipient,
            generation: db.next_link_generation()?,
        };
        let (key, envelope) =
            link::make_link(id, public, kem.as_deref(), |m| identity.sign_pss(m))?;
        db.insert_link(&id, &envelope, Some(&link::seal_link(&self.own, &id, &key)))?;
        if exists {
            db.drop_links(&self.me, recipient, id.generation)?;
        }
        tracing::info!(peer = %recipient.short(), generation = id.generation, hybrid = kem.is_some(), "made a link key");
        Ok((id, key))
    }

    /// What [`Self::link_to`] decides on: the recipient's pinned ML-KEM key,
    /// and its current link key unless that must be replaced (`rotate`, or a
    /// key is pinned and the link is still `BLE2`).
    fn current_link(&self, db: &Db, recipient: &NodeId, rotate: bool) -> Result<LinkState> {
        let Some(row) = db.current_link(&self.me, recipient)? else {
            return Ok(LinkState {
                kem: db.peer_kem_key(recipient)?,
                keep: None,
                exists: false,
            });
        };
        // A hybrid link stays whatever is pinned, so the per-item path reads
        // the pin only while the link is still BLE2.
        let hybrid = is_hybrid(&row.envelope);
        let kem = match hybrid && !rotate {
            true => None,
            false => db.peer_kem_key(recipient)?,
        };
        let mut keep = None;
        if !rotate && (hybrid || kem.is_none()) {
            let id = LinkId {
                sender: self.me,
                recipient: *recipient,
                generation: row.generation,
            };
            keep = self.stored(db, &id)?.map(|k| (id, k));
        }
        let kem = match (&keep, kem, hybrid) {
            (None, None, true) => db.peer_kem_key(recipient)?,
            (_, kem, _) => kem,
        };
        Ok(LinkState {
            kem,
            keep,
            exists: true,
        })
    }

    /// The item envelope of `key` for `recipient` (FORMAT.md §4.3).
    pub(crate) fn wrap_for(
        &self,
        identity: &Identity,
        db: &Db,
        recipient: &NodeId,
        public: &RsaPublicKey,
        content_id: &ContentId,
        key: &ItemKey,
    ) -> Result<Vec<u8>> {
        let (id, link) = self.link_to(identity, db, recipient, public, false)?;
        Ok(link::wrap_item(&link, &id, content_id, key))
    }

    /// [`Self::wrap_for`] a peer known by its SubjectPublicKeyInfo DER.
    pub(crate) fn wrap_for_spki(
        &self,
        identity: &Identity,
        db: &Db,
        spki: &[u8],
        content_id: &ContentId,
        key: &ItemKey,
    ) -> Result<Vec<u8>> {
        let public = identity::public_key_from_spki(spki)?;
        let recipient = identity::node_id_of(spki);
        self.wrap_for(identity, db, &recipient, &public, content_id, key)
    }

    /// Open an envelope addressed to this node: an item envelope under a
    /// stored link key, or an RSA envelope (format 1). A link key not held
    /// here is `Integrity` too: the replicator asks the peer for the link
    /// keys it lacks before it opens anything, so what is still missing then
    /// was altered or never sent.
    pub(crate) fn open_item(
        &self,
        identity: &Identity,
        db: &Db,
        content_id: &ContentId,
        envelope: &[u8],
    ) -> Result<ItemKey> {
        self.opener(identity, db).open(content_id, envelope)
    }

    /// Open many envelopes for this node, each link key looked up and
    /// unsealed once: for a listing, where every item of a clone names the
    /// same `L(source→self)`. Lives as long as one listing, so a revocation
    /// or rotation is never outlived by more than that.
    pub(crate) fn opener<'a>(&'a self, identity: &'a Identity, db: &'a Db) -> Opener<'a> {
        Opener {
            keyring: self,
            identity,
            db,
            links: std::collections::HashMap::new(),
        }
    }

    /// Whether this node holds the link key an envelope for it names
    /// (always true for an RSA envelope).
    pub(crate) fn holds_link_of(&self, db: &Db, envelope: &[u8]) -> Result<bool> {
        let Some((sender, generation)) = link::item_link(envelope) else {
            return Ok(true);
        };
        let id = LinkId {
            sender,
            recipient: self.me,
            generation,
        };
        Ok(id == self.own_id() || db.link(&id)?.is_some())
    }

    /// Take link envelopes `sender` (whose public key is `sender_spki`)
    /// made for this node: check each, unwrap it once, store it sealed.
    /// Returns how many were new. One that fails its checks is refused
    /// (`Integrity`), and the rest are not looked at.
    pub(crate) fn receive(
        &self,
        identity: &Identity,
        db: &Db,
        sender_spki: &[u8],
        envelopes: &[Vec<u8>],
    ) -> Result<usize> {
        let sender = identity::node_id_of(sender_spki);
        let mut new = 0;
        for bytes in envelopes {
            let e = LinkEnvelope::parse(bytes)?;
            if e.id.sender != sender || e.id.recipient != self.me {
                return Err(Error::integrity(format!(
                    "peer {} sent a link envelope for {}→{}, not for {}→this node",
                    sender.short(),
                    e.id.sender.short(),
                    e.id.recipient.short(),
                    sender.short()
                )));
            }
            if db.link(&e.id)?.is_some() {
                continue;
            }
            e.verify(sender_spki)?;
            let key = open_link(identity, &self.kem, &e).map_err(|_| {
                Error::integrity(format!(
                    "link envelope from {} does not unwrap with this node's keys",
                    sender.short()
                ))
            })?;
            let sealed = link::seal_link(&self.own, &e.id, &key);
            new += db.insert_link(&e.id, bytes, Some(&sealed))? as usize;
        }
        Ok(new)
    }

    /// `bitsync peer rekey`: a new generation of `L(self→peer)`; the old
    /// generations and the envelopes stored for the peer go (new ones are
    /// made just in time). Returns the new generation.
    pub(crate) fn rotate(
        &self,
        identity: &Identity,
        db: &Db,
        peer: &NodeId,
        spki: &[u8],
    ) -> Result<u32> {
        if *peer == self.me {
            return Err(Error::invalid(
                "a node's own link key is not rotated; rotate the identity with clone-instance",
            ));
        }
        let public = identity::public_key_from_spki(spki)?;
        let (id, _) = self.link_to(identity, db, peer, &public, true)?;
        Ok(id.generation)
    }

    /// After a peer's ML-KEM key is pinned: its current link key, made
    /// hybrid if it was `BLE2` (a new generation, as `rotate` makes).
    /// Returns the generation in use.
    pub(crate) fn ensure_link(
        &self,
        identity: &Identity,
        db: &Db,
        peer: &NodeId,
        spki: &[u8],
    ) -> Result<u32> {
        let public = identity::public_key_from_spki(spki)?;
        Ok(self
            .link_to(identity, db, peer, &public, false)?
            .0
            .generation)
    }

    /// The node's ML-KEM-768 key.
    pub(crate) fn kem(&self) -> &KemKey {
        &self.kem
    }

    /// FORMAT.md §4.6 steps 3–4: re-wrap own RSA envelopes under
    /// `L(self→self)`, [`MIGRATE_BATCH`] per transaction, until none is left.
    /// Returns how many were re-wrapped.
    pub(crate) fn migrate_own(&self, identity: &Identity, db: &Db) -> Result<usize> {
        if db.setting("envelope_format")?.as_deref() == Some("2") {
            return Ok(0);
        }
        let (mut done, mut failed) = (0, 0);
        loop {
            // Envelopes that do not unwrap stay as they are, before the
            // window of the next batch (the listing is in content id order).
            let batch = db.own_rsa_envelopes(&self.me, MIGRATE_BATCH, failed)?;
            if batch.is_empty() {
                break;
            }
            let mut rows = Vec::with_capacity(batch.len());
            for (cid, wrapped) in batch {
                match identity.unwrap_key(&wrapped) {
                    Ok(key) => {
                        rows.push((cid, link::wrap_item(&self.own, &self.own_id(), &cid, &key)))
                    }
                    Err(_) => {
                        tracing::warn!(item = %cid.short(), "own envelope does not unwrap; left as it is");
                        failed += 1;
                    }
                }
            }
            db.replace_own_envelopes(&self.me, &rows)?;
            done += rows.len();
            tracing::info!(
                envelopes = done,
                "migrating this node's envelopes to format 2"
            );
        }
        db.set_setting("envelope_format", "2")?;
        Ok(done)
    }
}

/// The format-2 envelope format number, sent in `GetManifestsRequest`.
pub const ENVELOPE_FORMAT: u32 = 2;

//! The replicator: the client half of the protocol, inside the node.
//!
//! One engine serves `clone`, `sync` and mirrors. It pages through the
//! peer's listing by sequence cursor. For each page it fetches the manifests
//! it lacks (verifying each signature and unwrapping its envelope, spread
//! over the cores), works out which chunks are missing, and streams them over
//! a few parallel `StreamChunks` calls; HTTP/2 flow control and a small
//! read-ahead on the sender bound the bytes in flight, so memory stays at a
//! few chunks per stream whatever the instance's size. Each chunk is verified
//! against its id, written to a temp file and renamed into place, then handed
//! to one recorder per sync (group commit): a single `syncfs` and a single
//! transaction make everything handed over so far durable and present, while
//! the streams go on writing. A manifest is recorded as soon as all its chunks
//! are present, never before; the items completed together are stored in one
//! transaction. Items already complete here cost one listing row each, so a
//! clone or sync with nothing new transfers no chunk.
//!
//! The peer's cursor moves only over the unbroken prefix of listed items that
//! are completely stored, or settled for good: rejected (bad signature, an
//! envelope that does not open it) or skipped because the peer holds no key
//! for it (reported; a key it gains later gives the item a new seq, so it is
//! listed again). The cursor is saved as it moves (at most about once a
//! second, and whenever the sync stops): a failure never skips data. After a
//! crash, chunk files that were renamed into place but not yet recorded are
//! re-hashed and adopted instead of fetched again, so a restart re-sends at
//! most what was on the wire when the process died.
//!
//! A chunk the peer cannot deliver (missing, or quarantined because it failed
//! its hash there) is asked of the other trusted peers; a peer that sends
//! wrong bytes is reported and its chunk is not stored. An item that stays
//! incomplete blocks the cursor, but the sync goes on with the rest of the
//! listing and then fails naming the chunks and what the peers said.
//!
//! A source is trusted, not believed: a listing page that does not advance
//! (or goes back, or names a seq over `i64::MAX`), a GetManifests answer that
//! leaves out everything asked, or Watch seqs out of order are protocol
//! violations that end the sync naming the peer (`Integrity`); a chunk of
//! another length than its signed manifest gives is not stored and rejects
//! its items; a chunk stream silent for `request_timeout_secs` is cancelled
//! (the other peers are asked, then the sync fails `Unavailable`). A
//! connection lost after a pass made progress (an outage long enough for
//! the HTTP/2 keepalive to close it) is redialled and the sync resumes from
//! its cursor, a few times with backoff. A clone
//! or sync with rejected items fails once the rest is stored.
//!
//! Mirrors (`[[mirror]]` in config.toml, or peers added with `--mirror`, also
//! while the node runs) keep a `Watch` stream open to their source, sync on
//! every event and reconcile every minute; a lost connection, or a Watch
//! silent for 45 s (three heartbeats), is retried with exponential backoff
//! and jitter. Each shows in `Admin/Status` as a job whose
//! phase is DONE while it is up to date and FAILED (with the reason) while it
//! is stopped, e.g. when the source revoked this node.
//!
//! ## Rooms
//!
//! The public API (this file) starts jobs; the rest is private:
//!
//! - `jobs`: jobs and their progress, as `Admin/Status` shows them.
//! - `sync`: one sync from one peer, a short sequence of steps over one state.
//! - `planner`: what is missing, which items settled, how far the cursor
//!   moves (synchronous, no I/O, unit-tested).
//! - `accept`: manifest acceptance (signature, id, envelope).
//! - `keys`: envelopes for items left awaiting a key, asked of their
//!   publisher after a clone or sync (PROTOCOL.md §2.4).
//! - `transfer`: chunk streams, the group-commit recorder, adopting
//!   leftovers, local sources ([`ChunkSource`]) and the other trusted peers.
//! - `mirror`: mirror supervision.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::Channel;

use crate::crypto::{Hash, NodeId};
use crate::error::{Error, Result};
use crate::invite::Invite;
use crate::node::Node;
use crate::proto::federation_client::FederationClient;
use crate::proto::{GetInstanceConfigRequest, JoinRequest, Progress};
use crate::store::{Peer, PeerState};
use crate::transport::Dialer;

mod accept;
mod instance;
mod jobs;
mod keys;
mod mirror;
mod planner;
mod sync;
mod transfer;

use jobs::Tracker;

pub(crate) use transfer::ChunkSource;

const MAX_MESSAGE: usize = 8 * 1024 * 1024;

pub type Client = FederationClient<Channel>;

pub fn client(channel: Channel) -> Client {
    FederationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// What a finished job reports.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Items that became complete here during this job.
    pub(crate) items: u64,
    /// Chunk bytes received (and stored) during this job.
    pub bytes: u64,
    pub(crate) elapsed: Duration,
    pub(crate) errors: Vec<String>,
    /// Items refused for good because of bad bytes (one line each).
    pub(crate) rejected: Vec<String>,
}

impl Outcome {
    /// A clone or sync with rejected items did not bring in everything the
    /// peer listed: fail it (`Integrity`, exit 5), naming how many and the
    /// first, once everything else is stored and the cursor saved. Items
    /// skipped because the peer holds no key for them are not failures (the
    /// peer cannot give them to anyone; they are listed again if it gains a
    /// key) and stay reported only. Mirrors report rejections and go on.
    fn fail_on_rejected(self, peer: &NodeId) -> Result<Outcome> {
        let Some(first) = self.rejected.first() else {
            return Ok(self);
        };
        Err(Error::integrity(format!(
            "{} item(s) from {} were rejected (the rest is complete): {first}",
            self.rejected.len(),
            peer.short()
        )))
    }
}

/// Live state of a job, watched by Admin streams and `Status`.
#[derive(Debug, Clone)]
pub(crate) struct JobState {
    pub(crate) kind: &'static str,
    pub(crate) peer: String,
    pub(crate) progress: Progress,
    /// When a sync of this job last succeeded (Unix ms; 0: not yet): a
    /// mirror's lag is counted from it while it is not up to date.
    pub(crate) last_synced_at_ms: i64,
    /// Set when the job ends.
    pub(crate) result: Option<std::result::Result<(), Error>>,
}

pub struct Replicator {
    node: Arc<Node>,
    dialer: Dialer,
    jobs: Mutex<HashMap<String, Arc<jobs::Job>>>,
    /// One sync per peer at a time (they share its cursor).
    peer_locks: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    /// Open channels, one per peer, reused by every job (HTTP/2 multiplexing).
    channels: Mutex<HashMap<NodeId, Channel>>,
    advertise: Mutex<String>,
    /// Consulted before streaming chunks from a peer (`clone --from-backup`); every chunk hash-checked.
    local_chunks: Mutex<Option<Arc<dyn ChunkSource>>>,
}

impl Replicator {
    pub fn new(node: Arc<Node>, dialer: Dialer) -> Arc<Replicator> {
        Arc::new(Replicator {
            node,
            dialer,
            jobs: Mutex::new(HashMap::new()),
            peer_locks: Mutex::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
            advertise: Mutex::new(String::new()),
            local_chunks: Mutex::new(None),
        })
    }

    /// Take chunks from `src` (verified) before asking peers for them.
    pub(crate) fn set_local_chunks(&self, src: Arc<dyn ChunkSource>) {
        *self.local_chunks.lock().unwrap_or_else(|p| p.into_inner()) = Some(src);
    }

    fn local_chunks(&self) -> Option<Arc<dyn ChunkSource>> {
        self.local_chunks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The address sent to peers we join, so they can reach us back.
    pub(crate) fn set_advertised_address(&self, a: String) {
        *self.advertise.lock().unwrap_or_else(|p| p.into_inner()) = a;
    }

    /// Clone from an invite token or a trusted peer's node id (runs in the background).
    pub(crate) fn start_clone(self: &Arc<Self>, target: &str) -> Result<watch::Receiver<JobState>> {
        let target = target.trim().to_string();
        let key = if Invite::is_token(&target) {
            let inv = Invite::decode(&target)?;
            inv.node_id.to_hex()
        } else {
            Hash::parse(&target, "node id")?.to_hex()
        };
        Ok(self.start(
            format!("sync:{key}"),
            "clone",
            key,
            move |me, t| async move { me.clone_peer(&target, &t).await },
        ))
    }

    /// Pull what is new from one trusted peer (runs in the background).
    pub(crate) fn start_sync(self: &Arc<Self>, peer: NodeId) -> Result<watch::Receiver<JobState>> {
        let p = self.trusted_peer(&peer)?;
        Ok(self.start(
            format!("sync:{}", peer.to_hex()),
            "sync",
            peer.to_hex(),
            move |me, t| async move {
                let out = me.sync_peer(&p, &t).await?;
                me.keys_from_publishers(&p.node_id).await;
                out.fail_on_rejected(&p.node_id)
            },
        ))
    }

    fn trusted_peer(&self, id: &NodeId) -> Result<Peer> {
        let p = self.node.db.peer(id)?.ok_or_else(|| {
            Error::not_found(format!(
                "node {id} is not a peer of this node: add it with `bitsync peer add`"
            ))
        })?;
        if p.state != PeerState::Trusted {
            return Err(Error::denied(format!(
                "node {id} is {}, not trusted",
                p.state.as_str()
            )));
        }
        if p.address.is_empty() {
            return Err(Error::invalid(format!(
                "peer {id} has no address: set one with `bitsync peer add {id} HOST:PORT`"
            )));
        }
        Ok(p)
    }

    async fn channel(&self, peer: &NodeId, address: &str) -> Result<Channel> {
        if let Some(c) = self
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
        {
            return Ok(c.clone());
        }
        let c = self.dialer.channel(*peer, address).await?;
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*peer, c.clone());
        Ok(c)
    }

    /// Forget a peer's channel after a transport failure, so the next try redials.
    fn drop_channel(&self, peer: &NodeId) {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(peer);
    }

    async fn clone_peer(&self, target: &str, t: &Tracker) -> Result<Outcome> {
        let peer = if Invite::is_token(target) {
            self.join(&Invite::decode(target)?).await?
        } else {
            self.trusted_peer(&Hash::parse(target, "node id")?)?
        };
        let ch = match self.channel(&peer.node_id, &peer.address).await {
            Ok(c) => c,
            Err(e) => return Err(e.context(format!("cloning from {}", peer.node_id.short()))),
        };
        let cfg = client(ch)
            .get_instance_config(GetInstanceConfigRequest {})
            .await
            .map_err(|s| {
                Error::from(s).context(format!("asking {} for its instance", peer.node_id.short()))
            })?
            .into_inner();
        let imported = instance::import(&self.node.db, &cfg, &self.node.id(), &peer.node_id)?;
        if imported > 0 {
            tracing::info!(
                peer = %peer.node_id.short(),
                "imported {imported} peer(s) from it for review (`bitsync peer ls`)"
            );
        }
        let out = self.sync_peer(&peer, t).await?;
        self.keys_from_publishers(&peer.node_id).await;
        out.fail_on_rejected(&peer.node_id)
    }

    /// Redeem an invite: pin the inviter, join, trust it.
    async fn join(&self, inv: &Invite) -> Result<Peer> {
        if inv.expires_at_ms < crate::manifest::now_ms() {
            return Err(Error::auth("invite token has expired; ask for a new one"));
        }
        let mut last = None;
        for address in &inv.addresses {
            match self.dialer.channel(inv.node_id, address).await {
                Ok(ch) => {
                    let req = JoinRequest {
                        secret: inv.secret_text(),
                        name: self.node.name(),
                        address: self
                            .advertise
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone(),
                    };
                    let resp = client(ch.clone())
                        .join(req)
                        .await
                        .map_err(|s| {
                            Error::from(s)
                                .context(format!("joining {} with the invite", inv.node_id.short()))
                        })?
                        .into_inner();
                    let p = self.node.db.upsert_peer(
                        &inv.node_id,
                        &resp.name,
                        address,
                        PeerState::Trusted,
                        false,
                    )?;
                    self.channels
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(inv.node_id, ch);
                    tracing::info!(peer = %inv.node_id.short(), "joined peer with an invite");
                    return Ok(p);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::invalid("invite has no address")))
    }
}

/// Run a clone to completion in this process (the `bitsync clone` command).
/// On failure, the error comes with what was achieved.
pub async fn clone_now(
    rep: &Arc<Replicator>,
    target: &str,
    on_progress: impl Fn(&Progress),
) -> std::result::Result<Outcome, (Error, Outcome)> {
    let mut rx = rep
        .start_clone(target)
        .map_err(|e| (e, Outcome::default()))?;
    loop {
        {
            let s = rx.borrow_and_update();
            on_progress(&s.progress);
            if let Some(r) = &s.result {
                let p = &s.progress;
                let out = Outcome {
                    items: p.items_done,
                    bytes: p.bytes_done,
                    elapsed: Duration::from_millis(p.elapsed_ms as u64),
                    errors: p.errors.clone(),
                    ..Default::default()
                };
                return match r {
                    Ok(()) => Ok(out),
                    Err(e) => Err((e.clone(), out)),
                };
            }
        }
        if rx.changed().await.is_err() {
            return Err((
                Error::io("clone job ended without a result"),
                Outcome::default(),
            ));
        }
    }
}

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
//! Mirrors (`[[mirror]]` in config.toml, or peers added with `--mirror`, also
//! while the node runs) keep a `Watch` stream open to their source, sync on
//! every event and reconcile every minute; a lost connection is retried with
//! exponential backoff and jitter. Each shows in `Admin/Status` as a job whose
//! phase is DONE while it is up to date and FAILED (with the reason) while it
//! is stopped, e.g. when the source revoked this node.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::Rng;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::crypto::{self, ChunkId, ContentId, Hash, NodeId};
use crate::error::{Error, Kind, Result};
use crate::invite::Invite;
use crate::manifest::Manifest;
use crate::node::Node;
use crate::proto::federation_client::FederationClient;
use crate::proto::{progress::Phase, *};
use crate::store::{Peer, PeerState};
use crate::transport::Dialer;

const PAGE: u32 = 500;
const MANIFEST_BATCH: usize = 200;
/// Chunks asked for in one StreamChunks call.
const CHUNKS_PER_STREAM: usize = 64;
/// Parallel StreamChunks calls per sync.
const PARALLEL_STREAMS: usize = 4;
/// Chunks written but not yet synced and recorded, at most (the writers wait
/// beyond this). One syncfs and one transaction cover everything queued.
const RECORD_QUEUE: usize = 256;
const MAX_MESSAGE: usize = 8 * 1024 * 1024;
/// How often the cursor is saved while it moves within a sync.
const CURSOR_SAVE_EVERY: Duration = Duration::from_secs(1);
/// How often `run_mirrors` looks for mirror sources added while the node runs.
const MIRROR_RESCAN: Duration = Duration::from_secs(2);
/// Progress keeps at most this many error lines (the newest).
const MAX_ERRORS: usize = 100;

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
    pub items: u64,
    /// Chunk bytes received (and stored) during this job.
    pub bytes: u64,
    pub elapsed: Duration,
    pub errors: Vec<String>,
}

/// Live state of a job, watched by Admin streams and `Status`.
#[derive(Debug, Clone)]
pub struct JobState {
    pub kind: &'static str,
    pub peer: String,
    pub progress: Progress,
    /// Set when the job ends.
    pub result: Option<std::result::Result<(), Error>>,
}

struct Job {
    state: watch::Sender<JobState>,
}

/// Counters shared by the workers of one job.
struct Tracker {
    state: watch::Sender<JobState>,
    started: Instant,
}

impl Tracker {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        self.state.send_modify(|s| {
            f(&mut s.progress);
            s.progress.elapsed_ms = self.started.elapsed().as_millis() as i64;
            let secs = self.started.elapsed().as_secs_f64();
            if secs > 0.0 {
                s.progress.bytes_per_second = s.progress.bytes_done as f64 / secs;
            }
        });
    }
    fn error(&self, msg: String) {
        tracing::warn!("{msg}");
        self.update(|p| push_error(p, msg));
    }
    fn phase(&self, phase: Phase) {
        self.update(|p| p.phase = phase as i32);
    }
}

fn push_error(p: &mut Progress, msg: String) {
    if p.errors.len() >= MAX_ERRORS {
        p.errors.remove(0);
    }
    p.errors.push(msg);
}

/// The code name of a peer's per-item or per-chunk problem, e.g. `DataLoss`.
fn code_name(code: i32) -> String {
    format!("{:?}", tonic::Code::from_i32(code))
}

/// Check a GetManifests result: signature, id, and that our envelope opens it.
fn accept_manifest(node: &Node, r: &ManifestResult) -> Result<(Manifest, Vec<u8>)> {
    if let Some(p) = &r.problem {
        return Err(Error::from(tonic::Status::new(
            tonic::Code::from_i32(p.code),
            p.message.clone(),
        )));
    }
    let sm = r
        .manifest
        .as_ref()
        .ok_or_else(|| Error::integrity("result has no manifest"))?;
    let env = r
        .envelope
        .as_ref()
        .ok_or_else(|| Error::integrity("result has no envelope"))?;
    let m = Manifest::from_signed(sm.body.clone(), sm.signature.clone())?;
    if m.id().to_hex() != r.content_id {
        return Err(Error::integrity(format!(
            "peer sent manifest {} when {} was asked for",
            m.id(),
            r.content_id
        )));
    }
    if env.recipient != node.id().to_hex() {
        return Err(Error::integrity("peer sent an envelope for another node"));
    }
    let key = node.identity.unwrap_key(&env.wrapped_key)?;
    crypto::decrypt_meta(&key, &m.body().encrypted_meta)
        .map_err(|_| Error::integrity("the envelope the peer sent does not open this item"))?;
    Ok((m, env.wrapped_key.clone()))
}

/// [`accept_manifest`] over a batch, spread over the cores (RSA work), on
/// tokio's pooled blocking threads: a fresh thread would pay for seeding
/// aws-lc's per-thread random generator (jitter entropy) on its first RSA
/// operation, every batch. Returns (content id, verdict) in the order given.
async fn accept_all(
    node: &Arc<Node>,
    results: Vec<ManifestResult>,
) -> Result<Vec<(String, Result<(Manifest, Vec<u8>)>)>> {
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(8);
    let per = results.len().div_ceil(workers).max(8);
    let mut parts = Vec::new();
    let mut rest = results;
    while !rest.is_empty() {
        let tail = rest.split_off(per.min(rest.len()));
        parts.push(std::mem::replace(&mut rest, tail));
    }
    let checks = parts.into_iter().map(|part| {
        let node = node.clone();
        blocking(move || {
            Ok(part
                .into_iter()
                .map(|r| {
                    let verdict = accept_manifest(&node, &r);
                    (r.content_id, verdict)
                })
                .collect::<Vec<_>>())
        })
    });
    let mut out = Vec::new();
    for part in futures::future::join_all(checks).await {
        out.extend(part?);
    }
    Ok(out)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io(format!("replicator worker failed: {e}")))?
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ItemState {
    /// Chunks (or the manifest) still to come.
    Working,
    /// Complete here, manifest stored.
    Done,
    /// Refused for good (bad signature, envelope that does not open it): skipped.
    Rejected,
    /// Could not be completed in this sync: blocks the cursor.
    Failed,
}

/// One listed item being brought in.
struct Item {
    seq: u64,
    content_id: String,
    /// The verified manifest and our envelope, to store once every chunk is present.
    pending: Option<(Manifest, Vec<u8>)>,
    /// Distinct chunks still missing.
    remaining: usize,
    state: ItemState,
    /// Why it failed, if it did.
    problem: Option<String>,
}

/// The peer's cursor as this sync moves it.
struct Cursor {
    peer: NodeId,
    /// Everything listed up to here is stored.
    value: u64,
    saved: u64,
    saved_at: Instant,
    /// An item could not be completed: the cursor stays where it is.
    blocked: bool,
}

impl Cursor {
    async fn save(&mut self, node: &Arc<Node>, force: bool) -> Result<()> {
        if self.value == self.saved || (!force && self.saved_at.elapsed() < CURSOR_SAVE_EVERY) {
            return Ok(());
        }
        let (n, id, v) = (node.clone(), self.peer, self.value);
        blocking(move || n.db.set_cursor(&id, v)).await?;
        self.saved = v;
        self.saved_at = Instant::now();
        Ok(())
    }
}

/// What one StreamChunks call achieved.
#[derive(Default)]
struct GroupOut {
    /// Not delivered, with the reason.
    failed: Vec<(ChunkId, String)>,
    /// Chunk bytes received and stored.
    bytes: u64,
    /// The call broke off (the chunks it did not get are in neither list);
    /// true when the failure is local (writing or recording), not the peer's.
    error: Option<(Error, bool)>,
}

/// The work on one page of the listing.
struct PageWork {
    items: Vec<Item>,
    /// Missing chunk -> the items waiting for it.
    waiters: HashMap<ChunkId, Vec<usize>>,
    /// Missing chunks in listing order.
    order: Vec<ChunkId>,
    /// Why each undelivered chunk was not delivered (the last reason).
    problems: HashMap<ChunkId, String>,
    /// Items before this index are settled (done, rejected or failed).
    next: usize,
    /// Other trusted peers asked for chunks the source could not send.
    others_asked: Vec<String>,
}

impl PageWork {
    /// Mark chunks present; returns the items that just became complete.
    fn arrived(&mut self, chunks: &[ChunkId]) -> Vec<usize> {
        let mut ready = Vec::new();
        for c in chunks {
            self.problems.remove(c);
            if let Some(ws) = self.waiters.remove(c) {
                for i in ws {
                    let it = &mut self.items[i];
                    it.remaining -= 1;
                    if it.remaining == 0 && it.state == ItemState::Working {
                        ready.push(i);
                    }
                }
            }
        }
        ready.sort_unstable();
        ready
    }

    fn still_missing(&self) -> Vec<ChunkId> {
        self.order
            .iter()
            .filter(|c| self.waiters.contains_key(c))
            .copied()
            .collect()
    }
}

pub struct Replicator {
    node: Arc<Node>,
    dialer: Dialer,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// One sync per peer at a time (they share its cursor).
    peer_locks: Mutex<HashMap<NodeId, Arc<tokio::sync::Mutex<()>>>>,
    /// Open channels, one per peer, reused by every job (HTTP/2 multiplexing).
    channels: Mutex<HashMap<NodeId, Channel>>,
    advertise: Mutex<String>,
    /// Consulted before streaming chunks from a peer (`clone --from-backup`); every chunk hash-checked.
    local_chunks: Mutex<Option<Arc<dyn crate::backup::hybrid::ChunkSource>>>,
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
    pub fn set_local_chunks(&self, src: Arc<dyn crate::backup::hybrid::ChunkSource>) {
        *self.local_chunks.lock().unwrap_or_else(|p| p.into_inner()) = Some(src);
    }

    /// The address sent to peers we join, so they can reach us back.
    pub fn set_advertised_address(&self, a: String) {
        *self.advertise.lock().unwrap_or_else(|p| p.into_inner()) = a;
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Running jobs (and mirrors), for `Admin/Status`.
    pub fn jobs(&self) -> Vec<JobState> {
        let mut v: Vec<JobState> = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|j| j.state.borrow().clone())
            .collect();
        v.sort_by(|a, b| (a.kind, &a.peer).cmp(&(b.kind, &b.peer)));
        v
    }

    /// Start a job, or join the one already running under the same key.
    fn start<F, Fut>(
        self: &Arc<Self>,
        key: String,
        kind: &'static str,
        peer: String,
        work: F,
    ) -> watch::Receiver<JobState>
    where
        F: FnOnce(Arc<Replicator>, Arc<Tracker>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Outcome>> + Send + 'static,
    {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = jobs.get(&key) {
            return j.state.subscribe();
        }
        let initial = JobState {
            kind,
            peer: peer.clone(),
            progress: Progress {
                phase: Phase::Connecting as i32,
                peer,
                ..Default::default()
            },
            result: None,
        };
        let (tx, rx) = watch::channel(initial);
        let job = Arc::new(Job { state: tx.clone() });
        jobs.insert(key.clone(), job);
        drop(jobs);
        let me = self.clone();
        tokio::spawn(async move {
            let tracker = Arc::new(Tracker {
                state: tx.clone(),
                started: Instant::now(),
            });
            let result = work(me.clone(), tracker.clone()).await;
            me.jobs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            tracker.update(|p| {
                p.phase = if result.is_ok() {
                    Phase::Done as i32
                } else {
                    Phase::Failed as i32
                };
                if let Err(e) = &result {
                    push_error(p, e.to_string());
                }
            });
            tx.send_modify(|s| s.result = Some(result.map(|_| ())));
        });
        rx
    }

    /// Clone from an invite token or a trusted peer's node id (runs in the background).
    pub fn start_clone(self: &Arc<Self>, target: &str) -> Result<watch::Receiver<JobState>> {
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
    pub fn start_sync(self: &Arc<Self>, peer: NodeId) -> Result<watch::Receiver<JobState>> {
        let p = self.trusted_peer(&peer)?;
        Ok(self.start(
            format!("sync:{}", peer.to_hex()),
            "sync",
            peer.to_hex(),
            move |me, t| async move { me.sync_peer(&p, &t).await },
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
        let mut imported = 0;
        for p in &cfg.peers {
            let Ok(id) = Hash::parse(&p.node_id, "node id") else {
                continue;
            };
            if id == self.node.id() || id == peer.node_id || p.state != "trusted" {
                continue;
            }
            if self.node.db.import_peer(&id, &p.name, &p.address)? {
                imported += 1;
            }
        }
        for (k, v) in &cfg.settings {
            if k.starts_with("instance.") {
                self.node.db.set_setting(k, v)?;
            }
        }
        if imported > 0 {
            tracing::info!(
                "imported {imported} peer(s) from {} for review (`bitsync peer ls`)",
                peer.node_id.short()
            );
        }
        self.sync_peer(&peer, t).await
    }

    /// Redeem an invite: pin the inviter, join, trust it.
    pub async fn join(&self, inv: &Invite) -> Result<Peer> {
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
                    tracing::info!(peer = %inv.node_id, "joined peer with an invite");
                    return Ok(p);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::invalid("invite has no address")))
    }

    /// Pull everything new from `peer`, from its saved cursor.
    async fn sync_peer(&self, peer: &Peer, t: &Tracker) -> Result<Outcome> {
        let lock = {
            let mut locks = self.peer_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(peer.node_id).or_default().clone()
        };
        let _guard = lock.lock().await;
        let result = self.sync_locked(peer, t).await;
        if let Err(e) = &result {
            if e.kind() == Kind::Unavailable {
                self.drop_channel(&peer.node_id);
            }
        }
        result
    }

    async fn sync_locked(&self, peer: &Peer, t: &Tracker) -> Result<Outcome> {
        let started = Instant::now();
        t.phase(Phase::Connecting);
        let ch = self.channel(&peer.node_id, &peer.address).await?;
        let mut fed = client(ch.clone());
        // Re-read: the cursor may have moved since `peer` was loaded.
        let value = self
            .node
            .db
            .peer(&peer.node_id)?
            .map(|p| p.cursor)
            .unwrap_or(0);
        let mut cursor = Cursor {
            peer: peer.node_id,
            value,
            saved: value,
            saved_at: Instant::now(),
            blocked: false,
        };
        let mut out = Outcome::default();
        let mut problems: Vec<String> = Vec::new();
        let mut incomplete = 0usize;
        let mut after = cursor.value;
        let result: Result<()> = async {
            loop {
                t.phase(Phase::Listing);
                let page = fed
                    .list_manifests(ListManifestsRequest {
                        after_seq: after,
                        limit: PAGE,
                    })
                    .await
                    .map_err(|s| {
                        Error::from(s)
                            .context(format!("listing the items of {}", peer.node_id.short()))
                    })?
                    .into_inner();
                let Some(last) = page.manifests.last().map(|s| s.seq) else {
                    break;
                };
                let failed = self
                    .sync_page(peer, &ch, &page.manifests, &mut cursor, &mut out, t)
                    .await?;
                incomplete += failed.len();
                problems.extend(failed);
                after = last;
                if !page.more {
                    break;
                }
            }
            Ok(())
        }
        .await;
        // Keep what was achieved, even when the sync broke off.
        let saved = cursor.save(&self.node, true).await;
        out.elapsed = started.elapsed();
        result?;
        saved?;
        if incomplete > 0 {
            let first = problems.first().cloned().unwrap_or_default();
            let more = if incomplete > 1 {
                format!(
                    " (and {} more item(s); see the problems listed)",
                    incomplete - 1
                )
            } else {
                String::new()
            };
            out.errors.extend(problems);
            return Err(Error::unavailable(format!(
                "sync from {} is incomplete, stopped at seq {}: {first}{more}; run it again to resume once a trusted peer has the data",
                peer.node_id.short(),
                cursor.value,
            )));
        }
        Ok(out)
    }

    /// Sync one page of the listing: store every item whose data can be had,
    /// move the cursor over the settled prefix. Returns one line per item that
    /// could not be completed.
    async fn sync_page(
        &self,
        peer: &Peer,
        ch: &Channel,
        page: &[ManifestSummary],
        cursor: &mut Cursor,
        out: &mut Outcome,
        t: &Tracker,
    ) -> Result<Vec<String>> {
        let me = self.node.id().to_hex();
        // 1. What do we hold already? (No signature checks: the rows were verified when stored.)
        let node = self.node.clone();
        let listed: Vec<(u64, String)> =
            page.iter().map(|s| (s.seq, s.content_id.clone())).collect();
        let me2 = me.clone();
        let local: Vec<Option<Vec<ChunkId>>> = blocking(move || {
            listed
                .iter()
                .map(|(_, cid)| {
                    let id: ContentId = Hash::parse(cid, "content id")?;
                    if node.db.has_manifest(&id)? && node.db.envelope(&id, &me2)?.is_some() {
                        Ok(Some(
                            node.db
                                .missing_chunks(&id)?
                                .into_iter()
                                .map(|(_, c)| c)
                                .collect(),
                        ))
                    } else {
                        Ok(None)
                    }
                })
                .collect()
        })
        .await?;
        let mut work = PageWork {
            items: Vec::new(),
            waiters: HashMap::new(),
            order: Vec::new(),
            problems: HashMap::new(),
            next: 0,
            others_asked: Vec::new(),
        };
        let mut need: Vec<usize> = Vec::new();
        let mut local_missing: HashMap<usize, Vec<ChunkId>> = HashMap::new();
        let (mut new_items, mut new_bytes) = (0u64, 0u64);
        for (i, (s, l)) in page.iter().zip(local).enumerate() {
            work.items.push(Item {
                seq: s.seq,
                content_id: s.content_id.clone(),
                pending: None,
                remaining: 0,
                state: ItemState::Working,
                problem: None,
            });
            match l {
                Some(missing) if missing.is_empty() => work.items[i].state = ItemState::Done,
                Some(missing) => {
                    local_missing.insert(i, missing);
                    new_items += 1;
                    new_bytes += s.size + 16 * s.chunk_count as u64;
                }
                None => {
                    need.push(i);
                    new_items += 1;
                    new_bytes += s.size + 16 * s.chunk_count as u64;
                }
            }
        }
        t.update(|p| {
            p.items_total += new_items;
            p.bytes_total += new_bytes;
        });
        // 2. Fetch and verify the manifests we lack.
        if !need.is_empty() {
            t.phase(Phase::Manifests);
        }
        let mut fed = client(ch.clone());
        for batch in need.chunks(MANIFEST_BATCH) {
            let ids: Vec<String> = batch
                .iter()
                .map(|&i| work.items[i].content_id.clone())
                .collect();
            let resp = fed
                .get_manifests(GetManifestsRequest { content_ids: ids })
                .await
                .map_err(|s| {
                    Error::from(s)
                        .context(format!("fetching manifests from {}", peer.node_id.short()))
                })?
                .into_inner();
            let checked = accept_all(&self.node, resp.results).await?;
            let index: HashMap<String, usize> = batch
                .iter()
                .map(|&i| (work.items[i].content_id.clone(), i))
                .collect();
            let mut answered = HashSet::new();
            let mut accepted = Vec::new();
            for (cid, r) in checked {
                let Some(&i) = index.get(cid.as_str()) else {
                    t.error(format!(
                        "peer {} sent item {cid} that was not asked for",
                        peer.node_id.short()
                    ));
                    continue;
                };
                answered.insert(i);
                match r {
                    Ok(me_env) => accepted.push((i, me_env)),
                    Err(e) => {
                        // Bad bytes are rejected for good. An item the peer
                        // holds no key for (or no longer has) is skipped: if
                        // the peer gains a key, the new envelope moves the item
                        // to a later seq and it is listed again.
                        let permanent = matches!(e.kind(), Kind::Integrity | Kind::NotFound);
                        let msg = format!(
                            "item {cid} from {}: {e}{}",
                            peer.node_id.short(),
                            if e.kind() == Kind::Integrity {
                                " (rejected)"
                            } else if permanent {
                                " (skipped)"
                            } else {
                                ""
                            }
                        );
                        t.error(msg.clone());
                        let it = &mut work.items[i];
                        it.state = if permanent {
                            ItemState::Rejected
                        } else {
                            ItemState::Failed
                        };
                        it.problem = Some(msg);
                    }
                }
            }
            for &i in batch {
                if !answered.contains(&i) {
                    let it = &mut work.items[i];
                    it.state = ItemState::Failed;
                    it.problem = Some(format!(
                        "item {}: {} did not answer for it",
                        it.content_id,
                        peer.node_id.short()
                    ));
                }
            }
            // Which of their chunks are here already?
            let node = self.node.clone();
            let ids: Vec<Vec<ChunkId>> = accepted
                .iter()
                .map(|(_, (m, _))| m.chunk_ids().collect())
                .collect();
            let missing: Vec<Vec<ChunkId>> = blocking(move || {
                ids.into_iter()
                    .map(|cs| {
                        let mut v = Vec::new();
                        for c in cs {
                            if !node.db.has_chunk(&c)? {
                                v.push(c);
                            }
                        }
                        Ok(v)
                    })
                    .collect()
            })
            .await?;
            for ((i, me_env), miss) in accepted.into_iter().zip(missing) {
                work.items[i].pending = Some(me_env);
                local_missing.insert(i, miss);
            }
        }
        // 3. Every missing chunk, once, in listing order.
        let mut ready = Vec::new();
        for i in 0..work.items.len() {
            let Some(miss) = local_missing.remove(&i) else {
                continue;
            };
            let mut mine = HashSet::new();
            for c in miss {
                if mine.insert(c) {
                    let w = work.waiters.entry(c).or_default();
                    if w.is_empty() {
                        work.order.push(c);
                    }
                    w.push(i);
                }
            }
            work.items[i].remaining = mine.len();
            if mine.is_empty() {
                ready.push(i);
            }
        }
        self.settle(&mut work, ready, cursor, out, t).await?;
        // 4. Chunk files a crashed run renamed into place but never recorded.
        if !work.order.is_empty() {
            let node = self.node.clone();
            let order = work.order.clone();
            let adopted = blocking(move || adopt_strays(&node, &order)).await?;
            if !adopted.is_empty() {
                tracing::info!(
                    "adopted {} chunk file(s) left by an interrupted run",
                    adopted.len()
                );
                let ready = work.arrived(&adopted);
                self.settle(&mut work, ready, cursor, out, t).await?;
            }
        }
        // 4b. Chunks a local source holds (`clone --from-backup`), each hash-checked before it is stored.
        let local = self
            .local_chunks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let (Some(src), false) = (local, work.order.is_empty()) {
            let (node, want) = (self.node.clone(), work.still_missing());
            let got = blocking(move || crate::backup::hybrid::fill_from_local(&node, &*src, &want))
                .await?;
            let ready = work.arrived(&got);
            self.settle(&mut work, ready, cursor, out, t).await?;
        }
        // 5. Stream the rest from the peer, then ask the other trusted peers for what it could not send.
        if !work.order.is_empty() {
            t.phase(Phase::Chunks);
            let want = work.still_missing();
            self.fetch_into(peer, ch, want, &mut work, cursor, out, t)
                .await??;
            let mut left = work.still_missing();
            if !left.is_empty() {
                for other in self.node.db.peers()? {
                    if left.is_empty() {
                        break;
                    }
                    if other.node_id == peer.node_id
                        || other.node_id == self.node.id()
                        || other.state != PeerState::Trusted
                        || other.address.is_empty()
                    {
                        continue;
                    }
                    let och = match self.channel(&other.node_id, &other.address).await {
                        Ok(c) => c,
                        Err(e) => {
                            t.error(format!(
                                "asking {} for {} chunk(s): {e}",
                                other.node_id.short(),
                                left.len()
                            ));
                            continue;
                        }
                    };
                    tracing::info!(
                        "asking {} for {} chunk(s) {} could not send",
                        other.node_id.short(),
                        left.len(),
                        peer.node_id.short()
                    );
                    work.others_asked.push(other.node_id.short());
                    // A local failure (disk full, database) ends the sync; a peer's is reported and the next asked.
                    if let Err(e) = self
                        .fetch_into(&other, &och, left.clone(), &mut work, cursor, out, t)
                        .await?
                    {
                        t.error(format!(
                            "fetching chunks from {}: {e}",
                            other.node_id.short()
                        ));
                        if e.kind() == Kind::Unavailable {
                            self.drop_channel(&other.node_id);
                        }
                    }
                    left = work.still_missing();
                }
            }
        }
        // 6. Whatever is still missing fails its items; the cursor stops before the first.
        let mut first_missing: HashMap<usize, ChunkId> = HashMap::new();
        for c in &work.order {
            if let Some(ws) = work.waiters.get(c) {
                for &i in ws {
                    first_missing.entry(i).or_insert(*c);
                }
            }
        }
        let asked = if work.others_asked.is_empty() {
            "no other trusted peer to ask".to_string()
        } else {
            format!("also asked {}", work.others_asked.join(", "))
        };
        let mut failed = Vec::new();
        for (i, it) in work.items.iter_mut().enumerate() {
            if it.state == ItemState::Working {
                it.state = ItemState::Failed;
                if it.problem.is_none() {
                    let why = match first_missing.get(&i) {
                        Some(c) => match work.problems.get(c) {
                            Some(p) => format!("chunk {c}: {p}"),
                            None => format!("chunk {c} was not delivered"),
                        },
                        None => "some chunks could not be fetched".into(),
                    };
                    it.problem = Some(format!(
                        "item {} is incomplete, {} chunk(s) missing: {why} ({asked})",
                        it.content_id, it.remaining
                    ));
                }
            }
            if it.state == ItemState::Failed {
                failed.push(
                    it.problem
                        .clone()
                        .unwrap_or_else(|| format!("item {} is incomplete", it.content_id)),
                );
            }
        }
        self.advance(&mut work, cursor).await?;
        Ok(failed)
    }

    /// Stream `ids` from `peer` over parallel calls, storing items as they
    /// complete. The outer error is local (this node's disk or database), the
    /// inner one the peer's or the connection's.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_into(
        &self,
        peer: &Peer,
        ch: &Channel,
        ids: Vec<ChunkId>,
        work: &mut PageWork,
        cursor: &mut Cursor,
        out: &mut Outcome,
        t: &Tracker,
    ) -> Result<Result<()>> {
        let groups: Vec<Vec<ChunkId>> = ids.chunks(CHUNKS_PER_STREAM).map(|c| c.to_vec()).collect();
        let (rec_tx, mut recorded) = spawn_recorder(self.node.clone());
        // The calls hold the only senders: once they are dropped, the recorder flushes and ends.
        let mut calls = Some(Box::pin(
            futures::stream::iter(groups)
                .map(move |g| self.stream_group(peer, ch.clone(), g, rec_tx.clone(), t))
                .buffer_unordered(PARALLEL_STREAMS),
        ));
        let mut peer_error = None;
        let mut local_error = None;
        loop {
            tokio::select! {
                g = next_or_pending(&mut calls) => match g {
                    Some(g) => {
                        out.bytes += g.bytes;
                        for (c, why) in g.failed {
                            let p = work.problems.entry(c).or_default();
                            if !p.is_empty() {
                                p.push_str("; ");
                            }
                            p.push_str(&why);
                        }
                        match g.error {
                            Some((e, true)) => local_error = local_error.or(Some(e)),
                            Some((e, false)) => peer_error = peer_error.or(Some(e)),
                            None => {}
                        }
                        if local_error.is_some() || peer_error.is_some() {
                            // Stop the other calls; what they wrote but did not hand over is adopted next time.
                            calls = None;
                        }
                    }
                    None => calls = None,
                },
                r = recorded.recv() => match r {
                    Some(Ok(ids)) => {
                        let ready = work.arrived(&ids);
                        self.settle(work, ready, cursor, out, t).await?;
                    }
                    Some(Err(e)) => {
                        local_error = local_error.or(Some(e));
                        calls = None;
                    }
                    None => break, // every writer is gone and the recorder has flushed
                },
            }
        }
        match (local_error, peer_error) {
            (Some(e), _) => Err(e),
            (None, Some(e)) => Ok(Err(e)),
            (None, None) => Ok(Ok(())),
        }
    }

    /// Store the manifests of items that just became complete, then move the cursor.
    async fn settle(
        &self,
        work: &mut PageWork,
        ready: Vec<usize>,
        cursor: &mut Cursor,
        out: &mut Outcome,
        t: &Tracker,
    ) -> Result<()> {
        if !ready.is_empty() {
            let me = self.node.id().to_hex();
            let mut to_store = Vec::new();
            for &i in &ready {
                if let Some(p) = work.items[i].pending.take() {
                    to_store.push((i, p));
                }
            }
            let node = self.node.clone();
            let stored: Vec<(usize, bool)> = blocking(move || {
                let mut r = Vec::new();
                let mut batch = Vec::new();
                for (i, (m, env)) in &to_store {
                    // Re-check: a chunk may have been quarantined meanwhile.
                    let complete = node.db.is_complete_list(m)?;
                    if complete {
                        batch.push((m, vec![(me.clone(), env.clone())]));
                    }
                    r.push((*i, complete));
                }
                // One transaction (one fsync) for every item completed together.
                if !batch.is_empty() {
                    node.db.insert_manifests(&batch)?;
                }
                Ok(r)
            })
            .await?;
            let not_stored: HashSet<usize> = stored
                .iter()
                .filter(|(_, ok)| !ok)
                .map(|(i, _)| *i)
                .collect();
            let mut done = 0u64;
            for i in ready {
                let it = &mut work.items[i];
                if not_stored.contains(&i) {
                    it.state = ItemState::Failed;
                    it.problem = Some(format!(
                        "item {}: a chunk vanished while it was being stored",
                        it.content_id
                    ));
                } else {
                    it.state = ItemState::Done;
                    done += 1;
                }
            }
            out.items += done;
            t.update(|p| p.items_done += done);
        }
        self.advance(work, cursor).await
    }

    /// Move the cursor over the settled prefix of the page and save it now and then.
    async fn advance(&self, work: &mut PageWork, cursor: &mut Cursor) -> Result<()> {
        while !cursor.blocked && work.next < work.items.len() {
            let it = &work.items[work.next];
            match it.state {
                ItemState::Done | ItemState::Rejected => {
                    cursor.value = cursor.value.max(it.seq);
                    work.next += 1;
                }
                ItemState::Failed => cursor.blocked = true,
                ItemState::Working => break,
            }
        }
        cursor.save(&self.node, false).await
    }

    /// One StreamChunks call: verify and write each chunk, then hand it to the recorder.
    async fn stream_group(
        &self,
        peer: &Peer,
        ch: Channel,
        ids: Vec<ChunkId>,
        recorder: RecorderTx,
        t: &Tracker,
    ) -> GroupOut {
        let mut out = GroupOut::default();
        let who = peer.node_id.short();
        let req = StreamChunksRequest {
            chunk_ids: ids.iter().map(|c| c.to_hex()).collect(),
        };
        let mut stream = match client(ch).stream_chunks(req).await {
            Ok(s) => s.into_inner(),
            Err(s) => {
                out.error = Some((
                    Error::from(s).context(format!("streaming chunks from {who}")),
                    false,
                ));
                return out;
            }
        };
        let wanted: HashSet<ChunkId> = ids.iter().copied().collect();
        let mut pending: HashSet<ChunkId> = wanted.clone();
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(s) => {
                    out.error = Some((
                        Error::from(s).context(format!("chunk stream from {who}")),
                        false,
                    ));
                    break;
                }
            };
            let Ok(id) = Hash::parse(&msg.chunk_id, "chunk id") else {
                t.error(format!(
                    "peer {who} sent a malformed chunk id {:?}",
                    msg.chunk_id
                ));
                continue;
            };
            if !wanted.contains(&id) || !pending.remove(&id) {
                t.error(format!("peer {who} sent chunk {id} that was not asked for"));
                continue;
            }
            if let Some(p) = msg.problem {
                let why = format!("{} from {who}: {}", code_name(p.code), p.message);
                t.error(format!("chunk {id}: {why}"));
                out.failed.push((id, why));
                continue;
            }
            let node = self.node.clone();
            let data = msg.data;
            let len = data.len() as u64;
            let write = tokio::task::spawn_blocking(move || node.chunks.write(&id, &data))
                .await
                .unwrap_or_else(|e| Err(Error::io(format!("chunk writer failed: {e}"))));
            match write {
                Ok(()) => {
                    out.bytes += len;
                    t.update(|p| p.bytes_done += len);
                    if recorder.send((id, len)).await.is_err() {
                        out.error = Some((Error::io("the chunk recorder stopped"), true));
                        break;
                    }
                }
                Err(e) if e.kind() == Kind::Integrity => {
                    let why = format!("{who} sent wrong bytes for it (not stored)");
                    t.error(format!("chunk {id}: {why}"));
                    out.failed.push((id, why));
                }
                Err(e) => {
                    out.error = Some((e, true));
                    break;
                }
            }
        }
        if out.error.is_none() {
            for id in pending {
                out.failed
                    .push((id, format!("{who} ended the stream without sending it")));
            }
        }
        out
    }

    /// Keep every mirror source in sync until `shutdown` fires. Sources are
    /// `[[mirror]]` entries and trusted peers marked as mirrors; the list is
    /// re-read every few seconds, so `bitsync peer add ... --mirror` (or
    /// Admin/AddPeer) takes effect without a restart.
    pub async fn run_mirrors(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut running: HashMap<NodeId, tokio::task::JoinHandle<()>> = HashMap::new();
        for m in &self.node.config.mirror {
            if let Err(e) = Hash::parse(&m.peer, "mirror peer") {
                tracing::error!("config.toml [[mirror]]: {e}");
            }
        }
        loop {
            if *shutdown.borrow() {
                return;
            }
            running.retain(|_, h| !h.is_finished());
            for id in self.mirror_sources() {
                if running.contains_key(&id) {
                    continue;
                }
                let me = self.clone();
                let sd = shutdown.clone();
                running.insert(id, tokio::spawn(async move { me.mirror(id, sd).await }));
            }
            tokio::select! {
                _ = tokio::time::sleep(MIRROR_RESCAN) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Mirror sources right now: `[[mirror]]` entries plus trusted peers marked as mirrors.
    fn mirror_sources(&self) -> Vec<NodeId> {
        let mut sources: Vec<NodeId> = self
            .node
            .config
            .mirror
            .iter()
            .filter_map(|m| Hash::parse(&m.peer, "mirror peer").ok())
            .collect();
        match self.node.db.peers() {
            Ok(peers) => sources.extend(
                peers
                    .iter()
                    .filter(|p| p.mirror && p.state == PeerState::Trusted)
                    .map(|p| p.node_id),
            ),
            Err(e) => tracing::warn!("reading mirror peers: {e}"),
        }
        sources.retain(|id| *id != self.node.id());
        sources.sort();
        sources.dedup();
        sources
    }

    /// Follow one source: sync, then watch for events and sync on each,
    /// reconciling periodically; reconnect with exponential backoff and jitter.
    /// Ends when the source is no longer a mirror source, or at shutdown.
    async fn mirror(self: Arc<Self>, source: NodeId, mut shutdown: watch::Receiver<bool>) {
        const RECONCILE: Duration = Duration::from_secs(60);
        const MAX_BACKOFF: Duration = Duration::from_secs(60);
        let key = format!("mirror:{}", source.to_hex());
        let (tx, _rx) = watch::channel(JobState {
            kind: "mirror",
            peer: source.to_hex(),
            progress: Progress {
                peer: source.to_hex(),
                phase: Phase::Connecting as i32,
                ..Default::default()
            },
            result: None,
        });
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), Arc::new(Job { state: tx.clone() }));
        let t = Tracker {
            state: tx,
            started: Instant::now(),
        };
        let mut backoff = Duration::from_millis(500);
        loop {
            if *shutdown.borrow() {
                break;
            }
            if !self.mirror_sources().contains(&source) {
                tracing::info!(peer = %source, "stopped mirroring: no longer a mirror source");
                break;
            }
            let started = Instant::now();
            let err = match self.mirror_once(source, &mut shutdown, RECONCILE, &t).await {
                Ok(()) => break, // shutdown
                Err(e) => e,
            };
            self.drop_channel(&source);
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(500);
            }
            if matches!(err.kind(), Kind::Denied | Kind::NotFound | Kind::Auth) {
                backoff = MAX_BACKOFF;
            }
            let wait = backoff.mul_f64(rand::thread_rng().gen_range(0.5..1.5));
            let msg = if matches!(err.kind(), Kind::Denied | Kind::Auth) {
                format!(
                    "mirror of {} stopped: {err}; retrying in {}s",
                    source.short(),
                    wait.as_secs()
                )
            } else {
                format!(
                    "mirror of {} interrupted: {err}; retrying in {:.1}s",
                    source.short(),
                    wait.as_secs_f64()
                )
            };
            tracing::warn!(peer = %source, "{msg}");
            t.update(|p| {
                p.phase = Phase::Failed as i32;
                push_error(p, msg);
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => break,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&key);
    }

    async fn mirror_once(
        &self,
        source: NodeId,
        shutdown: &mut watch::Receiver<bool>,
        reconcile: Duration,
        t: &Tracker,
    ) -> Result<()> {
        let peer = self.trusted_peer(&source)?;
        let synced = |r: Result<Outcome>| -> Result<()> {
            r?;
            t.phase(Phase::Done);
            Ok(())
        };
        synced(self.sync_peer(&peer, t).await)?;
        let ch = self.channel(&source, &peer.address).await?;
        let cursor = self.node.db.peer(&source)?.map(|p| p.cursor).unwrap_or(0);
        let mut events = client(ch)
            .watch(WatchRequest { after_seq: cursor })
            .await
            .map_err(|s| Error::from(s).context("opening the watch stream"))?
            .into_inner();
        tracing::info!(peer = %source, "mirroring");
        let mut tick = tokio::time::interval(reconcile);
        tick.tick().await;
        loop {
            tokio::select! {
                ev = events.message() => {
                    let ev = ev.map_err(Error::from)?.ok_or_else(|| Error::unavailable("the source closed the watch stream"))?;
                    match watch_event::Kind::try_from(ev.kind) {
                        Ok(watch_event::Kind::Revoked) => return Err(Error::denied("the source revoked this node's trust")),
                        Ok(watch_event::Kind::Item) => {
                            let cur = self.node.db.peer(&source)?.map(|p| p.cursor).unwrap_or(0);
                            if ev.seq > cur {
                                synced(self.sync_peer(&peer, t).await)?;
                            }
                        }
                        _ => {}
                    }
                }
                _ = tick.tick() => {
                    if !self.mirror_sources().contains(&source) {
                        return Err(Error::not_found("no longer a mirror source"));
                    }
                    synced(self.sync_peer(&peer, t).await)?;
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
}

/// Where writers hand over chunks they wrote: (id, ciphertext length).
type RecorderTx = tokio::sync::mpsc::Sender<(ChunkId, u64)>;
/// Batches made durable and present, in order (or the error that ended the recorder).
type RecordedRx = tokio::sync::mpsc::UnboundedReceiver<Result<Vec<ChunkId>>>;

/// Group commit for received chunks: writers hand over each chunk they wrote
/// (verified, renamed into place); one `syncfs` and one transaction then make
/// everything handed over so far durable and present, while the writers go on
/// writing the next ones. Each batch recorded is reported back, in order; an
/// error is reported once and ends the recorder (the writers then stop).
fn spawn_recorder(node: Arc<Node>) -> (RecorderTx, RecordedRx) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(ChunkId, u64)>(RECORD_QUEUE);
    let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            let ids: Vec<ChunkId> = batch.iter().map(|(c, _)| *c).collect();
            let n = node.clone();
            let r = blocking(move || {
                n.chunks.sync()?;
                n.db.record_chunks(&batch)
            })
            .await;
            let failed = r.is_err();
            if done_tx.send(r.map(|()| ids)).is_err() || failed {
                return;
            }
        }
    });
    (tx, done_rx)
}

async fn next_or_pending<S: futures::Stream + Unpin>(s: &mut Option<S>) -> Option<S::Item> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Chunk files present on disk but not recorded (a run died between rename
/// and record): keep those whose bytes hash to their id, remove the others.
/// Returns the adopted ids, synced and recorded.
fn adopt_strays(node: &Node, ids: &[ChunkId]) -> Result<Vec<ChunkId>> {
    let mut adopted = Vec::new();
    for id in ids {
        let path = node.chunks.path(id);
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.len() as usize > crate::chunks::MAX_CHUNK_BYTES {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        match std::fs::read(&path) {
            Ok(data) if Hash::of(&data) == *id => adopted.push((*id, data.len() as u64)),
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    if adopted.is_empty() {
        return Ok(Vec::new());
    }
    node.chunks.sync()?;
    node.db.record_chunks(&adopted)?;
    Ok(adopted.into_iter().map(|(c, _)| c).collect())
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

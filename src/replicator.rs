//! The replicator: the client half of the protocol, inside the node.
//!
//! One engine serves `clone`, `sync` and mirrors. For each page of the
//! peer's listing (by sequence cursor) it fetches the manifests it lacks
//! (verifying each signature and unwrapping its envelope), works out which
//! chunks are missing, streams them over a few parallel `StreamChunks` calls
//! with a bounded number of bytes in flight, verifies each against its id,
//! writes and syncs them, records them, and only then records the manifests
//! whose chunks are all present. The peer's cursor is saved last, and only up
//! to the last item that is completely stored: a failure never skips data,
//! and a restart after a crash re-sends at most the chunks that were in flight.
//!
//! A chunk the peer cannot deliver (missing, or failing its hash) is asked of
//! the other trusted peers; a peer that sent wrong bytes is reported.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::Rng;
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::crypto::{self, ChunkId, Hash, NodeId};
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
/// Chunks written between two syncs of the chunk dir (and one db transaction).
const RECORD_EVERY: usize = 32;
const MAX_MESSAGE: usize = 8 * 1024 * 1024;

pub type Client = FederationClient<Channel>;

pub fn client(channel: Channel) -> Client {
    FederationClient::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE)
}

/// What a finished job reports.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub items: u64,
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
        self.update(|p| {
            if p.errors.len() < 100 {
                p.errors.push(msg)
            }
        });
    }
    fn phase(&self, phase: Phase) {
        self.update(|p| p.phase = phase as i32);
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
        })
    }

    /// The address sent to peers we join, so they can reach us back.
    pub fn set_advertised_address(&self, a: String) {
        *self.advertise.lock().unwrap_or_else(|p| p.into_inner()) = a;
    }

    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Running jobs, for `Admin/Status`.
    pub fn jobs(&self) -> Vec<JobState> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).values().map(|j| j.state.borrow().clone()).collect()
    }

    /// Start a job, or join the one already running under the same key.
    fn start<F, Fut>(self: &Arc<Self>, key: String, kind: &'static str, peer: String, work: F) -> watch::Receiver<JobState>
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
            progress: Progress { phase: Phase::Connecting as i32, peer, ..Default::default() },
            result: None,
        };
        let (tx, rx) = watch::channel(initial);
        let job = Arc::new(Job { state: tx.clone() });
        jobs.insert(key.clone(), job);
        drop(jobs);
        let me = self.clone();
        tokio::spawn(async move {
            let tracker = Arc::new(Tracker { state: tx.clone(), started: Instant::now() });
            let result = work(me.clone(), tracker.clone()).await;
            me.jobs.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
            tracker.update(|p| {
                p.phase = if result.is_ok() { Phase::Done as i32 } else { Phase::Failed as i32 };
                if let Err(e) = &result {
                    p.errors.push(e.to_string());
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
        Ok(self.start(format!("sync:{key}"), "clone", key, move |me, t| async move { me.clone_peer(&target, &t).await }))
    }

    /// Pull what is new from one trusted peer (runs in the background).
    pub fn start_sync(self: &Arc<Self>, peer: NodeId) -> Result<watch::Receiver<JobState>> {
        let p = self.trusted_peer(&peer)?;
        Ok(self.start(format!("sync:{}", peer.to_hex()), "sync", peer.to_hex(), move |me, t| async move {
            me.sync_peer(&p, &t).await
        }))
    }

    fn trusted_peer(&self, id: &NodeId) -> Result<Peer> {
        let p = self.node.db.peer(id)?.ok_or_else(|| {
            Error::not_found(format!("node {id} is not a peer of this node: add it with `bitsync peer add`"))
        })?;
        if p.state != PeerState::Trusted {
            return Err(Error::denied(format!("node {id} is {}, not trusted", p.state.as_str())));
        }
        if p.address.is_empty() {
            return Err(Error::invalid(format!("peer {id} has no address: set one with `bitsync peer add {id} HOST:PORT`")));
        }
        Ok(p)
    }

    async fn channel(&self, peer: &NodeId, address: &str) -> Result<Channel> {
        if let Some(c) = self.channels.lock().unwrap_or_else(|p| p.into_inner()).get(peer) {
            return Ok(c.clone());
        }
        let c = self.dialer.channel(*peer, address).await?;
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).insert(*peer, c.clone());
        Ok(c)
    }

    /// Forget a peer's channel after a transport failure, so the next try redials.
    fn drop_channel(&self, peer: &NodeId) {
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).remove(peer);
    }

    async fn clone_peer(&self, target: &str, t: &Tracker) -> Result<Outcome> {
        let peer = if Invite::is_token(target) {
            self.join(&Invite::decode(target)?).await?
        } else {
            self.trusted_peer(&Hash::parse(target, "node id")?)?
        };
        let ch = self.channel(&peer.node_id, &peer.address).await?;
        let cfg = client(ch).get_instance_config(GetInstanceConfigRequest {}).await.map_err(Error::from)?.into_inner();
        let mut imported = 0;
        for p in &cfg.peers {
            let Ok(id) = Hash::parse(&p.node_id, "node id") else { continue };
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
            tracing::info!("imported {imported} peer(s) from {} for review (`bitsync peer ls`)", peer.node_id.short());
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
                        address: self.advertise.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                    };
                    let resp = client(ch.clone()).join(req).await.map_err(Error::from)?.into_inner();
                    let p = self.node.db.upsert_peer(&inv.node_id, &resp.name, address, PeerState::Trusted, false)?;
                    self.channels.lock().unwrap_or_else(|p| p.into_inner()).insert(inv.node_id, ch);
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
        let mut cursor = self.node.db.peer(&peer.node_id)?.map(|p| p.cursor).unwrap_or(0);
        let mut out = Outcome::default();
        let mut blocked = false;
        loop {
            t.phase(Phase::Listing);
            let page = fed
                .list_manifests(ListManifestsRequest { after_seq: cursor, limit: PAGE })
                .await
                .map_err(|s| Error::from(s).context(format!("listing manifests of {}", peer.node_id.short())))?
                .into_inner();
            if page.manifests.is_empty() {
                break;
            }
            let (done_upto, page_out) = self.sync_page(peer, &ch, &page.manifests, t).await?;
            out.items += page_out.items;
            out.bytes += page_out.bytes;
            out.errors.extend(page_out.errors);
            if let Some(seq) = done_upto {
                if seq > cursor {
                    cursor = seq;
                    self.node.db.set_cursor(&peer.node_id, cursor)?;
                }
            }
            if done_upto != page.manifests.last().map(|s| s.seq) {
                blocked = true;
                break;
            }
            if !page.more {
                break;
            }
        }
        out.elapsed = started.elapsed();
        if blocked {
            return Err(Error::unavailable(format!(
                "sync from {} stopped at seq {cursor}: {} (run it again to resume)",
                peer.node_id.short(),
                out.errors.last().cloned().unwrap_or_else(|| "an item could not be completed".into())
            )));
        }
        Ok(out)
    }

    /// Sync one page. Returns the highest seq up to which every item is
    /// stored (or rejected for good), and what was done.
    async fn sync_page(
        &self,
        peer: &Peer,
        ch: &Channel,
        page: &[ManifestSummary],
        t: &Tracker,
    ) -> Result<(Option<u64>, Outcome)> {
        let node = &self.node;
        let me = node.id().to_hex();
        let mut out = Outcome::default();
        t.update(|p| {
            p.items_total += page.len() as u64;
            p.bytes_total += page.iter().map(|s| s.size).sum::<u64>();
        });
        // 1. Which items need their manifest (or our envelope) fetched?
        let mut need = Vec::new();
        let mut local: HashMap<String, Manifest> = HashMap::new();
        for s in page {
            let id = Hash::parse(&s.content_id, "content id")?;
            match node.db.manifest(&id) {
                Ok(Some((m, _))) if node.db.envelope(&id, &me)?.is_some() => {
                    local.insert(s.content_id.clone(), m);
                }
                _ => need.push(s.content_id.clone()),
            }
        }
        // 2. Fetch and verify them.
        t.phase(Phase::Manifests);
        let mut fetched: HashMap<String, (Manifest, Vec<u8>)> = HashMap::new();
        let mut failed: HashMap<String, bool> = HashMap::new(); // id -> permanent?
        let mut fed = client(ch.clone());
        for batch in need.chunks(MANIFEST_BATCH) {
            let resp = fed
                .get_manifests(GetManifestsRequest { content_ids: batch.to_vec() })
                .await
                .map_err(|s| Error::from(s).context("fetching manifests"))?
                .into_inner();
            for r in resp.results {
                match self.accept_manifest(&r) {
                    Ok((m, env)) => {
                        fetched.insert(r.content_id.clone(), (m, env));
                    }
                    Err(e) => {
                        let permanent = e.kind() == Kind::Integrity;
                        t.error(format!(
                            "item {} from {}: {e}{}",
                            r.content_id,
                            peer.node_id.short(),
                            if permanent { " (rejected)" } else { "" }
                        ));
                        out.errors.push(e.to_string());
                        failed.insert(r.content_id.clone(), permanent);
                    }
                }
            }
        }
        // 3. Missing chunks of every item we can store.
        let mut missing: Vec<ChunkId> = Vec::new();
        let mut seen = HashSet::new();
        for s in page {
            let m = match (local.get(&s.content_id), fetched.get(&s.content_id)) {
                (Some(m), _) | (None, Some((m, _))) => m,
                _ => continue,
            };
            for c in m.chunk_ids() {
                if seen.insert(c) && !node.db.has_chunk(&c)? {
                    missing.push(c);
                }
            }
        }
        t.phase(Phase::Chunks);
        let bad = self.fetch_chunks(peer, ch, &missing, t).await?;
        // 4. Record every item whose chunks are all present, in seq order, and
        //    find how far the cursor may move.
        let mut done_upto = None;
        let mut cursor_ok = true;
        for s in page {
            let stored = if let Some((m, env)) = fetched.get(&s.content_id) {
                if m.chunk_ids().all(|c| !bad.contains(&c)) && node.db.is_complete_list(m)? {
                    node.db.insert_manifest(m, &[(me.clone(), env.clone())], &[])?;
                    true
                } else {
                    false
                }
            } else if let Some(m) = local.get(&s.content_id) {
                node.db.is_complete_list(m)?
            } else {
                failed.get(&s.content_id).copied().unwrap_or(false) // rejected for good: skip
            };
            if stored && (fetched.contains_key(&s.content_id) || local.contains_key(&s.content_id)) {
                out.items += 1;
                out.bytes += s.size;
                t.update(|p| p.items_done += 1);
            }
            if !stored {
                if !failed.contains_key(&s.content_id) {
                    out.errors.push(format!("item {} is incomplete: some chunks could not be fetched", s.content_id));
                }
                cursor_ok = false;
            }
            if cursor_ok {
                done_upto = Some(s.seq);
            }
        }
        Ok((done_upto, out))
    }

    /// Check a GetManifests result: signature, id, and that our envelope opens it.
    fn accept_manifest(&self, r: &ManifestResult) -> Result<(Manifest, Vec<u8>)> {
        if let Some(p) = &r.problem {
            return Err(Error::from(tonic::Status::new(tonic::Code::from_i32(p.code), p.message.clone())));
        }
        let sm = r.manifest.as_ref().ok_or_else(|| Error::integrity("result has no manifest"))?;
        let env = r.envelope.as_ref().ok_or_else(|| Error::integrity("result has no envelope"))?;
        let m = Manifest::from_signed(sm.body.clone(), sm.signature.clone())?;
        if m.id().to_hex() != r.content_id {
            return Err(Error::integrity(format!("peer sent manifest {} when {} was asked for", m.id(), r.content_id)));
        }
        if env.recipient != self.node.id().to_hex() {
            return Err(Error::integrity("peer sent an envelope for another node"));
        }
        let key = self.node.identity.unwrap_key(&env.wrapped_key)?;
        crypto::decrypt_meta(&key, &m.body().encrypted_meta)
            .map_err(|_| Error::integrity("the envelope the peer sent does not open this item"))?;
        Ok((m, env.wrapped_key.clone()))
    }

    /// Fetch `ids` from `peer` over parallel streams; what it cannot deliver is
    /// asked of the other trusted peers. Returns the ids still not stored.
    async fn fetch_chunks(&self, peer: &Peer, ch: &Channel, ids: &[ChunkId], t: &Tracker) -> Result<HashSet<ChunkId>> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let mut failed = self.fetch_from(peer, ch, ids, t).await?;
        if failed.is_empty() {
            return Ok(failed);
        }
        for other in self.node.db.peers()? {
            if failed.is_empty() {
                break;
            }
            if other.node_id == peer.node_id || other.state != PeerState::Trusted || other.address.is_empty() {
                continue;
            }
            let Ok(och) = self.channel(&other.node_id, &other.address).await else { continue };
            let want: Vec<ChunkId> = failed.iter().copied().collect();
            match self.fetch_from(&other, &och, &want, t).await {
                Ok(still) => failed = still,
                Err(e) => t.error(format!("fetching chunks from {}: {e}", other.node_id.short())),
            }
        }
        Ok(failed)
    }

    async fn fetch_from(&self, peer: &Peer, ch: &Channel, ids: &[ChunkId], t: &Tracker) -> Result<HashSet<ChunkId>> {
        let groups: Vec<Vec<ChunkId>> = ids.chunks(CHUNKS_PER_STREAM).map(|c| c.to_vec()).collect();
        let results: Vec<Result<HashSet<ChunkId>>> = futures::stream::iter(groups)
            .map(|g| self.stream_group(peer, ch.clone(), g, t))
            .buffer_unordered(PARALLEL_STREAMS)
            .collect()
            .await;
        let mut failed = HashSet::new();
        for r in results {
            failed.extend(r?);
        }
        Ok(failed)
    }

    /// One StreamChunks call: verify, write, and record in synced batches.
    async fn stream_group(&self, peer: &Peer, ch: Channel, ids: Vec<ChunkId>, t: &Tracker) -> Result<HashSet<ChunkId>> {
        let req = StreamChunksRequest { chunk_ids: ids.iter().map(|c| c.to_hex()).collect() };
        let mut stream = client(ch)
            .stream_chunks(req)
            .await
            .map_err(|s| Error::from(s).context(format!("streaming chunks from {}", peer.node_id.short())))?
            .into_inner();
        let wanted: HashSet<ChunkId> = ids.iter().copied().collect();
        let mut pending: HashSet<ChunkId> = wanted.clone();
        let mut failed = HashSet::new();
        let mut batch: Vec<(ChunkId, u64)> = Vec::new();
        let mut result = Ok(());
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(s) => {
                    result = Err(Error::from(s).context(format!("chunk stream from {}", peer.node_id.short())));
                    break;
                }
            };
            let Ok(id) = Hash::parse(&msg.chunk_id, "chunk id") else { continue };
            if !wanted.contains(&id) {
                t.error(format!("peer {} sent chunk {id} that was not asked for", peer.node_id.short()));
                continue;
            }
            pending.remove(&id);
            if let Some(p) = msg.problem {
                t.error(format!("chunk {id} from {}: {}", peer.node_id.short(), p.message));
                failed.insert(id);
                continue;
            }
            let node = self.node.clone();
            let data = msg.data;
            let len = data.len() as u64;
            let write = tokio::task::spawn_blocking(move || node.chunks.write(&id, &data))
                .await
                .map_err(|e| Error::io(format!("chunk writer failed: {e}")))?;
            match write {
                Ok(()) => {
                    batch.push((id, len));
                    t.update(|p| p.bytes_done += len);
                }
                Err(e) if e.kind() == Kind::Integrity => {
                    t.error(format!("peer {} sent wrong bytes for chunk {id}; not stored, asking another peer", peer.node_id));
                    failed.insert(id);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            if batch.len() >= RECORD_EVERY {
                self.record(&mut batch).await?;
            }
        }
        self.record(&mut batch).await?;
        result?;
        failed.extend(pending);
        Ok(failed)
    }

    /// Make written chunks durable, then mark them present.
    async fn record(&self, batch: &mut Vec<(ChunkId, u64)>) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let node = self.node.clone();
        let b = std::mem::take(batch);
        tokio::task::spawn_blocking(move || {
            node.chunks.sync()?;
            node.db.record_chunks(&b)
        })
        .await
        .map_err(|e| Error::io(format!("chunk recorder failed: {e}")))?
    }

    /// Keep every mirror source in sync until `shutdown` fires.
    pub async fn run_mirrors(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let mut sources: Vec<NodeId> = Vec::new();
        for m in &self.node.config.mirror {
            match Hash::parse(&m.peer, "mirror peer") {
                Ok(id) => sources.push(id),
                Err(e) => tracing::error!("config.toml [[mirror]]: {e}"),
            }
        }
        if let Ok(peers) = self.node.db.peers() {
            sources.extend(peers.iter().filter(|p| p.mirror && p.state == PeerState::Trusted).map(|p| p.node_id));
        }
        sources.sort();
        sources.dedup();
        for id in sources {
            let me = self.clone();
            let sd = shutdown.clone();
            tokio::spawn(async move { me.mirror(id, sd).await });
        }
    }

    /// Follow one source: sync, then watch for events and sync on each,
    /// reconciling periodically; reconnect with exponential backoff and jitter.
    async fn mirror(self: Arc<Self>, source: NodeId, mut shutdown: watch::Receiver<bool>) {
        const RECONCILE: Duration = Duration::from_secs(60);
        let mut backoff = Duration::from_millis(500);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let started = Instant::now();
            match self.mirror_once(source, &mut shutdown, RECONCILE).await {
                Ok(()) => return, // shutdown
                Err(e) if e.kind() == Kind::Denied || e.kind() == Kind::NotFound => {
                    tracing::warn!(peer = %source, "mirror stopped: {e}");
                    backoff = Duration::from_secs(60);
                }
                Err(e) => tracing::warn!(peer = %source, "mirror connection lost: {e}; retrying in {backoff:?}"),
            }
            self.drop_channel(&source);
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(500);
            }
            let jitter = rand::thread_rng().gen_range(0.5..1.5);
            tokio::select! {
                _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    }

    async fn mirror_once(&self, source: NodeId, shutdown: &mut watch::Receiver<bool>, reconcile: Duration) -> Result<()> {
        let peer = self.trusted_peer(&source)?;
        let key = format!("mirror:{}", source.to_hex());
        let (tx, _rx) = watch::channel(JobState {
            kind: "mirror",
            peer: source.to_hex(),
            progress: Progress { peer: source.to_hex(), ..Default::default() },
            result: None,
        });
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), Arc::new(Job { state: tx.clone() }));
        let t = Tracker { state: tx, started: Instant::now() };
        let r = async {
            self.sync_peer(&peer, &t).await?;
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
                        let ev = ev.map_err(Error::from)?.ok_or_else(|| Error::unavailable("source closed the watch stream"))?;
                        match watch_event::Kind::try_from(ev.kind) {
                            Ok(watch_event::Kind::Revoked) => return Err(Error::denied("the source revoked this mirror")),
                            Ok(watch_event::Kind::Item) => {
                                let cur = self.node.db.peer(&source)?.map(|p| p.cursor).unwrap_or(0);
                                if ev.seq > cur {
                                    self.sync_peer(&peer, &t).await?;
                                }
                            }
                            _ => {}
                        }
                    }
                    _ = tick.tick() => { self.sync_peer(&peer, &t).await?; }
                    _ = shutdown.changed() => return Ok(()),
                }
            }
        }
        .await;
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
        r
    }
}

/// Run a clone to completion in this process (the `bitsync clone` command).
pub async fn clone_now(rep: &Arc<Replicator>, target: &str, on_progress: impl Fn(&Progress)) -> Result<Outcome> {
    let mut rx = rep.start_clone(target)?;
    loop {
        {
            let s = rx.borrow_and_update();
            on_progress(&s.progress);
            if let Some(r) = &s.result {
                let p = &s.progress;
                r.clone()?;
                return Ok(Outcome {
                    items: p.items_done,
                    bytes: p.bytes_done,
                    elapsed: Duration::from_millis(p.elapsed_ms as u64),
                    errors: p.errors.clone(),
                });
            }
        }
        if rx.changed().await.is_err() {
            return Err(Error::io("clone job ended without a result"));
        }
    }
}

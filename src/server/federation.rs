//! `bitsync.v1.Federation`: what trusted peers may ask of this node.
//!
//! Auth rule for every call but `Join`: the caller presented a client
//! certificate (else UNAUTHENTICATED) whose node id is a trusted peer right
//! now (else PERMISSION_DENIED, logged with the refused id). Streams re-check
//! trust before every message, so revoking a peer cuts its open streams too.
//!
//! A trusted peer is keyed or blind (PROTOCOL.md §2.1). A blind one gets
//! every call but `GetLinkEnvelopes` (PERMISSION_DENIED, logged), and
//! `GetManifests` answers it with manifests only: nothing is ever wrapped,
//! re-keyed or pinned for it, so no key of this instance can reach it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::ServerState;
use crate::crypto::{Hash, NodeId};
use crate::error::{blocking, Error, Kind};
use crate::proto::federation_server::Federation;
use crate::proto::*;
use crate::store::{Level, Summary};
use crate::transport::CallerInfo;

mod batch;
pub(crate) mod requests;

use requests::check_after_seq;

/// Chunks read ahead of what the client has taken (HTTP/2 flow control does the rest).
const CHUNK_WINDOW: usize = 4;
/// Most manifests in one GetManifests call.
pub(crate) const MAX_MANIFEST_BATCH: usize = 1000;
const HEARTBEAT: Duration = Duration::from_secs(15);
/// How long a stream ending at shutdown waits to queue its final status.
const SHUTDOWN_SEND: Duration = Duration::from_secs(2);

pub(crate) struct FederationService {
    state: Arc<ServerState>,
    keys_recorded: Mutex<HashSet<NodeId>>,
    /// The ML-KEM key each caller last presented and passed its checks in
    /// this process, so a repeat costs no signature check.
    kem_checked: Mutex<HashMap<NodeId, Vec<u8>>>,
}

pub(crate) fn problem(e: &Error) -> Problem {
    Problem {
        code: e.code() as i32,
        message: e.message().to_string(),
    }
}

pub(crate) fn summary_to_proto(s: &Summary) -> ManifestSummary {
    ManifestSummary {
        content_id: s.content_id.to_hex(),
        seq: s.seq,
        kind: s.kind.clone(),
        size: s.size,
        chunk_count: s.chunk_count,
        created_at_ms: s.created_at_ms,
        publisher: s.publisher.to_hex(),
    }
}

/// Holds one of a peer's stream slots until dropped.
struct StreamSlot {
    state: Arc<ServerState>,
    peer: NodeId,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut s = self.state.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = s.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                s.remove(&self.peer);
            }
        }
    }
}

impl FederationService {
    pub(crate) fn new(state: Arc<ServerState>) -> FederationService {
        FederationService {
            state,
            keys_recorded: Mutex::new(HashSet::new()),
            kem_checked: Mutex::new(HashMap::new()),
        }
    }

    fn caller<T>(req: &Request<T>) -> Result<(NodeId, Vec<u8>, String), Status> {
        let info = req.extensions().get::<CallerInfo>().ok_or_else(|| {
            Status::unauthenticated("federation calls need mutual TLS with a node certificate")
        })?;
        let (id, spki) = info.node.clone().ok_or_else(|| {
            Status::unauthenticated("no client certificate was presented: federation calls need mutual TLS with a node key")
        })?;
        Ok((id, spki, info.remote.clone()))
    }

    /// The caller and its level, if it is a trusted peer right now.
    fn trusted<T>(&self, req: &Request<T>) -> Result<(NodeId, Vec<u8>, Level), Status> {
        let (id, spki, remote) = Self::caller(req)?;
        let level = self.check_trusted(&id, &remote)?;
        let first = self
            .keys_recorded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        if first {
            self.state
                .node
                .db
                .set_peer_key(&id, &spki)
                .map_err(Status::from)?;
        }
        Ok((id, spki, level))
    }

    fn check_trusted(&self, id: &NodeId, remote: &str) -> Result<Level, Status> {
        if let Some(level) = self.state.node.db.trust_level(id).map_err(Status::from)? {
            return Ok(level);
        }
        tracing::warn!(peer = %id.short(), %remote, "refused a call from a node that is not a trusted peer");
        Err(Status::permission_denied(format!(
            "node {id} is not a trusted peer of node {} (untrusted or revoked)",
            self.state.node.id()
        )))
    }

    /// The caller's ML-KEM key, checked and pinned (PROTOCOL.md §4.4b)
    /// before anything is re-keyed for it. A bad key or signature is
    /// DATA_LOSS; a key other than the pinned one FAILED_PRECONDITION,
    /// logged; no key at all is a caller not yet upgraded (BLE2 links).
    async fn check_caller_kem(
        &self,
        caller: &NodeId,
        spki: &[u8],
        offered: Option<SignedKemKey>,
    ) -> Result<(), Status> {
        let Some(offered) = offered else {
            return Ok(());
        };
        let seen = {
            let seen = self.kem_checked.lock().unwrap_or_else(|p| p.into_inner());
            seen.get(caller) == Some(&offered.encapsulation_key)
        };
        // Checked before and still the pin (a revocation clears it): done.
        let db = &self.state.node.db;
        if seen && db.peer_kem_key(caller)?.as_ref() == Some(&offered.encapsulation_key) {
            return Ok(());
        }
        let (state, peer, key) = (self.state.clone(), *caller, spki.to_vec());
        let ek = offered.encapsulation_key.clone();
        let pin = blocking(move || state.node.pin_kem_key(&peer, &key, &offered)).await;
        match pin {
            Ok(crate::store::KemPin::Differs) => Err(Status::failed_precondition(format!(
                "node {caller} presented an ML-KEM-768 key other than the one pinned for it here; \
                 the operator of node {} must revoke and trust it again to accept a new key",
                self.state.node.id()
            ))),
            Ok(_) => {
                let mut seen = self.kem_checked.lock().unwrap_or_else(|p| p.into_inner());
                seen.insert(*caller, ek);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(peer = %caller.short(), "refused the caller's ML-KEM key: {e}");
                Err(e.into())
            }
        }
    }

    fn stream_slot(&self, peer: NodeId) -> Result<StreamSlot, Status> {
        let max = self.state.node.config.limits.max_streams_per_peer;
        let mut s = self.state.streams.lock().unwrap_or_else(|p| p.into_inner());
        let n = s.entry(peer).or_insert(0);
        if *n >= max {
            return Err(Status::resource_exhausted(format!(
                "node {peer} already has {n} streams open here (limit {max}); wait for one to finish"
            )));
        }
        *n += 1;
        Ok(StreamSlot {
            state: self.state.clone(),
            peer,
        })
    }
}

#[tonic::async_trait]
impl Federation for FederationService {
    type StreamChunksStream = super::limits::Budgeted;
    type WatchStream = ReceiverStream<Result<WatchEvent, Status>>;

    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        self.trusted(&req)?;
        let node = &self.state.node;
        Ok(Response::new(HelloResponse {
            node_id: node.id().to_hex(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            name: node.name(),
            allowed: ["list", "fetch", "watch", "config"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            kem_key: Some(node.signed_kem_key()),
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let info = req.extensions().get::<CallerInfo>();
        let (ip, from) = (info.and_then(|c| c.ip), info.map(|c| c.remote.clone()));
        let from = from.unwrap_or_default();
        let limiter = &self.state.join_limit;
        limiter.check(ip, &from)?;
        // Every failure spends the caller's budget; only those under the
        // limit get here, so this warning is as bounded as the attempts.
        let refuse = |e: Status, remote: &str| {
            limiter.failed(ip);
            tracing::warn!(%remote, "refused a join: {}", e.message());
            e
        };
        let (id, spki, remote) = Self::caller(&req).map_err(|e| refuse(e, &from))?;
        let r = req.into_inner();
        if id == self.state.node.id() {
            return Err(Status::invalid_argument("a node cannot join itself"));
        }
        let (hash, name, address) = requests::join_fields(&r).map_err(|e| refuse(e, &remote))?;
        let db = &self.state.node.db;
        if let Err(e) = db.redeem_invite(&hash, &id, &name, &address) {
            limiter.failed(ip);
            tracing::warn!(peer = %id.short(), %remote, "refused a join: {e}");
            return Err(e.into());
        }
        db.set_peer_key(&id, &spki)?;
        tracing::info!(peer = %id.short(), name = %name, "node joined with an invite and is now a trusted peer");
        Ok(Response::new(JoinResponse {
            node_id: self.state.node.id().to_hex(),
            name: self.state.node.name(),
        }))
    }

    async fn list_manifests(
        &self,
        req: Request<ListManifestsRequest>,
    ) -> Result<Response<ListManifestsResponse>, Status> {
        self.trusted(&req)?;
        let r = req.into_inner();
        check_after_seq(r.after_seq)?;
        let limit = requests::page_limit(r.limit, self.state.node.config.limits.list_page_max);
        let mut page = self
            .state
            .node
            .db
            .list_after(r.after_seq, limit.saturating_add(1))?;
        let more = page.len() > limit as usize;
        page.truncate(limit as usize);
        let next = page.last().map(|s| s.seq).unwrap_or(r.after_seq);
        Ok(Response::new(ListManifestsResponse {
            manifests: page.iter().map(summary_to_proto).collect(),
            next_after_seq: next,
            more,
        }))
    }

    async fn get_manifests(
        &self,
        req: Request<GetManifestsRequest>,
    ) -> Result<Response<GetManifestsResponse>, Status> {
        let (caller, spki, level) = self.trusted(&req)?;
        let req = req.into_inner();
        requests::check_envelope_format(req.envelope_format)?;
        let blind = level == Level::Blind;
        if blind && req.envelopes_only {
            tracing::warn!(peer = %caller.short(), "refused GetManifests for envelopes only from a blind peer: it is never given key material");
            return Err(Status::permission_denied(format!(
                "node {caller} is a blind peer of node {}: it is never given key material",
                self.state.node.id()
            )));
        }
        let envelopes_only = req.envelopes_only;
        // A blind caller's ML-KEM key is not even looked at: pinning it
        // would make a hybrid link key for it (PROTOCOL.md §4.4b).
        if !blind {
            self.check_caller_kem(&caller, &spki, req.caller_kem_key)
                .await?;
        }
        let ids = req.content_ids;
        requests::check_manifest_batch(ids.len(), MAX_MANIFEST_BATCH)?;
        let state = self.state.clone();
        let (mut results, relayed_links) = blocking(move || {
            Ok(if blind {
                batch::manifests_only(&state, &ids)
            } else {
                (
                    batch::manifests_for(&state, &caller, &spki, &ids),
                    Vec::new(),
                )
            })
        })
        .await?;
        if envelopes_only {
            // The caller holds the manifests (PROTOCOL.md §2.4).
            results.iter_mut().for_each(|r| r.manifest = None);
        }
        let relay_sender_spki = if blind {
            self.state.node.identity.spki().to_vec()
        } else {
            Vec::new()
        };
        Ok(Response::new(GetManifestsResponse {
            results,
            caller_blind: blind,
            relayed_links,
            relay_sender_spki,
        }))
    }

    async fn get_link_envelopes(
        &self,
        req: Request<GetLinkEnvelopesRequest>,
    ) -> Result<Response<GetLinkEnvelopesResponse>, Status> {
        let (caller, _, level) = self.trusted(&req)?;
        if level == Level::Blind {
            tracing::warn!(peer = %caller.short(), "refused GetLinkEnvelopes from a blind peer: it is never given key material");
            return Err(Status::permission_denied(format!(
                "node {caller} is a blind peer of node {}: it is never given key material",
                self.state.node.id()
            )));
        }
        let node = &self.state.node;
        let link_envelopes = node
            .db
            .link_envelopes(&node.id(), &caller)
            .map_err(Status::from)?;
        // What this node keeps for the caller as a blind mirror of others (§2.2).
        let relayed = node
            .db
            .relayed_links_for(&caller)
            .map_err(Status::from)?
            .into_iter()
            .map(|(sender_spki, link_envelopes)| RelayedLinks {
                sender_spki,
                link_envelopes,
            })
            .collect();
        Ok(Response::new(GetLinkEnvelopesResponse {
            link_envelopes,
            sender_spki: node.identity.spki().to_vec(),
            relayed,
        }))
    }

    async fn stream_chunks(
        &self,
        req: Request<StreamChunksRequest>,
    ) -> Result<Response<Self::StreamChunksStream>, Status> {
        let (caller, _, _) = self.trusted(&req)?;
        let ids = req.into_inner().chunk_ids;
        let max = self.state.node.config.limits.max_chunks_per_request as usize;
        let parsed = requests::chunk_ids(&ids, max)?;
        let slot = self.stream_slot(caller)?;
        let budget = self.state.chunk_budget.stream().await?;
        let (tx, rx) = mpsc::channel::<super::limits::Queued>(CHUNK_WINDOW);
        let state = self.state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut shutdown = state.shutdown.clone();
            let me = state.node.id();
            // Shutting down: end the stream with UNAVAILABLE (the client resumes
            // later or elsewhere) instead of holding the drain for a long stream.
            let stopping = || {
                Status::unavailable(format!(
                    "node {me} is shutting down; retry the chunks not received"
                ))
            };
            // Chunks are read ahead of the one being sent (by as many as
            // the store asks for: one for a local disk, several for an
            // object store whose round trips would otherwise serialise the
            // stream), each within the node-wide byte budget.
            let ahead = state.node.chunks.read_ahead();
            let reads = futures::stream::iter(parsed)
                .map(|id| {
                    let st = state.clone();
                    async move {
                        let len = st.node.db.chunk_len(&id).ok().flatten().unwrap_or(0);
                        let permit = st.chunk_budget.bytes(len).await;
                        let msg = blocking(move || Ok(read_chunk(&st, &id))).await;
                        (msg, permit)
                    }
                })
                .buffered(ahead);
            futures::pin_mut!(reads);
            loop {
                if *shutdown.borrow() {
                    let _ =
                        tokio::time::timeout(SHUTDOWN_SEND, tx.send((Err(stopping()), None))).await;
                    return;
                }
                let next = tokio::select! {
                    n = reads.next() => n,
                    _ = tx.closed() => return,
                    _ = shutdown.changed() => continue,
                };
                let Some((msg, permit)) = next else { return };
                // Checked before each chunk is sent, not only when it was read.
                if !state.node.db.is_trusted(&caller).unwrap_or(false) {
                    tracing::warn!(peer = %caller.short(), "ending a chunk stream: the peer was revoked");
                    let msg = Status::permission_denied(format!("node {caller} was revoked"));
                    let _ = tx.send((Err(msg), None)).await;
                    return;
                }
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = tx.send((Err(e.into()), None)).await;
                        return;
                    }
                };
                let len = msg.problem.is_none().then_some(msg.data.len() as u64);
                tokio::select! {
                    sent = tx.send((Ok(msg), Some(permit))) => if sent.is_err() {
                        return; // the client went away
                    } else if let Some(len) = len {
                        state.node.metrics.chunk_sent(&caller.short(), len);
                    },
                    _ = shutdown.changed() => {
                        let _ = tokio::time::timeout(SHUTDOWN_SEND, tx.send((Err(stopping()), None))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(super::limits::Budgeted::new(rx, budget)))
    }

    async fn get_instance_config(
        &self,
        req: Request<GetInstanceConfigRequest>,
    ) -> Result<Response<InstanceConfig>, Status> {
        self.trusted(&req)?;
        let node = &self.state.node;
        let settings = node.db.public_settings()?.into_iter().collect();
        let peers = node.db.peers()?.iter().map(super::peer_to_proto).collect();
        Ok(Response::new(InstanceConfig {
            node_id: node.id().to_hex(),
            name: node.name(),
            settings,
            peers,
        }))
    }

    async fn watch(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (caller, _, _) = self.trusted(&req)?;
        let mut cursor = req.into_inner().after_seq;
        check_after_seq(cursor)?;
        let slot = self.stream_slot(caller)?;
        let (tx, rx) = mpsc::channel(64);
        let state = self.state.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut head = state.head.clone();
            let mut shutdown = state.shutdown.clone();
            let mut last_sent = tokio::time::Instant::now();
            loop {
                if !state.node.db.is_trusted(&caller).unwrap_or(false) {
                    let ev = WatchEvent {
                        kind: watch_event::Kind::Revoked as i32,
                        seq: cursor,
                        content_id: String::new(),
                    };
                    let _ = tx.send(Ok(ev)).await;
                    tracing::info!(peer = %caller.short(), "ended a watch stream: the peer was revoked");
                    return;
                }
                let page = match state.node.db.list_after(cursor, 256) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                for s in &page {
                    // Trust is re-checked before every message, not only every page.
                    if !state.node.db.is_trusted(&caller).unwrap_or(false) {
                        break;
                    }
                    let ev = WatchEvent {
                        kind: watch_event::Kind::Item as i32,
                        seq: s.seq,
                        content_id: s.content_id.to_hex(),
                    };
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                    cursor = s.seq;
                    last_sent = tokio::time::Instant::now();
                }
                if !page.is_empty() {
                    continue;
                }
                if last_sent.elapsed() >= HEARTBEAT {
                    let ev = WatchEvent {
                        kind: watch_event::Kind::Heartbeat as i32,
                        seq: cursor,
                        content_id: String::new(),
                    };
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                    last_sent = tokio::time::Instant::now();
                }
                tokio::select! {
                    _ = head.changed() => {}
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn read_chunk(state: &ServerState, id: &Hash) -> ChunkData {
    let node = &state.node;
    let missing = || ChunkData {
        chunk_id: id.to_hex(),
        data: Default::default(),
        problem: Some(Problem {
            code: tonic::Code::NotFound as i32,
            message: format!("chunk {id} is not here"),
        }),
    };
    match node.db.has_chunk(id) {
        Ok(true) => {}
        Ok(false) => return missing(),
        Err(e) => {
            return ChunkData {
                chunk_id: id.to_hex(),
                data: Default::default(),
                problem: Some(problem(&e)),
            }
        }
    }
    match node.read_chunk_to_send(id) {
        Ok(data) => ChunkData {
            chunk_id: id.to_hex(),
            data: data.into(),
            problem: None,
        },
        Err(e) => {
            if e.kind() == Kind::NotFound {
                return missing();
            }
            // The peer gets the code and what it means for this chunk; the
            // store's own error (bucket, endpoint, paths) stays in our log.
            let problem = if e.kind() == Kind::Integrity {
                problem(&e)
            } else {
                tracing::warn!(chunk = %id, "reading a chunk to send: {e}");
                Problem {
                    code: e.code() as i32,
                    message: format!("chunk {id} could not be read from this node's chunk store"),
                }
            };
            ChunkData {
                chunk_id: id.to_hex(),
                data: Default::default(),
                problem: Some(problem),
            }
        }
    }
}

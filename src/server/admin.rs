//! `bitsync.v1.Admin`: the operator's handle on a running node, on the
//! Unix socket `<data-dir>/admin.sock` (mode 0600). Long jobs (Clone, Sync)
//! stream progress and end with the job's status code; the job itself runs
//! on, whether or not anyone is still watching.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{peer_to_proto, ServerState};
use crate::content::{self, Listed};
use crate::crypto::Hash;
use crate::error::{blocking, Error};
use crate::invite::Invite;
use crate::manifest::now_ms;
use crate::proto::admin_server::Admin;
use crate::proto::*;
use crate::replicator::JobState;
use crate::store::{Level, PeerState};
use crate::transport::PeerAddress;

const MAX_INVITE_TTL: u64 = 30 * 24 * 3600;
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

pub(crate) struct AdminService {
    state: Arc<ServerState>,
}

impl AdminService {
    pub(crate) fn new(state: Arc<ServerState>) -> AdminService {
        AdminService { state }
    }
}

type ProgressStream = ReceiverStream<Result<Progress, Status>>;

/// Forward a job's progress (at most every 200 ms) and end with its status.
fn progress_stream(mut rx: watch::Receiver<JobState>) -> ProgressStream {
    let (tx, out) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let s = rx.borrow_and_update().clone();
            if tx.send(Ok(s.progress.clone())).await.is_err() {
                return; // the caller left; the job goes on
            }
            if let Some(result) = s.result {
                if let Err(e) = result {
                    let _ = tx.send(Err(e.into())).await;
                }
                return;
            }
            tokio::time::sleep(PROGRESS_EVERY).await;
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(out)
}

#[tonic::async_trait]
impl Admin for AdminService {
    type CloneStream = ProgressStream;
    type SyncStream = ProgressStream;

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let node = &self.state.node;
        let stats = node.db.stats()?;
        let jobs = self
            .state
            .replicator
            .jobs()
            .into_iter()
            .map(|j| Job {
                kind: j.kind.to_string(),
                peer: j.peer,
                progress: Some(j.progress),
                last_synced_at_ms: j.last_synced_at_ms,
            })
            .collect();
        Ok(Response::new(StatusResponse {
            node_id: node.id().to_hex(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            name: node.name(),
            listen_address: self
                .state
                .listen_address
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            onion_address: self
                .state
                .onion_address
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default(),
            manifests: stats.manifests,
            chunks: stats.chunks,
            stored_bytes: stats.stored_bytes,
            head_seq: stats.head_seq,
            trusted_peers: stats.trusted_peers,
            jobs,
            uptime_ms: self.state.started.elapsed().as_millis() as i64,
            chunk_store: self.state.node.chunks.describe(),
        }))
    }

    async fn list_content(
        &self,
        req: Request<ListContentRequest>,
    ) -> Result<Response<ListContentResponse>, Status> {
        let r = req.into_inner();
        let node = self.state.node.clone();
        let limit = if r.limit == 0 { 100 } else { r.limit.min(1000) };
        let resp = blocking(move || -> Result<ListContentResponse, Error> {
            let mut page = content::list(&node, r.after_seq, limit + 1)?;
            let more = page.len() > limit as usize;
            page.truncate(limit as usize);
            let next_after_seq = page.last().map(|l| l.summary.seq).unwrap_or(r.after_seq);
            let items = page
                .into_iter()
                .map(
                    |Listed {
                         summary: s,
                         name,
                         complete,
                         blind,
                         awaiting_key,
                     }| ContentInfo {
                        content_id: s.content_id.to_hex(),
                        seq: s.seq,
                        kind: s.kind,
                        size: s.size,
                        created_at_ms: s.created_at_ms,
                        publisher: s.publisher.to_hex(),
                        name,
                        complete,
                        blind,
                        awaiting_key,
                    },
                )
                .collect();
            Ok(ListContentResponse {
                next_after_seq,
                more,
                items,
            })
        })
        .await?;
        Ok(Response::new(resp))
    }

    async fn list_peers(
        &self,
        _req: Request<ListPeersRequest>,
    ) -> Result<Response<ListPeersResponse>, Status> {
        let peers = self
            .state
            .node
            .db
            .peers()?
            .iter()
            .map(peer_to_proto)
            .collect();
        Ok(Response::new(ListPeersResponse { peers }))
    }

    async fn add_peer(&self, req: Request<AddPeerRequest>) -> Result<Response<PeerInfo>, Status> {
        let r = req.into_inner();
        let id = Hash::parse(&r.node_id, "node id")?;
        if id == self.state.node.id() {
            return Err(Status::invalid_argument("that is this node's own id"));
        }
        PeerAddress::parse(&r.address)?;
        let p = self.state.node.db.upsert_peer(
            &id,
            &r.name,
            &r.address,
            PeerState::Trusted,
            r.mirror,
        )?;
        let p = if r.blind {
            self.state.node.db.set_peer_level(&id, Level::Blind)?
        } else {
            p
        };
        tracing::info!(peer = %id.short(), level = p.level.as_str(), "peer trusted by the operator");
        Ok(Response::new(peer_to_proto(&p)))
    }

    async fn set_peer_level(
        &self,
        req: Request<SetPeerLevelRequest>,
    ) -> Result<Response<PeerInfo>, Status> {
        let r = req.into_inner();
        let id = Hash::parse(&r.node_id, "node id")?;
        let level = Level::parse(&r.level)?;
        let p = self.state.node.db.set_peer_level(&id, level)?;
        tracing::info!(peer = %id.short(), level = level.as_str(), "peer level set by the operator");
        Ok(Response::new(peer_to_proto(&p)))
    }

    async fn revoke_peer(
        &self,
        req: Request<RevokePeerRequest>,
    ) -> Result<Response<PeerInfo>, Status> {
        let id = Hash::parse(&req.into_inner().node_id, "node id")?;
        let p = self.state.node.db.revoke_peer(&id)?;
        tracing::info!(peer = %id.short(), "peer revoked by the operator");
        Ok(Response::new(peer_to_proto(&p)))
    }

    async fn create_invite(
        &self,
        req: Request<CreateInviteRequest>,
    ) -> Result<Response<CreateInviteResponse>, Status> {
        let r = req.into_inner();
        let level = if r.blind { Level::Blind } else { Level::Keyed };
        let ttl = match r.ttl_seconds {
            0 => 3600,
            t if t > MAX_INVITE_TTL => {
                return Err(Status::invalid_argument(format!(
                    "ttl is over the maximum of {MAX_INVITE_TTL} s"
                )))
            }
            t => t,
        };
        let expires = now_ms() + (ttl as i64) * 1000;
        let inv = Invite::new(self.state.node.id(), self.state.advertised(), expires);
        self.state
            .node
            .db
            .create_invite(&inv.secret_hash(), expires, level)?;
        Ok(Response::new(CreateInviteResponse {
            token: inv.encode(),
            expires_at_ms: expires,
        }))
    }

    async fn clone(
        &self,
        req: Request<CloneRequest>,
    ) -> Result<Response<Self::CloneStream>, Status> {
        let target = req.into_inner().token_or_peer;
        let rx = self.state.replicator.start_clone(&target)?;
        Ok(Response::new(progress_stream(rx)))
    }

    async fn sync(&self, req: Request<SyncRequest>) -> Result<Response<Self::SyncStream>, Status> {
        let peer = Hash::parse(&req.into_inner().peer, "peer node id")?;
        let rx = self.state.replicator.start_sync(peer)?;
        Ok(Response::new(progress_stream(rx)))
    }

    async fn verify(
        &self,
        _req: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let node = self.state.node.clone();
        let r = blocking(move || content::verify(&node, &|_, _| {})).await?;
        Ok(Response::new(VerifyResponse {
            chunks_checked: r.chunks_checked,
            manifests_checked: r.manifests_checked,
            problems: r.problems,
        }))
    }
}

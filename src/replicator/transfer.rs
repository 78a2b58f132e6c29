//! The transfer engine: chunks from a local source, from the peer's
//! `StreamChunks` calls and from the other trusted peers, each verified
//! against its id and written by rename, then made durable and present by one
//! group-commit recorder per fetch; and the adoption of chunk files a crashed
//! run left unrecorded.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use tonic::transport::Channel;

use super::client;
use super::jobs::Tracker;
use super::sync::PeerSync;
use crate::crypto::{ChunkId, Hash};
use crate::error::blocking;
use crate::error::{Error, Kind, Result};
use crate::metrics::Rejected;
use crate::node::Node;
use crate::proto::{progress::Phase, ChunkData, StreamChunksRequest};
use crate::store::{Peer, PeerState};

/// Chunks asked for in one StreamChunks call.
const CHUNKS_PER_STREAM: usize = 64;
/// Parallel StreamChunks calls per sync.
const PARALLEL_STREAMS: usize = 4;
/// Retries of a StreamChunks call the source refused as busy.
const BUSY_RETRIES: u32 = 6;
/// Chunks written but not yet synced and recorded, at most (the writers wait
/// beyond this). One syncfs and one transaction cover everything queued.
const RECORD_QUEUE: usize = 256;
/// Chunks from a local source written between two syncs (and one transaction).
const LOCAL_BATCH: usize = 64;

/// The lengths at which each missing chunk may be stored: those its
/// waiting items' signed manifests give it (`PageWork::wanted_lengths`).
pub(super) type Lengths = HashMap<ChunkId, Vec<u64>>;

/// Whether `len` is a length some waiting item expects for chunk `id`.
fn wanted(lengths: &Lengths, id: &ChunkId, len: u64) -> bool {
    lengths.get(id).is_some_and(|v| v.contains(&len))
}

/// A place chunks may be read from before asking the peer (`clone
/// --from-backup`). Owned here, where it is consulted; the backup room
/// implements it for a repository.
pub(crate) trait ChunkSource: Send + Sync {
    /// The bytes stored under `id`, or `None` if this source has no such chunk.
    /// Need not be verified: the caller hash-checks before writing.
    fn read(&self, id: &ChunkId) -> Option<Vec<u8>>;
    fn describe(&self) -> String;
}

/// Store every chunk of `ids` that `src` holds with the right hash and a
/// length some item expects, synced and recorded. Returns the chunks stored
/// with their lengths; the others are to be fetched from the peer.
pub(super) fn fill_from_local(
    node: &Node,
    src: &dyn ChunkSource,
    ids: &[ChunkId],
    lengths: &Lengths,
) -> Result<Vec<(ChunkId, u64)>> {
    let mut stored = Vec::new();
    let mut batch: Vec<(ChunkId, u64)> = Vec::new();
    let flush = |batch: &mut Vec<(ChunkId, u64)>, stored: &mut Vec<(ChunkId, u64)>| -> Result<()> {
        if !batch.is_empty() {
            node.chunks.sync()?;
            node.db.record_chunks(batch)?;
            stored.append(batch);
        }
        Ok(())
    };
    for id in ids {
        if node.db.has_chunk(id)? {
            continue;
        }
        let Some(data) = src.read(id) else { continue };
        if !wanted(lengths, id, data.len() as u64) {
            // Left to the peer, whose copy (the same bytes, if it hashes
            // right) then rejects the item that expects another length.
            continue;
        }
        match node.chunks.write(id, &data) {
            Ok(_) => batch.push((*id, data.len() as u64)),
            Err(e) if e.kind() == Kind::Integrity => {
                tracing::warn!(chunk = %id, "{} holds a damaged copy; fetching it from the peer", src.describe());
            }
            Err(e) => return Err(e),
        }
        if batch.len() >= LOCAL_BATCH {
            flush(&mut batch, &mut stored)?;
        }
    }
    flush(&mut batch, &mut stored)?;
    Ok(stored)
}

/// Chunk files present on disk but not recorded (a run died between rename
/// and record): keep those whose bytes hash to their id and whose length an
/// item expects, remove the others. Returns the adopted chunks with their
/// lengths, synced and recorded.
pub(super) fn adopt_strays(
    node: &Node,
    ids: &[ChunkId],
    lengths: &Lengths,
) -> Result<Vec<(ChunkId, u64)>> {
    let mut adopted = Vec::new();
    for id in ids {
        let Ok(Some(stamp)) = node.chunks.stamp(id) else {
            continue;
        };
        if !wanted(lengths, id, stamp.size) {
            node.chunks.remove(id)?;
            continue;
        }
        match node.chunks.read_unchecked(id) {
            Ok((data, _)) if Hash::of(&data) == *id => adopted.push((*id, data.len() as u64)),
            _ => node.chunks.remove(id)?,
        }
    }
    if adopted.is_empty() {
        return Ok(Vec::new());
    }
    node.chunks.sync()?;
    node.db.record_chunks(&adopted)?;
    Ok(adopted)
}

impl PeerSync<'_> {
    /// Stream `ids` from `from` over parallel calls, storing items as they
    /// complete. The outer error is local (this node's disk or database), the
    /// inner one the peer's or the connection's.
    async fn fetch_into(
        &mut self,
        from: &Peer,
        ch: Channel,
        ids: Vec<ChunkId>,
    ) -> Result<Result<()>> {
        let groups: Vec<Vec<ChunkId>> = ids.chunks(CHUNKS_PER_STREAM).map(|c| c.to_vec()).collect();
        let (node, t) = (self.rep.node.clone(), self.t);
        let lengths = Arc::new(self.work.wanted_lengths());
        let who = from.node_id.short();
        let (rec_tx, mut recorded) = spawn_recorder(node.clone());
        // The calls hold the only senders: once they are dropped, the recorder flushes and ends.
        let mut calls = Some(Box::pin(
            futures::stream::iter(groups)
                .map(move |g| {
                    let (node, ch, rec, lengths) =
                        (node.clone(), ch.clone(), rec_tx.clone(), lengths.clone());
                    stream_group(node, from, ch, g, rec, lengths, t)
                })
                .buffer_unordered(PARALLEL_STREAMS),
        ));
        let mut peer_error = None;
        let mut local_error = None;
        loop {
            tokio::select! {
                g = next_or_pending(&mut calls) => match g {
                    Some(g) => {
                        self.out.bytes += g.bytes;
                        self.work.undelivered(g.failed);
                        // Not stored; the items expecting other lengths are rejected.
                        self.work.arrived_sized(&g.wrong_length, &who);
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
                    Some(Ok(sized)) => {
                        let ready = self.work.arrived_sized(&sized, &who);
                        self.settle(ready).await?;
                    }
                    Some(Err(e)) => {
                        // The recorder's own error is the cause: a stream that
                        // found it gone only says "recorder stopped", and may
                        // have been seen first.
                        local_error = Some(e);
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

    /// Stream what is still missing from the source. A local failure ends
    /// the sync at once (the outer error); the source's (the inner one: an
    /// error status, a broken or stalled stream) is returned after every
    /// chunk it did not deliver was marked with it, so that the other peers
    /// are asked for them before the sync ends with it.
    pub(super) async fn fetch_from_source(&mut self) -> Result<Result<()>> {
        self.t.phase(Phase::Chunks);
        let (peer, ch, want) = (self.peer, self.ch.clone(), self.work.still_missing());
        let r = self.fetch_into(peer, ch, want).await?;
        if let Err(e) = &r {
            let why = e.to_string();
            let left = self.work.still_missing();
            self.work
                .undelivered(left.into_iter().map(|c| (c, why.clone())).collect());
        }
        Ok(r)
    }

    /// Ask the other trusted peers, one after the other, for the chunks the
    /// source could not send. A local failure (disk full, database) ends the
    /// sync; a peer's is reported and the next one asked.
    pub(super) async fn ask_others(&mut self) -> Result<()> {
        let mut left = self.work.still_missing();
        if left.is_empty() {
            return Ok(());
        }
        let (source, me) = (self.peer.node_id, self.rep.node.id());
        for other in self.rep.node.db.peers()? {
            if left.is_empty() {
                break;
            }
            if other.node_id == source
                || other.node_id == me
                || other.state != PeerState::Trusted
                || other.address.is_empty()
            {
                continue;
            }
            let who = other.node_id.short();
            let och = match self.rep.channel(&other.node_id, &other.address).await {
                Ok(c) => c,
                Err(e) => {
                    self.t
                        .error(format!("asking {who} for {} chunk(s): {e}", left.len()));
                    continue;
                }
            };
            tracing::info!(
                peer = %who,
                source = %source.short(),
                "asking another peer for {} chunk(s) the source could not send",
                left.len()
            );
            self.work.asked(who.clone());
            if let Err(e) = self.fetch_into(&other, och, left).await? {
                self.t.error(format!("fetching chunks from {who}: {e}"));
                if e.kind() == Kind::Unavailable {
                    self.rep.drop_channel(&other.node_id);
                }
            }
            left = self.work.still_missing();
        }
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
    /// Received with the right hash but a length no waiting item's signed
    /// manifest gives: not stored.
    wrong_length: Vec<(ChunkId, u64)>,
    /// The call broke off (the chunks it did not get are in neither list);
    /// true when the failure is local (writing or recording), not the peer's.
    error: Option<(Error, bool)>,
}

/// One StreamChunks call: verify and write each chunk, then hand it to the recorder.
/// Open a StreamChunks call. A source at its stream limits answers
/// RESOURCE_EXHAUSTED (after waiting `stream_wait_ms` itself): that is
/// retried with backoff and jitter (0.25 s doubling, about 16 s in all)
/// before it counts as the source's failure.
async fn open_stream(
    ch: Channel,
    req: StreamChunksRequest,
    who: &str,
) -> std::result::Result<tonic::codec::Streaming<ChunkData>, tonic::Status> {
    let mut pause = std::time::Duration::from_millis(250);
    for _ in 0..BUSY_RETRIES {
        match client(ch.clone()).stream_chunks(req.clone()).await {
            Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                let wait = pause.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..1.5));
                tracing::info!("{who} is busy ({}); asking again in {wait:?}", s.message());
                tokio::time::sleep(wait).await;
                pause *= 2;
            }
            r => return r.map(|s| s.into_inner()),
        }
    }
    client(ch).stream_chunks(req).await.map(|s| s.into_inner())
}

async fn stream_group(
    node: Arc<Node>,
    peer: &Peer,
    ch: Channel,
    ids: Vec<ChunkId>,
    recorder: RecorderTx,
    lengths: Arc<Lengths>,
    t: &Tracker,
) -> GroupOut {
    let who = peer.node_id.short();
    let req = StreamChunksRequest {
        chunk_ids: ids.iter().map(|c| c.to_hex()).collect(),
    };
    let mut g = Group {
        node,
        pending: ids.into_iter().collect(),
        recorder,
        lengths,
        t,
        out: GroupOut::default(),
        who,
    };
    let mut stream = match open_stream(ch, req, &g.who).await {
        Ok(s) => s,
        Err(s) => {
            let e = Error::from(s).context(format!("streaming chunks from {}", g.who));
            g.out.error = Some((e, false));
            return g.out;
        }
    };
    let idle = stream_idle(&g.node);
    loop {
        let next = match tokio::time::timeout(idle, stream.message()).await {
            Ok(next) => next,
            Err(_) => {
                // Dropping the stream cancels the call (RST_STREAM).
                let e = Error::unavailable(format!(
                    "chunk stream from {} stalled: no message for {} s (request_timeout_secs), cancelled",
                    g.who,
                    idle.as_secs()
                ));
                g.out.error = Some((e, false));
                break;
            }
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(s) => {
                let e = broken_stream(s).context(format!("chunk stream from {}", g.who));
                g.out.error = Some((e, false));
                break;
            }
        };
        if let Err(local) = g.receive(msg).await {
            g.out.error = Some((local, true));
            break;
        }
    }
    if g.out.error.is_none() {
        for id in g.pending {
            let why = format!("{} ended the stream without sending it", g.who);
            g.out.failed.push((id, why));
        }
    }
    g.out
}

/// The error of a chunk stream that broke off mid-way. A connection lost
/// under the stream (closed by the HTTP/2 keepalive during an outage, or
/// reset) reaches us as UNKNOWN "h2 protocol error: ...", not as a status
/// the peer sent: that is the peer being unreachable (`Unavailable`: exit 8,
/// and the sync resumes on a new connection), not a local I/O error.
fn broken_stream(s: tonic::Status) -> Error {
    if s.code() == tonic::Code::Unknown && s.message().starts_with("h2 protocol error") {
        return Error::unavailable(s.message().to_string());
    }
    Error::from(s)
}

/// How long a chunk stream may go without a message before it is cancelled:
/// the node's `request_timeout_secs`. The channel's request timeout covers a
/// call only until its response headers; a peer that sends them and then
/// nothing would otherwise hold the sync forever. One message is at most one
/// chunk (2 MiB + 16 bytes), which takes 17 s at 1 Mbit/s: the default 60 s
/// leaves room for slow links and Tor.
fn stream_idle(node: &Node) -> std::time::Duration {
    std::time::Duration::from_secs(node.config.limits.request_timeout_secs.max(1))
}

/// One StreamChunks call under way.
struct Group<'a> {
    node: Arc<Node>,
    /// Asked for and not received yet.
    pending: HashSet<ChunkId>,
    recorder: RecorderTx,
    lengths: Arc<Lengths>,
    t: &'a Tracker,
    out: GroupOut,
    /// The peer, for messages.
    who: String,
}

impl Group<'_> {
    /// One message of the stream: check it was asked for (and not sent
    /// before), write it (verified against its id) and hand it to the
    /// recorder. The peer's problems go into `out`; the error returned is
    /// local and ends the call.
    async fn receive(&mut self, msg: ChunkData) -> Result<()> {
        let (who, t) = (&self.who, self.t);
        let Ok(id) = Hash::parse(&msg.chunk_id, "chunk id") else {
            t.error(format!(
                "peer {who} sent a malformed chunk id {}",
                crate::error::quote(&msg.chunk_id)
            ));
            return Ok(());
        };
        if !self.pending.remove(&id) {
            t.error(format!("peer {who} sent chunk {id} that was not asked for"));
            return Ok(());
        }
        if let Some(p) = msg.problem {
            if p.code == tonic::Code::DataLoss as i32 {
                self.node
                    .metrics
                    .chunk_rejected(who, Rejected::PeerDataLoss);
            }
            let why = format!("{} from {who}: {}", code_name(p.code), p.message);
            t.error(format!("chunk {id}: {why}"));
            self.out.failed.push((id, why));
            return Ok(());
        }
        let node = self.node.clone();
        let data = msg.data;
        let len = data.len() as u64;
        if !wanted(&self.lengths, &id, len) {
            // Checked before the hash: a wrong length is wrong whatever the
            // bytes; if they do hash to the id, the item is provably bad.
            if Hash::of(&data) == id {
                self.node.metrics.chunk_rejected(who, Rejected::WrongLength);
                t.error(format!(
                    "chunk {id} from {who} is {len} bytes, no length its signed manifest gives (DATA_LOSS, not stored)"
                ));
                self.out.wrong_length.push((id, len));
            } else {
                self.node.metrics.chunk_rejected(who, Rejected::BadHash);
                let why = format!("{who} sent wrong bytes for it (not stored)");
                t.error(format!("chunk {id}: {why}"));
                self.out.failed.push((id, why));
            }
            return Ok(());
        }
        let write = tokio::task::spawn_blocking(move || node.chunks.write(&id, &data))
            .await
            .unwrap_or_else(|e| Err(Error::io(format!("chunk writer failed: {e}"))));
        match write {
            Ok(_) => {
                self.out.bytes += len;
                t.update(|p| p.bytes_done += len);
                self.node.metrics.chunk_received(who, len);
                if self.recorder.send((id, len)).await.is_err() {
                    return Err(Error::io("the chunk recorder stopped"));
                }
            }
            Err(e) if e.kind() == Kind::Integrity => {
                self.node.metrics.chunk_rejected(who, Rejected::BadHash);
                let why = format!("{who} sent wrong bytes for it (not stored)");
                t.error(format!("chunk {id}: {why}"));
                self.out.failed.push((id, why));
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// The code name of a peer's per-item or per-chunk problem, e.g. `DataLoss`.
fn code_name(code: i32) -> String {
    format!("{:?}", tonic::Code::from_i32(code))
}

/// Where writers hand over chunks they wrote: (id, ciphertext length).
type RecorderTx = tokio::sync::mpsc::Sender<(ChunkId, u64)>;
/// Batches made durable and present, with their lengths, in order (or the
/// error that ended the recorder).
type RecordedRx = tokio::sync::mpsc::UnboundedReceiver<Result<Vec<(ChunkId, u64)>>>;

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
            let n = node.clone();
            let r = blocking(move || {
                n.chunks.sync()?;
                n.db.record_chunks(&batch)?;
                Ok(batch)
            })
            .await;
            let failed = r.is_err();
            if done_tx.send(r).is_err() || failed {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_lost_under_a_stream_is_unavailable_a_peer_status_keeps_its_code() {
        let lost =
            tonic::Status::unknown("h2 protocol error: error reading a body from connection");
        assert_eq!(broken_stream(lost).kind(), Kind::Unavailable);
        let sent = tonic::Status::unknown("something the peer said");
        assert_eq!(broken_stream(sent).kind(), Kind::Io);
        let denied = tonic::Status::permission_denied("h2 protocol error: no");
        assert_eq!(broken_stream(denied).kind(), Kind::Denied);
    }
}

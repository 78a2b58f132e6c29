//! One sync from one peer: page through its listing from the saved cursor;
//! on each page, plan, fetch the manifests lacking, then the chunks lacking
//! (leftovers of a crashed run first, then a local source, then the peer,
//! then the other trusted peers), storing each item as it completes and
//! moving the cursor over the settled prefix. Every step works on one
//! [`PeerSync`]; the decisions are the planner's.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use tonic::transport::Channel;

use super::accept::{accept_all, fetch_links, keep_relayed_links};
use super::jobs::Tracker;
use super::planner::{check_page, Accepted, Cursor, ManifestQueue, PageWork, MAX_SEQ};
use super::{client, transfer, Outcome, Replicator};
use crate::crypto::{ChunkId, ContentId, Hash};
use crate::error::blocking;
use crate::error::{Error, Kind, Result};
use crate::node::Node;
use crate::proto::{
    progress::Phase, GetManifestsRequest, ListManifestsRequest, ManifestResult, ManifestSummary,
};
use crate::store::{Level, Peer};

/// Items asked for in one ListManifests call.
const PAGE: u32 = 500;
/// Manifests asked for in one GetManifests call.
const MANIFEST_BATCH: usize = 200;
/// How often one sync resumes on a new connection after losing one mid-way.
const RESUMES: u32 = 5;

/// The state of one sync from one peer.
pub(super) struct PeerSync<'a> {
    pub(super) rep: &'a Replicator,
    /// The source.
    pub(super) peer: &'a Peer,
    pub(super) ch: Channel,
    pub(super) t: &'a Tracker,
    cursor: Cursor,
    pub(super) out: Outcome,
    /// The page being worked on.
    pub(super) work: PageWork,
    /// One line per item that could not be completed.
    incomplete: Vec<String>,
}

impl Replicator {
    /// Pull everything new from `peer`, from its saved cursor.
    pub(super) async fn sync_peer(&self, peer: &Peer, t: &Tracker) -> Result<Outcome> {
        let lock = {
            let mut locks = self.peer_locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.entry(peer.node_id).or_default().clone()
        };
        let _guard = lock.lock().await;
        // Boxed: the steps of a sync nest deep (page, fetch, settle, save), and
        // unboxed, the mirror task's future exceeds the compiler's query depth
        // limit when its layout is computed. One allocation per sync.
        let result = Box::pin(self.sync_locked(peer, t)).await;
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
        // Re-read: the cursor may have moved since `peer` was loaded.
        let value = stored_cursor(&self.node, &peer.node_id)?;
        let mut s = PeerSync {
            rep: self,
            peer,
            ch,
            t,
            cursor: Cursor::new(value, Instant::now()),
            out: Outcome::default(),
            work: PageWork::default(),
            incomplete: Vec::new(),
        };
        let result = s.pages_resuming().await;
        // Keep what was achieved, even when the sync broke off.
        let saved = s.save_cursor(true).await;
        s.out.elapsed = started.elapsed();
        result?;
        saved?;
        if let Some(first) = s.incomplete.first() {
            let more = match s.incomplete.len() - 1 {
                0 => String::new(),
                n => format!(" (and {n} more item(s); see the problems listed)"),
            };
            return Err(Error::unavailable(format!(
                "sync from {} is incomplete, stopped at seq {}: {first}{more}; run it again to resume once a trusted peer has the data",
                peer.node_id.short(),
                s.cursor.value,
            )));
        }
        Ok(s.out)
    }
}

impl PeerSync<'_> {
    fn node(&self) -> &std::sync::Arc<Node> {
        &self.rep.node
    }

    /// The source broke the protocol: the sync stops (keeping what it
    /// stored) with an error naming the peer. `Integrity`: the peer's answers
    /// are wrong, retrying at once will not help (mirrors back off).
    fn violation(&self, why: &str) -> Error {
        Error::integrity(format!(
            "protocol violation by peer {}: it {why}",
            self.peer.node_id
        ))
    }

    /// [`Self::pages`], resumed on a new connection when the source became
    /// unreachable after this pass made progress (bytes, items or cursor):
    /// a connection lost to a network outage (e.g. closed by the HTTP/2
    /// keepalive while a partition lasts) is not the end of a clone that was
    /// working. At most [`RESUMES`] times, waiting 1, 2, 4... s first; a
    /// pass that achieved nothing (an unreachable or stalled source) ends the
    /// sync with its error at once. Everything stored stays; the cursor
    /// stopped before the first item the pass left incomplete, so the next
    /// pass lists those again.
    async fn pages_resuming(&mut self) -> Result<()> {
        let mut wait = std::time::Duration::from_secs(1);
        let mut resumes = 0;
        loop {
            let before = (self.out.bytes, self.out.items, self.cursor.value);
            let r = self.pages().await;
            // An item rejected before the break and listed again after it counts once.
            let mut seen = HashSet::new();
            self.out.rejected.retain(|l| seen.insert(l.clone()));
            let e = match r {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let progressed = (self.out.bytes, self.out.items, self.cursor.value) != before;
            if e.kind() != Kind::Unavailable || !progressed || resumes == RESUMES {
                return Err(e);
            }
            resumes += 1;
            let who = self.peer.node_id.short();
            self.t.error(format!(
                "{e}; resuming from {who} on a new connection in {} s",
                wait.as_secs()
            ));
            self.save_cursor(true).await?;
            self.incomplete.clear();
            self.work = PageWork::default();
            self.rep.drop_channel(&self.peer.node_id);
            tokio::time::sleep(wait).await;
            wait *= 2;
            self.t.phase(Phase::Connecting);
            self.ch = self
                .rep
                .channel(&self.peer.node_id, &self.peer.address)
                .await?;
        }
    }

    /// Every page of the listing after the cursor.
    async fn pages(&mut self) -> Result<()> {
        let mut fed = client(self.ch.clone());
        let mut after = self.cursor.value;
        loop {
            self.t.phase(Phase::Listing);
            let page = fed
                .list_manifests(ListManifestsRequest {
                    after_seq: after,
                    limit: PAGE,
                })
                .await
                .map_err(|s| {
                    Error::from(s).context(format!(
                        "listing the items of {}",
                        self.peer.node_id.short()
                    ))
                })?
                .into_inner();
            if let Err(why) = check_page(after, PAGE, &page.manifests, page.more) {
                return Err(self.violation(&why));
            }
            let Some(last) = page.manifests.last().map(|s| s.seq) else {
                break;
            };
            self.sync_page(&page.manifests).await?;
            after = last;
            if !page.more {
                break;
            }
        }
        Ok(())
    }

    /// Store every item of the page whose data can be had, and move the
    /// cursor over the settled prefix.
    async fn sync_page(&mut self, page: &[ManifestSummary]) -> Result<()> {
        let need = self.plan(page).await?;
        self.fetch_manifests(&need).await?;
        let ready = self.work.index_missing();
        self.settle(ready).await?;
        let mut source = Ok(());
        if self.work.wanted_any() {
            self.adopt_strays().await?;
            self.take_local().await?;
            source = self.fetch_from_source().await?;
            self.ask_others().await?;
        }
        // Whatever is still missing fails its items; the cursor stops before the first.
        let failed = self.work.fail_unfinished();
        self.incomplete.extend(failed);
        let rejected = self.work.take_rejected();
        self.out.rejected.extend(rejected);
        self.advance().await?;
        // The source failed mid-page: what the others had is stored, and the sync ends here.
        source
    }

    /// What do we hold already? (No signature checks: the rows were verified
    /// when stored.) Returns the items whose manifest must be fetched.
    async fn plan(&mut self, page: &[ManifestSummary]) -> Result<Vec<usize>> {
        let node = self.node().clone();
        let listed: Vec<String> = page.iter().map(|s| s.content_id.clone()).collect();
        let me = node.id().to_hex();
        let local: Vec<Option<Vec<(ChunkId, u64)>>> = blocking(move || {
            listed
                .iter()
                .map(|cid| {
                    let id: ContentId = Hash::parse(cid, "content id")?;
                    if node.db.has_manifest(&id)? && node.db.envelope(&id, &me)?.is_some() {
                        missing_sized(&node, &id)
                    } else {
                        Ok(None)
                    }
                })
                .collect()
        })
        .await?;
        let ids = local
            .iter()
            .map(|l| l.as_ref().map(|v| v.iter().map(|(c, _)| *c).collect()))
            .collect();
        let (mut work, plan) = PageWork::new(page, ids);
        for (i, l) in local.into_iter().enumerate() {
            if let Some(lengths) = l {
                work.expect_lengths(i, lengths);
            }
        }
        self.work = work;
        self.t.update(|p| {
            p.items_total += plan.items;
            p.bytes_total += plan.bytes;
        });
        Ok(plan.need)
    }

    /// Fetch and verify the manifests we lack, and find which of their chunks
    /// are missing.
    async fn fetch_manifests(&mut self, need: &[usize]) -> Result<()> {
        if need.is_empty() {
            return Ok(());
        }
        self.t.phase(Phase::Manifests);
        let mut fed = client(self.ch.clone());
        let who = self.peer.node_id.short();
        let mut queue = ManifestQueue::new(need, MANIFEST_BATCH);
        loop {
            let batch = queue.next();
            if batch.is_empty() {
                break;
            }
            let ids: Vec<String> = batch
                .iter()
                .map(|&i| self.work.items[i].content_id.clone())
                .collect();
            let resp = match fed
                .get_manifests(GetManifestsRequest {
                    content_ids: ids,
                    envelope_format: crate::keyring::ENVELOPE_FORMAT,
                    caller_kem_key: Some(self.node().signed_kem_key()),
                    envelopes_only: false,
                })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) if too_large(&s) && queue.too_large(batch.len()) => continue,
                Err(s) => {
                    return Err(Error::from(s).context(format!("fetching manifests from {who}")))
                }
            };
            let blind = resp.caller_blind;
            let role = if blind { Level::Blind } else { Level::Keyed };
            let (n, src) = (self.node().clone(), self.peer.node_id);
            blocking(move || n.db.set_role(&src, role)).await?;
            let (mut results, left_out) = self.left_out(&batch, resp.results);
            if blind {
                // The source serves us blind: whatever envelope it sent is
                // dropped unread, so none is ever stored or opened here;
                // the link envelopes it relays are checked and kept.
                results.iter_mut().for_each(|r| r.envelope = None);
                let spki = resp.relay_sender_spki;
                keep_relayed_links(self.node(), &self.peer.node_id, spki, resp.relayed_links).await;
            }
            queue
                .answered(&batch, &left_out)
                .map_err(|why| self.violation(&why))?;
            let batch: Vec<usize> = batch
                .into_iter()
                .filter(|i| !left_out.contains(i))
                .collect();
            fetch_links(self.node(), &mut fed, &self.peer.node_id, &results).await;
            let verdicts = accept_all(self.node(), results, blind, self.peer.node_id).await?;
            let (accepted, report) = self.work.judge(&batch, verdicts, &who);
            for line in report {
                self.t.error(line);
            }
            let node = self.node().clone();
            let sized: Vec<Vec<(ChunkId, u64)>> = accepted
                .iter()
                .map(|(_, (m, _, _))| {
                    let n = m.chunk_count();
                    (0..n).map(|i| (m.chunk_id(i), m.chunk_len(i))).collect()
                })
                .collect();
            let missing = blocking(move || {
                sized
                    .into_iter()
                    .map(|cs| missing_of(&node, cs))
                    .collect::<Result<Vec<_>>>()
            })
            .await?;
            for ((i, accepted), miss) in accepted.into_iter().zip(missing) {
                match miss {
                    Ok(miss) => {
                        let ids = miss.iter().map(|(c, _)| *c).collect();
                        self.work.accepted(i, accepted, ids);
                        self.work.expect_lengths(i, miss);
                    }
                    Err(why) => {
                        let why = format!("item {}: {why} (DATA_LOSS; rejected)", accepted.0.id());
                        self.t.error(why.clone());
                        self.work.reject(i, why);
                    }
                }
            }
        }
        Ok(())
    }

    /// Split a GetManifests answer into the results to judge and the items
    /// of `batch` the peer left out of a full batch (RESOURCE_EXHAUSTED:
    /// "ask again").
    fn left_out(
        &self,
        batch: &[usize],
        results: Vec<ManifestResult>,
    ) -> (Vec<ManifestResult>, HashSet<usize>) {
        let index: HashMap<&str, usize> = batch
            .iter()
            .map(|&i| (self.work.items[i].content_id.as_str(), i))
            .collect();
        let mut left = HashSet::new();
        let mut kept = Vec::with_capacity(results.len());
        for r in results {
            let full = r
                .problem
                .as_ref()
                .is_some_and(|p| p.code == tonic::Code::ResourceExhausted as i32);
            match index.get(r.content_id.as_str()) {
                Some(&i) if full => {
                    left.insert(i);
                }
                _ => kept.push(r),
            }
        }
        (kept, left)
    }

    /// Chunk files a crashed run renamed into place but never recorded.
    async fn adopt_strays(&mut self) -> Result<()> {
        let (node, want) = (self.node().clone(), self.work.still_missing());
        let lengths = self.work.wanted_lengths();
        let adopted = blocking(move || transfer::adopt_strays(&node, &want, &lengths)).await?;
        if adopted.is_empty() {
            return Ok(());
        }
        tracing::info!(
            peer = %self.peer.node_id.short(),
            "adopted {} chunk file(s) left by an interrupted run",
            adopted.len()
        );
        let ready = self.work.arrived_sized(&adopted, "an interrupted run");
        self.settle(ready).await
    }

    /// Chunks a local source holds (`clone --from-backup`), each hash-checked
    /// before it is stored.
    async fn take_local(&mut self) -> Result<()> {
        let Some(src) = self.rep.local_chunks() else {
            return Ok(());
        };
        let (node, want) = (self.node().clone(), self.work.still_missing());
        let lengths = self.work.wanted_lengths();
        let who = src.describe();
        let got =
            blocking(move || transfer::fill_from_local(&node, &*src, &want, &lengths)).await?;
        let ready = self.work.arrived_sized(&got, &who);
        self.settle(ready).await
    }

    /// Store the manifests of items that just became complete (the items
    /// completed together in one transaction), then move the cursor.
    pub(super) async fn settle(&mut self, ready: Vec<usize>) -> Result<()> {
        if !ready.is_empty() {
            let to_store = self.work.take_pending(&ready);
            let (node, me) = (self.node().clone(), self.rep.node.id().to_hex());
            let not_stored = blocking(move || store_complete(&node, me, to_store)).await?;
            let done = self.work.completed(ready, &not_stored);
            self.out.items += done;
            self.t.update(|p| p.items_done += done);
        }
        self.advance().await
    }

    /// Move the cursor over the settled prefix of the page and save it now and then.
    async fn advance(&mut self) -> Result<()> {
        self.work.advance(&mut self.cursor);
        self.save_cursor(false).await
    }

    async fn save_cursor(&mut self, force: bool) -> Result<()> {
        let Some(v) = self.cursor.due(force, Instant::now()) else {
            return Ok(());
        };
        let (n, id) = (self.node().clone(), self.peer.node_id);
        blocking(move || n.db.set_cursor(&id, v)).await?;
        self.cursor.saved(v, Instant::now());
        Ok(())
    }
}

/// Store the manifests of complete items with our envelope (none for an
/// item this node mirrors blind), in one
/// transaction (one fsync). Returns the items not stored because a chunk is
/// no longer present (quarantined meanwhile).
fn store_complete(
    node: &Node,
    me: String,
    items: Vec<(usize, Accepted)>,
) -> Result<HashSet<usize>> {
    let mut not_stored = HashSet::new();
    let mut batch = Vec::new();
    for (i, (m, env, relayed)) in &items {
        if node.db.is_complete_list(m)? {
            let mut envelopes: Vec<(String, Vec<u8>)> =
                env.iter().map(|e| (me.clone(), e.clone())).collect();
            envelopes.extend(relayed.iter().cloned());
            batch.push((m, envelopes));
        } else {
            not_stored.insert(*i);
        }
    }
    if !batch.is_empty() {
        node.db.insert_manifests(&batch)?;
    }
    Ok(not_stored)
}

/// The saved cursor for `peer`. One over [`MAX_SEQ`] can only have been
/// stored by a version that took a source's out-of-range seq (it reads back
/// as a wrapped negative number); listing again from the start is safe (it
/// never skips an item, complete ones cost a listing row each).
pub(super) fn stored_cursor(node: &Node, peer: &crate::crypto::NodeId) -> Result<u64> {
    let value = node.db.peer(peer)?.map(|p| p.cursor).unwrap_or(0);
    if value > MAX_SEQ {
        tracing::warn!(peer = %peer.short(), "the saved cursor {value} is out of range; listing from the start");
        return Ok(0);
    }
    Ok(value)
}

/// A GetManifests call refused whole because its answer would exceed the
/// message cap (an older peer, which does not cut its batches by bytes):
/// OUT_OF_RANGE ("encoded message length too large") or RESOURCE_EXHAUSTED.
fn too_large(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
    )
}

/// The chunks of a stored item not present yet, each with the ciphertext
/// length its manifest gives it; `None` (fetch the manifest from the peer)
/// when the stored one cannot be read back verified.
fn missing_sized(node: &Node, id: &ContentId) -> Result<Option<Vec<(ChunkId, u64)>>> {
    let missing = node.db.missing_chunks(id)?;
    if missing.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let m = match node.db.manifest(id) {
        Ok(Some((m, _))) => m,
        Ok(None) => return Ok(None),
        Err(e) => {
            tracing::warn!("item {id} here does not verify ({e}); fetching its manifest again");
            return Ok(None);
        }
    };
    Ok(Some(
        missing
            .into_iter()
            .map(|(i, c)| (c, m.chunk_len(i as usize)))
            .collect(),
    ))
}

/// Of an accepted manifest's chunks (id, length it gives), the ones not
/// present here; `Err` (why) when a present chunk has another length than
/// the manifest gives it: its bytes are fixed by its id, so the signed
/// manifest can never be satisfied.
fn missing_of(
    node: &Node,
    chunks: Vec<(ChunkId, u64)>,
) -> Result<std::result::Result<Vec<(ChunkId, u64)>, String>> {
    let mut v = Vec::new();
    let mut given: HashMap<ChunkId, u64> = HashMap::new();
    for (c, want) in chunks {
        if let Some(other) = given.insert(c, want).filter(|&o| o != want) {
            return Ok(Err(format!(
                "its signed manifest lists chunk {c} at two lengths ({other} and {want} bytes)"
            )));
        }
        match node.db.chunk_len(&c)? {
            None => v.push((c, want)),
            Some(len) if len == want => {}
            Some(len) => {
                return Ok(Err(format!(
                    "chunk {c} is {len} bytes here, its signed manifest says {want}"
                )))
            }
        }
    }
    Ok(Ok(v))
}

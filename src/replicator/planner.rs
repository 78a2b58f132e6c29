//! The planner: for one page of a peer's listing, what is missing, which
//! items have settled, and how far the cursor may move.
//!
//! Synchronous and free of I/O on purpose: the sync ([`super::sync`]) asks
//! the database and the peers and tells the planner what it found; the planner
//! decides. The rule that keeps a sync from ever skipping data lives here,
//! where a unit test can check it without a network or a disk: the cursor
//! moves only over the unbroken prefix of listed items that are stored, or
//! settled for good (rejected or skipped); the first item that failed stops
//! it for the rest of the sync.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::crypto::ChunkId;
use crate::error::{Kind, Result};
use crate::manifest::Manifest;
use crate::proto::ManifestSummary;

/// How often the cursor is saved while it moves within a sync.
const CURSOR_SAVE_EVERY: Duration = Duration::from_secs(1);

/// A verified manifest, our envelope's wrapped key and the envelopes to
/// relay, to store once every chunk of the item is present (never before).
/// No envelope of ours: the source serves this node blind (PROTOCOL.md
/// §2.1), and the item is stored verified but unreadable here, beside the
/// envelopes the source made for other recipients (§2.2; none otherwise).
pub(super) type Accepted = (Manifest, Option<Vec<u8>>, crate::store::Envelopes);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ItemState {
    /// Chunks (or the manifest) still to come.
    Working,
    /// Complete here, manifest stored.
    Done,
    /// Refused for good (bad signature, envelope that does not open it), or
    /// skipped (the peer holds no key for it): settled, the cursor passes it.
    Rejected,
    /// Could not be completed in this sync: blocks the cursor.
    Failed,
}

/// One listed item being brought in.
pub(super) struct Item {
    pub(super) seq: u64,
    pub(super) content_id: String,
    pending: Option<Accepted>,
    /// Distinct chunks still missing.
    pub(super) remaining: usize,
    pub(super) state: ItemState,
    /// Why it failed, if it did.
    pub(super) problem: Option<String>,
    /// The ciphertext length its signed manifest gives each missing chunk.
    lengths: HashMap<ChunkId, u64>,
}

/// The peer's cursor as this sync moves it.
pub(super) struct Cursor {
    /// Everything listed up to here is stored (or settled for good).
    pub(super) value: u64,
    saved: u64,
    saved_at: Instant,
    /// An item could not be completed: the cursor stays where it is.
    blocked: bool,
}

impl Cursor {
    /// A cursor at `value`, as saved in the database.
    pub(super) fn new(value: u64, now: Instant) -> Cursor {
        Cursor {
            value,
            saved: value,
            saved_at: now,
            blocked: false,
        }
    }

    /// The value to save now, if any: only when it moved, and at most about
    /// once a second unless `force` (the sync is stopping).
    pub(super) fn due(&self, force: bool, now: Instant) -> Option<u64> {
        let recent = now.saturating_duration_since(self.saved_at) < CURSOR_SAVE_EVERY;
        if self.value == self.saved || (!force && recent) {
            None
        } else {
            Some(self.value)
        }
    }

    pub(super) fn saved(&mut self, value: u64, now: Instant) {
        self.saved = value;
        self.saved_at = now;
    }
}

/// The largest seq a peer may list: the store keeps seqs as SQLite integers
/// (i64), so a larger one cannot be a real seq and could never be saved as a
/// cursor without wrapping negative.
pub(super) const MAX_SEQ: u64 = i64::MAX as u64;

/// Check a ListManifests page against the rules of the listing cursor
/// (PROTOCOL.md §8): every seq after `after`, strictly increasing, at most
/// `MAX_SEQ`, no more summaries than `limit`, each item once, and `more` only
/// on a page that moved the cursor. A page that breaks one is a protocol
/// violation: taken as it is, it could keep the sync asking for the same page
/// forever or move the cursor back. Returns what is wrong, to be reported
/// against the peer.
pub(super) fn check_page(
    after: u64,
    limit: u32,
    page: &[ManifestSummary],
    more: bool,
) -> std::result::Result<(), String> {
    if page.len() > limit as usize {
        return Err(format!(
            "sent a page of {} items when at most {limit} were asked for",
            page.len()
        ));
    }
    if page.is_empty() && more {
        return Err(format!(
            "sent an empty page after seq {after} that says more are ready: it does not advance"
        ));
    }
    let mut last = after;
    let mut seen = HashSet::new();
    for s in page {
        if s.seq > MAX_SEQ {
            return Err(format!(
                "listed seq {} (item {}), over the largest seq a node can hold ({MAX_SEQ})",
                s.seq, s.content_id
            ));
        }
        if s.seq <= last {
            let what = if s.seq <= after {
                format!("at or before the cursor {after} it was asked to list after")
            } else {
                format!("after seq {last}: seqs must strictly increase")
            };
            return Err(format!(
                "listed seq {} (item {}) {what}; the page does not advance",
                s.seq, s.content_id
            ));
        }
        if !seen.insert(s.content_id.as_str()) {
            return Err(format!("listed item {} twice on one page", s.content_id));
        }
        last = s.seq;
    }
    Ok(())
}

/// The items whose manifests are still to be fetched, asked for in batches
/// that adapt to what the peer can send: a peer stops a batch before the
/// message cap and answers the ids it left out with RESOURCE_EXHAUSTED
/// ("ask again"); those go first into the next batch, which is no larger
/// than what the peer managed, and grows back (doubling) while answers are
/// whole. A call refused whole as too large (an older peer) halves it.
pub(super) struct ManifestQueue {
    queue: std::collections::VecDeque<usize>,
    size: usize,
    max: usize,
}

impl ManifestQueue {
    pub(super) fn new(need: &[usize], max: usize) -> ManifestQueue {
        ManifestQueue {
            queue: need.iter().copied().collect(),
            size: max,
            max,
        }
    }

    /// The next batch to ask for (empty when every manifest was answered).
    pub(super) fn next(&self) -> Vec<usize> {
        self.queue.iter().take(self.size).copied().collect()
    }

    /// The peer answered `batch` but left out `left_out` (a subset): those
    /// are asked again first. A peer that leaves out the whole batch never
    /// advances: a protocol violation (what it did is returned).
    pub(super) fn answered(
        &mut self,
        batch: &[usize],
        left_out: &HashSet<usize>,
    ) -> std::result::Result<(), String> {
        if !batch.is_empty() && batch.iter().all(|i| left_out.contains(i)) {
            return Err(format!(
                "answered none of the {} manifests asked for (all left out of a full batch)",
                batch.len()
            ));
        }
        self.queue.drain(..batch.len());
        for &i in batch.iter().rev().filter(|i| left_out.contains(i)) {
            self.queue.push_front(i);
        }
        let got = batch.len() - left_out.len();
        self.size = if left_out.is_empty() {
            (self.size * 2).min(self.max)
        } else {
            got.max(1)
        };
        Ok(())
    }

    /// The whole call was refused as too large: halve the batch. False when
    /// it was one manifest already (nothing smaller to ask).
    pub(super) fn too_large(&mut self, batch: usize) -> bool {
        if batch <= 1 {
            return false;
        }
        self.size = batch / 2;
        true
    }
}

/// What planning a page found to do.
#[derive(Default)]
pub(super) struct Plan {
    /// Items whose manifest (or our envelope) is not here: fetch them.
    pub(super) need: Vec<usize>,
    /// Items and bytes (ciphertext, 16 bytes of tag per chunk) not complete here.
    pub(super) items: u64,
    pub(super) bytes: u64,
}

/// The work on one page of the listing.
#[derive(Default)]
pub(super) struct PageWork {
    pub(super) items: Vec<Item>,
    /// Missing chunks of items, found but not yet indexed in `waiters`.
    found: HashMap<usize, Vec<ChunkId>>,
    /// Missing chunk -> the items waiting for it.
    waiters: HashMap<ChunkId, Vec<usize>>,
    /// Missing chunks in listing order.
    order: Vec<ChunkId>,
    /// Why each undelivered chunk was not delivered (every reason given).
    problems: HashMap<ChunkId, String>,
    /// Items before this index are settled (done, rejected or failed).
    next: usize,
    /// Other trusted peers asked for chunks the source could not send.
    others_asked: Vec<String>,
    /// Why each item refused for good (bad bytes, not "skipped") was refused.
    rejected: Vec<String>,
}

impl PageWork {
    /// Start on a page. `local[i]` is `Some(missing chunks)` when item `i`'s
    /// manifest and our envelope are stored here already, `None` when they
    /// must be fetched.
    pub(super) fn new(
        page: &[ManifestSummary],
        local: Vec<Option<Vec<ChunkId>>>,
    ) -> (PageWork, Plan) {
        let mut work = PageWork::default();
        let mut plan = Plan::default();
        for (i, (s, l)) in page.iter().zip(local).enumerate() {
            let mut state = ItemState::Working;
            match l {
                Some(missing) if missing.is_empty() => state = ItemState::Done,
                Some(missing) => {
                    work.found.insert(i, missing);
                }
                None => plan.need.push(i),
            }
            if state == ItemState::Working {
                plan.items += 1;
                plan.bytes += s.size + 16 * s.chunk_count as u64;
            }
            work.items.push(Item {
                seq: s.seq,
                content_id: s.content_id.clone(),
                pending: None,
                remaining: 0,
                state,
                problem: None,
                lengths: HashMap::new(),
            });
        }
        (work, plan)
    }

    /// Judge the peer's answers for the items of `batch` (content id,
    /// verdict). Bad bytes are rejected for good. An item the peer holds no
    /// key for (or no longer has) is skipped: if the peer gains a key, the
    /// new envelope moves the item to a later seq and it is listed again.
    /// Anything else, and an item not answered for, fails (and so blocks the
    /// cursor). Returns the accepted items and the lines to report.
    pub(super) fn judge<T>(
        &mut self,
        batch: &[usize],
        verdicts: Vec<(String, Result<T>)>,
        who: &str,
    ) -> (Vec<(usize, T)>, Vec<String>) {
        let index: HashMap<&str, usize> = batch
            .iter()
            .map(|&i| (self.items[i].content_id.as_str(), i))
            .collect();
        let mut answered = HashSet::new();
        let (mut accepted, mut report, mut refused) = (Vec::new(), Vec::new(), Vec::new());
        for (cid, r) in verdicts {
            let Some(&i) = index.get(cid.as_str()) else {
                report.push(format!("peer {who} sent item {cid} that was not asked for"));
                continue;
            };
            answered.insert(i);
            match r {
                Ok(v) => accepted.push((i, v)),
                Err(e) => {
                    let (state, note) = match e.kind() {
                        Kind::Integrity => (ItemState::Rejected, " (rejected)"),
                        Kind::NotFound => (ItemState::Rejected, " (skipped)"),
                        _ => (ItemState::Failed, ""),
                    };
                    let msg = format!("item {cid} from {who}: {e}{note}");
                    report.push(msg.clone());
                    let bad = e.kind() == Kind::Integrity;
                    refused.push((i, state, msg, bad));
                }
            }
        }
        for (i, state, msg, bad) in refused {
            if bad {
                self.rejected.push(msg.clone());
            }
            self.items[i].state = state;
            self.items[i].problem = Some(msg);
        }
        for &i in batch {
            if !answered.contains(&i) {
                let it = &mut self.items[i];
                it.state = ItemState::Failed;
                it.problem = Some(format!(
                    "item {}: {who} did not answer for it",
                    it.content_id
                ));
            }
        }
        (accepted, report)
    }

    /// An accepted item: its manifest waits until `missing` have arrived.
    pub(super) fn accepted(&mut self, i: usize, pending: Accepted, missing: Vec<ChunkId>) {
        self.items[i].pending = Some(pending);
        self.found.insert(i, missing);
    }

    /// The ciphertext length item `i`'s signed manifest gives each of its
    /// missing chunks (`Manifest::chunk_len`): a chunk is stored only at a
    /// length some waiting item expects.
    pub(super) fn expect_lengths(&mut self, i: usize, lengths: Vec<(ChunkId, u64)>) {
        self.items[i].lengths.extend(lengths);
    }

    /// Item `i` is refused for good: its signed manifest cannot be satisfied.
    pub(super) fn reject(&mut self, i: usize, why: String) {
        let it = &mut self.items[i];
        if matches!(it.state, ItemState::Working) {
            it.state = ItemState::Rejected;
            self.rejected.push(why.clone());
            it.problem = Some(why);
        }
    }

    /// The lengths at which each still-missing chunk may be stored: the
    /// ones its waiting items expect.
    pub(super) fn wanted_lengths(&self) -> HashMap<ChunkId, Vec<u64>> {
        let mut out: HashMap<ChunkId, Vec<u64>> = HashMap::new();
        for (c, ws) in &self.waiters {
            for &i in ws {
                if let Some(&len) = self.items[i].lengths.get(c) {
                    let v = out.entry(*c).or_default();
                    if !v.contains(&len) {
                        v.push(len);
                    }
                }
            }
        }
        out
    }

    /// Chunks that arrived with their lengths (a chunk's bytes are fixed by
    /// its id, so its length is too): every waiting item whose signed
    /// manifest gives the chunk another length can never be complete and is
    /// rejected (DATA_LOSS); for the others the chunk counts as arrived.
    /// `stored` is false for a chunk no waiting item wanted at that length
    /// (it was not stored). Returns the items that just became complete.
    pub(super) fn arrived_sized(&mut self, chunks: &[(ChunkId, u64)], who: &str) -> Vec<usize> {
        for (c, len) in chunks {
            let ws = self.waiters.get(c).cloned().unwrap_or_default();
            for i in ws {
                let Some(&want) = self.items[i].lengths.get(c) else {
                    continue;
                };
                if want != *len {
                    let why = format!(
                        "item {}: chunk {c} from {who} is {len} bytes, its signed manifest says {want} (DATA_LOSS; rejected)",
                        self.items[i].content_id
                    );
                    self.reject(i, why);
                }
            }
        }
        let ids: Vec<ChunkId> = chunks.iter().map(|(c, _)| *c).collect();
        self.arrived(&ids)
    }

    /// Index every missing chunk once, in listing order (a chunk several
    /// items share is fetched once). Returns the items missing none.
    pub(super) fn index_missing(&mut self) -> Vec<usize> {
        let mut ready = Vec::new();
        for i in 0..self.items.len() {
            let Some(miss) = self.found.remove(&i) else {
                continue;
            };
            let mut mine = HashSet::new();
            for c in miss {
                if mine.insert(c) {
                    let w = self.waiters.entry(c).or_default();
                    if w.is_empty() {
                        self.order.push(c);
                    }
                    w.push(i);
                }
            }
            self.items[i].remaining = mine.len();
            if mine.is_empty() {
                ready.push(i);
            }
        }
        ready
    }

    /// Whether any chunk at all was missing when the page was indexed.
    pub(super) fn wanted_any(&self) -> bool {
        !self.order.is_empty()
    }

    /// Mark chunks present; returns the items that just became complete.
    pub(super) fn arrived(&mut self, chunks: &[ChunkId]) -> Vec<usize> {
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

    /// The chunks still missing, in listing order.
    pub(super) fn still_missing(&self) -> Vec<ChunkId> {
        self.order
            .iter()
            .filter(|c| self.waiters.contains_key(c))
            .copied()
            .collect()
    }

    /// A peer's reasons for not delivering chunks, added to any given before.
    pub(super) fn undelivered(&mut self, failed: Vec<(ChunkId, String)>) {
        for (c, why) in failed {
            let p = self.problems.entry(c).or_default();
            if !p.is_empty() {
                p.push_str("; ");
            }
            p.push_str(&why);
        }
    }

    /// The items of this page refused for good because of bad bytes (a
    /// signature, an id, an envelope, a chunk's length), one line each; the
    /// job reports them and fails once the rest is done. Skipped items (the
    /// peer holds no key for them) are not among them.
    pub(super) fn take_rejected(&mut self) -> Vec<String> {
        std::mem::take(&mut self.rejected)
    }

    /// Another trusted peer was asked for what the source could not send.
    pub(super) fn asked(&mut self, who: String) {
        self.others_asked.push(who);
    }

    /// The manifests to store for items that just became complete (items
    /// whose manifest was here already have none).
    pub(super) fn take_pending(&mut self, ready: &[usize]) -> Vec<(usize, Accepted)> {
        ready
            .iter()
            .filter_map(|&i| self.items[i].pending.take().map(|p| (i, p)))
            .collect()
    }

    /// Settle complete items: done, unless their manifest could not be stored
    /// (`not_stored`: a chunk vanished meanwhile). Returns how many are done.
    pub(super) fn completed(&mut self, ready: Vec<usize>, not_stored: &HashSet<usize>) -> u64 {
        let mut done = 0;
        for i in ready {
            let it = &mut self.items[i];
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
        done
    }

    /// Move the cursor over the settled prefix of the page.
    pub(super) fn advance(&mut self, cursor: &mut Cursor) {
        while !cursor.blocked && self.next < self.items.len() {
            let it = &self.items[self.next];
            match it.state {
                ItemState::Done | ItemState::Rejected => {
                    cursor.value = cursor.value.max(it.seq);
                    self.next += 1;
                }
                ItemState::Failed => cursor.blocked = true,
                ItemState::Working => break,
            }
        }
    }

    /// The end of the page: every item still waiting fails, naming its first
    /// missing chunk (in listing order) and what the peers said about it.
    /// Returns one line per failed item.
    pub(super) fn fail_unfinished(&mut self) -> Vec<String> {
        let mut first_missing: HashMap<usize, ChunkId> = HashMap::new();
        for c in &self.order {
            if let Some(ws) = self.waiters.get(c) {
                for &i in ws {
                    first_missing.entry(i).or_insert(*c);
                }
            }
        }
        let asked = if self.others_asked.is_empty() {
            "no other trusted peer to ask".to_string()
        } else {
            format!("also asked {}", self.others_asked.join(", "))
        };
        let mut failed = Vec::new();
        for (i, it) in self.items.iter_mut().enumerate() {
            if it.state == ItemState::Working {
                it.state = ItemState::Failed;
                if it.problem.is_none() {
                    let why = match first_missing.get(&i) {
                        Some(c) => match self.problems.get(c) {
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
        failed
    }
}

#[cfg(test)]
mod tests;

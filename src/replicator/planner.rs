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

/// A verified manifest and our envelope's wrapped key, to store once every
/// chunk of the item is present (never before).
pub(super) type Accepted = (Manifest, Vec<u8>);

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
mod tests {
    use super::*;
    use crate::crypto::Hash;
    use crate::error::Error;

    fn chunk(n: u8) -> ChunkId {
        Hash::of(&[n])
    }

    fn summary(seq: u64, size: u64, chunks: u32) -> ManifestSummary {
        ManifestSummary {
            content_id: format!("item{seq}"),
            seq,
            size,
            chunk_count: chunks,
            ..Default::default()
        }
    }

    /// A page whose items are all stored here, missing the chunks given.
    fn page(missing: Vec<Vec<ChunkId>>) -> PageWork {
        let listed: Vec<ManifestSummary> = (1..=missing.len() as u64)
            .map(|s| summary(s * 10, 0, 0))
            .collect();
        let (mut work, _) = PageWork::new(&listed, missing.into_iter().map(Some).collect());
        let ready = work.index_missing();
        work.completed(ready, &HashSet::new());
        work
    }

    fn cursor(value: u64) -> Cursor {
        Cursor::new(value, Instant::now())
    }

    fn states(work: &PageWork) -> Vec<ItemState> {
        work.items.iter().map(|it| it.state).collect()
    }

    #[test]
    fn plan_sorts_items_into_done_missing_chunks_and_missing_manifests() {
        let listed = [summary(1, 100, 2), summary(2, 50, 1), summary(3, 7, 3)];
        let local = vec![Some(vec![]), Some(vec![chunk(1)]), None];
        let (work, plan) = PageWork::new(&listed, local);
        assert_eq!(
            states(&work),
            [ItemState::Done, ItemState::Working, ItemState::Working]
        );
        assert_eq!(plan.need, [2]);
        // Not complete here: items 2 and 3, with 16 bytes of tag per chunk.
        assert_eq!(plan.items, 2);
        assert_eq!(plan.bytes, 50 + 16 + 7 + 3 * 16);
    }

    #[test]
    fn cursor_never_passes_an_incomplete_item() {
        let mut work = page(vec![vec![], vec![chunk(1)], vec![]]);
        let mut c = cursor(5);
        work.advance(&mut c);
        // Item 3 (seq 30) is complete, but item 2 (seq 20) is not: stop at 10.
        assert_eq!(c.value, 10);
        let ready = work.arrived(&[chunk(1)]);
        assert_eq!(ready, [1]);
        work.completed(ready, &HashSet::new());
        work.advance(&mut c);
        assert_eq!(c.value, 30);
    }

    #[test]
    fn a_failed_item_blocks_the_cursor_for_the_rest_of_the_sync() {
        let mut work = page(vec![vec![], vec![chunk(1)], vec![chunk(2)]]);
        let mut c = cursor(0);
        work.arrived(&[chunk(2)]);
        work.completed(vec![2], &HashSet::new());
        let failed = work.fail_unfinished();
        assert_eq!(failed.len(), 1);
        work.advance(&mut c);
        assert_eq!(c.value, 10);
        // Later pages cannot move it either.
        let mut next = page(vec![vec![], vec![], vec![]]);
        next.advance(&mut c);
        assert_eq!(c.value, 10);
    }

    #[test]
    fn rejected_and_skipped_items_settle_and_failures_block() {
        use ItemState::{Failed, Rejected};
        let listed: Vec<_> = (1..=4).map(|s| summary(s, 0, 0)).collect();
        let (mut work, plan) = PageWork::new(&listed, vec![None; 4]);
        let verdicts: Vec<(String, Result<()>)> = vec![
            ("item1".into(), Err(Error::integrity("bad signature"))),
            ("item2".into(), Err(Error::not_found("no key for you"))),
            ("item3".into(), Err(Error::unavailable("try later"))),
            ("item9".into(), Ok(())),
        ];
        let (accepted, report) = work.judge(&plan.need, verdicts, "peer");
        assert!(accepted.is_empty(), "item9 was not asked for");
        assert_eq!(states(&work), [Rejected, Rejected, Failed, Failed]);
        assert!(report[0].ends_with("(rejected)"), "{report:?}");
        assert!(report[1].ends_with("(skipped)"), "{report:?}");
        assert!(report[3].contains("not asked for"), "{report:?}");
        let silent = work.items[3].problem.as_deref().unwrap();
        assert!(silent.contains("did not answer"), "{silent}");
        // Only the bad bytes count as rejected; the skipped item does not.
        let rejected = work.take_rejected();
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(rejected[0].contains("item1"), "{rejected:?}");
        let mut c = cursor(0);
        work.advance(&mut c);
        assert_eq!(c.value, 2);
    }

    #[test]
    fn arrival_completes_exactly_the_items_waiting_for_it() {
        let (x, y, z) = (chunk(1), chunk(2), chunk(3));
        let mut work = page(vec![vec![x, y], vec![y], vec![z]]);
        assert_eq!(work.arrived(&[y]), [1]);
        assert_eq!(work.items[0].remaining, 1);
        assert_eq!(work.arrived(&[z, x]), [0, 2], "sorted, in listing order");
        assert!(work.still_missing().is_empty());
    }

    #[test]
    fn a_chunk_listed_twice_is_wanted_once() {
        let (x, y) = (chunk(1), chunk(2));
        // Twice within one item, and shared with the next.
        let mut work = page(vec![vec![x, x, y], vec![y, x]]);
        assert_eq!(work.items[0].remaining, 2);
        assert_eq!(work.still_missing(), [x, y]);
        assert!(work.arrived(&[x]).is_empty());
        assert_eq!(work.arrived(&[y]), [0, 1]);
        // A chunk delivered again (adopted, then streamed) changes nothing.
        assert!(work.arrived(&[x, y]).is_empty());
        assert_eq!(work.items[0].remaining, 0);
    }

    #[test]
    fn still_missing_keeps_listing_order() {
        let ids: Vec<ChunkId> = (0..6).map(chunk).collect();
        let mut work = page(vec![ids[3..].to_vec(), ids[..3].to_vec()]);
        work.arrived(&[ids[4], ids[0]]);
        assert_eq!(work.still_missing(), [ids[3], ids[5], ids[1], ids[2]]);
        assert!(work.wanted_any());
    }

    #[test]
    fn an_empty_page_moves_nothing_and_fails_nothing() {
        let (mut work, plan) = PageWork::new(&[], vec![]);
        assert!(plan.need.is_empty() && plan.items == 0 && plan.bytes == 0);
        assert!(work.index_missing().is_empty());
        assert!(!work.wanted_any());
        let mut c = cursor(42);
        work.advance(&mut c);
        assert_eq!(c.value, 42);
        assert!(work.fail_unfinished().is_empty());
        assert_eq!(c.due(true, Instant::now()), None);
    }

    #[test]
    fn an_unfinished_item_names_its_first_missing_chunk_and_the_peers_reasons() {
        let (x, y) = (chunk(1), chunk(2));
        let mut work = page(vec![vec![y, x]]);
        work.undelivered(vec![(y, "DataLoss from a".into())]);
        work.undelivered(vec![(y, "b ended the stream".into())]);
        work.asked("b".into());
        let failed = work.fail_unfinished();
        assert_eq!(failed.len(), 1);
        let line = &failed[0];
        assert!(line.contains("2 chunk(s) missing"), "{line}");
        let why = format!("chunk {y}: DataLoss from a; b ended the stream");
        assert!(line.contains(&why), "{line}");
        assert!(line.ends_with("(also asked b)"), "{line}");
        assert_eq!(work.items[0].state, ItemState::Failed);
    }

    #[test]
    fn a_chunk_that_arrives_forgets_why_it_was_missing() {
        let (x, y) = (chunk(1), chunk(2));
        let mut work = page(vec![vec![x, y]]);
        work.undelivered(vec![(x, "lost".into()), (y, "gone".into())]);
        work.arrived(&[x]);
        let line = &work.fail_unfinished()[0];
        assert!(line.contains(&format!("chunk {y}: gone")), "{line}");
        assert!(line.contains("no other trusted peer to ask"), "{line}");
    }

    #[test]
    fn an_item_whose_manifest_could_not_be_stored_fails_and_blocks() {
        let mut work = page(vec![vec![chunk(1)], vec![]]);
        let ready = work.arrived(&[chunk(1)]);
        assert!(work.take_pending(&ready).is_empty(), "stored here already");
        assert_eq!(work.completed(ready, &HashSet::from([0])), 0);
        let mut c = cursor(0);
        work.advance(&mut c);
        assert_eq!(c.value, 0);
        let failed = work.fail_unfinished();
        assert!(failed[0].contains("vanished"), "{failed:?}");
    }

    #[test]
    fn manifests_left_out_of_a_full_batch_are_asked_again_first() {
        let mut q = ManifestQueue::new(&[0, 1, 2, 3, 4, 5], 4);
        assert_eq!(q.next(), [0, 1, 2, 3]);
        // The peer included 0 and 1 only.
        q.answered(&[0, 1, 2, 3], &HashSet::from([2, 3])).unwrap();
        assert_eq!(q.next(), [2, 3], "no more than the peer managed");
        q.answered(&[2, 3], &HashSet::new()).unwrap();
        assert_eq!(q.next(), [4, 5], "grows back while answers are whole");
        q.answered(&[4, 5], &HashSet::new()).unwrap();
        assert!(q.next().is_empty());
    }

    #[test]
    fn a_peer_that_leaves_out_a_whole_batch_is_a_violation_and_too_large_halves() {
        let mut q = ManifestQueue::new(&[0, 1, 2, 3], 4);
        let e = q.answered(&[0, 1, 2, 3], &HashSet::from([0, 1, 2, 3]));
        assert!(e.unwrap_err().contains("none of the 4"));
        assert!(q.too_large(4));
        assert_eq!(q.next(), [0, 1]);
        assert!(q.too_large(2));
        assert_eq!(q.next(), [0]);
        assert!(!q.too_large(1), "one manifest cannot be split");
    }

    #[test]
    fn a_page_that_does_not_advance_is_refused() {
        let p = |seqs: &[u64]| -> Vec<ManifestSummary> {
            seqs.iter().map(|&s| summary(s, 0, 0)).collect()
        };
        assert!(check_page(10, 500, &p(&[11, 12, 40]), true).is_ok());
        assert!(check_page(10, 500, &[], false).is_ok());
        // The same page again (its seqs are not after the cursor), with more.
        let e = check_page(40, 500, &p(&[11, 12, 40]), true).unwrap_err();
        assert!(e.contains("does not advance"), "{e}");
        // Backwards within a page, a repeat, an empty page saying more.
        assert!(check_page(10, 500, &p(&[12, 11]), false).is_err());
        assert!(check_page(10, 500, &p(&[12, 12]), false).is_err());
        assert!(check_page(10, 500, &[], true).is_err());
        // Over the largest seq a node holds, or a page larger than asked.
        let e = check_page(10, 500, &p(&[MAX_SEQ + 1]), false).unwrap_err();
        assert!(e.contains("largest seq"), "{e}");
        assert!(check_page(10, 500, &p(&[MAX_SEQ]), false).is_ok());
        assert!(check_page(0, 2, &p(&[1, 2, 3]), false).is_err());
        // The same item twice on one page.
        let mut twice = p(&[11, 12]);
        twice[1].content_id = twice[0].content_id.clone();
        assert!(check_page(10, 500, &twice, false).unwrap_err().contains("twice"));
    }

    #[test]
    fn a_chunk_of_another_length_than_the_manifest_says_rejects_the_item() {
        let (x, y) = (chunk(1), chunk(2));
        let mut work = page(vec![vec![x, y], vec![y]]);
        work.expect_lengths(0, vec![(x, 4112), (y, 920)]);
        work.expect_lengths(1, vec![(y, 4)]);
        assert_eq!(work.wanted_lengths()[&x], [4112]);
        let mut ys = work.wanted_lengths()[&y].clone();
        ys.sort();
        assert_eq!(ys, [4, 920]);
        // y's bytes are 920 long: item 1, whose manifest says 4, is rejected.
        assert!(work.arrived_sized(&[(y, 920)], "p").is_empty());
        assert_eq!(work.items[1].state, ItemState::Rejected);
        // x arrives 7 MiB long (not stored): item 0 is rejected too.
        assert!(work.arrived_sized(&[(x, 7 << 20)], "p").is_empty());
        assert_eq!(work.items[0].state, ItemState::Rejected);
        let rejected = work.take_rejected();
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(rejected[1].contains("signed manifest says 4112"), "{rejected:?}");
        assert!(work.still_missing().is_empty());
        let mut c = cursor(0);
        work.advance(&mut c);
        assert_eq!(c.value, 20, "rejected items settle");
    }

    #[test]
    fn the_cursor_never_moves_back() {
        // A page listed from an older cursor than the one saved.
        let mut work = page(vec![vec![], vec![]]);
        let mut c = cursor(15);
        work.advance(&mut c);
        assert_eq!(c.value, 20);
        let mut c = cursor(99);
        page(vec![vec![]]).advance(&mut c);
        assert_eq!(c.value, 99);
    }

    #[test]
    fn the_cursor_is_saved_when_it_moved_and_at_most_once_a_second() {
        let (t0, ms) = (Instant::now(), Duration::from_millis);
        let mut c = Cursor::new(7, t0);
        assert_eq!(c.due(true, t0), None, "unchanged: nothing to save");
        c.value = 9;
        assert_eq!(c.due(false, t0 + ms(500)), None);
        assert_eq!(c.due(true, t0 + ms(500)), Some(9));
        assert_eq!(c.due(false, t0 + CURSOR_SAVE_EVERY), Some(9));
        c.saved(9, t0 + CURSOR_SAVE_EVERY);
        assert_eq!(c.due(true, t0 + CURSOR_SAVE_EVERY * 5), None);
        c.value = 12;
        assert_eq!(c.due(false, t0 + CURSOR_SAVE_EVERY + ms(10)), None);
        assert_eq!(c.due(false, t0 + CURSOR_SAVE_EVERY * 2), Some(12));
    }
}

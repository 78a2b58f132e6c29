//! The planner's rules, checked without a network or a disk.
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
    let p =
        |seqs: &[u64]| -> Vec<ManifestSummary> { seqs.iter().map(|&s| summary(s, 0, 0)).collect() };
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
    assert!(check_page(10, 500, &twice, false)
        .unwrap_err()
        .contains("twice"));
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
    assert!(
        rejected[1].contains("signed manifest says 4112"),
        "{rejected:?}"
    );
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

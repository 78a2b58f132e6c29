//! The sequence logic the replication cursor relies on, on a real SQLite file:
//! every change a peer may list takes a new seq in its own transaction, and a
//! reader paging by `seq > cursor` sees every item after its last change.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use super::*;
use crate::crypto::{self, ContentId, ItemKey};
use crate::error::Kind;
use crate::identity::Identity;
use crate::manifest::{native_body, Manifest};

/// RSA-3072 generation is slow: the tests share two keys.
fn me() -> &'static Identity {
    static ME: OnceLock<Identity> = OnceLock::new();
    ME.get_or_init(|| Identity::generate().unwrap())
}
fn other() -> &'static Identity {
    static OTHER: OnceLock<Identity> = OnceLock::new();
    OTHER.get_or_init(|| Identity::generate().unwrap())
}

fn new_db(dir: &tempfile::TempDir) -> (Db, PathBuf) {
    let path = dir.path().join("bitsync.db");
    (Db::create(&path, &me().id()).unwrap(), path)
}

/// A distinct one-chunk item published by [`me`].
fn item(n: u32) -> Manifest {
    let mut chunk = [0u8; 32];
    chunk[..4].copy_from_slice(&n.to_be_bytes());
    let body = native_body(
        me(),
        "file",
        10,
        4096,
        vec![Hash(chunk)],
        Vec::new(),
        n as i64,
    );
    Manifest::create(me(), body).unwrap()
}

fn envelope(recipient: &Identity, tag: u8) -> (String, Vec<u8>) {
    (recipient.id().to_hex(), vec![tag; 8])
}

#[test]
fn every_insert_and_new_envelope_takes_the_next_seq() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = new_db(&dir);
    assert_eq!(db.head_seq().unwrap(), 0);
    let (a, b) = (item(1), item(2));

    assert_eq!(
        db.insert_manifest(&a, &[envelope(me(), 1)], &[]).unwrap(),
        Some(1)
    );
    // Nothing new: no seq is taken.
    assert_eq!(
        db.insert_manifest(&a, &[envelope(me(), 1)], &[]).unwrap(),
        None
    );
    assert_eq!(db.head_seq().unwrap(), 1);
    // A new envelope moves the known item to the next seq.
    assert_eq!(
        db.insert_manifest(&a, &[envelope(other(), 2)], &[])
            .unwrap(),
        Some(2)
    );
    assert_eq!(db.seq_of(&a.id()).unwrap(), Some(2));
    assert_eq!(db.insert_manifests(&[(&b, vec![])]).unwrap(), vec![Some(3)]);
    assert_eq!(db.head_seq().unwrap(), 3);

    let listed: Vec<(ContentId, u64)> = db
        .list_after(0, 10)
        .unwrap()
        .iter()
        .map(|s| (s.content_id, s.seq))
        .collect();
    assert_eq!(listed, vec![(a.id(), 2), (b.id(), 3)]);
    assert!(db.list_after(3, 10).unwrap().is_empty());
}

#[test]
fn add_envelopes_moves_only_changed_items() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = new_db(&dir);
    let items: Vec<Manifest> = (1..=3).map(item).collect();
    for m in &items {
        db.insert_manifest(m, &[envelope(me(), 0)], &[]).unwrap();
    }
    let rows = vec![
        (items[0].id(), other().id().to_hex(), vec![9u8; 8]),
        (items[1].id(), me().id().to_hex(), vec![9u8; 8]), // already there
    ];
    assert_eq!(db.add_envelopes(&rows).unwrap(), vec![Some(4), None]);
    assert_eq!(db.seq_of(&items[0].id()).unwrap(), Some(4));
    assert_eq!(db.seq_of(&items[1].id()).unwrap(), Some(2));
    let after: Vec<ContentId> = db
        .list_after(3, 10)
        .unwrap()
        .iter()
        .map(|s| s.content_id)
        .collect();
    assert_eq!(after, vec![items[0].id()]);
}

#[test]
fn a_failed_batch_takes_no_seq_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = new_db(&dir);
    let a = item(1);
    db.insert_manifest(&a, &[], &[]).unwrap();
    // The second row names an item the database does not hold (a foreign key violation).
    let rows = vec![
        (a.id(), me().id().to_hex(), vec![1u8; 8]),
        (item(2).id(), me().id().to_hex(), vec![1u8; 8]),
    ];
    assert!(db.add_envelopes(&rows).is_err());
    assert_eq!(db.head_seq().unwrap(), 1);
    assert_eq!(db.seq_of(&a.id()).unwrap(), Some(1));
    assert_eq!(db.envelope(&a.id(), &me().id().to_hex()).unwrap(), None);
}

/// Page through everything after `cursor` the way a replicator does.
fn page_all(db: &Db, cursor: &mut u64, seen: &mut Vec<(ContentId, u64)>) {
    loop {
        let page = db.list_after(*cursor, 2).unwrap();
        let Some(last) = page.last() else { return };
        *cursor = last.seq;
        seen.extend(page.iter().map(|s| (s.content_id, s.seq)));
    }
}

#[test]
fn paging_by_cursor_sees_changes_made_between_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = new_db(&dir);
    let items: Vec<Manifest> = (1..=6).map(item).collect();
    for m in &items[..5] {
        db.insert_manifest(m, &[], &[]).unwrap();
    }
    let mut cursor = 0;
    let first = db.list_after(cursor, 2).unwrap();
    cursor = first.last().unwrap().seq;
    let mut seen: Vec<(ContentId, u64)> = first.iter().map(|s| (s.content_id, s.seq)).collect();
    // Between pages: a new item, and an envelope for an item already listed.
    db.insert_manifest(&items[5], &[], &[]).unwrap();
    db.add_envelopes(&[(items[0].id(), other().id().to_hex(), vec![1; 8])])
        .unwrap();
    page_all(&db, &mut cursor, &mut seen);

    let seqs: Vec<u64> = seen.iter().map(|(_, s)| *s).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(cursor, db.head_seq().unwrap());
    let ids: HashSet<ContentId> = seen.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids.len(), 6);
    // The changed item is listed again, at its new seq.
    let again: Vec<u64> = seen
        .iter()
        .filter(|(id, _)| *id == items[0].id())
        .map(|(_, s)| *s)
        .collect();
    assert_eq!(again, vec![1, 7]);
}

#[test]
fn a_reader_paging_while_a_writer_inserts_skips_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = new_db(&dir);
    let db = Arc::new(db);
    let items: Vec<Manifest> = (1..=60).map(item).collect();
    let all: HashSet<ContentId> = items.iter().map(|m| m.id()).collect();
    let writer = {
        let db = Arc::clone(&db);
        std::thread::spawn(move || {
            for (i, m) in items.iter().enumerate() {
                db.insert_manifest(m, &[], &[]).unwrap();
                if i % 7 == 0 {
                    // Re-list an earlier item too.
                    let old = items[i / 2].id();
                    db.add_envelopes(&[(old, format!("r{i}"), vec![1; 8])])
                        .unwrap();
                }
            }
        })
    };
    let mut cursor = 0;
    let mut seen = Vec::new();
    while !writer.is_finished() {
        page_all(&db, &mut cursor, &mut seen);
    }
    writer.join().unwrap();
    page_all(&db, &mut cursor, &mut seen);

    let seqs: Vec<u64> = seen.iter().map(|(_, s)| *s).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert_eq!(cursor, db.head_seq().unwrap());
    // Every item, and at the seq it holds now (its last change was seen).
    let last: HashMap<ContentId, u64> = seen.iter().copied().collect();
    assert_eq!(last.keys().copied().collect::<HashSet<_>>(), all);
    for (id, seq) in &last {
        assert_eq!(db.seq_of(id).unwrap(), Some(*seq));
    }
}

#[test]
fn rekey_rewraps_and_moves_every_item_the_old_node_could_open() {
    let dir = tempfile::tempdir().unwrap();
    let (db, path) = new_db(&dir);
    let key = ItemKey::random();
    let (a, b) = (item(1), item(2));
    let mine = (me().id().to_hex(), crypto::wrap_key(me().public(), &key));
    db.insert_manifest(&a, &[mine], &[]).unwrap();
    db.insert_manifest(&b, &[envelope(other(), 3)], &[])
        .unwrap();
    drop(db);

    let copy = Db::open_copy(&path).unwrap();
    // The wrong old identity changes nothing.
    let err = copy.rekey(other(), me()).unwrap_err();
    assert_eq!(err.kind(), Kind::Integrity);
    assert_eq!(copy.head_seq().unwrap(), 2);

    let report = copy.rekey(me(), other()).unwrap();
    assert_eq!((report.rewrapped, report.without_key), (1, 1));
    assert_eq!(copy.head_seq().unwrap(), 3);
    assert_eq!(copy.seq_of(&a.id()).unwrap(), Some(3));
    assert_eq!(copy.seq_of(&b.id()).unwrap(), Some(2));
    assert_eq!(copy.node_id().unwrap(), other().id());
    assert_eq!(copy.envelope(&a.id(), &me().id().to_hex()).unwrap(), None);
    let wrapped = copy
        .envelope(&a.id(), &other().id().to_hex())
        .unwrap()
        .unwrap();
    let unwrapped = other().unwrap_key(&wrapped).unwrap();
    assert_eq!(unwrapped.as_bytes(), key.as_bytes());
}

#[test]
fn read_only_opens_change_nothing_and_refuse_what_is_not_a_database() {
    let dir = tempfile::tempdir().unwrap();
    let (db, path) = new_db(&dir);
    db.insert_manifest(&item(1), &[], &[(Hash([1; 32]), 40)])
        .unwrap();
    drop(db);

    let ro = Db::open_read_only(&path).unwrap();
    let f = ro.facts().unwrap();
    assert_eq!(f.node_id, me().id());
    assert_eq!((f.manifests, f.head_seq, f.chunk_bytes()), (1, 1, 40));
    assert!(ro.set_setting("x", "y").is_err());
    assert!(integrity_problems(&path).unwrap().is_empty());

    let missing = dir.path().join("none.db");
    assert_eq!(
        Db::open_read_only(&missing).err().unwrap().kind(),
        Kind::NotFound
    );
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![7u8; 8192]).unwrap();
    assert!(Db::open_read_only(&junk).is_err());
    assert_eq!(integrity_problems(&junk).unwrap().len(), 1);
}

#[test]
fn an_invite_decides_the_joiners_level_and_a_blind_one_drops_what_was_made_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = new_db(&dir);
    let peer = other().id();
    let hash = |n: u8| Hash([n; 32]);
    let far = crate::manifest::now_ms() + 60_000;
    // A keyed invite makes a keyed peer, which gets an envelope.
    db.create_invite(&hash(1), far, Level::Keyed).unwrap();
    assert_eq!(
        db.redeem_invite(&hash(1), &peer, "p", "").unwrap(),
        Level::Keyed
    );
    assert_eq!(db.trust_level(&peer).unwrap(), Some(Level::Keyed));
    let a = item(1);
    db.insert_manifest(&a, &[envelope(me(), 1), envelope(other(), 2)], &[])
        .unwrap();
    assert!(db.envelope(&a.id(), &peer.to_hex()).unwrap().is_some());
    // The same node redeeming a blind invite becomes blind, whatever it was,
    // and what was made for it is gone; its own envelope stays.
    db.create_invite(&hash(2), far, Level::Blind).unwrap();
    assert_eq!(
        db.redeem_invite(&hash(2), &peer, "p", "").unwrap(),
        Level::Blind
    );
    assert_eq!(db.trust_level(&peer).unwrap(), Some(Level::Blind));
    assert!(!db.is_keyed(&peer).unwrap());
    assert!(db.envelope(&a.id(), &peer.to_hex()).unwrap().is_none());
    assert!(db.envelope(&a.id(), &me().id().to_hex()).unwrap().is_some());
    // A revoked peer has no level; re-added by `peer add`, it keeps blind.
    db.revoke_peer(&peer).unwrap();
    assert_eq!(db.trust_level(&peer).unwrap(), None);
    db.upsert_peer(&peer, "", "", PeerState::Trusted, false)
        .unwrap();
    assert_eq!(db.trust_level(&peer).unwrap(), Some(Level::Blind));
    assert_eq!(Level::parse("keyed").unwrap(), Level::Keyed);
    assert_eq!(Level::parse("half").unwrap_err().kind(), Kind::Invalid);
}

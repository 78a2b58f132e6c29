//! Tampering with a node's stored data is detected, and `get` to a file then
//! leaves no output file (nor a temp file) behind.
//!
//! These tests drive the library directly (`bitsync::node`, `content`,
//! `store`, `manifest`, `chunks`) on real data dirs, and change the stored
//! bytes the way an attacker or a bad disk would: chunk files, the
//! `manifests` and `envelopes` rows. The last two tests simulate a crash
//! between writing chunk files and recording them.

use std::fs;
use std::io::{Cursor, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bitsync::content::{self, Output, PutOptions};
use bitsync::crypto::{self, ContentId, Hash, ItemKey};
use bitsync::error::{Error, Kind};
use bitsync::manifest::{Manifest, ManifestBody};
use bitsync::node::{self, Node};
use prost::Message;
use tempfile::TempDir;

use crate::support::*;

const CHUNK: u32 = 4096;

struct Fixture {
    tmp: TempDir,
    node: Node,
}

impl Fixture {
    /// A fresh node whose new items use 4 KiB chunks.
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        node::init(&root, None).unwrap();
        crate::support::node::set_chunk_size(&root, CHUNK as usize);
        let node = Node::open(&root, &node::no_passphrase).unwrap();
        fs::create_dir(tmp.path().join("out")).unwrap();
        Fixture { tmp, node }
    }

    fn put(&self, data: &[u8]) -> ContentId {
        let opts = PutOptions {
            kind: "file".into(),
            name: "victim".into(),
        };
        content::put(&self.node, &mut Cursor::new(data), &opts, &|_| {}).unwrap()
    }

    fn out_dir(&self) -> PathBuf {
        self.tmp.path().join("out")
    }

    /// `get` into `out/item`; on failure, checks nothing was left in `out/`.
    fn get(&self, id: &ContentId) -> Result<Vec<u8>, Error> {
        let path = self.out_dir().join("item");
        let _ = fs::remove_file(&path);
        match content::get(&self.node, id, Output::File(&path), &|_| {}) {
            Ok(_) => Ok(fs::read(&path).unwrap()),
            Err(e) => {
                let left: Vec<_> = fs::read_dir(self.out_dir())
                    .unwrap()
                    .flatten()
                    .map(|e| e.file_name())
                    .collect();
                assert!(
                    left.is_empty(),
                    "a failed get left files behind: {left:?} (error: {e})"
                );
                Err(e)
            }
        }
    }

    /// `get` must fail with `kind`, leaving no output.
    fn get_fails(&self, id: &ContentId, kind: Kind) -> Error {
        match self.get(id) {
            Ok(_) => panic!("get of tampered item {id} succeeded"),
            Err(e) => {
                assert_eq!(e.kind(), kind, "wrong kind of error: {e}");
                e
            }
        }
    }

    fn chunk_path(&self, m: &Manifest, i: usize) -> PathBuf {
        self.node.chunks().file(&m.chunk_id(i)).unwrap()
    }

    fn manifest(&self, id: &ContentId) -> Manifest {
        self.node.db().manifest(id).unwrap().unwrap().0
    }

    fn sql(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.node.paths().db()).unwrap()
    }

    fn set_body(&self, id: &ContentId, body: &[u8]) {
        let n = self
            .sql()
            .execute(
                "UPDATE manifests SET body = ?2 WHERE content_id = ?1",
                rusqlite::params![id.to_hex(), body],
            )
            .unwrap();
        assert_eq!(n, 1);
    }

    /// `body` re-signed by this node (the publisher) and stored as a new item
    /// with `m`'s key: a forgery only the publisher could make.
    fn store_forged(&self, m: &Manifest, body: ManifestBody) -> Manifest {
        let forged = Manifest::create(self.node.identity(), body).unwrap();
        // Envelopes bind their item (format 2): `m`'s key, wrapped anew for
        // the forgery (an RSA envelope, which every reader still opens).
        let key = self
            .node
            .open_envelope(&m.id(), &self.own_envelope(&m.id()))
            .unwrap();
        let wrapped = crypto::wrap_key(self.node.identity().public(), &key);
        let env = vec![(self.node.id().to_hex(), wrapped)];
        self.node.db().insert_manifest(&forged, &env, &[]).unwrap();
        forged
    }

    /// `body` with `m`'s signature, which no longer matches: refused as a bad
    /// signature when parsed, and `get` fails once it is stored under `id`.
    fn store_unsigned(&self, id: &ContentId, m: &Manifest, body: &ManifestBody) {
        let bytes = body.encode_to_vec();
        let e = Manifest::from_signed(bytes.clone(), m.signature().to_vec()).unwrap_err();
        assert_eq!(e.kind(), Kind::Integrity, "{e}");
        assert!(e.message().contains("signature"), "{e}");
        self.set_body(id, &bytes);
        self.get_fails(id, Kind::Integrity);
    }

    /// This node's envelope for `id`, unchanged.
    fn own_envelope(&self, id: &ContentId) -> Vec<u8> {
        self.node
            .db()
            .envelope(id, &self.node.id().to_hex())
            .unwrap()
            .unwrap()
    }
}

fn decode(m: &Manifest) -> ManifestBody {
    ManifestBody::decode(m.body_bytes()).unwrap()
}

/// An item of 3 chunks (4096, 4096, 1808 bytes) that round-trips before tampering.
fn three_chunk_item(f: &Fixture) -> (ContentId, Manifest, Vec<u8>) {
    let plain = data(1, 2 * CHUNK as usize + 1808);
    let id = f.put(&plain);
    assert_eq!(f.get(&id).unwrap(), plain, "untampered round trip");
    let m = f.manifest(&id);
    assert_eq!(m.chunk_count(), 3);
    (id, m, plain)
}

// ---- chunks --------------------------------------------------------------------

#[test]
fn flipped_chunk_byte_is_detected_and_quarantined() {
    let f = Fixture::new();
    let (id, m, _) = three_chunk_item(&f);
    let victim = f.chunk_path(&m, 1);
    flip_byte(&victim, 100);
    let e = f.get_fails(&id, Kind::Integrity);
    assert!(
        e.message().contains(&m.chunk_id(1).to_hex()),
        "names the chunk: {e}"
    );
    assert!(!victim.exists(), "bad chunk left in chunks/");
    assert!(
        f.node
            .paths()
            .quarantine()
            .join(m.chunk_id(1).to_hex())
            .exists(),
        "bad chunk not in quarantine/"
    );
    // Now it is simply missing.
    f.get_fails(&id, Kind::NotFound);
}

#[test]
fn each_chunk_and_each_byte_position_class_is_covered() {
    // Flip the first byte, a middle byte and the last (tag) byte of each chunk in turn.
    let f = Fixture::new();
    let (id, m, plain) = three_chunk_item(&f);
    for i in 0..m.chunk_count() {
        let p = f.chunk_path(&m, i);
        let len = fs::metadata(&p).unwrap().len() as usize;
        for at in [0, len / 2, len - 1] {
            let orig = fs::read(&p).unwrap();
            flip_byte(&p, at);
            f.get_fails(&id, Kind::Integrity);
            // Put the good chunk back (it was quarantined) and check the item is whole again.
            fs::write(&p, &orig).unwrap();
            assert_eq!(
                f.get(&id).unwrap(),
                plain,
                "restoring chunk {i} restores the item"
            );
        }
    }
}

#[test]
fn swapped_chunk_files_are_detected() {
    let f = Fixture::new();
    let (id, m, _) = three_chunk_item(&f);
    let (a, b) = (f.chunk_path(&m, 0), f.chunk_path(&m, 1));
    let tmp = a.with_extension("swap");
    fs::rename(&a, &tmp).unwrap();
    fs::rename(&b, &a).unwrap();
    fs::rename(&tmp, &b).unwrap();
    f.get_fails(&id, Kind::Integrity);
}

#[test]
fn reordered_chunk_list_fails_the_signature() {
    let f = Fixture::new();
    let (id, m, _) = three_chunk_item(&f);
    let mut body = decode(&m);
    body.chunk_ids.swap(0, 1);
    f.store_unsigned(&id, &m, &body);
}

#[test]
fn reordered_chunk_list_validly_signed_still_fails_to_decrypt() {
    // Even the publisher cannot reorder chunks: the GCM nonce binds each chunk to its index.
    let f = Fixture::new();
    let (_, m, _) = three_chunk_item(&f);
    let mut body = decode(&m);
    body.chunk_ids.swap(0, 1);
    let forged = f.store_forged(&m, body);
    let e = f.get_fails(&forged.id(), Kind::Integrity);
    assert!(e.message().contains("chunk 0"), "{e}");
}

#[test]
fn truncated_chunk_list_fails_the_signature() {
    let f = Fixture::new();
    let (id, m, _) = three_chunk_item(&f);
    // Dropped last chunk, size left alone: the structure check fails.
    let mut body = decode(&m);
    body.chunk_ids.pop();
    let e = Manifest::from_signed(body.encode_to_vec(), m.signature().to_vec()).unwrap_err();
    assert_eq!(e.kind(), Kind::Integrity, "{e}");
    // Dropped last chunk with a consistent size: the signature fails.
    body.size = 2 * CHUNK as u64;
    f.store_unsigned(&id, &m, &body);
}

#[test]
fn truncated_chunk_list_validly_signed_still_fails_to_decrypt() {
    // The last-chunk flag in the nonce: chunk 1 was not encrypted as the last one.
    let f = Fixture::new();
    let (_, m, _) = three_chunk_item(&f);
    let mut body = decode(&m);
    body.chunk_ids.pop();
    body.size = 2 * CHUNK as u64;
    let forged = f.store_forged(&m, body);
    let e = f.get_fails(&forged.id(), Kind::Integrity);
    assert!(e.message().contains("chunk 1"), "{e}");
}

#[test]
fn deleted_chunk_file_is_not_found() {
    let f = Fixture::new();
    let (id, m, _) = three_chunk_item(&f);
    fs::remove_file(f.chunk_path(&m, 2)).unwrap();
    let e = f.get_fails(&id, Kind::NotFound);
    assert!(e.message().contains("chunk 2"), "{e}");
}

#[test]
fn chunk_of_the_wrong_length_is_detected() {
    // A file that hashes right but is not the length the manifest implies can
    // only come from a forged manifest; replace chunk 2 by chunk 1 in a re-signed body.
    let f = Fixture::new();
    let (_, m, _) = three_chunk_item(&f);
    let mut body = decode(&m);
    body.chunk_ids[2] = body.chunk_ids[1].clone();
    let forged = f.store_forged(&m, body);
    f.get_fails(&forged.id(), Kind::Integrity);
}

// ---- the manifest row ------------------------------------------------------------

#[test]
fn changed_body_byte_in_the_db_is_an_integrity_error() {
    let f = Fixture::new();
    let (id, m, _) = three_chunk_item(&f);
    let mut bytes = m.body_bytes().to_vec();
    // The kind string "file" → "fime".
    let at = bytes
        .windows(4)
        .position(|w| w == b"file")
        .expect("kind in body");
    bytes[at + 2] = b'm';
    f.set_body(&id, &bytes);
    let e = f.node.db().manifest(&id).unwrap_err();
    assert_eq!(e.kind(), Kind::Integrity, "{e}");
    f.get_fails(&id, Kind::Integrity);
    // ls and verify notice too.
    let r = content::verify(&f.node, &|_, _| {}).unwrap();
    assert!(
        r.problems.iter().any(|p| p.contains(&id.to_hex())),
        "verify: {:?}",
        r.problems
    );
}

/// Every single-byte change of a stored body must be reported as an integrity
/// failure (exit 5 / DATA_LOSS), whatever field it lands in. Today changes in
/// the publisher key's DER and in format_version come back as Kind::Invalid
/// (exit 2, "the caller asked for something malformed").
#[test]
fn every_single_byte_change_of_a_body_is_an_integrity_error() {
    let f = Fixture::new();
    let (id, m, _) = three_chunk_item(&f);
    let body = m.body_bytes().to_vec();
    let sig = m.signature().to_vec();
    let mut wrong = Vec::new();
    for at in 0..body.len() {
        let mut b = body.clone();
        b[at] ^= 0x01;
        match Manifest::from_signed(b, sig.clone()) {
            Ok(_) => panic!("flipping body byte {at} went unnoticed"),
            Err(e) if e.kind() != Kind::Integrity => {
                wrong.push(format!("byte {at}: {:?}: {}", e.kind(), e.message()))
            }
            Err(_) => {}
        }
    }
    // The same through the database, for the first byte (format_version = 1 → 0).
    let mut b = body.clone();
    b[1] ^= 0x01;
    f.set_body(&id, &b);
    match f.node.db().manifest(&id) {
        Ok(_) => panic!("altered format_version went unnoticed"),
        Err(e) if e.kind() != Kind::Integrity => {
            wrong.push(format!("db, byte 1: {:?}: {}", e.kind(), e.message()))
        }
        Err(_) => {}
    }
    assert!(
        wrong.is_empty(),
        "{} of {} single-byte changes were not integrity errors, e.g.:\n{}",
        wrong.len(),
        body.len() + 1,
        wrong.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn changed_signature_is_an_integrity_error() {
    let f = Fixture::new();
    let (id, m, _) = three_chunk_item(&f);
    let mut sig = m.signature().to_vec();
    assert_eq!(sig.len(), 384, "RSA-3072 signature");
    sig[200] ^= 0x01;
    let set = |s: &[u8]| {
        f.sql()
            .execute(
                "UPDATE manifests SET signature = ?2 WHERE content_id = ?1",
                rusqlite::params![id.to_hex(), s],
            )
            .unwrap()
    };
    set(&sig);
    let e = f.get_fails(&id, Kind::Integrity);
    assert!(e.message().contains("signature"), "{e}");
    set(&sig[..383]);
    f.get_fails(&id, Kind::Integrity);
    set(&[]);
    f.get_fails(&id, Kind::Integrity);
}

#[test]
fn manifest_row_moved_to_another_id_is_detected() {
    // A valid body and signature filed under another content id.
    let f = Fixture::new();
    let (a, ma, _) = three_chunk_item(&f);
    let b = f.put(b"second item");
    let mb = f.manifest(&b);
    f.sql()
        .execute(
            "UPDATE manifests SET body = ?2, signature = ?3 WHERE content_id = ?1",
            rusqlite::params![a.to_hex(), mb.body_bytes(), mb.signature()],
        )
        .unwrap();
    let e = f.get_fails(&a, Kind::Integrity);
    assert!(e.message().contains("altered"), "{e}");
    drop(ma);
}

// ---- envelopes -----------------------------------------------------------------

#[test]
fn changed_envelope_is_an_error() {
    let f = Fixture::new();
    let (id, _, _) = three_chunk_item(&f);
    let me = f.node.id().to_hex();
    let mut env = f.own_envelope(&id);
    env[10] ^= 0x01;
    let set = |w: &[u8]| {
        f.sql()
            .execute(
                "UPDATE envelopes SET wrapped = ?3 WHERE content_id = ?1 AND recipient = ?2",
                rusqlite::params![id.to_hex(), me, w],
            )
            .unwrap()
    };
    assert_eq!(set(&env), 1);
    f.get_fails(&id, Kind::Integrity);

    // An envelope that unwraps to a valid but different key: the metadata check catches it.
    let other = crypto::wrap_key(f.node.identity().public(), &ItemKey::random());
    set(&other);
    let e = f.get_fails(&id, Kind::Integrity);
    assert!(e.message().contains("metadata"), "{e}");

    // No envelope for this node at all: what a blind mirror holds, or an
    // item awaiting its key (PROTOCOL.md §2.1, §2.3): its own kind and
    // exit code (11); here the publisher (this node) serves no one blind.
    f.sql()
        .execute("DELETE FROM envelopes WHERE content_id = ?1", [id.to_hex()])
        .unwrap();
    let e = f.get_fails(&id, Kind::NoKey);
    assert!(e.message().starts_with("no key: item"), "{e}");
}

// ---- presence --------------------------------------------------------------------

/// A chunk that `get` found bad is quarantined, but its row stays in `chunks`,
/// so the node still counts it as present: `ls` says the item is complete and
/// a peer would be told the chunk is here. Only `verify` forgets it.
#[test]
fn a_chunk_quarantined_by_get_is_no_longer_present() {
    let f = Fixture::new();
    let (id, m, _) = three_chunk_item(&f);
    flip_byte(&f.chunk_path(&m, 0), 5);
    f.get_fails(&id, Kind::Integrity);
    assert!(!f.chunk_path(&m, 0).exists());
    assert!(
        !f.node.db().has_chunk(&m.chunk_id(0)).unwrap(),
        "a quarantined chunk is still recorded as present"
    );
    assert!(
        !f.node.db().is_complete(&id).unwrap(),
        "item still reported complete"
    );
}

// ---- crashes between chunk write and record --------------------------------------

#[test]
fn chunk_written_but_not_recorded_is_not_present() {
    let f = Fixture::new();
    let key = ItemKey::random();
    let mut ids = Vec::new();
    for i in 0..3u64 {
        let ct = crypto::encrypt_chunk(&key, i, i == 2, &data(1, CHUNK as usize));
        let cid = Hash::of(&ct);
        f.node.chunks().write(&cid, &ct).unwrap();
        assert!(f.node.chunks().file(&cid).unwrap().is_file());
        ids.push(cid);
    }
    f.node.chunks().sync().unwrap();
    // ChunkDir::write refuses data that does not match its id.
    let e = f.node.chunks().write(&ids[0], b"not it").unwrap_err();
    assert_eq!(e.kind(), Kind::Integrity);
    // A write torn by the crash, left in chunks/tmp/.
    let torn = f
        .tmp
        .path()
        .join("data/chunks/tmp")
        .join(format!("{}.0000000000000000", ids[0].to_hex()));
    fs::write(&torn, b"half a chunk").unwrap();
    // Temp files are cleared once stale (a live writer in another process
    // may own a fresh one); make this one look hours old.
    fs::File::options()
        .write(true)
        .open(&torn)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(7200))
        .unwrap();

    // "Crash" now: nothing was recorded. Reopen the data dir.
    let root = f.node.paths().root.clone();
    drop(f.node);
    let n = Node::open(&root, &node::no_passphrase).unwrap();
    for cid in &ids {
        assert!(
            !n.db().has_chunk(cid).unwrap(),
            "unrecorded chunk {cid} counts as present"
        );
    }
    assert!(n.db().chunk_list().unwrap().is_empty());
    assert!(
        n.db().list_after(0, 100).unwrap().is_empty(),
        "no item is listed"
    );
    assert!(n.db().content_ids().unwrap().is_empty());
    assert_eq!(n.db().stats().unwrap().chunks, 0);
    assert!(
        !torn.exists(),
        "opening the node clears stale files from chunks/tmp/"
    );
    let r = content::verify(&n, &|_, _| {}).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.chunks_checked, 0);
    drop(f.tmp);
}

#[test]
fn put_killed_mid_stream_leaves_no_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("data");
    node::init(&root, None).unwrap();

    let mut child = Command::new(BIN)
        .args(["put", "-"])
        .env("BITSYNC_DATA_DIR", &root)
        .env_remove("BITSYNC_PASSPHRASE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // Endless input, until the pipe breaks.
    let writer = std::thread::spawn(move || {
        let block: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut sent = 0u64;
        while stdin.write_all(&block).is_ok() {
            sent += block.len() as u64;
        }
        sent
    });
    let start = Instant::now();
    while chunk_files(&root).len() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "put wrote no chunks in 2 minutes"
        );
        assert!(child.try_wait().unwrap().is_none(), "put exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    let sent = writer.join().unwrap();
    let orphans = chunk_files(&root).len();
    assert!(orphans >= 3, "chunk files were on disk at the kill");
    assert!(sent >= 3 << 20);

    let n = Node::open(&root, &node::no_passphrase).unwrap();
    assert!(
        n.db().content_ids().unwrap().is_empty(),
        "a killed put left a manifest"
    );
    assert!(
        n.db().chunk_list().unwrap().is_empty(),
        "a killed put left chunks recorded as present"
    );
    assert_eq!(n.db().head_seq().unwrap(), 0);
    let r = content::verify(&n, &|_, _| {}).unwrap();
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    drop(n);

    // And the command line agrees.
    let o = run(command(tmp.path())
        .arg("verify")
        .env("BITSYNC_DATA_DIR", &root));
    assert!(
        o.status.success(),
        "verify after a killed put: {}",
        o.stderr
    );
    let o = run(command(tmp.path())
        .args(["ls", "--json"])
        .env("BITSYNC_DATA_DIR", &root));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v, serde_json::json!([]));
}

/// The background scrub re-hashes what has no recent check of the same file:
/// a chunk changed on disk is found and quarantined before a peer asks, and a
/// pass over chunks all checked since (put recorded them) reads none.
#[test]
fn the_scrub_quarantines_a_damaged_chunk_and_skips_recent_checks() {
    use bitsync::content::scrub::{scrub_pass, ScrubReport};
    use std::sync::atomic::AtomicBool;
    let f = Fixture::new();
    let id = f.put(&vec![7u8; 3 * CHUNK as usize]);
    let m = f.manifest(&id);
    let stop = AtomicBool::new(false);
    let pass = || scrub_pass(&f.node, 1 << 30, &stop).unwrap();
    assert_eq!(pass(), ScrubReport::default(), "put recorded its checks");
    flip_byte(&f.chunk_path(&m, 1), 10);
    assert_eq!(
        pass(),
        ScrubReport {
            checked: 1,
            failed: 1
        }
    );
    assert!(!f.node.db().has_chunk(&m.chunk_id(1)).unwrap());
    assert!(f.node.db().has_chunk(&m.chunk_id(0)).unwrap());
    assert!(f
        .node
        .paths()
        .root()
        .join("quarantine")
        .join(m.chunk_id(1).to_hex())
        .exists());
    f.get_fails(&id, Kind::NotFound);
}

//! Format 2 (docs/FORMAT.md §4, PROTOCOL.md §4.4–§6): link keys made once
//! per peer, item envelopes that bind item, sender, recipient and link
//! generation, tampering refused as DATA_LOSS, revocation and rotation, a
//! format-1 caller refused by name, and the in-place migration of a
//! format-1 data dir and backup repository made by the bitsync before format 2.

use std::fs;
use std::path::Path;
use std::time::Duration;

use bitsync::crypto::ContentId;
use bitsync::keyring::ENVELOPE_FORMAT;
use bitsync::node::Node;
use bitsync::proto::*;
use bitsync::replicator::Client;
use bitsync::store::PeerState;
use tempfile::TempDir;
use tonic::Code;

use crate::support::*;

/// The fixture snapshot's sealed key opens with this (tests/fixtures/format1/README.md).
const PASS: &str = "throwaway-fixture-passphrase";
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format1");

/// GetManifests as a format-2 caller; the envelope of each item, in order.
async fn envelopes(fed: &mut Client, ids: &[ContentId]) -> Vec<Vec<u8>> {
    let r = fed
        .get_manifests(GetManifestsRequest {
            content_ids: ids.iter().map(|i| i.to_hex()).collect(),
            envelope_format: ENVELOPE_FORMAT,
            caller_kem_key: None,
            envelopes_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    r.results
        .into_iter()
        .map(|x| {
            assert!(x.problem.is_none(), "{:?}", x.problem);
            x.envelope.unwrap().wrapped_key
        })
        .collect()
}

/// (sender, recipient, generation) of every link key in a database.
fn link_rows(dir: &Path) -> Vec<(String, String, u32)> {
    let c = db_read_only(dir);
    let mut st = c
        .prepare("SELECT sender, recipient, generation FROM link_keys ORDER BY generation")
        .unwrap();
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

fn generation_of(envelope: &[u8]) -> u32 {
    assert_eq!(envelope.len(), 100, "an item envelope");
    assert_eq!(&envelope[..4], b"BIE2");
    u32::from_be_bytes(envelope[36..40].try_into().unwrap())
}

fn with_generation(envelope: &[u8], g: u32) -> Vec<u8> {
    let mut e = envelope.to_vec();
    e[36..40].copy_from_slice(&g.to_be_bytes());
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_link_key_per_peer_and_tampered_envelopes_are_data_loss() {
    let tmp = TempDir::new().unwrap();
    let s = serve(fresh(&tmp, "s")).await;
    let (a, b) = (fresh(&tmp, "a"), fresh(&tmp, "b"));
    trust(&s, &a.id());
    trust(&s, &b.id());
    let ids: Vec<ContentId> = (0..5)
        .map(|i| put(&s.state.node, &format!("i{i}"), &data(i, 5000)))
        .collect();
    let (mut fa, mut fb) = (
        federation_client(&a, &s).await,
        federation_client(&b, &s).await,
    );
    let ea = envelopes(&mut fa, &ids).await;
    let eb = envelopes(&mut fb, &ids).await;
    // One link key per ordered pair: S→S, S→A, S→B; every envelope names it.
    let s_dir = s.state.node.paths().root().to_path_buf();
    assert_eq!(link_rows(&s_dir).len(), 3, "{:?}", link_rows(&s_dir));
    let ga = generation_of(&ea[0]);
    assert!(ea.iter().all(|e| generation_of(e) == ga));
    assert_ne!(ga, generation_of(&eb[0]));

    // Before A holds L(S→A) its envelope does not open.
    data_loss(a.open_envelope(&ids[0], &ea[0]).unwrap_err());
    // A tampered or misaddressed link envelope is refused.
    let la = link_envelopes(&mut fa).await;
    assert_eq!(la.link_envelopes.len(), 1);
    let mut bad = la.link_envelopes[0].clone();
    let n = bad.len();
    bad[n - 10] ^= 1; // inside the signature
    data_loss(
        a.receive_link_envelopes(&la.sender_spki, &[bad])
            .unwrap_err(),
    );
    let lb = link_envelopes(&mut fb).await;
    data_loss(
        a.receive_link_envelopes(&lb.sender_spki, &lb.link_envelopes)
            .unwrap_err(),
    );
    assert_eq!(
        a.receive_link_envelopes(&la.sender_spki, &la.link_envelopes)
            .unwrap(),
        1
    );
    assert_eq!(
        a.receive_link_envelopes(&la.sender_spki, &la.link_envelopes)
            .unwrap(),
        0
    );
    for (id, e) in ids.iter().zip(&ea) {
        a.open_envelope(id, e).expect("A opens its envelope");
    }
    // A second reader, from FORMAT.md alone, opens the same key (through
    // A's sealed copy of L(S→A)), and A's own envelopes (under L(A→A)).
    python_agrees(&a, &ids[0], &ea[0]);
    let mine = put(&a, "mine", b"a's own item");
    python_agrees(
        &a,
        &mine,
        &a.db().envelope(&mine, &a.id().to_hex()).unwrap().unwrap(),
    );
    // Swapped content id, swapped recipient (B's envelope relabelled to A's
    // link), a flipped byte: all DATA_LOSS.
    data_loss(a.open_envelope(&ids[1], &ea[0]).unwrap_err());
    data_loss(
        a.open_envelope(&ids[0], &with_generation(&eb[0], ga))
            .unwrap_err(),
    );
    let mut flipped = ea[2].clone();
    flipped[70] ^= 1;
    data_loss(a.open_envelope(&ids[2], &flipped).unwrap_err());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_caller_is_refused_naming_the_version() {
    let tmp = TempDir::new().unwrap();
    let s = serve(fresh(&tmp, "s")).await;
    let a = fresh(&tmp, "a");
    trust(&s, &a.id());
    let id = put(&s.state.node, "x", b"hello");
    let e = federation_client(&a, &s)
        .await
        .get_manifests(GetManifestsRequest {
            content_ids: vec![id.to_hex()],
            envelope_format: 0,
            caller_kem_key: None,
            envelopes_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("envelope format 2"), "{}", e.message());
    assert!(e.message().contains("format 0"), "{}", e.message());
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_and_revocation_never_reuse_a_link_key() {
    let tmp = TempDir::new().unwrap();
    let s = serve(fresh(&tmp, "s")).await;
    let a = fresh(&tmp, "a");
    trust(&s, &a.id());
    let sn = &s.state.node;
    let ids: Vec<ContentId> = (0..3)
        .map(|i| put(sn, &format!("i{i}"), &data(i, 100)))
        .collect();
    let mut fa = federation_client(&a, &s).await;
    let first = envelopes(&mut fa, &ids).await;
    let g1 = generation_of(&first[0]);
    let l = link_envelopes(&mut fa).await;
    a.receive_link_envelopes(&l.sender_spki, &l.link_envelopes)
        .unwrap();
    a.open_envelope(&ids[0], &first[0]).unwrap();
    let own = |n: &Node, id: &ContentId| n.db().envelope(id, &a.id().to_hex()).unwrap();

    // Rotation: a new generation, A's old envelopes gone, re-wrapped on ask.
    let g2 = sn.rotate_link(&a.id()).unwrap();
    assert!(g2 > g1);
    assert!(own(sn, &ids[0]).is_none());
    let second = envelopes(&mut fa, &ids).await;
    assert_eq!(generation_of(&second[0]), g2);
    let l = link_envelopes(&mut fa).await;
    assert_eq!(l.link_envelopes.len(), 1, "the old generation is deleted");
    a.receive_link_envelopes(&l.sender_spki, &l.link_envelopes)
        .unwrap();
    a.open_envelope(&ids[0], &second[0]).unwrap();
    // A's old link key (which A still holds) opens nothing wrapped under the new one.
    data_loss(
        a.open_envelope(&ids[0], &with_generation(&second[0], g1))
            .unwrap_err(),
    );

    // Revocation deletes L(S→A) and A's envelopes; A gets nothing more.
    sn.db().revoke_peer(&a.id()).unwrap();
    assert!(link_rows(sn.paths().root())
        .iter()
        .all(|(_, r, _)| *r != a.id().to_hex()));
    assert!(ids.iter().all(|i| own(sn, i).is_none()));
    let e = fa
        .get_link_envelopes(GetLinkEnvelopesRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // Trusted again: a generation never used before.
    trust(&s, &a.id());
    let third = envelopes(&mut fa, &ids).await;
    assert!(generation_of(&third[0]) > g2);
    s.shutdown().await;
}

/// Copy the format-1 fixture (a data dir and a repository) into `dest`. Its
/// node key is in git only sealed (under `PASS`), as `node.key.sealed`.
fn fixture(dest: &Path) {
    for (from, to) in [("node", "node"), ("repo", "repo")] {
        copy_dir(&Path::new(FIXTURE).join(from), &dest.join(to));
    }
    let key = dest.join("node/node.key");
    fs::rename(dest.join("node/node.key.sealed"), &key).unwrap();
    let mut p = fs::metadata(&key).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o600);
    fs::set_permissions(&key, p).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The fixture's items, as `bitsync put` stored them.
fn fixture_items() -> Vec<(ContentId, Vec<u8>)> {
    [
        "e125ccfb5256088444bb8256c3ac3b1f76fb3a9ac6b27ed35ebeeb68762c6b1a",
        "4cefba2aa44ad8866be7a978218df56d220ca5c3ddc2916beab441e674934223",
        "d06e7c3e881b282fb8253a1a89b4cfa553769a3474503c07c42d9a03db37aba3",
    ]
    .iter()
    .enumerate()
    .map(|(i, id)| {
        let text = format!("format one item {}\n", i + 1).repeat(50);
        (id.parse().unwrap(), text.into_bytes())
    })
    .collect()
}

fn setting(dir: &Path, key: &str) -> Option<String> {
    use rusqlite::OptionalExtension;
    db_read_only(dir)
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .unwrap()
}

/// The node reads the fixture's items, at schema 3, with every own envelope
/// a format-2 item envelope and a sealed node.mlkem.
fn assert_migrated(dir: &Path) {
    let pass = || Ok(zeroize::Zeroizing::new(PASS.to_string()));
    let n = Node::open(dir, &pass).expect("open the migrated node");
    for (id, plain) in fixture_items() {
        assert_eq!(get(&n, &id), plain);
        let e = n.db().envelope(&id, &n.id().to_hex()).unwrap().unwrap();
        generation_of(&e);
    }
    drop(n);
    // Its ML-KEM key was made on that first open, sealed like node.key.
    let kem = fs::read_to_string(dir.join("node.mlkem")).unwrap();
    assert!(kem.contains("BITSYNC SEALED KEY"), "node.mlkem is sealed");
    assert_eq!(
        setting(dir, "schema_version").as_deref(),
        Some(bitsync::store::SCHEMA_VERSION)
    );
    assert_eq!(setting(dir, "envelope_format").as_deref(), Some("2"));
}

#[test]
fn a_format_1_data_dir_migrates_in_place_and_resumes_after_kill_9() {
    let tmp = TempDir::new().unwrap();
    fixture(tmp.path());
    let dir = tmp.path().join("node");
    assert_eq!(setting(&dir, "schema_version").as_deref(), Some("1"));
    // kill -9 at staggered points of the first opens: every state left
    // behind is schema 1, 2, 3 or 4, and the next open finishes the migration.
    for delay_ms in [0u64, 20, 60, 120, 250] {
        let mut child = bitsync(&dir)
            .args(["ls"])
            .env("BITSYNC_PASSPHRASE", PASS)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let v = setting(&dir, "schema_version");
        assert!(matches!(v.as_deref(), Some("1" | "2" | "3" | "4")), "{v:?}");
    }
    assert_migrated(&dir);
    assert_migrated(&dir); // a second open changes nothing
}

#[test]
fn a_format_1_repository_restores_and_migrates() {
    let tmp = TempDir::new().unwrap();
    fixture(tmp.path());
    let dest = tmp.path().join("restored");
    ok(bitsync(&dest)
        .args(["restore", "--repo"])
        .arg(tmp.path().join("repo"))
        .env("BITSYNC_PASSPHRASE", PASS));
    assert_migrated(&dest);
    // The repository itself still verifies: its snapshot is read as it is.
    ok(bitsync(&dest)
        .args(["backup", "verify", "--repo"])
        .arg(tmp.path().join("repo")));
}

#[test]
fn peer_rekey_rotates_the_link_key_of_a_peer_that_has_called() {
    let tmp = TempDir::new().unwrap();
    let (n, other) = (fresh(&tmp, "n"), fresh(&tmp, "o"));
    let dir = n.paths().root().to_path_buf();
    let id = other.id().to_hex();
    n.db()
        .upsert_peer(&other.id(), "", "", PeerState::Trusted, false)
        .unwrap();
    drop(n);
    let out = run(bitsync(&dir).args(["peer", "rekey", &id]));
    assert_eq!(out.code, 3, "{}", out.stderr);
    assert!(
        out.stderr.contains("has not called this node yet"),
        "{}",
        out.stderr
    );
    // Once its key is known (its first call records it), rekey makes a new generation.
    let n = open(&dir);
    n.db()
        .set_peer_key(&other.id(), other.identity().spki())
        .unwrap();
    drop(n);
    let out = ok(bitsync(&dir).args(["peer", "rekey", &id]));
    assert!(
        out.stderr.contains("rotated to generation"),
        "{}",
        out.stderr
    );
    assert_eq!(
        link_rows(&dir).iter().filter(|(_, r, _)| *r == id).count(),
        1
    );
}

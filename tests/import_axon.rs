//! `bitsync import-axon` on Axon backups written by the independent fixture
//! writer (tests/support/axon_fixture.rs), with the real binary.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::axon_fixture::{
    axon_key_id, corrupt_piece, delete_piece, other_key, shared_key, truncate_piece, Builder,
    Written, AXON_CHUNK_SIZE,
};
use crate::support::*;
use bitsync::manifest::{Cipher, Manifest};
use bitsync::node::Node;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::pkcs8::{EncodePrivateKey, LineEnding};
use rsa::RsaPrivateKey;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

const CHESS: &str = "Chess / Deluxe Edition";

fn fixture(dir: &Path) -> Written {
    Builder::new()
        .applet("empty", 0)
        .applet("tiny", 1000)
        .applet(CHESS, 3 * AXON_CHUNK_SIZE + 5000)
        .data("tiny", "alice", 700)
        .data("tiny", "bob", AXON_CHUNK_SIZE + 1)
        .data(CHESS, "carol", 40_000)
        .write(dir)
}

/// An Axon backup of one applet, "tiny", with one data item of `alice` bytes.
fn tiny_backup(dir: &Path, alice: usize) -> Written {
    Builder::new()
        .applet("tiny", 1000)
        .data("tiny", "alice", alice)
        .write(dir)
}

/// `key` written to `path` as PEM, PKCS#8 or (with `pkcs1`) PKCS#1: both are
/// what `--axon-key` takes.
fn write_key(path: &Path, key: &RsaPrivateKey, pkcs1: bool) {
    let pem = if pkcs1 {
        key.to_pkcs1_pem(LineEnding::LF).unwrap()
    } else {
        key.to_pkcs8_pem(LineEnding::LF).unwrap()
    };
    fs::write(path, pem.as_bytes()).unwrap();
}

fn import(home: &Path, data: &Path, dir: &Path, key: Option<&Path>) -> Out {
    run(&mut import_cmd(home, data, dir, key))
}

/// `import-axon` without a key, failing the test if it takes over 30 s: for
/// inputs the old code hung on or read whole.
fn import_promptly(home: &Path, data: &Path, dir: &Path) -> Out {
    run_within(
        &mut import_cmd(home, data, dir, None),
        Duration::from_secs(30),
    )
}

fn import_cmd(home: &Path, data: &Path, dir: &Path, key: Option<&Path>) -> Command {
    let mut c = command(home);
    c.arg("--data-dir").arg(data).arg("import-axon").arg(dir);
    if let Some(k) = key {
        c.arg("--axon-key").arg(k);
    }
    c
}

fn manifests(node: &Node) -> Vec<Manifest> {
    node.db()
        .content_ids()
        .unwrap()
        .iter()
        .map(|id| node.db().manifest(id).unwrap().unwrap().0)
        .collect()
}

/// Legacy manifests by Axon content hash (hex).
fn legacy_by_hash(node: &Node) -> BTreeMap<String, Manifest> {
    manifests(node)
        .into_iter()
        .filter(|m| m.body().cipher() == Cipher::AxonAes256Cbc)
        .map(|m| (hex::encode(&m.body().legacy_plain_sha256), m))
        .collect()
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn hash_of_file(p: &PathBuf) -> bitsync::crypto::Hash {
    bitsync::crypto::Hash::of(&fs::read(p).unwrap())
}

/// Without the key: complete items are kept in Axon's cipher; a corrupt, a
/// truncated and a missing piece are each reported and their items skipped.
#[test]
fn without_key_keeps_complete_items_as_legacy_and_reports_damage() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let dir = tmp.path().join("backup_20250314_092653");
    let w = fixture(&dir);
    let chess = w.item(CHESS, None);
    corrupt_piece(&chess.chunk_paths[1]);
    truncate_piece(&w.item("tiny", Some("bob")).chunk_paths[0], 5);
    delete_piece(&w.item("tiny", Some("alice")).chunk_paths[0]);
    let axon_before = tree(&dir);

    let data = tmp.path().join("node");
    init_node(&data, 65536);
    let r = import(home, &data, &dir, None);
    assert_eq!(r.code, 5, "skipped items make the exit non-zero: {r:?}");
    assert!(r.stderr.contains("3 not imported"), "{r:?}");
    let out = &r.text();
    // Per applet, per data instance: what is complete, missing or corrupt.
    let chess_block = out.split(&format!("applet '{CHESS}'")).nth(1).unwrap();
    assert!(
        chess_block
            .trim_start()
            .starts_with("code: CORRUPT, not imported"),
        "{out}"
    );
    assert!(
        chess_block.contains("piece 1 is corrupt")
            && chess_block.contains(&chess.chunk_paths[1].display().to_string()),
        "{out}"
    );
    assert!(
        chess_block.contains("data of carol") && chess_block.contains("complete, imported"),
        "{out}"
    );
    let tiny_block = out
        .split("applet 'tiny'")
        .nth(1)
        .unwrap()
        .split("applet '")
        .next()
        .unwrap();
    assert!(tiny_block.contains("code: complete, imported"), "{out}");
    let alice = tiny_block
        .split("data of alice")
        .nth(1)
        .unwrap()
        .split("data of")
        .next()
        .unwrap();
    assert!(
        alice.contains("MISSING pieces, not imported") && alice.contains("piece 0 is missing"),
        "{out}"
    );
    let bob = tiny_block.split("data of bob").nth(1).unwrap();
    assert!(
        bob.contains("CORRUPT, not imported")
            && bob.contains("piece 0 is corrupt")
            && bob.contains("truncated"),
        "{out}"
    );
    assert_eq!(tree(&dir), axon_before, "the Axon backup was only read");

    let node = open(&data);
    let legacy = legacy_by_hash(&node);
    let imported = ["empty", "tiny"]
        .iter()
        .map(|a| w.item(a, None))
        .chain([w.item(CHESS, Some("carol"))]);
    let kid = format!("axon:{}", axon_key_id(&shared_key().to_public_key()));
    let mut n = 0;
    for it in imported {
        n += 1;
        let m = legacy
            .get(&sha(&it.plaintext))
            .unwrap_or_else(|| panic!("{} / {:?} was imported", it.applet, it.owner));
        assert_eq!(m.publisher(), node.id(), "signed by this node");
        let ids: Vec<_> = m.chunk_ids().collect();
        let want: Vec<_> = it.chunk_paths.iter().map(hash_of_file).collect();
        assert_eq!(ids, want, "Axon's pieces are the chunks, unchanged");
        assert!(
            node.db().envelope(&m.id(), &kid).unwrap().is_some(),
            "Axon's envelope kept as {kid}"
        );
        assert!(
            node.db()
                .envelope(&m.id(), &node.id().to_hex())
                .unwrap()
                .is_none(),
            "no key for this node without --axon-key"
        );
        assert!(node.db().is_complete(&m.id()).unwrap());
    }
    assert_eq!(manifests(&node).len(), n, "nothing else was imported");
    // No piece of a skipped item was stored, not even its good ones.
    let stored: Vec<_> = node
        .db()
        .chunk_list()
        .unwrap()
        .into_iter()
        .map(|(c, _)| c)
        .collect();
    assert!(!stored.contains(&hash_of_file(&chess.chunk_paths[0])));
    assert!(!stored.contains(&hash_of_file(&w.item("tiny", Some("bob")).chunk_paths[1])));
    // Legacy items are listed, verified and backed up like any other.
    let ls = ok(command(home)
        .arg("--data-dir")
        .arg(&data)
        .args(["ls", "--json"]));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&ls.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        n
    );
    ok(command(home).arg("--data-dir").arg(&data).arg("verify"));
    let repo = tmp.path().join("repo");
    ok(command(home)
        .arg("--data-dir")
        .arg(&data)
        .args(["backup", "--repo"])
        .arg(&repo));
    ok(command(home)
        .args(["backup", "verify", "--repo"])
        .arg(&repo));

    // Idempotent: a second run stores nothing new.
    let head = node.db().head_seq().unwrap();
    drop(node);
    let r2 = import(home, &data, &dir, None);
    assert_eq!(r2.code, 5, "{r2:?}");
    assert!(
        r2.stderr
            .contains(&format!("{n} imported ({n} already here)")),
        "{r2:?}"
    );
    let node = open(&data);
    assert_eq!(node.db().head_seq().unwrap(), head);
    assert_eq!(manifests(&node).len(), n);
}

/// With the Axon key: every complete item is decrypted, checked and
/// re-published natively, and its legacy form gets a key for this node.
#[test]
fn with_key_republishes_natively_and_legacy_items_open() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let dir = tmp.path().join("backup");
    let w = fixture(&dir);
    let key_pem = tmp.path().join("axon.pem");
    write_key(&key_pem, &shared_key(), false);
    // One damaged piece, repaired later.
    let carol = w.item(CHESS, Some("carol"));
    let good = fs::read(&carol.chunk_paths[0]).unwrap();
    corrupt_piece(&carol.chunk_paths[0]);

    let data = tmp.path().join("node");
    init_node(&data, 65536);
    let r = import(home, &data, &dir, Some(&key_pem));
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.text().contains("data of carol") && r.text().contains("CORRUPT"),
        "{r:?}"
    );
    let node = open(&data);
    let legacy = legacy_by_hash(&node);
    let complete: Vec<_> = w
        .items
        .iter()
        .filter(|i| !(i.applet == CHESS && i.owner.as_deref() == Some("carol")))
        .collect();
    assert_eq!(legacy.len(), complete.len());
    let natives: Vec<Manifest> = manifests(&node)
        .into_iter()
        .filter(|m| m.body().cipher() == Cipher::Aes256GcmChunked)
        .collect();
    assert_eq!(natives.len(), complete.len());
    for it in &complete {
        let m = &legacy[&sha(&it.plaintext)];
        assert_eq!(
            m.body().size,
            it.plaintext.len() as u64,
            "exact size with the key"
        );
        assert_eq!(
            get(&node, &m.id()),
            it.plaintext,
            "`get` works on the legacy item"
        );
        let native = node
            .db()
            .setting(&format!("axon_import.native.{}", m.id()))
            .unwrap()
            .expect("native recorded");
        let native = bitsync::crypto::Hash::parse(&native, "id").unwrap();
        assert_eq!(get(&node, &native), it.plaintext, "the native copy");
        let meta =
            bitsync::content::item_meta(&node, &node.db().manifest(&native).unwrap().unwrap().0)
                .unwrap();
        assert!(meta.name.starts_with(&it.applet), "{}", meta.name);
    }
    let head = node.db().head_seq().unwrap();
    let count = manifests(&node).len();
    drop(node);

    // Re-running changes nothing.
    let r = import(home, &data, &dir, Some(&key_pem));
    assert_eq!(r.code, 5, "{r:?}");
    let node = open(&data);
    assert_eq!(
        (node.db().head_seq().unwrap(), manifests(&node).len()),
        (head, count)
    );
    drop(node);

    // Repaired: the next run imports just that item (a PKCS#1 key file works too), and succeeds.
    fs::write(&carol.chunk_paths[0], &good).unwrap();
    let pkcs1 = tmp.path().join("axon-rsa.pem");
    write_key(&pkcs1, &shared_key(), true);
    let r = import(home, &data, &dir, Some(&pkcs1));
    assert_eq!(r.code, 0, "{r:?}");
    let node = open(&data);
    assert_eq!(
        manifests(&node).len(),
        count + 2,
        "carol's legacy and native items"
    );
    let m = &legacy_by_hash(&node)[&sha(&carol.plaintext)];
    assert_eq!(get(&node, &m.id()), carol.plaintext);
    ok(command(home).arg("--data-dir").arg(&data).arg("verify"));
}

/// A key the items were not encrypted to: kept as legacy, said so, no native copies.
#[test]
fn a_key_of_another_instance_is_reported_and_items_kept_legacy() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let dir = tmp.path().join("backup");
    let w = tiny_backup(&dir, 700);
    let wrong = tmp.path().join("other.pem");
    write_key(&wrong, &other_key(), false);
    let data = tmp.path().join("node");
    init_node(&data, 65536);
    let r = import(home, &data, &dir, Some(&wrong));
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.text().matches("note: not decrypted").count(), 2, "{r:?}");
    let node = open(&data);
    let all = manifests(&node);
    assert_eq!(all.len(), w.items.len());
    assert!(all
        .iter()
        .all(|m| m.body().cipher() == Cipher::AxonAes256Cbc));
}

/// Not an Axon backup, an unreadable key: refused, nothing written.
#[test]
fn bad_input_is_refused() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let data = tmp.path().join("node");
    init_node(&data, 65536);
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let r = import(home, &data, &empty, None);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("backup_manifest.json"), "{r:?}");
    fs::write(empty.join("backup_manifest.json"), b"{not json").unwrap();
    let r = import(home, &data, &empty, None);
    assert_eq!(r.code, 2, "{r:?}");
    assert_eq!(r.stderr.trim().lines().count(), 1, "{r:?}");

    let dir = tmp.path().join("backup");
    Builder::new().applet("tiny", 100).write(&dir);
    let junk_key = tmp.path().join("junk.pem");
    fs::write(
        &junk_key,
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let r = import(home, &data, &dir, Some(&junk_key));
    assert_eq!(r.code, 2, "{r:?}");
    let r = import(home, &data, &dir, Some(&tmp.path().join("absent.pem")));
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(
        open(&data).db().head_seq().unwrap(),
        0,
        "nothing was imported"
    );
}

/// Legacy items imported with the key are served: a peer that clones this
/// node gets them (re-keyed for it) and reads them back.
#[test]
fn legacy_items_imported_with_the_key_reach_a_cloning_peer() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let dir = tmp.path().join("backup");
    let w = tiny_backup(&dir, 300_000);
    let key_pem = tmp.path().join("axon.pem");
    write_key(&key_pem, &shared_key(), false);
    let a = tmp.path().join("a");
    init_node(&a, 65536);
    let r = import(home, &a, &dir, Some(&key_pem));
    assert_eq!(r.code, 0, "{r:?}");
    let legacy: Vec<_> = legacy_by_hash(&open(&a))
        .into_values()
        .map(|m| m.id())
        .collect();
    assert_eq!(legacy.len(), 2);

    let serve = Serve::start(&a);
    let token = serve.invite_for("10m");
    let b = tmp.path().join("b");
    ok(command(home)
        .arg("--data-dir")
        .arg(&b)
        .args(["clone", &token]));
    let nb = open(&b);
    for id in &legacy {
        let (m, _) = nb
            .db()
            .manifest(id)
            .unwrap()
            .expect("the legacy item was replicated");
        assert_eq!(m.body().cipher(), Cipher::AxonAes256Cbc);
        let plain = get(&nb, id);
        assert!(
            w.items.iter().any(|i| i.plaintext == plain),
            "the peer reads the legacy item"
        );
    }
}

/// All a run printed, stdout and stderr.
fn said(r: &Out) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&r.stdout), r.stderr)
}

/// Item ids a node holds content for (legacy and native), to see what was imported.
fn applets_imported(node: &Node) -> usize {
    manifests(node).len()
}

/// A FIFO where a piece or a JSON file should be: refused at once (opening
/// it without O_NONBLOCK waited forever for a writer), the rest imported.
#[test]
fn a_fifo_in_the_backup_is_refused_without_hanging() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let data = tmp.path().join("node");
    init_node(&data, 65536);
    let dir = tmp.path().join("backup");
    let w = Builder::new()
        .applet("tiny", 1000)
        .applet("other", 2000)
        .write(&dir);
    crate::support::axon_fixture::make_fifo(&w.item("tiny", None).chunk_paths[0]);
    let r = import_promptly(home, &data, &dir);
    assert_eq!(r.code, 5, "one item not imported: {r:?}");
    let text = said(&r);
    assert!(text.contains("FIFO"), "{text}");
    assert_eq!(
        applets_imported(&open(&data)),
        1,
        "the other applet is imported"
    );

    // A FIFO as metadata.json: the whole backup is refused, promptly.
    crate::support::axon_fixture::make_fifo(&w.metadata_path("other"));
    let r = import_promptly(home, &data, &dir);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(
        r.stderr.contains("metadata.json") && r.stderr.contains("FIFO"),
        "{r:?}"
    );
}

/// Symbolic links leading out of the backup, to a file (a piece) and to a
/// folder (a user's data_chunks/): refused; nothing of the outside is stored,
/// even where it is exactly the piece the manifest names, and the outside
/// file's size appears nowhere in what the command says.
#[test]
fn symlinks_out_of_the_backup_are_refused_and_nothing_outside_is_stored() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let data = tmp.path().join("node");
    init_node(&data, 65536);
    let dir = tmp.path().join("backup");
    let w = Builder::new()
        .applet("tiny", 1000)
        .applet("other", 2000)
        .data("other", "carol", 5000)
        .write(&dir);
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();
    // A secret of a size that would be easy to spot in a message.
    let secret = outside.join("secret");
    fs::write(&secret, crate::support::data(9, 12_345)).unwrap();
    crate::support::axon_fixture::make_symlink(&secret, &w.item("tiny", None).chunk_paths[0]);
    // carol's genuine pieces, moved out and linked back as a folder.
    let carol = &w.item("other", Some("carol")).chunk_paths;
    let carol_dir = carol[0].parent().unwrap().to_path_buf();
    let moved = outside.join("carol");
    fs::create_dir(&moved).unwrap();
    let mut carol_ids = Vec::new();
    for p in carol {
        carol_ids.push(hash_of_file(p));
        fs::copy(p, moved.join(p.file_name().unwrap())).unwrap();
    }
    crate::support::axon_fixture::make_symlink(&moved, &carol_dir);

    let key = tmp.path().join("axon.pem");
    fs::write(&key, w.key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
    let r = import(home, &data, &dir, Some(&key));
    assert_eq!(r.code, 5, "two items not imported: {r:?}");
    let text = said(&r);
    assert!(text.contains("symbolic link"), "{text}");
    assert!(
        !text.contains("12345") && !text.contains("12,345"),
        "size leaked: {text}"
    );
    let secret_id = hash_of_file(&secret);
    for id in carol_ids.iter().chain([&secret_id]) {
        assert!(
            !chunk_file(&data.join("chunks"), id).exists(),
            "an outside file was stored as chunk {id}"
        );
    }
    // Only "other"'s code: legacy and native.
    assert_eq!(applets_imported(&open(&data)), 2, "{text}");
}

/// A 300 MB metadata.json (sparse, so the test writes nothing) is refused
/// unread, naming the limit; so is an oversize applet_data.json.
#[test]
fn oversize_json_files_are_refused_unread() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let data = tmp.path().join("node");
    init_node(&data, 65536);
    let dir = tmp.path().join("backup");
    let w = Builder::new()
        .applet("tiny", 1000)
        .data("tiny", "alice", 100)
        .write(&dir);
    let big = fs::OpenOptions::new()
        .write(true)
        .open(w.applet_data_path("tiny"))
        .unwrap();
    big.set_len(100 << 20).unwrap();
    let r = import_promptly(home, &data, &dir);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("applet_data.json") && r.stderr.contains("refused unread"),
        "{r:?}"
    );
    let md = fs::OpenOptions::new()
        .write(true)
        .open(w.metadata_path("tiny"))
        .unwrap();
    md.set_len(300 << 20).unwrap();
    let t = std::time::Instant::now();
    let r = import_promptly(home, &data, &dir);
    assert_eq!(r.code, 2, "{r:?}");
    assert!(
        r.stderr.contains("metadata.json")
            && r.stderr.contains("314572800 bytes, more than the 16777216"),
        "{r:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(20));
    assert_eq!(open(&data).db().head_seq().unwrap(), 0, "nothing imported");
}

/// A chunk_size of 2^32 − 1 (Axon writes 262144): that item is refused before
/// a piece is read, naming the limit; the other items are imported.
#[test]
fn a_huge_chunk_size_is_refused_for_its_item() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let data = tmp.path().join("node");
    init_node(&data, 65536);
    let dir = tmp.path().join("backup");
    let w = Builder::new()
        .applet("tiny", 1000)
        .applet("other", 2000)
        .write(&dir);
    crate::support::axon_fixture::edit_json(&w.metadata_path("tiny"), |v| {
        v["code_manifest"]["chunk_size"] = serde_json::json!(u32::MAX);
    });
    let key = tmp.path().join("axon.pem");
    fs::write(&key, w.key.to_pkcs8_pem(LineEnding::LF).unwrap().as_bytes()).unwrap();
    let r = import(home, &data, &dir, Some(&key));
    assert_eq!(r.code, 5, "{r:?}");
    let text = said(&r);
    assert!(
        text.contains("chunk_size is 4294967295 bytes, more than the 16777216"),
        "{text}"
    );
    assert_eq!(
        applets_imported(&open(&data)),
        2,
        "other: legacy and native"
    );
}

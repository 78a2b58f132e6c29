//! `bitsync backup`, `backup verify`, `backup ls` and `restore`: the real
//! binary on real data dirs and repositories in temp directories.
//!
//! Exit codes (src/error.rs): 2 invalid, 3 not found, 4 exists, 5 integrity,
//! 6 auth, 9 exhausted.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{self, *};
use bitsync::crypto::{ContentId, Hash};
use tempfile::TempDir;

fn backup_cmd(home: &Path, data: &Path, repo: &Path) -> std::process::Command {
    let mut c = command(home);
    c.arg("--data-dir")
        .arg(data)
        .args(["backup", "--repo"])
        .arg(repo);
    c
}

/// `backup verify --repo <repo>`.
fn verify_cmd(home: &Path, repo: &Path) -> std::process::Command {
    let mut c = command(home);
    c.args(["backup", "verify", "--repo"]).arg(repo);
    c
}

/// `restore --repo <repo>` into the data dir `dest` (no passphrase given).
fn restore_cmd(home: &Path, dest: &Path, repo: &Path) -> std::process::Command {
    let mut c = command(home);
    c.arg("--data-dir")
        .arg(dest)
        .args(["restore", "--repo"])
        .arg(repo);
    c
}

/// The ids of snapshots in a repository, oldest first (via `backup ls --json`).
fn snapshots(home: &Path, repo: &Path) -> Vec<String> {
    let r = ok(command(home)
        .args(["backup", "ls", "--json", "--repo"])
        .arg(repo));
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).expect("json");
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

fn snapshot_json(repo: &Path, id: &str) -> serde_json::Value {
    serde_json::from_slice(
        &fs::read(repo.join("snapshots").join(id).join("snapshot.json")).unwrap(),
    )
    .unwrap()
}

/// A backup taken while another thread keeps publishing items restores to a
/// consistent node whose every item reads back byte for byte.
#[test]
fn backup_while_writing_then_verify_and_restore() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let data = tmp.path().join("node");
    let repo = tmp.path().join("repo");
    let node = init_node(&data, 16 * 1024);
    let mut originals: BTreeMap<ContentId, Vec<u8>> = BTreeMap::new();
    for i in 0..3 {
        let b = support::data(i, 40_000 + i as usize * 1000);
        originals.insert(put(&node, &format!("seed-{i}"), &b), b);
    }
    drop(node);

    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    type Log = Arc<Mutex<Vec<(ContentId, Vec<u8>)>>>;
    let log: Log = Arc::default();
    let writer = {
        let (stop, written, log, data) = (stop.clone(), written.clone(), log.clone(), data.clone());
        std::thread::spawn(move || {
            let node = open(&data);
            let mut i = 100u64;
            while !stop.load(Ordering::Relaxed) {
                let b = support::data(i, 20_000 + (i as usize * 7919) % 60_000);
                let id = put(&node, &format!("live-{i}"), &b);
                log.lock().unwrap().push((id, b));
                written.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), || written.load(Ordering::SeqCst)
            >= 3),
        "writer never started"
    );
    let mut grew_during_a_backup = false;
    for _ in 0..2 {
        let before = written.load(Ordering::SeqCst);
        ok(backup_cmd(home, &data, &repo)
            .arg("--with-identity")
            .env("BITSYNC_PASSPHRASE", PASS));
        grew_during_a_backup |= written.load(Ordering::SeqCst) > before;
    }
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        grew_during_a_backup,
        "the writer should have published items while a backup ran"
    );
    for (id, b) in log.lock().unwrap().drain(..) {
        originals.insert(id, b);
    }

    let v = ok(&mut verify_cmd(home, &repo));
    assert!(v.stderr.contains("0 problem(s)"), "{v:?}");

    let restored = tmp.path().join("restored");
    let r = ok(restore_cmd(home, &restored, &repo).env("BITSYNC_PASSPHRASE", PASS));
    let src = open(&data);
    assert_eq!(
        r.last_line(),
        src.id().to_hex(),
        "same identity restore keeps the node id"
    );
    // The restored node is self-consistent: every chunk re-hashed, every item complete.
    ok(command(home).arg("--data-dir").arg(&restored).arg("verify"));
    let dst = open(&restored);
    let ids = dst.db().content_ids().unwrap();
    let latest = snapshots(home, &repo).pop().unwrap();
    assert_eq!(
        ids.len() as u64,
        snapshot_json(&repo, &latest)["counts"]["manifests"]
            .as_u64()
            .unwrap()
    );
    assert!(
        ids.len() >= 3 + 3,
        "the snapshot holds the seed items and some written during the backups"
    );
    for id in &ids {
        let want = originals
            .get(id)
            .unwrap_or_else(|| panic!("restored item {id} was never written"));
        assert_eq!(&get(&dst, id), want, "item {id} differs after restore");
        assert_eq!(get(&src, id), get(&dst, id));
    }
}

/// Re-runs copy only new chunks: count the files in the repository.
#[test]
fn second_backup_adds_only_new_chunks() {
    let tmp = TempDir::new().unwrap();
    let (home, data, repo) = (tmp.path(), tmp.path().join("node"), tmp.path().join("repo"));
    let node = init_node(&data, 4096);
    for i in 0..4 {
        put(&node, &format!("f{i}"), &support::data(i, 10_000));
    }
    let chunks_in_node = node.db().chunk_list().unwrap().len();
    ok(&mut backup_cmd(home, &data, &repo));
    assert_eq!(count_files(&repo.join("chunks")), chunks_in_node);

    let r = ok(&mut backup_cmd(home, &data, &repo));
    assert_eq!(
        count_files(&repo.join("chunks")),
        chunks_in_node,
        "an unchanged instance adds no chunk"
    );
    assert!(r.stderr.contains(" 0 new chunks"), "{r:?}");

    // 3 × 4096 + 100 bytes → 4 chunks.
    put(&node, "new", &support::data(99, 3 * 4096 + 100));
    let r = ok(&mut backup_cmd(home, &data, &repo));
    assert_eq!(
        count_files(&repo.join("chunks")),
        chunks_in_node + 4,
        "exactly the new item's chunks"
    );
    assert!(r.stderr.contains(" 4 new chunks"), "{r:?}");
    let ids = snapshots(home, &repo);
    assert_eq!(ids.len(), 3);
    assert_eq!(
        snapshot_json(&repo, &ids[2])["chunks"]
            .as_array()
            .unwrap()
            .len(),
        chunks_in_node + 4
    );
    // Each snapshot's own files: the database and config, never the chunks again.
    assert_eq!(count_files(&repo.join("snapshots")), 3 * 3);
    ok(&mut verify_cmd(home, &repo));
}

/// --keep-last removes old snapshots, then only chunks no remaining snapshot lists.
#[test]
fn keep_last_keeps_what_remaining_snapshots_need() {
    let tmp = TempDir::new().unwrap();
    let (home, repo) = (tmp.path(), tmp.path().join("repo"));
    // Node A's chunks are needed only by the first snapshot.
    let a_dir = tmp.path().join("a");
    let a = init_node(&a_dir, 4096);
    put(&a, "a", &support::data(1, 30_000));
    let a_chunks = a.db().chunk_list().unwrap();
    ok(&mut backup_cmd(home, &a_dir, &repo));

    let b_dir = tmp.path().join("b");
    let b = init_node(&b_dir, 4096);
    put(&b, "b1", &support::data(2, 20_000));
    ok(&mut backup_cmd(home, &b_dir, &repo));
    put(&b, "b2", &support::data(3, 20_000));
    ok(&mut backup_cmd(home, &b_dir, &repo));
    assert_eq!(snapshots(home, &repo).len(), 3);
    put(&b, "b3", &support::data(4, 20_000));
    let r = ok(backup_cmd(home, &b_dir, &repo).args(["--keep-last", "2"]));
    assert!(r.stderr.contains("pruned 2 snapshot(s)"), "{r:?}");

    let left = snapshots(home, &repo);
    assert_eq!(left.len(), 2);
    for id in &left {
        assert_eq!(
            snapshot_json(&repo, id)["node_id"].as_str().unwrap(),
            b.id().to_hex()
        );
    }
    for (c, _) in &a_chunks {
        assert!(
            !chunk_file(&repo.join("chunks"), c).exists(),
            "chunk {c} of the pruned snapshot is gone"
        );
    }
    let b_chunks = b.db().chunk_list().unwrap();
    assert_eq!(
        count_files(&repo.join("chunks")),
        b_chunks.len(),
        "nothing else was removed or kept"
    );
    let v = ok(&mut verify_cmd(home, &repo));
    assert!(v.stderr.contains("checked 2 snapshot(s)"), "{v:?}");
    assert!(
        run(backup_cmd(home, &b_dir, &repo).args(["--keep-last", "0"])).code == 2,
        "--keep-last 0 is a usage error"
    );
}

/// `restore --new-identity`: a new key, every item re-wrapped and readable,
/// the old node's envelopes gone, seqs bumped, peers to re-trust listed.
#[test]
fn restore_with_new_identity_reads_every_item() {
    let tmp = TempDir::new().unwrap();
    let (home, data, repo) = (tmp.path(), tmp.path().join("node"), tmp.path().join("repo"));
    let node = init_node(&data, 8192);
    let mut items = BTreeMap::new();
    for i in 0..5 {
        let b = support::data(i + 10, 5_000 + i as usize * 9_000);
        items.insert(put(&node, &format!("n{i}"), &b), b);
    }
    let peer = Hash::of(b"some peer");
    node.db()
        .upsert_peer(
            &peer,
            "alice",
            "127.0.0.1:7777",
            bitsync::store::PeerState::Trusted,
            false,
        )
        .unwrap();
    let old_id = node.id();
    let old_head = node.db().head_seq().unwrap();
    drop(node);

    // Without --with-identity there is no key to unwrap with: refused, nothing written.
    ok(&mut backup_cmd(home, &data, &repo));
    let r = run(restore_cmd(home, &tmp.path().join("x"), &repo)
        .arg("--new-identity")
        .env("BITSYNC_PASSPHRASE", PASS));
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("taken with --with-identity"), "{r:?}");
    assert!(!tmp.path().join("x").exists());
    // Naming that snapshot explicitly: the same refusal.
    let plain = snapshots(home, &repo).pop().unwrap();
    let r = run(restore_cmd(home, &tmp.path().join("x"), &repo)
        .args(["--snapshot", &plain])
        .env("BITSYNC_PASSPHRASE", PASS));
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains("without --with-identity"), "{r:?}");
    assert!(!tmp.path().join("x").exists());

    ok(backup_cmd(home, &data, &repo)
        .arg("--with-identity")
        .env("BITSYNC_PASSPHRASE", PASS));
    // A newer snapshot without the key: restore still finds the one with it.
    ok(&mut backup_cmd(home, &data, &repo));
    let restored = tmp.path().join("restored");
    let r = ok(restore_cmd(home, &restored, &repo)
        .arg("--new-identity")
        .env("BITSYNC_PASSPHRASE", PASS));
    let new_id = Hash::parse(&r.last_line(), "node id").unwrap();
    assert_ne!(new_id, old_id);
    assert!(
        r.stderr.contains(&peer.to_hex()) && r.stderr.contains("alice"),
        "names the peer to re-trust: {r:?}"
    );
    assert!(
        r.stderr.contains(&format!("bitsync peer add {new_id}")),
        "{r:?}"
    );

    let n = open(&restored);
    assert_eq!(n.id(), new_id);
    assert_eq!(n.db().setting("node_id").unwrap().unwrap(), new_id.to_hex());
    assert_eq!(
        n.db().head_seq().unwrap(),
        old_head + items.len() as u64,
        "each re-keyed item took a new seq"
    );
    for s in n.db().list_after(0, 100).unwrap() {
        assert!(s.seq > old_head);
    }
    for (id, want) in &items {
        assert_eq!(&get(&n, id), want);
        assert!(
            n.db().envelope(id, &old_id.to_hex()).unwrap().is_none(),
            "old node's envelope dropped"
        );
        assert!(n.db().envelope(id, &new_id.to_hex()).unwrap().is_some());
    }
    // The new key was written unsealed like the original's, mode 0600.
    use std::os::unix::fs::PermissionsExt;
    let key = restored.join("node.key");
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(fs::read_to_string(&key)
        .unwrap()
        .contains("BEGIN PRIVATE KEY"));
    // The original is untouched.
    assert_eq!(open(&data).db().head_seq().unwrap(), old_head);
}

/// A flipped byte anywhere a snapshot needs is found and named; restore refuses.
#[test]
fn verify_names_damaged_and_missing_files() {
    let tmp = TempDir::new().unwrap();
    let (home, data, repo) = (tmp.path(), tmp.path().join("node"), tmp.path().join("repo"));
    let node = init_node(&data, 4096);
    put(&node, "x", &support::data(5, 20_000));
    ok(backup_cmd(home, &data, &repo)
        .arg("--with-identity")
        .env("BITSYNC_PASSPHRASE", PASS));
    let snap = snapshots(home, &repo).pop().unwrap();
    let chunks = node.db().chunk_list().unwrap();

    // 1. A chunk.
    let c = chunk_file(&repo.join("chunks"), &chunks[1].0);
    flip_byte(&c, 100);
    let r = run(&mut verify_cmd(home, &repo));
    assert_eq!(r.code, 5, "{r:?}");
    let rel = format!(
        "chunks/{}/{}",
        &chunks[1].0.to_hex()[..2],
        chunks[1].0.to_hex()
    );
    assert!(
        r.text().contains(&rel) && r.text().contains("damaged"),
        "{r:?}"
    );
    assert_eq!(r.text().lines().count(), 1, "exactly one problem: {r:?}");
    // Restore stops before the data dir appears.
    let dest = tmp.path().join("dest");
    let rr = run(restore_cmd(home, &dest, &repo).env("BITSYNC_PASSPHRASE", PASS));
    assert_eq!(rr.code, 5, "{rr:?}");
    assert!(!dest.exists(), "nothing left at the destination");
    assert!(fs::read_dir(tmp.path()).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("restore")));
    flip_byte(&c, 100); // repaired

    // 2. The database copy: hash mismatch named.
    let db = repo.join("snapshots").join(&snap).join("bitsync.db");
    flip_byte(&db, 5000);
    let r = run(&mut verify_cmd(home, &repo));
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.text()
            .contains(&format!("snapshots/{snap}/bitsync.db: damaged")),
        "{r:?}"
    );
    flip_byte(&db, 5000);

    // 3. A missing file.
    fs::remove_file(repo.join("snapshots").join(&snap).join("config.toml")).unwrap();
    fs::remove_file(&c).unwrap();
    let r = run(verify_cmd(home, &repo).args(["--snapshot", &snap[..10]]));
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.text()
            .contains(&format!("snapshots/{snap}/config.toml: missing")),
        "{r:?}"
    );
    assert!(r.text().contains(&format!("{rel}: missing")), "{r:?}");
    let rr = run(restore_cmd(home, &dest, &repo).env("BITSYNC_PASSPHRASE", PASS));
    assert_eq!(rr.code, 5, "{rr:?}");
    assert!(rr.stderr.contains("config.toml: missing"), "{rr:?}");
    assert!(!dest.exists());
}

/// `kill -9` in the middle of a backup: earlier snapshots still verify, the
/// half-made one is invisible, and the next backup succeeds.
///
/// To stop the backup at a known point, one chunk file of the data dir is
/// swapped for a FIFO: opening it blocks (like a very slow disk), so the
/// backup is certainly mid-copy, with every other chunk copied, when killed.
#[test]
fn killed_backup_leaves_the_repository_valid() {
    let tmp = TempDir::new().unwrap();
    let (home, data, repo) = (tmp.path(), tmp.path().join("node"), tmp.path().join("repo"));
    let node = init_node(&data, 4096);
    put(&node, "first", &support::data(1, 10_000));
    ok(&mut backup_cmd(home, &data, &repo));
    let first = snapshots(home, &repo);
    let first_chunks: Vec<_> = node.db().chunk_list().unwrap();
    for i in 0..3 {
        put(&node, &format!("more{i}"), &support::data(50 + i, 200_000));
    }
    let all = node.db().chunk_list().unwrap();
    let total = all.len();
    let stuck = all
        .iter()
        .map(|(c, _)| *c)
        .find(|c| !first_chunks.iter().any(|(f, _)| f == c))
        .unwrap();
    let stuck_path = chunk_file(&data.join("chunks"), &stuck);
    let aside = tmp.path().join("stuck.chunk");
    fs::rename(&stuck_path, &aside).unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(&stuck_path)
        .status()
        .unwrap();
    assert!(st.success());

    let mut child = backup_cmd(home, &data, &repo)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let blocked = wait_until(Duration::from_secs(60), || {
        count_files(&repo.join("chunks")) == total - 1
    });
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    fs::remove_file(&stuck_path).unwrap();
    fs::rename(&aside, &stuck_path).unwrap();
    assert!(
        blocked && still_running,
        "the backup should have copied all chunks but one and be waiting"
    );
    assert_eq!(status.signal(), Some(9));

    assert_eq!(
        snapshots(home, &repo),
        first,
        "no half-made snapshot is visible"
    );
    let v = ok(&mut verify_cmd(home, &repo));
    assert!(v.stderr.contains("checked 1 snapshot(s)"), "{v:?}");
    assert!(
        count_files(&repo.join("tmp")) > 0,
        "the killed run's staging is under tmp/"
    );

    let r = ok(&mut backup_cmd(home, &data, &repo));
    assert!(
        r.stderr.contains(" 1 new chunks"),
        "only the missing chunk is copied on the next run: {r:?}"
    );
    assert_eq!(snapshots(home, &repo).len(), 2);
    assert_eq!(
        count_files(&repo.join("tmp")),
        0,
        "the next run cleared the leftovers"
    );
    assert_eq!(count_files(&repo.join("chunks")), total);
    ok(&mut verify_cmd(home, &repo));
}

/// Bad input: clear one-line errors, distinct exit codes, nothing written.
#[test]
fn bad_input_is_refused_without_writing() {
    let tmp = TempDir::new().unwrap();
    let (home, data, repo) = (tmp.path(), tmp.path().join("node"), tmp.path().join("repo"));
    let node = init_node(&data, 4096);
    put(&node, "x", &support::data(7, 9_000));

    // A directory that is not a repository.
    let junk = tmp.path().join("junk");
    fs::create_dir(&junk).unwrap();
    fs::write(junk.join("notes.txt"), b"mine").unwrap();
    let r = run(&mut backup_cmd(home, &data, &junk));
    assert_eq!(r.code, 4, "{r:?}");
    assert!(
        r.stderr.contains("is not a bitsync backup repository"),
        "{r:?}"
    );
    assert_eq!(tree(&junk), vec![("notes.txt".into(), b"mine".to_vec())]);
    let r = run(&mut verify_cmd(home, &junk));
    assert_eq!(r.code, 3, "{r:?}");
    let r = run(&mut verify_cmd(home, &tmp.path().join("nowhere")));
    assert_eq!(r.code, 3, "{r:?}");
    assert!(!tmp.path().join("nowhere").exists());

    // Backing up something that is not a data dir.
    let r = run(&mut backup_cmd(home, &tmp.path().join("nonode"), &repo));
    assert_eq!(r.code, 3, "{r:?}");
    assert!(
        !repo.exists(),
        "no repository is created for a failed backup"
    );

    // A wrong passphrase: nothing written.
    ok(backup_cmd(home, &data, &repo)
        .arg("--with-identity")
        .env("BITSYNC_PASSPHRASE", PASS));
    let dest = tmp.path().join("dest");
    let r = run(restore_cmd(home, &dest, &repo).env("BITSYNC_PASSPHRASE", "wrong"));
    assert_eq!(r.code, 6, "{r:?}");
    assert!(r.stderr.contains("wrong passphrase"), "{r:?}");
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {r:?}");
    assert!(!dest.exists());
    // No passphrase and no terminal.
    let r = run(&mut restore_cmd(home, &dest, &repo));
    assert_eq!(r.code, 6, "{r:?}");
    assert!(r.stderr.contains("BITSYNC_PASSPHRASE"), "{r:?}");
    assert!(!dest.exists());

    // A destination that is not empty.
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("keep"), b"k").unwrap();
    let r = run(restore_cmd(home, &dest, &repo).env("BITSYNC_PASSPHRASE", PASS));
    assert_eq!(r.code, 4, "{r:?}");
    assert_eq!(tree(&dest), vec![("keep".into(), b"k".to_vec())]);
    // An empty destination directory is fine.
    fs::remove_file(dest.join("keep")).unwrap();
    ok(restore_cmd(home, &dest, &repo).env("BITSYNC_PASSPHRASE", PASS));
    ok(command(home).arg("--data-dir").arg(&dest).arg("verify"));

    // An unknown snapshot.
    let r = run(verify_cmd(home, &repo).args(["--snapshot", "1999"]));
    assert_eq!(r.code, 3, "{r:?}");
    // `backup` without --repo is a usage error; `backup verify` without it too.
    assert_eq!(
        run(command(home).arg("--data-dir").arg(&data).arg("backup")).code,
        2
    );
    assert_eq!(run(command(home).args(["backup", "verify"])).code, 2);
}

/// A sealed node key: the backup opens it with the passphrase, and restore
/// writes it back sealed.
#[test]
fn sealed_node_key_round_trips_sealed() {
    let tmp = TempDir::new().unwrap();
    let (home, data, repo) = (tmp.path(), tmp.path().join("node"), tmp.path().join("repo"));
    ok(command(home)
        .arg("--data-dir")
        .arg(&data)
        .args(["init", "--seal"])
        .env("BITSYNC_PASSPHRASE", PASS));
    let file = tmp.path().join("in.bin");
    fs::write(&file, support::data(3, 50_000)).unwrap();
    let id = ok(command(home)
        .arg("--data-dir")
        .arg(&data)
        .arg("put")
        .arg(&file)
        .env("BITSYNC_PASSPHRASE", PASS))
    .last_line();
    // A plain backup needs no passphrase at all.
    ok(&mut backup_cmd(home, &data, &repo));
    let r = run(backup_cmd(home, &data, &repo)
        .arg("--with-identity")
        .env("BITSYNC_PASSPHRASE", "not it"));
    assert_eq!(r.code, 6, "{r:?}");
    assert_eq!(snapshots(home, &repo).len(), 1);
    let pf = tmp.path().join("pass.txt");
    fs::write(&pf, format!("{PASS}\n")).unwrap();
    ok(backup_cmd(home, &data, &repo)
        .arg("--with-identity")
        .arg("--passphrase-file")
        .arg(&pf));
    let raw = fs::read(
        repo.join("snapshots")
            .join(snapshots(home, &repo).pop().unwrap())
            .join("node.key.sealed"),
    )
    .unwrap();
    assert!(
        !String::from_utf8_lossy(&raw).contains("BEGIN PRIVATE KEY"),
        "the key is never unsealed in a backup"
    );

    let dest = tmp.path().join("dest");
    ok(restore_cmd(home, &dest, &repo)
        .arg("--passphrase-file")
        .arg(&pf));
    assert!(fs::read_to_string(dest.join("node.key"))
        .unwrap()
        .contains("BITSYNC SEALED KEY"));
    let out = tmp.path().join("out.bin");
    ok(command(home)
        .arg("--data-dir")
        .arg(&dest)
        .args(["get", &id, "-o"])
        .arg(&out)
        .env("BITSYNC_PASSPHRASE", PASS));
    assert_eq!(fs::read(&out).unwrap(), fs::read(&file).unwrap());
}

/// No space left: a repository on a 1 MiB filesystem (tmpfs, in a private
/// mount namespace). The failed backup exits 9 and the earlier snapshot stays
/// valid. Needs `unshare -Urm`; reported as skipped where it is not allowed.
#[test]
fn no_space_left_keeps_earlier_snapshots() {
    let probe = std::process::Command::new("unshare")
        .args(["-Urm", "true"])
        .output();
    if !matches!(probe, Ok(ref o) if o.status.success()) {
        eprintln!("SKIPPED no_space_left_keeps_earlier_snapshots: cannot create a mount namespace here (unshare -Urm)");
        return;
    }
    let tmp = TempDir::new().unwrap();
    let (small, big) = (tmp.path().join("small"), tmp.path().join("big"));
    let s = init_node(&small, 4096);
    put(&s, "s", &support::data(1, 100_000));
    let b = init_node(&big, 65536);
    put(&b, "b", &support::data(2, 3 << 20));
    let mnt = tmp.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let script = format!(
        r#"set -u
mount -t tmpfs -o size=1m tmpfs "{mnt}" || exit 97
B="{bin}"
"$B" --data-dir "{small}" backup --repo "{mnt}/repo" >/dev/null 2>&1; echo "first=$?"
"$B" --data-dir "{big}" backup --repo "{mnt}/repo" >/dev/null 2>"{err}"; echo "second=$?"
"$B" backup verify --repo "{mnt}/repo" >/dev/null 2>&1; echo "verify=$?"
echo "snapshots=$(ls "{mnt}/repo/snapshots" | wc -l)"
"#,
        mnt = mnt.display(),
        bin = BIN,
        small = small.display(),
        big = big.display(),
        err = tmp.path().join("err.txt").display()
    );
    let out = std::process::Command::new("unshare")
        .args(["-Urm", "sh", "-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let err = fs::read_to_string(tmp.path().join("err.txt")).unwrap_or_default();
    assert!(text.contains("first=0"), "{text} {err}");
    assert!(
        text.contains("second=9"),
        "out of space is exit 9: {text} {err}"
    );
    assert!(
        err.contains("No space left") || err.contains("free some space"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(text.contains("verify=0"), "{text}");
    assert!(text.contains("snapshots=1"), "{text}");
}

/// `clone TOKEN --from-backup DIR`: chunks the repository holds come from it
/// (hash-checked: a damaged one is fetched from the peer), the rest and every
/// manifest and envelope over the network.
#[test]
fn clone_from_backup_takes_chunks_locally_and_the_rest_from_the_peer() {
    let tmp = TempDir::new().unwrap();
    let (home, a, repo) = (tmp.path(), tmp.path().join("a"), tmp.path().join("repo"));
    let node = init_node(&a, 16 * 1024);
    let mut items = BTreeMap::new();
    for i in 0..2 {
        let b = support::data(i + 70, 100_000);
        items.insert(put(&node, &format!("old{i}"), &b), b);
    }
    ok(&mut backup_cmd(home, &a, &repo));
    let in_backup = node.db().chunk_list().unwrap();
    let newer = support::data(80, 60_000);
    let z = put(&node, "newer", &newer);
    items.insert(z, newer);
    let (m, _) = node.db().manifest(&z).unwrap().unwrap();
    let z_bytes: u64 = (0..m.chunk_count()).map(|i| m.chunk_len(i)).sum();
    drop(node);
    // One chunk in the repository is damaged: it must come from the peer instead.
    let (bad, bad_size) = in_backup[0];
    flip_byte(&chunk_file(&repo.join("chunks"), &bad), 3);

    // A repository that is not one is refused before anything is created.
    let r = run(command(home)
        .arg("--data-dir")
        .arg(tmp.path().join("b0"))
        .args(["clone", "x", "--from-backup"])
        .arg(tmp.path()));
    assert_eq!(r.code, 3, "{r:?}");
    assert!(!tmp.path().join("b0").exists());

    let serve = Serve::start(&a);
    let token = serve.invite_for("10m");
    let b = tmp.path().join("b");
    let r = ok(command(home)
        .arg("--data-dir")
        .arg(&b)
        .args(["clone", &token, "--from-backup"])
        .arg(&repo));
    let local = format!("{} chunks", in_backup.len() - 1);
    assert!(
        r.stderr.contains(&format!("{local} ("))
            && r.stderr.contains("taken from backup repository"),
        "{r:?}"
    );
    let received: u64 = r
        .text()
        .split(" bytes received")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count: {r:?}"));
    assert_eq!(
        received,
        z_bytes + bad_size,
        "only the new item and the damaged chunk crossed the network"
    );
    let nb = open(&b);
    assert_ne!(nb.id(), open(&a).id());
    for (id, want) in &items {
        assert_eq!(&get(&nb, id), want);
    }
    ok(command(home).arg("--data-dir").arg(&b).arg("verify"));
}

/// A repository with one `--with-identity` snapshot of a node holding an item;
/// returns (home, data dir, repo, snapshot id).
fn repo_with_identity(tmp: &TempDir) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let (home, data, repo) = (tmp.path(), tmp.path().join("node"), tmp.path().join("repo"));
    let node = init_node(&data, 4096);
    put(&node, "x", &support::data(5, 9_000));
    ok(backup_cmd(home, &data, &repo)
        .arg("--with-identity")
        .env("BITSYNC_PASSPHRASE", PASS));
    let id = snapshots(home, &repo).pop().unwrap();
    (data, repo, id)
}

/// Rewrite a snapshot's snapshot.json after `edit`, and re-list every file's
/// SHA-256 and size, as a forger would.
fn forge_snapshot(repo: &Path, id: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let dir = repo.join("snapshots").join(id);
    let mut v = snapshot_json(repo, id);
    edit(&mut v);
    for f in v["files"].as_array_mut().unwrap() {
        let p = dir.join(f["path"].as_str().unwrap());
        if let Ok(bytes) = fs::read(&p) {
            f["size"] = bytes.len().into();
            f["sha256"] = Hash::of(&bytes).to_hex().into();
        }
    }
    fs::write(
        dir.join("snapshot.json"),
        serde_json::to_vec_pretty(&v).unwrap(),
    )
    .unwrap();
}

/// `bitsync restore` as a child with a deadline and at most 4 GiB of address
/// space, so a restore that tries to allocate tens of GiB fails fast.
fn restore_bounded(home: &Path, repo: &Path, dest: &Path) -> Out {
    use std::os::unix::process::CommandExt;
    let mut c = command(home);
    c.arg("--data-dir")
        .arg(dest)
        .args(["restore", "--repo"])
        .arg(repo)
        .env("BITSYNC_PASSPHRASE", PASS);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 4 << 30,
                rlim_max: 4 << 30,
            };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    run_within(&mut c, Duration::from_secs(60))
}

/// A sealed key whose header asks scrypt for 32 GiB (log_n 22, r 64, p 16)
/// or 4 GiB (22, 8, 1): refused at once as damaged data (exit 5), before
/// scrypt runs; nothing restored. (It aborted the process.)
#[test]
fn a_crafted_scrypt_header_is_refused_before_allocating() {
    use base64::Engine;
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let (_data, repo, id) = repo_with_identity(&tmp);
    let key_path = repo.join("snapshots").join(&id).join("node.key.sealed");
    let pem = fs::read_to_string(&key_path).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    for (log_n, r, p) in [(22u8, 64u32, 16u32), (22, 8, 1)] {
        let mut d = der.clone();
        d[4] = log_n;
        d[5..9].copy_from_slice(&r.to_be_bytes());
        d[9..13].copy_from_slice(&p.to_be_bytes());
        let enc = base64::engine::general_purpose::STANDARD.encode(&d);
        let mut text = String::from("-----BEGIN BITSYNC SEALED KEY-----\n");
        for line in enc.as_bytes().chunks(64) {
            text.push_str(std::str::from_utf8(line).unwrap());
            text.push('\n');
        }
        text.push_str("-----END BITSYNC SEALED KEY-----\n");
        fs::write(&key_path, text).unwrap();
        forge_snapshot(&repo, &id, |_| {});
        let dest = tmp.path().join(format!("dest-{log_n}-{r}"));
        let t = std::time::Instant::now();
        let out = restore_bounded(home, &repo, &dest);
        assert_eq!(out.code, 5, "{out:?}");
        assert!(out.stderr.contains("scrypt"), "{out:?}");
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
        assert!(!dest.exists());
    }
}

/// `identity.file` naming a file outside the snapshot (absolute, with `..`,
/// or through a symbolic link), here a genuine copy of the sealed key so that
/// the old code restored from it: refused, nothing restored.
#[test]
fn snapshot_paths_are_confined_to_the_repository() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let (_data, repo, id) = repo_with_identity(&tmp);
    let snap = repo.join("snapshots").join(&id);
    let outside = tmp.path().join("elsewhere");
    fs::create_dir(&outside).unwrap();
    let copy = outside.join("node.key.sealed");
    fs::copy(snap.join("node.key.sealed"), &copy).unwrap();
    let original = snapshot_json(&repo, &id);
    let names = [
        copy.display().to_string(),
        "../../../elsewhere/node.key.sealed".to_string(),
    ];
    for (i, name) in names.iter().enumerate() {
        forge_snapshot(&repo, &id, |v| v["identity"]["file"] = name.as_str().into());
        let dest = tmp.path().join(format!("dest{i}"));
        let out = restore_bounded(home, &repo, &dest);
        assert_eq!(out.code, 5, "{name}: {out:?}");
        assert!(
            out.stderr.contains("not a file inside the snapshot"),
            "{out:?}"
        );
        assert!(!dest.exists());
    }
    // The listed name, but a symbolic link to the copy outside.
    fs::write(
        snap.join("snapshot.json"),
        serde_json::to_vec(&original).unwrap(),
    )
    .unwrap();
    fs::remove_file(snap.join("node.key.sealed")).unwrap();
    std::os::unix::fs::symlink(&copy, snap.join("node.key.sealed")).unwrap();
    let dest = tmp.path().join("dest-link");
    let out = restore_bounded(home, &repo, &dest);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("symbolic link"), "{out:?}");
    assert!(!dest.exists());

    // The key back in place; a chunk file that is a link to an outside file:
    // refused, and the outside file's size is not told.
    fs::remove_file(snap.join("node.key.sealed")).unwrap();
    fs::copy(&copy, snap.join("node.key.sealed")).unwrap();
    let chunk = Hash::parse(original["chunks"][0][0].as_str().unwrap(), "chunk").unwrap();
    let chunk_path = chunk_file(&repo.join("chunks"), &chunk);
    let secret = outside.join("secret");
    fs::write(&secret, support::data(1, 12_345)).unwrap();
    fs::remove_file(&chunk_path).unwrap();
    std::os::unix::fs::symlink(&secret, &chunk_path).unwrap();
    let dest = tmp.path().join("dest-chunk");
    let out = restore_bounded(home, &repo, &dest);
    assert_eq!(out.code, 5, "{out:?}");
    assert!(out.stderr.contains("symbolic link"), "{out:?}");
    assert!(!out.stderr.contains("12345"), "size leaked: {out:?}");
    assert!(!dest.exists());
}

/// A data dir or database writable by group or others: every command that
/// opens the node warns on stderr (and still works).
#[test]
fn a_world_writable_data_dir_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("node");
    init_node(&data, 4096);
    let r = ok(bitsync(&data).arg("ls"));
    assert!(!r.stderr.contains("writable by"), "{r:?}");
    fs::set_permissions(&data, fs::Permissions::from_mode(0o777)).unwrap();
    let r = ok(bitsync(&data).arg("ls"));
    assert!(
        r.stderr.contains("data dir is writable by everyone") && r.stderr.contains("chmod go-w"),
        "{r:?}"
    );
    fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).unwrap();
    fs::set_permissions(data.join("bitsync.db"), fs::Permissions::from_mode(0o660)).unwrap();
    let r = ok(bitsync(&data).arg("ls"));
    assert!(
        r.stderr.contains("database is writable by its group"),
        "{r:?}"
    );
}

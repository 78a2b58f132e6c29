//! Chunks in an S3-compatible object store (docs/FORMAT.md §5.2) on a real
//! SeaweedFS: the chunk-store rules on both backends, a clone and a mirror
//! from a disk node into a bucket node and a clone back, a bad object caught
//! and fetched elsewhere, credentials refused at start, the store going away
//! in the middle of a clone, and `chunks migrate` there and back with a
//! kill -9 in the middle. Real `bitsync` processes throughout; the bucket is
//! looked at and altered with an S3 client of the test's own.

use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;

use crate::support::seaweed::{s3, Cluster, Part, S3};
use crate::support::*;

const CHUNK: usize = 65536;

/// Where a test node keeps its chunks.
#[derive(Debug, Clone, Copy)]
enum Store {
    Dir,
    Bucket,
}

/// A node at `dir` with 64 KiB chunks on `store`; the bucket URL for a bucket node.
fn init(dir: &Path, store: Store, name: &str) -> Option<String> {
    let url = match store {
        Store::Dir => {
            ok_at(dir, &["init"]);
            None
        }
        Store::Bucket => {
            let url = s3().url(name);
            s3().init_node(dir, &url, None);
            Some(url)
        }
    };
    set_chunk_size(dir, CHUNK);
    url
}

fn publish(dir: &Path, scratch: &Path, items: &[(String, Vec<u8>)]) -> Vec<String> {
    items
        .iter()
        .map(|(name, d)| {
            let f = scratch.join(name);
            std::fs::write(&f, d).unwrap();
            ok_at(dir, &["put", f.to_str().unwrap()]).last_line()
        })
        .collect()
}

fn items(seed: u64) -> Vec<(String, Vec<u8>)> {
    let sizes = [0, 1, CHUNK - 1, CHUNK, 5 * CHUNK + 7, 300_000];
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("item-{seed}-{i}"), data(seed * 100 + i as u64, n)))
        .collect()
}

/// Every item reads back through `bitsync get` byte for byte.
#[track_caller]
fn assert_items(dir: &Path, ids: &[String], items: &[(String, Vec<u8>)]) {
    for (id, (name, d)) in ids.iter().zip(items) {
        let o = ok_at(dir, &["get", id]);
        assert!(o.stdout == *d, "{name} ({id}) differs on {}", dir.display());
    }
}

/// Chunk `hex` as stored by the node at `dir` (its file, or its object).
fn stored(dir: &Path, url: Option<&str>, hex: &str) -> Option<Vec<u8>> {
    match url {
        None => std::fs::read(dir.join("chunks").join(&hex[..2]).join(hex)).ok(),
        Some(u) => s3().get(&S3::chunk_key(u, hex)),
    }
}

fn quarantined(dir: &Path, url: Option<&str>, hex: &str) -> bool {
    match url {
        None => dir.join("quarantine").join(hex).is_file(),
        Some(u) => s3().get(&S3::quarantine_key(u, hex)).is_some(),
    }
}

/// Flip a byte in the middle of chunk `hex`, behind the node's back.
fn corrupt(dir: &Path, url: Option<&str>, hex: &str) {
    let mut b = stored(dir, url, hex).expect("the chunk is stored");
    let mid = b.len() / 2;
    b[mid] ^= 0x5a;
    match url {
        None => std::fs::write(dir.join("chunks").join(&hex[..2]).join(hex), b).unwrap(),
        Some(u) => s3().put(&S3::chunk_key(u, hex), b),
    }
}

#[test]
fn both_backends_keep_the_chunk_store_rules() {
    for store in [Store::Dir, Store::Bucket] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("n");
        let url = init(&dir, store, "rules");
        let items = items(1);
        let ids = publish(&dir, tmp.path(), &items);
        assert_items(&dir, &ids, &items);
        let o = ok_at(&dir, &["verify"]);
        assert!(o.stderr.contains("0 problem(s)"), "{store:?}: {o:?}");

        // Every recorded chunk is stored whole under its hash, nothing else.
        let recorded = recorded_chunks(&dir);
        for hex in &recorded {
            let b = stored(&dir, url.as_deref(), hex)
                .unwrap_or_else(|| panic!("{store:?}: {hex} missing"));
            assert_eq!(bitsync::crypto::Hash::of(&b).to_hex(), *hex, "{store:?}");
        }
        if let Some(u) = &url {
            assert_eq!(s3().keys(u, "chunks").len(), recorded.len());
            assert!(dir
                .join("chunks")
                .read_dir()
                .unwrap()
                .all(|e| e.unwrap().file_name() == "tmp"));
        }

        // A chunk altered behind the node's back: get fails DATA_LOSS, the
        // chunk is quarantined and forgotten, the item shows incomplete.
        let bad = chunks_of(&dir, &ids[4])[2].clone();
        corrupt(&dir, url.as_deref(), &bad);
        let o = at(&dir, &["get", &ids[4]]);
        assert_eq!(o.code, 5, "{store:?}: {o:?}");
        assert!(o.stderr.contains("quarantine"), "{store:?}: {}", o.stderr);
        assert!(quarantined(&dir, url.as_deref(), &bad), "{store:?}");
        assert!(stored(&dir, url.as_deref(), &bad).is_none(), "{store:?}");
        assert!(!recorded_chunks(&dir).contains(&bad), "{store:?}");
        let listed = ls_json(&dir);
        let item = listed
            .iter()
            .find(|i| i["content_id"] == ids[4].as_str())
            .unwrap();
        assert_eq!(item["complete"], false, "{store:?}: {item}");
        // The other items are untouched.
        assert_items(&dir, &ids[..4], &items[..4]);
    }
}

#[test]
fn clone_and_mirror_from_disk_into_a_bucket_and_clone_from_the_bucket_to_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|n| tmp.path().join(n));
    init(&a, Store::Dir, "a");
    let url = init(&b, Store::Bucket, "clone-b").unwrap();
    let items = items(2);
    let ids = publish(&a, tmp.path(), &items);
    let sa = Serve::start(&a);

    // Disk -> bucket.
    ok_at(&b, &["clone", &sa.invite()]);
    assert_items(&b, &ids, &items);
    ok_at(&b, &["verify"]);
    assert_eq!(s3().keys(&url, "chunks").len(), recorded_chunks(&b).len());
    assert_eq!(recorded_chunks(&b), recorded_chunks(&a));

    // The bucket node serves; status names its store and never its keys.
    let mut sb = Serve::start(&b);
    let status = ok_at(&b, &["status", "--json"]).text();
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["chunk_store"], format!("object store {url}"), "{status}");
    assert!(!status.contains(&s3().secret_key));

    // B mirrors A: a new item on A lands in B's bucket while both run.
    let a_id = ok_at(&a, &["id"]).last_line();
    ok_at(&b, &["peer", "add", &a_id, &sa.addr, "--mirror"]);
    let late = data(77, 3 * CHUNK + 5);
    let late_id = publish(&a, tmp.path(), &[("late".into(), late.clone())]).remove(0);
    wait_for(60, "B to mirror the new item", || {
        ls_json(&b)
            .iter()
            .any(|i| i["content_id"] == late_id.as_str() && i["complete"] == true)
            .then_some(())
    });
    assert_items(&b, std::slice::from_ref(&late_id), &[("late".into(), late)]);
    for hex in chunks_of(&b, &late_id) {
        assert!(
            s3().get(&S3::chunk_key(&url, &hex)).is_some(),
            "{hex} not in the bucket"
        );
    }

    // One of B's objects goes bad behind its back: C, cloning from B, gets
    // DATA_LOSS for it (that item stays incomplete), and fetches it from A.
    let bad = chunks_of(&b, &ids[5])[1].clone();
    corrupt(&b, Some(&url), &bad);
    let o = at(&c, &["clone", &sb.invite()]);
    let complete = |dir: &Path| -> Vec<bool> {
        let l = ls_json(dir);
        ids.iter()
            .map(|id| {
                l.iter()
                    .any(|i| i["content_id"] == id.as_str() && i["complete"] == true)
            })
            .collect()
    };
    assert_eq!(complete(&c), [true, true, true, true, true, false], "{o:?}");
    assert!(
        o.text().contains("DATA_LOSS")
            || o.stderr.contains("DATA_LOSS")
            || o.stderr.contains("hash"),
        "{o:?}"
    );
    assert!(quarantined(&b, Some(&url), &bad));
    ok_at(&c, &["clone", &sa.invite()]);
    assert_items(&c, &ids, &items);
    ok_at(&c, &["verify"]);
    sb.terminate(20);
    let log = std::fs::read_to_string(b.with_extension("serve.log")).unwrap();
    assert!(
        !log.contains(&s3().secret_key),
        "the secret key is in B's log"
    );
}

#[test]
fn bad_settings_fail_at_start_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let b = tmp.path().join("b");
    let url = init(&b, Store::Bucket, "creds").unwrap();
    let creds = tmp.path().join("b.s3-credentials");
    let good = std::fs::read_to_string(&creds).unwrap();

    // Wrong secret: refused when the node opens (exit 6, UNAUTHENTICATED's
    // kind), naming the bucket, never showing a key.
    let wrong = "0123456789wrongwrongwrong";
    std::fs::write(&creds, good.replace(&s3().secret_key, wrong)).unwrap();
    let o = at(&b, &["ls"]);
    assert_eq!(o.code, 6, "{o:?}");
    assert!(
        o.stderr.contains(&url) && o.stderr.contains("refused this node's credentials"),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains(wrong) && !o.stderr.contains(&s3().secret_key));

    // A credentials file others can read is refused before it is read.
    std::fs::write(&creds, &good).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = at(&b, &["ls"]);
    assert_eq!(o.code, 7, "{o:?}");
    assert!(o.stderr.contains("chmod 600"), "{}", o.stderr);
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    ok_at(&b, &["ls"]);

    // A URL that is not a chunk store (a typo) is not silently a new one.
    let cfg = b.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace(&url, &format!("{url}-typo"))).unwrap();
    let o = at(&b, &["ls"]);
    assert_eq!(o.code, 3, "{o:?}");
    assert!(o.stderr.contains("no bitsync chunk store"), "{}", o.stderr);

    // Nothing listens at the endpoint: UNAVAILABLE's exit code, bounded in time.
    std::fs::write(&cfg, text.replace(&s3().endpoint, "http://127.0.0.1:9")).unwrap();
    let t = std::time::Instant::now();
    let o = at(&b, &["ls"]);
    assert_eq!(o.code, 8, "{o:?}");
    assert!(o.stderr.contains("cannot be reached"), "{}", o.stderr);
    assert!(t.elapsed().as_secs() < 60, "took {:?}", t.elapsed());

    // init --chunks refuses a bad URL before it makes anything.
    let o = at(
        &tmp.path().join("x"),
        &["init", "--chunks", "s3://Bad_Bucket/p"],
    );
    assert_eq!(o.code, 2, "{o:?}");
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn the_store_going_away_mid_clone_is_unavailable_and_the_rerun_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let a_id = ok_at(&a, &["init"]).last_line();
    set_chunk_size(&a, CHUNK);
    // B reaches the store through a proxy the test can cut.
    let store = proxy(
        s3().endpoint.trim_start_matches("http://").parse().unwrap(),
        None,
    );
    let url = s3().url("down");
    s3().init_node(&b, &url, Some(&format!("http://{}", store.addr)));
    let b_id = ok_at(&b, &["id"]).last_line();
    let items: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                format!("big-{i}"),
                data(300 + i, 2 * 1024 * 1024 + 100 * i as usize),
            )
        })
        .collect();
    let ids = publish(&a, tmp.path(), &items);
    let total_chunks: usize = ids.iter().map(|id| chunks_of(&a, id).len()).sum();
    let sa = Serve::start(&a);
    // The wire to A runs at 4 MiB/s, so the cut lands mid-transfer.
    let wire = proxy(sa.addr.parse().unwrap(), Some(4 << 20));
    ok_at(&a, &["peer", "add", &b_id, "127.0.0.1:9"]);
    ok_at(&b, &["peer", "add", &a_id, &wire.addr.to_string()]);

    let child = clone_until(&b, &a_id, total_chunks / 3, "a third of the chunks on B");
    store.set_cut(true);
    let cut_at = std::time::Instant::now();
    let out = child.wait_with_output().unwrap();
    eprintln!("the clone ended {:?} after the cut", cut_at.elapsed());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(8),
        "the clone did not end UNAVAILABLE: {stderr}"
    );
    assert!(
        stderr.contains("cannot be reached") && stderr.contains(&url),
        "{stderr}"
    );

    // Nothing half-written counts: every recorded chunk is whole in the bucket.
    let recorded = recorded_chunks(&b);
    assert!(
        recorded.len() < total_chunks,
        "the clone finished before the cut"
    );
    for hex in &recorded {
        let obj = s3()
            .get(&S3::chunk_key(&url, hex))
            .unwrap_or_else(|| panic!("{hex} recorded, not stored"));
        assert_eq!(bitsync::crypto::Hash::of(&obj).to_hex(), *hex);
    }

    // The store is back: the same command finishes the clone.
    store.set_cut(false);
    let before = wire.down.load(Ordering::Relaxed);
    ok_at(&b, &["clone", &a_id]);
    assert_items(&b, &ids, &items);
    ok_at(&b, &["verify"]);
    let resent = wire.down.load(Ordering::Relaxed) - before;
    let total: u64 = items.iter().map(|(_, d)| d.len() as u64).sum();
    assert!(
        resent < total,
        "the re-run fetched {resent} bytes of {total}: it started over"
    );
}

#[test]
fn migrate_to_a_bucket_and_back_resumes_after_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let n = tmp.path().join("n");
    ok_at(&n, &["init"]);
    // Many small chunks, so the kill lands mid-copy.
    set_chunk_size(&n, 4096);
    let items: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                format!("m-{i}"),
                data(700 + i, 1024 * 1024 + 33 * i as usize),
            )
        })
        .collect();
    let ids = publish(&n, tmp.path(), &items);
    let recorded = recorded_chunks(&n);
    let url = s3().url("migrate");
    let cfg = n.join("config.toml");
    let before = std::fs::read_to_string(&cfg).unwrap();

    let mut child = bitsync(&n)
        .args(["chunks", "migrate", "--to", &url])
        .envs(s3().aws_env())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(120, "a fifth of the chunks in the bucket", || {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("the migration ended ({st}) before it could be killed");
        }
        (s3().keys(&url, "chunks").len() >= recorded.len() / 5).then_some(())
    });
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let copied_before = s3().keys(&url, "chunks").len();
    assert!(
        copied_before < recorded.len(),
        "the migration finished before the kill"
    );

    // Killed: the node still runs on its chunk dir, config untouched.
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), before);
    assert_items(&n, &ids[..2], &items[..2]);

    // The re-run copies only what the bucket lacks, then switches.
    let o = run(bitsync(&n)
        .args(["chunks", "migrate", "--to", &url])
        .envs(s3().aws_env()));
    assert_eq!(o.code, 0, "{o:?}");
    let line = o.last_line();
    let already: usize = line
        .split(", ")
        .find_map(|p| p.strip_suffix(" already there; the old store was left as it was"))
        .unwrap_or_else(|| panic!("no count in {line:?}"))
        .parse()
        .unwrap();
    assert!(already >= copied_before.saturating_sub(1), "{line}");
    assert_eq!(s3().keys(&url, "chunks").len(), recorded.len());
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains(&format!("url = \"{url}\"")), "{text}");
    assert!(
        text.contains("# bitsync node configuration."),
        "comments were lost"
    );
    let on_s3 = |args: &[&str]| {
        let o = run(bitsync(&n).args(args).envs(s3().aws_env()));
        assert_eq!(o.code, 0, "{args:?}: {o:?}");
        o
    };
    for (id, (_, d)) in ids.iter().zip(&items) {
        assert!(on_s3(&["get", id]).stdout == *d, "{id} after the migration");
    }
    assert!(on_s3(&["verify"]).stderr.contains("0 problem(s)"));
    // Without the store's settings the node now fails to start, clearly.
    let o = at(&n, &["ls"]);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains(&url), "{}", o.stderr);

    // The operator removes the old chunk dir; then back to a new one.
    std::fs::remove_dir_all(n.join("chunks")).unwrap();
    let o = on_s3(&["chunks", "migrate", "--to", "local"]);
    assert!(
        o.last_line()
            .contains(&format!("{} chunks copied", recorded.len())),
        "{o:?}"
    );
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(!text.lines().any(|l| l.starts_with("url =")), "{text}");
    assert_items(&n, &ids, &items);
    assert!(ok_at(&n, &["verify"]).stderr.contains("0 problem(s)"));
}

#[test]
fn backup_restore_and_clone_instance_of_a_bucket_node() {
    let tmp = tempfile::tempdir().unwrap();
    let (n, repo) = (tmp.path().join("n"), tmp.path().join("repo"));
    let url = init(&n, Store::Bucket, "backup").unwrap();
    let items = items(9);
    let ids = publish(&n, tmp.path(), &items);
    let recorded = recorded_chunks(&n);
    let pass = [("BITSYNC_PASSPHRASE", "backup pass phrase")];
    let repo_arg = repo.to_str().unwrap();
    run(bitsync(&n)
        .args(["backup", "--with-identity", "--repo", repo_arg])
        .envs(pass))
    .ok("backup of a bucket node");
    ok_at(&n, &["backup", "verify", "--repo", repo_arg]);
    for hex in &recorded {
        let f = repo.join("chunks").join(&hex[..2]).join(hex);
        assert!(f.is_file(), "chunk {hex} is not in the repository");
    }
    // The repository holds no credentials (config.toml names only the file).
    let secret = s3().secret_key.as_bytes();
    for f in walk(&repo) {
        let b = std::fs::read(&f).unwrap();
        assert!(!b.windows(secret.len()).any(|w| w == secret), "{f:?}");
    }

    // Same identity, same bucket (the machine died, its bucket did not):
    // every object is kept, nothing is uploaded again.
    let same = tmp.path().join("same");
    let objects_before = s3().keys(&url, "chunks").len();
    let modified = |hex: &String| s3().last_modified(&S3::chunk_key(&url, hex));
    let stamps: Vec<String> = recorded.iter().map(modified).collect();
    // Last-Modified counts seconds: a PUT from here on would change it.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    run(bitsync(&same)
        .args(["restore", "--repo", repo_arg])
        .envs(pass))
    .ok("restore into the snapshot's bucket");
    assert_eq!(s3().keys(&url, "chunks").len(), objects_before);
    let after: Vec<String> = recorded.iter().map(modified).collect();
    assert_eq!(after, stamps, "the restore uploaded chunks the bucket held");
    assert_items(&same, &ids, &items);

    // Into a new bucket prefix, and into a local chunk dir.
    let url2 = s3().url("restored");
    let (bucket2, local) = (tmp.path().join("b2"), tmp.path().join("local"));
    run(bitsync(&bucket2)
        .args(["restore", "--repo", repo_arg, "--chunks", &url2])
        .envs(pass))
    .ok("restore into another bucket");
    assert_eq!(s3().keys(&url2, "chunks").len(), recorded.len());
    assert_items(&bucket2, &ids, &items);
    ok_at(&bucket2, &["verify"]);
    run(bitsync(&local)
        .args(["restore", "--repo", repo_arg, "--chunks", "local"])
        .envs(pass))
    .ok("restore into a local chunk dir");
    let cfg = std::fs::read_to_string(local.join("config.toml")).unwrap();
    assert!(!names_a_bucket(&cfg), "{cfg}");
    assert_eq!(recorded_chunks(&local), recorded);
    for hex in &recorded {
        assert!(
            stored(&local, None, hex).is_some(),
            "{hex} not in local/chunks"
        );
    }
    assert_items(&local, &ids, &items);

    // clone-instance copies from the bucket into local attachments.
    let c = tmp.path().join("c");
    let (db, att) = (c.join("bitsync.db"), c.join("chunks"));
    ok(bitsync(&n).args([
        "clone-instance",
        "--new-identity",
        "--dest-db",
        db.to_str().unwrap(),
        "--dest-attachments",
        att.to_str().unwrap(),
    ]));
    let cfg = std::fs::read_to_string(c.join("config.toml")).unwrap();
    assert!(
        !names_a_bucket(&cfg),
        "the copy writes into the source's bucket: {cfg}"
    );
    assert_items(&c, &ids, &items);
    ok_at(&c, &["verify"]);
    assert_ne!(
        ok_at(&c, &["id"]).last_line(),
        ok_at(&n, &["id"]).last_line()
    );

    // A damaged object stops a backup (DATA_LOSS) and is left in place.
    let hex = recorded.iter().next().unwrap();
    corrupt(&n, Some(&url), hex);
    std::fs::remove_dir_all(&repo).unwrap();
    let o = run(bitsync(&n).args(["backup", "--repo", repo_arg]));
    assert_eq!(o.code, 5, "{o:?}");
    assert!(o.stderr.contains(hex.as_str()), "{o:?}");
    assert!(!quarantined(&n, Some(&url), hex));
}

/// `bitsync clone PEER` on `dir` in the background, returned once `dir`
/// records at least `chunks` chunks (`what` says which, for the timeout).
fn clone_until(dir: &Path, peer: &str, chunks: usize, what: &str) -> std::process::Child {
    let child = bitsync(dir)
        .args(["clone", peer])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(120, what, || {
        (recorded_chunks(dir).len() >= chunks).then_some(())
    });
    child
}

/// Whether a config.toml sets `[chunks] url` (not just its comment).
fn names_a_bucket(config: &str) -> bool {
    config.lines().any(|l| l.trim_start().starts_with("url ="))
}

#[test]
fn backup_to_and_restore_from_an_s3_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let n = tmp.path().join("n");
    init(&n, Store::Dir, "");
    let items = items(11);
    let ids = publish(&n, tmp.path(), &items);
    let recorded = recorded_chunks(&n);
    let repo = s3().url("repo");
    let env = |c: &mut std::process::Command| {
        c.envs(s3().aws_env())
            .env("BITSYNC_PASSPHRASE", "repo pass phrase");
    };
    let backup = |extra: &[&str]| {
        let mut c = bitsync(&n);
        c.args(["backup", "--with-identity", "--repo", &repo])
            .args(extra);
        env(&mut c);
        run(&mut c)
    };
    let first = backup(&[]);
    assert_eq!(first.code, 0, "{first:?}");
    assert_eq!(s3().keys(&repo, "chunks").len(), recorded.len());
    // A second backup uploads no chunk.
    let second = backup(&[]);
    assert_eq!(second.code, 0, "{second:?}");
    assert!(
        second.stderr.contains(&format!(
            "0 new chunks (0 B) copied, {} already in the repository",
            recorded.len()
        )),
        "{second:?}"
    );
    let mut ls = bitsync(&n);
    ls.args(["backup", "ls", "--json", "--repo", &repo]);
    env(&mut ls);
    let listed: serde_json::Value = serde_json::from_str(&run(&mut ls).ok("backup ls")).unwrap();
    let snaps: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        snaps,
        [first.last_line(), second.last_line()],
        "backup ls lists both snapshots, oldest first"
    );
    let mut verify = bitsync(&n);
    verify.args(["backup", "verify", "--repo", &repo]);
    env(&mut verify);
    run(&mut verify).ok("backup verify");

    // Restore from the bucket into a local data dir, and into a bucket node.
    let r = tmp.path().join("r");
    let mut restore = bitsync(&r);
    restore.args(["restore", "--repo", &repo]);
    env(&mut restore);
    run(&mut restore).ok("restore from s3");
    assert_items(&r, &ids, &items);
    let url = s3().url("restored-from-s3");
    let rb = tmp.path().join("rb");
    let mut restore = bitsync(&rb);
    restore.args(["restore", "--repo", &repo, "--chunks", &url]);
    env(&mut restore);
    run(&mut restore).ok("restore from s3 into a bucket node");
    assert_eq!(s3().keys(&url, "chunks").len(), recorded.len());

    // No pruning without a lock; a prefix that holds something else is refused.
    let o = backup(&["--keep-last", "1"]);
    assert_eq!(o.code, 2, "{o:?}");
    assert!(o.stderr.contains("--keep-last is not supported"), "{o:?}");
    let mut c = bitsync(&n);
    c.args(["backup", "--repo", &url]);
    env(&mut c);
    let o = run(&mut c);
    assert_eq!(o.code, 4, "{o:?}");
    assert!(
        o.stderr.contains("not a bitsync backup repository"),
        "{o:?}"
    );

    // A damaged object: verify names it, restore refuses and writes nothing.
    let hex = recorded.iter().next().unwrap();
    let key = S3::chunk_key(&repo, hex);
    let mut b = s3().get(&key).unwrap();
    b[0] ^= 1;
    s3().put(&key, b);
    let o = run(&mut verify);
    assert_eq!(o.code, 5, "{o:?}");
    assert!(
        o.text()
            .contains(&format!("chunks/{}/{hex}: damaged", &hex[..2])),
        "{o:?}"
    );
    let bad = tmp.path().join("bad");
    let mut restore = bitsync(&bad);
    restore.args(["restore", "--repo", &repo]);
    env(&mut restore);
    let o = run(&mut restore);
    assert_eq!(o.code, 5, "{o:?}");
    assert!(!bad.exists() || walk(&bad).is_empty(), "restore left files");
}

/// A SeaweedFS of separate processes, replication `001` over two volume
/// servers. One is killed while another node clones from a node on the
/// cluster: every object still has its other copy, so the clone completes.
/// While it is down nothing can be written with two copies, so a clone
/// into the cluster ends UNAVAILABLE with nothing half-recorded, and with
/// the server back the same command completes. Last the S3 gateway is
/// killed in the middle of a clone into the cluster: UNAVAILABLE, and after
/// its restart the same command completes without starting over.
#[test]
fn a_replicated_seaweedfs_cluster_loses_a_volume_server_then_its_gateway() {
    let cluster = Cluster::start();
    let tmp = tempfile::tempdir().unwrap();
    let [a, b, c] = ["a", "b", "c"].map(|n| tmp.path().join(n));
    init(&a, Store::Dir, "");
    let url = cluster.s3.url("replicated");
    cluster.s3.init_node(&b, &url, None);
    set_chunk_size(&b, CHUNK);
    ok_at(&c, &["init"]);
    let items: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| {
            (
                format!("r-{i}"),
                data(900 + i, 2 * 1024 * 1024 + 77 * i as usize),
            )
        })
        .collect();
    let ids = publish(&a, tmp.path(), &items);
    let sa = Serve::start(&a);
    ok_at(&b, &["clone", &sa.invite()]);
    assert_items(&b, &ids, &items);

    // Reads: C clones from B over a 4 MiB/s wire; a volume server dies midway.
    let sb = Serve::start(&b);
    let wire = proxy(sb.addr.parse().unwrap(), Some(4 << 20));
    let (b_id, c_id) = (
        ok_at(&b, &["id"]).last_line(),
        ok_at(&c, &["id"]).last_line(),
    );
    ok_at(&b, &["peer", "add", &c_id, "127.0.0.1:9"]);
    ok_at(&c, &["peer", "add", &b_id, &wire.addr.to_string()]);
    let total = recorded_chunks(&b).len();
    let child = clone_until(&c, &b_id, total / 3, "a third of the chunks on C");
    cluster.kill(Part::Volume(1));
    assert!(
        recorded_chunks(&c).len() < total,
        "the clone finished before the kill"
    );
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the clone from B failed when a volume server died: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(recorded_chunks(&c).len(), total);
    assert_items(&c, &ids, &items);
    drop(sb);

    // Writes: with one copy's server gone nothing can be stored.
    let more: Vec<(String, Vec<u8>)> = (0..2)
        .map(|i| (format!("s-{i}"), data(950 + i, 300_000 + i as usize)))
        .collect();
    let more_ids = publish(&a, tmp.path(), &more);
    let o = at(&b, &["clone", &sa.invite()]);
    assert_eq!(o.code, 8, "a clone into the degraded cluster: {o:?}");
    assert!(o.stderr.contains(&url), "{o:?}");
    for hex in recorded_chunks(&b) {
        let obj = cluster
            .s3
            .get(&S3::chunk_key(&url, &hex))
            .unwrap_or_else(|| panic!("{hex} recorded, not stored"));
        assert_eq!(bitsync::crypto::Hash::of(&obj).to_hex(), hex);
    }
    cluster.start_part(Part::Volume(1));
    cluster.s3.wait_writable(std::time::Duration::from_secs(60));
    ok_at(&b, &["clone", &sa.invite()]);
    assert_items(&b, &more_ids, &more);

    // The S3 gateway killed mid-clone: UNAVAILABLE, and after a restart the
    // same command completes without starting over.
    let late: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| {
            (
                format!("t-{i}"),
                data(970 + i, 2 * 1024 * 1024 + i as usize),
            )
        })
        .collect();
    let late_ids = publish(&a, tmp.path(), &late);
    let late_total: usize = late_ids.iter().map(|id| chunks_of(&a, id).len()).sum();
    let wire = proxy(sa.addr.parse().unwrap(), Some(4 << 20));
    let a_id = ok_at(&a, &["id"]).last_line();
    ok_at(&b, &["peer", "add", &a_id, &wire.addr.to_string()]);
    let before = recorded_chunks(&b).len();
    let child = clone_until(
        &b,
        &a_id,
        before + late_total / 3,
        "a third of the new chunks on B",
    );
    cluster.kill(Part::Gateway);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{stderr}");
    assert!(stderr.contains("cannot be reached"), "{stderr}");
    assert!(recorded_chunks(&b).len() < before + late_total);
    cluster.start_part(Part::Gateway);
    cluster.s3.wait_writable(std::time::Duration::from_secs(60));
    let sent = wire.down.load(Ordering::Relaxed);
    ok_at(&b, &["clone", &a_id]);
    let resent = wire.down.load(Ordering::Relaxed) - sent;
    let late_bytes: u64 = late.iter().map(|(_, d)| d.len() as u64).sum();
    assert!(
        resent < late_bytes,
        "the rerun fetched {resent} of {late_bytes} bytes"
    );
    assert_items(&b, &late_ids, &late);
    ok_at(&b, &["verify"]);
}

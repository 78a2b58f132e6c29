//! The replicator end to end: real `bitsync` processes (serve, clone, put,
//! get, peer, invite, status, verify), real SQLite files and chunk dirs, a
//! stock grpcurl on the admin socket, a real tmpfs for the disk-full case,
//! and a small TCP proxy of our own to slow the wire down or count its bytes.
//!
//! Every wait is bounded: a broken node fails the test with what it printed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use serde_json::Value;
use tempfile::TempDir;

use crate::support::*;

/// Small chunks keep the tests fast while still making items of many chunks.
const CHUNK: usize = 65536;
const TAG: u64 = 16;

// ---------------------------------------------------------------- helpers

/// `bitsync init` with a small chunk size; returns the node id.
fn init(dir: &Path) -> String {
    let id = ok_at(dir, &["init"]).last_line();
    set_chunk_size(dir, CHUNK);
    id
}

fn add_mirror_to_config(dir: &Path, peer: &str) {
    let cfg = dir.join("config.toml");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!("\n[[mirror]]\npeer = \"{peer}\"\n"));
    std::fs::write(&cfg, text).unwrap();
}

/// Ciphertext bytes an item of `len` plaintext bytes occupies (one GCM tag per chunk).
fn cipher_len(len: usize) -> u64 {
    len as u64 + TAG * (len.div_ceil(CHUNK).max(1) as u64)
}

/// Publish items in-process on a data dir whose node is not running.
fn publish(dir: &Path, items: &[(String, Vec<u8>)]) -> Vec<String> {
    let node = open(dir);
    items
        .iter()
        .map(|(name, d)| put(&node, name, d).to_hex())
        .collect()
}

/// Publish with the CLI (the node may be running).
fn put_cli(dir: &Path, scratch: &Path, name: &str, d: &[u8]) -> String {
    let f = scratch.join(name);
    std::fs::write(&f, d).unwrap();
    let id = ok_at(dir, &["put", f.to_str().unwrap()]).last_line();
    assert_eq!(id.len(), 64, "put printed {id:?}");
    id
}

/// Paths for data dirs named `names` in `tmp` (nothing created yet).
fn dirs<const N: usize>(tmp: &TempDir, names: [&str; N]) -> [PathBuf; N] {
    names.map(|n| tmp.path().join(n))
}

/// `status` of the node at `dir`, and the mirror job it shows (there must be one).
fn mirror_job(dir: &Path) -> (Value, Value) {
    let status: Value = serde_json::from_slice(&ok_at(dir, &["status", "--json"]).stdout).unwrap();
    let job = status["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["kind"] == "mirror")
        .unwrap_or_else(|| panic!("no mirror job in status: {status}"))
        .clone();
    (status, job)
}

/// Admin/Clone over grpcurl on the socket `sock`, with an invite token or peer id.
fn admin_clone(sock: &Path, token_or_peer: &str) -> Out {
    admin(
        sock,
        "Clone",
        &format!("{{\"token_or_peer\":\"{token_or_peer}\"}}"),
    )
}

/// `ls --json` as content id -> (complete, name).
fn ls(dir: &Path) -> HashMap<String, (bool, String)> {
    ls_json(dir)
        .iter()
        .map(|i| {
            (
                i["content_id"].as_str().unwrap().to_string(),
                (
                    i["complete"].as_bool().unwrap(),
                    i["name"].as_str().unwrap_or("").to_string(),
                ),
            )
        })
        .collect()
}

#[track_caller]
fn assert_item(dir: &Path, id: &str, expected: &[u8]) {
    let o = ok_at(dir, &["get", id]);
    assert!(
        o.stdout == expected,
        "item {id} on {} differs: {} bytes, expected {}",
        dir.display(),
        o.stdout.len(),
        expected.len()
    );
}

/// The summary line of `bitsync clone`: (items here, new items, bytes received).
fn summary(o: &Out) -> (u64, u64, u64) {
    let line = o
        .text()
        .lines()
        .find(|l| l.starts_with("cloned "))
        .unwrap_or_else(|| panic!("no summary line: {o:?}"))
        .to_string();
    // "cloned N items (K new), B bytes received in S s (R MB/s)"
    let w: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        (w[2], w[4], w[6], w[7]),
        ("items", "new),", "bytes", "received"),
        "summary line {line:?}"
    );
    (
        w[1].parse().unwrap(),
        w[3].trim_start_matches('(').parse().unwrap(),
        w[5].parse().unwrap(),
    )
}

/// Chunk rows (count, bytes) in a node's database, read-only.
fn chunk_rows(dir: &Path) -> (u64, u64) {
    let c = db_read_only(dir);
    c.query_row(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM chunks",
        [],
        |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)),
    )
    .unwrap()
}

/// Chunk files in place in a data dir, by chunk id, with their sizes.
/// Temp files are not counted.
fn chunk_sizes(dir: &Path) -> HashMap<String, u64> {
    chunk_files(dir)
        .into_iter()
        .map(|f| {
            let len = std::fs::metadata(&f).unwrap().len();
            (f.file_name().unwrap().to_string_lossy().into_owned(), len)
        })
        .collect()
}

// ---------------------------------------------------------------- (a) clone

/// 200 items of mixed sizes: empty, one byte, around and exactly at chunk
/// multiples, several MiB, and a spread of small ones.
fn mixed_items() -> Vec<(String, Vec<u8>)> {
    let mut sizes = vec![
        0,
        1,
        CHUNK - 1,
        CHUNK,
        CHUNK + 1,
        2 * CHUNK,
        3 * CHUNK,
        3 * 1024 * 1024 + 7,
        2 * 1024 * 1024,
        0,
    ];
    let mut r = rand::rngs::StdRng::seed_from_u64(7);
    while sizes.len() < 200 {
        sizes.push((r.next_u32() as usize) % 40_000);
    }
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| (format!("item-{i:03}.bin"), data(i as u64, n)))
        .collect()
}

#[test]
fn clone_copies_every_item_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    init(&a);
    let t0 = Instant::now();
    let items = mixed_items();
    let ids = publish(&a, &items);
    let expected_bytes: u64 = items.iter().map(|(_, d)| cipher_len(d.len())).sum();
    let sa = Serve::start(&a);
    eprintln!("published 200 items in {:?}", t0.elapsed());

    // B does not exist yet: clone creates it.
    let t0 = Instant::now();
    let o = ok_at(&b, &["clone", &sa.invite()]);
    assert_eq!(summary(&o), (200, 200, expected_bytes), "{o:?}");
    eprintln!("cloned in {:?}", t0.elapsed());
    let t0 = Instant::now();

    let listed = ls(&b);
    assert_eq!(listed.len(), 200);
    // Every item through get (in-process: the same code as the CLI, without
    // 200 process start-ups), and the edge sizes through the `bitsync get` CLI too.
    let node = open(&b);
    for (i, ((name, d), id)) in items.iter().zip(&ids).enumerate() {
        let (complete, got_name) = listed
            .get(id)
            .unwrap_or_else(|| panic!("item {id} missing on the clone"));
        assert!(complete, "item {id} incomplete");
        assert_eq!(got_name, name);
        let cid = bitsync::crypto::Hash::parse(id, "content id").unwrap();
        let got = get(&node, &cid);
        assert!(
            got == *d,
            "item {id} ({name}) differs on the clone: {} bytes, expected {}",
            got.len(),
            d.len()
        );
        if i < 10 {
            assert_item(&b, id, d);
        }
    }
    drop(node);
    ok_at(&b, &["verify"]);
    eprintln!("compared and verified in {:?}", t0.elapsed());

    // Cloning a complete instance again transfers nothing.
    let a_id = ok_at(&a, &["id"]).last_line();
    let o = ok_at(&b, &["clone", &a_id]);
    assert_eq!(summary(&o), (200, 0, 0), "{o:?}");
}

// ---------------------------------------------------------------- (b) mirror

#[test]
fn mirror_added_while_running_receives_new_items() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let a_id = init(&a);
    publish(&a, &[("first".into(), data(1, 5000))]);
    let sa = Serve::start(&a);
    ok_at(&b, &["clone", &sa.invite()]);
    let sb = Serve::start(&b);

    // Mark A as a mirror source while B runs: no restart.
    ok_at(&b, &["peer", "add", &a_id, &sa.addr, "--mirror"]);
    let mut published = Vec::new();
    for (i, size) in [0usize, 3 * CHUNK, 200_000].into_iter().enumerate() {
        let d = data(100 + i as u64, size);
        let id = put_cli(&a, tmp.path(), &format!("new-{i}"), &d);
        published.push((id, d));
    }
    wait_for(30, "B to receive the three new items", || {
        let l = ls(&b);
        published
            .iter()
            .all(|(id, _)| l.get(id).map(|(c, _)| *c).unwrap_or(false))
            .then_some(())
    });
    for (id, d) in &published {
        assert_item(&b, id, d);
    }
    let (_, job) = mirror_job(&b);
    assert_eq!(job["peer"], a_id.as_str());
    drop(sb);
}

// ---------------------------------------------------------------- (c) chain

#[test]
fn chain_a_to_b_to_c() {
    let tmp = tempfile::tempdir().unwrap();
    let [a, b, c] = dirs(&tmp, ["a", "b", "c"]);
    let a_id = init(&a);
    let early = data(5, 150_000);
    let early_id = publish(&a, &[("early".into(), early.clone())]).remove(0);
    let sa = Serve::start(&a);

    // B clones A and keeps mirroring it ([[mirror]] in config.toml).
    let o = ok_at(&b, &["clone", &sa.invite()]);
    assert_eq!(summary(&o).1, 1);
    let b_id = ok_at(&b, &["id"]).last_line();
    add_mirror_to_config(&b, &a_id);
    let sb = Serve::start(&b);

    // C clones B (which re-keys A's items for C) and mirrors B.
    let o = ok_at(&c, &["clone", &sb.invite()]);
    assert_eq!(summary(&o).1, 1);
    assert_item(&c, &early_id, &early);
    add_mirror_to_config(&c, &b_id);
    let _sc = Serve::start(&c);

    let late = data(6, 2 * CHUNK + 99);
    let late_id = put_cli(&a, tmp.path(), "late", &late);
    wait_for(45, "an item published on A to reach C through B", || {
        ls(&c)
            .get(&late_id)
            .filter(|(complete, _)| *complete)
            .map(|_| ())
    });
    assert_item(&c, &late_id, &late);
    let l = ls(&c);
    assert_eq!(
        l.get(&late_id).unwrap().1,
        "late",
        "C can read the item's (encrypted) name"
    );
    let pubs: Value = serde_json::from_slice(&ok_at(&c, &["ls", "--json"]).stdout).unwrap();
    assert!(
        pubs.as_array()
            .unwrap()
            .iter()
            .all(|i| i["publisher"] == a_id.as_str()),
        "publisher is A on C: {pubs}"
    );
}

// ---------------------------------------------------------------- (d) kill -9

#[test]
fn clone_killed_mid_transfer_resumes_and_resends_little() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let a_id = init(&a);
    let b_id = init(&b);
    let items: Vec<(String, Vec<u8>)> = (0..8)
        .map(|i| {
            (
                format!("big-{i}"),
                data(1000 + i, 2 * 1024 * 1024 + 100 * i as usize),
            )
        })
        .collect();
    let ids = publish(&a, &items);
    let total: u64 = items.iter().map(|(_, d)| cipher_len(d.len())).sum();
    let total_chunks: u64 = items
        .iter()
        .map(|(_, d)| d.len().div_ceil(CHUNK) as u64)
        .sum();
    let sa = Serve::start(&a);
    // The wire to A runs through a 4 MiB/s proxy, so the kills land mid-transfer.
    let px = proxy(sa.addr.parse().unwrap(), Some(4 << 20));
    ok_at(&a, &["peer", "add", &b_id, "127.0.0.1:9"]);
    ok_at(&b, &["peer", "add", &a_id, &px.addr.to_string()]);

    let mut last_rows = 0;
    for frac in [0.2, 0.45, 0.7] {
        let target = (total_chunks as f64 * frac) as u64;
        let mut child = bitsync(&b)
            .args(["clone", &a_id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(120, &format!("{target} chunks on B"), || {
            if let Some(st) = child.try_wait().unwrap() {
                panic!("the clone ended ({st}) before it could be killed at {target} chunks");
            }
            (chunk_rows(&b).0 >= target).then_some(())
        });
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let (rows, _) = chunk_rows(&b);
        let files = chunk_sizes(&b).len() as u64;
        eprintln!("killed at {frac}: {rows} chunks recorded, {files} chunk files, {} bytes through the proxy", px.down.load(Ordering::Relaxed));
        assert!(
            rows >= last_rows,
            "recorded chunks went down: {rows} < {last_rows}"
        );
        assert!(files >= rows, "a recorded chunk has no file");
        last_rows = rows;
        // Nothing half-written counts as present.
        ok_at(&b, &["verify"]);
    }

    // What a crash between rename and record leaves: whole chunk files in
    // place but not recorded. Plant four (copied from A) and one garbage
    // file under the name of a fifth missing chunk, as a torn write would.
    let planted: Vec<String> = {
        let recorded = recorded_chunks(&b);
        let on_b = chunk_sizes(&b);
        let mut lacking: Vec<String> = chunk_sizes(&a)
            .into_keys()
            .filter(|id| !on_b.contains_key(id) && !recorded.contains(id))
            .collect();
        lacking.sort();
        lacking.truncate(5);
        lacking
    };
    assert_eq!(planted.len(), 5, "B still lacks chunks after the last kill");
    for (i, id) in planted.iter().enumerate() {
        let to = b.join("chunks").join(&id[..2]);
        std::fs::create_dir_all(&to).unwrap();
        if i < 4 {
            std::fs::copy(a.join("chunks").join(&id[..2]).join(id), to.join(id)).unwrap();
        } else {
            std::fs::write(to.join(id), b"half-written garbage").unwrap();
        }
    }
    let garbage = planted[4].clone();
    let garbage_len = b"half-written garbage".len() as u64;

    // What the final run should fetch: chunks neither recorded nor left as whole files.
    let (_, rec_bytes) = chunk_rows(&b);
    let strays: u64 = {
        let recorded = recorded_chunks(&b);
        chunk_sizes(&b)
            .iter()
            .filter(|(id, _)| !recorded.contains(*id) && **id != garbage)
            .map(|(_, n)| *n)
            .sum()
    };
    // An item's last chunk is short: count the planted files' real sizes.
    let planted_bytes: u64 = {
        let on_a = chunk_sizes(&a);
        planted[..4].iter().map(|id| on_a[id]).sum()
    };
    assert!(
        strays >= planted_bytes,
        "the planted files count as whole strays: {strays} < {planted_bytes}"
    );
    let before_final = px.down.load(Ordering::Relaxed);
    let o = ok_at(&b, &["clone", &a_id]);
    let (n, _, got) = summary(&o);
    assert_eq!(n, 8);
    let missing = total - rec_bytes - strays;
    eprintln!(
        "final run: {got} bytes received; {missing} were missing ({rec_bytes} recorded, {strays} in unrecorded whole files adopted); \
         wire total {} for {total} bytes of chunks ({:.3}x)",
        px.down.load(Ordering::Relaxed),
        px.down.load(Ordering::Relaxed) as f64 / total as f64
    );
    assert_eq!(
        got, missing,
        "the final run fetched exactly what was missing: whole unrecorded files were adopted, \
         the garbage one fetched again"
    );
    assert_ne!(
        chunk_sizes(&b)[&garbage],
        garbage_len,
        "the garbage file was replaced by the real chunk"
    );
    assert!(px.down.load(Ordering::Relaxed) - before_final < missing + missing / 10 + (256 << 10));
    // Over all four runs, the wire carried little more than the data: each kill
    // loses at most what was in flight (the proxy caps that at ~0.5 s of 4 MiB/s).
    let wire = px.down.load(Ordering::Relaxed);
    assert!(
        wire < total + total / 10 + 3 * (3 << 20),
        "wire {wire} bytes for {total} bytes of chunks"
    );
    for ((_, d), id) in items.iter().zip(&ids) {
        assert_item(&b, id, d);
    }
    ok_at(&b, &["verify"]);
}

// ---------------------------------------------------------------- (e) corrupt chunks

/// Flip a byte in the middle of the chunk files of `items` (by index into their chunk lists).
fn corrupt(dir: &Path, chunks: &[String]) {
    for c in chunks {
        let p = dir.join("chunks").join(&c[..2]).join(c);
        let mut b = std::fs::read(&p).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 0x5a;
        std::fs::write(&p, b).unwrap();
    }
}

#[test]
fn corrupt_chunks_are_refetched_from_another_peer_or_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let [a, s2, c, d] = dirs(&tmp, ["a", "s2", "c", "d"]);
    init(&a);
    let items: Vec<(String, Vec<u8>)> = (0..4)
        .map(|i| (format!("f{i}"), data(50 + i, 3 * CHUNK + 1234)))
        .collect();
    let ids = publish(&a, &items);
    let sa = Serve::start(&a);
    let a_id = ok_at(&a, &["id"]).last_line();

    // S2: a good second copy, trusted by C.
    ok_at(&s2, &["clone", &sa.invite()]);
    let s2_id = ok_at(&s2, &["id"]).last_line();
    let ss2 = Serve::start(&s2);
    let c_id = init(&c);
    ok_at(&s2, &["peer", "add", &c_id, "127.0.0.1:9"]);
    ok_at(&c, &["peer", "add", &s2_id, &ss2.addr]);

    // A's disk rots: three chunks of two items.
    let bad: Vec<String> = vec![
        chunks_of(&a, &ids[0])[1].clone(),
        chunks_of(&a, &ids[0])[3].clone(),
        chunks_of(&a, &ids[2])[0].clone(),
    ];
    corrupt(&a, &bad);
    let o = ok_at(&c, &["clone", &sa.invite()]);
    assert_eq!(summary(&o).0, 4, "{o:?}");
    assert!(
        o.stderr.contains("DataLoss"),
        "the clone reports A's DATA_LOSS answers: {o:?}"
    );
    for ((_, data), id) in items.iter().zip(&ids) {
        assert_item(&c, id, data);
    }
    for b in &bad {
        assert!(a.join("quarantine").join(b).exists(), "A quarantined {b}");
    }

    // D trusts only A, and A now lacks those three chunks and has two more bad ones.
    let more = vec![chunks_of(&a, &ids[3])[2].clone()];
    corrupt(&a, &more);
    let o = at(&d, &["clone", &sa.invite()]);
    assert_eq!(
        o.code, 8,
        "an incomplete clone exits 8 (unavailable): {o:?}"
    );
    assert!(
        o.stderr.contains("incomplete") && o.stderr.contains("no other trusted peer"),
        "{o:?}"
    );
    assert!(
        bad.iter()
            .chain(&more)
            .any(|b| o.stderr.contains(b.as_str())),
        "the error names a missing chunk: {o:?}"
    );
    assert!(
        o.stderr.contains("DataLoss") && o.stderr.contains("NotFound"),
        "names what A said: {o:?}"
    );
    let l = ls(&d);
    assert!(
        l.values().all(|(complete, _)| *complete),
        "only complete items are listed on D"
    );
    assert!(l.contains_key(&ids[1]), "items A could serve were stored");
    ok_at(&d, &["verify"]);

    // A gets the chunks back from S2 (Admin/Sync over the admin socket)...
    ok_at(&a, &["peer", "add", &s2_id, &ss2.addr]);
    let sock = sa.socket();
    let sync_a_from_s2 = || {
        let g = admin(&sock, "Sync", &format!("{{\"peer\":\"{s2_id}\"}}"));
        assert_eq!(g.code, 0, "Admin/Sync on A: {g:?}");
    };
    sync_a_from_s2();
    ok_at(&a, &["verify"]);
    // ... and D's next clone completes.
    let o = ok_at(&d, &["clone", &a_id]);
    assert_eq!(summary(&o).0, 4, "{o:?}");
    for ((_, data), id) in items.iter().zip(&ids) {
        assert_item(&d, id, data);
    }

    // The cursor never passes an item that is not stored. A new item carries
    // D's envelope from the start (A knows D's key now), so fetching it
    // re-keys nothing and it keeps its seq: only the cursor brings it back.
    let x = data(60, 2 * CHUNK + 5);
    let x_id = put_cli(&a, tmp.path(), "x", &x);
    ok_at(&s2, &["clone", &a_id]); // S2 holds X before A's copy rots
    corrupt(&a, &[chunks_of(&a, &x_id)[1].clone()]);
    let o = at(&d, &["clone", &a_id]);
    assert_eq!(o.code, 8, "{o:?}");
    assert!(
        !ls(&d).contains_key(&x_id),
        "X is not listed on D while incomplete"
    );
    sync_a_from_s2();
    let o = ok_at(&d, &["clone", &a_id]);
    // Only the chunk D lacked travels: the good ones were kept from the failed run.
    assert_eq!(summary(&o), (5, 1, CHUNK as u64 + TAG), "{o:?}");
    assert_item(&d, &x_id, &x);
}

// ---------------------------------------------------------------- (f) revoked mirror

#[test]
fn revoked_mirror_stops_receiving() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let a_id = init(&a);
    let sa = Serve::start(&a);
    ok_at(&b, &["clone", &sa.invite()]);
    let b_id = ok_at(&b, &["id"]).last_line();
    ok_at(&b, &["peer", "add", &a_id, &sa.addr, "--mirror"]);
    let sb = Serve::start(&b);

    let one = put_cli(&a, tmp.path(), "one", &data(1, 1000));
    wait_for(30, "the first item on B", || {
        ls(&b).get(&one).filter(|(c, _)| *c).map(|_| ())
    });

    ok_at(&a, &["peer", "revoke", &b_id]);
    wait_for(30, "B to log that its mirror stopped", || {
        sb.log()
            .contains("the source revoked this node's trust")
            .then_some(())
    });
    let two = put_cli(&a, tmp.path(), "two", &data(2, 1000));
    // Give a working mirror ample time (it takes well under a second) and check nothing came.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !ls(&b).contains_key(&two),
        "an item published after the revocation reached B"
    );

    let (status, job) = mirror_job(&b);
    assert_eq!(job["phase"], "FAILED", "{status}");
    assert!(
        job["last_error"].as_str().unwrap_or("").contains("revoked"),
        "{status}"
    );
    // Asking explicitly does not help either: A refuses.
    let o = at(&b, &["clone", &a_id]);
    assert_eq!(o.code, 7, "{o:?}");
    assert!(o.stderr.contains("not a trusted peer"), "{o:?}");
}

// ---------------------------------------------------------------- (g) Admin/Clone with grpcurl

#[test]
fn admin_clone_over_grpcurl_streams_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    init(&a);
    let items: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("g{i}"), data(70 + i, 100_000 * i as usize)))
        .collect();
    let ids = publish(&a, &items);
    let sa = Serve::start(&a);
    init(&b);
    let sb = Serve::start(&b);
    let sock = sb.socket();
    let token = sa.invite();

    let g = admin_clone(&sock, &token);
    assert_eq!(g.code, 0, "{g:?}");
    let msgs: Vec<Value> = serde_json::Deserializer::from_slice(&g.stdout)
        .into_iter::<Value>()
        .map(|v| v.unwrap())
        .collect();
    assert!(!msgs.is_empty(), "{g:?}");
    let last = msgs.last().unwrap();
    assert_eq!(last["phase"], "DONE", "{g:?}");
    assert_eq!(last["itemsDone"], "3", "{g:?}");
    assert_eq!(last["itemsTotal"], "3", "{g:?}");
    assert!(
        msgs.iter().any(|m| m["phase"] != "DONE"),
        "progress came before the end: {g:?}"
    );
    let l = ls(&b);
    for ((_, d), id) in items.iter().zip(&ids) {
        assert!(l.get(id).map(|(c, _)| *c).unwrap_or(false), "{id} on B");
        assert_item(&b, id, d);
    }

    // The token is spent: a second use is refused.
    let g = admin_clone(&sock, &token);
    assert_ne!(g.code, 0, "{g:?}");
    assert!(
        g.stderr.contains("Unauthenticated") && g.stderr.contains("already used"),
        "{g:?}"
    );

    // An expired token is refused too.
    let o = ok_at(&a, &["invite", "--ttl", "1s"]);
    let expired = o.last_line();
    std::thread::sleep(Duration::from_millis(1500));
    let g = admin_clone(&sock, &expired);
    assert_ne!(g.code, 0, "{g:?}");
    assert!(
        g.stderr.contains("Unauthenticated") && g.stderr.contains("expired"),
        "{g:?}"
    );
}

// ---------------------------------------------------------------- (h) disk full

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stderr(Stdio::null())
            .status();
        matches!(st, Ok(s) if s.success()).then(|| Tmpfs(dir.to_path_buf()))
    }
    fn resize(&self, size: &str) {
        let st = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "remounting {} with size {size}",
            self.0.display()
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn disk_full_fails_cleanly_and_resumes_after_space_is_freed() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&tmp.path().join("small"), "8m") else {
        if std::env::var_os("BITSYNC_TEST_REQUIRE_MOUNT").is_some() {
            panic!("cannot mount a tmpfs here, and BITSYNC_TEST_REQUIRE_MOUNT is set");
        }
        eprintln!("SKIPPED: mounting a tmpfs needs root (set BITSYNC_TEST_REQUIRE_MOUNT=1 to make this a failure)");
        return;
    };
    let a = tmp.path().join("a");
    let b = fs.0.join("b");
    let a_id = init(&a);
    let items: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("h{i}"), data(90 + i, 2 * 1024 * 1024)))
        .collect();
    let ids = publish(&a, &items);
    let sa = Serve::start(&a);

    let o = at(&b, &["clone", &sa.invite()]);
    assert_eq!(o.code, 9, "a full disk exits 9 (exhausted): {o:?}");
    assert!(
        o.stderr.contains("No space left on device") || o.stderr.contains("full"),
        "{o:?}"
    );
    assert!(
        o.stderr.contains("free some space"),
        "says what to do: {o:?}"
    );
    // Nothing half-written counts as present.
    ok_at(&b, &["verify"]);
    assert!(ls(&b).values().all(|(c, _)| *c));

    fs.resize("64m");
    let o = ok_at(&b, &["clone", &a_id]);
    assert_eq!(summary(&o).0, 6, "{o:?}");
    for ((_, d), id) in items.iter().zip(&ids) {
        assert_item(&b, id, d);
    }
    ok_at(&b, &["verify"]);
    drop(sa);
}

// ---------------------------------------------------------------- (i) unreachable, untrusted

#[test]
fn unreachable_and_untrusted_peers_fail_with_their_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let [a, b, c] = dirs(&tmp, ["a", "b", "c"]);
    let a_id = init(&a);
    init(&b);
    let sa = Serve::start(&a);
    let addr = sa.addr.clone();

    // Untrusted: B trusts A, A does not trust B.
    ok_at(&b, &["peer", "add", &a_id, &addr]);
    let o = at(&b, &["clone", &a_id]);
    assert_eq!(o.code, 7, "{o:?}");
    assert!(o.stderr.contains("not a trusted peer"), "{o:?}");

    // Not a peer at all.
    let o = at(&c, &["clone", &"ab".repeat(32)]);
    assert_eq!(o.code, 3, "{o:?}");
    assert!(o.stderr.contains("is not a peer of this node"), "{o:?}");

    // Malformed token.
    let o = at(&c, &["clone", "bitsync-invite:???"]);
    assert_eq!(o.code, 2, "{o:?}");

    // Unreachable: the inviter is gone.
    let token = sa.invite();
    drop(sa);
    let o = at(&c, &["clone", &token]);
    assert_eq!(o.code, 8, "{o:?}");
    assert!(
        o.stderr.contains("cannot reach") && o.stderr.contains(&addr),
        "names the address: {o:?}"
    );
}

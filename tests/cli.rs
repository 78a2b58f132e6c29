//! End-to-end tests of the `bitsync` command: the real binary, run as a child
//! process on a fresh data dir in a temp directory, with real files and a real
//! SQLite database. Nothing here touches `~/.local/share/bitsync`: every run
//! gets `BITSYNC_DATA_DIR` and a private `HOME`.
//!
//! Exit codes checked here come from `Error::exit_code`: 2 invalid, 3 not
//! found, 5 integrity, 6 auth.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use crate::support::*;

const MIB: usize = 1024 * 1024;

/// A temp directory holding one data dir (`<tmp>/data`, not created until `init`).
struct T {
    tmp: TempDir,
    data: PathBuf,
}

impl T {
    /// Smallest chunks (config.toml `chunk_size`), for many chunks from little data.
    fn use_4k_chunks(&self) {
        set_chunk_size(&self.data, 4096);
    }
    fn new() -> T {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = tmp.path().join("data");
        T { tmp, data }
    }

    fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// A command with a clean environment pointing at this data dir.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = command(self.root());
        c.args(args)
            .env("BITSYNC_DATA_DIR", &self.data)
            .env_remove("RUST_LOG");
        c
    }

    fn run(&self, args: &[&str]) -> Out {
        run(&mut self.cmd(args))
    }

    fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut c = self.cmd(args);
        for (k, v) in env {
            c.env(k, v);
        }
        run(&mut c)
    }

    /// Run and insist on success.
    fn ok(&self, args: &[&str]) -> Out {
        let o = self.run(args);
        assert_eq!(o.code, 0, "bitsync {args:?} failed: {}", o.stderr);
        o
    }

    /// Run, insisting on a failure with exactly `code`.
    fn fails(&self, args: &[&str], code: i32) -> Out {
        let o = self.run(args);
        assert_eq!(
            o.code, code,
            "bitsync {args:?}: expected exit {code}, got {}; stderr: {}",
            o.code, o.stderr
        );
        assert!(
            o.stderr.contains("bitsync:"),
            "no error line on stderr: {:?}",
            o.stderr
        );
        o
    }

    fn init(&self) -> String {
        let id = self.ok(&["init"]).last_line();
        assert_hex64(&id);
        id
    }

    /// Write `data` to a file in the temp dir and `put` it; returns the content id.
    fn put_bytes(&self, name: &str, data: &[u8]) -> String {
        let f = self.root().join(name);
        fs::write(&f, data).unwrap();
        let id = self.ok(&["put", f.to_str().unwrap()]).last_line();
        assert_hex64(&id);
        id
    }

    fn get_file(&self, id: &str, name: &str) -> Vec<u8> {
        let out = self.root().join(name);
        self.ok(&["get", id, "-o", out.to_str().unwrap()]);
        fs::read(&out).unwrap()
    }

    fn ls_json(&self) -> Vec<serde_json::Value> {
        let o = self.ok(&["ls", "--json"]);
        let v: serde_json::Value =
            serde_json::from_slice(&o.stdout).expect("ls --json prints JSON");
        v.as_array().expect("ls --json prints an array").clone()
    }

    fn peers_json(&self) -> Vec<serde_json::Value> {
        let o = self.ok(&["peer", "ls", "--json"]);
        let v: serde_json::Value =
            serde_json::from_slice(&o.stdout).expect("peer ls --json prints JSON");
        v.as_array()
            .expect("peer ls --json prints an array")
            .clone()
    }
}

fn assert_hex64(s: &str) {
    assert!(
        s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "not a 64-char lowercase hex id: {s:?}"
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

// ---- put / get round trips ----------------------------------------------------

#[test]
fn round_trip_at_chunk_boundaries() {
    let t = T::new();
    t.init();
    // (size, chunks expected with the default 1 MiB chunk size)
    let cases = [(0usize, 1u64), (1, 1), (MIB, 1), (MIB + 1, 2)];
    let mut ids = Vec::new();
    for (i, (size, _)) in cases.iter().enumerate() {
        let data = data(i as u64 + 1, *size);
        let id = t.put_bytes(&format!("in-{size}"), &data);
        let back = t.get_file(&id, &format!("out-{size}"));
        assert_eq!(back.len(), data.len(), "size {size}: length differs");
        assert!(
            back == data,
            "size {size}: content differs after the round trip"
        );
        ids.push(id);
    }
    let unique: BTreeSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "content ids must differ");
    let list = t.ls_json();
    assert_eq!(list.len(), cases.len());
    for ((size, chunks), id) in cases.iter().zip(&ids) {
        let row = list
            .iter()
            .find(|r| r["content_id"] == id.as_str())
            .expect("put item is listed");
        assert_eq!(row["size"], *size as u64);
        assert_eq!(row["chunks"], *chunks, "size {size}");
        assert_eq!(row["complete"], true);
        assert_eq!(row["name"], format!("in-{size}"));
    }
    // Chunks on disk: one per chunk, each plaintext + 16-byte tag.
    let files = chunk_files(&t.data);
    assert_eq!(files.len() as u64, cases.iter().map(|c| c.1).sum::<u64>());
    let mut lens: Vec<u64> = files
        .iter()
        .map(|f| fs::metadata(f).unwrap().len())
        .collect();
    lens.sort();
    assert_eq!(lens, vec![16, 17, 17, MIB as u64 + 16, MIB as u64 + 16]);
    t.ok(&["verify"]);
}

#[test]
fn round_trip_50_mib() {
    let t = T::new();
    t.init();
    let data = data(50, 50 * MIB + 12345);
    let id = t.put_bytes("big", &data);
    let back = t.get_file(&id, "big.out");
    assert_eq!(back.len(), data.len());
    assert!(back == data, "50 MiB round trip differs");
    let list = t.ls_json();
    assert_eq!(list[0]["chunks"], 51);
    assert_eq!(chunk_files(&t.data).len(), 51);
}

#[test]
fn put_from_stdin_and_get_to_stdout() {
    let t = T::new();
    t.init();
    let data = data(9, 3 * MIB + 7);
    let mut c = t.cmd(&["put", "-", "--kind", "message", "--name", "from-stdin"]);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feed = data.clone();
    let w = std::thread::spawn(move || stdin.write_all(&feed));
    let o = child.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    assert!(
        o.status.success(),
        "put - failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let id = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    assert_hex64(&id);

    // get with no -o, and with -o -, both write to stdout.
    let a = t.ok(&["get", &id]);
    assert!(a.stdout == data, "get to stdout differs");
    let b = t.ok(&["get", &id, "-o", "-"]);
    assert!(b.stdout == data, "get -o - differs");

    let list = t.ls_json();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["kind"], "message");
    assert_eq!(list[0]["name"], "from-stdin");
    assert_eq!(list[0]["size"], data.len() as u64);
}

#[test]
fn put_prints_content_id_last_and_ls_shows_it() {
    let t = T::new();
    let node = t.init();
    // An empty node lists nothing.
    assert!(t.ls_json().is_empty());
    let table = t.ok(&["ls"]).text();
    assert_eq!(
        table.lines().count(),
        1,
        "empty ls prints only the header: {table:?}"
    );
    assert!(table.contains("CONTENT ID"));

    let a = t.put_bytes("alpha.txt", b"hello\n");
    let b = t.put_bytes("beta.bin", &data(2, 5000));
    // The same bytes put twice are two items (ids hash the signed body, not the plaintext).
    let a2 = t.put_bytes("alpha.txt", b"hello\n");
    assert_ne!(a, a2);

    let table = t.ok(&["ls"]).text();
    for (id, name) in [(&a, "alpha.txt"), (&b, "beta.bin"), (&a2, "alpha.txt")] {
        let line = table
            .lines()
            .find(|l| l.starts_with(id.as_str()))
            .unwrap_or_else(|| panic!("{id} not in ls:\n{table}"));
        assert!(
            line.contains(name) && line.contains("file") && line.contains(" ok "),
            "bad ls line: {line:?}"
        );
    }

    let list = t.ls_json();
    assert_eq!(list.len(), 3);
    let ids: Vec<&str> = list
        .iter()
        .map(|r| r["content_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        vec![a.as_str(), b.as_str(), a2.as_str()],
        "ls --json is in seq order"
    );
    let seqs: Vec<u64> = list.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs increase: {seqs:?}"
    );
    for r in &list {
        assert_eq!(r["publisher"], node.as_str());
        assert_eq!(r["kind"], "file");
        assert_eq!(r["complete"], true);
        assert!(r["created_at_ms"].as_i64().unwrap() > 1_600_000_000_000);
    }
    assert_eq!(list[1]["size"], 5000);
    assert_eq!(list[1]["chunks"], 1);
}

// ---- identity ------------------------------------------------------------------

#[test]
fn init_twice_keeps_the_same_id() {
    let t = T::new();
    let first = t.init();
    let key_before = fs::read(t.data.join("node.key")).unwrap();
    let again = t.ok(&["init"]);
    assert_eq!(again.last_line(), first);
    assert!(
        again.stderr.contains("already initialized"),
        "stderr: {}",
        again.stderr
    );
    assert_eq!(
        fs::read(t.data.join("node.key")).unwrap(),
        key_before,
        "init must not touch an existing key"
    );
    assert_eq!(t.ok(&["id"]).last_line(), first);

    // Layout and modes.
    for f in ["config.toml", "node.key", "bitsync.db"] {
        assert!(t.data.join(f).is_file(), "{f} missing");
    }
    for d in ["chunks", "quarantine"] {
        assert!(t.data.join(d).is_dir(), "{d}/ missing");
    }
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&t.data), 0o700);
    assert_eq!(mode(&t.data.join("node.key")), 0o600);
    let key = String::from_utf8(key_before).unwrap();
    assert!(
        key.starts_with("-----BEGIN PRIVATE KEY-----"),
        "unsealed key is PKCS#8 PEM"
    );
}

#[test]
fn id_is_sha256_of_the_public_key_spki() {
    let t = T::new();
    let id = t.init();
    let o = t.ok(&["id", "--public-key"]);
    let text = o.text();
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), id);
    let pem: Vec<&str> = lines.collect();
    assert_eq!(pem.first().copied(), Some("-----BEGIN PUBLIC KEY-----"));
    assert_eq!(pem.last().copied(), Some("-----END PUBLIC KEY-----"));
    let b64: String = pem[1..pem.len() - 1].concat();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(&der)),
        id,
        "node id = SHA-256 of the SPKI DER"
    );
}

// ---- peers -----------------------------------------------------------------------

#[test]
fn peer_add_ls_revoke() {
    let t = T::new();
    let me = t.init();
    assert!(t.peers_json().is_empty());
    let p1 = "ab".repeat(32);
    let p2 = "cd".repeat(32);
    let o = t.ok(&["peer", "add", &p1, "peer-one.example:7450", "--name", "one"]);
    assert!(o.stderr.contains(&p1), "add names the peer: {}", o.stderr);
    t.ok(&[
        "peer",
        "add",
        &p2,
        "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion",
        "--mirror",
    ]);

    let peers = t.peers_json();
    assert_eq!(peers.len(), 2);
    let get = |id: &str| peers.iter().find(|p| p["node_id"] == id).unwrap().clone();
    assert_eq!(get(&p1)["state"], "trusted");
    assert_eq!(get(&p1)["name"], "one");
    assert_eq!(get(&p1)["address"], "peer-one.example:7450");
    assert_eq!(get(&p1)["mirror"], false);
    assert_eq!(get(&p2)["mirror"], true);
    // The table: status's columns with the whole id and when it was added.
    let table = t.ok(&["peer", "ls"]).text();
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(
        rows[0],
        ["NODE ID", "STATE", "LEVEL", "ROLE", "MIRROR", "ADDRESS", "ADDED", "NAME"],
        "{table}"
    );
    let row = |id: &str| rows.iter().find(|r| r[0] == id).unwrap().clone();
    let (r1, r2) = (row(&p1), row(&p2));
    assert_eq!(
        [r1[1], r1[2], r1[3], r1[4], r1[5], r1[7]],
        [
            "trusted",
            "keyed",
            "-",
            "no",
            "peer-one.example:7450",
            "one"
        ],
        "{table}"
    );
    assert!(r1[6].starts_with("20") && r1[6].ends_with('Z'), "{table}");
    assert_eq!([r2[4], r2[7]], ["yes", "-"], "no name shows as -: {table}");

    t.ok(&["peer", "revoke", &p1]);
    let peers = t.peers_json();
    let p = peers.iter().find(|p| p["node_id"] == p1.as_str()).unwrap();
    assert_eq!(p["state"], "revoked");
    assert_eq!(p["name"], "one", "revoking keeps the name");

    // Re-adding a revoked peer trusts it again.
    t.ok(&["peer", "add", &p1, "peer-one.example:7450"]);
    let peers = t.peers_json();
    assert_eq!(
        peers.iter().find(|p| p["node_id"] == p1.as_str()).unwrap()["state"],
        "trusted"
    );

    // Errors.
    t.fails(&["peer", "add", "not-a-node-id", "h:1"], 2);
    t.fails(&["peer", "add", &"zz".repeat(32), "h:1"], 2);
    t.fails(&["peer", "add", &"ab".repeat(31), "h:1"], 2);
    t.fails(&["peer", "add", &"ef".repeat(32), "no-port-here"], 2);
    t.fails(&["peer", "add", &me, "h:1"], 2);
    t.fails(&["peer", "revoke", "xyz"], 2);
    let o = t.fails(&["peer", "revoke", &"ef".repeat(32)], 3);
    assert!(o.stderr.contains("peer list"), "{}", o.stderr);
    assert_eq!(t.peers_json().len(), 2, "failed commands change nothing");
}

// ---- verify ----------------------------------------------------------------------

#[test]
fn verify_is_clean_then_names_a_flipped_chunk() {
    let t = T::new();
    t.init();
    let o = t.ok(&["verify"]);
    assert!(o.stderr.contains("0 problem"), "{}", o.stderr);
    t.put_bytes("a", &data(3, 2 * MIB + 10));
    t.put_bytes("b", b"small");
    let o = t.ok(&["verify"]);
    assert!(
        o.stderr
            .contains("checked 4 chunks and 2 manifests: 0 problem"),
        "{}",
        o.stderr
    );
    assert!(o.stdout.is_empty());

    let files = chunk_files(&t.data);
    let victim = files
        .iter()
        .find(|f| fs::metadata(f).unwrap().len() > 100)
        .unwrap();
    let victim_id = victim.file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(
        victim
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap(),
        &victim_id[..2]
    );
    flip_byte(victim, 1000);

    let o = t.fails(&["verify"], 5);
    assert!(
        o.text().contains(&victim_id),
        "verify output must name chunk {victim_id}: {}",
        o.text()
    );
    assert!(!victim.exists(), "the bad chunk is moved out of chunks/");
    assert!(
        t.data.join("quarantine").join(&victim_id).exists(),
        "the bad chunk is in quarantine/"
    );
    // Still not clean: the item lacks a chunk now.
    let o = t.fails(&["verify"], 5);
    assert!(o.text().contains("missing"), "{}", o.text());
    let list = t.ls_json();
    assert_eq!(list.iter().filter(|r| r["complete"] == false).count(), 1);
}

// ---- errors ----------------------------------------------------------------------

#[test]
fn missing_data_dir_exits_3_and_creates_nothing() {
    let t = T::new();
    let input = t.root().join("input.txt");
    fs::write(&input, b"x").unwrap();
    let out = t.root().join("out.bin");
    let before = entries(t.root());
    let cid = "ab".repeat(32);
    let commands: Vec<Vec<&str>> = vec![
        vec!["id"],
        vec!["id", "--public-key"],
        vec!["ls"],
        vec!["ls", "--json"],
        vec!["put", input.to_str().unwrap()],
        vec!["put", "-"],
        vec!["get", &cid],
        vec!["get", &cid, "-o", out.to_str().unwrap()],
        vec!["verify"],
        vec!["peer", "ls"],
        vec!["peer", "ls", "--json"],
        vec!["peer", "add", &cid, "host:1"],
        vec!["peer", "revoke", &cid],
    ];
    for args in &commands {
        let o = t.fails(args, 3);
        assert!(
            o.stderr.contains("bitsync init"),
            "{args:?}: message must say to run `bitsync init`: {}",
            o.stderr
        );
        assert!(o.stdout.is_empty(), "{args:?} printed on stdout");
        assert!(!t.data.exists(), "{args:?} created the data dir");
        assert_eq!(entries(t.root()), before, "{args:?} created something");
    }

    // An existing but empty directory is not a data dir either, and stays empty.
    fs::create_dir(&t.data).unwrap();
    for args in &commands {
        let o = t.fails(args, 3);
        assert!(o.stderr.contains("bitsync init"), "{args:?}: {}", o.stderr);
        assert!(
            entries(&t.data).is_empty(),
            "{args:?} wrote into an uninitialized dir: {:?}",
            entries(&t.data)
        );
    }
}

#[test]
fn missing_input_file_exits_3_and_stores_nothing() {
    let t = T::new();
    t.init();
    let missing = t.root().join("no-such-file");
    let o = t.fails(&["put", missing.to_str().unwrap()], 3);
    assert!(
        o.stderr.contains("no-such-file"),
        "names the file: {}",
        o.stderr
    );
    assert!(t.ls_json().is_empty());
    assert!(chunk_files(&t.data).is_empty());
    let db = rusqlite::Connection::open(t.data.join("bitsync.db")).unwrap();
    let n: i64 = db
        .query_row("SELECT COUNT(*) FROM chunks", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);

    // A directory is not an input file either.
    t.fails(&["put", t.root().to_str().unwrap()], 2);
    assert!(t.ls_json().is_empty());
}

/// An item one manifest cannot list is refused before any chunk is written.
/// (At 4 KiB chunks the limit is 92,521 chunks; the input is a sparse file.)
#[test]
fn oversized_item_is_refused_before_writing() {
    let t = T::new();
    t.init();
    t.use_4k_chunks();
    let input = t.root().join("huge");
    let f = fs::File::create(&input).unwrap();
    f.set_len(bitsync::manifest::MAX_CHUNKS_PER_ITEM * 4096 + 1)
        .unwrap();
    let o = t.fails(&["put", input.to_str().unwrap()], 2);
    assert!(
        o.stderr.contains("one item holds at most 92521"),
        "says why: {}",
        o.stderr
    );
    assert!(chunk_files(&t.data).is_empty(), "nothing was written");
    assert!(t.ls_json().is_empty());
}

#[test]
fn unknown_content_id_exits_3() {
    let t = T::new();
    t.init();
    t.put_bytes("a", b"something");
    let out = t.root().join("out");
    let o = t.fails(&["get", &"00".repeat(32), "-o", out.to_str().unwrap()], 3);
    assert!(o.stderr.contains(&"00".repeat(32)), "{}", o.stderr);
    assert!(!out.exists());
    let o = t.fails(&["get", &"00".repeat(32)], 3);
    assert!(o.stdout.is_empty());
    // Malformed ids are usage errors.
    t.fails(&["get", "xyz"], 2);
    t.fails(&["get", &"0".repeat(63)], 2);
    assert!(!out.exists());
}

#[test]
fn sealed_key_needs_the_right_passphrase() {
    let t = T::new();
    let pass = [("BITSYNC_PASSPHRASE", "correct horse battery staple")];
    let wrong = [("BITSYNC_PASSPHRASE", "wrong")];

    // --seal with no passphrase source and no terminal: refused, nothing created.
    let o = t.run(&["init", "--seal"]);
    assert_eq!(o.code, 6, "{}", o.stderr);
    assert!(!t.data.exists());

    let o = t.run_env(&["init", "--seal"], &pass);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let id = o.last_line();
    assert_hex64(&id);
    let key = fs::read_to_string(t.data.join("node.key")).unwrap();
    assert!(
        key.starts_with("-----BEGIN BITSYNC SEALED KEY-----\n"),
        "{key}"
    );
    assert!(key.trim_end().ends_with("-----END BITSYNC SEALED KEY-----"));
    assert!(!key.contains("PRIVATE KEY"));
    let b64: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    let sealed = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(&sealed[..4], b"BSS1");
    assert_eq!(sealed[4], 15, "scrypt log_n");
    assert_eq!(
        &sealed[5..13],
        &[0, 0, 0, 8, 0, 0, 0, 1],
        "scrypt r and p, big-endian"
    );

    // Right passphrase: everything works.
    let o = t.run_env(&["id"], &pass);
    assert_eq!((o.code, o.last_line()), (0, id.clone()), "{}", o.stderr);
    let f = t.root().join("in");
    fs::write(&f, b"sealed node content").unwrap();
    let o = t.run_env(&["put", f.to_str().unwrap()], &pass);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let cid = o.last_line();
    let o = t.run_env(&["get", &cid], &pass);
    assert_eq!(
        (o.code, o.stdout.as_slice()),
        (0, &b"sealed node content"[..]),
        "{}",
        o.stderr
    );

    // A passphrase file works too.
    let pf = t.root().join("pass.txt");
    fs::write(&pf, "correct horse battery staple\n").unwrap();
    let o = t.run(&["--passphrase-file", pf.to_str().unwrap(), "id"]);
    assert_eq!((o.code, o.last_line()), (0, id.clone()), "{}", o.stderr);

    // Wrong passphrase: exit 6, from every command.
    for args in [
        vec!["id"],
        vec!["ls"],
        vec!["get", cid.as_str()],
        vec!["verify"],
        vec!["peer", "ls"],
    ] {
        let o = t.run_env(&args, &wrong);
        assert_eq!(o.code, 6, "{args:?}: {}", o.stderr);
        assert!(o.stderr.contains("wrong passphrase"), "{}", o.stderr);
        assert!(o.stdout.is_empty());
    }
    let wf = t.root().join("wrong.txt");
    fs::write(&wf, "nope\n").unwrap();
    assert_eq!(
        t.run(&["--passphrase-file", wf.to_str().unwrap(), "id"])
            .code,
        6
    );
    // No passphrase at all, and no terminal to ask on.
    let o = t.run(&["id"]);
    assert_eq!(o.code, 6, "{}", o.stderr);
    assert!(
        o.stderr.contains("BITSYNC_PASSPHRASE"),
        "says how to give one: {}",
        o.stderr
    );
    // init on the sealed dir does not need the passphrase and changes nothing.
    assert_eq!(t.ok(&["init"]).last_line(), id);
}

#[test]
fn data_dir_that_is_a_file_is_a_clear_error() {
    let t = T::new();
    fs::write(&t.data, b"not a directory").unwrap();
    for args in [vec!["id"], vec!["ls"], vec!["init"]] {
        let o = t.run(&args);
        assert_ne!(o.code, 0, "{args:?} succeeded on a file");
        assert!(
            o.stderr.contains(t.data.to_str().unwrap()),
            "{args:?}: names the path: {}",
            o.stderr
        );
        assert!(
            o.stderr.contains("ot a directory"),
            "{args:?}: says why: {}",
            o.stderr
        );
    }
    assert_eq!(fs::read(&t.data).unwrap(), b"not a directory");
}

#[test]
fn unreadable_data_dir_is_a_clear_error() {
    let t = T::new();
    t.init();
    fs::set_permissions(&t.data, fs::Permissions::from_mode(0o000)).unwrap();
    let check = |o: Out| {
        assert_ne!(o.code, 0, "succeeded on an unreadable data dir");
        assert!(
            o.stderr.contains(t.data.to_str().unwrap()),
            "names the path: {}",
            o.stderr
        );
        assert!(
            o.stderr.contains("Permission denied"),
            "says why: {}",
            o.stderr
        );
        assert_eq!(
            o.code, 7,
            "permission problems are Denied (7): {}",
            o.stderr
        );
    };
    if !is_root() {
        check(t.run(&["id"]));
        check(t.run(&["ls"]));
    } else {
        // chmod does not bite root. Run the command as `nobody` instead, if this
        // sandbox lets us switch users; the temp dir must be searchable for that.
        use std::os::unix::process::CommandExt;
        fs::set_permissions(t.root(), fs::Permissions::from_mode(0o755)).unwrap();
        let mut c = t.cmd(&["ls"]);
        c.uid(65534).gid(65534);
        match c.output() {
            Ok(o) => check(Out {
                status: o.status,
                code: o.status.code().unwrap_or(-1),
                stdout: o.stdout,
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            }),
            Err(e) => {
                eprintln!("skipping the unreadable-dir assertion: cannot run as nobody here: {e}")
            }
        }
    }
    fs::set_permissions(&t.data, fs::Permissions::from_mode(0o700)).unwrap();
    t.ok(&["id"]);
}

// ---- known problems (these fail until the code is fixed) ---------------------------

/// Opening a node (any command) empties `chunks/tmp/`, which also deletes the
/// temp files of a `put` running at the same time; that put then fails with
/// "renaming chunk into …: No such file or directory".
#[test]
fn concurrent_commands_do_not_break_a_running_put() {
    let t = T::new();
    t.init();
    t.use_4k_chunks();
    let input = t.root().join("in");
    fs::write(&input, data(4, 8 * MIB)).unwrap();
    let mut put = t.cmd(&["put", input.to_str().unwrap()]);
    put.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = put.spawn().unwrap();
    let start = Instant::now();
    let mut others = 0;
    while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(120) {
        t.run(&["id"]);
        others += 1;
    }
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "put failed while {others} other commands ran: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    t.ok(&["verify"]);
}

/// systemd's StateDirectory gives `init` an existing empty directory. If that
/// first init is interrupted after writing the key and the chunk dirs but
/// before the database is renamed in, every later `init` refuses the
/// directory ("exists and is not a bitsync data dir") and the service can
/// never start.
#[test]
fn init_resumes_after_an_interrupted_init_in_an_existing_dir() {
    let t = T::new();
    fs::create_dir(&t.data).unwrap();
    t.init();
    // The state an interruption just before the database rename leaves.
    fs::remove_file(t.data.join("bitsync.db")).unwrap();
    fs::write(t.data.join(".bitsync.db.init"), b"").unwrap();
    // An interruption while the key or the config was being written leaves
    // their temp files, named after the pid of the process that died.
    fs::write(t.data.join(".node.key.tmp-4242"), b"half a key").unwrap();
    fs::write(t.data.join(".config.toml.tmp-4242"), b"half").unwrap();
    let o = t.run(&["init"]);
    assert_eq!(
        o.code, 0,
        "init after an interrupted init failed: {}",
        o.stderr
    );
    t.ok(&["id"]);
    for stale in [".node.key.tmp-4242", ".config.toml.tmp-4242"] {
        assert!(!t.data.join(stale).exists(), "{stale} was left behind");
    }
}

/// `init --seal` on a node whose key is not sealed asks for a passphrase,
/// then reports "already initialized; nothing changed" and exits 0: the
/// operator believes the key is now sealed, and it is not. It should either
/// seal the existing key or refuse.
#[test]
fn init_seal_on_an_unsealed_node_does_not_pretend_to_seal() {
    let t = T::new();
    let id = t.init();
    let o = t.run_env(&["init", "--seal"], &[("BITSYNC_PASSPHRASE", "pass")]);
    let key = fs::read_to_string(t.data.join("node.key")).unwrap();
    let sealed = key.contains("BITSYNC SEALED KEY");
    assert!(
        o.code != 0 || sealed,
        "init --seal exited 0 but left the key unsealed (stderr: {})",
        o.stderr.trim()
    );
    if sealed {
        let o = t.run_env(&["id"], &[("BITSYNC_PASSPHRASE", "pass")]);
        assert_eq!(o.last_line(), id, "sealing must keep the identity");
    }
}

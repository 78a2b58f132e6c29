//! `bitsync status` as a person reads it (issue 16): the node, its
//! addresses, its peers, its mirrors with lag and last sync; `--json` for
//! scripts. Two real nodes: b mirrors a.

use std::process::Stdio;

use serde_json::Value;

use crate::support::*;

/// The mirror job in `status --json` of the node at `dir`, once `pred` holds for it.
fn mirror_job(dir: &std::path::Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(90, what, || {
        let v: Value = serde_json::from_slice(&ok_at(dir, &["status", "--json"]).stdout).unwrap();
        let j = v["jobs"]
            .as_array()?
            .iter()
            .find(|j| j["kind"] == "mirror")?;
        pred(j).then(|| j.clone())
    })
}

/// The table row that starts with `first`.
fn row<'a>(table: &'a str, first: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.starts_with(first))
        .unwrap_or_else(|| panic!("no row {first:?} in\n{table}"))
}

#[test]
fn status_shows_peers_and_mirror_lag_as_a_table() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ok_at(&a, &["init"]);
    let item = tmp.path().join("item");
    std::fs::write(&item, data(9, 20_000)).unwrap();
    ok(bitsync(&a).arg("put").arg(&item));
    let mut sa = Serve::start(&a);
    let token = tmp.path().join("token");
    std::fs::write(&token, format!("{}\n", sa.invite())).unwrap();
    let stdin = Stdio::from(std::fs::File::open(&token).unwrap());
    let o = run_io(bitsync(&b).args(["clone", "-"]), stdin, None, CMD_TIMEOUT);
    assert_eq!(o.code, 0, "clone: {o:?}");
    ok_at(
        &b,
        &[
            "peer",
            "add",
            &sa.node_id,
            &sa.addr,
            "--name",
            "node a",
            "--mirror",
        ],
    );
    let sb = Serve::start(&b);
    mirror_job(&b, "b's mirror of a to be up to date", |j| {
        j["phase"] == "DONE"
    });

    let table = ok_at(&b, &["status"]).text();
    let a_id = sa.node_id.clone();
    let (a_short, b_id) = (&a_id[..12], sb.node_id.as_str());
    assert!(row(&table, "node").ends_with(b_id), "{table}");
    assert!(row(&table, "listen").ends_with(&sb.addr), "{table}");
    assert!(row(&table, "stored").contains(" 1 items, "), "{table}");
    let store = format!("chunk dir {}", b.join("chunks").display());
    assert!(row(&table, "chunks in").ends_with(&store), "{table}");
    assert_eq!(
        cols(row(&table, "PEER")),
        ["PEER", "STATE", "ROLE", "MIRROR", "ADDRESS", "NAME"]
    );
    assert_eq!(
        cols(row(&table, a_short)),
        [a_short, "trusted", "keyed", "yes", &sa.addr, "node a"],
        "{table}"
    );
    let mirror = table
        .lines()
        .skip_while(|l| !l.starts_with("MIRROR"))
        .nth(1)
        .unwrap_or_else(|| panic!("no mirror table in\n{table}"));
    let m = cols(mirror);
    assert_eq!(&m[..3], [a_short, "up to date", "0s"], "{table}");
    assert!(m[3].ends_with(" ago"), "last sync: {table}");
    assert!(table.contains("no jobs running"), "{table}");

    // With a gone, b's mirror fails: the lag is counted from the last sync.
    sa.terminate(30);
    mirror_job(&b, "b's mirror of a to fail", |j| j["phase"] == "FAILED");
    let table = ok_at(&b, &["status"]).text();
    let mirror = table
        .lines()
        .skip_while(|l| !l.starts_with("MIRROR"))
        .nth(1)
        .unwrap();
    let m = cols(mirror);
    assert_eq!(&m[..2], [a_short, "failed, retrying"], "{table}");
    assert!(m[2].ends_with('s') && m[2] != "-", "lag: {table}");
    assert!(m[3].ends_with(" ago"), "{table}");
    assert!(
        m[4].contains("interrupted") || m[4].contains("cannot reach"),
        "{table}"
    );

    // --json stays the object scripts read: the same keys as before the table.
    let v: Value = serde_json::from_slice(&ok_at(&b, &["status", "--json"]).stdout).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "chunk_store",
            "chunks",
            "head_seq",
            "jobs",
            "listen_address",
            "manifests",
            "name",
            "node_id",
            "onion_address",
            "stored_bytes",
            "trusted_peers",
            "uptime_ms",
            "version"
        ]
    );
    let mut jk: Vec<&str> = v["jobs"][0]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    jk.sort();
    assert_eq!(
        jk,
        [
            "bytes_done",
            "items_done",
            "kind",
            "last_error",
            "peer",
            "phase"
        ]
    );
}

/// A clone running in the node (Admin/Clone), slowed by a paced proxy, is
/// in the JOBS table with its peer, phase, items and bytes of the total, and
/// rate.
#[test]
fn status_shows_a_running_job_with_its_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ok_at(&a, &["init"]);
    ok_at(&b, &["init"]);
    let item = tmp.path().join("item");
    std::fs::write(&item, data(5, 4 << 20)).unwrap();
    ok(bitsync(&a).arg("put").arg(&item));
    let sa = Serve::start(&a);
    // About 4 s for the item at 1 MiB/s: long enough to be seen running.
    let slow = proxy(sa.addr.parse().unwrap(), Some(1 << 20));
    let b_id = ok_at(&b, &["id"]).last_line();
    ok_at(&a, &["peer", "add", &b_id, "127.0.0.1:9"]);
    ok_at(&b, &["peer", "add", &sa.node_id, &slow.addr.to_string()]);
    let sb = Serve::start(&b);
    let sock = sb.socket();
    let req = format!(r#"{{"token_or_peer":"{}"}}"#, sa.node_id);
    let clone = std::thread::spawn(move || admin(&sock, "Clone", &req));

    let a_short = &sa.node_id[..12];
    let (table, job) = wait_for(60, "the clone to show progress in `status`", || {
        let table = ok_at(&b, &["status"]).text();
        let job = cols(table.lines().find(|l| l.starts_with("clone"))?);
        (job[2] == "CHUNKS" && !job[4].starts_with("0 B/")).then_some((table, job))
    });
    assert!(table.contains("JOB  "), "{table}");
    assert_eq!(&job[..4], ["clone", a_short, "CHUNKS", "0/1"], "{table}");
    assert!(
        job[4].contains("/4.00 MiB (") && job[4].ends_with("%)"),
        "{table}"
    );
    assert!(job[5].ends_with("/s") && job[5] != "0 B/s", "rate: {table}");
    let out = clone.join().unwrap();
    assert_eq!(out.code, 0, "Admin/Clone: {out:?}");
    assert!(out.text().contains("DONE"), "{out:?}");
}

/// The cells of a table row (columns are two or more spaces apart).
fn cols(l: &str) -> Vec<String> {
    l.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(String::from)
        .collect()
}

//! `bitsync clone-instance`: the real binary copying real data dirs.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;

use crate::support::{self, *};
use bitsync::crypto::ContentId;
use rusqlite::Connection;
use tempfile::TempDir;

/// `clone-instance` of the data dir `data` into its usual layout under `dest`.
fn clone_cmd(home: &Path, data: &Path, dest: &Path) -> Command {
    clone_to(home, data, &dest.join("bitsync.db"), &dest.join("chunks"))
}

/// `clone-instance` of the data dir `data` to the database `db` and the chunk dir `att`.
fn clone_to(home: &Path, data: &Path, db: &Path, att: &Path) -> Command {
    let mut c = command(home);
    c.arg("--data-dir").arg(data).arg("clone-instance");
    c.arg("--dest-db")
        .arg(db)
        .arg("--dest-attachments")
        .arg(att);
    c
}

/// `clone-instance` of the database `src_db` with the chunk dir `src_att`
/// (no data dir) to the database `db` and the chunk dir `att`.
fn clone_from(home: &Path, src_db: &Path, src_att: &Path, db: &Path, att: &Path) -> Command {
    let mut c = command(home);
    c.arg("clone-instance")
        .arg("--source-db")
        .arg(src_db)
        .arg("--source-attachments")
        .arg(src_att);
    c.arg("--dest-db")
        .arg(db)
        .arg("--dest-attachments")
        .arg(att);
    c
}

/// Manifests, envelopes, chunks and settings rows.
type Rows = (
    Vec<(String, Vec<u8>, Vec<u8>, i64)>,
    Vec<(String, String, Vec<u8>)>,
    Vec<(String, i64)>,
    Vec<(String, String)>,
);

/// Rows of a bitsync database that define its content, for comparison.
fn rows(db: &Path) -> Rows {
    let c = Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let q = |sql: &str| -> Vec<Vec<rusqlite::types::Value>> {
        let mut st = c.prepare(sql).unwrap();
        let n = st.column_count();
        st.query_map([], |r| {
            (0..n)
                .map(|i| r.get::<_, rusqlite::types::Value>(i))
                .collect()
        })
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
    };
    use rusqlite::types::Value as V;
    let t = |v: &V| match v {
        V::Text(s) => s.clone(),
        other => panic!("not text: {other:?}"),
    };
    let b = |v: &V| match v {
        V::Blob(s) => s.clone(),
        other => panic!("not blob: {other:?}"),
    };
    let i = |v: &V| match v {
        V::Integer(n) => *n,
        other => panic!("not int: {other:?}"),
    };
    (
        q("SELECT content_id, body, signature, seq FROM manifests ORDER BY content_id")
            .iter()
            .map(|r| (t(&r[0]), b(&r[1]), b(&r[2]), i(&r[3])))
            .collect(),
        q("SELECT content_id, recipient, wrapped FROM envelopes ORDER BY content_id, recipient")
            .iter()
            .map(|r| (t(&r[0]), t(&r[1]), b(&r[2])))
            .collect(),
        q("SELECT chunk_id, size FROM chunks ORDER BY chunk_id")
            .iter()
            .map(|r| (t(&r[0]), i(&r[1])))
            .collect(),
        q("SELECT key, value FROM meta ORDER BY key")
            .iter()
            .map(|r| (t(&r[0]), t(&r[1])))
            .collect(),
    )
}

/// A live node whose recent writes are still only in the -wal file: the copy
/// has them all (a file copy of bitsync.db would not).
#[test]
fn live_node_with_uncheckpointed_wal_loses_nothing() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let data = tmp.path().join("node");
    let node = init_node(&data, 8192);
    let db_path = data.join("bitsync.db");
    // Held open for the whole test: no checkpoint when the node's own connections close.
    let hold = Connection::open(&db_path).unwrap();
    hold.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    hold.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    let mut items: BTreeMap<ContentId, Vec<u8>> = BTreeMap::new();
    for i in 0..6 {
        let b = support::data(i + 1, 3_000 + i as usize * 11_000);
        items.insert(put(&node, &format!("w{i}"), &b), b);
    }
    hold.execute(
        "INSERT INTO meta(key, value) VALUES ('instance.marker', 'in the wal')",
        [],
    )
    .unwrap();
    let wal = fs::metadata(data.join("bitsync.db-wal")).unwrap().len();
    assert!(wal > 0, "the -wal file holds the recent writes");
    // Proof that the main file alone lacks them: a plain file copy.
    let naive = tmp.path().join("naive.db");
    fs::copy(&db_path, &naive).unwrap();
    let n: i64 = Connection::open(&naive)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM manifests", [], |r| r.get(0))
        .unwrap();
    assert!(
        n < items.len() as i64,
        "a file copy loses WAL content ({n} of {} items)",
        items.len()
    );

    // Same identity: the database copy has every row of the live one.
    let same = tmp.path().join("same");
    let r = ok(&mut clone_cmd(home, &data, &same));
    assert!(
        r.stderr.contains("not yet checkpointed"),
        "the plan shows the WAL: {r:?}"
    );
    assert!(r.stderr.contains("integrity_check ok"), "{r:?}");
    assert_eq!(rows(&same.join("bitsync.db")), rows(&db_path));
    assert!(
        !same.join("bitsync.db-wal").exists(),
        "the copy is one self-contained file"
    );
    let mut src_chunks = tree(&data.join("chunks"));
    src_chunks.retain(|(p, _)| !p.starts_with("tmp"));
    assert_eq!(
        tree(&same.join("chunks")),
        src_chunks,
        "every chunk, byte for byte"
    );
    assert!(
        !same.join("node.key").exists(),
        "no key without --new-identity"
    );

    // New identity: a runnable node that reads every item.
    let copy = tmp.path().join("copy");
    let r = ok(clone_cmd(home, &data, &copy).arg("--new-identity"));
    let new_id = r.last_line();
    assert_ne!(new_id, node.id().to_hex());
    assert!(
        r.stderr
            .contains(&format!("{}", copy.join("node.key").display())),
        "says where the key is: {r:?}"
    );
    let c = open(&copy);
    assert_eq!(c.id().to_hex(), new_id);
    assert_eq!(
        c.db().setting("instance.marker").unwrap().as_deref(),
        Some("in the wal")
    );
    let mut ids = c.db().content_ids().unwrap();
    ids.sort();
    assert_eq!(ids, items.keys().copied().collect::<Vec<_>>());
    for (id, want) in &items {
        assert_eq!(&get(&c, id), want);
        assert!(c.db().envelope(id, &node.id().to_hex()).unwrap().is_none());
    }
    ok(command(home).arg("--data-dir").arg(&copy).arg("verify"));
    // The source was only read.
    assert!(fs::metadata(data.join("bitsync.db-wal")).unwrap().len() >= wal);
    assert_eq!(open(&data).db().content_ids().unwrap().len(), items.len());
    drop(hold);
}

/// An existing destination: refused without a terminal, replaced with
/// --force, and on a terminal only after a yes.
#[test]
fn existing_destination_needs_force_or_a_yes() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let data = tmp.path().join("node");
    let node = init_node(&data, 8192);
    put(&node, "a", &support::data(1, 20_000));
    let dest = tmp.path().join("dest");
    ok(&mut clone_cmd(home, &data, &dest));
    let before = tree(&dest);
    let b = put(&node, "b", &support::data(2, 20_000));

    let r = run(&mut clone_cmd(home, &data, &dest));
    assert_eq!(r.code, 4, "{r:?}");
    let last = r.stderr.trim().lines().last().unwrap();
    assert!(
        last.contains("no terminal") && last.contains("--force"),
        "{r:?}"
    );
    assert!(
        r.stderr.contains("will be replaced"),
        "the plan says what would be replaced: {r:?}"
    );
    assert_eq!(tree(&dest), before, "nothing changed");

    // On a terminal (a pty from script(1)): "n" keeps it, "y" replaces it.
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        let cmdline = format!(
            "{} --data-dir {} clone-instance --dest-db {} --dest-attachments {}",
            BIN,
            data.display(),
            dest.join("bitsync.db").display(),
            dest.join("chunks").display()
        );
        let ask = |answer: &str| {
            let mut child = std::process::Command::new("script")
                .args(["-qec", &cmdline, "/dev/null"])
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("HOME", home)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(answer.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).to_string(),
            )
        };
        let (code, text) = ask("n\n");
        assert_eq!(code, 4, "{text}");
        assert!(
            text.contains("Replace the existing destination? [y/N]")
                && text.contains("not replaced"),
            "{text}"
        );
        assert_eq!(tree(&dest), before);
        let (code, text) = ask("y\n");
        assert_eq!(code, 0, "{text}");
        assert!(open_copy_has(&dest, &b));
        // Back to the old state for the --force check below.
        fs::remove_dir_all(&dest).unwrap();
        ok(&mut clone_cmd(home, &data, &dest));
    } else {
        eprintln!("script(1) not found: the terminal prompt part of this test did not run");
    }

    let r = ok(clone_cmd(home, &data, &dest).arg("--force"));
    assert!(
        r.stderr.contains("copied and re-hashed"),
        "a summary at the end: {r:?}"
    );
    assert!(
        open_copy_has(&dest, &b),
        "replaced with the current instance"
    );
    assert_eq!(
        rows(&dest.join("bitsync.db")),
        rows(&data.join("bitsync.db"))
    );
    let names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "no temporary leftovers: {names:?}"
    );
    assert!(fs::read_dir(&dest).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with('.')));
}

fn open_copy_has(dest: &Path, id: &ContentId) -> bool {
    let c = Connection::open_with_flags(
        dest.join("bitsync.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    c.query_row(
        "SELECT COUNT(*) FROM manifests WHERE content_id = ?1",
        [id.to_hex()],
        |r| r.get::<_, i64>(0),
    )
    .unwrap()
        == 1
}

/// A damaged chunk in the source stops the copy: nothing appears at the
/// destination and the source is not changed (nothing quarantined).
#[test]
fn damaged_source_chunk_stops_the_copy_and_changes_nothing() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let data = tmp.path().join("node");
    let node = init_node(&data, 4096);
    put(&node, "a", &support::data(3, 30_000));
    let (bad, _) = node.db().chunk_list().unwrap()[2];
    let path = chunk_file(&data.join("chunks"), &bad);
    flip_byte(&path, 10);
    let damaged = fs::read(&path).unwrap();
    let src_before = tree(&data);

    for (dest, extra) in [
        (tmp.path().join("fresh"), None),
        (tmp.path().join("new"), Some("--new-identity")),
    ] {
        let mut c = clone_cmd(home, &data, &dest);
        if let Some(x) = extra {
            c.arg(x);
        }
        let r = run(&mut c);
        assert_eq!(r.code, 5, "{r:?}");
        assert!(
            r.stderr.contains(&bad.to_hex()) && r.stderr.contains("fails its hash"),
            "{r:?}"
        );
        assert!(!dest.exists(), "nothing at the destination");
    }
    // Separate paths (two renames): still nothing left behind.
    let r = run(&mut clone_to(
        home,
        &data,
        &tmp.path().join("db-here.db"),
        &tmp.path().join("att-here"),
    ));
    assert_eq!(r.code, 5, "{r:?}");
    let names: Vec<_> = fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with('.') && !n.contains("here")),
        "{names:?}"
    );
    assert_eq!(
        fs::read(&path).unwrap(),
        damaged,
        "the damaged chunk was left where it was"
    );
    let mut after = tree(&data);
    after.retain(|(p, _)| !p.to_string_lossy().starts_with("bitsync.db-"));
    let mut before = src_before;
    before.retain(|(p, _)| !p.to_string_lossy().starts_with("bitsync.db-"));
    assert_eq!(after, before, "the source data dir is unchanged");
}

/// Paths that make no sense are refused before anything is read or written.
#[test]
fn bad_paths_are_refused() {
    let tmp = TempDir::new().unwrap();
    let home = tmp.path();
    let data = tmp.path().join("node");
    let node = init_node(&data, 8192);
    put(&node, "a", &support::data(4, 5_000));
    // The destination is the source.
    let mut c = clone_to(home, &data, &data.join("bitsync.db"), &tmp.path().join("x"));
    assert_eq!(run(&mut c).code, 2);
    // Attachments inside the source's.
    let mut c = clone_to(
        home,
        &data,
        &tmp.path().join("y.db"),
        &data.join("chunks/inner"),
    );
    assert_eq!(run(&mut c).code, 2);
    // A source that does not exist.
    let (z_db, z) = (tmp.path().join("z.db"), tmp.path().join("z"));
    let mut c = clone_from(
        home,
        &tmp.path().join("none.db"),
        &data.join("chunks"),
        &z_db,
        &z,
    );
    let r = run(&mut c);
    assert_eq!(r.code, 3, "{r:?}");
    // A source that is not a bitsync database.
    let junk = tmp.path().join("junk.db");
    fs::write(&junk, vec![7u8; 8192]).unwrap();
    c = clone_from(home, &junk, &data.join("chunks"), &z_db, &z);
    let r = run(&mut c);
    assert_ne!(r.code, 0, "{r:?}");
    assert_eq!(r.stderr.trim().lines().count(), 1, "{r:?}");
    assert!(!tmp.path().join("z.db").exists() && !tmp.path().join("z").exists());
    // --dest-db and --dest-attachments are required.
    let mut c = command(home);
    c.arg("--data-dir").arg(&data).arg("clone-instance");
    assert_eq!(run(&mut c).code, 2);
}

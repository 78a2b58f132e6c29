//! What a clone takes from its source's instance config (GetInstanceConfig)
//! besides content: peers for review and `instance.*` settings, bounded
//! (issue 11, bug 7: a source listing 35,000 made-up peers had them all
//! stored). The source is a real node whose database holds the junk.

use crate::support::*;

/// Trusted peers written straight into `dir`'s database (the node is not
/// running), in one transaction.
fn add_peers(dir: &std::path::Path, peers: &[(String, String, String)]) {
    let mut c = rusqlite::Connection::open(dir.join("bitsync.db")).unwrap();
    let tx = c.transaction().unwrap();
    for (id, name, address) in peers {
        tx.execute(
            "INSERT INTO peers(node_id, name, address, state, added_at_ms) VALUES (?1, ?2, ?3, 'trusted', 0)",
            [id, name, address],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

fn fake_id(i: usize) -> String {
    bitsync::crypto::Hash::of(format!("junk peer {i}").as_bytes()).to_hex()
}

#[test]
fn a_source_cannot_fill_the_peer_table() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    ok_at(&a, &["init"]);
    let node = open(&a);
    put(&node, "x", b"some content");
    drop(node);
    let mut peers: Vec<(String, String, String)> = (0..1500)
        .map(|i| {
            (
                fake_id(i),
                format!("p{i}"),
                format!("127.0.0.1:{}", 1000 + i),
            )
        })
        .collect();
    for i in 0..5 {
        peers[i * 7].1 = "n".repeat(10_000); // a name over the limit
        peers[i * 7 + 1].2 = format!("not an address {i}");
    }
    add_peers(&a, &peers);

    let sa = Serve::start(&a);
    let b = tmp.path().join("b");
    let o = ok_at(&b, &["clone", &sa.invite()]);
    assert!(o.stderr.contains("over the limit of 1000"), "{o:?}");

    let db = db_read_only(&b);
    let (n, longest): (i64, i64) = db
        .query_row(
            "SELECT COUNT(*), MAX(LENGTH(name)) FROM peers WHERE state = 'imported'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!((990..=1000).contains(&n), "{n} peers imported");
    assert!(longest <= 256, "a name of {longest} bytes was imported");
    let junk: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM peers WHERE address LIKE 'not an address%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(junk, 0);
    // The content came all the same.
    assert_eq!(
        ok_at(&b, &["ls", "--json"])
            .text()
            .matches("content_id")
            .count(),
        1
    );
}

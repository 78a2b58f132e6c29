//! Keyed peers served by a blind mirror (PROTOCOL.md §2.2-§2.4): the
//! envelopes it relays for them while the origin is down, items awaiting a
//! key, and keys fetched from the publisher while the bytes come from the
//! mirror.

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;

use tempfile::TempDir;

use super::{count, files_holding, init_cli, put_cli, ENV_FOR, NO_KEY_EXIT};
use crate::support::*;

/// Items A publishes before its blind mirror clones it (the count).
const ITEMS: usize = 50;

/// A publishes for C (known) and M (blind) mirrors it; with A down, C
/// clones from M and reads everything (its envelopes relayed), and D (known
/// to M only) gets everything verified, awaiting keys, until A trusts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blind_mirror_relays_each_keyed_peers_envelopes_while_the_origin_is_down() {
    bitsync::tls::install_crypto_provider();
    let tmp = TempDir::new().unwrap();
    let (a_dir, c_dir, m_dir) = (
        tmp.path().join("a"),
        tmp.path().join("c"),
        tmp.path().join("m"),
    );
    let a_hex = init_cli(&a_dir);
    let mut a = Serve::start(&a_dir);
    // C joins A keyed before anything is published: A knows C's key, so
    // every item gets an envelope for C at put.
    let c_hex = ok_at(&c_dir, &["init"]).last_line();
    let tf = tmp.path().join("token-c");
    fs::write(&tf, a.invite()).unwrap();
    ok_at(&c_dir, &["clone", "--token-file", tf.to_str().unwrap()]);
    // The 50 items, small, so the 50 puts and reads stay quick.
    let items: Vec<(String, Vec<u8>)> = (0..ITEMS as u64)
        .map(|i| {
            let plain = data(300 + i, 1_000 + 100 * i as usize);
            (put_cli(&a_dir, &format!("relayed-{i}"), &plain), plain)
        })
        .collect();
    // M joins blind and clones A: C's envelopes and L(A→C) come along.
    fs::write(&tf, ok_at(&a_dir, &["invite", "--blind"]).last_line()).unwrap();
    let m_hex = ok_at(&m_dir, &["init"]).last_line();
    ok_at(&m_dir, &["clone", "--token-file", tf.to_str().unwrap()]);
    assert_eq!(
        count(&m_dir, ENV_FOR, &c_hex),
        ITEMS as i64,
        "C's envelopes, relayed"
    );
    assert_eq!(count(&m_dir, ENV_FOR, &m_hex), 0, "none for M itself");
    let links = "SELECT count(*) FROM relayed_links WHERE recipient = ?1";
    assert!(count(&m_dir, links, &c_hex) >= 1, "L(A→C), relayed");
    assert_eq!(count(&m_dir, links, &m_hex), 0);
    assert!(ls_json(&m_dir).iter().all(|i| i["blind"] == true));

    // A goes away; C clones from M and reads every item byte for byte.
    assert!(a.terminate(30).success());
    ok_at(&m_dir, &["peer", "add", &c_hex, "127.0.0.1:9"]);
    let m = Serve::start(&m_dir);
    ok_at(&c_dir, &["peer", "add", &m_hex, &m.addr]);
    let o = ok_at(&c_dir, &["clone", &m_hex]);
    assert!(o.text().contains(&format!("cloned {ITEMS} items")), "{o:?}");
    for (id, plain) in &items {
        assert_eq!(&ok_at(&c_dir, &["get", id]).stdout, plain, "C reads {id}");
    }
    // C holds L(A→C) now, from M, and M still holds no key of its own.
    let from_a = "SELECT count(*) FROM link_keys WHERE sender = ?1";
    assert!(count(&c_dir, from_a, &a_hex) >= 1);
    assert_eq!(count(&m_dir, ENV_FOR, &m_hex), 0);
    let o = at(&m_dir, &["get", &items[0].0]);
    assert_eq!(o.code, NO_KEY_EXIT, "{o:?}");
    for (_, plain) in &items {
        assert!(files_holding(&m_dir, &plain[100..148]).is_empty());
    }
    a_stranger_awaits_its_keys(&tmp, (&a_dir, &m_dir), (&m_hex, &m.addr), &items);
}

/// D, never known to A, clones from M while A is down: every manifest and
/// chunk is verified and stored, and the items await a key (PROTOCOL.md
/// §2.3); A comes back and trusts D, whose next sync fetches only envelopes.
fn a_stranger_awaits_its_keys(
    tmp: &TempDir,
    (a_dir, m_dir): (&Path, &Path),
    (m_hex, m_addr): (&str, &str),
    items: &[(String, Vec<u8>)],
) {
    let tf = tmp.path().join("token-d");
    let d_dir = tmp.path().join("d");
    let d_hex = ok_at(&d_dir, &["init"]).last_line();
    ok_at(m_dir, &["peer", "add", &d_hex, "127.0.0.1:9"]);
    ok_at(&d_dir, &["peer", "add", m_hex, m_addr]);
    let o = ok_at(&d_dir, &["clone", m_hex]);
    assert!(o.text().contains(&format!("cloned {ITEMS} items")), "{o:?}");
    assert!(
        o.text().contains(&format!("{ITEMS} items await a key")),
        "{o:?}"
    );
    let ls = ls_json(&d_dir);
    assert!(
        ls.iter()
            .all(|i| i["awaiting_key"] == true && i["complete"] == true),
        "{ls:?}"
    );
    let o = at(&d_dir, &["get", &items[0].0]);
    assert_eq!(o.code, NO_KEY_EXIT, "{o:?}");
    assert!(o.stderr.contains("awaits its key"), "{o:?}");
    ok_at(&d_dir, &["verify"]);
    // A comes back and trusts D: D's next sync fetches only the envelopes
    // (no chunk byte is sent again), and every item reads.
    let a = Serve::start(a_dir);
    fs::write(&tf, a.invite()).unwrap();
    let o = ok_at(&d_dir, &["clone", "--token-file", tf.to_str().unwrap()]);
    assert!(o.text().contains(", 0 bytes received"), "{o:?}");
    assert!(!o.text().contains("await a key"), "{o:?}");
    for (id, plain) in items {
        assert_eq!(&ok_at(&d_dir, &["get", id]).stdout, plain, "D reads {id}");
    }
    drop(a);
}

/// D, whom A trusts but never met, clones from A's blind mirror M while A
/// is up: the manifests and chunks come from M, and in the same command the
/// envelopes come from A, found in M's instance config (PROTOCOL.md §2.4).
/// A proxy in front of A counts what A sent D: far less than one item.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_come_from_the_publisher_and_bytes_from_the_blind_mirror() {
    bitsync::tls::install_crypto_provider();
    let tmp = TempDir::new().unwrap();
    let dirs = ["a", "m", "d"].map(|n| tmp.path().join(n));
    let [a_dir, m_dir, d_dir] = &dirs;
    let a_hex = init_cli(a_dir);
    let items: Vec<(String, Vec<u8>)> = (0..3u64)
        .map(|i| {
            let plain = data(500 + i, 150_000 + 1_000 * i as usize);
            (put_cli(a_dir, &format!("split-{i}"), &plain), plain)
        })
        .collect();
    let mut a = Serve::start(a_dir);
    let tf = tmp.path().join("token");
    fs::write(&tf, ok_at(a_dir, &["invite", "--blind"]).last_line()).unwrap();
    let m_hex = ok_at(m_dir, &["init"]).last_line();
    ok_at(m_dir, &["clone", "--token-file", tf.to_str().unwrap()]);
    // A trusts D; M lists A at the proxy's address, so D reaches A through it.
    assert!(a.terminate(30).success());
    let d_hex = ok_at(d_dir, &["init"]).last_line();
    ok_at(a_dir, &["peer", "add", &d_hex, "127.0.0.1:9"]);
    let a = Serve::start(a_dir);
    let px = proxy(a.addr.parse().unwrap(), None);
    ok_at(m_dir, &["peer", "add", &a_hex, &px.addr.to_string()]);
    ok_at(m_dir, &["peer", "add", &d_hex, "127.0.0.1:9"]);
    let m = Serve::start(m_dir);
    ok_at(d_dir, &["peer", "add", &m_hex, &m.addr]);

    let o = ok_at(d_dir, &["clone", &m_hex]);
    assert!(o.text().contains("cloned 3 items"), "{o:?}");
    assert!(!o.text().contains("await a key"), "{o:?}");
    assert!(ls_json(d_dir).iter().all(|i| i["awaiting_key"] == false));
    for (id, plain) in &items {
        assert_eq!(&ok_at(d_dir, &["get", id]).stdout, plain, "D reads {id}");
    }
    assert_eq!(count(d_dir, ENV_FOR, &d_hex), 3);
    // A sent D its envelopes and link key, the TLS handshake and HTTP/2
    // framing: no chunk (each item is over 150 kB) and no manifest body.
    let from_a = px.down.load(Ordering::SeqCst);
    eprintln!("A sent D {from_a} bytes for 3 items of over 150 kB");
    assert!(from_a > 0, "D asked A");
    assert!(from_a < 40_000, "A sent {from_a} bytes");
    // A is known to D only as imported from M's config, for review.
    assert_eq!(super::peer_entry(d_dir, &a_hex)["state"], "imported");
    drop((a, m));
}

/// A chain (issue 14, item 6): A → blind M → keyed C, and C re-keys for D.
/// C was trusted by A before A published; A goes down after M mirrored it;
/// C clones from M (its envelopes relayed); D, trusted by C and never known
/// to A, clones from C, which re-keys each item for D under `L(C→D)`, and
/// D reads every item byte for byte. And E, trusted by M and C, clones
/// from M with A down and gets its keys from C in the same command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_peer_of_a_blind_mirror_re_keys_for_its_own_peers() {
    bitsync::tls::install_crypto_provider();
    let tmp = TempDir::new().unwrap();
    let dirs = ["a", "m", "c", "d"].map(|n| tmp.path().join(n));
    let [a_dir, m_dir, c_dir, d_dir] = &dirs;
    let a_hex = init_cli(a_dir);
    let mut a = Serve::start(a_dir);
    let tf = tmp.path().join("token");
    let c_hex = ok_at(c_dir, &["init"]).last_line();
    fs::write(&tf, a.invite()).unwrap();
    ok_at(c_dir, &["clone", "--token-file", tf.to_str().unwrap()]);
    let items: Vec<(String, Vec<u8>)> = (0..4u64)
        .map(|i| {
            let plain = data(700 + i, 12_000 + 2_000 * i as usize);
            (put_cli(a_dir, &format!("chained-{i}"), &plain), plain)
        })
        .collect();
    fs::write(&tf, ok_at(a_dir, &["invite", "--blind"]).last_line()).unwrap();
    let m_hex = ok_at(m_dir, &["init"]).last_line();
    ok_at(m_dir, &["clone", "--token-file", tf.to_str().unwrap()]);
    assert!(a.terminate(30).success());

    // C clones from the blind M (A is down) and reads everything.
    ok_at(m_dir, &["peer", "add", &c_hex, "127.0.0.1:9"]);
    let m = Serve::start(m_dir);
    ok_at(c_dir, &["peer", "add", &m_hex, &m.addr]);
    let o = ok_at(c_dir, &["clone", &m_hex]);
    assert!(o.text().contains("cloned 4 items"), "{o:?}");
    assert!(!o.text().contains("await a key"), "{o:?}");

    // D, unknown to A, clones from C: C re-keys each item for D.
    let d_hex = ok_at(d_dir, &["init"]).last_line();
    ok_at(c_dir, &["peer", "add", &d_hex, "127.0.0.1:9"]);
    let c = Serve::start(c_dir);
    ok_at(d_dir, &["peer", "add", &c_hex, &c.addr]);
    let o = ok_at(d_dir, &["clone", &c_hex]);
    assert!(o.text().contains("cloned 4 items"), "{o:?}");
    assert!(!o.text().contains("await a key"), "{o:?}");
    for (id, plain) in &items {
        assert_eq!(&ok_at(d_dir, &["get", id]).stdout, plain, "D reads {id}");
    }
    assert_eq!(count(c_dir, ENV_FOR, &d_hex), 4, "C re-keyed for D");
    let links_from = "SELECT count(*) FROM link_keys WHERE sender = ?1";
    assert!(count(d_dir, links_from, &c_hex) >= 1, "L(C→D)");
    assert_eq!(count(d_dir, links_from, &a_hex), 0, "nothing from A");
    // M still holds nothing of its own, and nothing for D.
    assert_eq!(count(m_dir, ENV_FOR, &m_hex), 0);
    assert_eq!(count(m_dir, ENV_FOR, &d_hex), 0);

    // E, trusted by M and C and unknown to A, clones from M while A is
    // down: the publisher cannot be reached, so the same clone asks E's
    // other trusted peer C for the envelopes (PROTOCOL.md §2.4).
    let e_dir = tmp.path().join("e");
    let e_hex = ok_at(&e_dir, &["init"]).last_line();
    drop(m);
    ok_at(m_dir, &["peer", "add", &e_hex, "127.0.0.1:9"]);
    let m = Serve::start(m_dir);
    ok_at(&e_dir, &["peer", "add", &m_hex, &m.addr]);
    let mut c = c;
    assert!(c.terminate(30).success());
    ok_at(c_dir, &["peer", "add", &e_hex, "127.0.0.1:9"]);
    let c = Serve::start(c_dir);
    ok_at(&e_dir, &["peer", "add", &c_hex, &c.addr]);
    let o = ok_at(&e_dir, &["clone", &m_hex]);
    assert!(o.text().contains("cloned 4 items"), "{o:?}");
    assert!(!o.text().contains("await a key"), "{o:?}");
    for (id, plain) in &items {
        assert_eq!(&ok_at(&e_dir, &["get", id]).stdout, plain, "E reads {id}");
    }
    assert_eq!(count(c_dir, ENV_FOR, &e_hex), 4, "C re-keyed for E");
    drop((m, c));
}

/// Watch through a blind mirror (issue 14): C (keyed by A) mirrors the blind
/// M, which mirrors A; a new item on A reaches M blind and C readable, with
/// C's envelope relayed by M. Then A revokes M: M's mirror stops, and what
/// A publishes next never reaches M.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_items_reach_a_keyed_peer_through_a_blind_mirror_until_it_is_revoked() {
    bitsync::tls::install_crypto_provider();
    let tmp = TempDir::new().unwrap();
    let dirs = ["a", "m", "c"].map(|n| tmp.path().join(n));
    let [a_dir, m_dir, c_dir] = &dirs;
    let a_hex = init_cli(a_dir);
    let a = Serve::start(a_dir);
    let tf = tmp.path().join("token");
    let c_hex = ok_at(c_dir, &["init"]).last_line();
    fs::write(&tf, a.invite()).unwrap();
    ok_at(c_dir, &["clone", "--token-file", tf.to_str().unwrap()]);
    put_cli(a_dir, "first", &data(800, 10_000));
    fs::write(&tf, ok_at(a_dir, &["invite", "--blind"]).last_line()).unwrap();
    let m_hex = ok_at(m_dir, &["init"]).last_line();
    ok_at(m_dir, &["clone", "--token-file", tf.to_str().unwrap()]);
    ok_at(m_dir, &["peer", "add", &a_hex, &a.addr, "--mirror"]);
    ok_at(m_dir, &["peer", "add", &c_hex, "127.0.0.1:9"]);
    let m = Serve::start(m_dir);
    ok_at(c_dir, &["peer", "add", &m_hex, &m.addr, "--mirror"]);
    let _c = Serve::start(c_dir);

    let plain = data(801, 30_000);
    let fresh = put_cli(a_dir, "through-m", &plain);
    let every = std::time::Duration::from_millis(300);
    let complete_on = |dir: &Path, id: &str| {
        let ls = ls_json(dir);
        ls.into_iter()
            .find(|x| x["content_id"] == id && x["complete"] == true)
    };
    wait_for_every(60, every, "the new item on M, blind", || {
        complete_on(m_dir, &fresh).filter(|x| x["blind"] == true)
    });
    wait_for_every(60, every, "the new item on C, readable", || {
        complete_on(c_dir, &fresh).filter(|x| x["awaiting_key"] == false)
    });
    assert_eq!(ok_at(c_dir, &["get", &fresh]).stdout, plain);
    assert_eq!(count(m_dir, ENV_FOR, &m_hex), 0);

    ok_at(a_dir, &["peer", "revoke", &m_hex]);
    wait_for(30, "M to log that its mirror of A stopped", || {
        m.log()
            .contains("the source revoked this node's trust")
            .then_some(())
    });
    let late = put_cli(a_dir, "after-revoke", &data(802, 5_000));
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert!(
        complete_on(m_dir, &late).is_none(),
        "reached M after revocation"
    );
    let listed = ls_json(m_dir);
    assert!(listed.iter().all(|x| x["content_id"] != late.as_str()));
    drop(a);
}

/// A mirror of a blind mirror asks the publisher for keys too (PROTOCOL.md
/// §2.4, once per connection): D, whom A trusts but never met, mirrors M
/// while A is up, and every item becomes readable without a command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_of_a_blind_mirror_gets_its_keys_from_the_publisher() {
    bitsync::tls::install_crypto_provider();
    let tmp = TempDir::new().unwrap();
    let dirs = ["a", "m", "d"].map(|n| tmp.path().join(n));
    let [a_dir, m_dir, d_dir] = &dirs;
    let a_hex = init_cli(a_dir);
    let items: Vec<(String, Vec<u8>)> = (0..2u64)
        .map(|i| {
            let plain = data(900 + i, 20_000);
            (put_cli(a_dir, &format!("mirrored-{i}"), &plain), plain)
        })
        .collect();
    let d_hex = ok_at(d_dir, &["init"]).last_line();
    ok_at(a_dir, &["peer", "add", &d_hex, "127.0.0.1:9"]);
    let a = Serve::start(a_dir);
    let tf = tmp.path().join("token");
    fs::write(&tf, ok_at(a_dir, &["invite", "--blind"]).last_line()).unwrap();
    let m_hex = ok_at(m_dir, &["init"]).last_line();
    ok_at(m_dir, &["clone", "--token-file", tf.to_str().unwrap()]);
    ok_at(m_dir, &["peer", "add", &d_hex, "127.0.0.1:9"]);
    let m = Serve::start(m_dir);
    // D knows A as a trusted peer (no mirror of it) and mirrors M.
    ok_at(d_dir, &["peer", "add", &a_hex, &a.addr]);
    ok_at(d_dir, &["peer", "add", &m_hex, &m.addr, "--mirror"]);
    let _d = Serve::start(d_dir);
    let every = std::time::Duration::from_millis(300);
    wait_for_every(60, every, "every item on D, readable", || {
        let ls = ls_json(d_dir);
        (ls.len() == items.len()
            && ls
                .iter()
                .all(|x| x["complete"] == true && x["awaiting_key"] == false))
        .then_some(())
    });
    for (id, plain) in &items {
        assert_eq!(&ok_at(d_dir, &["get", id]).stdout, plain, "D reads {id}");
    }
    assert_eq!(count(m_dir, ENV_FOR, &d_hex), 0, "the keys came from A");
    drop((a, m));
}

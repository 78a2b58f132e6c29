//! bitsync nodes over a private Tor network on 127.0.0.1 (tests/tornet/tornet.sh):
//! node A serves on an onion service (embedded arti); node B, dialing with
//! embedded arti, joins A by an invite carrying the onion address, clones A
//! over Tor, then mirrors A over Tor; node C clones A through the network's
//! C tor client as an external SOCKS5 proxy. And a blind mirror (issue 14)
//! hosted as an onion service serves a keyed peer the keys it relays.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::*;

/// Serve logs without arti's chatter.
const SERVE_LOG: &str = "info,arti_client=warn,tor_hsservice=warn,tor_netdir=error";

/// Init a node whose config points embedded Tor at the private network.
fn init_tor_node(dir: &Path, tor: &str) {
    ok_at(dir, &["init"]);
    tornet::configure_node(dir, tor);
}

/// Poll `f` (which runs `bitsync status` or `ls`) every 250 ms, for at most `budget`.
fn wait_until(what: &str, budget: Duration, mut f: impl FnMut() -> bool) {
    wait_for_every(budget.as_secs(), Duration::from_millis(250), what, || {
        f().then_some(())
    });
}

fn status(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&ok_at(dir, &["status", "--json"]).text()).expect("status json")
}

fn items(dir: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str::<Vec<serde_json::Value>>(&ok_at(dir, &["ls", "--json"]).text())
        .expect("ls json")
}

fn same_items(a: &Path, b: &Path, scratch: &Path) {
    let ia = items(a);
    assert!(!ia.is_empty());
    for it in &ia {
        let id = it["content_id"].as_str().unwrap();
        let (fa, fb) = (
            scratch.join(format!("{id}.a")),
            scratch.join(format!("{id}.b")),
        );
        ok_at(a, &["get", id, "-o", fa.to_str().unwrap()]);
        ok_at(b, &["get", id, "-o", fb.to_str().unwrap()]);
        assert!(
            std::fs::read(&fa).unwrap() == std::fs::read(&fb).unwrap(),
            "item {id} differs"
        );
    }
}

fn publish(dir: &Path, scratch: &Path, name: &str, size: usize) -> String {
    let f = scratch.join(name);
    std::fs::write(&f, data(size as u64, size)).unwrap();
    ok_at(dir, &["put", f.to_str().unwrap()]).last_line()
}

/// Onion dials on a young private network fail for ~30 s at each HSDir
/// rotation; an unreachable peer leaves the invite unused, so retry (bounded).
fn clone_retrying(dir: &Path, token: &str) {
    let start = Instant::now();
    loop {
        let out = at(dir, &["clone", token]);
        if out.status.success() {
            return;
        }
        let err = out.stderr.clone();
        assert_eq!(
            out.status.code(),
            Some(8),
            "clone failed for a reason other than reachability: {err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(150),
            "clone over Tor kept failing: {err}"
        );
        eprintln!("clone over Tor not yet through ({err}); retrying");
        std::thread::sleep(Duration::from_secs(3));
    }
}

#[test]
fn clone_and_mirror_over_private_tor() {
    let net = tornet::Network::up(1);
    let arti = net.ready();
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    let arti_line = format!(
        "arti_config = {:?}\nbootstrap_timeout_secs = 90\nconnect_timeout_secs = 60",
        arti.to_str().unwrap()
    );

    // A hosts an onion service. Its only TCP address in invites is a closed
    // port, so a successful join proves the onion address carried it.
    init_tor_node(&a, &format!("enabled = true\n{arti_line}"));
    let cfg = std::fs::read_to_string(a.join("config.toml"))
        .unwrap()
        .replace("advertise = []", "advertise = [\"127.0.0.1:9\"]");
    std::fs::write(a.join("config.toml"), cfg).unwrap();
    publish(&a, &scratch, "one", 300_000);
    publish(&a, &scratch, "two", 0);
    publish(&a, &scratch, "three", 1_500_000);
    let _a_node = Serve::spawn(&a, &[], SERVE_LOG);
    wait_until("A's onion address", Duration::from_secs(120), || {
        status(&a)["onion_address"]
            .as_str()
            .is_some_and(|s| s.ends_with(".onion:7450"))
    });
    let onion = status(&a)["onion_address"].as_str().unwrap().to_string();
    let id_out = ok_at(&a, &["id"]).text();
    assert!(
        id_out.contains(&onion),
        "`bitsync id` shows the onion address: {id_out}"
    );

    // The invite carries the onion address, first.
    let token = ok_at(&a, &["invite"]).last_line();

    // B clones over Tor with embedded arti.
    init_tor_node(&b, &arti_line);
    clone_retrying(&b, &token);
    let a_id = ok_at(&a, &["id"])
        .last_line()
        .lines()
        .next()
        .unwrap()
        .to_string();
    let a_id = a_id.split(':').next().unwrap().to_string();
    let peers: Vec<serde_json::Value> =
        serde_json::from_str(&ok_at(&b, &["peer", "ls", "--json"]).text()).unwrap();
    let pa = peers
        .iter()
        .find(|p| p["address"].as_str().unwrap_or("").ends_with(".onion:7450"));
    assert!(
        pa.is_some(),
        "B reached A through its onion address: {peers:?} (A is {a_id})"
    );
    same_items(&a, &b, &scratch);

    // B mirrors A over Tor: a new item on A reaches B without a restart.
    let a_node_id = ok_at(&a, &["id"])
        .text()
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_string();
    ok_at(&b, &["peer", "add", &a_node_id, &onion, "--mirror"]).text();
    let _b_node = Serve::spawn(&b, &[], SERVE_LOG);
    let fresh = publish(&a, &scratch, "four", 700_000);
    wait_until(
        "the new item on the mirror",
        Duration::from_secs(90),
        || {
            items(&b)
                .iter()
                .any(|i| i["content_id"] == fresh.as_str() && i["complete"] == true)
        },
    );
    same_items(&a, &b, &scratch);

    // C dials through the network's C tor client as an external SOCKS5 proxy.
    let socks = net.client();
    init_tor_node(&c, &format!("socks = {socks:?}"));
    let token_c = ok_at(&a, &["invite"]).last_line();
    clone_retrying(&c, &token_c);
    let peers: Vec<serde_json::Value> =
        serde_json::from_str(&ok_at(&c, &["peer", "ls", "--json"]).text()).unwrap();
    assert!(
        peers
            .iter()
            .any(|p| p["address"].as_str().unwrap_or("").ends_with(".onion:7450")),
        "C reached A through its onion address via SOCKS: {peers:?}"
    );
    same_items(&a, &c, &scratch);

    // A bad onion address is refused when it is given, not at the first dial.
    let out = at(&c, &["peer", "add", &a_node_id, "notanonion.onion:7450"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "invalid onion address: {}",
        out.stderr
    );
    assert!(out.stderr.contains("onion"), "{}", out.stderr);

    // A backup taken --with-identity carries the onion service's keys (sealed):
    // the node restored from it comes back at the same .onion address.
    let repo = tmp.path().join("repo");
    let with_pass = |args: &[&str], dir: &Path| {
        ok(bitsync(dir).args(args).env("BITSYNC_PASSPHRASE", PASS));
    };
    with_pass(
        &[
            "backup",
            "--with-identity",
            "--repo",
            repo.to_str().unwrap(),
        ],
        &a,
    );
    let key_bytes = walk(&a.join("tor/state/keystore"))
        .iter()
        .map(|f| std::fs::read(f).unwrap())
        .collect::<Vec<_>>();
    assert!(!key_bytes.is_empty(), "A's keystore holds the onion key");
    for f in walk(&repo) {
        let bytes = std::fs::read(&f).unwrap();
        for k in &key_bytes {
            assert!(
                !bytes.windows(k.len()).any(|w| w == k.as_slice()),
                "the onion key is in the clear in {}",
                f.display()
            );
        }
    }
    drop(_a_node);
    let a2 = tmp.path().join("a2");
    with_pass(&["restore", "--repo", repo.to_str().unwrap()], &a2);
    // Not the copied hostname file: the address Arti derives from the restored key.
    std::fs::remove_file(a2.join("tor/hostname")).unwrap();
    let _a2_node = Serve::spawn(&a2, &[], SERVE_LOG);
    wait_until(
        "the restored node's onion address",
        Duration::from_secs(120),
        || {
            status(&a2)["onion_address"]
                .as_str()
                .is_some_and(|s| s.ends_with(".onion:7450"))
        },
    );
    assert_eq!(status(&a2)["onion_address"].as_str().unwrap(), onion);
}

/// Issue 14, over Tor: A (plain TCP) trusts C, keyed, before publishing; M
/// joins A with a `--blind` token and mirrors it, then hosts an onion
/// service; A goes down; C, dialing with embedded arti, clones from M's
/// onion address and reads every item byte for byte (its envelopes and
/// `L(A→C)` relayed by M, which holds no key of its own).
#[test]
fn an_onion_hosted_mirror_serves_keys_it_cannot_read() {
    let net = tornet::Network::up(2);
    let arti = net.ready();
    let tmp = tempfile::tempdir().unwrap();
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let [a, m, c] = ["a", "m", "c"].map(|n| tmp.path().join(n));
    let arti_line = format!(
        "arti_config = {:?}\nbootstrap_timeout_secs = 90\nconnect_timeout_secs = 60",
        arti.to_str().unwrap()
    );
    ok_at(&a, &["init"]);
    let mut a_node = Serve::start(&a);
    init_tor_node(&c, &arti_line);
    clone_retrying(&c, &a_node.invite());
    let published: Vec<(String, Vec<u8>)> = (0..3u64)
        .map(|i| {
            let size = 40_000 + 250_000 * i as usize;
            let id = publish(&a, &scratch, &format!("onion-{i}"), size);
            (id, data(size as u64, size))
        })
        .collect();
    // M joins blind (over TCP) and mirrors A; then A goes away.
    init_tor_node(&m, &format!("enabled = true\n{arti_line}"));
    let m_hex = ok_at(&m, &["id"])
        .text()
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_string();
    let blind = ok_at(&a, &["invite", "--blind"]).last_line();
    ok_at(&m, &["clone", &blind]);
    assert!(a_node.terminate(30).success());

    // M serves on its onion service; C clones from it over Tor.
    let c_hex = ok_at(&c, &["id"])
        .text()
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_string();
    ok_at(&m, &["peer", "add", &c_hex, "127.0.0.1:9"]);
    let _m_node = Serve::spawn(&m, &[], SERVE_LOG);
    wait_until("M's onion address", Duration::from_secs(120), || {
        status(&m)["onion_address"]
            .as_str()
            .is_some_and(|s| s.ends_with(".onion:7450"))
    });
    let onion = status(&m)["onion_address"].as_str().unwrap().to_string();
    ok_at(&c, &["peer", "add", &m_hex, &onion]);
    clone_retrying(&c, &m_hex);
    let listed = items(&c);
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert!(
        listed.iter().all(|i| i["awaiting_key"] == false),
        "{listed:?}"
    );
    for (id, plain) in &published {
        let f = scratch.join(format!("{id}.c"));
        ok_at(&c, &["get", id, "-o", f.to_str().unwrap()]);
        assert!(std::fs::read(&f).unwrap() == *plain, "C reads {id}");
    }
    // M can read none of it.
    for i in items(&m) {
        assert_eq!(i["blind"], true, "{i:?}");
    }
    let o = at(&m, &["get", &published[0].0]);
    assert_eq!(o.status.code(), Some(11), "{}", o.stderr);
}

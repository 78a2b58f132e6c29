//! Helpers for the backup, clone-instance and import-axon tests: the real
//! binary as a child process, real data dirs in temp directories.
//!
//! Included with `#[path = "support/backup_util.rs"] mod util;`.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bitsync::crypto::{ContentId, Hash};
use bitsync::node::{self, Node};

pub const BIN: &str = env!("CARGO_BIN_EXE_bitsync");
pub const PASS: &str = "correct horse battery staple";

/// A `bitsync` command with a clean environment: private HOME, no inherited
/// data dir or passphrase, stdin from /dev/null (so: no terminal).
pub fn bitsync(home: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    c
}

/// What a run did, with its exit code (-1: killed by a signal).
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn last_line(&self) -> String {
        self.stdout
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string()
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub fn run(cmd: &mut Command) -> Run {
    let out: Output = cmd.output().expect("run bitsync");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Run and require exit 0; returns the run.
pub fn ok(cmd: &mut Command) -> Run {
    let r = run(cmd);
    assert_eq!(r.code, 0, "{cmd:?} failed: {r:?}");
    r
}

/// A new data dir at `dir` with `chunk_size` plaintext bytes per chunk.
pub fn init_node(dir: &Path, chunk_size: u32) -> Node {
    node::init(dir, None).expect("init");
    let cfg = dir.join("config.toml");
    let text = fs::read_to_string(&cfg).unwrap().replace(
        "chunk_size = 1048576",
        &format!("chunk_size = {chunk_size}"),
    );
    fs::write(&cfg, text).unwrap();
    open(dir)
}

pub fn open(dir: &Path) -> Node {
    Node::open(dir, &node::no_passphrase).expect("open node")
}

/// Deterministic, non-repeating bytes.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

pub fn put(node: &Node, name: &str, bytes: &[u8]) -> ContentId {
    let opts = bitsync::content::PutOptions {
        kind: "file".into(),
        name: name.into(),
    };
    bitsync::content::put(node, &mut &bytes[..], &opts, &|_| {}).expect("put")
}

pub fn get(node: &Node, id: &ContentId) -> Vec<u8> {
    let mut out = Vec::new();
    bitsync::content::get(
        node,
        id,
        bitsync::content::Output::Stream(&mut out),
        &|_| {},
    )
    .expect("get");
    out
}

/// Every file under `dir`, recursively (directories not counted).
pub fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                n += count_files(&p);
            } else {
                n += 1;
            }
        }
    }
    n
}

/// Every file under `dir` with its bytes, relative paths, sorted.
pub fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    out.push((
                        p.strip_prefix(root).unwrap().to_path_buf(),
                        fs::read(&p).unwrap_or_default(),
                    ));
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Poll `cond` every 5 ms for at most `limit`.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

pub fn flip_byte(path: &Path, at: usize) {
    let mut b = fs::read(path).unwrap();
    let i = at.min(b.len() - 1);
    b[i] ^= 0x5A;
    fs::write(path, b).unwrap();
}

pub fn chunk_file(root: &Path, id: &Hash) -> PathBuf {
    let h = id.to_hex();
    root.join(&h[..2]).join(h)
}

/// The ids of snapshots in a repository, oldest first (via `backup ls --json`).
pub fn snapshots(home: &Path, repo: &Path) -> Vec<String> {
    let r = ok(bitsync(home)
        .args(["backup", "ls", "--json", "--repo"])
        .arg(repo));
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("json");
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

/// `bitsync serve` on a data dir, killed (and reaped) on drop.
pub struct Serve {
    child: std::process::Child,
}

impl Serve {
    pub fn start(home: &Path, dir: &Path) -> Serve {
        let log = std::fs::File::create(dir.with_extension("serve.log")).unwrap();
        let child = bitsync(home)
            .arg("--data-dir")
            .arg(dir)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut s = Serve { child };
        let ready = wait_until(Duration::from_secs(60), || {
            assert!(
                s.child.try_wait().unwrap().is_none(),
                "serve exited: {}",
                std::fs::read_to_string(dir.with_extension("serve.log")).unwrap_or_default()
            );
            run(bitsync(home).arg("--data-dir").arg(dir).arg("status")).code == 0
        });
        assert!(ready, "serve never answered status");
        s
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

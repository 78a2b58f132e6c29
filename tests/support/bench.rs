//! What the benches measure with, defined once: the binary under test and a
//! command for it, a runner that times a child process and reads its CPU
//! time and peak memory, `/proc` readers, and the setup steps several
//! benches share (items signed in parallel, straight into a store).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bitsync::crypto::{self, Hash, ItemKey};
use bitsync::manifest::{self, ItemMeta, Manifest};
use bitsync::node::Node;
use prost::Message;

use super::process::BIN;

/// A number from the environment (`BITSYNC_BENCH_MB`, ...), else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Which parts of a bench to run: `cargo bench --bench <b> -- <part>...`
/// names them (flags, such as the `--bench` cargo passes, are not parts);
/// with none named, every part runs.
pub fn selection() -> impl Fn(&str) -> bool {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    move |name| args.is_empty() || args.iter().any(|a| name.contains(a.as_str()))
}

/// The cores this machine offers (for the report, and for spreading work).
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Benchmarks need real disk, not a tmpfs: `BITSYNC_BENCH_DIR`, else
/// target/bench-data (created).
pub fn bench_dir() -> PathBuf {
    let d = std::env::var_os("BITSYNC_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data"));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The bitsync binary to measure: `BITSYNC_BENCH_BIN`, else the one cargo built.
pub fn bin() -> PathBuf {
    std::env::var_os("BITSYNC_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(BIN))
}

/// [`bin`] on the data dir `dir`, with no data dir or passphrase inherited
/// from the caller's environment.
pub fn bitsync(dir: &Path) -> Command {
    let mut c = Command::new(bin());
    c.arg("--data-dir")
        .arg(dir)
        .env_remove("BITSYNC_DATA_DIR")
        .env_remove("BITSYNC_PASSPHRASE");
    c
}

/// sync(2): write back everything, so no timed step pays for another's writes.
pub fn sync_all() {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
}

/// Level the ground for the next timed step: write a scratch file of
/// `bytes` in `dir`, delete it, and sync(2). Every step then finds the same
/// amount of just-freed memory for the page cache of what it writes. On a VM
/// with free page reporting (virtio-balloon, as the CI machine is), memory
/// freed for a few seconds goes back to the host, and writing into it costs
/// the host's page faults inside the kernel's copy (2-3 × the write itself,
/// docs/BENCHMARKS.md), which would otherwise fall on whichever contender
/// runs after the longest pause or first.
pub fn level(dir: &Path, bytes: u64) {
    use std::io::Write;
    let path = dir.join(".bench-level-scratch");
    let mut f = std::fs::File::create(&path).unwrap();
    let piece = vec![0x5au8; 256 << 10];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(piece.len() as u64) as usize;
        f.write_all(&piece[..n]).unwrap();
        left -= n as u64;
    }
    drop(f);
    std::fs::remove_file(&path).unwrap();
    sync_all();
}

/// Read a file once so it sits in the page cache.
pub fn warm_file(path: &Path) {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    while f.read(&mut buf).unwrap() > 0 {}
}

/// Read every file under `dir` once (page cache warm).
pub fn warm_dir(dir: &Path) {
    for f in super::walk(dir) {
        warm_file(&f);
    }
}

/// What one measured run took.
pub struct Run {
    pub wall: Duration,
    /// User CPU of the process (and the children it waited for).
    pub user: Duration,
    /// System CPU of the process (and the children it waited for).
    pub sys: Duration,
    /// Peak resident set of the process itself: its VmHWM, polled (see [`measure`]).
    pub max_rss_kib: u64,
    /// wait4's ru_maxrss, which counts the bench's own RSS too (see [`measure`]).
    pub ru_maxrss_kib: u64,
    pub stdout: String,
}

impl Run {
    /// User + system CPU.
    pub fn cpu(&self) -> Duration {
        self.user + self.sys
    }
}

/// Run `cmd` to completion (stdout captured, stderr passed through, no
/// RUST_LOG); time it, read its CPU time with wait4(2) and its peak RSS by
/// polling its VmHWM every 10 ms. (wait4's ru_maxrss is kept too, but the
/// child is spawned with vfork, and at exec Linux folds the parent's RSS
/// high-water mark into the child's ru_maxrss, so a bench holding much
/// memory would be reported as the child's.) With BITSYNC_BENCH_RSS_TRACE
/// set, the RSS is printed as it moves.
#[allow(clippy::zombie_processes)] // reaped by wait4
pub fn measure(cmd: &mut Command) -> Run {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env_remove("RUST_LOG");
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let trace = std::env::var_os("BITSYNC_BENCH_RSS_TRACE").is_some();
    let watcher = std::thread::spawn(move || {
        let mut peak = 0u64;
        let mut shown = 0u64;
        loop {
            let (rss, hwm) = (
                proc_kib(pid as u32, "VmRSS:"),
                proc_kib(pid as u32, "VmHWM:"),
            );
            if hwm == 0 {
                return peak; // exited
            }
            peak = peak.max(hwm);
            if trace && hwm.abs_diff(shown) > 2048 {
                eprintln!(
                    "    [{:>6.2} s] pid {pid} VmRSS {:.1} MiB, VmHWM {:.1} MiB",
                    start.elapsed().as_secs_f64(),
                    rss as f64 / 1024.0,
                    hwm as f64 / 1024.0
                );
                shown = hwm;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    // SAFETY: as above; `pid` is our own child, not yet reaped.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall = start.elapsed();
    assert_eq!(rc, pid, "wait4: {}", std::io::Error::last_os_error());
    let max_rss_kib = watcher.join().unwrap();
    let stdout = reader.join().unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?} failed (wait status {status:#x})"
    );
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Run {
        wall,
        user: tv(ru.ru_utime),
        sys: tv(ru.ru_stime),
        max_rss_kib,
        ru_maxrss_kib: ru.ru_maxrss as u64,
        stdout,
    }
}

/// A `kB` field (`VmRSS:`, `VmHWM:`) of /proc/<pid>/status; 0 once the process is gone.
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `f(0..n)` spread over the cores (for signing many items), in order.
pub fn parallel<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let threads = cores();
    let per = n.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let range = (t * per)..((t + 1) * per).min(n);
                let f = &f;
                s.spawn(move || range.map(f).collect::<Vec<_>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// A "message" item of one encrypted chunk holding `plain`, named `name` and
/// signed by `node`: its manifest, its key and the chunk's ciphertext (not
/// stored anywhere yet).
pub fn one_chunk_item(
    node: &Node,
    name: &str,
    plain: &[u8],
    chunk_size: u32,
    created_ms: i64,
) -> (Manifest, ItemKey, Vec<u8>) {
    let key = ItemKey::random();
    let ct = crypto::encrypt_chunk(&key, 0, true, plain);
    let meta = ItemMeta { name: name.into() }.encode_to_vec();
    let body = manifest::native_body(
        node.identity(),
        "message",
        plain.len() as u64,
        chunk_size,
        vec![Hash::of(&ct)],
        crypto::encrypt_meta(&key, &meta),
        created_ms,
    );
    let m = Manifest::create(node.identity(), body).unwrap();
    (m, key, ct)
}

/// Publish `bytes` of generated data into `node` as items of at most
/// `per_item` bytes named `part-N` (through `content::put`, as `bitsync
/// put` does); returns how many items.
pub fn publish_parts(node: &Node, bytes: u64, per_item: u64, seed: u64) -> u64 {
    let (mut left, mut i) = (bytes, 0u64);
    while left > 0 {
        let n = left.min(per_item);
        let opts = bitsync::content::PutOptions {
            kind: "file".into(),
            name: format!("part-{i}"),
        };
        let mut input = super::DataReader::new(seed ^ i, n);
        bitsync::content::put(node, &mut input, &opts, &|_| {}).unwrap();
        left -= n;
        i += 1;
    }
    i
}

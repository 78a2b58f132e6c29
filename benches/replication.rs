//! Replication, side by side in one run, with the release `bitsync` binary as
//! child processes (serve, clone, put): what a user sees.
//!
//! (a) clone vs rsync vs cp -r: an instance of M MiB (default 2048) in 1 MiB
//!     chunks, served by `bitsync serve`, cloned over loopback mutual TLS by
//!     `bitsync clone <node id>` into a fresh data dir; against an rsync
//!     daemon on 127.0.0.1 serving the source's chunk dir (`rsync -a
//!     rsync://…`), and `cp -r` of the same dir. Before every timed step the
//!     source chunks are read once (page cache equally warm), the previous
//!     outputs are removed and `sync()` runs. The clone is durable when it
//!     ends (syncfs before chunks are recorded); rsync and cp are not, so they
//!     are also shown followed by `sync`. Before each, the ground is levelled
//!     ([`bench::level`]: the same just-freed memory for every contender).
//!     Median of the rounds. Peak RSS: the
//!     VmHWM of both nodes (the cloner's polled every 10 ms until it exits).
//!     Targets: clone ≤ 1.0× rsync, ≤ 1.5× cp -r, RSS ≤ 100 MiB each.
//! (b) mirror lag: a mirror node follows the source; a 1 MiB item is
//!     published with `bitsync put`, and the time from `put` exiting to the
//!     item being stored (hence complete) in the mirror's database is taken,
//!     polled read-only every millisecond. Items are published one after
//!     another. Targets: p50 < 250 ms, p99 < 1 s.
//! (c) small items: a source of N one-chunk items (default 100,000) with
//!     format-2 envelopes (through its link keys, as `bitsync put` makes
//!     them) is cloned by `bitsync clone` through a byte-counting TCP proxy
//!     (items/s, peak RSS of both nodes; target >= 5,000/s), the clone listed
//!     by `bitsync ls` (target <= 2 s), then the mirror follows the source
//!     and one new item is published: bytes on the wire (both ways, TLS
//!     included) and time until the mirror has it (target < 64 KiB plus the
//!     item). The same clone and `ls` on format-1 (RSA) envelopes, with
//!     `BITSYNC_BENCH_F1_ITEMS` items (default 10,000; 0 skips), give the
//!     ratio.
//!
//! ```sh
//! cargo bench --bench replication                       # all three
//! cargo bench --bench replication -- clone              # only (a)
//! BITSYNC_BENCH_MB=256 cargo bench --bench replication -- clone
//! BITSYNC_BENCH_LAG_ITEMS=100 cargo bench --bench replication -- lag
//! BITSYNC_BENCH_ITEMS=20000 cargo bench --bench replication -- incremental
//! ```
//! `BITSYNC_BENCH_ROUNDS` (default 3) sets the rounds of (a);
//! `BITSYNC_BENCH_DIR` where the data goes (default target/bench-data).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bitsync::content;
use bitsync::crypto::{self, Hash};
use bitsync::manifest::{self, Manifest};
use bitsync::node::{self, Node};
use bitsync::store::PeerState;
use tempfile::TempDir;

use support::bench::{self, bench_dir, env_usize, measure, proc_kib, sync_all};
use support::*;

const MIB: u64 = 1024 * 1024;

fn cli(dir: &Path, args: &[&str]) -> String {
    measure(bench::bitsync(dir).args(args)).stdout
}

/// CPU time of a process so far; with `children`, that of its reaped children instead.
fn proc_cpu(pid: u32, children: bool) -> Duration {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    // utime, stime, cutime, cstime are fields 14..=17, i.e. 10..=13 after the state.
    let ticks = if children {
        f[12] + f[13]
    } else {
        f[10] + f[11]
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

/// Make two nodes trust each other (the source learns the other's key now,
/// as it would at the first call, so new items carry its envelope).
fn trust(source: &Node, other: &Node, source_addr: &str, mirror: bool) {
    source
        .db()
        .upsert_peer(
            &other.id(),
            "bench",
            "127.0.0.1:9",
            PeerState::Trusted,
            false,
        )
        .unwrap();
    source
        .db()
        .set_peer_key(&other.id(), other.identity().spki())
        .unwrap();
    other
        .db()
        .upsert_peer(
            &source.id(),
            "source",
            source_addr,
            PeerState::Trusted,
            mirror,
        )
        .unwrap();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() {
    bitsync::tls::install_crypto_provider();
    let want = bench::selection();
    println!(
        "replication bench on {} cores, binary {}",
        bench::cores(),
        bench::bin().display()
    );
    if want("clone") {
        clone_bench();
    }
    if want("lag") {
        lag_bench();
    }
    if want("incremental") {
        incremental_bench();
    }
}

// ---- (a) clone vs rsync vs cp -r ---------------------------------------------------

fn clone_bench() {
    let mb = env_usize("BITSYNC_BENCH_MB", 2048) as u64;
    let rounds = env_usize("BITSYNC_BENCH_ROUNDS", 3).max(1);
    let tmp = TempDir::new_in(bench_dir()).unwrap();
    let a = tmp.path().join("a");
    println!("\n(a) clone vs rsync vs cp -r: {mb} MiB in 1 MiB chunks, loopback, {rounds} rounds (median)");
    let t = Instant::now();
    let src = new_node(&a);
    let i = bench::publish_parts(&src, mb * MIB, 64 * MIB, 0x9E37_79B9_7F4A_7C15);
    let a_id = src.id().to_hex();
    drop(src);
    println!(
        "  setup: {i} items published in {:.1} s (not part of the figures)",
        secs(t.elapsed())
    );
    let served = Serve::spawn(&a, &["--listen", "127.0.0.1:0"], "warn");

    // rsync daemon serving the source's chunk dir.
    let port = free_port();
    let conf = tmp.path().join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "port = {port}\naddress = 127.0.0.1\nuse chroot = false\nuid = root\ngid = root\npid file = {}\n[chunks]\npath = {}\nread only = true\n",
            tmp.path().join("rsyncd.pid").display(),
            a.join("chunks").display()
        ),
    )
    .unwrap();
    let mut daemon = Command::new("rsync")
        .args(["--daemon", "--no-detach"])
        .arg(format!("--config={}", conf.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("rsync is needed (apt-get install rsync)");
    let end = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "the rsync daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (mut t_rsync, mut t_rsync_sync, mut t_cp, mut t_cp_sync, mut t_clone) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut clone_rss = 0u64;
    let mut t_again = Duration::ZERO;
    // CPU seconds per round, both ends: (rsync client + daemon, cp, clone + serving node).
    let (mut c_rsync, mut c_cp, mut c_clone) = (vec![], vec![], vec![]);
    let daemon_pid = daemon.id();
    let chunks = a.join("chunks");
    for r in 0..rounds {
        // rsync
        let dst = tmp.path().join(format!("rsync-{r}"));
        bench::level(tmp.path(), mb * MIB);
        bench::warm_dir(&chunks);
        let d0 = proc_cpu(daemon_pid, true);
        let run1 = measure(
            Command::new("rsync")
                .arg("-a")
                .arg(format!("rsync://127.0.0.1:{port}/chunks/"))
                .arg(&dst),
        );
        let s0 = Instant::now();
        sync_all();
        t_rsync.push(run1.wall);
        std::thread::sleep(Duration::from_millis(200)); // the daemon reaps its sender
        c_rsync.push(run1.cpu() + proc_cpu(daemon_pid, true).saturating_sub(d0));
        t_rsync_sync.push(run1.wall + s0.elapsed());
        std::fs::remove_dir_all(&dst).unwrap();

        // cp -r
        let dst = tmp.path().join(format!("cp-{r}"));
        bench::level(tmp.path(), mb * MIB);
        bench::warm_dir(&chunks);
        let run2 = measure(Command::new("cp").arg("-r").arg(&chunks).arg(&dst));
        let s0 = Instant::now();
        sync_all();
        t_cp.push(run2.wall);
        c_cp.push(run2.cpu());
        t_cp_sync.push(run2.wall + s0.elapsed());
        std::fs::remove_dir_all(&dst).unwrap();

        // bitsync clone, into a fresh data dir trusted by the source
        let b = tmp.path().join(format!("b-{r}"));
        let bn = new_node(&b);
        cli(&a, &["peer", "add", &bn.id().to_hex(), "127.0.0.1:9"]);
        bn.db()
            .upsert_peer(
                &Hash::parse(&a_id, "id").unwrap(),
                "a",
                &served.addr,
                PeerState::Trusted,
                false,
            )
            .unwrap();
        drop(bn);
        bench::level(tmp.path(), mb * MIB);
        bench::warm_dir(&chunks);
        let s0 = proc_cpu(served.pid(), false);
        let run3 = measure(bench::bitsync(&b).args(["clone", &a_id]));
        assert!(
            run3.stdout.contains(&format!("cloned {i} items ({i} new)")),
            "clone said: {}",
            run3.stdout
        );
        t_clone.push(run3.wall);
        c_clone.push(run3.cpu() + proc_cpu(served.pid(), false).saturating_sub(s0));
        clone_rss = clone_rss.max(run3.max_rss_kib);
        println!(
            "  round {r}: rsync {:.2} s, cp -r {:.2} s, clone {:.2} s",
            secs(run1.wall),
            secs(run2.wall),
            secs(run3.wall)
        );
        if r + 1 == rounds {
            // The same clone again: everything is here, nothing may be transferred.
            let again = measure(bench::bitsync(&b).args(["clone", &a_id]));
            assert!(
                again
                    .stdout
                    .contains(&format!("cloned {i} items (0 new), 0 bytes received")),
                "second clone said: {}",
                again.stdout
            );
            t_again = again.wall;
        }
        std::fs::remove_dir_all(&b).unwrap();
        sync_all();
    }
    let server_hwm = proc_kib(served.pid(), "VmHWM:");
    let _ = daemon.kill();
    let _ = daemon.wait();
    drop(served);

    let (t_rsync_all, t_cp_all, t_clone_all) = (t_rsync.clone(), t_cp.clone(), t_clone.clone());
    let mbs = |d: Duration| (mb * MIB) as f64 / secs(d) / 1e6;
    let (r, rs, c, cs, k) = (
        median(t_rsync),
        median(t_rsync_sync),
        median(t_cp),
        median(t_cp_sync),
        median(t_clone),
    );
    let (cr, cc, ck) = (median(c_rsync), median(c_cp), median(c_clone));
    println!(
        "  rsync daemon -a        {:6.2} s  {:7.1} MB/s   (+ sync: {:.2} s)   CPU both ends {:.2} s",
        secs(r),
        mbs(r),
        secs(rs),
        secs(cr)
    );
    println!(
        "  cp -r                  {:6.2} s  {:7.1} MB/s   (+ sync: {:.2} s)   CPU {:.2} s",
        secs(c),
        mbs(c),
        secs(cs),
        secs(cc)
    );
    println!(
        "  bitsync clone (mTLS)   {:6.2} s  {:7.1} MB/s   (durable when it returns)   CPU both ends {:.2} s",
        secs(k),
        mbs(k),
        secs(ck)
    );
    let best = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    println!(
        "  best round: rsync {:.2} s, cp -r {:.2} s, clone {:.2} s (clone / rsync {:.2}x)",
        secs(best(&t_rsync_all)),
        secs(best(&t_cp_all)),
        secs(best(&t_clone_all)),
        secs(best(&t_clone_all)) / secs(best(&t_rsync_all))
    );
    let ok = |v: bool| if v { "ok" } else { "MISSED" };
    let (q1, q2) = (secs(k) / secs(r), secs(k) / secs(c));
    println!(
        "  clone / rsync    = {q1:.2}x  target <= 1.0   {}   (vs rsync + sync: {:.2}x)",
        ok(q1 <= 1.0),
        secs(k) / secs(rs)
    );
    println!(
        "  clone / cp -r    = {q2:.2}x  target <= 1.5   {}   (vs cp -r + sync: {:.2}x)",
        ok(q2 <= 1.5),
        secs(k) / secs(cs)
    );
    let (s_mib, c_mib) = (server_hwm as f64 / 1024.0, clone_rss as f64 / 1024.0);
    println!("  peak RSS: serving node (VmHWM) {s_mib:.1} MiB, cloner (VmHWM) {c_mib:.1} MiB   target <= 100 MiB each   {}", ok(s_mib <= 100.0 && c_mib <= 100.0));
    println!(
        "  clone again of the complete instance: {:.2} s, 0 bytes transferred",
        secs(t_again)
    );
}

// ---- (b) mirror lag ------------------------------------------------------------------

/// Wait until `dir`'s node shows a mirror job that is up to date.
fn wait_mirror_ready(dir: &Path) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let s = cli(dir, &["status", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        if v["jobs"]
            .as_array()
            .map(|j| {
                j.iter()
                    .any(|j| j["kind"] == "mirror" && j["phase"] == "DONE")
            })
            .unwrap_or(false)
        {
            return;
        }
        assert!(Instant::now() < end, "the mirror did not come up: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Poll the mirror's database (read-only) until `content_id` is stored.
fn wait_stored(db: &rusqlite::Connection, content_id: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut st = db
        .prepare("SELECT 1 FROM manifests WHERE content_id = ?1")
        .unwrap();
    loop {
        if st.exists([content_id]).unwrap() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "item {content_id} did not reach the mirror within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Serve the mirror `dir` and wait until its mirror job is up to date; with
/// a read-only connection to its database, for [`wait_stored`].
fn serve_mirror(dir: &Path) -> (Serve, rusqlite::Connection) {
    let served = Serve::spawn(dir, &["--listen", "127.0.0.1:0"], "warn");
    wait_mirror_ready(dir);
    (served, db_read_only(dir))
}

/// `len` deterministic bytes (seed `seed`) into the file `path`.
fn write_input(path: &Path, seed: u64, len: u64) {
    let mut data = Vec::new();
    DataReader::new(seed, len).read_to_end(&mut data).unwrap();
    std::fs::write(path, &data).unwrap();
}

/// `bitsync put <input>` on `dir`'s node, measured; with the content id it printed.
fn put_file(dir: &Path, input: &Path) -> (bench::Run, String) {
    let p = measure(bench::bitsync(dir).arg("put").arg(input));
    let id = p.stdout.lines().last().unwrap().trim().to_string();
    (p, id)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn lag_bench() {
    let n = env_usize("BITSYNC_BENCH_LAG_ITEMS", 100);
    let tmp = TempDir::new_in(bench_dir()).unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    println!("\n(b) mirror lag: {n} items of 1 MiB, published one by one with `bitsync put`");
    let (an, bn) = (new_node(&a), new_node(&b));
    drop(an);
    let sa = Serve::spawn(&a, &["--listen", "127.0.0.1:0"], "warn");
    let an = Node::open(&a, &node::no_passphrase).unwrap();
    trust(&an, &bn, &sa.addr, true);
    drop((an, bn));
    let (_sb, db) = serve_mirror(&b);
    let mut lags = Vec::new();
    let mut puts = Vec::new();
    let input = tmp.path().join("in");
    for i in 0..n {
        write_input(&input, 0x1234_5678 + i as u64, MIB);
        let (p, id) = put_file(&a, &input);
        lags.push(wait_stored(&db, &id, Duration::from_secs(30)));
        puts.push(p.wall);
    }
    lags.sort();
    puts.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let ok = |v: bool| if v { "ok" } else { "MISSED" };
    let (p50, p99) = (pct(&lags, 0.5), pct(&lags, 0.99));
    println!("  put (for reference): p50 {:.1} ms", ms(pct(&puts, 0.5)));
    println!(
        "  lag from `put` exiting to stored on the mirror: min {:.1} ms, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(lags[0]),
        ms(p50),
        ms(p99),
        ms(*lags.last().unwrap())
    );
    println!(
        "  p50 target < 250 ms {}   p99 target < 1000 ms {}",
        ok(ms(p50) < 250.0),
        ok(ms(p99) < 1000.0)
    );
}

// ---- (c) first clone, ls and incremental sync of small items -------------------------

/// (recipient, wrapped key) pairs of one item.
type Envelopes = Vec<(String, Vec<u8>)>;

/// How the source wraps item keys.
#[derive(Clone, Copy, PartialEq)]
enum Wrap {
    /// Format 2, what `bitsync put` does now: through the link keys
    /// (AES-GCM per item; one RSA wrap per link key, made once).
    Link,
    /// Format 1: an RSA-OAEP envelope per recipient per item, as a data dir
    /// made before format 2 holds them. The receiver opens each with its
    /// private key; a format-2 source serves a stored envelope as it is.
    Rsa,
}

/// `n` one-chunk items straight into the source's store, each with envelopes
/// for the source and `other` (signing spread over the cores, chunk files
/// synced once, manifests inserted in order, 1000 per transaction).
fn fill_small_items(src: &Node, other: &Node, n: usize, wrap: Wrap) {
    let (own, theirs) = (src.id().to_hex(), other.id().to_hex());
    let other_pub = other.identity().public().clone();
    // Trusted with its key known before the items are made, so each carries
    // its envelope (the address is set once the source serves).
    trust(src, other, "127.0.0.1:9", false);
    if wrap == Wrap::Link {
        // The link keys are made at the first wrap; make them here, before
        // the threads would race to make one each.
        content::envelopes_for_new_item(src, &Hash::of(b"bench"), &crypto::ItemKey::random())
            .unwrap();
    }
    let made: Vec<(Manifest, Envelopes, (Hash, u64))> = bench::parallel(n, |i| {
        let plain = format!("small item {i} ").repeat(8).into_bytes();
        let (m, key, ct) = bench::one_chunk_item(
            src,
            &format!("item-{i}"),
            &plain,
            manifest::DEFAULT_CHUNK_SIZE,
            manifest::now_ms(),
        );
        let cid = Hash::of(&ct);
        src.chunks().write(&cid, &ct).unwrap();
        let envs = match wrap {
            Wrap::Link => content::envelopes_for_new_item(src, &m.id(), &key).unwrap(),
            Wrap::Rsa => vec![
                (own.clone(), crypto::wrap_key(src.identity().public(), &key)),
                (theirs.clone(), crypto::wrap_key(&other_pub, &key)),
            ],
        };
        assert_eq!(envs.len(), 2, "an envelope for the source and the mirror");
        (m, envs, (cid, ct.len() as u64))
    });
    src.chunks().sync().unwrap();
    for part in made.chunks(1000) {
        let chunks: Vec<(Hash, u64)> = part.iter().map(|(_, _, c)| *c).collect();
        src.db().record_chunks(&chunks).unwrap();
        let items: Vec<(&Manifest, Envelopes)> =
            part.iter().map(|(m, e, _)| (m, e.clone())).collect();
        src.db().insert_manifests(&items).unwrap();
    }
}

/// A source of `n` small items served through a byte-counting proxy, and a
/// fresh mirror dir that trusts it.
struct SmallSource {
    tmp: TempDir,
    a: std::path::PathBuf,
    b: std::path::PathBuf,
    serve: Serve,
    px: Proxy,
    a_id: String,
}

fn small_source(n: usize, wrap: Wrap) -> SmallSource {
    let tmp = TempDir::new_in(bench_dir()).unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (an, bn) = (new_node(&a), new_node(&b));
    let t = Instant::now();
    fill_small_items(&an, &bn, n, wrap);
    println!(
        "  setup: {n} items signed and stored on the source in {:.1} s (not part of the figures)",
        secs(t.elapsed())
    );
    drop(an);
    let serve = Serve::spawn(&a, &["--listen", "127.0.0.1:0"], "warn");
    let px = proxy(serve.addr.parse().unwrap(), None);
    let an = Node::open(&a, &node::no_passphrase).unwrap();
    trust(&an, &bn, &px.addr.to_string(), true);
    let a_id = an.id().to_hex();
    drop((an, bn));
    SmallSource {
        tmp,
        a,
        b,
        serve,
        px,
        a_id,
    }
}

/// What the first clone and `ls` of the mirror cost.
struct CloneFigures {
    items_per_s: f64,
    ls: Duration,
}

/// Time `bitsync clone` of the source into the mirror, then `bitsync ls` of
/// the mirror (median of 3; the page cache is warm after the clone, as for a
/// user listing what they just cloned).
fn time_clone_and_ls(s: &SmallSource, n: usize) -> CloneFigures {
    sync_all();
    let c = measure(bench::bitsync(&s.b).args(["clone", &s.a_id]));
    let serve_hwm = proc_kib(s.serve.pid(), "VmHWM:");
    let items_per_s = n as f64 / secs(c.wall);
    println!(
        "  first clone of {n} items: {:.2} s ({items_per_s:.0} items/s), {:.1} MiB on the wire, \
         peak RSS: serving node (VmHWM) {:.1} MiB, cloner (VmHWM) {:.1} MiB; CPU cloner {:.2} s",
        secs(c.wall),
        wire_bytes(&s.px) as f64 / MIB as f64,
        serve_hwm as f64 / 1024.0,
        c.max_rss_kib as f64 / 1024.0,
        secs(c.cpu()),
    );
    let runs: Vec<bench::Run> = (0..3)
        .map(|_| measure(bench::bitsync(&s.b).args(["ls"])))
        .collect();
    let rows = runs[0].stdout.lines().count().saturating_sub(1);
    assert_eq!(rows, n, "`bitsync ls` lists every cloned item");
    assert!(
        !runs[0].stdout.contains("partial"),
        "every cloned item is complete"
    );
    let ls = median(runs.iter().map(|r| r.wall).collect());
    let rss = runs.iter().map(|r| r.max_rss_kib).max().unwrap_or(0);
    println!(
        "  bitsync ls of the {n} items: {:.3} s (median of 3; {:.1} us per item), peak RSS {:.1} MiB",
        secs(ls),
        secs(ls) * 1e6 / n as f64,
        rss as f64 / 1024.0
    );
    CloneFigures { items_per_s, ls }
}

fn incremental_bench() {
    let n = env_usize("BITSYNC_BENCH_ITEMS", 100_000);
    let n1 = env_usize("BITSYNC_BENCH_F1_ITEMS", 10_000);
    println!(
        "\n(c) {n} small items: first clone, ls, then one new item published (incremental sync)"
    );
    println!("  format 2 (link keys), as `bitsync put` stores them now:");
    let s = small_source(n, Wrap::Link);
    let f2 = time_clone_and_ls(&s, n);
    incremental(&s);
    drop(s);
    let f1 = (n1 > 0).then(|| {
        println!("  format 1 (an RSA-OAEP envelope per item), {n1} items, same binary:");
        time_clone_and_ls(&small_source(n1, Wrap::Rsa), n1)
    });
    let ok = |v: bool| if v { "MET" } else { "MISSED" };
    println!(
        "  format 2 first clone: {:.0} items/s   target >= 5000/s   {}",
        f2.items_per_s,
        ok(f2.items_per_s >= 5000.0)
    );
    println!(
        "  format 2 ls of {n}: {:.3} s   target <= 2 s   {}",
        secs(f2.ls),
        ok(secs(f2.ls) <= 2.0)
    );
    if let Some(f1) = f1 {
        println!(
            "  format 1 first clone: {:.0} items/s; format 2 / format 1 = {:.1}x",
            f1.items_per_s,
            f2.items_per_s / f1.items_per_s
        );
        let per = |d: Duration, k: usize| secs(d) * 1e6 / k as f64;
        println!(
            "  ls per item: format 1 {:.1} us, format 2 {:.1} us; format 1 / format 2 = {:.1}x",
            per(f1.ls, n1),
            per(f2.ls, n),
            per(f1.ls, n1) / per(f2.ls, n)
        );
    }
}

/// With the mirror following the source (`serve` with the source as a
/// mirror peer), publish a 1 KiB and a 1 MiB item: bytes on the wire and lag.
fn incremental(s: &SmallSource) {
    let (tmp, a, px) = (&s.tmp, &s.a, &s.px);
    let (_sb, db) = serve_mirror(&s.b);
    let ok = |v: bool| if v { "ok" } else { "MISSED" };
    for (label, size) in [("1 KiB", 1024u64), ("1 MiB", MIB)] {
        std::thread::sleep(Duration::from_millis(500));
        let input = tmp.path().join("in");
        write_input(&input, 77 + size, size);
        let before = wire_bytes(px);
        let t0 = Instant::now();
        let (_, id) = put_file(a, &input);
        let lag = wait_stored(&db, &id, Duration::from_secs(60));
        let total = t0.elapsed();
        // Let the tail of the exchange (cursor, stream ends) pass through too.
        std::thread::sleep(Duration::from_millis(300));
        let wire = wire_bytes(px) - before;
        let item = size + 16;
        let over = wire.saturating_sub(item);
        println!(
            "  new {label} item: {wire} bytes on the wire ({item} of chunk + {over} B protocol, TLS and HTTP/2), \
             stored on the mirror {:.1} ms after `put` exited ({:.1} ms from `put` starting)   target < 64 KiB + item {}",
            lag.as_secs_f64() * 1e3,
            total.as_secs_f64() * 1e3,
            ok(over < 64 * 1024)
        );
    }
}

/// Bytes through the proxy, both ways.
fn wire_bytes(px: &Proxy) -> u64 {
    px.up.load(Ordering::Relaxed) + px.down.load(Ordering::Relaxed)
}

//! Clone vs rsync over a shaped link, side by side in one run: two network
//! namespaces joined by a link of 100 ms RTT with 2% loss each way and a
//! rate cap (`support::netns`: TUN devices and our own forwarder for delay
//! and loss, since this machine kind has no `sch_netem`; the cap is the
//! kernel's `tbf`). The source is `bitsync serve` in namespace A; the same
//! chunk files are served there by an rsync daemon. In namespace B, per
//! round, `bitsync clone --token-file` into a fresh data dir and `rsync -a
//! rsync://…` into a fresh directory, alternating which goes first. Both
//! cross the same link, one at a time; medians of the rounds.
//!
//! ```sh
//! cargo bench --bench netns                                  # 64 MiB, 20mbit, 3 rounds
//! BITSYNC_BENCH_MB=4 BITSYNC_BENCH_RATE=1mbit cargo bench --bench netns
//! ```
//! `BITSYNC_BENCH_LOSS_PPM` (default 20000 = 2%) and `BITSYNC_BENCH_DELAY_MS`
//! (one way, default 50) shape the link; `BITSYNC_BENCH_ROUNDS` (default 3).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bitsync::content::{self, PutOptions};
use tempfile::TempDir;

use support::bench::{bench_dir, env_usize};
use support::netns::{Link, ADDR_A};
use support::*;

const MIB: u64 = 1024 * 1024;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Run `cmd` to completion, insisting on exit 0; its wall time.
fn timed(cmd: &mut Command, what: &str) -> Duration {
    let t = Instant::now();
    let o = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    took
}

/// A child process killed (and reaped) when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An rsync daemon in namespace `ns` serving `dir` as module `chunks` on
/// ADDR_A:8730.
fn rsync_daemon(ns: &str, root: &Path, dir: &Path) -> Daemon {
    let conf = root.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "port = 8730\naddress = {ADDR_A}\nuse chroot = false\nuid = root\ngid = root\npid file = {}\n[chunks]\npath = {}\nread only = true\n",
            root.join("rsyncd.pid").display(),
            dir.display()
        ),
    )
    .unwrap();
    let daemon = Daemon(
        Command::new("ip")
            .args(["netns", "exec", ns, "rsync", "--daemon", "--no-detach"])
            .arg(format!("--config={}", conf.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("rsync is needed (apt-get install rsync)"),
    );
    // Wait until it listens: probe from inside A, where its address is.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let up = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "rsync",
                &format!("rsync://{ADDR_A}:8730/"),
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if up {
            return daemon;
        }
        assert!(Instant::now() < end, "the rsync daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn main() {
    let mb = env_usize("BITSYNC_BENCH_MB", 64) as u64;
    let rounds = env_usize("BITSYNC_BENCH_ROUNDS", 3).max(1);
    let rate = std::env::var("BITSYNC_BENCH_RATE").unwrap_or_else(|_| "20mbit".into());
    let loss = env_usize("BITSYNC_BENCH_LOSS_PPM", 20_000) as f64 / 1e6;
    let one_way = Duration::from_millis(env_usize("BITSYNC_BENCH_DELAY_MS", 50) as u64);
    let tmp = TempDir::new_in(bench_dir()).unwrap();
    let a = tmp.path().join("a");
    let src = new_node(&a);
    for i in 0..mb.div_ceil(4) {
        let n = (mb * MIB - i * 4 * MIB).min(4 * MIB);
        let opts = PutOptions {
            kind: "file".into(),
            name: format!("part-{i}"),
        };
        content::put(&src, &mut DataReader::new(0xA5 ^ i, n), &opts, &|_| {}).unwrap();
    }
    drop(src);
    let chunks = chunk_files(&a).len();
    println!(
        "\nclone vs rsync over a shaped link: {mb} MiB ({chunks} chunk files), \
         {} ms RTT, {:.1}% loss each way, {rate}, {rounds} rounds (median)",
        2 * one_way.as_millis(),
        loss * 100.0
    );
    let link = Link::new(one_way, loss);
    link.rate(Some(&rate));
    let listen = format!("{ADDR_A}:7450");
    let served = Serve::spawn_cmd(
        Link::bitsync(&link.a, &a),
        &a,
        &["--listen", &listen],
        "warn",
    );
    let _daemon = rsync_daemon(&link.a, tmp.path(), &a.join("chunks"));

    let (mut t_clone, mut t_rsync) = (vec![], vec![]);
    for r in 0..rounds {
        let b = tmp.path().join(format!("b-{r}"));
        let token = tmp.path().join("token");
        std::fs::write(&token, served.invite()).unwrap();
        let mut clone = Link::bitsync(&link.b, &b);
        clone.arg("clone").arg("--token-file").arg(&token);
        let dst = tmp.path().join(format!("rsync-{r}"));
        let mut rsync = Command::new("ip");
        rsync
            .args(["netns", "exec", &link.b, "rsync", "-a"])
            .arg(format!("rsync://{ADDR_A}:8730/chunks/"))
            .arg(&dst);
        let (c, s) = if r % 2 == 0 {
            let c = timed(&mut clone, "bitsync clone");
            (c, timed(&mut rsync, "rsync"))
        } else {
            let s = timed(&mut rsync, "rsync");
            (timed(&mut clone, "bitsync clone"), s)
        };
        assert_eq!(chunk_files(&b).len(), chunks, "the clone's chunk files");
        println!(
            "  round {r}: clone {:.1} s, rsync {:.1} s",
            c.as_secs_f64(),
            s.as_secs_f64()
        );
        t_clone.push(c);
        t_rsync.push(s);
        std::fs::remove_dir_all(&b).unwrap();
        std::fs::remove_dir_all(&dst).unwrap();
    }
    let (c, s) = (median(t_clone), median(t_rsync));
    let mbps = |d: Duration| (mb * MIB) as f64 * 8.0 / d.as_secs_f64() / 1e6;
    println!(
        "  bitsync clone (mTLS)   {:6.1} s   {:5.2} Mbit/s",
        c.as_secs_f64(),
        mbps(c)
    );
    println!(
        "  rsync daemon -a        {:6.1} s   {:5.2} Mbit/s",
        s.as_secs_f64(),
        mbps(s)
    );
    println!(
        "  clone / rsync = {:.2}x",
        c.as_secs_f64() / s.as_secs_f64()
    );
    let (passed, dropped) = link.packets();
    println!(
        "  link: {passed} packets delivered, {dropped} dropped ({:.1}%)",
        100.0 * dropped as f64 / (passed + dropped).max(1) as f64
    );
}

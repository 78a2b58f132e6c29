//! Backup and restore against `cp -r`, side by side in one run.
//!
//! ```sh
//! cargo bench --bench backup                        # a 2 GiB instance
//! BITSYNC_BENCH_MB=256 cargo bench --bench backup   # smaller
//! ```
//!
//! Builds an instance of BITSYNC_BENCH_MB MiB (items of 64 MiB, 1 MiB chunks)
//! with the library, then times, with the release `bitsync` binary:
//!
//! 1. `cp -r` of the data dir, and `cp -r` followed by `sync` (a backup
//!    fsyncs what it writes; plain `cp -r` leaves it in the page cache);
//! 2. `bitsync backup` into a new repository (target ≤ 1.3× `cp -r`);
//! 3. a second backup with nothing changed (target < 5 % of the first);
//! 4. an unchanged backup `--with-identity` (adds one scrypt, to seal the key);
//! 5. `bitsync restore` of that snapshot into a new data dir, against `cp -r`.
//!
//! Each timing is the best of BITSYNC_BENCH_ROUNDS (default 2) runs, with a
//! `sync` before each so one step's writeback does not land in the next.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::bench::{bin, env_usize, sync_all};
use support::{open, Xorshift};

const PASS: &str = "bench passphrase";

fn sh(cmd: &mut Command) {
    let out = cmd.output().expect("run command");
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The measured binary on `data_dir`, with the passphrase of a `--with-identity` backup.
fn bitsync(data_dir: &Path) -> Command {
    let mut c = support::bench::bitsync(data_dir);
    c.env("BITSYNC_PASSPHRASE", PASS);
    c
}

/// Best of `rounds` runs of `prepare` (untimed) then `run` (timed).
fn best(rounds: usize, mut prepare: impl FnMut(), mut run: impl FnMut()) -> Duration {
    let mut best = Duration::MAX;
    for _ in 0..rounds {
        prepare();
        sync_all();
        let t = Instant::now();
        run();
        best = best.min(t.elapsed());
    }
    best
}

fn rm(p: &Path) {
    let _ = std::fs::remove_dir_all(p);
}

fn main() {
    let mb = env_usize("BITSYNC_BENCH_MB", 2048) as u64;
    let rounds = env_usize("BITSYNC_BENCH_ROUNDS", 2).max(1);
    let base = std::env::var_os("BITSYNC_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::TempDir::new_in(&base).expect("temp dir");
    let data = tmp.path().join("node");
    let repo = tmp.path().join("repo");
    let cp_dst = tmp.path().join("cp-copy");
    let restored = tmp.path().join("restored");

    // The instance: MB MiB in items of up to 64 MiB.
    sh(bitsync(&data).arg("init"));
    let t = Instant::now();
    {
        let node = open(&data);
        let mut left = mb << 20;
        let mut i = 0u64;
        let mut buf = vec![0u8; 64 << 20];
        while left > 0 {
            let n = left.min(64 << 20) as usize;
            Xorshift::new(i + 1).fill(&mut buf[..n]);
            let opts = bitsync::content::PutOptions {
                kind: "file".into(),
                name: format!("item-{i}"),
            };
            bitsync::content::put(&node, &mut &buf[..n], &opts, &|_| {}).expect("put");
            left -= n as u64;
            i += 1;
        }
    }
    sync_all();
    let du = |p: &Path| -> u64 {
        let out = Command::new("du").arg("-sb").arg(p).output().expect("du");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or("0")
            .parse()
            .unwrap_or(0)
    };
    let size = du(&data);
    println!(
        "instance: {mb} MiB of content, data dir {:.1} MiB, built in {:.1} s",
        size as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    println!("rounds: best of {rounds}; binary: {}", bin().display());

    let cp = best(
        rounds,
        || rm(&cp_dst),
        || sh(Command::new("cp").arg("-r").arg(&data).arg(&cp_dst)),
    );
    let cp_sync = best(
        rounds,
        || rm(&cp_dst),
        || {
            sh(Command::new("cp").arg("-r").arg(&data).arg(&cp_dst));
            sync_all();
        },
    );
    rm(&cp_dst);
    let first = best(
        rounds,
        || rm(&repo),
        || sh(bitsync(&data).args(["backup", "--repo"]).arg(&repo)),
    );
    let second = best(
        rounds,
        || {},
        || sh(bitsync(&data).args(["backup", "--repo"]).arg(&repo)),
    );
    // With the node key: one scrypt (memory-hard on purpose) to seal it; nothing else changed.
    let with_key = best(
        rounds,
        || {},
        || {
            sh(bitsync(&data)
                .args(["backup", "--with-identity", "--repo"])
                .arg(&repo))
        },
    );
    let restore = best(
        rounds,
        || rm(&restored),
        || sh(bitsync(&restored).args(["restore", "--repo"]).arg(&repo)),
    );
    rm(&restored);
    sh(bitsync(&data)
        .args(["backup", "verify", "--repo"])
        .arg(&repo));

    let s = |d: Duration| d.as_secs_f64();
    let rate = |d: Duration| size as f64 / 1048576.0 / d.as_secs_f64().max(1e-9);
    println!();
    println!("{:<44} {:>9} {:>11}", "step", "seconds", "MiB/s");
    for (name, d) in [
        ("cp -r data dir", cp),
        ("cp -r data dir; sync", cp_sync),
        ("bitsync backup (first)", first),
        ("bitsync backup (second, unchanged)", second),
        ("bitsync backup --with-identity (unchanged)", with_key),
        ("bitsync restore", restore),
    ] {
        println!("{:<44} {:>9.3} {:>11.1}", name, s(d), rate(d));
    }
    println!();
    let x = |a: Duration, b: Duration| format!("{:.2}x", s(a) / s(b));
    let pct = |a: Duration, b: Duration| format!("{:.1}%", 100.0 * s(a) / s(b));
    for (what, ratio) in [
        (
            "first backup / cp -r",
            format!("{}   (target <= 1.3x)", x(first, cp)),
        ),
        ("first backup / (cp -r; sync)", x(first, cp_sync)),
        (
            "second backup / first backup",
            format!("{}   (target < 5%)", pct(second, first)),
        ),
        ("with-identity unchanged / first", pct(with_key, first)),
        ("restore / cp -r", x(restore, cp)),
        ("restore / (cp -r; sync)", x(restore, cp_sync)),
    ] {
        println!("{what:<33}= {ratio}");
    }
}

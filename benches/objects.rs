//! Chunks in an object store (SeaweedFS), side by side in one run:
//!
//! (a) `bitsync clone` of an instance from a local-disk node into a node
//!     whose chunks are in SeaweedFS, against `rclone copy` of the same
//!     chunk files into the same SeaweedFS (rclone's defaults);
//! (b) `bitsync put` of one file into a local-disk node and into a
//!     SeaweedFS node, then `bitsync verify` of each whole store.
//!
//! `cargo bench --bench objects [-- clone|put]` (release build). Real processes; the
//! SeaweedFS is the one `.ci/seaweedfs` started (`BITSYNC_TEST_S3_*`), else
//! a `weed mini` started here. Wall time, ratio and peak RSS of each.
//!
//! Environment: `BITSYNC_BENCH_MB` instance and file size in MiB (default
//! 1024), `BITSYNC_BENCH_ROUNDS` (default 2, median), `BITSYNC_BENCH_DIR`,
//! `BITSYNC_BENCH_BIN`.
//!
//! Targets (issue 12): clone ≤ 1.2 × rclone's time, peak RSS ≤ 100 MiB.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use support::bench::{self, bench_dir, env_usize, measure, sync_all, Run};
use support::seaweed::s3;
use support::*;

const MIB: u64 = 1024 * 1024;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    bitsync::tls::install_crypto_provider();
    let mb = env_usize("BITSYNC_BENCH_MB", 1024) as u64;
    let rounds = env_usize("BITSYNC_BENCH_ROUNDS", 2).max(1);
    let store = s3();
    let tmp = TempDir::new_in(bench_dir()).unwrap();
    println!(
        "objects bench on {} cores, binary {}, SeaweedFS at {}",
        bench::cores(),
        bench::bin().display(),
        store.endpoint
    );
    let want = bench::selection();
    if want("clone") {
        clone_vs_rclone(&tmp, mb, rounds);
    }
    if want("put") {
        put_and_verify(&tmp, mb, rounds);
    }
}

// ---- (a) clone into SeaweedFS vs rclone copy -----------------------------------

fn clone_vs_rclone(tmp: &TempDir, mb: u64, rounds: usize) {
    let a = tmp.path().join("a");
    println!("\n(a) clone into SeaweedFS vs rclone copy: {mb} MiB in 1 MiB chunks, {rounds} round(s) (median)");
    let t = Instant::now();
    let src = new_node(&a);
    let i = bench::publish_parts(&src, mb * MIB, 64 * MIB, 0x51ED);
    let a_id = src.id().to_hex();
    drop(src);
    println!(
        "  setup: {i} items published in {:.1} s (not part of the figures)",
        t.elapsed().as_secs_f64()
    );
    let served = Serve::spawn(&a, &["--listen", "127.0.0.1:0"], "warn");
    let s3 = s3();
    let have_rclone = Command::new("rclone").arg("version").output().is_ok();
    // The remote in a config file (mode 0600), not in the environment, so
    // no key shows in a failed command's message.
    let rclone_conf = tmp.path().join("rclone.conf");
    std::fs::write(
        &rclone_conf,
        format!(
            "[bench]\ntype = s3\nprovider = SeaweedFS\nendpoint = {}\naccess_key_id = {}\nsecret_access_key = {}\n",
            s3.endpoint, s3.access_key, s3.secret_key
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&rclone_conf, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    let (mut t_rclone, mut t_clone) = (vec![], vec![]);
    let (mut rss_rclone, mut rss_clone) = (0u64, 0u64);
    for r in 0..rounds {
        if have_rclone {
            let dest = s3.url(&format!("rclone-{r}"));
            let remote = format!("bench:{}/chunks", dest.trim_start_matches("s3://"));
            sync_all();
            let run = measure(
                Command::new("rclone")
                    .arg("--config")
                    .arg(&rclone_conf)
                    .args(["copy", "--s3-no-check-bucket"])
                    .arg(a.join("chunks"))
                    .arg(&remote)
                    .args(["--exclude", "tmp/**"])
                    // A CA bundle in the environment makes rclone's S3
                    // client refuse its own HTTP transport.
                    .env_remove("AWS_CA_BUNDLE"),
            );
            t_rclone.push(run.wall);
            rss_rclone = rss_rclone.max(run.max_rss_kib);
        }

        let b = tmp.path().join(format!("b-{r}"));
        s3.init_node(&b, &s3.url(&format!("clone-{r}")), None);
        let b_id = measure(bench::bitsync(&b).arg("id"))
            .stdout
            .trim()
            .to_string();
        measure(bench::bitsync(&a).args(["peer", "add", &b_id, "127.0.0.1:9"]));
        measure(bench::bitsync(&b).args(["peer", "add", &a_id, &served.addr]));
        sync_all();
        let run = measure(bench::bitsync(&b).args(["clone", &a_id]));
        assert!(run.stdout.contains("cloned "), "{}", run.stdout);
        t_clone.push(run.wall);
        rss_clone = rss_clone.max(run.max_rss_kib);
        let _ = std::fs::remove_dir_all(&b);
    }
    let clone = median(t_clone);
    let rate = |d: Duration| mb as f64 / d.as_secs_f64();
    println!(
        "  {:<34} {:>8} {:>10} {:>10} {:>12}",
        "", "wall s", "MiB/s", "ratio", "peak RSS MiB"
    );
    if have_rclone {
        let rc = median(t_rclone);
        println!(
            "  {:<34} {:>8.2} {:>10.1} {:>10} {:>12.1}",
            "rclone copy (chunk files)",
            rc.as_secs_f64(),
            rate(rc),
            "1.00",
            mib(rss_rclone)
        );
        let ratio = clone.as_secs_f64() / rc.as_secs_f64();
        println!(
            "  {:<34} {:>8.2} {:>10.1} {:>10.2} {:>12.1}",
            "bitsync clone (into SeaweedFS)",
            clone.as_secs_f64(),
            rate(clone),
            ratio,
            mib(rss_clone)
        );
        println!(
            "  target clone <= 1.2 x rclone: {}; peak RSS <= 100 MiB: {}",
            if ratio <= 1.2 { "MET" } else { "MISSED" },
            if mib(rss_clone) <= 100.0 {
                "MET"
            } else {
                "MISSED"
            }
        );
    } else {
        println!("  rclone not installed (apt-get install rclone): no baseline");
        println!(
            "  {:<34} {:>8.2} {:>10.1} {:>10} {:>12.1}",
            "bitsync clone (into SeaweedFS)",
            clone.as_secs_f64(),
            rate(clone),
            "-",
            mib(rss_clone)
        );
    }
}

// ---- (b) put and verify, local disk vs SeaweedFS --------------------------------

fn put_and_verify(tmp: &TempDir, mb: u64, rounds: usize) {
    println!("\n(b) put of one {mb} MiB file and verify of the store: local disk vs SeaweedFS, {rounds} round(s) (median)");
    let input = tmp.path().join("input.bin");
    let mut f = std::fs::File::create(&input).unwrap();
    std::io::copy(&mut DataReader::new(0xB0B, mb * MIB), &mut f).unwrap();
    f.sync_all().unwrap();
    let s3 = s3();
    // (label, put times, put peak RSS, verify times, verify peak RSS)
    type Row = (&'static str, Vec<Duration>, u64, Vec<Duration>, u64);
    let mut rows: Vec<Row> = vec![];
    for (label, on_s3) in [("local disk", false), ("SeaweedFS", true)] {
        let (mut puts, mut verifies, mut put_rss, mut verify_rss) = (vec![], vec![], 0, 0);
        for r in 0..rounds {
            let d = tmp
                .path()
                .join(format!("put-{}-{r}", if on_s3 { "s3" } else { "disk" }));
            if on_s3 {
                s3.init_node(&d, &s3.url(&format!("put-{r}")), None);
            } else {
                measure(bench::bitsync(&d).arg("init"));
            }
            bench::warm_file(&input);
            sync_all();
            let p: Run = measure(bench::bitsync(&d).arg("put").arg(&input));
            puts.push(p.wall);
            put_rss = put_rss.max(p.max_rss_kib);
            sync_all();
            let v = measure(bench::bitsync(&d).arg("verify"));
            verifies.push(v.wall);
            verify_rss = verify_rss.max(v.max_rss_kib);
            let _ = std::fs::remove_dir_all(&d);
        }
        rows.push((label, puts, put_rss, verifies, verify_rss));
    }
    println!(
        "  {:<12} {:>8} {:>8} {:>10} {:>10} {:>8} {:>10}",
        "", "put s", "MiB/s", "RSS MiB", "verify s", "MiB/s", "RSS MiB"
    );
    let mut base: Option<(f64, f64)> = None;
    for (label, puts, prss, verifies, vrss) in rows {
        let (p, v) = (median(puts).as_secs_f64(), median(verifies).as_secs_f64());
        println!(
            "  {label:<12} {p:>8.2} {:>8.1} {:>10.1} {v:>10.2} {:>8.1} {:>10.1}",
            mb as f64 / p,
            mib(prss),
            mb as f64 / v,
            mib(vrss)
        );
        match base {
            None => base = Some((p, v)),
            Some((bp, bv)) => println!(
                "  SeaweedFS / local disk: put {:.2}x the time, verify {:.2}x",
                p / bp,
                v / bv
            ),
        }
    }
}

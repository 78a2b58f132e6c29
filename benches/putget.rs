//! put/get throughput and peak memory, against `cp` and `cat` of the same file.
//!
//! `cargo bench --bench putget` (release build). Runs the real `bitsync`
//! binary as a child process, so the figures are what a user sees: process
//! start, key loading, SQLite, chunk files, fsyncs and all.
//!
//! Each round, on one temp directory (same disk for everything):
//!
//! 1. `cp IN OUT`                     — the baseline (does not fsync)
//! 2. `cp IN OUT && sync OUT`         — the baseline made durable, as bitsync is
//! 3. `cat IN > OUT && sync OUT`      — the same through write(2), as get writes
//!    (cp may hand the copy to the kernel whole: copy_file_range, no page copy)
//! 4. `bitsync put IN`                — into a freshly initialized data dir
//! 5. `bitsync get ID -o OUT`         — from that data dir
//! 6. `openssl dgst -sha256` of that data dir's chunk files (through xargs)
//! 7. `bitsync verify`                — of that data dir (the same chunk files)
//!
//! Before every timed step the outputs of the previous step are removed, the
//! ground is levelled ([`support::bench::level`]: the same just-freed memory
//! for every step, and `sync()` so none pays for another's write-back), and
//! the input is read once (page cache equally warm for every contender). The
//! median of the rounds is reported. Peak RSS and CPU times come from
//! wait4(2)'s rusage.
//!
//! Environment:
//! - `BITSYNC_BENCH_MB`      input size in MiB (default 1024)
//! - `BITSYNC_BENCH_ROUNDS`  rounds (default 3)
//! - `BITSYNC_BENCH_DIR`     where to put the files (default: cargo's target tmp dir)
//! - `BITSYNC_BENCH_BIN`     the bitsync binary to measure (default: the one cargo built)
//!
//! Targets (issue 15): put ≥ 0.5 × `cp`+`sync`, get ≥ 0.5 × `cat`+`sync`,
//! verify ≥ 0.8 × `openssl dgst`;
//! peak RSS < 64 MiB (an earlier issue's bound).

#[path = "../tests/support/mod.rs"]
mod support;

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::bench::{self, bin, bitsync, env_usize, measure, warm_dir, warm_file, Run};
use support::DataReader;

const MIB: u64 = 1024 * 1024;

/// Level the ground for the next timed step, then warm the input.
fn level(input: &Path, bytes: u64) {
    bench::level(input.parent().unwrap(), bytes);
    warm_file(input);
}

fn make_input(path: &Path, bytes: u64) {
    let mut f = File::create(path).unwrap();
    std::io::copy(&mut DataReader::new(0x2545_F491_4F6C_DD1D, bytes), &mut f).unwrap();
    f.sync_all().unwrap();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[derive(Default)]
struct Series {
    mbps: Vec<f64>,
    wall: Vec<f64>,
    user: Vec<f64>,
    sys: Vec<f64>,
    rss_kib: u64,
}

impl Series {
    fn add(&mut self, r: &Run, bytes: u64) {
        let s = r.wall.as_secs_f64();
        self.mbps.push(bytes as f64 / 1e6 / s);
        self.wall.push(s);
        self.user.push(r.user.as_secs_f64());
        self.sys.push(r.sys.as_secs_f64());
        // wait4's figure, as this bench has always reported (its own RSS is small).
        self.rss_kib = self.rss_kib.max(r.ru_maxrss_kib);
    }
    fn mbps(&self) -> f64 {
        median(self.mbps.clone())
    }
}

fn main() {
    // `cargo bench` passes --bench; any other argument is a filter we do not support.
    let mb = env_usize("BITSYNC_BENCH_MB", 1024) as u64;
    let rounds = env_usize("BITSYNC_BENCH_ROUNDS", 3).max(1);
    let base: PathBuf = std::env::var_os("BITSYNC_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
    fs::create_dir_all(&base).unwrap();
    let tmp = tempfile::tempdir_in(&base).unwrap();
    let bytes = mb * MIB;
    let input = tmp.path().join("input.bin");
    let out = tmp.path().join("output.bin");
    let data = tmp.path().join("data");

    eprintln!(
        "putget: {mb} MiB input, {rounds} round(s), in {}",
        tmp.path().display()
    );
    eprintln!("putget: binary {}", bin().display());
    make_input(&input, bytes);

    let [mut cp, mut cp_sync, mut cat_sync, mut put, mut get, mut dgst, mut verify]: [Series; 7] =
        Default::default();
    for round in 1..=rounds {
        // cp
        let _ = fs::remove_file(&out);
        level(&input, bytes);
        let r = measure(Command::new("cp").arg(&input).arg(&out));
        cp.add(&r, bytes);
        fs::remove_file(&out).unwrap();

        // cp + sync of the copy (coreutils `sync FILE` fsyncs that file)
        level(&input, bytes);
        let r = measure(&mut sh("cp \"$1\" \"$2\" && sync \"$2\"", &[&input, &out]));
        cp_sync.add(&r, bytes);
        fs::remove_file(&out).unwrap();

        // cat + sync: the write(2) path get takes
        level(&input, bytes);
        let r = measure(&mut sh(
            "cat \"$1\" > \"$2\" && sync \"$2\"",
            &[&input, &out],
        ));
        cat_sync.add(&r, bytes);
        fs::remove_file(&out).unwrap();

        // put, into a fresh data dir
        let _ = fs::remove_dir_all(&data);
        measure(bitsync(&data).arg("init"));
        level(&input, bytes);
        let r = measure(bitsync(&data).arg("put").arg(&input));
        let id = r.stdout.lines().last().unwrap_or("").trim().to_string();
        assert_eq!(id.len(), 64, "put printed no content id: {:?}", r.stdout);
        put.add(&r, bytes);

        // get
        level(&input, bytes);
        let r = measure(bitsync(&data).arg("get").arg(&id).arg("-o").arg(&out));
        assert_eq!(
            fs::metadata(&out).unwrap().len(),
            bytes,
            "get wrote the wrong size"
        );
        get.add(&r, bytes);
        if round == 1 {
            // Once: the round trip is exact.
            assert!(
                files_equal(&input, &out),
                "get output differs from the input"
            );
        }
        fs::remove_file(&out).unwrap();

        // openssl dgst, then verify, of the same (warm) chunk files
        level(&input, bytes);
        warm_dir(&data.join("chunks"));
        let dgst_all = "find \"$1\" -path '*/chunks/??/*' -type f -print0 | xargs -0 openssl dgst -sha256 > /dev/null";
        let r = measure(&mut sh(dgst_all, &[&data]));
        dgst.add(&r, bytes);
        let r = measure(bitsync(&data).arg("verify"));
        verify.add(&r, bytes);
        fs::remove_dir_all(&data).unwrap();
        eprintln!(
            "putget: round {round}: cp {:.0}, cp+sync {:.0}, cat+sync {:.0}, put {:.0}, get {:.0}, openssl dgst {:.0}, verify {:.0} MB/s",
            cp.mbps.last().unwrap(),
            cp_sync.mbps.last().unwrap(),
            cat_sync.mbps.last().unwrap(),
            put.mbps.last().unwrap(),
            get.mbps.last().unwrap(),
            dgst.mbps.last().unwrap(),
            verify.mbps.last().unwrap()
        );
    }

    println!();
    println!("put/get vs cp: {mb} MiB ({bytes} bytes), median of {rounds} round(s); MB/s = 10^6 bytes per second");
    println!();
    println!("| step | MB/s | wall s | user s | sys s | peak RSS MiB |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, s) in [
        ("cp", &cp),
        ("cp + sync", &cp_sync),
        ("cat + sync", &cat_sync),
        ("bitsync put", &put),
        ("bitsync get", &get),
        ("openssl dgst -sha256 (chunk files)", &dgst),
        ("bitsync verify", &verify),
    ] {
        println!(
            "| {name} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} |",
            s.mbps(),
            median(s.wall.clone()),
            median(s.user.clone()),
            median(s.sys.clone()),
            s.rss_kib as f64 / 1024.0
        );
    }
    println!();
    let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
    let (pr, gr) = (put.mbps() / cp_sync.mbps(), get.mbps() / cat_sync.mbps());
    println!("put / cp         = {:.2}", put.mbps() / cp.mbps());
    println!("get / cp         = {:.2}", get.mbps() / cp.mbps());
    println!(
        "put / (cp+sync)  = {pr:.2}  (target >= 0.5: {})",
        verdict(pr >= 0.5)
    );
    println!(
        "get / (cat+sync) = {gr:.2}  (target >= 0.5: {})",
        verdict(gr >= 0.5)
    );
    let vr = verify.mbps() / dgst.mbps();
    println!(
        "verify / dgst    = {vr:.2}  (target >= 0.8: {})",
        verdict(vr >= 0.8)
    );
    let (prss, grss) = (put.rss_kib as f64 / 1024.0, get.rss_kib as f64 / 1024.0);
    println!(
        "peak RSS put     = {prss:.1} MiB  (target < 64: {})",
        verdict(prss < 64.0)
    );
    println!(
        "peak RSS get     = {grss:.1} MiB  (target < 64: {})",
        verdict(grss < 64.0)
    );
}

/// `sh -c SCRIPT sh ARGS…`: the arguments are `$1`, `$2`, … in the script.
fn sh(script: &str, args: &[&Path]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script).arg("sh").args(args);
    c
}

fn files_equal(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

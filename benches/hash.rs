//! SHA-256 and AES-256-GCM rates of the implementations this build can use,
//! each beside `openssl speed` on the same machine, in the same run.
//!
//! `cargo bench --bench hash` (release build). For each primitive, 1 MiB
//! buffers (the default chunk size) are processed for about one second per
//! contender; then `openssl speed -evp sha256` / `-evp aes-256-gcm` runs as a
//! child process and its 16384-byte column (its largest block) is the floor.
//! Printed: MB/s (10^6 bytes) and the ratio to openssl.
//!
//! Contenders:
//! - `sha2` as built (0.10: the `x86` backend, which uses SHA-NI when the CPU
//!   has it, detected at run time). Its other features cannot win: `asm` only
//!   swaps the non-SHA-NI fallback for sha2-asm, and `force-soft` /
//!   `force-soft-compact` remove the SHA-NI path.
//! - aws-lc-rs `digest::SHA256` (aws-lc's assembly, SHA-NI and AVX2 paths).
//! - aws-lc-rs `aead::AES_256_GCM` seal and open in place (its VAES/AVX-512
//!   path where the CPU has one).
//!
//! Environment: `BITSYNC_BENCH_SECS` seconds per contender (default 1).

use std::process::Command;
use std::time::{Duration, Instant};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::Digest;

const BUF: usize = 1 << 20;

/// Bytes per second of `f` over `BUF`-byte calls, run for `secs`.
fn rate(secs: f64, mut f: impl FnMut()) -> f64 {
    f(); // warm up (page faults, CPU feature detection)
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        f();
        n += 1;
    }
    (n * BUF as u64) as f64 / start.elapsed().as_secs_f64()
}

/// `openssl speed -evp ALG`'s rate for its largest block size, bytes/s.
fn openssl_rate(alg: &str, secs: f64) -> Option<f64> {
    let out = Command::new("openssl")
        .args(["speed", "-seconds", &format!("{}", secs.ceil() as u64)])
        .args(["-bytes", "16384", "-evp", alg])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // The result line: "<alg>   <rate>k" (thousands of bytes per second).
    let line = text.lines().rev().find(|l| l.trim_end().ends_with('k'))?;
    let k: f64 = line
        .split_whitespace()
        .last()?
        .trim_end_matches('k')
        .parse()
        .ok()?;
    Some(k * 1000.0)
}

fn row(name: &str, bps: f64, floor: Option<f64>) {
    let ratio = floor.map_or("n/a".to_string(), |f| format!("{:.2}x", bps / f));
    println!("  {name:<44} {:>8.0} MB/s   {ratio} openssl", bps / 1e6);
}

fn main() {
    let secs: f64 = std::env::var("BITSYNC_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let buf: Vec<u8> = (0..BUF).map(|i| (i * 2_654_435_761) as u8).collect();
    println!("hash: 1 MiB buffers, {secs} s per contender");
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("  load average: {}", l.trim());
    }

    let floor = openssl_rate("sha256", secs);
    println!("SHA-256");
    row(
        "openssl speed -evp sha256 (16 KiB blocks)",
        floor.unwrap_or(0.0),
        floor,
    );
    let mut sink = 0u8;
    row(
        "sha2 0.10 as built (x86 SHA-NI backend)",
        rate(secs, || sink ^= sha2::Sha256::digest(&buf)[0]),
        floor,
    );
    row(
        "aws-lc-rs digest::SHA256",
        rate(secs, || {
            sink ^= aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &buf).as_ref()[0]
        }),
        floor,
    );
    row(
        "bitsync crypto::Hash::of (what the node uses)",
        rate(secs, || sink ^= bitsync::crypto::Hash::of(&buf).0[0]),
        floor,
    );

    let floor = openssl_rate("aes-256-gcm", secs);
    println!("AES-256-GCM");
    row(
        "openssl speed -evp aes-256-gcm (16 KiB)",
        floor.unwrap_or(0.0),
        floor,
    );
    let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap());
    let mut data = buf.clone();
    row(
        "aws-lc-rs AES_256_GCM seal in place",
        rate(secs, || {
            let n = Nonce::assume_unique_for_key([1u8; 12]);
            let tag = key
                .seal_in_place_separate_tag(n, Aad::empty(), &mut data)
                .unwrap();
            sink ^= tag.as_ref()[0];
        }),
        floor,
    );
    let mut sealed = buf.clone();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key([1u8; 12]),
        Aad::empty(),
        &mut sealed,
    )
    .unwrap();
    let mut work = sealed.clone();
    row(
        "aws-lc-rs AES_256_GCM open in place",
        rate(secs, || {
            work.copy_from_slice(&sealed);
            let n = Nonce::assume_unique_for_key([1u8; 12]);
            sink ^= key.open_in_place(n, Aad::empty(), &mut work).unwrap()[0];
        }),
        floor,
    );
    row(
        "bitsync crypto::encrypt_chunk (copy + seal)",
        rate(secs, || {
            sink ^=
                bitsync::crypto::encrypt_chunk(&bitsync::crypto::ItemKey::random(), 0, true, &buf)
                    [0]
        }),
        floor,
    );
    std::hint::black_box(sink);
}

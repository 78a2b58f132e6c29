//! Watching a node: its metrics listener scraped during a clone and checked
//! with a stock `promtool`, counter values against what was cloned, a real
//! Prometheus server scraping two nodes, the deploy/ rules, and the status
//! page in headless Chromium. Real `bitsync serve` processes throughout.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::support::*;

/// Small chunks: many chunks per item, so a clone takes a while on a slow wire.
const CHUNK: usize = 65536;
/// AES-GCM's tag: what each chunk's ciphertext adds to its plaintext.
const TAG: u64 = 16;

/// `init` with small chunks; returns the node id.
fn init(dir: &Path) -> String {
    let id = ok_at(dir, &["init"]).last_line();
    set_chunk_size(dir, CHUNK);
    id
}

/// Publish `items` (name, size) on the stopped node at `dir`; returns the
/// ciphertext bytes and chunks they occupy.
fn publish(dir: &Path, items: &[(&str, usize)]) -> (u64, u64) {
    let node = open(dir);
    let (mut bytes, mut chunks) = (0, 0);
    for (i, (name, len)) in items.iter().enumerate() {
        put(&node, name, &data(40 + i as u64, *len));
        let n = len.div_ceil(CHUNK).max(1) as u64;
        bytes += *len as u64 + TAG * n;
        chunks += n;
    }
    (bytes, chunks)
}

/// Serve `dir` behind a proxy that paces what it sends to `rate` bytes/s,
/// advertised in its invites: (node, metrics address, proxy address).
fn serve_slowed(dir: &Path, rate: u64) -> (Serve, String, String) {
    let port = free_port();
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = proxy(target, Some(rate));
    let cfg = dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("advertise = []", &format!("advertise = [\"{}\"]", p.addr));
    std::fs::write(&cfg, text).unwrap();
    let (s, m) = serve_watched(dir, &target.to_string());
    (s, m, p.addr.to_string())
}

fn short(id: &str) -> &str {
    &id[..12]
}

/// Admin/Clone on the running node behind `sock`, in a thread.
fn clone_in_background(sock: std::path::PathBuf, token: String) -> std::thread::JoinHandle<Out> {
    std::thread::spawn(move || {
        admin(
            &sock,
            "Clone",
            &format!("{{\"token_or_peer\":\"{token}\"}}"),
        )
    })
}

#[test]
fn scrape_during_a_clone_passes_promtool_and_byte_counters_match_what_was_cloned() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let a_id = init(&a);
    let (bytes, chunks) = publish(&a, &[("one", 900_000), ("two", 700_000), ("three", 5)]);
    let (sa, ma, _) = serve_slowed(&a, 600_000);
    let b_id = init(&b);
    let (sb, mb) = serve_watched(&b, "127.0.0.1:0");
    let clone = clone_in_background(sb.socket(), sa.invite());

    // A scrape of each side while the clone job is part-way.
    let job = [("kind", "clone"), ("peer", short(&a_id))];
    let during = wait_for(60, "a scrape of B during the clone", || {
        let text = scrape(&mb);
        let done = sample(&text, "bitsync_job_done_bytes", &job)?;
        (done > 0.0 && done < bytes as f64).then_some(text)
    });
    let checked = promtool_check_metrics(&during);
    assert_eq!(
        checked.code, 0,
        "promtool on B's scrape: {checked:?}\n{during}"
    );
    let sender = scrape(&ma);
    let checked = promtool_check_metrics(&sender);
    assert_eq!(
        checked.code, 0,
        "promtool on A's scrape: {checked:?}\n{sender}"
    );
    assert!(
        during.contains("bitsync_job_items_expected{kind=\"clone\""),
        "{during}"
    );

    let out = clone.join().unwrap();
    assert_eq!(out.code, 0, "Admin/Clone: {out:?}");

    // The counters count chunk ciphertext as stored: the plaintext plus one
    // 16-byte tag per chunk; framing (protobuf, HTTP/2, TLS) is not counted.
    let (a_text, b_text) = (scrape(&ma), scrape(&mb));
    let to_b = [("peer", short(&b_id))];
    let from_a = [("peer", short(&a_id))];
    let sent = sample(&a_text, "bitsync_peer_sent_bytes_total", &to_b);
    let received = sample(&b_text, "bitsync_peer_received_bytes_total", &from_a);
    assert_eq!(sent, Some(bytes as f64), "{a_text}");
    assert_eq!(received, Some(bytes as f64), "{b_text}");
    let sent_chunks = sample(&a_text, "bitsync_peer_sent_chunks_total", &to_b);
    let received_chunks = sample(&b_text, "bitsync_peer_received_chunks_total", &from_a);
    assert_eq!(
        (sent_chunks, received_chunks),
        (Some(chunks as f64), Some(chunks as f64))
    );
    assert_eq!(
        sample(&b_text, "bitsync_stored_bytes", &[]),
        Some(bytes as f64)
    );
    assert_eq!(sample(&b_text, "bitsync_stored_items", &[]), Some(3.0));
    assert_eq!(
        sample(&b_text, "bitsync_peers", &[("state", "trusted")]),
        Some(1.0)
    );
    // One rekey per item (A wraps each item's key for B), timed.
    assert_eq!(sample(&a_text, "bitsync_rekeys_total", &[]), Some(3.0));
    assert_eq!(
        sample(&a_text, "bitsync_rekey_duration_seconds_count", &[]),
        Some(3.0)
    );
    // The gRPC layer saw A's side of the clone and B's Admin call.
    let streamed = [
        ("service", "bitsync.v1.Federation"),
        ("method", "StreamChunks"),
        ("code", "Ok"),
    ];
    assert!(sample(&a_text, "bitsync_grpc_requests_total", &streamed).unwrap() >= 1.0);
    let cloned = [
        ("service", "bitsync.v1.Admin"),
        ("method", "Clone"),
        ("code", "Ok"),
    ];
    assert_eq!(
        sample(&b_text, "bitsync_grpc_requests_total", &cloned),
        Some(1.0)
    );
    // Nothing Admin-only leaks: no full node id, address or token anywhere.
    let page = serde_json::to_string(&status_json(&mb)).unwrap();
    for text in [&a_text, &b_text, &page] {
        for secret in [
            a_id.as_str(),
            b_id.as_str(),
            sa.addr.as_str(),
            "bitsync-invite",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
    }
    drop((sa, sb));
}

#[test]
fn a_corrupt_chunk_counts_as_data_loss_for_that_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let a_id = init(&a);
    publish(&a, &[("whole", 3 * CHUNK)]);
    // Damage one chunk on A's disk, as a bad disk would: A's read re-hashes
    // it, quarantines it and answers DATA_LOSS for it.
    let victim = chunk_files(&a).into_iter().next().unwrap();
    flip_byte(&victim, 100);
    let (sa, _ma) = serve_watched(&a, "127.0.0.1:0");
    init(&b);
    let (sb, mb) = serve_watched(&b, "127.0.0.1:0");
    let out = clone_in_background(sb.socket(), sa.invite())
        .join()
        .unwrap();
    assert_ne!(out.code, 0, "the clone cannot be complete: {out:?}");
    let text = scrape(&mb);
    let lost = [("peer", short(&a_id)), ("reason", "peer_data_loss")];
    assert_eq!(
        sample(&text, "bitsync_peer_chunks_rejected_total", &lost),
        Some(1.0),
        "{text}"
    );
    let received = [("peer", short(&a_id))];
    assert_eq!(
        sample(&text, "bitsync_peer_received_chunks_total", &received),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "bitsync_jobs_failed_total", &[("kind", "clone")]),
        Some(1.0)
    );
    drop((sa, sb));
}

#[test]
fn prometheus_scrapes_two_nodes_and_sees_bytes_grow_and_mirror_lag() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let a_id = init(&a);
    publish(&a, &[("first", 100_000)]);
    let (sa, ma) = serve_watched(&a, "127.0.0.1:0");
    ok_at(&b, &["clone", &sa.invite()]);
    let (sb, mb) = serve_watched(&b, "127.0.0.1:0");
    ok_at(&b, &["peer", "add", &a_id, &sa.addr, "--mirror"]);
    let prom = Prometheus::start(&tmp.path().join("prom"), &[&ma, &mb]);
    wait_for(60, "Prometheus to scrape both nodes", || {
        let up = prom.query("up == 1");
        (up.len() == 2).then_some(())
    });

    let received = format!(
        "bitsync_peer_received_bytes_total{{peer=\"{}\"}}",
        short(&a_id)
    );
    let value = |q: &str| prom.query(q).first().map(|(_, v)| *v);
    let mut last = 0.0;
    for i in 0..2u64 {
        let d = data(70 + i, 150_000 + i as usize);
        let f = tmp.path().join(format!("new-{i}"));
        std::fs::write(&f, &d).unwrap();
        ok_at(&a, &["put", f.to_str().unwrap()]);
        last = wait_for(60, "Prometheus to see B's received bytes grow", || {
            value(&received).filter(|v| *v > last)
        });
    }
    // Both items' ciphertext arrived through the mirror (one tag per chunk).
    let expected = (150_000 + 150_001) as f64 + (TAG * 6) as f64;
    assert_eq!(last, expected);
    // A's process also served B's first clone: 100 000 bytes, 2 chunks.
    let sent = format!(
        "bitsync_peer_sent_bytes_total{{peer=\"{}\"}}",
        short(&sb.node_id)
    );
    let all = expected + (100_000 + 2 * TAG) as f64;
    wait_for(30, "A's sent counter to match", || {
        (value(&sent) == Some(all)).then_some(())
    });

    let lag = format!("bitsync_mirror_lag_seconds{{peer=\"{}\"}}", short(&a_id));
    let lag = wait_for(30, "the mirror lag gauge", || value(&lag));
    assert!((0.0..30.0).contains(&lag), "mirror lag {lag}");
    let synced = format!(
        "bitsync_mirror_last_sync_timestamp_seconds{{peer=\"{}\"}}",
        short(&a_id)
    );
    let synced = wait_for(30, "the last sync time", || value(&synced));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        synced > now - 120.0 && synced <= now + 1.0,
        "last sync {synced}, now {now}"
    );
    drop((sa, sb));
}

#[test]
fn deploy_prometheus_config_and_rules_pass_promtool() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let rules = root.join("prometheus-rules.yml");
    let out = promtool(&["check", "rules", rules.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        format!("{}{}", out.text(), out.stderr).contains("SUCCESS: 4 rules found"),
        "{out:?}"
    );
    let cfg = root.join("prometheus.yml");
    let out = promtool(&["check", "config", cfg.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn status_page_shows_peers_and_a_mirror_job_progressing_in_chromium() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let a_id = init(&a);
    name(&a, "origin");
    publish(&a, &[("seed", 1000)]);
    let (sa, _ma, slow) = serve_slowed(&a, 400_000);
    ok_at(&b, &["clone", &sa.invite()]);
    name(&b, "mirror-b");
    let (sb, mb) = serve_watched(&b, "127.0.0.1:0");
    // B mirrors A over the slow wire, so a large new item takes seconds.
    ok_at(&b, &["peer", "add", &a_id, &slow, "--mirror"]);
    let f = tmp.path().join("big");
    std::fs::write(&f, data(9, 4_000_000)).unwrap();
    ok_at(&a, &["put", f.to_str().unwrap()]);
    let job = format!("mirror:{}", short(&a_id));
    let bytes_done = |s: &serde_json::Value| {
        s["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["kind"] == "mirror")?["bytes_done"]
            .as_u64()
    };
    wait_for(60, "B's mirror job to be under way", || {
        bytes_done(&status_json(&mb)).filter(|b| *b > 0 && *b < 4_000_000)
    });

    let url = format!("http://{mb}/");
    let dom = |n: &str| {
        let profile = tmp.path().join(format!("chromium-{n}"));
        let out = chromium(&profile, &url, 5000, &["--dump-dom"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = dom("1");
    assert!(
        first.contains(&format!("data-peer=\"{}\"", short(&a_id))),
        "{first}"
    );
    assert!(first.contains("trusted"), "{first}");
    assert!(first.contains(&format!("data-job=\"{job}\"")), "{first}");
    assert!(first.contains("class=\"bar"), "{first}");
    // The page polls by itself: several answers within one load.
    let updates = attr(&first, "data-updates").parse::<u32>().unwrap();
    assert!(updates >= 2, "the page updated {updates} times: {first}");
    let done_1: u64 = attr(&first, "data-bytes-done").parse().unwrap();
    wait_for(60, "the mirror to move on", || {
        bytes_done(&status_json(&mb)).filter(|b| *b > done_1)
    });
    let second = dom("2");
    let done_2: u64 = attr(&second, "data-bytes-done").parse().unwrap();
    assert!(
        done_2 > done_1,
        "the job's progress did not move: {done_1} then {done_2}"
    );
    // Nothing but short ids: no item id or name on the page.
    assert!(
        !second.contains(&a_id) && !second.contains("big"),
        "{second}"
    );

    for (name, size) in [("desktop", "1200,620"), ("phone", "390,844")] {
        let shot = tmp.path().join(format!("status-{name}.png"));
        let profile = tmp.path().join(format!("chromium-{name}"));
        let arg = format!("--screenshot={}", shot.display());
        chromium(
            &profile,
            &url,
            4000,
            &[&arg, &format!("--window-size={size}")],
        );
        let png = std::fs::read(&shot).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{name}: {} bytes",
            png.len()
        );
        if let Some(dir) = std::env::var_os("BITSYNC_SCREENSHOTS") {
            std::fs::copy(&shot, Path::new(&dir).join(format!("status-{name}.png"))).unwrap();
        }
    }
    drop((sa, sb));
}

/// Set `name` in the config of the stopped node at `dir`.
fn name(dir: &Path, name: &str) {
    let cfg = dir.join("config.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace("name = \"\"", &format!("name = \"{name}\""));
    std::fs::write(&cfg, text).unwrap();
}

/// The value of the first `name="..."` attribute in `html`.
fn attr<'a>(html: &'a str, name: &str) -> &'a str {
    let at = html
        .find(&format!("{name}=\""))
        .unwrap_or_else(|| panic!("no {name} in {html}"));
    let rest = &html[at + name.len() + 2..];
    &rest[..rest.find('"').unwrap()]
}

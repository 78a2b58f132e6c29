//! Federation throughput, side by side in one run.
//!
//! (a) Just-in-time rekey: a server node holding N items (default 10,000) not
//!     yet keyed for the caller; GetManifests in batches of 200 over loopback
//!     mutual TLS, first pass (format 2: symmetric unwrap + wrap + store per
//!     item, one link key made) and second pass (stored envelopes). Targets:
//!     >= 10,000/s first, >= 50,000/s cached. Format 1's per-item re-key
//!     (RSA unwrap + RSA wrap) is timed in the same run, step by step, on
//!     the same items before they are migrated. Then the same first fetch
//!     by a caller that presents its ML-KEM-768 key (a hybrid BLE3 link
//!     key, FORMAT.md §4.2b), printed as a ratio to the BLE2 one.
//! (b) StreamChunks: a real `bitsync serve` child process holding M MiB
//!     (default 2048) of 1 MiB chunks, streamed over loopback mutual TLS,
//!     every chunk hash-checked by the receiver, against `cat`ing the same
//!     chunk files to /dev/null in the same run; plus the server's peak RSS
//!     (VmHWM). Targets: >= 0.6x cat, RSS < 100 MiB.
//!
//! ```sh
//! cargo bench --bench federation                 # both
//! cargo bench --bench federation -- rekey        # only (a)
//! BITSYNC_BENCH_MB=512 cargo bench --bench federation -- stream
//! BITSYNC_BENCH_ITEMS=2000 cargo bench --bench federation -- rekey
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bitsync::content::{self, PutOptions};
use bitsync::crypto::{self, Hash, ItemKey};
use bitsync::manifest::{self, Manifest};
use bitsync::node::Node;
use bitsync::proto::*;
use bitsync::server::{self, ServeOptions};
use bitsync::store::PeerState;
use tempfile::TempDir;

use support::bench::{self, bench_dir, env_usize, proc_kib};
use support::*;

const BATCH: usize = 200;

fn open_new_node(dir: &Path, config: Option<&str>) -> Node {
    match config {
        Some(c) => new_node_with_config(dir, c),
        None => new_node(dir),
    }
}

fn main() {
    bitsync::tls::install_crypto_provider();
    let want = bench::selection();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("federation bench on {} cores", bench::cores());
    if want("rekey") {
        rt.block_on(rekey_bench());
    }
    if want("stream") {
        rt.block_on(stream_bench());
    }
}

// ---- (a) just-in-time rekey --------------------------------------------------

/// Make `n` signed items with the server's own envelope, straight into its
/// database (signing spread over the cores, inserts in order).
fn fill_items(server: &Node, n: usize) -> Vec<String> {
    let own = server.id().to_hex();
    let made: Vec<(Manifest, Vec<u8>)> = bench::parallel(n, |i| {
        let plain = format!("item {i}").into_bytes();
        let created = manifest::now_ms() + i as i64;
        let (m, key, _) = bench::one_chunk_item(
            server,
            &format!("item-{i}"),
            &plain,
            manifest::MIN_CHUNK_SIZE,
            created,
        );
        (m, crypto::wrap_key(server.identity().public(), &key))
    });
    made.iter()
        .map(|(m, w)| {
            server
                .db()
                .insert_manifest(m, &[(own.clone(), w.clone())], &[])
                .unwrap();
            m.id().to_hex()
        })
        .collect()
}

async fn get_all(
    client: &mut bitsync::replicator::Client,
    kem: Option<SignedKemKey>,
    ids: &[String],
    caller: &str,
) -> (Duration, Vec<Vec<u8>>) {
    let started = Instant::now();
    let mut envelopes = Vec::with_capacity(ids.len());
    for batch in ids.chunks(BATCH) {
        let r = client
            .get_manifests(GetManifestsRequest {
                content_ids: batch.to_vec(),
                envelope_format: bitsync::keyring::ENVELOPE_FORMAT,
                caller_kem_key: kem.clone(),
                envelopes_only: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.results.len(), batch.len());
        for res in r.results {
            assert!(res.problem.is_none(), "{:?}", res.problem);
            let e = res.envelope.expect("an envelope");
            assert_eq!(e.recipient, caller);
            envelopes.push(e.wrapped_key);
        }
    }
    (started.elapsed(), envelopes)
}

async fn rekey_bench() {
    let n = env_usize("BITSYNC_BENCH_ITEMS", 10_000);
    let tmp = TempDir::new_in(bench_dir()).unwrap();
    let server = open_new_node(&tmp.path().join("server"), None);
    let caller = open_new_node(&tmp.path().join("caller"), None);
    println!("\n(a) JIT rekey: {n} items, GetManifests in batches of {BATCH}, loopback mutual TLS, RSA-3072");
    let t = Instant::now();
    let ids = fill_items(&server, n);
    println!(
        "  setup: {n} items signed and stored in {:.1} s (not part of the figures)",
        t.elapsed().as_secs_f64()
    );
    let format1 = breakdown(&server, &caller, &ids);
    // The items were stored with format-1 (RSA) own envelopes: reopening
    // migrates them (FORMAT.md §4.6), timed here as a figure of its own.
    let dir = server.paths().root().to_path_buf();
    // As a format-1 data dir would be: its own envelopes not yet migrated.
    server.db().set_setting("envelope_format", "1").unwrap();
    drop(server);
    let t = Instant::now();
    let server = open(&dir);
    println!(
        "  format 1 -> 2 migration of {n} own envelopes on open: {:.1} s ({:.0} envelopes/s)",
        t.elapsed().as_secs_f64(),
        n as f64 / t.elapsed().as_secs_f64()
    );
    server
        .db()
        .upsert_peer(&caller.id(), "bench", "", PeerState::Trusted, false)
        .unwrap();
    let running = server::start(
        server,
        ServeOptions {
            listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ch = dialer(&caller)
        .channel(running.state.node.id(), &running.listen_address.to_string())
        .await
        .unwrap();
    let mut client = bitsync::replicator::client(ch);
    let me = caller.id().to_hex();

    let (first, env1) = get_all(&mut client, None, &ids, &me).await;
    let (second, env2) = get_all(&mut client, None, &ids, &me).await;
    assert_eq!(
        env1, env2,
        "the second pass must return the stored envelopes"
    );
    // Every envelope opens with the caller's link key (checked outside the timing).
    let links = client
        .get_link_envelopes(GetLinkEnvelopesRequest {})
        .await
        .unwrap()
        .into_inner();
    caller
        .receive_link_envelopes(&links.sender_spki, &links.link_envelopes)
        .unwrap();
    for (id, w) in ids.iter().zip(&env1).step_by((n / 100).max(1)) {
        caller
            .open_envelope(&Hash::parse(id, "id").unwrap(), w)
            .unwrap();
    }
    let r1 = n as f64 / first.as_secs_f64();
    let r2 = n as f64 / second.as_secs_f64();
    println!(
        "  format 2 first fetch (re-key): {:>9.0} manifests/s  ({:.2} s)   target >= 10000/s   {}",
        r1,
        first.as_secs_f64(),
        verdict(r1 >= 10_000.0)
    );
    println!(
        "  format 2 second fetch (cached): {:>8.0} manifests/s  ({:.2} s)   target >= 50000/s   {}",
        r2,
        second.as_secs_f64(),
        verdict(r2 >= 50_000.0)
    );
    println!(
        "  format 1 re-key, per core (its RSA unwrap + RSA wrap per item, timed above): {format1:.0} manifests/s; \
         format 2 first fetch / that: {:.1}x",
        r1 / format1
    );
    println!("  cached / first: {:.1}x", r2 / r1);

    // The same first fetch by a caller that presents its ML-KEM key: its
    // link key is a hybrid BLE3 (one encapsulation more, once), per item
    // the same symmetric work.
    let hybrid = open_new_node(&tmp.path().join("caller-pq"), None);
    running
        .state
        .node
        .db()
        .upsert_peer(&hybrid.id(), "bench-pq", "", PeerState::Trusted, false)
        .unwrap();
    let ch = dialer(&hybrid)
        .channel(running.state.node.id(), &running.listen_address.to_string())
        .await
        .unwrap();
    let mut client = bitsync::replicator::client(ch);
    let kem = Some(hybrid.signed_kem_key());
    let (first_pq, env_pq) = get_all(&mut client, kem, &ids, &hybrid.id().to_hex()).await;
    let links = client
        .get_link_envelopes(GetLinkEnvelopesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(links.link_envelopes[0].starts_with(b"BLE3"));
    hybrid
        .receive_link_envelopes(&links.sender_spki, &links.link_envelopes)
        .unwrap();
    for (id, w) in ids.iter().zip(&env_pq).step_by((n / 100).max(1)) {
        hybrid
            .open_envelope(&Hash::parse(id, "id").unwrap(), w)
            .unwrap();
    }
    let r3 = n as f64 / first_pq.as_secs_f64();
    println!(
        "  format 2 first fetch, hybrid BLE3 link (ML-KEM-768 + RSA): {:>6.0} manifests/s  ({:.2} s)   target >= 10000/s   {}",
        r3,
        first_pq.as_secs_f64(),
        verdict(r3 >= 10_000.0)
    );
    println!("  hybrid first / BLE2 first: {:.2}x", r3 / r1);
    running.shutdown().await;
}

/// Where the time of one item goes, server side, without the network: each
/// step of a format-1 re-key timed alone over a sample of items (single
/// thread). Returns the format-1 per-item rate those steps allow on one core.
fn breakdown(server: &Node, caller: &Node, ids: &[String]) -> f64 {
    let sample: Vec<Hash> = ids
        .iter()
        .take(200)
        .map(|i| Hash::parse(i, "id").unwrap())
        .collect();
    let n = sample.len() as f64;
    let own = server.id().to_hex();
    let per = |t: Instant| t.elapsed().as_secs_f64() * 1e6 / n;
    let t = Instant::now();
    let ms: Vec<Manifest> = sample
        .iter()
        .map(|id| server.db().manifest(id).unwrap().unwrap().0)
        .collect();
    let load = per(t);
    let t = Instant::now();
    for m in &ms {
        Manifest::from_signed(m.body_bytes().to_vec(), m.signature().to_vec()).unwrap();
    }
    let verify = per(t);
    let t = Instant::now();
    let envs: Vec<Vec<u8>> = sample
        .iter()
        .map(|id| server.db().envelope(id, &own).unwrap().unwrap())
        .collect();
    let env = per(t);
    let t = Instant::now();
    let keys: Vec<ItemKey> = envs
        .iter()
        .map(|w| server.identity().unwrap_key(w).unwrap())
        .collect();
    let unwrap = per(t);
    let t = Instant::now();
    for _ in 0..sample.len() {
        bitsync::identity::public_key_from_spki(caller.identity().spki()).unwrap();
    }
    let parse = per(t);
    let t = Instant::now();
    let wrapped: Vec<Vec<u8>> = keys
        .iter()
        .map(|k| crypto::wrap_key(caller.identity().public(), k))
        .collect();
    let wrap = per(t);
    // The same public-key operations on aws-lc, for comparison (not used by the node).
    let t = Instant::now();
    for m in &ms {
        let pkcs1 =
            rsa::pkcs1::EncodeRsaPublicKey::to_pkcs1_der(&m.publisher_key().unwrap()).unwrap();
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::RSA_PSS_2048_8192_SHA256,
            pkcs1.as_bytes(),
        )
        .verify(&crypto::signed_message(m.body_bytes()), m.signature())
        .expect("aws-lc verifies the manifest signature");
    }
    let lc_verify = per(t);
    let t = Instant::now();
    let lc_key = aws_lc_rs::rsa::OaepPublicEncryptingKey::new(
        aws_lc_rs::rsa::PublicEncryptingKey::from_der(caller.identity().spki()).unwrap(),
    )
    .unwrap();
    let mut lc_wrapped = Vec::new();
    for k in &keys {
        let mut out = vec![0u8; lc_key.ciphertext_size()];
        let c = lc_key
            .encrypt(
                &aws_lc_rs::rsa::OAEP_SHA256_MGF1SHA256,
                k.as_bytes(),
                &mut out,
                None,
            )
            .unwrap();
        lc_wrapped.push(c.to_vec());
    }
    let lc_wrap = per(t);
    assert_eq!(
        caller
            .identity()
            .unwrap_key(&lc_wrapped[0])
            .unwrap()
            .as_bytes(),
        keys[0].as_bytes()
    );
    let t = Instant::now();
    for (id, w) in sample.iter().zip(&wrapped) {
        server
            .db()
            .add_envelopes(&[(*id, "breakdown-only".to_string(), w.clone())])
            .unwrap();
    }
    let store = per(t);
    println!("  per item, one thread, no network (us): load manifest {load:.0} (of which signature check {verify:.0}), \
              envelope lookup {env:.0}, unwrap (aws-lc) {unwrap:.0}, parse caller key {parse:.0}, wrap {wrap:.0}, \
              store envelope + seq (1 transaction, synchronous=FULL) {store:.0}");
    println!("  for comparison, aws-lc public-key ops (us): verify signature {lc_verify:.0}, wrap {lc_wrap:.0}");

    // Proposed store access patterns, measured on the same database file
    // through a separate connection (the node does not do these today).
    let mut c = rusqlite::Connection::open(server.paths().db()).unwrap();
    c.pragma_update(None, "synchronous", "FULL").unwrap();
    c.busy_timeout(Duration::from_secs(30)).unwrap();
    let t = Instant::now();
    {
        let mut st = c
            .prepare_cached(
                "SELECT m.body, m.signature, m.seq, e.wrapped FROM manifests m LEFT JOIN envelopes e
                 ON e.content_id = m.content_id AND e.recipient = ?2 WHERE m.content_id = ?1",
            )
            .unwrap();
        for id in &sample {
            let (body, _sig, _seq, env): (Vec<u8>, Vec<u8>, i64, Option<Vec<u8>>) = st
                .query_row(rusqlite::params![id.to_hex(), own], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })
                .unwrap();
            assert!(env.is_some() && Hash::of(&body) == *id);
        }
    }
    let joint = per(t);
    let t = Instant::now();
    {
        let tx = c
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        for (id, w) in sample.iter().zip(&wrapped) {
            tx.execute(
                "INSERT OR IGNORE INTO envelopes(content_id, recipient, wrapped) VALUES (?1, 'breakdown-batch', ?2)",
                rusqlite::params![id.to_hex(), w],
            )
            .unwrap();
            let seq: i64 = tx
                .query_row(
                    "UPDATE counters SET value = value + 1 WHERE name = 'seq' RETURNING value",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            tx.execute(
                "UPDATE manifests SET seq = ?2 WHERE content_id = ?1",
                rusqlite::params![id.to_hex(), seq],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let batch = per(t);
    println!("  proposed (us): manifest + caller's envelope in one cached query, no signature check {joint:.0}; \
              {} envelopes + seq bumps in one transaction {batch:.0} per item", sample.len());
    1e6 / (load + env + unwrap + parse + wrap + batch)
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "MISSED"
    }
}

// ---- (b) StreamChunks vs cat ----------------------------------------------------

fn cat_files(paths: &[PathBuf]) -> Duration {
    let t = Instant::now();
    for group in paths.chunks(512) {
        let st = Command::new("cat")
            .args(group)
            .stdout(std::fs::File::create("/dev/null").unwrap())
            .status()
            .unwrap();
        assert!(st.success());
    }
    t.elapsed()
}

/// Stream every chunk: `per_call` ids per StreamChunks call, `parallel` calls
/// at once on the one channel; each chunk is hash-checked as it arrives.
async fn stream_all(
    client: &bitsync::replicator::Client,
    ids: &[String],
    per_call: usize,
    parallel: usize,
    verify: bool,
) -> (Duration, u64) {
    use futures::StreamExt;
    let t = Instant::now();
    let groups: Vec<Vec<String>> = ids.chunks(per_call).map(|c| c.to_vec()).collect();
    let totals: Vec<u64> = futures::stream::iter(groups)
        .map(|g| {
            let mut c = client.clone();
            async move {
                let mut s = c
                    .stream_chunks(StreamChunksRequest {
                        chunk_ids: g.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let mut bytes = 0u64;
                let mut i = 0;
                while let Some(m) = s.message().await.unwrap() {
                    assert!(m.problem.is_none(), "{:?}", m.problem);
                    assert_eq!(m.chunk_id, g[i]);
                    if verify {
                        assert_eq!(
                            Hash::of(&m.data).to_hex(),
                            m.chunk_id,
                            "chunk bytes match their id"
                        );
                    }
                    bytes += m.data.len() as u64;
                    i += 1;
                }
                assert_eq!(i, g.len());
                bytes
            }
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    (t.elapsed(), totals.iter().sum())
}

/// A client channel like the node's Dialer (same pinned mutual TLS) but with
/// larger HTTP/2 windows and frames: a diagnostic for the transport settings.
async fn tuned_channel(
    caller: &Node,
    server: bitsync::crypto::NodeId,
    address: &str,
) -> tonic::transport::Channel {
    let cfg = bitsync::tls::client_config(caller.identity(), server).unwrap();
    let addr = address.to_string();
    let connector = tower::service_fn(move |_: tonic::transport::Uri| {
        let (cfg, addr) = (cfg.clone(), addr.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(bitsync::tls::server_name(), tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_static("http://bitsync.peer")
        .initial_stream_window_size(16 << 20)
        .initial_connection_window_size(64 << 20)
        .max_frame_size(256 << 10)
        .connect_with_connector(connector)
        .await
        .unwrap()
}

async fn stream_bench() {
    let mb = env_usize("BITSYNC_BENCH_MB", 2048);
    let tmp = TempDir::new_in(bench_dir()).unwrap();
    let sdir = tmp.path().join("server");
    println!("\n(b) StreamChunks: {mb} MiB in 1 MiB chunks from a `bitsync serve` child, loopback mutual TLS");
    let server = open_new_node(&sdir, None);
    let caller = open_new_node(&tmp.path().join("caller"), None);
    let t = Instant::now();
    let mut gen = DataReader::new(1, mb as u64 * 1024 * 1024);
    let id = content::put(
        &server,
        &mut gen,
        &PutOptions {
            kind: "file".into(),
            name: "bench".into(),
        },
        &|_| {},
    )
    .unwrap();
    let (m, _) = server.db().manifest(&id).unwrap().unwrap();
    let ids: Vec<String> = m.chunk_ids().map(|c| c.to_hex()).collect();
    let paths: Vec<PathBuf> = m
        .chunk_ids()
        .map(|c| server.chunks().file(&c).unwrap())
        .collect();
    server
        .db()
        .upsert_peer(&caller.id(), "bench", "", PeerState::Trusted, false)
        .unwrap();
    let server_id = server.id();
    drop(server);
    println!(
        "  setup: published {} chunks in {:.1} s (not part of the figures)",
        ids.len(),
        t.elapsed().as_secs_f64()
    );

    let served = Serve::spawn(&sdir, &["--listen", "127.0.0.1:0"], "warn");
    let (pid, address) = (served.pid(), served.addr.clone());
    let rss_idle = proc_kib(pid, "VmRSS:");

    let ch = dialer(&caller).channel(server_id, &address).await.unwrap();
    let client = bitsync::replicator::client(ch);

    // Warm the page cache so both sides read from memory.
    cat_files(&paths);
    let bytes_total: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let mbs = |b: u64, d: Duration| b as f64 / d.as_secs_f64() / (1024.0 * 1024.0);

    let cat1 = cat_files(&paths);
    let (s_one, b1) = stream_all(&client, &ids, 4096, 1, true).await;
    let (s_par, b2) = stream_all(&client, &ids, 64, 4, true).await;
    let (s_nohash, b3) = stream_all(&client, &ids, 4096, 1, false).await;
    let tuned = bitsync::replicator::client(tuned_channel(&caller, server_id, &address).await);
    let (s_tuned, b4) = stream_all(&tuned, &ids, 4096, 1, true).await;
    let cat2 = cat_files(&paths);
    for b in [b1, b2, b3, b4] {
        assert_eq!(b, bytes_total);
    }
    // SHA-256 alone over 64 chunks in memory: the check each side makes per chunk.
    let sample: Vec<Vec<u8>> = paths
        .iter()
        .take(64)
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let sample_bytes: u64 = sample.iter().map(|d| d.len() as u64).sum();
    let t = Instant::now();
    for d in &sample {
        std::hint::black_box(Hash::of(d));
    }
    let sha = t.elapsed();
    let cat = cat1.min(cat2);
    let hwm = proc_kib(pid, "VmHWM:");

    let r_cat = mbs(bytes_total, cat);
    let r_one = mbs(bytes_total, s_one);
    let r_par = mbs(bytes_total, s_par);
    println!("  cat chunk files > /dev/null:             {r_cat:>8.0} MiB/s  (best of 2: {:.2} s, {:.2} s)", cat1.as_secs_f64(), cat2.as_secs_f64());
    println!(
        "  StreamChunks, 1 call of all ids:         {r_one:>8.0} MiB/s  ({:.2} s)  {:.2}x cat",
        s_one.as_secs_f64(),
        r_one / r_cat
    );
    println!(
        "  StreamChunks, 64 ids/call, 4 parallel:   {r_par:>8.0} MiB/s  ({:.2} s)  {:.2}x cat  (the replicator's pattern)",
        s_par.as_secs_f64(),
        r_par / r_cat
    );
    let r_nohash = mbs(bytes_total, s_nohash);
    let r_tuned = mbs(bytes_total, s_tuned);
    println!(
        "  StreamChunks, 1 call, receiver skips hash: {r_nohash:>6.0} MiB/s  ({:.2} s)  {:.2}x cat  (diagnostic)",
        s_nohash.as_secs_f64(),
        r_nohash / r_cat
    );
    println!(
        "  StreamChunks, 1 call, client with 16 MiB windows, 256 KiB frames: {r_tuned:.0} MiB/s  ({:.2} s)  {:.2}x cat  (diagnostic)",
        s_tuned.as_secs_f64(),
        r_tuned / r_cat
    );
    println!(
        "  SHA-256 alone, one core: {:.0} MiB/s (each side hashes every chunk once)",
        mbs(sample_bytes, sha)
    );
    let best = r_one.max(r_par) / r_cat;
    println!("  ratio target >= 0.6x cat: {}", verdict(best >= 0.6));
    println!(
        "  server RSS: {:.1} MiB idle, peak (VmHWM) {:.1} MiB   target < 100 MiB   {}",
        rss_idle as f64 / 1024.0,
        hwm as f64 / 1024.0,
        verdict(hwm < 100 * 1024)
    );
}

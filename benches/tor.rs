//! Tor transport, side by side in one run on a private Tor network on
//! 127.0.0.1 (tests/tornet/tornet.sh; needs Debian's `tor`):
//!
//! - bitsync clone of a 64 MiB instance over Tor (embedded arti on both
//!   nodes, one HTTP/2 connection, parallel StreamChunks streams);
//! - a raw transfer of the same number of bytes over one onion stream (the floor);
//! - the same bytes fetched the Axon way: one request on a fresh onion stream
//!   per 256 KiB chunk.
//!
//! Also prints how long the network and a node's Tor took to come up.
//!
//! ```sh
//! cargo bench --bench tor                       # 64 MiB
//! BITSYNC_BENCH_MB=16 cargo bench --bench tor
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use bitsync::node::{self, Node};
use bitsync::replicator::{self, Replicator};
use bitsync::server::{self, ServeOptions};
use bitsync::tor::{self, TorOptions};
use futures::StreamExt;
use support::tornet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AXON_CHUNK: usize = 256 * 1024;
const ITEM_MB: usize = 4;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    bitsync::tls::install_crypto_provider();
    let mb = support::bench::env_usize("BITSYNC_BENCH_MB", 64);
    let total = mb * 1024 * 1024;
    let tmp = tempfile::tempdir().unwrap();

    let t = Instant::now();
    let net = tokio::task::block_in_place(|| tornet::Network::up(7));
    let arti = tokio::task::block_in_place(|| net.ready());
    let network_up = t.elapsed();
    let arti_s = arti.to_str().unwrap().to_string();
    let tor_section = |enabled: bool| {
        format!("enabled = {enabled}\narti_config = {arti_s:?}\nbootstrap_timeout_secs = 120\nconnect_timeout_secs = 120")
    };

    // Source node with the instance, serving on an onion service.
    let a_dir = tmp.path().join("a");
    node::init(&a_dir, None).unwrap();
    tornet::configure_node(&a_dir, &tor_section(true));
    let a = Node::open(&a_dir, &node::no_passphrase).unwrap();
    let mut left = total;
    let mut i = 0u64;
    while left > 0 {
        let n = left.min(ITEM_MB * 1024 * 1024);
        support::put(&a, &format!("item{i}"), &support::data(i, n));
        left -= n;
        i += 1;
    }
    let t = Instant::now();
    let running = server::start(
        a,
        ServeOptions {
            listen: None,
            tor: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let onion = loop {
        if let Some(o) = running.state.onion_address.lock().unwrap().clone() {
            break o;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "onion service never launched"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let node_up = t.elapsed();
    let inv = bitsync::invite::Invite::new(running.state.node.id(), vec![onion.clone()], i64::MAX);
    running
        .state
        .node
        .db()
        .create_invite(&inv.secret_hash(), i64::MAX, bitsync::store::Level::Keyed)
        .unwrap();

    // Raw floor and the Axon way: a plain onion service on its own arti client.
    let raw_server = tor::bootstrap(&TorOptions {
        state_dir: tmp.path().join("raw-server"),
        arti_config: Some(arti.clone()),
        bootstrap_timeout: Duration::from_secs(120),
    })
    .await
    .unwrap();
    let (svc, streams) = tor::launch_onion_service(&raw_server, "raw").await.unwrap();
    let raw_onion = svc.address();
    tokio::spawn(async move {
        let mut streams = Box::pin(streams);
        while let Some(mut s) = streams.next().await {
            tokio::spawn(async move {
                // Request: 8-byte big-endian length; reply: that many bytes.
                let mut len = [0u8; 8];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut n = u64::from_be_bytes(len) as usize;
                let block = vec![0x5au8; 64 * 1024];
                while n > 0 {
                    let k = n.min(block.len());
                    if s.write_all(&block[..k]).await.is_err() {
                        return;
                    }
                    n -= k;
                }
                let _ = s.flush().await;
            });
        }
    });
    let raw_client = tor::bootstrap(&TorOptions {
        state_dir: tmp.path().join("raw-client"),
        arti_config: Some(arti.clone()),
        bootstrap_timeout: Duration::from_secs(120),
    })
    .await
    .unwrap();
    let fetch = |n: usize| {
        let c = raw_client.clone();
        let host = raw_onion.clone();
        async move {
            let mut s = tor::connect(&c, &host, 80, Duration::from_secs(120)).await?;
            s.write_all(&(n as u64).to_be_bytes())
                .await
                .map_err(|e| tor::TorError::Io("write".into(), e))?;
            s.flush()
                .await
                .map_err(|e| tor::TorError::Io("flush".into(), e))?;
            let mut got = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            while got < n {
                let k = s
                    .read(&mut buf)
                    .await
                    .map_err(|e| tor::TorError::Io("read".into(), e))?;
                if k == 0 {
                    break;
                }
                got += k;
            }
            Ok::<usize, tor::TorError>(got)
        }
    };
    // Warm up: the first dial builds the rendezvous circuit; retry through HSDir hiccups.
    let warm = Instant::now();
    loop {
        match fetch(1).await {
            Ok(_) => break,
            Err(e) if warm.elapsed() < Duration::from_secs(120) => {
                eprintln!("raw service not reachable yet: {e}");
                tokio::time::sleep(Duration::from_secs(2)).await
            }
            Err(e) => panic!("raw onion service unreachable: {e}"),
        }
    }

    // 1. bitsync clone over Tor.
    let b_dir = tmp.path().join("b");
    node::init(&b_dir, None).unwrap();
    tornet::configure_node(&b_dir, &tor_section(false));
    let b = std::sync::Arc::new(Node::open(&b_dir, &node::no_passphrase).unwrap());
    let (dialer, _) = server::dialer(&b).unwrap();
    let rep = Replicator::new(b.clone(), dialer);
    // Bring B's Tor up first, so the clone time is transfer time.
    let t = Instant::now();
    let b_tor = tor::bootstrap(&TorOptions {
        state_dir: tmp.path().join("b-probe"),
        arti_config: Some(arti.clone()),
        bootstrap_timeout: Duration::from_secs(120),
    })
    .await
    .unwrap();
    let client_bootstrap = t.elapsed();
    drop(b_tor);
    let t = Instant::now();
    let out = replicator::clone_now(&rep, &inv.encode(), |_| {})
        .await
        .expect("clone over Tor");
    let clone_t = t.elapsed();
    assert!(
        out.bytes as usize >= total,
        "clone moved every byte ({} of {total})",
        out.bytes
    );

    // 2. Raw: the same bytes on one onion stream.
    let t = Instant::now();
    let got = fetch(total).await.unwrap();
    let raw_t = t.elapsed();
    assert_eq!(got, total);

    // 3. Axon way: a fresh stream and request per 256 KiB chunk.
    let t = Instant::now();
    let mut got = 0;
    for _ in 0..total.div_ceil(AXON_CHUNK) {
        got += fetch(AXON_CHUNK).await.unwrap();
    }
    let axon_t = t.elapsed();
    assert!(got >= total);

    let mbs = |d: Duration| total as f64 / 1e6 / secs(d);
    println!("private Tor network on 127.0.0.1: 3 authorities + 5 relays");
    println!(
        "network up (keys, start, first consensus) : {:>7.1} s",
        secs(network_up)
    );
    println!(
        "node A: Tor bootstrap + onion launched    : {:>7.1} s",
        secs(node_up)
    );
    println!(
        "arti client bootstrap                     : {:>7.1} s",
        secs(client_bootstrap)
    );
    println!("transfer of {mb} MiB:");
    println!(
        "  raw, one onion stream                   : {:>7.2} s  {:>6.2} MB/s",
        secs(raw_t),
        mbs(raw_t)
    );
    println!(
        "  bitsync clone over Tor                  : {:>7.2} s  {:>6.2} MB/s",
        secs(clone_t),
        mbs(clone_t)
    );
    println!(
        "  Axon way (fresh stream per 256 KiB)     : {:>7.2} s  {:>6.2} MB/s",
        secs(axon_t),
        mbs(axon_t)
    );
    println!(
        "clone / raw   = {:.2}x  (target <= 1.2x)",
        secs(clone_t) / secs(raw_t)
    );
    println!("axon  / clone = {:.2}x", secs(axon_t) / secs(clone_t));
    running.shutdown().await;
    drop(net);
}

//! End-to-end test of the Tor layer against a private Tor network on 127.0.0.1.
//!
//! Needs the `tor` package (tests/tornet/tornet.sh installs it with apt when run as root).
//! The network is built in a temp dir and torn down by a drop guard; every tor daemon also
//! watches this process (TORNET_OWNER_PID) and exits if the test is killed.
//! Run with `RUST_LOG=info` (or `debug`) to see Arti's progress.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bitsync::tor::{self, TorError, TorOptions};

use crate::support::tornet::{tornet, Network, NETWORK_TIMEOUT_S};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const NICKNAME: &str = "bitsync-test";

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

fn opts(state_dir: PathBuf, arti_config: &Path, timeout: Duration) -> TorOptions {
    TorOptions {
        state_dir,
        arti_config: Some(arti_config.to_path_buf()),
        bootstrap_timeout: timeout,
    }
}

/// Echo every byte back on every stream the onion service yields.
fn spawn_echo_server(
    streams: impl futures::Stream<Item = arti_client::DataStream> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    use futures::StreamExt;
    tokio::spawn(async move {
        let mut streams = Box::pin(streams);
        while let Some(mut s) = streams.next().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    })
}

/// Write `msg`, read the same number of bytes back, and compare.
async fn echo_roundtrip<S>(s: &mut S, msg: &[u8]) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(msg).await.map_err(|e| format!("write: {e}"))?;
    s.flush().await.map_err(|e| format!("flush: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut back))
        .await
        .map_err(|_| "no echo within 20 s".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    if back != msg {
        return Err(format!("echo mismatch: {back:?}"));
    }
    Ok(())
}

/// Retry `attempt` until it succeeds or `budget` runs out; anything past the budget is a failure.
///
/// Why retry at all: on this network the onion-service time period is 8 minutes, and for 25-35 s
/// after some period changes, new connections from a client fail ("No more HSDir available to
/// query") until the service has uploaded its descriptor for the new period (measured in a
/// 20-minute soak; open circuits kept working). A run that lands on such a boundary needs the
/// retries; every other run succeeds on the first attempt.
async fn retry<T, F, Fut>(what: &str, budget: Duration, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        match attempt().await {
            Ok(v) => {
                eprintln!("{what}: ok on attempt {n} after {:.1?}", start.elapsed());
                return v;
            }
            Err(e) if start.elapsed() < budget => {
                eprintln!("{what}: attempt {n} failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!(
                "{what}: still failing after {:.1?} ({n} attempts): {e}",
                start.elapsed()
            ),
        }
    }
}

#[test]
fn onion_service_over_private_tor_network() {
    init_logging();
    let t0 = Instant::now();
    let net = Network::up(0);
    eprintln!("network started in {:.1?}", t0.elapsed());
    if let Err(e) = tornet(&["wait", net.path(), &NETWORK_TIMEOUT_S.to_string()], &[]) {
        panic!("private Tor network did not come up: {e}");
    }
    let arti_config = PathBuf::from(tornet(&["arti-config", net.path()], &[]).unwrap());
    eprintln!("consensus complete after {:.1?}", t0.elapsed());

    // The C tor client bootstraps in the background while the Arti clients do.
    let client_net = net.path().to_string();
    let c_client = std::thread::spawn(move || tornet(&["client", &client_net, "90"], &[]));

    // Our own runtime, shut down before the temp dirs are removed: Arti's background tasks
    // write their state when they stop, and would complain about a vanished directory.
    let state = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(scenario(state.path(), &arti_config, c_client))
    }));
    rt.shutdown_timeout(Duration::from_secs(5));
    drop(net); // stop the network (also happens on panic, via the guard)
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
    eprintln!("whole test: {:.1?}", t0.elapsed());
}

async fn scenario(
    state: &Path,
    arti_config: &Path,
    c_client: std::thread::JoinHandle<Result<String, String>>,
) {
    let host_dir = state.join("host");
    let t1 = Instant::now();
    let host_opts = opts(host_dir.clone(), arti_config, Duration::from_secs(60));
    let dial_opts = opts(state.join("dialer"), arti_config, Duration::from_secs(60));
    let (host, dialer) = tokio::join!(tor::bootstrap(&host_opts), tor::bootstrap(&dial_opts));
    let host = host.expect("bootstrap the hosting Arti client");
    let dialer = dialer.expect("bootstrap the dialing Arti client");
    eprintln!("two Arti clients bootstrapped in {:.1?}", t1.elapsed());

    let t2 = Instant::now();
    let (service, streams) = tor::launch_onion_service(&host, NICKNAME)
        .await
        .expect("launch");
    let onion = service.address();
    assert_eq!(
        tor::parse_onion_target(&onion).expect("own address parses"),
        (onion.clone(), tor::DEFAULT_ONION_PORT)
    );
    let echo = spawn_echo_server(streams);
    match service.wait_reachable(Duration::from_secs(60)).await {
        Ok(()) => eprintln!("service reports reachable after {:.1?}", t2.elapsed()),
        Err(e) => panic!("wait_reachable: {e}"),
    }

    // Arti client -> Arti onion service.
    retry("arti -> onion echo", Duration::from_secs(90), || async {
        let mut s = tor::connect(
            &dialer,
            &onion,
            tor::DEFAULT_ONION_PORT,
            Duration::from_secs(20),
        )
        .await
        .map_err(|e| e.to_string())?;
        echo_roundtrip(&mut s, b"hello over arti").await
    })
    .await;
    eprintln!("arti echo done {:.1?} after launch", t2.elapsed());

    // C tor client (SOCKS5) -> Arti onion service.
    let socks: SocketAddr = tokio::task::spawn_blocking(move || c_client.join())
        .await
        .expect("join")
        .expect("client thread")
        .unwrap_or_else(|e| panic!("C tor client: {e}"))
        .parse()
        .expect("SOCKS address");
    eprintln!("C tor client bootstrapped, SOCKS on {socks}");
    retry("socks5 -> onion echo", Duration::from_secs(90), || async {
        let mut s = tor::socks5_connect(
            socks,
            &onion,
            tor::DEFAULT_ONION_PORT,
            Duration::from_secs(30),
        )
        .await
        .map_err(|e| e.to_string())?;
        echo_roundtrip(&mut s, b"hello over socks").await
    })
    .await;

    // Restart: a new client on the same state dir must come back with the same onion address.
    echo.abort();
    drop(service);
    drop(host);
    let t3 = Instant::now();
    let host2 = tor::bootstrap(&opts(host_dir, arti_config, Duration::from_secs(60)))
        .await
        .expect("re-bootstrap the hosting client on the same state dir");
    let (service2, _streams2) = tor::launch_onion_service(&host2, NICKNAME)
        .await
        .expect("relaunch");
    assert_eq!(
        service2.address(),
        onion,
        "onion address must persist in state_dir"
    );
    eprintln!(
        "restart with the same onion address took {:.1?}",
        t3.elapsed()
    );
}

/// The transport boxes both kinds of stream as `AsyncRead + AsyncWrite + Send + Unpin + 'static`;
/// this fails to compile if an arti upgrade changes that.
#[allow(dead_code)]
fn streams_fit_the_transport() {
    fn io<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static>() {}
    io::<arti_client::DataStream>();
    io::<tokio::net::TcpStream>();
}

#[test]
fn invalid_onion_addresses_are_rejected() {
    // A valid v3 address (the Tor Project's), to derive broken variants from.
    let good = "2gzyxa5ihm7nsggfxnu52rck2vv4rvmdlkiu3zzui5du4xyclen53wid.onion";
    assert_eq!(
        tor::parse_onion_target(good).unwrap(),
        (good.to_string(), 7450)
    );
    assert_eq!(
        tor::parse_onion_target(&format!("{}:443", good.to_uppercase())).unwrap(),
        (good.to_string(), 443)
    );
    let flipped = good.replacen("2gzy", "2gzz", 1); // checksum no longer matches
    let cases = [
        "example.com:7450".to_string(),
        "expyuzz4wqqyqhjn.onion".to_string(), // v2
        "abc.onion".to_string(),
        flipped,
        format!("{good}:0"),
        format!("{good}:99999"),
        format!("www.{good}"),
        good.replace('2', "1"), // '1' is not base32
    ];
    for bad in &cases {
        match tor::parse_onion_target(bad) {
            Err(TorError::InvalidAddress(msg)) => eprintln!("{bad}: {msg}"),
            other => panic!("{bad:?} should be InvalidAddress, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_against_missing_network_fails_in_time() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    // Ports that were just free: nothing listens there.
    let closed: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let config = format!(
        r#"
[tor_network]
authorities = {{ v3idents = ["{v3}"], uploads = [["127.0.0.1:{d}"]], downloads = [["127.0.0.1:{d}"]], votes = [["127.0.0.1:{d}"]] }}
fallback_caches = [ {{ rsa_identity = "{rsa}", ed_identity = "{ed}", orports = ["127.0.0.1:{o}"] }} ]
[address_filter]
allow_local_addrs = true
[storage.permissions]
dangerously_trust_everyone = true
"#,
        v3 = "AB".repeat(20),
        rsa = "CD".repeat(20),
        ed = "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA",
        d = closed[0],
        o = closed[1],
    );
    let cfg_path = dir.path().join("arti.toml");
    std::fs::write(&cfg_path, config).unwrap();
    let timeout = Duration::from_secs(8);
    let start = Instant::now();
    let res = tor::bootstrap(&opts(dir.path().join("tor"), &cfg_path, timeout)).await;
    let elapsed = start.elapsed();
    match res {
        Err(e @ TorError::Bootstrap(_)) => eprintln!("as expected after {elapsed:.1?}: {e}"),
        Err(e) => panic!("unexpected error kind: {e}"),
        Ok(_) => panic!("bootstrap against closed ports must fail"),
    }
    assert!(
        elapsed < timeout + Duration::from_secs(3),
        "took {elapsed:?}, bound was {timeout:?}"
    );
}

//! Tor transport: an embedded Arti client, onion-service hosting, and dialing through an
//! external tor daemon's SOCKS port.
//!
//! This module only moves bytes. It hands out raw [`DataStream`]s / [`TcpStream`]s; TLS and
//! gRPC run on top of them elsewhere. Everything that can wait on the network takes an explicit
//! timeout, because Tor failures often show up as silence rather than as errors.
//!
//! Secrets: the onion service's private identity key lives only in Arti's keystore under
//! [`TorOptions::state_dir`]; nothing here reads, prints or logs it. Onion *addresses* are
//! public and are logged in full.

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arti_client::config::{CfgPath, TorClientConfigBuilder};
use arti_client::{BootstrapBehavior, DataStream, TorClient};
use futures::{Stream, StreamExt};
use safelog::DisplayRedacted as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tor_cell::relaycell::msg::Connected;
use tor_hsservice::config::OnionServiceConfigBuilder;
use tor_hsservice::status::State;
use tor_hsservice::{HsId, HsNickname, RunningOnionService};
use tor_rtcompat::PreferredRuntime;

/// A shared, bootstrapped Arti client.
///
/// `TorClient` is not `Clone`; Arti hands it out in an `Arc`, and every user (dialer, onion
/// service) shares the same one so they share circuits, directory state and the keystore.
pub(crate) type Tor = Arc<TorClient<PreferredRuntime>>;

/// Port a peer's onion address means when it names none (`xxxx.onion` = `xxxx.onion:7450`),
/// and the virtual port this node's onion service advertises: the Federation port.
pub const DEFAULT_ONION_PORT: u16 = crate::config::DEFAULT_PORT;

/// How streams accepted by an onion service may be in the middle of their CONNECTED handshake
/// at once. Bounds the work one burst of clients can queue on us.
const MAX_PENDING_ACCEPTS: usize = 16;

/// Settings for the embedded Arti client.
#[derive(Debug, Clone)]
pub struct TorOptions {
    /// Root of everything Arti keeps on disk: `state/` (guards, the onion service keystore
    /// under `state/keystore`) and `cache/` (directory documents). It is meant to be
    /// `<data-dir>/tor`, so the onion service key, and hence the node's onion address,
    /// survives restarts and is part of backups. Created (mode 0700) if missing.
    pub state_dir: PathBuf,
    /// Optional arti TOML file merged over Arti's defaults (same keys as `arti.toml`, e.g.
    /// `[tor_network]`, `[path_rules]`, `[override_net_params]`). This is how tests point the
    /// client at a private network (`tests/tornet/tornet.sh arti-config`). Storage
    /// directories always come from `state_dir`, whatever the file says. Unknown keys are
    /// ignored by the parser, so check spelling against the Arti documentation.
    pub arti_config: Option<PathBuf>,
    /// Upper bound on [`bootstrap`]: opening the state, fetching a consensus and enough
    /// microdescriptors to build circuits. Arti on its own retries forever.
    pub bootstrap_timeout: Duration,
}

/// Errors from the Tor layer. Each message says what was attempted and why it failed.
#[derive(Debug, thiserror::Error)]
pub enum TorError {
    /// The address is not a usable v3 onion address (or host/port).
    #[error("invalid onion address {0}")]
    InvalidAddress(String),
    /// The Arti configuration (file or assembled settings) was rejected.
    #[error("Tor configuration error: {0}")]
    Config(String),
    /// The Arti client could not be created or could not reach the Tor network.
    #[error("Tor bootstrap failed: {0}")]
    Bootstrap(String),
    /// The target could not be reached through Tor (no descriptor, refused, circuit failure...).
    #[error("unreachable over Tor: {0}")]
    Unreachable(String),
    /// A bounded wait ran out; the message says which one and what state it ended in.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Launching or running the onion service failed.
    #[error("onion service error: {0}")]
    OnionService(String),
    /// The external SOCKS5 proxy misbehaved or refused the request.
    #[error("SOCKS5 proxy error: {0}")]
    Socks(String),
    /// Local I/O failed (creating the state directory, reading the config, a TCP connection).
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// Render an error with its whole `source()` chain: Arti's top-level messages are short and the
/// useful part ("connection refused", "descriptor not found") is usually a few levels down.
fn chain(e: &dyn StdError) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        let part = src.to_string();
        if !s.contains(&part) {
            let _ = write!(s, ": {part}");
        }
        cur = src.source();
    }
    s
}

/// Create an Arti client from `opts` and bootstrap it, bounded by `opts.bootstrap_timeout`.
///
/// Every failure, including running out of time, is [`TorError::Bootstrap`]. On timeout the
/// message carries Arti's last bootstrap status (e.g. "0%: connecting to the internet;
/// directory is fetching a consensus"), which usually hints at the cause.
pub async fn bootstrap(opts: &TorOptions) -> Result<Tor, TorError> {
    let started = Instant::now();
    let config = build_config(opts)?;
    let runtime = PreferredRuntime::current()
        .map_err(|e| TorError::Bootstrap(format!("no async runtime: {}", chain(&e))))?;
    let client = tokio::time::timeout(
        opts.bootstrap_timeout,
        TorClient::with_runtime(runtime)
            .config(config)
            // OnDemand: onion services can only be launched on such a client; we still
            // bootstrap eagerly below so that errors surface here and not on first use.
            .bootstrap_behavior(BootstrapBehavior::OnDemand)
            // If the state dir is still locked by a client that is shutting down (restart in
            // the same process), wait for it rather than failing at once.
            .local_resource_timeout(opts.bootstrap_timeout.min(Duration::from_secs(5)))
            .create_unbootstrapped_async(),
    )
    .await
    .map_err(|_| {
        TorError::Bootstrap(format!(
            "creating the Tor client (state dir {} locked by another process?) took longer than {:?}",
            opts.state_dir.display(),
            opts.bootstrap_timeout
        ))
    })?
    .map_err(|e| TorError::Bootstrap(format!("creating the Tor client: {}", chain(&e))))?;

    let remaining = opts.bootstrap_timeout.saturating_sub(started.elapsed());
    match tokio::time::timeout(remaining, client.bootstrap()).await {
        Ok(Ok(())) => {
            tracing::info!(elapsed = ?started.elapsed(), "Tor client bootstrapped");
            Ok(client)
        }
        Ok(Err(e)) => Err(TorError::Bootstrap(chain(&e))),
        Err(_) => Err(TorError::Bootstrap(format!(
            "not finished after {:?} (last status: {})",
            opts.bootstrap_timeout,
            client.bootstrap_status()
        ))),
    }
}

/// Assemble the Arti config: defaults, then the optional TOML file, then our storage paths.
fn build_config(opts: &TorOptions) -> Result<arti_client::TorClientConfig, TorError> {
    let mut builder = match &opts.arti_config {
        None => TorClientConfigBuilder::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| TorError::Io(format!("reading arti config {}", path.display()), e))?;
            toml::from_str::<TorClientConfigBuilder>(&text)
                .map_err(|e| TorError::Config(format!("arti config {}: {e}", path.display())))?
        }
    };
    let cache = opts.state_dir.join("cache");
    let state = opts.state_dir.join("state");
    for dir in [&opts.state_dir, &cache, &state] {
        create_private_dir(dir)?;
    }
    builder
        .storage()
        .cache_dir(CfgPath::new_literal(cache))
        .state_dir(CfgPath::new_literal(state));
    builder.build().map_err(|e| TorError::Config(chain(&e)))
}

/// Create `dir` (and parents) owner-only: Arti refuses state directories others can write to.
fn create_private_dir(dir: &Path) -> Result<(), TorError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
        .map_err(|e| TorError::Io(format!("creating Tor state directory {}", dir.display()), e))
}

/// Parse a peer address `xxxx.onion[:port]` into (`xxxx.onion`, port), port defaulting to
/// [`DEFAULT_ONION_PORT`].
///
/// Only v3 onion addresses are accepted: 56 base32 characters whose embedded version byte is 3
/// and whose checksum matches the embedded key (checked by Arti's own parser), so a typo is
/// caught here instead of surfacing as a minute-long "descriptor not found". The host comes
/// back lower-cased.
pub fn parse_onion_target(addr: &str) -> Result<(String, u16), TorError> {
    let bad = |why: &str| TorError::InvalidAddress(format!("{addr:?}: {why}"));
    let addr_trim = addr.trim();
    let (host, port) = match addr_trim.rsplit_once(':') {
        Some((h, p)) => {
            let port: u16 = p
                .parse()
                .map_err(|_| bad("port is not a number in 1..65535"))?;
            if port == 0 {
                return Err(bad("port 0 is not allowed"));
            }
            (h, port)
        }
        None => (addr_trim, DEFAULT_ONION_PORT),
    };
    let host = host.to_ascii_lowercase();
    let Some(label) = host.strip_suffix(".onion") else {
        return Err(bad("not an .onion address"));
    };
    if label.contains('.') {
        return Err(bad("subdomains of .onion addresses are not supported"));
    }
    match label.len() {
        56 => {}
        16 => {
            return Err(bad(
                "v2 onion address (16 characters); only v3 (56) are supported",
            ))
        }
        n => {
            return Err(bad(&format!(
                "expected 56 base32 characters before .onion, got {n}"
            )))
        }
    }
    if !label
        .bytes()
        .all(|c| matches!(c, b'a'..=b'z' | b'2'..=b'7'))
    {
        return Err(bad("contains characters outside base32 (a-z, 2-7)"));
    }
    host.parse::<HsId>().map_err(|e| bad(&chain(&e)))?;
    Ok((host, port))
}

/// Open a stream to `host:port` through the embedded Arti client (an onion service, or a
/// clearnet host through an exit), bounded by `timeout`.
pub async fn connect(
    tor: &Tor,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<DataStream, TorError> {
    match tokio::time::timeout(timeout, tor.connect((host, port))).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(TorError::Unreachable(format!(
            "{host}:{port}: {}",
            chain(&e)
        ))),
        Err(_) => Err(TorError::Timeout(format!(
            "connecting to {host}:{port} over Tor took longer than {timeout:?}"
        ))),
    }
}

/// Open a stream to `host:port` through an external tor daemon's SOCKS5 port (`proxy`, e.g.
/// 127.0.0.1:9050), bounded by `timeout` for the whole handshake.
///
/// The host name is sent to the proxy unresolved (ATYP=domain), as Tor requires for `.onion`
/// names and to avoid leaking DNS lookups. No authentication is offered (tor needs none).
pub async fn socks5_connect(
    proxy: SocketAddr,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, TorError> {
    if host.is_empty() || host.len() > 255 {
        return Err(TorError::InvalidAddress(format!(
            "{host:?}: host name must be 1..255 bytes for SOCKS5"
        )));
    }
    match tokio::time::timeout(timeout, socks5_handshake(proxy, host, port)).await {
        Ok(r) => r,
        Err(_) => Err(TorError::Timeout(format!(
            "connecting to {host}:{port} through SOCKS5 proxy {proxy} took longer than {timeout:?}"
        ))),
    }
}

async fn socks5_handshake(proxy: SocketAddr, host: &str, port: u16) -> Result<TcpStream, TorError> {
    let io = |what: &str| {
        let ctx = format!("{what} (SOCKS5 proxy {proxy}, target {host}:{port})");
        move |e| TorError::Io(ctx, e)
    };
    let mut s = TcpStream::connect(proxy)
        .await
        .map_err(io("connecting to the proxy"))?;
    // Greeting: version 5, one method offered: 0 = no authentication.
    s.write_all(&[5, 1, 0])
        .await
        .map_err(io("sending greeting"))?;
    let mut reply = [0u8; 2];
    s.read_exact(&mut reply)
        .await
        .map_err(io("reading method choice"))?;
    match reply {
        [5, 0] => {}
        [5, 0xff] => {
            return Err(TorError::Socks(format!(
                "{proxy} requires authentication; only no-auth proxies are supported"
            )))
        }
        other => {
            return Err(TorError::Socks(format!(
                "{proxy} is not a SOCKS5 proxy (greeting reply {other:02x?})"
            )))
        }
    }
    // CONNECT request with a domain name (ATYP 3) so the proxy resolves it.
    let mut req = Vec::with_capacity(7 + host.len());
    req.extend_from_slice(&[5, 1, 0, 3, host.len() as u8]);
    req.extend_from_slice(host.as_bytes());
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.map_err(io("sending CONNECT"))?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head)
        .await
        .map_err(io("reading CONNECT reply"))?;
    if head[0] != 5 {
        return Err(TorError::Socks(format!(
            "{proxy}: bad reply version {}",
            head[0]
        )));
    }
    if head[1] != 0 {
        let msg = format!("{host}:{port} via {proxy}: {}", socks_reply_text(head[1]));
        return Err(TorError::Unreachable(msg));
    }
    // Skip the bound address the proxy reports; its length depends on ATYP.
    let addr_len = match head[3] {
        1 => 4,
        4 => 16,
        3 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l)
                .await
                .map_err(io("reading CONNECT reply"))?;
            l[0] as usize
        }
        t => {
            return Err(TorError::Socks(format!(
                "{proxy}: unknown address type {t} in reply"
            )))
        }
    };
    let mut skip = vec![0u8; addr_len + 2];
    s.read_exact(&mut skip)
        .await
        .map_err(io("reading CONNECT reply"))?;
    Ok(s)
}

/// SOCKS5 reply codes (RFC 1928) plus Tor's extended onion-service codes (sent when the
/// SocksPort has `ExtendedErrors`).
fn socks_reply_text(code: u8) -> String {
    let s = match code {
        1 => "general SOCKS server failure",
        2 => "connection not allowed by ruleset",
        3 => "network unreachable",
        4 => "host unreachable (for tor: could not reach the target or onion service)",
        5 => "connection refused",
        6 => "TTL expired (for tor: circuit or stream timed out)",
        7 => "command not supported",
        8 => "address type not supported",
        0xf0 => "onion service descriptor not found",
        0xf1 => "onion service descriptor is invalid",
        0xf2 => "onion service introduction failed",
        0xf3 => "onion service rendezvous failed",
        0xf4 => "onion service requires client authorization",
        0xf5 => "onion service client authorization is wrong",
        0xf6 => "invalid onion service address",
        0xf7 => "onion service introduction timed out",
        _ => return format!("SOCKS5 error code {code:#04x}"),
    };
    format!("{s} (SOCKS5 code {code:#04x})")
}

/// A running onion service hosted by the embedded Arti client.
///
/// Dropping it shuts the service down (the descriptor stops being republished and new
/// connections fail), so keep it alive as long as the node serves on its onion address.
pub struct OnionService {
    service: Arc<RunningOnionService>,
    address: String,
}

impl std::fmt::Debug for OnionService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnionService")
            .field("address", &self.address)
            .finish()
    }
}

impl OnionService {
    /// The full onion address, `<56 base32 chars>.onion`, unredacted: this is the node's public
    /// identity on Tor, to be shown to operators and handed to peers.
    pub fn address(&self) -> String {
        self.address.clone()
    }

    /// Wait (bounded) until Arti reports that the service is published and reachable.
    ///
    /// Succeeds when Arti's state is `Running` or `DegradedReachable`, or when it is
    /// `DegradedUnreachable` with no recorded problem: Arti reports that when it has
    /// uploaded the descriptor for the current time period but has no second time period to
    /// publish for, which is the normal state of a Tor network younger than one time period
    /// (a fresh test network). Clients can reach the service then.
    /// Fails at once if the service is `Broken` or has stopped.
    ///
    /// This is Arti's belief, not a proof: the only proof of reachability is a connection.
    pub async fn wait_reachable(&self, timeout: Duration) -> Result<(), TorError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut events = self.service.status_events();
        loop {
            let status = self.service.status();
            let state = status.state();
            let problem = status.current_problem().map(|p| format!("{p:?}"));
            match state {
                State::Running | State::DegradedReachable => break,
                State::DegradedUnreachable if problem.is_none() => break,
                State::Broken => {
                    return Err(TorError::OnionService(format!(
                        "{} is {state:?}: {}",
                        self.address,
                        problem.as_deref().unwrap_or("no details")
                    )))
                }
                // Shutdown is also what a service reports just after launch, before its
                // tasks start, so it is not final here; a service that really stops ends
                // the status stream instead.
                _ => {}
            }
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(_)) => continue,
                Ok(None) => {
                    return Err(TorError::OnionService(format!(
                        "{}: status stream ended (service shut down)",
                        self.address
                    )))
                }
                Err(_) => {
                    return Err(TorError::Timeout(format!(
                        "onion service {} not reachable after {timeout:?}: state {state:?}{}",
                        self.address,
                        problem
                            .map(|p| format!(", problem: {p}"))
                            .unwrap_or_default()
                    )))
                }
            }
        }
        let state = self.service.status().state();
        tracing::info!(address = %self.address, ?state, "onion service published");
        Ok(())
    }
}

/// Launch (or relaunch) the onion service called `nickname` on `tor`.
///
/// Its identity key is created on first launch in Arti's keystore under
/// [`TorOptions::state_dir`] and reused afterwards, so the same state dir and nickname always
/// give the same onion address. Every incoming stream request, whatever its port, is accepted
/// and yielded as a [`DataStream`]: the caller decides what to speak on it. Streams are
/// yielded only while the returned stream is polled (up to 16 accepts in flight).
pub async fn launch_onion_service(
    tor: &Tor,
    nickname: &str,
) -> Result<
    (
        OnionService,
        impl Stream<Item = DataStream> + Send + 'static,
    ),
    TorError,
> {
    let nick: HsNickname = nickname.parse().map_err(|e| {
        TorError::OnionService(format!("invalid nickname {nickname:?}: {}", chain(&e)))
    })?;
    let config = OnionServiceConfigBuilder::default()
        .nickname(nick)
        .build()
        .map_err(|e| TorError::Config(format!("onion service {nickname:?}: {}", chain(&e))))?;
    let (service, rend_requests) = tor
        .launch_onion_service(config)
        .map_err(|e| TorError::OnionService(format!("launching {nickname:?}: {}", chain(&e))))?
        .ok_or_else(|| {
            TorError::OnionService(format!("{nickname:?} is disabled in the configuration"))
        })?;
    let address = service
        .onion_address()
        .ok_or_else(|| TorError::OnionService(format!("{nickname:?} has no onion address")))?
        .display_unredacted()
        .to_string();
    tracing::info!(%address, nickname, "onion service launched");

    let streams = tor_hsservice::handle_rend_requests(rend_requests)
        .map(|request| request.accept(Connected::new_empty()))
        .buffer_unordered(MAX_PENDING_ACCEPTS)
        .filter_map(|accepted| async move {
            match accepted {
                Ok(stream) => Some(stream),
                Err(e) => {
                    tracing::debug!(error = %chain(&e), "could not accept an onion stream");
                    None
                }
            }
        });
    Ok((OnionService { service, address }, streams))
}

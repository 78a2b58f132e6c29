//! Byte streams between nodes: TCP, or Tor (embedded arti or an external
//! SOCKS5 proxy) for `.onion` addresses, always wrapped in node-pinned mutual
//! TLS (see [`crate::tls`]) before gRPC sees them.
//!
//! One gRPC channel per peer carries every call to it (HTTP/2 multiplexing),
//! so a clone over Tor builds one circuit, not one per chunk.

mod address;
mod gate;
mod idle;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::crypto::NodeId;
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::node::Node;
use crate::tls;

pub(crate) use address::PeerAddress;
pub(crate) use gate::{ConnLimits, Gate, RateLog};
pub(crate) use idle::TrackCalls;

/// Any byte stream a connection can run on.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}
pub(crate) type BoxIo = Box<dyn Io>;

/// Who is on the other end of a server-side connection, as TLS established it.
#[derive(Clone, Debug)]
pub(crate) struct CallerInfo {
    /// Node id and SubjectPublicKeyInfo DER from the client certificate, if one was presented.
    pub(crate) node: Option<(NodeId, Vec<u8>)>,
    /// Remote address for logs ("onion" for Tor streams).
    pub(crate) remote: String,
    /// The remote IP address (none for Tor streams), for per-address limits.
    pub(crate) ip: Option<std::net::IpAddr>,
    /// The calls open on this connection, for its idle timeout.
    pub(crate) activity: Arc<idle::Activity>,
}

/// An accepted, TLS-authenticated connection handed to tonic.
pub(crate) struct PeerConn {
    io: tokio_rustls::server::TlsStream<BoxIo>,
    info: CallerInfo,
    idle: idle::IdleClock,
    /// Its place in the listener's connection count, given back on drop.
    _admitted: gate::Admitted,
}

impl tonic::transport::server::Connected for PeerConn {
    type ConnectInfo = CallerInfo;
    fn connect_info(&self) -> CallerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Pending => self.idle.poll_expired(cx).map(Err),
            ready => ready,
        }
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Run the TLS handshake on an accepted stream and queue the connection for
/// tonic. Handshakes run concurrently, each bounded by the handshake timeout
/// (a whole-handshake deadline, so trickling bytes does not extend it), so
/// one slow peer cannot stall the listener; over the gate's caps the stream
/// is closed at once.
pub(crate) fn accept(
    io: BoxIo,
    remote: String,
    ip: Option<std::net::IpAddr>,
    acceptor: TlsAcceptor,
    gate: &Arc<Gate>,
    out: mpsc::Sender<io::Result<PeerConn>>,
) {
    let Some(hs) = gate.begin(ip, &remote) else {
        return; // dropping `io` closes it
    };
    let gate = gate.clone();
    tokio::spawn(async move {
        let limit = gate.limits.handshake_timeout;
        let tls = match tokio::time::timeout(limit, acceptor.accept(io)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return tracing::info!(%remote, "TLS handshake failed: {e}"),
            Err(_) => return tracing::info!(%remote, "TLS handshake timed out after {limit:?}"),
        };
        let node = tls::peer_node(tls.get_ref().1.peer_certificates());
        let Some(admitted) = gate.admit(hs, node.as_ref().map(|n| &n.0), &remote) else {
            return;
        };
        let activity = idle::Activity::new();
        let conn = PeerConn {
            io: tls,
            idle: idle::IdleClock::new(activity.clone(), gate.limits.idle_timeout),
            info: CallerInfo {
                node,
                remote,
                ip,
                activity,
            },
            _admitted: admitted,
        };
        let _ = out.send(Ok(conn)).await;
    });
}

/// Accept TCP connections forever, feeding TLS connections into `out`.
pub(crate) async fn accept_tcp(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    gate: Arc<Gate>,
    out: mpsc::Sender<io::Result<PeerConn>>,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        match listener.accept().await {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                accept(
                    Box::new(stream),
                    addr.to_string(),
                    Some(addr.ip()),
                    acceptor.clone(),
                    &gate,
                    out.clone(),
                );
            }
            Err(e) => {
                // Out of file descriptors, typically: the caps in [limits]
                // are above what RLIMIT_NOFILE allows (see raise_fd_limit).
                tracing::warn!("accepting a TCP connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        if out.is_closed() {
            return;
        }
    }
}

/// Raise this process's soft RLIMIT_NOFILE to its hard limit (the default
/// soft limit, 1024, is below what the connection caps allow), and warn if
/// the caps of `listeners` listeners can still exceed it.
pub(crate) fn raise_fd_limit(limits: &ConnLimits, listeners: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    // 64: the database, chunk files being read, the admin socket, Tor.
    let need = (limits.max_handshakes + limits.max_connections) * listeners + 64;
    if (lim.rlim_cur as usize) < need {
        tracing::warn!(
            "the file descriptor limit ({}) is below what [limits] max_handshakes + max_connections \
             allow ({need}); lower them or raise `ulimit -n`",
            lim.rlim_cur
        );
    }
}

/// The embedded Tor client, bootstrapped on first use and shared by dialing
/// and the onion service, so a node that never meets an onion address never
/// starts Tor.
pub struct TorHandle {
    opts: crate::tor::TorOptions,
    client: tokio::sync::OnceCell<crate::tor::Tor>,
}

impl TorHandle {
    pub(crate) fn new(opts: crate::tor::TorOptions) -> Arc<TorHandle> {
        Arc::new(TorHandle {
            opts,
            client: tokio::sync::OnceCell::new(),
        })
    }

    /// The bootstrapped client (bootstrapping it now if needed, bounded by the configured timeout).
    pub(crate) async fn get(&self) -> Result<crate::tor::Tor> {
        self.client
            .get_or_try_init(|| async {
                tracing::info!("starting embedded Tor");
                crate::tor::bootstrap(&self.opts)
                    .await
                    .map_err(|e| Error::unavailable(format!("Tor: {e}")))
            })
            .await
            .cloned()
    }
}

/// How this node reaches `.onion` addresses.
#[derive(Clone)]
pub(crate) enum OnionRoute {
    /// An external tor's SOCKS5 port (the proxy resolves the name).
    Socks(SocketAddr),
    /// The embedded Tor client.
    Arti(Arc<TorHandle>),
}

/// Dials peers. Cheap to clone.
#[derive(Clone)]
pub struct Dialer {
    identity: Arc<Identity>,
    onion: OnionRoute,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl Dialer {
    /// A dialer configured from the node's settings: TCP, and for onion peers
    /// either the configured SOCKS5 proxy or embedded Tor (started on first
    /// use). Returns the embedded Tor handle too, which `serve` shares for its
    /// onion service.
    pub(crate) fn for_node(node: &Node) -> Result<(Dialer, Option<Arc<TorHandle>>)> {
        let tor = &node.config.tor;
        let (route, handle) = match &tor.socks {
            Some(s) => {
                let addr = s
                    .parse()
                    .map_err(|_| Error::invalid(format!("[tor] socks {s:?} is not host:port")))?;
                (OnionRoute::Socks(addr), None)
            }
            None => {
                let h = TorHandle::new(crate::tor::TorOptions {
                    state_dir: node.paths.tor(),
                    arti_config: tor.arti_config.clone(),
                    bootstrap_timeout: Duration::from_secs(tor.bootstrap_timeout_secs),
                });
                (OnionRoute::Arti(h.clone()), Some(h))
            }
        };
        let dialer = Dialer::new(
            node.identity.clone(),
            route,
            Duration::from_secs(tor.connect_timeout_secs),
            Duration::from_secs(node.config.limits.request_timeout_secs),
        );
        Ok((dialer, handle))
    }

    pub(crate) fn new(
        identity: Arc<Identity>,
        onion: OnionRoute,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Dialer {
        Dialer {
            identity,
            onion,
            connect_timeout,
            request_timeout,
        }
    }

    async fn open(&self, peer: NodeId, address: &PeerAddress) -> Result<BoxIo> {
        let (host, port) = (address.host.as_str(), address.port);
        let unreachable =
            |e: String| Error::unavailable(format!("cannot reach {host}:{port}: {e}"));
        if !address.onion {
            let s = tokio::time::timeout(
                self.connect_timeout,
                tokio::net::TcpStream::connect((host, port)),
            )
            .await
            .map_err(|_| unreachable("connect timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
            let _ = s.set_nodelay(true);
            return Ok(Box::new(s));
        }
        match &self.onion {
            OnionRoute::Socks(proxy) => {
                let s = crate::tor::socks5_connect(*proxy, host, port, self.connect_timeout)
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                Ok(Box::new(s))
            }
            OnionRoute::Arti(handle) => {
                let tor = handle.get().await?;
                // Circuits to an onion service fail now and then (e.g. while
                // HSDirs rotate); retry with exponential backoff and jitter
                // until the connect deadline.
                let deadline = tokio::time::Instant::now() + self.connect_timeout;
                let mut backoff = Duration::from_millis(500);
                loop {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match crate::tor::connect(&tor, host, port, left).await {
                        Ok(s) => return Ok(Box::new(s)),
                        Err(e) => {
                            let pause = backoff
                                .mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..1.5));
                            if tokio::time::Instant::now() + pause >= deadline {
                                return Err(unreachable(e.to_string()));
                            }
                            tracing::info!(
                                peer = %peer.short(),
                                "onion connect to {host} failed ({e}); retrying in {pause:?}"
                            );
                            tokio::time::sleep(pause).await;
                            backoff = (backoff * 2).min(Duration::from_secs(8));
                        }
                    }
                }
            }
        }
    }

    /// One TLS connection to `peer` at `address`, pinned to its node id.
    async fn tls_stream(
        &self,
        peer: NodeId,
        address: &str,
    ) -> Result<tokio_rustls::client::TlsStream<BoxIo>> {
        let io = self.open(peer, &PeerAddress::parse(address)?).await?;
        let connector = TlsConnector::from(tls::client_config(&self.identity, peer)?);
        tokio::time::timeout(
            self.connect_timeout,
            connector.connect(tls::server_name(), io),
        )
        .await
        .map_err(|_| Error::unavailable(format!("TLS handshake with {address} timed out")))?
        .map_err(|e| {
            let msg = e.to_string();
            if tls::is_refused_certificate(&e) {
                Error::denied(format!("{address} is not node {peer}: {msg}"))
            } else {
                Error::unavailable(format!("TLS handshake with {address} failed: {msg}"))
            }
        })
    }

    /// A gRPC channel to `peer`. Connects now, so an unreachable or wrong peer
    /// fails here with a clear error; later reconnects reuse the same checks.
    pub async fn channel(&self, peer: NodeId, address: &str) -> Result<Channel> {
        // Fail fast with the real reason (tonic would only say "transport error").
        let first = self.tls_stream(peer, address).await?;
        let slot = Arc::new(std::sync::Mutex::new(Some(first)));
        let me = self.clone();
        let addr = address.to_string();
        let connector = tower::service_fn(move |_: Uri| {
            let me = me.clone();
            let addr = addr.clone();
            let slot = slot.clone();
            async move {
                let ready = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                let stream = match ready {
                    Some(s) => s,
                    None => me
                        .tls_stream(peer, &addr)
                        .await
                        .map_err(|e| io::Error::other(e.to_string()))?,
                };
                Ok::<_, io::Error>(TokioIo::new(stream))
            }
        });
        Endpoint::from_static("http://bitsync.peer")
            .timeout(self.request_timeout)
            .connect_timeout(self.connect_timeout)
            .initial_stream_window_size(Some(4 << 20))
            .initial_connection_window_size(Some(16 << 20))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .connect_with_connector(connector)
            .await
            .map_err(|e| Error::unavailable(format!("connecting to {address}: {e}")))
    }
}

/// A channel to the Admin service on a node's Unix socket.
pub async fn admin_channel(socket: &std::path::Path) -> Result<Channel> {
    if !socket.exists() {
        return Err(Error::unavailable(format!(
            "no node is running here ({} does not exist): start one with `bitsync serve`",
            socket.display()
        )));
    }
    let path = socket.to_path_buf();
    let connector = tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move { Ok::<_, io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
    });
    Endpoint::from_static("http://bitsync.admin")
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            Error::unavailable(format!(
                "connecting to {}: {e} (is `bitsync serve` running?)",
                socket.display()
            ))
        })
}

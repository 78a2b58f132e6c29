//! `bitsync serve`: the node's network face.
//!
//! Two gRPC servers run side by side:
//! - Federation (peer-facing) on TCP, and on an onion service when Tor is
//!   on, every connection inside node-pinned mutual TLS;
//! - Admin (operator-facing) on `<data-dir>/admin.sock`, mode 0600: whoever
//!   can open that socket is the operator.
//!
//! Both also serve `grpc.health.v1` and server reflection (v1 and v1alpha,
//! for older grpcurl), so a stock grpcurl can list, describe and call
//! everything. SIGTERM or SIGINT stops accepting, ends watch streams, lets
//! in-flight calls finish for a few seconds, then exits.

pub(crate) mod admin;
mod dashboard;
pub(crate) mod federation;
mod grpc_metrics;
mod limits;
mod request_log;
mod scrub;

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tonic::transport::Server;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};

use crate::crypto::NodeId;
use crate::error::{Error, IoContext, Result};
use crate::node::Node;
use crate::proto::admin_server::AdminServer;
use crate::proto::federation_server::FederationServer;
use crate::proto::PeerInfo;
use crate::replicator::Replicator;
use crate::store::Peer;
use crate::transport::{self, Dialer, TorHandle};

const MAX_MESSAGE: usize = 8 * 1024 * 1024;
const DRAIN: Duration = Duration::from_secs(10);
/// How often the database is polled for changes made by other processes
/// (e.g. `bitsync put` while the node runs); bounds mirror lag.
const HEAD_POLL: Duration = Duration::from_millis(50);

/// State shared by the services of one running node.
pub struct ServerState {
    pub node: Arc<Node>,
    pub(crate) replicator: Arc<Replicator>,
    /// The current head seq; changes wake watch streams.
    pub(crate) head: watch::Receiver<u64>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) streams: Mutex<HashMap<NodeId, u32>>,
    pub(crate) started: Instant,
    pub(crate) listen_address: Mutex<String>,
    pub onion_address: Mutex<Option<String>>,
    /// Failed Join attempts, per address and in total.
    pub(crate) join_limit: limits::JoinLimiter,
    /// Concurrent StreamChunks calls and the chunk bytes queued for them.
    pub(crate) chunk_budget: limits::ChunkBudget,
}

impl ServerState {
    /// Addresses for invite tokens: configured ones, else the bound address (and onion).
    pub(crate) fn advertised(&self) -> Vec<String> {
        let mut out = self.node.config.advertise.clone();
        if out.is_empty() {
            out.push(
                self.listen_address
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone(),
            );
        }
        if let Some(o) = self
            .onion_address
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            out.insert(0, o);
        }
        out
    }
}

pub(crate) fn peer_to_proto(p: &Peer) -> PeerInfo {
    PeerInfo {
        node_id: p.node_id.to_hex(),
        name: p.name.clone(),
        address: p.address.clone(),
        state: p.state.as_str().to_string(),
        mirror: p.mirror,
        added_at_ms: p.added_at_ms,
        level: p.level.as_str().to_string(),
        role: p.role.map(|r| r.as_str().to_string()).unwrap_or_default(),
    }
}

#[derive(Debug, Default, Clone)]
pub struct ServeOptions {
    /// Overrides `listen` from config.toml.
    pub listen: Option<String>,
    /// Serve on an onion service too, as `[tor] enabled = true` does.
    pub tor: bool,
    /// Serve metrics and the status page here, overriding `metrics_listen`.
    pub metrics: Option<String>,
}

/// The names every listener serves besides its own service.
const COMMON_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Server reflection (v1 and v1alpha, for older grpcurl) listing exactly
/// the services of one listener: `service`, health and reflection. With all
/// descriptors listed, a client saw Admin on the federation port and got
/// `Unimplemented` for calling it.
#[allow(clippy::type_complexity)]
fn reflection(
    service: &str,
) -> Result<(
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let err = |e: tonic_reflection::server::Error| Error::io(format!("building reflection: {e}"));
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .with_service_name(service);
        for s in COMMON_SERVICES {
            b = b.with_service_name(s);
        }
        b
    };
    Ok((
        builder().build_v1().map_err(err)?,
        builder().build_v1alpha().map_err(err)?,
    ))
}

/// The gRPC names of the two services, as reflection lists them.
const FEDERATION: &str = "bitsync.v1.Federation";
const ADMIN: &str = "bitsync.v1.Admin";

/// The old path of [`Dialer::for_node`], kept while tests and benches use it.
pub fn dialer(node: &Node) -> Result<(Dialer, Option<Arc<TorHandle>>)> {
    Dialer::for_node(node)
}

/// A node serving in this process (tests and `bitsync serve` both use it).
pub struct RunningNode {
    pub state: Arc<ServerState>,
    /// The bound federation address.
    pub listen_address: std::net::SocketAddr,
    pub admin_socket: std::path::PathBuf,
    /// The bound metrics and status page address, when one was asked for.
    pub metrics_address: Option<std::net::SocketAddr>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    /// Stop accepting, end streams, give in-flight calls a few seconds to finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        let aborts: Vec<_> = self.tasks.iter().map(|t| t.abort_handle()).collect();
        let drained = tokio::time::timeout(DRAIN, futures::future::join_all(self.tasks)).await;
        if drained.is_err() {
            tracing::warn!("some calls were still running after {DRAIN:?}; closing them");
            aborts.iter().for_each(|a| a.abort());
        }
        let _ = std::fs::remove_file(&self.admin_socket);
    }
}

/// Run the node until SIGTERM/SIGINT.
pub(crate) async fn serve(node: Node, opts: ServeOptions) -> Result<()> {
    let running = start(node, opts).await?;
    // A log line, not a bare print, so `--log-format json` output stays all JSON.
    tracing::info!(
        node = %running.state.node.id(),
        admin = %running.admin_socket.display(),
        "bitsync node listening on {}",
        running.listen_address
    );
    wait_for_signal().await;
    tracing::info!("shutting down: finishing in-flight calls");
    running.shutdown().await;
    Ok(())
}

/// Start serving; returns once the listeners are bound.
pub async fn start(node: Node, opts: ServeOptions) -> Result<RunningNode> {
    let node = Arc::new(node);
    let listen = opts
        .listen
        .clone()
        .unwrap_or_else(|| node.config.listen.clone());

    // Admin socket first: it tells us whether another node already runs here.
    let (sock, admin_listener) = bind_admin_socket(&node).await?;

    let tcp = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| Error::from_io(e, format!("binding federation listener {listen}")))?;
    let bound = tcp.local_addr().ctx("reading bound address")?;
    tracing::info!(node = %node.id(), "federation listening on {bound}");

    let identity = node.identity.clone();
    let (dialer, tor) = Dialer::for_node(&node)?;
    let replicator = Replicator::new(node.clone(), dialer);
    replicator.set_advertised_address(bound.to_string());

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (head_tx, head_rx) = watch::channel(node.db.head_seq()?);
    let state = Arc::new(ServerState {
        node: node.clone(),
        replicator: replicator.clone(),
        head: head_rx,
        shutdown: shutdown_rx.clone(),
        streams: Mutex::new(HashMap::new()),
        started: Instant::now(),
        listen_address: Mutex::new(bound.to_string()),
        onion_address: Mutex::new(None),
        join_limit: limits::JoinLimiter::new(&node.config.limits),
        chunk_budget: limits::ChunkBudget::new(&node.config.limits),
    });
    spawn_head_poller(node.clone(), head_tx, shutdown_rx.clone());
    scrub::spawn(node.clone(), shutdown_rx.clone());

    let (conn_tx, conn_rx) = mpsc::channel(64);
    let tls = crate::tls::server_config(&identity)?;
    let conn_limits = transport::ConnLimits::from_config(&node.config.limits);
    transport::raise_fd_limit(
        &conn_limits,
        1 + node.config.admin_listen.is_some() as usize,
    );
    let db_node = node.clone();
    let gate = transport::Gate::new(
        conn_limits,
        Box::new(move |id| db_node.db.is_trusted(id).unwrap_or(false)),
    );
    tokio::spawn(transport::accept_tcp(
        tcp,
        tls.clone(),
        gate.clone(),
        conn_tx.clone(),
    ));

    let health = health_reporter().await;
    if opts.tor || node.config.tor.enabled {
        let Some(handle) = tor else {
            return Err(Error::invalid(
                "[tor] socks is set: this node dials through an external tor; host the onion service with that \
                 tor's HiddenServicePort (docs/TOR.md), or remove `socks` to use embedded Tor",
            ));
        };
        health
            .set_service_status(TOR_HEALTH, tonic_health::ServingStatus::NotServing)
            .await;
        node.metrics.state.tor_enabled.set(1);
        tokio::spawn(serve_onion(
            state.clone(),
            handle,
            tls.clone(),
            (gate, conn_tx),
            health.clone(),
            shutdown_rx.clone(),
        ));
    }
    let fed = federation_server(state.clone(), conn_rx, &health, shutdown_rx.clone())?;
    let admin = admin_server(state.clone(), admin_listener, &health, shutdown_rx.clone())?;

    let mut tasks = Vec::new();
    if let Some(addr) = &node.config.admin_listen {
        tasks.push(serve_admin_tcp(state.clone(), addr, &tls, &health, &shutdown_rx).await?);
    }
    let mut metrics_address = None;
    if let Some(addr) = opts
        .metrics
        .as_ref()
        .or(node.config.metrics_listen.as_ref())
    {
        let (bound, task) = dashboard::serve(state.clone(), addr, shutdown_rx.clone()).await?;
        metrics_address = Some(bound);
        tasks.push(task);
    }

    tokio::spawn(replicator.clone().run_mirrors(shutdown_rx.clone()));
    tasks.push(spawn_logged("federation", fed));
    tasks.push(spawn_logged("admin", admin));
    Ok(RunningNode {
        state,
        listen_address: bound,
        admin_socket: sock,
        metrics_address,
        shutdown_tx,
        tasks,
    })
}

/// The health service's reporter, with both gRPC services marked serving.
async fn health_reporter() -> HealthReporter {
    let (health, _) = tonic_health::server::health_reporter();
    health
        .set_serving::<FederationServer<federation::FederationService>>()
        .await;
    health
        .set_serving::<AdminServer<admin::AdminService>>()
        .await;
    health
}

/// Run a server to its end on its own task; a server that fails is logged,
/// since nobody awaits it until shutdown.
fn spawn_logged(
    what: &'static str,
    server: impl Future<Output = std::result::Result<(), tonic::transport::Error>> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!("{what} server failed: {e}");
        }
    })
}

/// Bind `<data-dir>/admin.sock` (mode 0600), refusing if a node already
/// answers on it and replacing it if it is a stale leftover.
async fn bind_admin_socket(node: &Node) -> Result<(PathBuf, tokio::net::UnixListener)> {
    let sock = node.paths.admin_socket();
    if sock.exists() {
        if tokio::net::UnixStream::connect(&sock).await.is_ok() {
            return Err(Error::exists(format!(
                "a node is already running on {} (its admin socket answers)",
                node.paths.root.display()
            )));
        }
        std::fs::remove_file(&sock).ctx(format!("removing stale {}", sock.display()))?;
    }
    let listener =
        tokio::net::UnixListener::bind(&sock).ctx(format!("binding {}", sock.display()))?;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600))
        .ctx("setting admin socket mode")?;
    Ok((sock, listener))
}

/// Wakes watch streams when anything is added, by any process.
fn spawn_head_poller(
    node: Arc<Node>,
    head: watch::Sender<u64>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(HEAD_POLL) => {}
                _ = shutdown.changed() => return,
            }
            if let Ok(h) = node.db.head_seq() {
                head.send_if_modified(|v| {
                    let changed = *v != h;
                    *v = h;
                    changed
                });
            }
        }
    });
}

/// The health service answering from `health`'s statuses.
fn health_server(health: &HealthReporter) -> HealthServer<HealthService> {
    HealthServer::new(HealthService::from_health_reporter(health.clone()))
}

/// Federation, with health and reflection, on the TLS connections `conns`
/// delivers (from TCP and the onion service alike).
fn federation_server(
    state: Arc<ServerState>,
    conns: mpsc::Receiver<std::io::Result<transport::PeerConn>>,
    health: &HealthReporter,
    shutdown: watch::Receiver<bool>,
) -> Result<impl Future<Output = std::result::Result<(), tonic::transport::Error>>> {
    let (refl_v1, refl_v1alpha) = reflection(FEDERATION)?;
    let limits = &state.node.config.limits;
    let timeout = Duration::from_secs(limits.request_timeout_secs);
    let counted = grpc_metrics::GrpcMetricsLayer::new(state.node.metrics.clone());
    let svc = FederationServer::new(federation::FederationService::new(state))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    Ok(Server::builder()
        .layer(counted)
        .timeout(timeout)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(transport::TrackCalls)
        .layer(request_log::RequestLog)
        .add_service(svc)
        .add_service(health_server(health))
        .add_service(refl_v1)
        .add_service(refl_v1alpha)
        .serve_with_incoming_shutdown(ReceiverStream::new(conns), wait_for(shutdown)))
}

/// Admin, with health and reflection, on the Unix socket.
fn admin_server(
    state: Arc<ServerState>,
    listener: tokio::net::UnixListener,
    health: &HealthReporter,
    shutdown: watch::Receiver<bool>,
) -> Result<impl Future<Output = std::result::Result<(), tonic::transport::Error>>> {
    let (refl_v1, refl_v1alpha) = reflection(ADMIN)?;
    let counted = grpc_metrics::GrpcMetricsLayer::new(state.node.metrics.clone());
    let svc = AdminServer::new(admin::AdminService::new(state))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    Ok(Server::builder()
        .layer(counted)
        .layer(request_log::RequestLog)
        .add_service(svc)
        .add_service(health_server(health))
        .add_service(refl_v1)
        .add_service(refl_v1alpha)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), wait_for(shutdown)))
}

/// Admin over TCP, inside the same node-pinned mutual TLS as Federation;
/// only this node's own key and the ids in `admin_peers` may call it.
/// Health and reflection are served beside it, as on the socket (they tell
/// nothing the proto files do not), so grpcurl works there without `-proto`.
async fn serve_admin_tcp(
    state: Arc<ServerState>,
    addr: &str,
    tls: &Arc<rustls::ServerConfig>,
    health: &HealthReporter,
    shutdown: &watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let (tls, shutdown) = (tls.clone(), shutdown.clone());
    let mut allowed = std::collections::HashSet::from([state.node.id()]);
    for p in &state.node.config.admin_peers {
        allowed.insert(crate::crypto::Hash::parse(p, "admin_peers entry")?);
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::from_io(e, format!("binding admin listener {addr}")))?;
    let bound = listener.local_addr().ctx("reading bound address")?;
    tracing::info!("admin listening on {bound} (mutual TLS)");
    let (tx, rx) = mpsc::channel(16);
    let operators = allowed.clone();
    let gate = transport::Gate::new(
        transport::ConnLimits::from_config(&state.node.config.limits),
        Box::new(move |id| operators.contains(id)),
    );
    tokio::spawn(transport::accept_tcp(listener, tls, gate, tx));
    let check =
        move |req: tonic::Request<()>| -> std::result::Result<tonic::Request<()>, tonic::Status> {
            let caller = req
                .extensions()
                .get::<transport::CallerInfo>()
                .and_then(|c| c.node.as_ref().map(|n| n.0));
            match caller {
                None => Err(tonic::Status::unauthenticated(
                    "Admin over TCP needs mutual TLS with a node key",
                )),
                Some(id) if allowed.contains(&id) => Ok(req),
                Some(id) => {
                    tracing::warn!(peer = %id.short(), "refused an Admin call from a node not in admin_peers");
                    Err(tonic::Status::permission_denied(format!(
                        "node {id} may not use this node's Admin service"
                    )))
                }
            }
        };
    let counted = grpc_metrics::GrpcMetricsLayer::new(state.node.metrics.clone());
    let svc = AdminServer::new(admin::AdminService::new(state))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let svc = tonic::service::interceptor::InterceptedService::new(svc, check);
    let (refl_v1, refl_v1alpha) = reflection(ADMIN)?;
    let server = Server::builder()
        .layer(transport::TrackCalls)
        .layer(counted)
        .layer(request_log::RequestLog)
        .add_service(svc)
        .add_service(health_server(health))
        .add_service(refl_v1)
        .add_service(refl_v1alpha)
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), wait_for(shutdown));
    Ok(tokio::spawn(async move {
        if let Err(e) = server.await {
            tracing::error!("admin TCP server failed: {e}");
        }
    }))
}

/// Health service name that is SERVING once the onion service is reachable.
pub(crate) const TOR_HEALTH: &str = "bitsync.v1.Federation.Tor";

/// Bootstrap embedded Tor, launch the onion service and feed its streams to
/// the Federation server, through the same TLS as TCP. A failure here is
/// logged and leaves the TCP listener working.
async fn serve_onion(
    state: Arc<ServerState>,
    tor: Arc<TorHandle>,
    tls: Arc<rustls::ServerConfig>,
    (gate, conns): (
        Arc<transport::Gate>,
        mpsc::Sender<std::io::Result<transport::PeerConn>>,
    ),
    health: tonic_health::server::HealthReporter,
    mut shutdown: watch::Receiver<bool>,
) {
    let run = async {
        let client = tor.get().await?;
        state.node.metrics.state.tor_bootstrapped.set(1);
        let (svc, streams) = crate::tor::launch_onion_service(&client, "bitsync")
            .await
            .map_err(|e| Error::unavailable(format!("launching the onion service: {e}")))?;
        let mut streams = Box::pin(streams);
        // The virtual port advertised (the service accepts every port).
        let address = format!("{}:{}", svc.address(), crate::tor::DEFAULT_ONION_PORT);
        let hostname = state.node.paths.tor().join("hostname");
        crate::durable::write_atomic(&hostname, format!("{}\n", svc.address()).as_bytes(), 0o600)?;
        *state
            .onion_address
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(address.clone());
        tracing::info!("onion service {address} launched; waiting until it is reachable");
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let timeout = Duration::from_secs(state.node.config.tor.bootstrap_timeout_secs);
        let reachable = svc.wait_reachable(timeout);
        tokio::pin!(reachable);
        let mut announced = false;
        loop {
            tokio::select! {
                r = &mut reachable, if !announced => {
                    announced = true;
                    match r {
                        Ok(()) => {
                            health.set_service_status(TOR_HEALTH, tonic_health::ServingStatus::Serving).await;
                            state.node.metrics.state.onion_reachable.set(1);
                            tracing::info!("onion service {address} is reachable");
                        }
                        Err(e) => tracing::warn!("onion service {address} not reachable yet: {e}"),
                    }
                }
                s = futures::StreamExt::next(&mut streams) => match s {
                    Some(stream) => transport::accept(Box::new(stream), "onion".into(), None, acceptor.clone(), &gate, conns.clone()),
                    None => return Err(Error::unavailable("the onion service stopped")),
                },
                _ = shutdown.changed() => return Ok(()),
            }
        }
    };
    if let Err(e) = run.await {
        tracing::error!("Tor: {e}; federation stays available on TCP");
    }
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing a SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

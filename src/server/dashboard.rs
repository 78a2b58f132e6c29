//! The watch listener (`metrics_listen` in config.toml, `serve --metrics`):
//! plain HTTP for Prometheus and a browser, beside the gRPC services.
//!
//! - `/metrics`: the registry ([`crate::metrics`]), OpenMetrics when the
//!   scraper asks for it (Prometheus does), else the classic text format;
//! - `/status.json`: what the status page shows;
//! - `/`: the status page, one HTML file embedded in the binary that polls
//!   `/status.json`.
//!
//! It has no authentication, so it serves only what any process on the
//! host may see: counts, peers' short ids, names and trust states, job
//! progress, and error lines with every long hex id shortened. Nothing from
//! Admin that changes or reveals content (no item ids or names, no
//! addresses, no invite, no key), and no route acts on the node. It binds
//! only where the operator asks; off by default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::watch;

use super::ServerState;
use crate::error::{blocking, Error, IoContext, Result};
use crate::metrics::{JobLabels, KindLabel, PeerLabel, StateLabel};
use crate::proto::progress::Phase;
use crate::replicator::JobState;
use crate::store::{Peer, PeerState, Stats};

const PAGE: &str = include_str!("status.html");
/// Error lines the page shows at most (the newest).
const MAX_ERRORS: usize = 20;
/// Characters of one error line shown at most.
const MAX_ERROR_LEN: usize = 300;

/// Bind `addr` and serve until `shutdown`; returns the bound address.
pub(crate) async fn serve(
    state: Arc<ServerState>,
    addr: &str,
    shutdown: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::from_io(e, format!("binding metrics listener {addr}")))?;
    let bound = listener.local_addr().ctx("reading bound address")?;
    if bound.ip().is_loopback() {
        tracing::info!("metrics and status page on http://{bound}/ (unauthenticated, read-only)");
    } else {
        tracing::warn!(
            "metrics and status page on http://{bound}/: unauthenticated, reachable beyond this host"
        );
    }
    let app = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/status.json", get(status_json))
        .with_state(state);
    let task = tokio::spawn(async move {
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(super::wait_for(shutdown))
            .await;
        if let Err(e) = r {
            tracing::error!("metrics listener failed: {e}");
        }
    });
    Ok((bound, task))
}

async fn page() -> Response {
    let csp = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; img-src data:";
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, csp),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

async fn metrics(State(state): State<Arc<ServerState>>, headers: HeaderMap) -> Response {
    let snap = match Snapshot::take(&state).await {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let m = &state.node.metrics;
    let _scrape = m.scrape_lock();
    snap.set_gauges(&state);
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains("application/openmetrics-text") {
        let ct = "application/openmetrics-text; version=1.0.0; charset=utf-8";
        ([(header::CONTENT_TYPE, ct)], m.openmetrics()).into_response()
    } else {
        let ct = "text/plain; version=0.0.4; charset=utf-8";
        ([(header::CONTENT_TYPE, ct)], m.prometheus_text()).into_response()
    }
}

async fn status_json(State(state): State<Arc<ServerState>>) -> Response {
    match Snapshot::take(&state).await {
        Ok(snap) => {
            let _scrape = state.node.metrics.scrape_lock();
            snap.set_gauges(&state);
            let body = snap.to_json(&state).to_string();
            let h = [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ];
            (h, body).into_response()
        }
        Err(e) => failed(e),
    }
}

/// The error a scrape gets when the database cannot be read (its message
/// names no secret: it is one of this node's own errors).
fn failed(e: Error) -> Response {
    tracing::warn!("metrics listener: {e}");
    (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response()
}

/// The node's state at one moment, read once per request.
struct Snapshot {
    stats: Stats,
    peers: Vec<Peer>,
    jobs: Vec<JobState>,
}

impl Snapshot {
    async fn take(state: &Arc<ServerState>) -> Result<Snapshot> {
        let node = state.node.clone();
        let (stats, peers) = blocking(move || Ok((node.db.stats()?, node.db.peers()?))).await?;
        let jobs = state.replicator.jobs();
        Ok(Snapshot { stats, peers, jobs })
    }

    /// The gauges of state, replaced (not added to): a peer or job gone
    /// since the last scrape leaves no series behind.
    fn set_gauges(&self, state: &ServerState) {
        let m = &state.node.metrics;
        let g = &m.state;
        g.stored_items.set(self.stats.manifests as i64);
        g.stored_chunks.set(self.stats.chunks as i64);
        g.stored_bytes.set(self.stats.stored_bytes as i64);
        g.uptime.set(state.started.elapsed().as_secs_f64());
        g.peers.clear();
        for s in [PeerState::Trusted, PeerState::Revoked, PeerState::Imported] {
            let n = self.peers.iter().filter(|p| p.state == s).count();
            let l = StateLabel {
                state: s.as_str().into(),
            };
            g.peers.get_or_create(&l).set(n as i64);
        }
        for f in [&g.mirror_lag, &g.mirror_last_sync] {
            f.clear();
        }
        for f in [
            &g.job_items_done,
            &g.job_items_expected,
            &g.job_bytes_done,
            &g.job_bytes_expected,
            &g.job_failed,
        ] {
            f.clear();
        }
        g.jobs.clear();
        let mut kinds: BTreeMap<&str, i64> = BTreeMap::new();
        for j in &self.jobs {
            *kinds.entry(j.kind).or_default() += 1;
            let peer = short(&j.peer);
            let p = &j.progress;
            let l = JobLabels {
                kind: j.kind.into(),
                peer: peer.clone(),
            };
            g.job_items_done.get_or_create(&l).set(p.items_done as i64);
            g.job_items_expected
                .get_or_create(&l)
                .set(p.items_total as i64);
            g.job_bytes_done.get_or_create(&l).set(p.bytes_done as i64);
            g.job_bytes_expected
                .get_or_create(&l)
                .set(p.bytes_total as i64);
            let failed = p.phase == Phase::Failed as i32;
            g.job_failed.get_or_create(&l).set(failed as i64);
            if j.kind == "mirror" {
                let up = p.phase == Phase::Done as i32;
                if let Some((lag, last)) = m.mirror_lag(&peer, up) {
                    let l = PeerLabel { peer };
                    g.mirror_lag.get_or_create(&l).set(lag);
                    if let Some(t) = last {
                        g.mirror_last_sync.get_or_create(&l).set(t);
                    }
                }
            }
        }
        for kind in ["clone", "sync", "mirror"] {
            let n = kinds.get(kind).copied().unwrap_or(0);
            let l = KindLabel { kind: kind.into() };
            g.jobs.get_or_create(&l).set(n);
        }
    }

    fn to_json(&self, state: &ServerState) -> Value {
        let node = &state.node;
        let m = &node.metrics;
        let g = &m.state;
        let peers: Vec<Value> = self
            .peers
            .iter()
            .filter(|p| p.node_id != node.id())
            .map(|p| {
                let id = p.node_id.short();
                let (sent, received) = m.peer_bytes(&id);
                let lag = g
                    .mirror_lag
                    .get(&PeerLabel { peer: id.clone() })
                    .map(|v| v.get());
                json!({"id": id, "name": p.name, "state": p.state.as_str(), "mirror": p.mirror,
                    "lag_seconds": lag, "sent_bytes": sent, "received_bytes": received})
            })
            .collect();
        let mut errors = Vec::new();
        let jobs: Vec<Value> = self
            .jobs
            .iter()
            .map(|j| {
                let p = &j.progress;
                let phase = Phase::try_from(p.phase)
                    .map(|ph| ph.as_str_name())
                    .unwrap_or("PHASE_UNSPECIFIED");
                for e in &p.errors {
                    errors
                        .push(json!({"job": j.kind, "peer": short(&j.peer), "message": redact(e)}));
                }
                json!({"kind": j.kind, "peer": short(&j.peer), "phase": phase,
                    "items_done": p.items_done, "items_total": p.items_total,
                    "bytes_done": p.bytes_done, "bytes_total": p.bytes_total,
                    "bytes_per_second": p.bytes_per_second, "elapsed_ms": p.elapsed_ms})
            })
            .collect();
        let skip = errors.len().saturating_sub(MAX_ERRORS);
        let tor = json!({"enabled": g.tor_enabled.get() == 1,
            "bootstrapped": g.tor_bootstrapped.get() == 1,
            "onion_reachable": g.onion_reachable.get() == 1});
        json!({
            "node": {"id": node.id().short(), "name": node.config.name,
                "version": env!("CARGO_PKG_VERSION"), "uptime_seconds": state.started.elapsed().as_secs(),
                "tor": tor},
            "storage": {"items": self.stats.manifests, "chunks": self.stats.chunks,
                "bytes": self.stats.stored_bytes},
            "peers": peers,
            "jobs": jobs,
            "now_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64).unwrap_or(0),
            "errors": errors.split_off(skip),
        })
    }
}

/// The short form (12 hex digits) of a hex node id.
fn short(hex: &str) -> String {
    hex.chars().take(12).collect()
}

/// An error line as the page may show it: every run of 16 or more hex
/// digits (item, chunk and node ids) cut to its first 12, and the line
/// bounded.
fn redact(line: &str) -> String {
    let mut out = String::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 16 {
            out.push_str(&run[..12]);
            out.push('…');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in line.chars() {
        if c.is_ascii_hexdigit() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out.chars().take(MAX_ERROR_LEN).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_shortens_ids_and_keeps_words() {
        let id = "ab".repeat(32);
        let line = format!("chunk {id} from 0123456789abcdef: deadbeef failed");
        assert_eq!(
            redact(&line),
            "chunk abababababab… from 0123456789ab…: deadbeef failed"
        );
        assert_eq!(redact(&"x".repeat(1000)).chars().count(), MAX_ERROR_LEN);
    }
}

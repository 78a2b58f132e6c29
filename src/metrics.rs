//! The node's Prometheus metrics: one registry per opened node, so two nodes
//! in one process (as the tests run them) never mix their counters.
//!
//! Low in the room order on purpose: every room above may record into it
//! with a one-line call, and it imports nothing of the crate. Counters are
//! recorded where things happen (the transfer engine, the Federation
//! server, the gRPC layer); the gauges of state (storage, peers, jobs, mirror
//! lag, Tor) are set by the listener from the database and the replicator
//! just before each scrape, so they are never stale.
//!
//! Labels never carry item ids, content names or secrets: per-peer series
//! use the short node id (first 12 hex digits), jobs their kind and peer.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// A gauge holding seconds (or a timestamp) as a float.
pub type SecondsGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub peer: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub service: String,
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub kind: String,
    pub peer: String,
}

/// Why a chunk from a peer was not stored (the `reason` label).
#[derive(Clone, Copy, Debug)]
pub enum Rejected {
    /// Its bytes did not hash to its id here.
    BadHash,
    /// It hashed right but no waiting item's signed manifest gives its length.
    WrongLength,
    /// The peer answered DATA_LOSS: its own copy failed its hash there.
    PeerDataLoss,
}

impl Rejected {
    fn label(self) -> &'static str {
        match self {
            Rejected::BadHash => "bad_hash",
            Rejected::WrongLength => "wrong_length",
            Rejected::PeerDataLoss => "peer_data_loss",
        }
    }
}

/// When a mirror was last known to hold everything its source listed.
#[derive(Clone, Copy, Debug)]
struct MirrorClock {
    since: SystemTime,
    last_ok: Option<SystemTime>,
}

/// Gauges the listener sets from the node's state before each scrape.
pub struct StateGauges {
    pub stored_items: Gauge,
    pub stored_chunks: Gauge,
    pub stored_bytes: Gauge,
    pub peers: Family<StateLabel, Gauge>,
    pub mirror_lag: Family<PeerLabel, SecondsGauge>,
    pub mirror_last_sync: Family<PeerLabel, SecondsGauge>,
    pub jobs: Family<KindLabel, Gauge>,
    pub job_items_done: Family<JobLabels, Gauge>,
    pub job_items_expected: Family<JobLabels, Gauge>,
    pub job_bytes_done: Family<JobLabels, Gauge>,
    pub job_bytes_expected: Family<JobLabels, Gauge>,
    pub job_failed: Family<JobLabels, Gauge>,
    pub tor_enabled: Gauge,
    pub tor_bootstrapped: Gauge,
    pub onion_reachable: Gauge,
    pub uptime: SecondsGauge,
}

/// The registry and the handles every room records through.
pub struct Metrics {
    registry: Registry,
    sent_bytes: Family<PeerLabel, Counter>,
    sent_chunks: Family<PeerLabel, Counter>,
    received_bytes: Family<PeerLabel, Counter>,
    received_chunks: Family<PeerLabel, Counter>,
    rejected: Family<RejectLabels, Counter>,
    rekeys: Counter,
    rekey_seconds: Histogram,
    grpc: Family<GrpcLabels, Counter>,
    jobs_failed: Family<KindLabel, Counter>,
    mirrors: Mutex<HashMap<String, MirrorClock>>,
    /// Held while the gauges of state are replaced and read, so two
    /// scrapes at once never see each other's half-cleared families.
    scrape: Mutex<()>,
    /// Set before each scrape.
    pub state: StateGauges,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("bitsync");
        let m = Metrics {
            sent_bytes: Family::default(),
            sent_chunks: Family::default(),
            received_bytes: Family::default(),
            received_chunks: Family::default(),
            rejected: Family::default(),
            rekeys: Counter::default(),
            // 100 µs .. ~3 s: one RSA unwrap plus one wrap.
            rekey_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            grpc: Family::default(),
            jobs_failed: Family::default(),
            mirrors: Mutex::new(HashMap::new()),
            scrape: Mutex::new(()),
            state: StateGauges::register(&mut r),
            registry: Registry::default(),
        };
        let b = Unit::Bytes;
        let h = "Chunk bytes (ciphertext as stored) sent to a peer in StreamChunks answers";
        r.register_with_unit("peer_sent", h, b.clone(), m.sent_bytes.clone());
        let h = "Chunks sent to a peer in StreamChunks answers";
        r.register("peer_sent_chunks", h, m.sent_chunks.clone());
        let h = "Chunk bytes (ciphertext) received from a peer, verified and stored";
        r.register_with_unit("peer_received", h, b, m.received_bytes.clone());
        let h = "Chunks received from a peer, verified and stored";
        r.register("peer_received_chunks", h, m.received_chunks.clone());
        let h = "Chunks from a peer not stored: bad_hash, wrong_length, or peer_data_loss (the peer's copy failed its hash: DATA_LOSS)";
        r.register("peer_chunks_rejected", h, m.rejected.clone());
        let h =
            "Items re-keyed just in time for a peer (own envelope unwrapped, wrapped for the peer)";
        r.register("rekeys", h, m.rekeys.clone());
        let h = "Time one just-in-time rekey took";
        let s = Unit::Seconds;
        r.register_with_unit("rekey_duration", h, s, m.rekey_seconds.clone());
        let h = "gRPC requests served, by service, method and status code";
        r.register("grpc_requests", h, m.grpc.clone());
        let h = "Jobs (clone, sync, mirror rounds) that ended failed, by kind";
        r.register("jobs_failed", h, m.jobs_failed.clone());
        Metrics { registry: r, ..m }
    }

    /// `bytes` of one chunk sent to `peer` (short id).
    pub fn chunk_sent(&self, peer: &str, bytes: u64) {
        let l = PeerLabel { peer: peer.into() };
        self.sent_bytes.get_or_create(&l).inc_by(bytes);
        self.sent_chunks.get_or_create(&l).inc();
    }

    /// `bytes` of one chunk received from `peer`, verified and written.
    pub fn chunk_received(&self, peer: &str, bytes: u64) {
        let l = PeerLabel { peer: peer.into() };
        self.received_bytes.get_or_create(&l).inc_by(bytes);
        self.received_chunks.get_or_create(&l).inc();
    }

    /// (sent, received) chunk bytes of `peer` so far.
    pub fn peer_bytes(&self, peer: &str) -> (u64, u64) {
        let l = PeerLabel { peer: peer.into() };
        let get = |f: &Family<PeerLabel, Counter>| f.get(&l).map(|c| c.get()).unwrap_or(0);
        (get(&self.sent_bytes), get(&self.received_bytes))
    }

    pub fn chunk_rejected(&self, peer: &str, why: Rejected) {
        let l = RejectLabels {
            peer: peer.into(),
            reason: why.label(),
        };
        self.rejected.get_or_create(&l).inc();
    }

    pub fn rekeyed(&self, took: Duration) {
        self.rekeys.inc();
        self.rekey_seconds.observe(took.as_secs_f64());
    }

    pub fn grpc_request(&self, service: &str, method: &str, code: String) {
        let l = GrpcLabels {
            service: service.into(),
            method: method.into(),
            code,
        };
        self.grpc.get_or_create(&l).inc();
    }

    pub fn job_failed(&self, kind: &str) {
        let l = KindLabel { kind: kind.into() };
        self.jobs_failed.get_or_create(&l).inc();
    }

    fn mirrors(&self) -> std::sync::MutexGuard<'_, HashMap<String, MirrorClock>> {
        self.mirrors.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hold while setting [`Self::state`] and reading it back.
    pub fn scrape_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.scrape.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A mirror of `peer` started: its lag counts from now until its first sync.
    pub fn mirror_started(&self, peer: &str) {
        let clock = MirrorClock {
            since: SystemTime::now(),
            last_ok: None,
        };
        self.mirrors().entry(peer.into()).or_insert(clock);
    }

    /// A mirror of `peer` finished a sync: it held everything listed.
    pub fn mirror_synced(&self, peer: &str) {
        let now = SystemTime::now();
        let mut m = self.mirrors();
        let c = m.entry(peer.into()).or_insert(MirrorClock {
            since: now,
            last_ok: None,
        });
        c.last_ok = Some(now);
    }

    /// (lag seconds, last successful sync as a Unix time) of the mirror of
    /// `peer`. The lag is 0 while it is up to date (following the source's
    /// watch stream), else the time since it last was (or since it started).
    pub fn mirror_lag(&self, peer: &str, up_to_date: bool) -> Option<(f64, Option<f64>)> {
        let c = *self.mirrors().get(peer)?;
        let last = c.last_ok.map(unix_seconds);
        if up_to_date && c.last_ok.is_some() {
            return Some((0.0, last));
        }
        let from = c.last_ok.unwrap_or(c.since);
        let lag = SystemTime::now()
            .duration_since(from)
            .unwrap_or_default()
            .as_secs_f64();
        Some((lag, last))
    }

    /// The registry in the OpenMetrics text format (what Prometheus asks
    /// for with `Accept: application/openmetrics-text`).
    pub fn openmetrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// The registry in the classic Prometheus text format (0.0.4), for
    /// `promtool check metrics` and scrapers that do not ask for
    /// OpenMetrics. Only the descriptor lines differ: OpenMetrics names a
    /// counter family without its `_total` suffix and adds `# UNIT` and
    /// `# EOF`, which the classic parser reads as a second, untyped family.
    pub fn prometheus_text(&self) -> String {
        classic_text(&self.openmetrics())
    }
}

/// Convert OpenMetrics text to the classic format (see [`Metrics::prometheus_text`]).
fn classic_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut help: Option<&str> = None;
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with("# HELP ") {
            // Held until the TYPE line says whether the name needs `_total`.
            help = Some(line);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let name = if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = help.take() {
                let text = h.splitn(4, ' ').nth(3).unwrap_or("");
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl StateGauges {
    fn register(r: &mut Registry) -> StateGauges {
        let g = StateGauges {
            stored_items: Gauge::default(),
            stored_chunks: Gauge::default(),
            stored_bytes: Gauge::default(),
            peers: Family::default(),
            mirror_lag: Family::default(),
            mirror_last_sync: Family::default(),
            jobs: Family::default(),
            job_items_done: Family::default(),
            job_items_expected: Family::default(),
            job_bytes_done: Family::default(),
            job_bytes_expected: Family::default(),
            job_failed: Family::default(),
            tor_enabled: Gauge::default(),
            tor_bootstrapped: Gauge::default(),
            onion_reachable: Gauge::default(),
            uptime: Gauge::default(),
        };
        let (b, s) = (Unit::Bytes, Unit::Seconds);
        r.register(
            "stored_items",
            "Items (manifests) stored",
            g.stored_items.clone(),
        );
        r.register("stored_chunks", "Chunks stored", g.stored_chunks.clone());
        let h = "Chunk bytes (ciphertext) stored";
        r.register_with_unit("stored", h, b.clone(), g.stored_bytes.clone());
        let h = "Peers by trust state (trusted, revoked, imported)";
        r.register("peers", h, g.peers.clone());
        let h =
            "Seconds since the mirror last held everything its source listed (0 while up to date)";
        r.register_with_unit("mirror_lag", h, s.clone(), g.mirror_lag.clone());
        let h = "Unix time of the mirror's last successful sync";
        let n = "mirror_last_sync_timestamp";
        r.register_with_unit(n, h, s.clone(), g.mirror_last_sync.clone());
        r.register(
            "jobs_running",
            "Jobs shown in status, by kind",
            g.jobs.clone(),
        );
        let h = "Items a job has completed";
        r.register("job_items_done", h, g.job_items_done.clone());
        let h = "Items a job has found to fetch so far";
        r.register("job_items_expected", h, g.job_items_expected.clone());
        let h = "Chunk bytes a job has received";
        r.register_with_unit("job_done", h, b.clone(), g.job_bytes_done.clone());
        let h = "Chunk bytes a job has found to fetch so far";
        r.register_with_unit("job_expected", h, b, g.job_bytes_expected.clone());
        let h = "1 while a job's phase is FAILED (a mirror retrying)";
        r.register("job_failed", h, g.job_failed.clone());
        let h = "1 when this node serves an onion service";
        r.register("tor_enabled", h, g.tor_enabled.clone());
        let h = "1 once embedded Tor has bootstrapped";
        r.register("tor_bootstrapped", h, g.tor_bootstrapped.clone());
        let h = "1 once the onion service is reachable";
        r.register("onion_service_reachable", h, g.onion_reachable.clone());
        let h = "Seconds this node has been serving";
        r.register_with_unit("uptime", h, s, g.uptime.clone());
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_with_total_and_drops_openmetrics_lines() {
        let m = Metrics::new();
        m.chunk_sent("0123456789ab", 100);
        m.rekeyed(Duration::from_millis(3));
        let text = m.prometheus_text();
        assert!(text.contains("# HELP bitsync_peer_sent_bytes_total Chunk bytes"));
        assert!(text.contains("# TYPE bitsync_peer_sent_bytes_total counter\n"));
        assert!(text.contains("bitsync_peer_sent_bytes_total{peer=\"0123456789ab\"} 100\n"));
        assert!(text.contains("# TYPE bitsync_rekey_duration_seconds histogram\n"));
        assert!(text.contains("bitsync_rekey_duration_seconds_count 1\n"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        assert!(m.openmetrics().ends_with("# EOF\n"));
    }

    #[test]
    fn mirror_lag_is_zero_only_while_up_to_date_after_a_sync() {
        let m = Metrics::new();
        assert!(m.mirror_lag("p", true).is_none());
        m.mirror_started("p");
        let (lag, last) = m.mirror_lag("p", true).unwrap();
        assert!(lag >= 0.0 && last.is_none());
        m.mirror_synced("p");
        let (lag, last) = m.mirror_lag("p", true).unwrap();
        assert_eq!(lag, 0.0);
        assert!(last.unwrap() > 1.7e9);
        let (lag, _) = m.mirror_lag("p", false).unwrap();
        assert!((0.0..5.0).contains(&lag));
    }
}

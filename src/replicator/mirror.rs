//! Mirror supervision: one task per mirror source, keeping a `Watch` stream
//! open, syncing on every event and reconciling every minute, retrying a lost
//! connection with exponential backoff and jitter. Once per connection,
//! after the first sync, it asks for the keys of items awaiting one
//! (`keys`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;

use super::jobs::{push_error, Tracker};
use super::{client, Outcome, Replicator};
use crate::crypto::{Hash, NodeId};
use crate::error::{Error, Kind, Result};
use crate::proto::{progress::Phase, watch_event, WatchRequest};
use crate::store::PeerState;

/// How often `run_mirrors` looks for mirror sources added while the node runs.
const MIRROR_RESCAN: Duration = Duration::from_secs(2);
/// A full sync this often, whatever the watch stream says.
const RECONCILE: Duration = Duration::from_secs(60);
/// An idle Watch stream carries a heartbeat every 15 s (PROTOCOL.md §4.7): one
/// silent for three of them is dead (a stalled source, or a connection lost
/// without a reset that keepalive pings have not caught), so it is dropped
/// and reconnected with backoff.
const WATCH_SILENCE: Duration = Duration::from_secs(45);

/// The wait before reconnecting to a mirror source.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(60);
    /// A connection that lasted this long was healthy: start again from FIRST.
    const HEALTHY: Duration = Duration::from_secs(30);

    fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    /// The wait after a connection that lasted `lasted` failed with `kind`,
    /// scaled by `jitter` (0.5..1.5). Doubles up to MAX; a refusal
    /// (revoked, no longer a source) waits MAX at once.
    fn after(&mut self, kind: Kind, lasted: Duration, jitter: f64) -> Duration {
        if lasted > Self::HEALTHY {
            self.next = Self::FIRST;
        }
        if matches!(kind, Kind::Denied | Kind::NotFound | Kind::Auth) {
            self.next = Self::MAX;
        }
        let wait = self.next.mul_f64(jitter);
        self.next = (self.next * 2).min(Self::MAX);
        wait
    }
}

impl Replicator {
    /// Keep every mirror source in sync until `shutdown` fires. Sources are
    /// `[[mirror]]` entries and trusted peers marked as mirrors; the list is
    /// re-read every few seconds, so `bitsync peer add ... --mirror` (or
    /// Admin/AddPeer) takes effect without a restart.
    pub(crate) async fn run_mirrors(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut running: HashMap<NodeId, tokio::task::JoinHandle<()>> = HashMap::new();
        for m in &self.node.config.mirror {
            if let Err(e) = Hash::parse(&m.peer, "mirror peer") {
                tracing::error!("config.toml [[mirror]]: {e}");
            }
        }
        loop {
            if *shutdown.borrow() {
                return;
            }
            running.retain(|_, h| !h.is_finished());
            for id in self.mirror_sources() {
                if running.contains_key(&id) {
                    continue;
                }
                let me = self.clone();
                let sd = shutdown.clone();
                running.insert(id, tokio::spawn(async move { me.mirror(id, sd).await }));
            }
            tokio::select! {
                _ = tokio::time::sleep(MIRROR_RESCAN) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Mirror sources right now: `[[mirror]]` entries plus trusted peers marked as mirrors.
    fn mirror_sources(&self) -> Vec<NodeId> {
        let mut sources: Vec<NodeId> = self
            .node
            .config
            .mirror
            .iter()
            .filter_map(|m| Hash::parse(&m.peer, "mirror peer").ok())
            .collect();
        match self.node.db.peers() {
            Ok(peers) => sources.extend(
                peers
                    .iter()
                    .filter(|p| p.mirror && p.state == PeerState::Trusted)
                    .map(|p| p.node_id),
            ),
            Err(e) => tracing::warn!("reading mirror peers: {e}"),
        }
        sources.retain(|id| *id != self.node.id());
        sources.sort();
        sources.dedup();
        sources
    }

    /// Follow one source: sync, then watch for events and sync on each,
    /// reconciling periodically; reconnect with exponential backoff and jitter.
    /// Ends when the source is no longer a mirror source, or at shutdown.
    /// Shown as a job: DONE while up to date, FAILED with the reason while stopped.
    async fn mirror(self: Arc<Self>, source: NodeId, mut shutdown: watch::Receiver<bool>) {
        let key = format!("mirror:{}", source.to_hex());
        let t = self.show_job(&key, "mirror", source.to_hex());
        self.node.metrics.mirror_started(&source.short());
        let mut backoff = Backoff::new();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if !self.mirror_sources().contains(&source) {
                tracing::info!(peer = %source.short(), "stopped mirroring: no longer a mirror source");
                break;
            }
            let started = Instant::now();
            let err = match self.mirror_once(source, &mut shutdown, &t).await {
                Ok(()) => break, // shutdown
                Err(e) => e,
            };
            self.drop_channel(&source);
            let jitter = rand::thread_rng().gen_range(0.5..1.5);
            let wait = backoff.after(err.kind(), started.elapsed(), jitter);
            let msg = if matches!(err.kind(), Kind::Denied | Kind::Auth) {
                format!(
                    "mirror of {} stopped: {err}; retrying in {}s",
                    source.short(),
                    wait.as_secs()
                )
            } else {
                format!(
                    "mirror of {} interrupted: {err}; retrying in {:.1}s",
                    source.short(),
                    wait.as_secs_f64()
                )
            };
            tracing::warn!(peer = %source.short(), "{msg}");
            self.node.metrics.job_failed("mirror");
            t.update(|p| {
                p.phase = Phase::Failed as i32;
                push_error(p, msg);
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => break,
            }
        }
        self.end_job(&key);
    }

    /// One connection to a source: sync, then follow its watch stream until
    /// it fails (the error) or shutdown (`Ok`).
    async fn mirror_once(
        &self,
        source: NodeId,
        shutdown: &mut watch::Receiver<bool>,
        t: &Tracker,
    ) -> Result<()> {
        let peer = self.trusted_peer(&source)?;
        let synced = |r: Result<Outcome>| -> Result<()> {
            r?;
            self.node.metrics.mirror_synced(&source.short());
            t.synced();
            Ok(())
        };
        synced(self.sync_peer(&peer, t).await)?;
        // Keys for items awaiting one (PROTOCOL.md §2.4): once per
        // connection, before the watch stream is open, so a slow or
        // unreachable publisher never holds up its events.
        self.keys_from_publishers(&source).await;
        let ch = self.channel(&source, &peer.address).await?;
        let cursor = super::sync::stored_cursor(&self.node, &source)?;
        let mut events = client(ch)
            .watch(WatchRequest { after_seq: cursor })
            .await
            .map_err(|s| Error::from(s).context("opening the watch stream"))?
            .into_inner();
        tracing::info!(peer = %source.short(), "mirroring");
        let mut tick = tokio::time::interval(RECONCILE);
        tick.tick().await;
        let mut last_heard = tokio::time::Instant::now();
        let mut last_item = cursor;
        loop {
            tokio::select! {
                ev = events.message() => {
                    let ev = ev.map_err(Error::from)?.ok_or_else(|| Error::unavailable("the source closed the watch stream"))?;
                    last_heard = tokio::time::Instant::now();
                    match watch_event::Kind::try_from(ev.kind) {
                        Ok(watch_event::Kind::Revoked) => return Err(Error::denied("the source revoked this node's trust")),
                        Ok(watch_event::Kind::Item) => {
                            check_watch_seq(&source, last_item, ev.seq)?;
                            last_item = ev.seq;
                            let cur = super::sync::stored_cursor(&self.node, &source)?;
                            if ev.seq > cur {
                                synced(self.sync_peer(&peer, t).await)?;
                            }
                        }
                        _ => {}
                    }
                }
                _ = tokio::time::sleep_until(last_heard + WATCH_SILENCE) => {
                    return Err(Error::unavailable(format!(
                        "the watch stream of {} was silent for {} s (heartbeats are due every 15 s): reconnecting",
                        source.short(),
                        WATCH_SILENCE.as_secs()
                    )));
                }
                _ = tick.tick() => {
                    if !self.mirror_sources().contains(&source) {
                        return Err(Error::not_found("no longer a mirror source"));
                    }
                    synced(self.sync_peer(&peer, t).await)?;
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }
}

/// Watch ITEM events come in strictly increasing seq order, each a seq a
/// node can hold (PROTOCOL.md §4.7, §8); anything else is a protocol
/// violation, reported against the source (a flood of out-of-order events
/// would otherwise start a sync each).
fn check_watch_seq(source: &NodeId, last: u64, seq: u64) -> Result<()> {
    if seq > super::planner::MAX_SEQ || seq <= last {
        return Err(Error::integrity(format!(
            "protocol violation by peer {source}: its watch stream sent item seq {seq} after {last} \
             (seqs must strictly increase and stay at most {})",
            super::planner::MAX_SEQ
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn backoff_doubles_up_to_a_minute_and_resets_after_a_healthy_connection() {
        let mut b = Backoff::new();
        let brief = Duration::from_secs(1);
        let waits: Vec<Duration> = (0..9)
            .map(|_| b.after(Kind::Unavailable, brief, 1.0))
            .collect();
        assert_eq!(waits[..3], [secs(0.5), secs(1.0), secs(2.0)]);
        assert_eq!(waits[8], Backoff::MAX);
        let healthy = Backoff::HEALTHY + brief;
        assert_eq!(b.after(Kind::Unavailable, healthy, 1.0), Backoff::FIRST);
        assert_eq!(b.after(Kind::Unavailable, brief, 1.5), secs(1.5));
    }

    #[test]
    fn a_refusal_waits_the_longest_at_once() {
        for kind in [Kind::Denied, Kind::NotFound, Kind::Auth] {
            let mut b = Backoff::new();
            assert_eq!(b.after(kind, Duration::ZERO, 0.5), Backoff::MAX / 2);
            // Even after a long healthy connection.
            let long = Backoff::HEALTHY * 4;
            assert_eq!(b.after(kind, long, 1.0), Backoff::MAX);
        }
    }
}

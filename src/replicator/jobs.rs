//! Jobs and their progress: what `Admin/Status` and the Admin streams watch.
//!
//! A job is keyed by what it works on (`sync:<peer>`, `mirror:<peer>`), so a
//! second clone or sync of the same peer joins the running one instead of
//! racing it for the peer's cursor.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::{JobState, Outcome, Replicator};
use crate::error::Result;
use crate::proto::{progress::Phase, Progress};

/// Progress keeps at most this many error lines (the newest).
const MAX_ERRORS: usize = 100;

pub(super) struct Job {
    state: watch::Sender<JobState>,
}

/// Counters shared by the workers of one job.
pub(super) struct Tracker {
    state: watch::Sender<JobState>,
    started: Instant,
}

impl Tracker {
    pub(super) fn update(&self, f: impl FnOnce(&mut Progress)) {
        self.state.send_modify(|s| {
            f(&mut s.progress);
            s.progress.elapsed_ms = self.started.elapsed().as_millis() as i64;
            let secs = self.started.elapsed().as_secs_f64();
            if secs > 0.0 {
                s.progress.bytes_per_second = s.progress.bytes_done as f64 / secs;
            }
        });
    }

    /// Log a problem and keep it in the job's error lines.
    pub(super) fn error(&self, msg: String) {
        tracing::warn!(peer = %short(&self.state.borrow().peer), "{msg}");
        self.update(|p| push_error(p, msg));
    }

    pub(super) fn phase(&self, phase: Phase) {
        self.update(|p| p.phase = phase as i32);
    }

    /// A sync succeeded: up to date (DONE) as of now.
    pub(super) fn synced(&self) {
        self.phase(Phase::Done);
        self.state
            .send_modify(|s| s.last_synced_at_ms = crate::manifest::now_ms());
    }
}

pub(super) fn push_error(p: &mut Progress, msg: String) {
    if p.errors.len() >= MAX_ERRORS {
        p.errors.remove(0);
    }
    p.errors.push(msg);
}

/// A job just started: connecting.
fn initial(kind: &'static str, peer: String) -> JobState {
    JobState {
        kind,
        peer: peer.clone(),
        progress: Progress {
            phase: Phase::Connecting as i32,
            peer,
            ..Default::default()
        },
        last_synced_at_ms: 0,
        result: None,
    }
}

/// The short form of a job's peer (a node id in hex) for log fields.
fn short(peer: &str) -> &str {
    peer.get(..12).unwrap_or(peer)
}

impl Replicator {
    /// Running jobs (and mirrors), for `Admin/Status`.
    pub(crate) fn jobs(&self) -> Vec<JobState> {
        let mut v: Vec<JobState> = self
            .jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|j| j.state.borrow().clone())
            .collect();
        v.sort_by(|a, b| (a.kind, &a.peer).cmp(&(b.kind, &b.peer)));
        v
    }

    /// Start a job, or join the one already running under the same key.
    pub(super) fn start<F, Fut>(
        self: &Arc<Self>,
        key: String,
        kind: &'static str,
        peer: String,
        work: F,
    ) -> watch::Receiver<JobState>
    where
        F: FnOnce(Arc<Replicator>, Arc<Tracker>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Outcome>> + Send + 'static,
    {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = jobs.get(&key) {
            return j.state.subscribe();
        }
        let (tx, rx) = watch::channel(initial(kind, peer));
        jobs.insert(key.clone(), Arc::new(Job { state: tx.clone() }));
        drop(jobs);
        let me = self.clone();
        tokio::spawn(async move {
            let tracker = Arc::new(Tracker {
                state: tx.clone(),
                started: Instant::now(),
            });
            let result = work(me.clone(), tracker.clone()).await;
            me.end_job(&key);
            tracker.update(|p| {
                p.phase = if result.is_ok() {
                    Phase::Done as i32
                } else {
                    Phase::Failed as i32
                };
                if let Err(e) = &result {
                    me.node.metrics.job_failed(kind);
                    push_error(p, e.to_string());
                }
            });
            tx.send_modify(|s| s.result = Some(result.map(|_| ())));
        });
        rx
    }

    /// Show a long-running task (a mirror) as a job until [`Self::end_job`].
    pub(super) fn show_job(&self, key: &str, kind: &'static str, peer: String) -> Tracker {
        let (tx, _rx) = watch::channel(initial(kind, peer));
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), Arc::new(Job { state: tx.clone() }));
        Tracker {
            state: tx,
            started: Instant::now(),
        }
    }

    pub(super) fn end_job(&self, key: &str) {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

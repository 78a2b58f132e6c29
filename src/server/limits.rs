//! Node-wide budgets of the Federation service: failed Join attempts, and
//! the StreamChunks calls open at once with the chunk bytes queued for them.
//! (Connection caps and timeouts are the transport's: `transport::Gate`.)

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use crate::config::Limits;
use crate::proto::ChunkData;
use crate::transport::RateLog;

/// Addresses whose failures are remembered at once; past this, addresses
/// whose budget has refilled are forgotten, and if none has, all are (the
/// global budget still holds).
const MAX_TRACKED: usize = 4096;

/// A token bucket refilled continuously at `per_minute` tokens a minute,
/// holding at most `per_minute`.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(per_minute: f64) -> Bucket {
        Bucket {
            tokens: per_minute,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, per_minute: f64) -> f64 {
        let now = Instant::now();
        let add = now.duration_since(self.at).as_secs_f64() * per_minute / 60.0;
        self.tokens = (self.tokens + add).min(per_minute);
        self.at = now;
        self.tokens
    }

    /// Seconds until one token is back.
    fn wait(&self, per_minute: f64) -> u64 {
        ((1.0 - self.tokens) * 60.0 / per_minute).ceil().max(1.0) as u64
    }
}

struct JoinState {
    global: Bucket,
    by_addr: HashMap<Option<IpAddr>, Bucket>,
}

/// Failed Join attempts allowed per minute, per address (Tor streams count
/// as one address) and in total. Only failures spend the budget: a node
/// redeeming a good invite is never slowed by it.
pub(crate) struct JoinLimiter {
    per_addr: f64,
    global: f64,
    state: Mutex<JoinState>,
    refused: RateLog,
}

impl JoinLimiter {
    pub(crate) fn new(l: &Limits) -> JoinLimiter {
        let global = f64::from(l.join_failures_per_minute);
        JoinLimiter {
            per_addr: f64::from(l.join_failures_per_minute_per_address),
            global,
            state: Mutex::new(JoinState {
                global: Bucket::full(global),
                by_addr: HashMap::new(),
            }),
            refused: RateLog::new("refused Join attempts over the failure rate limit"),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, JoinState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a Join from `ip` may be tried now; else RESOURCE_EXHAUSTED.
    pub(crate) fn check(&self, ip: Option<IpAddr>, remote: &str) -> Result<(), Status> {
        let mut s = self.state();
        let refused = if s.global.refill(self.global) < 1.0 {
            Some(format!(
                "too many failed Join attempts on this node; retry in {} s",
                s.global.wait(self.global)
            ))
        } else {
            s.by_addr.get_mut(&ip).and_then(|b| {
                (b.refill(self.per_addr) < 1.0).then(|| {
                    format!(
                        "too many failed Join attempts from {}; retry in {} s",
                        ip.map_or("Tor".to_string(), |a| a.to_string()),
                        b.wait(self.per_addr)
                    )
                })
            })
        };
        drop(s);
        match refused {
            None => Ok(()),
            Some(msg) => {
                self.refused.hit(|| format!("{remote}: {msg}"));
                Err(Status::resource_exhausted(msg))
            }
        }
    }

    /// Spend one failure from `ip`'s budget and the global one.
    pub(crate) fn failed(&self, ip: Option<IpAddr>) {
        let (per_addr, global) = (self.per_addr, self.global);
        let mut s = self.state();
        s.global.refill(global);
        s.global.tokens -= 1.0;
        if !s.by_addr.contains_key(&ip) && s.by_addr.len() >= MAX_TRACKED {
            s.by_addr.retain(|_, b| b.refill(per_addr) < per_addr);
            if s.by_addr.len() >= MAX_TRACKED {
                s.by_addr.clear();
            }
        }
        let b = s
            .by_addr
            .entry(ip)
            .or_insert_with(|| Bucket::full(per_addr));
        b.refill(per_addr);
        b.tokens -= 1.0;
    }
}

/// Bounds on what StreamChunks holds in memory across all peers: how many
/// calls are open, and how many chunk bytes are read but not yet taken by
/// the HTTP/2 layer (each chunk's bytes are held from before it is read
/// until its stream asks for the next message, i.e. until the previous one
/// was handed on for sending within the peer's flow-control window).
pub(crate) struct ChunkBudget {
    streams: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_streams: usize,
    max_bytes: usize,
    wait: Duration,
    last_trim_ms: Arc<AtomicU64>,
}

impl ChunkBudget {
    pub(crate) fn new(l: &Limits) -> ChunkBudget {
        let max_streams = l.max_chunk_streams as usize;
        let max_bytes = (l.max_bytes_in_flight_mib as usize) << 20;
        ChunkBudget {
            streams: Arc::new(Semaphore::new(max_streams)),
            bytes: Arc::new(Semaphore::new(max_bytes)),
            max_streams,
            max_bytes,
            wait: Duration::from_millis(l.stream_wait_ms),
            last_trim_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A place for one more StreamChunks call: waits up to `stream_wait_ms`
    /// for one, then RESOURCE_EXHAUSTED.
    pub(crate) async fn stream(&self) -> Result<StreamPermit, Status> {
        match tokio::time::timeout(self.wait, self.streams.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(StreamPermit {
                permit: Some(p),
                streams: self.streams.clone(),
                max_streams: self.max_streams,
                last_trim_ms: self.last_trim_ms.clone(),
            }),
            _ => Err(Status::resource_exhausted(format!(
                "this node is serving its limit of {} chunk streams (max_chunk_streams); retry shortly",
                self.max_streams
            ))),
        }
    }

    /// Room for a chunk of `len` bytes (waits while the budget is spent).
    pub(crate) async fn bytes(&self, len: u64) -> OwnedSemaphorePermit {
        let n = (len as usize).clamp(1, self.max_bytes.min(u32::MAX as usize));
        self.bytes
            .clone()
            .acquire_many_owned(n as u32)
            .await
            .expect("the byte budget is never closed")
    }
}

/// One open StreamChunks call. When the last one ends, the freed chunk
/// buffers are given back to the system (`malloc_trim`), at most once a
/// second: glibc keeps freed heap pages otherwise, and a node that served a
/// burst would stay at its peak RSS.
pub(crate) struct StreamPermit {
    permit: Option<OwnedSemaphorePermit>,
    streams: Arc<Semaphore>,
    max_streams: usize,
    last_trim_ms: Arc<AtomicU64>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        drop(self.permit.take());
        if self.streams.available_permits() < self.max_streams {
            return;
        }
        let now = crate::manifest::now_ms().max(0) as u64;
        let last = self.last_trim_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < 1000
            || self
                .last_trim_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn_blocking(trim_heap);
        }
    }
}

fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What a chunk stream's task queues: a message and the budget it holds.
pub(crate) type Queued = (Result<ChunkData, Status>, Option<OwnedSemaphorePermit>);

/// The response stream of StreamChunks: yields the queued messages and
/// keeps each one's bytes counted until the next is asked for.
pub(crate) struct Budgeted {
    rx: mpsc::Receiver<Queued>,
    held: Option<OwnedSemaphorePermit>,
    _stream: StreamPermit,
}

impl Budgeted {
    pub(crate) fn new(rx: mpsc::Receiver<Queued>, stream: StreamPermit) -> Budgeted {
        Budgeted {
            rx,
            held: None,
            _stream: stream,
        }
    }
}

impl futures::Stream for Budgeted {
    type Item = Result<ChunkData, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.held = None;
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some((msg, permit))) => {
                self.held = permit;
                Poll::Ready(Some(msg))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

//! Closing connections that carry no gRPC call for `idle_timeout_secs`.
//!
//! Neither hyper's HTTP/2 server nor tonic has such a timeout (keepalive
//! pings prove the peer is alive, not that it uses the connection: a client
//! that answers pings, or a TLS client that never sends the HTTP/2 preface,
//! would hold its connection forever). So each connection carries an
//! [`Activity`]: a tower layer ([`TrackCalls`]) counts the calls open on it,
//! from the request until its response body is dropped, and the connection's
//! reader ([`IdleClock`]) fails the read once the count has been zero for the
//! timeout, which makes hyper drop the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};
use tonic::codegen::{http, Bytes};

use super::CallerInfo;

/// Calls open on one connection, and since when none has been.
#[derive(Debug)]
pub(crate) struct Activity {
    state: Mutex<(usize, Instant)>,
}

/// One open call; dropping it ends the call for the idle clock.
pub(crate) struct OpenCall(Arc<Activity>);

impl Activity {
    pub(crate) fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: Mutex::new((0, Instant::now())),
        })
    }

    fn open(self: &Arc<Self>) -> OpenCall {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0 += 1;
        OpenCall(self.clone())
    }

    /// When the connection becomes idle: `None` while a call is open.
    fn idle_at(&self, timeout: Duration) -> Option<Instant> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (s.0 == 0).then(|| s.1 + timeout)
    }
}

impl Drop for OpenCall {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 -= 1;
        if s.0 == 0 {
            s.1 = Instant::now();
        }
    }
}

/// The timer half, polled from the connection's `poll_read` (hyper always
/// has a read pending on an HTTP/2 connection, so the timer is always armed).
pub(crate) struct IdleClock {
    activity: Arc<Activity>,
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl IdleClock {
    pub(crate) fn new(activity: Arc<Activity>, timeout: Duration) -> IdleClock {
        IdleClock {
            activity,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    /// `Ready(Err)` once the connection has been idle for the timeout.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while self.sleep.as_mut().poll(cx).is_ready() {
            let next = match self.activity.idle_at(self.timeout) {
                Some(at) if at <= Instant::now() => {
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no call for {:?}: closing the idle connection",
                            self.timeout
                        ),
                    ))
                }
                Some(at) => at,
                None => Instant::now() + self.timeout,
            };
            self.sleep.as_mut().reset(next);
        }
        Poll::Pending
    }
}

/// The tower layer that counts calls per connection (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct TrackCalls;

impl<S> tower::Layer<S> for TrackCalls {
    type Service = Tracked<S>;
    fn layer(&self, inner: S) -> Tracked<S> {
        Tracked(inner)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Tracked<S>(S);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Tracked<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let call = req
            .extensions()
            .get::<CallerInfo>()
            .map(|c| c.activity.open());
        let fut = self.0.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // The call stays open until its body (a stream's messages) is done.
            Ok(resp.map(move |body| {
                tonic::body::Body::new(body.map_frame(move |f| {
                    let _open = &call;
                    f
                }))
            }))
        })
    }
}

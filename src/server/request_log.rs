//! The request log: one debug line per gRPC call (service, method, the
//! calling peer, the status code, how long it took), from a tower layer on
//! every server, so no handler has to remember it.
//!
//! A call's status is known only at its end: in the response headers when it
//! fails at once (a "trailers-only" response), else in the trailers after the
//! last message, which for a stream may come minutes later. So the line is
//! written when the response body is dropped, with the status seen by then;
//! a body dropped before its trailers (the client went away, or the node is
//! shutting down) is logged as `Cancelled`. tower-http's `TraceLayer` splits
//! a call over several callbacks (response, end of stream, failure), which
//! would make one call several lines.
//!
//! Nothing of the request or response body is logged, only its path.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Frame, SizeHint};
use tonic::body::Body;

use crate::transport::CallerInfo;

/// The layer: `Server::builder().layer(RequestLog)`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RequestLog;

impl<S> tower::Layer<S> for RequestLog {
    type Service = Logged<S>;
    fn layer(&self, inner: S) -> Logged<S> {
        Logged { inner }
    }
}

/// A service whose calls are logged.
#[derive(Clone, Debug)]
pub(crate) struct Logged<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for Logged<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return Box::pin(self.inner.call(req));
        }
        let mut call = Call::new(&req);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            call.code = grpc_status(resp.headers());
            Ok(resp.map(|inner| Body::new(LoggedBody { inner, call })))
        })
    }
}

/// One call being served; logged when dropped.
struct Call {
    path: String,
    peer: Option<String>,
    remote: String,
    started: Instant,
    /// The `grpc-status` seen so far.
    code: Option<i32>,
}

impl Call {
    fn new<B>(req: &http::Request<B>) -> Call {
        let info = req.extensions().get::<CallerInfo>();
        Call {
            path: req.uri().path().to_string(),
            peer: info.and_then(|i| i.node.as_ref().map(|(id, _)| id.short())),
            // Calls on the admin socket carry no CallerInfo.
            remote: info.map_or_else(|| "admin.sock".to_string(), |i| i.remote.clone()),
            started: Instant::now(),
            code: None,
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        let (service, method) = self
            .path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or((&self.path, ""));
        let code = self.code.map_or(tonic::Code::Cancelled, tonic::Code::from);
        let ms = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
        let remote = &self.remote;
        match &self.peer {
            Some(peer) => tracing::debug!(
                service, method, peer = %peer, %remote, ?code, duration_ms = ms, "gRPC call"
            ),
            None => {
                tracing::debug!(service, method, %remote, ?code, duration_ms = ms, "gRPC call")
            }
        }
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The response body, passed through, watching for the trailers' status.
struct LoggedBody {
    inner: Body,
    call: Call,
}

impl http_body::Body for LoggedBody {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                self.call.code = Some(code);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

//! One tower layer on every gRPC server (Federation, Admin on the socket and
//! over TCP) counting requests by service, method and status code, so no
//! handler carries metrics code and a new method is counted without thought.
//!
//! The status is read where gRPC puts it: the response headers of a
//! trailers-only answer (most errors), else the trailers at the end of the
//! body. A body dropped before its trailers (the client went away) counts
//! as `Cancelled`. A method the server does not know (`Unimplemented`) is
//! counted under `other`, so a caller cannot grow the label set at will.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body_util::BodyExt;

use crate::metrics::Metrics;

#[derive(Clone)]
pub(crate) struct GrpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl GrpcMetricsLayer {
    pub(crate) fn new(metrics: Arc<Metrics>) -> GrpcMetricsLayer {
        GrpcMetricsLayer { metrics }
    }
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct GrpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    RB: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    RB::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut rec = Recorder::new(self.metrics.clone(), req.uri().path());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            rec.status(resp.headers());
            Ok(resp.map(|body| {
                tonic::body::Body::new(body.map_frame(move |frame| {
                    if let Some(trailers) = frame.trailers_ref() {
                        rec.status(trailers);
                    }
                    frame
                }))
            }))
        })
    }
}

/// Counts one request once: at its status, or as `Cancelled` when dropped
/// without one.
struct Recorder {
    metrics: Arc<Metrics>,
    service: String,
    method: String,
    done: bool,
}

impl Recorder {
    fn new(metrics: Arc<Metrics>, path: &str) -> Recorder {
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let service = parts.next().unwrap_or("").chars().take(100).collect();
        let method = parts.next().unwrap_or("").chars().take(100).collect();
        Recorder {
            metrics,
            service,
            method,
            done: false,
        }
    }

    fn status(&mut self, headers: &http::HeaderMap) {
        let Some(v) = headers.get("grpc-status") else {
            return;
        };
        let n = v.to_str().ok().and_then(|s| s.parse().ok()).unwrap_or(2);
        self.record(tonic::Code::from_i32(n));
    }

    fn record(&mut self, code: tonic::Code) {
        if self.done {
            return;
        }
        self.done = true;
        let (service, method) = if code == tonic::Code::Unimplemented {
            ("other", "other")
        } else {
            (self.service.as_str(), self.method.as_str())
        };
        self.metrics
            .grpc_request(service, method, format!("{code:?}"));
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.record(tonic::Code::Cancelled);
    }
}

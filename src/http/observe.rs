//! One span, one log line and one metrics sample per request, for the gateway and
//! gRPC alike. The span carries the request id, so every line logged while the
//! request is served (an error mapped to problem+json or a Status, a refusal, a
//! dependency warning) names it; the access line gives request id, method and route
//! (or RPC), status (grpc-status for gRPC, read from the trailers when the call
//! completes) and latency.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method, Response};
use axum::middleware::Next;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use metrics::SharedString;
use tracing::{Instrument, Span};

pub const REQUEST_ID: &str = "x-request-id";

pub async fn observe(mut req: Request, next: Next) -> Response<Body> {
    let start = Instant::now();
    let request_id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128 && v.is_ascii())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        req.headers_mut().insert(REQUEST_ID, v);
    }
    let is_grpc = super::is_grpc(req.headers());
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    // Bounded label sets, whatever the client sends: known methods (else "other"),
    // the matched route template or a known RPC (else "unmatched").
    let method_label = method_label(req.method());
    let route = if is_grpc {
        crate::grpc::known_rpc(&path).map(SharedString::const_str)
    } else {
        req.extensions()
            .get::<MatchedPath>()
            .map(|m| SharedString::from(m.as_str().to_owned()))
    }
    .unwrap_or(SharedString::const_str("unmatched"));

    // ERROR level so that the span is enabled at every LOG_LEVEL (production logs
    // warnings and errors only): its level says which lines it can carry, not a
    // severity of its own.
    let span = tracing::error_span!("request", request_id = %request_id);
    let mut res = next.run(req).instrument(span.clone()).await;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    let header_grpc_status = res
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let record = Record {
        start,
        request_id,
        method,
        method_label,
        path,
        route,
        status: res.status().as_u16(),
        is_grpc,
        grpc_status: header_grpc_status,
        done: false,
    };
    res.map(|body| {
        Body::new(ObservedBody {
            inner: body,
            record,
            span,
        })
    })
}

struct Record {
    start: Instant,
    request_id: String,
    method: String,
    method_label: &'static str,
    path: String,
    route: SharedString,
    status: u16,
    is_grpc: bool,
    grpc_status: Option<String>,
    done: bool,
}

impl Record {
    fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        let elapsed = self.start.elapsed();
        let latency_ms = elapsed.as_secs_f64() * 1000.0;
        if self.is_grpc {
            // No grpc-status at all means the stream was cut short.
            let grpc_status = self.grpc_status.as_deref().unwrap_or("cancelled");
            tracing::info!(
                request_id = %self.request_id,
                rpc = %self.path,
                status = self.status,
                grpc_status,
                latency_ms,
                "grpc request"
            );
            metrics::counter!("grpc_requests_total", "rpc" => self.route.clone(), "code" => grpc_status.to_owned()).increment(1);
            metrics::histogram!("grpc_request_duration_seconds", "rpc" => self.route.clone())
                .record(elapsed.as_secs_f64());
        } else {
            tracing::info!(
                request_id = %self.request_id,
                method = %self.method,
                path = %self.path,
                status = self.status,
                latency_ms,
                "http request"
            );
            metrics::counter!("http_requests_total", "method" => self.method_label, "route" => self.route.clone(), "status" => self.status.to_string()).increment(1);
            metrics::histogram!("http_request_duration_seconds", "method" => self.method_label, "route" => self.route.clone())
                .record(elapsed.as_secs_f64());
        }
    }
}

/// Standard methods by name; anything else (WebDAV verbs, made-up tokens) is one
/// label, so the method cannot grow the series count either.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// Passes the body through and finishes the record when the body ends (or is
/// dropped), so latency covers the whole response and gRPC trailers are seen.
struct ObservedBody {
    inner: Body,
    record: Record,
    /// Entered while the body is polled: a streaming RPC does its work there.
    span: Span,
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        self.record.finish();
    }
}

impl HttpBody for ObservedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = this
            .span
            .in_scope(|| Pin::new(&mut this.inner).poll_frame(cx));
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    if let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok()) {
                        this.record.grpc_status = Some(s.to_owned());
                    }
                }
            }
            Poll::Ready(None) => this.record.finish(),
            _ => {}
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

//! The HTTP `/metrics` endpoint: hyper's HTTP/1 server on the daemon's
//! runtime. A scraper can stall nothing else: connections beyond
//! `max-connections` are closed at once, a connection that has not sent
//! its headers within `timeout-ms` (slowloris) or not finished within it is
//! closed, a request body is never read, keep-alive is off (one request a
//! connection, so the deadline bounds each), and the answer is rendered
//! from a snapshot before a byte is written.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tracing::{debug, warn};

use super::exporter::ExporterEvent;
use crate::daemon::registry::Daemon;

/// The content type of the text exposition format.
pub(crate) const CONTENT_TYPE_0_0_4: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A scraper's request line and headers fit in this; more is refused.
const MAX_BUF: usize = 16 * 1024;

/// How the endpoint bounds its scrapers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Connections served at once.
    pub(crate) max_connections: usize,
    /// Header read timeout and whole-connection deadline.
    pub(crate) timeout: Duration,
}

/// Serves `listener` until the task is aborted.
pub(crate) async fn serve(listener: tokio::net::TcpListener, daemon: Arc<Daemon>, limits: Limits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if let Some(suppressed) = daemon.exporter_events.note(ExporterEvent::AcceptError) {
                    warn!(error = %e, suppressed, "metrics endpoint: accept failed");
                }
                // Out of descriptors, typically: give the others a moment.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            if let Some(suppressed) = daemon
                .exporter_events
                .note(ExporterEvent::TooManyConnections)
            {
                warn!(
                    max_connections = limits.max_connections,
                    suppressed, "metrics endpoint: a connection beyond max-connections was closed"
                );
            }
            drop(stream);
            continue;
        };
        let daemon = Arc::clone(&daemon);
        tokio::spawn(async move {
            let _permit = permit;
            let service = {
                let daemon = Arc::clone(&daemon);
                hyper::service::service_fn(move |request: Request<Incoming>| {
                    let response = respond(&daemon, &request);
                    async move { Ok::<_, Infallible>(response) }
                })
            };
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.timeout)
                .keep_alive(false)
                .max_buf_size(MAX_BUF)
                .serve_connection(TokioIo::new(stream), service);
            let event = match tokio::time::timeout(limits.timeout, connection).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) if e.is_timeout() => ExporterEvent::Timeout,
                Ok(Err(e)) => {
                    debug!(error = %e, "metrics endpoint: connection failed");
                    ExporterEvent::ConnectionError
                }
                Err(_) => ExporterEvent::Timeout,
            };
            if let Some(suppressed) = daemon.exporter_events.note(event) {
                warn!(
                    timeout = ?limits.timeout,
                    suppressed,
                    "metrics endpoint: a connection {}, closed",
                    if event == ExporterEvent::Timeout {
                        "did not complete its request in time"
                    } else {
                        "sent a malformed request or failed"
                    }
                );
            }
        });
    }
}

/// The answer to one request: the body is never read.
fn respond<B>(daemon: &Daemon, request: &Request<B>) -> Response<Full<Bytes>> {
    let (status, body) = if request.uri().path() != "/metrics" {
        (
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"not found: try /metrics\n"),
        )
    } else if request.method() == Method::GET || request.method() == Method::HEAD {
        (StatusCode::OK, Bytes::from(super::render(daemon)))
    } else {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            Bytes::from_static(b"only GET and HEAD\n"),
        )
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if status == StatusCode::OK {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_0_0_4));
    } else {
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

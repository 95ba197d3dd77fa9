//! The HTTP server and its limits: what one client can hold of an API process.
//!
//! - Connections: at most `api.max_connections` are served at once; the accept loop waits for a
//!   free slot, so further clients queue in the kernel's listen backlog instead of costing file
//!   descriptors.
//! - Headers: a client has `api.header_read_timeout_ms` to send a request's headers, and an idle
//!   keep-alive connection is closed after the same time (hyper's header-read timer runs whenever
//!   the connection waits for a request head).
//! - Bodies: a request body that sends nothing for `api.body_idle_timeout_ms` is cut; the handler
//!   sees a body error and removes what it stored, and the client gets 408
//!   `request_body_timeout`.
//! - Uploads: a tenant has at most `api.max_uploads_per_tenant` streaming uploads in flight on one
//!   process (429 `too_many_uploads` above it). The count is per API replica, in memory: a slot
//!   is a guard dropped with the request, whichever way it ends, so nothing can leak it.
//! - Everything else answers within `api.request_timeout_ms` (503 `request_timeout`), counted
//!   until the response headers, so downloads keep streaming past it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use sluice_core::config::ApiSettings;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::{TimeoutBody, TimeoutError};

use crate::auth::Tenant;
use crate::error::{ApiError, SHOULD_RETRY};
use crate::state::AppState;

/// A `POST /v1/batches` body up to this size (by `Content-Length`) is an ordinary request with a
/// deadline; a larger or chunked one is a streaming upload.
const SMALL_CREATE_BODY: u64 = 64 * 1024;
/// Pause after a failed `accept` (say, out of file descriptors) before trying again.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Serves `app` on `listener` until `shutdown`, then lets the requests in progress finish.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    settings: &ApiSettings,
    shutdown: CancellationToken,
) {
    warn_if_over_open_file_limit(settings.max_connections);
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(settings.header_read_timeout_ms));
    loop {
        // The slot comes first: while every slot is taken, new clients wait in the backlog.
        let slot = tokio::select! {
            () = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "Failed to accept a connection.");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "Could not set TCP_NODELAY.");
        }
        let connection = graceful.watch(
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone())),
        );
        tokio::spawn(async move {
            // Header timeouts and clients that hang up end here; neither is our failure.
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "Connection ended with an error.");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Descriptors the process needs beside client connections (Redis, the broker, storage, logs).
const OTHER_DESCRIPTORS: u64 = 128;

/// The cap only protects the process if it is below the open-file limit; say so at start if not.
fn warn_if_over_open_file_limit(max_connections: usize) {
    let Some(limit) = open_file_limit() else {
        return;
    };
    if max_connections as u64 + OTHER_DESCRIPTORS > limit {
        tracing::warn!(
            max_connections,
            open_file_limit = limit,
            "api.max_connections is close to or above the process's open-file limit; raise the \
             limit (ulimit -n) or lower api.max_connections, or connections may fail to be accepted."
        );
    }
}

/// The soft open-file limit (Linux), from `/proc/self/limits`.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    parse_open_file_limit(&limits)
}

fn parse_open_file_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Adds the per-request limits to the API's router.
pub(crate) fn with_limits(app: Router, state: &AppState) -> Router {
    let api = &state.settings.api;
    let limits = Limits {
        state: state.clone(),
        uploads: Arc::new(UploadSlots::new(api.max_uploads_per_tenant)),
        request_timeout: Duration::from_millis(api.request_timeout_ms),
        body_idle: Duration::from_millis(api.body_idle_timeout_ms),
    };
    let app = app.layer(middleware::from_fn_with_state(limits, limit_request));
    with_allowed_hosts(app, &api.allowed_hosts)
}

/// Adds the `api.allowed_hosts` check (outermost) when the list is not empty.
fn with_allowed_hosts(app: Router, allowed: &[String]) -> Router {
    if allowed.is_empty() {
        return app;
    }
    let hosts: Arc<[String]> = allowed.iter().map(|h| host_name(h)).collect();
    app.layer(middleware::from_fn_with_state(hosts, refuse_foreign_host))
}

/// With `api.allowed_hosts` set, a request naming another host (a DNS-rebound name, say) is
/// refused before anything else looks at it.
async fn refuse_foreign_host(
    State(hosts): State<Arc<[String]>>,
    request: Request,
    next: Next,
) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    if host.is_some_and(|h| host_allowed(&hosts, h)) {
        return next.run(request).await;
    }
    ApiError::Coded {
        status: StatusCode::FORBIDDEN,
        message: "This server does not answer requests for this host (api.allowed_hosts); \
                  use one of its allowed names, such as http://127.0.0.1."
            .into(),
        param: None,
        code: "host_not_allowed",
        errors: None,
    }
    .into_response()
}

/// Whether `host` (a `Host` header, port optional) is one of `allowed` (names from
/// [`host_name`]).
fn host_allowed(allowed: &[String], host: &str) -> bool {
    let name = host_name(host);
    allowed.contains(&name)
}

/// The host name of a `Host` value, lower-cased, without port or IPv6 brackets.
fn host_name(host: &str) -> String {
    let host = host.trim();
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        // A bare IPv6 address has several colons and no port.
        None if host.matches(':').count() > 1 => host,
        None => host.split(':').next().unwrap_or(host),
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[derive(Clone)]
struct Limits {
    state: AppState,
    uploads: Arc<UploadSlots>,
    request_timeout: Duration,
    body_idle: Duration,
}

async fn limit_request(State(limits): State<Limits>, request: Request, next: Next) -> Response {
    let upload = is_streaming_upload(&request);
    let (mut parts, body) = request.into_parts();
    // An unauthenticated upload takes no slot: the handler answers it 401 before reading.
    let tenant = if upload {
        Tenant::from_request_parts(&mut parts, &limits.state)
            .await
            .ok()
    } else {
        None
    };
    let _slot = match tenant {
        Some(tenant) => match limits.uploads.acquire(tenant.id()) {
            Some(slot) => Some(slot),
            None => return too_many_uploads(limits.uploads.max),
        },
        None => None,
    };
    let stalled = Arc::new(AtomicBool::new(false));
    let flag = stalled.clone();
    let body = TimeoutBody::new(limits.body_idle, body).map_err(move |e| {
        if e.is::<TimeoutError>() {
            flag.store(true, Ordering::Relaxed);
        }
        e
    });
    let request = Request::from_parts(parts, Body::new(body));
    let response = if upload {
        next.run(request).await
    } else {
        match tokio::time::timeout(limits.request_timeout, next.run(request)).await {
            Ok(response) => response,
            Err(_) => return request_timeout(limits.request_timeout),
        }
    };
    if stalled.load(Ordering::Relaxed) {
        return body_timeout(limits.body_idle);
    }
    response
}

/// `POST /v1/files`, a `POST /v1/batches` whose body is chunked or larger than a small JSON
/// object, and `POST /v1/batches/{id}/retry`: requests that legitimately take as long as their
/// data takes to arrive or to copy.
fn is_streaming_upload(request: &Request) -> bool {
    if request.method() != Method::POST {
        return false;
    }
    match request.uri().path() {
        "/v1/files" => true,
        // A retry copies a batch's lines into a new file: as long as an upload of them.
        path if path.starts_with("/v1/batches/") && path.ends_with("/retry") => true,
        "/v1/batches" => request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_none_or(|len| len > SMALL_CREATE_BODY),
        _ => false,
    }
}

fn too_many_uploads(max: usize) -> Response {
    ApiError::Coded {
        status: StatusCode::TOO_MANY_REQUESTS,
        message: format!(
            "You have {max} uploads in progress on this server (the limit is \
             api.max_uploads_per_tenant = {max}); wait for one to finish before starting another."
        ),
        param: None,
        code: "too_many_uploads",
        errors: None,
    }
    .into_response()
}

fn body_timeout(idle: Duration) -> Response {
    let mut response = ApiError::Coded {
        status: StatusCode::REQUEST_TIMEOUT,
        message: format!(
            "The request body stopped arriving: nothing was received for {} ms \
             (api.body_idle_timeout_ms). Nothing was stored.",
            idle.as_millis()
        ),
        param: None,
        code: "request_body_timeout",
        errors: None,
    }
    .into_response();
    // The rest of the body is unread, so the connection cannot carry another request.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn request_timeout(limit: Duration) -> Response {
    let mut response = ApiError::Coded {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!(
            "The server did not answer within {} ms (api.request_timeout_ms); try again.",
            limit.as_millis()
        ),
        param: None,
        code: "request_timeout",
        errors: None,
    }
    .into_response();
    // A slow answer is not a deterministic one: let the SDKs retry it.
    response.headers_mut().remove(SHOULD_RETRY);
    response
}

/// Streaming uploads in flight per tenant on this process.
struct UploadSlots {
    max: usize,
    in_flight: Mutex<HashMap<String, usize>>,
}

impl UploadSlots {
    fn new(max: usize) -> Self {
        Self {
            max,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more upload of `tenant`, or `None` at the limit.
    fn acquire(self: &Arc<Self>, tenant: &str) -> Option<UploadSlot> {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let count = in_flight.entry(tenant.to_owned()).or_default();
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(UploadSlot {
            slots: self.clone(),
            tenant: tenant.to_owned(),
        })
    }

    #[cfg(test)]
    fn in_flight(&self, tenant: &str) -> usize {
        let in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        in_flight.get(tenant).copied().unwrap_or(0)
    }
}

/// One upload's slot, given back when dropped.
struct UploadSlot {
    slots: Arc<UploadSlots>,
    tenant: String,
}

impl Drop for UploadSlot {
    fn drop(&mut self) {
        let mut in_flight = self
            .slots
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = in_flight.get_mut(&self.tenant) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                // Tenants without uploads take no memory.
                in_flight.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    async fn status_and_code(app: &Router, host: &str) -> (StatusCode, Value) {
        use tower::ServiceExt;
        let request = Request::get("/ping")
            .header(header::HOST, host)
            .body(Body::empty())
            .unwrap();
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn allowed_hosts_refuse_any_other_host_in_the_envelope() {
        let loopback = ["localhost", "127.0.0.1", "[::1]"].map(String::from);
        let app = with_allowed_hosts(
            Router::new().route("/ping", axum::routing::get(|| async { "pong" })),
            &loopback,
        );
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1",
        ] {
            let (status, body) = status_and_code(&app, host).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{host}");
            let error = &body["error"];
            assert_eq!(error["code"], "host_not_allowed", "{host}: {body}");
            assert_eq!(error["type"], "invalid_request_error", "{body}");
            assert!(
                error["message"].is_string() && error.get("param").is_some(),
                "{body}"
            );
        }
        for host in [
            "127.0.0.1:8080",
            "localhost",
            "LOCALHOST:1",
            "[::1]:8080",
            "127.0.0.1",
        ] {
            assert_eq!(
                status_and_code(&app, host).await.0,
                StatusCode::OK,
                "{host}"
            );
        }
        // Empty: any host.
        let open = with_allowed_hosts(
            Router::new().route("/ping", axum::routing::get(|| async { "pong" })),
            &[],
        );
        assert_eq!(
            status_and_code(&open, "evil.example").await.0,
            StatusCode::OK
        );
    }

    #[test]
    fn upload_slots_are_per_tenant_and_given_back_on_drop() {
        let slots = Arc::new(UploadSlots::new(2));
        let a1 = slots.acquire("a").unwrap();
        let _a2 = slots.acquire("a").unwrap();
        assert!(slots.acquire("a").is_none());
        let _b1 = slots.acquire("b").unwrap();
        drop(a1);
        assert_eq!(slots.in_flight("a"), 1);
        let _a3 = slots.acquire("a").unwrap();
        drop(_b1);
        assert_eq!(slots.in_flight("b"), 0);
        assert!(!slots.in_flight.lock().unwrap().contains_key("b"));
    }

    #[test]
    fn the_open_file_limit_is_read_from_proc() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_open_file_limit(limits), Some(1024));
        assert_eq!(
            parse_open_file_limit("Max open files  unlimited  unlimited  files"),
            None
        );
        assert!(open_file_limit().is_some_and(|n| n > 0));
    }

    fn post(path: &str, length: Option<u64>) -> Request {
        let mut builder = Request::builder().method(Method::POST).uri(path);
        if let Some(len) = length {
            builder = builder.header(header::CONTENT_LENGTH, len);
        }
        builder.body(Body::empty()).unwrap()
    }

    #[test]
    fn uploads_are_told_from_ordinary_requests() {
        assert!(is_streaming_upload(&post("/v1/files", Some(10))));
        assert!(is_streaming_upload(&post("/v1/batches", None)));
        assert!(is_streaming_upload(&post("/v1/batches", Some(1 << 20))));
        assert!(!is_streaming_upload(&post("/v1/batches", Some(300))));
        assert!(!is_streaming_upload(&post("/v1/batches/b/cancel", None)));
        assert!(is_streaming_upload(&post("/v1/batches/b/retry", Some(2))));
        let get = Request::builder()
            .uri("/v1/files")
            .body(Body::empty())
            .unwrap();
        assert!(!is_streaming_upload(&get));
    }
}

//! An HTTP proxy in front of a Sluice API that loses answers on purpose: the first request
//! carrying a given [`LOSE_FIRST`] tag reaches the API, but its answer is held back until the
//! client sends the next request with that tag (its retry, once it gave up waiting), and is then
//! dropped. Every other request is passed through. The client sees exactly what a lost or slow
//! answer looks like; the API sees both attempts.
//!
//! Each exchange is recorded (what the API answered, and whether the client got it), so a test can
//! tell what the lost attempt had created.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Request header naming the attempt group whose first answer is lost.
pub const LOSE_FIRST: &str = "x-test-lose-first";

/// Largest request body the proxy relays (it holds each one whole).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// One request relayed to the API.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    /// Its [`LOSE_FIRST`] tag.
    pub tag: Option<String>,
    pub idempotency_key: Option<String>,
    pub content_type: Option<String>,
    /// What the API answered.
    pub status: u16,
    pub body: String,
    /// Whether the API's answer carried `idempotent-replayed: true`.
    pub replayed: bool,
    /// Whether the proxy kept the answer from the client.
    pub lost: bool,
}

#[derive(Default)]
struct Inner {
    upstream: String,
    client: reqwest::Client,
    exchanges: Mutex<Vec<Exchange>>,
    lost_tags: Mutex<HashSet<String>>,
    retried: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Inner {
    fn retried(&self, tag: &str) -> Arc<Notify> {
        self.retried
            .lock()
            .unwrap()
            .entry(tag.to_owned())
            .or_default()
            .clone()
    }
}

/// A running proxy.
pub struct LossyProxy {
    /// The proxy's base URL, ending in `/v1` like [`crate::TestApp::base`].
    pub base: String,
    inner: Arc<Inner>,
}

impl LossyProxy {
    /// Starts a proxy to `api_base` (a base URL ending in `/v1`) until `stop`.
    pub async fn start(api_base: &str, stop: CancellationToken) -> Self {
        let inner = Arc::new(Inner {
            upstream: api_base.trim_end_matches("/v1").to_owned(),
            ..Inner::default()
        });
        let app = axum::Router::new()
            .fallback(relay)
            .with_state(inner.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy binds");
        let addr = listener.local_addr().expect("proxy address");
        // No graceful shutdown: a held answer whose retry never came would wait for ever.
        tokio::spawn(async move {
            tokio::select! {
                _ = axum::serve(listener, app) => {}
                () = stop.cancelled() => {}
            }
        });
        Self {
            base: format!("http://{addr}/v1"),
            inner,
        }
    }

    /// Every exchange so far, in the order the API answered them.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.inner.exchanges.lock().unwrap().clone()
    }

    /// The exchanges of one tag.
    pub fn tagged(&self, tag: &str) -> Vec<Exchange> {
        self.exchanges()
            .into_iter()
            .filter(|e| e.tag.as_deref() == Some(tag))
            .collect()
    }
}

async fn relay(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let header_text = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let tag = header_text(LOSE_FIRST);
    let first = tag
        .as_ref()
        .is_some_and(|t| inner.lost_tags.lock().unwrap().insert(t.clone()));
    // A retry lets the held first answer of its group go (to nobody: its client gave up). The
    // permit is kept if the first attempt is not waiting yet.
    if let Some(tag) = &tag
        && !first
    {
        inner.retried(tag).notify_one();
    }
    let Ok(bytes) = to_bytes(body, MAX_BODY).await else {
        return (StatusCode::BAD_GATEWAY, "the proxy could not read the body").into_response();
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut forward = inner
        .client
        .request(parts.method.clone(), format!("{}{path}", inner.upstream));
    for (name, value) in &parts.headers {
        if ![
            header::HOST,
            header::CONTENT_LENGTH,
            header::CONNECTION,
            header::TRANSFER_ENCODING,
        ]
        .contains(name)
        {
            forward = forward.header(name, value);
        }
    }
    let answer = match forward.body(bytes).send().await {
        Ok(answer) => answer,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = answer.status();
    let headers = answer.headers().clone();
    let body = answer.bytes().await.unwrap_or_default();
    let lost = first;
    inner.exchanges.lock().unwrap().push(Exchange {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        tag: tag.clone(),
        idempotency_key: header_text("idempotency-key"),
        content_type: header_text("content-type"),
        status: status.as_u16(),
        body: String::from_utf8_lossy(&body).into_owned(),
        replayed: headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true"),
        lost,
    });
    if lost && let Some(tag) = &tag {
        inner.retried(tag).notified().await;
        return (StatusCode::GATEWAY_TIMEOUT, "answer lost on purpose").into_response();
    }
    let mut response = Response::builder().status(status);
    for (name, value) in &headers {
        if name != header::TRANSFER_ENCODING && name != header::CONNECTION {
            response = response.header(HeaderName::from(name), value);
        }
    }
    response
        .body(Body::from(body))
        .unwrap_or_else(|e| (StatusCode::BAD_GATEWAY, e.to_string()).into_response())
}

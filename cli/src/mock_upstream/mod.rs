//! Mock OpenAI-compatible upstream.
//!
//! A small, dependency-light model server that speaks enough of the OpenAI
//! HTTP API for Sluice's demo, integration tests and benchmarks:
//! `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`,
//! `/v1/responses`, `/v1/moderations` and `GET /v1/models`. Answers are
//! deterministic functions of the request (an "echo" of the last user text,
//! hash-derived embeddings) so tests can assert on them without a real model.
//!
//! Two layers of fault injection exist:
//!
//! * **Global** ([`MockConfig`]): fixed latency plus jitter, and a random
//!   (seeded) fraction of calls answered with an error status. Used by the
//!   benchmarks to simulate a slow or flaky provider.
//! * **Per request**: a request body may carry a `"mock": {...}` object (the
//!   tests put it in their JSONL lines, and Sluice forwards bodies verbatim).
//!   It can fail the first `times` attempts of a line with a given status,
//!   add `Retry-After` headers, delay, answer garbage, a body nested `deep` levels, redirect or hang.
//!   Attempts are counted per `mock.key`, which is what lets a test script
//!   "503, 503, then 200" for one line while other lines succeed.
//!
//! Every call to a model endpoint is recorded at arrival (before any delay or
//! fault) in [`MockStats`], readable in-process via [`MockUpstream::stats`]
//! or over HTTP at `GET /mock/stats`; `POST /mock/reset` clears it.
//!
//! Bodies are validated leniently on purpose: only "not JSON" and "not a JSON
//! object" are rejected (400). Missing fields produce empty-but-well-formed
//! answers, so tests that send minimal lines do not trip over validation the
//! real provider would do.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use answers::{
    chat_answer, completion_answer, embedding_answer, moderation_answer, responses_answer, unix_ms,
    usage,
};
use directives::Directives;

mod answers;
mod directives;

/// Name reported by `GET /v1/models` and used when a request names no model.
pub const MOCK_MODEL: &str = "mock-model";

/// Answer text is the last user message truncated to this many characters.
const ECHO_MAX_CHARS: usize = 200;
/// Embedding width when the request does not ask for `dimensions`.
const DEFAULT_EMBEDDING_DIMS: usize = 8;
/// Upper bound for a requested `dimensions`, so a typo cannot make the mock
/// allocate gigabytes.
const MAX_EMBEDDING_DIMS: usize = 4096;
/// Deepest body a `"deep": n` directive answers.
const MAX_DEEP: u64 = 100_000;
/// How long a `"hang": true` request sleeps. Effectively forever for a test;
/// shutdown interrupts it anyway.
const HANG_FOR: Duration = Duration::from_secs(24 * 3600);
/// Batch lines can be large (long prompts, many embedding inputs); axum's
/// 2 MiB default would turn them into spurious 413s.
const MAX_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Where `"redirect": true` points: a port nothing listens on, so a client
/// that wrongly follows redirects fails loudly instead of succeeding.
const REDIRECT_TARGET: &str = "http://127.0.0.1:1/";

/// Global behaviour of the mock, applied to every model call.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MockConfig {
    /// Added latency per call, milliseconds (default 0 = instant).
    pub latency_ms: u64,
    /// Random jitter added on top, 0..=jitter_ms.
    pub jitter_ms: u64,
    /// Fraction 0.0..=1.0 of calls answered with `fail_status` (random, seeded by `seed`).
    pub fail_rate: f64,
    /// Status of the random failures; 0 (the `Default`) means 500.
    pub fail_status: u16,
    /// When fail_status is 429, the Retry-After seconds sent (None = no header).
    pub retry_after_secs: Option<u64>,
    /// Seed of the random generator behind jitter and `fail_rate`, so a
    /// benchmark run is reproducible (given the same call order).
    pub seed: u64,
}

/// What the mock received, for assertions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MockStats {
    /// Number of model calls (every `POST /v1/...`), including failed ones.
    pub calls: u64,
    /// Unix milliseconds of each call, per `mock.key`. Calls without a key
    /// only count in `calls`.
    pub per_key: HashMap<String, Vec<u64>>,
    /// Unix milliseconds of every call, in arrival order (rate measurements).
    pub times: Vec<u64>,
    /// `(unix ms, usage.total_tokens)` of every successful answer.
    pub tokens: Vec<(u64, u64)>,
}

/// The mock server. Cloning is cheap and clones share stats and the RNG.
#[derive(Debug, Clone)]
pub struct MockUpstream {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: MockConfig,
    state: Mutex<Recorded>,
    /// While set, every model call is answered with this status (an outage switched at runtime).
    outage: Mutex<Option<u16>>,
}

/// Everything mutable, behind one lock: it is held only for a few
/// instructions and never across an `.await`.
#[derive(Debug)]
struct Recorded {
    stats: MockStats,
    /// Attempts per key, including the key-less "" bucket, which `per_key`
    /// deliberately does not track.
    attempts: HashMap<String, u64>,
    rng: StdRng,
}

impl Recorded {
    fn new(seed: u64) -> Self {
        Self {
            stats: MockStats::default(),
            attempts: HashMap::new(),
            rng: StdRng::seed_from_u64(seed),
        }
    }
}

/// Decisions taken at arrival for one call.
struct Arrival {
    /// 1-based attempt number for the call's key.
    attempt: u64,
    /// Global latency + jitter to sleep.
    global_delay: Duration,
    /// Whether the global `fail_rate` picked this call.
    global_fail: bool,
}

impl MockUpstream {
    /// A mock upstream answering as `config` says; serve it with [`MockUpstream::serve`].
    pub fn new(config: MockConfig) -> Self {
        let state = Mutex::new(Recorded::new(config.seed));
        Self {
            inner: Arc::new(Inner {
                config,
                state,
                outage: Mutex::new(None),
            }),
        }
    }

    /// Serves on an already-bound listener until `shutdown` is cancelled.
    ///
    /// In-flight delayed or hanging requests are cut short (503) on shutdown
    /// so that the graceful shutdown does not wait for them.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let app = self.router(shutdown.clone());
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    }

    /// Binds 127.0.0.1:0, spawns serve on a task, returns the base URL `http://127.0.0.1:PORT/v1`.
    pub async fn spawn(self, shutdown: CancellationToken) -> std::io::Result<String> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            if let Err(err) = self.serve(listener, shutdown).await {
                tracing::error!(%addr, error = %err, "mock upstream stopped with an error");
            }
        });
        Ok(format!("http://{addr}/v1"))
    }

    /// Snapshot of what it received.
    pub fn stats(&self) -> MockStats {
        self.inner.lock().stats.clone()
    }

    /// Answers every model call with `status` from now on (`None` ends the outage).
    pub fn set_outage(&self, status: Option<u16>) {
        *self
            .inner
            .outage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = status;
    }

    /// Clears stats and attempt counters and re-seeds the RNG, as
    /// `POST /mock/reset` does.
    pub fn reset(&self) {
        *self.inner.lock() = Recorded::new(self.inner.config.seed);
    }

    fn router(&self, shutdown: CancellationToken) -> Router {
        let app = App {
            mock: self.clone(),
            shutdown,
        };
        Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/completions", post(completions))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/responses", post(responses))
            .route("/v1/moderations", post(moderations))
            .route("/v1/models", get(models))
            .route("/mock/stats", get(stats))
            .route("/mock/reset", post(reset))
            .fallback(not_found)
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            // Outermost, so 404s and body-limit rejections get an id too.
            .layer(axum::middleware::map_response(add_request_id))
            .with_state(app)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Recorded> {
        // A panic while holding the lock cannot leave the stats
        // inconsistent in a way that matters for a mock; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records the call and draws its random decisions in one go, so the
    /// RNG sequence depends only on the order of arrivals.
    fn arrive(&self, key: &str) -> Arrival {
        let cfg = &self.config;
        let mut st = self.lock();
        st.stats.calls += 1;
        st.stats.times.push(unix_ms());
        if !key.is_empty() {
            st.stats
                .per_key
                .entry(key.to_owned())
                .or_default()
                .push(unix_ms());
        }
        let attempt = {
            let n = st.attempts.entry(key.to_owned()).or_insert(0);
            *n += 1;
            *n
        };
        let jitter = if cfg.jitter_ms > 0 {
            st.rng.random_range(0..=cfg.jitter_ms)
        } else {
            0
        };
        let rate = if cfg.fail_rate.is_nan() {
            0.0
        } else {
            cfg.fail_rate.clamp(0.0, 1.0)
        };
        let global_fail = rate > 0.0 && st.rng.random_bool(rate);
        Arrival {
            attempt,
            global_delay: Duration::from_millis(cfg.latency_ms.saturating_add(jitter)),
            global_fail,
        }
    }
}

#[derive(Clone)]
struct App {
    mock: MockUpstream,
    shutdown: CancellationToken,
}

#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Responses,
    Moderations,
}

async fn chat_completions(State(app): State<App>, body: Bytes) -> Response {
    app.handle(Endpoint::Chat, body).await
}

async fn completions(State(app): State<App>, body: Bytes) -> Response {
    app.handle(Endpoint::Completions, body).await
}

async fn embeddings(State(app): State<App>, body: Bytes) -> Response {
    app.handle(Endpoint::Embeddings, body).await
}

async fn responses(State(app): State<App>, body: Bytes) -> Response {
    app.handle(Endpoint::Responses, body).await
}

async fn moderations(State(app): State<App>, body: Bytes) -> Response {
    app.handle(Endpoint::Moderations, body).await
}

async fn models() -> Response {
    Json(json!({
        "object": "list",
        "data": [{"id": MOCK_MODEL, "object": "model", "created": 0, "owned_by": "sluice"}],
    }))
    .into_response()
}

async fn stats(State(app): State<App>) -> Response {
    Json(app.mock.stats()).into_response()
}

async fn reset(State(app): State<App>) -> Response {
    app.mock.reset();
    StatusCode::NO_CONTENT.into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("Invalid URL ({method} {})", uri.path()),
        "invalid_request_error",
        None,
    )
}

async fn add_request_id(mut res: Response) -> Response {
    let id = format!("req_{}", uuid::Uuid::new_v4().simple());
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().entry("x-request-id").or_insert(v);
    }
    res
}

impl App {
    async fn handle(&self, endpoint: Endpoint, raw: Bytes) -> Response {
        let parsed: Result<Value, _> = serde_json::from_slice(&raw);
        let d = parsed
            .as_ref()
            .map(Directives::from_body)
            .unwrap_or_default();
        // Recorded before any sleep or fault: tests measure retry spacing
        // from these timestamps, so they must reflect arrival time.
        let arrival = self.mock.inner.arrive(&d.key);
        tracing::debug!(?endpoint, key = %d.key, attempt = arrival.attempt, "mock upstream call");

        if !self.sleep(arrival.global_delay).await {
            return shutting_down();
        }
        if let Some(ms) = d.delay_ms
            && !self.sleep(Duration::from_millis(ms)).await
        {
            return shutting_down();
        }

        let body = match parsed {
            Ok(Value::Object(map)) => map,
            Ok(_) => {
                return invalid_request("The request body must be a JSON object.");
            }
            Err(err) => {
                return invalid_request(&format!(
                    "We could not parse the JSON body of your request. ({err})"
                ));
            }
        };

        let outage = *self
            .mock
            .inner
            .outage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut res = match outage.and_then(|c| StatusCode::from_u16(c).ok()) {
            Some(status) => injected_status(status),
            None => self.fault_or_answer(endpoint, &body, &d, &arrival).await,
        };
        if d.times.is_none_or(|t| arrival.attempt <= t) {
            for (k, v) in &d.headers {
                if let (Ok(name), Ok(value)) = (
                    header::HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    res.headers_mut().insert(name, value);
                }
            }
        }
        // Lets a test see which attempt produced an answer.
        res.headers_mut()
            .insert("x-mock-attempt", HeaderValue::from(arrival.attempt));
        res
    }

    async fn fault_or_answer(
        &self,
        endpoint: Endpoint,
        body: &Map<String, Value>,
        d: &Directives,
        arrival: &Arrival,
    ) -> Response {
        let faulting = d.times.is_none_or(|t| arrival.attempt <= t);
        if faulting {
            if d.hang {
                self.sleep(HANG_FOR).await;
                return shutting_down();
            }
            if let Some(depth) = d.deep {
                let status = d
                    .status
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .unwrap_or(StatusCode::OK);
                let depth = usize::try_from(depth).unwrap_or(0);
                let body = format!(
                    "{{\"error\":{{\"message\":\"deep\",\"detail\":{}0{}}}}}",
                    "[".repeat(depth),
                    "]".repeat(depth)
                );
                return (status, [(header::CONTENT_TYPE, "application/json")], body)
                    .into_response();
            }
            if let Some(code) = d.status {
                let status =
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                // A 2xx "failure" is simply a normal answer.
                if !status.is_success() {
                    let mut res = injected_status(status);
                    let h = res.headers_mut();
                    if let Some(secs) = d.retry_after {
                        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
                    }
                    if let Some(ms) = d.retry_after_ms {
                        h.insert("retry-after-ms", HeaderValue::from(ms));
                    }
                    return res;
                }
            }
        }

        if arrival.global_fail {
            let cfg = &self.mock.inner.config;
            let status = match cfg.fail_status {
                0 => StatusCode::INTERNAL_SERVER_ERROR,
                s => StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            };
            let mut res = injected_status(status);
            if status == StatusCode::TOO_MANY_REQUESTS
                && let Some(secs) = cfg.retry_after_secs
            {
                res.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            return res;
        }

        if faulting && d.garbage {
            return (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "text/html")],
                "<html>oops</html>",
            )
                .into_response();
        }
        if faulting && d.redirect {
            return (StatusCode::FOUND, [(header::LOCATION, REDIRECT_TARGET)]).into_response();
        }

        let mut answer = match endpoint {
            Endpoint::Chat => chat_answer(body),
            Endpoint::Completions => completion_answer(body),
            Endpoint::Embeddings => embedding_answer(body),
            Endpoint::Responses => responses_answer(body),
            Endpoint::Moderations => moderation_answer(body),
        };
        if let Some(n) = d.usage_tokens {
            answer["usage"] = usage(n / 2, n - n / 2);
        }
        if let Some(total) = answer
            .pointer("/usage/total_tokens")
            .and_then(Value::as_u64)
        {
            self.mock.inner.lock().stats.tokens.push((unix_ms(), total));
        }
        Json(answer).into_response()
    }

    /// Sleeps unless shutdown comes first; returns false if interrupted.
    async fn sleep(&self, d: Duration) -> bool {
        if d.is_zero() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = self.shutdown.cancelled() => false,
        }
    }
}

fn shutting_down() -> Response {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "The mock upstream is shutting down.",
        "server_error",
        None,
    )
}

fn invalid_request(message: &str) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        None,
    )
}

/// An error answer shaped like the one OpenAI sends for `status`.
fn injected_status(status: StatusCode) -> Response {
    let (message, kind, code) = match status.as_u16() {
        400 => ("Invalid request.", "invalid_request_error", None),
        401 => (
            "Incorrect API key provided.",
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        403 => (
            "You are not allowed to sample from this model.",
            "permission_error",
            None,
        ),
        404 => (
            "The model does not exist or you do not have access to it.",
            "invalid_request_error",
            Some("model_not_found"),
        ),
        408 => ("Request timed out.", "timeout_error", None),
        409 => ("Conflict.", "invalid_request_error", None),
        413 => ("Request too large.", "invalid_request_error", None),
        422 => ("Unprocessable entity.", "invalid_request_error", None),
        429 => (
            "Rate limit reached for requests. Please try again later.",
            "requests",
            Some("rate_limit_exceeded"),
        ),
        500 => (
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        ),
        502 => ("Bad gateway.", "server_error", None),
        503 => (
            "The engine is currently overloaded, please try again later.",
            "server_error",
            None,
        ),
        504 => ("Gateway timeout.", "server_error", None),
        s if (400..500).contains(&s) => ("Request rejected.", "invalid_request_error", None),
        s if s >= 500 => ("Upstream error.", "server_error", None),
        // 1xx/3xx make no sense as failures; send the bare status.
        _ => return status.into_response(),
    };
    let message = format!("{message} [mock upstream: injected {}]", status.as_u16());
    error_response(status, &message, kind, code)
}

/// The OpenAI error envelope.
fn error_response(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let body = json!({
        "error": {"message": message, "type": kind, "param": null, "code": code},
    });
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests;

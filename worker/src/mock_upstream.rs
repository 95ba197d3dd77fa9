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
//!   add `Retry-After` headers, delay, answer garbage, redirect or hang.
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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// Name reported by `GET /v1/models` and used when a request names no model.
pub const MOCK_MODEL: &str = "mock-model";

/// Answer text is the last user message truncated to this many characters.
const ECHO_MAX_CHARS: usize = 200;
/// Embedding width when the request does not ask for `dimensions`.
const DEFAULT_EMBEDDING_DIMS: usize = 8;
/// Upper bound for a requested `dimensions`, so a typo cannot make the mock
/// allocate gigabytes.
const MAX_EMBEDDING_DIMS: usize = 4096;
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

/// The per-request `"mock": {...}` directives.
#[derive(Debug, Default)]
struct Directives {
    key: String,
    status: Option<u16>,
    /// Bounds every fault of the line (status, garbage, redirect, hang) to
    /// the first `times` attempts; `None` = every attempt.
    times: Option<u64>,
    retry_after: Option<u64>,
    retry_after_ms: Option<u64>,
    delay_ms: Option<u64>,
    garbage: bool,
    redirect: bool,
    hang: bool,
    /// Extra response headers while faulting (e.g. `x-ratelimit-remaining-requests`).
    headers: Vec<(String, String)>,
    /// `usage.total_tokens` to report on a successful answer (token-limit tests).
    usage_tokens: Option<u64>,
}

impl Directives {
    fn from_body(body: &Value) -> Self {
        let Some(m) = body.get("mock").and_then(Value::as_object) else {
            return Self::default();
        };
        let uint = |name: &str| m.get(name).and_then(Value::as_u64);
        let flag = |name: &str| m.get(name).and_then(Value::as_bool).unwrap_or(false);
        let key = match m.get("key") {
            Some(Value::String(s)) => s.clone(),
            // Tolerate numeric keys (`"key": 7`) rather than silently
            // dropping them into the key-less bucket.
            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            _ => String::new(),
        };
        Self {
            key,
            status: uint("status").map(|s| u16::try_from(s).unwrap_or(u16::MAX)),
            times: uint("times"),
            retry_after: uint("retry_after"),
            retry_after_ms: uint("retry_after_ms"),
            delay_ms: uint("delay_ms"),
            garbage: flag("garbage"),
            redirect: flag("redirect"),
            hang: flag("hang"),
            usage_tokens: uint("usage_tokens"),
            headers: m
                .get("headers")
                .and_then(Value::as_object)
                .map(|h| {
                    h.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
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

fn chat_answer(body: &Map<String, Value>) -> Value {
    let messages: &[Value] = body
        .get("messages")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let prompt_tokens = messages
        .iter()
        .map(|m| words(&content_text(m.get("content"))))
        .sum::<u64>()
        .max(1);
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .or(messages.last());
    let answer = crate::mock_tasks::task_answer(messages, |m| content_text(m.get("content")))
        .unwrap_or_else(|| echo(&content_text(last_user.and_then(|m| m.get("content")))));
    let completion_tokens = words(&answer);
    json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": unix_secs(),
        "model": model_of(body),
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer, "refusal": null},
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": "fp_mock",
    })
}

fn completion_answer(body: &Map<String, Value>) -> Value {
    let mut prompts = input_texts(body.get("prompt"));
    if prompts.is_empty() {
        prompts.push(String::new());
    }
    let prompt_tokens = prompts.iter().map(|p| words(p)).sum::<u64>().max(1);
    let mut completion_tokens = 0;
    let choices: Vec<Value> = prompts
        .iter()
        .enumerate()
        .map(|(index, p)| {
            let text = echo(p);
            completion_tokens += words(&text);
            json!({"text": text, "index": index, "logprobs": null, "finish_reason": "stop"})
        })
        .collect();
    json!({
        "id": format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "text_completion",
        "created": unix_secs(),
        "model": model_of(body),
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    })
}

fn embedding_answer(body: &Map<String, Value>) -> Value {
    let inputs = input_texts(body.get("input"));
    let dims = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .and_then(|d| usize::try_from(d).ok())
        .filter(|d| *d > 0)
        .map_or(DEFAULT_EMBEDDING_DIMS, |d| d.min(MAX_EMBEDDING_DIMS));
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let v = embed(text, dims);
            let embedding = if base64 {
                // Same wire format as OpenAI: little-endian f32s, base64.
                let raw: Vec<u8> = v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
                Value::String(base64_encode(&raw))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens = inputs.iter().map(|t| words(t)).sum::<u64>().max(1);
    json!({
        "object": "list",
        "data": data,
        "model": model_of(body),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}

fn responses_answer(body: &Map<String, Value>) -> Value {
    let instructions = body.get("instructions").and_then(Value::as_str);
    let (input_words, last_user) = match body.get("input") {
        Some(Value::String(s)) => (words(s), s.clone()),
        Some(Value::Array(items)) => {
            let total = items
                .iter()
                .map(|i| words(&content_text(i.get("content"))))
                .sum::<u64>();
            let last = items
                .iter()
                .rev()
                .find(|i| i.get("role").and_then(Value::as_str) == Some("user"))
                .or(items.last())
                .map(|i| content_text(i.get("content")))
                .unwrap_or_default();
            (total, last)
        }
        _ => (0, String::new()),
    };
    let input_tokens = (input_words + instructions.map_or(0, words)).max(1);
    let answer = echo(&last_user);
    let output_tokens = words(&answer);
    json!({
        "id": format!("resp_{}", uuid::Uuid::new_v4().simple()),
        "object": "response",
        "created_at": unix_secs(),
        "status": "completed",
        "error": null,
        "incomplete_details": null,
        "instructions": instructions,
        "model": model_of(body),
        "output": [{
            "type": "message",
            "id": format!("msg_{}", uuid::Uuid::new_v4().simple()),
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": answer, "annotations": []}],
        }],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
        },
    })
}

fn moderation_answer(body: &Map<String, Value>) -> Value {
    const CATEGORIES: [&str; 13] = [
        "harassment",
        "harassment/threatening",
        "hate",
        "hate/threatening",
        "illicit",
        "illicit/violent",
        "self-harm",
        "self-harm/intent",
        "self-harm/instructions",
        "sexual",
        "sexual/minors",
        "violence",
        "violence/graphic",
    ];
    let categories: Map<String, Value> = CATEGORIES
        .iter()
        .map(|c| ((*c).to_owned(), json!(false)))
        .collect();
    let scores: Map<String, Value> = CATEGORIES
        .iter()
        .map(|c| ((*c).to_owned(), json!(0.0)))
        .collect();
    let count = input_texts(body.get("input")).len().max(1);
    let result = json!({"flagged": false, "categories": categories, "category_scores": scores});
    json!({
        "id": format!("modr-{}", uuid::Uuid::new_v4().simple()),
        "model": body.get("model").and_then(Value::as_str).unwrap_or("omni-moderation-latest"),
        "results": vec![result; count],
    })
}

fn model_of(body: &Map<String, Value>) -> &str {
    body.get("model")
        .and_then(Value::as_str)
        .unwrap_or(MOCK_MODEL)
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn echo(text: &str) -> String {
    let truncated: String = text.chars().take(ECHO_MAX_CHARS).collect();
    format!("echo: {truncated}")
}

/// Rough token count: whitespace-separated words.
fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Text of a message `content`: a string, or the `text` of its parts
/// (chat `{"type":"text"}`, responses `{"type":"input_text"}`).
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The inputs of `prompt` / `input`: a string, an array of strings, a token
/// array (one input), an array of token arrays, or an array of multimodal
/// parts (one input).
fn input_texts(value: Option<&Value>) -> Vec<String> {
    fn tokens(items: &[Value]) -> String {
        items
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    }
    match value {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.is_empty() => Vec::new(),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => vec![tokens(items)],
        Some(Value::Array(items)) if items.iter().all(Value::is_object) => {
            vec![content_text(value)]
        }
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                Value::Array(toks) => tokens(toks),
                other => other.to_string(),
            })
            .collect(),
        Some(other) => vec![other.to_string()],
    }
}

/// A deterministic unit vector derived from `text` (FNV-1a seed expanded
/// with splitmix64). Stable across Rust versions, unlike `DefaultHasher`.
fn embed(text: &str, dims: usize) -> Vec<f64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut v: Vec<f64> = (0..dims as u64)
        .map(|i| {
            let mut z = h.wrapping_add(i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // Top 53 bits → [0, 1) → [-1, 1).
            (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Standard padded base64; small enough not to warrant a dependency.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unix_ms() -> u64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Harness {
        mock: MockUpstream,
        base: String,
        client: reqwest::Client,
        shutdown: CancellationToken,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    async fn start(config: MockConfig) -> Harness {
        let mock = MockUpstream::new(config);
        let shutdown = CancellationToken::new();
        let base = mock.clone().spawn(shutdown.clone()).await.unwrap();
        let client = reqwest::Client::builder()
            // The mock's redirects must be observable, not followed.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Harness {
            mock,
            base,
            client,
            shutdown,
        }
    }

    impl Harness {
        async fn post(&self, path: &str, body: &Value) -> reqwest::Response {
            self.client
                .post(format!("{}{path}", self.base))
                .json(body)
                .send()
                .await
                .unwrap()
        }
    }

    fn chat_body(key: &str, mock: Value) -> Value {
        let mut mock = mock;
        mock["key"] = json!(key);
        json!({
            "model": "gpt-test",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there world"},
            ],
            "mock": mock,
        })
    }

    #[tokio::test]
    async fn chat_completion_has_openai_shape() {
        let h = start(MockConfig::default()).await;
        let res = h
            .post("/chat/completions", &chat_body("a", json!({})))
            .await;
        assert_eq!(res.status(), 200);
        let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert!(rid.starts_with("req_") && rid.len() == 36, "{rid}");
        let v: Value = res.json().await.unwrap();
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(v["object"], "chat.completion");
        assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
        assert_eq!(v["model"], "gpt-test");
        let choice = &v["choices"][0];
        assert_eq!(choice["index"], 0);
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["message"]["role"], "assistant");
        assert_eq!(choice["message"]["content"], "echo: hello there world");
        // 2 system words + 3 user words; answer is 4 words.
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
        );
    }

    #[tokio::test]
    async fn echo_is_truncated_to_200_chars() {
        let h = start(MockConfig::default()).await;
        let long = "é".repeat(500);
        let body = json!({"model": "m", "messages": [{"role": "user", "content": long}]});
        let v: Value = h
            .post("/chat/completions", &body)
            .await
            .json()
            .await
            .unwrap();
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(content.chars().count(), "echo: ".len() + 200);
    }

    #[tokio::test]
    async fn status_times_then_success_with_retry_headers_and_stats() {
        let h = start(MockConfig::default()).await;
        let body = chat_body(
            "line-1",
            json!({"status": 503, "times": 2, "retry_after": 3, "retry_after_ms": 1500}),
        );
        let mut statuses = Vec::new();
        for attempt in 1..=3u64 {
            let res = h.post("/chat/completions", &body).await;
            statuses.push(res.status().as_u16());
            assert_eq!(
                res.headers()["x-mock-attempt"],
                attempt.to_string().as_str()
            );
            assert!(res.headers().contains_key("x-request-id"));
            if res.status() == 503 {
                assert_eq!(res.headers()[header::RETRY_AFTER], "3");
                assert_eq!(res.headers()["retry-after-ms"], "1500");
                let v: Value = res.json().await.unwrap();
                assert_eq!(v["error"]["type"], "server_error");
                assert!(
                    v["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("overloaded")
                );
                assert_eq!(v["error"]["param"], Value::Null);
            } else {
                assert!(!res.headers().contains_key(header::RETRY_AFTER));
            }
        }
        assert_eq!(statuses, [503, 503, 200]);

        // Another line and a key-less call are independent of line-1.
        let other = h
            .post("/chat/completions", &chat_body("line-2", json!({})))
            .await;
        assert_eq!(other.status(), 200);
        let keyless = h.post("/embeddings", &json!({"input": "x"})).await;
        assert_eq!(keyless.status(), 200);

        let stats = h.mock.stats();
        assert_eq!(stats.calls, 5);
        assert_eq!(stats.per_key.len(), 2);
        let times = &stats.per_key["line-1"];
        assert_eq!(times.len(), 3);
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        assert!(times[0] > 1_600_000_000_000);
        assert_eq!(stats.per_key["line-2"].len(), 1);

        // Same snapshot over HTTP, then reset clears it and the attempt counters.
        let remote: MockStats = h
            .client
            .get(h.base.replace("/v1", "/mock/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(remote.calls, 5);
        assert_eq!(remote.per_key["line-1"], stats.per_key["line-1"]);
        let res = h
            .client
            .post(h.base.replace("/v1", "/mock/reset"))
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success());
        assert_eq!(h.mock.stats().calls, 0);
        assert!(h.mock.stats().per_key.is_empty());
        let again = h.post("/chat/completions", &body).await;
        assert_eq!(again.status(), 503, "reset restarts the attempt count");
    }

    #[tokio::test]
    async fn status_without_times_always_fails_and_429_has_rate_limit_code() {
        let h = start(MockConfig::default()).await;
        let body = chat_body("k", json!({"status": 429}));
        for _ in 0..3 {
            let res = h.post("/chat/completions", &body).await;
            assert_eq!(res.status(), 429);
            assert!(!res.headers().contains_key(header::RETRY_AFTER));
            let v: Value = res.json().await.unwrap();
            assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        }
        let res = h
            .post(
                "/chat/completions",
                &chat_body("k400", json!({"status": 400})),
            )
            .await;
        assert_eq!(res.status(), 400);
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[tokio::test]
    async fn embeddings_accept_array_input_and_are_deterministic() {
        let h = start(MockConfig::default()).await;
        let body = json!({"model": "emb", "input": ["alpha beta", "gamma", "alpha beta"]});
        let v: Value = h.post("/embeddings", &body).await.json().await.unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "emb");
        assert_eq!(v["usage"], json!({"prompt_tokens": 5, "total_tokens": 5}));
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        for (i, d) in data.iter().enumerate() {
            assert_eq!(d["object"], "embedding");
            assert_eq!(d["index"], i);
            let e = d["embedding"].as_array().unwrap();
            assert_eq!(e.len(), 8);
            let norm: f64 = e.iter().map(|x| x.as_f64().unwrap().powi(2)).sum();
            assert!((norm - 1.0).abs() < 1e-9);
        }
        assert_eq!(data[0]["embedding"], data[2]["embedding"]);
        assert_ne!(data[0]["embedding"], data[1]["embedding"]);

        let single: Value = h
            .post("/embeddings", &json!({"input": "gamma"}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(single["data"].as_array().unwrap().len(), 1);
        assert_eq!(single["data"][0]["embedding"], data[1]["embedding"]);
        assert_eq!(single["model"], MOCK_MODEL);

        let b64: Value = h
            .post(
                "/embeddings",
                &json!({"input": "gamma", "encoding_format": "base64", "dimensions": 4}),
            )
            .await
            .json()
            .await
            .unwrap();
        // 4 f32 = 16 bytes = 24 base64 chars.
        assert_eq!(b64["data"][0]["embedding"].as_str().unwrap().len(), 24);
    }

    #[tokio::test]
    async fn other_endpoints_have_their_shapes() {
        let h = start(MockConfig::default()).await;

        let v: Value = h
            .post("/completions", &json!({"model": "m", "prompt": "say hi"}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["choices"][0]["text"], "echo: say hi");
        assert_eq!(v["usage"]["total_tokens"], 5);

        let v: Value = h
            .post("/responses", &json!({"model": "m", "input": "one two"}))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(v["object"], "response");
        assert_eq!(v["status"], "completed");
        assert_eq!(v["output"][0]["content"][0]["text"], "echo: one two");
        assert_eq!(
            v["usage"],
            json!({"input_tokens": 2, "output_tokens": 3, "total_tokens": 5})
        );

        let v: Value = h
            .post("/moderations", &json!({"input": ["a", "b"]}))
            .await
            .json()
            .await
            .unwrap();
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), 2);
        assert_eq!(results[0]["flagged"], false);

        let v: Value = h
            .client
            .get(format!("{}/models", h.base))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["data"][0]["id"], MOCK_MODEL);

        let res = h.post("/nope", &json!({})).await;
        assert_eq!(res.status(), 404);
        assert!(res.headers().contains_key("x-request-id"));
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[tokio::test]
    async fn non_json_body_is_a_400_envelope_and_still_counted() {
        let h = start(MockConfig::default()).await;
        let res = h
            .client
            .post(format!("{}/chat/completions", h.base))
            .body("not json {")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 400);
        assert!(res.headers().contains_key("x-request-id"));
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], Value::Null);
        assert_eq!(v["error"]["code"], Value::Null);
        assert!(v["error"]["message"].is_string());
        assert_eq!(h.mock.stats().calls, 1);
    }

    #[tokio::test]
    async fn garbage_and_redirect() {
        let h = start(MockConfig::default()).await;
        let res = h
            .post(
                "/chat/completions",
                &chat_body("g", json!({"garbage": true, "times": 1})),
            )
            .await;
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()[header::CONTENT_TYPE], "text/html");
        assert_eq!(res.text().await.unwrap(), "<html>oops</html>");
        // `times` bounds garbage too.
        let res = h
            .post(
                "/chat/completions",
                &chat_body("g", json!({"garbage": true, "times": 1})),
            )
            .await;
        assert!(res.json::<Value>().await.is_ok());

        let res = h
            .post(
                "/chat/completions",
                &chat_body("r", json!({"redirect": true})),
            )
            .await;
        assert_eq!(res.status(), 302);
        assert_eq!(res.headers()[header::LOCATION], REDIRECT_TARGET);
    }

    #[tokio::test]
    async fn delay_and_hang() {
        let h = start(MockConfig::default()).await;
        let started = std::time::Instant::now();
        let res = h
            .post(
                "/chat/completions",
                &chat_body("d", json!({"delay_ms": 150})),
            )
            .await;
        assert_eq!(res.status(), 200);
        assert!(started.elapsed() >= Duration::from_millis(150));

        let err = h
            .client
            .post(format!("{}/chat/completions", h.base))
            .json(&chat_body("h", json!({"hang": true})))
            .timeout(Duration::from_millis(200))
            .send()
            .await
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        // Arrival was recorded even though no answer ever came.
        assert_eq!(h.mock.stats().per_key["h"].len(), 1);
    }

    #[tokio::test]
    async fn shutdown_interrupts_a_hanging_request() {
        let mock = MockUpstream::new(MockConfig::default());
        let shutdown = CancellationToken::new();
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let url = format!(
            "http://{}/v1/chat/completions",
            listener.local_addr().unwrap()
        );
        let server = tokio::spawn(mock.clone().serve(listener, shutdown.clone()));
        let request = tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({"mock": {"hang": true}}))
                .send()
                .await
        });
        // Wait until the request has arrived before cancelling.
        while mock.stats().calls == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shutdown.cancel();
        let served = tokio::time::timeout(Duration::from_secs(5), server).await;
        served.expect("serve returns promptly").unwrap().unwrap();
        let res = request.await.unwrap().unwrap();
        assert_eq!(res.status(), 503);
    }

    #[tokio::test]
    async fn global_failures_are_seeded_and_carry_retry_after() {
        let config = MockConfig {
            fail_rate: 1.0,
            fail_status: 429,
            retry_after_secs: Some(7),
            ..MockConfig::default()
        };
        let h = start(config).await;
        let res = h
            .post("/chat/completions", &chat_body("x", json!({})))
            .await;
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()[header::RETRY_AFTER], "7");

        // Default fail_status is 500; a half rate with a fixed seed gives the
        // same sequence on every run and after a reset.
        let config = MockConfig {
            fail_rate: 0.5,
            seed: 42,
            latency_ms: 1,
            jitter_ms: 3,
            ..MockConfig::default()
        };
        let h = start(config).await;
        let mut run = Vec::new();
        for _ in 0..20 {
            run.push(
                h.post("/embeddings", &json!({"input": "x"}))
                    .await
                    .status()
                    .as_u16(),
            );
        }
        assert!(run.iter().all(|s| *s == 200 || *s == 500));
        assert!(run.contains(&200) && run.contains(&500), "{run:?}");
        h.mock.reset();
        let mut again = Vec::new();
        for _ in 0..20 {
            again.push(
                h.post("/embeddings", &json!({"input": "x"}))
                    .await
                    .status()
                    .as_u16(),
            );
        }
        assert_eq!(run, again);
    }

    #[test]
    fn config_deserializes_with_defaults() {
        let c: MockConfig = serde_json::from_value(json!({"latency_ms": 5})).unwrap();
        assert_eq!(c.latency_ms, 5);
        assert_eq!(c.fail_status, 0);
        assert_eq!(c.retry_after_secs, None);
    }

    #[test]
    fn base64_matches_reference_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }
}

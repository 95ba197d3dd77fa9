//! Calling the configured upstream for one line, and the one retry policy.
//!
//! The request goes to `POST {provider.base_url}{endpoint without /v1}` with the line's body and the
//! provider's key from configuration: never a URL or header taken from the input. Redirects are not
//! followed, connect and whole-call timeouts apply, and the response body is size-capped.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde_json::Value;
use serde_json::value::RawValue;
use sluice_shared::config::{ProviderSettings, Settings, TaskSettings, WorkerSettings};
use sluice_shared::domain::{Row, Usage};
use sluice_shared::pacing::MAX_FLEET_PAUSE;
use sluice_shared::routing::{Target, resolve_target};

/// Providers and the HTTP client that reaches them.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: reqwest::Client,
    providers: Vec<ProviderSettings>,
    tasks: TaskSettings,
    max_response_bytes: u64,
}

/// An upstream call that got no usable HTTP answer.
#[derive(Debug)]
pub enum CallFailure {
    /// Timeout, connection or protocol failure.
    Transport(reqwest::Error),
    /// The answer exceeded `limits.max_response_bytes`.
    TooLarge,
}

/// What one attempt produced.
#[derive(Debug)]
pub enum Attempt {
    /// A final row (success or permanent failure) and the usage to count.
    Done(Row, Usage),
    /// A failure worth retrying: the row to write if no attempt is left, the reason (for metrics),
    /// and the delay the upstream asked for, if any.
    Retry {
        last: Row,
        reason: &'static str,
        retry_after: Option<Duration>,
    },
}

impl Upstream {
    /// Builds the client from the worker settings.
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_millis(settings.worker.connect_timeout_ms))
            .timeout(Duration::from_millis(settings.worker.request_timeout_ms))
            .pool_max_idle_per_host(settings.worker.concurrency as usize)
            .build()?;
        Ok(Self {
            client,
            providers: settings.providers.clone(),
            tasks: settings.tasks.clone(),
            max_response_bytes: settings.limits.max_response_bytes,
        })
    }

    /// The provider serving `model`, first match in configuration order.
    pub fn provider_for(&self, model: &str) -> Option<&ProviderSettings> {
        self.providers.iter().find(|p| p.serves(model))
    }

    /// Index and name of the provider a line of `model` on `endpoint` is called on (the backing
    /// model's provider for a task model); `None` when the model has no route.
    pub fn provider_of(&self, model: &str, endpoint: &str) -> Option<(usize, &ProviderSettings)> {
        let index = match resolve_target(&self.providers, &self.tasks, model, endpoint) {
            Ok(Target::Model(route)) => route.provider,
            Ok(Target::Task { backing, .. }) => backing.provider,
            Err(_) => return None,
        };
        self.providers.get(index).map(|p| (index, p))
    }

    /// The `[tasks]` settings (prompt templates).
    pub fn task_settings(&self) -> &TaskSettings {
        &self.tasks
    }

    /// Calls the upstream once for a line: the route of `model` (see
    /// [`sluice_shared::routing`]), with the body's `model` rewritten only when the upstream knows
    /// the model under another name (prefix or flavor removed). Task models run through
    /// [`crate::tasks`]. Also returns the fleet pause the answer's `x-ratelimit-*` headers ask
    /// for (see [`ratelimit_pause`]).
    pub async fn attempt(
        &self,
        endpoint: &str,
        model: &str,
        custom_id: &str,
        body: &RawValue,
    ) -> (Attempt, Option<Duration>) {
        let route = match resolve_target(&self.providers, &self.tasks, model, endpoint) {
            Ok(Target::Model(route)) => route,
            Ok(Target::Task { task, backing }) => {
                let attempt = crate::tasks::attempt(self, task, &backing, custom_id, body).await;
                return (attempt, None);
            }
            Err(e) => {
                let row = Row::error(custom_id, e.code(), &e.to_string());
                return (Attempt::Done(row, Usage::default()), None);
            }
        };
        let payload = if route.upstream_model == model {
            body.get().to_owned()
        } else {
            match serde_json::from_str::<serde_json::Map<String, Value>>(body.get()) {
                Ok(mut map) => {
                    map.insert("model".into(), Value::String(route.upstream_model.clone()));
                    Value::Object(map).to_string()
                }
                Err(_) => body.get().to_owned(),
            }
        };
        match self.exchange(route.provider, endpoint, payload).await {
            Ok((status, headers, bytes)) => (
                classify(custom_id, status, &headers, &bytes),
                ratelimit_pause(&headers),
            ),
            Err(failure) => (self.failure(custom_id, failure), None),
        }
    }

    /// One HTTP exchange with provider number `provider`: status, headers and the capped body.
    pub async fn exchange(
        &self,
        provider: usize,
        endpoint: &str,
        payload: String,
    ) -> Result<(u16, HeaderMap, Bytes), CallFailure> {
        let provider = &self.providers[provider];
        let path = endpoint.strip_prefix("/v1").unwrap_or(endpoint);
        let url = format!("{}{path}", provider.base_url.trim_end_matches('/'));
        let mut request = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(payload);
        if let Some(key) = provider.api_key() {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(CallFailure::Transport)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        match read_capped(response, self.max_response_bytes).await {
            Ok(Some(bytes)) => Ok((status, headers, bytes)),
            Ok(None) => Err(CallFailure::TooLarge),
            Err(e) => Err(CallFailure::Transport(e)),
        }
    }

    /// The attempt outcome of a call that got no usable answer.
    pub fn failure(&self, custom_id: &str, failure: CallFailure) -> Attempt {
        match failure {
            CallFailure::Transport(e) => transport_failure(custom_id, &e),
            CallFailure::TooLarge => Attempt::Done(
                Row::error(
                    custom_id,
                    "response_too_large",
                    &format!(
                        "The upstream response exceeded {} bytes.",
                        self.max_response_bytes
                    ),
                ),
                Usage::default(),
            ),
        }
    }
}

async fn read_capped(
    response: reqwest::Response,
    cap: u64,
) -> Result<Option<Bytes>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > cap) {
        return Ok(None);
    }
    let mut stream = response.bytes_stream();
    let mut buf = BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if (buf.len() + chunk.len()) as u64 > cap {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Some(buf.freeze()))
}

fn transport_failure(custom_id: &str, e: &reqwest::Error) -> Attempt {
    let (code, reason, message) = if e.is_timeout() {
        (
            "request_timeout",
            "timeout",
            "The upstream did not answer in time.",
        )
    } else if e.is_connect() {
        (
            "upstream_unreachable",
            "connect",
            "The upstream could not be reached.",
        )
    } else {
        (
            "upstream_error",
            "transport",
            "The connection to the upstream failed.",
        )
    };
    Attempt::Retry {
        last: Row::error(custom_id, code, message),
        reason,
        retry_after: None,
    }
}

/// Turns an upstream answer into a row, or a retry. The one place that decides what is retried.
pub fn classify(custom_id: &str, status: u16, headers: &HeaderMap, bytes: &[u8]) -> Attempt {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req_{}", uuid::Uuid::new_v4().simple()));
    let parsed: Option<Box<RawValue>> = serde_json::from_slice::<Box<RawValue>>(bytes)
        .ok()
        .filter(|raw| raw.get().trim_start().starts_with('{'));
    let body = match parsed {
        Some(raw) => raw,
        None if (200..300).contains(&status) => {
            return Attempt::Done(
                Row::error(
                    custom_id,
                    "invalid_upstream_response",
                    "The upstream answered with a body that is not a JSON object.",
                ),
                Usage::default(),
            );
        }
        None => wrap_text_body(status, bytes),
    };
    if (200..300).contains(&status) {
        let usage = serde_json::from_str::<Value>(body.get())
            .map(|v| Usage::from_body(&v))
            .unwrap_or_default();
        return Attempt::Done(Row::response(custom_id, status, &request_id, &body), usage);
    }
    let row = Row::response(custom_id, status, &request_id, &body);
    let should_retry = match headers.get("x-should-retry").and_then(|v| v.to_str().ok()) {
        Some("true") => true,
        Some("false") => false,
        _ => matches!(status, 408 | 409 | 429) || status >= 500,
    };
    if !should_retry || (300..400).contains(&status) {
        return Attempt::Done(row, Usage::default());
    }
    let reason = match status {
        429 => "429",
        408 => "408",
        409 => "409",
        s if s >= 500 => "5xx",
        _ => "other",
    };
    Attempt::Retry {
        last: row,
        reason,
        retry_after: retry_after(headers),
    }
}

/// An OpenAI error envelope carrying a non-JSON upstream answer, so every row's body is JSON.
fn wrap_text_body(status: u16, bytes: &[u8]) -> Box<RawValue> {
    let text: String = String::from_utf8_lossy(bytes).chars().take(1_000).collect();
    let message = if (300..400).contains(&status) {
        "The upstream answered with a redirect, which Sluice does not follow.".to_owned()
    } else if text.trim().is_empty() {
        format!("The upstream answered {status} with an empty body.")
    } else {
        text
    };
    let v = serde_json::json!({"error": {"message": message, "type": "upstream_error", "param": null, "code": null}});
    RawValue::from_string(v.to_string()).expect("a serialized Value is valid JSON")
}

/// The delay an upstream asked for: `retry-after-ms`, then `Retry-After` in seconds or as an HTTP date.
/// Odd values (negative, unparsable, in the past) count as no request.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(Duration::from_millis(ms as u64));
    }
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_millis((secs * 1000.0) as u64));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    when.duration_since(std::time::SystemTime::now()).ok()
}

/// A fleet pause asked for by `x-ratelimit-remaining-{requests,tokens}: 0` with its
/// `x-ratelimit-reset-*` duration (`1s`, `6m0s`, `12ms`, or plain seconds). Anything odd (negative
/// or unparsable values, Azure's `-1`, a remaining count above zero, no reset) asks for nothing, and
/// the pause is capped at [`MAX_FLEET_PAUSE`], so a broken header cannot stall the fleet.
pub fn ratelimit_pause(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: String| {
        headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    ["requests", "tokens"]
        .into_iter()
        .filter_map(|kind| {
            let remaining: i64 = text(format!("x-ratelimit-remaining-{kind}"))?
                .parse()
                .ok()?;
            if remaining != 0 {
                return None;
            }
            parse_reset(text(format!("x-ratelimit-reset-{kind}"))?)
        })
        .max()
        .filter(|d| !d.is_zero())
        .map(|d| d.min(MAX_FLEET_PAUSE))
}

/// Parses a Go-style duration (`1h2m3.5s`, `250ms`, `6m0s`) or plain seconds (`1.5`).
fn parse_reset(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.parse::<f64>() {
        return (0.0..1e9)
            .contains(&secs)
            .then(|| Duration::from_secs_f64(secs));
    }
    let mut total = 0.0f64;
    let mut rest = value;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(split);
        let n: f64 = num.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3_600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * scale;
        rest = tail;
    }
    (total.is_finite() && total < 1e9).then(|| Duration::from_secs_f64(total))
}

/// Tokens a call may use, estimated before it: the body's length over four (prompt text
/// dominates a request body, and about four characters make a token in English) plus the
/// completion budget the request sets, or `default_max` when it sets none (embeddings and
/// moderations complete nothing).
pub fn estimate_tokens(endpoint: &str, body: &RawValue, default_max: u64) -> u64 {
    let prompt = body.get().len() as u64 / 4;
    if endpoint.ends_with("/embeddings") || endpoint.ends_with("/moderations") {
        return prompt.max(1);
    }
    #[derive(serde::Deserialize)]
    struct Budget {
        max_tokens: Option<u64>,
        max_completion_tokens: Option<u64>,
        max_output_tokens: Option<u64>,
    }
    let completion = serde_json::from_str::<Budget>(body.get())
        .ok()
        .and_then(|b| {
            b.max_completion_tokens
                .or(b.max_tokens)
                .or(b.max_output_tokens)
        })
        .unwrap_or(default_max);
    (prompt + completion).max(1)
}

/// Capped exponential backoff with jitter, stretched to whatever the upstream asked for, within
/// a per-line budget of attempts and of time.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub max: Duration,
    pub max_retry_after: Duration,
    /// Longest span from a line's first attempt to its last.
    pub max_elapsed: Duration,
}

/// What to do with a line whose attempt asked for a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Stop: the budget named here ran out (`attempts`, `elapsed` or `deadline`).
    GiveUp(&'static str),
}

impl RetryPolicy {
    /// The policy of the worker settings.
    pub fn from_settings(w: &WorkerSettings) -> Self {
        Self {
            max_attempts: w.max_attempts,
            base: Duration::from_millis(w.backoff_base_ms),
            max: Duration::from_millis(w.backoff_max_ms),
            max_retry_after: Duration::from_secs(w.max_retry_after_secs),
            max_elapsed: Duration::from_secs(w.max_retry_elapsed_secs),
        }
    }

    /// The decision after `attempts` counted attempts, `elapsed` since the first one, with
    /// `deadline_in` left before the batch expires (`None`: no deadline known).
    pub fn next(
        &self,
        attempts: u32,
        retry_after: Option<Duration>,
        elapsed: Duration,
        deadline_in: Option<Duration>,
    ) -> NextStep {
        let Some(delay) = self.delay(attempts, retry_after) else {
            return NextStep::GiveUp("attempts");
        };
        if elapsed + delay > self.max_elapsed {
            return NextStep::GiveUp("elapsed");
        }
        if deadline_in.is_some_and(|left| delay >= left) {
            return NextStep::GiveUp("deadline");
        }
        NextStep::RetryAfter(delay)
    }

    /// Delay before attempt `attempt + 1` (attempts count from 1), or `None` when the budget is spent.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max);
        // Jitter in [exp/2, exp] spreads retries of a burst without ever going below half the backoff.
        let jittered = exp.mul_f64(rand::rng().random_range(0.5..=1.0));
        Some(match retry_after {
            Some(asked) => asked.min(self.max_retry_after).max(jittered.min(asked)),
            None => jittered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_reads_every_form_and_ignores_odd_values() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "5")])),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "250")])),
            Some(Duration::from_millis(250))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "-1")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        let future =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let got = retry_after(&headers(&[("retry-after", &future)])).unwrap();
        assert!(
            got > Duration::from_secs(27) && got <= Duration::from_secs(30),
            "{got:?}"
        );
        let past = httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(30));
        assert_eq!(retry_after(&headers(&[("retry-after", &past)])), None);
    }

    #[test]
    fn classification_retries_only_transient_answers() {
        let body = br#"{"error":{"message":"x"}}"#;
        let h = HeaderMap::new();
        for status in [408, 409, 429, 500, 502, 503] {
            assert!(
                matches!(classify("c", status, &h, body), Attempt::Retry { .. }),
                "{status}"
            );
        }
        for status in [400, 401, 403, 404, 422, 302] {
            assert!(
                matches!(classify("c", status, &h, body), Attempt::Done(ref r, _) if !r.ok),
                "{status}"
            );
        }
        let no = headers(&[("x-should-retry", "false")]);
        assert!(matches!(classify("c", 503, &no, body), Attempt::Done(..)));
        let ok = br#"{"usage":{"prompt_tokens":2,"completion_tokens":3}}"#;
        match classify("c", 200, &h, ok) {
            Attempt::Done(row, usage) => {
                assert!(row.ok);
                assert_eq!(usage.total, 5);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(classify("c", 200, &h, b"<html>"), Attempt::Done(ref r, _) if !r.ok));
        match classify("c", 502, &h, b"<html>bad gateway</html>") {
            Attempt::Retry { last, .. } => {
                let v: Value = serde_json::from_str(&last.line).unwrap();
                assert_eq!(v["response"]["status_code"], 502);
                assert!(
                    v["response"]["body"]["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains("bad gateway")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn backoff_grows_is_capped_honours_retry_after_and_stops() {
        let p = RetryPolicy {
            max_attempts: 4,
            base: Duration::from_millis(100),
            max: Duration::from_millis(300),
            max_retry_after: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(60),
        };
        let d1 = p.delay(1, None).unwrap();
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
        let d3 = p.delay(3, None).unwrap();
        assert!(d3 >= Duration::from_millis(150) && d3 <= Duration::from_millis(300));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(5))),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(60))),
            Some(Duration::from_secs(10))
        );
        assert_eq!(p.delay(4, None), None);
        assert_eq!(
            p.next(4, None, Duration::ZERO, None),
            NextStep::GiveUp("attempts")
        );
        assert_eq!(
            p.next(1, None, Duration::from_secs(60), None),
            NextStep::GiveUp("elapsed")
        );
        assert_eq!(
            p.next(
                1,
                Some(Duration::from_secs(5)),
                Duration::ZERO,
                Some(Duration::from_secs(2))
            ),
            NextStep::GiveUp("deadline")
        );
        assert_eq!(
            p.next(
                1,
                Some(Duration::from_secs(5)),
                Duration::ZERO,
                Some(Duration::from_secs(60))
            ),
            NextStep::RetryAfter(Duration::from_secs(5))
        );
    }

    #[test]
    fn ratelimit_headers_pause_only_when_exhausted_and_odd_values_are_ignored() {
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "6m0s"),
        ]);
        assert_eq!(ratelimit_pause(&h), Some(MAX_FLEET_PAUSE));
        let h = headers(&[
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "1.5s"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "250ms"),
        ]);
        assert_eq!(ratelimit_pause(&h), Some(Duration::from_millis(1500)));
        for (remaining, reset) in [
            ("5", "1s"),
            ("-1", "1s"),
            ("0", "-1"),
            ("0", "soon"),
            ("0", "0s"),
            ("0", ""),
            ("many", "1s"),
            ("0", "1e400"),
        ] {
            let h = headers(&[
                ("x-ratelimit-remaining-requests", remaining),
                ("x-ratelimit-reset-requests", reset),
            ]);
            assert_eq!(ratelimit_pause(&h), None, "{remaining} {reset}");
        }
        assert_eq!(parse_reset("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_reset("2"), Some(Duration::from_secs(2)));
    }

    #[test]
    fn token_estimates_count_the_prompt_and_the_completion_budget() {
        let body = RawValue::from_string(
            r#"{"model":"m","messages":[{"role":"user","content":"hello there"}],"max_tokens":100}"#
                .into(),
        )
        .unwrap();
        let n = estimate_tokens("/v1/chat/completions", &body, 256);
        assert!((110..140).contains(&n), "{n}");
        let body = RawValue::from_string(r#"{"model":"m","input":"abcd"}"#.into()).unwrap();
        assert!(estimate_tokens("/v1/embeddings", &body, 256) < 20);
        assert!(estimate_tokens("/v1/chat/completions", &body, 256) >= 256);
    }
}

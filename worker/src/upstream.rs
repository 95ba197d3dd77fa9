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

    /// The `[tasks]` settings (prompt templates).
    pub fn task_settings(&self) -> &TaskSettings {
        &self.tasks
    }

    /// Calls the upstream once for a line: the route of `model` (see
    /// [`sluice_shared::routing`]), with the body's `model` rewritten only when the upstream knows
    /// the model under another name (prefix or flavor removed). Task models run through
    /// [`crate::tasks`].
    pub async fn attempt(
        &self,
        endpoint: &str,
        model: &str,
        custom_id: &str,
        body: &RawValue,
    ) -> Attempt {
        let route = match resolve_target(&self.providers, &self.tasks, model, endpoint) {
            Ok(Target::Model(route)) => route,
            Ok(Target::Task { task, backing }) => {
                return crate::tasks::attempt(self, task, &backing, custom_id, body).await;
            }
            Err(e) => {
                return Attempt::Done(
                    Row::error(custom_id, e.code(), &e.to_string()),
                    Usage::default(),
                );
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
            Ok((status, headers, bytes)) => classify(custom_id, status, &headers, &bytes),
            Err(failure) => self.failure(custom_id, failure),
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

/// Capped exponential backoff with jitter, stretched to whatever the upstream asked for.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base: Duration,
    pub max: Duration,
    pub max_retry_after: Duration,
}

impl RetryPolicy {
    /// The policy of the worker settings.
    pub fn from_settings(w: &WorkerSettings) -> Self {
        Self {
            max_attempts: w.max_attempts,
            base: Duration::from_millis(w.backoff_base_ms),
            max: Duration::from_millis(w.backoff_max_ms),
            max_retry_after: Duration::from_secs(w.max_retry_after_secs),
        }
    }

    /// Delay before attempt `attempt + 1` (attempts count from 1), or `None` when the budget is spent.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let exp = self
            .base
            .saturating_mul(1u32 << (attempt - 1).min(20))
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
    }
}

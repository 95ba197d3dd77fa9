//! Calling the configured upstream for one line, and classifying its answer. The one retry policy
//! and the delays upstreams ask for are in [`super::retry`].
//!
//! The request goes to `POST {provider.base_url}{endpoint without /v1}` with the line's body and the
//! provider's key from configuration: never a URL or header taken from the input. Redirects are not
//! followed, connect and whole-call timeouts apply, and the response body is size-capped.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use reqwest::header::HeaderMap;
use serde_json::Value;
use serde_json::value::RawValue;
use sluice_core::config::{ProviderSettings, Settings, TaskSettings};
use sluice_core::domain::{Row, Usage};
use sluice_core::routing::{Route, RouteError, Target, resolve_target};

use super::retry::{ratelimit_pause, retry_after};

/// Providers and the HTTP client that reaches them.
#[derive(Debug, Clone)]
pub(crate) struct Upstream {
    client: reqwest::Client,
    providers: Vec<ProviderSettings>,
    tasks: TaskSettings,
    max_response_bytes: u64,
}

/// An upstream call that got no usable HTTP answer.
#[derive(Debug)]
pub(crate) enum CallFailure {
    /// Timeout, connection or protocol failure.
    Transport(reqwest::Error),
    /// The answer exceeded `limits.max_response_bytes`.
    TooLarge,
}

/// What one attempt produced.
#[derive(Debug)]
pub(crate) enum Attempt {
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
    pub(crate) fn new(settings: &Settings) -> anyhow::Result<Self> {
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

    /// Index and name of the provider a line of `model` on `endpoint` is called on (the backing
    /// model's provider for a task model); `None` when the model has no route.
    pub(crate) fn provider_of(
        &self,
        model: &str,
        endpoint: &str,
    ) -> Option<(usize, &ProviderSettings)> {
        let index = match resolve_target(&self.providers, &self.tasks, model, endpoint) {
            Ok(Target::Model(route)) => route.provider,
            Ok(Target::Task { backing, .. }) => backing.provider,
            Err(_) => return None,
        };
        self.providers.get(index).map(|p| (index, p))
    }

    /// The `[tasks]` settings (prompt templates).
    pub(crate) fn task_settings(&self) -> &TaskSettings {
        &self.tasks
    }

    /// What `model` runs on for `endpoint` (see [`sluice_core::routing`]).
    pub(crate) fn resolve(&self, model: &str, endpoint: &str) -> Result<Target, RouteError> {
        resolve_target(&self.providers, &self.tasks, model, endpoint)
    }

    /// Calls `route`'s provider once for a line, with the body's `model` rewritten only when the
    /// upstream knows the model under another name (prefix or flavor removed). Also returns the
    /// fleet pause the answer's `x-ratelimit-*` headers ask for (see [`ratelimit_pause`]).
    pub(crate) async fn attempt_route(
        &self,
        route: &Route,
        endpoint: &str,
        model: &str,
        custom_id: &str,
        body: &RawValue,
    ) -> (Attempt, Option<Duration>) {
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
    pub(crate) async fn exchange(
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
    pub(crate) fn failure(&self, custom_id: &str, failure: CallFailure) -> Attempt {
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
pub(crate) fn classify(custom_id: &str, status: u16, headers: &HeaderMap, bytes: &[u8]) -> Attempt {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req_{}", uuid::Uuid::new_v4().simple()));
    // Parsed whole once: a body that `RawValue` accepts but a `Value` cannot hold (nested past
    // serde_json's recursion limit) would otherwise be stored and fail every later reader of the
    // row (finalize, `/output`), so it counts as no JSON object at all.
    let parsed: Option<(Box<RawValue>, Value)> = serde_json::from_slice::<Box<RawValue>>(bytes)
        .ok()
        .filter(|raw| raw.get().trim_start().starts_with('{'))
        .and_then(|raw| {
            let value = serde_json::from_str::<Value>(raw.get()).ok()?;
            Some((raw, value))
        });
    let (body, value) = match parsed {
        Some(parsed) => parsed,
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
        None => (wrap_text_body(status, bytes), Value::Null),
    };
    if (200..300).contains(&status) {
        let usage = Usage::from_body(&value);
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

/// Tokens a call may use, estimated before it: the body's length over four (prompt text
/// dominates a request body, and about four characters make a token in English) plus the
/// completion budget the request sets, or `default_max` when it sets none (embeddings and
/// moderations complete nothing).
pub(crate) fn estimate_tokens(endpoint: &str, body: &RawValue, default_max: u64) -> u64 {
    let prompt = body.get().len() as u64 / 4;
    if endpoint.ends_with("/embeddings") || endpoint.ends_with("/moderations") {
        return prompt.max(1);
    }
    // Floats too (`1e12`): the budget is read as a number, whatever its JSON spelling, and
    // saturates instead of overflowing; the pacer caps what it charges.
    #[derive(serde::Deserialize)]
    struct Budget {
        max_tokens: Option<f64>,
        max_completion_tokens: Option<f64>,
        max_output_tokens: Option<f64>,
    }
    let completion = serde_json::from_str::<Budget>(body.get())
        .ok()
        .and_then(|b| {
            b.max_completion_tokens
                .or(b.max_tokens)
                .or(b.max_output_tokens)
        })
        .filter(|n| n.is_finite() && *n >= 0.0)
        // `as` saturates a float at u64::MAX.
        .map_or(default_max, |n| n as u64);
    prompt.saturating_add(completion).max(1)
}

#[cfg(test)]
mod tests {
    use super::super::retry::tests::headers;
    use super::*;

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

    #[test]
    fn absurd_completion_budgets_saturate_instead_of_overflowing() {
        for budget in [
            "1e12",
            "1000000000000",
            "18446744073709551615",
            "1e400",
            "-5",
            "\"x\"",
        ] {
            let body = RawValue::from_string(format!(
                r#"{{"model":"m","messages":[],"max_tokens":{budget}}}"#
            ))
            .unwrap();
            let n = estimate_tokens("/v1/chat/completions", &body, 256);
            assert!(n >= 1, "{budget}: {n}");
        }
        let body = RawValue::from_string(r#"{"model":"m","max_tokens":1e12}"#.into()).unwrap();
        assert!(estimate_tokens("/v1/chat/completions", &body, 256) >= 1_000_000_000_000);
    }

    #[test]
    fn bodies_nested_past_the_parser_limit_become_readable_rows() {
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(500), "]".repeat(500));
        assert!(serde_json::from_str::<Value>(&deep).is_err());
        let Attempt::Done(row, _) = classify("c1", 200, &HeaderMap::new(), deep.as_bytes()) else {
            panic!("a 2xx answer is done");
        };
        let v: Value = serde_json::from_str(&row.line).unwrap();
        assert_eq!(v["error"]["code"], "invalid_upstream_response");
        let Attempt::Done(row, _) = classify("c1", 400, &HeaderMap::new(), deep.as_bytes()) else {
            panic!("a 400 answer is done");
        };
        let v: Value = serde_json::from_str(&row.line).unwrap();
        assert_eq!(v["response"]["status_code"], 400);
        assert!(v["response"]["body"]["error"]["message"].is_string());
    }
}

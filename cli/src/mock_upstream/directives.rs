//! The per-request `"mock": {...}` object that scripts a line's faults.

use serde_json::Value;

use super::MAX_DEEP;

/// The per-request `"mock": {...}` directives.
#[derive(Debug, Default)]
pub(super) struct Directives {
    pub(super) key: String,
    pub(super) status: Option<u16>,
    /// Bounds every fault of the line (status, garbage, redirect, hang) to
    /// the first `times` attempts; `None` = every attempt.
    pub(super) times: Option<u64>,
    pub(super) retry_after: Option<u64>,
    pub(super) retry_after_ms: Option<u64>,
    pub(super) delay_ms: Option<u64>,
    pub(super) garbage: bool,
    pub(super) redirect: bool,
    pub(super) hang: bool,
    /// Extra response headers while faulting (e.g. `x-ratelimit-remaining-requests`).
    pub(super) headers: Vec<(String, String)>,
    /// `usage.total_tokens` to report on a successful answer (token-limit tests).
    pub(super) usage_tokens: Option<u64>,
    /// Answer a JSON body nested this deep (with `status`, default 200): parsers' depth limits.
    pub(super) deep: Option<u64>,
}

impl Directives {
    pub(super) fn from_body(body: &Value) -> Self {
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
            deep: uint("deep").map(|d| d.min(MAX_DEEP)),
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

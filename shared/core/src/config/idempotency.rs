//! `[idempotency]`: how long an `Idempotency-Key` answers with its first response, and how a
//! duplicate that arrives while the first request still runs is handled.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `[idempotency]`: `Idempotency-Key` on creates.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencySettings {
    /// How long a key keeps answering with the first successful response, counted from that
    /// response (seconds).
    pub retention_secs: u64,
    /// Longest accepted key, in characters (400 above it).
    pub max_key_chars: u64,
    #[schemars(extend("x-advanced" = "duplicate-request wait; the default stays below api.request_timeout_ms"))]
    /// How long a request whose key is held by a request still in progress waits for that
    /// request's answer before it gets a retryable 409 `idempotency_key_in_progress` (ms).
    pub wait_ms: u64,
    #[schemars(extend("x-advanced" = "lease internals"))]
    /// Lifetime of the claim a request in progress holds on its key, renewed while it runs: the
    /// key of a request whose API process died is free again after this long (ms).
    pub lease_ms: u64,
}

impl Default for IdempotencySettings {
    fn default() -> Self {
        Self {
            // Stripe's day: longer than any client's retry loop.
            retention_secs: 86_400,
            max_key_chars: 255,
            // Below `api.request_timeout_ms`, so the duplicate's own deadline does not end first.
            wait_ms: 10_000,
            lease_ms: 30_000,
        }
    }
}

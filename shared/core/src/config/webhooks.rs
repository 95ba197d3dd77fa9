//! `[webhooks]` (delivery of signed batch events) and the endpoints tenants list in
//! `tenants[].webhooks`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::validate::Problems;
use super::{Secret, Settings};

/// One endpoint a tenant's batch events are sent to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookEndpoint {
    /// `http://` or `https://` URL called with `POST`; the only address Sluice ever calls for
    /// this tenant's events.
    pub url: String,
    /// Standard Webhooks signing secret: `whsec_` then the base64 of a key of at least 16 bytes.
    pub secret: Secret,
}

/// `[webhooks]`: how signed batch events are delivered to the tenants' endpoints.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSettings {
    /// Whether endpoints may resolve to loopback, private, link-local or other non-public
    /// addresses. Off by default: an endpoint URL must not reach into Sluice's own network.
    pub allow_private: bool,
    /// TCP connect (and TLS handshake) of one delivery attempt (ms).
    pub connect_timeout_ms: u64,
    /// Deadline of one delivery attempt, up to the response headers (ms).
    pub timeout_ms: u64,
    /// Wait before the second attempt (ms); doubles per attempt up to `backoff_max_ms`.
    pub backoff_base_ms: u64,
    /// Longest wait between two delivery attempts (ms).
    pub backoff_max_ms: u64,
    /// How long an event is retried, from when it was raised (seconds); then it is dead-lettered.
    pub max_elapsed_secs: u64,
    #[schemars(extend("x-advanced" = "delivery parallelism of one aggregator"))]
    /// Deliveries sent at once by one aggregator process.
    pub concurrency: u16,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            allow_private: false,
            connect_timeout_ms: 5_000,
            timeout_ms: 10_000,
            backoff_base_ms: 5_000,
            backoff_max_ms: 3_600_000,
            max_elapsed_secs: 86_400,
            concurrency: 32,
        }
    }
}

impl Settings {
    /// The webhook endpoints of `tenant` (none for an unknown tenant).
    pub fn webhooks_of(&self, tenant: &str) -> &[WebhookEndpoint] {
        self.tenants
            .iter()
            .find(|t| t.id == tenant)
            .map_or(&[], |t| t.webhooks.as_slice())
    }
}

/// Shortest signing key an endpoint may have, decoded from its `whsec_` base64 form: a shorter
/// HMAC key could be guessed from signed events.
const MIN_SECRET_BYTES: usize = 16;

/// Configuration check of `[webhooks]` and every tenant's endpoints.
pub(super) fn check_webhooks(settings: &Settings, found: &mut Problems) {
    let w = &settings.webhooks;
    for (key, value) in [
        ("connect_timeout_ms", w.connect_timeout_ms),
        ("timeout_ms", w.timeout_ms),
        ("backoff_base_ms", w.backoff_base_ms),
        ("backoff_max_ms", w.backoff_max_ms),
    ] {
        if value == 0 || value > 86_400_000 {
            found.push(
                format!("webhooks.{key}"),
                format!("must be between 1 and 86400000 (ms), not {value}"),
            );
        }
    }
    if w.backoff_base_ms > w.backoff_max_ms {
        found.push(
            "webhooks.backoff_base_ms",
            "exceeds webhooks.backoff_max_ms",
        );
    }
    if w.concurrency == 0 {
        found.push("webhooks.concurrency", "must be at least 1");
    }
    if w.max_elapsed_secs == 0 || w.max_elapsed_secs > 30 * 86_400 {
        found.push(
            "webhooks.max_elapsed_secs",
            format!("must be between 1 and 2592000, not {}", w.max_elapsed_secs),
        );
    }
    for tenant in &settings.tenants {
        for (i, endpoint) in tenant.webhooks.iter().enumerate() {
            let at = format!("tenants[{}].webhooks[{i}]", tenant.id);
            let scheme_ok = endpoint
                .url
                .split_once("://")
                .is_some_and(|(scheme, rest)| {
                    matches!(scheme, "http" | "https") && !rest.is_empty()
                });
            if !scheme_ok {
                found.push(format!("{at}.url"), "must be an http:// or https:// URL");
            }
            // The secret itself is never echoed.
            match crate::webhooks::signing_key(&endpoint.secret.0) {
                None => found.push(
                    format!("{at}.secret"),
                    "must be \"whsec_\" followed by the base64 of a key",
                ),
                Some(key) if key.len() < MIN_SECRET_BYTES => found.push(
                    format!("{at}.secret"),
                    format!(
                        "holds a key of {} bytes; it must be at least {MIN_SECRET_BYTES} bytes \
                         (before base64)",
                        key.len()
                    ),
                ),
                Some(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{TenantSettings, hash_api_key};

    fn with_endpoint(url: &str, secret: &str) -> Settings {
        let mut s = Settings::default();
        s.tenants.push(TenantSettings {
            id: "t".into(),
            api_key_sha256: vec![hash_api_key("sk-t")],
            webhooks: vec![WebhookEndpoint {
                url: url.into(),
                secret: Secret(secret.into()),
            }],
            ..Default::default()
        });
        s
    }

    #[test]
    fn endpoints_need_an_http_url_and_a_whsec_secret_which_errors_never_echo() {
        let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        with_endpoint("https://hooks.example/x", good)
            .validate()
            .unwrap();
        let err = with_endpoint("file:///etc/passwd", good)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenants[t].webhooks[0].url"), "{err}");
        let err = with_endpoint("https://hooks.example/x", "plain-secret-value")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenants[t].webhooks[0].secret"), "{err}");
        assert!(!err.contains("plain-secret-value"), "{err}");
        let printed = format!("{:?}", with_endpoint("https://hooks.example/x", good));
        assert!(!printed.contains("MfKQ9r8G"), "Debug shows the secret");
    }

    #[test]
    fn a_signing_key_shorter_than_16_bytes_is_refused_by_key_path() {
        use base64::Engine;
        let whsec = |len: usize| {
            format!(
                "whsec_{}",
                base64::engine::general_purpose::STANDARD.encode(vec![0x5a; len])
            )
        };
        for len in [1, 8, 15] {
            let err = with_endpoint("https://hooks.example/x", &whsec(len))
                .validate()
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("tenants[t].webhooks[0].secret"),
                "{len}: {err}"
            );
            assert!(err.contains("16 bytes"), "{len}: {err}");
            assert!(
                !err.contains(&whsec(len)[6..]),
                "{len}: echoes the secret: {err}"
            );
        }
        for len in [16, 24, 32, 64] {
            with_endpoint("https://hooks.example/x", &whsec(len))
                .validate()
                .unwrap();
        }
    }

    #[test]
    fn backoff_bounds_are_checked() {
        let mut s = Settings::default();
        s.webhooks.backoff_base_ms = 10_000;
        s.webhooks.backoff_max_ms = 1_000;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("webhooks.backoff_base_ms"), "{err}");
    }
}

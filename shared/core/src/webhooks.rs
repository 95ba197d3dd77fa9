//! Batch events for webhooks: the job message one endpoint's delivery travels in, the event body,
//! and Standard Webhooks signing (<https://www.standardwebhooks.com>).
//!
//! An event's id is derived from its batch and type, so every announcement of the same event (a
//! finalize retried after a crash announces again) carries the same `webhook-id`, and receivers
//! can deduplicate on it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::domain::BatchStatus;

/// One event on its way to one endpoint; published to the webhooks queue, and again to a delay
/// queue after each failed attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookJob {
    /// `webhook-id`, the same on every attempt.
    pub event_id: String,
    /// `batch.completed`, `batch.failed`, `batch.expired` or `batch.cancelled`.
    pub event_type: String,
    /// The batch the event is about.
    pub batch_id: String,
    /// The tenant owning the batch.
    pub tenant: String,
    /// The endpoint, looked up in the configuration again at each attempt: only a URL still
    /// configured for the tenant is ever called.
    pub url: String,
    /// Unix seconds: the event's `created_at`.
    pub created_at: i64,
    /// Unix ms when the event was raised; the retry budget counts from here.
    pub raised_at_ms: i64,
    /// Delivery attempts made so far.
    #[serde(default)]
    pub attempts: u32,
    /// Times the job waited for its batch to show the terminal status it announces.
    #[serde(default)]
    pub waits: u32,
    /// Unix ms before which the job is not attempted (it goes back to a delay queue).
    #[serde(default)]
    pub due_at_ms: i64,
}

/// The event type announcing that a batch reached `status`, for the terminal statuses.
pub fn event_type(status: BatchStatus) -> Option<&'static str> {
    match status {
        BatchStatus::Completed => Some("batch.completed"),
        BatchStatus::Failed => Some("batch.failed"),
        BatchStatus::Expired => Some("batch.expired"),
        BatchStatus::Cancelled => Some("batch.cancelled"),
        _ => None,
    }
}

/// The id of the event of type `event_type` of `batch_id`: stable across announcements.
pub fn event_id(batch_id: &str, event_type: &str) -> String {
    let digest = Sha256::digest(format!("{batch_id}\n{event_type}").as_bytes());
    format!("evt_{}", hex::encode(&digest[..16]))
}

impl WebhookJob {
    /// The request body: OpenAI's event shape, with the batch id in `data`.
    pub fn body(&self) -> Vec<u8> {
        serde_json::json!({
            "object": "event",
            "id": self.event_id,
            "type": self.event_type,
            "created_at": self.created_at,
            "data": {"id": self.batch_id},
        })
        .to_string()
        .into_bytes()
    }
}

/// A short tag of an endpoint URL for Redis keys (the URL itself may carry a token).
pub fn endpoint_tag(url: &str) -> String {
    hex::encode(&Sha256::digest(url.as_bytes())[..8])
}

/// The HMAC key of a `whsec_…` secret, or None when it is not one.
pub fn signing_key(secret: &str) -> Option<Vec<u8>> {
    let key = STANDARD.decode(secret.strip_prefix("whsec_")?).ok()?;
    (!key.is_empty()).then_some(key)
}

/// The `webhook-signature` header value: `v1,` then the base64 HMAC-SHA256 of
/// `{id}.{timestamp}.{body}`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_standard_webhooks_reference_message() {
        // The reference vector of the Standard Webhooks libraries' own tests.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn refuses_secrets_that_are_not_whsec_base64() {
        assert!(signing_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_none());
        assert!(signing_key("whsec_not base64!").is_none());
        assert!(signing_key("whsec_").is_none());
    }

    #[test]
    fn an_event_keeps_its_id_and_body_across_announcements() {
        let a = event_id("batch_1", "batch.completed");
        assert_eq!(a, event_id("batch_1", "batch.completed"));
        assert_ne!(a, event_id("batch_1", "batch.cancelled"));
        assert_ne!(a, event_id("batch_2", "batch.completed"));
        let job = WebhookJob {
            event_id: a.clone(),
            event_type: "batch.completed".into(),
            batch_id: "batch_1".into(),
            tenant: "t".into(),
            url: "http://x/".into(),
            created_at: 7,
            raised_at_ms: 7_000,
            attempts: 0,
            waits: 0,
            due_at_ms: 0,
        };
        let again = WebhookJob {
            attempts: 3,
            due_at_ms: 99,
            ..job.clone()
        };
        assert_eq!(job.body(), again.body());
        let body: serde_json::Value = serde_json::from_slice(&job.body()).unwrap();
        assert_eq!(body["data"]["id"], "batch_1");
        assert_eq!(body["id"], a);
    }
}

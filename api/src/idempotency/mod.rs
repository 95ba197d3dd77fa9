//! `Idempotency-Key` on `POST /v1/batches` (every create form) and `POST /v1/files`.
//!
//! A create that carries a key claims it in Redis first (one `SET NX`, per tenant, see
//! [`sluice_store::idempotency`]); of two concurrent requests with one key only one runs.
//!
//! - **The first request** runs its handler while its body is fingerprinted on the way
//!   ([`fingerprint::tee`]). A success (2xx) is recorded with the fingerprint for
//!   `idempotency.retention_secs`; any error frees the key, since nothing was created and the
//!   retry must be free to succeed (a 429 or 503 is transient, a 400 may be fixed). The handler
//!   runs in a task of its own, so a client that hangs up or times out mid-request does not cut a
//!   create short between storing its object and recording the answer, which is exactly when
//!   its retry would otherwise make a second object.
//! - **A later request with the key** has its body fingerprinted (streamed, never held): the same
//!   fingerprint gets the recorded status and body again, with `Idempotent-Replayed: true`; another
//!   gets 409 `idempotency_key_reused`.
//! - **A request while the first still runs** waits up to `idempotency.wait_ms` for its answer
//!   (then as above), or gets 409 `idempotency_key_in_progress`, without `x-should-retry: false`
//!   so the SDKs retry it. It does not read its body while it waits: if the first request fails
//!   and frees the key, the waiting one claims it and runs with its body intact.
//!
//! The claim is a lease of `idempotency.lease_ms`, renewed while the handler runs, so the key of a
//! request whose process died is free again soon. The fingerprint is only known once the whole
//! body has streamed by, so the claim cannot carry it: a duplicate learns whether it matches
//! once the first request has answered.

mod fingerprint;

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_store::idempotency::KeyState;
use tokio::time::Instant;
use tracing::Instrument;

use self::fingerprint::{Fingerprint, FingerprintError, Head, fingerprint, tee};
use crate::auth::Tenant;
use crate::error::{ApiError, IDEMPOTENCY_KEY};
use crate::state::AppState;

/// Set on an answer replayed from the first request with the key (Stripe's name).
pub(crate) const REPLAYED: &str = "idempotent-replayed";
/// How often a request waiting for the first one looks at the key again.
const POLL: Duration = Duration::from_millis(50);

static KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The middleware's state: the app, and the most body bytes a create of its route accepts.
#[derive(Clone)]
pub(crate) struct Guard {
    state: AppState,
    max_body: u64,
}

impl Guard {
    pub(crate) fn new(state: AppState, max_body: u64) -> Self {
        Self { state, max_body }
    }
}

/// What a key is bound to once its first request succeeded.
#[derive(Serialize, Deserialize)]
struct Recorded {
    /// Hex SHA-256 of the first request (see [`fingerprint()`]).
    fingerprint: String,
    status: u16,
    body: String,
}

/// Middleware (`from_fn_with_state`) of the create routes: requests without the header, and
/// other methods of the same paths, pass through untouched.
pub(crate) async fn guard(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    if request.method() != Method::POST || !request.headers().contains_key(&KEY) {
        return next.run(request).await;
    }
    idempotent(guard, request, next)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn idempotent(guard: Guard, request: Request, next: Next) -> Result<Response, ApiError> {
    let state = &guard.state;
    let settings = &state.settings.idempotency;
    let (mut parts, body) = request.into_parts();
    let tenant = Tenant::from_request_parts(&mut parts, state).await?;
    let key = key_of(&parts.headers, settings.max_key_chars)?;
    // The key is stored only as a digest: it is the client's text, of any shape.
    let redis_key = state
        .keys()
        .idempotency(tenant.id(), &hex::encode(Sha256::digest(key.as_bytes())));
    let lease = Duration::from_millis(settings.lease_ms);
    let deadline = Instant::now() + Duration::from_millis(settings.wait_ms);
    let (mut parts, mut body, mut next) = (parts, body, next);
    loop {
        // The claim and the run of a claimed key happen in one task: a request cut off between
        // them (by its deadline or its client) would otherwise hold the key until its lease ran
        // out, and its retry would wait for nothing.
        let attempt = tokio::spawn(
            {
                let guard = guard.clone();
                let redis_key = redis_key.clone();
                async move {
                    let held = guard
                        .state
                        .store
                        .claim_idempotency_key(&redis_key, lease)
                        .await;
                    match held {
                        Ok(KeyState::Claimed(token)) => {
                            let first = First {
                                guard,
                                redis_key,
                                token,
                            };
                            Attempt::Ran(first.run(parts, body, next).await)
                        }
                        Ok(KeyState::Recorded(record)) => {
                            Attempt::NotClaimed(Ok(Some(record)), parts, body, next)
                        }
                        Ok(KeyState::InProgress) => {
                            Attempt::NotClaimed(Ok(None), parts, body, next)
                        }
                        Err(e) => Attempt::NotClaimed(Err(e), parts, body, next),
                    }
                }
            }
            .in_current_span(),
        )
        .await
        .context("An idempotent create task failed")?;
        let held = match attempt {
            Attempt::Ran(response) => return Ok(response),
            Attempt::NotClaimed(held, p, b, n) => {
                (parts, body, next) = (p, b, n);
                held.context("Failed to claim an idempotency key")?
            }
        };
        match held {
            Some(record) => return replay(&guard, &parts, body, &record).await,
            None if Instant::now() < deadline => tokio::time::sleep(POLL).await,
            None => {
                count(state, "in_progress");
                return Err(ApiError::idempotency_key_in_progress(settings.wait_ms));
            }
        }
    }
}

/// One claim of a key: the first request's answer, or the request back with the key's recorded
/// answer (`Some`) or `None` while another request holds it.
enum Attempt {
    Ran(Response),
    NotClaimed(
        Result<Option<String>, sluice_store::StoreError>,
        Parts,
        Body,
        Next,
    ),
}

/// The key a request sends: visible ASCII (what a header value holds as text), not blank, at
/// most `max_chars` long.
fn key_of(headers: &HeaderMap, max_chars: u64) -> Result<String, ApiError> {
    let value = headers.get(&KEY).map(HeaderValue::to_str);
    let key = match value {
        Some(Ok(key)) if !key.trim().is_empty() => key.trim(),
        _ => {
            return Err(ApiError::invalid_value(
                IDEMPOTENCY_KEY,
                format!(
                    "Invalid '{IDEMPOTENCY_KEY}' header: expected a non-empty string of visible ASCII."
                ),
            ));
        }
    };
    if key.len() as u64 > max_chars {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "Invalid '{IDEMPOTENCY_KEY}' header: string too long. Expected at most {max_chars} characters."
            ),
            param: Some(IDEMPOTENCY_KEY.to_owned()),
            code: Some("string_above_max_length"),
        });
    }
    Ok(key.to_owned())
}

fn count(state: &AppState, outcome: &str) {
    state
        .metrics
        .idempotent_requests
        .with_label_values(&[outcome])
        .inc();
}

/// A later request with a key bound to a recorded answer.
async fn replay(
    guard: &Guard,
    parts: &Parts,
    body: Body,
    record: &str,
) -> Result<Response, ApiError> {
    let recorded: Recorded =
        serde_json::from_str(record).context("An idempotency record does not parse")?;
    let ours = fingerprint(&Head::of(parts), body.into_data_stream(), guard.max_body).await;
    match ours {
        Ok(ours) if hex::encode(ours) == recorded.fingerprint => {
            count(&guard.state, "replayed");
            let status = StatusCode::from_u16(recorded.status)
                .context("An idempotency record holds an invalid status")?;
            Ok((
                status,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (HeaderName::from_static(REPLAYED), "true"),
                ],
                recorded.body,
            )
                .into_response())
        }
        Err(FingerprintError::Body(reason)) => Err(ApiError::bad_request(format!(
            "The request body could not be read: {reason}"
        ))),
        Ok(_) | Err(FingerprintError::TooLarge | FingerprintError::Malformed) => {
            count(&guard.state, "mismatch");
            Err(ApiError::idempotency_key_reused())
        }
    }
}

/// The request that holds a key's claim.
struct First {
    guard: Guard,
    redis_key: String,
    token: String,
}

impl First {
    /// Runs the handler in a task of its own (see the module notes) and answers what it answers.
    async fn run(self, parts: Parts, body: Body, next: Next) -> Response {
        let head = Head::of(&parts);
        let (body, tap) = tee(body);
        let cap = self.guard.max_body;
        let hashing = tokio::spawn(async move { fingerprint(&head, tap, cap).await });
        let request = Request::from_parts(parts, body);
        let task = tokio::spawn(
            async move {
                let response = self.renewing(next.run(request)).await;
                self.settle(response, hashing).await
            }
            .in_current_span(),
        );
        match task.await {
            Ok(response) => response,
            Err(e) => ApiError::Internal(anyhow::Error::new(e).context("A create task failed"))
                .into_response(),
        }
    }

    /// Awaits `work`, renewing the claim every third of its lease meanwhile.
    async fn renewing(&self, work: impl Future<Output = Response>) -> Response {
        let state = &self.guard.state;
        let lease = Duration::from_millis(state.settings.idempotency.lease_ms);
        let mut renew = tokio::time::interval_at(Instant::now() + lease / 3, lease / 3);
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                response = &mut work => return response,
                _ = renew.tick() => {
                    match state.store.renew_lease(&self.redis_key, &self.token, lease).await {
                        Ok(true) => {}
                        Ok(false) => tracing::warn!(
                            "A create lost the claim on its Idempotency-Key while running (it \
                             outlasted idempotency.lease_ms unrenewed); a retry may repeat it."
                        ),
                        Err(e) => tracing::warn!(
                            error = %e,
                            "Failed to renew the claim on an Idempotency-Key."
                        ),
                    }
                }
            }
        }
    }

    /// Records a success under the key, or frees the key after a failure.
    async fn settle(
        self,
        response: Response,
        hashing: tokio::task::JoinHandle<Result<Fingerprint, FingerprintError>>,
    ) -> Response {
        if !response.status().is_success() {
            // Nothing was created: the rest of the body need not be read.
            hashing.abort();
            self.release("released").await;
            return response;
        }
        let fingerprint = match hashing.await {
            Ok(Ok(fingerprint)) => fingerprint,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "A create succeeded but its body has no fingerprint; its Idempotency-Key is freed.");
                self.release("released").await;
                return response;
            }
            Err(e) => {
                tracing::warn!(error = %e, "Fingerprinting a create failed; its Idempotency-Key is freed.");
                self.release("released").await;
                return response;
            }
        };
        let (parts, body) = response.into_parts();
        // Our own handlers' JSON (an object of a few KiB), not client input: read whole.
        let bytes = match axum::body::to_bytes(body, usize::MAX).await {
            Ok(bytes) => bytes,
            Err(e) => {
                self.release("released").await;
                return ApiError::Internal(
                    anyhow::Error::new(e).context("Failed to read a create's response"),
                )
                .into_response();
            }
        };
        let record = Recorded {
            fingerprint: hex::encode(fingerprint),
            status: parts.status.as_u16(),
            body: String::from_utf8_lossy(&bytes).into_owned(),
        };
        let record = serde_json::to_string(&record).expect("a record always serializes");
        let state = &self.guard.state;
        let retention = Duration::from_secs(state.settings.idempotency.retention_secs);
        match state
            .store
            .record_idempotent(&self.redis_key, &self.token, &record, retention)
            .await
        {
            Ok(true) => count(state, "created"),
            Ok(false) => tracing::warn!(
                "A create's claim on its Idempotency-Key lapsed before its answer was recorded; a \
                 retry may repeat it."
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "Failed to record a create's answer under its Idempotency-Key; a retry may repeat it."
            ),
        }
        Response::from_parts(parts, Body::from(bytes))
    }

    async fn release(&self, outcome: &str) {
        let state = &self.guard.state;
        count(state, outcome);
        if let Err(e) = state
            .store
            .release_lease(&self.redis_key, &self.token)
            .await
        {
            // The claim lapses after its lease anyway.
            tracing::warn!(error = %e, "Failed to free an Idempotency-Key after a failed create.");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_key(value: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(&KEY, HeaderValue::from_bytes(value).unwrap());
        h
    }

    #[test]
    fn keys_are_visible_ascii_and_bounded() {
        assert_eq!(key_of(&with_key(b"abc-123"), 255).unwrap(), "abc-123");
        assert_eq!(key_of(&with_key(&[b'k'; 255]), 255).unwrap().len(), 255);
        for bad in [&b""[..], b"   ", b"caf\xc3\xa9"] {
            let err = key_of(&with_key(bad), 255).unwrap_err();
            assert!(
                matches!(&err, ApiError::InvalidRequest { param: Some(p), code: Some("invalid_value"), .. } if p == IDEMPOTENCY_KEY),
                "{bad:?}: {err:?}"
            );
        }
        let err = key_of(&with_key(&[b'k'; 256]), 255).unwrap_err();
        assert!(matches!(
            err,
            ApiError::InvalidRequest {
                code: Some("string_above_max_length"),
                ..
            }
        ));
    }
}

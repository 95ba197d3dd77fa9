//! [`ApiError`], the one error type of the HTTP API, and the only place that turns an error into a
//! response: the OpenAI envelope `{"error":{"message","type","param","code"}}`.
//!
//! The envelope matters to clients: the OpenAI SDKs read `error.code`/`error.param`, and they retry
//! 408/409/429/5xx unless `x-should-retry: false` says the answer is deterministic.

use std::sync::Arc;

use axum::Json;
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sluice_core::config::StorageQuota;
use sluice_store::lifecycle_store::{QuotaPart, StorageUsage};

/// Longest `error.message` answered.
const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// Header the OpenAI SDKs obey over their own retry policy.
pub(crate) const SHOULD_RETRY: &str = "x-should-retry";

/// Header that makes a create safe to retry; named as the `param` of its errors.
pub(crate) const IDEMPOTENCY_KEY: &str = "Idempotency-Key";

/// Every way a request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or a parameter is invalid.
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong, for a person.
        message: String,
        /// The offending parameter, as the client named it.
        param: Option<String>,
        /// A machine-readable reason (`invalid_value`, `missing_required_parameter`…).
        code: Option<&'static str>,
    },
    /// 401: the API key is missing or unknown.
    #[error("{message}")]
    Unauthenticated {
        /// Why the key was refused.
        message: &'static str,
    },
    /// 404: no such object for this tenant, or no such route.
    #[error("{message}")]
    NotFound {
        /// What was not found.
        message: String,
    },
    /// 405: the route exists, but not with this method.
    #[error("{message}")]
    MethodNotAllowed {
        /// The method and URL refused.
        message: String,
    },
    /// 409: the object is in a state that forbids the operation.
    #[error("{message}")]
    Conflict {
        /// Why the object's state forbids the operation.
        message: String,
    },
    /// 413: an upload above the configured limit.
    #[error("File is too large: the limit is {limit} bytes.")]
    FileTooLarge {
        /// The largest upload accepted, in bytes.
        limit: u64,
    },
    /// Any other status produced outside our handlers (middleware, framework), re-wrapped.
    #[error("{message}")]
    Status {
        /// The status the response had.
        status: StatusCode,
        /// A message for that status.
        message: String,
    },
    /// 503: a dependency is down (readiness probe).
    #[error("{message}")]
    NotReady {
        /// Which dependency is down.
        message: String,
    },
    /// A deterministic answer with its own status and code (429 `batch_limit_exceeded`, 501
    /// `not_implemented`, 503 `no_provider_configured`…), optionally listing per-line `errors`.
    #[error("{message}")]
    Coded {
        /// The HTTP status.
        status: StatusCode,
        /// What happened, for a person.
        message: String,
        /// The parameter the answer is about, if any.
        param: Option<String>,
        /// The machine-readable `error.code`.
        code: &'static str,
        /// Per-line errors, sent as `error.errors`.
        errors: Option<Value>,
    },
    /// 409 `idempotency_key_in_progress`: another request with the same `Idempotency-Key` is still
    /// running. The only 4xx the SDKs should retry: a later attempt gets that request's answer.
    #[error("{message}")]
    KeyInProgress {
        /// How long the request waited, and what to do.
        message: String,
    },
    /// 429 `budget_exceeded`: the tenant's token or request budget is spent until `reset_at`
    /// (unix seconds), sent in the `sluice-budget-reset` and `retry-after` headers too.
    #[error("{message}")]
    BudgetExceeded {
        /// Which budget is spent, and until when.
        message: String,
        /// When the budget resets (unix seconds).
        reset_at: i64,
    },
    /// 500: our fault. The client sees an opaque message; the source is logged.
    #[error("The server had an error while processing your request.")]
    Internal(#[from] anyhow::Error),
}

/// Marks a response whose body already is the envelope, so [`ensure_envelope`] leaves it alone.
#[derive(Debug, Clone, Copy)]
struct Enveloped;

/// The source of a 5xx, carried to [`ensure_envelope`] so that logging happens inside the request
/// span and `into_response` stays free of side effects.
#[derive(Debug, Clone)]
struct ServerErrorSource(Arc<anyhow::Error>);

impl ApiError {
    /// 429 `insufficient_capacity`: with `limits.admission = "strict"`, the batch cannot finish
    /// within its completion window under the provider's current load.
    pub fn insufficient_capacity(message: String) -> Self {
        Self::Coded {
            status: StatusCode::TOO_MANY_REQUESTS,
            message,
            param: Some("completion_window".into()),
            code: "insufficient_capacity",
            errors: None,
        }
    }

    /// 400 `invalid_value` on `param`.
    pub fn invalid_value(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
            code: Some("invalid_value"),
        }
    }

    /// 400 `invalid_type` on `param`, worded like OpenAI's.
    pub fn invalid_type(param: &str, expected: &str, got: &Value) -> Self {
        Self::InvalidRequest {
            message: format!(
                "Invalid type for '{param}': expected {expected}, but got {} instead.",
                json_type_name(got)
            ),
            param: Some(param.to_owned()),
            code: Some("invalid_type"),
        }
    }

    /// 400 `missing_required_parameter` on `param`.
    pub fn missing(param: &str) -> Self {
        Self::InvalidRequest {
            message: format!("Missing required parameter: '{param}'."),
            param: Some(param.to_owned()),
            code: Some("missing_required_parameter"),
        }
    }

    /// 400 with neither param nor code.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 403 `storage_quota_exceeded`: storing `adding` more bytes (one more file) would take the
    /// tenant past its quota. Deterministic until the tenant deletes files or they expire.
    pub fn storage_quota_exceeded(
        part: QuotaPart,
        usage: StorageUsage,
        quota: StorageQuota,
        adding: u64,
    ) -> Self {
        let message = match part {
            QuotaPart::Bytes => format!(
                "Storage quota exceeded: this file ({adding} bytes) would bring your stored files \
                 to {} bytes, over your quota of {} bytes ({} bytes in use). Delete files, or let \
                 them expire, and upload again.",
                usage.bytes.saturating_add(adding),
                quota.bytes,
                usage.bytes
            ),
            QuotaPart::Files => format!(
                "Storage quota exceeded: you store {} files, and your quota is {} files. Delete \
                 files, or let them expire, and upload again.",
                usage.files, quota.files
            ),
        };
        Self::Coded {
            status: StatusCode::FORBIDDEN,
            message,
            param: Some("file".into()),
            code: "storage_quota_exceeded",
            errors: None,
        }
    }

    /// 409 `idempotency_key_reused`: the key is bound to a request that differs from this one.
    pub fn idempotency_key_reused() -> Self {
        Self::Coded {
            status: StatusCode::CONFLICT,
            message: "This Idempotency-Key was already used with a different request (another \
                      body, form or endpoint). A retry must repeat the first request exactly; \
                      use a new key for a new request."
                .into(),
            param: Some(IDEMPOTENCY_KEY.into()),
            code: "idempotency_key_reused",
            errors: None,
        }
    }

    /// 409 `idempotency_key_in_progress` after waiting `waited_ms` for the request holding the key.
    pub fn idempotency_key_in_progress(waited_ms: u64) -> Self {
        Self::KeyInProgress {
            message: format!(
                "Another request with this Idempotency-Key is still in progress (waited \
                 {waited_ms} ms for its answer). Retry later: the retry gets that request's \
                 answer."
            ),
        }
    }

    /// 404 for a file id the caller cannot see.
    pub fn file_not_found(id: &str) -> Self {
        Self::NotFound {
            message: format!("No such File object: {id}"),
        }
    }

    /// 404 for a batch id the caller cannot see.
    pub fn batch_not_found(id: &str) -> Self {
        Self::NotFound {
            message: format!("No batch found with id '{id}'."),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict { .. } | Self::KeyInProgress { .. } => StatusCode::CONFLICT,
            Self::FileTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Status { status, .. } => *status,
            Self::NotReady { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Coded { status, .. } => *status,
            Self::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The `error` object of the envelope.
    fn body(&self) -> Value {
        let (param, code): (Option<&str>, Option<&str>) = match self {
            Self::InvalidRequest { param, code, .. } => (param.as_deref(), *code),
            Self::Unauthenticated { .. } => (None, Some("invalid_api_key")),
            Self::FileTooLarge { .. } => (Some("file"), Some("file_too_large")),
            Self::Coded { param, code, .. } => (param.as_deref(), Some(*code)),
            Self::KeyInProgress { .. } => {
                (Some(IDEMPOTENCY_KEY), Some("idempotency_key_in_progress"))
            }
            Self::BudgetExceeded { .. } => (None, Some("budget_exceeded")),
            _ => (None, None),
        };
        let kind = if self.status().is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        // A message may echo client text; a bounded answer whatever a handler put in it.
        let mut message = self.to_string();
        if message.len() > MAX_MESSAGE_BYTES {
            message = sluice_core::validate::clip(&message, MAX_MESSAGE_BYTES).into_owned();
        }
        let mut body = json!({
            "error": {
                "message": message,
                "type": kind,
                "param": param,
                "code": code,
            }
        });
        if let Self::Coded {
            errors: Some(errors),
            ..
        } = self
        {
            body["error"]["errors"] = errors.clone();
        }
        body
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, Json(self.body())).into_response();
        // A 4xx other than 429 will fail the same way again; without this the SDK retries 409s.
        // A coded 5xx (501, 503 "not configured") is deterministic too.
        let deterministic = (status.is_client_error() || matches!(self, Self::Coded { .. }))
            && !matches!(self, Self::KeyInProgress { .. });
        if deterministic && status != StatusCode::TOO_MANY_REQUESTS {
            response
                .headers_mut()
                .insert(SHOULD_RETRY, HeaderValue::from_static("false"));
        }
        if let Self::BudgetExceeded { reset_at, .. } = &self {
            budget_headers(response.headers_mut(), *reset_at);
        }
        response.extensions_mut().insert(Enveloped);
        if let Self::Internal(source) = self {
            response
                .extensions_mut()
                .insert(ServerErrorSource(Arc::new(source)));
        }
        response
    }
}

/// When a spent budget resets: `sluice-budget-reset` (unix seconds) and `retry-after` (seconds
/// from now). The SDKs wait out a `retry-after` of a minute at most, so a later reset is marked
/// not worth retrying.
fn budget_headers(headers: &mut axum::http::HeaderMap, reset_at: i64) {
    let wait = (reset_at - sluice_core::domain::now_secs()).max(1);
    headers.insert(BUDGET_RESET, HeaderValue::from(reset_at));
    headers.insert(header::RETRY_AFTER, HeaderValue::from(wait));
    if wait > 60 {
        headers.insert(SHOULD_RETRY, HeaderValue::from_static("false"));
    }
}

/// Header of a `budget_exceeded` answer: when the budget resets (unix seconds).
pub(crate) const BUDGET_RESET: &str = "sluice-budget-reset";

/// Middleware (via `map_response`): logs the source of our 5xx, and re-wraps any error response
/// that did not come from [`ApiError`] (framework 405s, body-limit 413s…) in the envelope.
pub(crate) async fn ensure_envelope(mut response: Response) -> Response {
    if let Some(ServerErrorSource(source)) = response.extensions_mut().remove::<ServerErrorSource>()
    {
        // `{:#}` prints the whole context chain on one line.
        tracing::error!(error = %format_args!("{source:#}"), "Request failed.");
    }
    let status = response.status();
    if status.as_u16() < 400 || response.extensions().get::<Enveloped>().is_some() {
        return response;
    }
    let message = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "The request body is too large.".to_owned(),
        StatusCode::METHOD_NOT_ALLOWED => "Method not allowed for this URL.".to_owned(),
        _ => status
            .canonical_reason()
            .map_or_else(|| format!("HTTP {status}"), |r| format!("{r}.")),
    };
    let allow = response.headers().get(header::ALLOW).cloned();
    let mut wrapped = ApiError::Status { status, message }.into_response();
    if let Some(allow) = allow {
        wrapped.headers_mut().insert(header::ALLOW, allow);
    }
    wrapped
}

/// "an array", "a string"…: how OpenAI names a JSON value's type in messages.
pub(crate) fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::bad_request(rejection.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::bad_request(format!("Invalid query string: {}", rejection.body_text()))
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Self::Status {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                message: "The request body is too large.".into(),
            },
            _ => Self::bad_request(format!(
                "Could not read the request body: {}",
                rejection.body_text()
            )),
        }
    }
}

impl From<MultipartRejection> for ApiError {
    fn from(rejection: MultipartRejection) -> Self {
        Self::bad_request(format!(
            "Expected a multipart/form-data body: {}",
            rejection.body_text()
        ))
    }
}

impl From<MultipartError> for ApiError {
    fn from(error: MultipartError) -> Self {
        Self::bad_request(format!(
            "Could not read the multipart body: {}",
            error.body_text()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parts(error: ApiError) -> (StatusCode, Option<String>, Value) {
        let response = error.into_response();
        let status = response.status();
        let retry = response
            .headers()
            .get(SHOULD_RETRY)
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, retry, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn every_error_has_the_four_envelope_keys() {
        for error in [
            ApiError::missing("purpose"),
            ApiError::Unauthenticated { message: "x" },
            ApiError::batch_not_found("batch_1"),
            ApiError::Conflict {
                message: "no".into(),
            },
            ApiError::FileTooLarge { limit: 10 },
            ApiError::Internal(anyhow::anyhow!("redis down")),
        ] {
            let (_, _, body) = parts(error).await;
            let inner = body["error"].as_object().unwrap();
            for key in ["message", "type", "param", "code"] {
                assert!(inner.contains_key(key), "{key} missing in {body}");
            }
        }
    }

    #[tokio::test]
    async fn conflicts_are_not_retried_but_server_errors_are() {
        let (status, retry, body) = parts(ApiError::Conflict {
            message: "Cannot cancel a batch with status 'completed'.".into(),
        })
        .await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(retry.as_deref(), Some("false"));
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], Value::Null);

        let (status, retry, body) =
            parts(ApiError::Internal(anyhow::anyhow!("secret detail"))).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(retry, None);
        assert_eq!(body["error"]["type"], "server_error");
        assert!(!body.to_string().contains("secret detail"));
    }

    #[tokio::test]
    async fn a_key_in_progress_is_retried_but_a_reused_key_is_not() {
        let (status, retry, body) = parts(ApiError::idempotency_key_in_progress(10)).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(retry, None);
        assert_eq!(body["error"]["code"], "idempotency_key_in_progress");
        assert_eq!(body["error"]["param"], "Idempotency-Key");
        let (status, retry, body) = parts(ApiError::idempotency_key_reused()).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(retry.as_deref(), Some("false"));
        assert_eq!(body["error"]["code"], "idempotency_key_reused");
    }

    #[tokio::test]
    async fn file_too_large_names_the_limit_and_the_file_param() {
        let (status, _, body) = parts(ApiError::FileTooLarge { limit: 1024 }).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            body["error"],
            json!({"message": "File is too large: the limit is 1024 bytes.",
                   "type": "invalid_request_error", "param": "file", "code": "file_too_large"})
        );
    }

    #[tokio::test]
    async fn a_spent_budget_says_when_it_resets() {
        let far = sluice_core::domain::now_secs() + 3_600;
        let response = ApiError::BudgetExceeded {
            message: "spent".into(),
            reset_at: far,
        }
        .into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[BUDGET_RESET], far.to_string().as_str());
        let wait: i64 = response.headers()[header::RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((3_590..=3_600).contains(&wait), "{wait}");
        assert_eq!(response.headers()[SHOULD_RETRY], "false");
        let (_, retry, body) = parts(ApiError::BudgetExceeded {
            message: "spent".into(),
            reset_at: sluice_core::domain::now_secs() + 5,
        })
        .await;
        assert_eq!(
            retry, None,
            "a reset within a minute is worth the SDK's wait"
        );
        assert_eq!(body["error"]["code"], "budget_exceeded");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }

    #[tokio::test]
    async fn foreign_error_responses_are_rewrapped() {
        let raw = (StatusCode::METHOD_NOT_ALLOWED, "plain text").into_response();
        let response = ensure_envelope(raw).await;
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[SHOULD_RETRY], "false");
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
}

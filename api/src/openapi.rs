//! The OpenAPI 3.1 document served at `/openapi.json`.
//!
//! Paths and operations come from the `#[utoipa::path]` attribute on each handler, collected by
//! the router itself ([`crate::router`] registers handlers through `utoipa_axum::routes!`),
//! so a route cannot exist without its entry. The types below describe the JSON the handlers
//! answer; schemathesis in CI checks real responses against them, so they cannot drift either.

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Document-level information, security schemes and tags; the paths are added by the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sluice",
        description = "Self-hosted, OpenAI-compatible Files and Batches API.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    security(("bearer" = []), ("api_key" = [])),
    modifiers(&SecuritySchemes),
    tags(
        (name = "files", description = "Input and result files."),
        (name = "batches", description = "Batches of requests run against an upstream model."),
        (name = "usage", description = "The tenant's token and request budget."),
        (name = "health", description = "Liveness and readiness."),
    ),
)]
pub(crate) struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}

/// `{"error": {...}}`: every error Sluice answers.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorResponse {
    pub error: ErrorBody,
}

/// What went wrong, in OpenAI's terms.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    pub message: String,
    /// `invalid_request_error`, `server_error`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// A stable, machine-readable code, if there is one.
    pub code: Option<String>,
}

/// A stored file.
#[derive(Serialize, ToSchema)]
#[schema(as = File)]
pub(crate) struct FileObject {
    pub id: String,
    /// Always `file`.
    #[schema(pattern = "^file$")]
    pub object: String,
    pub bytes: i64,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub filename: String,
    /// `batch` for inputs, `batch_output` for results.
    pub purpose: String,
    /// Always `processed`: a file is usable once its upload returns.
    pub status: String,
    pub status_details: Option<String>,
}

/// The answer to `DELETE /v1/files/{file_id}`.
#[derive(Serialize, ToSchema)]
pub(crate) struct DeletedFile {
    pub id: String,
    pub object: String,
    pub deleted: bool,
}

/// The multipart form of `POST /v1/files`.
#[derive(ToSchema)]
#[expect(dead_code, reason = "described in the API document, never built")]
pub(crate) struct UploadForm {
    /// The JSONL file, one request per line.
    #[schema(value_type = String, format = Binary)]
    pub file: Vec<u8>,
    /// Must be `batch`.
    pub purpose: String,
}

/// Listing order.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[expect(dead_code, reason = "described in the API document, never built")]
pub(crate) enum Order {
    Asc,
    Desc,
}

/// A page of files.
#[derive(Serialize, ToSchema)]
pub(crate) struct FileList {
    pub object: String,
    pub data: Vec<FileObject>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// A batch: its status, counts, result files and token usage.
#[derive(Serialize, ToSchema)]
pub(crate) struct Batch {
    pub id: String,
    /// Always `batch`.
    pub object: String,
    pub endpoint: String,
    /// The model every request of the batch names; null until validated, and for a batch whose
    /// requests name different models (`limits.one_model_per_batch = false`).
    pub model: Option<String>,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    /// `validating`, `failed`, `in_progress`, `finalizing`, `completed`, `expired`,
    /// `cancelling` or `cancelled`.
    pub status: String,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub request_counts: RequestCounts,
    pub usage: BatchUsage,
    pub metadata: Option<BTreeMap<String, String>>,
    /// Only on a batch made by `POST /v1/batches/{batch_id}/retry`: the batch it retries.
    pub retry_of: Option<String>,
    /// Only on a batch that was retried: its retries, oldest first.
    pub retries: Option<Vec<String>>,
}

/// Why validation failed: one entry per bad line.
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchErrors {
    pub object: String,
    pub data: Vec<BatchError>,
}

/// One validation error.
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchError {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
    /// 1-based line of the input file.
    pub line: Option<i64>,
}

/// Lines by outcome so far.
#[derive(Serialize, ToSchema)]
pub(crate) struct RequestCounts {
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
}

/// Tokens summed over the upstream responses.
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchUsage {
    pub input_tokens: i64,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: i64,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: i64,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct InputTokensDetails {
    pub cached_tokens: i64,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct OutputTokensDetails {
    pub reasoning_tokens: i64,
}

/// A page of batches, newest first.
#[derive(Serialize, ToSchema)]
pub(crate) struct BatchList {
    pub object: String,
    pub data: Vec<Batch>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// `POST /v1/batches` as JSON: either over an uploaded file (`input_file_id`, `endpoint`) or
/// with the requests inline (`requests`).
#[derive(Serialize, ToSchema)]
pub(crate) struct CreateBatchRequest {
    /// An uploaded file of purpose `batch`.
    #[schema(min_length = 1)]
    pub input_file_id: Option<String>,
    /// The endpoint every request of the batch calls.
    pub endpoint: Option<Endpoint>,
    /// `24h`, or another duration (`90s`, `30m`, `2h`, `7d`) within the configured bounds.
    pub completion_window: Option<String>,
    /// Up to 16 pairs; keys up to 64 characters, values up to 512.
    pub metadata: Option<BTreeMap<String, String>>,
    pub output_expires_after: Option<ExpiresAfter>,
    /// Inline requests, instead of `input_file_id`.
    pub requests: Option<Vec<InlineRequest>>,
}

/// `POST /v1/batches/{batch_id}/retry`: which rows of the finished batch to run again, and the
/// new batch's settings. Every field is optional.
#[derive(Serialize, ToSchema)]
pub(crate) struct RetryBatchRequest {
    /// Rows to take by outcome (default: all three): `failed` (ran and failed), `expired` and
    /// `cancelled` (never ran: the batch expired or was cancelled first).
    pub statuses: Option<Vec<RetryStatus>>,
    /// Only rows with one of these error codes (`error.code`, else the upstream error's `code`
    /// or `type`), or HTTP statuses such as `"429"`.
    pub codes: Option<Vec<String>>,
    /// The new batch's window (default: the retried batch's).
    pub completion_window: Option<String>,
    /// The new batch's metadata (default: the retried batch's).
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Outcomes of rows a retry can take.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[expect(dead_code, reason = "described in the API document, never built")]
pub(crate) enum RetryStatus {
    Failed,
    Expired,
    Cancelled,
}

/// The endpoints a batch can call.
#[derive(Serialize, ToSchema)]
#[allow(
    dead_code,
    reason = "described in the API document, built only by its tests"
)]
pub(crate) enum Endpoint {
    #[serde(rename = "/v1/chat/completions")]
    ChatCompletions,
    #[serde(rename = "/v1/embeddings")]
    Embeddings,
    #[serde(rename = "/v1/completions")]
    Completions,
    #[serde(rename = "/v1/responses")]
    Responses,
    #[serde(rename = "/v1/moderations")]
    Moderations,
}

/// When result files expire.
#[derive(Serialize, ToSchema)]
pub(crate) struct ExpiresAfter {
    /// Always `created_at`.
    pub anchor: String,
    /// Between 3600 and 2592000.
    pub seconds: i64,
}

/// One inline request.
#[derive(Serialize, ToSchema)]
pub(crate) struct InlineRequest {
    pub custom_id: String,
    /// The request body sent to the endpoint; it names the `model`.
    pub body: serde_json::Value,
}

/// `{"status": "ok"}` or the failing dependencies.
#[derive(Serialize, ToSchema)]
pub(crate) struct Health {
    pub status: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_endpoints_are_the_supported_ones() {
        let documented: Vec<String> = [
            Endpoint::ChatCompletions,
            Endpoint::Embeddings,
            Endpoint::Completions,
            Endpoint::Responses,
            Endpoint::Moderations,
        ]
        .iter()
        .map(|e| {
            serde_json::to_value(e)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
        assert_eq!(documented, sluice_core::domain::SUPPORTED_ENDPOINTS);
    }
}

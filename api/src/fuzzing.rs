//! Entry points for the fuzz targets in `fuzz/` and nothing else: thin wrappers over the create
//! body's form detection and parsers, so the targets reach them without the handlers' state
//! (Redis, storage). Hidden from the docs; not a stable API.

use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::Value;

use crate::error::ApiError;

/// Whether the content type announces JSON Lines (`POST /v1/batches`).
pub fn is_jsonl(headers: &HeaderMap) -> bool {
    crate::routes::batches::create::is_jsonl(headers)
}

/// Whether an untyped create body is request lines rather than one create object.
pub fn looks_like_lines(bytes: &[u8]) -> bool {
    crate::routes::batches::create::looks_like_lines(bytes)
}

/// The JSON parse of every JSON request body.
pub fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    crate::extract::parse_json(bytes)
}

/// The parameters check of the create over an uploaded file.
pub fn parse_file_create(body: &Value, bounds: (Duration, Duration)) -> Result<(), ApiError> {
    crate::routes::batches::params::CreateBatch::parse(body, bounds).map(drop)
}

/// `completion_window` within `bounds`.
pub fn parse_completion_window(
    window: &str,
    bounds: (Duration, Duration),
) -> Result<Duration, ApiError> {
    crate::routes::batches::params::parse_completion_window(window, bounds)
}

/// `metadata` as stored (compact JSON).
pub fn parse_metadata(value: Option<&Value>) -> Result<Option<String>, ApiError> {
    crate::routes::batches::params::parse_metadata(value)
}

/// `output_expires_after` in seconds.
pub fn parse_output_expiry(value: Option<&Value>) -> Result<Option<i64>, ApiError> {
    crate::routes::batches::params::parse_output_expiry(value)
}

/// An error as the client receives it: status and body.
pub fn error_response(error: ApiError) -> (StatusCode, Value) {
    let response = error.into_response();
    let status = response.status();
    // The body is a complete `Json` buffer, so no runtime is needed to read it.
    let bytes = futures::executor::block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
        .expect("an in-memory body reads whole");
    let body = serde_json::from_slice(&bytes).expect("an error body is JSON");
    (status, body)
}

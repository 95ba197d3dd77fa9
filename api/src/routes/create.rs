//! `POST /v1/batches`: the one entry of every way to create a batch, told apart by the request.
//!
//! - `Content-Type: application/jsonl` (or `x-ndjson`…): one request per line (seed 003), streamed;
//! - a JSON object with `requests` and no `input_file_id`: an inline batch (seed 000/001);
//! - a body whose first line is a request line (`custom_id`…), whatever the content type: JSONL;
//! - anything else: the OpenAI create over an uploaded file, with its usual errors.

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use serde_json::Value;

use super::batches::create_from_json;
use super::{inline, jsonl_body};
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::parse_json;
use crate::state::AppState;

/// `POST /v1/batches`.
#[utoipa::path(post, path = "/batches", operation_id = "createBatch", tag = "batches",
    request_body(description = "A batch over an uploaded file, inline requests, or a JSONL body of request lines.",
        content(
            (crate::openapi::CreateBatchRequest = "application/json"),
            (String = "application/jsonl"),
        )),
    responses((status = 200, description = "The new batch, `validating`", body = crate::openapi::Batch), (status = 400, description = "Invalid request", body = crate::openapi::ErrorResponse), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 413, description = "Over the size limit", body = crate::openapi::ErrorResponse), (status = 429, description = "Too many open batches", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse), (status = 501, description = "The provider does not take batch work", body = crate::openapi::ErrorResponse), (status = 503, description = "Not ready, or no provider configured", body = crate::openapi::ErrorResponse)))]
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let jsonl = is_jsonl(request.headers());
    let body: Body = request.into_body();
    if jsonl {
        return jsonl_body::create(&state, &tenant, body.into_data_stream())
            .await
            .map(Json);
    }
    let limit = state.settings.limits.max_upload_bytes;
    let bytes = axum::body::to_bytes(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .await
        .map_err(|_| ApiError::Coded {
            status: axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "The request body could not be read whole: it is over the limit of {limit} \
                 bytes, or the connection broke."
            ),
            param: None,
            code: "request_too_large",
            errors: None,
        })?;
    if looks_like_lines(&bytes) {
        let chunks = futures::stream::iter([Ok::<_, std::convert::Infallible>(bytes)]);
        return jsonl_body::create(&state, &tenant, chunks).await.map(Json);
    }
    let body = parse_json(&bytes)?;
    if let Some(map) = body.as_object()
        && map.contains_key("requests")
        && !map.contains_key("input_file_id")
    {
        return inline::create(&state, &tenant, map).await.map(Json);
    }
    create_from_json(&state, &tenant, &body).await.map(Json)
}

/// Whether the content type announces JSON Lines.
fn is_jsonl(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    ["jsonl", "ndjson", "json-lines", "jsonlines", "json-seq"]
        .iter()
        .any(|kind| essence.ends_with(kind))
}

/// Whether a body is request lines rather than one create object: its first non-blank line is a
/// JSON object with a `custom_id` (and no `input_file_id` / `requests`).
fn looks_like_lines(bytes: &[u8]) -> bool {
    let Some(first) = bytes
        .split(|b| *b == b'\n')
        .map(<[u8]>::trim_ascii)
        .find(|l| !l.is_empty())
    else {
        return false;
    };
    match serde_json::from_slice::<serde_json::Map<String, Value>>(first) {
        Ok(map) => {
            map.contains_key("custom_id")
                && !map.contains_key("input_file_id")
                && !map.contains_key("requests")
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn jsonl_bodies_are_recognised_by_type_or_shape() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/jsonl; charset=utf-8"),
        );
        assert!(is_jsonl(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-ndjson"),
        );
        assert!(is_jsonl(&h));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(!is_jsonl(&h));

        let lines = b"\n{\"custom_id\":\"a\",\"body\":{}}\n{\"custom_id\":\"b\",\"body\":{}}\n";
        assert!(looks_like_lines(lines));
        assert!(looks_like_lines(
            br#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}"#
        ));
        assert!(!looks_like_lines(
            br#"{"input_file_id":"f","endpoint":"/v1/chat/completions"}"#
        ));
        assert!(!looks_like_lines(b"{\n  \"custom_id\": \"a\"\n}"));
        assert!(!looks_like_lines(br#"{"requests":[{"custom_id":"a"}]}"#));
        assert!(!looks_like_lines(b"not json"));
    }
}

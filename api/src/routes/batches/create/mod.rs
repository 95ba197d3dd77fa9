//! `POST /v1/batches`: the one entry of every way to create a batch, told apart by the request.
//!
//! - `Content-Type: application/jsonl` (or `x-ndjson`…): one request per line, streamed;
//! - a JSON object with `requests` and no `input_file_id`: an inline batch;
//! - a body whose first line is a request line (`custom_id`…), whatever the content type: JSONL;
//! - anything else: the OpenAI create over an uploaded file, with its usual errors.
//!
//! Memory is bounded by configuration: a JSONL body and a large inline body stream into storage
//! line by line (element by element), and only the first `limits.max_json_body_bytes` of any other
//! body are held; a body of another form above that is refused with 413.

use axum::Json;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use bytes::BytesMut;
use futures::StreamExt;
use serde_json::Value;

use self::from_file::create_from_json;
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::parse_json;
use crate::state::AppState;

pub(crate) mod defaults;
mod from_file;
mod inline;
pub(crate) mod input_lines;
mod jsonl_body;
pub(crate) mod too_large;

/// `POST /v1/batches`.
#[utoipa::path(post, path = "/batches", operation_id = "createBatch", tag = "batches",
    request_body(description = "A batch over an uploaded file, inline requests, or a JSONL body of request lines.",
        content(
            (crate::openapi::CreateBatchRequest = "application/json"),
            (String = "application/jsonl"),
        )),
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the create safe to retry: the same key with the same request within `idempotency.retention_secs` (24 h) answers the first success again (with `idempotent-replayed: true`) and creates nothing. Per tenant; at most `idempotency.max_key_chars` (255) visible ASCII characters.")),
    responses((status = 200, description = "The new batch, `validating`", body = crate::openapi::Batch, headers(("idempotent-replayed" = String, description = "`true` when this is the recorded answer to an earlier request with the same `Idempotency-Key`."))), (status = 400, description = "Invalid request", body = crate::openapi::ErrorResponse), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 403, description = "Inline or JSONL-body requests would take the tenant past its storage quota (`storage_quota_exceeded`)", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 409, description = "The `Idempotency-Key` was used with another request (`idempotency_key_reused`), or its first request is still running (`idempotency_key_in_progress`, retryable)", body = crate::openapi::ErrorResponse), (status = 413, description = "Over the size limit", body = crate::openapi::ErrorResponse), (status = 429, description = "Too many open batches (`batch_limit_exceeded`), or the tenant's budget is spent (`budget_exceeded`, with the reset in `sluice-budget-reset` and `retry-after`)", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse), (status = 501, description = "The provider does not take batch work", body = crate::openapi::ErrorResponse), (status = 503, description = "Not ready, or no provider configured", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let jsonl = is_jsonl(request.headers());
    let body: Body = request.into_body();
    let mut chunks = body.into_data_stream().map(|chunk| {
        chunk.map_err(|e| ApiError::bad_request(format!("The request body could not be read: {e}")))
    });
    if jsonl {
        return jsonl_body::create(&state, &tenant, chunks).await.map(Json);
    }
    // Only the first `max_json_body_bytes` (and one chunk) are held: enough to tell the forms
    // apart and to parse an ordinary create object; a longer body streams or is refused.
    let cap = state.settings.limits.max_json_body_bytes;
    let mut head = BytesMut::new();
    let mut whole = false;
    while head.len() as u64 <= cap {
        match chunks.next().await {
            Some(chunk) => head.extend_from_slice(&chunk?),
            None => {
                whole = true;
                break;
            }
        }
    }
    let head = head.freeze();
    if looks_like_lines(&head) {
        let all = futures::stream::iter([Ok(head)]).chain(chunks);
        return jsonl_body::create(&state, &tenant, all).await.map(Json);
    }
    if !whole {
        return inline::streamed::create(&state, &tenant, head, chunks)
            .await
            .map(Json);
    }
    let body = parse_json(&head)?;
    if let Some(map) = body.as_object()
        && map.contains_key("requests")
        && !map.contains_key("input_file_id")
    {
        return inline::whole::create(&state, &tenant, map).await.map(Json);
    }
    create_from_json(&state, &tenant, &body).await.map(Json)
}

/// Whether the content type announces JSON Lines.
pub(crate) fn is_jsonl(headers: &HeaderMap) -> bool {
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
pub(crate) fn looks_like_lines(bytes: &[u8]) -> bool {
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

#[cfg(test)]
mod form_properties {
    use super::*;
    use axum::http::HeaderValue;
    use proptest::prelude::*;

    fn content_type(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(header::CONTENT_TYPE, v);
        }
        h
    }

    /// Flips the case of the letters `mask` selects.
    fn recase(s: &str, mask: u64) -> String {
        s.chars()
            .enumerate()
            .map(|(i, c)| {
                if mask >> (i % 64) & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    }

    proptest! {
        /// The media type decides, whatever its case, surrounding spaces and parameters.
        #[test]
        fn jsonl_detection_ignores_case_and_parameters(
            kind in prop_oneof![
                Just(("application/jsonl", true)),
                Just(("application/x-ndjson", true)),
                Just(("application/json-seq", true)),
                Just(("application/json", false)),
                Just(("text/plain", false)),
            ],
            mask in any::<u64>(),
            params in "( ?; ?[a-z]{1,8}=[a-z0-9-]{0,8}){0,3}",
        ) {
            let (essence, jsonl) = kind;
            let value = format!(" {}{params}", recase(essence, mask));
            prop_assert_eq!(is_jsonl(&content_type(&value)), jsonl, "{}", value);
        }

        /// Request lines are told from one create object by their first non-blank line alone.
        #[test]
        fn lines_are_told_by_their_first_line(
            blank in "[ \t\r\n]{0,6}",
            first in prop_oneof![
                Just((r#"{"custom_id":"a","body":{}}"#, true)),
                Just((r#"{"custom_id":"a","requests":[]}"#, false)),
                Just((r#"{"input_file_id":"f","custom_id":"a"}"#, false)),
                Just((r#"{"requests":[{"custom_id":"a"}]}"#, false)),
                Just(("[1]", false)),
            ],
            rest in prop::collection::vec(any::<String>(), 0..4),
        ) {
            let (line, lines) = first;
            let body = format!("{blank}{line}\n{}", rest.join("\n"));
            prop_assert_eq!(looks_like_lines(body.as_bytes()), lines, "{:?}", body);
        }
    }
}

//! `GET /v1/batches/{batch_id}/output`: a finished batch's results as one line per input item.
//!
//! Sluice never calls an upstream while answering a create (all upstream work is asynchronous), so
//! a synchronous 502 does not occur: an item whose upstream fails for good shows it here (task
//! models: `status_code` 502, "Upstream batch router request failed").

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::Context;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use object_store::ObjectStore;
use object_store::path::Path;
use serde_json::{Value, json};
use sluice_core::domain::{BatchStatus, failure_of};
use sluice_runtime::lines::RequestLines;

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::routes::batches::lookup::load_batch;
use crate::routes::download::attachment;
use crate::state::AppState;

/// Reshaped `/output` bytes gathered before one chunk is sent.
const OUTPUT_CHUNK: usize = 64 * 1024;

/// `GET /v1/batches/{batch_id}/output`: one JSONL line per input item, `{custom_id, response:
/// {status_code, body} | null, error: {code, message} | null}`, successes (in input order) then
/// failures (in input order). 409 while the batch is not finished.
#[utoipa::path(get, path = "/batches/{batch_id}/output", operation_id = "batchOutput", tag = "batches", params(("batch_id" = String, Path, description = "A batch id.")),
    responses((status = 200, description = "One JSONL line per input item: `custom_id`, `response`, `error`", content_type = "application/jsonl", body = String), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflicts with the batch's status", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn output(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(batch_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let meta = load_batch(&state, &tenant, &batch_id).await?;
    let status = meta.status;
    if !status.is_some_and(BatchStatus::is_terminal) {
        return Err(ApiError::Conflict {
            message: format!(
                "Batch {batch_id} is not finished (status '{}'); its output is available once it \
                 is completed, failed, expired or cancelled.",
                status.map_or("unknown", BatchStatus::as_str)
            ),
        });
    }
    let mut paths = VecDeque::new();
    for file_id in [&meta.output_file_id, &meta.error_file_id] {
        let Some(file_id) = file_id else {
            continue;
        };
        let file = state
            .store
            .get_file(file_id)
            .await
            .context("Failed to read a result file record")?
            .filter(|f| f.tenant() == tenant.id());
        if let Some(file) = file {
            paths.push_back(Path::from(file.path()));
        }
    }
    let mut response = reshaped_response(state.files.clone(), paths);
    attachment(
        response.headers_mut(),
        &format!("{batch_id}_output.jsonl"),
        &batch_id,
    );
    Ok(response)
}

/// A streamed `application/jsonl` response of the result files at `paths`, each line reshaped.
pub(crate) fn reshaped_response(files: Arc<dyn ObjectStore>, paths: VecDeque<Path>) -> Response {
    struct Reading {
        files: Arc<dyn ObjectStore>,
        paths: VecDeque<Path>,
        current: Option<RequestLines>,
    }
    let start = Reading {
        files,
        paths,
        current: None,
    };
    let stream = futures::stream::try_unfold(start, |mut st| async move {
        let mut chunk = BytesMut::new();
        loop {
            if st.current.is_none() {
                let Some(path) = st.paths.pop_front() else {
                    break;
                };
                st.current = Some(RequestLines::open(&st.files, &path, usize::MAX).await?);
            }
            let reader = st.current.as_mut().expect("a file is open");
            match reader.next_line().await? {
                None => st.current = None,
                Some(line) => {
                    if let Some(item) = reshape(&line.bytes) {
                        chunk.extend_from_slice(item.to_string().as_bytes());
                        chunk.extend_from_slice(b"\n");
                    }
                    if chunk.len() >= OUTPUT_CHUNK {
                        break;
                    }
                }
            }
        }
        if chunk.is_empty() {
            Ok::<_, object_store::Error>(None)
        } else {
            Ok(Some((chunk.freeze(), st)))
        }
    });
    (
        [(header::CONTENT_TYPE, "application/jsonl")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// One result-file line as a per-item output line.
pub(crate) fn reshape(line: &[u8]) -> Option<Value> {
    let v: Value = serde_json::from_slice(line).ok()?;
    let custom_id = v.get("custom_id").cloned().unwrap_or(Value::Null);
    let response = v.get("response").filter(|r| !r.is_null());
    let error = v.get("error").filter(|e| !e.is_null());
    let status = response
        .and_then(|r| r.get("status_code"))
        .and_then(Value::as_u64);
    let (response, error) = match (response, error, status) {
        (Some(r), None, Some(s)) if (200..300).contains(&s) => (
            json!({"status_code": s, "body": r.get("body").cloned().unwrap_or(Value::Null)}),
            Value::Null,
        ),
        _ => (Value::Null, failure_of(&v)),
    };
    Some(json!({"custom_id": custom_id, "response": response, "error": error}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_reshaped_per_item() {
        let ok = br#"{"id":"batch_req_1","custom_id":"a","response":{"status_code":200,"request_id":"r","body":{"object":"chat.completion"}},"error":null}"#;
        assert_eq!(
            reshape(ok).unwrap(),
            json!({"custom_id": "a", "response": {"status_code": 200, "body": {"object": "chat.completion"}}, "error": null})
        );
        let refused = br#"{"id":"x","custom_id":"b","response":{"status_code":404,"request_id":"r","body":{"error":{"message":"no such model","type":"invalid_request_error","code":"model_not_found"}}},"error":null}"#;
        assert_eq!(
            reshape(refused).unwrap(),
            json!({"custom_id": "b", "response": null, "error": {"code": "model_not_found", "message": "no such model", "status_code": 404}})
        );
        let failed = br#"{"id":"x","custom_id":"c","response":null,"error":{"code":"batch_expired","message":"late"}}"#;
        assert_eq!(
            reshape(failed).unwrap(),
            json!({"custom_id": "c", "response": null, "error": {"code": "batch_expired", "message": "late"}})
        );
        assert_eq!(reshape(b"not json"), None);
    }
}

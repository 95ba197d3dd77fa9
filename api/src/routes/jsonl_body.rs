//! Batches whose requests come in the create call itself, checked at once (seed 003's JSONL body,
//! and the inline `requests` of [`super::inline`]), and the per-item view of a batch's results,
//! `GET /v1/batches/{id}/output`.
//!
//! The request lines stream into a new input file while each is checked exactly as the dispatcher
//! will check it (the same [`Validator`]): memory stays bounded whatever the body size. Bad lines
//! answer 400 listing every one of them (`error.errors`, and the first few in the message); a
//! model whose provider takes no batch work answers 501, and work no provider is configured for
//! 503. Only then is the file registered and the batch created like any other, so list, get,
//! cancel and the result files behave the same.
//!
//! Sluice never calls an upstream while answering a create (all upstream work is asynchronous), so
//! a synchronous 502 does not occur: an item whose upstream fails for good shows it in `/output`
//! (task models: `status_code` 502, "Upstream batch router request failed").

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::{SinkExt, Stream, StreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use serde_json::{Value, json};
use sluice_core::domain::{
    BatchError, BatchStatus, SUPPORTED_ENDPOINTS, failure_of, new_file_id, now_secs,
};
use sluice_core::lines::LineProbe;
use sluice_core::validate::{Validator, check_model};
use sluice_runtime::lines::RequestLines;
use sluice_runtime::storage::upload_path;

use super::batches::{
    CreateBatch, load_batch, parse_completion_window, release_batch, reserve_batch, store_reserved,
};
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::AppState;

/// Endpoint of a JSONL-body batch whose first line names none we support.
pub(crate) const DEFAULT_ENDPOINT: &str = "/v1/chat/completions";
/// Window of batches created without one (seed 000/001 and 003).
pub(crate) const DEFAULT_WINDOW: &str = "24h";
/// Bad lines named in the error message (all of them are in `error.errors`).
const LINES_IN_MESSAGE: usize = 10;
/// Multipart chunks uploaded at once per file.
const PART_CONCURRENCY: usize = 2;
/// Reshaped `/output` bytes gathered before one chunk is sent.
const OUTPUT_CHUNK: usize = 64 * 1024;

/// Where the checked lines ended up.
pub(crate) struct StoredInput {
    pub(crate) file_id: String,
    pub(crate) endpoint: String,
}

/// `POST /v1/batches` with a JSONL body: one request per line.
pub(crate) async fn create<S>(
    state: &AppState,
    tenant: &Tenant,
    chunks: S,
) -> Result<Value, ApiError>
where
    S: Stream<Item = Result<Bytes, ApiError>> + Send + Unpin,
{
    let batch_id = reserve_batch(state, tenant).await?;
    let limit = state.settings.limits.max_jsonl_body_bytes;
    let stored =
        match store_lines(state, tenant, chunks, None, "requests.jsonl", false, limit).await {
            Ok(stored) => stored,
            Err(e) => {
                release_batch(state, tenant, &batch_id).await;
                return Err(e);
            }
        };
    let (completion_window, window) = default_window(state);
    let params = CreateBatch {
        input_file_id: stored.file_id,
        endpoint: stored.endpoint,
        completion_window,
        window,
        metadata: None,
        output_expires_after_secs: None,
        priority: None,
    };
    store_reserved(state, tenant, &batch_id, params).await
}

/// `24h`, or the configured maximum when that is shorter.
pub(crate) fn default_window(state: &AppState) -> (String, Duration) {
    let bounds = state.settings.window_bounds();
    match parse_completion_window(DEFAULT_WINDOW, bounds) {
        Ok(window) => (DEFAULT_WINDOW.to_owned(), window),
        Err(_) => (format!("{}s", bounds.1.as_secs()), bounds.1),
    }
}

/// Streams request lines into a new input file of `tenant`, checking each as the dispatcher
/// will; registers the file only when every line is good. `endpoint` `None` takes it from the
/// first line's `url`. `inline` names lines as `requests[i]` in messages. Above `limit` bytes of
/// lines the answer is 413; reading stops early once the verdict is certain (more lines than a
/// batch may hold).
pub(crate) async fn store_lines<S>(
    state: &AppState,
    tenant: &Tenant,
    mut chunks: S,
    endpoint: Option<&str>,
    filename: &str,
    inline: bool,
    limit: u64,
) -> Result<StoredInput, ApiError>
where
    S: Stream<Item = Result<Bytes, ApiError>> + Send + Unpin,
{
    let file_id = new_file_id();
    let path = upload_path(&file_id);
    let upload = state
        .files
        .put_multipart(&path)
        .await
        .context("Failed to start an upload to object storage")?;
    let mut writer = WriteMultipart::new(upload);
    let (mut tx, rx) = futures::channel::mpsc::channel::<object_store::Result<Bytes>>(4);

    // Producer: the body, to storage and to the checker. `Ok(None)`: the checker stopped first.
    let produce = async {
        let mut bytes: u64 = 0;
        let outcome = loop {
            let chunk = match chunks.next().await {
                None => break Ok(Some(bytes)),
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) => break Err(e),
            };
            bytes += chunk.len() as u64;
            if bytes > limit {
                break Err(too_large(limit));
            }
            if let Err(e) = writer.wait_for_capacity(PART_CONCURRENCY).await {
                break Err(anyhow::Error::new(e)
                    .context("Failed to upload a part to object storage")
                    .into());
            }
            writer.put(chunk.clone());
            if tx.send(Ok(chunk)).await.is_err() {
                break Ok(None);
            }
        };
        drop(tx);
        outcome
    };

    // Consumer: every line through the dispatcher's validator.
    let settings = state.settings.clone();
    let one_model = settings.one_model_per_batch(tenant.id());
    let check = async move {
        let mut lines =
            RequestLines::from_stream(rx.boxed(), settings.limits.max_line_bytes as usize);
        let first = lines.next_line().await?;
        let endpoint = match endpoint {
            Some(e) => e.to_owned(),
            None => first
                .as_ref()
                .and_then(|l| LineProbe::parse(&l.bytes))
                .and_then(|p| p.url)
                .and_then(|u| serde_json::from_str::<String>(u.get()).ok())
                .filter(|u| SUPPORTED_ENDPOINTS.contains(&u.as_str()))
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
        };
        let serves = |model: &str| check_model(&settings, model, &endpoint);
        let mut validator =
            Validator::new(&endpoint, &settings.limits, &serves).one_model_per_batch(one_model);
        let mut next = first;
        while let Some(line) = next {
            validator.check(&line);
            // More lines than a batch may hold: the answer is known, stop reading the body.
            next = if validator.done() {
                None
            } else {
                lines.next_line().await?
            };
        }
        Ok::<_, object_store::Error>((validator.finish(), endpoint))
    };

    let (produced, checked) = futures::join!(produce, check);
    let outcome = match (produced, checked) {
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(anyhow::Error::new(e)
            .context("Failed to read back request lines")
            .into()),
        (Ok(_), Ok((verdict, _))) if !verdict.errors.is_empty() => {
            Err(line_errors(verdict.errors, verdict.invalid, inline))
        }
        (Ok(None), Ok(_)) => Err(anyhow::anyhow!("the line checker stopped early").into()),
        (Ok(Some(bytes)), Ok((_, endpoint))) => Ok((bytes, endpoint)),
    };
    let (bytes, endpoint) = match outcome {
        Ok(done) => done,
        Err(e) => {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(error = %abort, "Failed to abort an upload to object storage.");
            }
            return Err(e);
        }
    };
    writer
        .finish()
        .await
        .context("Failed to complete an upload to object storage")?;
    let created_at = now_secs();
    let fields = [
        ("bytes", bytes.to_string()),
        ("created_at", created_at.to_string()),
        (
            "expires_at",
            (created_at + state.settings.lifecycle.batch_file_expires_after_secs as i64)
                .to_string(),
        ),
        ("filename", filename.to_owned()),
        ("purpose", "batch".to_owned()),
        ("path", path.to_string()),
    ];
    if let Err(e) = super::files::register_upload(state, tenant, &file_id, &fields, bytes).await {
        if let Err(delete) = state.files.delete(&path).await {
            tracing::warn!(error = %delete, %file_id, "Failed to delete the bytes of a refused input file.");
        }
        return Err(e);
    }
    Ok(StoredInput { file_id, endpoint })
}

fn too_large(limit: u64) -> ApiError {
    ApiError::Coded {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("The request body is too large: the limit is {limit} bytes."),
        param: None,
        code: "request_too_large",
        errors: None,
    }
}

/// The codes the validator gives, as static strings for the envelope.
const LINE_CODES: &[&str] = &[
    "invalid_json_line",
    "missing_required_parameter",
    "invalid_request",
    "invalid_url",
    "streaming_unsupported",
    "model_not_found",
    "model_mismatch",
    "duplicate_custom_id",
    "line_too_long",
    "too_many_tasks",
    "too_many_errors",
    "empty_file",
    "unsupported_document",
    "unsupported_endpoint",
];

/// Bad lines as one answer: 503 / 501 when a model cannot run here at all, else 400 listing them
/// (`errors` is bounded by the validator; `invalid` counts every bad line, listed or not).
fn line_errors(errors: Vec<BatchError>, invalid: u64, inline: bool) -> ApiError {
    for (code, status) in [
        ("no_provider_configured", StatusCode::SERVICE_UNAVAILABLE),
        ("not_implemented", StatusCode::NOT_IMPLEMENTED),
    ] {
        if let Some(e) = errors.iter().find(|e| e.code == code) {
            return ApiError::Coded {
                status,
                message: e.message.clone(),
                param: e.param.clone(),
                code,
                errors: None,
            };
        }
    }
    let same_code = errors
        .iter()
        .all(|e| e.code == errors[0].code || e.code == "too_many_errors");
    let code = LINE_CODES
        .iter()
        .copied()
        .find(|c| same_code && *c == errors[0].code)
        .unwrap_or("invalid_request");
    let place = |e: &BatchError| match (e.line, inline) {
        (Some(n), true) => format!("requests[{}]", n - 1),
        (Some(n), false) => format!("line {n}"),
        (None, _) => "the batch".to_owned(),
    };
    let mut message = if errors.len() == 1 {
        format!(
            "Invalid request in {}: {}",
            place(&errors[0]),
            errors[0].message
        )
    } else {
        let listed: Vec<String> = errors
            .iter()
            .take(LINES_IN_MESSAGE)
            .map(|e| format!("{}: {}", place(e), e.message))
            .collect();
        let what = if invalid > 0 {
            format!("{invalid} requests are invalid")
        } else {
            "The requests are invalid".to_owned()
        };
        format!("{what}; nothing was created. {}", listed.join(" "))
    };
    if errors.len() > LINES_IN_MESSAGE {
        message.push_str(&format!(
            " (and {} more; see error.errors)",
            errors.len() - LINES_IN_MESSAGE
        ));
    }
    let param = if errors.len() == 1 {
        errors[0].param.clone()
    } else {
        None
    };
    ApiError::Coded {
        status: StatusCode::BAD_REQUEST,
        message,
        param,
        code,
        errors: Some(json!(errors)),
    }
}

/// `GET /v1/batches/{batch_id}/output`: one JSONL line per input item, `{custom_id, response:
/// {status_code, body} | null, error: {code, message} | null}`, successes (in input order) then
/// failures (in input order). 409 while the batch is not finished.
#[utoipa::path(get, path = "/batches/{batch_id}/output", operation_id = "batchOutput", tag = "batches", params(("batch_id" = String, Path, description = "A batch id.")),
    responses((status = 200, description = "One JSONL line per input item: `custom_id`, `response`, `error`", content_type = "application/jsonl", body = String), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflicts with the batch's status", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub async fn output(
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
    Ok(reshaped_response(state.files.clone(), paths))
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

    #[test]
    fn bad_lines_are_listed_and_unrunnable_models_get_their_status() {
        let e = |code: &str, line: u64| BatchError {
            code: code.into(),
            message: format!("{code} here"),
            param: Some("body.model".into()),
            line: Some(line),
        };
        let err = line_errors(
            vec![e("invalid_json_line", 2), e("model_not_found", 4)],
            2,
            false,
        );
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        let text = err.to_string();
        assert!(text.contains("line 2: invalid_json_line here"), "{text}");
        assert!(text.contains("line 4: model_not_found here"), "{text}");
        let err = line_errors(vec![e("model_not_found", 1)], 1, true);
        assert!(err.to_string().contains("requests[0]"), "{err}");
        let err = line_errors(
            vec![e("model_not_found", 1), e("not_implemented", 2)],
            2,
            false,
        );
        assert_eq!(err.status(), StatusCode::NOT_IMPLEMENTED);
        let err = line_errors(vec![e("no_provider_configured", 1)], 1, false);
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}

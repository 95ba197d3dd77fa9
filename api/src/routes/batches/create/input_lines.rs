//! Request lines sent in the create call itself (a JSONL body, or inline `requests`) become a
//! stored input file, checked at once.
//!
//! The lines stream into a new input file while each is checked exactly as the dispatcher will
//! check it (the same [`Validator`]): memory stays bounded whatever the body size. Bad lines
//! answer 400 listing every one of them (`error.errors`, and the first few in the message); a
//! model whose provider takes no batch work answers 501, and work no provider is configured for
//! 503. Only then is the file registered.

use anyhow::Context;
use axum::http::StatusCode;
use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, Stream, StreamExt};
use object_store::path::Path;
use object_store::{ObjectStoreExt, WriteMultipart};
use serde_json::json;
use sluice_core::Settings;
use sluice_core::domain::{BatchError, SUPPORTED_ENDPOINTS, new_file_id, now_secs};
use sluice_core::lines::{LineProbe, RequestLine};
use sluice_core::validate::{Validator, Verdict, check_model};
use sluice_runtime::lines::RequestLines;
use sluice_runtime::storage::upload_path;

use super::defaults::DEFAULT_ENDPOINT;
use super::too_large::lines_too_large;
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::routes::files::upload::register_upload;
use crate::state::AppState;

/// Bad lines named in the error message (all of them are in `error.errors`).
const LINES_IN_MESSAGE: usize = 10;
/// Multipart chunks uploaded at once per file.
const PART_CONCURRENCY: usize = 2;
/// Body chunks queued between the upload and the line checker.
const CHUNKS_QUEUED: usize = 4;

/// Where the checked lines ended up.
pub(crate) struct StoredInput {
    pub(crate) file_id: String,
    pub(crate) endpoint: String,
}

/// Streams request lines into a new input file of `tenant`, checking each as the dispatcher
/// will; registers the file only when every line is good. `endpoint` `None` takes it from the
/// first line's `url`. `inline` names lines as `requests[i]` in messages. Above `limit` bytes of
/// lines the answer is 413; reading stops early once the verdict is certain (more lines than a
/// batch may hold).
pub(crate) async fn store_lines<S>(
    state: &AppState,
    tenant: &Tenant,
    chunks: S,
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
    let mut writer = start_upload(state, &path).await?;
    let (to_checker, from_body) = mpsc::channel(CHUNKS_QUEUED);
    let (sent, checked) = futures::join!(
        upload_and_forward(chunks, &mut writer, to_checker, limit),
        check_lines(&state.settings, tenant, from_body, endpoint),
    );
    let (bytes, endpoint) = match settle(sent, checked, inline) {
        Ok(accepted) => accepted,
        Err(e) => {
            abort_upload(writer).await;
            return Err(e);
        }
    };
    writer
        .finish()
        .await
        .context("Failed to complete an upload to object storage")?;
    register_input(state, tenant, &file_id, &path, filename, bytes).await?;
    Ok(StoredInput { file_id, endpoint })
}

/// Opens a multipart upload of a new object at `path`.
async fn start_upload(state: &AppState, path: &Path) -> Result<WriteMultipart, ApiError> {
    let upload = state
        .files
        .put_multipart(path)
        .await
        .context("Failed to start an upload to object storage")?;
    Ok(WriteMultipart::new(upload))
}

/// Sends the body both to storage and to the line checker, chunk by chunk: its size once it
/// ended, or `None` when the checker stopped reading first (its verdict is already known).
async fn upload_and_forward<S>(
    mut chunks: S,
    writer: &mut WriteMultipart,
    mut to_checker: mpsc::Sender<object_store::Result<Bytes>>,
    limit: u64,
) -> Result<Option<u64>, ApiError>
where
    S: Stream<Item = Result<Bytes, ApiError>> + Unpin,
{
    let mut bytes: u64 = 0;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        bytes += chunk.len() as u64;
        if bytes > limit {
            return Err(lines_too_large(limit));
        }
        writer
            .wait_for_capacity(PART_CONCURRENCY)
            .await
            .context("Failed to upload a part to object storage")?;
        writer.put(chunk.clone());
        if to_checker.send(Ok(chunk)).await.is_err() {
            return Ok(None);
        }
    }
    Ok(Some(bytes))
}

/// Reads the body back as lines and runs each through the dispatcher's validator: the verdict,
/// and the endpoint the batch gets.
async fn check_lines(
    settings: &Settings,
    tenant: &Tenant,
    from_body: mpsc::Receiver<object_store::Result<Bytes>>,
    endpoint: Option<&str>,
) -> object_store::Result<(Verdict, String)> {
    let one_model = settings.one_model_per_batch(tenant.id());
    let mut lines =
        RequestLines::from_stream(from_body.boxed(), settings.limits.max_line_bytes as usize);
    let first = lines.next_line().await?;
    let endpoint = batch_endpoint(endpoint, first.as_ref());
    let serves = |model: &str| check_model(settings, model, &endpoint);
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
    Ok((validator.finish(), endpoint))
}

/// The endpoint given, else the first line's `url` when it is one we support, else the default.
fn batch_endpoint(given: Option<&str>, first: Option<&RequestLine>) -> String {
    match given {
        Some(e) => e.to_owned(),
        None => first
            .and_then(|l| LineProbe::parse(&l.bytes))
            .and_then(|p| p.url)
            .and_then(|u| serde_json::from_str::<String>(u.get()).ok())
            .filter(|u| SUPPORTED_ENDPOINTS.contains(&u.as_str()))
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
    }
}

/// What the upload and the check add up to: the input's size and endpoint when every line is
/// good, else the answer. A failed body wins over the verdict on the lines it cut short.
fn settle(
    sent: Result<Option<u64>, ApiError>,
    checked: object_store::Result<(Verdict, String)>,
    inline: bool,
) -> Result<(u64, String), ApiError> {
    match (sent, checked) {
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(anyhow::Error::new(e)
            .context("Failed to read back request lines")
            .into()),
        (Ok(_), Ok((verdict, _))) if !verdict.errors.is_empty() => {
            Err(line_errors(verdict.errors, verdict.invalid, inline))
        }
        (Ok(None), Ok(_)) => Err(anyhow::anyhow!("the line checker stopped early").into()),
        (Ok(Some(bytes)), Ok((_, endpoint))) => Ok((bytes, endpoint)),
    }
}

/// Abandons the upload of refused lines.
async fn abort_upload(writer: WriteMultipart) {
    if let Err(abort) = writer.abort().await {
        tracing::warn!(error = %abort, "Failed to abort an upload to object storage.");
    }
}

/// Records the uploaded lines as an input file of `tenant` (purpose `batch`); when the record is
/// refused (over the storage quota), the bytes are deleted again.
async fn register_input(
    state: &AppState,
    tenant: &Tenant,
    file_id: &str,
    path: &Path,
    filename: &str,
    bytes: u64,
) -> Result<(), ApiError> {
    let fields = input_file_fields(state, path, filename, bytes);
    if let Err(e) = register_upload(state, tenant, file_id, &fields, bytes).await {
        if let Err(delete) = state.files.delete(path).await {
            tracing::warn!(error = %delete, %file_id, "Failed to delete the bytes of a refused input file.");
        }
        return Err(e);
    }
    Ok(())
}

/// The record of a new input file, expiring after `lifecycle.batch_file_expires_after_secs`.
fn input_file_fields(
    state: &AppState,
    path: &Path,
    filename: &str,
    bytes: u64,
) -> [(&'static str, String); 6] {
    let created_at = now_secs();
    [
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
    ]
}

/// The codes the validator gives, as static strings for the envelope.
const LINE_CODES: &[&str] = &[
    "invalid_json_line",
    "missing_required_parameter",
    "invalid_request",
    "invalid_url",
    "streaming_unsupported",
    "refused_body_field",
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

#[cfg(test)]
mod tests {
    use super::*;

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

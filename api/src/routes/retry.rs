//! `POST /v1/batches/{batch_id}/retry`: a new batch (the child) over the lines of a finished batch
//! (the parent) that did not succeed.
//!
//! The child's input is a new `batch` file holding the parent's original request lines, byte for
//! byte, in input order: the parent's rows are read in line order (a merge of its segments, where
//! a finished batch keeps every row) next to its input file, and each chosen row takes the input
//! line of the same index. Both are streamed, and the file is written, checked and counted against
//! the storage quota exactly like a JSONL-body create's input ([`store_lines`]). The child is then
//! created like any batch (it counts toward the open-batch limit), with `retry_of` naming the
//! parent; the parent lists it in `retries` (at most `limits.max_retries_per_batch`).

use std::collections::HashSet;
use std::time::Duration;

use anyhow::Context;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use futures::{Stream, StreamExt};
use object_store::path::Path;
use serde_json::{Map, Value};
use sluice_core::domain::{Batch, BatchStatus, Row, batch_field, failure_of};
use sluice_core::validate::clip;
use sluice_runtime::lines::RequestLines;
use sluice_runtime::segments::Merge;
use sluice_store::RetrySlot;

use super::ECHO_BYTES;
use super::batches::{
    CreateBatch, load_batch, parse_completion_window, parse_metadata, quoted_list, release_batch,
    reserve_batch, store_reserved_with,
};
use super::create::json_too_large;
use super::jsonl_body::{default_window, store_lines};
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::{ApiPath, parse_json};
use crate::state::AppState;

/// The row statuses a retry can take, as `statuses` names them.
const STATUSES: [&str; 3] = ["failed", "expired", "cancelled"];
/// Most entries of `codes`, and the longest one.
const MAX_CODES: usize = 64;
const MAX_CODE_CHARS: usize = 128;

/// What a failed row is, for `statuses`: a line the batch's expiry or cancel kept from running
/// (the error code finalize gives it), or one that ran and failed.
fn row_status(code: &str) -> &'static str {
    match code {
        "batch_expired" => "expired",
        "batch_cancelled" => "cancelled",
        _ => "failed",
    }
}

/// Which of the parent's rows the child takes.
#[derive(Debug, Clone, PartialEq)]
struct Choice {
    /// Names from [`STATUSES`].
    statuses: Vec<&'static str>,
    /// Error codes (or HTTP statuses, as text) a row must have; any when `None`.
    codes: Option<HashSet<String>>,
}

impl Choice {
    /// Whether the failed row `text` (a result line) is chosen.
    fn takes(&self, text: &[u8]) -> bool {
        // A row that does not parse (never written by Sluice) reads as a plain failure.
        let line = serde_json::from_slice::<Value>(text).unwrap_or(Value::Null);
        let failure = failure_of(&line);
        let code = failure["code"].as_str().unwrap_or_default();
        if !self.statuses.contains(&row_status(code)) {
            return false;
        }
        let Some(codes) = &self.codes else {
            return true;
        };
        let status = line
            .pointer("/response/status_code")
            .and_then(Value::as_u64)
            .map(|s| s.to_string());
        codes.contains(code) || status.is_some_and(|s| codes.contains(&s))
    }

    /// "failed or expired requests with code 'x'": what was looked for, for the 400.
    fn describe(&self) -> String {
        let mut text = match self.statuses.split_last() {
            Some((last, [])) => format!("{last} requests"),
            Some((last, rest)) => format!("{} or {last} requests", rest.join(", ")),
            None => "requests".to_owned(),
        };
        if let Some(codes) = &self.codes {
            let mut codes: Vec<&str> = codes.iter().map(String::as_str).collect();
            codes.sort_unstable();
            let shown: Vec<String> = codes
                .iter()
                .map(|c| clip(c, ECHO_BYTES).into_owned())
                .collect();
            let shown: Vec<&str> = shown.iter().map(String::as_str).collect();
            text.push_str(&format!(" with code {}", quoted_list(&shown)));
        }
        text
    }
}

/// The checked body of a retry.
#[derive(Debug, PartialEq)]
struct RetryParams {
    choice: Choice,
    /// As written and parsed; the parent's when absent.
    completion_window: Option<(String, Duration)>,
    /// `None`: the parent's; `Some(None)`: none (`"metadata": null`).
    metadata: Option<Option<String>>,
}

impl RetryParams {
    /// An empty body takes every failed, expired and cancelled row, with the parent's window and
    /// metadata. Unknown fields are ignored, as OpenAI does.
    fn parse(body: &[u8], bounds: (Duration, Duration)) -> Result<Self, ApiError> {
        let empty = Map::new();
        let value;
        let map = if body.iter().all(u8::is_ascii_whitespace) {
            &empty
        } else {
            value = parse_json(body)?;
            value.as_object().ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Invalid type for the request body: expected an object, but got {} instead.",
                    crate::error::json_type_name(&value)
                ))
            })?
        };
        let statuses = match string_list(map, "statuses", STATUSES.len())? {
            None => STATUSES.to_vec(),
            Some(names) => {
                let mut chosen = Vec::new();
                for name in &names {
                    let Some(known) = STATUSES.iter().find(|s| *s == name) else {
                        return Err(ApiError::invalid_value(
                            "statuses",
                            format!(
                                "Invalid value in 'statuses': '{}'. Supported values are: {}.",
                                clip(name, ECHO_BYTES),
                                quoted_list(&STATUSES)
                            ),
                        ));
                    };
                    if !chosen.contains(known) {
                        chosen.push(*known);
                    }
                }
                chosen
            }
        };
        let codes = string_list(map, "codes", MAX_CODES)?;
        if let Some(long) = codes
            .iter()
            .flatten()
            .find(|c| c.chars().count() > MAX_CODE_CHARS)
        {
            return Err(ApiError::invalid_value(
                "codes",
                format!(
                    "Invalid 'codes': '{}…' is longer than {MAX_CODE_CHARS} characters.",
                    clip(long, 32)
                ),
            ));
        }
        let completion_window = match map.get("completion_window") {
            None | Some(Value::Null) => None,
            Some(Value::String(w)) => Some((w.clone(), parse_completion_window(w, bounds)?)),
            Some(other) => {
                return Err(ApiError::invalid_type(
                    "completion_window",
                    "a string",
                    other,
                ));
            }
        };
        let metadata = match map.get("metadata") {
            None => None,
            given => Some(parse_metadata(given)?),
        };
        Ok(Self {
            choice: Choice {
                statuses,
                codes: codes.map(|c| c.into_iter().collect()),
            },
            completion_window,
            metadata,
        })
    }
}

/// An optional, non-empty array of at most `max` strings.
fn string_list(
    map: &Map<String, Value>,
    name: &str,
    max: usize,
) -> Result<Option<Vec<String>>, ApiError> {
    let items = match map.get(name) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(ApiError::invalid_type(name, "an array", other)),
    };
    if items.is_empty() || items.len() > max {
        return Err(ApiError::invalid_value(
            name,
            format!(
                "Invalid '{name}': expected an array of 1 to {max} strings, but got {} items \
                 instead.",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(s.clone()),
            other => Err(ApiError::invalid_type(
                &format!("{name}[{i}]"),
                "a string",
                other,
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// `POST /v1/batches/{batch_id}/retry`.
#[utoipa::path(post, path = "/batches/{batch_id}/retry", operation_id = "retryBatch", tag = "batches",
    params(("batch_id" = String, Path, description = "A finished batch (completed, failed, expired or cancelled)."),
        ("Idempotency-Key" = Option<String>, Header, description = "As on `POST /v1/batches`: the same key with the same retry answers the first new batch again (`idempotent-replayed: true`); with another request, 409 `idempotency_key_reused`.")),
    request_body(content = Option<crate::openapi::RetryBatchRequest>, content_type = "application/json",
        description = "Optional. Which rows to retry (default: every failed, expired and cancelled one) and the new batch's window and metadata (default: the parent's)."),
    responses((status = 200, description = "The new batch, `validating`, with `retry_of`; its input file holds the chosen original request lines in input order", body = crate::openapi::Batch), (status = 400, description = "Invalid request, or nothing to retry (`nothing_to_retry`)", body = crate::openapi::ErrorResponse), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 403, description = "The new input file would take the tenant past its storage quota (`storage_quota_exceeded`)", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 409, description = "The batch has not finished (`batch_not_finished`), its input file is gone (`input_file_unavailable`), or it has `limits.max_retries_per_batch` retries already (`too_many_retries`)", body = crate::openapi::ErrorResponse), (status = 413, description = "Over the size limit", body = crate::openapi::ErrorResponse), (status = 429, description = "Too many open batches, or uploads in flight", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse), (status = 503, description = "Not ready", body = crate::openapi::ErrorResponse)))]
pub async fn retry(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(batch_id): ApiPath<String>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let parent = load_batch(&state, &tenant, &batch_id).await?;
    let limit = state.settings.limits.max_json_body_bytes;
    let body = axum::body::to_bytes(
        request.into_body(),
        usize::try_from(limit).unwrap_or(usize::MAX),
    )
    .await
    .map_err(|_| json_too_large(limit))?;
    let params = RetryParams::parse(&body, state.settings.window_bounds())?;
    match parent.status {
        Some(status) if status.is_terminal() => {}
        status => {
            return Err(ApiError::Coded {
                status: StatusCode::CONFLICT,
                message: format!(
                    "Batch '{batch_id}' is '{}': only a finished batch (completed, failed, \
                     expired or cancelled) can be retried. Wait for it to finish, or cancel it.",
                    status.map_or("unknown", BatchStatus::as_str)
                ),
                param: None,
                code: "batch_not_finished",
                errors: None,
            });
        }
    }
    let mut lines = chosen_lines(&state, &tenant, &parent, params.choice.clone()).await?;
    let Some(first) = lines.next().await else {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "Nothing to retry: batch '{batch_id}' has no {}.",
                params.choice.describe()
            ),
            param: None,
            code: Some("nothing_to_retry"),
        });
    };
    let first = first?;
    // From here on the work reserves and stores: it runs to its end (or its rollback) even if
    // the client goes away, so no reservation or retry slot is left behind half-made.
    let lines = futures::stream::iter([Ok(first)]).chain(lines).boxed();
    tokio::spawn(create_child(state, tenant, parent, params, lines))
        .await
        .context("A retry's creation task failed")?
        .map(Json)
}

/// Creates the child over `lines`: reservation, retry slot, input file, batch; each step undone
/// if a later one fails.
async fn create_child(
    state: AppState,
    tenant: Tenant,
    parent: Batch,
    params: RetryParams,
    lines: futures::stream::BoxStream<'static, Result<Bytes, ApiError>>,
) -> Result<Value, ApiError> {
    let parent_id = parent.id.clone().unwrap_or_default();
    let child_id = reserve_batch(&state, &tenant).await?;
    let max = state.settings.limits.max_retries_per_batch;
    let slot = state
        .store
        .take_retry_slot(&parent_id, &child_id, max)
        .await
        .context("Failed to list a retry on its batch");
    let refused = match slot {
        Ok(RetrySlot::Taken) => None,
        Ok(RetrySlot::Full) => Some(ApiError::Coded {
            status: StatusCode::CONFLICT,
            message: format!(
                "Batch '{parent_id}' has been retried {max} times already \
                 (limits.max_retries_per_batch); retry one of its retries instead."
            ),
            param: None,
            code: "too_many_retries",
            errors: None,
        }),
        Ok(RetrySlot::Gone) => Some(ApiError::batch_not_found(&parent_id)),
        Err(e) => Some(e.into()),
    };
    if let Some(error) = refused {
        release_batch(&state, &tenant, &child_id).await;
        return Err(error);
    }
    let outcome = store_child(&state, &tenant, &parent, params, lines, &child_id).await;
    match &outcome {
        Ok(_) => tracing::info!(batch_id = %child_id, retry_of = %parent_id, "Batch retried."),
        Err(_) => {
            if let Err(e) = state
                .store
                .give_back_retry_slot(&parent_id, &child_id)
                .await
            {
                tracing::warn!(batch_id = %parent_id, error = %e, "Failed to unlist a retry that was not created.");
            }
        }
    }
    outcome
}

async fn store_child(
    state: &AppState,
    tenant: &Tenant,
    parent: &Batch,
    params: RetryParams,
    lines: futures::stream::BoxStream<'static, Result<Bytes, ApiError>>,
    child_id: &str,
) -> Result<Value, ApiError> {
    let parent_id = parent.id.as_deref().unwrap_or_default();
    let endpoint = parent.endpoint.as_deref().unwrap_or_default().to_owned();
    // The lines are a part of a file already stored and checked, so they are never larger than
    // it: no byte limit of their own.
    let stored = match store_lines(
        state,
        tenant,
        lines,
        Some(&endpoint),
        &format!("{parent_id}_retry.jsonl"),
        false,
        u64::MAX,
    )
    .await
    {
        Ok(stored) => stored,
        Err(e) => {
            release_batch(state, tenant, child_id).await;
            return Err(e);
        }
    };
    let (completion_window, window) = match params.completion_window {
        Some(given) => given,
        // The parent's, unless the configured bounds moved since.
        None => parent
            .completion_window
            .as_deref()
            .and_then(|w| {
                parse_completion_window(w, state.settings.window_bounds())
                    .ok()
                    .map(|d| (w.to_owned(), d))
            })
            .unwrap_or_else(|| default_window(state)),
    };
    let metadata = params.metadata.unwrap_or_else(|| parent.metadata.clone());
    let child = CreateBatch {
        input_file_id: stored.file_id,
        endpoint: stored.endpoint,
        completion_window,
        window,
        metadata,
        output_expires_after_secs: parent.output_expires_after_secs,
        // The child runs in its parent's tier (the metadata key, if that set it, comes along).
        priority: parent.priority,
    };
    store_reserved_with(
        state,
        tenant,
        child_id,
        child,
        vec![(batch_field::RETRY_OF, parent_id.to_owned())],
    )
    .await
}

/// The parent's original request lines (each ending in `\n`) whose rows `choice` takes, in
/// input order.
async fn chosen_lines(
    state: &AppState,
    tenant: &Tenant,
    parent: &Batch,
    choice: Choice,
) -> Result<futures::stream::BoxStream<'static, Result<Bytes, ApiError>>, ApiError> {
    let batch_id = parent.id.clone().unwrap_or_default();
    let (segments, pending) = state
        .store
        .rows_snapshot(&batch_id)
        .await
        .context("Failed to read a batch's rows")?;
    if segments.is_empty() {
        // No line ever ran (it failed validation, or stopped first): nothing to read.
        return Ok(futures::stream::empty().boxed());
    }
    // Finalize moves every row into segments before the batch turns terminal.
    if !pending.is_empty() {
        return Err(anyhow::anyhow!(
            "finished batch {batch_id} still has {} rows in Redis",
            pending.len()
        )
        .into());
    }
    let input_id = parent.input_file_id.as_deref().unwrap_or_default();
    let unavailable = || ApiError::Coded {
        status: StatusCode::CONFLICT,
        message: format!(
            "The input file '{input_id}' of batch '{batch_id}' is no longer available (deleted \
             or expired), so its requests cannot be retried."
        ),
        param: None,
        code: "input_file_unavailable",
        errors: None,
    };
    let input = super::files::load_file(state, tenant, input_id)
        .await
        .map_err(|e| match e {
            ApiError::NotFound { .. } | ApiError::InvalidRequest { .. } => unavailable(),
            other => other,
        })?;
    let max_line = state.settings.limits.max_line_bytes as usize;
    let requests = match RequestLines::open(&state.files, &Path::from(input.path()), max_line).await
    {
        Ok(lines) => lines,
        Err(object_store::Error::NotFound { .. }) => return Err(unavailable()),
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context("Failed to open a batch's input file")
                .into());
        }
    };
    let merge = Merge::open(&state.files, &batch_id, &segments)
        .await
        .context("Failed to read a batch's rows")?;
    Ok(Selection {
        batch_id,
        merge,
        requests,
        choice,
    }
    .into_stream()
    .boxed())
}

/// Rows in line order next to the input lines, one pass over each.
struct Selection {
    batch_id: String,
    merge: Merge,
    requests: RequestLines,
    choice: Choice,
}

impl Selection {
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, ApiError>> + Send + 'static {
        futures::stream::try_unfold(self, |mut s| async move {
            let next = s.next_line().await.map_err(|e| {
                ApiError::from(e.context("Failed to read the lines of a batch to retry"))
            })?;
            Ok(next.map(|line| (line, s)))
        })
    }

    /// The next chosen line, with its newline.
    async fn next_line(&mut self) -> anyhow::Result<Option<Bytes>> {
        while let Some((index, stored)) = self.merge.next().await? {
            let Some((ok, text)) = Row::decode(stored) else {
                continue;
            };
            if ok || !self.choice.takes(text) {
                continue;
            }
            loop {
                let Some(request) = self.requests.next_line().await? else {
                    anyhow::bail!("the input of {} has no line {index}", self.batch_id);
                };
                anyhow::ensure!(
                    request.index <= index,
                    "line {index} of {} is missing from its input",
                    self.batch_id
                );
                if request.index == index {
                    let mut line = Vec::with_capacity(request.bytes.len() + 1);
                    line.extend_from_slice(&request.bytes);
                    line.push(b'\n');
                    return Ok(Some(Bytes::from(line)));
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const BOUNDS: (Duration, Duration) = (Duration::from_secs(60), Duration::from_secs(604_800));

    fn parse(body: &str) -> Result<RetryParams, ApiError> {
        RetryParams::parse(body.as_bytes(), BOUNDS)
    }

    #[test]
    fn an_empty_body_takes_every_unfinished_row_with_the_parents_settings() {
        for body in ["", "  \n", "{}"] {
            let p = parse(body).unwrap();
            assert_eq!(p.choice.statuses, STATUSES);
            assert_eq!(p.choice.codes, None);
            assert_eq!(p.completion_window, None);
            assert_eq!(p.metadata, None);
        }
        let p = parse(r#"{"statuses":["expired","expired"],"codes":["429"],"completion_window":"2h","metadata":null}"#).unwrap();
        assert_eq!(p.choice.statuses, ["expired"]);
        assert_eq!(p.completion_window.unwrap().1, Duration::from_secs(7200));
        assert_eq!(p.metadata, Some(None));
    }

    #[test]
    fn bad_bodies_name_their_param() {
        for (body, param) in [
            (r#"{"statuses":["done"]}"#, "statuses"),
            (r#"{"statuses":[]}"#, "statuses"),
            (r#"{"statuses":"failed"}"#, "statuses"),
            (r#"{"codes":[1]}"#, "codes[0]"),
            (r#"{"completion_window":"1s"}"#, "completion_window"),
            (r#"{"metadata":{"k":1}}"#, "metadata.k"),
        ] {
            match parse(body) {
                Err(ApiError::InvalidRequest { param: Some(p), .. }) => {
                    assert_eq!(p, param, "{body}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
        assert!(matches!(parse("[1]"), Err(ApiError::InvalidRequest { .. })));
        assert!(matches!(parse("{"), Err(ApiError::InvalidRequest { .. })));
    }

    #[test]
    fn rows_are_chosen_by_status_and_code() {
        let expired =
            json!({"custom_id":"a","response":null,"error":{"code":"batch_expired","message":"m"}});
        let upstream = json!({"custom_id":"b","response":{"status_code":404,"body":{"error":{"code":"model_not_found","message":"m"}}},"error":null});
        let bytes = |v: &Value| v.to_string().into_bytes();
        let all = parse("").unwrap().choice;
        assert!(all.takes(&bytes(&expired)) && all.takes(&bytes(&upstream)));
        let failed = parse(r#"{"statuses":["failed"]}"#).unwrap().choice;
        assert!(!failed.takes(&bytes(&expired)) && failed.takes(&bytes(&upstream)));
        let by_code = parse(r#"{"codes":["model_not_found"]}"#).unwrap().choice;
        assert!(!by_code.takes(&bytes(&expired)) && by_code.takes(&bytes(&upstream)));
        let by_status = parse(r#"{"codes":["404"]}"#).unwrap().choice;
        assert!(by_status.takes(&bytes(&upstream)));
        assert_eq!(
            by_code.describe(),
            "failed, expired or cancelled requests with code 'model_not_found'"
        );
    }
}

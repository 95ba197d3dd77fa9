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

use anyhow::Context;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use futures::StreamExt;
use serde_json::Value;
use sluice_core::domain::{Batch, BatchStatus};
use sluice_store::RetrySlot;

use self::body::RetryParams;
use self::selection::chosen_lines;
use super::create::defaults::default_window;
use super::create::input_lines::store_lines;
use super::create::too_large::json_too_large;
use super::lookup::load_batch;
use super::params::{CreateBatch, parse_completion_window};
use super::record::store_reserved_with;
use super::reservation::{release_batch, reserve_batch};
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::AppState;

mod body;
mod choice;
mod selection;

/// `POST /v1/batches/{batch_id}/retry`.
#[utoipa::path(post, path = "/batches/{batch_id}/retry", operation_id = "retryBatch", tag = "batches",
    params(("batch_id" = String, Path, description = "A finished batch (completed, failed, expired or cancelled)."),
        ("Idempotency-Key" = Option<String>, Header, description = "As on `POST /v1/batches`: the same key with the same retry answers the first new batch again (`idempotent-replayed: true`); with another request, 409 `idempotency_key_reused`.")),
    request_body(content = Option<crate::openapi::RetryBatchRequest>, content_type = "application/json",
        description = "Optional. Which rows to retry (default: every failed, expired and cancelled one) and the new batch's window and metadata (default: the parent's)."),
    responses((status = 200, description = "The new batch, `validating`, with `retry_of`; its input file holds the chosen original request lines in input order", body = crate::openapi::Batch), (status = 400, description = "Invalid request, or nothing to retry (`nothing_to_retry`)", body = crate::openapi::ErrorResponse), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 403, description = "The new input file would take the tenant past its storage quota (`storage_quota_exceeded`)", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 409, description = "The batch has not finished (`batch_not_finished`), its input file is gone (`input_file_unavailable`), or it has `limits.max_retries_per_batch` retries already (`too_many_retries`)", body = crate::openapi::ErrorResponse), (status = 413, description = "Over the size limit", body = crate::openapi::ErrorResponse), (status = 429, description = "Too many open batches, or uploads in flight", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse), (status = 503, description = "Not ready", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn retry(
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
    let parent_id = parent.id.as_deref().unwrap_or_default().to_owned();
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

/// Stores the child's input file and then the child, with the parent's settings where the
/// retry gives none.
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
        vec![("retry_of", parent_id.to_owned())],
    )
    .await
}

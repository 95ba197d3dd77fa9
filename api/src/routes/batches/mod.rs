//! The Batches API: create, list, retrieve and cancel.
//!
//! Only parameters are checked here. Whether the input file exists and its lines are valid is
//! decided asynchronously by the dispatcher (the batch then becomes `failed`), as OpenAI does, so
//! creating a batch costs two Redis writes and one publish whatever the file size.

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use serde_json::Value;
use sluice_core::domain::{
    Batch, BatchRecordError, BatchStatus, batch_field, new_batch_id, now_secs,
};
use sluice_core::schedule::Priority;
use sluice_store::Transition;

use super::dialect::present;
use super::{PageRequest, announce, check_id, list_object, read_page, visible};
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery, JsonBody, int_param};
use crate::state::AppState;

pub(crate) mod admission;
mod params;
pub(crate) use params::{
    CreateBatch, parse_completion_window, parse_metadata, parse_output_expiry, quoted_list,
};

/// A reservation whose batch is still not stored after this long was left by a crash.
const RESERVATION_GRACE_MS: i64 = 60_000;

/// `POST /v1/batches`.
pub async fn create(
    State(state): State<AppState>,
    tenant: Tenant,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    create_from_json(&state, &tenant, &body).await.map(Json)
}

/// The OpenAI create: a batch over an uploaded input file.
pub(crate) async fn create_from_json(
    state: &AppState,
    tenant: &Tenant,
    body: &Value,
) -> Result<Value, ApiError> {
    let params = CreateBatch::parse(body, state.settings.window_bounds())?;
    check_id(state, "input_file_id", &params.input_file_id)?;
    admission::admit(state, tenant, &params, params.priority()).await?;
    let batch_id = reserve_batch(state, tenant).await?;
    store_reserved(state, tenant, &batch_id, params).await
}

/// A new batch id, counted against the tenant's open batches (`limits.max_open_batches`):
/// 429 `batch_limit_exceeded` when the tenant is at the limit (and 429 `budget_exceeded` when its
/// budget is spent). Every way of creating a batch takes one before doing any work, and ends in
/// [`store_reserved`] (or [`release_batch`]).
pub(crate) async fn reserve_batch(state: &AppState, tenant: &Tenant) -> Result<String, ApiError> {
    super::usage::refuse_when_spent(state, tenant).await?;
    // A batch stored while the broker is stalled would wait for the sweep, and its create for the
    // confirm timeout: check the broker answers first and refuse with a retryable 503 if not,
    // before anything is stored.
    if let Err(e) = state
        .publisher
        .probe(state.settings.dependencies.probe_timeout())
        .await
    {
        tracing::warn!(
            url = %state.publisher.redacted_url(),
            error = %e,
            "The broker does not answer; refusing a batch create with 503."
        );
        return Err(ApiError::NotReady {
            message: "Batches cannot be queued right now (the message broker is not answering); \
                      no batch was created. Retry later."
                .to_owned(),
        });
    }
    let batch_id = new_batch_id();
    let limit = state.settings.limits.max_open_batches;
    let store = &state.store;
    let mut reserved = store
        .reserve_open_batch(tenant.id(), &batch_id, limit)
        .await
        .context("Failed to count the tenant's open batches")?;
    if !reserved {
        // At the limit: first drop what a crash may have left counted (a reservation whose batch
        // was never stored, a terminal batch never retired), then try once more.
        let stale_before = sluice_core::domain::now_millis() - RESERVATION_GRACE_MS;
        let pruned = store
            .prune_open_batches(tenant.id(), stale_before)
            .await
            .context("Failed to prune the tenant's open batches")?;
        if pruned > 0 {
            reserved = store
                .reserve_open_batch(tenant.id(), &batch_id, limit)
                .await
                .context("Failed to count the tenant's open batches")?;
        }
    }
    if !reserved {
        return Err(ApiError::Coded {
            status: axum::http::StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "You already have {limit} batches that are not finished; wait for one to \
                 complete (or cancel one) before creating another."
            ),
            param: None,
            code: "batch_limit_exceeded",
            errors: None,
        });
    }
    Ok(batch_id)
}

/// Gives back a reservation whose batch will not be stored.
pub(crate) async fn release_batch(state: &AppState, tenant: &Tenant, batch_id: &str) {
    if let Err(e) = state.store.release_open_batch(tenant.id(), batch_id).await {
        tracing::warn!(%batch_id, error = %e, "Failed to release an open-batch reservation.");
    }
}

/// Stores a reserved batch (`validating`), announces it and answers its object.
pub(crate) async fn store_reserved(
    state: &AppState,
    tenant: &Tenant,
    batch_id: &str,
    params: CreateBatch,
) -> Result<Value, ApiError> {
    store_reserved_with(state, tenant, batch_id, params, Vec::new()).await
}

/// [`store_reserved`], with `extra` fields stored in the batch's record from the start (a retry's
/// `retry_of`).
pub(crate) async fn store_reserved_with(
    state: &AppState,
    tenant: &Tenant,
    batch_id: &str,
    params: CreateBatch,
    extra: Vec<(&str, String)>,
) -> Result<Value, ApiError> {
    let batch_id = batch_id.to_owned();
    // Taken before the batch exists, so a delete of the file from now on is refused (409); a file
    // that is missing or not the tenant's is not taken, and the dispatcher fails the batch.
    if let Err(e) = state
        .store
        .use_file(&params.input_file_id, tenant.id(), &batch_id)
        .await
    {
        release_batch(state, tenant, &batch_id).await;
        return Err(anyhow::Error::new(e)
            .context("Failed to record a batch's input file")
            .into());
    }
    let created_at = now_secs();
    let expires_at = created_at.saturating_add(params.window.as_secs() as i64);
    let priority = params.priority();
    let mut fields = extra;
    fields.extend([
        (batch_field::ENDPOINT, params.endpoint),
        (batch_field::INPUT_FILE_ID, params.input_file_id),
        (batch_field::COMPLETION_WINDOW, params.completion_window),
        (batch_field::CREATED_AT, created_at.to_string()),
        (batch_field::EXPIRES_AT, expires_at.to_string()),
    ]);
    if priority != Priority::Normal {
        fields.push((batch_field::PRIORITY, priority.as_str().to_owned()));
    }
    if let Some(metadata) = params.metadata {
        fields.push((batch_field::METADATA, metadata));
    }
    // The default is fixed at creation, so the result files' lifetime is what it was when the
    // batch was submitted.
    let output_secs = params
        .output_expires_after_secs
        .unwrap_or(state.settings.lifecycle.batch_output_expires_after_secs as i64);
    fields.push((
        batch_field::OUTPUT_EXPIRES_AFTER_SECS,
        output_secs.to_string(),
    ));
    if let Err(e) = state
        .store
        .create_batch(&batch_id, tenant.id(), expires_at, &fields)
        .await
    {
        release_batch(state, tenant, &batch_id).await;
        return Err(anyhow::Error::new(e)
            .context("Failed to store a new batch")
            .into());
    }
    // Read back before announcing: once the dispatcher has the event it may fail or start the
    // batch at once, and the create answer must show the batch as created (`validating`).
    let meta = reload(state, &batch_id).await?;
    announce(state, &state.keys().control_queue(), &batch_id).await;
    Ok(present(state, tenant, &meta))
}

/// `GET /v1/batches?after=&limit=`: newest first.
#[utoipa::path(get, path = "/batches", operation_id = "listBatches", tag = "batches",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "Page size (default 20)."),
        ("after" = Option<String>, Query, description = "A batch id: the page starts after it."),
    ),
    responses((status = 200, description = "A page of batches, newest first", body = crate::openapi::BatchList), (status = 400, description = "Invalid request", body = crate::openapi::ErrorResponse), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiQuery(query): ApiQuery,
) -> Result<Json<Value>, ApiError> {
    let limit = int_param(&query, "limit", 1..=100, 20)?;
    if let Some(after) = query.get("after") {
        check_id(&state, "after", after)?;
    }
    let keys = state.keys();
    let record_key = |id: &str| keys.batch_meta(id);
    let page = read_page(
        &state.store,
        &tenant,
        PageRequest {
            set: keys.tenant_batches(tenant.id()),
            record_key: &record_key,
            after: query
                .get("after")
                .map(String::as_str)
                .filter(|a| !a.is_empty()),
            desc: true,
            limit,
            keep: &|_| true,
        },
    )
    .await?;
    let data = page
        .records
        .into_iter()
        .map(|r| Ok(present(&state, &tenant, &Batch::from_hash(r)?)))
        .collect::<Result<_, BatchRecordError>>()
        .context("Failed to read a listed batch")?;
    Ok(Json(list_object(data, page.has_more)))
}

/// `GET /v1/batches/{batch_id}`.
#[utoipa::path(get, path = "/batches/{batch_id}", operation_id = "retrieveBatch", tag = "batches", params(("batch_id" = String, Path, description = "A batch id.")),
    responses((status = 200, description = "The batch", body = crate::openapi::Batch), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub async fn retrieve(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(batch_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let meta = load_batch(&state, &tenant, &batch_id).await?;
    Ok(Json(present(&state, &tenant, &meta)))
}

/// `POST /v1/batches/{batch_id}/cancel`. Idempotent while cancelling or cancelled; 409 once the
/// batch is finishing or finished, since there is nothing left to stop.
#[utoipa::path(post, path = "/batches/{batch_id}/cancel", operation_id = "cancelBatch", tag = "batches", params(("batch_id" = String, Path, description = "A batch id.")),
    responses((status = 200, description = "The batch, `cancelling` or `cancelled`", body = crate::openapi::Batch), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflicts with the batch's status", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub async fn cancel(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(batch_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let meta = load_batch(&state, &tenant, &batch_id).await?;
    match meta.status {
        Some(BatchStatus::Cancelling | BatchStatus::Cancelled) => {
            return Ok(Json(present(&state, &tenant, &meta)));
        }
        Some(status) if !status.can_become(BatchStatus::Cancelling) => {
            return Err(cannot_cancel(status));
        }
        Some(_) | None => {}
    }
    // The status may have moved since the read; the transition script is the arbiter.
    let outcome = state
        .store
        .transition(
            &batch_id,
            BatchStatus::Cancelling,
            &[(batch_field::STOPPING, "cancelled".to_owned())],
        )
        .await
        .context("Failed to mark a batch cancelling")?;
    match outcome {
        Transition::Applied(_) => {
            announce(&state, &state.keys().finalize_queue(), &batch_id).await;
        }
        // Already stopping: cancelled twice, or expiring (the expiry wins; it ends the same way).
        Transition::Refused(Some(
            BatchStatus::Cancelling
            | BatchStatus::Cancelled
            | BatchStatus::Validating
            | BatchStatus::InProgress,
        )) => {}
        Transition::Refused(Some(status)) => return Err(cannot_cancel(status)),
        Transition::Refused(None) => return Err(ApiError::batch_not_found(&batch_id)),
    }
    let meta = reload(&state, &batch_id).await?;
    Ok(Json(present(&state, &tenant, &meta)))
}

fn cannot_cancel(status: BatchStatus) -> ApiError {
    ApiError::Conflict {
        message: format!("Cannot cancel a batch with status '{}'.", status.as_str()),
    }
}

/// The caller's batch `batch_id`, or 404.
pub(crate) async fn load_batch(
    state: &AppState,
    tenant: &Tenant,
    batch_id: &str,
) -> Result<Batch, ApiError> {
    check_id(state, "batch_id", batch_id)?;
    let found = state
        .store
        .get_batch(batch_id)
        .await
        .context("Failed to read a batch")?;
    visible(found, tenant).ok_or_else(|| ApiError::batch_not_found(batch_id))
}

/// A batch just written by this request (batches are never deleted, so it must exist).
async fn reload(state: &AppState, batch_id: &str) -> Result<Batch, ApiError> {
    Ok(state
        .store
        .get_batch(batch_id)
        .await
        .context("Failed to read a batch back")?
        .with_context(|| format!("Batch {batch_id} vanished after being written"))?)
}

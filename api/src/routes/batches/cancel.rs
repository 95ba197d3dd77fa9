//! `POST /v1/batches/{batch_id}/cancel`.

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use serde_json::Value;
use sluice_core::domain::BatchStatus;
use sluice_store::Transition;

use super::announce::announce;
use super::dialect::present;
use super::lookup::load_batch;
use super::record::reload;
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::AppState;

/// `POST /v1/batches/{batch_id}/cancel`. Idempotent while cancelling or cancelled; 409 once the
/// batch is finishing or finished, since there is nothing left to stop.
#[utoipa::path(post, path = "/batches/{batch_id}/cancel", operation_id = "cancelBatch", tag = "batches", params(("batch_id" = String, Path, description = "A batch id.")),
    responses((status = 200, description = "The batch, `cancelling` or `cancelled`", body = crate::openapi::Batch), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 409, description = "Conflicts with the batch's status", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(batch_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let meta = load_batch(&state, &tenant, &batch_id).await?;
    match meta.status {
        Some(BatchStatus::Cancelling | BatchStatus::Cancelled) => {
            return Ok(Json(present(&state, &tenant, &meta)));
        }
        Some(
            status @ (BatchStatus::Completed
            | BatchStatus::Failed
            | BatchStatus::Expired
            | BatchStatus::Finalizing),
        ) => return Err(cannot_cancel(status)),
        Some(BatchStatus::Validating | BatchStatus::InProgress) | None => {}
    }
    // The status may have moved since the read; the transition script is the arbiter.
    let outcome = state
        .store
        .transition(
            &batch_id,
            BatchStatus::Cancelling,
            &[("stopping", "cancelled".to_owned())],
        )
        .await
        .context("Failed to mark a batch cancelling")?;
    match outcome {
        Transition::Applied(_) => {
            // Read before the aggregator hears of it: a quick aggregator could otherwise end the
            // batch first, and the cancel would answer `cancelled` instead of `cancelling`.
            let meta = reload(&state, &batch_id).await?;
            announce(&state, &state.keys().finalize_queue(), &batch_id).await;
            return Ok(Json(present(&state, &tenant, &meta)));
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

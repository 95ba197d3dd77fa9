//! `GET /v1/batches/{batch_id}`.

use axum::Json;
use axum::extract::State;
use serde_json::Value;

use super::dialect::present;
use super::lookup::load_batch;
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::AppState;

/// `GET /v1/batches/{batch_id}`.
#[utoipa::path(get, path = "/batches/{batch_id}", operation_id = "retrieveBatch", tag = "batches", params(("batch_id" = String, Path, description = "A batch id.")),
    responses((status = 200, description = "The batch", body = crate::openapi::Batch), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn retrieve(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(batch_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let meta = load_batch(&state, &tenant, &batch_id).await?;
    Ok(Json(present(&state, &tenant, &meta)))
}

//! `GET /v1/batches`: the tenant's batches, newest first.

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use serde_json::Value;
use sluice_core::domain::{Batch, BatchRecordError};

use super::dialect::present;
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::{ApiQuery, int_param};
use crate::routes::bounds::check_id;
use crate::routes::listing::{PageRequest, list_object, read_page};
use crate::state::AppState;

/// `GET /v1/batches?after=&limit=`: newest first.
#[utoipa::path(get, path = "/batches", operation_id = "listBatches", tag = "batches",
    params(
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 100, description = "Page size (default 20)."),
        ("after" = Option<String>, Query, description = "A batch id: the page starts after it."),
    ),
    responses((status = 200, description = "A page of batches, newest first", body = crate::openapi::BatchList), (status = 400, description = "Invalid request", body = crate::openapi::ErrorResponse), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn list(
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

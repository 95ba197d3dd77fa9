//! `GET /v1/files`: the tenant's files, a page at a time, with its storage usage and quota.

use std::collections::HashMap;

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use sluice_core::domain::{FileMeta, now_secs};
use sluice_core::validate::clip;

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::{ApiQuery, int_param};
use crate::routes::bounds::{ECHO_BYTES, check_id};
use crate::routes::listing::{PageRequest, list_object, read_page};
use crate::state::AppState;

/// `GET /v1/files?purpose=&limit=&order=&after=`.
#[utoipa::path(get, path = "/files", operation_id = "listFiles", tag = "files",
    params(
        ("purpose" = Option<String>, Query, description = "Only files of this purpose."),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 10000, description = "Page size (default 10000)."),
        ("order" = inline(Option<crate::openapi::Order>), Query, description = "By creation time (default `desc`)."),
        ("after" = Option<String>, Query, description = "A file id: the page starts after it."),
    ),
    responses((status = 200, description = "A page of files", body = crate::openapi::FileList, headers(
        ("sluice-storage-used-bytes" = u64, description = "Bytes the tenant stores (uploads and result files)."),
        ("sluice-storage-limit-bytes" = u64, description = "The tenant's storage quota in bytes."),
        ("sluice-storage-used-files" = u64, description = "Files the tenant stores."),
        ("sluice-storage-limit-files" = u64, description = "The tenant's quota of files."),
    )), (status = 400, description = "Invalid request", body = crate::openapi::ErrorResponse), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiQuery(query): ApiQuery,
) -> Result<impl IntoResponse, ApiError> {
    let limit = int_param(&query, "limit", 1..=10_000, 10_000)?;
    if let Some(after) = query.get("after") {
        check_id(&state, "after", after)?;
    }
    let desc = match query.get("order").map(String::as_str) {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(ApiError::invalid_value(
                "order",
                format!(
                    "Invalid value: '{}'. Supported values are: 'asc' and 'desc'.",
                    clip(other, ECHO_BYTES)
                ),
            ));
        }
    };
    let purpose = query.get("purpose").filter(|p| !p.is_empty());
    let now = now_secs();
    let keep = |record: &HashMap<String, String>| {
        purpose.is_none_or(|p| record.get("purpose") == Some(p)) && !expired(record, now)
    };
    let keys = state.keys();
    let record_key = |id: &str| keys.file(id);
    let page = read_page(
        &state.store,
        &tenant,
        PageRequest {
            set: keys.tenant_files(tenant.id()),
            record_key: &record_key,
            after: query
                .get("after")
                .map(String::as_str)
                .filter(|a| !a.is_empty()),
            desc,
            limit,
            keep: &keep,
        },
    )
    .await?;
    let data = page
        .records
        .into_iter()
        .map(|r| FileMeta(r).to_object())
        .collect();
    let usage = state
        .store
        .storage_usage(tenant.id())
        .await
        .context("Failed to read a tenant's storage usage")?;
    let quota = state.settings.storage_quota(tenant.id());
    Ok((
        [
            (STORAGE_USED_BYTES, usage.bytes.to_string()),
            (STORAGE_LIMIT_BYTES, quota.bytes.to_string()),
            (STORAGE_USED_FILES, usage.files.to_string()),
            (STORAGE_LIMIT_FILES, quota.files.to_string()),
        ],
        Json(list_object(data, page.has_more)),
    ))
}

// Headers of `GET /v1/files`: what the tenant stores (uploads and result files) and its quota.
/// Bytes the tenant stores.
const STORAGE_USED_BYTES: &str = "sluice-storage-used-bytes";
/// The tenant's storage quota in bytes.
const STORAGE_LIMIT_BYTES: &str = "sluice-storage-limit-bytes";
/// Files the tenant stores.
const STORAGE_USED_FILES: &str = "sluice-storage-used-files";
/// The tenant's quota of files.
const STORAGE_LIMIT_FILES: &str = "sluice-storage-limit-files";

/// Whether a file record is past its `expires_at`: it answers 404 from then on, before the sweep
/// has deleted it.
fn expired(record: &HashMap<String, String>, now: i64) -> bool {
    record
        .get("expires_at")
        .and_then(|e| e.parse::<i64>().ok())
        .is_some_and(|at| at <= now)
}

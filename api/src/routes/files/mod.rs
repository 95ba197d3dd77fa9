//! The Files API: upload, list, retrieve, delete and download batch input and result files.
//!
//! Uploads stream part by part to object storage, so an API replica's memory does not grow with the
//! file size (at most a few multipart chunks are buffered per upload).

use std::collections::HashMap;

use anyhow::Context;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde_json::{Value, json};
use sluice_core::domain::{FileMeta, now_millis, now_secs};
use sluice_core::validate::clip;
use sluice_store::file_users::FileDelete;

use super::{ECHO_BYTES, PageRequest, check_id, list_object, read_page, visible};
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery, int_param};
use crate::state::AppState;

mod part_headers;
mod sniff;
mod upload;
pub(crate) use upload::register_upload;
pub use upload::{__path_upload, too_large_as_envelope, upload};

/// A batch that took a file this long ago and is still not stored was left by a crash.
const USE_GRACE_MS: i64 = 60_000;

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
pub async fn list(
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

/// Headers of `GET /v1/files`: what the tenant stores (uploads and result files) and its quota.
pub const STORAGE_USED_BYTES: &str = "sluice-storage-used-bytes";
pub const STORAGE_LIMIT_BYTES: &str = "sluice-storage-limit-bytes";
pub const STORAGE_USED_FILES: &str = "sluice-storage-used-files";
pub const STORAGE_LIMIT_FILES: &str = "sluice-storage-limit-files";

/// Whether a file record is past its `expires_at`: it answers 404 from then on, before the sweep
/// has deleted it.
fn expired(record: &HashMap<String, String>, now: i64) -> bool {
    record
        .get("expires_at")
        .and_then(|e| e.parse::<i64>().ok())
        .is_some_and(|at| at <= now)
}

/// `GET /v1/files/{file_id}`.
#[utoipa::path(get, path = "/files/{file_id}", operation_id = "retrieveFile", tag = "files", params(("file_id" = String, Path, description = "A file id.")),
    responses((status = 200, description = "The file", body = crate::openapi::FileObject), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub async fn retrieve(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(file_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let meta = load_file(&state, &tenant, &file_id).await?;
    Ok(Json(meta.to_object()))
}

/// `DELETE /v1/files/{file_id}`: the record first, so the file disappears even if the bytes
/// cannot be removed right now. A file that an unfinished batch reads is kept (409
/// `file_in_use`) until that batch ends.
#[utoipa::path(delete, path = "/files/{file_id}", operation_id = "deleteFile", tag = "files", params(("file_id" = String, Path, description = "A file id.")),
    responses((status = 200, description = "Deleted", body = crate::openapi::DeletedFile), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 409, description = "An unfinished batch reads the file", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(file_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let meta = load_file(&state, &tenant, &file_id).await?;
    let store = &state.store;
    let mut verdict = store
        .delete_file_unless_used(&file_id, tenant.id())
        .await
        .context("Failed to delete a file record")?;
    if let FileDelete::InUse(_) = verdict {
        // Users a crash left behind (a batch never stored, a finished batch never retired) must
        // not pin the file forever.
        let stale_before = now_millis() - USE_GRACE_MS;
        let pruned = store
            .prune_file_users(&file_id, stale_before)
            .await
            .context("Failed to prune a file's users")?;
        if pruned > 0 {
            verdict = store
                .delete_file_unless_used(&file_id, tenant.id())
                .await
                .context("Failed to delete a file record")?;
        }
    }
    if let FileDelete::InUse(batches) = verdict {
        return Err(ApiError::Coded {
            status: StatusCode::CONFLICT,
            message: format!(
                "File {file_id} is the input of batch {} which has not finished; delete the file \
                 once the batch has ended (or cancel the batch first).",
                batches.join(", ")
            ),
            param: Some("file_id".into()),
            code: "file_in_use",
            errors: None,
        });
    }
    if let Some(path) = storage_path(&meta) {
        match state.files.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %e, %file_id, "Failed to delete the bytes of a deleted file.");
            }
        }
    }
    Ok(Json(
        json!({"id": file_id, "object": "file", "deleted": true}),
    ))
}

/// `GET /v1/files/{file_id}/content`: the stored bytes, streamed.
#[utoipa::path(get, path = "/files/{file_id}/content", operation_id = "downloadFile", tag = "files", params(("file_id" = String, Path, description = "A file id.")),
    responses((status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = String), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub async fn content(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(file_id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let meta = load_file(&state, &tenant, &file_id).await?;
    let path =
        storage_path(&meta).with_context(|| format!("File {file_id} has no storage path"))?;
    // Ranged reads: the client sets the pace, and one request streaming the whole file would
    // outlast the store's request timeout on a slow download.
    let (size, chunks) = match sluice_runtime::storage::read_chunked(&state.files, &path).await {
        Ok(object) => object,
        Err(object_store::Error::NotFound { .. }) => {
            tracing::warn!(%file_id, "A file record points at missing bytes.");
            return Err(ApiError::file_not_found(&file_id));
        }
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context("Failed to read a file from object storage")
                .into());
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(chunks),
    )
        .into_response())
}

/// The caller's file `file_id`, or 404.
pub(crate) async fn load_file(
    state: &AppState,
    tenant: &Tenant,
    file_id: &str,
) -> Result<FileMeta, ApiError> {
    check_id(state, "file_id", file_id)?;
    let found = state
        .store
        .get_file(file_id)
        .await
        .context("Failed to read a file record")?;
    visible(found, tenant)
        .filter(|meta| !meta.expired(now_secs()))
        .ok_or_else(|| ApiError::file_not_found(file_id))
}

/// Where a file's bytes live; `None` for a record without a path.
fn storage_path(meta: &FileMeta) -> Option<Path> {
    let raw = meta.path();
    if raw.is_empty() {
        return None;
    }
    Some(Path::parse(raw).unwrap_or_else(|_| Path::from(raw)))
}

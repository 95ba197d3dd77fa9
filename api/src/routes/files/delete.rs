//! `DELETE /v1/files/{file_id}`.

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use object_store::ObjectStoreExt;
use serde_json::{Value, json};
use sluice_core::domain::now_millis;
use sluice_store::file_users::FileDelete;

use super::lookup::{load_file, storage_path};
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::AppState;

/// A batch that took a file this long ago and is still not stored was left by a crash.
const USE_GRACE_MS: i64 = 60_000;

/// `DELETE /v1/files/{file_id}`: the record first, so the file disappears even if the bytes
/// cannot be removed right now. A file that an unfinished batch reads is kept (409
/// `file_in_use`) until that batch ends.
#[utoipa::path(delete, path = "/files/{file_id}", operation_id = "deleteFile", tag = "files", params(("file_id" = String, Path, description = "A file id.")),
    responses((status = 200, description = "Deleted", body = crate::openapi::DeletedFile), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 409, description = "An unfinished batch reads the file", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn delete(
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

//! `GET /v1/files/{file_id}`.

use axum::Json;
use axum::extract::State;
use serde_json::Value;

use super::lookup::load_file;
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::state::AppState;

/// `GET /v1/files/{file_id}`.
#[utoipa::path(get, path = "/files/{file_id}", operation_id = "retrieveFile", tag = "files", params(("file_id" = String, Path, description = "A file id.")),
    responses((status = 200, description = "The file", body = crate::openapi::FileObject), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn retrieve(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(file_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let meta = load_file(&state, &tenant, &file_id).await?;
    Ok(Json(meta.to_object()))
}

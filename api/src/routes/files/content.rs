//! `GET /v1/files/{file_id}/content`.

use anyhow::Context;
use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::lookup::{load_file, storage_path};
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::ApiPath;
use crate::routes::download::attachment;
use crate::state::AppState;

/// `GET /v1/files/{file_id}/content`: the stored bytes, streamed.
#[utoipa::path(get, path = "/files/{file_id}/content", operation_id = "downloadFile", tag = "files", params(("file_id" = String, Path, description = "A file id.")),
    responses((status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = String), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn content(
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
    let mut response = (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(chunks),
    )
        .into_response();
    let filename = meta.get("filename").unwrap_or_default();
    attachment(response.headers_mut(), filename, &file_id);
    Ok(response)
}

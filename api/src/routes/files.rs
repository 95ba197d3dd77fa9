//! The Files API: upload, list, retrieve, delete and download batch input and result files.
//!
//! Uploads stream part by part to object storage, so an API replica's memory does not grow with the
//! file size (at most a few multipart chunks are buffered per upload).

use std::collections::HashMap;

use anyhow::Context;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::extract::multipart::{Field, Multipart, MultipartError, MultipartRejection};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use object_store::path::Path;
use object_store::{ObjectStoreExt, WriteMultipart};
use serde_json::{Value, json};
use sluice_shared::domain::{FileMeta, new_file_id, now_secs};
use sluice_shared::storage::upload_path;

use super::{EXPIRES_AFTER_SECS, PageRequest, list_object, read_page, visible};
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery, int_param};
use crate::state::AppState;

/// Purposes OpenAI accepts at upload; all but `batch` get a "not supported here" answer rather than
/// an "unknown value" one.
const KNOWN_PURPOSES: &[&str] = &[
    "assistants",
    "batch",
    "fine-tune",
    "vision",
    "user_data",
    "evals",
];
/// Batch input files expire after 30 days unless the upload says otherwise.
const DEFAULT_EXPIRES_AFTER_SECS: i64 = 30 * 86_400;
/// Largest accepted text field (`purpose`, `expires_after[…]`): they are tiny, and reading them
/// whole must not become a way around the streaming.
const MAX_TEXT_FIELD: usize = 4 * 1024;
/// Multipart chunks uploaded at once per file: bounds memory to about this many 5 MiB parts.
const PART_CONCURRENCY: usize = 2;

/// What the form carried, validated field by field as it arrives.
#[derive(Default)]
struct Form {
    purpose: Option<String>,
    anchor: Option<String>,
    seconds: Option<i64>,
    file: Option<Received>,
}

/// A file part already written to object storage.
struct Received {
    filename: String,
    bytes: u64,
}

/// `POST /v1/files` (multipart: `purpose`, `file`, optional `expires_after[anchor|seconds]`).
#[utoipa::path(post, path = "/files", operation_id = "createFile", tag = "files",
    request_body(content = crate::openapi::UploadForm, content_type = "multipart/form-data"),
    responses((status = 200, description = "The stored file", body = crate::openapi::FileObject), (status = 400, description = "Invalid request", body = crate::openapi::ErrorResponse), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 413, description = "Over the size limit", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub async fn upload(
    State(state): State<AppState>,
    tenant: Tenant,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let mut multipart = multipart?;
    let file_id = new_file_id();
    let path = upload_path(&file_id);
    let mut form = Form::default();
    let result = match receive(&state, &mut multipart, &path, &mut form).await {
        Ok(()) => record(&state, &tenant, &file_id, &path, &form).await,
        Err(e) => Err(e),
    };
    // The bytes may be stored already when a later field (say, `purpose` after `file`) is bad.
    if result.is_err()
        && form.file.is_some()
        && let Err(e) = state.files.delete(&path).await
    {
        tracing::warn!(error = %e, %file_id, "Failed to delete the bytes of a rejected upload.");
    }
    result.map(Json)
}

/// Reads every part, streaming the file part to `path`.
async fn receive(
    state: &AppState,
    multipart: &mut Multipart,
    path: &Path,
    form: &mut Form,
) -> Result<(), ApiError> {
    let limit = state.settings.limits.max_upload_bytes;
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit))?
    {
        match field.name().unwrap_or_default() {
            "purpose" => {
                let purpose = read_text(&mut field, "purpose", limit).await?;
                check_purpose(&purpose)?;
                form.purpose = Some(purpose);
            }
            "expires_after[anchor]" => {
                let anchor = read_text(&mut field, "expires_after[anchor]", limit).await?;
                if anchor != "created_at" {
                    return Err(ApiError::invalid_value(
                        "expires_after.anchor",
                        format!("Invalid value: '{anchor}'. Supported values are: 'created_at'."),
                    ));
                }
                form.anchor = Some(anchor);
            }
            "expires_after[seconds]" => {
                let raw = read_text(&mut field, "expires_after[seconds]", limit).await?;
                form.seconds = Some(check_expiry_seconds(&raw)?);
            }
            "file" => {
                if form.file.is_some() {
                    return Err(ApiError::InvalidRequest {
                        message: "Only one 'file' part may be uploaded per request.".into(),
                        param: Some("file".into()),
                        code: None,
                    });
                }
                let filename = basename(field.file_name().unwrap_or_default()).to_owned();
                check_filename(&filename)?;
                let bytes = stream_to_storage(state, &mut field, path).await?;
                form.file = Some(Received { filename, bytes });
            }
            // Clients may send fields we do not use; multer skips their bytes.
            _ => {}
        }
    }
    Ok(())
}

/// Records a fully received upload and answers its file object.
async fn record(
    state: &AppState,
    tenant: &Tenant,
    file_id: &str,
    path: &Path,
    form: &Form,
) -> Result<Value, ApiError> {
    if form.purpose.is_none() {
        return Err(ApiError::missing("purpose"));
    }
    let Some(file) = &form.file else {
        return Err(ApiError::missing("file"));
    };
    let expires_after = match (&form.anchor, form.seconds) {
        (None, None) => DEFAULT_EXPIRES_AFTER_SECS,
        (Some(_), Some(seconds)) => seconds,
        (None, Some(_)) => return Err(ApiError::missing("expires_after.anchor")),
        (Some(_), None) => return Err(ApiError::missing("expires_after.seconds")),
    };
    let created_at = now_secs();
    let fields = [
        ("bytes", file.bytes.to_string()),
        ("created_at", created_at.to_string()),
        ("expires_at", (created_at + expires_after).to_string()),
        ("filename", file.filename.clone()),
        ("purpose", "batch".to_owned()),
        ("path", path.to_string()),
    ];
    state
        .store
        .put_file(file_id, tenant.id(), &fields)
        .await
        .context("Failed to record an uploaded file")?;
    let mut meta: HashMap<String, String> =
        fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    meta.insert("id".into(), file_id.to_owned());
    meta.insert("tenant".into(), tenant.id().to_owned());
    Ok(FileMeta(meta).to_object())
}

/// Copies the file part to object storage chunk by chunk, counting bytes against the limit.
async fn stream_to_storage(
    state: &AppState,
    field: &mut Field<'_>,
    path: &Path,
) -> Result<u64, ApiError> {
    let limit = state.settings.limits.max_upload_bytes;
    let upload = state
        .files
        .put_multipart(path)
        .await
        .context("Failed to start an upload to object storage")?;
    let mut writer = WriteMultipart::new(upload);
    let mut bytes: u64 = 0;
    let failure = loop {
        let chunk = match field.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break None,
            Err(e) => break Some(multipart_error(e, limit)),
        };
        let len = chunk.len() as u64;
        bytes += len;
        state.metrics.upload_bytes.inc_by(len);
        if bytes > limit {
            break Some(ApiError::FileTooLarge { limit });
        }
        // Back-pressure: stop reading the client while object storage is behind.
        if let Err(e) = writer.wait_for_capacity(PART_CONCURRENCY).await {
            break Some(
                anyhow::Error::new(e)
                    .context("Failed to upload a part to object storage")
                    .into(),
            );
        }
        writer.put(chunk);
    };
    if let Some(error) = failure {
        if let Err(e) = writer.abort().await {
            tracing::warn!(error = %e, "Failed to abort an upload to object storage.");
        }
        return Err(error);
    }
    writer
        .finish()
        .await
        .context("Failed to complete an upload to object storage")?;
    Ok(bytes)
}

/// Reads a small text field whole.
async fn read_text(field: &mut Field<'_>, name: &str, limit: u64) -> Result<String, ApiError> {
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(e, limit))? {
        if buf.len() + chunk.len() > MAX_TEXT_FIELD {
            return Err(ApiError::invalid_value(
                name,
                format!("The '{name}' field is longer than {MAX_TEXT_FIELD} bytes."),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf)
        .map(|s| s.trim().to_owned())
        .map_err(|_| ApiError::invalid_value(name, format!("The '{name}' field is not UTF-8.")))
}

fn multipart_error(error: MultipartError, limit: u64) -> ApiError {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::FileTooLarge { limit }
    } else {
        error.into()
    }
}

fn check_purpose(purpose: &str) -> Result<(), ApiError> {
    if purpose == "batch" {
        return Ok(());
    }
    let message = if KNOWN_PURPOSES.contains(&purpose) {
        format!("Invalid value: '{purpose}'. This server only supports files with purpose 'batch'.")
    } else {
        format!("Invalid value: '{purpose}'. Supported values are: 'batch'.")
    };
    Err(ApiError::invalid_value("purpose", message))
}

fn check_filename(filename: &str) -> Result<(), ApiError> {
    if filename.to_ascii_lowercase().ends_with(".jsonl") {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "Invalid file format for Batch API. Must be .jsonl",
        ))
    }
}

fn check_expiry_seconds(raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|s| EXPIRES_AFTER_SECS.contains(s))
        .ok_or_else(|| {
            ApiError::invalid_value(
                "expires_after.seconds",
                format!(
                    "Invalid 'expires_after.seconds': expected an integer between {} and {}, but \
                     got '{raw}' instead.",
                    EXPIRES_AFTER_SECS.start(),
                    EXPIRES_AFTER_SECS.end()
                ),
            )
        })
}

/// Some clients send a full path as the part's filename; the file object names only the file.
fn basename(filename: &str) -> &str {
    filename.rsplit(['/', '\\']).next().unwrap_or(filename)
}

/// Response middleware of the upload route: the body-limit layer's bare 413 becomes the envelope.
pub async fn too_large_as_envelope(State(limit): State<u64>, response: Response) -> Response {
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::FileTooLarge { limit }.into_response()
    } else {
        response
    }
}

/// `GET /v1/files?purpose=&limit=&order=&after=`.
#[utoipa::path(get, path = "/files", operation_id = "listFiles", tag = "files",
    params(
        ("purpose" = Option<String>, Query, description = "Only files of this purpose."),
        ("limit" = Option<i64>, Query, minimum = 1, maximum = 10000, description = "Page size (default 10000)."),
        ("order" = inline(Option<crate::openapi::Order>), Query, description = "By creation time (default `desc`)."),
        ("after" = Option<String>, Query, description = "A file id: the page starts after it."),
    ),
    responses((status = 200, description = "A page of files", body = crate::openapi::FileList), (status = 400, description = "Invalid request", body = crate::openapi::ErrorResponse), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub async fn list(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiQuery(query): ApiQuery,
) -> Result<Json<Value>, ApiError> {
    let limit = int_param(&query, "limit", 1..=10_000, 10_000)?;
    let desc = match query.get("order").map(String::as_str) {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(other) => {
            return Err(ApiError::invalid_value(
                "order",
                format!("Invalid value: '{other}'. Supported values are: 'asc' and 'desc'."),
            ));
        }
    };
    let purpose = query.get("purpose").filter(|p| !p.is_empty());
    let keep =
        |record: &HashMap<String, String>| purpose.is_none_or(|p| record.get("purpose") == Some(p));
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
    Ok(Json(list_object(data, page.has_more)))
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
/// cannot be removed right now.
#[utoipa::path(delete, path = "/files/{file_id}", operation_id = "deleteFile", tag = "files", params(("file_id" = String, Path, description = "A file id.")),
    responses((status = 200, description = "Deleted", body = crate::openapi::DeletedFile), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub async fn delete(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(file_id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let meta = load_file(&state, &tenant, &file_id).await?;
    state
        .store
        .delete_file(&file_id, tenant.id())
        .await
        .context("Failed to delete a file record")?;
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
    let object = match state.files.get(&path).await {
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
    let size = object.meta.size;
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(object.into_stream()),
    )
        .into_response())
}

/// The caller's file `file_id`, or 404.
async fn load_file(state: &AppState, tenant: &Tenant, file_id: &str) -> Result<FileMeta, ApiError> {
    let found = state
        .store
        .get_file(file_id)
        .await
        .context("Failed to read a file record")?;
    visible(found, tenant).ok_or_else(|| ApiError::file_not_found(file_id))
}

/// Where a file's bytes live; `None` for a record without a path.
fn storage_path(meta: &FileMeta) -> Option<Path> {
    let raw = meta.path();
    if raw.is_empty() {
        return None;
    }
    Some(Path::parse(raw).unwrap_or_else(|_| Path::from(raw)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_batch_purpose_is_accepted() {
        assert!(check_purpose("batch").is_ok());
        for purpose in ["fine-tune", "nonsense", ""] {
            let err = check_purpose(purpose).unwrap_err();
            assert!(
                matches!(&err, ApiError::InvalidRequest { param: Some(p), code: Some("invalid_value"), .. } if p == "purpose")
            );
        }
    }

    #[test]
    fn batch_files_must_be_jsonl() {
        assert!(check_filename("requests.jsonl").is_ok());
        assert!(check_filename("REQUESTS.JSONL").is_ok());
        let err = check_filename("requests.json").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid file format for Batch API. Must be .jsonl"
        );
        assert!(check_filename("").is_err());
    }

    #[test]
    fn expiry_seconds_are_bounded() {
        assert_eq!(check_expiry_seconds("3600").unwrap(), 3600);
        assert_eq!(check_expiry_seconds("2592000").unwrap(), 2_592_000);
        assert!(check_expiry_seconds("3599").is_err());
        assert!(check_expiry_seconds("2592001").is_err());
        assert!(check_expiry_seconds("1h").is_err());
    }

    #[test]
    fn filenames_lose_their_directories() {
        assert_eq!(basename("a/b/c.jsonl"), "c.jsonl");
        assert_eq!(basename("C:\\x\\c.jsonl"), "c.jsonl");
        assert_eq!(basename("c.jsonl"), "c.jsonl");
    }
}

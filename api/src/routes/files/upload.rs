//! Uploads: the multipart form read field by field and checked, the file part streamed to object
//! storage in parts within the tenant's quota, then the file recorded.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use axum::Json;
use axum::extract::multipart::{Field, Multipart, MultipartError};
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use object_store::path::Path;
use object_store::{ObjectStoreExt, WriteMultipart};
use serde_json::Value;
use sluice_core::config::StorageQuota;
use sluice_core::domain::{FileMeta, new_file_id, now_secs};
use sluice_core::validate::clip;
use sluice_runtime::storage::upload_path;
use sluice_store::lifecycle_store::{QuotaPart, Registered, StorageUsage};

use super::part_headers::guard_part_headers;
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::routes::bounds::{ECHO_BYTES, EXPIRES_AFTER_SECS};
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
    sniff: super::sniff::Sniff,
}

/// `POST /v1/files` (multipart: `purpose`, `file`, optional `expires_after[anchor|seconds]`).
#[utoipa::path(post, path = "/files", operation_id = "createFile", tag = "files",
    request_body(content = crate::openapi::UploadForm, content_type = "multipart/form-data"),
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes the create safe to retry: the same key with the same request within `idempotency.retention_secs` (24 h) answers the first success again (with `idempotent-replayed: true`) and creates nothing. Per tenant; at most `idempotency.max_key_chars` (255) visible ASCII characters.")),
    responses((status = 200, description = "The stored file", body = crate::openapi::FileObject, headers(("idempotent-replayed" = String, description = "`true` when this is the recorded answer to an earlier request with the same `Idempotency-Key`."))), (status = 400, description = "Invalid request", body = crate::openapi::ErrorResponse), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 403, description = "The file would take the tenant past its storage quota (`storage_quota_exceeded`)", body = crate::openapi::ErrorResponse), (status = 408, description = "The body stopped arriving (`request_body_timeout`)", body = crate::openapi::ErrorResponse), (status = 409, description = "The `Idempotency-Key` was used with another request (`idempotency_key_reused`), or its first request is still running (`idempotency_key_in_progress`, retryable)", body = crate::openapi::ErrorResponse), (status = 413, description = "Over the size limit", body = crate::openapi::ErrorResponse), (status = 429, description = "Too many uploads in flight for this tenant (`too_many_uploads`)", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn upload(
    State(state): State<AppState>,
    tenant: Tenant,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let max_header = state.settings.limits.max_part_header_bytes;
    let oversized = Arc::new(AtomicBool::new(false));
    let request = guard_part_headers(request, max_header, oversized.clone());
    let mut multipart = Multipart::from_request(request, &()).await?;
    let file_id = new_file_id();
    let path = upload_path(&file_id);
    let mut form = Form::default();
    let room = room_left(&state, &tenant).await?;
    let result = match receive(&state, &mut multipart, &path, &mut form, room).await {
        Ok(()) => record(&state, &tenant, &file_id, &path, &form).await,
        Err(_) if oversized.load(Ordering::Relaxed) => Err(ApiError::InvalidRequest {
            message: format!("A part's headers are longer than {max_header} bytes."),
            param: None,
            code: Some("part_headers_too_large"),
        }),
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

/// What a tenant stores and may store; an upload is cut short once it cannot fit.
#[derive(Clone, Copy)]
struct Room {
    usage: StorageUsage,
    quota: StorageQuota,
}

impl Room {
    /// The refusal of a file of `bytes` that does not fit, counted.
    fn refuse(self, state: &AppState, part: QuotaPart, bytes: u64) -> ApiError {
        let limit = match part {
            QuotaPart::Bytes => "bytes",
            QuotaPart::Files => "files",
        };
        state
            .metrics
            .quota_refusals
            .with_label_values(&[limit])
            .inc();
        ApiError::storage_quota_exceeded(part, self.usage, self.quota, bytes)
    }
}

/// The caller's room, refusing at once when not even one more file fits: nothing is stored then.
/// The final word is [`sluice_store::Store::register_file`]'s atomic check, as uploads run concurrently.
async fn room_left(state: &AppState, tenant: &Tenant) -> Result<Room, ApiError> {
    let room = Room {
        usage: state
            .store
            .storage_usage(tenant.id())
            .await
            .context("Failed to read a tenant's storage usage")?,
        quota: state.settings.storage_quota(tenant.id()),
    };
    if room.usage.files >= room.quota.files {
        return Err(room.refuse(state, QuotaPart::Files, 0));
    }
    if room.usage.bytes >= room.quota.bytes {
        return Err(room.refuse(state, QuotaPart::Bytes, 0));
    }
    Ok(room)
}

/// Stores a received file's record under the tenant's quota (see [`sluice_store::Store::register_file`]); over
/// it, the record is gone and the caller removes the bytes at `path`.
pub(crate) async fn register_upload(
    state: &AppState,
    tenant: &Tenant,
    file_id: &str,
    fields: &[(&str, String)],
    bytes: u64,
) -> Result<(), ApiError> {
    let quota = state.settings.storage_quota(tenant.id());
    match state
        .store
        .register_file(file_id, tenant.id(), fields, Some(quota))
        .await
        .context("Failed to record an uploaded file")?
    {
        Registered::Stored(_) | Registered::AlreadyListed => Ok(()),
        Registered::OverQuota(part, usage) => Err(Room { usage, quota }.refuse(state, part, bytes)),
    }
}

/// Reads every part, streaming the file part to `path`.
async fn receive(
    state: &AppState,
    multipart: &mut Multipart,
    path: &Path,
    form: &mut Form,
    room: Room,
) -> Result<(), ApiError> {
    let limit = state.settings.limits.max_upload_bytes;
    let max_parts = state.settings.limits.max_multipart_parts;
    let mut parts: u64 = 0;
    while let Some(mut field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit))?
    {
        parts += 1;
        if parts > max_parts {
            return Err(ApiError::InvalidRequest {
                message: format!("The form has more than {max_parts} parts."),
                param: None,
                code: Some("too_many_parts"),
            });
        }
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
                        format!(
                            "Invalid value: '{}'. Supported values are: 'created_at'.",
                            clip(&anchor, ECHO_BYTES)
                        ),
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
                check_filename_length(&filename, state.settings.limits.max_filename_chars)?;
                check_filename(&filename)?;
                let (bytes, sniff) = stream_to_storage(state, &mut field, path, room).await?;
                form.file = Some(Received {
                    filename,
                    bytes,
                    sniff,
                });
            }
            // Clients may send fields we do not use; multer skips their bytes.
            _ => {}
        }
    }
    Ok(())
}
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
        (None, None) => state.settings.lifecycle.batch_file_expires_after_secs as i64,
        (Some(_), Some(seconds)) => seconds,
        (None, Some(_)) => return Err(ApiError::missing("expires_after.anchor")),
        (Some(_), None) => return Err(ApiError::missing("expires_after.seconds")),
    };
    let created_at = now_secs();
    let mut fields = vec![
        ("bytes", file.bytes.to_string()),
        ("created_at", created_at.to_string()),
        ("expires_at", (created_at + expires_after).to_string()),
        ("filename", file.filename.clone()),
        ("purpose", "batch".to_owned()),
        ("path", path.to_string()),
    ];
    // Kept for admission control (`limits.admission`), which estimates a batch at create.
    let (lines, model) = file.sniff.finish();
    fields.push(("lines", lines.to_string()));
    if let Some(model) = model {
        fields.push(("model", model));
    }
    register_upload(state, tenant, file_id, &fields, file.bytes).await?;
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
    room: Room,
) -> Result<(u64, super::sniff::Sniff), ApiError> {
    let limit = state.settings.limits.max_upload_bytes;
    let fits = room.quota.bytes.saturating_sub(room.usage.bytes);
    let upload = state
        .files
        .put_multipart(path)
        .await
        .context("Failed to start an upload to object storage")?;
    let mut writer = WriteMultipart::new(upload);
    let mut bytes: u64 = 0;
    let mut sniff = super::sniff::Sniff::default();
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
        if bytes > fits {
            break Some(room.refuse(state, QuotaPart::Bytes, bytes));
        }
        // Back-pressure: stop reading the client while object storage is behind.
        if let Err(e) = writer.wait_for_capacity(PART_CONCURRENCY).await {
            break Some(
                anyhow::Error::new(e)
                    .context("Failed to upload a part to object storage")
                    .into(),
            );
        }
        sniff.feed(&chunk);
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
    Ok((bytes, sniff))
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
    let purpose = clip(purpose, ECHO_BYTES);
    let message = if KNOWN_PURPOSES.contains(&purpose.as_ref()) {
        format!("Invalid value: '{purpose}'. This server only supports files with purpose 'batch'.")
    } else {
        format!("Invalid value: '{purpose}'. Supported values are: 'batch'.")
    };
    Err(ApiError::invalid_value("purpose", message))
}

fn check_filename_length(filename: &str, max: u64) -> Result<(), ApiError> {
    if filename.chars().count() as u64 > max {
        return Err(ApiError::InvalidRequest {
            message: format!("The file name is too long: at most {max} characters are allowed."),
            param: Some("file".into()),
            code: Some("string_above_max_length"),
        });
    }
    Ok(())
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
                     got '{}' instead.",
                    EXPIRES_AFTER_SECS.start(),
                    EXPIRES_AFTER_SECS.end(),
                    clip(raw, ECHO_BYTES)
                ),
            )
        })
}

/// Some clients send a full path as the part's filename; the file object names only the file.
fn basename(filename: &str) -> &str {
    filename.rsplit(['/', '\\']).next().unwrap_or(filename)
}

/// Response middleware of the upload route: the body-limit layer's bare 413 becomes the envelope.
pub(crate) async fn too_large_as_envelope(
    State(limit): State<u64>,
    response: Response,
) -> Response {
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::FileTooLarge { limit }.into_response()
    } else {
        response
    }
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
    fn long_filenames_are_refused_naming_the_file() {
        assert!(check_filename_length(&"a".repeat(255), 255).is_ok());
        let err = check_filename_length(&"é".repeat(256), 255).unwrap_err();
        assert!(matches!(err, ApiError::InvalidRequest { param: Some(ref p), .. } if p == "file"));
    }

    #[test]
    fn filenames_lose_their_directories() {
        assert_eq!(basename("a/b/c.jsonl"), "c.jsonl");
        assert_eq!(basename("C:\\x\\c.jsonl"), "c.jsonl");
        assert_eq!(basename("c.jsonl"), "c.jsonl");
    }
}

//! Finding the caller's file by id, and where its bytes live.

use anyhow::Context;
use object_store::path::Path;
use sluice_core::domain::{FileMeta, now_secs};

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::routes::bounds::check_id;
use crate::routes::visibility::visible;
use crate::state::AppState;

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
pub(super) fn storage_path(meta: &FileMeta) -> Option<Path> {
    let raw = meta.path();
    if raw.is_empty() {
        return None;
    }
    Some(Path::parse(raw).unwrap_or_else(|_| Path::from(raw)))
}

//! Finding the caller's batch by id.

use anyhow::Context;
use sluice_core::domain::Batch;

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::routes::bounds::check_id;
use crate::routes::visibility::visible;
use crate::state::AppState;

/// The caller's batch `batch_id`, or 404.
pub(crate) async fn load_batch(
    state: &AppState,
    tenant: &Tenant,
    batch_id: &str,
) -> Result<Batch, ApiError> {
    check_id(state, "batch_id", batch_id)?;
    let found = state
        .store
        .get_batch(batch_id)
        .await
        .context("Failed to read a batch")?;
    visible(found, tenant).ok_or_else(|| ApiError::batch_not_found(batch_id))
}

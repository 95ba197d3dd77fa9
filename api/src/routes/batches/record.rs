//! Storing a reserved batch: its record (`validating`), the hold on its input file, and the
//! event that tells the dispatcher about it.

use anyhow::Context;
use serde_json::Value;
use sluice_core::domain::{Batch, now_secs};
use sluice_core::schedule::Priority;

use super::announce::announce;
use super::dialect::present;
use super::params::CreateBatch;
use super::reservation::release_batch;
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::state::AppState;

/// Stores a reserved batch (`validating`), announces it and answers its object.
pub(crate) async fn store_reserved(
    state: &AppState,
    tenant: &Tenant,
    batch_id: &str,
    params: CreateBatch,
) -> Result<Value, ApiError> {
    store_reserved_with(state, tenant, batch_id, params, Vec::new()).await
}

/// [`store_reserved`], with `extra` fields stored in the batch's record from the start (a retry's
/// `retry_of`).
pub(crate) async fn store_reserved_with(
    state: &AppState,
    tenant: &Tenant,
    batch_id: &str,
    params: CreateBatch,
    extra: Vec<(&str, String)>,
) -> Result<Value, ApiError> {
    let batch_id = batch_id.to_owned();
    // Taken before the batch exists, so a delete of the file from now on is refused (409); a file
    // that is missing or not the tenant's is not taken, and the dispatcher fails the batch.
    if let Err(e) = state
        .store
        .use_file(&params.input_file_id, tenant.id(), &batch_id)
        .await
    {
        release_batch(state, tenant, &batch_id).await;
        return Err(anyhow::Error::new(e)
            .context("Failed to record a batch's input file")
            .into());
    }
    let created_at = now_secs();
    let expires_at = created_at.saturating_add(params.window.as_secs() as i64);
    let priority = params.priority();
    let mut fields = extra;
    fields.extend([
        ("endpoint", params.endpoint),
        ("input_file_id", params.input_file_id),
        ("completion_window", params.completion_window),
        ("created_at", created_at.to_string()),
        ("expires_at", expires_at.to_string()),
    ]);
    if priority != Priority::Normal {
        fields.push(("priority", priority.as_str().to_owned()));
    }
    if let Some(metadata) = params.metadata {
        fields.push(("metadata", metadata));
    }
    // The default is fixed at creation, so the result files' lifetime is what it was when the
    // batch was submitted.
    let output_secs = params
        .output_expires_after_secs
        .unwrap_or(state.settings.lifecycle.batch_output_expires_after_secs as i64);
    fields.push(("output_expires_after_secs", output_secs.to_string()));
    if let Err(e) = state
        .store
        .create_batch(&batch_id, tenant.id(), expires_at, &fields)
        .await
    {
        release_batch(state, tenant, &batch_id).await;
        return Err(anyhow::Error::new(e)
            .context("Failed to store a new batch")
            .into());
    }
    // Read back before announcing: once the dispatcher has the event it may fail or start the
    // batch at once, and the create answer must show the batch as created (`validating`).
    let meta = reload(state, &batch_id).await?;
    announce(state, &state.keys().control_queue(), &batch_id).await;
    Ok(present(state, tenant, &meta))
}

/// A batch just written by this request (batches are never deleted, so it must exist).
pub(crate) async fn reload(state: &AppState, batch_id: &str) -> Result<Batch, ApiError> {
    Ok(state
        .store
        .get_batch(batch_id)
        .await
        .context("Failed to read a batch back")?
        .with_context(|| format!("Batch {batch_id} vanished after being written"))?)
}

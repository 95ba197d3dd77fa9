//! Open-batch reservations: every way of creating a batch takes one before doing any work, so a
//! tenant never has more than `limits.max_open_batches` unfinished batches.

use anyhow::Context;
use sluice_core::domain::new_batch_id;

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::routes::usage::refuse_when_spent;
use crate::state::AppState;

/// A reservation whose batch is still not stored after this long was left by a crash.
const RESERVATION_GRACE_MS: i64 = 60_000;

/// A new batch id, counted against the tenant's open batches (`limits.max_open_batches`):
/// 429 `batch_limit_exceeded` when the tenant is at the limit (and 429 `budget_exceeded` when its
/// budget is spent). Every way of creating a batch takes one before doing any work, and ends in
/// storing the batch (`record`) or in [`release_batch`].
pub(crate) async fn reserve_batch(state: &AppState, tenant: &Tenant) -> Result<String, ApiError> {
    refuse_when_spent(state, tenant).await?;
    // A batch stored while the broker is stalled would wait for the sweep, and its create for the
    // confirm timeout: check the broker answers first and refuse with a retryable 503 if not,
    // before anything is stored.
    if let Err(e) = state
        .publisher
        .probe(state.settings.dependencies.probe_timeout())
        .await
    {
        tracing::warn!(
            url = %state.publisher.redacted_url(),
            error = %e,
            "The broker does not answer; refusing a batch create with 503."
        );
        return Err(ApiError::NotReady {
            message: "Batches cannot be queued right now (the message broker is not answering); \
                      no batch was created. Retry later."
                .to_owned(),
        });
    }
    let batch_id = new_batch_id();
    let limit = state.settings.limits.max_open_batches;
    let store = &state.store;
    let mut reserved = store
        .reserve_open_batch(tenant.id(), &batch_id, limit)
        .await
        .context("Failed to count the tenant's open batches")?;
    if !reserved {
        // At the limit: first drop what a crash may have left counted (a reservation whose batch
        // was never stored, a terminal batch never retired), then try once more.
        let stale_before = sluice_core::domain::now_millis() - RESERVATION_GRACE_MS;
        let pruned = store
            .prune_open_batches(tenant.id(), stale_before)
            .await
            .context("Failed to prune the tenant's open batches")?;
        if pruned > 0 {
            reserved = store
                .reserve_open_batch(tenant.id(), &batch_id, limit)
                .await
                .context("Failed to count the tenant's open batches")?;
        }
    }
    if !reserved {
        return Err(ApiError::Coded {
            status: axum::http::StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "You already have {limit} batches that are not finished; wait for one to \
                 complete (or cancel one) before creating another."
            ),
            param: None,
            code: "batch_limit_exceeded",
            errors: None,
        });
    }
    Ok(batch_id)
}

/// Gives back a reservation whose batch will not be stored.
pub(crate) async fn release_batch(state: &AppState, tenant: &Tenant, batch_id: &str) {
    if let Err(e) = state.store.release_open_batch(tenant.id(), batch_id).await {
        tracing::warn!(%batch_id, error = %e, "Failed to release an open-batch reservation.");
    }
}

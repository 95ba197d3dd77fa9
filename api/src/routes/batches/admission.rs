//! `limits.admission = "strict"`: a create whose batch cannot finish within its completion window
//! is refused with 429 `insufficient_capacity` before anything is stored.
//!
//! The estimate: the batch's lines (counted at upload) plus the remaining lines of the running
//! non-background batches of the same rate-limited provider that expire no later (earliest
//! deadline first serves those before it; for a background batch, every foreground line), divided
//! by the provider's current rate (what its running batches do together, else its `rpm`). A file
//! uploaded without a line count, a model no provider serves, or a provider without limits is
//! not estimated: the create goes through.

use anyhow::Context;
use sluice_shared::domain::{now_millis, now_secs};
use sluice_shared::routing::{Target, resolve_target};
use sluice_shared::schedule::{self, Priority};

use super::CreateBatch;
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::state::AppState;

pub(crate) async fn admit(
    state: &AppState,
    tenant: &Tenant,
    params: &CreateBatch,
    priority: Priority,
) -> Result<(), ApiError> {
    let settings = &state.settings;
    if settings.limits.admission != "strict" {
        return Ok(());
    }
    let Some(file) = state
        .store
        .get_file(&params.input_file_id)
        .await
        .context("Failed to read a batch's input file")?
        .filter(|f| f.tenant() == tenant.id())
    else {
        return Ok(());
    };
    let lines = file.get("lines").and_then(|n| n.parse::<u64>().ok());
    let (Some(lines), Some(model)) = (lines, file.get("model")) else {
        return Ok(());
    };
    let route = match resolve_target(
        &settings.providers,
        &settings.tasks,
        model,
        &params.endpoint,
    ) {
        Ok(Target::Model(route)) => route,
        Ok(Target::Task { backing, .. }) => backing,
        Err(_) => return Ok(()),
    };
    let provider = &settings.providers[route.provider];
    if !provider.pacing.is_limited() || lines <= settings.worker.express_lines {
        return Ok(());
    }
    let entries = schedule::read_registry(&state.store, &provider.name, now_millis())
        .await
        .context("Failed to read a provider's schedule")?;
    let rate = schedule::provider_rate(&entries, provider.pacing.rpm.map(|r| r as f64 / 60.0));
    let window = params.window.as_secs();
    let expires_at = now_secs().saturating_add(window as i64);
    let needs = schedule::admission_secs(&entries, rate, lines, expires_at, priority);
    if needs <= window as f64 {
        return Ok(());
    }
    Err(ApiError::insufficient_capacity(format!(
        "This batch cannot finish within its completion window of {}: its {lines} lines and \
         the work due before it need about {} s at the current rate of its model's provider \
         ({rate:.1} requests/s). Choose a longer completion_window or retry later.",
        params.completion_window,
        needs.ceil() as u64
    )))
}

//! `limits.admission = "strict"`: a create whose batch cannot finish within its completion window
//! is refused with 429 `insufficient_capacity` before anything is stored.
//!
//! The estimate follows the scheduling policy ([`schedule::admission_secs`]): the batch's lines
//! (counted at upload, or the inline requests) after its own tenant's batches of the same
//! rate-limited provider that expire no later, with its tenant's weighted share of the
//! provider's current rate (what its running batches do together, else its `rpm`) among the
//! tenants with work there, growing as they finish; a background batch after every foreground
//! line. A file uploaded without a line count, a model no provider serves, or a provider without
//! limits is not estimated: the create goes through. Neither is an inline create whose requests
//! are streamed (a body larger than `limits.max_json_body_bytes`): its lines are counted only as
//! they are stored.

use anyhow::Context;
use sluice_core::domain::{now_millis, now_secs};
use sluice_core::routing::{Target, resolve_target};
use sluice_core::schedule::{self, Newcomer, Priority};
use sluice_store::schedule_registry;

use super::params::CreateBatch;
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
    let ask = Ask {
        lines,
        model,
        endpoint: &params.endpoint,
        window_secs: params.window.as_secs(),
        completion_window: &params.completion_window,
        priority,
    };
    admit_lines(state, tenant, ask).await
}

/// What a create asks of its provider.
pub(crate) struct Ask<'a> {
    pub lines: u64,
    pub model: &'a str,
    pub endpoint: &'a str,
    pub window_secs: u64,
    pub completion_window: &'a str,
    pub priority: Priority,
}

/// Refuses `ask` when its lines cannot finish within its window (with `limits.admission =
/// "strict"`).
pub(crate) async fn admit_lines(
    state: &AppState,
    tenant: &Tenant,
    ask: Ask<'_>,
) -> Result<(), ApiError> {
    let settings = &state.settings;
    if settings.limits.admission != "strict" {
        return Ok(());
    }
    let Ask {
        lines,
        model,
        endpoint,
        window_secs: window,
        completion_window,
        priority,
    } = ask;
    let route = match resolve_target(&settings.providers, &settings.tasks, model, endpoint) {
        Ok(Target::Model(route)) => route,
        Ok(Target::Task { backing, .. }) => backing,
        Err(_) => return Ok(()),
    };
    let provider = &settings.providers[route.provider];
    if !provider.pacing.is_limited() || lines <= settings.worker.express_lines {
        return Ok(());
    }
    let entries = schedule_registry::read_registry(&state.store, &provider.name, now_millis())
        .await
        .context("Failed to read a provider's schedule")?;
    let rate = schedule::provider_rate(&entries, provider.pacing.rpm.map(|r| r as f64 / 60.0));
    let expires_at = now_secs().saturating_add(window as i64);
    let new = Newcomer {
        tenant: tenant.id(),
        lines,
        expires_at,
        priority,
    };
    let needs = schedule::admission_secs(&entries, rate, new, |t| settings.tenant_weight(t));
    if needs <= window as f64 {
        return Ok(());
    }
    Err(ApiError::insufficient_capacity(format!(
        "This batch cannot finish within its completion window of {completion_window}: its \
         {lines} lines and the work due before it need about {} s at the current rate of its \
         model's provider ({rate:.1} requests/s). Choose a longer completion_window or retry \
         later.",
        needs.ceil() as u64
    )))
}

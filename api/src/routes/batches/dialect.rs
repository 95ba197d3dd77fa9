//! Per-tenant wording of batch objects, for clients written against hosted batch APIs whose
//! words differ from OpenAI's (`tenants[].completed_as = "succeeded"`: a finished batch reads
//! `"status": "succeeded"` and `request_counts` also carries `succeeded`).

use serde_json::Value;
use sluice_core::domain::Batch;

use crate::auth::Tenant;
use crate::state::AppState;

/// The word this tenant's batch objects use for `completed`, when configured.
pub(crate) fn completed_as<'a>(state: &'a AppState, tenant: &Tenant) -> Option<&'a str> {
    state
        .settings
        .tenants
        .iter()
        .find(|t| t.id == tenant.id())
        .and_then(|t| t.completed_as.as_deref())
        .filter(|w| !w.is_empty() && *w != "completed")
}

/// The batch object as `tenant` sees it.
pub(crate) fn present(state: &AppState, tenant: &Tenant, meta: &Batch) -> Value {
    let mut object = meta.to_object();
    if let Some(word) = completed_as(state, tenant) {
        if object["status"] == "completed" {
            object["status"] = Value::from(word);
        }
        let completed = object["request_counts"]["completed"].clone();
        object["request_counts"][word] = completed;
    }
    object
}

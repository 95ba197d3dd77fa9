//! `GET /v1/usage`: what the caller's tenant used of its budget in the current UTC day and month,
//! and the check that refuses a batch create once a budget is spent.

use anyhow::Context;
use axum::Json;
use axum::extract::State;
use serde::Serialize;
use sluice_core::config::BudgetSettings;
use sluice_core::domain::now_secs;
use sluice_store::budget::{WindowUsage, spent};
use utoipa::ToSchema;

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::state::AppState;

/// The tenant's usage and budget.
#[derive(Serialize, ToSchema)]
pub(crate) struct TenantUsage {
    /// Always `usage`.
    pub object: &'static str,
    /// What a running batch's lines do once a budget is spent: `wait` for the reset, or `fail`
    /// with `budget_exceeded`.
    pub on_exhausted: &'static str,
    /// The budget that is spent now, if one is.
    pub exhausted: Option<Exhausted>,
    /// The current day, then the current month.
    pub data: Vec<UsageWindow>,
}

/// A spent budget.
#[derive(Serialize, ToSchema)]
pub(crate) struct Exhausted {
    /// `day` or `month`.
    pub window: &'static str,
    /// `tokens` or `requests`.
    pub limit_type: &'static str,
    /// When it resets (unix seconds).
    pub resets_at: i64,
}

/// One window: `[start_time, end_time)` in unix seconds; its budget resets at `end_time`.
#[derive(Serialize, ToSchema)]
pub(crate) struct UsageWindow {
    /// Always `usage.window`.
    pub object: &'static str,
    /// `day` (UTC) or `month` (UTC calendar month).
    pub window: &'static str,
    pub start_time: i64,
    pub end_time: i64,
    /// Lines sent upstream (a line's retries count once).
    pub requests: Amount,
    /// `usage.total_tokens` of the answers.
    pub tokens: Amount,
}

/// Used, limit (null: none) and what remains (null: no limit).
#[derive(Serialize, ToSchema)]
pub(crate) struct Amount {
    pub used: u64,
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
}

impl Amount {
    fn new(used: u64, limit: Option<u64>) -> Self {
        Self {
            used,
            limit,
            remaining: limit.map(|l| l.saturating_sub(used)),
        }
    }
}

fn budget_of<'s>(state: &'s AppState, tenant: &Tenant) -> Option<&'s BudgetSettings> {
    state
        .settings
        .tenants
        .iter()
        .find(|t| t.id == tenant.id())
        .and_then(|t| t.budget.as_ref())
}

async fn usage_of(
    state: &AppState,
    tenant: &Tenant,
    budget: Option<&BudgetSettings>,
) -> Result<[WindowUsage; 2], ApiError> {
    Ok(state
        .store
        .budget_usage(tenant.id(), budget.and_then(|b| b.window_secs), now_secs())
        .await
        .context("Failed to read the tenant's budget usage")?)
}

/// `GET /v1/usage`.
#[utoipa::path(get, path = "/usage", operation_id = "getUsage", tag = "usage",
    responses((status = 200, description = "The tenant's usage and budget in the current UTC day and month", body = TenantUsage), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn usage(
    State(state): State<AppState>,
    tenant: Tenant,
) -> Result<Json<TenantUsage>, ApiError> {
    let budget = budget_of(&state, &tenant);
    let usage = usage_of(&state, &tenant, budget).await?;
    let none = BudgetSettings::default();
    let b = budget.unwrap_or(&none);
    let limits = [
        (b.requests_per_day, b.tokens_per_day),
        (None, b.tokens_per_month),
    ];
    let data = usage
        .iter()
        .zip(limits)
        .map(|(u, (requests, tokens))| UsageWindow {
            object: "usage.window",
            window: u.window.kind.as_str(),
            start_time: u.window.start,
            end_time: u.window.end,
            requests: Amount::new(u.used.requests, requests),
            tokens: Amount::new(u.used.tokens, tokens),
        })
        .collect();
    Ok(Json(TenantUsage {
        object: "usage",
        on_exhausted: b.on_exhausted.as_str(),
        exhausted: spent(b, &usage).map(|s| Exhausted {
            window: s.window.kind.as_str(),
            limit_type: s.what,
            resets_at: s.reset_at(),
        }),
        data,
    }))
}

/// 429 `budget_exceeded` when the tenant's budget is spent: a new batch could not run before the
/// reset. Every way of creating a batch asks this first.
pub(crate) async fn refuse_when_spent(state: &AppState, tenant: &Tenant) -> Result<(), ApiError> {
    let Some(budget) = budget_of(state, tenant).filter(|b| b.is_limited()) else {
        return Ok(());
    };
    let usage = usage_of(state, tenant, Some(budget)).await?;
    match spent(budget, &usage) {
        None => Ok(()),
        Some(s) => {
            state
                .metrics
                .budget_refusals
                .with_label_values(&[tenant.id()])
                .inc();
            Err(ApiError::BudgetExceeded {
                message: format!(
                    "{} No batch was created; create it after the reset.",
                    s.message()
                ),
                reset_at: s.reset_at(),
            })
        }
    }
}

//! The tenant budget's side of one line: admission before the call (hold the line until the
//! reset, or fail it, once the budget is spent) and counting the answer's usage after it.

use std::time::Duration;

use sluice_core::config::OnExhausted;
use sluice_core::domain::{LineItem, Row, Usage, now_millis};
use sluice_store::budget::{Admit, BilledLine, Counted, Used};

use super::batch_info::BatchInfo;
use crate::WorkerContext;

/// What the budget decided for a line about to call.
pub(super) enum Admission {
    /// Call (one request counted, unless the line already counted).
    Go,
    /// Spent, policy `wait`: the line waits this long, for the reset, in a delay queue.
    Wait(Duration),
    /// Spent, policy `fail`: its error row, without a call.
    Refused(Row),
}

fn billed<'a>(info: &'a BatchInfo, batch: &'a str, line: u64) -> BilledLine<'a> {
    BilledLine {
        tenant: &info.tenant,
        batch,
        line,
        batch_expires_at: info.expires_at,
    }
}

/// Adds the usage of rows just written for the first time (`written`) to a tenant without budget
/// limits: what `GET /v1/usage` shows it. A failure costs only these counts, never the rows.
pub(super) async fn add_written<'r>(
    ctx: &WorkerContext,
    info: &BatchInfo,
    written: impl Iterator<Item = &'r Usage>,
) {
    if info.limited_budget().is_some() {
        return;
    }
    let mut used = Used::default();
    for usage in written {
        used.requests += 1;
        used.tokens += usage.total.max(0) as u64;
    }
    let window_secs = info.budget.as_ref().and_then(|b| b.window_secs);
    match ctx
        .store
        .budget_add(&info.tenant, window_secs, used, now_millis())
        .await
    {
        Ok(()) => count(
            ctx,
            info,
            Counted {
                requests: used.requests,
                tokens: used.tokens,
            },
        ),
        Err(e) => tracing::warn!(error = %e, "Could not add lines' usage to the tenant's counts."),
    }
}

/// Asks the tenant's budget whether the line may call. Lines of tenants without a limit always go
/// (their usage is counted after the call). The caller acts on the answer: a line told to wait
/// keeps its attempt count.
pub(super) async fn admit(
    ctx: &WorkerContext,
    info: &BatchInfo,
    batch: &str,
    item: &LineItem<'_>,
) -> anyhow::Result<Admission> {
    let Some(budget) = info.limited_budget() else {
        return Ok(Admission::Go);
    };
    let now = now_millis();
    let spent = match ctx
        .store
        .budget_admit(budget, billed(info, batch, item.line), now)
        .await?
    {
        Admit::Go(counted) => {
            count(ctx, info, counted);
            return Ok(Admission::Go);
        }
        Admit::Spent(spent) => spent,
    };
    let action = match budget.on_exhausted {
        OnExhausted::Wait => "held",
        OnExhausted::Fail => "failed",
    };
    ctx.metrics
        .budget_lines
        .with_label_values(&[info.tenant_label.as_str(), action])
        .inc();
    match budget.on_exhausted {
        OnExhausted::Fail => Ok(Admission::Refused(Row::error(
            &item.custom_id,
            "budget_exceeded",
            &spent.message(),
        ))),
        OnExhausted::Wait => {
            // The smallest delay tier covering the wait (the largest caps it: the line asks again
            // then). The attempt count is kept: waiting for a budget costs no attempt.
            let wait = Duration::from_millis((spent.reset_at() * 1000 - now).max(0) as u64);
            tracing::debug!(
                tenant = %info.tenant_label,
                window = spent.window.kind.as_str(),
                wait_ms = wait.as_millis() as u64,
                "Budget spent; the line waits for the reset."
            );
            Ok(Admission::Wait(wait))
        }
    }
}

/// Counts a called line's usage toward its tenant's budget (once per line).
pub(super) async fn charge(
    ctx: &WorkerContext,
    info: &BatchInfo,
    batch: &str,
    line: u64,
    usage: &Usage,
) -> anyhow::Result<()> {
    let window_secs = info.budget.as_ref().and_then(|b| b.window_secs);
    let counted = ctx
        .store
        .budget_charge(
            window_secs,
            billed(info, batch, line),
            usage.total.max(0) as u64,
            now_millis(),
        )
        .await?;
    count(ctx, info, counted);
    Ok(())
}

fn count(ctx: &WorkerContext, info: &BatchInfo, counted: Counted) {
    for (kind, n) in [("requests", counted.requests), ("tokens", counted.tokens)] {
        if n > 0 {
            ctx.metrics
                .tenant_usage
                .with_label_values(&[info.tenant_label.as_str(), kind])
                .inc_by(n);
        }
    }
}

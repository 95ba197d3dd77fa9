//! One line to its row: the gate asked again after a wait, the upstream call with its retries
//! (a retry goes to a delay queue), and the call's metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::domain::{LineItem, LinesMessage, Row, Usage, now_millis};
use sluice_core::keys::retry_tier;
use sluice_core::pacing::LEASE_MS;
use sluice_store::CallGate;
use sluice_store::pacing::Pacer;
use tokio::sync::SemaphorePermit;

use crate::WorkerContext;
use crate::upstream::{Attempt, NextStep, RetryPolicy, estimate_tokens};

use super::budget::Admission;
use super::fleet::{Paced, Slot, report, wait_for_slot};
use super::{BatchInfo, ModelRoute, Run};

/// How one line of a message ended.
pub(super) enum LineEnd<'s> {
    /// Its row, to be written, and the call slot it keeps until then: a worker that dies has at
    /// most `concurrency` lines called without their rows written.
    Row(u64, Row, Usage, SemaphorePermit<'s>),
    /// Nothing to write: it went to a delay queue, or needs no call any more.
    Handled,
    /// Abandoned for shutdown: the message must not be acked.
    Abandoned,
}

/// A line that waited longer than this since the gate last let it through asks the gate again
/// before calling.
pub(super) const REGATE_AFTER: Duration = crate::gate_checks::FRESH;

/// Asks the gate again for a line it let through earlier and that has waited since, for a call at
/// `call_at` (with the batch's other lines due about then): renews its in-flight mark if the batch
/// still runs and the line has no row; otherwise clears the mark (the batch's drain must not wait
/// for a line that will not call) and returns false.
pub(super) async fn regate(
    ctx: &WorkerContext,
    batch: &str,
    item: &LineItem<'_>,
    call_at: Instant,
) -> anyhow::Result<bool> {
    let gate = ctx
        .gate_checks
        .check(batch, item.line, tokio::time::Instant::from_std(call_at))
        .await?;
    if count_gate(ctx, gate) {
        return Ok(true);
    }
    ctx.store.end_call(batch, item.line).await?;
    Ok(false)
}

/// How long a line stays marked in flight (the aggregator waits that long for it when its batch
/// stops): one call and the longest hold before it.
pub(super) fn call_deadline(ctx: &WorkerContext) -> i64 {
    now_millis() + ctx.settings.worker.in_flight_for().as_millis() as i64
}

/// Whether the gate lets the line call; counts the lines it drops.
pub(super) fn count_gate(ctx: &WorkerContext, gate: CallGate) -> bool {
    let dropped = match gate {
        CallGate::Go => return true,
        CallGate::Duplicate => "duplicate",
        CallGate::Stopped => "skipped",
    };
    ctx.metrics.lines.with_label_values(&[dropped]).inc();
    false
}

/// Publishes a copy of the line to the delay queue whose TTL covers `delay`, and waits for the
/// broker's confirm: the caller may ack the original only after this returned `Ok`.
pub(super) async fn requeue(
    ctx: &WorkerContext,
    batch: &str,
    item: &LineItem<'_>,
    attempts: u32,
    first_attempt_ms: i64,
    delay: Duration,
) -> anyhow::Result<()> {
    let tier = retry_tier(delay.as_millis() as u64);
    let copy = LinesMessage::single(
        batch,
        LineItem {
            attempts,
            first_attempt_ms,
            ..item.clone()
        },
    );
    ctx.store.end_call(batch, item.line).await?;
    ctx.publisher
        .publish(&ctx.keys.retry_queue(tier), &serde_json::to_vec(&copy)?)
        .await?;
    Ok(())
}

/// Runs one gated line to its row (handed back with its call slot), or to a delay queue.
#[tracing::instrument(skip_all, fields(line = item.line))]
pub(super) async fn run_line<'r>(
    run: Run<'r>,
    info: &BatchInfo,
    route: Arc<ModelRoute>,
    batch: &str,
    item: &LineItem<'_>,
) -> anyhow::Result<LineEnd<'r>> {
    let ctx = run.ctx;
    let asked = Instant::now();
    let slot = tokio::select! {
        _ = run.abandon.cancelled() => {
            ctx.store.end_call(batch, item.line).await.ok();
            return Ok(LineEnd::Abandoned);
        }
        permit = run.slots.acquire() => permit?,
    };
    // A line that waited for its slot asks the gate again; on a rate-paced provider it does so
    // with the lines calling about when it will (`wait_for_slot`), unless its tenant's budget
    // would count it first.
    let mut gated_at = asked;
    let paced_later = route
        .pacing
        .as_ref()
        .is_some_and(|(_, limits)| !limits.unpaced())
        && info.limited_budget().is_none();
    if asked.elapsed() > REGATE_AFTER && !paced_later {
        if !regate(ctx, batch, item, Instant::now()).await? {
            return Ok(LineEnd::Handled);
        }
        gated_at = Instant::now();
    }
    match super::budget::admit(ctx, info, batch, item).await? {
        Admission::Go => {}
        Admission::Held => return Ok(LineEnd::Handled),
        Admission::Refused(row) => return Ok(LineEnd::Row(item.line, row, Usage::default(), slot)),
    }
    let w = &ctx.settings.worker;
    let paced = route.pacing.as_ref().map(|(provider, limits)| {
        let (tokens, capped) = if limits.counts_tokens() {
            limits.charge_for(estimate_tokens(
                &info.endpoint,
                item.body,
                w.default_max_tokens,
            ))
        } else {
            (0, false)
        };
        // Only a concurrency limit holds leases; without one the id is never stored.
        let lease = if Pacer::leases(limits) {
            uuid::Uuid::new_v4().simple().to_string()
        } else {
            String::new()
        };
        Paced {
            provider,
            limits,
            lease,
            tokens,
            capped,
        }
    });
    let (mut probe, mut charged) = (false, 0);
    if let Some(paced) = &paced {
        match wait_for_slot(ctx, batch, item, paced, gated_at, run.abandon).await? {
            Slot::Call {
                probe: p,
                charged: c,
            } => (probe, charged) = (p, c),
            Slot::Done => return Ok(LineEnd::Handled),
            Slot::Abandoned => {
                ctx.store.end_call(batch, item.line).await.ok();
                return Ok(LineEnd::Abandoned);
            }
        }
    }
    let first_attempt = if item.first_attempt_ms > 0 {
        item.first_attempt_ms
    } else {
        now_millis()
    };
    ctx.metrics.inflight.inc();
    let started = Instant::now();
    let call = crate::call::attempt(
        &ctx.upstream,
        &info.endpoint,
        &route.model,
        &item.custom_id,
        item.body,
    );
    let (result, header_pause) = match &paced {
        Some(paced) if Pacer::leases(paced.limits) => {
            // Keep the concurrency lease alive while the call runs (it expires if we die).
            tokio::pin!(call);
            let every = Duration::from_millis(LEASE_MS / 3);
            loop {
                tokio::select! {
                    r = &mut call => break r,
                    _ = tokio::time::sleep(every) => {
                        if let Err(e) = ctx.pacer.renew(paced.provider, &paced.lease).await {
                            tracing::debug!(error = %e, "Could not renew a concurrency lease.");
                        }
                    }
                }
            }
        }
        _ => call.await,
    };
    ctx.metrics.inflight.dec();
    observe(ctx, &result, started.elapsed());
    let outage = match &paced {
        Some(paced) => report(ctx, paced, &result, header_pause, probe, charged).await,
        None => false,
    };
    let (row, usage) = match result {
        Attempt::Done(row, usage) => (row, usage),
        Attempt::Retry {
            last,
            reason,
            retry_after,
        } => {
            // A failure while the provider's breaker is open is the outage's: it spends neither
            // an attempt nor the time budget (only the batch's deadline still bounds the line).
            let attempts = if outage {
                item.attempts
            } else {
                item.attempts + 1
            };
            let policy = RetryPolicy::from_settings(w);
            let elapsed = if outage {
                Duration::ZERO
            } else {
                Duration::from_millis((now_millis() - first_attempt).max(0) as u64)
            };
            let deadline_in = info
                .expires_at
                .map(|at| Duration::from_millis((at * 1000 - now_millis()).max(0) as u64));
            match policy.next(attempts.max(1), retry_after, elapsed, deadline_in) {
                NextStep::RetryAfter(delay) => {
                    ctx.metrics.retries.with_label_values(&[reason]).inc();
                    if let Some(paced) = &paced {
                        ctx.metrics
                            .requeued
                            .with_label_values(&[paced.provider, "retry"])
                            .inc();
                    }
                    tracing::debug!(
                        reason,
                        attempts,
                        delay_ms = delay.as_millis() as u64,
                        "Retry scheduled."
                    );
                    requeue(ctx, batch, item, attempts, first_attempt, delay).await?;
                    return Ok(LineEnd::Handled);
                }
                NextStep::GiveUp(budget) => {
                    ctx.metrics
                        .retry_budget_exhausted
                        .with_label_values(&[budget])
                        .inc();
                    (last, Usage::default())
                }
            }
        }
    };
    // A limited budget counts the line before its row is written: a worker dying in between calls
    // the line again on redelivery, and the line still counts once. Unlimited tenants' usage is
    // added with the rows (`budget::add_written`), a round trip per write instead of per line.
    if info.limited_budget().is_some() {
        super::budget::charge(ctx, info, batch, item.line, &usage).await?;
    }
    Ok(LineEnd::Row(item.line, row, usage, slot))
}

fn observe(ctx: &WorkerContext, result: &Attempt, elapsed: Duration) {
    let code = match result {
        Attempt::Done(row, _) | Attempt::Retry { last: row, .. } => row.status_code,
    };
    let class = match code {
        Some(c) => format!("{}xx", c / 100),
        None => "error".to_owned(),
    };
    ctx.metrics
        .upstream_latency
        .with_label_values(&[class.as_str()])
        .observe(elapsed.as_secs_f64());
    let code = code.map_or("error".to_owned(), |c| c.to_string());
    ctx.metrics
        .upstream_responses
        .with_label_values(&[code.as_str()])
        .inc();
}

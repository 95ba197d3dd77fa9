//! One line to its row, step by step: a call slot, the gate asked again after a wait, the tenant's
//! budget, the fleet limiter, the upstream call, and what its answer leaves (a row, or a retry in
//! a delay queue). The deciding steps return what they decided; [`run_line`] acts on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_core::domain::{LineItem, Row, Usage, now_millis};
use sluice_core::pacing::LEASE_MS;
use sluice_store::pacing::Pacer;
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::batch_info::{BatchInfo, BatchInfoCache, ModelRoute};
use super::budget::{self, Admission};
use super::fleet::{Paced, Slot, report, wait_for_slot};
use super::gate::{REGATE_AFTER, regate};
use super::requeue::requeue;
use super::rows::RowWriters;
use crate::WorkerContext;
use crate::upstream::call;
use crate::upstream::{Attempt, NextStep, RetryPolicy, estimate_tokens};

/// What every line of one worker shares.
#[derive(Clone, Copy)]
pub(super) struct Run<'r> {
    pub(super) ctx: &'r WorkerContext,
    pub(super) cache: &'r BatchInfoCache,
    pub(super) abandon: &'r CancellationToken,
    /// One permit per upstream call in flight (`worker.concurrency`).
    pub(super) slots: &'r Semaphore,
    pub(super) rows: &'r RowWriters,
}

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

/// What a call's answer leaves the line with.
enum Settled {
    /// The row to write, with the usage to count.
    Row(Row, Usage),
    /// Another attempt, `delay` from now, as attempt number `attempts`.
    Retry { attempts: u32, delay: Duration },
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
    let Some(slot) = take_call_slot(run, batch, item).await? else {
        return Ok(LineEnd::Abandoned);
    };
    let Some(gated_at) = regate_after_slot_wait(ctx, info, &route, batch, item, asked).await?
    else {
        return Ok(LineEnd::Handled);
    };
    match budget::admit(ctx, info, batch, item).await? {
        Admission::Go => {}
        Admission::Wait(wait) => {
            requeue(ctx, batch, item, item.attempts, item.first_attempt_ms, wait).await?;
            return Ok(LineEnd::Handled);
        }
        Admission::Refused(row) => return Ok(LineEnd::Row(item.line, row, Usage::default(), slot)),
    }
    let paced = pacing_of(ctx, info, &route, item);
    let (probe, charged) = match &paced {
        None => (false, 0),
        Some(paced) => match wait_for_slot(ctx, batch, item, paced, gated_at, run.abandon).await? {
            Slot::Call { probe, charged } => (probe, charged),
            Slot::Delay(wait) => {
                requeue(ctx, batch, item, item.attempts, item.first_attempt_ms, wait).await?;
                return Ok(LineEnd::Handled);
            }
            Slot::Done => return Ok(LineEnd::Handled),
            Slot::Abandoned => {
                ctx.store.end_call(batch, item.line).await.ok();
                return Ok(LineEnd::Abandoned);
            }
        },
    };
    let first_attempt = if item.first_attempt_ms > 0 {
        item.first_attempt_ms
    } else {
        now_millis()
    };
    let (result, header_pause) = call_upstream(ctx, info, &route, item, paced.as_ref()).await;
    let outage = match &paced {
        Some(paced) => report(ctx, paced, &result, header_pause, probe, charged).await,
        None => false,
    };
    let (row, usage) = match settle(
        ctx,
        info,
        item,
        result,
        outage,
        first_attempt,
        paced.as_ref(),
    ) {
        Settled::Row(row, usage) => (row, usage),
        Settled::Retry { attempts, delay } => {
            requeue(ctx, batch, item, attempts, first_attempt, delay).await?;
            return Ok(LineEnd::Handled);
        }
    };
    // A limited budget counts the line before its row is written: a worker dying in between calls
    // the line again on redelivery, and the line still counts once. Unlimited tenants' usage is
    // added with the rows (`budget::add_written`), a round trip per write instead of per line.
    if info.limited_budget().is_some() {
        budget::charge(ctx, info, batch, item.line, &usage).await?;
    }
    Ok(LineEnd::Row(item.line, row, usage, slot))
}

/// Takes one of the worker's call slots; `None` when the worker abandons its lines first (the
/// line's in-flight mark is cleared then).
async fn take_call_slot<'r>(
    run: Run<'r>,
    batch: &str,
    item: &LineItem<'_>,
) -> anyhow::Result<Option<SemaphorePermit<'r>>> {
    tokio::select! {
        _ = run.abandon.cancelled() => {
            run.ctx.store.end_call(batch, item.line).await.ok();
            Ok(None)
        }
        permit = run.slots.acquire() => Ok(Some(permit?)),
    }
}

/// A line that waited for its slot (since `asked`) asks the gate again; on a rate-paced provider
/// it does so with the lines calling about when it will (`wait_for_slot`), unless its tenant's
/// budget would count it first. Returns when the gate last let the line through, or `None` when
/// the line may no longer call.
async fn regate_after_slot_wait(
    ctx: &WorkerContext,
    info: &BatchInfo,
    route: &ModelRoute,
    batch: &str,
    item: &LineItem<'_>,
    asked: Instant,
) -> anyhow::Result<Option<Instant>> {
    let paced_later = route
        .pacing
        .as_ref()
        .is_some_and(|(_, limits)| !limits.unpaced())
        && info.limited_budget().is_none();
    if asked.elapsed() > REGATE_AFTER && !paced_later {
        if !regate(ctx, batch, item, Instant::now()).await? {
            return Ok(None);
        }
        return Ok(Some(Instant::now()));
    }
    Ok(Some(asked))
}

/// The fleet pacing of the line's call, when its model's provider has limits: the tokens it is
/// charged and the lease id it holds.
fn pacing_of<'b>(
    ctx: &WorkerContext,
    info: &BatchInfo,
    route: &'b ModelRoute,
    item: &LineItem<'_>,
) -> Option<Paced<'b>> {
    let w = &ctx.settings.worker;
    route.pacing.as_ref().map(|(provider, limits)| {
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
    })
}

/// Makes the upstream call, counted in flight and observed; a call holding a concurrency lease
/// keeps it alive meanwhile.
async fn call_upstream(
    ctx: &WorkerContext,
    info: &BatchInfo,
    route: &ModelRoute,
    item: &LineItem<'_>,
    paced: Option<&Paced<'_>>,
) -> (Attempt, Option<Duration>) {
    ctx.metrics.inflight.inc();
    let started = Instant::now();
    let call = call::attempt(
        &ctx.upstream,
        &info.endpoint,
        &route.model,
        &item.custom_id,
        item.body,
    );
    let (result, header_pause) = match paced {
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
    (result, header_pause)
}

/// Decides what the call's answer leaves the line with: its row, another attempt, or (no attempt
/// or time left) the last failure as its row.
fn settle(
    ctx: &WorkerContext,
    info: &BatchInfo,
    item: &LineItem<'_>,
    result: Attempt,
    outage: bool,
    first_attempt: i64,
    paced: Option<&Paced<'_>>,
) -> Settled {
    let (last, reason, retry_after) = match result {
        Attempt::Done(row, usage) => return Settled::Row(row, usage),
        Attempt::Retry {
            last,
            reason,
            retry_after,
        } => (last, reason, retry_after),
    };
    // A failure while the provider's breaker is open is the outage's: it spends neither an
    // attempt nor the time budget (only the batch's deadline still bounds the line).
    let attempts = if outage {
        item.attempts
    } else {
        item.attempts + 1
    };
    let policy = RetryPolicy::from_settings(&ctx.settings.worker);
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
            if let Some(paced) = paced {
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
            Settled::Retry { attempts, delay }
        }
        NextStep::GiveUp(budget) => {
            ctx.metrics
                .retry_budget_exhausted
                .with_label_values(&[budget])
                .inc();
            Settled::Row(last, Usage::default())
        }
    }
}

/// Counts the call's latency by status class and its answer by status code.
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

//! The line worker: calls the upstream for each line message and records its row.
//!
//! Invariants:
//! - a message is acked only after its row write returned (or after deciding the line needs no
//!   row from us: a duplicate, or a batch that is stopping, whose missing rows the aggregator fills);
//! - a crash before the ack means redelivery; the row script makes the second write a no-op;
//! - no upstream call starts unless `begin_call` just saw the batch running (cancel and expiry are
//!   honoured before every attempt, retries included).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions};
use sluice_shared::domain::{BatchEvent, ItemMessage, Row, Usage, now_millis};
use sluice_shared::keys::retry_tier;
use sluice_shared::pacing::{
    BreakerState, CallOutcome, Grant, Hold, LEASE_MS, MAX_FLEET_PAUSE, PaceLimits, Pacer, TokenUse,
};
use sluice_shared::store::{CallGate, RowWrite};
use tokio_util::sync::CancellationToken;

use crate::WorkerContext;
use crate::upstream::{Attempt, NextStep, RetryPolicy, estimate_tokens};

/// What a worker needs to know about a batch; fixed once the batch is dispatched.
#[derive(Debug)]
struct BatchInfo {
    endpoint: String,
    model: String,
    /// Unix seconds after which the batch expires.
    expires_at: Option<i64>,
}

/// Per-process cache of [`BatchInfo`], so a line costs no extra Redis read.
#[derive(Debug, Default, Clone)]
pub struct BatchInfoCache(Arc<Mutex<HashMap<String, Arc<BatchInfo>>>>);

impl BatchInfoCache {
    async fn get(
        &self,
        ctx: &WorkerContext,
        batch: &str,
    ) -> anyhow::Result<Option<Arc<BatchInfo>>> {
        if let Some(info) = self.0.lock().expect("cache lock").get(batch) {
            return Ok(Some(info.clone()));
        }
        let Some(meta) = ctx.store.get_batch(batch).await? else {
            return Ok(None);
        };
        let info = Arc::new(BatchInfo {
            endpoint: meta.get("endpoint").unwrap_or_default().to_owned(),
            model: meta.get("model").unwrap_or_default().to_owned(),
            expires_at: meta.int("expires_at"),
        });
        let mut map = self.0.lock().expect("cache lock");
        if map.len() > 10_000 {
            map.clear();
        }
        map.insert(batch.to_owned(), info.clone());
        Ok(Some(info))
    }
}

/// Consumes line messages until `shutdown`, then lets in-flight lines finish within the grace.
pub async fn run(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let conn = sluice_shared::queue::connect(&ctx.settings.amqp_url, "sluice-worker").await?;
    let concurrency = ctx.settings.worker.concurrency;
    let (channel, mut consumer) =
        crate::amqp::consume(&conn, &ctx.settings, &ctx.keys.items_queue(), concurrency).await?;
    let tracker = tokio_util::task::TaskTracker::new();
    // In-flight lines stop early only when the grace runs out; a fresh token lets them outlive `shutdown`.
    let abandon = CancellationToken::new();
    let cache = BatchInfoCache::default();
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            d = consumer.next() => d,
        };
        let Some(delivery) = delivery else { break };
        let delivery = delivery?;
        let (ctx, abandon, cache) = (ctx.clone(), abandon.clone(), cache.clone());
        tracker.spawn(async move { handle(&ctx, &cache, delivery, &abandon).await });
    }
    if let Err(e) = channel
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await
    {
        tracing::debug!(error = %e, "Consumer cancel failed (channel already closed).");
    }
    tracker.close();
    let grace = Duration::from_millis(ctx.settings.worker.shutdown_grace_ms);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("Shutdown grace elapsed; unfinished lines go back to the queue.");
        abandon.cancel();
        tracker.wait().await;
    }
    // Closing the channel returns every unacked delivery (prefetched or abandoned) to the queue.
    if let Err(e) = channel.close(200, "worker shutting down".into()).await {
        tracing::debug!(error = %e, "Channel close failed.");
    }
    drop(conn);
    Ok(())
}

async fn handle(
    ctx: &WorkerContext,
    cache: &BatchInfoCache,
    delivery: Delivery,
    abandon: &CancellationToken,
) {
    let msg: ItemMessage<'_> = match serde_json::from_slice(&delivery.data) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "Dropping a malformed line message.");
            ack(&delivery).await;
            return;
        }
    };
    match process(ctx, cache, &msg, abandon).await {
        Ok(Some(())) => ack(&delivery).await,
        Ok(None) => {} // abandoned at shutdown: the channel close requeues it
        Err(e) => {
            // Redis or broker trouble: hand the line back rather than ack without a row.
            tracing::warn!(batch_id = %msg.b, line = msg.l, error = %e, "Line failed; requeueing.");
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Err(e) = delivery
                .reject(lapin::options::BasicRejectOptions { requeue: true })
                .await
            {
                tracing::warn!(error = %e, "Could not requeue a line.");
            }
        }
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %e, "Could not ack a line; it will be redelivered and deduplicated.");
    }
}

/// Marks the line in flight if its batch still runs and it has no row; false when the message
/// needs nothing more (a duplicate, or a batch that stops).
async fn gate(ctx: &WorkerContext, msg: &ItemMessage<'_>) -> anyhow::Result<bool> {
    let w = &ctx.settings.worker;
    let budget = (w.request_timeout_ms + w.max_hold_ms + 5_000) as i64;
    match ctx
        .store
        .begin_call(&msg.b, msg.l, now_millis() + budget)
        .await?
    {
        CallGate::Go => Ok(true),
        CallGate::Duplicate => {
            ctx.metrics.lines.with_label_values(&["duplicate"]).inc();
            Ok(false)
        }
        CallGate::Stopped => {
            ctx.metrics.lines.with_label_values(&["skipped"]).inc();
            Ok(false)
        }
    }
}

/// Publishes a copy of the line to the delay queue whose TTL covers `delay`, and waits for the
/// broker's confirm: the caller may ack the original only after this returned `Ok`.
async fn requeue(
    ctx: &WorkerContext,
    msg: &ItemMessage<'_>,
    attempts: u32,
    first_attempt_ms: i64,
    delay: Duration,
) -> anyhow::Result<()> {
    let tier = retry_tier(delay.as_millis() as u64);
    let copy = ItemMessage {
        b: msg.b.clone(),
        l: msg.l,
        c: msg.c.clone(),
        body: msg.body,
        a: attempts,
        t: first_attempt_ms,
    };
    ctx.store.end_call(&msg.b, msg.l).await?;
    ctx.publisher
        .publish(&ctx.keys.retry_queue(tier), &serde_json::to_vec(&copy)?)
        .await?;
    Ok(())
}

/// Sleeps for `d` unless the worker abandons its lines first (then false).
async fn pause(abandon: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = abandon.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// The fleet pacing of one line's call: the provider it goes to and that provider's limits.
struct Paced {
    provider: String,
    limits: PaceLimits,
    lease: String,
    tokens: u64,
}

/// What waiting for the fleet limiter ended with.
enum Slot {
    /// Call now; `probe`: the breaker is half-open and this call tests the upstream; `charged`:
    /// tokens the reservation took.
    Call { probe: bool, charged: u64 },
    /// The line went to a delay queue, or needs no call any more: ack it.
    Done,
    /// Abandoned for shutdown: do not ack.
    Abandoned,
}

/// Waits (in the consumer slot, up to `max_hold_ms` at a time) until the fleet lets this call
/// start; a longer fleet pause or open breaker sends the line to a delay queue without spending an
/// attempt.
async fn wait_for_slot(
    ctx: &WorkerContext,
    msg: &ItemMessage<'_>,
    paced: &Paced,
    abandon: &CancellationToken,
) -> anyhow::Result<Slot> {
    let hold = Duration::from_millis(ctx.settings.worker.max_hold_ms);
    let name = paced.provider.as_str();
    let mut slept = false;
    loop {
        let grant = ctx
            .pacer
            .acquire(name, &paced.limits, paced.tokens, &paced.lease)
            .await?;
        let (wait, why, probe) = match grant {
            Grant::Go {
                wait,
                probe,
                charged,
            } if wait.is_zero() => {
                if slept && !gate(ctx, msg).await? {
                    release_unused(ctx, paced, charged).await;
                    return Ok(Slot::Done);
                }
                return Ok(Slot::Call { probe, charged });
            }
            Grant::Go {
                wait,
                probe,
                charged,
            } => (wait, Hold::Rate, Some((probe, charged))),
            Grant::Hold { wait, why } => (wait, why, None),
        };
        // A long pause or outage sends the line to a delay queue. A long wait for the rate does
        // not: another consumer would take the next line and meet the same wait, so the line keeps
        // its slot (the queue holds the rest: backpressure) and asks again once a reservation
        // within `reserve_ahead_ms` becomes possible.
        let ahead = paced.limits.reserve_ahead();
        let wait = match why {
            // Waiters spread their next asks over the reservation horizon instead of all
            // polling at once.
            Hold::Rate if wait > ahead => (wait - ahead
                + ahead.mul_f64(rand::random_range(0.25..0.75)))
            .clamp(Duration::from_millis(100), hold),
            _ => wait,
        };
        if probe.is_none() && wait > hold {
            ctx.metrics
                .requeued
                .with_label_values(&[name, why.as_str()])
                .inc();
            tracing::debug!(
                provider = name,
                reason = why.as_str(),
                wait_ms = wait.as_millis() as u64,
                "Line goes to a delay queue."
            );
            requeue(ctx, msg, msg.a, msg.t, wait).await?;
            return Ok(Slot::Done);
        }
        // Spread the holders of one pause or breaker so they do not all come back at once.
        let jitter = match probe {
            Some(_) => Duration::ZERO,
            None => wait.mul_f64(rand::random_range(0.0..0.1)),
        };
        ctx.metrics
            .pacing_wait
            .with_label_values(&[name, why.as_str()])
            .observe((wait + jitter).as_secs_f64());
        if !pause(abandon, wait + jitter).await {
            if let Some((_, charged)) = probe {
                release_unused(ctx, paced, charged).await;
            }
            return Ok(Slot::Abandoned);
        }
        slept = true;
        let Some((probe, charged)) = probe else {
            continue;
        };
        // A fleet pause set while this call waited for its reserved start wins over the reservation.
        if ctx.pacer.paused_for(name).await?.is_some() {
            release_unused(ctx, paced, charged).await;
            continue;
        }
        if !gate(ctx, msg).await? {
            release_unused(ctx, paced, charged).await;
            return Ok(Slot::Done);
        }
        return Ok(Slot::Call { probe, charged });
    }
}

async fn release_unused(ctx: &WorkerContext, paced: &Paced, charged: u64) {
    if let Err(e) = ctx
        .pacer
        .release(
            &paced.provider,
            &paced.limits,
            &paced.lease,
            CallOutcome::Unused,
            TokenUse {
                estimate: paced.tokens,
                charged,
                actual: None,
            },
            None,
        )
        .await
    {
        tracing::debug!(error = %e, "Could not release a pacing lease; it expires.");
    }
}

/// Tells the fleet limiter how the call went; true when the breaker is open after it, so a failure
/// is the outage's, not the line's, and costs the line no attempt.
async fn report(
    ctx: &WorkerContext,
    paced: &Paced,
    result: &Attempt,
    header_pause: Option<Duration>,
    probe: bool,
    charged: u64,
) -> bool {
    let base = Duration::from_millis(ctx.settings.worker.backoff_base_ms);
    let (outcome, pause, source, actual) = match result {
        // Only a success's usage says what a call costs (an error row has none).
        Attempt::Done(row, usage) => (
            CallOutcome::Ok,
            header_pause,
            "ratelimit_headers",
            (row.ok && usage.total > 0).then_some(usage.total as u64),
        ),
        Attempt::Retry {
            reason: "429",
            retry_after,
            ..
        } => (
            CallOutcome::Throttled,
            Some(retry_after.unwrap_or(base)),
            if retry_after.is_some() {
                "retry_after"
            } else {
                "429"
            },
            None,
        ),
        Attempt::Retry {
            reason: "408" | "409",
            ..
        } => (CallOutcome::Ok, header_pause, "ratelimit_headers", None),
        Attempt::Retry {
            retry_after: Some(asked),
            ..
        } => (CallOutcome::Failed, Some(*asked), "retry_after", None),
        Attempt::Retry { .. } => (CallOutcome::Failed, header_pause, "ratelimit_headers", None),
    };
    let name = paced.provider.as_str();
    if outcome == CallOutcome::Throttled {
        ctx.metrics.throttled.with_label_values(&[name]).inc();
    }
    if let Some(p) = pause {
        ctx.metrics
            .fleet_pauses
            .with_label_values(&[name, source])
            .inc();
        tracing::info!(
            provider = name,
            pause_ms = p.min(MAX_FLEET_PAUSE).as_millis() as u64,
            source,
            "Pausing the provider fleet-wide."
        );
    }
    let tokens = TokenUse {
        estimate: paced.tokens,
        charged,
        actual: actual.filter(|_| paced.limits.counts_tokens()),
    };
    match ctx
        .pacer
        .release(name, &paced.limits, &paced.lease, outcome, tokens, pause)
        .await
    {
        Ok(released) => {
            ctx.metrics
                .breaker_state
                .with_label_values(&[name])
                .set(released.breaker.gauge());
            if released.concurrency_limit > 0 {
                ctx.metrics
                    .pacing_limit
                    .with_label_values(&[name, "concurrency"])
                    .set(released.concurrency_limit as i64);
            }
            if released.breaker_changed {
                ctx.metrics
                    .breaker_transitions
                    .with_label_values(&[name, released.breaker.as_str()])
                    .inc();
                match released.breaker {
                    BreakerState::Open => tracing::warn!(
                        provider = name,
                        probe,
                        "Circuit breaker opened: the provider is failing; calls stop until probes succeed."
                    ),
                    _ => tracing::info!(
                        provider = name,
                        state = released.breaker.as_str(),
                        "Circuit breaker closed: the provider answers again."
                    ),
                }
            }
            outcome == CallOutcome::Failed && released.breaker == BreakerState::Open
        }
        Err(e) => {
            tracing::warn!(provider = name, error = %e, "Could not report a call to the fleet limiter.");
            false
        }
    }
}

/// Runs one line to its row, or to a delay queue. `Ok(None)` means it was abandoned for shutdown
/// and must not be acked.
#[tracing::instrument(skip_all, fields(batch_id = %msg.b, line = msg.l))]
async fn process(
    ctx: &WorkerContext,
    cache: &BatchInfoCache,
    msg: &ItemMessage<'_>,
    abandon: &CancellationToken,
) -> anyhow::Result<Option<()>> {
    let Some(info) = cache.get(ctx, &msg.b).await? else {
        ctx.metrics.lines.with_label_values(&["orphan"]).inc();
        return Ok(Some(()));
    };
    if !gate(ctx, msg).await? {
        return Ok(Some(()));
    }
    let w = &ctx.settings.worker;
    let paced = ctx
        .upstream
        .provider_of(&info.model, &info.endpoint)
        .map(|(_, p)| {
            let limits = PaceLimits::new(&p.pacing, w);
            let tokens = if limits.counts_tokens() {
                estimate_tokens(&info.endpoint, msg.body, w.default_max_tokens)
            } else {
                0
            };
            Paced {
                provider: p.name.clone(),
                limits,
                lease: uuid::Uuid::new_v4().simple().to_string(),
                tokens,
            }
        });
    let (mut probe, mut charged) = (false, 0);
    if let Some(paced) = &paced {
        match wait_for_slot(ctx, msg, paced, abandon).await? {
            Slot::Call {
                probe: p,
                charged: c,
            } => (probe, charged) = (p, c),
            Slot::Done => return Ok(Some(())),
            Slot::Abandoned => {
                ctx.store.end_call(&msg.b, msg.l).await.ok();
                return Ok(None);
            }
        }
    }
    let first_attempt = if msg.t > 0 { msg.t } else { now_millis() };
    ctx.metrics.inflight.inc();
    let started = Instant::now();
    let call = ctx
        .upstream
        .attempt(&info.endpoint, &info.model, &msg.c, msg.body);
    let (result, header_pause) = match &paced {
        Some(paced) if Pacer::leases(&paced.limits) => {
            // Keep the concurrency lease alive while the call runs (it expires if we die).
            tokio::pin!(call);
            let every = Duration::from_millis(LEASE_MS / 3);
            loop {
                tokio::select! {
                    r = &mut call => break r,
                    _ = tokio::time::sleep(every) => {
                        if let Err(e) = ctx.pacer.renew(&paced.provider, &paced.lease).await {
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
            let attempts = if outage { msg.a } else { msg.a + 1 };
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
                            .with_label_values(&[paced.provider.as_str(), "retry"])
                            .inc();
                    }
                    tracing::debug!(
                        reason,
                        attempts,
                        delay_ms = delay.as_millis() as u64,
                        "Retry scheduled."
                    );
                    requeue(ctx, msg, attempts, first_attempt, delay).await?;
                    return Ok(Some(()));
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
    let written = ctx.store.write_row(&msg.b, msg.l, &row, usage).await?;
    let outcome = match written {
        RowWrite::Inserted | RowWrite::Last | RowWrite::Drained if row.ok => "succeeded",
        RowWrite::Inserted | RowWrite::Last | RowWrite::Drained => "failed",
        RowWrite::Duplicate => "duplicate",
        RowWrite::Late => "late",
    };
    ctx.metrics.lines.with_label_values(&[outcome]).inc();
    if written.wants_finalize() {
        notify_aggregator(ctx, &msg.b).await;
    }
    Ok(Some(()))
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

/// Tells the aggregator a batch may be ready. A lost event is caught by its sweep.
pub async fn notify_aggregator(ctx: &WorkerContext, batch_id: &str) {
    let event = serde_json::to_vec(&BatchEvent {
        batch_id: batch_id.to_owned(),
    })
    .expect("event serializes");
    if let Err(e) = ctx
        .publisher
        .publish(&ctx.keys.finalize_queue(), &event)
        .await
    {
        tracing::warn!(%batch_id, error = %e, "Could not publish a finalize event; the sweep will catch it.");
    }
}

/// Consumes dead-lettered line messages: each becomes a `processing_failed` row so its batch
/// still finishes.
pub async fn run_dead_letters(
    ctx: WorkerContext,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let conn = sluice_shared::queue::connect(&ctx.settings.amqp_url, "sluice-dlq").await?;
    let (channel, mut consumer) =
        crate::amqp::consume(&conn, &ctx.settings, &ctx.keys.items_dlq(), 16).await?;
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            d = consumer.next() => d,
        };
        let Some(delivery) = delivery else { break };
        let delivery = delivery?;
        let Ok(msg) = serde_json::from_slice::<ItemMessage<'_>>(&delivery.data) else {
            tracing::error!("Dropping a malformed dead-lettered message.");
            ack(&delivery).await;
            continue;
        };
        let row = Row::error(
            &msg.c,
            "processing_failed",
            &format!(
                "This request could not be processed after {} delivery attempts.",
                ctx.settings.worker.delivery_limit
            ),
        );
        let written = ctx
            .store
            .write_row(&msg.b, msg.l, &row, Usage::default())
            .await?;
        tracing::warn!(batch_id = %msg.b, line = msg.l, "Line reached the delivery limit.");
        ctx.metrics
            .lines
            .with_label_values(&["dead_lettered"])
            .inc();
        if written.wants_finalize() {
            notify_aggregator(&ctx, &msg.b).await;
        }
        ack(&delivery).await;
    }
    drop(channel);
    drop(conn);
    Ok(())
}

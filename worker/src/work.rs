//! The line worker: calls the upstream for each line of a work-queue message and records its row.
//!
//! Invariants:
//! - a message is acked only after every one of its lines has its row written (or needs no row
//!   from us: a duplicate, a line handed to a delay queue with a confirmed publish, or a batch
//!   that is stopping, whose missing rows the aggregator fills);
//! - a crash before the ack means redelivery; the row script makes a second write a no-op, and a
//!   redelivered message of several lines is split into single-line messages, so a line that
//!   kills its worker reaches the delivery limit alone and its neighbours are not held with it;
//! - no upstream call starts unless `begin_call` just saw the batch running (cancel and expiry are
//!   honoured before every attempt, retries included; a line that waited long for a call slot
//!   asks again).
//!
//! A message's lines run concurrently, each holding one of the worker's `concurrency` call slots;
//! rows that finish together are written with one script call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions};
use sluice_shared::domain::{BatchEvent, LineItem, LinesMessage, Row, Usage, now_millis};
use sluice_shared::keys::retry_tier;
use sluice_shared::pacing::{
    BreakerState, CallOutcome, Grant, Hold, LEASE_MS, MAX_FLEET_PAUSE, PaceLimits, Pacer, TokenUse,
};
use sluice_shared::store::{CallGate, RowWrite};
use tokio::sync::{Semaphore, SemaphorePermit};
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
    /// The provider the batch's model routes to and its fleet limits; `None` when no provider
    /// serves it (the call then fails with the router's error).
    pacing: Option<(String, PaceLimits)>,
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
        let endpoint = meta.get("endpoint").unwrap_or_default().to_owned();
        let model = meta.get("model").unwrap_or_default().to_owned();
        let pacing = ctx.upstream.provider_of(&model, &endpoint).map(|(_, p)| {
            (
                p.name.clone(),
                PaceLimits::new(&p.pacing, &ctx.settings.worker),
            )
        });
        let info = Arc::new(BatchInfo {
            endpoint,
            model,
            expires_at: meta.int("expires_at"),
            pacing,
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
    // The main and the express work queue, each on a channel with its own prefetch; their lines
    // share the call slots.
    let mut channels = Vec::new();
    let mut consumers = Vec::new();
    for queue in [ctx.keys.items_queue(), ctx.keys.express_queue()] {
        let (channel, consumer) =
            crate::amqp::consume(&conn, &ctx.settings, &queue, prefetch(&ctx)).await?;
        channels.push((channel, consumer.tag()));
        consumers.push(consumer);
    }
    let mut consumer = futures::stream::select_all(consumers);
    let slots = Arc::new(Semaphore::new(concurrency as usize));
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
        let (ctx, abandon, cache, slots) =
            (ctx.clone(), abandon.clone(), cache.clone(), slots.clone());
        tracker.spawn(async move {
            let run = Run {
                ctx: &ctx,
                cache: &cache,
                abandon: &abandon,
                slots: &slots,
            };
            handle(run, delivery).await
        });
    }
    for (channel, tag) in &channels {
        if let Err(e) = channel
            .basic_cancel(tag.clone(), BasicCancelOptions::default())
            .await
        {
            tracing::debug!(error = %e, "Consumer cancel failed (channel already closed).");
        }
    }
    tracker.close();
    let grace = Duration::from_millis(ctx.settings.worker.shutdown_grace_ms);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("Shutdown grace elapsed; unfinished lines go back to the queue.");
        abandon.cancel();
        tracker.wait().await;
    }
    // Closing a channel returns every unacked delivery (prefetched or abandoned) to its queue.
    for (channel, _) in channels {
        if let Err(e) = channel.close(200, "worker shutting down".into()).await {
            tracing::debug!(error = %e, "Channel close failed.");
        }
    }
    drop(conn);
    Ok(())
}

/// Messages a worker takes at once: enough that its call slots stay busy while some messages wait
/// for their slowest line.
fn prefetch(ctx: &WorkerContext) -> u16 {
    let w = &ctx.settings.worker;
    (w.concurrency as usize)
        .div_ceil(w.lines_per_message.max(1))
        .saturating_mul(2)
        .clamp(1, u16::MAX as usize) as u16
}

/// What every line of one worker shares.
#[derive(Clone, Copy)]
struct Run<'r> {
    ctx: &'r WorkerContext,
    cache: &'r BatchInfoCache,
    abandon: &'r CancellationToken,
    /// One permit per upstream call in flight (`worker.concurrency`).
    slots: &'r Semaphore,
}

async fn handle(run: Run<'_>, delivery: Delivery) {
    let msg = match LinesMessage::decode(&delivery.data) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "Dropping a malformed line message.");
            ack(&delivery).await;
            return;
        }
    };
    let outcome = if delivery.redelivered && msg.lines.len() > 1 {
        split(run.ctx, &msg).await.map(Some)
    } else {
        process_message(run, &msg).await
    };
    match outcome {
        Ok(Some(())) => ack(&delivery).await,
        Ok(None) => {} // abandoned at shutdown: the channel close requeues it
        Err(e) => {
            // Redis or broker trouble: hand the lines back rather than ack without their rows.
            tracing::warn!(batch_id = %msg.b, lines = msg.lines.len(), error = %e, "Lines failed; requeueing.");
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Err(e) = delivery
                .reject(lapin::options::BasicRejectOptions { requeue: true })
                .await
            {
                tracing::warn!(error = %e, "Could not requeue a line message.");
            }
        }
    }
}

/// Publishes each line of `msg` as a message of its own to the main work queue (confirmed), so
/// the caller may ack `msg`. Lines that already have rows are dropped by the gate when they come
/// back.
async fn split(ctx: &WorkerContext, msg: &LinesMessage<'_>) -> anyhow::Result<()> {
    tracing::debug!(batch_id = %msg.b, lines = msg.lines.len(), "Splitting a returned line message.");
    let queue = &ctx.keys.items_queue();
    let publishes = msg.lines.iter().map(|item| async move {
        let single = LinesMessage::single(&msg.b, item.clone());
        ctx.publisher
            .publish(queue, &serde_json::to_vec(&single)?)
            .await?;
        anyhow::Ok(())
    });
    futures::future::try_join_all(publishes).await?;
    Ok(())
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %e, "Could not ack a line; it will be redelivered and deduplicated.");
    }
}

/// Asks the gate again for a line it let through earlier and that has waited since: renews its
/// in-flight mark if the batch still runs and the line has no row; otherwise clears the mark (the
/// batch's drain must not wait for a line that will not call) and returns false.
async fn regate(ctx: &WorkerContext, batch: &str, item: &LineItem<'_>) -> anyhow::Result<bool> {
    let gates = ctx
        .store
        .begin_calls(batch, &[item.l], call_deadline(ctx))
        .await?;
    if count_gate(ctx, gates[0]) {
        return Ok(true);
    }
    ctx.store.end_call(batch, item.l).await?;
    Ok(false)
}

/// How long a line stays marked in flight (the aggregator waits that long for it when its batch
/// stops): one call and the longest hold before it.
fn call_deadline(ctx: &WorkerContext) -> i64 {
    let w = &ctx.settings.worker;
    now_millis() + (w.request_timeout_ms + w.max_hold_ms + 5_000) as i64
}

/// Whether the gate lets the line call; counts the lines it drops.
fn count_gate(ctx: &WorkerContext, gate: CallGate) -> bool {
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
async fn requeue(
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
            a: attempts,
            t: first_attempt_ms,
            ..item.clone()
        },
    );
    ctx.store.end_call(batch, item.l).await?;
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
struct Paced<'b> {
    provider: &'b str,
    limits: &'b PaceLimits,
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
    batch: &str,
    item: &LineItem<'_>,
    paced: &Paced<'_>,
    abandon: &CancellationToken,
) -> anyhow::Result<Slot> {
    let hold = Duration::from_millis(ctx.settings.worker.max_hold_ms);
    let name = paced.provider;
    let asked = Instant::now();
    tokio::select! {
        _ = abandon.cancelled() => return Ok(Slot::Abandoned),
        _ = ctx.local_pace.until_ready(name) => {}
    }
    // A line that waited here asks the gate again before its call, as after any other wait.
    let mut slept = asked.elapsed() > REGATE_AFTER;
    loop {
        let grant = ctx
            .pacer
            .acquire(name, paced.limits, paced.tokens, &paced.lease)
            .await?;
        let (wait, why, probe) = match grant {
            Grant::Go {
                wait,
                probe,
                charged,
            } if wait.is_zero() => {
                if slept && !regate(ctx, batch, item).await? {
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
            requeue(ctx, batch, item, item.a, item.t, wait).await?;
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
        if !regate(ctx, batch, item).await? {
            release_unused(ctx, paced, charged).await;
            return Ok(Slot::Done);
        }
        return Ok(Slot::Call { probe, charged });
    }
}

async fn release_unused(ctx: &WorkerContext, paced: &Paced<'_>, charged: u64) {
    if let Err(e) = ctx
        .pacer
        .release(
            paced.provider,
            paced.limits,
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
    paced: &Paced<'_>,
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
    let name = paced.provider;
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
        .release(name, paced.limits, &paced.lease, outcome, tokens, pause)
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

/// How one line of a message ended.
enum LineEnd<'s> {
    /// Its row, to be written, and the call slot it keeps until then: a worker that dies has at
    /// most `concurrency` lines called without their rows written.
    Row(u64, Row, Usage, SemaphorePermit<'s>),
    /// Nothing to write: it went to a delay queue, or needs no call any more.
    Handled,
    /// Abandoned for shutdown: the message must not be acked.
    Abandoned,
}

/// A line that waited longer than this for a call slot asks the gate again before calling.
const REGATE_AFTER: Duration = Duration::from_millis(250);

/// Runs every line of `msg` to its row (or a delay queue) and writes the rows, those that finish
/// together in one script call. `Ok(None)` means a line was abandoned for shutdown and the message
/// must not be acked.
#[tracing::instrument(skip_all, fields(batch_id = %msg.b, lines = msg.lines.len()))]
async fn process_message(run: Run<'_>, msg: &LinesMessage<'_>) -> anyhow::Result<Option<()>> {
    let ctx = run.ctx;
    let Some(info) = run.cache.get(ctx, &msg.b).await? else {
        ctx.metrics
            .lines
            .with_label_values(&["orphan"])
            .inc_by(msg.lines.len() as u64);
        return Ok(Some(()));
    };
    let indices: Vec<u64> = msg.lines.iter().map(|item| item.l).collect();
    let gates = ctx
        .store
        .begin_calls(&msg.b, &indices, call_deadline(ctx))
        .await?;
    let mut running: FuturesUnordered<_> = msg
        .lines
        .iter()
        .zip(gates)
        .filter(|(_, gate)| count_gate(ctx, *gate))
        .map(|(item, _)| run_line(run, &info, &msg.b, item))
        .collect();
    // Lines keep running while rows are written: rows that finish during one write go together
    // in the next.
    let (mut abandoned, mut failure) = (false, None);
    let mut finished: Vec<(u64, Row, Usage)> = Vec::new();
    let mut slots = Vec::new();
    let mut writing = None;
    loop {
        if writing.is_none() && !finished.is_empty() {
            let rows = std::mem::take(&mut finished);
            let slots = std::mem::take(&mut slots);
            writing = Some(Box::pin(async move {
                let written = write_rows(ctx, &msg.b, &rows).await;
                drop(slots);
                written
            }));
        }
        tokio::select! {
            Some(end) = running.next(), if !running.is_empty() => match end {
                Ok(LineEnd::Row(line, row, usage, slot)) => {
                    finished.push((line, row, usage));
                    slots.push(slot);
                }
                Ok(LineEnd::Handled) => {}
                Ok(LineEnd::Abandoned) => abandoned = true,
                Err(e) => failure = Some(e),
            },
            written = async { writing.as_mut().expect("guarded").await }, if writing.is_some() => {
                writing = None;
                if let Err(e) = written {
                    failure = Some(e);
                }
            }
            else => break,
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok((!abandoned).then_some(()))
}

/// Writes the rows of lines that just finished, counts them, and tells the aggregator when the
/// batch may be done.
async fn write_rows(
    ctx: &WorkerContext,
    batch: &str,
    rows: &[(u64, Row, Usage)],
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let written = ctx.store.write_rows(batch, rows).await?;
    let mut finalize = false;
    for ((_, row, _), written) in rows.iter().zip(written) {
        let outcome = match written {
            RowWrite::Inserted | RowWrite::Last | RowWrite::Drained if row.ok => "succeeded",
            RowWrite::Inserted | RowWrite::Last | RowWrite::Drained => "failed",
            RowWrite::Duplicate => "duplicate",
            RowWrite::Late => "late",
        };
        ctx.metrics.lines.with_label_values(&[outcome]).inc();
        finalize |= written.wants_finalize();
    }
    if finalize {
        notify_aggregator(ctx, batch).await;
    }
    Ok(())
}

/// Runs one gated line to its row (handed back with its call slot), or to a delay queue.
#[tracing::instrument(skip_all, fields(line = item.l))]
async fn run_line<'r>(
    run: Run<'r>,
    info: &BatchInfo,
    batch: &str,
    item: &LineItem<'_>,
) -> anyhow::Result<LineEnd<'r>> {
    let ctx = run.ctx;
    let asked = Instant::now();
    let slot = tokio::select! {
        _ = run.abandon.cancelled() => {
            ctx.store.end_call(batch, item.l).await.ok();
            return Ok(LineEnd::Abandoned);
        }
        permit = run.slots.acquire() => permit?,
    };
    if asked.elapsed() > REGATE_AFTER && !regate(ctx, batch, item).await? {
        return Ok(LineEnd::Handled);
    }
    let w = &ctx.settings.worker;
    let paced = info.pacing.as_ref().map(|(provider, limits)| {
        let tokens = if limits.counts_tokens() {
            estimate_tokens(&info.endpoint, item.body, w.default_max_tokens)
        } else {
            0
        };
        Paced {
            provider,
            limits,
            lease: uuid::Uuid::new_v4().simple().to_string(),
            tokens,
        }
    });
    let (mut probe, mut charged) = (false, 0);
    if let Some(paced) = &paced {
        match wait_for_slot(ctx, batch, item, paced, run.abandon).await? {
            Slot::Call {
                probe: p,
                charged: c,
            } => (probe, charged) = (p, c),
            Slot::Done => return Ok(LineEnd::Handled),
            Slot::Abandoned => {
                ctx.store.end_call(batch, item.l).await.ok();
                return Ok(LineEnd::Abandoned);
            }
        }
    }
    let first_attempt = if item.t > 0 { item.t } else { now_millis() };
    ctx.metrics.inflight.inc();
    let started = Instant::now();
    let call = ctx
        .upstream
        .attempt(&info.endpoint, &info.model, &item.c, item.body);
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
            let attempts = if outage { item.a } else { item.a + 1 };
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
    Ok(LineEnd::Row(item.l, row, usage, slot))
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
        let Ok(msg) = LinesMessage::decode(&delivery.data) else {
            tracing::error!("Dropping a malformed dead-lettered message.");
            ack(&delivery).await;
            continue;
        };
        if msg.lines.len() > 1 {
            // Only a single line is known to have reached the limit on its own: the lines of a
            // message of several go back to the work queue one by one.
            split(&ctx, &msg).await?;
            ack(&delivery).await;
            continue;
        }
        let item = &msg.lines[0];
        let message = format!(
            "This request could not be processed after {} delivery attempts.",
            ctx.settings.worker.delivery_limit
        );
        let rows = [(
            item.l,
            Row::error(&item.c, "processing_failed", &message),
            Usage::default(),
        )];
        tracing::warn!(batch_id = %msg.b, line = item.l, "Line reached the delivery limit.");
        ctx.metrics
            .lines
            .with_label_values(&["dead_lettered"])
            .inc();
        let written = ctx.store.write_rows(&msg.b, &rows).await?;
        if written.iter().any(|w| w.wants_finalize()) {
            notify_aggregator(&ctx, &msg.b).await;
        }
        ack(&delivery).await;
    }
    drop(channel);
    drop(conn);
    Ok(())
}

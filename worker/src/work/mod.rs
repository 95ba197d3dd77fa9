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
//!
//! This module consumes and acks the messages; [`line`] runs one line to its row, [`fleet`] waits
//! for the fleet limiter around its call, and [`dead_letters`] consumes the dead-letter queue.

mod budget;
mod dead_letters;
mod fleet;
mod line;
mod rows;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicCancelOptions};
use serde::Deserialize;
use serde_json::value::RawValue;
use sluice_core::config::BudgetSettings;
use sluice_core::domain::{BatchEvent, LinesMessage, Row, Usage};
use sluice_core::pacing::PaceLimits;
use sluice_store::RowWrite;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::WorkerContext;

pub use dead_letters::run_dead_letters;
use line::{LineEnd, call_deadline, count_gate, run_line};

/// What a worker needs to know about a batch; fixed once the batch is dispatched.
#[derive(Debug)]
struct BatchInfo {
    endpoint: String,
    /// Unix seconds after which the batch expires.
    expires_at: Option<i64>,
    /// The route of the batch's one model; `None` when its lines name different models (the
    /// batch has no `model`), each line then going by its own.
    single: Option<Arc<ModelRoute>>,
    /// The routes of such a batch's models, each resolved once.
    mixed: Mutex<HashMap<String, Arc<ModelRoute>>>,
    /// The owning tenant, its budget, and its metrics label (`unknown` for a tenant no longer
    /// configured, so the label stays bounded).
    tenant: String,
    budget: Option<BudgetSettings>,
    tenant_label: String,
}

/// Where the lines of one model go.
#[derive(Debug)]
struct ModelRoute {
    /// The model as the lines name it.
    model: String,
    /// The provider the model routes to and its fleet limits; `None` when no provider serves it
    /// (the call then fails with the router's error).
    pacing: Option<(String, PaceLimits)>,
}

/// Most routes kept per batch: the routes of a batch that names more models are resolved again
/// now and then, rather than growing the cache without bound (a provider serving `"*"` takes any
/// name).
const MAX_ROUTES_PER_BATCH: usize = 256;

impl ModelRoute {
    fn resolve(ctx: &WorkerContext, model: &str, endpoint: &str) -> Self {
        let pacing = ctx.upstream.provider_of(model, endpoint).map(|(_, p)| {
            (
                p.name.clone(),
                PaceLimits::new(&p.pacing, &ctx.settings.worker),
            )
        });
        Self {
            model: model.to_owned(),
            pacing,
        }
    }
}

impl BatchInfo {
    /// The tenant's budget, when it sets a limit.
    fn limited_budget(&self) -> Option<&BudgetSettings> {
        self.budget.as_ref().filter(|b| b.is_limited())
    }

    /// The route of a line with `body`: the batch's one, or, in a batch of several models, that
    /// of the model the line names.
    fn route(&self, ctx: &WorkerContext, body: &RawValue) -> Arc<ModelRoute> {
        if let Some(single) = &self.single {
            return single.clone();
        }
        #[derive(Deserialize)]
        struct ModelProbe<'a> {
            #[serde(borrow)]
            model: Option<Cow<'a, str>>,
        }
        // Validation saw a model on every line; one that has none here gets the router's error.
        let probe = serde_json::from_str::<ModelProbe<'_>>(body.get()).ok();
        let model = probe
            .as_ref()
            .and_then(|p| p.model.as_deref())
            .unwrap_or("");
        let mut routes = self.mixed.lock().expect("routes lock");
        if let Some(route) = routes.get(model) {
            return route.clone();
        }
        if routes.len() >= MAX_ROUTES_PER_BATCH {
            routes.clear();
        }
        let route = Arc::new(ModelRoute::resolve(ctx, model, &self.endpoint));
        routes.insert(model.to_owned(), route.clone());
        route
    }
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
        let endpoint = meta.endpoint.as_deref().unwrap_or_default().to_owned();
        let single = meta
            .model
            .as_deref()
            .map(|model| Arc::new(ModelRoute::resolve(ctx, model, &endpoint)));
        let tenant = meta.tenant.as_str().to_owned();
        let configured = ctx.settings.tenants.iter().find(|t| t.id == tenant);
        let info = Arc::new(BatchInfo {
            endpoint,
            expires_at: meta.expires_at,
            single,
            mixed: Mutex::default(),
            budget: configured.and_then(|t| t.budget.clone()),
            tenant_label: configured.map_or("unknown", |t| t.id.as_str()).to_owned(),
            tenant,
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
    let conn = sluice_broker::consumer::connect(&ctx.settings, "sluice-worker").await?;
    let concurrency = ctx.settings.worker.concurrency;
    // The main and the express work queue, each on a channel with its own prefetch; their lines
    // share the call slots.
    let mut channels = Vec::new();
    let mut consumers = Vec::new();
    for queue in [ctx.keys.items_queue(), ctx.keys.express_queue()] {
        let (channel, consumer) =
            sluice_broker::consumer::consume(&conn, &ctx.settings, &queue, prefetch(&ctx)).await?;
        channels.push((channel, consumer.tag()));
        consumers.push(consumer);
    }
    let mut consumer = futures::stream::select_all(consumers);
    let slots = Arc::new(Semaphore::new(concurrency as usize));
    let tracker = tokio_util::task::TaskTracker::new();
    // In-flight lines stop early only when the grace runs out; a fresh token lets them outlive `shutdown`.
    let abandon = CancellationToken::new();
    let cache = BatchInfoCache::default();
    let row_writers = rows::RowWriters::default();
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            d = consumer.next() => d,
        };
        let Some(delivery) = delivery else { break };
        let delivery = delivery?;
        let (ctx, abandon, cache, slots, row_writers) = (
            ctx.clone(),
            abandon.clone(),
            cache.clone(),
            slots.clone(),
            row_writers.clone(),
        );
        tracker.spawn(async move {
            let run = Run {
                ctx: &ctx,
                cache: &cache,
                abandon: &abandon,
                slots: &slots,
                rows: &row_writers,
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
/// for their slowest line, counted in the smaller messages of scheduled batches.
fn prefetch(ctx: &WorkerContext) -> u16 {
    let w = &ctx.settings.worker;
    (w.concurrency as usize)
        .div_ceil(w.lines_per_message_for(true))
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
    rows: &'r rows::RowWriters,
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
        let express = delivery.routing_key.as_str() == run.ctx.keys.express_queue();
        process_message(run, &msg, express).await
    };
    match outcome {
        Ok(Some(())) => ack(&delivery).await,
        Ok(None) => {} // abandoned at shutdown: the channel close requeues it
        Err(e) => {
            // Redis or broker trouble: hand the lines back rather than ack without their rows.
            tracing::warn!(batch_id = %msg.batch_id, lines = msg.lines.len(), error = %e, "Lines failed; requeueing.");
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
    tracing::debug!(batch_id = %msg.batch_id, lines = msg.lines.len(), "Splitting a returned line message.");
    let queue = &ctx.keys.items_queue();
    let publishes = msg.lines.iter().map(|item| async move {
        let single = LinesMessage::single(&msg.batch_id, item.clone());
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

/// Runs every line of `msg` to its row (or a delay queue) and writes the rows, those that finish
/// together in one script call. `Ok(None)` means a line was abandoned for shutdown and the message
/// must not be acked.
#[tracing::instrument(skip_all, fields(batch_id = %msg.batch_id, lines = msg.lines.len()))]
async fn process_message(
    run: Run<'_>,
    msg: &LinesMessage<'_>,
    express: bool,
) -> anyhow::Result<Option<()>> {
    let ctx = run.ctx;
    let Some(info) = run.cache.get(ctx, &msg.batch_id).await? else {
        ctx.metrics
            .lines
            .with_label_values(&["orphan"])
            .inc_by(msg.lines.len() as u64);
        return Ok(Some(()));
    };
    let indices: Vec<u64> = msg.lines.iter().map(|item| item.line).collect();
    let gates = ctx
        .store
        .begin_calls(&msg.batch_id, &indices, call_deadline(ctx))
        .await?;
    let mut running: FuturesUnordered<_> = msg
        .lines
        .iter()
        .zip(gates)
        .filter(|(_, gate)| count_gate(ctx, *gate))
        .map(|(item, _)| run_line(run, &info, info.route(ctx, item.body), &msg.batch_id, item))
        .collect();
    // Lines keep running while rows are written: rows that finish during one write go together
    // in the next, with the batch's rows of the worker's other messages.
    let linger = row_linger(ctx, &info, express);
    let (mut abandoned, mut failure) = (false, None);
    let mut finished: Vec<(u64, Row, Usage)> = Vec::new();
    let mut slots = Vec::new();
    let mut writing = None;
    loop {
        if writing.is_none() && !finished.is_empty() {
            let rows = std::mem::take(&mut finished);
            let slots = std::mem::take(&mut slots);
            let info = &info;
            writing = Some(Box::pin(async move {
                let written = run.rows.write(ctx, info, &msg.batch_id, rows, linger).await;
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

/// How long a finished row may wait for others of its batch to share their write: on a
/// rate-limited provider, where lines finish one at a time, `worker.pacing_coalesce_ms`; elsewhere
/// (a concurrency limit alone included) rows finish together and wait for nothing, and so do a
/// small batch's rows (the `express` queue): latency first.
fn row_linger(ctx: &WorkerContext, info: &BatchInfo, express: bool) -> Duration {
    let rate_limited = !express
        && info
            .single
            .as_ref()
            .and_then(|route| route.pacing.as_ref())
            .is_some_and(|(_, limits)| limits.rate_limited());
    if rate_limited {
        Duration::from_millis(ctx.settings.worker.pacing_coalesce_ms)
    } else {
        Duration::ZERO
    }
}

/// Writes the rows of lines that just finished, counts them, and tells the aggregator when the
/// batch may be done.
async fn write_rows(
    ctx: &WorkerContext,
    info: &BatchInfo,
    batch: &str,
    rows: &[(u64, Row, Usage)],
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let written = store_rows(ctx, batch, rows).await?;
    budget::add_written(
        ctx,
        info,
        rows.iter()
            .zip(&written)
            .filter(|(_, w)| matches!(w, RowWrite::Inserted | RowWrite::Last | RowWrite::Drained))
            .map(|((_, _, usage), _)| usage),
    )
    .await;
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

/// Stores rows, and wakes the aggregator when the batch's pending rows call for a compaction (the
/// finalize event: the aggregator compacts what is not ready to finalize).
async fn store_rows(
    ctx: &WorkerContext,
    batch: &str,
    rows: &[(u64, Row, Usage)],
) -> anyhow::Result<Vec<RowWrite>> {
    let a = &ctx.settings.aggregator;
    let (written, compact) = ctx
        .store
        .write_rows(
            batch,
            rows,
            (a.compact_rows, a.compact_bytes),
            Duration::from_millis(a.compact_ask_ms),
        )
        .await?;
    if compact {
        notify_aggregator(ctx, batch).await;
    }
    Ok(written)
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

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
use sluice_shared::store::{CallGate, RowWrite};
use tokio_util::sync::CancellationToken;

use crate::WorkerContext;
use crate::upstream::{Attempt, RetryPolicy};

/// What a worker needs to know about a batch; fixed once the batch is dispatched.
#[derive(Debug)]
struct BatchInfo {
    endpoint: String,
    model: String,
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

/// Runs one line to its row. `Ok(None)` means it was abandoned for shutdown and must not be acked.
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
    let policy = RetryPolicy::from_settings(&ctx.settings.worker);
    let call_budget = Duration::from_millis(ctx.settings.worker.request_timeout_ms + 5_000);
    let mut attempt = 0u32;
    let (row, usage) = loop {
        attempt += 1;
        let deadline = now_millis() + call_budget.as_millis() as i64;
        match ctx.store.begin_call(&msg.b, msg.l, deadline).await? {
            CallGate::Go => {}
            CallGate::Duplicate => {
                ctx.metrics.lines.with_label_values(&["duplicate"]).inc();
                return Ok(Some(()));
            }
            CallGate::Stopped => {
                ctx.metrics.lines.with_label_values(&["skipped"]).inc();
                return Ok(Some(()));
            }
        }
        ctx.metrics.inflight.inc();
        let started = Instant::now();
        let result = ctx
            .upstream
            .attempt(&info.endpoint, &info.model, &msg.c, msg.body)
            .await;
        ctx.metrics.inflight.dec();
        observe(ctx, &result, started.elapsed());
        match result {
            Attempt::Done(row, usage) => break (row, usage),
            Attempt::Retry {
                last,
                reason,
                retry_after,
            } => match policy.delay(attempt, retry_after) {
                None => break (last, Usage::default()),
                Some(delay) => {
                    ctx.metrics.retries.with_label_values(&[reason]).inc();
                    ctx.store.end_call(&msg.b, msg.l).await?;
                    tokio::select! {
                        _ = abandon.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            },
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

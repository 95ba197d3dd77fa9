//! The work-queue consumer: takes line messages from the main and the express queue, runs their
//! lines, and acks a message once every line has its row.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use sluice_core::domain::{LinesMessage, Row, Usage};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::batch_info::{BatchInfo, BatchInfoCache};
use super::delivery::{ack, split};
use super::gate::{call_deadline, count_gate};
use super::line::{LineEnd, Run, run_line};
use super::rows::RowWriters;
use crate::WorkerContext;

/// Consumes line messages until `shutdown`, then lets in-flight lines finish within the grace.
pub(crate) async fn run(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
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
    let row_writers = RowWriters::default();
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

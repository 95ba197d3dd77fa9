//! The control-message consumer: one dispatch round per message, then topping the batch's window
//! up as its lines finish.

use std::time::{Duration, Instant};

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use sluice_core::domain::{BatchEvent, BatchStatus, now_millis};
use sluice_runtime::lines::RequestLines;
use tokio_util::sync::CancellationToken;

use super::enqueue::{Dispatched, enqueue};
use super::validate::validate;
use crate::WorkerContext;
use crate::lease::Lease;
use crate::pacing::schedule::Tracker;

/// Consumes control messages until `shutdown`. Unfinished dispatches stop at their next line and
/// leave their message unacked: closing the channel hands it back to the broker, and the next
/// dispatcher resumes from the checkpoint.
pub(crate) async fn run(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let queue = ctx.keys.control_queue();
    sluice_broker::consumer::consume_each(
        &ctx.settings,
        "sluice-dispatcher",
        &queue,
        4,
        &shutdown,
        |delivery| handle(ctx.clone(), delivery, shutdown.clone()),
    )
    .await
}

async fn handle(ctx: WorkerContext, delivery: Delivery, shutdown: CancellationToken) {
    let Ok(event) = serde_json::from_slice::<BatchEvent>(&delivery.data) else {
        tracing::error!("Dropping a malformed control message.");
        ack(&delivery).await;
        return;
    };
    let started = Instant::now();
    let mut tracker = Tracker::default();
    match dispatch(&ctx, &event.batch_id, &shutdown, &mut tracker, &mut None).await {
        Ok(Dispatched::Done(result @ ("windowed" | "window_full"))) => {
            ctx.metrics
                .dispatch_seconds
                .with_label_values(&[result])
                .observe(started.elapsed().as_secs_f64());
            // Acked now, so a long batch never holds its control message past the broker's
            // consumer timeout; if this process dies, the sweep sees `dispatch_alive_ms` go
            // stale and publishes the dispatch again.
            ack(&delivery).await;
            top_up(&ctx, &event.batch_id, &shutdown, &mut tracker).await;
        }
        Ok(Dispatched::Done(result)) => {
            ctx.metrics
                .dispatch_seconds
                .with_label_values(&[result])
                .observe(started.elapsed().as_secs_f64());
            ack(&delivery).await;
            tracker
                .hold_while_lines_wait(&ctx, &event.batch_id, &shutdown)
                .await;
        }
        Ok(Dispatched::Interrupted) => {
            tracing::info!(batch_id = %event.batch_id, "Dispatch interrupted; it resumes on another dispatcher.");
        }
        Err(e) => {
            // Leaving the message unacked would stall this consumer slot; reject it back to the
            // queue, where the delivery limit bounds how often a broken batch is retried (the
            // aggregator's sweep re-publishes a dispatch for batches stuck in `validating`).
            tracing::warn!(batch_id = %event.batch_id, error = %e, "Dispatch failed; requeueing.");
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Err(e) = delivery
                .reject(lapin::options::BasicRejectOptions { requeue: true })
                .await
            {
                tracing::warn!(error = %e, "Could not requeue a control message.");
            }
        }
    }
    tracker.leave(&ctx, &event.batch_id).await;
}

/// How often a dispatcher tops a batch's window up.
const TOP_UP_EVERY: Duration = Duration::from_millis(200);

/// Keeps publishing a batch's next lines as its earlier ones finish, one window at a time, until
/// every line is enqueued, the batch stops, another dispatcher holds it, or shutdown.
async fn top_up(
    ctx: &WorkerContext,
    batch_id: &str,
    shutdown: &CancellationToken,
    tracker: &mut Tracker,
) {
    top_up_rounds(ctx, batch_id, shutdown, tracker).await;
    tracker.hold_while_lines_wait(ctx, batch_id, shutdown).await;
    tracker.leave(ctx, batch_id).await;
}

async fn top_up_rounds(
    ctx: &WorkerContext,
    batch_id: &str,
    shutdown: &CancellationToken,
    tracker: &mut Tracker,
) {
    let mut cursor = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(TOP_UP_EVERY) => {}
        }
        if let Err(e) = ctx
            .store
            .set_batch_fields(batch_id, &[("dispatch_alive_ms", now_millis().to_string())])
            .await
        {
            tracing::warn!(%batch_id, error = %e, "Could not stamp a dispatch; retrying.");
            continue;
        }
        match dispatch(ctx, batch_id, shutdown, tracker, &mut cursor).await {
            Ok(Dispatched::Done("windowed" | "window_full")) => {}
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(%batch_id, error = %e, "Topping up a batch failed; retrying.");
            }
        }
    }
}

async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %e, "Could not ack a control message; it will be redelivered.");
    }
}

async fn dispatch(
    ctx: &WorkerContext,
    batch_id: &str,
    shutdown: &CancellationToken,
    tracker: &mut Tracker,
    cursor: &mut Option<RequestLines>,
) -> anyhow::Result<Dispatched> {
    let lease_ttl = Duration::from_millis(ctx.settings.aggregator.lease_ms);
    let Some(lease) = Lease::acquire(
        &ctx.store,
        ctx.keys.batch_dispatch_lease(batch_id),
        lease_ttl,
    )
    .await?
    else {
        // Someone is dispatching it now (or died holding the lease, which then expires and the
        // aggregator's sweep publishes the dispatch again).
        return Ok(Dispatched::Done("busy"));
    };
    let result = dispatch_leased(ctx, batch_id, shutdown, &lease, tracker, cursor).await;
    lease.release().await;
    result
}

async fn dispatch_leased(
    ctx: &WorkerContext,
    batch_id: &str,
    shutdown: &CancellationToken,
    lease: &Lease,
    tracker: &mut Tracker,
    cursor: &mut Option<RequestLines>,
) -> anyhow::Result<Dispatched> {
    let Some(meta) = ctx.store.get_batch(batch_id).await? else {
        return Ok(Dispatched::Done("gone"));
    };
    match meta.status {
        Some(BatchStatus::Validating) if meta.stopping.is_none() => {
            if !validate(ctx, batch_id, &meta).await? {
                return Ok(Dispatched::Done("failed"));
            }
        }
        Some(BatchStatus::InProgress)
            if meta.stopping.is_none()
                && meta.dispatched.unwrap_or(0) < meta.total.unwrap_or(0) => {}
        _ => return Ok(Dispatched::Done("skipped")),
    }
    let Some(meta) = ctx.store.get_batch(batch_id).await? else {
        return Ok(Dispatched::Done("gone"));
    };
    let window = tracker.window(ctx, batch_id, &meta).await;
    enqueue(ctx, batch_id, &meta, shutdown, lease, window, cursor).await
}

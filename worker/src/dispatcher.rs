//! The dispatcher: on a batch's control message, validates every line of its input file, then
//! publishes its lines (`worker.lines_per_message` consecutive lines per message) with pipelined
//! publisher confirms and moves the batch to `in_progress`.
//!
//! Fairness: a batch has at most a window of lines in the work queue (dispatched, not finished)
//! at a time: `worker.batch_window` lines, or `worker.batch_window_secs` of the batch's own recent
//! throughput when that is more; on a rate-limited provider, the window the fleet-wide schedule
//! gives it (weights, deadlines, priority tiers: [`crate::schedule`]). The dispatcher publishes one window, records it in `dispatched`, acks the
//! control message and then tops the window up every 200 ms as rows land, stamping
//! `dispatch_alive_ms`; if it dies, the aggregator's sweep sees the stamp go stale and publishes
//! the dispatch again (it resumes from `dispatched`). Another batch's lines thus queue behind at
//! most one window of each running batch, never behind 50,000 lines.
//!
//! Crash safety: the control message is acked only when every line is confirmed by the broker. A
//! dispatcher killed halfway leaves the message unacked, so another one picks it up and resumes
//! from the checkpoint `dispatched` (the lowest line not yet confirmed). Lines between the
//! checkpoint and the crash are published twice; the idempotent row write makes that harmless.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use sluice_broker::{QueueError, check_confirm};
use sluice_core::domain::{
    Batch, BatchError, BatchEvent, BatchStatus, LineItem, LinesMessage, StopReason, batch_field,
    now_millis, now_secs,
};
use sluice_store::Transition;
use tokio_util::sync::CancellationToken;

use crate::WorkerContext;
use crate::lease::Lease;
use crate::schedule::{Tracker, Window};
use sluice_core::lines::{LineProbe, RequestLine};
use sluice_core::validate::Validator;
use sluice_runtime::lines::RequestLines;

/// How often the checkpoint is saved, in confirmed lines.
const CHECKPOINT_EVERY: u64 = 2_000;

/// A message closes once its lines' bytes pass this, whatever `lines_per_message` says, so
/// messages of large lines stay small enough for the broker to move quickly.
const MESSAGE_BYTES: usize = 64 * 1024;

/// Consumes control messages until `shutdown`. Unfinished dispatches stop at their next line and
/// leave their message unacked: closing the channel hands it back to the broker, and the next
/// dispatcher resumes from the checkpoint.
pub async fn run(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
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
            .set_batch_fields(
                batch_id,
                &[(batch_field::DISPATCH_ALIVE_MS, now_millis().to_string())],
            )
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

enum Dispatched {
    Done(&'static str),
    Interrupted,
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

/// Pass one: checks every line. Fails the batch with every error, or moves it to `in_progress`.
async fn validate(ctx: &WorkerContext, batch_id: &str, meta: &Batch) -> anyhow::Result<bool> {
    let endpoint = meta.endpoint.as_deref().unwrap_or_default().to_owned();
    let input_id = meta.input_file_id.as_deref().unwrap_or_default().to_owned();
    let mut file = ctx
        .store
        .get_file(&input_id)
        .await?
        .filter(|f| f.tenant() == meta.tenant.as_str());
    // An expired file is one the expiry sweep may delete any time: only a batch that took it
    // before it expired (the sweep waits for those) may read it.
    if file.as_ref().is_some_and(|f| f.expired(now_secs()))
        && !ctx.store.is_file_user(&input_id, batch_id).await?
    {
        file = None;
    }
    let opened = match &file {
        Some(f) => RequestLines::open(
            &ctx.objects,
            &f.path().into(),
            ctx.settings.limits.max_line_bytes as usize,
        )
        .await
        .ok(),
        None => None,
    };
    let Some(mut lines) = opened else {
        let error = BatchError {
            code: "invalid_request".into(),
            message: format!(
                "Cannot find file {input_id}, or your organization does not have access to it."
            ),
            // OpenAI names the parameter `file_id` here, and clients match on it.
            param: Some("file_id".into()),
            line: None,
        };
        fail(ctx, batch_id, meta, vec![error]).await?;
        return Ok(false);
    };
    if file.as_ref().and_then(|f| f.get("purpose")) != Some("batch") {
        let error = BatchError {
            code: "invalid_request".into(),
            message: format!("File {input_id} does not have purpose 'batch'."),
            param: Some("input_file_id".into()),
            line: None,
        };
        fail(ctx, batch_id, meta, vec![error]).await?;
        return Ok(false);
    }
    let serves = |model: &str| sluice_core::validate::check_model(&ctx.settings, model, &endpoint);
    let mut validator = Validator::new(&endpoint, &ctx.settings.limits, &serves)
        .one_model_per_batch(ctx.settings.one_model_per_batch(meta.tenant.as_str()));
    // Stops at `max_lines + 1` lines: a longer file fails whatever the rest holds, and reading
    // on would only cost time (the errors kept are bounded either way).
    while !validator.done()
        && let Some(line) = lines.next_line().await?
    {
        validator.check(&line);
    }
    let verdict = validator.finish();
    if !verdict.errors.is_empty() {
        fail(ctx, batch_id, meta, verdict.errors).await?;
        return Ok(false);
    }
    let mut extra = vec![
        (batch_field::TOTAL, verdict.lines.to_string()),
        (batch_field::DISPATCHED, "0".to_owned()),
    ];
    // A batch whose lines name different models has none: its `model` stays null, and workers
    // route each line by its own.
    if let Some(model) = verdict.model {
        extra.push((batch_field::MODEL, model));
    }
    match ctx
        .store
        .transition(batch_id, BatchStatus::InProgress, &extra)
        .await?
    {
        Transition::Applied(_) => Ok(true),
        // Cancelled or expired while validating: the aggregator ends it with no lines.
        Transition::Refused(_) => Ok(false),
    }
}

async fn fail(
    ctx: &WorkerContext,
    batch_id: &str,
    meta: &Batch,
    errors: Vec<BatchError>,
) -> anyhow::Result<()> {
    let errors = serde_json::json!({"object": "list", "data": errors}).to_string();
    // Before the status: once it is written, its event must already be in the broker.
    crate::webhooks::announce(ctx, batch_id, meta.tenant.as_str(), BatchStatus::Failed).await?;
    if let Transition::Applied(_) = ctx
        .store
        .transition(
            batch_id,
            BatchStatus::Failed,
            &[(batch_field::ERRORS, errors)],
        )
        .await?
    {
        ctx.metrics
            .batches_finished
            .with_label_values(&["failed"])
            .inc();
        ctx.store
            .retire_batch(batch_id, ctx.settings.aggregator.rows_ttl_secs)
            .await?;
    }
    Ok(())
}

/// Pass two: publishes every line from the checkpoint on, keeping a window of confirms in flight.
///
/// `cursor` is the input file as the previous round of the same dispatcher left it (positioned
/// after the last line it published): a round that starts there reads on instead of reading the
/// file again from the top. A round that ends cleanly leaves its reader there for the next.
async fn enqueue(
    ctx: &WorkerContext,
    batch_id: &str,
    meta: &Batch,
    shutdown: &CancellationToken,
    lease: &Lease,
    window: Window,
    cursor: &mut Option<RequestLines>,
) -> anyhow::Result<Dispatched> {
    let input_id = meta.input_file_id.as_deref().unwrap_or_default();
    let Some(input) = ctx.store.get_file(input_id).await? else {
        return input_lost(ctx, batch_id, input_id).await;
    };
    let start = meta.dispatched.unwrap_or(0).max(0) as u64;
    // Fairness: at most `batch_window` lines of this batch wait in the work queue (dispatched but
    // not finished). The rest are published later, when the aggregator's sweep sees the window
    // half empty and sends the dispatch again (it resumes from `dispatched`).
    // A round reads the input on from where the previous round of this dispatcher stopped (or from
    // the top after a resume), and runs once half the window is free (a scheduled window: once
    // any of it is, as its size is the batch's share of the provider).
    let all = meta.total().unwrap_or(0);
    let total = all.min(meta.done() + window.lines);
    let half_full = start > meta.done() + window.lines / 2 && total < all;
    if start >= total || (half_full && !window.eager) {
        return Ok(Dispatched::Done("window_full"));
    }
    let mut lines = match cursor.take() {
        Some(reader) if reader.next_index() <= start => reader,
        _ => match RequestLines::open(
            &ctx.objects,
            &object_store::path::Path::from(input.path()),
            ctx.settings.limits.max_line_bytes as usize,
        )
        .await
        {
            Ok(lines) => lines,
            Err(object_store::Error::NotFound { .. }) => {
                return input_lost(ctx, batch_id, input_id).await;
            }
            Err(e) => return Err(e.into()),
        },
    };
    let channel = ctx.publisher.channel().await?;
    let queue = if all <= ctx.settings.worker.express_lines {
        ctx.keys.express_queue()
    } else {
        ctx.keys.items_queue()
    };
    let per_message = window.per_message;
    // `publish_window` counts lines; messages in flight carry up to `per_message` each.
    let max_pending = ctx
        .settings
        .worker
        .publish_window
        .div_ceil(per_message)
        .max(1);
    let mut pending = FuturesUnordered::new();
    // First line of each message not yet confirmed.
    let mut outstanding = BTreeSet::new();
    let mut saved = start;
    let mut confirmed_since_save = 0u64;
    let mut message: Vec<RequestLine> = Vec::with_capacity(per_message);
    let mut message_bytes = 0usize;

    let mut next_line = lines.next_line().await?;
    loop {
        // Fill messages until `max_pending` are in flight, then wait for one confirm.
        while pending.len() < max_pending {
            let Some(line) = next_line.take() else { break };
            let stop = shutdown.is_cancelled() || lease.is_lost() || line.index + 1 >= total;
            if line.index >= start && line.index < total {
                message_bytes += line.bytes.len();
                message.push(line);
            }
            next_line = if stop { None } else { lines.next_line().await? };
            let full = message.len() >= per_message || message_bytes >= MESSAGE_BYTES;
            if !message.is_empty() && (full || next_line.is_none()) {
                let payload = encode_message(batch_id, &message)?;
                let (first, count) = (message[0].index, message.len() as u64);
                message.clear();
                message_bytes = 0;
                let confirm = ctx.publisher.send(&channel, &queue, &payload).await?;
                outstanding.insert(first);
                pending.push(async move { (first, count, confirm.await) });
            }
            if next_line.is_none() {
                break;
            }
        }
        // A broker that stopped confirming fails the round; the dispatch comes back and resumes
        // from the last checkpoint, on a fresh connection.
        let next = match tokio::time::timeout(ctx.publisher.confirm_timeout(), pending.next()).await
        {
            Ok(next) => next,
            Err(_) => {
                ctx.publisher.invalidate().await;
                return Err(QueueError::ConfirmTimeout(ctx.publisher.confirm_timeout()).into());
            }
        };
        let Some((first, count, result)) = next else {
            break;
        };
        check_confirm(result?)?;
        outstanding.remove(&first);
        ctx.metrics.lines_enqueued.inc_by(count);
        confirmed_since_save += count;
        if confirmed_since_save >= CHECKPOINT_EVERY {
            confirmed_since_save = 0;
            saved = checkpoint(
                ctx,
                batch_id,
                &outstanding,
                next_line.as_ref().map(|l| l.index),
                total,
                saved,
            )
            .await?;
        }
        if (shutdown.is_cancelled() || lease.is_lost()) && pending.is_empty() {
            return Ok(Dispatched::Interrupted);
        }
    }
    if shutdown.is_cancelled() || lease.is_lost() {
        return Ok(Dispatched::Interrupted);
    }
    ctx.store
        .set_batch_fields(batch_id, &[(batch_field::DISPATCHED, total.to_string())])
        .await?;
    if next_line.is_none() && lines.next_index() == total {
        *cursor = Some(lines);
    }
    Ok(Dispatched::Done(if total < all {
        "windowed"
    } else {
        "enqueued"
    }))
}

/// A running batch whose input file is gone (deleted before files were protected, or lost by
/// storage) can never enqueue its remaining lines: retrying would spin until expiry. It stops
/// instead, and the aggregator ends it `failed`, its unrun lines with `input_file_lost` rows.
async fn input_lost(
    ctx: &WorkerContext,
    batch_id: &str,
    input_id: &str,
) -> anyhow::Result<Dispatched> {
    if ctx
        .store
        .mark_stopping(batch_id, StopReason::InputLost)
        .await?
    {
        tracing::warn!(%batch_id, %input_id, "The input file of a running batch is gone; the batch fails.");
        let error = BatchError {
            code: "input_file_lost".into(),
            message: format!(
                "The input file {input_id} was deleted or lost while the batch ran; the lines \
                 not yet run were not executed."
            ),
            param: Some("input_file_id".into()),
            line: None,
        };
        let errors = serde_json::json!({"object": "list", "data": [error]}).to_string();
        ctx.store
            .set_batch_fields(batch_id, &[(batch_field::ERRORS, errors)])
            .await?;
        crate::work::notify_aggregator(ctx, batch_id).await;
    }
    Ok(Dispatched::Done("input_lost"))
}

/// The work-queue message for `lines` (consecutive lines of `batch_id`, already validated).
fn encode_message(batch_id: &str, lines: &[RequestLine]) -> anyhow::Result<Vec<u8>> {
    let items = lines
        .iter()
        .map(|line| {
            let probe = LineProbe::parse(&line.bytes)
                .ok_or_else(|| anyhow::anyhow!("line changed since validation"))?;
            Ok(LineItem {
                line: line.index,
                custom_id: probe.custom_id().unwrap_or_default().into(),
                body: probe
                    .body
                    .ok_or_else(|| anyhow::anyhow!("line changed since validation"))?,
                attempts: 0,
                first_attempt_ms: 0,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(serde_json::to_vec(&LinesMessage {
        batch_id: batch_id.into(),
        lines: items,
    })?)
}

/// Saves the lowest line not yet confirmed, so a resumed dispatch starts there.
async fn checkpoint(
    ctx: &WorkerContext,
    batch_id: &str,
    outstanding: &BTreeSet<u64>,
    next_unsent: Option<u64>,
    total: u64,
    saved: u64,
) -> anyhow::Result<u64> {
    let low = outstanding
        .first()
        .copied()
        .or(next_unsent)
        .unwrap_or(total);
    if low > saved {
        ctx.store
            .set_batch_fields(batch_id, &[(batch_field::DISPATCHED, low.to_string())])
            .await?;
    }
    Ok(low.max(saved))
}

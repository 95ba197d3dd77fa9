//! Pass two: a window of the batch's lines published, several per message, with pipelined
//! confirms and a checkpoint a resumed dispatch starts from.

use std::collections::BTreeSet;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use sluice_broker::{QueueError, check_confirm};
use sluice_core::domain::{BatchError, BatchMeta, LineItem, LinesMessage, StopReason};
use sluice_core::lines::{LineProbe, RequestLine};
use sluice_runtime::lines::RequestLines;
use tokio_util::sync::CancellationToken;

use crate::WorkerContext;
use crate::lease::Lease;
use crate::pacing::schedule::Window;

/// How often the checkpoint is saved, in confirmed lines.
const CHECKPOINT_EVERY: u64 = 2_000;

/// A message closes once its lines' bytes pass this, whatever `lines_per_message` says, so
/// messages of large lines stay small enough for the broker to move quickly.
const MESSAGE_BYTES: usize = 64 * 1024;

/// How a dispatch round ended.
pub(super) enum Dispatched {
    Done(&'static str),
    Interrupted,
}

/// Pass two: publishes every line from the checkpoint on, keeping a window of confirms in flight.
///
/// `cursor` is the input file as the previous round of the same dispatcher left it (positioned
/// after the last line it published): a round that starts there reads on instead of reading the
/// file again from the top. A round that ends cleanly leaves its reader there for the next.
pub(super) async fn enqueue(
    ctx: &WorkerContext,
    batch_id: &str,
    meta: &BatchMeta,
    shutdown: &CancellationToken,
    lease: &Lease,
    window: Window,
    cursor: &mut Option<RequestLines>,
) -> anyhow::Result<Dispatched> {
    let input_id = meta.get("input_file_id").unwrap_or_default();
    let Some(input) = ctx.store.get_file(input_id).await? else {
        return input_lost(ctx, batch_id, input_id).await;
    };
    let start = meta.int("dispatched").unwrap_or(0).max(0) as u64;
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
        .set_batch_fields(batch_id, &[("dispatched", total.to_string())])
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
            .set_batch_fields(batch_id, &[("errors", errors)])
            .await?;
        crate::lines::rows::notify_aggregator(ctx, batch_id).await;
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
                l: line.index,
                c: probe.custom_id().unwrap_or_default().into(),
                body: probe
                    .body
                    .ok_or_else(|| anyhow::anyhow!("line changed since validation"))?,
                a: 0,
                t: 0,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(serde_json::to_vec(&LinesMessage {
        b: batch_id.into(),
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
            .set_batch_fields(batch_id, &[("dispatched", low.to_string())])
            .await?;
    }
    Ok(low.max(saved))
}

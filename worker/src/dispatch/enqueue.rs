//! Pass two: a window of the batch's lines published, several per message, with pipelined
//! confirms and a checkpoint a resumed dispatch starts from.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::{Channel, Confirmation, PublisherConfirm};
use sluice_broker::{QueueError, check_confirm};
use sluice_core::domain::{Batch, BatchError, FileMeta, LineItem, LinesMessage, StopReason};
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
    /// The round ran to its end; the label says how (for the `dispatch_seconds` metric and the
    /// dispatcher's next step): `windowed` and `window_full` leave lines for later rounds.
    Done(&'static str),
    /// Shutdown or a lost lease stopped it; another dispatcher resumes from the checkpoint.
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
    let Some(round) = Round::of(meta, &window) else {
        return Ok(Dispatched::Done("window_full"));
    };
    let Some(mut lines) = open_at(ctx, cursor.take(), round.start, &input).await? else {
        return input_lost(ctx, batch_id, input_id).await;
    };
    let stopped = || shutdown.is_cancelled() || lease.is_lost();
    let mut publishing = Publishing::new(ctx, batch_id, round, window.per_message).await?;
    let read_ahead = match publishing.publish(&mut lines, &stopped).await? {
        Published::All { read_ahead } => read_ahead,
        Published::Interrupted => return Ok(Dispatched::Interrupted),
    };
    if stopped() {
        return Ok(Dispatched::Interrupted);
    }
    ctx.store
        .set_batch_fields(batch_id, &[("dispatched", round.end.to_string())])
        .await?;
    if !read_ahead && lines.next_index() == round.end {
        *cursor = Some(lines);
    }
    Ok(Dispatched::Done(round.outcome()))
}

/// The lines one round publishes: `start..end` of the batch's `all`.
#[derive(Debug, Clone, Copy)]
struct Round {
    /// The checkpoint: the lowest line not yet confirmed.
    start: u64,
    /// One past the last line the window lets this round publish.
    end: u64,
    /// Every line of the batch.
    all: u64,
}

impl Round {
    /// The round's lines, or `None` while the window is too full for a round.
    ///
    /// Fairness: at most `batch_window` lines of this batch wait in the work queue (dispatched but
    /// not finished). The rest are published later, when the aggregator's sweep sees the window
    /// half empty and sends the dispatch again (it resumes from `dispatched`). A round reads the
    /// input on from where the previous round of this dispatcher stopped (or from the top after a
    /// resume), and runs once half the window is free (a scheduled window: once any of it is, as
    /// its size is the batch's share of the provider).
    fn of(meta: &Batch, window: &Window) -> Option<Self> {
        let start = meta.dispatched.unwrap_or(0).max(0) as u64;
        let all = meta.total().unwrap_or(0);
        let end = all.min(meta.done() + window.lines);
        let half_full = start > meta.done() + window.lines / 2 && end < all;
        if start >= end || (half_full && !window.eager) {
            return None;
        }
        Some(Self { start, end, all })
    }

    /// How the round ends once every line of it is confirmed.
    fn outcome(&self) -> &'static str {
        if self.end < self.all {
            "windowed"
        } else {
            "enqueued"
        }
    }
}

/// The input file's reader positioned at or before line `start`: the previous round's when it is
/// not past it, else the file opened afresh. `None` when the file is gone from storage.
async fn open_at(
    ctx: &WorkerContext,
    previous: Option<RequestLines>,
    start: u64,
    input: &FileMeta,
) -> anyhow::Result<Option<RequestLines>> {
    if let Some(reader) = previous
        && reader.next_index() <= start
    {
        return Ok(Some(reader));
    }
    match RequestLines::open(
        &ctx.objects,
        &object_store::path::Path::from(input.path()),
        ctx.settings.limits.max_line_bytes as usize,
    )
    .await
    {
        Ok(lines) => Ok(Some(lines)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// How publishing a round's lines ended.
enum Published {
    /// Every line is confirmed. `read_ahead`: a line past the round was read, so the reader is
    /// not where the next round starts.
    All { read_ahead: bool },
    /// Stopped by shutdown or a lost lease once the messages in flight were confirmed.
    Interrupted,
}

/// A published message waiting for its broker confirm, with the lines it carries.
struct Confirming {
    /// Its first line.
    first: u64,
    /// How many lines it carries.
    count: u64,
    confirm: PublisherConfirm,
}

impl Future for Confirming {
    type Output = (u64, u64, lapin::Result<Confirmation>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (first, count) = (self.first, self.count);
        Pin::new(&mut self.confirm)
            .poll(cx)
            .map(|result| (first, count, result))
    }
}

/// One round's publishing: lines gathered into messages, messages sent with up to `max_pending`
/// confirms awaited at once, and the checkpoint saved as confirms arrive.
struct Publishing<'a> {
    ctx: &'a WorkerContext,
    batch_id: &'a str,
    round: Round,
    channel: Channel,
    queue: String,
    per_message: usize,
    max_pending: usize,
    pending: FuturesUnordered<Confirming>,
    /// First line of each message not yet confirmed.
    outstanding: BTreeSet<u64>,
    /// The checkpoint last saved.
    saved: u64,
    confirmed_since_save: u64,
    /// The message being filled, and its lines' bytes.
    message: Vec<RequestLine>,
    message_bytes: usize,
}

impl<'a> Publishing<'a> {
    /// Publishing to the work queue the batch's size calls for: the express queue for a small
    /// batch, the main one otherwise.
    async fn new(
        ctx: &'a WorkerContext,
        batch_id: &'a str,
        round: Round,
        per_message: usize,
    ) -> anyhow::Result<Self> {
        let channel = ctx.publisher.channel().await?;
        let queue = if round.all <= ctx.settings.worker.express_lines {
            ctx.keys.express_queue()
        } else {
            ctx.keys.items_queue()
        };
        // `publish_window` counts lines; messages in flight carry up to `per_message` each.
        let max_pending = ctx
            .settings
            .worker
            .publish_window
            .div_ceil(per_message)
            .max(1);
        Ok(Self {
            ctx,
            batch_id,
            round,
            channel,
            queue,
            per_message,
            max_pending,
            pending: FuturesUnordered::new(),
            outstanding: BTreeSet::new(),
            saved: round.start,
            confirmed_since_save: 0,
            message: Vec::with_capacity(per_message),
            message_bytes: 0,
        })
    }

    /// Publishes the round's lines from `lines`, until every one is confirmed or `stopped`.
    async fn publish(
        &mut self,
        lines: &mut RequestLines,
        stopped: &impl Fn() -> bool,
    ) -> anyhow::Result<Published> {
        let mut next_line = lines.next_line().await?;
        loop {
            next_line = self.fill(lines, next_line, stopped).await?;
            let Some(confirm) = self.next_confirm().await? else {
                break;
            };
            self.confirmed(confirm, next_line.as_ref().map(|l| l.index))
                .await?;
            if stopped() && self.pending.is_empty() {
                return Ok(Published::Interrupted);
            }
        }
        Ok(Published::All {
            read_ahead: next_line.is_some(),
        })
    }

    /// Fills and sends messages until `max_pending` are in flight or the round's lines run out
    /// (or it is `stopped`); returns the line read but not yet taken.
    async fn fill(
        &mut self,
        lines: &mut RequestLines,
        mut next_line: Option<RequestLine>,
        stopped: &impl Fn() -> bool,
    ) -> anyhow::Result<Option<RequestLine>> {
        let Round { start, end, .. } = self.round;
        while self.pending.len() < self.max_pending {
            let Some(line) = next_line.take() else { break };
            let stop = stopped() || line.index + 1 >= end;
            if line.index >= start && line.index < end {
                self.message_bytes += line.bytes.len();
                self.message.push(line);
            }
            next_line = if stop { None } else { lines.next_line().await? };
            let full =
                self.message.len() >= self.per_message || self.message_bytes >= MESSAGE_BYTES;
            if !self.message.is_empty() && (full || next_line.is_none()) {
                self.send_message().await?;
            }
            if next_line.is_none() {
                break;
            }
        }
        Ok(next_line)
    }

    /// Sends the message filled so far; its confirm joins those awaited.
    async fn send_message(&mut self) -> anyhow::Result<()> {
        let payload = encode_message(self.batch_id, &self.message)?;
        let (first, count) = (self.message[0].index, self.message.len() as u64);
        self.message.clear();
        self.message_bytes = 0;
        let confirm = self
            .ctx
            .publisher
            .send(&self.channel, &self.queue, &payload)
            .await?;
        self.outstanding.insert(first);
        self.pending.push(Confirming {
            first,
            count,
            confirm,
        });
        Ok(())
    }

    /// The next confirm to arrive, `None` when none is awaited. A broker that stopped confirming
    /// fails the round; the dispatch comes back and resumes from the last checkpoint, on a fresh
    /// connection.
    async fn next_confirm(
        &mut self,
    ) -> anyhow::Result<Option<(u64, u64, lapin::Result<Confirmation>)>> {
        let publisher = &self.ctx.publisher;
        match tokio::time::timeout(publisher.confirm_timeout(), self.pending.next()).await {
            Ok(next) => Ok(next),
            Err(_) => {
                publisher.invalidate().await;
                Err(QueueError::ConfirmTimeout(publisher.confirm_timeout()).into())
            }
        }
    }

    /// Counts a confirmed message's lines, and saves the checkpoint every [`CHECKPOINT_EVERY`]
    /// lines (`next_unsent`: the line read but not yet taken).
    async fn confirmed(
        &mut self,
        (first, count, result): (u64, u64, lapin::Result<Confirmation>),
        next_unsent: Option<u64>,
    ) -> anyhow::Result<()> {
        check_confirm(result?)?;
        self.outstanding.remove(&first);
        self.ctx.metrics.lines_enqueued.inc_by(count);
        self.confirmed_since_save += count;
        if self.confirmed_since_save >= CHECKPOINT_EVERY {
            self.confirmed_since_save = 0;
            self.saved = checkpoint(
                self.ctx,
                self.batch_id,
                &self.outstanding,
                next_unsent,
                self.round.end,
                self.saved,
            )
            .await?;
        }
        Ok(())
    }
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
            .set_batch_fields(batch_id, &[("dispatched", low.to_string())])
            .await?;
    }
    Ok(low.max(saved))
}

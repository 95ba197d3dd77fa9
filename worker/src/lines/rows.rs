//! A worker's rows of one batch, written together.
//!
//! Rows that finish during a write go in the next one, across the worker's messages of the batch.
//! On a rate-paced provider lines finish one at a time, each a script call of its own; there the
//! first row of a write also waits up to `worker.pacing_coalesce_ms` for others, holding its call
//! slot (a worker that dies still has at most `concurrency` lines called without their rows). A
//! small batch's rows (from the express queue) wait for nobody.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_core::domain::{Row, Usage};
use tokio::sync::oneshot;
use tokio::time::Instant;

use sluice_core::domain::BatchEvent;
use sluice_store::RowWrite;

use super::batch_info::BatchInfo;
use super::budget;
use crate::WorkerContext;

/// Most rows one write carries.
const MAX_ROWS: usize = 512;

type Reply = oneshot::Sender<Result<(), String>>;

/// One batch's rows waiting for a write.
struct Pending {
    info: Arc<BatchInfo>,
    rows: Vec<(u64, Row, Usage)>,
    /// One per caller.
    replies: Vec<Reply>,
    /// When the rows waiting must be written.
    due: Option<Instant>,
    wake: Arc<tokio::sync::Notify>,
}

/// The rows waiting for a write, by batch.
#[derive(Clone, Default)]
pub(super) struct RowWriters(Arc<Mutex<HashMap<String, Pending>>>);

impl RowWriters {
    /// Writes `rows` of `batch` with whatever other rows of the batch are written about then, at
    /// most `linger` after they arrive.
    pub(super) async fn write(
        &self,
        ctx: &WorkerContext,
        info: &Arc<BatchInfo>,
        batch: &str,
        rows: Vec<(u64, Row, Usage)>,
        linger: Duration,
    ) -> anyhow::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        {
            let mut map = self.0.lock().expect("row writers lock");
            let spawn = !map.contains_key(batch);
            let p = map.entry(batch.to_owned()).or_insert_with(|| Pending {
                info: info.clone(),
                rows: Vec::new(),
                replies: Vec::new(),
                due: None,
                wake: Arc::default(),
            });
            p.replies.push(reply);
            p.rows.extend(rows);
            let due = Instant::now() + linger;
            if p.due.is_none_or(|d| due < d) || p.rows.len() >= MAX_ROWS {
                p.due = Some(p.due.map_or(due, |d| d.min(due)));
                p.wake.notify_one();
            }
            if spawn {
                let (this, ctx, batch) = (self.clone(), ctx.clone(), batch.to_owned());
                tokio::spawn(async move { this.write_while_waited(&ctx, &batch).await });
            }
        }
        match answer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(anyhow::anyhow!("{e}")),
            Err(_) => Err(anyhow::anyhow!("the row writer ended")),
        }
    }

    /// Writes the batch's rows as they come due, until none waits.
    async fn write_while_waited(&self, ctx: &WorkerContext, batch: &str) {
        loop {
            let (due, full, wake) = {
                let mut map = self.0.lock().expect("row writers lock");
                let p = map.get_mut(batch).expect("rows of a writing task");
                let Some(due) = p.due else {
                    map.remove(batch);
                    return;
                };
                (due, p.rows.len() >= MAX_ROWS, p.wake.clone())
            };
            if !full && due > Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = wake.notified() => continue,
                }
            }
            let (info, rows, replies) = {
                let mut map = self.0.lock().expect("row writers lock");
                let p = map.get_mut(batch).expect("rows of a writing task");
                p.due = None;
                (
                    p.info.clone(),
                    std::mem::take(&mut p.rows),
                    std::mem::take(&mut p.replies),
                )
            };
            let written = write_rows(ctx, &info, batch, &rows).await;
            for reply in replies {
                // Nobody to tell: the message's task ended.
                reply
                    .send(written.as_ref().map(|_| ()).map_err(|e| e.to_string()))
                    .ok();
            }
        }
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
pub(super) async fn store_rows(
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
pub(crate) async fn notify_aggregator(ctx: &WorkerContext, batch_id: &str) {
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

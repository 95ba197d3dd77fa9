//! The call gate's side of one line: no call starts unless the gate just saw its batch running
//! and the line without a row; a line that waited asks again.

use std::time::{Duration, Instant};

use sluice_core::domain::{LineItem, now_millis};
use sluice_store::CallGate;

use super::gate_checks::FRESH;
use crate::WorkerContext;

/// A line that waited longer than this since the gate last let it through asks the gate again
/// before calling.
pub(super) const REGATE_AFTER: Duration = FRESH;

/// Asks the gate again for a line it let through earlier and that has waited since, for a call at
/// `call_at` (with the batch's other lines due about then): renews its in-flight mark if the batch
/// still runs and the line has no row; otherwise clears the mark (the batch's drain must not wait
/// for a line that will not call) and returns false.
pub(super) async fn regate(
    ctx: &WorkerContext,
    batch: &str,
    item: &LineItem<'_>,
    call_at: Instant,
) -> anyhow::Result<bool> {
    let gate = ctx
        .gate_checks
        .check(batch, item.line, tokio::time::Instant::from_std(call_at))
        .await?;
    if count_gate(ctx, gate) {
        return Ok(true);
    }
    ctx.store.end_call(batch, item.line).await?;
    Ok(false)
}

/// How long a line stays marked in flight (the aggregator waits that long for it when its batch
/// stops): one call and the longest hold before it.
pub(super) fn call_deadline(ctx: &WorkerContext) -> i64 {
    now_millis() + ctx.settings.worker.in_flight_for().as_millis() as i64
}

/// Whether the gate lets the line call; counts the lines it drops.
pub(super) fn count_gate(ctx: &WorkerContext, gate: CallGate) -> bool {
    let dropped = match gate {
        CallGate::Go => return true,
        CallGate::Duplicate => "duplicate",
        CallGate::Stopped => "skipped",
    };
    ctx.metrics.lines.with_label_values(&[dropped]).inc();
    false
}

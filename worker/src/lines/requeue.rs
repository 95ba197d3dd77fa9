//! Handing a line to a delay queue: a retry, a budget waiting for its reset, or a long fleet pause.

use std::time::Duration;

use sluice_core::domain::{LineItem, LinesMessage};
use sluice_core::keys::retry_tier;

use crate::WorkerContext;

/// Publishes a copy of the line to the delay queue whose TTL covers `delay`, and waits for the
/// broker's confirm: the caller may ack the original only after this returned `Ok`.
pub(super) async fn requeue(
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
            attempts,
            first_attempt_ms,
            ..item.clone()
        },
    );
    ctx.store.end_call(batch, item.line).await?;
    ctx.publisher
        .publish(&ctx.keys.retry_queue(tier), &serde_json::to_vec(&copy)?)
        .await?;
    Ok(())
}

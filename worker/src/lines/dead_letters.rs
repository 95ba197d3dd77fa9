//! The dead-letter consumer: a line that reached the delivery limit gets a `processing_failed`
//! row, so its batch still finishes.

use futures::StreamExt;
use sluice_core::domain::{LinesMessage, Row, Usage};
use tokio_util::sync::CancellationToken;

use super::delivery::{ack, split};
use super::rows::{notify_aggregator, store_rows};
use crate::WorkerContext;

/// Consumes dead-lettered line messages: each becomes a `processing_failed` row so its batch
/// still finishes.
pub(crate) async fn run(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let conn = sluice_broker::consumer::connect(&ctx.settings, "sluice-dlq").await?;
    let (channel, mut consumer) =
        sluice_broker::consumer::consume(&conn, &ctx.settings, &ctx.keys.items_dlq(), 16).await?;
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            d = consumer.next() => d,
        };
        let Some(delivery) = delivery else { break };
        let delivery = delivery?;
        let Ok(msg) = LinesMessage::decode(&delivery.data) else {
            tracing::error!("Dropping a malformed dead-lettered message.");
            ack(&delivery).await;
            continue;
        };
        if msg.lines.len() > 1 {
            // Only a single line is known to have reached the limit on its own: the lines of a
            // message of several go back to the work queue one by one.
            split(&ctx, &msg).await?;
            ack(&delivery).await;
            continue;
        }
        let item = &msg.lines[0];
        let message = format!(
            "This request could not be processed after {} delivery attempts.",
            ctx.settings.worker.delivery_limit
        );
        let rows = [(
            item.line,
            Row::error(&item.custom_id, "processing_failed", &message),
            Usage::default(),
        )];
        tracing::warn!(batch_id = %msg.batch_id, line = item.line, "Line reached the delivery limit.");
        ctx.metrics
            .lines
            .with_label_values(&["dead_lettered"])
            .inc();
        let written = store_rows(&ctx, &msg.batch_id, &rows).await?;
        if written.iter().any(|w| w.wants_finalize()) {
            notify_aggregator(&ctx, &msg.batch_id).await;
        }
        ack(&delivery).await;
    }
    drop(channel);
    drop(conn);
    Ok(())
}

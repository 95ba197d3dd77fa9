//! Acking a work-queue message, and splitting one of several lines into single-line messages.

use lapin::message::Delivery;
use lapin::options::BasicAckOptions;
use sluice_core::domain::LinesMessage;

use crate::WorkerContext;

/// Publishes each line of `msg` as a message of its own to the main work queue (confirmed), so
/// the caller may ack `msg`. Lines that already have rows are dropped by the gate when they come
/// back.
pub(super) async fn split(ctx: &WorkerContext, msg: &LinesMessage<'_>) -> anyhow::Result<()> {
    tracing::debug!(batch_id = %msg.batch_id, lines = msg.lines.len(), "Splitting a returned line message.");
    let queue = &ctx.keys.items_queue();
    let publishes = msg.lines.iter().map(|item| async move {
        let single = LinesMessage::single(&msg.batch_id, item.clone());
        ctx.publisher
            .publish(queue, &serde_json::to_vec(&single)?)
            .await?;
        anyhow::Ok(())
    });
    futures::future::try_join_all(publishes).await?;
    Ok(())
}

pub(super) async fn ack(delivery: &Delivery) {
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %e, "Could not ack a line; it will be redelivered and deduplicated.");
    }
}

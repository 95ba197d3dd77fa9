//! Samples the depth of the namespace's queues into `sluice_queue_messages`, so dashboards and
//! alerts see Sluice's own backlog without RabbitMQ's per-object metrics.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::WorkerContext;

/// How often the queues are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples until `shutdown`. A failed sample is skipped: the gauge keeps its last value and the
/// next tick tries again on a fresh channel.
pub(crate) async fn run(ctx: WorkerContext, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = sample(&ctx).await {
            tracing::debug!(error = %e, "Queue depth sample failed.");
        }
    }
}

async fn sample(ctx: &WorkerContext) -> anyhow::Result<()> {
    let channel = ctx.publisher.channel().await?;
    let prefix = format!("{}.", ctx.keys.namespace());
    for queue in ctx.keys.all_queues() {
        // Passive: reads the counts without creating or changing the queue.
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let label = queue.strip_prefix(&prefix).unwrap_or(&queue);
        ctx.metrics
            .queue_messages
            .with_label_values(&[label])
            .set(i64::from(declared.message_count()));
    }
    Ok(())
}

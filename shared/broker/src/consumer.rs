//! Consumer plumbing shared by the worker roles: connect, declare, consume, and reconnect forever.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use sluice_core::connect::within;
use sluice_core::{Keys, Settings};
use tokio_util::sync::CancellationToken;

/// Opens a channel on `conn` consuming `queue_name` with `prefetch` unacked deliveries at most.
/// Each step waits at most `dependencies.connect_timeout_ms`: a broker that stops answering fails
/// the connection (and its supervisor reconnects) instead of wedging it.
pub async fn consume(
    conn: &Connection,
    settings: &Settings,
    queue_name: &str,
    prefetch: u16,
) -> anyhow::Result<(Channel, Consumer)> {
    let timeout = settings.dependencies.connect_timeout();
    let channel = within("opening a channel", timeout, conn.create_channel()).await?;
    within(
        "the topology declaration",
        timeout,
        crate::declare_topology(
            &channel,
            &Keys::new(&settings.namespace),
            settings.worker.delivery_limit,
        ),
    )
    .await?;
    within(
        "setting the prefetch",
        timeout,
        channel.basic_qos(prefetch, BasicQosOptions::default()),
    )
    .await?;
    let tag = format!("{queue_name}-{}", uuid::Uuid::new_v4().simple());
    let consumer = within(
        "starting a consumer",
        timeout,
        channel.basic_consume(
            queue_name.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    Ok((channel, consumer))
}

/// A consumer connection of this role (heartbeats on, connect bounded: see
/// [`crate::connect_with`]).
pub async fn connect(settings: &Settings, connection_name: &str) -> anyhow::Result<Connection> {
    Ok(crate::connect_with(&settings.amqp_url, connection_name, &settings.dependencies).await?)
}

/// Consumes `queue_name` on a connection of its own (named `connection_name`) until `shutdown`,
/// running `handle` on every delivery as a task of its own; then waits for those tasks. A delivery
/// a task leaves unacked goes back to the queue when the channel closes.
pub async fn consume_each<H, Fut>(
    settings: &Settings,
    connection_name: &str,
    queue_name: &str,
    prefetch: u16,
    shutdown: &CancellationToken,
    handle: H,
) -> anyhow::Result<()>
where
    H: Fn(Delivery) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let conn = connect(settings, connection_name).await?;
    let (channel, mut consumer) = consume(&conn, settings, queue_name, prefetch).await?;
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            d = consumer.next() => d,
        };
        let Some(delivery) = delivery else { break };
        tracker.spawn(handle(delivery?));
    }
    tracker.close();
    tracker.wait().await;
    drop(channel);
    drop(conn);
    Ok(())
}

/// Runs `connection` (connect, consume until the connection ends) again after every failure
/// (broker restart, dropped connection) with capped backoff, until `shutdown` is cancelled and a
/// run ends cleanly.
pub async fn supervise<F, Fut>(name: &str, shutdown: CancellationToken, mut connection: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut backoff = Duration::from_millis(200);
    loop {
        match connection().await {
            Ok(()) if shutdown.is_cancelled() => return,
            Ok(()) => tracing::warn!(role = name, "Consumer ended; reconnecting."),
            Err(e) => tracing::warn!(role = name, error = %e, "Consumer failed; reconnecting."),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

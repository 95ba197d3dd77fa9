//! RabbitMQ: the queue topology of a namespace and a publisher with confirms.
//!
//! Every process declares the whole topology at start (declarations are idempotent), so no role
//! depends on another having started first.

use std::sync::Arc;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};
use tokio::sync::Mutex;

use crate::keys::{Keys, RETRY_TIERS_MS};

/// Errors talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("the broker refused a message (nack or unroutable)")]
    NotConfirmed,
}

type Result<T> = std::result::Result<T, QueueError>;

/// Largest AMQP frame asked for unless the URL names one (`?frame_max=`). lapin keeps send and
/// receive buffers of 32 frames per connection: RabbitMQ's default 128 KiB frame costs 8 MiB per
/// connection, this costs 2 MiB. Bigger messages travel as several frames.
const FRAME_MAX: u32 = 32 * 1024;

/// Opens a connection to the broker.
pub async fn connect(url: &str, name: &str) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    match url.parse::<lapin::uri::AMQPUri>() {
        Ok(mut uri) => {
            uri.query.frame_max.get_or_insert(FRAME_MAX);
            Ok(Connection::connect_uri(uri, props).await?)
        }
        // lapin reports what is wrong with the URL.
        Err(_) => Ok(Connection::connect(url, props).await?),
    }
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

/// Quorum-queue arguments that dead-letter to `exchange` with `routing_key`, at least once (the
/// broker keeps a message until the target queue confirms it), refusing publishes when full.
fn dead_lettering_args(exchange: &str, routing_key: &str) -> FieldTable {
    let mut args = quorum_args();
    for (key, value) in [
        ("x-dead-letter-exchange", exchange),
        ("x-dead-letter-routing-key", routing_key),
        ("x-dead-letter-strategy", "at-least-once"),
        ("x-overflow", "reject-publish"),
    ] {
        args.insert(key.into(), AMQPValue::LongString(value.into()));
    }
    args
}

/// Declares a durable direct exchange and binds `queue` to it under the queue's own name.
async fn declare_exchange_for(channel: &Channel, exchange: &str, queue: &str) -> Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Declares every exchange and queue of the namespace on `channel`.
///
/// Line messages live in a quorum queue with an explicit delivery limit (RabbitMQ 3.x has no
/// default) and at-least-once dead-lettering, so a poison line ends up in the DLQ, where it becomes
/// an error row instead of blocking its batch forever.
///
/// Delay queues: a line waiting to retry (or for the provider to accept calls again) waits in one
/// of these, not in a consumer slot. Each has a fixed TTL, so the head always expires first
/// (quorum queues expire only at the head), and dead-letters back to the work queue through the
/// requeue exchange.
pub async fn declare_topology(channel: &Channel, keys: &Keys, delivery_limit: u32) -> Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let (items, dlq) = (keys.items_queue(), keys.items_dlq());
    let limit = |mut args: FieldTable| {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(delivery_limit as i32),
        );
        args
    };
    channel
        .queue_declare(dlq.as_str().into(), durable, quorum_args())
        .await?;
    declare_exchange_for(channel, &keys.dead_letter_exchange(), &dlq).await?;
    for work in [&items, &keys.express_queue()] {
        channel
            .queue_declare(
                work.as_str().into(),
                durable,
                limit(dead_lettering_args(&keys.dead_letter_exchange(), &dlq)),
            )
            .await?;
    }
    channel
        .queue_declare(
            keys.control_queue().as_str().into(),
            durable,
            limit(quorum_args()),
        )
        .await?;
    channel
        .queue_declare(
            keys.finalize_queue().as_str().into(),
            durable,
            quorum_args(),
        )
        .await?;
    let requeue = keys.requeue_exchange();
    declare_exchange_for(channel, &requeue, &items).await?;
    for ms in RETRY_TIERS_MS {
        let mut args = dead_lettering_args(&requeue, &items);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(*ms as i64));
        channel
            .queue_declare(keys.retry_queue(*ms).as_str().into(), durable, args)
            .await?;
    }
    Ok(())
}

/// Deletes every queue of the namespace (tests clean up with it).
pub async fn delete_topology(channel: &Channel, keys: &Keys) -> Result<()> {
    for q in keys.all_queues() {
        channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in [keys.dead_letter_exchange(), keys.requeue_exchange()] {
        channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await?;
    }
    Ok(())
}

/// Publishes persistent messages with publisher confirms, reconnecting when the broker went away.
#[derive(Clone)]
pub struct Publisher {
    url: String,
    name: String,
    keys: Keys,
    delivery_limit: u32,
    inner: Arc<Mutex<Option<(Connection, Channel)>>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("name", &self.name)
            .finish()
    }
}

impl Publisher {
    /// Connects, declares the topology and enables confirms.
    pub async fn connect(url: &str, name: &str, keys: Keys, delivery_limit: u32) -> Result<Self> {
        let publisher = Self {
            url: url.to_owned(),
            name: name.to_owned(),
            keys,
            delivery_limit,
            inner: Arc::new(Mutex::new(None)),
        };
        publisher.channel().await?;
        Ok(publisher)
    }

    /// The confirm-mode channel, reopened if the connection dropped.
    pub async fn channel(&self) -> Result<Channel> {
        let mut guard = self.inner.lock().await;
        if let Some((conn, ch)) = guard.as_ref()
            && conn.status().connected()
            && ch.status().connected()
        {
            return Ok(ch.clone());
        }
        let conn = connect(&self.url, &self.name).await?;
        let ch = conn.create_channel().await?;
        declare_topology(&ch, &self.keys, self.delivery_limit).await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        *guard = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Whether the broker connection is up.
    pub async fn is_connected(&self) -> bool {
        let guard = self.inner.lock().await;
        guard
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected())
    }

    /// Sends one persistent message to `queue`; the returned future resolves when the broker confirms.
    /// Callers pipeline by holding many of these futures at once.
    pub async fn send(
        &self,
        channel: &Channel,
        queue: &str,
        payload: &[u8],
    ) -> Result<PublisherConfirm> {
        Ok(channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?)
    }

    /// Sends one persistent message and waits for its confirm.
    pub async fn publish(&self, queue: &str, payload: &[u8]) -> Result<()> {
        let channel = self.channel().await?;
        let confirm = self.send(&channel, queue, payload).await?;
        check_confirm(confirm.await?)
    }
}

/// Accepts only a positive confirm of a routed message.
pub fn check_confirm(confirmation: Confirmation) -> Result<()> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        _ => Err(QueueError::NotConfirmed),
    }
}

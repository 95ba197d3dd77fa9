//! RabbitMQ: the queue topology of a namespace and a publisher with confirms.
//!
//! Every process declares the whole topology at start (declarations are idempotent), so no role
//! depends on another having started first.

#![warn(missing_docs, unreachable_pub)]

pub mod consumer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use lapin::{Confirmation, PublisherConfirm};
use tokio::sync::Mutex;

use sluice_core::config::DependencySettings;
use sluice_core::connect::{ConnectError, redact, within};
use sluice_core::keys::{Keys, RETRY_TIERS_MS, WEBHOOK_TIERS_MS};

/// Errors talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("amqp: {0}")]
    /// The AMQP client failed.
    Amqp(#[from] lapin::Error),
    #[error("the broker refused a message (nack or unroutable)")]
    /// The broker did not take the message.
    NotConfirmed,
    /// The broker could not be reached, or stopped answering while connecting.
    #[error("the broker {0}")]
    Connect(#[from] ConnectError),
    /// The broker took a message but did not confirm it in time (it may still hold it).
    #[error("the broker did not confirm a publish within {0:?}")]
    ConfirmTimeout(Duration),
}

type Result<T> = std::result::Result<T, QueueError>;

/// Largest AMQP frame asked for unless the URL names one (`?frame_max=`). lapin keeps send and
/// receive buffers of 32 frames per connection: RabbitMQ's default 128 KiB frame costs 8 MiB per
/// connection, this costs 2 MiB. Bigger messages travel as several frames.
const FRAME_MAX: u32 = 32 * 1024;

/// Set once a connection attempt found the broker silent: later attempts first check that it
/// answers the protocol header on a connection of their own. lapin's I/O thread of an attempt
/// abandoned mid-handshake lives until the peer answers or closes, so against a stalled broker
/// this bounds the cost to one such thread instead of one per retry.
static BROKER_SUSPECT: AtomicBool = AtomicBool::new(false);

/// Opens a connection to the broker with the default timeouts (tests and tools).
pub async fn connect(url: &str, name: &str) -> Result<Connection> {
    connect_with(url, name, &DependencySettings::default()).await
}

/// Opens a connection to the broker: TCP connect and AMQP handshake within
/// `dependencies.connect_timeout_ms`, heartbeats at `dependencies.amqp_heartbeat_secs` (a URL's
/// own `?heartbeat=` wins).
pub async fn connect_with(url: &str, name: &str, deps: &DependencySettings) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    let timeout = deps.connect_timeout();
    let mut uri = match url.parse::<lapin::uri::AMQPUri>() {
        Ok(uri) => uri,
        // lapin reports what is wrong with the URL.
        Err(_) => return Ok(Connection::connect(url, props).await?),
    };
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    if deps.amqp_heartbeat_secs > 0 {
        uri.query.heartbeat.get_or_insert(deps.amqp_heartbeat_secs);
    }
    uri.query
        .connection_timeout
        .get_or_insert(timeout.as_millis() as u64);
    if BROKER_SUSPECT.load(Ordering::Relaxed) && uri.scheme == lapin::uri::AMQPScheme::AMQP {
        let host = &uri.authority.host;
        let addr = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{}", uri.authority.port)
        } else {
            format!("{host}:{}", uri.authority.port)
        };
        answers_protocol_header(&addr, timeout).await?;
    }
    match within(
        "the AMQP handshake",
        timeout,
        Connection::connect_uri(uri, props),
    )
    .await
    {
        Ok(conn) => {
            BROKER_SUSPECT.store(false, Ordering::Relaxed);
            Ok(conn)
        }
        Err(e) => {
            if matches!(e, ConnectError::Stalled { .. }) {
                BROKER_SUSPECT.store(true, Ordering::Relaxed);
            }
            Err(e.into())
        }
    }
}

/// Sends the AMQP 0-9-1 protocol header and waits for the first byte of the broker's answer.
async fn answers_protocol_header(addr: &str, timeout: Duration) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stage = "the AMQP handshake";
    let mut stream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(ConnectError::from_error("the TCP connect", &e).into()),
        Err(_) => {
            return Err(ConnectError::Stalled {
                stage: "the TCP connect",
                after: timeout,
            }
            .into());
        }
    };
    let exchange = async {
        stream.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut first = [0u8; 1];
        stream.read(&mut first).await
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err(ConnectError::Failed {
            stage,
            error: "the peer closed the connection".into(),
        }
        .into()),
        Ok(Err(e)) => Err(ConnectError::from_error(stage, &e).into()),
        Err(_) => Err(ConnectError::Stalled {
            stage,
            after: timeout,
        }
        .into()),
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
    let retry: Vec<_> = RETRY_TIERS_MS
        .iter()
        .map(|ms| (*ms, keys.retry_queue(*ms)))
        .collect();
    declare_delay_queues(channel, &retry, &requeue, &items).await?;
    declare_webhook_queues(channel, keys).await
}

/// Delay queues `(ttl ms, name)` whose messages expire into `exchange`, which routes them to
/// `target`.
async fn declare_delay_queues(
    channel: &Channel,
    queues: &[(u64, String)],
    exchange: &str,
    target: &str,
) -> Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    for (ms, name) in queues {
        let mut args = dead_lettering_args(exchange, target);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(*ms as i64));
        channel
            .queue_declare(name.as_str().into(), durable, args)
            .await?;
    }
    Ok(())
}

/// The webhooks queue, its delay queues (their own: a delay queue's dead-letter target is fixed
/// when it is declared, and the line delay queues lead to the work queue) and its dead letters.
async fn declare_webhook_queues(channel: &Channel, keys: &Keys) -> Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let jobs = keys.webhooks_queue();
    for queue in [&jobs, &keys.webhooks_dlq()] {
        channel
            .queue_declare(queue.as_str().into(), durable, quorum_args())
            .await?;
    }
    let requeue = keys.webhooks_requeue_exchange();
    declare_exchange_for(channel, &requeue, &jobs).await?;
    let retry: Vec<_> = WEBHOOK_TIERS_MS
        .iter()
        .map(|ms| (*ms, keys.webhooks_retry_queue(*ms)))
        .collect();
    declare_delay_queues(channel, &retry, &requeue, &jobs).await
}

/// Deletes every queue of the namespace (tests clean up with it).
pub async fn delete_topology(channel: &Channel, keys: &Keys) -> Result<()> {
    for q in keys.all_queues() {
        channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await?;
    }
    for exchange in [
        keys.dead_letter_exchange(),
        keys.requeue_exchange(),
        keys.webhooks_requeue_exchange(),
    ] {
        channel
            .exchange_delete(exchange.as_str().into(), Default::default())
            .await?;
    }
    Ok(())
}

/// Publishes persistent messages with publisher confirms, reconnecting when the broker went away.
/// Every step that waits on the broker is bounded (`dependencies.*`): a stalled broker fails a
/// publish in time instead of wedging its caller.
#[derive(Clone)]
pub struct Publisher {
    url: String,
    name: String,
    keys: Keys,
    delivery_limit: u32,
    deps: DependencySettings,
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
    /// A publisher that connects on first use.
    pub fn new(
        url: &str,
        name: &str,
        keys: Keys,
        delivery_limit: u32,
        deps: &DependencySettings,
    ) -> Self {
        Self {
            url: url.to_owned(),
            name: name.to_owned(),
            keys,
            delivery_limit,
            deps: deps.clone(),
            inner: Arc::new(Mutex::new(None)),
        }
    }

    /// Connects, declares the topology and enables confirms (default timeouts).
    pub async fn connect(url: &str, name: &str, keys: Keys, delivery_limit: u32) -> Result<Self> {
        let publisher = Self::new(
            url,
            name,
            keys,
            delivery_limit,
            &DependencySettings::default(),
        );
        publisher.channel().await?;
        Ok(publisher)
    }

    /// The broker URL without credentials.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
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
        let (conn, ch) = self.open().await?;
        *guard = Some((conn, ch.clone()));
        Ok(ch)
    }

    /// Opens a fresh connection now, replacing the current one (start-up attempts).
    pub async fn reconnect(&self) -> std::result::Result<Channel, ConnectError> {
        let mut guard = self.inner.lock().await;
        let stale = guard.take();
        let opened = self.open().await;
        if let Some((conn, _)) = stale {
            close_in_background(conn);
        }
        let (conn, ch) = opened.map_err(|e| match e {
            QueueError::Connect(e) => e,
            other => ConnectError::Failed {
                stage: "connecting",
                error: other.to_string(),
            },
        })?;
        *guard = Some((conn, ch.clone()));
        Ok(ch)
    }

    async fn open(&self) -> Result<(Connection, Channel)> {
        let timeout = self.deps.connect_timeout();
        let conn = connect_with(&self.url, &self.name, &self.deps).await?;
        let setup = async {
            let ch = within("opening a channel", timeout, conn.create_channel()).await?;
            within(
                "the topology declaration",
                timeout,
                declare_topology(&ch, &self.keys, self.delivery_limit),
            )
            .await?;
            within(
                "enabling confirms",
                timeout,
                ch.confirm_select(ConfirmSelectOptions::default()),
            )
            .await?;
            Ok::<_, QueueError>(ch)
        };
        match setup.await {
            Ok(ch) => Ok((conn, ch)),
            Err(e) => {
                close_in_background(conn);
                Err(e)
            }
        }
    }

    /// Drops the current connection, so the next use opens a fresh one (after a confirm that
    /// never came: the old connection may be wedged until heartbeats notice).
    pub async fn invalidate(&self) {
        if let Some((conn, _)) = self.inner.lock().await.take() {
            close_in_background(conn);
        }
    }

    /// Whether the broker connection is up.
    pub async fn is_connected(&self) -> bool {
        let guard = self.inner.lock().await;
        guard
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected())
    }

    /// A round trip to the broker within `timeout` (a passive declare of the control queue):
    /// unlike the connection status, it notices a broker that stopped answering at once.
    pub async fn probe(&self, timeout: Duration) -> std::result::Result<(), ConnectError> {
        let queue = self.keys.control_queue();
        let round_trip = async {
            let channel = self.channel().await.map_err(|e| match e {
                QueueError::Connect(e) => e,
                other => ConnectError::Failed {
                    stage: "connecting",
                    error: other.to_string(),
                },
            })?;
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| ConnectError::from_error("a passive declare", &e))?;
            Ok(())
        };
        match tokio::time::timeout(timeout, round_trip).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Stalled {
                stage: "a passive declare",
                after: timeout,
            }),
        }
    }

    /// Sends one persistent message to `queue`; the returned future resolves when the broker confirms.
    /// Callers pipeline by holding many of these futures at once, and bound their wait with
    /// [`Publisher::confirm_timeout`]. The send itself fails after that long too (a broker that
    /// stopped reading leaves the socket full).
    pub async fn send(
        &self,
        channel: &Channel,
        queue: &str,
        payload: &[u8],
    ) -> Result<PublisherConfirm> {
        let timeout = self.confirm_timeout();
        let publish = channel.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            payload,
            BasicProperties::default().with_delivery_mode(2),
        );
        match tokio::time::timeout(timeout, publish).await {
            Ok(sent) => Ok(sent?),
            Err(_) => {
                self.invalidate().await;
                Err(QueueError::ConfirmTimeout(timeout))
            }
        }
    }

    /// Longest wait for one confirm (`dependencies.publish_confirm_timeout_ms`).
    pub fn confirm_timeout(&self) -> Duration {
        self.deps.publish_confirm_timeout()
    }

    /// Sends one persistent message and waits for its confirm, at most
    /// [`Publisher::confirm_timeout`]; past it the connection is reopened on next use.
    pub async fn publish(&self, queue: &str, payload: &[u8]) -> Result<()> {
        let channel = self.channel().await?;
        let confirm = self.send(&channel, queue, payload).await?;
        match tokio::time::timeout(self.confirm_timeout(), confirm).await {
            Ok(confirmation) => check_confirm(confirmation?),
            Err(_) => {
                self.invalidate().await;
                Err(QueueError::ConfirmTimeout(self.confirm_timeout()))
            }
        }
    }
}

/// Closes `conn` without waiting: a stalled broker never answers the close, and heartbeats end
/// the connection anyway.
fn close_in_background(conn: Connection) {
    tokio::spawn(async move {
        let close = conn.close(200, "replaced".into());
        tokio::time::timeout(Duration::from_secs(5), close)
            .await
            .ok();
    });
}

/// Accepts only a positive confirm of a routed message.
pub fn check_confirm(confirmation: Confirmation) -> Result<()> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        _ => Err(QueueError::NotConfirmed),
    }
}

//! Webhooks: signed batch events (`batch.completed`, `batch.failed`, `batch.expired`,
//! `batch.cancelled`) sent to the endpoints a tenant configures, at least once.
//!
//! **Announcing.** Before a terminal status is written, [`announce`] publishes one job per
//! endpoint of the batch's tenant and waits for the broker's confirms; a failed publish fails
//! the step, so the status is not written and the step is retried (a finalize by the sweep, a
//! failed validation by its requeued control message).
//! Once the status is in Redis its jobs are therefore already in the broker, and a process that
//! dies right after the status write loses no event. A process that dies between the publish and
//! the status write leaves jobs announcing a status not yet written: delivery waits until the
//! batch shows it (the retried step announces again, with the same event id), and drops jobs whose
//! batch ended with another status.
//!
//! **Delivery** (in the aggregator role): each attempt is signed afresh (Standard Webhooks:
//! `webhook-id`, `webhook-timestamp`, `webhook-signature`) and bounded by `webhooks.timeout_ms`.
//! A failed attempt goes to a webhook delay queue with capped exponential backoff and jitter,
//! until `webhooks.max_elapsed_secs` from the announcement; then the job is dead-lettered
//! (`<ns>.webhooks.dlq`) and counted. The job is acked only after its next step is confirmed by
//! the broker (or recorded in Redis, once delivered).

mod ssrf;

use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use sluice_core::config::{WebhookEndpoint, WebhookSettings};
use sluice_core::domain::{BatchStatus, now_millis, now_secs};
use sluice_core::keys::WEBHOOK_TIERS_MS;
use sluice_core::webhooks::{WebhookJob, endpoint_tag, event_id, event_type, sign, signing_key};
use tokio_util::sync::CancellationToken;

use crate::WorkerContext;
pub(crate) use ssrf::{GuardedResolver, PrivateAddress, is_public};

/// Publishes, with confirms, one job per webhook endpoint of `tenant` announcing that `batch_id`
/// reaches `status`. Call it before writing the status: see the module documentation.
pub(crate) async fn announce(
    ctx: &WorkerContext,
    batch_id: &str,
    tenant: &str,
    status: BatchStatus,
) -> anyhow::Result<()> {
    let endpoints = ctx.settings.webhooks_of(tenant);
    let Some(kind) = event_type(status) else {
        return Ok(());
    };
    let queue = ctx.keys.webhooks_queue();
    let now = now_millis();
    for endpoint in endpoints {
        let job = WebhookJob {
            event_id: event_id(batch_id, kind),
            event_type: kind.to_owned(),
            batch_id: batch_id.to_owned(),
            tenant: tenant.to_owned(),
            url: endpoint.url.clone(),
            created_at: now / 1000,
            raised_at_ms: now,
            attempts: 0,
            waits: 0,
            due_at_ms: 0,
        };
        ctx.publisher
            .publish(&queue, &serde_json::to_vec(&job)?)
            .await?;
    }
    Ok(())
}

/// Runs the delivery consumer until `shutdown`.
pub(crate) async fn run(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let sender = Sender::new(&ctx.settings.webhooks)?;
    sluice_broker::consumer::supervise("webhooks", shutdown.clone(), move || {
        consume(ctx.clone(), sender.clone(), shutdown.clone())
    })
    .await;
    Ok(())
}

async fn consume(
    ctx: WorkerContext,
    sender: Sender,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let queue = ctx.keys.webhooks_queue();
    sluice_broker::consumer::consume_each(
        &ctx.settings,
        "sluice-webhooks",
        &queue,
        ctx.settings.webhooks.concurrency,
        &shutdown,
        |delivery| {
            let (ctx, sender) = (ctx.clone(), sender.clone());
            async move {
                match handle(&ctx, &sender, &delivery.data).await {
                    Ok(()) => {
                        if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                            tracing::debug!(error = %e, "Could not ack a webhook job.");
                        }
                    }
                    Err(e) => {
                        // Redis or the broker failed: the job goes back and is tried again,
                        // after a pause so that an outage does not spin.
                        tracing::warn!(error = %e, "Webhook job failed; requeueing it.");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        let requeue = BasicNackOptions {
                            requeue: true,
                            ..Default::default()
                        };
                        delivery.nack(requeue).await.ok();
                    }
                }
            }
        },
    )
    .await
}

fn count(ctx: &WorkerContext, outcome: &str) {
    ctx.metrics
        .webhook_deliveries
        .with_label_values(&[outcome])
        .inc();
}

/// One job: wait if it is not due, check that its endpoint and event still stand, send it, and
/// schedule what comes next.
async fn handle(ctx: &WorkerContext, sender: &Sender, data: &[u8]) -> anyhow::Result<()> {
    let Ok(mut job) = serde_json::from_slice::<WebhookJob>(data) else {
        tracing::warn!("Dropped a webhook job that does not parse.");
        count(ctx, "dropped");
        return Ok(());
    };
    let now = now_millis();
    if job.due_at_ms > now {
        return park(ctx, &job, (job.due_at_ms - now) as u64).await;
    }
    let Some(endpoint) = ctx
        .settings
        .webhooks_of(&job.tenant)
        .iter()
        .find(|e| e.url == job.url)
    else {
        tracing::info!(batch_id = %job.batch_id, event_id = %job.event_id, "Dropped a webhook event: its endpoint is no longer configured.");
        count(ctx, "dropped");
        return Ok(());
    };
    let tag = endpoint_tag(&job.url);
    if ctx.store.webhook_delivered(&job.event_id, &tag).await? {
        return Ok(()); // another announcement of the event got there
    }
    let status = match ctx.store.get_batch(&job.batch_id).await? {
        Some(meta) => meta.status,
        None => {
            count(ctx, "dropped");
            return Ok(());
        }
    };
    match status {
        Some(s) if s.is_terminal() => {
            if event_type(s) != Some(job.event_type.as_str()) {
                // Announced by a step that then lost to another ending; that one announced too.
                count(ctx, "dropped");
                return Ok(());
            }
        }
        _ => {
            // Announced, status not written yet (or never, if that step died).
            let wait = 250u64 << job.waits.min(7);
            job.waits += 1;
            if out_of_time(ctx, &job, now, wait) {
                return dead_letter(ctx, &job, "the batch never showed the announced status").await;
            }
            job.due_at_ms = now + wait as i64;
            return park(ctx, &job, wait).await;
        }
    }
    let host = host_of(&job.url);
    match sender.send(endpoint, &job).await {
        Ok(()) => {
            count(ctx, "delivered");
            let keep = (ctx.settings.webhooks.max_elapsed_secs * 2).max(86_400);
            ctx.store
                .mark_webhook_delivered(&job.event_id, &tag, keep)
                .await?;
            tracing::info!(batch_id = %job.batch_id, event_id = %job.event_id, event = %job.event_type, host, attempt = job.attempts + 1, "Webhook delivered.");
            Ok(())
        }
        Err(SendError::Refused(reason)) => {
            count(ctx, "refused");
            tracing::warn!(batch_id = %job.batch_id, event_id = %job.event_id, host, reason, "Webhook refused: the endpoint may not be called.");
            dead_letter(ctx, &job, reason).await
        }
        Err(SendError::Failed(reason)) => {
            count(ctx, "failed");
            job.attempts += 1;
            let wait = backoff(&ctx.settings.webhooks, job.attempts);
            if out_of_time(ctx, &job, now, wait) {
                tracing::warn!(batch_id = %job.batch_id, event_id = %job.event_id, host, attempt = job.attempts, reason = %reason, "Webhook delivery failed; out of retries.");
                return dead_letter(ctx, &job, "out of retries").await;
            }
            tracing::warn!(batch_id = %job.batch_id, event_id = %job.event_id, host, attempt = job.attempts, reason = %reason, retry_in_ms = wait, "Webhook delivery failed; retrying.");
            job.due_at_ms = now + wait as i64;
            park(ctx, &job, wait).await
        }
    }
}

/// Whether waiting `wait` ms more would take the job past its retry budget.
fn out_of_time(ctx: &WorkerContext, job: &WebhookJob, now: i64, wait: u64) -> bool {
    let budget = ctx.settings.webhooks.max_elapsed_secs as i64 * 1000;
    now + wait as i64 - job.raised_at_ms > budget
}

/// The wait before attempt `attempts + 1`: doubling from `backoff_base_ms`, capped, with jitter
/// (half to all of it), so endpoints coming back are not hit by every job at once.
fn backoff(settings: &WebhookSettings, attempts: u32) -> u64 {
    let exp = settings
        .backoff_base_ms
        .saturating_mul(1u64 << attempts.saturating_sub(1).min(30))
        .min(settings.backoff_max_ms);
    (exp as f64 * rand::random_range(0.5..=1.0)) as u64
}

/// Puts `job` in the delay queue of the largest tier not above `wait` (the smallest for a shorter
/// wait); back before it is due, it is parked again for the rest.
async fn park(ctx: &WorkerContext, job: &WebhookJob, wait: u64) -> anyhow::Result<()> {
    let tier = delay_tier(wait);
    ctx.publisher
        .publish(
            &ctx.keys.webhooks_retry_queue(tier),
            &serde_json::to_vec(job)?,
        )
        .await?;
    Ok(())
}

fn delay_tier(wait: u64) -> u64 {
    WEBHOOK_TIERS_MS
        .iter()
        .copied()
        .rev()
        .find(|t| *t <= wait)
        .unwrap_or(WEBHOOK_TIERS_MS[0])
}

async fn dead_letter(ctx: &WorkerContext, job: &WebhookJob, reason: &str) -> anyhow::Result<()> {
    ctx.publisher
        .publish(&ctx.keys.webhooks_dlq(), &serde_json::to_vec(job)?)
        .await?;
    count(ctx, "dead_lettered");
    tracing::warn!(batch_id = %job.batch_id, event_id = %job.event_id, host = host_of(&job.url), attempts = job.attempts, reason, "Webhook event dead-lettered.");
    Ok(())
}

/// The host of an endpoint URL, for logs: its path and query may hold a token.
fn host_of(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Why an attempt did not deliver.
#[derive(Debug)]
enum SendError {
    /// The endpoint may not be called (a non-public address): retrying cannot help.
    Refused(&'static str),
    /// A status other than 2xx, a timeout or a transport failure: worth retrying.
    Failed(String),
}

/// The HTTP client of deliveries: no redirects, no proxy from the environment, timeouts, and
/// only public addresses unless `webhooks.allow_private`.
#[derive(Debug, Clone)]
struct Sender {
    client: reqwest::Client,
    allow_private: bool,
}

impl Sender {
    fn new(settings: &WebhookSettings) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .timeout(Duration::from_millis(settings.timeout_ms))
            .dns_resolver(GuardedResolver {
                allow_private: settings.allow_private,
            })
            .user_agent("Sluice-Webhooks")
            .build()?;
        Ok(Self {
            client,
            allow_private: settings.allow_private,
        })
    }

    async fn send(&self, endpoint: &WebhookEndpoint, job: &WebhookJob) -> Result<(), SendError> {
        let url = reqwest::Url::parse(&endpoint.url)
            .map_err(|_| SendError::Refused("the endpoint URL does not parse"))?;
        // An address literal is connected to without a lookup, so the resolver never sees it.
        let literal = url
            .host_str()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|h| h.parse::<std::net::IpAddr>().ok());
        if !self.allow_private && literal.is_some_and(|ip| !is_public(ip)) {
            return Err(SendError::Refused("a non-public address"));
        }
        let key = signing_key(&endpoint.secret.0).ok_or(SendError::Refused(
            "the endpoint's secret is not a whsec_ key",
        ))?;
        let body = job.body();
        let timestamp = now_secs();
        let signature = sign(&key, &job.event_id, timestamp, &body);
        let sent = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &job.event_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(resp) if resp.status().is_success() => Ok(()),
            Ok(resp) => Err(SendError::Failed(format!(
                "HTTP {}",
                resp.status().as_u16()
            ))),
            Err(e) if refused_address(&e) => Err(SendError::Refused("a non-public address")),
            // The error's text names the URL: only its kind is reported.
            Err(e) if e.is_timeout() => Err(SendError::Failed("timeout".into())),
            Err(e) if e.is_connect() => Err(SendError::Failed("connect".into())),
            Err(_) => Err(SendError::Failed("transport".into())),
        }
    }
}

/// Whether the guarded resolver refused the endpoint's addresses somewhere down `e`'s causes.
fn refused_address(e: &reqwest::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.downcast_ref::<PrivateAddress>().is_some() {
            return true;
        }
        cause = c.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::config::Secret;

    fn job(url: &str) -> WebhookJob {
        WebhookJob {
            event_id: "evt_1".into(),
            event_type: "batch.completed".into(),
            batch_id: "batch_1".into(),
            tenant: "t".into(),
            url: url.into(),
            created_at: 1,
            raised_at_ms: 1_000,
            attempts: 0,
            waits: 0,
            due_at_ms: 0,
        }
    }

    #[tokio::test]
    async fn loopback_endpoints_are_refused_by_name_and_by_address() {
        let sender = Sender::new(&WebhookSettings::default()).unwrap();
        for url in [
            "http://localhost:9/hook",
            "http://127.0.0.1:9/hook",
            "http://[::1]:9/hook",
            "http://169.254.169.254/latest",
        ] {
            let endpoint = WebhookEndpoint {
                url: url.into(),
                secret: Secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            };
            let outcome = sender.send(&endpoint, &job(url)).await;
            assert!(
                matches!(outcome, Err(SendError::Refused(_))),
                "{url}: {outcome:?}"
            );
        }
    }

    #[test]
    fn a_wait_is_parked_in_the_largest_tier_not_above_it() {
        for (wait, tier) in [
            (10, 1_000),
            (1_000, 1_000),
            (29_999, 1_000),
            (40_000, 30_000),
            (3_600_000, 300_000),
        ] {
            assert_eq!(delay_tier(wait), tier, "{wait}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let s = WebhookSettings {
            backoff_base_ms: 1_000,
            backoff_max_ms: 10_000,
            ..WebhookSettings::default()
        };
        for (attempts, full) in [
            (1, 1_000),
            (2, 2_000),
            (4, 8_000),
            (5, 10_000),
            (40, 10_000),
        ] {
            let wait = backoff(&s, attempts);
            assert!(wait >= full / 2 && wait <= full, "{attempts}: {wait}");
        }
    }
}

//! The dispatcher's side of scheduling: each round of a batch's dispatch sizes its window. A batch
//! of a rate-limited provider (not one small enough for the express queue) publishes its entry in
//! the provider's registry and takes the window the fleet-wide plan gives it
//! ([`sluice_store::schedule`]); any other batch keeps the per-batch window.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use sluice_core::domain::{Batch, BatchStatus, now_millis, now_secs};
use sluice_core::schedule::{self, Dither, Entry, Priority, Shape, ShareCorrection};
use sluice_store::schedule_registry;

use crate::WorkerContext;

/// How often a batch whose lines are all enqueued refreshes its entry.
const HOLD_EVERY: Duration = Duration::from_millis(200);

/// The lines a batch may have dispatched and unfinished.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// Most lines of the batch dispatched and not finished.
    pub(crate) lines: u64,
    /// Top up as soon as any line of the window is free, not only once half of it is: a
    /// scheduled window is the batch's share, and a half-empty one would give it less.
    pub(crate) eager: bool,
    /// Lines per work-queue message (`WorkerSettings::lines_per_message_for`).
    pub(crate) per_message: usize,
}

/// One batch's dispatch across its rounds: its measured throughput and where it is registered.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    last: Option<(u64, Instant)>,
    /// Lines per second, smoothed.
    rate: f64,
    /// The provider whose registry holds this batch's entry.
    registered: Option<String>,
    /// Keeps the tenant's measured share of a contended provider at the one its weight gives.
    correction: ShareCorrection,
    dither: Dither,
}

impl Tracker {
    /// The window of this round: the scheduled one on a rate-limited provider, else
    /// `worker.batch_window` lines or `worker.batch_window_secs` of the batch's own throughput,
    /// whichever is more (a fast batch is never starved by its own window, while a slow one
    /// keeps few lines ahead of other batches).
    pub(crate) async fn window(
        &mut self,
        ctx: &WorkerContext,
        batch_id: &str,
        meta: &Batch,
    ) -> Window {
        let w = &ctx.settings.worker;
        self.observe(meta.done());
        let own = ((self.rate * w.batch_window_secs as f64) as u64).max(w.batch_window);
        let limited = limited_provider(ctx, meta);
        let per_message = w.lines_per_message_for(limited.is_some());
        let express = meta.total().is_none_or(|total| total <= w.express_lines);
        let Some((provider, rpm)) = limited.filter(|_| !express) else {
            return Window {
                lines: own,
                eager: false,
                per_message,
            };
        };
        let lines = self.scheduled(ctx, batch_id, meta, &provider, rpm).await;
        Window {
            lines,
            eager: true,
            per_message,
        }
    }

    async fn scheduled(
        &mut self,
        ctx: &WorkerContext,
        batch_id: &str,
        meta: &Batch,
        provider: &str,
        rpm: Option<u64>,
    ) -> u64 {
        let w = &ctx.settings.worker;
        let entry = Entry {
            tenant: meta.tenant.clone(),
            priority: meta.priority.unwrap_or(Priority::Normal),
            expires_at: meta.expires_at.unwrap_or(i64::MAX / 2),
            remaining: meta.total().unwrap_or(0).saturating_sub(meta.done()),
            inflight: (meta.dispatched.unwrap_or(0).max(0) as u64).saturating_sub(meta.done()),
            rate: self.rate,
            seen_ms: now_millis(),
        };
        let entries = match schedule_registry::publish_entry(&ctx.store, provider, batch_id, &entry)
            .await
        {
            Ok(entries) => entries,
            Err(e) => {
                // A round without the registry keeps the window small rather than flooding the
                // queue ahead of batches that may be more urgent.
                tracing::warn!(%batch_id, error = %e, "Could not read the schedule; using the smallest window.");
                return 1;
            }
        };
        self.registered = Some(provider.to_owned());
        let limit = rpm.map(|r| r as f64 / 60.0);
        let rate = schedule::provider_rate(&entries, limit);
        // What the provider can take: its rpm, else a margin over what it does now, so the
        // windows can grow when it speeds up.
        let capacity = limit.unwrap_or(rate * 1.5);
        let total = (capacity * (w.batch_window_secs as f64 + mean_latency(ctx))).ceil() as u64;
        let shape = Shape {
            total: total.max(1),
            rate,
            min_share: w.min_batch_share,
            now: now_secs(),
        };
        let plan = schedule::plan(&entries, shape, |t| ctx.settings.tenant_weight(t));
        ctx.metrics
            .batch_at_risk
            .with_label_values(&[provider])
            .set(plan.at_risk.len() as i64);
        let Some(exact) = plan.exact.get(batch_id).copied() else {
            return 1;
        };
        // `contended` is empty unless every tenant's window holds it back; then each tenant's
        // share of the calls follows its share of the lines waiting, whether the provider's limit
        // or the workers' pace sets the rate, and the correction applies.
        if let (Some(target), Some(measured)) = (
            plan.contended.get(&entry.tenant),
            schedule::measured_fractions(&entries),
        ) {
            self.correction
                .update(*target, measured.get(&entry.tenant).copied().unwrap_or(0.0));
        }
        self.dither.lines(exact * self.correction.factor())
    }

    /// Keeps a scheduled batch whose lines are all enqueued in its provider's registry until they
    /// are done (or it stops): its lines still wait in the queue, and a batch that left at once
    /// would hand its share to its tenant's next batch while they do, so the tenant would get
    /// more than its share at every change of batch.
    pub(crate) async fn hold_while_lines_wait(
        &mut self,
        ctx: &WorkerContext,
        batch_id: &str,
        shutdown: &CancellationToken,
    ) {
        while self.registered.is_some() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(HOLD_EVERY) => {}
            }
            let meta = match ctx.store.get_batch(batch_id).await {
                Ok(Some(meta)) => meta,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(%batch_id, error = %e, "Could not read a batch; leaving the schedule.");
                    return;
                }
            };
            let running = meta.status == Some(BatchStatus::InProgress) && meta.stopping.is_none();
            if !running || meta.done() >= meta.total().unwrap_or(0) {
                return;
            }
            self.window(ctx, batch_id, &meta).await;
        }
    }

    /// Takes the batch out of its provider's registry (its lines are all done, or it
    /// stopped), so its share goes to the others at once rather than when its entry goes stale.
    pub(crate) async fn leave(&mut self, ctx: &WorkerContext, batch_id: &str) {
        if let Some(provider) = self.registered.take()
            && let Err(e) = schedule_registry::remove_entry(&ctx.store, &provider, batch_id).await
        {
            tracing::debug!(%batch_id, error = %e, "Could not leave the schedule; the entry goes stale.");
        }
    }

    fn observe(&mut self, done: u64) {
        if let Some((before, at)) = self.last {
            let secs = at.elapsed().as_secs_f64();
            if secs < 0.1 {
                return;
            }
            let now_rate = done.saturating_sub(before) as f64 / secs;
            self.rate = if self.rate == 0.0 {
                now_rate
            } else {
                0.7 * self.rate + 0.3 * now_rate
            };
        }
        self.last = Some((done, Instant::now()));
    }
}

/// The limited provider (and its rpm) a batch's model goes to; `None` when that provider has no
/// rate or concurrency limit (nothing to share). Batches of the express queue are not scheduled
/// even on a limited provider.
fn limited_provider(ctx: &WorkerContext, meta: &Batch) -> Option<(String, Option<u64>)> {
    let model = meta.model.as_deref().unwrap_or_default();
    let endpoint = meta.endpoint.as_deref().unwrap_or_default();
    let (_, provider) = ctx.upstream.provider_of(model, endpoint)?;
    provider
        .pacing
        .is_limited()
        .then(|| (provider.name.clone(), provider.pacing.rpm))
}

/// Mean upstream call time of this process's successful calls, in seconds: lines spend it in
/// flight, so the windows must hold that much of the rate on top of the queued part.
fn mean_latency(ctx: &WorkerContext) -> f64 {
    let h = ctx.metrics.upstream_latency.with_label_values(&["2xx"]);
    let count = h.get_sample_count();
    if count == 0 {
        0.0
    } else {
        h.get_sample_sum() / count as f64
    }
}

//! Sluice's back-end roles, in pipeline order:
//!
//! 1. `dispatch`: validates a batch's input file and enqueues its lines, several per message,
//!    one fair window at a time.
//! 2. `lines`: runs each line of a work-queue message: the call gate, the tenant budget, the
//!    fleet limiter, the call, and its row; dead-lettered lines get an error row.
//! 3. `pacing`: this process's side of the fleet-wide limiter and of the batch schedule, which
//!    both the dispatcher and the line worker consult.
//! 4. [`upstream`]: the HTTP client, the one retry policy, and the task models run through a
//!    backing model.
//! 5. [`aggregate`]: rows into result files and terminal statuses; the sweeps that expire,
//!    recover, compact and finally remove batches and files.
//! 6. `webhooks`: batch events, announced by the dispatcher and the aggregator, delivered signed
//!    and at least once.
//!
//! Beside the stages: `lease` (a renewed Redis lease, held on a batch by the dispatcher and the
//! aggregator alike, so it belongs to neither) and `queue_depth` (the queues' backlog as a metric).
//! `webhooks` is a folder of its own rather than a background task of the aggregator because two
//! stages announce events (a failed validation, a finished batch) and only its delivery runs in
//! the background.
//!
//! The worker role ([`run_worker`]) runs `dispatch` and `lines`; the aggregator role
//! ([`run_aggregator`]) runs `aggregate`, the webhook delivery and `queue_depth`. No module
//! imports one that imports it back: a stage uses only stages after it in this list (and `lease`),
//! never one before it.

#![warn(missing_docs, unreachable_pub)]

pub mod aggregate;
pub(crate) mod dispatch;
pub(crate) mod lease;
pub(crate) mod lines;
pub(crate) mod pacing;
pub(crate) mod queue_depth;
pub mod upstream;
pub(crate) mod webhooks;

use std::sync::Arc;

use object_store::ObjectStore;
use sluice_broker::Publisher;
use sluice_core::{Keys, Settings};
use sluice_runtime::metrics::Metrics;
use sluice_runtime::startup::{Health, Startup};
use sluice_store::Store;
use sluice_store::pacing::Pacer;
use tokio_util::sync::CancellationToken;

/// Everything a back-end role uses, built once per process and cheap to clone.
#[derive(Clone)]
pub struct WorkerContext {
    pub(crate) settings: Arc<Settings>,
    pub(crate) keys: Keys,
    pub(crate) store: Store,
    /// Object storage: input, result and segment files.
    pub objects: Arc<dyn ObjectStore>,
    pub(crate) publisher: Publisher,
    pub(crate) upstream: upstream::Upstream,
    pub(crate) metrics: Metrics,
    /// The fleet-wide limiter and circuit breaker of every provider.
    pub(crate) pacer: Pacer,
    /// This process's smoothing of its single asks to `pacer` (providers with a concurrency limit).
    pub(crate) local_pace: pacing::local_pace::LocalPace,
    /// This process's lines asking the call gate again, together by batch.
    pub(crate) gate_checks: lines::gate_checks::GateChecks,
    /// This process's lines to a rate-paced provider, asking `pacer` for their starts together.
    pub(crate) reservations: pacing::reservations::Reservations,
    /// This process's copy of its unpaced providers' fleet pause and breaker.
    pub(crate) fleet_views: pacing::fleet_view::FleetViews,
    /// Successes of paced calls, reported to `pacer` summed.
    pub(crate) pace_reports: pacing::pace_reports::PaceReports,
}

impl std::fmt::Debug for WorkerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerContext")
            .field("namespace", &self.keys.namespace())
            .finish()
    }
}

impl WorkerContext {
    /// Connects to Redis, the broker and object storage.
    pub async fn build(settings: Settings, metrics: Metrics) -> anyhow::Result<Self> {
        let startup = Startup::new(&settings.dependencies, Health::default());
        Self::build_with(settings, metrics, &startup).await
    }

    /// [`WorkerContext::build`], reaching Redis and the broker through `startup`: retried with a
    /// `warn` line per failed attempt, reported to its [`Health`], until its deadline if any.
    pub async fn build_with(
        settings: Settings,
        metrics: Metrics,
        startup: &Startup,
    ) -> anyhow::Result<Self> {
        let keys = Keys::new(&settings.namespace);
        let store = startup.store("back end", &settings).await?;
        let objects =
            sluice_runtime::storage::build_with(&settings.storage, &settings.dependencies)?;
        let publisher = startup
            .publisher("back end", &settings, "sluice-worker-publisher")
            .await?;
        startup.health().connected(&store, &publisher);
        let upstream = upstream::Upstream::new(&settings)?;
        record_pacing_limits(&settings, &metrics);
        metrics.init_tenants(settings.tenants.iter().map(|t| t.id.as_str()));
        let pacer = Pacer::new(store.clone());
        let local_pace = pacing::local_pace::LocalPace::new(&settings.providers);
        let w = &settings.worker;
        let fleet_views = pacing::fleet_view::FleetViews::new(
            pacer.clone(),
            std::time::Duration::from_millis(w.fleet_view_ms),
        );
        let reservations = pacing::reservations::Reservations::new(
            pacer.clone(),
            std::time::Duration::from_millis(w.pacing_coalesce_ms),
        );
        let gate_checks = lines::gate_checks::GateChecks::new(store.clone(), w.in_flight_for());
        let pace_reports = pacing::pace_reports::PaceReports::new(
            pacer.clone(),
            std::time::Duration::from_millis(w.pacing_report_ms),
        );
        Ok(Self {
            settings: Arc::new(settings),
            keys,
            store,
            objects,
            publisher,
            upstream,
            metrics,
            pacer,
            local_pace,
            reservations,
            gate_checks,
            fleet_views,
            pace_reports,
        })
    }
}

/// Publishes every provider's configured limits as the `pacing_limit` gauge.
fn record_pacing_limits(settings: &Settings, metrics: &Metrics) {
    for p in &settings.providers {
        let limits = [
            ("rpm", p.pacing.rpm),
            ("tpm", p.pacing.tpm),
            ("max_concurrency", p.pacing.max_concurrency.map(u64::from)),
        ];
        for (kind, value) in limits {
            if let Some(v) = value {
                metrics
                    .pacing_limit
                    .with_label_values(&[p.name.as_str(), kind])
                    .set(v as i64);
            }
        }
    }
}

/// Runs the worker role (dispatcher, line worker, dead-letter consumer) until `shutdown`.
pub async fn run_worker(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let d = {
        let (ctx, s) = (ctx.clone(), shutdown.clone());
        tokio::spawn(async move {
            let c = ctx.clone();
            let s2 = s.clone();
            sluice_broker::consumer::supervise("dispatcher", s, move || {
                dispatch::control::run(c.clone(), s2.clone())
            })
            .await
        })
    };
    let q = {
        let (ctx, s) = (ctx.clone(), shutdown.clone());
        tokio::spawn(async move {
            let s2 = s.clone();
            sluice_broker::consumer::supervise("dead-letters", s, move || {
                lines::dead_letters::run(ctx.clone(), s2.clone())
            })
            .await
        })
    };
    if ctx.settings.worker.lines {
        let s2 = shutdown.clone();
        let c = ctx.clone();
        sluice_broker::consumer::supervise("worker", shutdown, move || {
            lines::consumer::run(c.clone(), s2.clone())
        })
        .await;
    }
    d.await?;
    q.await?;
    Ok(())
}

/// Runs the aggregator role until `shutdown`; it also samples the queues' depth and delivers
/// webhooks.
pub async fn run_aggregator(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let depth = tokio::spawn(queue_depth::run(ctx.clone(), shutdown.clone()));
    let hooks = tokio::spawn(webhooks::run(ctx.clone(), shutdown.clone()));
    let result = aggregate::aggregator::run(ctx, shutdown).await;
    depth.abort();
    hooks.await??;
    result
}

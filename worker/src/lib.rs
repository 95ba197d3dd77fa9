//! Sluice's back-end roles.
//!
//! - [`dispatcher`]: validates an input file and enqueues its lines, several per message.
//! - [`work`]: calls the upstream for each line and records its row; dead-lettered lines too.
//! - [`aggregator`]: writes result files, finishes batches, expires and recovers them.
//! - [`call`]: one attempt at one line, through a provider or a task model.
//! - [`lifecycle`]: deletes expired files and removes batch records past their retention.
//! - [`compaction`]: moves finished rows out of Redis into sorted segment objects while a batch runs.
//! - [`upstream`]: the HTTP client and the one retry policy.
//! - [`tasks`]: the task models (`extract`, `summarize`, `classify`) run through a backing model.
//! - [`schedule`]: the window each batch of a rate-limited provider gets, fleet-wide.
//! - [`queue_depth`]: the queues' backlog as a metric.
//! - [`webhooks`]: signed batch events, announced with the terminal status and delivered at least once.

pub mod aggregator;
pub mod call;
pub mod compaction;
pub mod dispatcher;
pub mod fleet_view;
pub mod gate_checks;
pub mod lease;
pub mod lifecycle;
pub mod local_pace;
pub mod ops;
pub mod pace_reports;
pub mod queue_depth;
pub mod reservations;
pub mod schedule;
pub mod tasks;
pub mod upstream;
pub mod webhooks;
pub mod work;

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
    pub settings: Arc<Settings>,
    pub keys: Keys,
    pub store: Store,
    pub objects: Arc<dyn ObjectStore>,
    pub publisher: Publisher,
    pub upstream: upstream::Upstream,
    pub metrics: Metrics,
    /// The fleet-wide limiter and circuit breaker of every provider.
    pub pacer: Pacer,
    /// This process's smoothing of its single asks to `pacer` (providers with a concurrency limit).
    pub local_pace: local_pace::LocalPace,
    /// This process's lines asking the call gate again, together by batch.
    pub gate_checks: gate_checks::GateChecks,
    /// This process's lines to a rate-paced provider, asking `pacer` for their starts together.
    pub reservations: reservations::Reservations,
    /// This process's copy of its unpaced providers' fleet pause and breaker.
    pub fleet_views: fleet_view::FleetViews,
    /// Successes of paced calls, reported to `pacer` summed.
    pub pace_reports: pace_reports::PaceReports,
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
        metrics.init_tenants(settings.tenants.iter().map(|t| t.id.as_str()));
        let pacer = Pacer::new(store.clone());
        let local_pace = local_pace::LocalPace::new(&settings.providers);
        let w = &settings.worker;
        let fleet_views = fleet_view::FleetViews::new(
            pacer.clone(),
            std::time::Duration::from_millis(w.fleet_view_ms),
        );
        let reservations = reservations::Reservations::new(
            pacer.clone(),
            std::time::Duration::from_millis(w.pacing_coalesce_ms),
        );
        let gate_checks = gate_checks::GateChecks::new(store.clone(), w.in_flight_for());
        let pace_reports = pace_reports::PaceReports::new(
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

/// Runs the worker role (dispatcher, line worker, dead-letter consumer) until `shutdown`.
pub async fn run_worker(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let d = {
        let (ctx, s) = (ctx.clone(), shutdown.clone());
        tokio::spawn(async move {
            let c = ctx.clone();
            let s2 = s.clone();
            sluice_broker::consumer::supervise("dispatcher", s, move || {
                dispatcher::run(c.clone(), s2.clone())
            })
            .await
        })
    };
    let q = {
        let (ctx, s) = (ctx.clone(), shutdown.clone());
        tokio::spawn(async move {
            let s2 = s.clone();
            sluice_broker::consumer::supervise("dead-letters", s, move || {
                work::run_dead_letters(ctx.clone(), s2.clone())
            })
            .await
        })
    };
    if ctx.settings.worker.lines {
        let s2 = shutdown.clone();
        let c = ctx.clone();
        sluice_broker::consumer::supervise("worker", shutdown, move || {
            work::run(c.clone(), s2.clone())
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
    let result = aggregator::run(ctx, shutdown).await;
    depth.abort();
    hooks.await??;
    result
}

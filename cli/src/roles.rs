//! Starting the roles: each alone, or every role in one process (with `--demo`, also a mock
//! upstream and a demo tenant).

use std::time::Duration;

use sluice_core::Settings;
use sluice_runtime::metrics::Metrics;
use sluice_runtime::ops;
use sluice_runtime::startup::Startup;
use sluice_worker::WorkerContext;
use tokio_util::sync::CancellationToken;

/// Runs the API; `with_ops` also serves `/metrics`, `/livez` and `/readyz` on the metrics port
/// (in `all`, the back end serves them for the whole process). The operations endpoint is up
/// before the dependencies are reached, so `/livez` answers and `/readyz` says what the role still
/// waits for.
pub async fn run_api(
    settings: Settings,
    metrics: Metrics,
    stop: CancellationToken,
    startup: Startup,
    with_ops: bool,
) -> anyhow::Result<()> {
    if with_ops {
        let deps = &settings.dependencies;
        ops::serve(
            settings.api.metrics_listen,
            metrics.clone(),
            startup.health().clone(),
            deps.probe_timeout(),
            Duration::from_millis(deps.health_check_interval_ms),
            stop.clone(),
        )
        .await?;
    }
    let app = tokio::select! {
        app = sluice_api::Application::build_with(settings, metrics, &startup) => app?,
        _ = stop.cancelled() => return Ok(()),
    };
    app.run_until_stopped(stop).await
}

/// Serves the operations endpoint and runs the worker role, the aggregator role or both, until
/// `stop`.
pub async fn run_backend(
    settings: Settings,
    metrics: Metrics,
    stop: CancellationToken,
    startup: Startup,
    worker: bool,
    aggregator: bool,
) -> anyhow::Result<()> {
    let port = ops::serve(
        settings.api.metrics_listen,
        metrics.clone(),
        startup.health().clone(),
        settings.dependencies.probe_timeout(),
        Duration::from_millis(settings.dependencies.health_check_interval_ms),
        stop.clone(),
    )
    .await?;
    let ctx = tokio::select! {
        ctx = WorkerContext::build_with(settings, metrics, &startup) => ctx?,
        _ = stop.cancelled() => return Ok(()),
    };
    tracing::info!(port, worker, aggregator, "Back-end roles starting.");
    let agg =
        aggregator.then(|| tokio::spawn(sluice_worker::run_aggregator(ctx.clone(), stop.clone())));
    if worker {
        sluice_worker::run_worker(ctx, stop).await?;
    }
    if let Some(agg) = agg {
        agg.await??;
    }
    Ok(())
}

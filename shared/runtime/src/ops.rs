//! The operations endpoint every role serves on its own port: `/metrics`, `/livez`, `/readyz`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::startup::Health;

#[derive(Clone)]
struct Ops {
    metrics: Metrics,
    health: Health,
    probe_timeout: Duration,
}

/// Serves the operations endpoint on `addr` until `shutdown`; returns the bound port.
/// Readiness needs Redis and the broker to answer within `probe_timeout` (and, while a role is
/// still starting, says which dependency it waits for); liveness checks nothing but the process,
/// so a dependency blip or stall never restarts pods. Served before the role reaches its
/// dependencies, so a role stuck at start is observable.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Health,
    probe_timeout: Duration,
    check_every: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let port = listener.local_addr()?.port();
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(o): State<Ops>| async move {
                (
                    [(axum::http::header::CONTENT_TYPE, Metrics::CONTENT_TYPE)],
                    o.metrics.render(),
                )
            }),
        )
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            // The broker check reconnects when the broker came back, so readiness recovers on
            // its own.
            get(|State(o): State<Ops>| async move {
                match o.health.check(o.probe_timeout).await {
                    Ok(()) => (StatusCode::OK, "ready".to_owned()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                }
            }),
        )
        .with_state(Ops {
            metrics,
            health: health.clone(),
            probe_timeout,
        });
    tokio::spawn(watch(
        health.clone(),
        probe_timeout,
        check_every,
        shutdown.clone(),
    ));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "Operations endpoint stopped.");
        }
    });
    Ok(port)
}

/// Checks the dependencies every `every` once the role is connected, so a stall at run time is
/// logged even when no request or line happens to wait on it: a `warn` line when a check fails
/// after a good one (repeated every [`REPEAT_WARN`] while it keeps failing), an `info` line when
/// one passes again.
async fn watch(
    health: Health,
    probe_timeout: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ready = false;
    let mut last_warn: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !health.is_connected() {
            // Start-up attempts log their own lines.
            continue;
        }
        match health.check(probe_timeout).await {
            Ok(()) => {
                if !ready {
                    tracing::info!("Dependencies answer: ready.");
                }
                ready = true;
                last_warn = None;
            }
            Err(why) => {
                if ready || last_warn.is_none_or(|t| t.elapsed() >= REPEAT_WARN) {
                    tracing::warn!(reason = %why, "A dependency stopped answering: {why}. Not ready until it answers again.");
                    last_warn = Some(tokio::time::Instant::now());
                }
                ready = false;
            }
        }
    }
}

/// How often a dependency that keeps failing its checks is logged again.
const REPEAT_WARN: Duration = Duration::from_secs(30);

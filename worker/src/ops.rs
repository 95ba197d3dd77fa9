//! The operations endpoint every role serves on its own port: `/metrics`, `/livez`, `/readyz`.

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use sluice_shared::Store;
use sluice_shared::metrics::Metrics;
use sluice_shared::queue::Publisher;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Ops {
    metrics: Metrics,
    store: Store,
    publisher: Publisher,
}

/// Serves the operations endpoint on `addr` until `shutdown`; returns the bound port.
/// Readiness needs both Redis and the broker; liveness checks nothing but the process, so a
/// dependency blip never restarts pods.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    store: Store,
    publisher: Publisher,
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
            get(|State(o): State<Ops>| async move {
                if o.store.ping().await.is_err() {
                    return (StatusCode::SERVICE_UNAVAILABLE, "redis unavailable");
                }
                // Reconnects when the broker came back, so readiness recovers on its own.
                if o.publisher.channel().await.is_err() {
                    return (StatusCode::SERVICE_UNAVAILABLE, "broker unavailable");
                }
                (StatusCode::OK, "ready")
            }),
        )
        .with_state(Ops {
            metrics,
            store,
            publisher,
        });
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

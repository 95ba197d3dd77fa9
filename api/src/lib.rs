#![warn(missing_docs, unreachable_pub)]
//! The Sluice HTTP API: OpenAI-compatible Files and Batches endpoints under `/v1`.
//!
//! # Layout
//! - [`Application`]: connects to Redis, RabbitMQ and object storage, binds, serves until told to stop.
//! - [`router`]: the route table, usable without a socket (`oneshot` tests).
//! - `routes`: the handlers, grouped by resource (`files`, `batches`, `usage`, `health`,
//!   `console`).
//! - [`AppState`] (`state`): the handles handlers share.
//! - [`ApiError`] (`error`): the only error response, in OpenAI's envelope.
//! - `auth`: API key → tenant.
//! - `idempotency`: `Idempotency-Key` on creates (first answer replayed, one object per key).
//! - `extract`: extractors whose rejections are [`ApiError`]s.
//! - `openapi`: the API description served at `/openapi.json`.
//! - `server`: the accept loop and the per-connection and per-request limits.
//!
//! The API only records and announces work: batches are validated, run and finalized by the
//! worker roles, which it reaches through Redis and the broker alone.

use std::net::SocketAddr;

use anyhow::Context;
use sluice_broker::Publisher;
use sluice_core::Settings;
use sluice_runtime::metrics::Metrics;
use sluice_runtime::startup::{Health, Startup};
use sluice_store::Store;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod auth;
mod error;
mod extract;
#[doc(hidden)]
pub mod fuzzing;
mod idempotency;
mod openapi;
mod routes;
mod server;
mod state;

pub use error::ApiError;
pub use routes::router;
pub use state::AppState;

/// The API role, bound and ready to serve.
pub struct Application {
    listener: TcpListener,
    addr: SocketAddr,
    router: axum::Router,
    server: sluice_core::config::ApiSettings,
    store: Store,
    publisher: Publisher,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Connects to Redis, the broker and object storage, and binds `settings.api.listen`
    /// (port 0 picks a free port; see [`Application::port`]).
    pub async fn build(settings: Settings, metrics: Metrics) -> anyhow::Result<Self> {
        let startup = Startup::new(&settings.dependencies, Health::default());
        Self::build_with(settings, metrics, &startup).await
    }

    /// [`Application::build`], reaching Redis and the broker through `startup`: retried with a
    /// `warn` line per failed attempt, reported to its [`Health`], until its deadline if any.
    pub async fn build_with(
        settings: Settings,
        metrics: Metrics,
        startup: &Startup,
    ) -> anyhow::Result<Self> {
        let store = startup.store("api", &settings).await?;
        let publisher = startup.publisher("api", &settings, "sluice-api").await?;
        startup.health().connected(&store, &publisher);
        let files = sluice_runtime::storage::build_with(&settings.storage, &settings.dependencies)
            .context("Failed to set up object storage")?;
        let listener = TcpListener::bind(settings.api.listen)
            .await
            .with_context(|| format!("Failed to bind the API to {}", settings.api.listen))?;
        let addr = listener
            .local_addr()
            .context("Failed to read the API's bound address")?;
        let server = settings.api.clone();
        let state = AppState::new(settings, store.clone(), publisher.clone(), files, metrics);
        Ok(Self {
            listener,
            addr,
            router: server::with_limits(router(state.clone()), &state),
            server,
            store,
            publisher,
        })
    }

    /// The API's Redis handle (for the operations endpoint's readiness).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The API's broker publisher (for the operations endpoint's readiness).
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight requests finish.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(addr = %self.addr, "API listening.");
        server::serve(self.listener, self.router, &self.server, shutdown).await;
        Ok(())
    }
}

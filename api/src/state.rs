//! [`AppState`]: the handles every request handler shares. Cloning it is cheap (handles and `Arc`s).

use std::collections::HashMap;
use std::sync::Arc;

use object_store::ObjectStore;
use sluice_broker::Publisher;
use sluice_core::{Keys, Settings};
use sluice_runtime::metrics::Metrics;
use sluice_store::Store;

/// Shared state of the API router.
#[derive(Clone)]
pub struct AppState {
    /// The settings the process started with.
    pub(crate) settings: Arc<Settings>,
    /// Redis: file and batch records.
    pub(crate) store: Store,
    /// RabbitMQ: control and finalize events.
    pub(crate) publisher: Publisher,
    /// Object storage holding file contents.
    pub(crate) files: Arc<dyn ObjectStore>,
    /// Prometheus series.
    pub(crate) metrics: Metrics,
    /// SHA-256 of an API key → tenant id, computed once instead of per request.
    pub(crate) api_keys: Arc<HashMap<[u8; 32], String>>,
}

impl AppState {
    /// Assembles the state from already connected handles.
    pub fn new(
        settings: Settings,
        store: Store,
        publisher: Publisher,
        files: Arc<dyn ObjectStore>,
        metrics: Metrics,
    ) -> Self {
        metrics.init_tenants(settings.tenants.iter().map(|t| t.id.as_str()));
        Self {
            api_keys: Arc::new(settings.key_digests()),
            settings: Arc::new(settings),
            store,
            publisher,
            files,
            metrics,
        }
    }

    /// Key builder of the store's namespace.
    pub(crate) fn keys(&self) -> &Keys {
        self.store.keys()
    }
}

impl std::fmt::Debug for AppState {
    // Key digests stay out of logs, and the settings are long; the namespace identifies the state.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("namespace", &self.settings.namespace)
            .field("store", &self.store)
            .field("publisher", &self.publisher)
            .field("files", &self.files.to_string())
            .finish_non_exhaustive()
    }
}

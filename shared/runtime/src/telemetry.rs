//! Logging: JSON lines (or human-readable text) through tracing-subscriber.

use tracing_subscriber::EnvFilter;

use sluice_core::config::LogSettings;

/// Installs the global subscriber once; later calls do nothing (tests start several roles).
pub fn init(settings: &LogSettings) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if settings.format == "pretty" {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    };
    // A second init (several roles in one test process) keeps the first subscriber.
    drop(result);
}

//! What a batch created without an endpoint or a completion window gets.

use std::time::Duration;

use crate::routes::batches::params::parse_completion_window;
use crate::state::AppState;

/// Endpoint of a JSONL-body batch whose first line names none we support.
pub(crate) const DEFAULT_ENDPOINT: &str = "/v1/chat/completions";
/// Window of batches created without one (the inline and JSONL-body forms).
pub(crate) const DEFAULT_WINDOW: &str = "24h";

/// `24h`, or the configured maximum when that is shorter.
pub(crate) fn default_window(state: &AppState) -> (String, Duration) {
    let bounds = state.settings.window_bounds();
    match parse_completion_window(DEFAULT_WINDOW, bounds) {
        Ok(window) => (DEFAULT_WINDOW.to_owned(), window),
        Err(_) => (format!("{}s", bounds.1.as_secs()), bounds.1),
    }
}

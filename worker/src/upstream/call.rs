//! One attempt at one line: a provider's model through [`super::client`], a task model through
//! [`super::tasks`] and its backing model.

use std::time::Duration;

use serde_json::value::RawValue;
use sluice_core::domain::{Row, Usage};
use sluice_core::routing::Target;

use super::client::{Attempt, Upstream};

/// Runs one attempt at a line whose batch targets `model` on `endpoint`. Also returns the fleet
/// pause the answer's `x-ratelimit-*` headers ask for (task models never ask for one).
pub(crate) async fn attempt(
    upstream: &Upstream,
    endpoint: &str,
    model: &str,
    custom_id: &str,
    body: &RawValue,
) -> (Attempt, Option<Duration>) {
    match upstream.resolve(model, endpoint) {
        Ok(Target::Model(route)) => {
            upstream
                .attempt_route(&route, endpoint, model, custom_id, body)
                .await
        }
        Ok(Target::Task { task, backing }) => (
            super::tasks::attempt(upstream, task, &backing, custom_id, body).await,
            None,
        ),
        Err(e) => {
            let row = Row::error(custom_id, e.code(), &e.to_string());
            (Attempt::Done(row, Usage::default()), None)
        }
    }
}

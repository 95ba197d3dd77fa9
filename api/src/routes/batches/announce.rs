//! Announcing a batch to the worker roles over the broker.

use sluice_core::domain::BatchEvent;

use crate::state::AppState;

/// Longest wait for the broker to confirm an event before the request gives up on it.
const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Publishes a [`BatchEvent`] to `queue`. A failure is only logged: the batch is stored already,
/// and the aggregator's sweep re-publishes events for batches that stay put too long, so failing
/// the request would only invite a retry that creates a duplicate batch.
pub(crate) async fn announce(state: &AppState, queue: &str, batch_id: &str) {
    let payload = serde_json::to_vec(&BatchEvent {
        batch_id: batch_id.to_owned(),
    })
    .expect("a batch event always serializes");
    let error =
        match tokio::time::timeout(PUBLISH_TIMEOUT, state.publisher.publish(queue, &payload)).await
        {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no confirm in time".to_owned(),
        };
    tracing::warn!(%batch_id, %queue, %error, "Failed to publish a batch event; the sweep will recover it.");
}

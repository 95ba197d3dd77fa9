//! Liveness and readiness probes.
//!
//! `/livez` only proves the process serves HTTP. `/readyz` also checks Redis and the broker, so a
//! load balancer stops routing to an API replica that could not store or announce a batch.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::state::AppState;

/// `GET /livez`.
#[utoipa::path(get, path = "/livez", operation_id = "livez", tag = "health", security(()),
    responses((status = 200, description = "The process serves HTTP", body = crate::openapi::Health)))]
pub(crate) async fn livez() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when Redis answers and takes a write and the broker connection is up, 503
/// otherwise, saying why.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "health", security(()),
    responses((status = 200, description = "Redis and the broker answer", body = crate::openapi::Health), (status = 503, description = "Not ready, or no provider configured", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    // `dependencies.probe_timeout_ms`: how long a probe waits before calling a dependency down.
    let probe_timeout = state.settings.dependencies.probe_timeout();
    let redis = async {
        match tokio::time::timeout(probe_timeout, state.store.ping()).await {
            // It answers; a full Redis answers PING but refuses every write a batch needs.
            Ok(Ok(())) => sluice_store::redis_policy::write_probe(&state.store, probe_timeout)
                .await
                .map_err(|reason| format!("Redis {reason}.")),
            _ => Err("Redis is unreachable.".to_owned()),
        }
    };
    // The publisher only reconnects when asked for a channel; asking here means a replica that lost
    // the broker becomes ready again by itself instead of waiting for a publish that, being
    // unready, it would never receive.
    // A round trip, not the connection status: a broker that stalls keeps its connection
    // "connected" until heartbeats run out.
    let broker = async { state.publisher.probe(probe_timeout).await.is_ok() };
    let (redis, broker) = tokio::join!(redis, broker);
    match (redis, broker) {
        (Ok(()), true) => Ok(Json(json!({"status": "ok"}))),
        (Err(reason), true) => Err(not_ready(&reason)),
        (Ok(()), false) => Err(not_ready("The message broker is unreachable.")),
        (Err(reason), false) => Err(not_ready(&format!(
            "{reason} The message broker is unreachable."
        ))),
    }
}

fn not_ready(message: &str) -> ApiError {
    ApiError::NotReady {
        message: message.to_owned(),
    }
}

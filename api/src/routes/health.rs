//! Liveness and readiness probes.
//!
//! `/livez` only proves the process serves HTTP. `/readyz` also checks Redis and the broker, so a
//! load balancer stops routing to an API replica that could not store or announce a batch.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::state::AppState;

/// How long a probe waits for a dependency before calling it down.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /livez`.
#[utoipa::path(get, path = "/livez", operation_id = "livez", tag = "health", security(()),
    responses((status = 200, description = "The process serves HTTP", body = crate::openapi::Health)))]
pub async fn livez() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`: 200 when Redis answers and the broker connection is up, 503 otherwise.
#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "health", security(()),
    responses((status = 200, description = "Redis and the broker answer", body = crate::openapi::Health), (status = 503, description = "Not ready, or no provider configured", body = crate::openapi::ErrorResponse)))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let redis = async {
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, state.store.ping()).await,
            Ok(Ok(()))
        )
    };
    // The publisher only reconnects when asked for a channel; asking here means a replica that lost
    // the broker becomes ready again by itself instead of waiting for a publish that, being
    // unready, it would never receive.
    let broker = async {
        tokio::time::timeout(PROBE_TIMEOUT, async {
            state.publisher.is_connected().await || state.publisher.channel().await.is_ok()
        })
        .await
        .unwrap_or(false)
    };
    let (redis, broker) = tokio::join!(redis, broker);
    match (redis, broker) {
        (true, true) => Ok(Json(json!({"status": "ok"}))),
        (false, true) => Err(not_ready("Redis is unreachable.")),
        (true, false) => Err(not_ready("The message broker is unreachable.")),
        (false, false) => Err(not_ready("Redis and the message broker are unreachable.")),
    }
}

fn not_ready(message: &str) -> ApiError {
    ApiError::NotReady {
        message: message.to_owned(),
    }
}

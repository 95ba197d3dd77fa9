//! The route table: every handler, its path, and the layers around it (body limits, the
//! idempotency guard, the error envelope, request tracing).
//!
//! Handlers are grouped by resource: [`files`], [`batches`], [`usage`], [`health`] and the
//! [`console`] page. What several resources share sits beside them: [`bounds`] on client input,
//! [`visibility`] across tenants, [`listing`] pagination and [`download`] headers.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{Method, Uri};
use axum::middleware;
use axum::routing::get;
use axum::{Json, Router};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, ensure_envelope};
use crate::idempotency::{self, Guard};
use crate::openapi::ApiDoc;
use crate::state::AppState;

pub(crate) mod batches;
pub(crate) mod bounds;
mod console;
pub(crate) mod download;
mod files;
mod health;
pub(crate) mod listing;
mod usage;
pub(crate) mod visibility;

/// Room for the multipart framing and the small fields around the file part.
const MULTIPART_OVERHEAD: u64 = 1024 * 1024;

/// The whole API: `/v1/files…`, `/v1/batches…`, `/livez`, `/readyz` and `/openapi.json`, which
/// describes the rest (each handler is registered with its `#[utoipa::path]` entry), plus the web
/// console's static page at `/console`.
pub fn router(state: AppState) -> Router {
    let max_upload = state.settings.limits.max_upload_bytes;
    // Uploads stream past axum's default 2 MiB body limit; the hard cap still stops a client that
    // sends far more than any acceptable file. The layers sit on their own router because
    // `post(h).layer(..)` cannot infer the body type.
    let upload = OpenApiRouter::new()
        .routes(routes!(files::upload::upload))
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(
            usize::try_from(max_upload.saturating_add(MULTIPART_OVERHEAD)).unwrap_or(usize::MAX),
        ))
        .layer(middleware::map_response_with_state(
            max_upload,
            files::upload::too_large_as_envelope,
        ))
        .layer(middleware::from_fn_with_state(
            Guard::new(state.clone(), max_upload.saturating_add(MULTIPART_OVERHEAD)),
            idempotency::guard,
        ));
    let limits = &state.settings.limits;
    let largest_create = limits
        .max_json_body_bytes
        .max(limits.max_inline_body_bytes)
        .max(limits.max_jsonl_body_bytes);
    let create = OpenApiRouter::new()
        .routes(routes!(batches::create::create, batches::list::list))
        .layer(middleware::from_fn_with_state(
            Guard::new(state.clone(), largest_create),
            idempotency::guard,
        ));
    // A retry creates a batch too, and its own retries must not make two.
    let retry = OpenApiRouter::new()
        .routes(routes!(batches::retry::retry))
        .layer(middleware::from_fn_with_state(
            Guard::new(state.clone(), limits.max_json_body_bytes),
            idempotency::guard,
        ));
    let v1 = OpenApiRouter::new()
        .routes(routes!(files::list::list))
        .routes(routes!(files::retrieve::retrieve, files::delete::delete))
        .routes(routes!(files::content::content))
        .merge(create)
        .routes(routes!(batches::retrieve::retrieve))
        .routes(routes!(batches::results::output::output))
        .routes(routes!(batches::results::rows::results))
        .routes(routes!(batches::cancel::cancel))
        .routes(routes!(usage::usage))
        .merge(retry)
        .merge(upload);
    let (router, spec) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .nest("/v1", v1)
        .routes(routes!(health::livez))
        .routes(routes!(health::readyz))
        .split_for_parts();
    let spec = Arc::new(spec);
    let router = if state.settings.api.console {
        // Not in the OpenAPI document: a page for people, not part of the API.
        router.merge(console::router())
    } else {
        router
    };
    router
        .route(
            "/openapi.json",
            get(move || {
                let spec = spec.clone();
                async move { Json(spec.as_ref().clone()) }
            }),
        )
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::map_response(ensure_envelope))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request| {
                    // The route template, never the raw path: ids stay out of span names.
                    let route = request
                        .extensions()
                        .get::<MatchedPath>()
                        .map_or("unmatched", MatchedPath::as_str);
                    tracing::info_span!("request", method = %request.method(), route)
                })
                .on_response(DefaultOnResponse::new().level(Level::INFO))
                // 5xx are logged with their cause by `ensure_envelope`; this catches the rest
                // (a download whose stream broke).
                .on_failure(DefaultOnFailure::new().level(Level::WARN)),
        )
        .with_state(state)
}

async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound {
        message: format!("Invalid URL ({method} {})", uri.path()),
    }
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        message: format!("Method {method} is not allowed for URL {}.", uri.path()),
    }
}

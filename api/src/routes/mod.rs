//! The route table and what the handlers share: tenant visibility and cursor pagination.

use std::collections::HashMap;

use anyhow::Context;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::{Method, Uri};
use axum::middleware;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};
use sluice_core::domain::{Batch, BatchEvent, FileMeta};
use sluice_store::Store;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Tenant;
use crate::error::{ApiError, ensure_envelope};
use crate::idempotency::{self, Guard};
use crate::openapi::ApiDoc;
use crate::state::AppState;

pub mod batches;
pub mod console;
pub mod create;
pub(crate) mod dialect;
pub mod files;
pub mod health;
pub(crate) mod inline;
pub mod jsonl_body;
pub mod results;
pub mod retry;
pub mod usage;

/// Room for the multipart framing and the small fields around the file part.
const MULTIPART_OVERHEAD: u64 = 1024 * 1024;
/// Accepted `expires_after.seconds` / `output_expires_after.seconds` (one hour to 30 days).
pub(crate) const EXPIRES_AFTER_SECS: std::ops::RangeInclusive<i64> = 3_600..=2_592_000;
/// Most bytes of client text echoed back in an error message.
pub(crate) const ECHO_BYTES: usize = 256;

/// 400 on `param` when a client-sent id is longer than `limits.max_id_chars`: such an id names
/// nothing, and is never looked up, stored or echoed.
pub(crate) fn check_id(state: &AppState, param: &str, id: &str) -> Result<(), ApiError> {
    let max = state.settings.limits.max_id_chars;
    if id.chars().count() as u64 > max {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "Invalid '{param}': string too long. Expected at most {max} characters."
            ),
            param: Some(param.to_owned()),
            code: Some("string_above_max_length"),
        });
    }
    Ok(())
}

/// Longest wait for the broker to confirm an event before the request gives up on it.
const PUBLISH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The whole API: `/v1/files…`, `/v1/batches…`, `/livez`, `/readyz` and `/openapi.json`, which
/// describes the rest (each handler is registered with its `#[utoipa::path]` entry), plus the web
/// console's static page at `/console`.
pub fn router(state: AppState) -> Router {
    let max_upload = state.settings.limits.max_upload_bytes;
    // Uploads stream past axum's default 2 MiB body limit; the hard cap still stops a client that
    // sends far more than any acceptable file. The layers sit on their own router because
    // `post(h).layer(..)` cannot infer the body type.
    let upload = OpenApiRouter::new()
        .routes(routes!(files::upload))
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(
            usize::try_from(max_upload.saturating_add(MULTIPART_OVERHEAD)).unwrap_or(usize::MAX),
        ))
        .layer(middleware::map_response_with_state(
            max_upload,
            files::too_large_as_envelope,
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
        .routes(routes!(create::create, batches::list))
        .layer(middleware::from_fn_with_state(
            Guard::new(state.clone(), largest_create),
            idempotency::guard,
        ));
    // A retry creates a batch too, and its own retries must not make two.
    let retry =
        OpenApiRouter::new()
            .routes(routes!(retry::retry))
            .layer(middleware::from_fn_with_state(
                Guard::new(state.clone(), limits.max_json_body_bytes),
                idempotency::guard,
            ));
    let v1 = OpenApiRouter::new()
        .routes(routes!(files::list))
        .routes(routes!(files::retrieve, files::delete))
        .routes(routes!(files::content))
        .merge(create)
        .routes(routes!(batches::retrieve))
        .routes(routes!(jsonl_body::output))
        .routes(routes!(results::results))
        .routes(routes!(batches::cancel))
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

/// A record that belongs to one tenant.
pub(crate) trait Owned {
    fn owner(&self) -> &str;
}

impl Owned for FileMeta {
    fn owner(&self) -> &str {
        self.tenant()
    }
}

impl Owned for Batch {
    fn owner(&self) -> &str {
        self.tenant.as_str()
    }
}

/// The record if it exists *and* belongs to `tenant`. Every read goes through here, so another
/// tenant's object is indistinguishable from a missing one (no id probing across tenants).
pub(crate) fn visible<T: Owned>(found: Option<T>, tenant: &Tenant) -> Option<T> {
    found.filter(|record| record.owner() == tenant.id())
}

/// One page of records from a tenant's listing set.
pub(crate) struct Page {
    pub(crate) records: Vec<HashMap<String, String>>,
    pub(crate) has_more: bool,
}

/// Where and how to read one page of a tenant's listing.
pub(crate) struct PageRequest<'a> {
    /// The tenant's sorted set of ids.
    pub(crate) set: String,
    /// Redis key of the record of an id.
    pub(crate) record_key: &'a (dyn Fn(&str) -> String + Sync),
    /// Cursor: the page starts right after this id.
    pub(crate) after: Option<&'a str>,
    pub(crate) desc: bool,
    pub(crate) limit: usize,
    /// Filter applied to records (e.g. `purpose`); pages are refilled past what it drops.
    pub(crate) keep: &'a (dyn Fn(&HashMap<String, String>) -> bool + Sync),
}

/// Reads up to `limit` records after the cursor, plus one more to learn `has_more`.
///
/// An `after` that is not in the tenant's set (unknown, deleted, another tenant's) yields an empty
/// page, as OpenAI does, rather than an error.
pub(crate) async fn read_page(
    store: &Store,
    tenant: &Tenant,
    req: PageRequest<'_>,
) -> anyhow::Result<Page> {
    let mut cursor = match req.after {
        None => None,
        Some(after) => match store
            .position(&req.set, after)
            .await
            .context("Failed to locate the pagination cursor")?
        {
            Some(position) => Some(position),
            None => {
                return Ok(Page {
                    records: Vec::new(),
                    has_more: false,
                });
            }
        },
    };
    let want = req.limit + 1;
    let mut records = Vec::with_capacity(want.min(1024));
    loop {
        let ask = want - records.len();
        let ids = store
            .page(&req.set, cursor, req.desc, ask)
            .await
            .context("Failed to read a listing page")?;
        let Some(last) = ids.last().cloned() else {
            break;
        };
        for record in fetch_records(store, ids.iter().map(|id| (req.record_key)(id))).await? {
            // Empty: deleted between the two reads. Foreign: cannot happen in a tenant's set, but
            // listing must never be the one place that leaks.
            if record.is_empty()
                || record.get("tenant").map(String::as_str) != Some(tenant.id())
                || !(req.keep)(&record)
            {
                continue;
            }
            records.push(record);
        }
        if records.len() >= want || ids.len() < ask {
            break;
        }
        // Only reached when records were dropped: continue after the last id seen.
        match store
            .position(&req.set, &last)
            .await
            .context("Failed to locate the pagination cursor")?
        {
            Some(position) => cursor = Some(position),
            None => break,
        }
    }
    let has_more = records.len() > req.limit;
    records.truncate(req.limit);
    Ok(Page { records, has_more })
}

/// `HGETALL` of each key in one round trip, in order (an empty map where a key is missing).
async fn fetch_records(
    store: &Store,
    keys: impl Iterator<Item = String>,
) -> anyhow::Result<Vec<HashMap<String, String>>> {
    let mut pipe = redis::pipe();
    let mut n = 0;
    for key in keys {
        pipe.hgetall(key);
        n += 1;
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    pipe.query_async(&mut store.conn())
        .await
        .context("Failed to read listed records")
}

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

/// The OpenAI list object around `data` (objects with an `id`).
pub(crate) fn list_object(data: Vec<Value>, has_more: bool) -> Value {
    let first_id = data.first().map_or(Value::Null, |o| o["id"].clone());
    let last_id = data.last().map_or(Value::Null, |o| o["id"].clone());
    json!({
        "object": "list",
        "data": data,
        "first_id": first_id,
        "last_id": last_id,
        "has_more": has_more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn other_tenants_records_are_invisible() {
        let meta = |tenant: &str| {
            Some(FileMeta(
                [("tenant".to_owned(), tenant.to_owned())]
                    .into_iter()
                    .collect(),
            ))
        };
        let alice = Tenant("alice".into());
        assert!(visible(meta("alice"), &alice).is_some());
        assert!(visible(meta("bob"), &alice).is_none());
        assert!(visible(None::<FileMeta>, &alice).is_none());
    }

    #[test]
    fn empty_lists_have_null_cursors() {
        assert_eq!(
            list_object(Vec::new(), false),
            json!({"object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false})
        );
        let page = list_object(vec![json!({"id": "a"}), json!({"id": "b"})], true);
        assert_eq!(page["first_id"], "a");
        assert_eq!(page["last_id"], "b");
    }
}

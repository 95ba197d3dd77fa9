//! `GET /v1/batches/{batch_id}/results`: the rows a batch has finished so far, in input order, in
//! every status.
//!
//! Rows live in two places while a batch runs: registered segment objects (sorted by line) and
//! the pending rows still in Redis. One atomic snapshot names both; the page is a merge of the
//! two. A compaction may move a pending row into a new segment between the snapshot and the
//! read: the page is then built again from a fresh snapshot.
//!
//! The next cursor goes in the `sluice-next-after` header, so the page is gathered (bounded by
//! `limit` and `api.results_page_bytes`) before the response starts, then streamed out.

use anyhow::Context;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use sluice_core::domain::Row;
use sluice_core::segments::SegmentRecord;
use sluice_runtime::segments::Merge;

use crate::auth::Tenant;
use crate::error::ApiError;
use crate::extract::{ApiPath, ApiQuery, int_param};
use crate::routes::batches::lookup::load_batch;
use crate::routes::download::no_sniff;
use crate::state::AppState;

/// Header naming the `after` of the next page.
pub(crate) const NEXT_AFTER: &str = "sluice-next-after";
/// Header saying whether finished rows remain past the page (`true`/`false`).
pub(crate) const HAS_MORE: &str = "sluice-has-more";
/// Fresh snapshots tried when compactions keep moving rows under a page.
const ATTEMPTS: usize = 4;
/// Pending rows read from Redis per call.
const PENDING_CHUNK: usize = 128;

/// Where a page starts.
#[derive(Debug, Clone)]
enum After {
    Start,
    /// Past this line number.
    Line(u64),
    /// Past the row with this `custom_id`.
    CustomId(String),
}

/// What a page keeps.
#[derive(Debug)]
struct Filter {
    after: After,
    ok: Option<bool>,
    custom_id: Option<String>,
    limit: usize,
    max_bytes: u64,
}

#[derive(Deserialize)]
struct CustomId<'a> {
    #[serde(borrow)]
    custom_id: Option<std::borrow::Cow<'a, str>>,
}

fn custom_id_of(line: &[u8]) -> Option<String> {
    serde_json::from_slice::<CustomId<'_>>(line)
        .ok()?
        .custom_id
        .map(|c| c.into_owned())
}

/// `GET /v1/batches/{batch_id}/results?after=&limit=&status=&custom_id=`.
#[utoipa::path(get, path = "/batches/{batch_id}/results", operation_id = "batchResults", tag = "batches",
    params(
        ("batch_id" = String, Path, description = "A batch id."),
        ("after" = Option<String>, Query, description = "A line number (0-based), or a `custom_id`: the page starts after that row. Pass the previous page's `sluice-next-after` header."),
        ("limit" = Option<i64>, Query, minimum = 1, description = "Most rows returned (default `api.results_default_limit`, at most `api.results_max_limit`)."),
        ("status" = Option<String>, Query, description = "`succeeded` (the output file's rows) or `failed` (the error file's rows)."),
        ("custom_id" = Option<String>, Query, description = "Only the row with this `custom_id`."),
    ),
    responses((status = 200, description = "The finished rows so far, in input order, as in the output and error files (JSONL). Headers: `sluice-next-after` (the `after` of the next page) and `sluice-has-more`.", content_type = "application/jsonl", body = String), (status = 400, description = "Invalid request", body = crate::openapi::ErrorResponse), (status = 401, description = "Missing or unknown API key", body = crate::openapi::ErrorResponse), (status = 404, description = "No such object for this tenant", body = crate::openapi::ErrorResponse), (status = 500, description = "Internal error", body = crate::openapi::ErrorResponse)))]
pub(crate) async fn results(
    State(state): State<AppState>,
    tenant: Tenant,
    ApiPath(batch_id): ApiPath<String>,
    ApiQuery(query): ApiQuery,
) -> Result<Response, ApiError> {
    let api = &state.settings.api;
    let limit = int_param(
        &query,
        "limit",
        1..=api.results_max_limit as usize,
        api.results_default_limit as usize,
    )?;
    let ok = match query.get("status").map(String::as_str) {
        None | Some("") => None,
        Some("succeeded") => Some(true),
        Some("failed") => Some(false),
        Some(other) => {
            return Err(ApiError::invalid_value(
                "status",
                format!(
                    "Invalid value for 'status': expected 'succeeded' or 'failed', but got '{}' \
                     instead.",
                    sluice_core::validate::clip(other, 64)
                ),
            ));
        }
    };
    let max_id = state.settings.limits.max_id_chars;
    for name in ["after", "custom_id"] {
        if let Some(v) = query.get(name)
            && v.chars().count() as u64 > max_id
        {
            return Err(ApiError::invalid_value(
                name,
                format!("Invalid '{name}': longer than {max_id} characters."),
            ));
        }
    }
    let after = match query.get("after").map(String::as_str) {
        None | Some("") => After::Start,
        Some(a) if a.bytes().all(|b| b.is_ascii_digit()) => {
            After::Line(a.parse().map_err(|_| {
                ApiError::invalid_value(
                    "after",
                    "Invalid value for 'after': line number too large.",
                )
            })?)
        }
        Some(a) => After::CustomId(a.to_owned()),
    };
    let filter = Filter {
        after,
        ok,
        custom_id: query.get("custom_id").filter(|c| !c.is_empty()).cloned(),
        limit,
        max_bytes: api.results_page_bytes,
    };
    let _meta = load_batch(&state, &tenant, &batch_id).await?;
    let mut last_err = None;
    for _ in 0..ATTEMPTS {
        match build_page(&state, &batch_id, &filter).await {
            Ok(Some(page)) => return Ok(respond(page)),
            Ok(None) => continue,
            // A segment replaced by a merge pass disappears: a fresh snapshot names its successor.
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err
        .unwrap_or_else(|| anyhow::anyhow!("rows kept moving under a results page"))
        .context("Failed to read results")
        .into())
}

struct Page {
    chunks: Vec<Bytes>,
    next_after: Option<u64>,
    has_more: bool,
}

fn respond(page: Page) -> Response {
    let body = Body::from_stream(futures::stream::iter(
        page.chunks.into_iter().map(Ok::<_, std::io::Error>),
    ));
    let mut resp = ([(header::CONTENT_TYPE, "application/jsonl")], body).into_response();
    let h = resp.headers_mut();
    no_sniff(h);
    if let Some(next) = page.next_after {
        h.insert(NEXT_AFTER, HeaderValue::from(next));
    }
    h.insert(
        HAS_MORE,
        HeaderValue::from_static(if page.has_more { "true" } else { "false" }),
    );
    resp
}

/// Rows of segments and pending rows merged in line order.
struct Rows<'a> {
    state: &'a AppState,
    batch_id: &'a str,
    merge: Merge,
    seg_next: Option<(u64, Vec<u8>)>,
    pending: std::vec::IntoIter<u64>,
    pending_rows: std::collections::VecDeque<(u64, Vec<u8>)>,
}

impl Rows<'_> {
    /// The next row, or `Err(None)` when a pending row moved meanwhile (the snapshot is stale).
    async fn next(&mut self) -> anyhow::Result<Option<Option<(u64, Vec<u8>)>>> {
        if self.pending_rows.is_empty() {
            let lines: Vec<u64> = self.pending.by_ref().take(PENDING_CHUNK).collect();
            let rows = self
                .state
                .store
                .pending_rows(self.batch_id, &lines)
                .await
                .context("Failed to read pending rows")?;
            for (line, row) in lines.into_iter().zip(rows) {
                match row {
                    Some(r) => self.pending_rows.push_back((line, r)),
                    None => return Ok(None),
                }
            }
        }
        let take_pending = match (&self.seg_next, self.pending_rows.front()) {
            (None, None) => return Ok(Some(None)),
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (Some((s, _)), Some((p, _))) => p < s,
        };
        if take_pending {
            return Ok(Some(self.pending_rows.pop_front()));
        }
        let out = self.seg_next.take();
        self.seg_next = self.merge.next().await?.map(|(l, r)| (l, r.to_vec()));
        Ok(Some(out))
    }
}

/// One page from a fresh snapshot; None if the snapshot went stale while reading.
async fn build_page(
    state: &AppState,
    batch_id: &str,
    filter: &Filter,
) -> anyhow::Result<Option<Page>> {
    let (segments, mut pending) = state
        .store
        .rows_snapshot(batch_id)
        .await
        .context("Failed to read a batch's rows")?;
    let from = match filter.after {
        After::Line(l) => Some(l),
        _ => None,
    };
    let segments: Vec<SegmentRecord> = segments
        .into_iter()
        .filter(|s| from.is_none_or(|f| s.last > f))
        .collect();
    pending.retain(|l| from.is_none_or(|f| *l > f));
    pending.sort_unstable();
    let mut merge = Merge::open(&state.files, batch_id, &segments).await?;
    let seg_next = merge.next().await?.map(|(l, r)| (l, r.to_vec()));
    let mut rows = Rows {
        state,
        batch_id,
        merge,
        seg_next,
        pending: pending.into_iter(),
        pending_rows: Default::default(),
    };
    let mut past_cursor = !matches!(filter.after, After::CustomId(_));
    let (mut chunks, mut n, mut bytes) = (Vec::new(), 0usize, 0u64);
    let mut next_after = from;
    loop {
        let Some(next) = rows.next().await? else {
            return Ok(None);
        };
        let Some((line, stored)) = next else {
            return Ok(Some(Page {
                chunks,
                next_after,
                has_more: false,
            }));
        };
        if from.is_some_and(|f| line <= f) {
            continue;
        }
        if n >= filter.limit || bytes >= filter.max_bytes {
            return Ok(Some(Page {
                chunks,
                next_after,
                has_more: true,
            }));
        }
        let Some((ok, text)) = Row::decode(&stored) else {
            continue;
        };
        if !past_cursor {
            if let After::CustomId(c) = &filter.after
                && custom_id_of(text).as_deref() == Some(c.as_str())
            {
                past_cursor = true;
            }
            next_after = Some(line);
            continue;
        }
        next_after = Some(line);
        if filter.ok.is_some_and(|want| want != ok) {
            continue;
        }
        if let Some(want) = &filter.custom_id
            && custom_id_of(text).as_deref() != Some(want.as_str())
        {
            continue;
        }
        let mut chunk = Vec::with_capacity(text.len() + 1);
        chunk.extend_from_slice(text);
        chunk.push(b'\n');
        bytes += chunk.len() as u64;
        chunks.push(Bytes::from(chunk));
        n += 1;
        if filter.custom_id.is_some() {
            // custom_id names one line.
            return Ok(Some(Page {
                chunks,
                next_after,
                has_more: false,
            }));
        }
    }
}

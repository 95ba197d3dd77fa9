//! An inline body over `limits.max_json_body_bytes`: parsed as a stream on a blocking thread
//! while its requests stream, as input lines, into the line checker.

use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;

use super::stream_parse::{ParseStop, StreamParse};
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::routes::batches::create::input_lines::store_lines;
use crate::routes::batches::create::too_large::{inline_too_large, json_too_large};
use crate::routes::batches::params::CreateBatch;
use crate::routes::batches::record::store_reserved;
use crate::routes::batches::reservation::{release_batch, reserve_batch};
use crate::state::AppState;

/// Bytes of a request body queued between the connection and the parser.
const BODY_CHUNKS_QUEUED: usize = 4;
/// Request lines queued between the parser and the line checker.
const LINES_QUEUED: usize = 16;

/// `POST /v1/batches` with `requests`, for a body over `limits.max_json_body_bytes`: parsed as a
/// stream on a blocking thread, element by element, each request becoming one input line as it
/// arrives, so memory is about one request whatever the body size. `head` is what was read of the
/// body already. Fields other than `requests` are read as they come, except that an `endpoint`
/// must come before `requests` (the lines name it); a body with `input_file_id`, or of no known
/// form, is the plain create and gets 413 above its cap.
pub(crate) async fn create<S>(
    state: &AppState,
    tenant: &Tenant,
    head: Bytes,
    mut rest: S,
) -> Result<Value, ApiError>
where
    S: futures::Stream<Item = Result<Bytes, ApiError>> + Send + Unpin,
{
    let limits = &state.settings.limits;
    if head.trim_ascii_start().first() != Some(&b'{') {
        return Err(json_too_large(limits.max_json_body_bytes));
    }
    let body_limit = limits.max_inline_body_bytes;
    let batch_id = reserve_batch(state, tenant).await?;
    let (body_tx, body_rx) = tokio::sync::mpsc::channel(BODY_CHUNKS_QUEUED);
    let (line_tx, line_rx) = tokio::sync::mpsc::channel(LINES_QUEUED);
    let parse = StreamParse {
        limits: limits.clone(),
        bounds: state.settings.window_bounds(),
    };
    let parser = tokio::task::spawn_blocking(move || parse.run(body_rx, line_tx));

    let feed = async move {
        let mut bytes = head.len() as u64;
        let mut next = Some(Ok(head));
        while let Some(chunk) = next {
            if body_tx.send(chunk).await.is_err() {
                return;
            }
            next = match rest.next().await {
                Some(Ok(chunk)) => {
                    bytes += chunk.len() as u64;
                    Some(if bytes > body_limit {
                        Err(inline_too_large(body_limit))
                    } else {
                        Ok(chunk)
                    })
                }
                other => other,
            };
            if next.as_ref().is_some_and(Result::is_err) {
                // The error goes through; then nothing more.
                if let Some(e) = next.take() {
                    let _sent = body_tx.send(e).await;
                }
            }
        }
    };
    let lines = Box::pin(futures::stream::unfold(line_rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let store = store_lines(
        state,
        tenant,
        lines,
        None,
        "inline-requests.jsonl",
        true,
        body_limit,
    );
    let ((), stored) = futures::join!(feed, store);
    let parsed = parser.await.unwrap_or_else(|e| {
        Err(ParseStop::Failed(
            anyhow::anyhow!("the request parser panicked: {e}").into(),
        ))
    });
    let outcome = match (parsed, stored) {
        // The checker stopped reading first (its verdict is the answer).
        (Err(ParseStop::LinesClosed), stored) => stored.and_then(|_| {
            Err(anyhow::anyhow!("the line checker stopped before the requests ended").into())
        }),
        (Err(ParseStop::Failed(e)), _) => Err(e),
        (Ok(_), Err(e)) => Err(e),
        (Ok(fields), Ok(stored)) => Ok((fields, stored)),
    };
    let (fields, stored) = match outcome {
        Ok(done) => done,
        Err(e) => {
            release_batch(state, tenant, &batch_id).await;
            return Err(e);
        }
    };
    let params = CreateBatch {
        input_file_id: stored.file_id,
        endpoint: stored.endpoint,
        completion_window: fields.completion_window,
        window: fields.window,
        metadata: fields.metadata,
        output_expires_after_secs: fields.output_expires_after_secs,
        priority: None,
    };
    store_reserved(state, tenant, &batch_id, params).await
}

//! `POST /v1/batches` with a JSONL body: one request per line, checked at once.
//!
//! The lines stream into a new input file while each is checked exactly as the dispatcher will
//! check it ([`store_lines`]); only then is the batch created like any other, so list, get,
//! cancel and the result files behave the same.

use bytes::Bytes;
use futures::Stream;
use serde_json::Value;

use super::defaults::default_window;
use super::input_lines::store_lines;
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::routes::batches::params::CreateBatch;
use crate::routes::batches::record::store_reserved;
use crate::routes::batches::reservation::{release_batch, reserve_batch};
use crate::state::AppState;

/// `POST /v1/batches` with a JSONL body: one request per line.
pub(crate) async fn create<S>(
    state: &AppState,
    tenant: &Tenant,
    chunks: S,
) -> Result<Value, ApiError>
where
    S: Stream<Item = Result<Bytes, ApiError>> + Send + Unpin,
{
    let batch_id = reserve_batch(state, tenant).await?;
    let limit = state.settings.limits.max_jsonl_body_bytes;
    let stored =
        match store_lines(state, tenant, chunks, None, "requests.jsonl", false, limit).await {
            Ok(stored) => stored,
            Err(e) => {
                release_batch(state, tenant, &batch_id).await;
                return Err(e);
            }
        };
    let (completion_window, window) = default_window(state);
    let params = CreateBatch {
        input_file_id: stored.file_id,
        endpoint: stored.endpoint,
        completion_window,
        window,
        metadata: None,
        output_expires_after_secs: None,
        priority: None,
    };
    store_reserved(state, tenant, &batch_id, params).await
}

//! The parent's original request lines whose rows a retry takes, streamed in input order.

use anyhow::Context;
use axum::body::Bytes;
use axum::http::StatusCode;
use futures::{Stream, StreamExt};
use object_store::path::Path;
use sluice_core::domain::{Batch, Row};
use sluice_runtime::lines::RequestLines;
use sluice_runtime::segments::Merge;

use super::choice::Choice;
use crate::auth::Tenant;
use crate::error::ApiError;
use crate::routes::files::lookup::load_file;
use crate::state::AppState;

/// The parent's original request lines (each ending in `\n`) whose rows `choice` takes, in
/// input order.
pub(super) async fn chosen_lines(
    state: &AppState,
    tenant: &Tenant,
    parent: &Batch,
    choice: Choice,
) -> Result<futures::stream::BoxStream<'static, Result<Bytes, ApiError>>, ApiError> {
    let batch_id = parent.id.as_deref().unwrap_or_default().to_owned();
    let (segments, pending) = state
        .store
        .rows_snapshot(&batch_id)
        .await
        .context("Failed to read a batch's rows")?;
    if segments.is_empty() {
        // No line ever ran (it failed validation, or stopped first): nothing to read.
        return Ok(futures::stream::empty().boxed());
    }
    // Finalize moves every row into segments before the batch turns terminal.
    if !pending.is_empty() {
        return Err(anyhow::anyhow!(
            "finished batch {batch_id} still has {} rows in Redis",
            pending.len()
        )
        .into());
    }
    let input_id = parent.input_file_id.as_deref().unwrap_or_default();
    let unavailable = || ApiError::Coded {
        status: StatusCode::CONFLICT,
        message: format!(
            "The input file '{input_id}' of batch '{batch_id}' is no longer available (deleted \
             or expired), so its requests cannot be retried."
        ),
        param: None,
        code: "input_file_unavailable",
        errors: None,
    };
    let input = load_file(state, tenant, input_id)
        .await
        .map_err(|e| match e {
            ApiError::NotFound { .. } | ApiError::InvalidRequest { .. } => unavailable(),
            other => other,
        })?;
    let max_line = state.settings.limits.max_line_bytes as usize;
    let requests = match RequestLines::open(&state.files, &Path::from(input.path()), max_line).await
    {
        Ok(lines) => lines,
        Err(object_store::Error::NotFound { .. }) => return Err(unavailable()),
        Err(e) => {
            return Err(anyhow::Error::new(e)
                .context("Failed to open a batch's input file")
                .into());
        }
    };
    let merge = Merge::open(&state.files, &batch_id, &segments)
        .await
        .context("Failed to read a batch's rows")?;
    Ok(Selection {
        batch_id,
        merge,
        requests,
        choice,
    }
    .into_stream()
    .boxed())
}

/// Rows in line order next to the input lines, one pass over each.
struct Selection {
    batch_id: String,
    merge: Merge,
    requests: RequestLines,
    choice: Choice,
}

impl Selection {
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, ApiError>> + Send + 'static {
        futures::stream::try_unfold(self, |mut s| async move {
            let next = s.next_line().await.map_err(|e| {
                ApiError::from(e.context("Failed to read the lines of a batch to retry"))
            })?;
            Ok(next.map(|line| (line, s)))
        })
    }

    /// The next chosen line, with its newline.
    async fn next_line(&mut self) -> anyhow::Result<Option<Bytes>> {
        while let Some((index, stored)) = self.merge.next().await? {
            let Some((ok, text)) = Row::decode(stored) else {
                continue;
            };
            if ok || !self.choice.takes(text) {
                continue;
            }
            loop {
                let Some(request) = self.requests.next_line().await? else {
                    anyhow::bail!("the input of {} has no line {index}", self.batch_id);
                };
                anyhow::ensure!(
                    request.index <= index,
                    "line {index} of {} is missing from its input",
                    self.batch_id
                );
                if request.index == index {
                    let mut line = Vec::with_capacity(request.bytes.len() + 1);
                    line.extend_from_slice(&request.bytes);
                    line.push(b'\n');
                    return Ok(Some(Bytes::from(line)));
                }
            }
        }
        Ok(None)
    }
}

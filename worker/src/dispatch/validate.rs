//! Pass one: every line of the input file checked; the batch fails with every error, or moves to
//! `in_progress`.

use sluice_core::domain::{Batch, BatchError, BatchStatus, now_secs};
use sluice_core::validate::Validator;
use sluice_runtime::lines::RequestLines;
use sluice_store::Transition;

use crate::WorkerContext;

/// Pass one: checks every line. Fails the batch with every error, or moves it to `in_progress`.
pub(super) async fn validate(
    ctx: &WorkerContext,
    batch_id: &str,
    meta: &Batch,
) -> anyhow::Result<bool> {
    let endpoint = meta.endpoint.as_deref().unwrap_or_default().to_owned();
    let input_id = meta.input_file_id.as_deref().unwrap_or_default().to_owned();
    let mut file = ctx
        .store
        .get_file(&input_id)
        .await?
        .filter(|f| f.tenant() == meta.tenant.as_str());
    // An expired file is one the expiry sweep may delete any time: only a batch that took it
    // before it expired (the sweep waits for those) may read it.
    if file.as_ref().is_some_and(|f| f.expired(now_secs()))
        && !ctx.store.is_file_user(&input_id, batch_id).await?
    {
        file = None;
    }
    let opened = match &file {
        Some(f) => RequestLines::open(
            &ctx.objects,
            &f.path().into(),
            ctx.settings.limits.max_line_bytes as usize,
        )
        .await
        .ok(),
        None => None,
    };
    let Some(mut lines) = opened else {
        let error = BatchError {
            code: "invalid_request".into(),
            message: format!(
                "Cannot find file {input_id}, or your organization does not have access to it."
            ),
            // OpenAI names the parameter `file_id` here, and clients match on it.
            param: Some("file_id".into()),
            line: None,
        };
        fail(ctx, batch_id, meta, vec![error]).await?;
        return Ok(false);
    };
    if file.as_ref().and_then(|f| f.get("purpose")) != Some("batch") {
        let error = BatchError {
            code: "invalid_request".into(),
            message: format!("File {input_id} does not have purpose 'batch'."),
            param: Some("input_file_id".into()),
            line: None,
        };
        fail(ctx, batch_id, meta, vec![error]).await?;
        return Ok(false);
    }
    let serves = |model: &str| sluice_core::validate::check_model(&ctx.settings, model, &endpoint);
    let mut validator = Validator::new(&endpoint, &ctx.settings.limits, &serves)
        .one_model_per_batch(ctx.settings.one_model_per_batch(meta.tenant.as_str()));
    // Stops at `max_lines + 1` lines: a longer file fails whatever the rest holds, and reading
    // on would only cost time (the errors kept are bounded either way).
    while !validator.done()
        && let Some(line) = lines.next_line().await?
    {
        validator.check(&line);
    }
    let verdict = validator.finish();
    if !verdict.errors.is_empty() {
        fail(ctx, batch_id, meta, verdict.errors).await?;
        return Ok(false);
    }
    let mut extra = vec![
        ("total", verdict.lines.to_string()),
        ("dispatched", "0".to_owned()),
    ];
    // A batch whose lines name different models has none: its `model` stays null, and workers
    // route each line by its own.
    if let Some(model) = verdict.model {
        extra.push(("model", model));
    }
    match ctx
        .store
        .transition(batch_id, BatchStatus::InProgress, &extra)
        .await?
    {
        Transition::Applied(_) => Ok(true),
        // Cancelled or expired while validating: the aggregator ends it with no lines.
        Transition::Refused(_) => Ok(false),
    }
}

async fn fail(
    ctx: &WorkerContext,
    batch_id: &str,
    meta: &Batch,
    errors: Vec<BatchError>,
) -> anyhow::Result<()> {
    let errors = serde_json::json!({"object": "list", "data": errors}).to_string();
    // Before the status: once it is written, its event must already be in the broker.
    crate::webhooks::announce(ctx, batch_id, meta.tenant.as_str(), BatchStatus::Failed).await?;
    if let Transition::Applied(_) = ctx
        .store
        .transition(batch_id, BatchStatus::Failed, &[("errors", errors)])
        .await?
    {
        ctx.metrics
            .batches_finished
            .with_label_values(&["failed"])
            .inc();
        ctx.store
            .retire_batch(batch_id, ctx.settings.aggregator.rows_ttl_secs)
            .await?;
    }
    Ok(())
}

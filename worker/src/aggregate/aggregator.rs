//! The aggregator: turns finished batches into output and error files and terminal statuses, and
//! runs the sweep that expires batches and recovers from lost events or dead replicas.
//!
//! Several replicas may run at once. Each batch is finalized under a lease, and everything the
//! finalize writes is derived from the batch id (file paths and file ids), so a replica that dies
//! mid-finalize leaves nothing half-visible: object stores publish an object only when its upload
//! completes, and the next replica overwrites the same paths and registers the same ids.

use std::time::{Duration, Instant};

use lapin::options::BasicAckOptions;
use object_store::buffered::BufWriter;
use sluice_core::domain::{
    Batch, BatchEvent, BatchStatus, Row, StopReason, batch_field, now_millis, now_secs,
    result_file_ids,
};
use sluice_runtime::segments::Merge;
use sluice_runtime::storage::result_path;
use sluice_store::Transition;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::WorkerContext;
use crate::lease::Lease;
use sluice_core::lines::LineProbe;
use sluice_runtime::lines::RequestLines;

/// Rows filled per script call, and rows merged between two looks at the lease.
const ROW_CHUNK: u64 = 1_000;
/// Part size of the result files' multipart writes (S3's minimum part is 5 MiB).
const WRITE_PART_BYTES: usize = 8 * 1024 * 1024;

/// Runs the finalize-event consumer and the sweep until `shutdown`.
pub(crate) async fn run(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let sweep = tokio::spawn(sweep_loop(ctx.clone(), shutdown.clone()));
    let c = ctx.clone();
    let s = shutdown.clone();
    sluice_broker::consumer::supervise("aggregator", shutdown.clone(), move || {
        consume_events(c.clone(), s.clone())
    })
    .await;
    sweep.await?;
    Ok(())
}

async fn consume_events(ctx: WorkerContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let queue = ctx.keys.finalize_queue();
    sluice_broker::consumer::consume_each(
        &ctx.settings,
        "sluice-aggregator",
        &queue,
        8,
        &shutdown,
        |delivery| {
            let ctx = ctx.clone();
            async move {
                if let Ok(event) = serde_json::from_slice::<BatchEvent>(&delivery.data)
                    && let Err(e) = finalize_if_ready(&ctx, &event.batch_id).await
                {
                    // The sweep retries it; the event itself carries nothing more.
                    tracing::warn!(batch_id = %event.batch_id, error = %e, "Finalize failed; the sweep will retry.");
                }
                if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                    tracing::debug!(error = %e, "Could not ack a finalize event.");
                }
            }
        },
    )
    .await
}

async fn sweep_loop(ctx: WorkerContext, shutdown: CancellationToken) {
    let period = Duration::from_millis(ctx.settings.aggregator.sweep_interval_ms);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if let Err(e) = sweep(&ctx).await {
            tracing::warn!(error = %e, "Sweep failed.");
        }
        if let Err(e) = super::lifecycle::sweep(&ctx).await {
            tracing::warn!(error = %e, "Lifecycle sweep failed.");
        }
    }
}

/// One pass over every non-terminal batch: expire what is due, re-dispatch what is stuck, and
/// finalize whatever is ready but was missed.
pub(crate) async fn sweep(ctx: &WorkerContext) -> anyhow::Result<()> {
    let now = now_secs();
    for (batch_id, expires_at) in ctx.store.active_batches().await? {
        let Some(meta) = ctx.store.get_batch(&batch_id).await? else {
            ctx.store.retire_batch(&batch_id, 0).await?;
            continue;
        };
        let status = meta.status;
        if status.is_some_and(BatchStatus::is_terminal) {
            ctx.store
                .retire_batch(&batch_id, ctx.settings.aggregator.rows_ttl_secs)
                .await?;
            continue;
        }
        if now >= expires_at
            && ctx
                .store
                .mark_stopping(&batch_id, StopReason::Expired)
                .await?
        {
            tracing::info!(%batch_id, "Batch passed its completion window; expiring.");
        }
        if status == Some(BatchStatus::Validating) && meta.stopping.is_none() {
            redispatch_if_stuck(ctx, &batch_id, &meta).await?;
            continue;
        }
        if status == Some(BatchStatus::InProgress)
            && meta.stopping.is_none()
            && meta.dispatched.unwrap_or(0) < meta.total.unwrap_or(0)
        {
            // A dispatcher died mid-enqueue, or while topping up the batch's window (it stamps
            // `dispatch_alive_ms` as it goes). Its control message came back while its lease was
            // still alive, or was already acked: nothing else would publish the remaining lines.
            redispatch_if_stuck(ctx, &batch_id, &meta).await?;
        }
        if let Err(e) = finalize_if_ready(ctx, &batch_id).await {
            tracing::warn!(%batch_id, error = %e, "Finalize failed; retrying on the next sweep.");
        }
    }
    Ok(())
}

/// A batch still `validating` long after creation lost its control message (the API died before
/// publishing it, or the message hit its delivery limit), and a batch `in_progress` whose lines are
/// not all enqueued lost its dispatcher: publish the dispatch again once no dispatcher holds the
/// batch's lease (the dispatcher resumes from the `dispatched` checkpoint).
async fn redispatch_if_stuck(
    ctx: &WorkerContext,
    batch_id: &str,
    meta: &Batch,
) -> anyhow::Result<()> {
    let created_ms = meta.stamps.created_at.unwrap_or(0) * 1000;
    let last_ms = meta
        .redispatched_at_ms
        .unwrap_or(created_ms)
        .max(meta.dispatch_alive_ms.unwrap_or(0));
    let after = ctx.settings.aggregator.redispatch_after_ms as i64;
    if now_millis() - last_ms < after {
        return Ok(());
    }
    let lease_busy = ctx
        .store
        .acquire_lease(
            &ctx.keys.batch_dispatch_lease(batch_id),
            Duration::from_millis(1),
        )
        .await?;
    if lease_busy.is_none() {
        return Ok(()); // a dispatcher is on it right now
    }
    tracing::info!(%batch_id, "Batch dispatch stuck; publishing its dispatch again.");
    ctx.store
        .set_batch_fields(
            batch_id,
            &[(batch_field::REDISPATCHED_AT_MS, now_millis().to_string())],
        )
        .await?;
    let event = serde_json::to_vec(&BatchEvent {
        batch_id: batch_id.to_owned(),
    })?;
    ctx.publisher
        .publish(&ctx.keys.control_queue(), &event)
        .await?;
    Ok(())
}

/// What a batch needs from the aggregator right now.
enum Next {
    Nothing,
    Complete,
    Stop(StopReason),
}

fn next_step(meta: &Batch) -> Next {
    match (meta.status, meta.stopping) {
        (Some(BatchStatus::Finalizing), _) => Next::Complete,
        (Some(BatchStatus::InProgress), None) if meta.total().is_some_and(|t| meta.done() >= t) => {
            Next::Complete
        }
        (Some(BatchStatus::Cancelling), _) => Next::Stop(StopReason::Cancelled),
        (Some(BatchStatus::InProgress | BatchStatus::Validating), Some(reason)) => {
            Next::Stop(reason)
        }
        _ => Next::Nothing,
    }
}

/// Finalizes `batch_id` if it is ready and no other replica is on it.
pub(crate) async fn finalize_if_ready(ctx: &WorkerContext, batch_id: &str) -> anyhow::Result<()> {
    let Some(meta) = ctx.store.get_batch(batch_id).await? else {
        return Ok(());
    };
    if matches!(next_step(&meta), Next::Nothing) {
        // Not done yet: its finished rows may be due to leave Redis.
        super::compaction::compact_if_due(ctx, batch_id).await?;
        // The batch's last row may have landed meanwhile, and its finalize event found the lease
        // held by this compaction: finish it now rather than at the next sweep.
        match ctx.store.get_batch(batch_id).await? {
            Some(meta) if !matches!(next_step(&meta), Next::Nothing) => {}
            _ => return Ok(()),
        }
    }
    let ttl = Duration::from_millis(ctx.settings.aggregator.lease_ms);
    let Some(lease) = Lease::acquire(&ctx.store, ctx.keys.batch_lease(batch_id), ttl).await? else {
        return Ok(());
    };
    let result = finalize_leased(ctx, batch_id, &lease).await;
    lease.release().await;
    result
}

async fn finalize_leased(ctx: &WorkerContext, batch_id: &str, lease: &Lease) -> anyhow::Result<()> {
    // Read again under the lease: the state may have moved since the unlocked look.
    let Some(meta) = ctx.store.get_batch(batch_id).await? else {
        return Ok(());
    };
    let started = Instant::now();
    let terminal = match next_step(&meta) {
        Next::Nothing => return Ok(()),
        Next::Complete => {
            if meta.status == Some(BatchStatus::InProgress)
                && let Transition::Refused(_) = ctx
                    .store
                    .transition(batch_id, BatchStatus::Finalizing, &[])
                    .await?
            {
                return Ok(()); // a cancel or expiry won the race; the next event handles it
            }
            BatchStatus::Completed
        }
        Next::Stop(reason) => {
            if meta.stamps.in_progress_at.is_none() {
                // Stopped before any line was enqueued: it ends with no lines and no files.
                return end(
                    ctx,
                    batch_id,
                    &meta,
                    reason.terminal_status(),
                    None,
                    None,
                    started,
                )
                .await;
            }
            if ctx.store.live_inflight(batch_id, now_millis()).await? > 0 {
                return Ok(()); // the last in-flight row write sends another event
            }
            if !fill_missing(ctx, batch_id, &meta, reason, lease).await? {
                return Ok(());
            }
            reason.terminal_status()
        }
    };
    let Some(meta) = ctx.store.get_batch(batch_id).await? else {
        return Ok(());
    };
    // No row can be added any more (every line has its bit): move the rest into segments.
    if !super::compaction::compact_all(ctx, batch_id, lease).await? {
        return Ok(());
    }
    let Some((output, errors)) = write_files(ctx, batch_id, &meta, lease).await? else {
        return Ok(());
    };
    // Only registered segments count; the rest is dead weight from compactions that died.
    if let Err(e) = super::compaction::delete_orphans(ctx, batch_id).await {
        tracing::warn!(%batch_id, error = %e, "Could not delete orphan segments.");
    }
    end(ctx, batch_id, &meta, terminal, output, errors, started).await
}

async fn end(
    ctx: &WorkerContext,
    batch_id: &str,
    meta: &Batch,
    terminal: BatchStatus,
    output: Option<String>,
    errors: Option<String>,
    started: Instant,
) -> anyhow::Result<()> {
    let mut extra = Vec::new();
    if let Some(id) = output {
        extra.push((batch_field::OUTPUT_FILE_ID, id));
    }
    if let Some(id) = errors {
        extra.push((batch_field::ERROR_FILE_ID, id));
    }
    if meta.total().is_none() {
        extra.push((batch_field::TOTAL, "0".to_owned()));
    }
    // Before the status: once it is written, its event must already be in the broker.
    crate::webhooks::announce(ctx, batch_id, meta.tenant.as_str(), terminal).await?;
    if let Transition::Applied(_) = ctx.store.transition(batch_id, terminal, &extra).await? {
        if ctx.settings.aggregator.exit_after_terminal_status {
            tracing::error!(%batch_id, "Exiting right after a terminal status (fault injection).");
            std::process::exit(86);
        }
        ctx.metrics
            .batches_finished
            .with_label_values(&[terminal.as_str()])
            .inc();
        ctx.metrics
            .finalize_seconds
            .with_label_values(&[terminal.as_str()])
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(%batch_id, status = terminal.as_str(), "Batch finished.");
    }
    ctx.store
        .retire_batch(batch_id, ctx.settings.aggregator.rows_ttl_secs)
        .await?;
    Ok(())
}

/// Gives every line without a row the stop reason's error, reading custom ids from the input file.
/// False if the batch stopped accepting rows meanwhile (another replica finished it).
async fn fill_missing(
    ctx: &WorkerContext,
    batch_id: &str,
    meta: &Batch,
    reason: StopReason,
    lease: &Lease,
) -> anyhow::Result<bool> {
    let total = meta.total().unwrap_or(0);
    if meta.done() >= total {
        return Ok(true);
    }
    let (code, message) = reason.line_error();
    let input = ctx
        .store
        .get_file(meta.input_file_id.as_deref().unwrap_or_default())
        .await?;
    let mut lines = match &input {
        Some(f) => match RequestLines::open(
            &ctx.objects,
            &object_store::path::Path::from(f.path()),
            ctx.settings.limits.max_line_bytes as usize,
        )
        .await
        {
            Ok(lines) => Some(lines),
            // Bytes lost by storage: the batch must still end, with empty custom ids.
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        },
        None => None,
    };
    let mut chunk = Vec::with_capacity(ROW_CHUNK as usize);
    let mut index = 0u64;
    while index < total {
        // The input file may have been deleted since; its lines then get an empty custom_id.
        let custom_id = match lines.as_mut() {
            Some(l) => match l.next_line().await? {
                Some(line) => LineProbe::parse(&line.bytes)
                    .and_then(|p| p.custom_id())
                    .unwrap_or_default(),
                None => String::new(),
            },
            None => String::new(),
        };
        chunk.push((index, Row::error(&custom_id, code, message)));
        index += 1;
        if chunk.len() as u64 >= ROW_CHUNK || index == total {
            if lease.is_lost() || ctx.store.fill_rows(batch_id, &chunk).await?.is_none() {
                return Ok(false);
            }
            chunk.clear();
            // A large stopped batch fills many rows: they leave Redis as they go.
            if let Some(meta) = ctx.store.get_batch(batch_id).await?
                && super::compaction::due(ctx, &meta)
            {
                super::compaction::compact_once(ctx, batch_id, lease).await?;
            }
        }
    }
    Ok(true)
}

/// Streams the rows, in input order (a k-way merge of the batch's segments), into the output and
/// error files and registers them. Returns the two file ids (None where a file would be empty),
/// or None if the lease was lost.
async fn write_files(
    ctx: &WorkerContext,
    batch_id: &str,
    meta: &Batch,
    lease: &Lease,
) -> anyhow::Result<Option<(Option<String>, Option<String>)>> {
    let total = meta.total().unwrap_or(0);
    let (output_id, error_id) = result_file_ids(batch_id);
    let out_path = result_path(batch_id, "output");
    let err_path = result_path(batch_id, "errors");
    // Parts in flight are bounded too: memory is the merge's readers plus a few parts, whatever
    // the batch's size.
    let writer = |path: &object_store::path::Path| {
        BufWriter::with_capacity(ctx.objects.clone(), path.clone(), WRITE_PART_BYTES)
            .with_max_concurrency(2)
    };
    let Some(segments) = super::compaction::merge_down(ctx, batch_id, lease).await? else {
        return Ok(None);
    };
    let (mut out, mut err) = (writer(&out_path), writer(&err_path));
    let (mut out_bytes, mut err_bytes) = (0u64, 0u64);
    let errors_in_output = ctx
        .settings
        .tenants
        .iter()
        .any(|t| t.id == meta.tenant.as_str() && t.errors_in_output);
    let mut merge = Merge::open(&ctx.objects, batch_id, &segments).await?;
    let mut expected = 0u64;
    while let Some((line, stored)) = merge.next().await? {
        anyhow::ensure!(
            line == expected,
            "row {expected} of {batch_id} is missing at finalize"
        );
        expected += 1;
        let (ok, text) = Row::decode(stored)
            .ok_or_else(|| anyhow::anyhow!("row {line} of {batch_id} is empty"))?;
        let (writer, bytes) = if ok {
            (&mut out, &mut out_bytes)
        } else {
            (&mut err, &mut err_bytes)
        };
        writer.write_all(text).await?;
        writer.write_all(b"\n").await?;
        *bytes += text.len() as u64 + 1;
        if !ok && errors_in_output {
            let failed = with_error_set(text)?;
            out.write_all(&failed).await?;
            out.write_all(b"\n").await?;
            out_bytes += failed.len() as u64 + 1;
        }
        if line % ROW_CHUNK == 0 && lease.is_lost() {
            out.abort().await.ok();
            err.abort().await.ok();
            return Ok(None);
        }
    }
    anyhow::ensure!(
        expected == total,
        "row {expected} of {batch_id} is missing at finalize"
    );
    if lease.is_lost() {
        out.abort().await.ok();
        err.abort().await.ok();
        return Ok(None);
    }
    let created_at = now_secs();
    let expires_at = created_at + meta.output_expires_after_secs.unwrap_or(30 * 86_400);
    let mut ids = (None, None);
    for (writer, bytes, id, path, kind, slot) in [
        (
            &mut out, out_bytes, &output_id, &out_path, "output", &mut ids.0,
        ),
        (
            &mut err, err_bytes, &error_id, &err_path, "error", &mut ids.1,
        ),
    ] {
        if bytes == 0 {
            writer.abort().await.ok();
            continue;
        }
        writer.shutdown().await?;
        ctx.store
            .put_file(
                id,
                meta.tenant.as_str(),
                &[
                    ("bytes", bytes.to_string()),
                    ("created_at", created_at.to_string()),
                    ("expires_at", expires_at.to_string()),
                    ("filename", format!("{batch_id}_{kind}.jsonl")),
                    ("purpose", "batch_output".to_owned()),
                    ("path", path.to_string()),
                ],
            )
            .await?;
        *slot = Some(id.clone());
    }
    Ok(Some(ids))
}

/// A failed result line with `error` set (from the upstream's answer when the line has none), for
/// output files that carry failures too.
/// A row that does not parse (one stored by an older build, nested past the parser's limit) is
/// written as it is: failing here would fail the finalize again on every attempt.
fn with_error_set(line: &[u8]) -> anyhow::Result<Vec<u8>> {
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(line) else {
        return Ok(line.to_vec());
    };
    if value.get("error").is_none_or(serde_json::Value::is_null) {
        value["error"] = sluice_core::domain::failure_of(&value);
    }
    Ok(serde_json::to_vec(&value)?)
}

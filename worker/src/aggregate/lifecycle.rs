//! The lifecycle sweep: deletes files past their `expires_at` (stored bytes, then record) and
//! removes batch records `lifecycle.batch_retention_secs` after their batch ended.
//!
//! Both read an index sorted by due time ([`sluice_store::lifecycle_store`]), never a scan of
//! every object. One replica at a time runs a pass (a short lease spaces passes out), but every
//! step is idempotent, so two replicas racing on the same file or batch do no harm: deleting
//! bytes or keys already gone is a no-op, and a file's bytes go back to its tenant's quota once.
//!
//! An input file read by a batch that has not ended is kept past its `expires_at` until that batch
//! ends: a running batch never loses its input. It already answers 404 to its tenant (reads check
//! `expires_at`), and no new batch can take it ([`sluice_store::Store::use_file`] refuses an
//! expired file), so once its last reader ends nobody can start reading it again.

use std::time::Duration;

use object_store::ObjectStoreExt;
use object_store::path::Path;
use sluice_core::domain::{now_millis, now_secs};
use sluice_store::file_users::FileDelete;

use crate::WorkerContext;

/// A batch that took a file this long ago and is still not stored was left by a crash.
const USE_GRACE_MS: i64 = 60_000;
/// Bounds of the wait before an expired file still read by a running batch is looked at again
/// (ten sweep periods in between).
const IN_USE_RETRY_SECS: std::ops::RangeInclusive<i64> = 1..=60;

/// One pass, if no other replica is running one: expired files, then ended batches.
pub(crate) async fn sweep(ctx: &WorkerContext) -> anyhow::Result<()> {
    let period = Duration::from_millis(ctx.settings.aggregator.sweep_interval_ms);
    // Not released: it lapses on its own, so the fleet runs about one pass per period.
    if ctx
        .store
        .acquire_lease(&ctx.keys.lifecycle_lease(), period)
        .await?
        .is_none()
    {
        return Ok(());
    }
    // One failing does not hold the other back.
    let files = expire_files(ctx).await;
    let batches = remove_ended_batches(ctx).await;
    files.and(batches)
}

/// Deletes the files whose `expires_at` has passed, up to `lifecycle.sweep_limit` of them.
pub(crate) async fn expire_files(ctx: &WorkerContext) -> anyhow::Result<()> {
    let now = now_secs();
    let store = &ctx.store;
    let retry = (ctx.settings.aggregator.sweep_interval_ms as i64 * 10 / 1000)
        .clamp(*IN_USE_RETRY_SECS.start(), *IN_USE_RETRY_SECS.end());
    for id in store
        .expired_files(now, ctx.settings.lifecycle.sweep_limit)
        .await?
    {
        let Some(meta) = store.get_file(&id).await? else {
            store.reschedule_expiry(&id, None).await?;
            continue;
        };
        match meta.get("expires_at").and_then(|e| e.parse::<i64>().ok()) {
            Some(at) if at <= now => {}
            // Not due (or never): the index follows the record.
            at => {
                store.reschedule_expiry(&id, at).await?;
                continue;
            }
        }
        store
            .prune_file_users(&id, now_millis() - USE_GRACE_MS)
            .await?;
        if store.file_user_count(&id).await? > 0 {
            store.reschedule_expiry(&id, Some(now + retry)).await?;
            continue;
        }
        // Bytes first: should the record go first and this replica die, nothing would point at
        // the bytes any more. The other way round the next pass finds the record and retries.
        let path = meta.path();
        if !path.is_empty() {
            let path = Path::parse(path).unwrap_or_else(|_| Path::from(path));
            match ctx.objects.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(file_id = %id, error = %e, "Failed to delete an expired file's bytes; retrying on the next pass.");
                    continue;
                }
            }
        }
        match store.delete_file_unless_used(&id, meta.tenant()).await? {
            FileDelete::Deleted => {
                ctx.metrics
                    .lifecycle_removed
                    .with_label_values(&["file"])
                    .inc();
                tracing::info!(file_id = %id, "File expired; deleted.");
            }
            // Not expected (an expired file cannot be taken): kept, looked at again later.
            FileDelete::InUse(_) => {
                store.reschedule_expiry(&id, Some(now + retry)).await?;
            }
        }
    }
    Ok(())
}

/// Removes the batch records whose retention has passed, up to `lifecycle.sweep_limit` of them.
pub(crate) async fn remove_ended_batches(ctx: &WorkerContext) -> anyhow::Result<()> {
    let lc = &ctx.settings.lifecycle;
    let before = now_secs() - lc.batch_retention_secs as i64;
    for id in ctx.store.ended_batches(before, lc.sweep_limit).await? {
        // Segment objects first: once the record is gone nothing would find them.
        super::compaction::delete_all(ctx, &id).await?;
        ctx.store.remove_batch(&id).await?;
        ctx.metrics
            .lifecycle_removed
            .with_label_values(&["batch"])
            .inc();
        tracing::info!(batch_id = %id, "Batch record past its retention; removed.");
    }
    Ok(())
}

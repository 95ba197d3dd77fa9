//! Compaction: a running batch's finished rows leave Redis for sorted segment objects, so Redis
//! holds O(lines in flight + one compaction window) of a batch, not O(rows).
//!
//! One compaction is three steps, each safe to die after:
//! 1. [`collect`] reads pending rows (up to `aggregator.segment_bytes`) and sorts them by line;
//! 2. [`write()`] stores them as a new segment object; dying here leaves an orphan object that is
//!    never read (only registered segments count) and is deleted with the batch's segments;
//! 3. [`register`] records the segment and deletes exactly its rows from Redis in one script,
//!    refused unless every one of them is still pending: a lapsed replica that compacted the same
//!    rows can never register them twice.
//!
//! It runs under the batch's finalize lease, so it never races a finalize on the same replica
//! set; the register script's check keeps it safe even when a lease lapses.

use std::collections::BTreeMap;
use std::time::Instant;

use object_store::ObjectStoreExt;
use object_store::buffered::BufWriter;
use sluice_core::domain::Batch;
use sluice_core::segments::{SegmentRecord, encode_record};
use sluice_runtime::segments::{Merge, new_segment_name, segment_path, segments_prefix};
use tokio::io::AsyncWriteExt;

use crate::WorkerContext;
use crate::lease::Lease;

/// Part size of segment writes (S3's minimum part is 5 MiB).
const WRITE_PART_BYTES: usize = 8 * 1024 * 1024;
/// Compaction passes one wake-up runs at most before letting finalize or other batches in.
const MAX_PASSES: usize = 16;

/// Rows collected for one segment, sorted by line.
#[derive(Debug)]
pub struct Pending {
    /// The segment as registered: its name, line range, rows and bytes.
    pub record: SegmentRecord,
    /// The rows' stored bytes, by line.
    pub rows: BTreeMap<u64, Vec<u8>>,
}

/// Whether a batch's pending rows passed a compaction threshold.
pub(crate) fn due(ctx: &WorkerContext, meta: &Batch) -> bool {
    let a = &ctx.settings.aggregator;
    meta.pending_rows >= a.compact_rows as i64 || meta.pending_bytes >= a.compact_bytes as i64
}

/// Step 1: pending rows of `batch`, up to `aggregator.segment_bytes`; None if there are none.
pub async fn collect(ctx: &WorkerContext, batch: &str) -> anyhow::Result<Option<Pending>> {
    let budget = ctx.settings.aggregator.segment_bytes;
    let mut rows = BTreeMap::new();
    let mut bytes = 0u64;
    let mut cursor = "0".to_owned();
    loop {
        let call = ctx
            .settings
            .aggregator
            .finalize_read_bytes
            .min(budget.saturating_sub(bytes))
            .max(1);
        let (next, got) = ctx
            .store
            .collect_rows(batch, &cursor, call, u64::MAX)
            .await?;
        for (line, row) in got {
            let len = row.len() as u64;
            if rows.insert(line, row).is_none() {
                bytes += len;
            }
        }
        if next == "0" || bytes >= budget {
            break;
        }
        cursor = next;
    }
    let (Some(first), Some(last)) = (
        rows.first_key_value().map(|(k, _)| *k),
        rows.last_key_value().map(|(k, _)| *k),
    ) else {
        return Ok(None);
    };
    let record = SegmentRecord {
        name: new_segment_name(),
        first,
        last,
        rows: rows.len() as u64,
        bytes,
    };
    Ok(Some(Pending { record, rows }))
}

/// Step 2: writes the segment object.
pub async fn write(ctx: &WorkerContext, batch: &str, pending: &Pending) -> anyhow::Result<()> {
    let path = segment_path(batch, &pending.record.name);
    let mut out = BufWriter::with_capacity(ctx.objects.clone(), path, WRITE_PART_BYTES)
        .with_max_concurrency(2);
    let mut buf = Vec::with_capacity(64 * 1024);
    for (line, row) in &pending.rows {
        encode_record(&mut buf, *line, row);
        if buf.len() >= 64 * 1024 {
            out.write_all(&buf).await?;
            buf.clear();
        }
    }
    out.write_all(&buf).await?;
    out.shutdown().await?;
    Ok(())
}

/// Step 3: registers the segment and deletes its rows from Redis; false if refused (another
/// compaction registered some of them first: this segment's object is then an orphan).
pub async fn register(ctx: &WorkerContext, batch: &str, pending: &Pending) -> anyhow::Result<bool> {
    let lines: Vec<u64> = pending.rows.keys().copied().collect();
    Ok(ctx
        .store
        .register_segment(batch, &pending.record, &lines)
        .await?)
}

/// One compaction of up to a segment of pending rows; the rows it moved (0 when none were
/// pending or it was refused).
pub(crate) async fn compact_once(
    ctx: &WorkerContext,
    batch: &str,
    lease: &Lease,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    let Some(pending) = collect(ctx, batch).await? else {
        return Ok(0);
    };
    write(ctx, batch, &pending).await?;
    let path = segment_path(batch, &pending.record.name);
    if lease.is_lost() || !register(ctx, batch, &pending).await? {
        ctx.objects.delete(&path).await.ok();
        return Ok(0);
    }
    ctx.metrics.rows_compacted.inc_by(pending.record.rows);
    ctx.metrics.segments_written.inc();
    ctx.metrics
        .compaction_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(pending.record.rows)
}

/// Compacts `batch` if its pending rows passed a threshold and no other replica holds its lease.
pub(crate) async fn compact_if_due(ctx: &WorkerContext, batch: &str) -> anyhow::Result<()> {
    let Some(meta) = ctx.store.get_batch(batch).await? else {
        return Ok(());
    };
    if !due(ctx, &meta) {
        return Ok(());
    }
    let ttl = std::time::Duration::from_millis(ctx.settings.aggregator.lease_ms);
    let Some(lease) = Lease::acquire(&ctx.store, ctx.keys.batch_lease(batch), ttl).await? else {
        return Ok(());
    };
    let result = async {
        for _ in 0..MAX_PASSES {
            if compact_once(ctx, batch, &lease).await? == 0 || lease.is_lost() {
                break;
            }
            match ctx.store.get_batch(batch).await? {
                Some(meta) if due(ctx, &meta) => {}
                _ => break,
            }
        }
        // Rows that arrive from now on may ask again.
        ctx.store.clear_compact_ask(batch).await?;
        anyhow::Ok(())
    }
    .await;
    lease.release().await;
    result
}

/// Compacts every pending row (finalize: no row can be added any more); false if the lease was
/// lost.
pub(crate) async fn compact_all(
    ctx: &WorkerContext,
    batch: &str,
    lease: &Lease,
) -> anyhow::Result<bool> {
    loop {
        if lease.is_lost() {
            return Ok(false);
        }
        if compact_once(ctx, batch, lease).await? == 0 {
            // Zero means none pending, or a refusal: look again before concluding.
            let (_, pending) = ctx.store.rows_snapshot(batch).await?;
            if pending.is_empty() {
                return Ok(true);
            }
        }
    }
}

/// Merges registered segments in passes of `aggregator.merge_fan_in` until at most that many
/// remain, so the final merge's memory is bounded whatever the number of segments. Returns the
/// segments, or None if the lease was lost.
pub(crate) async fn merge_down(
    ctx: &WorkerContext,
    batch: &str,
    lease: &Lease,
) -> anyhow::Result<Option<Vec<SegmentRecord>>> {
    let fan_in = ctx.settings.aggregator.merge_fan_in.max(2) as usize;
    loop {
        let mut segments = ctx.store.segments(batch).await?;
        if segments.len() <= fan_in {
            return Ok(Some(segments));
        }
        if lease.is_lost() {
            return Ok(None);
        }
        // The smallest segments first: each pass rewrites as few bytes as it can.
        segments.sort_by_key(|s| s.bytes);
        let group: Vec<SegmentRecord> = segments.into_iter().take(fan_in).collect();
        let record = SegmentRecord {
            name: new_segment_name(),
            first: group.iter().map(|s| s.first).min().unwrap_or(0),
            last: group.iter().map(|s| s.last).max().unwrap_or(0),
            rows: group.iter().map(|s| s.rows).sum(),
            bytes: group.iter().map(|s| s.bytes).sum(),
        };
        let path = segment_path(batch, &record.name);
        let mut merge = Merge::open(&ctx.objects, batch, &group).await?;
        let mut out = BufWriter::with_capacity(ctx.objects.clone(), path.clone(), WRITE_PART_BYTES)
            .with_max_concurrency(2);
        let mut buf = Vec::with_capacity(64 * 1024);
        while let Some((line, row)) = merge.next().await? {
            encode_record(&mut buf, line, row);
            if buf.len() >= 64 * 1024 {
                out.write_all(&buf).await?;
                buf.clear();
            }
        }
        out.write_all(&buf).await?;
        out.shutdown().await?;
        if lease.is_lost() || !ctx.store.replace_segments(batch, &record, &group).await? {
            ctx.objects.delete(&path).await.ok();
            return Ok(None);
        }
        for s in &group {
            ctx.objects.delete(&segment_path(batch, &s.name)).await.ok();
        }
    }
}

/// Deletes the batch's segment objects that no record names: those of compactions that died
/// before registering, or whose registration was refused.
pub(crate) async fn delete_orphans(ctx: &WorkerContext, batch: &str) -> anyhow::Result<()> {
    use futures::TryStreamExt;
    let registered: std::collections::HashSet<object_store::path::Path> = ctx
        .store
        .segments(batch)
        .await?
        .iter()
        .map(|s| segment_path(batch, &s.name))
        .collect();
    let paths: Vec<_> = ctx
        .objects
        .list(Some(&segments_prefix(batch)))
        .map_ok(|m| m.location)
        .try_collect()
        .await?;
    for p in paths.into_iter().filter(|p| !registered.contains(p)) {
        ctx.objects.delete(&p).await.ok();
    }
    Ok(())
}

/// Deletes every segment object of a batch, registered or orphan, then the records.
pub(crate) async fn delete_all(ctx: &WorkerContext, batch: &str) -> anyhow::Result<()> {
    use futures::TryStreamExt;
    let prefix = segments_prefix(batch);
    let paths: Vec<_> = ctx
        .objects
        .list(Some(&prefix))
        .map_ok(|m| m.location)
        .try_collect()
        .await?;
    for p in paths {
        ctx.objects.delete(&p).await.ok();
    }
    ctx.store.drop_segments(batch).await?;
    Ok(())
}

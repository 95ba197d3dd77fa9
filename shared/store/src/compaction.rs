//! Compaction's side of the store: pending rows collected from Redis, segments registered in
//! their place, merged segments, and the consistent view readers take of both.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::{Result, Store, StoreError};
use sluice_core::segments::SegmentRecord;

fn sorted_segments(map: HashMap<String, String>) -> Vec<SegmentRecord> {
    let mut v: Vec<SegmentRecord> = map
        .iter()
        .filter_map(|(name, value)| SegmentRecord::decode(name, value))
        .collect();
    v.sort_by_key(|s| (s.first, s.last));
    v
}

/// Pending rows from HSCAN cursor `ARGV[1]` until they pass `ARGV[2]` bytes or `ARGV[3]` rows
/// (or the scan ends): `{next cursor, line, row, line, row, …}`. A scan spread over several calls
/// may return a row twice (the hash may rehash between calls): callers dedupe by line.
static COLLECT_ROWS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/collect_rows.lua")));

/// Registers segment `ARGV[1]` (record `ARGV[2]`, `ARGV[3]` row bytes) holding lines `ARGV[4..]`
/// and deletes exactly those rows, all or nothing: refused (0) unless every one of them is still
/// pending, so two compactions of the same rows (a replica whose lease lapsed) can never both
/// count, and a row is deleted only once a registered segment holds it.
static REGISTER_SEGMENT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/register_segment.lua")));

/// Replaces segments `ARGV[3..]` by segment `ARGV[1]` (record `ARGV[2]`) that merges them; refused
/// (0) unless all of them are still registered.
static REPLACE_SEGMENTS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/replace_segments.lua")));

impl Store {
    /// Pending rows (still in Redis) from HSCAN `cursor`, until they pass `max_bytes` or
    /// `max_rows`: the next cursor (`0` once the scan is over) and (line, stored row) pairs, which
    /// may repeat lines of earlier calls of the same scan.
    pub async fn collect_rows(
        &self,
        batch: &str,
        cursor: &str,
        max_bytes: u64,
        max_rows: u64,
    ) -> Result<(String, Vec<(u64, Vec<u8>)>)> {
        let reply: Vec<Vec<u8>> = COLLECT_ROWS
            .key(self.keys.batch_rows(batch))
            .arg(cursor)
            .arg(max_bytes)
            .arg(max_rows.max(1))
            .invoke_async(&mut self.conn())
            .await?;
        let mut it = reply.into_iter();
        let next = it
            .next()
            .and_then(|c| String::from_utf8(c).ok())
            .ok_or_else(|| StoreError::Protocol("collect_rows: no cursor".into()))?;
        let mut rows = Vec::new();
        while let (Some(line), Some(row)) = (it.next(), it.next()) {
            let line = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.parse().ok())
                .ok_or_else(|| StoreError::Protocol("collect_rows: bad line".into()))?;
            rows.push((line, row));
        }
        Ok((next, rows))
    }

    /// Registers `segment` and deletes its rows (`lines`, `bytes` row bytes) from Redis in one
    /// step; false (nothing changed) unless every one of them is still pending.
    pub async fn register_segment(
        &self,
        batch: &str,
        segment: &SegmentRecord,
        lines: &[u64],
    ) -> Result<bool> {
        let mut inv = REGISTER_SEGMENT.key(self.keys.batch_rows(batch));
        inv.key(self.keys.batch_segments(batch))
            .key(self.keys.batch_meta(batch))
            .key(self.keys.batch_done(batch))
            .arg(&segment.name)
            .arg(segment.encode_value())
            .arg(segment.bytes);
        for line in lines {
            inv.arg(*line);
        }
        let n: i64 = inv.invoke_async(&mut self.conn()).await?;
        Ok(n == 1)
    }

    /// Replaces registered segments `old` by `merged`; false unless all of `old` are registered.
    pub async fn replace_segments(
        &self,
        batch: &str,
        merged: &SegmentRecord,
        old: &[SegmentRecord],
    ) -> Result<bool> {
        let mut inv = REPLACE_SEGMENTS.key(self.keys.batch_segments(batch));
        inv.arg(&merged.name).arg(merged.encode_value());
        for s in old {
            inv.arg(&s.name);
        }
        let n: i64 = inv.invoke_async(&mut self.conn()).await?;
        Ok(n == 1)
    }

    /// The registered segments of a batch, by first line.
    pub async fn segments(&self, batch: &str) -> Result<Vec<SegmentRecord>> {
        let map: HashMap<String, String> =
            self.conn().hgetall(self.keys.batch_segments(batch)).await?;
        Ok(sorted_segments(map))
    }

    /// One consistent view for readers of finished rows: the registered segments and the lines
    /// still pending in Redis, read atomically (a compaction moves rows from one to the other).
    pub async fn rows_snapshot(&self, batch: &str) -> Result<(Vec<SegmentRecord>, Vec<u64>)> {
        let (map, lines): (HashMap<String, String>, Vec<u64>) = redis::pipe()
            .atomic()
            .hgetall(self.keys.batch_segments(batch))
            .hkeys(self.keys.batch_rows(batch))
            .query_async(&mut self.conn())
            .await?;
        Ok((sorted_segments(map), lines))
    }

    /// Pending rows of `lines` (`None` where a line's row has left Redis meanwhile).
    pub async fn pending_rows(&self, batch: &str, lines: &[u64]) -> Result<Vec<Option<Vec<u8>>>> {
        if lines.is_empty() {
            return Ok(Vec::new());
        }
        Ok(redis::cmd("HMGET")
            .arg(self.keys.batch_rows(batch))
            .arg(lines)
            .query_async(&mut self.conn())
            .await?)
    }

    /// Forgets that a compaction was asked for, so the next threshold crossing asks again.
    pub async fn clear_compact_ask(&self, batch: &str) -> Result<()> {
        let () = self.conn().del(self.keys.batch_compact_ask(batch)).await?;
        Ok(())
    }

    /// Forgets a batch's segment records (once their objects are deleted).
    pub async fn drop_segments(&self, batch: &str) -> Result<()> {
        let () = self.conn().del(self.keys.batch_segments(batch)).await?;
        Ok(())
    }
}

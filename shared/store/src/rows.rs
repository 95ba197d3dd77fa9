//! Upstream calls and row writes: the gate before a line's call, the row written once per line,
//! and the error rows filled in for lines that never ran.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands, Script};

use super::{Result, Store, StoreError};
use sluice_core::domain::{Row, Usage};

/// What `begin_call` decided for one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallGate {
    /// Call the upstream; the line is now marked in flight.
    Go,
    /// The line already has a row (a redelivery): drop the message.
    Duplicate,
    /// The batch is stopping, finishing or gone: drop the message, the aggregator accounts for the line.
    Stopped,
}

/// What writing a row did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowWrite {
    /// Inserted; more lines remain.
    Inserted,
    /// Inserted, and it was the last line: the batch can be finalized.
    Last,
    /// The batch is stopping and no call is in flight any more: the aggregator can finish it.
    Drained,
    /// The line already had a row; nothing changed.
    Duplicate,
    /// The batch no longer accepts rows (finalizing, terminal or gone); nothing changed.
    Late,
}

impl RowWrite {
    /// Whether the aggregator should be told to look at the batch.
    pub fn wants_finalize(self) -> bool {
        matches!(self, Self::Last | Self::Drained)
    }
}

/// Reads a script's reply of one verdict per line: exactly `lines` of them, each one `parse` knows.
fn per_line_verdicts<T>(
    script: &str,
    verdicts: Vec<String>,
    lines: usize,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<T>> {
    if verdicts.len() != lines {
        return Err(StoreError::Protocol(format!(
            "{script}: {} verdicts for {lines} lines",
            verdicts.len()
        )));
    }
    verdicts
        .iter()
        .map(|v| parse(v).ok_or_else(|| StoreError::Protocol(format!("{script}: {v}"))))
        .collect()
}

static BEGIN_CALL: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/begin_calls.lua")));
/// KEYS: meta, rows, inflight, done bitmap, compaction ask. ARGV: compaction thresholds (rows,
/// bytes) and the ask's expiry (ms), then 8 values per row. A row is stored only when its line's
/// bit goes 0 → 1, so a line compacted out of the rows hash can never be written again. One extra
/// trailing `compact` verdict asks the caller to wake the aggregator: the pending rows passed a
/// threshold and nobody asked in the last ask expiry. The batch's counters are summed over the
/// rows and added once per call (a script call carries a worker's rows of one batch that finish
/// about together).
static WRITE_ROW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/write_rows.lua")));

static FILL_ROWS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/fill_rows.lua")));

impl Store {
    /// Gate before the upstream calls of `lines` (of one batch, in one script call): one
    /// [`CallGate`] per line, in order.
    pub async fn begin_calls(
        &self,
        batch: &str,
        lines: &[u64],
        deadline_ms: i64,
    ) -> Result<Vec<CallGate>> {
        let mut inv = BEGIN_CALL.key(self.keys.batch_meta(batch));
        inv.key(self.keys.batch_done(batch))
            .key(self.keys.batch_inflight(batch))
            .key(self.keys.batch_rows(batch))
            .arg(deadline_ms);
        for line in lines {
            inv.arg(*line);
        }
        let verdicts: Vec<String> = inv.invoke_async(&mut self.conn()).await?;
        if verdicts.len() == 1 && verdicts[0] == "stopped" {
            return Ok(vec![CallGate::Stopped; lines.len()]);
        }
        per_line_verdicts("begin_call", verdicts, lines.len(), |v| match v {
            "go" => Some(CallGate::Go),
            "dup" => Some(CallGate::Duplicate),
            _ => None,
        })
    }

    /// Clears a line's in-flight mark without writing a row (it waits to retry).
    pub async fn end_call(&self, batch: &str, line: u64) -> Result<()> {
        let () = self
            .conn()
            .hdel(self.keys.batch_inflight(batch), line)
            .await?;
        Ok(())
    }

    /// Writes each line's row once and counts it (lines of one batch, in one script call, in
    /// order): one [`RowWrite`] per row, and whether the aggregator should be asked to compact
    /// (the batch's pending rows passed `compact` = (rows, bytes) and nobody asked within `ask`).
    pub async fn write_rows(
        &self,
        batch: &str,
        rows: &[(u64, Row, Usage)],
        compact: (u64, u64),
        ask: Duration,
    ) -> Result<(Vec<RowWrite>, bool)> {
        let mut inv = WRITE_ROW.key(self.keys.batch_meta(batch));
        inv.key(self.keys.batch_rows(batch))
            .key(self.keys.batch_inflight(batch))
            .key(self.keys.batch_done(batch))
            .key(self.keys.batch_compact_ask(batch))
            .arg(compact.0)
            .arg(compact.1)
            .arg(ask.as_millis() as u64);
        for (line, row, usage) in rows {
            inv.arg(*line)
                .arg(row.encode())
                .arg(if row.ok { "1" } else { "0" })
                .arg(usage.input)
                .arg(usage.cached)
                .arg(usage.output)
                .arg(usage.reasoning)
                .arg(usage.total);
        }
        let mut verdicts: Vec<String> = inv.invoke_async(&mut self.conn()).await?;
        let wants_compact =
            verdicts.len() == rows.len() + 1 && verdicts.last().is_some_and(|v| v == "compact");
        if wants_compact {
            verdicts.pop();
        }
        let verdicts = per_line_verdicts("write_row", verdicts, rows.len(), |v| match v {
            "new" => Some(RowWrite::Inserted),
            "last" => Some(RowWrite::Last),
            "drained" => Some(RowWrite::Drained),
            "dup" => Some(RowWrite::Duplicate),
            "late" => Some(RowWrite::Late),
            _ => None,
        })?;
        Ok((verdicts, wants_compact))
    }

    /// Writes error rows for the lines among `rows` that have none yet; returns how many were added.
    /// Refused (`None`) once the batch no longer accepts rows.
    pub async fn fill_rows(&self, batch: &str, rows: &[(u64, Row)]) -> Result<Option<u64>> {
        if rows.is_empty() {
            return Ok(Some(0));
        }
        let mut inv = FILL_ROWS.key(self.keys.batch_meta(batch));
        inv.key(self.keys.batch_rows(batch))
            .key(self.keys.batch_done(batch));
        for (line, row) in rows {
            inv.arg(*line).arg(row.encode());
        }
        let added: i64 = inv.invoke_async(&mut self.conn()).await?;
        Ok((added >= 0).then_some(added as u64))
    }

    /// Calls still in flight for a batch whose deadline has not passed.
    pub async fn live_inflight(&self, batch: &str, now_ms: i64) -> Result<usize> {
        let map: HashMap<String, i64> =
            self.conn().hgetall(self.keys.batch_inflight(batch)).await?;
        Ok(map.values().filter(|deadline| **deadline > now_ms).count())
    }
}

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

static BEGIN_CALL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local st = redis.call('HMGET', KEYS[1], 'status', 'stopping')
if not st[1] or st[1] ~= 'in_progress' or st[2] then return {'stopped'} end
local out = {}
for i = 2, #ARGV do
  if redis.call('GETBIT', KEYS[2], ARGV[i]) == 1 or redis.call('HEXISTS', KEYS[4], ARGV[i]) == 1 then
    out[#out + 1] = 'dup'
  else
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[1])
    out[#out + 1] = 'go'
  end
end
return out
",
    )
});
/// KEYS: meta, rows, inflight, done bitmap, compaction ask. ARGV: compaction thresholds (rows,
/// bytes) and the ask's expiry (ms), then 8 values per row. A row is stored only when its line's
/// bit goes 0 → 1, so a line compacted out of the rows hash can never be written again. One extra
/// trailing `compact` verdict asks the caller to wake the aggregator: the pending rows passed a
/// threshold and nobody asked in the last ask expiry. The batch's counters are summed over the
/// rows and added once per call (a script call carries a worker's rows of one batch that finish
/// about together).
static WRITE_ROW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local out = {}
local n = (#ARGV - 3) / 8
local lines = {}
for r = 0, n - 1 do lines[#lines + 1] = ARGV[3 + r * 8 + 1] end
-- (in chunks: Lua's unpack is bounded)
for i = 1, #lines, 1000 do
  redis.call('HDEL', KEYS[3], unpack(lines, i, math.min(i + 999, #lines)))
end
local st = redis.call('HMGET', KEYS[1], 'status', 'stopping', 'total', 'completed', 'failed')
if not st[1] or (st[1] ~= 'in_progress' and st[1] ~= 'cancelling') then
  for r = 1, n do out[r] = 'late' end
  return out
end
-- counters are summed over the rows and added once
local fields = {'u_in', 'u_cached', 'u_out', 'u_reasoning', 'u_total'}
local sums = {0, 0, 0, 0, 0}
local pend_b, completed, failed = 0, 0, 0
local done = tonumber(st[4] or '0') + tonumber(st[5] or '0')
local total = tonumber(st[3] or '')
local last = 0
for r = 0, n - 1 do
  local a = 3 + r * 8
  local line = ARGV[a + 1]
  -- The rows hash is checked too: rows written before the bitmap existed have no bit.
  local inserted = redis.call('HEXISTS', KEYS[2], line) == 0
    and redis.call('SETBIT', KEYS[4], line, 1) == 0
  if inserted then
    redis.call('HSET', KEYS[2], line, ARGV[a + 2])
    pend_b = pend_b + #ARGV[a + 2]
    if ARGV[a + 3] == '1' then completed = completed + 1 else failed = failed + 1 end
    done = done + 1
    for i = 1, 5 do
      local v = tonumber(ARGV[a + 3 + i])
      if v and v > 0 then sums[i] = sums[i] + v end
    end
    if not st[2] and total and done >= total and last == 0 then
      out[r + 1] = 'last'
      last = 1
    else
      out[r + 1] = 'new'
    end
  else
    out[r + 1] = 'dup'
  end
end
local added = completed + failed
if added > 0 then
  redis.call('HINCRBY', KEYS[1], 'pend_n', added)
  redis.call('HINCRBY', KEYS[1], 'pend_b', pend_b)
  if completed > 0 then redis.call('HINCRBY', KEYS[1], 'completed', completed) end
  if failed > 0 then redis.call('HINCRBY', KEYS[1], 'failed', failed) end
  for i = 1, 5 do
    if sums[i] > 0 then redis.call('HINCRBY', KEYS[1], fields[i], sums[i]) end
  end
end
-- a stopping batch whose last line in flight just ended: its last row tells the aggregator
if st[2] and n > 0 and redis.call('HLEN', KEYS[3]) == 0 then out[n] = 'drained' end
if added > 0 then
  local p = redis.call('HMGET', KEYS[1], 'pend_n', 'pend_b')
  if (tonumber(p[1] or '0') >= tonumber(ARGV[1]) or tonumber(p[2] or '0') >= tonumber(ARGV[2]))
    and redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[3]) then
    out[#out + 1] = 'compact'
  end
end
return out
",
    )
});

static FILL_ROWS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'in_progress' and st ~= 'cancelling' then return -1 end
local added, bytes = 0, 0
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 and redis.call('SETBIT', KEYS[3], ARGV[i], 1) == 0 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
    added = added + 1
    bytes = bytes + #ARGV[i + 1]
  end
end
if added > 0 then
  redis.call('HINCRBY', KEYS[1], 'failed', added)
  redis.call('HINCRBY', KEYS[1], 'pend_n', added)
  redis.call('HINCRBY', KEYS[1], 'pend_b', bytes)
end
return added
",
    )
});

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

//! Redis: batch and file records, row results and the Lua scripts that keep them consistent.
//!
//! Invariants the scripts hold (each script is atomic in Redis):
//! - a line's row is written at most once (`HSETNX`), and the `completed`/`failed` counters and the
//!   usage sums move only when it is, so redelivered messages can never double-count;
//! - a row is accepted only while the batch is `in_progress` or `cancelling`: once files are being
//!   written, late writers are refused ("late") and cannot change the counters;
//! - an upstream call starts only after `begin_call` saw the batch `in_progress` with no stop
//!   requested, and it is recorded in `inflight` so cancel and expiry can wait for it.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands, Script};

use crate::config::Settings;
use crate::domain::{BatchMeta, BatchStatus, FileMeta, Row, StopReason, Usage, now_secs};
use crate::keys::Keys;
use crate::redis_conn::RedisConn;

/// Errors talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from a store script: {0}")]
    Protocol(String),
}

type Result<T> = std::result::Result<T, StoreError>;

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
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 1 then
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
static WRITE_ROW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local out = {}
local fields = {'u_in', 'u_cached', 'u_out', 'u_reasoning', 'u_total'}
for r = 0, #ARGV / 8 - 1 do
  local a = r * 8
  local line = ARGV[a + 1]
  redis.call('HDEL', KEYS[3], line)
  local st = redis.call('HMGET', KEYS[1], 'status', 'stopping', 'total', 'completed', 'failed')
  local verdict
  if not st[1] or (st[1] ~= 'in_progress' and st[1] ~= 'cancelling') then
    verdict = 'late'
  else
    local inserted = redis.call('HSETNX', KEYS[2], line, ARGV[a + 2]) == 1
    local done = tonumber(st[4] or '0') + tonumber(st[5] or '0')
    if inserted then
      redis.call('HINCRBY', KEYS[1], ARGV[a + 3] == '1' and 'completed' or 'failed', 1)
      done = done + 1
      for i = 1, 5 do
        local n = tonumber(ARGV[a + 3 + i])
        if n and n > 0 then redis.call('HINCRBY', KEYS[1], fields[i], n) end
      end
    end
    if st[2] and redis.call('HLEN', KEYS[3]) == 0 then
      verdict = 'drained'
    elseif not st[2] and inserted and st[3] and done >= tonumber(st[3]) then
      verdict = 'last'
    elseif inserted then
      verdict = 'new'
    else
      verdict = 'dup'
    end
  end
  out[#out + 1] = verdict
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
local added = 0
for i = 1, #ARGV, 2 do
  added = added + redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1])
end
if added > 0 then redis.call('HINCRBY', KEYS[1], 'failed', added) end
return added
",
    )
});

static TRANSITION: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local st = redis.call('HMGET', KEYS[1], 'status', 'stopping')
if not st[1] then return {'gone', ''} end
local to = ARGV[1]
if (to == 'in_progress' or to == 'finalizing' or to == 'cancelling') and st[2] then return {'refused', st[1]} end
local from_ok = false
for allowed in string.gmatch(ARGV[2], '[^,]+') do
  if st[1] == allowed then from_ok = true end
end
if not from_ok then return {'refused', st[1]} end
redis.call('HSET', KEYS[1], 'status', to)
redis.call('HSETNX', KEYS[1], ARGV[3], ARGV[4])
for i = 5, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return {'ok', st[1]}
",
    )
});

static MARK_STOPPING: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local st = redis.call('HMGET', KEYS[1], 'status', 'stopping')
if st[2] then return 0 end
if st[1] ~= 'validating' and st[1] ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[1], 'stopping', ARGV[1])
return 1
",
    )
});

static RENEW_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
",
    )
});

static RELEASE_LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// Outcome of a status transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Applied; carries the status it left.
    Applied(BatchStatus),
    /// Refused; carries the current status. This is how racing replicas learn they lost.
    Refused(Option<BatchStatus>),
}

/// A handle on the Redis store: one multiplexed, auto-reconnecting connection (to one server or
/// a cluster), cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: RedisConn,
    keys: Keys,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("namespace", &self.keys.namespace())
            .finish()
    }
}

impl Store {
    /// Connects as `settings` say: one server, or a cluster from its seed nodes.
    pub async fn open(settings: &Settings) -> Result<Self> {
        let conn = if settings.redis_cluster {
            let seeds: Vec<&str> = settings
                .redis_url
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            RedisConn::cluster(&seeds).await?
        } else {
            RedisConn::single(&settings.redis_url).await?
        };
        Ok(Self {
            conn,
            keys: Keys::new(&settings.namespace),
        })
    }

    /// Key builder of this store's namespace.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// A raw connection for callers that need commands this type does not wrap.
    pub fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> Result<()> {
        let _: String = redis::cmd("PING").query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// Next listing position.
    pub async fn next_sequence(&self) -> Result<i64> {
        Ok(self.conn().incr(self.keys.sequence(), 1).await?)
    }

    // ---- files ----

    /// Stores a file record and lists it for its tenant.
    pub async fn put_file(&self, id: &str, tenant: &str, fields: &[(&str, String)]) -> Result<()> {
        let seq = self.next_sequence().await?;
        let mut all: Vec<(&str, String)> = fields.to_vec();
        all.push(("id", id.to_owned()));
        all.push(("tenant", tenant.to_owned()));
        all.push(("seq", seq.to_string()));
        let mut pipe = redis::pipe();
        pipe.hset_multiple(self.keys.file(id), &all)
            .ignore()
            .cmd("ZADD")
            .arg(self.keys.tenant_files(tenant))
            .arg("NX")
            .arg(seq)
            .arg(id)
            .ignore();
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// A file record, if it exists.
    pub async fn get_file(&self, id: &str) -> Result<Option<FileMeta>> {
        let map: HashMap<String, String> = self.conn().hgetall(self.keys.file(id)).await?;
        Ok((!map.is_empty()).then_some(FileMeta(map)))
    }

    /// Removes a file record and its listing entry.
    pub async fn delete_file(&self, id: &str, tenant: &str) -> Result<()> {
        let mut pipe = redis::pipe();
        pipe.del(self.keys.file(id))
            .ignore()
            .zrem(self.keys.tenant_files(tenant), id)
            .ignore();
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// The listing position of `id` in a tenant sorted set.
    pub async fn position(&self, set: &str, id: &str) -> Result<Option<i64>> {
        let score: Option<f64> = self.conn().zscore(set, id).await?;
        Ok(score.map(|s| s as i64))
    }

    /// Up to `count` ids of a tenant sorted set strictly after position `after`, newest first when `desc`.
    pub async fn page(
        &self,
        set: &str,
        after: Option<i64>,
        desc: bool,
        count: usize,
    ) -> Result<Vec<String>> {
        let mut conn = self.conn();
        let ids: Vec<String> = if desc {
            let max = after.map_or("+inf".to_owned(), |a| format!("({a}"));
            redis::cmd("ZRANGE")
                .arg(set)
                .arg(max)
                .arg("-inf")
                .arg("BYSCORE")
                .arg("REV")
                .arg("LIMIT")
                .arg(0)
                .arg(count)
                .query_async(&mut conn)
                .await?
        } else {
            let min = after.map_or("-inf".to_owned(), |a| format!("({a}"));
            redis::cmd("ZRANGE")
                .arg(set)
                .arg(min)
                .arg("+inf")
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(count)
                .query_async(&mut conn)
                .await?
        };
        Ok(ids)
    }

    // ---- batches ----

    /// Stores a new batch (`validating`) and indexes it for its tenant and the aggregator's sweep.
    pub async fn create_batch(
        &self,
        id: &str,
        tenant: &str,
        expires_at: i64,
        fields: &[(&str, String)],
    ) -> Result<()> {
        let seq = self.next_sequence().await?;
        let mut all: Vec<(&str, String)> = fields.to_vec();
        all.push(("id", id.to_owned()));
        all.push(("tenant", tenant.to_owned()));
        all.push(("seq", seq.to_string()));
        all.push(("status", BatchStatus::Validating.as_str().to_owned()));
        let mut pipe = redis::pipe();
        pipe.hset_multiple(self.keys.batch_meta(id), &all)
            .ignore()
            .zadd(self.keys.tenant_batches(tenant), id, seq)
            .ignore()
            .zadd(self.keys.active(), id, expires_at)
            .ignore();
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    /// A batch record, if it exists.
    pub async fn get_batch(&self, id: &str) -> Result<Option<BatchMeta>> {
        let map: HashMap<String, String> = self.conn().hgetall(self.keys.batch_meta(id)).await?;
        Ok((!map.is_empty()).then_some(BatchMeta(map)))
    }

    /// Sets plain fields of a batch record.
    pub async fn set_batch_fields(&self, id: &str, fields: &[(&str, String)]) -> Result<()> {
        let () = self
            .conn()
            .hset_multiple(self.keys.batch_meta(id), fields)
            .await?;
        Ok(())
    }

    /// Moves a batch to `to` if its current status is allowed by the transition table, stamping the
    /// status's `*_at` once and setting `extra` fields in the same atomic step.
    pub async fn transition(
        &self,
        id: &str,
        to: BatchStatus,
        extra: &[(&str, String)],
    ) -> Result<Transition> {
        let from: Vec<&str> = to.allowed_from().iter().map(|s| s.as_str()).collect();
        let mut inv = TRANSITION.key(self.keys.batch_meta(id));
        inv.arg(to.as_str())
            .arg(from.join(","))
            .arg(to.stamp_field())
            .arg(now_secs());
        for (k, v) in extra {
            inv.arg(*k).arg(v);
        }
        let (verdict, prev): (String, String) = inv.invoke_async(&mut self.conn()).await?;
        let prev = BatchStatus::parse(&prev);
        match (verdict.as_str(), prev) {
            ("ok", Some(p)) => Ok(Transition::Applied(p)),
            ("refused", p) | ("gone", p) => Ok(Transition::Refused(p)),
            (v, _) => Err(StoreError::Protocol(v.to_owned())),
        }
    }

    /// Asks a `validating` or `in_progress` batch to stop for `reason` (expiry). False if it already
    /// stops or is past that point.
    pub async fn mark_stopping(&self, id: &str, reason: StopReason) -> Result<bool> {
        let n: i64 = MARK_STOPPING
            .key(self.keys.batch_meta(id))
            .arg(reason.as_str())
            .invoke_async(&mut self.conn())
            .await?;
        Ok(n == 1)
    }

    /// Gate before the upstream calls of `lines` (of one batch, in one script call): one
    /// [`CallGate`] per line, in order.
    pub async fn begin_calls(
        &self,
        batch: &str,
        lines: &[u64],
        deadline_ms: i64,
    ) -> Result<Vec<CallGate>> {
        let mut inv = BEGIN_CALL.key(self.keys.batch_meta(batch));
        inv.key(self.keys.batch_rows(batch))
            .key(self.keys.batch_inflight(batch))
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
    /// order): one [`RowWrite`] per row.
    pub async fn write_rows(
        &self,
        batch: &str,
        rows: &[(u64, Row, Usage)],
    ) -> Result<Vec<RowWrite>> {
        let mut inv = WRITE_ROW.key(self.keys.batch_meta(batch));
        inv.key(self.keys.batch_rows(batch))
            .key(self.keys.batch_inflight(batch));
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
        let verdicts: Vec<String> = inv.invoke_async(&mut self.conn()).await?;
        per_line_verdicts("write_row", verdicts, rows.len(), |v| match v {
            "new" => Some(RowWrite::Inserted),
            "last" => Some(RowWrite::Last),
            "drained" => Some(RowWrite::Drained),
            "dup" => Some(RowWrite::Duplicate),
            "late" => Some(RowWrite::Late),
            _ => None,
        })
    }

    /// Writes error rows for the lines among `rows` that have none yet; returns how many were added.
    /// Refused (`None`) once the batch no longer accepts rows.
    pub async fn fill_rows(&self, batch: &str, rows: &[(u64, Row)]) -> Result<Option<u64>> {
        if rows.is_empty() {
            return Ok(Some(0));
        }
        let mut inv = FILL_ROWS.key(self.keys.batch_meta(batch));
        inv.key(self.keys.batch_rows(batch));
        for (line, row) in rows {
            inv.arg(*line).arg(row.encode());
        }
        let added: i64 = inv.invoke_async(&mut self.conn()).await?;
        Ok((added >= 0).then_some(added as u64))
    }

    /// Stored rows for `lines`, in order (`None` where a line has no row).
    pub async fn get_rows(
        &self,
        batch: &str,
        lines: std::ops::Range<u64>,
    ) -> Result<Vec<Option<Vec<u8>>>> {
        if lines.is_empty() {
            return Ok(Vec::new());
        }
        let fields: Vec<u64> = lines.collect();
        let rows: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(self.keys.batch_rows(batch))
            .arg(&fields)
            .query_async(&mut self.conn())
            .await?;
        Ok(rows)
    }

    /// Calls still in flight for a batch whose deadline has not passed.
    pub async fn live_inflight(&self, batch: &str, now_ms: i64) -> Result<usize> {
        let map: HashMap<String, i64> =
            self.conn().hgetall(self.keys.batch_inflight(batch)).await?;
        Ok(map.values().filter(|deadline| **deadline > now_ms).count())
    }

    /// Non-terminal batches, with their `expires_at`.
    pub async fn active_batches(&self) -> Result<Vec<(String, i64)>> {
        let items: Vec<(String, f64)> = self
            .conn()
            .zrange_withscores(self.keys.active(), 0, -1)
            .await?;
        Ok(items.into_iter().map(|(id, s)| (id, s as i64)).collect())
    }

    /// Forgets a terminal batch's working data: out of the sweep and of its tenant's open
    /// batches, rows and leases expire.
    pub async fn retire_batch(&self, id: &str, rows_ttl_secs: u64) -> Result<()> {
        let tenant: Option<String> = self.conn().hget(self.keys.batch_meta(id), "tenant").await?;
        let mut pipe = redis::pipe();
        if let Some(tenant) = tenant {
            pipe.zrem(self.keys.tenant_open(&tenant), id).ignore();
        }
        pipe.zrem(self.keys.active(), id)
            .ignore()
            .expire(self.keys.batch_rows(id), rows_ttl_secs as i64)
            .ignore()
            .del(self.keys.batch_inflight(id))
            .ignore();
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }

    // ---- leases ----

    /// Takes `key` for `ttl` if nobody holds it; returns the token that proves ownership.
    pub async fn acquire_lease(&self, key: &str, ttl: Duration) -> Result<Option<String>> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut self.conn())
            .await?;
        Ok(set.map(|_| token))
    }

    /// Extends a lease still held with `token`; false if it was lost.
    pub async fn renew_lease(&self, key: &str, token: &str, ttl: Duration) -> Result<bool> {
        let n: i64 = RENEW_LEASE
            .key(key)
            .arg(token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(n == 1)
    }

    /// Gives a lease back if still held with `token`.
    pub async fn release_lease(&self, key: &str, token: &str) -> Result<()> {
        let _: i64 = RELEASE_LEASE
            .key(key)
            .arg(token)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Deletes every key of this store's namespace (tests clean up with it). One server only: a
    /// cluster's keys are spread over nodes that `SCAN` walks one at a time.
    pub async fn purge_namespace(&self) -> Result<()> {
        if self.conn.is_cluster() {
            return Err(StoreError::Protocol(
                "purging a namespace is supported on one Redis server, not on a cluster".into(),
            ));
        }
        let mut conn = self.conn();
        let pattern = format!("{}:*", self.keys.namespace());
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                let () = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

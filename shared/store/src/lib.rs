//! Redis: batch and file records, row results and the Lua scripts that keep them consistent.
//!
//! Invariants the scripts hold (each script is atomic in Redis):
//! - a line's row is written at most once: only when its bit in the batch's done-bitmap goes
//!   0 → 1, and the `completed`/`failed` counters and the usage sums move only then, so redelivered
//!   messages can never double-count, even after the row left Redis for a segment;
//! - a pending row leaves the rows hash only in the script that registers the segment holding
//!   it, and only if every row of that segment is still pending (no lost, no double row);
//! - a row is accepted only while the batch is `in_progress` or `cancelling`: once files are being
//!   written, late writers are refused ("late") and cannot change the counters;
//! - an upstream call starts only after `begin_call` saw the batch `in_progress` with no stop
//!   requested, and it is recorded in `inflight` so cancel and expiry can wait for it.

#![warn(missing_docs, unreachable_pub)]

pub mod budget;
pub mod file_users;
pub mod idempotency;
pub mod lifecycle_store;
pub mod open_batches;
pub mod pacing;
pub mod redis_conn;
pub mod redis_policy;
pub mod schedule_registry;

mod batches;
mod compaction;
mod leases;
#[cfg(test)]
mod lua_batch_fields;
mod retries;
mod rows;
mod webhook_deliveries;

use std::collections::HashMap;
use std::sync::Arc;

use redis::AsyncCommands;

use crate::redis_conn::RedisConn;
use sluice_core::config::Settings;
use sluice_core::domain::FileMeta;
use sluice_core::keys::Keys;

pub use batches::Transition;
pub use retries::RetrySlot;
pub use rows::{CallGate, RowWrite};

/// Errors talking to Redis.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    /// A Redis command failed.
    Redis(#[from] redis::RedisError),
    #[error("unexpected reply from a store script: {0}")]
    /// A script answered something the code does not expect.
    Protocol(String),
    #[error(transparent)]
    /// A batch record holds a field its type cannot have.
    BatchRecord(#[from] sluice_core::domain::BatchRecordError),
}

type Result<T> = std::result::Result<T, StoreError>;

/// A handle on the Redis store: one multiplexed, auto-reconnecting connection (to one server or
/// a cluster), cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: RedisConn,
    keys: Keys,
    /// As configured, credentials included: only [`sluice_core::connect::redact`]ed copies are shown.
    url: Arc<str>,
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
        let d = &settings.dependencies;
        let conn = if settings.redis_cluster {
            let seeds: Vec<&str> = settings
                .redis_url
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            RedisConn::cluster(&seeds, d.connect_timeout(), d.redis_response_timeout()).await?
        } else {
            RedisConn::single(
                &settings.redis_url,
                d.connect_timeout(),
                d.redis_response_timeout(),
            )
            .await?
        };
        Ok(Self {
            url: Arc::from(settings.redis_url.as_str()),
            conn,
            keys: Keys::new(&settings.namespace),
        })
    }

    /// The configured Redis URL (credentials included: redact before showing it).
    pub fn url(&self) -> &str {
        &self.url
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

    /// Stores a file record and lists it for its tenant, counting it toward the tenant's storage
    /// (never refused: see [`Store::register_file`] for uploads under a quota).
    pub async fn put_file(&self, id: &str, tenant: &str, fields: &[(&str, String)]) -> Result<()> {
        self.register_file(id, tenant, fields, None).await?;
        Ok(())
    }

    /// A file record, if it exists.
    pub async fn get_file(&self, id: &str) -> Result<Option<FileMeta>> {
        let map: HashMap<String, String> = self.conn().hgetall(self.keys.file(id)).await?;
        Ok((!map.is_empty()).then_some(FileMeta(map)))
    }

    /// Removes a file record and its listing entry, giving its bytes back to the tenant.
    pub async fn delete_file(&self, id: &str, tenant: &str) -> Result<()> {
        let () = self.conn().del(self.keys.file(id)).await?;
        self.release_file(id, tenant).await
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

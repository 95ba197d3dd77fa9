//! The per-owner limit: how many batches a tenant may have that are not yet terminal.
//!
//! The tenant's open batches are a set (`t:{tenant}:open`, one hash tag, so one Cluster slot). A
//! batch joins it atomically before it is stored, only while the set is below the limit, so
//! concurrent creates can never overshoot; it leaves when it becomes terminal
//! ([`Store::retire_batch`]).

use std::sync::LazyLock;

use redis::Script;

use crate::store::{Store, StoreError};

static RESERVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
",
    )
});

impl Store {
    /// Counts `batch` among `tenant`'s open batches if fewer than `limit` are open; false otherwise.
    pub async fn reserve_open_batch(
        &self,
        tenant: &str,
        batch: &str,
        limit: u64,
    ) -> Result<bool, StoreError> {
        let n: i64 = RESERVE
            .key(self.keys().tenant_open(tenant))
            .arg(batch)
            .arg(limit)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(n == 1)
    }

    /// Gives back a reservation whose batch was never stored.
    pub async fn release_open_batch(&self, tenant: &str, batch: &str) -> Result<(), StoreError> {
        let _: i64 = redis::cmd("SREM")
            .arg(self.keys().tenant_open(tenant))
            .arg(batch)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// How many batches of `tenant` are open.
    pub async fn open_batches(&self, tenant: &str) -> Result<u64, StoreError> {
        let n: u64 = redis::cmd("SCARD")
            .arg(self.keys().tenant_open(tenant))
            .query_async(&mut self.conn())
            .await?;
        Ok(n)
    }
}

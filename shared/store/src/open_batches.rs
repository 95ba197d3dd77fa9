//! The per-owner limit: how many batches a tenant may have that are not yet terminal.
//!
//! The tenant's open batches are a sorted set (`t:{tenant}:open`, one hash tag, so one Cluster
//! slot) scored by reservation time. A batch joins it atomically before it is stored, only while
//! the set is below the limit, so concurrent creates can never overshoot; it leaves when it
//! becomes terminal ([`Store::retire_batch`]). Entries left behind by a crash (a reservation whose
//! batch was never stored, a terminal batch not retired) are pruned when a tenant hits the limit.

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use crate::{Store, StoreError};
use sluice_core::domain::{BatchStatus, batch_field};

static RESERVE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/reserve_open_batch.lua")));

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
            .arg(sluice_core::domain::now_millis())
            .invoke_async(&mut self.conn())
            .await?;
        Ok(n == 1)
    }

    /// Gives back a reservation whose batch was never stored.
    pub async fn release_open_batch(&self, tenant: &str, batch: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .conn()
            .zrem(self.keys().tenant_open(tenant), batch)
            .await?;
        Ok(())
    }

    /// How many batches of `tenant` are open.
    pub async fn open_batches(&self, tenant: &str) -> Result<u64, StoreError> {
        Ok(self.conn().zcard(self.keys().tenant_open(tenant)).await?)
    }

    /// Drops from `tenant`'s open batches those that are terminal, and reservations older than
    /// `reserved_before_ms` whose batch was never stored; returns how many were dropped.
    pub async fn prune_open_batches(
        &self,
        tenant: &str,
        reserved_before_ms: i64,
    ) -> Result<u64, StoreError> {
        self.prune_batch_set(&self.keys().tenant_open(tenant), reserved_before_ms)
            .await
    }

    /// Drops from the sorted set `key` of batch ids (scored by when each was taken, in ms) the
    /// batches that are terminal, and those taken before `taken_before_ms` whose batch was never
    /// stored; returns how many were dropped.
    pub(crate) async fn prune_batch_set(
        &self,
        key: &str,
        taken_before_ms: i64,
    ) -> Result<u64, StoreError> {
        let entries: Vec<(String, f64)> = self.conn().zrange_withscores(key, 0, -1).await?;
        if entries.is_empty() {
            return Ok(0);
        }
        let mut pipe = redis::pipe();
        for (id, _) in &entries {
            pipe.hget(self.keys().batch_meta(id), batch_field::STATUS);
        }
        let statuses: Vec<Option<String>> = pipe.query_async(&mut self.conn()).await?;
        let stale: Vec<&str> = entries
            .iter()
            .zip(&statuses)
            .filter(|((_, taken_at), status)| match status {
                None => (*taken_at as i64) < taken_before_ms,
                Some(s) => BatchStatus::parse(s).is_some_and(BatchStatus::is_terminal),
            })
            .map(|((id, _), _)| id.as_str())
            .collect();
        if stale.is_empty() {
            return Ok(0);
        }
        Ok(self.conn().zrem(key, &stale).await?)
    }
}

//! Batch records: creation, the guarded status transitions, stop requests, the sweep's list of
//! active batches and retiring a terminal batch's working data.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::{Result, Store, StoreError};
use sluice_core::domain::{Batch, BatchStatus, StopReason, batch_field, now_secs};

static TRANSITION: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/transition_status.lua")));

static MARK_STOPPING: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/mark_stopping.lua")));

/// Outcome of a status transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Applied; carries the status it left.
    Applied(BatchStatus),
    /// Refused; carries the current status. This is how racing replicas learn they lost.
    Refused(Option<BatchStatus>),
}

impl Store {
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
        all.push((batch_field::ID, id.to_owned()));
        all.push((batch_field::TENANT, tenant.to_owned()));
        all.push((batch_field::SEQ, seq.to_string()));
        all.push((
            batch_field::STATUS,
            BatchStatus::Validating.as_str().to_owned(),
        ));
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
    pub async fn get_batch(&self, id: &str) -> Result<Option<Batch>> {
        let map: HashMap<String, String> = self.conn().hgetall(self.keys.batch_meta(id)).await?;
        if map.is_empty() {
            return Ok(None);
        }
        Ok(Some(Batch::from_hash(map)?))
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
        let from: Vec<&str> = to.allowed_from().map(BatchStatus::as_str).collect();
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

    /// Non-terminal batches, with their `expires_at`.
    pub async fn active_batches(&self) -> Result<Vec<(String, i64)>> {
        let items: Vec<(String, f64)> = self
            .conn()
            .zrange_withscores(self.keys.active(), 0, -1)
            .await?;
        Ok(items.into_iter().map(|(id, s)| (id, s as i64)).collect())
    }

    /// Forgets a terminal batch's working data: out of the sweep, of its tenant's open batches
    /// and of its input file's users; pending rows go at once (finalize put them all in
    /// segments), the done-bitmap expires after `rows_ttl_secs`.
    pub async fn retire_batch(&self, id: &str, rows_ttl_secs: u64) -> Result<()> {
        let (tenant, input): (Option<String>, Option<String>) = redis::cmd("HMGET")
            .arg(self.keys.batch_meta(id))
            .arg(batch_field::TENANT)
            .arg(batch_field::INPUT_FILE_ID)
            .query_async(&mut self.conn())
            .await?;
        let mut pipe = redis::pipe();
        if let Some(tenant) = tenant {
            pipe.zrem(self.keys.tenant_open(&tenant), id).ignore();
        }
        // The batch no longer reads its input file: it may be deleted now.
        if let Some(input) = input {
            pipe.zrem(self.keys.file_users(&input), id).ignore();
        }
        pipe.zrem(self.keys.active(), id)
            .ignore()
            .del(self.keys.batch_rows(id))
            .ignore()
            .expire(self.keys.batch_done(id), rows_ttl_secs as i64)
            .ignore()
            .del(self.keys.batch_compact_ask(id))
            .ignore()
            // The retention sweep removes the record `lifecycle.batch_retention_secs` after this.
            .cmd("ZADD")
            .arg(self.keys.ended_batches())
            .arg("NX")
            .arg(now_secs())
            .arg(id)
            .ignore()
            .del(self.keys.batch_inflight(id))
            .ignore();
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }
}

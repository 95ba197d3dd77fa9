//! Lifecycle state in Redis: per-tenant storage accounting, the expiry index of files and the
//! retention index of ended batches.
//!
//! Accounting rides on the tenant's file listing (`t:{tenant}:files`): a file counts toward its
//! tenant's usage exactly while it is listed (and `t:{tenant}:counted` remembers what it counts for). Listing and counting happen in one script on the
//! tenant's slot (`lua/register_file.lua`), and so do unlisting and giving the bytes back
//! (`lua/release_file.lua`). So registering the same file twice (a finalize run again after a crash)
//! counts it once, two replicas deleting the same file give its bytes back once, and concurrent
//! uploads cannot pass the quota between them: the check and the increment are one atomic step.
//!
//! A file record is written before it is listed, together with its entry in the expiry index: a
//! crash in between leaves a record nobody lists or counts, which the expiry sweep removes at its
//! `expires_at` like any other (releasing nothing, as nothing was counted).

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use crate::{Store, StoreError};
use sluice_core::config::StorageQuota;

type Result<T> = std::result::Result<T, StoreError>;

/// Lists a file and counts it, unless it is listed already or (with limits) it would take the
/// tenant past them. `ARGV`: id, listing position, bytes, byte limit, file limit (`-1`: none).
static REGISTER_FILE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/register_file.lua")));

/// Unlists a file and gives back the bytes it was counted for, once. `ARGV`: id.
static RELEASE_FILE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/release_file.lua")));

/// What a tenant stores now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageUsage {
    /// Bytes stored.
    pub bytes: u64,
    /// Files stored.
    pub files: u64,
}

/// The limit a refused file would have passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaPart {
    /// The byte quota.
    Bytes,
    /// The file quota.
    Files,
}

/// What registering a file did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    /// Listed and counted; the usage now.
    Stored(StorageUsage),
    /// Listed (and counted) before: nothing changed.
    AlreadyListed,
    /// Refused: the file would take the tenant past this limit. Nothing is kept.
    OverQuota(QuotaPart, StorageUsage),
}

fn limit_arg(limit: Option<u64>) -> i64 {
    limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

impl Store {
    /// Stores a file record, indexes its `expires_at` and lists it for its tenant, counting its
    /// `bytes` toward the tenant's usage. With `quota`, a file that would take the tenant past it
    /// is refused and its record removed; without, it is always counted (result files: a batch's
    /// output is never thrown away, it makes the next upload wait for room instead).
    pub async fn register_file(
        &self,
        id: &str,
        tenant: &str,
        fields: &[(&str, String)],
        quota: Option<StorageQuota>,
    ) -> Result<Registered> {
        let keys = self.keys();
        let seq = self.next_sequence().await?;
        let field = |name: &str| fields.iter().find(|(k, _)| *k == name).map(|(_, v)| v);
        let bytes: u64 = field("bytes").and_then(|b| b.parse().ok()).unwrap_or(0);
        let expires_at: Option<i64> = field("expires_at").and_then(|e| e.parse().ok());
        let mut all: Vec<(&str, String)> = fields.to_vec();
        all.push(("id", id.to_owned()));
        all.push(("tenant", tenant.to_owned()));
        all.push(("seq", seq.to_string()));
        let mut pipe = redis::pipe();
        pipe.hset_multiple(keys.file(id), &all).ignore();
        if let Some(at) = expires_at {
            pipe.zadd(keys.expiring_files(), id, at).ignore();
        }
        let () = pipe.query_async(&mut self.conn()).await?;
        let (verdict, used, files): (String, u64, u64) = REGISTER_FILE
            .key(keys.tenant_files(tenant))
            .key(keys.tenant_usage(tenant))
            .key(keys.tenant_counted(tenant))
            .arg(id)
            .arg(seq)
            .arg(bytes)
            .arg(limit_arg(quota.map(|q| q.bytes)))
            .arg(limit_arg(quota.map(|q| q.files)))
            .invoke_async(&mut self.conn())
            .await?;
        let usage = StorageUsage { bytes: used, files };
        let part = match verdict.as_str() {
            "ok" => return Ok(Registered::Stored(usage)),
            "listed" => return Ok(Registered::AlreadyListed),
            "bytes" => QuotaPart::Bytes,
            "files" => QuotaPart::Files,
            other => return Err(StoreError::Protocol(format!("register_file: {other}"))),
        };
        let mut pipe = redis::pipe();
        pipe.del(keys.file(id))
            .ignore()
            .zrem(keys.expiring_files(), id)
            .ignore();
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(Registered::OverQuota(part, usage))
    }

    /// Unlists a file and gives the bytes it was counted for back to its tenant (once, however
    /// often it is called), and drops it from the expiry index.
    pub async fn release_file(&self, id: &str, tenant: &str) -> Result<()> {
        let keys = self.keys();
        let _: i64 = RELEASE_FILE
            .key(keys.tenant_files(tenant))
            .key(keys.tenant_usage(tenant))
            .key(keys.tenant_counted(tenant))
            .arg(id)
            .invoke_async(&mut self.conn())
            .await?;
        let _: i64 = self.conn().zrem(keys.expiring_files(), id).await?;
        Ok(())
    }

    /// What `tenant` stores now.
    pub async fn storage_usage(&self, tenant: &str) -> Result<StorageUsage> {
        let (bytes, files): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(self.keys().tenant_usage(tenant))
            .arg("bytes")
            .arg("files")
            .query_async(&mut self.conn())
            .await?;
        Ok(StorageUsage {
            bytes: bytes.unwrap_or(0).max(0) as u64,
            files: files.unwrap_or(0).max(0) as u64,
        })
    }

    /// Up to `limit` file ids whose `expires_at` is at or before `now`, soonest first.
    pub async fn expired_files(&self, now: i64, limit: u64) -> Result<Vec<String>> {
        Ok(redis::cmd("ZRANGE")
            .arg(self.keys().expiring_files())
            .arg("-inf")
            .arg(now)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await?)
    }

    /// Moves a file's next expiry look to `at` (a file kept past its `expires_at`, say because a
    /// running batch reads it), or drops it from the index (`None`).
    pub async fn reschedule_expiry(&self, id: &str, at: Option<i64>) -> Result<()> {
        let key = self.keys().expiring_files();
        let _: i64 = match at {
            Some(at) => self.conn().zadd(key, id, at).await?,
            None => self.conn().zrem(key, id).await?,
        };
        Ok(())
    }

    /// How many unfinished batches read `file`.
    pub async fn file_user_count(&self, file: &str) -> Result<u64> {
        Ok(self.conn().zcard(self.keys().file_users(file)).await?)
    }

    /// Whether `batch` is recorded as reading `file`.
    pub async fn is_file_user(&self, file: &str, batch: &str) -> Result<bool> {
        let score: Option<f64> = self
            .conn()
            .zscore(self.keys().file_users(file), batch)
            .await?;
        Ok(score.is_some())
    }

    /// Up to `limit` batch ids that ended at or before `before`, earliest first.
    pub async fn ended_batches(&self, before: i64, limit: u64) -> Result<Vec<String>> {
        Ok(redis::cmd("ZRANGE")
            .arg(self.keys().ended_batches())
            .arg("-inf")
            .arg(before)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut self.conn())
            .await?)
    }

    /// Removes an ended batch for good: its record, every working key it may have left, its
    /// listing entry and its index entries. Idempotent.
    pub async fn remove_batch(&self, id: &str) -> Result<()> {
        let keys = self.keys();
        let tenant: Option<String> = self
            .conn()
            .hget(
                keys.batch_meta(id),
                sluice_core::domain::batch_field::TENANT,
            )
            .await?;
        let mut pipe = redis::pipe();
        if let Some(tenant) = &tenant {
            pipe.zrem(keys.tenant_batches(tenant), id)
                .ignore()
                .zrem(keys.tenant_open(tenant), id)
                .ignore();
        }
        // The batch's own keys share its hash tag, so one DEL; a cluster pipeline splits the rest
        // by slot.
        pipe.cmd("DEL")
            .arg(keys.batch_meta(id))
            .arg(keys.batch_rows(id))
            .arg(keys.batch_inflight(id))
            .arg(keys.batch_lease(id))
            .arg(keys.batch_dispatch_lease(id))
            .arg(keys.batch_done(id))
            .arg(keys.batch_segments(id))
            .arg(keys.batch_compact_ask(id))
            .ignore()
            .zrem(keys.active(), id)
            .ignore()
            .zrem(keys.ended_batches(), id)
            .ignore();
        let () = pipe.query_async(&mut self.conn()).await?;
        Ok(())
    }
}

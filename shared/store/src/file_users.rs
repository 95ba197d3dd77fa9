//! Input files in use: a file that an unfinished batch reads cannot be deleted.
//!
//! Each file has a sorted set of the batches that read it (`f:{file}:users`, the file record's
//! hash tag, so one Cluster slot), scored by when they took it. A batch takes its input file
//! before it is stored, in one script that also checks the file exists and belongs to the
//! batch's tenant; a delete removes the file record only if that set is empty, in one script too.
//! So a create racing a delete either sees the file and holds it (the delete then gets 409), or
//! sees it gone (the dispatcher then fails the batch: no such file). A batch gives its file back
//! when it becomes terminal ([`Store::retire_batch`]). Entries left by a crash (a batch never
//! stored, a terminal batch never retired) are pruned when a delete finds the file in use.

use std::sync::LazyLock;

use redis::Script;

use crate::{Store, StoreError};

static USE_FILE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/use_file.lua")));

static DELETE_UNUSED: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/delete_unused_file.lua")));

/// What deleting a file record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileDelete {
    /// The record is gone (or was already).
    Deleted,
    /// Unfinished batches read the file (up to ten of their ids); nothing changed.
    InUse(Vec<String>),
}

impl Store {
    /// Records that `batch` of `tenant` reads `file`. False (and nothing recorded) when no such
    /// file belongs to `tenant` or it is past its `expires_at` (the expiry sweep deletes a file no
    /// batch reads, and from then on none can start to): the batch then fails at validation like any batch over a missing
    /// file.
    pub async fn use_file(
        &self,
        file: &str,
        tenant: &str,
        batch: &str,
    ) -> Result<bool, StoreError> {
        let n: i64 = USE_FILE
            .key(self.keys().file(file))
            .key(self.keys().file_users(file))
            .arg(batch)
            .arg(tenant)
            .arg(sluice_core::domain::now_millis())
            .arg(sluice_core::domain::now_secs())
            .invoke_async(&mut self.conn())
            .await?;
        Ok(n == 1)
    }

    /// Removes a file record and its listing entry, unless an unfinished batch reads the file.
    pub async fn delete_file_unless_used(
        &self,
        file: &str,
        tenant: &str,
    ) -> Result<FileDelete, StoreError> {
        let users: Vec<String> = DELETE_UNUSED
            .key(self.keys().file(file))
            .key(self.keys().file_users(file))
            .invoke_async(&mut self.conn())
            .await?;
        if !users.is_empty() {
            return Ok(FileDelete::InUse(users));
        }
        // Another slot in a Cluster, so not in the script. Should this fail, the listing entry
        // (skipped by listings, as it has no record) and its bytes stay counted.
        self.release_file(file, tenant).await?;
        Ok(FileDelete::Deleted)
    }

    /// Drops from `file`'s users the batches that are terminal, and those taken before
    /// `taken_before_ms` whose batch was never stored; returns how many were dropped.
    pub async fn prune_file_users(
        &self,
        file: &str,
        taken_before_ms: i64,
    ) -> Result<u64, StoreError> {
        self.prune_batch_set(&self.keys().file_users(file), taken_before_ms)
            .await
    }
}

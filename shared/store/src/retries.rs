//! A batch's retry children: the bounded `retries` list of a parent batch.
//!
//! The list lives in the parent's record (field `retries`, ids joined by `,`), so it goes with the
//! record at retention and needs no key of its own. A child's id is taken before the child is
//! stored, so concurrent retries of one parent never pass the bound between them.

use std::sync::LazyLock;

use redis::Script;

use super::{Result, Store, StoreError};

static TAKE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/take_retry_slot.lua")));

static GIVE_BACK: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/give_back_retry_slot.lua")));

/// Outcome of [`Store::take_retry_slot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrySlot {
    /// The child id is listed on the parent.
    Taken,
    /// The parent already lists `max` children.
    Full,
    /// The parent's record is gone (retention removed it meanwhile).
    Gone,
}

impl Store {
    /// Lists `child` among `parent`'s retries unless it already lists `max` of them.
    pub async fn take_retry_slot(&self, parent: &str, child: &str, max: u64) -> Result<RetrySlot> {
        let verdict: String = TAKE
            .key(self.keys.batch_meta(parent))
            .arg(child)
            .arg(max)
            .invoke_async(&mut self.conn())
            .await?;
        match verdict.as_str() {
            "ok" => Ok(RetrySlot::Taken),
            "full" => Ok(RetrySlot::Full),
            "gone" => Ok(RetrySlot::Gone),
            other => Err(StoreError::Protocol(other.to_owned())),
        }
    }

    /// Removes `child` from `parent`'s retries (its creation failed after the slot was taken).
    pub async fn give_back_retry_slot(&self, parent: &str, child: &str) -> Result<()> {
        let _: i64 = GIVE_BACK
            .key(self.keys.batch_meta(parent))
            .arg(child)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }
}

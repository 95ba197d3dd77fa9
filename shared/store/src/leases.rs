//! Leases: a Redis key held with a random token for a while, renewed and released only by
//! whoever holds that token.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{Result, Store};

static RENEW_LEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/renew_lease.lua")));

static RELEASE_LEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/release_lease.lua")));

impl Store {
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
}

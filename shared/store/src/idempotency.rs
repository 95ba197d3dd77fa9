//! `Idempotency-Key`s in Redis: one string per (tenant, key) that is first the claim of the
//! request in progress (a random token, with a short expiry renewed while the request runs), then
//! the first successful response (with the retention as expiry), or gone again when that request
//! failed.
//!
//! Claiming is one `SET NX`, so of two concurrent requests with one key exactly one runs; the
//! other learns in the same round trip what holds the key. Renewing, recording and releasing act
//! only while the key still holds the caller's token, so a request whose claim lapsed (its process
//! stalled past the lease) can neither overwrite nor free a key another request has taken since.

use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands, Script};

use crate::{Store, StoreError};

/// Sets the caller's token unless the key is held; answers `{1}` or `{0, <what holds it>}`.
static CLAIM: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/claim_idempotency_key.lua")));

static RECORD: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../lua/record_idempotent_response.lua")));

/// What holds an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// The caller holds it now; the token proves it.
    Claimed(String),
    /// Another request holds it and has not answered yet.
    InProgress,
    /// It is bound to this recorded response (as given to [`Store::record_idempotent`]).
    Recorded(String),
}

impl KeyState {
    /// Tokens are hex; a recorded response is a JSON object.
    fn of_value(value: String) -> Self {
        if value.starts_with('{') {
            Self::Recorded(value)
        } else {
            Self::InProgress
        }
    }
}

impl Store {
    /// Claims `key` for `lease` unless something holds it, in which case that is answered.
    pub async fn claim_idempotency_key(
        &self,
        key: &str,
        lease: Duration,
    ) -> Result<KeyState, StoreError> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let (claimed, value): (i64, String) = CLAIM
            .key(key)
            .arg(&token)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(if claimed == 1 {
            KeyState::Claimed(token)
        } else {
            KeyState::of_value(value)
        })
    }

    /// What holds `key` now (`None`: nothing; it can be claimed).
    pub async fn idempotency_key_state(&self, key: &str) -> Result<Option<KeyState>, StoreError> {
        let value: Option<String> = self.conn().get(key).await?;
        Ok(value.map(KeyState::of_value))
    }

    /// Binds `key`, still claimed with `token`, to `record` (a JSON object) for `retention`; false
    /// if the claim was lost meanwhile (nothing is written then).
    pub async fn record_idempotent(
        &self,
        key: &str,
        token: &str,
        record: &str,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        debug_assert!(record.starts_with('{'));
        let n: i64 = RECORD
            .key(key)
            .arg(token)
            .arg(record)
            .arg(retention.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(n == 1)
    }
}

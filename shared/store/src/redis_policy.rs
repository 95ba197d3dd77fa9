//! What Sluice needs of Redis as its system of record: no eviction, and room to write.
//!
//! Batches, rows and file records live only in Redis. An evicting `maxmemory-policy` drops them
//! silently under memory pressure, so every role refuses to start on one (unless
//! `redis_allow_eviction = true`). With `noeviction`, a full Redis refuses writes with `OOM`
//! instead: `/readyz` then says so, rather than reporting a healthy process that fails every
//! batch.

use std::time::Duration;

use crate::Store;
use sluice_core::connect::redact;

/// The policy that never drops keys.
const NO_EVICTION: &str = "noeviction";

/// Reads `maxmemory-policy` and refuses an evicting one unless `allow_eviction`. A server that
/// refuses `CONFIG GET` (managed Redis often does) is logged and accepted: the operator is then
/// responsible for the policy, as the operator guide says (docs/operator-guide.md).
pub async fn check_eviction_policy(store: &Store, allow_eviction: bool) -> anyhow::Result<()> {
    let reply: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(&mut store.conn())
        .await;
    let url = redact(store.url());
    let policy = match reply {
        Ok(pair) => match pair.into_iter().nth(1) {
            Some(policy) => policy,
            None => {
                tracing::info!(%url, "Redis did not report its maxmemory-policy; make sure it is noeviction.");
                return Ok(());
            }
        },
        Err(e) => {
            tracing::info!(%url, error = %e, "Redis refused CONFIG GET maxmemory-policy; make sure it is noeviction.");
            return Ok(());
        }
    };
    if policy == NO_EVICTION {
        return Ok(());
    }
    if allow_eviction {
        tracing::warn!(%url, %policy, "Redis evicts keys (maxmemory-policy {policy}); running anyway because redis_allow_eviction = true. Batches and files may be lost under memory pressure.");
        return Ok(());
    }
    anyhow::bail!(
        "Redis at {url} has maxmemory-policy {policy}, which evicts keys: batches, rows and file \
         records would be lost under memory pressure. Set maxmemory-policy noeviction (or \
         redis_allow_eviction = true to run anyway)."
    )
}

/// Writes a short-lived key: `Err` with a reason when Redis answers but refuses writes (out of
/// memory, a read-only replica), or does not answer within `timeout`.
pub async fn write_probe(store: &Store, timeout: Duration) -> Result<(), String> {
    let key = format!("{}:readyz", store.keys().namespace());
    let set = async {
        redis::cmd("SET")
            .arg(&key)
            .arg(sluice_core::domain::now_millis())
            .arg("PX")
            .arg(10_000)
            .query_async::<()>(&mut store.conn())
            .await
    };
    match tokio::time::timeout(timeout, set).await {
        Err(_) => Err(format!(
            "did not answer a write within {} ms",
            timeout.as_millis()
        )),
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.code() == Some("OOM") => Err(format!(
            "is out of memory (maxmemory reached): it refuses writes, so no batch can make \
             progress ({e})"
        )),
        Ok(Err(e)) if e.code() == Some("READONLY") => {
            Err(format!("is a read-only replica: it refuses writes ({e})"))
        }
        Ok(Err(e)) => Err(format!("refused a write: {e}")),
    }
}

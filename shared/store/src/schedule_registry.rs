//! The schedule registry of a rate-limited provider in Redis: one hash per provider holding every
//! running batch's [`Entry`] (JSON, by batch id), from which each dispatcher computes the same
//! [`plan`](sluice_core::schedule::plan). Entries not refreshed within [`STALE_MS`] are dropped
//! on read.

use std::collections::HashMap;

use redis::AsyncCommands;

use crate::{Store, StoreError};
use sluice_core::schedule::{Entry, STALE_MS};

/// The registry of `provider`: every entry not stale, by batch id. Stale entries are removed.
pub async fn read_registry(
    store: &Store,
    provider: &str,
    now_ms: i64,
) -> Result<Vec<(String, Entry)>, StoreError> {
    let key = store.keys().schedule(provider);
    let raw: HashMap<String, String> = store.conn().hgetall(&key).await?;
    live_entries(store, &key, raw, now_ms).await
}

/// The entries of a registry read as `raw` that are not stale, by batch id; stale ones are
/// removed.
async fn live_entries(
    store: &Store,
    key: &str,
    raw: HashMap<String, String>,
    now_ms: i64,
) -> Result<Vec<(String, Entry)>, StoreError> {
    let mut live = Vec::new();
    let mut stale = Vec::new();
    for (id, json) in raw {
        match serde_json::from_str::<Entry>(&json) {
            Ok(e) if now_ms - e.seen_ms <= STALE_MS => live.push((id, e)),
            _ => stale.push(id),
        }
    }
    if !stale.is_empty() {
        let _: i64 = store.conn().hdel(key, &stale).await?;
    }
    live.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(live)
}

/// Writes (or refreshes) a batch's entry, and returns the whole registry.
pub async fn publish_entry(
    store: &Store,
    provider: &str,
    batch: &str,
    entry: &Entry,
) -> Result<Vec<(String, Entry)>, StoreError> {
    let key = store.keys().schedule(provider);
    let json = serde_json::to_string(entry).expect("entry serializes");
    let (_, raw): (i64, HashMap<String, String>) = redis::pipe()
        .hset(&key, batch, json)
        .hgetall(&key)
        .query_async(&mut store.conn())
        .await?;
    live_entries(store, &key, raw, entry.seen_ms).await
}

/// Removes a batch's entry (its dispatch ended).
pub async fn remove_entry(store: &Store, provider: &str, batch: &str) -> Result<(), StoreError> {
    let _: i64 = store
        .conn()
        .hdel(store.keys().schedule(provider), batch)
        .await?;
    Ok(())
}

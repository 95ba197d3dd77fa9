//! Cursor pagination of a tenant's listings (`after`, `limit`, `has_more`) and the OpenAI list
//! object around a page.

use std::collections::HashMap;

use anyhow::Context;
use serde_json::{Value, json};
use sluice_store::Store;

use crate::auth::Tenant;

/// One page of records from a tenant's listing set.
pub(crate) struct Page {
    pub(crate) records: Vec<HashMap<String, String>>,
    pub(crate) has_more: bool,
}

/// Where and how to read one page of a tenant's listing.
pub(crate) struct PageRequest<'a> {
    /// The tenant's sorted set of ids.
    pub(crate) set: String,
    /// Redis key of the record of an id.
    pub(crate) record_key: &'a (dyn Fn(&str) -> String + Sync),
    /// Cursor: the page starts right after this id.
    pub(crate) after: Option<&'a str>,
    pub(crate) desc: bool,
    pub(crate) limit: usize,
    /// Filter applied to records (e.g. `purpose`); pages are refilled past what it drops.
    pub(crate) keep: &'a (dyn Fn(&HashMap<String, String>) -> bool + Sync),
}

/// Reads up to `limit` records after the cursor, plus one more to learn `has_more`.
///
/// An `after` that is not in the tenant's set (unknown, deleted, another tenant's) yields an empty
/// page, as OpenAI does, rather than an error.
pub(crate) async fn read_page(
    store: &Store,
    tenant: &Tenant,
    req: PageRequest<'_>,
) -> anyhow::Result<Page> {
    let mut cursor = match req.after {
        None => None,
        Some(after) => match store
            .position(&req.set, after)
            .await
            .context("Failed to locate the pagination cursor")?
        {
            Some(position) => Some(position),
            None => {
                return Ok(Page {
                    records: Vec::new(),
                    has_more: false,
                });
            }
        },
    };
    let want = req.limit + 1;
    let mut records = Vec::with_capacity(want.min(1024));
    loop {
        let ask = want - records.len();
        let ids = store
            .page(&req.set, cursor, req.desc, ask)
            .await
            .context("Failed to read a listing page")?;
        let Some(last) = ids.last().cloned() else {
            break;
        };
        for record in fetch_records(store, ids.iter().map(|id| (req.record_key)(id))).await? {
            // Empty: deleted between the two reads. Foreign: cannot happen in a tenant's set, but
            // listing must never be the one place that leaks.
            if record.is_empty()
                || record.get("tenant").map(String::as_str) != Some(tenant.id())
                || !(req.keep)(&record)
            {
                continue;
            }
            records.push(record);
        }
        if records.len() >= want || ids.len() < ask {
            break;
        }
        // Only reached when records were dropped: continue after the last id seen.
        match store
            .position(&req.set, &last)
            .await
            .context("Failed to locate the pagination cursor")?
        {
            Some(position) => cursor = Some(position),
            None => break,
        }
    }
    let has_more = records.len() > req.limit;
    records.truncate(req.limit);
    Ok(Page { records, has_more })
}

/// `HGETALL` of each key in one round trip, in order (an empty map where a key is missing).
async fn fetch_records(
    store: &Store,
    keys: impl Iterator<Item = String>,
) -> anyhow::Result<Vec<HashMap<String, String>>> {
    let mut pipe = redis::pipe();
    let mut n = 0;
    for key in keys {
        pipe.hgetall(key);
        n += 1;
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    pipe.query_async(&mut store.conn())
        .await
        .context("Failed to read listed records")
}

/// The OpenAI list object around `data` (objects with an `id`).
pub(crate) fn list_object(data: Vec<Value>, has_more: bool) -> Value {
    let first_id = data.first().map_or(Value::Null, |o| o["id"].clone());
    let last_id = data.last().map_or(Value::Null, |o| o["id"].clone());
    json!({
        "object": "list",
        "data": data,
        "first_id": first_id,
        "last_id": last_id,
        "has_more": has_more,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_lists_have_null_cursors() {
        assert_eq!(
            list_object(Vec::new(), false),
            json!({"object": "list", "data": [], "first_id": null, "last_id": null, "has_more": false})
        );
        let page = list_object(vec![json!({"id": "a"}), json!({"id": "b"})], true);
        assert_eq!(page["first_id"], "a");
        assert_eq!(page["last_id"], "b");
    }
}

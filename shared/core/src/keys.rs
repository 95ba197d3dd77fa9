//! Every Redis key and RabbitMQ queue name Sluice uses, under the configured namespace.
//!
//! A batch's keys share the Redis Cluster hash tag `{<batch id>}`, so the Lua scripts that touch
//! several of them stay in one slot.

/// Key and queue-name builder for one namespace.
#[derive(Debug, Clone)]
pub struct Keys {
    ns: String,
}

impl Keys {
    /// Keys under `namespace`.
    pub fn new(namespace: &str) -> Self {
        Self {
            ns: namespace.to_owned(),
        }
    }

    /// The namespace itself.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// Hash: the batch object's fields, counters and internal state.
    pub fn batch_meta(&self, batch: &str) -> String {
        format!("{}:b:{{{batch}}}:meta", self.ns)
    }
    /// Hash: 0-based line index → finished row (`1`/`0` ok flag, then the output line), for the
    /// rows not yet compacted into a segment.
    pub fn batch_rows(&self, batch: &str) -> String {
        format!("{}:b:{{{batch}}}:rows", self.ns)
    }
    /// Bitmap: bit `line` is set once the line has a row (in [`Keys::batch_rows`] or a segment).
    /// The truth of "this line is done": counters move exactly when a bit goes 0 → 1.
    pub fn batch_done(&self, batch: &str) -> String {
        format!("{}:b:{{{batch}}}:done", self.ns)
    }
    /// Hash: segment name → `first last rows bytes` of each registered segment of the batch.
    pub fn batch_segments(&self, batch: &str) -> String {
        format!("{}:b:{{{batch}}}:segments", self.ns)
    }
    /// String with a short expiry: a compaction of the batch was asked for (dedupes the asks).
    pub fn batch_compact_ask(&self, batch: &str) -> String {
        format!("{}:b:{{{batch}}}:compact", self.ns)
    }
    /// Hash: line index → deadline (unix ms) of an upstream call in progress.
    pub fn batch_inflight(&self, batch: &str) -> String {
        format!("{}:b:{{{batch}}}:inflight", self.ns)
    }
    /// String with expiry: the aggregator currently finalizing the batch.
    pub fn batch_lease(&self, batch: &str) -> String {
        format!("{}:b:{{{batch}}}:lease", self.ns)
    }
    /// String with expiry: the dispatcher currently validating and enqueuing the batch.
    pub fn batch_dispatch_lease(&self, batch: &str) -> String {
        format!("{}:b:{{{batch}}}:dispatch", self.ns)
    }
    /// Hash: a file object's fields, its tenant and storage path.
    pub fn file(&self, file: &str) -> String {
        format!("{}:f:{{{file}}}", self.ns)
    }
    /// Sorted set: ids of the unfinished batches reading the file as input, scored by when they
    /// took it (unix ms). Same hash tag as [`Keys::file`], so one script sees both.
    pub fn file_users(&self, file: &str) -> String {
        format!("{}:f:{{{file}}}:users", self.ns)
    }
    /// Sorted set: the tenant's batch ids by creation sequence.
    pub fn tenant_batches(&self, tenant: &str) -> String {
        format!("{}:t:{{{tenant}}}:batches", self.ns)
    }
    /// Sorted set: the tenant's file ids by creation sequence.
    pub fn tenant_files(&self, tenant: &str) -> String {
        format!("{}:t:{{{tenant}}}:files", self.ns)
    }
    /// Sorted set: the tenant's batch ids not yet terminal, by reservation time (the per-owner
    /// limit counts it).
    pub fn tenant_open(&self, tenant: &str) -> String {
        format!("{}:t:{{{tenant}}}:open", self.ns)
    }
    /// String with expiry: what `tenant`'s `Idempotency-Key` (by its SHA-256, hex) is bound to:
    /// the claim token of the request in progress, then the first successful response.
    pub fn idempotency(&self, tenant: &str, key_sha256: &str) -> String {
        format!("{}:t:{{{tenant}}}:idem:{key_sha256}", self.ns)
    }
    /// Hash (`requests`, `tokens`): the tenant's usage counted toward its budget in one window
    /// (`window`: `d<start>` for a day, `m<start>` for a month, start in unix seconds).
    pub fn tenant_budget(&self, tenant: &str, window: &str) -> String {
        format!("{}:t:{{{tenant}}}:budget:{window}", self.ns)
    }
    /// Bitmap: bit `2·line` is set once a line of `batch` counted as a request toward its tenant's
    /// budget, bit `2·line + 1` once its tokens did, so a redelivered line counts once.
    pub fn tenant_billed(&self, tenant: &str, batch: &str) -> String {
        format!("{}:t:{{{tenant}}}:billed:{batch}", self.ns)
    }
    /// Sorted set: non-terminal batch ids scored by `expires_at` (unix seconds).
    pub fn active(&self) -> String {
        format!("{}:active", self.ns)
    }
    /// Hash: batch id → scheduling entry (JSON) of each running batch of a rate-limited provider.
    pub fn schedule(&self, provider: &str) -> String {
        format!("{}:sched:{{{provider}}}", self.ns)
    }
    /// Pacing state of one provider (`part`: `rq`/`tk` rate TATs, `pause`, `conc` leases, `aimd`,
    /// `breaker`). Every part shares the hash tag `{<provider>}`, so one script can touch them all.
    pub fn pacing(&self, provider: &str, part: &str) -> String {
        format!("{}:p:{{{provider}}}:{part}", self.ns)
    }
    /// Counter giving every created object a monotonic listing position.
    pub fn sequence(&self) -> String {
        format!("{}:seq", self.ns)
    }

    /// Queue of "validate and enqueue this batch" messages.
    pub fn control_queue(&self) -> String {
        format!("{}.control", self.ns)
    }
    /// Quorum queue of line messages (several lines of one batch each).
    pub fn items_queue(&self) -> String {
        format!("{}.items", self.ns)
    }
    /// Quorum queue of the line messages of small batches, consumed beside [`Keys::items_queue`]
    /// so a small batch never queues behind a big one's window.
    pub fn express_queue(&self) -> String {
        format!("{}.items.express", self.ns)
    }
    /// Exchange receiving line messages past their delivery limit.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.ns)
    }
    /// Queue of dead-lettered line messages; its consumer writes `processing_failed` rows.
    pub fn items_dlq(&self) -> String {
        format!("{}.items.dlq", self.ns)
    }
    /// Exchange that routes lines coming out of a delay queue back to the work queue.
    pub fn requeue_exchange(&self) -> String {
        format!("{}.requeue", self.ns)
    }
    /// Delay queue: a line published here comes back to the work queue after `ms` milliseconds.
    pub fn retry_queue(&self, ms: u64) -> String {
        format!("{}.retry.{ms}", self.ns)
    }
    /// Queue of "this batch may be ready to finalize" events for the aggregator.
    pub fn finalize_queue(&self) -> String {
        format!("{}.finalize", self.ns)
    }
    /// Quorum queue of webhook jobs (one event for one endpoint each), consumed by aggregators.
    pub fn webhooks_queue(&self) -> String {
        format!("{}.webhooks", self.ns)
    }
    /// Delay queue: a webhook job published here comes back to the webhooks queue after `ms`.
    pub fn webhooks_retry_queue(&self, ms: u64) -> String {
        format!("{}.webhooks.retry.{ms}", self.ns)
    }
    /// Exchange that routes webhook jobs coming out of a delay queue back to the webhooks queue.
    pub fn webhooks_requeue_exchange(&self) -> String {
        format!("{}.webhooks.requeue", self.ns)
    }
    /// Queue of webhook jobs that ran out of retries (or were refused); nothing consumes it.
    pub fn webhooks_dlq(&self) -> String {
        format!("{}.webhooks.dlq", self.ns)
    }
    /// String with expiry: the event was delivered to the endpoint (`endpoint`: a digest of its
    /// URL), so another announcement of it is not sent again.
    pub fn webhook_delivered(&self, event_id: &str, endpoint: &str) -> String {
        format!("{}:wh:{{{event_id}}}:{endpoint}", self.ns)
    }
    /// Every queue of the namespace (tests delete them when done).
    pub fn all_queues(&self) -> Vec<String> {
        let mut queues = vec![
            self.control_queue(),
            self.items_queue(),
            self.express_queue(),
            self.items_dlq(),
            self.finalize_queue(),
            self.webhooks_queue(),
            self.webhooks_dlq(),
        ];
        queues.extend(RETRY_TIERS_MS.iter().map(|ms| self.retry_queue(*ms)));
        queues.extend(
            WEBHOOK_TIERS_MS
                .iter()
                .map(|ms| self.webhooks_retry_queue(*ms)),
        );
        queues
    }
    /// Hash: a tenant's stored `bytes` and `files` (listed files only). Same hash tag as
    /// [`Keys::tenant_files`], so one script lists and counts.
    pub fn tenant_usage(&self, tenant: &str) -> String {
        format!("{}:t:{{{tenant}}}:usage", self.namespace())
    }
    /// Hash: file id → the bytes it counts for in [`Keys::tenant_usage`]. A file gives back what it
    /// took, and a file listed before accounting existed (absent here) gives back nothing.
    pub fn tenant_counted(&self, tenant: &str) -> String {
        format!("{}:t:{{{tenant}}}:counted", self.namespace())
    }
    /// Sorted set: file ids scored by `expires_at` (unix seconds), read by the expiry sweep.
    pub fn expiring_files(&self) -> String {
        format!("{}:expiring", self.namespace())
    }
    /// Sorted set: ended batch ids scored by when they ended (unix seconds), read by the
    /// retention sweep.
    pub fn ended_batches(&self) -> String {
        format!("{}:ended", self.namespace())
    }
    /// String with expiry: the replica running the lifecycle sweep right now.
    pub fn lifecycle_lease(&self) -> String {
        format!("{}:lifecycle:lease", self.namespace())
    }
}

/// Delays of the delay queues (ms). A line waits in the smallest tier at least as long as its
/// delay, so it never comes back sooner than asked (the largest tier caps the wait).
pub const RETRY_TIERS_MS: &[u64] = &[
    250, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000,
];

/// Delays of the webhook delay queues (ms). Few, since every quorum queue costs the broker file
/// handles: a job carries when it is due and goes round the largest tier not above its remaining
/// wait until then (a 40 s wait is 30 s + 10 × 1 s).
pub const WEBHOOK_TIERS_MS: &[u64] = &[1_000, 30_000, 300_000];

/// The delay tier for a wait of `ms`.
pub fn retry_tier(ms: u64) -> u64 {
    RETRY_TIERS_MS
        .iter()
        .copied()
        .find(|t| *t >= ms)
        .unwrap_or(RETRY_TIERS_MS[RETRY_TIERS_MS.len() - 1])
}

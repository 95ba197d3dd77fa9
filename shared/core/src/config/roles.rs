//! `[worker]`, `[aggregator]` and `[lifecycle]`: the clocks and sizes of the background roles, with
//! their defaults.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// `[worker]`: how line workers call upstreams (concurrency, retries, timeouts, circuit breaker)
/// and how the dispatcher packs and paces lines into the work queues.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Lines called upstream at once by one worker process. The AMQP prefetch is twice the
    /// messages that carry this many lines, so slots stay busy while a message waits for its
    /// slowest line.
    pub concurrency: u16,
    /// Upstream attempts per line before it becomes an error row.
    pub max_attempts: u32,
    /// First retry delay of a line (ms); doubles per attempt up to `backoff_max_ms`, with jitter.
    pub backoff_base_ms: u64,
    /// Longest delay between two attempts of a line (ms).
    pub backoff_max_ms: u64,
    /// Longest `Retry-After` honoured before falling back to the cap (seconds).
    pub max_retry_after_secs: u64,
    /// TCP connect (and TLS handshake) of one upstream call (ms).
    pub connect_timeout_ms: u64,
    /// Deadline of one upstream call, body included (ms).
    pub request_timeout_ms: u64,
    /// Deliveries of one line message before RabbitMQ dead-letters it.
    pub delivery_limit: u32,
    /// Lines published by the dispatcher with unconfirmed publisher confirms at once.
    #[schemars(extend("x-advanced" = "a publishing pipeline depth; the default keeps the broker busy without holding much memory"))]
    pub publish_window: usize,
    #[schemars(extend("x-advanced" = "message packing; the default balances broker overhead against redelivery cost"))]
    /// Consecutive lines of a batch carried by one work-queue message (fewer deliveries, acks and
    /// store round trips per line). A message also closes once its lines pass 64 KiB. A message
    /// is acked when its last line has its row, and one that comes back (its worker died) is
    /// split into single-line messages, so a line that kills workers is dead-lettered alone.
    pub lines_per_message: usize,
    #[schemars(extend("x-advanced" = "message packing of paced batches; the default keeps batches interleaved"))]
    /// Lines per message, at most `lines_per_message`, for a batch whose provider has a rate or
    /// concurrency limit (scheduled dispatch). There the provider, not the cost of a message,
    /// bounds throughput, and small messages keep the batches' lines finely interleaved in the
    /// work queue and few of them held in a worker waiting for their starts.
    pub paced_lines_per_message: usize,
    #[schemars(extend("x-advanced" = "queue routing of small batches; the default keeps small batches fast"))]
    /// Batches of at most this many lines go through the express work queue, which every line
    /// worker consumes beside the main one: a small batch does not wait behind the window of a
    /// big batch (0 turns the express queue off).
    pub express_lines: u64,
    /// How long a worker lets in-flight lines finish after SIGTERM (ms).
    pub shutdown_grace_ms: u64,
    /// Whether this worker calls the upstream for lines; `false` makes a dispatch-only worker
    /// (validation and enqueueing of new batches, and dead letters), e.g. for ingest-heavy pods.
    pub lines: bool,
    /// Longest time a line's retries may span, from its first attempt (seconds); past it, the line
    /// ends with its last error. The batch's `expires_at` bounds it too.
    pub max_retry_elapsed_secs: u64,
    /// Longest provider pause or open breaker a line waits for in its consumer slot (ms); a
    /// longer pause sends it to a delay queue.
    #[schemars(extend("x-advanced" = "trades consumer slots against delay-queue round trips; rarely worth changing"))]
    pub max_hold_ms: u64,
    #[schemars(extend("x-advanced" = "rate-limiter internals"))]
    /// Longest time ahead a call reserves its start under a rate limit (ms, at most `max_hold_ms`).
    /// Short keeps the token-limit feedback tight: usage corrections apply to fewer reservations
    /// already handed out.
    pub reserve_ahead_ms: u64,
    #[schemars(extend("x-advanced" = "fairness window of the dispatcher; the default suits batches of any size"))]
    /// Lines of one batch in the work queue at once (fairness: a big batch never has more than
    /// its window ahead of another batch's); the dispatcher tops the window up as rows land.
    pub batch_window: u64,
    #[schemars(extend("x-advanced" = "grows the fairness window for fast batches; the default suits most providers"))]
    /// The window grows to this many seconds of the batch's observed throughput when that is more
    /// than `batch_window` lines, so a fast batch never waits for its own top-ups.
    pub batch_window_secs: u64,
    /// On a rate-limited provider, the fraction of a tenant's share split evenly among its
    /// batches before the least-slack batch takes the rest: no batch starves behind nearer
    /// deadlines. A fraction between 0 and 1.
    #[schemars(extend("x-advanced" = "scheduler internals: how a tenant's share is split among its batches"))]
    pub min_batch_share: f64,
    /// Consecutive failures (5xx, timeouts, connection errors; not 429) that open a provider's
    /// circuit breaker, fleet-wide.
    pub breaker_failures: u32,
    /// How long an open breaker stays open before letting probes through (ms).
    pub breaker_cooldown_ms: u64,
    #[schemars(extend("x-advanced" = "circuit-breaker internals"))]
    /// Calls let through at once while the breaker is half-open.
    pub breaker_probes: u32,
    /// Completion tokens assumed for a request that sets no `max_tokens` (token-limit estimate).
    pub default_max_tokens: u64,
    #[schemars(extend("x-advanced" = "fleet-state caching; shorter costs Redis reads, longer delays pauses"))]
    /// Oldest copy of an unpaced provider's fleet pause and breaker state a call may start on
    /// (ms): a pause or an opened breaker reaches every replica within this plus one Redis round
    /// trip. Shorter costs each worker more reads (one per provider per interval, while busy).
    pub fleet_view_ms: u64,
    #[schemars(extend("x-advanced" = "fleet-limiter reporting period"))]
    /// How long a paced provider's successful calls are summed before one report carries them
    /// (token corrections, the actual/estimate ratio) to the fleet limiter (ms).
    pub pacing_report_ms: u64,
    #[schemars(extend("x-advanced" = "fleet-limiter call coalescing; costs no throughput at the default"))]
    /// Longest a rate-paced provider's lines wait in a worker to ask the fleet limiter together
    /// (ms). They wait only while the fleet is booked ahead, for at most half of how far it is
    /// booked, so the wait costs no throughput; 0 asks at once. Longer: fewer script calls per
    /// line.
    pub pacing_coalesce_ms: u64,
}

/// `[aggregator]`: the role that compacts rows, writes result files and terminal statuses, and
/// sweeps for expired and stuck batches.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorSettings {
    /// Period of the safety-net sweep (expiry, stuck batches, missed events), in ms.
    #[schemars(extend("x-advanced" = "recovery period; the default bounds how late a missed event is noticed"))]
    pub sweep_interval_ms: u64,
    #[schemars(extend("x-advanced" = "lease internals: how soon another aggregator takes over a dead one's work"))]
    /// Lifetime of a finalize or dispatch lease (ms); renewed while work goes on.
    pub lease_ms: u64,
    #[schemars(extend("x-advanced" = "recovery of a lost dispatch message"))]
    /// A batch still `validating` this long (ms) after creation gets its dispatch message
    /// published again.
    pub redispatch_after_ms: u64,
    /// How long a terminal batch's done-bitmap stays in Redis (seconds; its rows leave Redis at
    /// once).
    pub rows_ttl_secs: u64,
    #[schemars(extend("x-advanced" = "bounds the aggregator's memory; the default fits the default row limit"))]
    /// Most row bytes finalize reads from Redis at once (at least one row, so it must hold the
    /// largest row: `limits.max_response_bytes` and its envelope); bounds the aggregator's memory
    /// whatever the rows' sizes.
    pub finalize_read_bytes: u64,
    #[schemars(extend("x-advanced" = "compaction trigger; the default bounds Redis memory per batch"))]
    /// A running batch's rows are compacted into a segment once this many wait in Redis.
    pub compact_rows: u64,
    #[schemars(extend("x-advanced" = "compaction trigger"))]
    /// A running batch's rows are also compacted once their bytes in Redis reach this.
    pub compact_bytes: u64,
    #[schemars(extend("x-advanced" = "segment size; bounds the aggregator's memory while sorting"))]
    /// Most row bytes one segment takes (the aggregator holds them while sorting); at least one
    /// row, so at least `limits.max_response_bytes` + 64 KiB.
    pub segment_bytes: u64,
    #[schemars(extend("x-advanced" = "merge fan-in; bounds open reads while writing a result file"))]
    /// Most segments merged at once; a batch with more is merged in passes, so a merge holds at
    /// most this many read buffers and rows.
    pub merge_fan_in: u64,
    #[schemars(extend("x-advanced" = "compaction wake-up rate limit"))]
    /// After a row write asks for a compaction, further asks for the batch are dropped for this
    /// long (ms) unless the compaction ends first: a busy batch wakes the aggregator once per
    /// compaction, not once per row; a lost ask is asked again after it.
    pub compact_ask_ms: u64,
    #[schemars(extend("x-advanced" = "fault injection for tests; never set it in production"))]
    /// Fault injection for the durability tests: the process exits at once after writing a
    /// terminal status, before anything else. Never set it in production.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exit_after_terminal_status: bool,
}

/// How long files and batch records are kept, and how much a tenant may store.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleSettings {
    /// Lifetime of an uploaded `batch` file whose upload sets no `expires_after` (seconds;
    /// OpenAI: 30 days).
    pub batch_file_expires_after_secs: u64,
    /// Lifetime of a result file (`batch_output`) of a batch created without `output_expires_after`
    /// (seconds, from the file's creation; OpenAI: 30 days).
    pub batch_output_expires_after_secs: u64,
    /// How long a batch record stays after the batch ends (seconds); then it is removed (GET
    /// answers 404).
    pub batch_retention_secs: u64,
    #[schemars(extend("x-advanced" = "sweep batch size; the default keeps one pass short"))]
    /// Most expired files and ended batches one sweep pass removes (the rest wait for the next).
    pub sweep_limit: u64,
    /// Default storage quota of a tenant, in bytes of stored files (uploads and result files).
    pub storage_quota_bytes: u64,
    /// Default most files a tenant may store (uploads and result files).
    pub storage_quota_files: u64,
}

impl Default for LifecycleSettings {
    fn default() -> Self {
        Self {
            batch_file_expires_after_secs: 30 * 86_400,
            batch_output_expires_after_secs: 30 * 86_400,
            batch_retention_secs: 30 * 86_400,
            sweep_limit: 1_000,
            storage_quota_bytes: 1 << 40,
            storage_quota_files: 100_000,
        }
    }
}

impl WorkerSettings {
    /// How long a line stays marked in flight from its gate (the aggregator waits that long for it
    /// when its batch stops): one call and the longest hold before it.
    pub fn in_flight_for(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.request_timeout_ms + self.max_hold_ms + 5_000)
    }

    /// Lines per work-queue message of a batch, on a provider with scheduled dispatch or not.
    pub fn lines_per_message_for(&self, scheduled: bool) -> usize {
        let most = self.lines_per_message.max(1);
        if scheduled {
            most.min(self.paced_lines_per_message.max(1))
        } else {
            most
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            concurrency: 64,
            max_attempts: 5,
            backoff_base_ms: 500,
            backoff_max_ms: 30_000,
            max_retry_after_secs: 120,
            connect_timeout_ms: 10_000,
            request_timeout_ms: 600_000,
            delivery_limit: 5,
            publish_window: 1_000,
            lines_per_message: 128,
            paced_lines_per_message: 16,
            express_lines: 1_000,
            shutdown_grace_ms: 30_000,
            lines: true,
            max_retry_elapsed_secs: 3_600,
            max_hold_ms: 10_000,
            reserve_ahead_ms: 2_000,
            batch_window: 1_000,
            batch_window_secs: 2,
            min_batch_share: 0.1,
            breaker_failures: 10,
            breaker_cooldown_ms: 10_000,
            breaker_probes: 2,
            default_max_tokens: 256,
            fleet_view_ms: 100,
            pacing_report_ms: 200,
            pacing_coalesce_ms: 250,
        }
    }
}

impl Default for AggregatorSettings {
    fn default() -> Self {
        Self {
            sweep_interval_ms: 2_000,
            lease_ms: 30_000,
            redispatch_after_ms: 60_000,
            rows_ttl_secs: 86_400,
            finalize_read_bytes: 32 * 1024 * 1024,
            compact_rows: 5_000,
            compact_bytes: 8 * 1024 * 1024,
            segment_bytes: 64 * 1024 * 1024,
            merge_fan_in: 32,
            compact_ask_ms: 10_000,
            exit_after_terminal_status: false,
        }
    }
}

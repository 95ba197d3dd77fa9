//! Every Prometheus series Sluice exports, declared and registered once in a private registry.
//! Labels stay bounded: never a batch id or custom id; a `tenant` label only on the budget series,
//! whose tenants come from the configuration.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The process's metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    process: Registry,
    /// Finished lines by outcome (`succeeded`, `failed`, `dead_lettered`: rows written; `duplicate`,
    /// `late`, `skipped`, `orphan`: messages that needed no row from this worker).
    pub lines: IntCounterVec,
    /// Upstream call latency by status class (`2xx`, `4xx`, `5xx`, `error`).
    pub upstream_latency: HistogramVec,
    /// Upstream answers by status code (or `error` when none came).
    pub upstream_responses: IntCounterVec,
    /// Retries scheduled, by reason (`429`, `5xx`, `timeout`, `connect`, …).
    pub retries: IntCounterVec,
    /// Lines whose upstream call is in progress in this process.
    pub inflight: IntGauge,
    /// Batches that reached a terminal status, by status.
    pub batches_finished: IntCounterVec,
    /// Batch dispatch (validate and enqueue) duration.
    pub dispatch_seconds: HistogramVec,
    /// Result-file writing duration.
    pub finalize_seconds: HistogramVec,
    /// Lines published to the work queue.
    pub lines_enqueued: IntCounter,
    /// Bytes received in uploads.
    pub upload_bytes: IntCounter,
    /// Objects the lifecycle sweep removed: `kind` = `file` (expired) or `batch` (past retention).
    pub lifecycle_removed: IntCounterVec,
    /// Uploads and body creates refused for the tenant's storage quota, by `limit` (`bytes`, `files`).
    pub quota_refusals: IntCounterVec,
    /// Creates that carried an `Idempotency-Key`, by outcome (`created`, `replayed`, `mismatch`,
    /// `in_progress`, `released`).
    pub idempotent_requests: IntCounterVec,
    /// Messages ready in each queue of the namespace (`items`, `items.dlq`, `control`, …), as
    /// last sampled by an aggregator.
    pub queue_messages: IntGaugeVec,
    /// Time a line waited in its consumer slot before its call, by provider and reason (`rate`,
    /// `pause`, `concurrency`, `breaker`).
    pub pacing_wait: HistogramVec,
    /// Lines sent to a delay queue, by provider and reason (`retry`, or a pacing reason when the
    /// wait was too long to hold the slot).
    pub requeued: IntCounterVec,
    /// 429 answers, by provider.
    pub throttled: IntCounterVec,
    /// Fleet-wide pauses set, by provider and source (`retry_after`, `429`, `ratelimit_headers`).
    pub fleet_pauses: IntCounterVec,
    /// Circuit breaker state last seen by this process, by provider: 0 closed, 1 half-open, 2 open.
    pub breaker_state: IntGaugeVec,
    /// Breaker transitions caused by this process, by provider and new state.
    pub breaker_transitions: IntCounterVec,
    /// Limits in force, by provider and kind (`rpm`, `tpm`, `max_concurrency` configured;
    /// `concurrency` = the current adaptive limit).
    pub pacing_limit: IntGaugeVec,
    /// Lines that ended because their retry budget ran out, by budget (`attempts`, `elapsed`,
    /// `deadline`).
    pub retry_budget_exhausted: IntCounterVec,
    /// Rows moved from Redis into segment objects.
    pub rows_compacted: IntCounter,
    /// Segment objects registered by compactions.
    pub segments_written: IntCounter,
    /// Duration of one compaction (collect, write, register).
    pub compaction_seconds: Histogram,
    /// Usage counted toward the tenants' budgets, by tenant and kind (`requests`, `tokens`).
    pub tenant_usage: IntCounterVec,
    /// Lines that found their tenant's budget spent, by tenant and action (`held` until the reset,
    /// `failed` with `budget_exceeded`).
    pub budget_lines: IntCounterVec,
    /// Batch creates refused with `budget_exceeded`, by tenant.
    pub budget_refusals: IntCounterVec,
    /// Webhook delivery attempts and their ends, by outcome (`delivered`, `failed`: an attempt
    /// that will be retried, `dead_lettered`: out of retries, `refused`: the endpoint resolves to
    /// an address webhooks may not call, `dropped`: the endpoint or batch is gone, or the event
    /// is stale).
    pub webhook_deliveries: IntCounterVec,
    /// Running batches of a rate-limited provider that cannot finish before `expires_at` at the
    /// rate their scheduled window gives them, as this process last planned.
    pub batch_at_risk: IntGaugeVec,
}

impl Metrics {
    /// Builds and registers every series.
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("sluice".into()), None).expect("static registry prefix");
        let lines = IntCounterVec::new(
            Opts::new("lines_total", "Finished lines by outcome."),
            &["outcome"],
        )
        .expect("static metric");
        let upstream_latency = HistogramVec::new(
            HistogramOpts::new(
                "upstream_request_duration_seconds",
                "Upstream call latency.",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                600.0,
            ]),
            &["status_class"],
        )
        .expect("static metric");
        let upstream_responses = IntCounterVec::new(
            Opts::new(
                "upstream_responses_total",
                "Upstream answers by status code.",
            ),
            &["code"],
        )
        .expect("static metric");
        let retries = IntCounterVec::new(
            Opts::new("retries_total", "Upstream retries by reason."),
            &["reason"],
        )
        .expect("static metric");
        let inflight = IntGauge::new(
            "inflight_lines",
            "Lines being called upstream by this process.",
        )
        .expect("static metric");
        let batches_finished = IntCounterVec::new(
            Opts::new(
                "batches_finished_total",
                "Batches that reached a terminal status.",
            ),
            &["status"],
        )
        .expect("static metric");
        let dispatch_seconds = HistogramVec::new(
            HistogramOpts::new(
                "dispatch_duration_seconds",
                "Validate-and-enqueue duration per batch.",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
            &["result"],
        )
        .expect("static metric");
        let finalize_seconds = HistogramVec::new(
            HistogramOpts::new(
                "finalize_duration_seconds",
                "Result-file writing duration per batch.",
            )
            .buckets(vec![
                0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["status"],
        )
        .expect("static metric");
        let lines_enqueued =
            IntCounter::new("lines_enqueued_total", "Lines published to the work queue.")
                .expect("static metric");
        let lifecycle_removed = IntCounterVec::new(
            Opts::new(
                "lifecycle_removed_total",
                "Expired files and batch records past retention removed by the lifecycle sweep.",
            ),
            &["kind"],
        )
        .expect("static metric");
        let quota_refusals = IntCounterVec::new(
            Opts::new(
                "storage_quota_refusals_total",
                "Uploads refused for the tenant's storage quota.",
            ),
            &["limit"],
        )
        .expect("static metric");
        let idempotent_requests = IntCounterVec::new(
            Opts::new(
                "idempotent_requests_total",
                "Creates that carried an Idempotency-Key, by outcome.",
            ),
            &["outcome"],
        )
        .expect("static metric");
        let upload_bytes = IntCounter::new("upload_bytes_total", "Bytes received in file uploads.")
            .expect("static metric");
        let queue_messages = IntGaugeVec::new(
            Opts::new(
                "queue_messages",
                "Messages ready in a queue of the namespace, as last sampled.",
            ),
            &["queue"],
        )
        .expect("static metric");
        let pacing_wait = HistogramVec::new(
            HistogramOpts::new(
                "pacing_wait_seconds",
                "Time a line waited in its slot for the fleet limiter, a pause or the breaker.",
            )
            .buckets(vec![
                0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["provider", "reason"],
        )
        .expect("static metric");
        let requeued = IntCounterVec::new(
            Opts::new(
                "lines_requeued_total",
                "Lines sent to a delay queue instead of waiting in a consumer slot.",
            ),
            &["provider", "reason"],
        )
        .expect("static metric");
        let throttled = IntCounterVec::new(
            Opts::new("upstream_throttled_total", "429 answers from the upstream."),
            &["provider"],
        )
        .expect("static metric");
        let fleet_pauses = IntCounterVec::new(
            Opts::new(
                "fleet_pauses_total",
                "Fleet-wide pauses of a provider set by this process.",
            ),
            &["provider", "source"],
        )
        .expect("static metric");
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "breaker_state",
                "Circuit breaker state (0 closed, 1 half-open, 2 open).",
            ),
            &["provider"],
        )
        .expect("static metric");
        let breaker_transitions = IntCounterVec::new(
            Opts::new(
                "breaker_transitions_total",
                "Circuit breaker transitions caused by this process.",
            ),
            &["provider", "state"],
        )
        .expect("static metric");
        let pacing_limit = IntGaugeVec::new(
            Opts::new("pacing_limit", "Fleet-wide limits in force per provider."),
            &["provider", "kind"],
        )
        .expect("static metric");
        let retry_budget_exhausted = IntCounterVec::new(
            Opts::new(
                "retry_budget_exhausted_total",
                "Lines ended with their last error because a retry budget ran out.",
            ),
            &["budget"],
        )
        .expect("static metric");
        let rows_compacted = IntCounter::new(
            "rows_compacted_total",
            "Rows moved from Redis into segment objects.",
        )
        .expect("static metric");
        let segments_written = IntCounter::new(
            "segments_written_total",
            "Segment objects registered by compactions.",
        )
        .expect("static metric");
        let compaction_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "compaction_duration_seconds",
                "Duration of one compaction of pending rows into a segment.",
            )
            .buckets(vec![
                0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )
        .expect("static metric");
        let batch_at_risk = IntGaugeVec::new(
            Opts::new(
                "batch_at_risk",
                "Running batches that cannot finish in time under the provider's current load.",
            ),
            &["provider"],
        )
        .expect("static metric");
        let webhook_deliveries = IntCounterVec::new(
            Opts::new(
                "webhook_deliveries_total",
                "Webhook delivery attempts and their ends, by outcome.",
            ),
            &["outcome"],
        )
        .expect("static metric");
        let tenant_usage = IntCounterVec::new(
            Opts::new(
                "tenant_usage_total",
                "Requests and tokens counted toward the tenants' budgets.",
            ),
            &["tenant", "kind"],
        )
        .expect("static metric");
        let budget_lines = IntCounterVec::new(
            Opts::new(
                "budget_lines_total",
                "Lines that found their tenant's budget spent, held until the reset or failed.",
            ),
            &["tenant", "action"],
        )
        .expect("static metric");
        let budget_refusals = IntCounterVec::new(
            Opts::new(
                "budget_refusals_total",
                "Batch creates refused because the tenant's budget is spent.",
            ),
            &["tenant"],
        )
        .expect("static metric");
        for c in [
            Box::new(tenant_usage.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(budget_lines.clone()),
            Box::new(budget_refusals.clone()),
            Box::new(pacing_wait.clone()),
            Box::new(webhook_deliveries.clone()),
            Box::new(batch_at_risk.clone()),
            Box::new(rows_compacted.clone()),
            Box::new(segments_written.clone()),
            Box::new(compaction_seconds.clone()),
            Box::new(requeued.clone()),
            Box::new(throttled.clone()),
            Box::new(fleet_pauses.clone()),
            Box::new(breaker_state.clone()),
            Box::new(breaker_transitions.clone()),
            Box::new(pacing_limit.clone()),
            Box::new(retry_budget_exhausted.clone()),
            Box::new(lines.clone()),
            Box::new(upstream_latency.clone()),
            Box::new(upstream_responses.clone()),
            Box::new(retries.clone()),
            Box::new(inflight.clone()),
            Box::new(batches_finished.clone()),
            Box::new(dispatch_seconds.clone()),
            Box::new(finalize_seconds.clone()),
            Box::new(lines_enqueued.clone()),
            Box::new(upload_bytes.clone()),
            Box::new(lifecycle_removed.clone()),
            Box::new(quota_refusals.clone()),
            Box::new(idempotent_requests.clone()),
            Box::new(queue_messages.clone()),
        ] {
            registry
                .register(c)
                .expect("each series is registered once");
        }
        // Process series keep their standard `process_*` names, so they live outside the prefix.
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        process
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once");
        // Label values known in advance exist from the start at 0, so rate() sees their first event.
        for outcome in [
            "succeeded",
            "failed",
            "duplicate",
            "late",
            "skipped",
            "orphan",
            "dead_lettered",
        ] {
            lines.with_label_values(&[outcome]);
        }
        for reason in [
            "429",
            "408",
            "409",
            "5xx",
            "timeout",
            "connect",
            "transport",
        ] {
            retries.with_label_values(&[reason]);
        }
        for budget in ["attempts", "elapsed", "deadline"] {
            retry_budget_exhausted.with_label_values(&[budget]);
        }
        for status in ["completed", "failed", "expired", "cancelled"] {
            batches_finished.with_label_values(&[status]);
        }
        for kind in ["file", "batch"] {
            lifecycle_removed.with_label_values(&[kind]);
        }
        for limit in ["bytes", "files"] {
            quota_refusals.with_label_values(&[limit]);
        }
        for outcome in ["created", "replayed", "mismatch", "in_progress", "released"] {
            idempotent_requests.with_label_values(&[outcome]);
        }
        for outcome in ["delivered", "failed", "dead_lettered", "refused", "dropped"] {
            webhook_deliveries.with_label_values(&[outcome]);
        }
        Self {
            registry,
            process,
            lines,
            upstream_latency,
            upstream_responses,
            retries,
            inflight,
            batches_finished,
            dispatch_seconds,
            finalize_seconds,
            lines_enqueued,
            upload_bytes,
            lifecycle_removed,
            quota_refusals,
            idempotent_requests,
            queue_messages,
            pacing_wait,
            requeued,
            throttled,
            fleet_pauses,
            breaker_state,
            breaker_transitions,
            pacing_limit,
            retry_budget_exhausted,
            rows_compacted,
            segments_written,
            compaction_seconds,
            tenant_usage,
            budget_lines,
            budget_refusals,
            webhook_deliveries,
            batch_at_risk,
        }
    }

    /// Creates the per-tenant series of the configured tenants at 0, so rate() sees their first
    /// event.
    pub fn init_tenants<'t>(&self, tenants: impl IntoIterator<Item = &'t str>) {
        for tenant in tenants {
            for kind in ["requests", "tokens"] {
                self.tenant_usage.with_label_values(&[tenant, kind]);
            }
            for action in ["held", "failed"] {
                self.budget_lines.with_label_values(&[tenant, action]);
            }
            self.budget_refusals.with_label_values(&[tenant]);
        }
    }

    /// Content type of [`Metrics::render`].
    pub const CONTENT_TYPE: &'static str = "text/plain; version=0.0.4; charset=utf-8";

    /// The text exposition of every series.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(
                &[self.registry.gather(), self.process.gather()].concat(),
                &mut buf,
            )
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

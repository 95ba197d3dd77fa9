//! The batch record: the Redis hash `b:{id}:meta` read into a typed [`Batch`], and the names of
//! its fields ([`batch_field`]), shared by the Rust code and the store's Lua scripts (a store test
//! checks that every field a script names is one of these).

use std::collections::HashMap;
use std::str::FromStr;

use serde_json::{Value, json};

use super::{BatchStatus, StopReason};
use crate::schedule::Priority;

/// The field names of the batch record hash.
pub mod batch_field {
    /// Batch id.
    pub const ID: &str = "id";
    /// The tenant owning the batch.
    pub const TENANT: &str = "tenant";
    /// Listing position among the tenant's batches.
    pub const SEQ: &str = "seq";
    /// Current [`BatchStatus`](crate::domain::BatchStatus), by its wire name.
    pub const STATUS: &str = "status";
    /// Set while the batch is being stopped: a [`StopReason`](crate::domain::StopReason).
    pub const STOPPING: &str = "stopping";
    /// The endpoint every line targets.
    pub const ENDPOINT: &str = "endpoint";
    /// The model every line names, when they all name the same one.
    pub const MODEL: &str = "model";
    /// The input file.
    pub const INPUT_FILE_ID: &str = "input_file_id";
    /// The completion window as the client gave it (`24h`).
    pub const COMPLETION_WINDOW: &str = "completion_window";
    /// The client's metadata object, as JSON.
    pub const METADATA: &str = "metadata";
    /// A failed batch's `errors` object, as JSON.
    pub const ERRORS: &str = "errors";
    /// Scheduling tier, when not `normal`.
    pub const PRIORITY: &str = "priority";
    /// Lifetime of the result files, fixed at creation.
    pub const OUTPUT_EXPIRES_AFTER_SECS: &str = "output_expires_after_secs";
    /// The result file of successful lines.
    pub const OUTPUT_FILE_ID: &str = "output_file_id";
    /// The result file of failed lines.
    pub const ERROR_FILE_ID: &str = "error_file_id";
    /// The batch this one retries.
    pub const RETRY_OF: &str = "retry_of";
    /// The batches retrying this one, joined by `,`.
    pub const RETRIES: &str = "retries";
    /// Lines in the batch, once validated.
    pub const TOTAL: &str = "total";
    /// Lines enqueued so far (the dispatcher's checkpoint).
    pub const DISPATCHED: &str = "dispatched";
    /// Lines that succeeded.
    pub const COMPLETED: &str = "completed";
    /// Lines that failed.
    pub const FAILED: &str = "failed";
    /// Rows still in Redis, not yet compacted into a segment.
    pub const PENDING_ROWS: &str = "pend_n";
    /// Bytes of the rows still in Redis.
    pub const PENDING_BYTES: &str = "pend_b";
    /// Usage: input tokens.
    pub const INPUT_TOKENS: &str = "u_in";
    /// Usage: cached input tokens.
    pub const CACHED_TOKENS: &str = "u_cached";
    /// Usage: output tokens.
    pub const OUTPUT_TOKENS: &str = "u_out";
    /// Usage: reasoning tokens.
    pub const REASONING_TOKENS: &str = "u_reasoning";
    /// Usage: total tokens.
    pub const TOTAL_TOKENS: &str = "u_total";
    /// Unix ms a dispatcher last showed it was alive while enqueueing.
    pub const DISPATCH_ALIVE_MS: &str = "dispatch_alive_ms";
    /// Unix ms the aggregator last published the batch's dispatch again.
    pub const REDISPATCHED_AT_MS: &str = "redispatched_at_ms";
    /// Unix s of creation (also the `validating` stamp).
    pub const CREATED_AT: &str = "created_at";
    /// Unix s the completion window ends.
    pub const EXPIRES_AT: &str = "expires_at";
    /// Unix s the batch went `in_progress`.
    pub const IN_PROGRESS_AT: &str = "in_progress_at";
    /// Unix s the batch went `finalizing`.
    pub const FINALIZING_AT: &str = "finalizing_at";
    /// Unix s the batch went `completed`.
    pub const COMPLETED_AT: &str = "completed_at";
    /// Unix s the batch went `failed`.
    pub const FAILED_AT: &str = "failed_at";
    /// Unix s the batch went `expired`.
    pub const EXPIRED_AT: &str = "expired_at";
    /// Unix s the batch went `cancelling`.
    pub const CANCELLING_AT: &str = "cancelling_at";
    /// Unix s the batch went `cancelled`.
    pub const CANCELLED_AT: &str = "cancelled_at";

    /// Every field of the record.
    pub const ALL: &[&str] = &[
        ID,
        TENANT,
        SEQ,
        STATUS,
        STOPPING,
        ENDPOINT,
        MODEL,
        INPUT_FILE_ID,
        COMPLETION_WINDOW,
        METADATA,
        ERRORS,
        PRIORITY,
        OUTPUT_EXPIRES_AFTER_SECS,
        OUTPUT_FILE_ID,
        ERROR_FILE_ID,
        RETRY_OF,
        RETRIES,
        TOTAL,
        DISPATCHED,
        COMPLETED,
        FAILED,
        PENDING_ROWS,
        PENDING_BYTES,
        INPUT_TOKENS,
        CACHED_TOKENS,
        OUTPUT_TOKENS,
        REASONING_TOKENS,
        TOTAL_TOKENS,
        DISPATCH_ALIVE_MS,
        REDISPATCHED_AT_MS,
        CREATED_AT,
        EXPIRES_AT,
        IN_PROGRESS_AT,
        FINALIZING_AT,
        COMPLETED_AT,
        FAILED_AT,
        EXPIRED_AT,
        CANCELLING_AT,
        CANCELLED_AT,
    ];
}

use batch_field as f;

/// A batch record field holding a value its type cannot have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("batch record field `{field}` holds {value:?}")]
pub struct BatchRecordError {
    /// The field.
    pub field: &'static str,
    /// What it holds.
    pub value: String,
}

/// Token usage summed over a batch's rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchUsage {
    /// Input tokens.
    pub input_tokens: i64,
    /// Cached input tokens.
    pub cached_tokens: i64,
    /// Output tokens.
    pub output_tokens: i64,
    /// Reasoning tokens.
    pub reasoning_tokens: i64,
    /// Total tokens.
    pub total_tokens: i64,
}

/// When the batch entered each status (unix s); `None` until it did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStamps {
    /// Creation (`validating`).
    pub created_at: Option<i64>,
    /// `in_progress`.
    pub in_progress_at: Option<i64>,
    /// `finalizing`.
    pub finalizing_at: Option<i64>,
    /// `completed`.
    pub completed_at: Option<i64>,
    /// `failed`.
    pub failed_at: Option<i64>,
    /// `expired`.
    pub expired_at: Option<i64>,
    /// `cancelling`.
    pub cancelling_at: Option<i64>,
    /// `cancelled`.
    pub cancelled_at: Option<i64>,
}

/// A batch as stored (`b:{id}:meta`). Fields absent from the hash read as `None` (or zero for
/// counters): a record is written in steps (creation, validation, finalize), and counters appear
/// with their first increment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// Batch id.
    pub id: Option<String>,
    /// The tenant owning the batch (empty when the record has none).
    pub tenant: String,
    /// Current status.
    pub status: Option<BatchStatus>,
    /// Set while the batch is being cancelled, expired or failed for a lost input.
    pub stopping: Option<StopReason>,
    /// The endpoint every line targets.
    pub endpoint: Option<String>,
    /// The model every line names, when they all name the same one.
    pub model: Option<String>,
    /// The input file.
    pub input_file_id: Option<String>,
    /// The completion window as the client gave it.
    pub completion_window: Option<String>,
    /// The client's metadata object, as JSON text.
    pub metadata: Option<String>,
    /// A failed batch's `errors` object, as JSON text.
    pub errors: Option<String>,
    /// Scheduling tier, when one was stored.
    pub priority: Option<Priority>,
    /// Lifetime of the result files (secs), fixed at creation.
    pub output_expires_after_secs: Option<i64>,
    /// The result file of successful lines.
    pub output_file_id: Option<String>,
    /// The result file of failed lines.
    pub error_file_id: Option<String>,
    /// The batch this one retries.
    pub retry_of: Option<String>,
    /// The batches retrying this one, oldest first.
    pub retries: Vec<String>,
    /// Lines in the batch, once validated.
    pub total: Option<i64>,
    /// Lines enqueued so far.
    pub dispatched: Option<i64>,
    /// Lines that succeeded.
    pub completed: i64,
    /// Lines that failed.
    pub failed: i64,
    /// Rows still in Redis, not yet compacted.
    pub pending_rows: i64,
    /// Bytes of those rows.
    pub pending_bytes: i64,
    /// Token usage over the rows written.
    pub usage: BatchUsage,
    /// Unix s the completion window ends.
    pub expires_at: Option<i64>,
    /// When the batch entered each status.
    pub stamps: BatchStamps,
    /// Unix ms a dispatcher last showed it was alive while enqueueing.
    pub dispatch_alive_ms: Option<i64>,
    /// Unix ms the aggregator last published the batch's dispatch again.
    pub redispatched_at_ms: Option<i64>,
}

/// Reads the fields of one record hash, each at most once.
struct Fields(HashMap<String, String>);

impl Fields {
    fn text(&mut self, field: &'static str) -> Option<String> {
        self.0.remove(field)
    }

    fn parsed<T>(
        &mut self,
        field: &'static str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, BatchRecordError> {
        match self.0.remove(field) {
            None => Ok(None),
            Some(value) => parse(&value)
                .map(Some)
                .ok_or(BatchRecordError { field, value }),
        }
    }

    fn int(&mut self, field: &'static str) -> Result<Option<i64>, BatchRecordError> {
        self.parsed(field, |v| i64::from_str(v).ok())
    }

    fn counter(&mut self, field: &'static str) -> Result<i64, BatchRecordError> {
        Ok(self.int(field)?.unwrap_or(0))
    }
}

impl Batch {
    /// The record read back from its hash. Fails only when a field holds what its type cannot
    /// (a counter that is not an integer, an unknown status).
    pub fn from_hash(hash: HashMap<String, String>) -> Result<Self, BatchRecordError> {
        let mut h = Fields(hash);
        Ok(Self {
            id: h.text(f::ID),
            tenant: h.text(f::TENANT).unwrap_or_default(),
            status: h.parsed(f::STATUS, BatchStatus::parse)?,
            stopping: h.parsed(f::STOPPING, StopReason::parse)?,
            endpoint: h.text(f::ENDPOINT),
            model: h.text(f::MODEL),
            input_file_id: h.text(f::INPUT_FILE_ID),
            completion_window: h.text(f::COMPLETION_WINDOW),
            metadata: h.text(f::METADATA),
            errors: h.text(f::ERRORS),
            priority: h.parsed(f::PRIORITY, Priority::parse)?,
            output_expires_after_secs: h.int(f::OUTPUT_EXPIRES_AFTER_SECS)?,
            output_file_id: h.text(f::OUTPUT_FILE_ID),
            error_file_id: h.text(f::ERROR_FILE_ID),
            retry_of: h.text(f::RETRY_OF),
            retries: h
                .text(f::RETRIES)
                .map(|r| {
                    r.split(',')
                        .filter(|id| !id.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            total: h.int(f::TOTAL)?,
            dispatched: h.int(f::DISPATCHED)?,
            completed: h.counter(f::COMPLETED)?,
            failed: h.counter(f::FAILED)?,
            pending_rows: h.counter(f::PENDING_ROWS)?,
            pending_bytes: h.counter(f::PENDING_BYTES)?,
            usage: BatchUsage {
                input_tokens: h.counter(f::INPUT_TOKENS)?,
                cached_tokens: h.counter(f::CACHED_TOKENS)?,
                output_tokens: h.counter(f::OUTPUT_TOKENS)?,
                reasoning_tokens: h.counter(f::REASONING_TOKENS)?,
                total_tokens: h.counter(f::TOTAL_TOKENS)?,
            },
            expires_at: h.int(f::EXPIRES_AT)?,
            stamps: BatchStamps {
                created_at: h.int(f::CREATED_AT)?,
                in_progress_at: h.int(f::IN_PROGRESS_AT)?,
                finalizing_at: h.int(f::FINALIZING_AT)?,
                completed_at: h.int(f::COMPLETED_AT)?,
                failed_at: h.int(f::FAILED_AT)?,
                expired_at: h.int(f::EXPIRED_AT)?,
                cancelling_at: h.int(f::CANCELLING_AT)?,
                cancelled_at: h.int(f::CANCELLED_AT)?,
            },
            dispatch_alive_ms: h.int(f::DISPATCH_ALIVE_MS)?,
            redispatched_at_ms: h.int(f::REDISPATCHED_AT_MS)?,
        })
    }

    /// Lines in the batch, once validated.
    pub fn total(&self) -> Option<u64> {
        self.total.map(|t| t as u64)
    }

    /// Finished lines (successes plus failures).
    pub fn done(&self) -> u64 {
        (self.completed + self.failed) as u64
    }

    /// The OpenAI batch object, with every field present (explicit nulls).
    pub fn to_object(&self) -> Value {
        let json_or_null = |text: &Option<String>| {
            text.as_deref()
                .and_then(|v| serde_json::from_str::<Value>(v).ok())
                .unwrap_or(Value::Null)
        };
        let s = &self.stamps;
        let mut object = json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": json_or_null(&self.errors),
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status.map(BatchStatus::as_str),
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": s.created_at,
            "in_progress_at": s.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": s.finalizing_at,
            "completed_at": s.completed_at,
            "failed_at": s.failed_at,
            "expired_at": s.expired_at,
            "cancelling_at": s.cancelling_at,
            "cancelled_at": s.cancelled_at,
            "request_counts": {
                "total": self.total.unwrap_or(0),
                "completed": self.completed,
                "failed": self.failed,
            },
            "usage": {
                "input_tokens": self.usage.input_tokens,
                "input_tokens_details": {"cached_tokens": self.usage.cached_tokens},
                "output_tokens": self.usage.output_tokens,
                "output_tokens_details": {"reasoning_tokens": self.usage.reasoning_tokens},
                "total_tokens": self.usage.total_tokens,
            },
            "metadata": json_or_null(&self.metadata),
        });
        // Extra fields, only on batches a retry links: the SDKs keep unknown fields.
        if let Some(parent) = &self.retry_of {
            object["retry_of"] = Value::from(parent.as_str());
        }
        if !self.retries.is_empty() {
            object["retries"] = self.retries.iter().map(String::as_str).collect();
        }
        object
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(fields: &[(&str, &str)]) -> HashMap<String, String> {
        fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_record_reads_into_typed_fields() {
        let batch = Batch::from_hash(hash(&[
            (f::ID, "batch_1"),
            (f::TENANT, "t"),
            (f::STATUS, "in_progress"),
            (f::STOPPING, "cancelled"),
            (f::TOTAL, "10"),
            (f::COMPLETED, "3"),
            (f::FAILED, "2"),
            (f::PENDING_ROWS, "5"),
            (f::RETRIES, "batch_2,batch_3"),
            (f::PRIORITY, "high"),
            (f::CREATED_AT, "100"),
        ]))
        .expect("reads");
        assert_eq!(batch.status, Some(BatchStatus::InProgress));
        assert_eq!(batch.stopping, Some(StopReason::Cancelled));
        assert_eq!((batch.total(), batch.done()), (Some(10), 5));
        assert_eq!(batch.pending_rows, 5);
        assert_eq!(batch.retries, ["batch_2", "batch_3"]);
        assert_eq!(batch.priority, Some(Priority::High));
        assert_eq!(batch.stamps.created_at, Some(100));
        assert_eq!(batch.dispatched, None);
        let object = batch.to_object();
        assert_eq!(object["request_counts"]["completed"], 3);
        assert_eq!(object["created_at"], 100);
        assert_eq!(object["in_progress_at"], Value::Null);
        assert_eq!(object["retries"], json!(["batch_2", "batch_3"]));
    }

    #[test]
    fn a_field_its_type_cannot_hold_is_an_error() {
        let err = Batch::from_hash(hash(&[(f::TOTAL, "ten")])).expect_err("not a count");
        assert_eq!(err.field, f::TOTAL);
        assert!(Batch::from_hash(hash(&[(f::STATUS, "sleeping")])).is_err());
    }

    #[test]
    fn every_field_is_listed_once() {
        let mut names = f::ALL.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), f::ALL.len());
        for status in BatchStatus::ALL {
            assert!(f::ALL.contains(&status.stamp_field()), "{status:?}");
        }
    }
}

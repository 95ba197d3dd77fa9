//! The OpenAI-shaped objects Sluice serves and the messages its roles exchange. Batch and file
//! objects are here; result rows and usage are in `rows`, queue messages in `messages`.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

mod batch_record;
mod messages;
mod rows;
pub use batch_record::{Batch, BatchRecordError, BatchStamps, BatchUsage, batch_field};
pub use messages::{BatchEvent, LineItem, LinesMessage};
pub use rows::{Row, Usage, failure_of};

/// Endpoints a batch may target.
pub const SUPPORTED_ENDPOINTS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/responses",
    "/v1/moderations",
];

/// The model names that select a task of the batch router rather than a provider's model.
pub const TASK_MODELS: &[&str] = &["extract", "summarize", "classify"];

/// Whether `model` names a task model.
pub fn task_model(model: &str) -> Option<&'static str> {
    TASK_MODELS.iter().copied().find(|t| *t == model)
}

/// A new random batch id (`batch_` + 32 hex digits).
pub fn new_batch_id() -> String {
    format!("batch_{}", uuid::Uuid::new_v4().simple())
}

/// A new random file id (`file-` + 32 hex digits).
pub fn new_file_id() -> String {
    format!("file-{}", uuid::Uuid::new_v4().simple())
}

/// A new random id for one output line (`batch_req_` + 32 hex digits).
pub fn new_request_id() -> String {
    format!("batch_req_{}", uuid::Uuid::new_v4().simple())
}

/// Ids of a batch's result files: derived from the batch id, so a finalize that runs twice writes
/// and registers the same two files instead of new ones.
pub fn result_file_ids(batch_id: &str) -> (String, String) {
    let suffix = batch_id.trim_start_matches("batch_");
    (
        format!("file-{suffix}-output"),
        format!("file-{suffix}-errors"),
    )
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    now_millis() / 1000
}

/// Milliseconds since the Unix epoch.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// The lifecycle of a batch, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    /// Checking the input file.
    Validating,
    /// Ended without running (invalid input, or its input file was lost).
    Failed,
    /// Lines are being run.
    InProgress,
    /// Every line has a row; the result files are being written.
    Finalizing,
    /// Ended with its result files.
    Completed,
    /// Its completion window ended before every line ran.
    Expired,
    /// A cancel was asked; lines in flight are finishing.
    Cancelling,
    /// Ended by a cancel.
    Cancelled,
}

impl BatchStatus {
    /// Every status.
    pub const ALL: [BatchStatus; 8] = [
        Self::Validating,
        Self::Failed,
        Self::InProgress,
        Self::Finalizing,
        Self::Completed,
        Self::Expired,
        Self::Cancelling,
        Self::Cancelled,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Terminal statuses never change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Completed | Self::Expired | Self::Cancelled
        )
    }

    /// The one transition table: whether a batch in `self` may move to `next`. The store's
    /// transition script applies exactly this table ([`BatchStatus::allowed_from`]).
    pub fn can_become(self, next: BatchStatus) -> bool {
        use BatchStatus::*;
        matches!(
            (self, next),
            (Validating, InProgress | Failed | Cancelling | Expired)
                // `in_progress` fails only through a stop ([`StopReason::InputLost`]).
                | (InProgress, Failed | Cancelling | Finalizing | Expired)
                | (Finalizing, Completed)
                | (Cancelling, Cancelled)
        )
    }

    /// The statuses that may move to `self`, in [`BatchStatus::ALL`] order.
    pub fn allowed_from(self) -> impl Iterator<Item = BatchStatus> {
        Self::ALL
            .into_iter()
            .filter(move |from| from.can_become(self))
    }

    /// The `*_at` field stamped when the batch enters this status.
    pub fn stamp_field(self) -> &'static str {
        use batch_field as f;
        match self {
            Self::Validating => f::CREATED_AT,
            Self::Failed => f::FAILED_AT,
            Self::InProgress => f::IN_PROGRESS_AT,
            Self::Finalizing => f::FINALIZING_AT,
            Self::Completed => f::COMPLETED_AT,
            Self::Expired => f::EXPIRED_AT,
            Self::Cancelling => f::CANCELLING_AT,
            Self::Cancelled => f::CANCELLED_AT,
        }
    }
}

/// Why a batch stops before every line ran; the error code given to the lines that never ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Cancelled by its owner.
    Cancelled,
    /// Its completion window ended.
    Expired,
    /// The input file's record or bytes disappeared while the batch ran (the dispatcher can no
    /// longer read its lines): the batch ends `failed`.
    InputLost,
}

impl StopReason {
    /// Value of the `stopping` meta field.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
            Self::InputLost => "input_lost",
        }
    }
    /// Parses the `stopping` meta field.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cancelled" => Some(Self::Cancelled),
            "expired" => Some(Self::Expired),
            "input_lost" => Some(Self::InputLost),
            _ => None,
        }
    }
    /// The per-line error given to lines that never ran.
    pub fn line_error(self) -> (&'static str, &'static str) {
        match self {
            Self::Cancelled => (
                "batch_cancelled",
                "This request could not be executed because the batch was cancelled.",
            ),
            Self::Expired => (
                "batch_expired",
                "This request could not be executed before the completion window expired.",
            ),
            Self::InputLost => (
                "input_file_lost",
                "This request could not be executed because the batch's input file was deleted \
                 or lost while the batch ran.",
            ),
        }
    }
    /// The terminal status this stop ends in.
    pub fn terminal_status(self) -> BatchStatus {
        match self {
            Self::Cancelled => BatchStatus::Cancelled,
            Self::Expired => BatchStatus::Expired,
            Self::InputLost => BatchStatus::Failed,
        }
    }
}

/// One entry of a failed batch's `errors.data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchError {
    /// Machine-readable code (`invalid_request`, `model_not_found`…).
    pub code: String,
    /// What is wrong, for people.
    pub message: String,
    /// The parameter at fault (`body.model`), when there is one.
    pub param: Option<String>,
    /// 1-based line of the input file, when the error belongs to one line.
    pub line: Option<u64>,
}

/// The stored fields of a file (`f:{id}`).
#[derive(Debug, Clone, Default)]
pub struct FileMeta(pub HashMap<String, String>);

impl FileMeta {
    /// A field as a string.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.0.get(field).map(String::as_str)
    }
    /// The tenant owning the file.
    pub fn tenant(&self) -> &str {
        self.get("tenant").unwrap_or_default()
    }
    /// Where the bytes live in object storage.
    pub fn path(&self) -> &str {
        self.get("path").unwrap_or_default()
    }
    /// Whether `expires_at` is at or before `now`.
    pub fn expired(&self, now: i64) -> bool {
        self.get("expires_at")
            .and_then(|e| e.parse::<i64>().ok())
            .is_some_and(|at| at <= now)
    }
    /// The OpenAI file object.
    pub fn to_object(&self) -> Value {
        let int = |f: &str| self.get(f).and_then(|v| v.parse::<i64>().ok());
        json!({
            "id": self.get("id"),
            "object": "file",
            "bytes": int("bytes").unwrap_or(0),
            "created_at": int("created_at").unwrap_or(0),
            "expires_at": int("expires_at"),
            "filename": self.get("filename").unwrap_or_default(),
            "purpose": self.get("purpose").unwrap_or("batch"),
            "status": "processed",
            "status_details": Value::Null,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_and_terminals_absorb() {
        for st in BatchStatus::ALL {
            assert_eq!(BatchStatus::parse(st.as_str()), Some(st));
            for to in BatchStatus::ALL {
                if st.is_terminal() {
                    assert!(
                        !to.allowed_from().any(|from| from == st),
                        "{st:?} -> {to:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_transition_table() {
        use BatchStatus::*;
        let allowed = [
            (Validating, InProgress),
            (Validating, Failed),
            (Validating, Cancelling),
            (Validating, Expired),
            (InProgress, Failed),
            (InProgress, Cancelling),
            (InProgress, Finalizing),
            (InProgress, Expired),
            (Finalizing, Completed),
            (Cancelling, Cancelled),
        ];
        for from in BatchStatus::ALL {
            for to in BatchStatus::ALL {
                assert_eq!(
                    from.can_become(to),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
                assert_eq!(to.allowed_from().any(|f| f == from), from.can_become(to));
            }
        }
    }
}

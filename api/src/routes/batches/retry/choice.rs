//! Which of the parent's rows a retry takes: by status (failed, expired, cancelled) and,
//! optionally, by error code or HTTP status.

use std::collections::HashSet;

use serde_json::Value;
use sluice_core::domain::failure_of;
use sluice_core::validate::clip;

use crate::routes::batches::params::quoted_list;
use crate::routes::bounds::ECHO_BYTES;

/// The row statuses a retry can take, as `statuses` names them.
pub(super) const STATUSES: [&str; 3] = ["failed", "expired", "cancelled"];
/// What a failed row is, for `statuses`: a line the batch's expiry or cancel kept from running
/// (the error code finalize gives it), or one that ran and failed.
fn row_status(code: &str) -> &'static str {
    match code {
        "batch_expired" => "expired",
        "batch_cancelled" => "cancelled",
        _ => "failed",
    }
}

/// Which of the parent's rows the child takes.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Choice {
    /// Names from [`STATUSES`].
    pub(super) statuses: Vec<&'static str>,
    /// Error codes (or HTTP statuses, as text) a row must have; any when `None`.
    pub(super) codes: Option<HashSet<String>>,
}

impl Choice {
    /// Whether the failed row `text` (a result line) is chosen.
    pub(super) fn takes(&self, text: &[u8]) -> bool {
        // A row that does not parse (never written by Sluice) reads as a plain failure.
        let line = serde_json::from_slice::<Value>(text).unwrap_or(Value::Null);
        let failure = failure_of(&line);
        let code = failure["code"].as_str().unwrap_or_default();
        if !self.statuses.contains(&row_status(code)) {
            return false;
        }
        let Some(codes) = &self.codes else {
            return true;
        };
        let status = line
            .pointer("/response/status_code")
            .and_then(Value::as_u64)
            .map(|s| s.to_string());
        codes.contains(code) || status.is_some_and(|s| codes.contains(&s))
    }

    /// "failed or expired requests with code 'x'": what was looked for, for the 400.
    pub(super) fn describe(&self) -> String {
        let mut text = match self.statuses.split_last() {
            Some((last, [])) => format!("{last} requests"),
            Some((last, rest)) => format!("{} or {last} requests", rest.join(", ")),
            None => "requests".to_owned(),
        };
        if let Some(codes) = &self.codes {
            let mut codes: Vec<&str> = codes.iter().map(String::as_str).collect();
            codes.sort_unstable();
            let shown: Vec<String> = codes
                .iter()
                .map(|c| clip(c, ECHO_BYTES).into_owned())
                .collect();
            let shown: Vec<&str> = shown.iter().map(String::as_str).collect();
            text.push_str(&format!(" with code {}", quoted_list(&shown)));
        }
        text
    }
}

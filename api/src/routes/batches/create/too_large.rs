//! The 413 answers of create bodies over their caps, one per form of body.

use axum::http::StatusCode;

use crate::error::ApiError;

/// 413 for request lines (a JSONL body, or the lines of inline requests) over `limit` bytes.
pub(crate) fn lines_too_large(limit: u64) -> ApiError {
    ApiError::Coded {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!("The request body is too large: the limit is {limit} bytes."),
        param: None,
        code: "request_too_large",
        errors: None,
    }
}

/// 413 for a create body of the `input_file_id` form (or no known form) over its cap.
pub(crate) fn json_too_large(limit: u64) -> ApiError {
    ApiError::Coded {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!(
            "The request body is too large: a JSON create body is limited to {limit} bytes. \
             Send many requests inline ('requests'), as a JSONL body, or as an uploaded file."
        ),
        param: None,
        code: "request_too_large",
        errors: None,
    }
}

/// 413 for an inline create body over `limit` bytes.
pub(crate) fn inline_too_large(limit: u64) -> ApiError {
    ApiError::Coded {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        message: format!(
            "The request body is too large: an inline create body is limited to {limit} bytes."
        ),
        param: None,
        code: "request_too_large",
        errors: None,
    }
}

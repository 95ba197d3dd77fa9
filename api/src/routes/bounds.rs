//! Bounds on what clients send that several resources share: the longest id looked up, the most
//! client text echoed back, and the accepted expiry range.

use crate::error::ApiError;
use crate::state::AppState;

/// Accepted `expires_after.seconds` / `output_expires_after.seconds` (one hour to 30 days).
pub(crate) const EXPIRES_AFTER_SECS: std::ops::RangeInclusive<i64> = 3_600..=2_592_000;
/// Most bytes of client text echoed back in an error message.
pub(crate) const ECHO_BYTES: usize = 256;

/// 400 on `param` when a client-sent id is longer than `limits.max_id_chars`: such an id names
/// nothing, and is never looked up, stored or echoed.
pub(crate) fn check_id(state: &AppState, param: &str, id: &str) -> Result<(), ApiError> {
    let max = state.settings.limits.max_id_chars;
    if id.chars().count() as u64 > max {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "Invalid '{param}': string too long. Expected at most {max} characters."
            ),
            param: Some(param.to_owned()),
            code: Some("string_above_max_length"),
        });
    }
    Ok(())
}

//! One line of an input file: where it is, its bytes, and its top-level fields.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// One non-blank line of an input file.
#[derive(Debug)]
pub struct RequestLine {
    /// 0-based index among request lines (the row key).
    pub index: u64,
    /// 1-based physical line number in the file (what errors report).
    pub number: u64,
    /// The bytes without the line terminator; empty when `too_long`.
    pub bytes: Bytes,
    /// The line exceeded the size limit; its bytes were discarded.
    pub too_long: bool,
}

/// The top level of an input line, with the body kept as raw JSON.
#[derive(Debug, Deserialize)]
pub struct LineProbe<'a> {
    #[serde(borrow)]
    /// `custom_id`, not yet checked.
    pub custom_id: Option<&'a RawValue>,
    #[serde(borrow)]
    /// `method`, not yet checked.
    pub method: Option<&'a RawValue>,
    #[serde(borrow)]
    /// `url`, not yet checked.
    pub url: Option<&'a RawValue>,
    #[serde(borrow)]
    /// `body`, not yet checked.
    pub body: Option<&'a RawValue>,
}

impl<'a> LineProbe<'a> {
    /// Parses a line; `None` if it is not a JSON object.
    pub fn parse(bytes: &'a [u8]) -> Option<Self> {
        let trimmed = bytes.trim_ascii_start();
        if trimmed.first() != Some(&b'{') {
            return None;
        }
        serde_json::from_slice(bytes).ok()
    }

    /// The `custom_id` as a string, if it is one.
    pub fn custom_id(&self) -> Option<String> {
        self.custom_id
            .and_then(|raw| serde_json::from_str::<String>(raw.get()).ok())
    }
}

//! The messages the roles exchange over the queues: work lines and batch events.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// A work-queue message: several lines of one batch (so the workers, the broker and the
/// store spend one delivery, one ack and one script call on several lines). It carries no secret:
/// provider keys come from configuration.
#[derive(Debug, Serialize, Deserialize)]
pub struct LinesMessage<'a> {
    /// Batch id.
    #[serde(borrow, rename = "b")]
    pub batch_id: std::borrow::Cow<'a, str>,
    /// The lines, at least one.
    #[serde(borrow)]
    pub lines: Vec<LineItem<'a>>,
}

/// One input line inside a [`LinesMessage`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LineItem<'a> {
    /// 0-based line index.
    #[serde(rename = "l")]
    pub line: u64,
    /// The line's `custom_id`.
    #[serde(borrow, rename = "c")]
    pub custom_id: std::borrow::Cow<'a, str>,
    /// The request body, exactly as the input file had it.
    #[serde(borrow)]
    pub body: &'a RawValue,
    /// Upstream attempts already spent on the line (its retry budget survives requeues).
    #[serde(default, skip_serializing_if = "is_zero", rename = "a")]
    pub attempts: u32,
    /// Unix ms of the line's first attempt (0 = none yet); bounds the time its retries may span.
    #[serde(default, skip_serializing_if = "is_zero", rename = "t")]
    pub first_attempt_ms: i64,
}

/// The one-line message of builds before [`LinesMessage`]; still read, so an upgrade with lines
/// in the queues loses none.
#[derive(Debug, Deserialize)]
struct SingleLineMessage<'a> {
    #[serde(borrow)]
    b: std::borrow::Cow<'a, str>,
    l: u64,
    #[serde(borrow)]
    c: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    body: &'a RawValue,
    #[serde(default)]
    a: u32,
    #[serde(default)]
    t: i64,
}

impl<'a> LinesMessage<'a> {
    /// Reads a work-queue message: this shape, or the one-line shape of earlier builds.
    pub fn decode(bytes: &'a [u8]) -> serde_json::Result<Self> {
        let msg: Self = serde_json::from_slice(bytes).or_else(|e| {
            let SingleLineMessage {
                b,
                l,
                c,
                body,
                a,
                t,
            } = serde_json::from_slice(bytes).map_err(|_| e)?;
            Ok(Self {
                batch_id: b,
                lines: vec![LineItem {
                    line: l,
                    custom_id: c,
                    body,
                    attempts: a,
                    first_attempt_ms: t,
                }],
            })
        })?;
        if msg.lines.is_empty() {
            return Err(serde::de::Error::custom("a line message carries no line"));
        }
        Ok(msg)
    }

    /// A message carrying `line` alone (retries, and lines split off a redelivered message).
    pub fn single(batch: &'a str, line: LineItem<'a>) -> Self {
        Self {
            batch_id: batch.into(),
            lines: vec![line],
        }
    }
}

fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A message naming one batch (control and finalize queues).
#[derive(Debug, Serialize, Deserialize)]
pub struct BatchEvent {
    /// The batch the event is about.
    pub batch_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_work_message_of_an_earlier_build_still_decodes_as_one_line() {
        let old = br#"{"b":"batch_1","l":7,"c":"req-7","body":{"model":"m"},"a":2,"t":5}"#;
        let msg = LinesMessage::decode(old).expect("old shape decodes");
        assert_eq!(msg.batch_id, "batch_1");
        assert_eq!(msg.lines.len(), 1);
        let line = &msg.lines[0];
        assert_eq!(
            (
                line.line,
                line.custom_id.as_ref(),
                line.attempts,
                line.first_attempt_ms
            ),
            (7, "req-7", 2, 5)
        );
        assert_eq!(line.body.get(), r#"{"model":"m"}"#);

        let new =
            br#"{"b":"batch_1","lines":[{"l":0,"c":"x","body":{}},{"l":1,"c":"y","body":[]}]}"#;
        assert_eq!(LinesMessage::decode(new).expect("decodes").lines.len(), 2);
        assert!(LinesMessage::decode(br#"{"b":"batch_1"}"#).is_err());
        assert!(LinesMessage::decode(br#"{"b":"batch_1","lines":[]}"#).is_err());
    }

    #[test]
    fn a_work_message_keeps_its_compact_wire_form() {
        let wire = br#"{"b":"batch_9","lines":[{"l":3,"c":"req-3","body":{"x":1},"a":4,"t":1700000000000},{"l":4,"c":"req-4","body":null}]}"#;
        let msg = LinesMessage::decode(wire).expect("today's wire form decodes");
        assert_eq!(msg.batch_id, "batch_9");
        let first = &msg.lines[0];
        assert_eq!(
            (
                first.line,
                first.custom_id.as_ref(),
                first.attempts,
                first.first_attempt_ms
            ),
            (3, "req-3", 4, 1_700_000_000_000)
        );
        assert_eq!(first.body.get(), r#"{"x":1}"#);
        let second = &msg.lines[1];
        assert_eq!(
            (second.line, second.attempts, second.first_attempt_ms),
            (4, 0, 0)
        );
        // Encoding writes the same short names, and leaves out zero attempts and start.
        assert_eq!(serde_json::to_vec(&msg).expect("encodes"), wire.to_vec());
    }
}

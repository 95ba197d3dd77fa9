//! Property tests: however a file is chunked, validation gives the same verdict as on whole lines.

use bytes::Bytes;
use futures::StreamExt;
use proptest::prelude::*;
use sluice_core::config::Limits;
use sluice_core::validate::{ModelProblem, Validator};
use sluice_runtime::lines::RequestLines;

type Outcome = (Vec<(String, Option<u64>)>, u64, Option<String>);

/// Validates `chunks` the way the dispatcher reads a stored file.
fn verdict(chunks: Vec<Bytes>, max_line: usize) -> Outcome {
    let stream = futures::stream::iter(chunks.into_iter().map(Ok)).boxed();
    let mut lines = RequestLines::from_stream(stream, max_line);
    let serves = |m: &str| {
        if m == "unknown" {
            Err(ModelProblem {
                code: "model_not_found",
                message: "no".into(),
            })
        } else {
            Ok(&[][..])
        }
    };
    let limits = Limits {
        max_lines: 5,
        ..Limits::default()
    };
    let mut v = Validator::new("/v1/chat/completions", &limits, &serves);
    futures::executor::block_on(async {
        while let Some(line) = lines.next_line().await.unwrap() {
            v.check(&line);
        }
    });
    let verdict = v.finish();
    let errors = verdict
        .errors
        .into_iter()
        .map(|e| (e.code, e.line))
        .collect();
    (errors, verdict.lines, verdict.model)
}

/// Request lines good and bad, blank lines and noise.
fn line() -> impl Strategy<Value = String> {
    let good = ("[a-c]{1,2}", prop_oneof![Just("m"), Just("m2"), Just("unknown")]).prop_map(
        |(id, model)| {
            format!(
                r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[]}}}}"#
            )
        },
    );
    prop_oneof![
        4 => good,
        1 => Just(String::new()),
        1 => Just("  \r".to_owned()),
        1 => "[{}\":a-z, ]{0,40}",
        1 => any::<String>(),
    ]
}

proptest! {
    /// The verdict (errors with their lines, line count, model) is the same however the
    /// file is cut into chunks, and whatever the line terminator.
    #[test]
    fn the_verdict_does_not_depend_on_chunking(
        lines in prop::collection::vec(line(), 0..12),
        crlf in any::<bool>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        max_line in prop_oneof![Just(40usize), Just(1 << 20)],
    ) {
        let text = lines.join(if crlf { "\r\n" } else { "\n" });
        let bytes = text.as_bytes();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        points.extend([0, bytes.len()]);
        points.sort_unstable();
        points.dedup();
        let chunks = points
            .windows(2)
            .map(|w| Bytes::copy_from_slice(&bytes[w[0]..w[1]]))
            .collect();
        let whole = verdict(vec![Bytes::copy_from_slice(bytes)], max_line);
        prop_assert_eq!(&whole, &verdict(chunks, max_line));
        let bytewise = bytes.iter().map(|b| Bytes::copy_from_slice(&[*b])).collect();
        prop_assert_eq!(&whole, &verdict(bytewise, max_line));
    }
}

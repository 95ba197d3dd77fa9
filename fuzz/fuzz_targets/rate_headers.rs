//! The upstream's pacing headers: `Retry-After`, `retry-after-ms` and `x-ratelimit-*`. Whatever an
//! upstream sends, parsing never panics, a fleet pause is positive and at most `MAX_FLEET_PAUSE`
//! and only follows an exhausted `x-ratelimit-remaining-*`, and the retry delay built on
//! `Retry-After` stays within the retry policy's caps.
//!
//! Input: a presence mask, then header values separated by `\n`.
#![no_main]

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use sluice_core::pacing::MAX_FLEET_PAUSE;
use sluice_worker::upstream::{NextStep, RetryPolicy, ratelimit_pause, retry_after};

const NAMES: [&str; 6] = [
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

fuzz_target!(|data: &[u8]| {
    let [mask, rest @ ..] = data else {
        return;
    };
    let mut headers = HeaderMap::new();
    for (i, value) in rest.split(|b| *b == b'\n').take(NAMES.len()).enumerate() {
        if mask & (1 << i) == 0 {
            continue;
        }
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.append(HeaderName::from_static(NAMES[i]), value);
        }
    }

    if let Some(pause) = ratelimit_pause(&headers) {
        assert!(!pause.is_zero() && pause <= MAX_FLEET_PAUSE, "{pause:?}");
        let exhausted = ["requests", "tokens"].iter().any(|kind| {
            headers
                .get(format!("x-ratelimit-remaining-{kind}"))
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<i64>().ok())
                == Some(0)
        });
        assert!(exhausted, "a pause without an exhausted limit: {headers:?}");
    }

    let asked = retry_after(&headers);
    let policies = [
        RetryPolicy {
            max_attempts: 8,
            base: Duration::from_millis(500),
            max: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(120),
            max_elapsed: Duration::from_secs(3_600),
        },
        // The largest values the configuration can hold.
        RetryPolicy {
            max_attempts: u32::MAX,
            base: Duration::from_millis(u64::MAX),
            max: Duration::from_millis(u64::MAX),
            max_retry_after: Duration::from_secs(u64::MAX),
            max_elapsed: Duration::from_secs(u64::MAX),
        },
    ];
    for policy in &policies {
        for attempt in [1, 2, 30, policy.max_attempts.saturating_sub(1)] {
            let Some(delay) = policy.delay(attempt, asked) else {
                continue;
            };
            assert!(delay <= policy.max.max(policy.max_retry_after), "{delay:?}");
            if let Some(asked) = asked {
                assert!(delay <= asked, "{delay:?} for {asked:?}");
            }
            for elapsed in [Duration::ZERO, Duration::from_secs(3_599)] {
                if let NextStep::RetryAfter(d) =
                    policy.next(attempt, asked, elapsed, Some(Duration::from_secs(86_400)))
                {
                    assert!(elapsed + d <= policy.max_elapsed && d < Duration::from_secs(86_400));
                }
            }
        }
    }
});

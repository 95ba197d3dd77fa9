//! The retry policy, and reading the delays upstreams ask for (`Retry-After`, `x-ratelimit-*`).

use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use sluice_core::config::WorkerSettings;
use sluice_core::pacing::MAX_FLEET_PAUSE;

/// The delay an upstream asked for: `retry-after-ms`, then `Retry-After` in seconds or as an HTTP date.
/// Odd values (negative, unparsable, in the past) count as no request.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|ms| ms.is_finite() && *ms >= 0.0)
    {
        return Some(Duration::from_millis(ms as u64));
    }
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0)
            .then(|| Duration::from_millis((secs * 1000.0) as u64));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    when.duration_since(std::time::SystemTime::now()).ok()
}

/// A fleet pause asked for by `x-ratelimit-remaining-{requests,tokens}: 0` with its
/// `x-ratelimit-reset-*` duration (`1s`, `6m0s`, `12ms`, or plain seconds). Anything odd (negative
/// or unparsable values, Azure's `-1`, a remaining count above zero, no reset) asks for nothing, and
/// the pause is capped at [`MAX_FLEET_PAUSE`], so a broken header cannot stall the fleet.
pub fn ratelimit_pause(headers: &HeaderMap) -> Option<Duration> {
    let text = |name: String| {
        headers
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    ["requests", "tokens"]
        .into_iter()
        .filter_map(|kind| {
            let remaining: i64 = text(format!("x-ratelimit-remaining-{kind}"))?
                .parse()
                .ok()?;
            if remaining != 0 {
                return None;
            }
            parse_reset(text(format!("x-ratelimit-reset-{kind}"))?)
        })
        .max()
        .filter(|d| !d.is_zero())
        .map(|d| d.min(MAX_FLEET_PAUSE))
}

/// Parses a Go-style duration (`1h2m3.5s`, `250ms`, `6m0s`) or plain seconds (`1.5`).
fn parse_reset(value: &str) -> Option<Duration> {
    if let Ok(secs) = value.parse::<f64>() {
        return (0.0..1e9)
            .contains(&secs)
            .then(|| Duration::from_secs_f64(secs));
    }
    let mut total = 0.0f64;
    let mut rest = value;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(split);
        let n: f64 = num.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let scale = match unit {
            "h" => 3_600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * scale;
        rest = tail;
    }
    (total.is_finite() && total < 1e9).then(|| Duration::from_secs_f64(total))
}

/// Capped exponential backoff with jitter, stretched to whatever the upstream asked for, within
/// a per-line budget of attempts and of time.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Most attempts a line gets.
    pub max_attempts: u32,
    /// The first backoff, doubled for each attempt after.
    pub base: Duration,
    /// Longest backoff.
    pub max: Duration,
    /// Cap on the delay an upstream's `Retry-After` stretches a backoff to.
    pub max_retry_after: Duration,
    /// Longest span from a line's first attempt to its last.
    pub max_elapsed: Duration,
}

/// What to do with a line whose attempt asked for a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextStep {
    /// Try again after this delay.
    RetryAfter(Duration),
    /// Stop: the budget named here ran out (`attempts`, `elapsed` or `deadline`).
    GiveUp(&'static str),
}

impl RetryPolicy {
    /// The policy of the worker settings.
    pub fn from_settings(w: &WorkerSettings) -> Self {
        Self {
            max_attempts: w.max_attempts,
            base: Duration::from_millis(w.backoff_base_ms),
            max: Duration::from_millis(w.backoff_max_ms),
            max_retry_after: Duration::from_secs(w.max_retry_after_secs),
            max_elapsed: Duration::from_secs(w.max_retry_elapsed_secs),
        }
    }

    /// The decision after `attempts` counted attempts, `elapsed` since the first one, with
    /// `deadline_in` left before the batch expires (`None`: no deadline known).
    pub fn next(
        &self,
        attempts: u32,
        retry_after: Option<Duration>,
        elapsed: Duration,
        deadline_in: Option<Duration>,
    ) -> NextStep {
        let Some(delay) = self.delay(attempts, retry_after) else {
            return NextStep::GiveUp("attempts");
        };
        if elapsed + delay > self.max_elapsed {
            return NextStep::GiveUp("elapsed");
        }
        if deadline_in.is_some_and(|left| delay >= left) {
            return NextStep::GiveUp("deadline");
        }
        NextStep::RetryAfter(delay)
    }

    /// Delay before attempt `attempt + 1` (attempts count from 1), or `None` when the budget is spent.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Option<Duration> {
        if attempt >= self.max_attempts {
            return None;
        }
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(self.max);
        // Jitter in [exp/2, exp] spreads retries of a burst without ever going below half the backoff.
        let jittered = exp.mul_f64(rand::rng().random_range(0.5..=1.0));
        Some(match retry_after {
            Some(asked) => asked.min(self.max_retry_after).max(jittered.min(asked)),
            None => jittered,
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    /// A header map of `pairs` (the client tests use it too).
    pub(in crate::upstream) fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_reads_every_form_and_ignores_odd_values() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "5")])),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after-ms", "250")])),
            Some(Duration::from_millis(250))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "-1")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        let future =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let got = retry_after(&headers(&[("retry-after", &future)])).unwrap();
        assert!(
            got > Duration::from_secs(27) && got <= Duration::from_secs(30),
            "{got:?}"
        );
        let past = httpdate::fmt_http_date(std::time::SystemTime::now() - Duration::from_secs(30));
        assert_eq!(retry_after(&headers(&[("retry-after", &past)])), None);
    }

    #[test]
    fn backoff_grows_is_capped_honours_retry_after_and_stops() {
        let p = RetryPolicy {
            max_attempts: 4,
            base: Duration::from_millis(100),
            max: Duration::from_millis(300),
            max_retry_after: Duration::from_secs(10),
            max_elapsed: Duration::from_secs(60),
        };
        let d1 = p.delay(1, None).unwrap();
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
        let d3 = p.delay(3, None).unwrap();
        assert!(d3 >= Duration::from_millis(150) && d3 <= Duration::from_millis(300));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(5))),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(60))),
            Some(Duration::from_secs(10))
        );
        assert_eq!(p.delay(4, None), None);
        assert_eq!(
            p.next(4, None, Duration::ZERO, None),
            NextStep::GiveUp("attempts")
        );
        assert_eq!(
            p.next(1, None, Duration::from_secs(60), None),
            NextStep::GiveUp("elapsed")
        );
        assert_eq!(
            p.next(
                1,
                Some(Duration::from_secs(5)),
                Duration::ZERO,
                Some(Duration::from_secs(2))
            ),
            NextStep::GiveUp("deadline")
        );
        assert_eq!(
            p.next(
                1,
                Some(Duration::from_secs(5)),
                Duration::ZERO,
                Some(Duration::from_secs(60))
            ),
            NextStep::RetryAfter(Duration::from_secs(5))
        );
    }

    #[test]
    fn ratelimit_headers_pause_only_when_exhausted_and_odd_values_are_ignored() {
        let h = headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "6m0s"),
        ]);
        assert_eq!(ratelimit_pause(&h), Some(MAX_FLEET_PAUSE));
        let h = headers(&[
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "1.5s"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "250ms"),
        ]);
        assert_eq!(ratelimit_pause(&h), Some(Duration::from_millis(1500)));
        for (remaining, reset) in [
            ("5", "1s"),
            ("-1", "1s"),
            ("0", "-1"),
            ("0", "soon"),
            ("0", "0s"),
            ("0", ""),
            ("many", "1s"),
            ("0", "1e400"),
        ] {
            let h = headers(&[
                ("x-ratelimit-remaining-requests", remaining),
                ("x-ratelimit-reset-requests", reset),
            ]);
            assert_eq!(ratelimit_pause(&h), None, "{remaining} {reset}");
        }
        assert_eq!(parse_reset("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_reset("2"), Some(Duration::from_secs(2)));
    }
}

#[cfg(test)]
mod header_properties {
    use super::*;
    use proptest::prelude::*;
    use reqwest::header::HeaderValue;

    /// Header values as upstreams send them, and odd ones.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            "-?[0-9]{0,25}(\\.[0-9]{0,10})?(e[+-]?[0-9]{1,4})?",
            "([0-9]{1,6}(\\.[0-9]{1,3})?(h|m|s|ms|us|µs|ns|d)){1,4}",
            Just("inf".to_owned()),
            Just("NaN".to_owned()),
            Just("-0".to_owned()),
        ]
    }

    fn with(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            if let Ok(v) = HeaderValue::from_str(v) {
                h.insert(*k, v);
            }
        }
        h
    }

    proptest! {
        /// Whatever the headers say, a pause is positive, at most the cap, and only follows an
        /// exhausted limit.
        #[test]
        fn a_pause_is_capped_and_needs_an_exhausted_limit(
            remaining_requests in value(), reset_requests in value(),
            remaining_tokens in value(), reset_tokens in value(),
        ) {
            let h = with(&[
                ("x-ratelimit-remaining-requests", &remaining_requests),
                ("x-ratelimit-reset-requests", &reset_requests),
                ("x-ratelimit-remaining-tokens", &remaining_tokens),
                ("x-ratelimit-reset-tokens", &reset_tokens),
            ]);
            if let Some(pause) = ratelimit_pause(&h) {
                prop_assert!(!pause.is_zero() && pause <= MAX_FLEET_PAUSE);
                let zero = |v: &str| v.trim().parse::<i64>() == Ok(0);
                prop_assert!(zero(&remaining_requests) || zero(&remaining_tokens));
            }
        }

        /// A Go-style reset spelled from its parts reads back as their sum (capped).
        #[test]
        fn go_durations_read_back(h in 0u64..50, m in 0u64..60, s in 0u64..60, ms in 0u64..1000) {
            let reset = format!("{h}h{m}m{s}s{ms}ms");
            let got = ratelimit_pause(&with(&[
                ("x-ratelimit-remaining-tokens", "0"),
                ("x-ratelimit-reset-tokens", &reset),
            ]));
            let want = Duration::from_millis(((h * 60 + m) * 60 + s) * 1000 + ms);
            let want = (!want.is_zero()).then(|| want.min(MAX_FLEET_PAUSE));
            // Summing float parts may be off by a rounding error below a microsecond.
            let close = match (got, want) {
                (Some(g), Some(w)) => g.abs_diff(w) < Duration::from_micros(1),
                (g, w) => g == w,
            };
            prop_assert!(close, "{reset}: {got:?} vs {want:?}");
        }

        /// Whole seconds and milliseconds round-trip; anything else never panics.
        #[test]
        fn retry_after_round_trips(secs in 0u64..10_000_000, ms in 0u64..10_000_000_000, odd in value()) {
            let h = with(&[("retry-after", &secs.to_string())]);
            prop_assert_eq!(retry_after(&h), Some(Duration::from_secs(secs)));
            let h = with(&[("retry-after", "1"), ("retry-after-ms", &ms.to_string())]);
            prop_assert_eq!(retry_after(&h), Some(Duration::from_millis(ms)));
            let _ = retry_after(&with(&[("retry-after", &odd)]));
            let _ = retry_after(&with(&[("retry-after-ms", &odd)]));
        }

        /// The delay honours what the upstream asked within the policy's caps, whatever it asked.
        #[test]
        fn delays_stay_within_the_caps(attempt in 1u32..40, asked in value()) {
            let policy = RetryPolicy {
                max_attempts: 40,
                base: Duration::from_millis(500),
                max: Duration::from_secs(60),
                max_retry_after: Duration::from_secs(120),
                max_elapsed: Duration::from_secs(3_600),
            };
            let asked = retry_after(&with(&[("retry-after", &asked)]));
            let delay = policy.delay(attempt, asked).unwrap();
            prop_assert!(delay <= policy.max.max(policy.max_retry_after));
            if let Some(asked) = asked {
                prop_assert!(delay <= asked);
            }
        }
    }
}

//! Completion windows (`90s`, `30m`, `24h`, `7d`): strict parsing and the configured bounds.

use std::time::Duration;

use super::Settings;

/// Most digits of a completion window's number: `999999d` is far beyond any sane window, and a
/// short bound keeps absurd inputs (`000…024h`) from being accepted, stored and echoed.
const MAX_WINDOW_DIGITS: usize = 6;

/// Parses a completion window such as `90s`, `30m`, `24h` or `7d`: ASCII digits (no sign, no
/// spaces, no leading zero, at most six) then one unit letter.
pub fn parse_window(s: &str) -> Option<Duration> {
    let digits = s.strip_suffix(['s', 'm', 'h', 'd'])?;
    let unit = s.as_bytes()[digits.len()];
    if digits.is_empty()
        || digits.len() > MAX_WINDOW_DIGITS
        || digits.starts_with('0')
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let secs = match unit {
        b's' => n,
        b'm' => n.checked_mul(60)?,
        b'h' => n.checked_mul(3_600)?,
        b'd' => n.checked_mul(86_400)?,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

impl Settings {
    /// Bounds of `completion_window` as durations.
    pub fn window_bounds(&self) -> (Duration, Duration) {
        (
            parse_window(&self.limits.min_completion_window).unwrap_or(Duration::from_secs(60)),
            parse_window(&self.limits.max_completion_window)
                .unwrap_or(Duration::from_secs(7 * 86_400)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_in_every_unit() {
        assert_eq!(parse_window("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_window("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_window("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_window("7d"), Some(Duration::from_secs(604_800)));
        assert_eq!(parse_window("0h"), None);
        assert_eq!(parse_window("24"), None);
        assert_eq!(parse_window("h"), None);
        assert_eq!(parse_window("-1h"), None);
        assert_eq!(parse_window("1w"), None);
    }

    #[test]
    fn windows_are_parsed_strictly() {
        assert_eq!(
            parse_window("999999d"),
            Some(Duration::from_secs(999_999 * 86_400))
        );
        assert_eq!(parse_window("1s"), Some(Duration::from_secs(1)));
        let absurd = format!("{}24h", "0".repeat(5_000_000));
        for bad in [
            "024h", "00h", "+24h", " 24h", "24h ", "24 h", "1000000d", "", "s", "24H", "2４h",
            "24hh", "١h", &absurd,
        ] {
            assert_eq!(parse_window(bad), None, "{bad:?}");
        }
    }
}

#[cfg(test)]
mod window_properties {
    use super::parse_window;
    use proptest::prelude::*;
    use std::time::Duration;

    const UNITS: [(char, u64); 4] = [('s', 1), ('m', 60), ('h', 3_600), ('d', 86_400)];

    proptest! {
        /// A window spelled canonically (no sign, no leading zero, a few digits) parses to its
        /// number of units.
        #[test]
        fn canonical_windows_round_trip(n in 1u64..100_000, unit in 0usize..4) {
            let (c, scale) = UNITS[unit];
            prop_assert_eq!(parse_window(&format!("{n}{c}")), Some(Duration::from_secs(n * scale)));
        }

        /// Whatever the text, parsing never panics, and an accepted window is a positive whole
        /// number of the unit it ends with, which spelled canonically parses the same.
        #[test]
        fn any_text_parses_to_a_whole_number_of_its_unit(
            text in prop_oneof![any::<String>(), "[ +\\-0-9]{0,30}[smhdwµ]?[ ]?"],
        ) {
            if let Some(window) = parse_window(&text) {
                let c = text.trim().chars().last().unwrap();
                let (_, scale) = UNITS.iter().find(|(u, _)| *u == c).copied().unwrap();
                let secs = window.as_secs();
                prop_assert!(secs > 0 && secs % scale == 0 && window.subsec_nanos() == 0);
                prop_assert_eq!(parse_window(&format!("{}{c}", secs / scale)), Some(window));
            }
        }
    }
}

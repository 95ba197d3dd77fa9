//! `completion_window`: `parse_window` never panics, a window it accepts is a positive whole
//! number of its unit, and the canonical spelling of that number parses to the same window; the
//! API's bounded parse stays within its bounds and refuses with a 400 naming the parameter.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sluice_core::config::parse_window;

fn unit_secs(unit: char) -> Option<u64> {
    match unit {
        's' => Some(1),
        'm' => Some(60),
        'h' => Some(3_600),
        'd' => Some(86_400),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(window) = parse_window(text) {
        assert!(window >= Duration::from_secs(1), "{text:?} -> {window:?}");
        assert_eq!(window.subsec_nanos(), 0);
        let unit = text
            .trim()
            .chars()
            .last()
            .expect("an accepted window has a unit");
        let scale = unit_secs(unit).unwrap_or_else(|| panic!("{text:?} has unit {unit:?}"));
        let secs = window.as_secs();
        assert_eq!(secs % scale, 0, "{text:?} -> {secs}s");
        let canonical = format!("{}{unit}", secs / scale);
        assert_eq!(
            parse_window(&canonical),
            Some(window),
            "{text:?} vs {canonical:?}"
        );
    }
    // The API's check against the default bounds (60 s to 7 days).
    let bounds = (Duration::from_secs(60), Duration::from_secs(7 * 86_400));
    match sluice_api::fuzzing::parse_completion_window(text, bounds) {
        Ok(window) => {
            assert!((bounds.0..=bounds.1).contains(&window));
            assert_eq!(Some(window), parse_window(text));
        }
        Err(e) => {
            let (status, body) = sluice_api::fuzzing::error_response(e);
            assert_eq!(status.as_u16(), 400);
            assert_eq!(body["error"]["param"], "completion_window");
        }
    }
});

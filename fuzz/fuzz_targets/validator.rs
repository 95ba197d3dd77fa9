//! The dispatcher's line checking (line reader + `Validator`) on any input file: it never panics,
//! its verdict follows the invariants of `check_verdict`, and it does not depend on how the
//! file arrives in chunks.
//!
//! Input: `[endpoint, max_line, max_lines, cut count, cuts.., file..]`.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice_fuzz::{ENDPOINTS, check_lines, check_verdict, chunked, physical_lines};

fuzz_target!(|data: &[u8]| {
    let [endpoint, max_line, max_lines, cuts, rest @ ..] = data else {
        return;
    };
    let endpoint = ENDPOINTS.get(usize::from(*endpoint)).copied();
    // Small limits reach the over-long-line path; 0x80 and up is a limit no line reaches.
    let max_line = if *max_line >= 0x80 {
        1 << 20
    } else {
        usize::from(*max_line) * 4
    };
    let max_lines = u64::from(*max_lines % 8) + 1;
    let cut_bytes = (usize::from(*cuts) % 16 * 2).min(rest.len());
    let (cuts, file) = rest.split_at(cut_bytes);

    let whole = check_lines(
        vec![Bytes::copy_from_slice(file)],
        endpoint,
        max_line,
        max_lines,
    );
    check_verdict(&whole, physical_lines(file));
    let split = check_lines(chunked(file, cuts), endpoint, max_line, max_lines);
    assert_eq!(whole, split, "the verdict depends on the chunking");
    if file.len() <= 256 {
        let bytewise = file.iter().map(|b| Bytes::copy_from_slice(&[*b])).collect();
        assert_eq!(whole, check_lines(bytewise, endpoint, max_line, max_lines));
    }
});

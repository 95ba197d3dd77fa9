//! Assertions about what the API answered: list objects and a finished batch's result files.

use serde_json::Value;

/// Asserts that output ∪ errors hold each of `expected` custom ids exactly once.
pub fn assert_exactly_once(output: &[Value], errors: &[Value], expected: &[String]) {
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for line in output.iter().chain(errors) {
        *seen
            .entry(line["custom_id"].as_str().expect("custom_id").to_owned())
            .or_default() += 1;
    }
    let dup: Vec<_> = seen
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k.clone())
        .collect();
    assert!(dup.is_empty(), "duplicated lines: {dup:?}");
    let lost: Vec<_> = expected
        .iter()
        .filter(|id| !seen.contains_key(*id))
        .collect();
    assert!(lost.is_empty(), "lost lines: {lost:?}");
    assert_eq!(seen.len(), expected.len(), "unexpected lines present");
}

/// The ids of a list object's `data`.
pub fn list_ids(list: &Value) -> Vec<String> {
    assert_eq!(list["object"], "list", "{list}");
    list["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data: {list}"))
        .iter()
        .map(|o| o["id"].as_str().expect("id").to_owned())
        .collect()
}

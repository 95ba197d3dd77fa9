//! Headers of every download: a browser saves it under a safe name and never sniffs its type, so
//! a stored file can neither render as a page of the API's origin nor choose where it is saved.

use axum::http::{HeaderMap, HeaderValue, header};

/// Marks `headers` as a download: `X-Content-Type-Options: nosniff`.
pub(crate) fn no_sniff(headers: &mut HeaderMap) {
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
}

/// Marks `headers` as an attachment saved as `name` (made safe, `fallback` when nothing is left),
/// and not to be sniffed.
pub(crate) fn attachment(headers: &mut HeaderMap, name: &str, fallback: &str) {
    let name = match safe_filename(name) {
        Some(name) => name,
        None => safe_filename(fallback).unwrap_or_else(|| "download".to_owned()),
    };
    let value = format!("attachment; filename=\"{name}\"");
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&value).expect("only [A-Za-z0-9._-] inside the quotes"),
    );
    no_sniff(headers);
}

/// `name` with every character outside `[A-Za-z0-9._-]` replaced by `_`; none for a name that is
/// empty or only dots.
pub(crate) fn safe_filename(name: &str) -> Option<String> {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    (!safe.chars().all(|c| c == '.')).then_some(safe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filename_keeps_only_safe_characters() {
        assert_eq!(
            safe_filename("input-1_a.jsonl").as_deref(),
            Some("input-1_a.jsonl")
        );
        assert_eq!(
            safe_filename("my \"report\"; v2\r\n.jsonl").as_deref(),
            Some("my__report___v2__.jsonl")
        );
        assert_eq!(
            safe_filename("données.jsonl").as_deref(),
            Some("donn_es.jsonl")
        );
        assert_eq!(safe_filename(""), None);
        assert_eq!(safe_filename(".."), None);

        let mut headers = HeaderMap::new();
        attachment(&mut headers, "", "file-abc");
        assert_eq!(
            headers[header::CONTENT_DISPOSITION],
            "attachment; filename=\"file-abc\""
        );
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    }
}

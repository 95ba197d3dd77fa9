//! Unit tests of the line checks: one case per error code, the caps on what is kept, clipping.

use super::*;
use bytes::Bytes;

fn line(n: u64, s: &str) -> RequestLine {
    RequestLine {
        index: n - 1,
        number: n,
        bytes: Bytes::copy_from_slice(s.as_bytes()),
        too_long: false,
    }
}

fn limits(max_lines: u64, max_reported_errors: u64) -> Limits {
    Limits {
        max_lines,
        max_reported_errors,
        max_error_message_bytes: 100,
        max_custom_id_chars: 8,
        ..Limits::default()
    }
}

fn run(lines: &[&str]) -> (Vec<BatchError>, u64, Option<String>) {
    run_with(lines, &limits(3, 1_000))
}

fn run_with(lines: &[&str], limits: &Limits) -> (Vec<BatchError>, u64, Option<String>) {
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
    let mut v = Validator::new("/v1/chat/completions", limits, &serves);
    for (i, l) in lines.iter().enumerate() {
        if v.done() {
            break;
        }
        v.check(&line(i as u64 + 1, l));
    }
    let verdict = v.finish();
    (verdict.errors, verdict.lines, verdict.model)
}

const OK: &str = r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#;

#[test]
fn a_good_line_passes_and_names_the_model() {
    let (errors, lines, model) = run(&[OK]);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!((lines, model.as_deref()), (1, Some("m")));
}

#[test]
fn every_bad_line_gets_its_code() {
    let cases = [
        ("not json", "invalid_json_line", None),
        (
            r#"{"method":"POST","url":"/v1/chat/completions","body":{}}"#,
            "missing_required_parameter",
            Some("custom_id"),
        ),
        (
            r#"{"custom_id":"x","url":"/v1/chat/completions","body":{}}"#,
            "missing_required_parameter",
            Some("method"),
        ),
        (
            r#"{"custom_id":"x","method":"POST","body":{}}"#,
            "missing_required_parameter",
            Some("url"),
        ),
        (
            r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions"}"#,
            "missing_required_parameter",
            Some("body"),
        ),
        (
            r#"{"custom_id":"x","method":"POST","url":"/v1/embeddings","body":{"model":"m"}}"#,
            "invalid_url",
            Some("url"),
        ),
        (
            r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[],"stream":true}}"#,
            "streaming_unsupported",
            Some("body.stream"),
        ),
        (
            r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"messages":[]}}"#,
            "invalid_request",
            Some("body.model"),
        ),
        (
            r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"unknown","messages":[]}}"#,
            "model_not_found",
            Some("body.model"),
        ),
        (
            r#"{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}"#,
            "invalid_request",
            Some("body.messages"),
        ),
        (
            r#"{"custom_id":"x","method":"GET","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#,
            "invalid_request",
            Some("method"),
        ),
    ];
    for (text, code, param) in cases {
        let (errors, _, _) = run(&[text]);
        assert_eq!(errors.len(), 1, "{text}: {errors:?}");
        assert_eq!(errors[0].code, code, "{text}");
        assert_eq!(errors[0].param.as_deref(), param, "{text}");
        assert_eq!(errors[0].line, Some(1));
    }
}

#[test]
fn duplicates_second_models_and_limits_are_reported_with_lines() {
    let other = OK.replace("\"m\"", "\"m2\"").replace("\"a\"", "\"b\"");
    let (errors, lines, _) = run(&[OK, OK, &other, OK]);
    let codes: Vec<_> = errors.iter().map(|e| (e.code.as_str(), e.line)).collect();
    assert_eq!(
        codes,
        vec![
            ("duplicate_custom_id", Some(2)),
            ("model_mismatch", Some(3)),
            // Line 4 is past max_lines: only counted.
            ("too_many_tasks", None)
        ]
    );
    assert_eq!(lines, 4);
}

#[test]
fn a_batch_allowed_several_models_takes_them_and_has_no_single_model() {
    let mixing = Limits {
        one_model_per_batch: false,
        ..limits(3, 1_000)
    };
    let other = OK.replace("\"m\"", "\"m2\"").replace("\"a\"", "\"b\"");
    let (errors, lines, model) = run_with(&[OK, &other], &mixing);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!((lines, model), (2, None));
    // One model named throughout is still the batch's model.
    let same = OK.replace("\"a\"", "\"b\"");
    let (_, _, model) = run_with(&[OK, &same], &mixing);
    assert_eq!(model.as_deref(), Some("m"));
    // A model nothing serves stays a per-line error.
    let unknown = OK.replace("\"m\"", "\"unknown\"").replace("\"a\"", "\"c\"");
    let (errors, _, _) = run_with(&[OK, &other, &unknown], &mixing);
    let codes: Vec<_> = errors.iter().map(|e| (e.code.as_str(), e.line)).collect();
    assert_eq!(codes, [("model_not_found", Some(3))]);
    // The builder overrides the default either way.
    let serves = |_: &str| Ok(&[][..]);
    let mut v = Validator::new("/v1/chat/completions", &mixing, &serves).one_model_per_batch(true);
    v.check(&line(1, OK));
    v.check(&line(2, &other));
    assert_eq!(v.finish().errors[0].code, "model_mismatch");
}

#[test]
fn errors_are_capped_counted_and_reading_stops_past_max_lines() {
    let bad = vec!["x"; 50];
    let (errors, lines, _) = run_with(&bad, &limits(20, 5));
    // Reading stopped at line 21: the file is too long whatever follows.
    assert_eq!(lines, 21);
    let codes: Vec<_> = errors.iter().map(|e| e.code.as_str()).collect();
    assert_eq!(
        codes,
        [
            "invalid_json_line",
            "invalid_json_line",
            "invalid_json_line",
            "invalid_json_line",
            "invalid_json_line",
            "too_many_errors",
            "too_many_tasks"
        ]
    );
    let summary = &errors[5].message;
    assert!(
        summary.starts_with("20 lines are invalid in all among the first 20;"),
        "{summary}"
    );
    assert!(summary.contains("15 more lines are invalid"), "{summary}");

    let (errors, lines, _) = run_with(&bad[..10], &limits(20, 5));
    assert_eq!(lines, 10);
    assert_eq!(errors.len(), 6);
    assert!(
        errors[5]
            .message
            .starts_with("10 lines are invalid in all;")
    );
}

#[test]
fn echoed_client_text_is_clipped_and_long_custom_ids_are_refused() {
    let long_model = "m".repeat(200);
    let first = OK.replace("\"m\"", &format!("\"{}\"", "n"));
    let second = OK
        .replace("\"m\"", &format!("\"{long_model}\""))
        .replace("\"a\"", "\"b\"");
    let (errors, _, _) = run(&[&first, &second]);
    assert_eq!(errors[0].code, "model_mismatch");
    assert!(errors[0].message.len() <= 100, "{}", errors[0].message);
    assert!(errors[0].message.ends_with('…'));

    let long_id = OK.replace("\"a\"", "\"abcdefghi\"");
    let (errors, _, _) = run(&[&long_id]);
    assert_eq!(errors[0].code, "invalid_request");
    assert_eq!(errors[0].param.as_deref(), Some("custom_id"));

    let huge_model = OK.replace("\"m\"", &format!("\"{}\"", "m".repeat(300)));
    let (errors, _, _) = run(&[&huge_model]);
    assert_eq!(errors[0].param.as_deref(), Some("body.model"));
}

#[test]
fn listed_errors_stop_at_their_byte_budget() {
    let mut limits = limits(1_000, 1_000);
    limits.max_error_message_bytes = 1_000;
    limits.max_reported_error_bytes = 2_000;
    let dup = OK.replace("\"a\"", &format!("\"{}\"", "d".repeat(8)));
    let long = OK.replace("\"m\"", &format!("\"{}\"", "m".repeat(250)));
    let mut lines = vec![dup.as_str()];
    lines.extend(std::iter::repeat_n(long.as_str(), 30));
    let (errors, _, _) = run_with(&lines, &limits);
    let listed: usize = errors.iter().map(|e| e.message.len()).sum();
    assert!(listed < 2_000 + 1_000, "{listed}");
    let last = errors.last().unwrap();
    assert_eq!(last.code, "too_many_errors");
    assert!(
        last.message.starts_with("30 lines are invalid in all;"),
        "{}",
        last.message
    );
}

#[test]
fn clipping_keeps_characters_whole() {
    assert_eq!(clip("abc", 3), "abc");
    assert_eq!(clip("abcdef", 5), "ab…");
    assert_eq!(clip("ééé", 5), "é…");
}

#[test]
fn an_empty_file_fails() {
    let (errors, _, _) = run(&[]);
    assert_eq!(errors[0].code, "empty_file");
}

#[test]
fn a_body_field_its_provider_refuses_fails_the_line_naming_field_and_line() {
    use crate::config::ProviderSettings;
    let provider = |name: &str, models: &[&str], refused: &[&str]| ProviderSettings {
        name: name.into(),
        base_url: format!("http://{name}/v1"),
        api_key_env: None,
        models: models.iter().map(|m| (*m).into()).collect(),
        endpoints: Vec::new(),
        batch: true,
        flavors: Vec::new(),
        pacing: Default::default(),
        refused_body_fields: refused.iter().map(|f| (*f).into()).collect(),
    };
    let settings = Settings {
        providers: vec![
            provider("gateway", &["gw-model"], &["api_base", "api_key"]),
            provider("open", &["*"], &[]),
        ],
        ..Settings::default()
    };
    let serves = |m: &str| check_model(&settings, m, "/v1/chat/completions");
    let limits = limits(10, 100);
    let mut v = Validator::new("/v1/chat/completions", &limits, &serves).one_model_per_batch(false);
    let gw = OK.replace("\"m\"", "\"gw-model\"");
    let lines = [
        gw.clone(),
        gw.replace("\"a\"", "\"b\"")
            .replace("\"messages\"", "\"api_key\":\"sk-x\",\"messages\""),
        // Another provider's line may carry it; a nested field is not top-level.
        OK.replace("\"a\"", "\"c\"")
            .replace("\"messages\"", "\"api_base\":\"http://x\",\"messages\""),
        gw.replace("\"a\"", "\"d\"").replace(
            "\"messages\":[]",
            "\"messages\":[],\"metadata\":{\"api_base\":1}",
        ),
    ];
    for (i, l) in lines.iter().enumerate() {
        v.check(&line(i as u64 + 1, l));
    }
    let errors = v.finish().errors;
    assert_eq!(errors.len(), 1, "{errors:?}");
    let e = &errors[0];
    assert_eq!(
        (e.code.as_str(), e.param.as_deref(), e.line),
        ("refused_body_field", Some("body.api_key"), Some(2))
    );
    assert!(e.message.contains("'api_key'"), "{}", e.message);
}

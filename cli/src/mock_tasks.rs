//! The mock upstream's answers to task prompts (see [`sluice_worker::upstream::tasks`]):
//! deterministic JSON derived from the prompt, so task batches run end to end in tests and demos.
//!
//! A chat request whose system message carries the task marker gets:
//! - `extract`: entity label *i* → the *i*-th distinct capitalised word of the text (no spans: the
//!   worker computes them);
//! - `summarize`: `{"summary": <the text's first sentence>}`;
//! - `classify`: `"yes"` for a label when the last word of its rubric occurs in the text.
//!
//! A text containing `MOCK_INVALID_OUTPUT` gets prose instead of JSON (an unusable answer).

use serde_json::{Value, json};

use sluice_worker::upstream::tasks::MARKER_PREFIX;

/// Trigger of an unusable (non-JSON) answer.
pub const INVALID_OUTPUT_TRIGGER: &str = "MOCK_INVALID_OUTPUT";

/// The answer to a task prompt, or `None` when `messages` is not one.
pub fn task_answer(messages: &[Value], text_of: impl Fn(&Value) -> String) -> Option<String> {
    let system = messages
        .iter()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("system"))
        .map(&text_of)?;
    let start = system.find(MARKER_PREFIX)? + MARKER_PREFIX.len();
    let task = system[start..].split(']').next()?.to_owned();
    let prompt = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(&text_of)
        .unwrap_or_default();
    let text = block(&prompt, "text").unwrap_or(&prompt);
    if text.contains(INVALID_OUTPUT_TRIGGER) {
        return Some("I am sorry, but I cannot answer that in JSON.".into());
    }
    let answer = match task.as_str() {
        "extract" => {
            let words = capitalised_words(text);
            let entities: Vec<Value> = pairs(block(&prompt, "entities").unwrap_or_default())
                .zip(words)
                .map(|((label, _), word)| json!({"type": label, "text": word}))
                .collect();
            json!(entities)
        }
        "summarize" => json!({"summary": first_sentence(text)}),
        "classify" => {
            let lower = text.to_lowercase();
            let verdicts: Vec<Value> = pairs(block(&prompt, "labels").unwrap_or_default())
                .map(|(name, rubric)| {
                    let last = rubric
                        .split_whitespace()
                        .last()
                        .unwrap_or_default()
                        .trim_matches(|c: char| !c.is_alphanumeric())
                        .to_lowercase();
                    let yes = !last.is_empty() && lower.contains(&last);
                    json!({"name": name, "verdict": if yes { "yes" } else { "no" }})
                })
                .collect();
            json!(verdicts)
        }
        _ => return None,
    };
    Some(answer.to_string())
}

/// The content between `<name>\n` and the last `\n</name>`.
fn block<'a>(prompt: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>\n");
    let close = format!("\n</{name}>");
    let start = prompt.find(&open)? + open.len();
    let end = prompt.rfind(&close)?;
    prompt.get(start..end.max(start))
}

/// `name: value` lines.
fn pairs(block: &str) -> impl Iterator<Item = (&str, &str)> {
    block
        .lines()
        .filter_map(|l| l.split_once(": ").or_else(|| l.split_once(':')))
}

fn capitalised_words(text: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for word in text.split_whitespace() {
        let word = word.trim_matches(|c: char| !c.is_alphanumeric());
        if word.chars().next().is_some_and(char::is_uppercase) && !out.contains(&word) {
            out.push(word);
        }
    }
    out
}

fn first_sentence(text: &str) -> &str {
    let text = text.trim();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if matches!(c, '.' | '!' | '?') && chars.peek().is_none_or(|(_, n)| n.is_whitespace()) {
            return &text[..i + c.len_utf8()];
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::config::TaskSettings;
    use sluice_worker::upstream::tasks::build_request;

    fn answer(task: &str, input: Value) -> Option<String> {
        let req = build_request(
            task,
            input.as_object().unwrap(),
            &TaskSettings::default(),
            "m",
        );
        let text_of = |m: &Value| m["content"].as_str().unwrap_or_default().to_owned();
        task_answer(req["messages"].as_array().unwrap(), text_of)
    }

    #[test]
    fn task_prompts_get_parseable_answers() {
        let text = "Ada Lovelace met Charles Babbage in London. They talked about engines.";
        let got = answer(
            "extract",
            json!({"text": text, "entities": {"person": "a person", "place": "a city"}}),
        )
        .unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&got).unwrap(),
            json!([{"type": "person", "text": "Ada"}, {"type": "place", "text": "Lovelace"}])
        );
        let got = answer("summarize", json!({"text": text})).unwrap();
        assert_eq!(
            got,
            r#"{"summary":"Ada Lovelace met Charles Babbage in London."}"#
        );
        let labels = json!([{"name": "travel", "rubric": "Is it about London?"}, {"name": "food", "rubric": "Does it mention soup"}]);
        let got = answer("classify", json!({"text": text, "labels": labels})).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&got).unwrap(),
            json!([{"name": "travel", "verdict": "yes"}, {"name": "food", "verdict": "no"}])
        );
        let got = answer("summarize", json!({"text": "MOCK_INVALID_OUTPUT please"})).unwrap();
        assert!(serde_json::from_str::<Value>(&got).is_err());
        let plain = [json!({"role": "user", "content": "hi"})];
        assert_eq!(task_answer(&plain, |m| m["content"].to_string()), None);
    }
}

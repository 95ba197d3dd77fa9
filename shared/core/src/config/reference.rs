//! The configuration reference as data: every settable key with its type, its default (from the
//! code's `Default`s, through the schema), its environment variable and its doc comment, flattened
//! from [`settings_schema`](super::settings_schema). `sluice config reference` renders it.

use serde_json::{Map, Value};

use super::load::env_sets;
use super::schema::{ADVANCED, SchemaView, properties};

/// One table of settings: a top-level section (`worker`), or a list of tables (`providers[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SectionDoc {
    /// Path of the table, `[]` marking a list of tables; empty for the top-level keys.
    pub key: String,
    /// What the table holds, from its doc comment.
    pub description: String,
}

/// One settable key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyDoc {
    /// Dotted path, `[]` marking an entry of a list: `worker.concurrency`, `providers[].name`.
    pub key: String,
    /// The section it belongs to (its first path segment; empty for top-level keys).
    pub section: String,
    /// TOML type, or the words it may take: `integer`, `"wait" | "fail"`.
    pub type_name: String,
    /// Its default.
    pub default: DefaultDoc,
    /// The `SLUICE_…` variable that sets it, when the environment can.
    pub env: Option<String>,
    /// What it controls, from the field's doc comment.
    pub description: String,
    /// Whether its value is a secret (never printed).
    pub secret: bool,
    /// For an expert tuning knob, why its default fits.
    pub advanced: Option<String>,
}

/// A key's default.
#[derive(Debug, Clone, PartialEq)]
pub enum DefaultDoc {
    /// The value it takes when left out.
    Value(Value),
    /// Left out, the setting is off or falls back as its description says.
    Unset,
    /// It must be given.
    Required,
}

/// Every settable key, section by section, in the schema's (alphabetical) order.
pub fn reference() -> (Vec<SectionDoc>, Vec<KeyDoc>) {
    let view = SchemaView::settings();
    let root = view.root();
    let mut walk = Walk {
        view,
        sections: vec![SectionDoc {
            key: String::new(),
            description: description(root),
        }],
        keys: Vec::new(),
    };
    let top = properties(root).expect("Settings is a table");
    walk.table(top, &required_of(root), "", None);
    (walk.sections, walk.keys)
}

struct Walk<'a> {
    view: SchemaView<'a>,
    sections: Vec<SectionDoc>,
    keys: Vec<KeyDoc>,
}

impl<'a> Walk<'a> {
    /// The keys of one table at `prefix`; `defaults` is the table's default as a whole, when
    /// its keys carry none of their own.
    fn table(
        &mut self,
        keys: &'a Map<String, Value>,
        required: &[&str],
        prefix: &str,
        defaults: Option<&'a Value>,
    ) {
        for (name, schema) in keys {
            let key = format!("{prefix}{name}");
            let default = schema
                .get("default")
                .or_else(|| defaults.and_then(|d| d.get(name)));
            let present = self.view.present(schema);
            if self.view.is_secret(schema) {
                self.leaf(&key, schema, default, required.contains(&name.as_str()));
            } else if let Some(inner) = properties(present) {
                self.section(&key, schema, present);
                self.table(inner, &required_of(present), &format!("{key}."), default);
            } else if !self.view.variants(schema).is_empty() {
                self.section(&key, schema, present);
                self.variants(&key, schema, default);
            } else if let Some(entry) = self
                .view
                .items(schema)
                .map(|i| self.view.present(i))
                .filter(|i| properties(i).is_some())
            {
                let list = format!("{key}[]");
                self.section(&list, schema, entry);
                let inner = properties(entry).expect("filtered on properties");
                self.table(inner, &required_of(entry), &format!("{list}."), None);
            } else {
                self.leaf(&key, schema, default, required.contains(&name.as_str()));
            }
        }
    }

    /// A table whose keys depend on its tag (`storage.kind`): the tag, then each variant's keys,
    /// their descriptions saying which variant they belong to.
    fn variants(&mut self, key: &str, schema: &'a Value, default: Option<&'a Value>) {
        let variants = self.view.variants(schema);
        let Some((tag, _)) = variants
            .first()
            .and_then(|v| properties(v))
            .and_then(|p| p.iter().find(|(_, s)| s.get("const").is_some()))
        else {
            return;
        };
        let words: Vec<&Value> = variants
            .iter()
            .filter_map(|v| properties(v)?.get(tag)?.get("const"))
            .collect();
        self.keys.push(KeyDoc {
            key: format!("{key}.{tag}"),
            section: section_of(&format!("{key}.{tag}")),
            type_name: one_of(&words),
            default: default
                .and_then(|d| d.get(tag))
                .map_or(DefaultDoc::Required, |v| DefaultDoc::Value(v.clone())),
            env: env_var(&format!("{key}.{tag}")),
            description: format!("Which kind of {key}; the keys below depend on it."),
            secret: false,
            advanced: None,
        });
        for variant in variants {
            let keys = properties(variant).expect("variants are tables");
            let word = &keys[tag]["const"];
            let chosen = default.filter(|d| d.get(tag) == Some(word));
            let required = required_of(variant);
            let before = self.keys.len();
            for (name, s) in keys.iter().filter(|(name, _)| *name != tag) {
                let default = s
                    .get("default")
                    .or_else(|| chosen.and_then(|d| d.get(name)));
                self.leaf(
                    &format!("{key}.{name}"),
                    s,
                    default,
                    required.contains(&name.as_str()),
                );
            }
            let when = format!("With `{tag} = {word}`.");
            for doc in &mut self.keys[before..] {
                if !doc.description.is_empty() {
                    doc.description = format!("{when} {}", doc.description);
                }
            }
        }
    }

    fn section(&mut self, key: &str, field: &Value, table: &Value) {
        let own = description(field);
        self.sections.push(SectionDoc {
            key: key.to_owned(),
            description: if own.is_empty() {
                description(table)
            } else {
                own
            },
        });
    }

    fn leaf(&mut self, key: &str, schema: &'a Value, default: Option<&Value>, required: bool) {
        let present = self.view.present(schema);
        let default = match default {
            Some(Value::Null) | None if !required && is_bool(present) => {
                // A flag left out of its table's serialization is off.
                DefaultDoc::Value(Value::Bool(false))
            }
            Some(Value::Null) => DefaultDoc::Unset,
            Some(v) => DefaultDoc::Value(v.clone()),
            None if required => DefaultDoc::Required,
            None => DefaultDoc::Unset,
        };
        self.keys.push(KeyDoc {
            key: key.to_owned(),
            section: section_of(key),
            type_name: self.type_name(schema),
            default,
            env: env_var(key),
            description: description(schema),
            secret: self.view.is_secret(schema),
            advanced: schema
                .get(ADVANCED)
                .and_then(Value::as_str)
                .map(str::to_owned),
        });
    }

    fn type_name(&self, schema: &'a Value) -> String {
        let present = self.view.present(schema);
        if let Some(words) = present.get("enum").and_then(Value::as_array) {
            return one_of(&words.iter().collect::<Vec<_>>());
        }
        if let Some(alternatives) = present.get("oneOf").and_then(Value::as_array) {
            let words: Vec<&Value> = alternatives.iter().filter_map(|a| a.get("const")).collect();
            if words.len() == alternatives.len() {
                return one_of(&words);
            }
        }
        let types: Vec<&str> = match present.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        match types.iter().find(|t| **t != "null").copied() {
            Some("array") => match self.view.items(schema) {
                Some(item) => format!("list of {}", self.type_name(item)),
                None => "list".into(),
            },
            Some("number") => "float".into(),
            Some(other) => other.into(),
            None => "value".into(),
        }
    }
}

fn description(schema: &Value) -> String {
    schema
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn required_of(schema: &Value) -> Vec<&str> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Whether `schema` is a plain flag (an optional one, `Option<bool>`, is unset by default).
fn is_bool(schema: &Value) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("boolean")
}

fn one_of(words: &[&Value]) -> String {
    words
        .iter()
        .map(|w| w.to_string())
        .collect::<Vec<_>>()
        .join(" | ")
}

fn section_of(key: &str) -> String {
    match key.split_once('.') {
        Some((top, _)) => top.trim_end_matches("[]").to_owned(),
        None => String::new(),
    }
}

/// The variable that sets `key`: `SLUICE_` then the path in capitals, `__` between levels. Keys
/// of list entries have none (a list is set whole, in the file), nor sections the environment
/// layer does not read.
fn env_var(key: &str) -> Option<String> {
    let top = key.split('.').next().unwrap_or_default();
    if key.contains("[]") || !env_sets(top) {
        return None;
    }
    Some(format!(
        "SLUICE_{}",
        key.split('.').collect::<Vec<_>>().join("__").to_uppercase()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(keys: &'a [KeyDoc], key: &str) -> &'a KeyDoc {
        keys.iter()
            .find(|k| k.key == key)
            .unwrap_or_else(|| panic!("{key} is not in the reference"))
    }

    #[test]
    fn keys_carry_their_type_default_variable_and_description() {
        let (_, keys) = reference();
        let concurrency = find(&keys, "worker.concurrency");
        assert_eq!(concurrency.type_name, "integer");
        assert_eq!(concurrency.default, DefaultDoc::Value(64.into()));
        assert_eq!(
            concurrency.env.as_deref(),
            Some("SLUICE_WORKER__CONCURRENCY")
        );
        assert!(concurrency.description.starts_with("Lines called upstream"));
        let on_exhausted = find(&keys, "tenants[].budget.on_exhausted");
        assert_eq!(on_exhausted.type_name, r#""wait" | "fail""#);
        assert_eq!(on_exhausted.env, None);
        assert_eq!(find(&keys, "tenants[].id").default, DefaultDoc::Required);
        assert_eq!(
            find(&keys, "tenants[].weight").default,
            DefaultDoc::Value(1.0.into())
        );
        assert_eq!(
            find(&keys, "storage.path").default,
            DefaultDoc::Value("./data".into())
        );
        assert_eq!(find(&keys, "storage.bucket").default, DefaultDoc::Required);
        assert_eq!(find(&keys, "storage.kind").type_name, r#""local" | "s3""#);
        assert!(find(&keys, "storage.secret_access_key").secret);
        assert!(find(&keys, "amqp_url").secret);
        assert_eq!(
            find(&keys, "aggregator.exit_after_terminal_status").default,
            DefaultDoc::Value(false.into())
        );
        assert_eq!(
            find(&keys, "tenants[].one_model_per_batch").default,
            DefaultDoc::Unset
        );
    }

    #[test]
    fn every_key_has_a_description() {
        let (sections, keys) = reference();
        let bare: Vec<&str> = keys
            .iter()
            .filter(|k| k.description.is_empty())
            .map(|k| k.key.as_str())
            .collect();
        assert!(bare.is_empty(), "keys without a doc comment: {bare:?}");
        let bare: Vec<&str> = sections
            .iter()
            .filter(|s| s.description.is_empty())
            .map(|s| s.key.as_str())
            .collect();
        assert!(bare.is_empty(), "sections without a doc comment: {bare:?}");
    }
}

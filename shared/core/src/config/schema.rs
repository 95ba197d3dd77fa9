//! The JSON Schema of [`Settings`], derived by schemars from the setting types, their serde
//! attributes, their `Default`s and their doc comments, and walks of a configuration value along
//! it: the keys the schema does not know, and the values marked secret.

use std::sync::OnceLock;

use serde_json::{Map, Value};

use super::Settings;

/// Schema extension marking a setting whose value is never printed (keys, digests, URLs that
/// may carry credentials).
pub(super) const SECRET: &str = "x-secret";
/// Schema extension marking an expert tuning knob; its value says why the default fits.
pub(super) const ADVANCED: &str = "x-advanced";
/// What a secret value is printed as.
pub const REDACTED: &str = "<redacted>";

/// The JSON Schema of [`Settings`].
pub fn settings_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        serde_json::to_value(schemars::schema_for!(Settings))
            .expect("a JSON Schema serializes to JSON")
    })
}

/// A view of the settings schema that follows `$ref`s and sees through `Option`s.
#[derive(Clone, Copy)]
pub(super) struct SchemaView<'a> {
    root: &'a Value,
}

impl<'a> SchemaView<'a> {
    /// The view of the settings schema.
    pub(super) fn settings() -> Self {
        Self {
            root: settings_schema(),
        }
    }

    /// The root schema: the table of [`Settings`].
    pub(super) fn root(&self) -> &'a Value {
        self.root
    }

    /// `schema`, or the definition its `$ref` points to.
    pub(super) fn resolve(&self, schema: &'a Value) -> &'a Value {
        schema
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/$defs/"))
            .and_then(|name| self.root.get("$defs")?.get(name))
            .unwrap_or(schema)
    }

    /// The schema of a value that is present: an `Option`'s null alternative dropped.
    pub(super) fn present(&self, schema: &'a Value) -> &'a Value {
        let schema = self.resolve(schema);
        match schema.get("anyOf").and_then(Value::as_array) {
            Some(alternatives) => alternatives
                .iter()
                .map(|a| self.resolve(a))
                .find(|a| a.get("type").and_then(Value::as_str) != Some("null"))
                .unwrap_or(schema),
            None => schema,
        }
    }

    /// Whether the setting `schema` describes is secret, by its own mark or its type's.
    pub(super) fn is_secret(&self, schema: &'a Value) -> bool {
        [schema, self.resolve(schema), self.present(schema)]
            .iter()
            .any(|s| s.get(SECRET).and_then(Value::as_bool) == Some(true))
    }

    /// The keys of the table `schema` describes. For a table with variants (`storage`, tagged
    /// by `kind`) it is the variant `value` names, or none when `value` names no known variant.
    pub(super) fn table(
        &self,
        schema: &'a Value,
        value: &Map<String, Value>,
    ) -> Option<&'a Map<String, Value>> {
        let schema = self.present(schema);
        if let Some(properties) = properties(schema) {
            return Some(properties);
        }
        self.variants(schema)
            .into_iter()
            .filter_map(properties)
            .find(|properties| {
                properties.iter().all(|(key, s)| match s.get("const") {
                    Some(tag) => value.get(key) == Some(tag),
                    None => true,
                })
            })
    }

    /// The variants of a table tagged by one of its keys (`oneOf` alternatives that are
    /// tables), empty for any other schema.
    pub(super) fn variants(&self, schema: &'a Value) -> Vec<&'a Value> {
        self.present(schema)
            .get("oneOf")
            .and_then(Value::as_array)
            .map(|alternatives| {
                alternatives
                    .iter()
                    .map(|a| self.resolve(a))
                    .filter(|a| properties(a).is_some())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The schema of a list's entries.
    pub(super) fn items(&self, schema: &'a Value) -> Option<&'a Value> {
        self.present(schema).get("items")
    }
}

/// The keys of a plain table schema.
pub(super) fn properties(schema: &Value) -> Option<&Map<String, Value>> {
    schema.get("properties").and_then(Value::as_object)
}

/// How a list entry is named in a key path: by its `name` or `id` (the words the validation
/// messages use), else by its position.
fn entry_label(entry: &Value, index: usize) -> String {
    ["name", "id"]
        .iter()
        .find_map(|k| entry.get(k).and_then(Value::as_str))
        .map_or_else(|| index.to_string(), str::to_owned)
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// A key no setting has.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct UnknownKey {
    /// Its dotted path.
    pub(super) path: String,
    /// The known key of the same table it is most likely a typo of.
    pub(super) nearest: Option<String>,
}

/// Every key of `value` (a configuration as loaded from the file and the environment) that no
/// setting has. Serde stops at the first unknown key; this finds them all.
pub(super) fn unknown_keys(value: &Value) -> Vec<UnknownKey> {
    let view = SchemaView::settings();
    let mut found = Vec::new();
    find_unknown(view, value, view.root(), "", &mut found);
    found
}

fn find_unknown<'a>(
    view: SchemaView<'a>,
    value: &Value,
    schema: &'a Value,
    path: &str,
    found: &mut Vec<UnknownKey>,
) {
    match value {
        Value::Object(table) => {
            let Some(known) = view.table(schema, table) else {
                return;
            };
            for (key, v) in table {
                let at = join(path, key);
                match known.get(key) {
                    Some(s) => find_unknown(view, v, s, &at, found),
                    None => found.push(UnknownKey {
                        path: at,
                        nearest: nearest(key, known.keys()),
                    }),
                }
            }
        }
        Value::Array(entries) => {
            if let Some(item) = view.items(schema) {
                for (i, entry) in entries.iter().enumerate() {
                    let at = format!("{path}[{}]", entry_label(entry, i));
                    find_unknown(view, entry, item, &at, found);
                }
            }
        }
        _ => {}
    }
}

/// The candidate within two edits of `typo` (a letter missed, doubled, swapped or wrong), if any.
fn nearest<'k>(typo: &str, candidates: impl Iterator<Item = &'k String>) -> Option<String> {
    candidates
        .map(|c| (edit_distance(typo, c), c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.clone())
}

/// Levenshtein distance, a transposition counting as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut rows = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    rows[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitution = rows[i - 1][j - 1] + usize::from(a[i - 1] != b[j - 1]);
            let mut best = substitution.min(rows[i - 1][j] + 1).min(rows[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

/// Replaces every secret in `value` (a serialized [`Settings`]) with [`REDACTED`].
pub(super) fn redact_secrets(value: &mut Value) {
    let view = SchemaView::settings();
    redact(view, value, view.root());
}

fn redact<'a>(view: SchemaView<'a>, value: &mut Value, schema: &'a Value) {
    if view.is_secret(schema) {
        blank(value);
        return;
    }
    match value {
        Value::Object(table) => {
            let Some(known) = view.table(schema, table) else {
                return;
            };
            for (key, v) in table.iter_mut() {
                if let Some(s) = known.get(key) {
                    redact(view, v, s);
                }
            }
        }
        Value::Array(entries) => {
            if let Some(item) = view.items(schema) {
                for entry in entries {
                    redact(view, entry, item);
                }
            }
        }
        _ => {}
    }
}

/// A secret's printable form: every string it holds redacted, an unset or empty one left so.
fn blank(value: &mut Value) {
    match value {
        Value::String(s) if !s.is_empty() => *s = REDACTED.to_owned(),
        Value::Array(entries) => entries.iter_mut().for_each(blank),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn unknown_keys_are_found_at_every_depth() {
        let value = json!({
            "namespace": "x",
            "workr": {},
            "worker": {"concurency": 1, "concurrency": 2},
            "storage": {"kind": "s3", "bucket": "b", "regoin": "x"},
            "providers": [{"name": "p", "pacing": {"rmp": 1}}],
            "tenants": [{"id": "t", "budget": {"tokens_per_dya": 1}}],
        });
        let mut found: Vec<(String, Option<String>)> = unknown_keys(&value)
            .into_iter()
            .map(|k| (k.path, k.nearest))
            .collect();
        found.sort();
        let some = |k: &str| Some(k.to_owned());
        assert_eq!(
            found,
            [
                ("providers[p].pacing.rmp".into(), some("rpm")),
                ("storage.regoin".into(), some("region")),
                (
                    "tenants[t].budget.tokens_per_dya".into(),
                    some("tokens_per_day")
                ),
                ("worker.concurency".into(), some("concurrency")),
                ("workr".into(), some("worker")),
            ]
        );
        let far = unknown_keys(&json!({"worker": {"threads": 1}}));
        assert_eq!(far[0].nearest, None);
    }

    #[test]
    fn secrets_are_redacted_wherever_they_are() {
        let mut value = serde_json::to_value(Settings::default()).unwrap();
        value["tenants"] = json!([{
            "id": "t",
            "api_key_sha256": ["ab"],
            "webhooks": [{"url": "https://h", "secret": "whsec_x"}],
        }]);
        value["storage"] =
            json!({"kind": "s3", "bucket": "b", "secret_access_key": "s", "region": "r"});
        redact_secrets(&mut value);
        assert_eq!(value["amqp_url"], REDACTED);
        assert_eq!(value["tenants"][0]["api_key_sha256"], json!([REDACTED]));
        assert_eq!(value["tenants"][0]["webhooks"][0]["secret"], REDACTED);
        assert_eq!(value["tenants"][0]["webhooks"][0]["url"], "https://h");
        assert_eq!(value["storage"]["secret_access_key"], REDACTED);
        assert_eq!(value["storage"]["region"], "r");
        assert_eq!(value["namespace"], "sluice");
    }
}

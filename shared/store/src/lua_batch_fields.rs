//! The Lua scripts and the Rust code name the batch record's fields separately: this test reads
//! every script under `lua/` and fails when one names a batch field that is not one of
//! [`batch_field`]'s constants, so the two cannot drift apart.
//!
//! A script says which of its keys is the batch record with a header line
//! `-- batch record: KEYS[n]`; every `redis.call` on that key with a hash command is checked.

use std::collections::BTreeSet;

use sluice_core::domain::batch_field;

/// Hash commands whose arguments after the key are all field names.
const FIELDS_ONLY: &[&str] = &["HGET", "HMGET", "HEXISTS", "HDEL"];
/// Hash commands whose arguments after the key are field/value pairs.
const FIELD_VALUE_PAIRS: &[&str] = &["HSET", "HSETNX", "HINCRBY", "HINCRBYFLOAT"];

/// The scripts that read or write the batch record.
const SCRIPTS_ON_THE_BATCH_RECORD: &[&str] = &[
    "begin_calls.lua",
    "fill_rows.lua",
    "give_back_retry_slot.lua",
    "mark_stopping.lua",
    "register_segment.lua",
    "take_retry_slot.lua",
    "transition_status.lua",
    "write_rows.lua",
];

/// The `n` of every `-- batch record: KEYS[n]` header line.
fn batch_keys(script: &str) -> Vec<String> {
    script
        .lines()
        .filter_map(|l| l.strip_prefix("-- batch record: "))
        .map(|k| k.trim().to_owned())
        .collect()
}

/// The top-level, comma-separated arguments of every `redis.call(...)`.
fn redis_calls(script: &str) -> Vec<Vec<String>> {
    let mut calls = Vec::new();
    let mut rest = script;
    while let Some(at) = rest.find("redis.call(") {
        rest = &rest[at + "redis.call(".len()..];
        let (mut depth, mut quoted, mut args, mut arg) = (0usize, false, Vec::new(), String::new());
        for ch in rest.chars() {
            match ch {
                '\'' => quoted = !quoted,
                '(' | '{' | '[' if !quoted => depth += 1,
                ')' if !quoted && depth == 0 => break,
                ')' | '}' | ']' if !quoted => depth -= 1,
                ',' if !quoted && depth == 0 => {
                    args.push(arg.trim().to_owned());
                    arg.clear();
                    continue;
                }
                _ => {}
            }
            arg.push(ch);
        }
        args.push(arg.trim().to_owned());
        calls.push(args);
    }
    calls
}

/// The literal field names a script's hash commands give on `key`.
fn fields_named_on(script: &str, key: &str) -> BTreeSet<String> {
    let literal = |a: &str| {
        a.strip_prefix('\'')
            .and_then(|a| a.strip_suffix('\''))
            .map(str::to_owned)
    };
    let mut fields = BTreeSet::new();
    for args in redis_calls(script) {
        let (Some(command), Some(target)) = (args.first().and_then(|c| literal(c)), args.get(1))
        else {
            continue;
        };
        if target != key {
            continue;
        }
        let after_key = &args[2..];
        let names: Vec<&String> = if FIELDS_ONLY.contains(&command.as_str()) {
            after_key.iter().collect()
        } else if FIELD_VALUE_PAIRS.contains(&command.as_str()) {
            after_key.iter().step_by(2).collect()
        } else {
            continue;
        };
        fields.extend(names.into_iter().filter_map(|a| literal(a)));
    }
    fields
}

#[test]
fn every_batch_field_a_script_names_is_a_rust_constant() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/lua");
    let mut marked = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for entry in std::fs::read_dir(dir).expect("lua dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "lua") {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let script = std::fs::read_to_string(&path).expect("script");
        for key in batch_keys(&script) {
            marked.insert(name.clone());
            for field in fields_named_on(&script, &key) {
                assert!(
                    batch_field::ALL.contains(&field.as_str()),
                    "{name} names batch field '{field}', which no batch_field constant holds"
                );
                seen.insert(field);
            }
        }
    }
    let expected: BTreeSet<String> = SCRIPTS_ON_THE_BATCH_RECORD
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(
        marked, expected,
        "scripts marked `-- batch record: KEYS[n]`"
    );
    // The scan must actually see the fields the scripts are known to use.
    for field in ["status", "stopping", "total", "pend_n", "pend_b", "retries"] {
        assert!(seen.contains(field), "the scan missed '{field}': {seen:?}");
    }
}

#[test]
fn the_scan_reads_fields_of_each_command_shape() {
    let script = "local st = redis.call('HMGET', KEYS[1], 'status', 'stopping')\n\
                  redis.call('HSET', KEYS[1], 'status', to, 'model', 'm')\n\
                  redis.call('HINCRBY', KEYS[1], fields[i], 1)\n\
                  redis.call('HGET', KEYS[2], 'other')";
    let found: Vec<String> = fields_named_on(script, "KEYS[1]").into_iter().collect();
    assert_eq!(found, ["model", "status", "stopping"]);
}

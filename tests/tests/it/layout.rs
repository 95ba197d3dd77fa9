//! Issue 13: the role crates depend only on `shared`; only the `cli` crate composes them.

use std::path::Path;

/// The workspace crates (`sluice-*`) that `crate_dir`'s manifest lists as normal dependencies.
fn sluice_dependencies(crate_dir: &str) -> Vec<String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crate_dir)
        .join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    let value: toml::Value = toml::from_str(&text).expect("manifest parses");
    let mut names: Vec<String> = value
        .get("dependencies")
        .and_then(toml::Value::as_table)
        .map(|deps| {
            deps.keys()
                .filter(|k| k.starts_with("sluice-"))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn role_crates_depend_only_on_shared() {
    assert_eq!(sluice_dependencies("api"), ["sluice-shared"]);
    assert_eq!(sluice_dependencies("worker"), ["sluice-shared"]);
    assert_eq!(sluice_dependencies("shared"), Vec::<String>::new());
    assert_eq!(
        sluice_dependencies("cli"),
        ["sluice-api", "sluice-shared", "sluice-worker"]
    );
}

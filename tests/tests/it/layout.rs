//! The crate graph: the pure domain (`shared/core`) does no I/O, the roles never depend on one
//! another, and only the `cli` crate composes them.

use std::path::Path;

/// The normal dependencies that `crate_dir`'s manifest lists, whose names pass `keep`.
fn dependencies(crate_dir: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(crate_dir)
        .join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    let value: toml::Value = toml::from_str(&text).expect("manifest parses");
    let mut names: Vec<String> = value
        .get("dependencies")
        .and_then(toml::Value::as_table)
        .map(|deps| deps.keys().filter(|k| keep(k)).cloned().collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// The workspace crates (`sluice-*`) that `crate_dir` depends on.
fn sluice_dependencies(crate_dir: &str) -> Vec<String> {
    dependencies(crate_dir, |name| name.starts_with("sluice-"))
}

/// Every crate of the workspace, as its folder.
const CRATES: [&str; 9] = [
    "shared/core",
    "shared/store",
    "shared/broker",
    "shared/runtime",
    "api",
    "worker",
    "cli",
    "tests",
    "bench",
];

#[test]
fn the_domain_crate_does_no_io() {
    assert_eq!(sluice_dependencies("shared/core"), Vec::<String>::new());
    let io = dependencies("shared/core", |name| {
        matches!(
            name,
            "redis" | "lapin" | "reqwest" | "object_store" | "axum" | "hyper" | "prometheus"
        )
    });
    assert_eq!(io, Vec::<String>::new(), "shared/core must not do I/O");
}

#[test]
fn adapters_depend_only_on_the_domain() {
    assert_eq!(sluice_dependencies("shared/store"), ["sluice-core"]);
    assert_eq!(sluice_dependencies("shared/broker"), ["sluice-core"]);
    assert_eq!(
        sluice_dependencies("shared/runtime"),
        ["sluice-broker", "sluice-core", "sluice-store"]
    );
    assert_eq!(
        dependencies("shared/store", |n| n == "lapin"),
        Vec::<String>::new()
    );
    assert_eq!(
        dependencies("shared/broker", |n| n == "redis"),
        Vec::<String>::new()
    );
}

#[test]
fn roles_never_depend_on_each_other() {
    let shared = [
        "sluice-broker",
        "sluice-core",
        "sluice-runtime",
        "sluice-store",
    ];
    assert_eq!(sluice_dependencies("api"), shared);
    assert_eq!(sluice_dependencies("worker"), shared);
}

#[test]
fn only_the_cli_composes_the_roles_and_nothing_depends_on_it() {
    assert_eq!(
        sluice_dependencies("cli"),
        [
            "sluice-api",
            "sluice-core",
            "sluice-runtime",
            "sluice-worker"
        ]
    );
    // The test harness and the benchmarks start the roles through the binary's library, as an
    // operator would.
    for dir in CRATES {
        if !matches!(dir, "tests" | "bench") {
            assert!(
                !sluice_dependencies(dir).contains(&"sluice-cli".to_owned()),
                "{dir} depends on the cli"
            );
        }
    }
}

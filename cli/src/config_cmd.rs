//! `sluice config`: the configuration reference generated from the setting types, and the check
//! of a configuration file without starting a role.

use std::fmt::{self, Write as _};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::Subcommand;
use sluice_core::Settings;
use sluice_core::config::{DefaultDoc, KeyDoc, REDACTED, SectionDoc, reference};

#[derive(Subcommand)]
pub(crate) enum ConfigCommand {
    /// Prints the configuration reference (Markdown): every key with its type, default,
    /// environment variable and description.
    Reference,
    /// Checks FILE as a role loads it (SLUICE_… variables over it) without connecting to
    /// anything: prints every problem with its key and exits 1, or prints `ok`.
    Check {
        /// The TOML configuration file.
        file: PathBuf,
        /// Also print the effective configuration as TOML: defaults filled in, secrets
        /// redacted.
        #[arg(long)]
        effective: bool,
    },
}

/// Runs `command`, writing to stdout; returns the exit code.
pub(crate) fn run(command: ConfigCommand) -> io::Result<i32> {
    let mut out = io::stdout().lock();
    match command {
        ConfigCommand::Reference => {
            out.write_all(reference_markdown().as_bytes())?;
            Ok(0)
        }
        ConfigCommand::Check { file, effective } => check(&file, effective, &mut out),
    }
}

/// Checks `file` and writes the outcome to `out`: one `key: problem` line per problem (exit
/// code 1), else the effective configuration if asked for and `ok` (exit code 0).
pub(crate) fn check(file: &Path, effective: bool, out: &mut impl Write) -> io::Result<i32> {
    match Settings::check(file) {
        Ok(settings) => {
            if effective {
                match effective_toml(&settings) {
                    Ok(toml) => writeln!(out, "{toml}")?,
                    Err(e) => {
                        writeln!(out, "{}: cannot be printed as TOML: {e}", file.display())?;
                        return Ok(1);
                    }
                }
            }
            writeln!(out, "ok")?;
            Ok(0)
        }
        Err(problems) => {
            for problem in problems {
                writeln!(out, "{problem}")?;
            }
            Ok(1)
        }
    }
}

/// The settings as TOML, with defaults filled in and secrets redacted.
fn effective_toml(settings: &Settings) -> anyhow::Result<String> {
    Ok(toml::to_string(&settings.redacted()?)?)
}

/// The configuration reference as Markdown: operator settings, then advanced tuning, one table
/// per section.
pub(crate) fn reference_markdown() -> String {
    let mut md = String::new();
    write_reference(&mut md).expect("writing to a String cannot fail");
    md
}

fn write_reference(md: &mut String) -> fmt::Result {
    let (sections, keys) = reference();
    md.push_str(INTRO);
    let (advanced, operator): (Vec<&KeyDoc>, Vec<&KeyDoc>) =
        keys.iter().partition(|k| k.advanced.is_some());
    md.push_str("\n## Operator settings\n");
    write_part(md, &sections, &operator, false)?;
    md.push_str(ADVANCED_INTRO);
    write_part(md, &sections, &advanced, true)
}

const INTRO: &str = "\
# Configuration reference

<!-- Generated from the setting types by `sluice config reference`; do not edit by hand.
     Regenerate with: cargo run -p sluice-cli --bin sluice -- config reference > docs/configuration.md -->

Sluice reads its settings in layers: built-in defaults, then the TOML file given with `--config`
(or `SLUICE_CONFIG`), then `SLUICE_…` environment variables, with `__` between levels
(`SLUICE_WORKER__CONCURRENCY=32`). Every key may be left out unless its default says *required*.
Entries of lists (`[[providers]]`, `[[tenants]]`) are set in the file; a key with no variable
listed is read from the file only.

`sluice config check FILE` loads a file the way a role does, without connecting to anything, and
prints every problem with its key (unknown keys included); `--effective` also prints the
configuration with every default filled in. Values marked *secret* are never printed: the
reference and `--effective` show `\"<redacted>\"`.

The keys come in two parts: **operator settings**, which a deployment sets, and **advanced
tuning**, expert knobs whose defaults fit almost every deployment (each says why).
";

const ADVANCED_INTRO: &str = "
## Advanced tuning

Change these only to fix a measured problem: each one's default is chosen for the reason given.
";

/// One table per section of `keys`; the operator part also gives each section's description.
fn write_part(
    md: &mut String,
    sections: &[SectionDoc],
    keys: &[&KeyDoc],
    advanced: bool,
) -> fmt::Result {
    let tops = sections.iter().filter(|s| !s.key.contains('.'));
    for section in tops {
        let name = section.key.trim_end_matches("[]");
        let in_section: Vec<&&KeyDoc> = keys.iter().filter(|k| k.section == name).collect();
        if in_section.is_empty() {
            continue;
        }
        let title = match (section.key.as_str(), section.key.ends_with("[]")) {
            ("", _) => "Top-level keys".to_owned(),
            (_, true) => format!("`[[{name}]]`"),
            (_, false) => format!("`[{name}]`"),
        };
        write!(md, "\n### {title}\n\n")?;
        if !advanced {
            writeln!(md, "{}\n", section.description)?;
            for sub in sections
                .iter()
                .filter(|s| s.key.starts_with(&format!("{}.", section.key)))
            {
                writeln!(md, "- `{}`: {}", sub.key, sub.description)?;
            }
            if sections
                .iter()
                .any(|s| s.key.starts_with(&format!("{}.", section.key)))
            {
                md.push('\n');
            }
        }
        md.push_str("| Key | Type | Default | Environment variable | Description |\n");
        md.push_str("|---|---|---|---|---|\n");
        for key in in_section {
            let mut description = key.description.clone();
            if let Some(why) = &key.advanced {
                description.push_str(&format!(" *Advanced: {why}.*"));
            }
            writeln!(
                md,
                "| `{}` | {} | {} | {} | {} |",
                key.key,
                cell(&type_cell(key)),
                cell(&default_cell(key)),
                key.env
                    .as_deref()
                    .map_or_else(|| "—".to_owned(), |v| format!("`{v}`")),
                cell(&description),
            )?;
        }
    }
    Ok(())
}

fn type_cell(key: &KeyDoc) -> String {
    if key.secret {
        format!("{} (*secret*)", key.type_name)
    } else {
        key.type_name.clone()
    }
}

fn default_cell(key: &KeyDoc) -> String {
    match &key.default {
        DefaultDoc::Required => "*required*".into(),
        DefaultDoc::Unset => "unset".into(),
        DefaultDoc::Value(v) if key.secret && !is_empty(v) => format!("`\"{REDACTED}\"`"),
        DefaultDoc::Value(v) => {
            let literal = format!("`{v}`");
            match v.as_u64().filter(|_| key.key.ends_with("_bytes")) {
                Some(bytes) => format!("{literal} ({})", binary_size(bytes)),
                None => literal,
            }
        }
    }
}

fn is_empty(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Null => true,
        _ => false,
    }
}

/// `16777216` as `16 MiB`, for reading byte defaults at a glance.
fn binary_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024 && value.is_multiple_of(1024) && unit + 1 < UNITS.len() {
        value /= 1024;
        unit += 1;
    }
    format!("{value} {}", UNITS[unit])
}

/// Text made safe for one Markdown table cell.
fn cell(text: &str) -> String {
    text.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command that regenerates the checked-in reference.
    const REGENERATE: &str =
        "cargo run -p sluice-cli --bin sluice -- config reference > docs/configuration.md";

    /// Writes `toml` to a fresh file and checks it with the environment as it is.
    fn check_text(toml: &str, effective: bool) -> (i32, String) {
        let dir =
            std::env::temp_dir().join(format!("sluice-config-check-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sluice.toml");
        std::fs::write(&file, toml).unwrap();
        let mut out = Vec::new();
        let code = check(&file, effective, &mut out).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        (code, String::from_utf8(out).unwrap())
    }

    #[test]
    fn a_good_file_is_ok() {
        let (code, out) = check_text(
            "namespace = \"checked\"\n[worker]\nconcurrency = 8\n",
            false,
        );
        assert_eq!((code, out.as_str()), (0, "ok\n"));
    }

    #[test]
    fn a_bad_value_is_reported_with_its_key() {
        let (code, out) = check_text("[worker]\nconcurrency = 0\n", false);
        assert_eq!(code, 1);
        assert_eq!(out, "worker.concurrency: must be at least 1 (it is 0)\n");
    }

    #[test]
    fn a_misspelt_key_is_reported_with_its_path() {
        let (code, out) = check_text("[worker]\nconcurency = 8\n[limits]\nmax_line = 3\n", false);
        assert_eq!(code, 1);
        assert_eq!(
            out,
            "limits.max_line: unknown key (did you mean `max_lines`?)\n\
             worker.concurency: unknown key (did you mean `concurrency`?)\n"
        );
    }

    #[test]
    fn the_effective_configuration_fills_defaults_and_redacts_secrets() {
        let (code, out) = check_text(
            "amqp_url = \"amqp://user:hunter2@mq:5672/%2f\"\n\
             [[tenants]]\nid = \"t\"\n\
             api_key_sha256 = [\"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"]\n",
            true,
        );
        assert_eq!(code, 0, "{out}");
        assert!(!out.contains("hunter2"), "{out}");
        assert!(!out.contains("9f86d08"), "{out}");
        assert!(out.contains("amqp_url = \"<redacted>\""), "{out}");
        assert!(out.contains("[worker]\n"), "{out}");
        assert!(out.contains("concurrency = 64\n"), "{out}");
        assert!(out.ends_with("\nok\n"), "{out}");
        let printed: toml::Value = toml::from_str(out.trim_end_matches("ok\n")).unwrap();
        assert_eq!(printed["tenants"][0]["id"].as_str(), Some("t"));
    }

    #[test]
    fn the_checked_in_reference_is_the_generated_one() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == reference_markdown(),
            "docs/configuration.md is not the generated reference; regenerate it with:\n    {REGENERATE}"
        );
    }

    #[test]
    fn the_reference_lists_every_key_once_in_one_part() {
        let md = reference_markdown();
        let (_, keys) = reference();
        for key in &keys {
            let row = format!("| `{}` |", key.key);
            assert_eq!(md.matches(&row).count(), 1, "{}", key.key);
        }
        let advanced = &md[md.find("## Advanced tuning").unwrap()..];
        assert!(advanced.contains("| `worker.lines_per_message` |"));
        assert!(!advanced.contains("| `worker.concurrency` |"));
    }
}

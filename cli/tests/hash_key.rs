//! `sluice hash-key` run as a binary: the key from stdin, the argument form with a warning, and
//! an empty key refused.

use std::io::Write;
use std::process::{Command, Stdio};

use sluice_core::config::hash_api_key;

/// Runs `sluice hash-key [args]` with `stdin` piped in: (exit code, stdout, stderr).
fn hash_key(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("hash-key")
        .args(args)
        .env_remove("SLUICE_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("sluice runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().expect("sluice exits");
    (
        out.status.code().expect("sluice exits with a code"),
        String::from_utf8(out.stdout).expect("UTF-8 output"),
        String::from_utf8(out.stderr).expect("UTF-8 output"),
    )
}

#[test]
fn the_key_is_read_from_stdin_without_its_trailing_newline() {
    let digest = format!("{}\n", hash_api_key("sk-team-a"));
    assert_eq!(
        hash_key(&[], "sk-team-a"),
        (0, digest.clone(), String::new())
    );
    assert_eq!(
        hash_key(&[], "sk-team-a\n"),
        (0, digest.clone(), String::new())
    );
    assert_eq!(hash_key(&[], "sk-team-a\r\n"), (0, digest, String::new()));
}

#[test]
fn an_empty_key_is_refused_with_one_line() {
    for stdin in ["", "\n"] {
        let (code, stdout, stderr) = hash_key(&[], stdin);
        assert_eq!(code, 2, "stdin {stdin:?}");
        assert_eq!(stdout, "");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("empty"), "{stderr}");
    }
}

#[test]
fn the_argument_form_still_works_with_a_warning() {
    let (code, stdout, stderr) = hash_key(&["sk-team-a"], "");
    assert_eq!(code, 0);
    assert_eq!(stdout, format!("{}\n", hash_api_key("sk-team-a")));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("history") && stderr.contains("ps"),
        "{stderr}"
    );
}

//! The `sluice submit` / `sluice batches` client against a real running Sluice: plain
//! lines off a terminal, a live progress bar in a pseudo-terminal (`script(1)`), exit codes, one-line
//! errors, tenancy, Ctrl-C.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sluice_tests::*;

/// `sluice <args>` as a client of `app`, tenant `key`; environment cleared of other settings.
fn client(app: &TestApp, key: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(sluice_binary());
    cmd.args(args)
        .env_remove("SLUICE_BASE_URL")
        .env_remove("SLUICE_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .env("SLUICE_BASE_URL", &app.base)
        .env("SLUICE_API_KEY", key)
        .stdin(Stdio::null());
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("sluice runs"))
        .await
        .expect("join")
}

fn write_requests(dir: &Path, lines: &[Value]) -> String {
    std::fs::create_dir_all(dir).expect("dir");
    let path = dir.join("requests.jsonl");
    std::fs::write(&path, jsonl(lines)).expect("requests file");
    path.to_string_lossy().into_owned()
}

fn line_count(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submit_waits_with_plain_lines_off_a_terminal_and_exits_by_outcome() {
    let app = spawn_app().await;
    let dir = std::env::temp_dir().join(format!("sluice-cli-{}", uuid::Uuid::new_v4()));
    let mut lines: Vec<Value> = (0..30)
        .map(|i| chat_line_with_mock(&format!("ok-{i}"), json!({"delay_ms": 30})))
        .collect();
    lines.push(chat_line_with_mock("bad-1", json!({"status": 400})));
    lines.push(chat_line_with_mock("bad-2", json!({"status": 400})));
    let requests = write_requests(&dir, &lines);
    let out_dir = dir.join("out");
    let out = run({
        let mut c = client(
            &app,
            KEY_A,
            &[
                "submit",
                &requests,
                "--wait",
                "--metadata",
                "team=search",
                "--out",
            ],
        );
        c.arg(&out_dir);
        c
    })
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("completed: 30 of 32 lines succeeded, 2 failed"),
        "{stdout}"
    );
    assert!(
        !stderr.contains('\u{1b}'),
        "escape codes off a terminal: {stderr:?}"
    );
    assert!(stderr.contains("Uploading requests.jsonl"), "{stderr}");
    assert!(
        stderr.contains(" completed: 32/32 lines done, 2 failed"),
        "{stderr}"
    );
    let id = stdout
        .split_whitespace()
        .next()
        .expect("batch id")
        .to_owned();
    assert_eq!(line_count(&out_dir.join(format!("{id}_output.jsonl"))), 30);
    assert_eq!(line_count(&out_dir.join(format!("{id}_errors.jsonl"))), 2);
    let batch = app.get_batch(KEY_A, &id).await;
    assert_eq!(batch["metadata"]["team"], "search");
    assert_eq!(batch["endpoint"], "/v1/chat/completions");

    // Every line succeeding exits 0; --json prints the batch object.
    let ok_lines: Vec<Value> = (0..5).map(|i| chat_line(&format!("c{i}"), "hi")).collect();
    let requests = write_requests(&dir.join("ok"), &ok_lines);
    let out = run({
        let mut c = client(
            &app,
            KEY_A,
            &["submit", &requests, "--wait", "--json", "--out"],
        );
        c.arg(dir.join("ok-out"));
        c
    })
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(printed["status"], "completed");
    assert_eq!(printed["request_counts"]["completed"], 5);

    // Lists: a table for people, JSON for scripts, and nothing of A's for tenant B.
    let out = run(client(&app, KEY_A, &["batches", "list"])).await;
    let table = text(&out.stdout);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(&id) && table.contains("32/32"), "{table}");
    let out = run(client(&app, KEY_B, &["batches", "list", "--json"])).await;
    let page: Value = serde_json::from_slice(&out.stdout).expect("JSON list");
    assert_eq!(page["data"].as_array().map(Vec::len), Some(0), "{page}");

    // A retry of the failed lines is a new batch, followed like `wait` (both lines fail again).
    let retry_out = dir.join("retry-out");
    let out = run({
        let mut c = client(
            &app,
            KEY_A,
            &[
                "batches", "retry", &id, "--status", "failed", "--wait", "--out",
            ],
        );
        c.arg(&retry_out);
        c
    })
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{stderr}");
    assert!(stderr.contains(&format!("retrying {id}")), "{stderr}");
    assert!(
        stdout.contains("completed: 0 of 2 lines succeeded, 2 failed"),
        "{stdout}"
    );
    let child = stdout
        .split_whitespace()
        .next()
        .expect("child id")
        .to_owned();
    assert_eq!(app.get_batch(KEY_A, &child).await["retry_of"], id.as_str());
    assert_eq!(
        line_count(&retry_out.join(format!("{child}_errors.jsonl"))),
        2
    );
    let out = run(client(
        &app,
        KEY_A,
        &["batches", "retry", &id, "--code", "429"],
    ))
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("Nothing to retry") && text(&out.stderr).contains("HTTP 400"),
        "{}",
        text(&out.stderr)
    );

    // Errors are one line from the OpenAI envelope, and exit 1.
    let out = run(client(&app, KEY_B, &["batches", "get", &id])).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("Error: ") && stderr.contains("HTTP 404"),
        "{stderr}"
    );
    let out = run(client(&app, "sk-wrong", &["batches", "list"])).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("HTTP 401"),
        "{}",
        text(&out.stderr)
    );

    // OPENAI_* variables are the fallback for the connection.
    let mut cmd = Command::new(sluice_binary());
    cmd.args(["batches", "get", &id])
        .env_remove("SLUICE_BASE_URL")
        .env_remove("SLUICE_API_KEY")
        .env("OPENAI_BASE_URL", &app.base)
        .env("OPENAI_API_KEY", KEY_A);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("32/32 done, 2 failed"));

    std::fs::remove_dir_all(&dir).ok();
}

/// Runs `command` in a pseudo-terminal through `script(1)`; returns the child and a buffer that
/// collects everything the terminal showed.
fn in_pty(command: &str, envs: &[(&str, &str)]) -> (std::process::Child, Arc<Mutex<Vec<u8>>>) {
    // `exec`: the client is the terminal's only process, as under an interactive shell's job
    // control; otherwise a non-interactive /bin/sh in between dies of the same Ctrl-C.
    let mut cmd = Command::new("script");
    cmd.args(["-qefc", &format!("exec {command}"), "/dev/null"])
        .env_remove("SLUICE_BASE_URL")
        .env_remove("SLUICE_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OPENAI_API_KEY")
        .env("TERM", "xterm-256color")
        .env("COLUMNS", "120")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("script(1) runs");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = child.stdout.take().expect("stdout");
    let sink = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().expect("buffer").extend_from_slice(&buf[..n]);
        }
    });
    (child, seen)
}

async fn wait_until_seen(seen: &Arc<Mutex<Vec<u8>>>, needle: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        if text(&seen.lock().expect("buffer")).contains(needle) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "{needle:?} never appeared: {:?}",
            text(&seen.lock().expect("buffer"))
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("status") {
            return status.code();
        }
        assert!(start.elapsed() < timeout, "the client did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_terminal_shows_a_live_bar_and_ctrl_c_asks_before_cancelling() {
    let app = spawn_app().await;
    let dir = std::env::temp_dir().join(format!("sluice-cli-{}", uuid::Uuid::new_v4()));
    let envs = [
        ("SLUICE_BASE_URL", app.base.as_str()),
        ("SLUICE_API_KEY", KEY_A),
    ];
    let bin = sluice_binary().to_string_lossy().into_owned();

    // A bar in a terminal: escape codes, the line counter, and the summary at the end.
    let lines: Vec<Value> = (0..40)
        .map(|i| chat_line_with_mock(&format!("p-{i}"), json!({"delay_ms": 40})))
        .collect();
    let requests = write_requests(&dir, &lines);
    let out_dir = dir.join("out").to_string_lossy().into_owned();
    let (mut child, seen) = in_pty(
        &format!("{bin} submit {requests} --wait --out {out_dir}"),
        &envs,
    );
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(60)).await,
        Some(0)
    );
    let shown = text(&seen.lock().expect("buffer"));
    assert!(
        shown.contains('\u{1b}'),
        "no terminal control in a terminal: {shown:?}"
    );
    assert!(shown.contains("/40 lines"), "{shown:?}");
    assert!(shown.contains("40 of 40 lines succeeded"), "{shown:?}");

    // Ctrl-C while waiting asks; "y" cancels the batch, which then ends cancelled (exit 3).
    let slow: Vec<Value> = (0..200)
        .map(|i| chat_line_with_mock(&format!("s-{i}"), json!({"delay_ms": 500})))
        .collect();
    let slow_id = app.submit(KEY_A, &slow).await;
    let (mut child, seen) = in_pty(&format!("{bin} batches wait {slow_id}"), &envs);
    wait_until_seen(&seen, "lines", Duration::from_secs(30)).await;
    // Ctrl-C typed at the terminal: the line discipline turns it into SIGINT for the foreground
    // process group, whatever shell `script` ran the client through.
    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"\x03")
        .expect("Ctrl-C");
    wait_until_seen(
        &seen,
        &format!("Cancel batch {slow_id}? [y/N]"),
        Duration::from_secs(10),
    )
    .await;
    child
        .stdin
        .as_mut()
        .expect("stdin")
        .write_all(b"y\n")
        .expect("answer");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(60)).await,
        Some(3)
    );
    assert_eq!(app.get_batch(KEY_A, &slow_id).await["status"], "cancelled");

    // Off a terminal nobody can answer: Ctrl-C leaves the batch running (exit 130).
    let slow_id = app.submit(KEY_A, &slow).await;
    let mut cmd = client(&app, KEY_A, &["batches", "wait", &slow_id]);
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client");
    app.wait_for(KEY_A, &slow_id, Duration::from_secs(30), |b| {
        b["status"] == "in_progress"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_signal(child.id(), "INT");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).await,
        Some(130)
    );
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .ok();
    assert!(
        stderr.contains(&format!("Left {slow_id} running")),
        "{stderr}"
    );
    assert_eq!(
        app.get_batch(KEY_A, &slow_id).await["status"],
        "in_progress"
    );

    std::fs::remove_dir_all(&dir).ok();
}

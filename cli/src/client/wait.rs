//! Waiting for a batch to end (with Ctrl-C handling) and downloading its result files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};

use super::http::{Api, ClientError};
use super::progress::{BatchProgress, Counts};
use super::{Output, print_json};

/// How often a waiting client polls the batch.
const POLL: Duration = Duration::from_secs(1);

/// Process exit codes of the client subcommands.
pub mod exit {
    /// Every line succeeded (or the command did what it was asked).
    pub const OK: i32 = 0;
    /// The request failed: bad arguments, an error answer, an unreachable server.
    pub const ERROR: i32 = 1;
    /// The batch ended, but not every line succeeded (failed lines, or failed/expired/cancelled).
    pub const LINES_FAILED: i32 = 3;
    /// Interrupted; the batch was left running.
    pub const DETACHED: i32 = 130;
}

/// The statuses after which a batch never changes again.
pub(super) fn is_terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "expired" | "cancelled")
}

/// What Ctrl-C while waiting does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnInterrupt {
    /// Ask whether to cancel the batch (on a terminal), else leave it running.
    Ask,
    /// Leave the batch running.
    Detach,
}

/// How waiting ended.
enum Waited {
    /// The batch reached a terminal status.
    Ended(Value),
    /// Interrupted; the batch still runs.
    Detached,
}

/// Polls batch `id` until it ends, showing progress.
async fn wait(
    api: &Api,
    id: &str,
    interactive: bool,
    on_interrupt: OnInterrupt,
) -> Result<Waited, ClientError> {
    // Registered before the first request, and kept: an interrupt that lands while a request is
    // in flight is remembered for the next wait instead of being lost or killing the process.
    let mut interrupts = signal(SignalKind::interrupt())
        .map_err(|e| ClientError::Local(format!("cannot watch for Ctrl-C: {e}")))?;
    let mut progress = BatchProgress::new(id, interactive);
    let mut interrupted = false;
    loop {
        let batch = api.get(&format!("/batches/{id}")).await?;
        let status = batch["status"].as_str().unwrap_or_default().to_owned();
        if is_terminal(&status) {
            progress.finish(&batch);
            return Ok(Waited::Ended(batch));
        }
        progress.update(&batch);
        tokio::select! {
            _ = tokio::time::sleep(POLL) => continue,
            _ = interrupts.recv() => {}
        }
        // Ctrl-C (a second one, after a cancel, stops waiting).
        let cancel = on_interrupt == OnInterrupt::Ask
            && interactive
            && !interrupted
            && progress.suspend(|| ask(&format!("Cancel batch {id}? [y/N] ")));
        if !cancel {
            progress.suspend(|| {
                eprintln!("Left {id} running; follow it with `sluice batches wait {id}`.");
            });
            return Ok(Waited::Detached);
        }
        api.json(api.request(Method::POST, &format!("/batches/{id}/cancel")))
            .await?;
        progress.suspend(|| eprintln!("Cancelling {id}; waiting for it to stop..."));
        interrupted = true;
    }
}

/// Waits for batch `id` to end, downloads its results into `out` (if given) and prints the
/// outcome; returns the exit code. Ctrl-C asks whether to cancel, or with `detach` leaves it running.
pub(super) async fn follow(
    api: &Api,
    id: &str,
    output: Output,
    detach: bool,
    out: Option<&Path>,
) -> Result<i32, ClientError> {
    let on_interrupt = if detach {
        OnInterrupt::Detach
    } else {
        OnInterrupt::Ask
    };
    let batch = match wait(api, id, output.interactive, on_interrupt).await? {
        Waited::Ended(batch) => batch,
        Waited::Detached => return Ok(exit::DETACHED),
    };
    let files = match out {
        Some(dir) => download_results(api, &batch, dir).await?,
        None => Vec::new(),
    };
    if output.json {
        print_json(&batch);
    } else {
        println!("{}", summary(&batch));
        print!("{}", error_lines(&batch));
        for path in files {
            println!("  {}", path.display());
        }
    }
    Ok(exit_code(&batch))
}

/// Asks a yes/no question on the terminal; anything but y/yes is no.
fn ask(question: &str) -> bool {
    use std::io::Write;
    eprint!("{question}");
    std::io::stderr().flush().ok();
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer).ok();
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

/// Downloads the batch's output and error files into `dir`; returns the paths written.
async fn download_results(
    api: &Api,
    batch: &Value,
    dir: &Path,
) -> Result<Vec<PathBuf>, ClientError> {
    let id = batch["id"].as_str().unwrap_or("batch");
    // Every name is checked before anything is created or written.
    let mut files = Vec::new();
    for (field, suffix) in [("output_file_id", "output"), ("error_file_id", "errors")] {
        if let Some(file_id) = batch[field].as_str() {
            files.push((file_id, result_path(dir, id, suffix)?));
        }
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| ClientError::Local(format!("cannot create {}: {e}", dir.display())))?;
    let mut written = Vec::new();
    for (file_id, path) in files {
        download(api, file_id, &path).await?;
        written.push(path);
    }
    Ok(written)
}

/// The path in `dir` of batch `batch_id`'s `suffix` file (`<id>_<suffix>.jsonl`). The id comes
/// from the server, so anything but `[A-Za-z0-9_-]{1,128}` is refused: no answer can name a file
/// outside `dir`.
fn result_path(dir: &Path, batch_id: &str, suffix: &str) -> Result<PathBuf, ClientError> {
    let safe = (1..=128).contains(&batch_id.len())
        && batch_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !safe {
        return Err(ClientError::Protocol(format!(
            "batch id {batch_id:?} is not a safe file name (expected [A-Za-z0-9_-], at most 128 characters); nothing was written"
        )));
    }
    Ok(dir.join(format!("{batch_id}_{suffix}.jsonl")))
}

/// Streams file `file_id`'s content to `path`.
pub(super) async fn download(api: &Api, file_id: &str, path: &Path) -> Result<(), ClientError> {
    let local = |e: std::io::Error| ClientError::Local(format!("{}: {e}", path.display()));
    let response = api
        .send(api.request(Method::GET, &format!("/files/{file_id}/content")))
        .await?;
    let mut file = tokio::fs::File::create(path).await.map_err(local)?;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ClientError::Protocol(e.to_string()))?;
        file.write_all(&chunk).await.map_err(local)?;
    }
    file.flush().await.map_err(local)?;
    Ok(())
}

/// The exit code of a batch that ended: OK only when it completed with every line succeeded.
fn exit_code(batch: &Value) -> i32 {
    let counts = Counts::of(batch);
    if batch["status"] == "completed" && counts.failed == 0 {
        exit::OK
    } else {
        exit::LINES_FAILED
    }
}

/// One line summing up a batch that ended.
fn summary(batch: &Value) -> String {
    let counts = Counts::of(batch);
    format!(
        "{} {}: {} of {} lines succeeded, {} failed",
        batch["id"].as_str().unwrap_or_default(),
        batch["status"].as_str().unwrap_or_default(),
        counts.completed,
        counts.total,
        counts.failed
    )
}

/// The batch's first validation errors (`errors.data`), one per line.
pub(super) fn error_lines(batch: &Value) -> String {
    let Some(errors) = batch["errors"]["data"].as_array() else {
        return String::new();
    };
    let mut out = format!("errors:      {}\n", errors.len());
    for e in errors.iter().take(5) {
        out.push_str(&format!(
            "  line {}: {} ({})\n",
            e["line"].as_i64().map_or("-".into(), |l| l.to_string()),
            e["message"].as_str().unwrap_or_default(),
            e["code"].as_str().unwrap_or_default()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_files_are_named_only_from_a_safe_batch_id() {
        let dir = Path::new("/results");
        assert_eq!(
            result_path(dir, "batch_01J-x", "output").unwrap(),
            Path::new("/results/batch_01J-x_output.jsonl")
        );
        let longest = "b".repeat(128);
        assert!(result_path(dir, &longest, "errors").is_ok());
        for hostile in [
            "",
            "../../etc/x",
            "..",
            "/etc/passwd",
            "a/b",
            "a\\b",
            "batch.1",
            "batch 1",
            "batch\n1",
            "batch\u{0}",
            "bätch",
            &"b".repeat(129),
        ] {
            let refused = result_path(dir, hostile, "output").unwrap_err();
            assert!(
                matches!(refused, ClientError::Protocol(_)),
                "{hostile:?}: {refused}"
            );
            assert!(!refused.to_string().contains('\n'), "one line: {refused}");
        }
    }

    #[tokio::test]
    async fn a_hostile_batch_id_writes_nothing() {
        // A server that serves any file's content, so only the name check stops the write.
        let app = axum::Router::new().route(
            "/v1/files/{id}/content",
            axum::routing::get(|| async { "{}\n" }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let api = Api::new(&format!("http://{address}/v1"), "sk-test");

        let base = std::env::temp_dir().join(format!("sluice-wait-hostile-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        let out = base.join("out");
        let batch = serde_json::json!({
            "id": "../escaped",
            "status": "completed",
            "output_file_id": "file-1",
            "error_file_id": "file-2",
        });
        let refused = download_results(&api, &batch, &out).await;
        let left: Vec<_> = std::fs::read_dir(&base).unwrap().collect();
        std::fs::remove_dir_all(&base).unwrap();
        assert!(refused.is_err());
        assert!(left.is_empty(), "written: {left:?}");

        // The same server and a safe id: the files are written in `out`.
        let base = std::env::temp_dir().join(format!("sluice-wait-safe-{}", std::process::id()));
        let batch = serde_json::json!({"id": "batch_1", "output_file_id": "file-1"});
        let written = download_results(&api, &batch, &base).await.unwrap();
        let content = std::fs::read_to_string(base.join("batch_1_output.jsonl"));
        std::fs::remove_dir_all(&base).unwrap();
        assert_eq!(written, vec![base.join("batch_1_output.jsonl")]);
        assert_eq!(content.unwrap(), "{}\n");
    }
}

//! `sluice batches list|get|cancel|retry|wait|results`.

use std::path::PathBuf;

use futures::StreamExt;
use reqwest::Method;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use super::http::{Api, ClientError};
use super::progress::Counts;
use super::wait::{self, exit};
use super::{Output, print_created, print_json};

/// `sluice batches …`.
#[derive(Debug, clap::Subcommand)]
pub enum BatchesCommand {
    /// The most recent batches, newest first.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Page after this batch id.
        #[arg(long)]
        after: Option<String>,
    },
    /// One batch.
    Get {
        /// The batch id.
        id: String,
    },
    /// Cancels a batch.
    Cancel {
        /// The batch id.
        id: String,
    },
    /// Runs a finished batch's failed, expired or cancelled lines again as a new batch (servers
    /// with a retry endpoint); with --wait, follows the new batch like `wait`.
    Retry {
        /// The id of the finished batch whose lines run again.
        id: String,
        /// Only lines with this outcome: failed, expired or cancelled (repeatable; default all).
        #[arg(long = "status", value_parser = ["failed", "expired", "cancelled"])]
        statuses: Vec<String>,
        /// Only lines with this error code or HTTP status, e.g. rate_limit_exceeded or 429
        /// (repeatable).
        #[arg(long = "code")]
        codes: Vec<String>,
        /// Completion window of the new batch (default: the retried batch's).
        #[arg(long)]
        window: Option<String>,
        /// Wait for the new batch to end, with a progress bar.
        #[arg(long)]
        wait: bool,
        /// With --wait: download the new batch's results into this directory.
        #[arg(long, requires = "wait")]
        out: Option<PathBuf>,
        /// With --wait: on Ctrl-C, stop waiting without asking whether to cancel.
        #[arg(long, requires = "wait")]
        detach: bool,
    },
    /// Waits for a batch to end with a progress bar; with --out, downloads its results.
    Wait {
        /// The batch id.
        id: String,
        /// Download the batch's output and error files into this directory once it ends.
        #[arg(long)]
        out: Option<PathBuf>,
        /// On Ctrl-C, stop waiting without asking whether to cancel the batch.
        #[arg(long)]
        detach: bool,
    },
    /// The rows finished so far, as JSONL on standard output (servers with a results endpoint).
    Results {
        /// The batch id.
        id: String,
        /// Only `succeeded` or `failed` rows.
        #[arg(long)]
        status: Option<String>,
        /// Start after this line number.
        #[arg(long)]
        after: Option<String>,
        /// At most this many rows.
        #[arg(long)]
        limit: Option<u32>,
        /// Only the row of this custom_id.
        #[arg(long)]
        custom_id: Option<String>,
    },
}

pub(super) async fn run(
    api: &Api,
    command: BatchesCommand,
    output: Output,
) -> Result<i32, ClientError> {
    match command {
        BatchesCommand::List { limit, after } => {
            let mut request = api
                .request(Method::GET, "/batches")
                .query(&[("limit", limit.to_string())]);
            if let Some(after) = after {
                request = request.query(&[("after", after)]);
            }
            let page = api.json(request).await?;
            if output.json {
                print_json(&page);
            } else {
                let batches = page["data"].as_array().cloned().unwrap_or_default();
                print!("{}", table(&batches));
                if page["has_more"] == true
                    && let Some(last) = page["last_id"].as_str()
                {
                    println!("(more: --after {last})");
                }
            }
            Ok(exit::OK)
        }
        BatchesCommand::Get { id } => {
            let batch = api.get(&format!("/batches/{id}")).await?;
            if output.json {
                print_json(&batch);
            } else {
                print!("{}", details(&batch));
            }
            Ok(exit::OK)
        }
        BatchesCommand::Cancel { id } => {
            let batch = api
                .json(api.request(Method::POST, &format!("/batches/{id}/cancel")))
                .await?;
            if output.json {
                print_json(&batch);
            } else {
                println!("{id} {}", batch["status"].as_str().unwrap_or_default());
            }
            Ok(exit::OK)
        }
        BatchesCommand::Retry {
            id,
            statuses,
            codes,
            window,
            wait,
            out,
            detach,
        } => {
            let mut body = serde_json::Map::new();
            if !statuses.is_empty() {
                body.insert("statuses".into(), statuses.into());
            }
            if !codes.is_empty() {
                body.insert("codes".into(), codes.into());
            }
            if let Some(window) = window {
                body.insert("completion_window".into(), window.into());
            }
            let child = api
                .json(
                    api.request(Method::POST, &format!("/batches/{id}/retry"))
                        .json(&body),
                )
                .await?;
            let child_id = child["id"].as_str().unwrap_or_default().to_owned();
            if !wait {
                print_created(output, &child);
                return Ok(exit::OK);
            }
            eprintln!("Created {child_id} retrying {id}.");
            wait::follow(api, &child_id, output, detach, out.as_deref()).await
        }
        BatchesCommand::Wait { id, out, detach } => {
            wait::follow(api, &id, output, detach, out.as_deref()).await
        }
        BatchesCommand::Results {
            id,
            status,
            after,
            limit,
            custom_id,
        } => {
            let mut query: Vec<(&str, String)> = Vec::new();
            query.extend(status.map(|v| ("status", v)));
            query.extend(after.map(|v| ("after", v)));
            query.extend(limit.map(|v| ("limit", v.to_string())));
            query.extend(custom_id.map(|v| ("custom_id", v)));
            let response = api
                .send(
                    api.request(Method::GET, &format!("/batches/{id}/results"))
                        .query(&query),
                )
                .await?;
            let mut body = response.bytes_stream();
            let mut stdout = tokio::io::stdout();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ClientError::Protocol(e.to_string()))?;
                stdout
                    .write_all(&chunk)
                    .await
                    .map_err(|e| ClientError::Local(e.to_string()))?;
            }
            stdout.flush().await.ok();
            Ok(exit::OK)
        }
    }
}

/// A human table of batches: id, status, progress, failures, endpoint.
pub(super) fn table(batches: &[Value]) -> String {
    let mut rows = vec![[
        "ID".to_owned(),
        "STATUS".to_owned(),
        "DONE".to_owned(),
        "FAILED".to_owned(),
        "ENDPOINT".to_owned(),
    ]];
    for b in batches {
        let c = Counts::of(b);
        rows.push([
            b["id"].as_str().unwrap_or_default().to_owned(),
            b["status"].as_str().unwrap_or_default().to_owned(),
            format!("{}/{}", c.done(), c.total),
            c.failed.to_string(),
            b["endpoint"].as_str().unwrap_or_default().to_owned(),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A human view of one batch.
fn details(b: &Value) -> String {
    let c = Counts::of(b);
    let text = |k: &str| b[k].as_str().unwrap_or("-").to_owned();
    let mut out = format!(
        "id:          {}\nstatus:      {}\nendpoint:    {}\ninput file:  {}\noutput file: {}\nerror file:  {}\nlines:       {}/{} done, {} failed\n",
        text("id"),
        text("status"),
        text("endpoint"),
        text("input_file_id"),
        text("output_file_id"),
        text("error_file_id"),
        c.done(),
        c.total,
        c.failed,
    );
    for field in [
        "created_at",
        "in_progress_at",
        "finalizing_at",
        "completed_at",
        "failed_at",
        "expired_at",
        "cancelling_at",
        "cancelled_at",
        "expires_at",
    ] {
        if let Some(t) = b[field].as_i64() {
            out.push_str(&format!("{:<13}{t}\n", format!("{field}:")));
        }
    }
    out.push_str(&wait::error_lines(b));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_aligns_its_columns() {
        let batches = [
            json!({"id": "batch_a", "status": "in_progress", "endpoint": "/v1/embeddings",
                   "request_counts": {"total": 10, "completed": 4, "failed": 1}}),
            json!({"id": "batch_long_id", "status": "completed", "endpoint": "/v1/chat/completions",
                   "request_counts": {"total": 2, "completed": 2, "failed": 0}}),
        ];
        let text = table(&batches);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        let status_col = lines[0].find("STATUS").unwrap();
        assert_eq!(lines[1].find("in_progress").unwrap(), status_col);
        assert_eq!(lines[2].find("completed").unwrap(), status_col);
        assert!(lines[1].contains("5/10"));
    }
}

//! `sluice submit`: upload a JSONL file with a byte progress bar, create the batch, and optionally
//! wait for it with a live progress bar and download its results.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde_json::{Map, Value, json};

use super::http::{Api, ClientError};
use super::progress::upload_bar;
use super::wait::{self, exit};
use super::{Output, print_created};

/// Arguments of `sluice submit`.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The JSONL file of requests.
    pub file: PathBuf,
    /// Endpoint of every line; by default the `url` of the file's first line.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Completion window.
    #[arg(long, default_value = "24h")]
    pub window: String,
    /// Metadata `key=value` (repeatable).
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
    /// Wait for the batch to end, with a progress bar, then download its results.
    #[arg(long)]
    pub wait: bool,
    /// Where results are downloaded (with --wait).
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// On Ctrl-C, leave the batch running without asking whether to cancel it.
    #[arg(long)]
    pub detach: bool,
}

pub(super) async fn run(api: &Api, args: SubmitArgs, output: Output) -> Result<i32, ClientError> {
    let metadata = parse_metadata(&args.metadata)?;
    let endpoint = match &args.endpoint {
        Some(e) => e.clone(),
        None => first_line_url(&args.file)?.unwrap_or_else(|| "/v1/chat/completions".into()),
    };
    let file = upload(api, &args.file, output.interactive).await?;
    let file_id = file["id"].as_str().unwrap_or_default().to_owned();
    let mut body = json!({
        "input_file_id": file_id,
        "endpoint": endpoint,
        "completion_window": args.window,
    });
    if !metadata.is_empty() {
        body["metadata"] = Value::Object(metadata);
    }
    let batch = api
        .json(api.request(Method::POST, "/batches").json(&body))
        .await?;
    let id = batch["id"].as_str().unwrap_or_default().to_owned();
    if !args.wait {
        print_created(output, &batch);
        return Ok(exit::OK);
    }
    eprintln!("Created {id} from {file_id}.");
    wait::follow(api, &id, output, args.detach, Some(&args.out)).await
}

/// Uploads `path` (purpose `batch`), streaming it with a byte progress bar.
async fn upload(api: &Api, path: &Path, interactive: bool) -> Result<Value, ClientError> {
    let local = |e: std::io::Error| ClientError::Local(format!("{}: {e}", path.display()));
    let file = tokio::fs::File::open(path).await.map_err(local)?;
    let len = file.metadata().await.map_err(local)?.len();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "requests.jsonl".into());
    let bar = upload_bar(len, &name, interactive);
    let counted = bar.clone();
    let stream = tokio_util::io::ReaderStream::new(file).inspect(move |chunk| {
        if let Ok(bytes) = chunk {
            counted.inc(bytes.len() as u64);
        }
    });
    let part = Part::stream_with_length(reqwest::Body::wrap_stream(stream), len)
        .file_name(name)
        .mime_str("application/jsonl")
        .map_err(|e| ClientError::Local(e.to_string()))?;
    let form = Form::new().text("purpose", "batch").part("file", part);
    let answer = api
        .json(api.request(Method::POST, "/files").multipart(form))
        .await;
    bar.finish_and_clear();
    answer
}

/// `key=value` pairs as a metadata object.
fn parse_metadata(pairs: &[String]) -> Result<Map<String, Value>, ClientError> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), Value::String(v.to_owned()))),
            _ => Err(ClientError::Local(format!(
                "--metadata takes KEY=VALUE, not {pair:?}"
            ))),
        })
        .collect()
}

/// The `url` of the file's first non-blank line, if it has one.
fn first_line_url(path: &Path) -> Result<Option<String>, ClientError> {
    let file = std::fs::File::open(path)
        .map_err(|e| ClientError::Local(format!("{}: {e}", path.display())))?;
    // A bounded read: the first line of a hostile file may be huge.
    let mut reader = std::io::BufReader::new(std::io::Read::take(file, 1 << 20));
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap_or(0) > 0 {
        if !line.trim().is_empty() {
            let value: Option<Value> = serde_json::from_str(line.trim()).ok();
            return Ok(value.and_then(|v| v["url"].as_str().map(str::to_owned)));
        }
        line.clear();
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_pairs_need_a_key_and_an_equals_sign() {
        let map = parse_metadata(&["team=search".into(), "note=a=b".into()]).unwrap();
        assert_eq!(map["team"], "search");
        assert_eq!(map["note"], "a=b");
        assert!(parse_metadata(&["novalue".into()]).is_err());
        assert!(parse_metadata(&["=x".into()]).is_err());
    }
}

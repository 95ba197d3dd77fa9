//! The client subcommands of `sluice` (`submit`, `batches …`): they talk to any Sluice or
//! OpenAI-compatible Batch API over HTTP.
//!
//! The base URL and key come from `--base-url`/`--api-key`, else `SLUICE_BASE_URL`/`SLUICE_API_KEY`,
//! else `OPENAI_BASE_URL`/`OPENAI_API_KEY`. Output is for people by default (tables, progress bars
//! on a terminal, plain lines elsewhere) and JSON with `--json`. Exit codes: see [`wait::exit`].

mod batches;
mod http;
mod progress;
mod submit;
mod wait;

use std::io::IsTerminal;

pub use batches::BatchesCommand;
pub use http::{Api, ClientError};
pub use submit::SubmitArgs;
pub use wait::exit;

/// The local demo's API, when nothing else is configured.
const DEFAULT_BASE_URL: &str = "http://127.0.0.1:8080/v1";

/// Where the client connects, shared by every client subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Base URL of the Batch API, ending in /v1 [env: SLUICE_BASE_URL, else OPENAI_BASE_URL]
    #[arg(long, global = true)]
    pub base_url: Option<String>,
    /// API key [env: SLUICE_API_KEY, else OPENAI_API_KEY]
    #[arg(long, global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print JSON instead of tables and summaries.
    #[arg(long, global = true)]
    pub json: bool,
}

/// How results are shown.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// Print the server's JSON objects instead of tables and summaries.
    pub json: bool,
    /// Standard error is a terminal: progress bars and questions; else plain lines.
    pub interactive: bool,
}

/// A client subcommand.
pub enum Command {
    /// `sluice submit`: upload a file and create a batch over it.
    Submit(SubmitArgs),
    /// `sluice batches …`: list, inspect, follow, cancel or retry batches.
    Batches(BatchesCommand),
}

/// Runs a client subcommand; returns the process exit code. Errors are printed as one line.
pub async fn run(connection: Connection, command: Command) -> i32 {
    let Some(key) = first_set(connection.api_key, &["SLUICE_API_KEY", "OPENAI_API_KEY"]) else {
        eprintln!("Error: no API key: pass --api-key or set SLUICE_API_KEY (or OPENAI_API_KEY)");
        return exit::ERROR;
    };
    let base = first_set(connection.base_url, &["SLUICE_BASE_URL", "OPENAI_BASE_URL"])
        .unwrap_or_else(|| DEFAULT_BASE_URL.to_owned());
    let api = Api::new(&base, &key);
    let output = Output {
        json: connection.json,
        interactive: std::io::stderr().is_terminal(),
    };
    let result = match command {
        Command::Submit(args) => submit::run(&api, args, output).await,
        Command::Batches(command) => batches::run(&api, command, output).await,
    };
    result.unwrap_or_else(|e| {
        eprintln!("Error: {e}");
        exit::ERROR
    })
}

/// The flag's value, else the first of `vars` that is set and not empty.
fn first_set(flag: Option<String>, vars: &[&str]) -> Option<String> {
    flag.filter(|v| !v.is_empty()).or_else(|| {
        vars.iter()
            .find_map(|var| std::env::var(var).ok().filter(|v| !v.is_empty()))
    })
}

/// A batch just created, for a command that does not wait for it: its object with `--json`, else
/// its id alone (for scripts).
fn print_created(output: Output, batch: &serde_json::Value) {
    if output.json {
        print_json(batch);
    } else {
        println!("{}", batch["id"].as_str().unwrap_or_default());
    }
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

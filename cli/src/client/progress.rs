//! Showing a batch move: a live bar on a terminal (done/failed/total, rate, ETA), plain log lines
//! without escape codes anywhere else.

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

/// How often a non-terminal run prints a line when nothing changed.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// The counts a batch object reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Counts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

impl Counts {
    pub(super) fn of(batch: &Value) -> Self {
        let n = |k: &str| batch["request_counts"][k].as_u64().unwrap_or(0);
        Self {
            total: n("total"),
            completed: n("completed"),
            failed: n("failed"),
        }
    }

    pub(super) fn done(self) -> u64 {
        self.completed + self.failed
    }
}

/// A byte bar for an upload (hidden off a terminal).
pub(super) fn upload_bar(len: u64, name: &str, interactive: bool) -> ProgressBar {
    if !interactive {
        eprintln!("Uploading {name} ({len} bytes)");
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30.cyan/blue}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("Uploading {name}"));
    bar
}

/// Progress of one batch while the client waits for it.
pub(super) struct BatchProgress {
    id: String,
    bar: Option<ProgressBar>,
    last: Option<(String, Counts)>,
    last_line: Instant,
}

impl BatchProgress {
    pub(super) fn new(id: &str, interactive: bool) -> Self {
        let bar = interactive.then(|| {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:30.green/white}] {pos}/{len} lines {per_sec} ETA {eta}",
                )
                .expect("template")
                .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            id: id.to_owned(),
            bar,
            last: None,
            last_line: Instant::now(),
        }
    }

    /// Shows the batch's latest state.
    pub(super) fn update(&mut self, batch: &Value) {
        let status = batch["status"].as_str().unwrap_or("unknown").to_owned();
        let counts = Counts::of(batch);
        match &self.bar {
            Some(bar) => {
                bar.set_length(counts.total);
                bar.set_position(counts.done());
                bar.set_message(format!("{status}, {} failed", counts.failed));
            }
            None => {
                let status_changed = self.last.as_ref().is_none_or(|(s, _)| *s != status);
                let counts_changed = self.last.as_ref().is_some_and(|(_, c)| *c != counts);
                if status_changed || (counts_changed && self.last_line.elapsed() >= PLAIN_EVERY) {
                    self.print_line(&status, counts);
                }
            }
        }
        self.last = Some((status, counts));
    }

    fn print_line(&mut self, status: &str, counts: Counts) {
        eprintln!(
            "{} {status}: {}/{} lines done, {} failed",
            self.id,
            counts.done(),
            counts.total,
            counts.failed
        );
        self.last_line = Instant::now();
    }

    /// Clears the bar for a question or a message, until the next update.
    pub(super) fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(bar) => bar.suspend(f),
            None => f(),
        }
    }

    /// Leaves the final state on screen.
    pub(super) fn finish(&mut self, batch: &Value) {
        self.update(batch);
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

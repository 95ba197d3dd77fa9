//! What admission control needs to know of an upload before any batch reads it, gathered as its
//! bytes stream by: how many lines it has and which model its first line names.

use serde_json::Value;

/// The first line is kept up to this many bytes; a longer one names no model here.
const FIRST_LINE_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
pub(super) struct Sniff {
    newlines: u64,
    ends_in_newline: bool,
    seen: bool,
    first: Vec<u8>,
    first_done: bool,
}

impl Sniff {
    pub(super) fn feed(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        self.seen = true;
        self.newlines += memchr_count(chunk);
        self.ends_in_newline = chunk.last() == Some(&b'\n');
        if !self.first_done {
            let end = chunk.iter().position(|b| *b == b'\n');
            let take = end.unwrap_or(chunk.len());
            self.first.extend_from_slice(&chunk[..take]);
            if end.is_some() || self.first.len() > FIRST_LINE_BYTES {
                self.first_done = true;
            }
        }
    }

    /// Lines (a last line without its newline counts; blank lines too, so the count errs high)
    /// and the first line's `body.model`.
    pub(super) fn finish(&self) -> (u64, Option<String>) {
        let lines = self.newlines + u64::from(self.seen && !self.ends_in_newline);
        let model = (self.first.len() <= FIRST_LINE_BYTES)
            .then(|| serde_json::from_slice::<Value>(&self.first).ok())
            .flatten()
            .and_then(|v| v.pointer("/body/model")?.as_str().map(str::to_owned));
        (lines, model)
    }
}

fn memchr_count(chunk: &[u8]) -> u64 {
    chunk.iter().filter(|b| **b == b'\n').count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_lines_and_reads_the_first_model_across_chunks() {
        let mut s = Sniff::default();
        let text = b"{\"custom_id\":\"a\",\"body\":{\"model\":\"m-1\"}}\n{\"x\":1}\n{\"y\":2}";
        for chunk in text.chunks(7) {
            s.feed(chunk);
        }
        assert_eq!(s.finish(), (3, Some("m-1".to_owned())));
        let mut s = Sniff::default();
        s.feed(b"not json\n\n");
        assert_eq!(s.finish(), (2, None));
    }
}

//! Segments: finished rows moved out of Redis into object storage while a batch runs.
//!
//! A segment object holds rows sorted by line, one record per line of text:
//! `<line number> <ok flag><JSONL row>\n` (the row as [`sluice_core::domain::Row::encode`] stores it; a
//! JSON line never holds a raw newline). Only segments registered in the batch's Redis hash
//! ([`sluice_core::keys::Keys::batch_segments`]) count: an object written by a compaction that died
//! before registering is an orphan nobody reads.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use sluice_core::segments::SegmentRecord;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Read buffer of one segment reader.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Bytes one segment reader fetches per storage request: a merge of `fan_in` segments holds
/// `fan_in` of these, a read buffer and one row each.
const READ_CHUNK_BYTES: u64 = 512 * 1024;

/// Storage path of a batch's segment `name`.
pub fn segment_path(batch_id: &str, name: &str) -> Path {
    Path::from(format!("batches/{batch_id}/segments/{name}.seg"))
}

/// Prefix under which every segment of a batch (registered or orphan) lives.
pub fn segments_prefix(batch_id: &str) -> Path {
    Path::from(format!("batches/{batch_id}/segments"))
}

/// A fresh, unique segment name.
pub fn new_segment_name() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Reads a segment's records one at a time, holding one buffer and one row.
pub struct SegmentReader {
    inner: Box<dyn tokio::io::AsyncBufRead + Send + Unpin>,
    path: Path,
}

impl SegmentReader {
    /// Opens the object at `path`.
    pub async fn open(objects: &Arc<dyn ObjectStore>, path: &Path) -> anyhow::Result<Self> {
        // Ranged reads of READ_CHUNK_BYTES: a plain `get` of a local file streams it in 8 KiB
        // blocking reads, several times slower on a merge of gigabytes.
        let size = objects.head(path).await?.size;
        let stream = futures::stream::try_unfold(
            (objects.clone(), path.clone(), 0u64),
            move |(objects, path, at)| async move {
                if at >= size {
                    return Ok(None);
                }
                let end = (at + READ_CHUNK_BYTES).min(size);
                let bytes = objects.get_range(&path, at..end).await?;
                Ok(Some((bytes, (objects, path, end))))
            },
        )
        .map_err(|e: object_store::Error| std::io::Error::other(e));
        let reader = tokio_util::io::StreamReader::new(Box::pin(stream));
        Ok(Self {
            inner: Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, reader)),
            path: path.clone(),
        })
    }

    /// The next record as (line, stored row), reusing `buf`; None at the end.
    pub async fn next_into(&mut self, buf: &mut Vec<u8>) -> anyhow::Result<Option<u64>> {
        buf.clear();
        if self.inner.read_until(b'\n', buf).await? == 0 {
            return Ok(None);
        }
        anyhow::ensure!(
            buf.pop() == Some(b'\n'),
            "segment {} ends mid-record",
            self.path
        );
        let space = buf
            .iter()
            .position(|b| *b == b' ')
            .ok_or_else(|| anyhow::anyhow!("segment {}: record without a line", self.path))?;
        let line: u64 = std::str::from_utf8(&buf[..space])?.parse()?;
        buf.drain(..=space);
        Ok(Some(line))
    }
}

/// A streaming k-way merge of segments in line order. Two segments holding the same line is an
/// error: the registration scripts make it impossible, so it means corruption, never a retry.
///
/// A segment is opened only once the merge reaches its first line, so a reader that stops early
/// (a `/results` page) touches only the segments it needs.
pub struct Merge {
    objects: Arc<dyn ObjectStore>,
    batch_id: String,
    unopened: std::collections::VecDeque<SegmentRecord>,
    readers: Vec<Option<SegmentReader>>,
    rows: Vec<Vec<u8>>,
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    last: Option<u64>,
    current: Vec<u8>,
}

impl Merge {
    /// A merge of `records` (segments of batch `batch_id`).
    pub async fn open(
        objects: &Arc<dyn ObjectStore>,
        batch_id: &str,
        records: &[SegmentRecord],
    ) -> anyhow::Result<Self> {
        let mut unopened: Vec<SegmentRecord> = records.to_vec();
        unopened.sort_by_key(|r| r.first);
        Ok(Self {
            objects: objects.clone(),
            batch_id: batch_id.to_owned(),
            unopened: unopened.into(),
            readers: Vec::new(),
            rows: Vec::new(),
            heap: BinaryHeap::new(),
            last: None,
            current: Vec::new(),
        })
    }

    /// Opens every segment that may hold the next line: those starting at or before the
    /// smallest line the open readers hold.
    async fn open_due(&mut self) -> anyhow::Result<()> {
        loop {
            let min = self.heap.peek().map(|Reverse((line, _))| *line);
            match self.unopened.front() {
                Some(r) if min.is_none_or(|m| r.first <= m) => {}
                _ => return Ok(()),
            }
            let r = self.unopened.pop_front().expect("peeked");
            let mut reader =
                SegmentReader::open(&self.objects, &segment_path(&self.batch_id, &r.name)).await?;
            let mut buf = Vec::new();
            if let Some(line) = reader.next_into(&mut buf).await? {
                self.heap.push(Reverse((line, self.readers.len())));
            }
            self.readers.push(Some(reader));
            self.rows.push(buf);
        }
    }

    /// The next row in line order: (line, stored row). The slice lives until the next call.
    pub async fn next(&mut self) -> anyhow::Result<Option<(u64, &[u8])>> {
        self.open_due().await?;
        let Some(Reverse((line, i))) = self.heap.pop() else {
            return Ok(None);
        };
        if let Some(last) = self.last {
            anyhow::ensure!(line > last, "line {line} is in two segments");
        }
        self.last = Some(line);
        // The popped row moves out; its old buffer is reused for the reader's next record.
        std::mem::swap(&mut self.current, &mut self.rows[i]);
        let reader = self.readers[i]
            .as_mut()
            .expect("a reader in the heap is open");
        if let Some(next) = reader.next_into(&mut self.rows[i]).await? {
            self.heap.push(Reverse((next, i)));
        } else {
            // Done with it: free its buffers now rather than at the end of the merge.
            self.readers[i] = None;
            self.rows[i] = Vec::new();
        }
        Ok(Some((line, &self.current)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutPayload};
    use sluice_core::segments::encode_record;

    async fn put(objects: &Arc<dyn ObjectStore>, name: &str, lines: &[u64]) -> SegmentRecord {
        let mut body = Vec::new();
        for l in lines {
            encode_record(&mut body, *l, format!("1{{\"line\":{l}}}").as_bytes());
        }
        objects
            .put(&segment_path("b", name), PutPayload::from(body))
            .await
            .unwrap();
        SegmentRecord {
            name: name.to_owned(),
            first: lines[0],
            last: *lines.last().unwrap(),
            rows: lines.len() as u64,
            bytes: 0,
        }
    }

    #[tokio::test]
    async fn segments_merge_in_line_order_and_a_line_in_two_is_an_error() {
        let objects: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let a = put(&objects, "a", &[0, 3, 4, 9]).await;
        let b = put(&objects, "b", &[1, 2, 7]).await;
        let c = put(&objects, "c", &[5, 6, 8]).await;
        let mut merge = Merge::open(&objects, "b", &[c, a.clone(), b])
            .await
            .unwrap();
        let mut seen = Vec::new();
        while let Some((line, row)) = merge.next().await.unwrap() {
            assert_eq!(row, format!("1{{\"line\":{line}}}").as_bytes());
            seen.push(line);
        }
        assert_eq!(seen, (0..10).collect::<Vec<_>>());

        let dup = put(&objects, "d", &[4]).await;
        let mut merge = Merge::open(&objects, "b", &[a, dup]).await.unwrap();
        let mut err = None;
        loop {
            match merge.next().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    err = Some(e.to_string());
                    break;
                }
            }
        }
        assert!(err.unwrap().contains("in two segments"));
    }
}

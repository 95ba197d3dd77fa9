//! The segment format: what Redis keeps about a segment of compacted rows, and one record of it.

/// What Redis keeps about a registered segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentRecord {
    /// Unique name; the object is at `batches/<batch>/segments/<name>.seg`.
    pub name: String,
    /// First and last line it holds.
    pub first: u64,
    /// Last line it holds.
    pub last: u64,
    /// Rows and row bytes it holds.
    pub rows: u64,
    /// Row bytes it holds.
    pub bytes: u64,
}

impl SegmentRecord {
    /// The value stored in the segments hash (the name is the field).
    pub fn encode_value(&self) -> String {
        format!("{} {} {} {}", self.first, self.last, self.rows, self.bytes)
    }

    /// Parses a hash field and value back.
    pub fn decode(name: &str, value: &str) -> Option<Self> {
        let mut it = value.split(' ').map(|v| v.parse::<u64>().ok());
        Some(Self {
            name: name.to_owned(),
            first: it.next()??,
            last: it.next()??,
            rows: it.next()??,
            bytes: it.next()??,
        })
    }
}

/// Appends one record (`line`, stored row) in segment form to `out`.
pub fn encode_record(out: &mut Vec<u8>, line: u64, stored: &[u8]) {
    out.extend_from_slice(line.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(stored);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = SegmentRecord {
            name: "n".into(),
            first: 3,
            last: 90,
            rows: 12,
            bytes: 4096,
        };
        assert_eq!(SegmentRecord::decode("n", &r.encode_value()), Some(r));
        assert_eq!(SegmentRecord::decode("n", "1 2 x 4"), None);
    }
}

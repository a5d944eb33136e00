//! On-disk format of `intent.log`.
//!
//! ```text
//! header:  b"DPUINTNT" | version: u32 LE | store id: u64 LE
//! record:  payload length: u32 LE | CRC32C(payload): u32 LE | payload (JSON of `Record`)
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{Error, Meta};

const MAGIC: &[u8; 8] = b"DPUINTNT";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 20;
const RECORD_HEADER_LEN: usize = 8;

/// One atomic batch of operations.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Record {
    pub rev: u64,
    pub ops: Vec<Op>,
}

/// A single change inside a record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum Op {
    Put { kind: String, id: String, meta: Meta, object: Value },
    Delete { kind: String, id: String },
}

/// The file header for a store.
pub(crate) fn header(store_id: u64) -> Vec<u8> {
    let mut buf = Vec::with_capacity(HEADER_LEN);
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_le_bytes());
    buf.extend_from_slice(&store_id.to_le_bytes());
    buf
}

/// Frames a record: length, checksum, JSON payload.
pub(crate) fn encode(record: &Record) -> Result<Vec<u8>, Error> {
    let payload = serde_json::to_vec(record).map_err(|source| Error::Json {
        kind: "record".into(),
        id: record.rev.to_string(),
        source,
    })?;
    let len = u32::try_from(payload.len()).map_err(|_| Error::TooLarge { size: payload.len() })?;
    let mut buf = Vec::with_capacity(RECORD_HEADER_LEN + payload.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    buf.extend_from_slice(&payload);
    Ok(buf)
}

/// Result of a successful replay.
#[derive(Debug)]
pub(crate) struct Replayed {
    pub store_id: u64,
    /// Length of the valid prefix of the file.
    pub valid_len: u64,
    /// Set when an incomplete final record follows the valid prefix.
    pub torn: bool,
}

/// Validates the log and feeds every record, in order, to `apply`.
/// Errors carry the offset of the offending header or record and the reason.
pub(crate) fn replay(bytes: &[u8], mut apply: impl FnMut(Record)) -> Result<Replayed, (u64, String)> {
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err((0, "the file does not start with the intent log header".into()));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != VERSION {
        return Err((8, format!("format version {version} is not supported (expected {VERSION})")));
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[12..HEADER_LEN]);
    let store_id = u64::from_le_bytes(id);
    let (mut pos, mut last_rev) = (HEADER_LEN, 0u64);
    while pos < bytes.len() {
        let offset = pos as u64;
        let rest = &bytes[pos..];
        if is_torn(rest) {
            return Ok(Replayed { store_id, valid_len: offset, torn: true });
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let Some(payload) = rest.get(RECORD_HEADER_LEN..RECORD_HEADER_LEN + len) else {
            return Err((offset, format!("the record length {len} runs past the end of the file")));
        };
        let actual = crc32c::crc32c(payload);
        if actual != crc {
            return Err((offset, format!("checksum mismatch (stored {crc:#010x}, computed {actual:#010x})")));
        }
        let record: Record =
            serde_json::from_slice(payload).map_err(|e| (offset, format!("the record does not parse: {e}")))?;
        if record.rev <= last_rev {
            return Err((offset, format!("revision {} does not follow revision {last_rev}", record.rev)));
        }
        last_rev = record.rev;
        apply(record);
        pos += RECORD_HEADER_LEN + len;
    }
    Ok(Replayed { store_id, valid_len: pos as u64, torn: false })
}

/// Whether `rest` (from a record boundary to EOF) is the remains of an interrupted append rather
/// than damage: zero fill, a partial record header, or a length running past EOF followed by a
/// strict prefix of a JSON payload. Serialized payloads never contain bytes below 0x20 and a
/// prefix never parses, so a damaged length field in front of complete records is not mistaken
/// for a torn write.
fn is_torn(rest: &[u8]) -> bool {
    if rest.iter().all(|&b| b == 0) || rest.len() < RECORD_HEADER_LEN {
        return true;
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let partial = &rest[RECORD_HEADER_LEN..];
    if partial.len() >= len {
        return false;
    }
    let text_end = partial.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    partial[..text_end].iter().all(|&b| b >= 0x20) && serde_json::from_slice::<Record>(&partial[..text_end]).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(revs: &[u64]) -> Vec<u8> {
        let mut buf = header(7);
        for &rev in revs {
            buf.extend(encode(&Record { rev, ops: vec![] }).expect("encode"));
        }
        buf
    }

    #[test]
    fn replays_and_detects_damage() {
        let good = log_with(&[1, 2, 3]);
        let mut n = 0;
        let r = replay(&good, |_| n += 1).expect("valid");
        assert_eq!((n, r.store_id, r.torn, r.valid_len), (3, 7, false, good.len() as u64));

        let rec_len = (good.len() - HEADER_LEN) / 3;
        // Torn: the last record cut short, or zero-filled tail.
        let r = replay(&good[..good.len() - 3], |_| {}).expect("torn");
        assert_eq!((r.torn, r.valid_len), (true, (HEADER_LEN + 2 * rec_len) as u64));
        let mut zeros = good.clone();
        zeros.extend([0u8; 13]);
        assert!(replay(&zeros, |_| {}).expect("zero tail").torn);

        // A length field grown past EOF in front of complete records is damage, not a torn tail.
        let mut bad = good.clone();
        bad[HEADER_LEN + rec_len + 2] = 0x7f;
        assert_eq!(replay(&bad, |_| {}).expect_err("corrupt").0, (HEADER_LEN + rec_len) as u64);
        // Same for the final record when its payload is complete.
        let mut bad = good.clone();
        bad[HEADER_LEN + 2 * rec_len] += 1;
        assert!(replay(&bad, |_| {}).is_err());

        let err = replay(&log_with(&[1, 1]), |_| {}).expect_err("non-increasing");
        assert!(err.1.contains("does not follow"), "{}", err.1);
        assert_eq!(replay(b"garbage-garbage-garbage", |_| {}).expect_err("magic").0, 0);
        let mut v2 = good;
        v2[8] = 2;
        assert_eq!(replay(&v2, |_| {}).expect_err("version").0, 8);
    }
}

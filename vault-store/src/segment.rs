//! Segment (pack) files: append-only files of chunk records.
//!
//! A segment starts with a 32-byte header (magic, version, segment id,
//! checksum) followed by back-to-back chunk records. Only the prefix up to
//! the *committed length* recorded in the index is meaningful; bytes past it
//! are the leftovers of an interrupted session and are cut off by the next
//! writer (see `FORMAT.md`, "Segment file" and "Crash invariants").

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

use std::io::Write;
use std::path::PathBuf;

use crate::copies::{Copies, Copy};
use crate::error::{Result, StoreError};
use crate::store::Appender;

/// Segment magic. Frozen.
pub const SEGMENT_MAGIC: [u8; 8] = *b"CFSEGMT\0";
/// Segment format version.
pub const SEGMENT_VERSION: u32 = 1;
/// Length of the segment header.
pub const SEGMENT_HEADER_LEN: u64 = 32;
/// A writer rolls over to a new segment once the current one reaches this.
pub const SEGMENT_TARGET_LEN: u64 = 1 << 30;
/// Folder of the segments inside a vault.
pub const SEGMENTS_DIR: &str = "segments";

/// File name of segment `id`.
pub fn segment_file_name(id: u64) -> String {
    format!("{id:016x}.seg")
}

/// Parses a segment file name back into its id.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Encodes the header of segment `id`.
pub fn encode_header(id: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    let mut w = &mut h[..];
    // Writes into a fixed array cannot fail.
    let _ = w.write_all(&SEGMENT_MAGIC);
    let _ = w.write_all(&SEGMENT_VERSION.to_le_bytes());
    let _ = w.write_all(&0u32.to_le_bytes());
    let _ = w.write_all(&id.to_le_bytes());
    let _ = w.write_all(&0u32.to_le_bytes());
    let crc = crc32fast::hash(h.get(..28).unwrap_or_default());
    if let Some(dst) = h.get_mut(28..32) {
        dst.copy_from_slice(&crc.to_le_bytes());
    }
    h
}

/// Checks a segment header; returns a description of the problem if any.
pub fn check_header(bytes: &[u8], expected_id: u64) -> std::result::Result<(), String> {
    let h = bytes
        .get(..SEGMENT_HEADER_LEN as usize)
        .ok_or_else(|| format!("header truncated ({} bytes)", bytes.len()))?;
    if h.get(..8) != Some(&SEGMENT_MAGIC[..]) {
        return Err("bad segment magic".into());
    }
    let crc = crc32fast::hash(h.get(..28).unwrap_or_default());
    let stored = h
        .get(28..32)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    if stored != Some(crc) {
        return Err("segment header checksum mismatch".into());
    }
    let version = h
        .get(8..12)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    if version != Some(SEGMENT_VERSION) {
        return Err(format!("unsupported segment version {version:?}"));
    }
    let id = h
        .get(16..24)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes);
    if id != Some(expected_id) {
        return Err(format!(
            "header names segment {id:?}, file is {expected_id}"
        ));
    }
    Ok(())
}

/// Name of segment `id` inside a copy.
pub fn segment_name(id: u64) -> String {
    format!("{SEGMENTS_DIR}/{}", segment_file_name(id))
}

/// Appends records to one segment on every synchronous copy. The same
/// bytes land at the same offsets everywhere (invariant C1).
pub struct SegmentWriter {
    id: u64,
    name: String,
    outs: Vec<(String, Box<dyn Appender>)>,
    len: u64,
}

impl SegmentWriter {
    /// Creates segment `id` on every copy with its header (not yet synced).
    pub fn create(copies: &Copies, id: u64) -> Result<Self> {
        let name = segment_name(id);
        let mut outs = Vec::new();
        for c in copies.sync_copies() {
            outs.push((c.store.location(), c.store.create(&name)?));
        }
        let mut w = SegmentWriter {
            id,
            name,
            outs,
            len: 0,
        };
        w.append(&encode_header(id))?;
        Ok(w)
    }

    /// Opens segment `id` on every copy to append after its first
    /// `committed` bytes. A copy whose file is missing or short (a replica
    /// that was down) gets the committed prefix from the first copy that
    /// has it.
    pub fn append_to(copies: &Copies, id: u64, committed: u64) -> Result<Self> {
        let name = segment_name(id);
        let mut outs = Vec::new();
        for c in copies.sync_copies() {
            let have = c.store.size(&name)?.unwrap_or(0);
            if have < committed {
                refill(copies, c, &name, committed)?;
            }
            outs.push((c.store.location(), c.store.append_to(&name, committed)?));
        }
        Ok(SegmentWriter {
            id,
            name,
            outs,
            len: committed,
        })
    }

    /// Appends bytes to every copy; returns the offset they start at.
    pub fn append(&mut self, bytes: &[u8]) -> Result<u64> {
        let at = self.len;
        for (_, out) in &mut self.outs {
            out.append(bytes)?;
        }
        self.len += bytes.len() as u64;
        Ok(at)
    }

    /// Starts the writeback of what was appended on every copy.
    pub fn start_writeback(&mut self) -> Result<()> {
        for (_, out) in &mut self.outs {
            out.start_writeback()?;
        }
        Ok(())
    }

    /// Makes the file durable on every copy, concurrently.
    pub fn sync(&mut self) -> Result<()> {
        if let [(_, only)] = self.outs.as_mut_slice() {
            return only.sync();
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = self
                .outs
                .iter_mut()
                .map(|(_, out)| s.spawn(move || out.sync()))
                .collect();
            let mut first = Ok(());
            for h in handles {
                let r = h.join().unwrap_or_else(|_| {
                    Err(StoreError::CopyUnavailable {
                        path: PathBuf::new(),
                        reason: "a copy's fsync thread panicked".into(),
                    })
                });
                if first.is_ok() {
                    first = r;
                }
            }
            first
        })
    }

    /// Cuts the file back to `len` bytes on every copy (or removes it when
    /// `len` is 0), discarding unflushed data.
    pub fn discard(self, copies: &Copies, len: u64) -> Result<()> {
        drop(self.outs);
        let mut first = Ok(());
        for c in copies.sync_copies() {
            let r = if len == 0 {
                c.store.delete(&self.name).map(|_| ())
            } else {
                c.store.truncate(&self.name, len)
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Segment id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Bytes written so far, header included.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when nothing, not even the header, was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Copies the first `len` bytes of segment `name` into `target` from
/// another copy that has them (a replica that missed writes).
pub fn refill(copies: &Copies, target: &Copy, name: &str, len: u64) -> Result<()> {
    let source = copies
        .readable()
        .filter(|c| c.dir != target.dir)
        .find(|c| c.store.size(name).ok().flatten().is_some_and(|n| n >= len))
        .ok_or_else(|| StoreError::CopyUnavailable {
            path: target.dir.clone(),
            reason: format!("no copy holds the {len} committed bytes of {name}"),
        })?;
    let have = target.store.size(name)?.unwrap_or(0);
    let mut at = have.min(len);
    let mut buf = vec![0u8; 8 << 20];
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        let chunk = buf.get_mut(..n).unwrap_or_default();
        source.store.read_at(name, at, chunk)?;
        target.store.write_at(name, at, chunk)?;
        at += n as u64;
    }
    tracing::info!(copy = %target.dir.display(), segment = name, bytes = len - have.min(len), "refilled a copy's segment");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_names() {
        let h = encode_header(42);
        check_header(&h, 42).unwrap();
        assert!(check_header(&h, 43).is_err());
        let mut bad = h;
        bad[3] ^= 0x10;
        assert!(check_header(&bad, 42).is_err());
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_file_name("x.seg"), None);
    }
}

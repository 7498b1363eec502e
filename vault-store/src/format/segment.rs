//! The segment file format: header, names, and pack headers.
//!
//! A segment starts with a 32-byte header (magic, version, segment id,
//! checksum) followed by back-to-back chunk records. Only the prefix up to
//! the *committed length* recorded in the index is meaningful; bytes past it
//! are the leftovers of an interrupted session and are cut off by the next
//! writer (see `FORMAT.md`, "Segment file" and "Crash invariants"). A
//! snapshot's pack has the same records behind a pack header; adopted into
//! a vault, it is a segment.

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

use std::io::Write;

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

/// Magic of a snapshot pack (`AREA/ITEM/JOB.pack`), whose records are in
/// the segment record format. Frozen.
pub const PACK_MAGIC: [u8; 8] = *b"CFPACK\0\0";
/// Pack format version.
pub const PACK_VERSION: u32 = 1;

/// Encodes a pack header: the 32 bytes before a pack's records.
pub fn encode_pack_header() -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    let mut w = &mut h[..];
    // Writes into a fixed array cannot fail.
    let _ = w.write_all(&PACK_MAGIC);
    let _ = w.write_all(&PACK_VERSION.to_le_bytes());
    let crc = crc32fast::hash(h.get(..28).unwrap_or_default());
    if let Some(dst) = h.get_mut(28..32) {
        dst.copy_from_slice(&crc.to_le_bytes());
    }
    h
}

/// Checks a pack header; returns a description of the problem if any.
pub fn check_pack_header(h: &[u8]) -> std::result::Result<(), String> {
    if h.get(..8) != Some(&PACK_MAGIC[..]) {
        return Err("bad magic (not a coffre pack)".into());
    }
    if h.get(8..12) != Some(&PACK_VERSION.to_le_bytes()[..]) {
        return Err("unsupported pack version".into());
    }
    let crc = h.get(28..32).unwrap_or_default();
    if crc != crc32fast::hash(h.get(..28).unwrap_or_default()).to_le_bytes() {
        return Err("pack header checksum mismatch".into());
    }
    Ok(())
}

/// True when `h` begins with a pack header: the segment is an *adopted*
/// pack (a snapshot's pack hard-linked into the vault by its transfer),
/// which is never appended to.
pub fn is_adopted(h: &[u8]) -> bool {
    check_pack_header(h).is_ok()
}

/// Checks a segment header; returns a description of the problem if any.
/// An adopted pack's header (see [`is_adopted`]) is a valid segment
/// header: its id is its file name's.
pub fn check_header(bytes: &[u8], expected_id: u64) -> std::result::Result<(), String> {
    let h = bytes
        .get(..SEGMENT_HEADER_LEN as usize)
        .ok_or_else(|| format!("header truncated ({} bytes)", bytes.len()))?;
    if h.get(..8) == Some(&PACK_MAGIC[..]) {
        return check_pack_header(h).map_err(|e| format!("adopted pack: {e}"));
    }
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

/// The ranges of `from..len` that no range of `used` (start, end; in any
/// order, possibly overlapping) covers, in order: the dead bytes of a pack
/// or an adopted segment between the records still in use.
pub fn uncovered(from: u64, len: u64, used: &mut [(u64, u64)]) -> Vec<(u64, u64)> {
    used.sort_unstable();
    let mut out = Vec::new();
    let mut at = from;
    for &(start, end) in used.iter().chain(std::iter::once(&(len, len))) {
        if start > at {
            out.push((at, start.min(len)));
        }
        at = at.max(end);
    }
    out.retain(|(s, e)| e > s);
    out
}

/// Name of segment `id` inside a copy.
pub fn segment_name(id: u64) -> String {
    format!("{SEGMENTS_DIR}/{}", segment_file_name(id))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_names() {
        let h = encode_header(42);
        check_header(&h, 42).unwrap();
        assert_eq!(
            uncovered(
                32,
                1000,
                &mut [(500, 600), (32, 100), (550, 650), (700, 750)]
            ),
            vec![(100, 500), (650, 700), (750, 1000)]
        );
        assert!(uncovered(32, 100, &mut [(32, 100)]).is_empty());
        assert!(check_header(&h, 43).is_err());
        let mut bad = h;
        bad[3] ^= 0x10;
        assert!(check_header(&bad, 42).is_err());
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_file_name("x.seg"), None);
    }
}

//! Chunk lists of shared vaults: `chunks/SEGMENT/START.list`, written with
//! every commit of a write session, naming the records it appended to
//! segment `SEGMENT` from offset `START` on (`FORMAT.md`, "Shared vaults").
//!
//! Another host imports them on its next open instead of scanning the
//! segments themselves, so keeping a cache up to date costs about 48 bytes
//! per new chunk, not the chunk. The decoder checks every field and never
//! trusts a length: entries are fixed-size, sorted, inside the segment and
//! non-overlapping.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

use crate::format::chunk_id::ChunkId;
use crate::format::envelope;

/// Folder of the chunk lists in a shared vault's store.
pub const CHUNK_LISTS_DIR: &str = "chunks";
/// Magic. Frozen.
pub const CHUNK_LIST_MAGIC: [u8; 8] = *b"CFCHUNKL";
/// Version.
pub const CHUNK_LIST_VERSION: u32 = 1;
/// Bytes per entry: chunk id (32), offset (u64), record length (u32),
/// plaintext length (u32), little-endian.
pub const ENTRY_LEN: usize = 48;
/// Largest list body (about 350,000 chunks; a commit checkpoints long
/// before).
pub const MAX_LIST_BODY: usize = 16 << 20;

/// One record a commit appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListedChunk {
    /// The chunk.
    pub id: ChunkId,
    /// Offset of its record in the segment.
    pub offset: u64,
    /// Record length.
    pub len: u32,
    /// Plaintext length.
    pub plain_len: u32,
}

/// Name of the list of segment `segment` starting at `start`.
pub fn list_name(segment: u64, start: u64) -> String {
    format!("{CHUNK_LISTS_DIR}/{segment:016x}/{start:016x}.list")
}

/// Parses a list name back into (segment, start).
pub fn parse_list_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix(CHUNK_LISTS_DIR)?.strip_prefix('/')?;
    let (seg, file) = rest.split_once('/')?;
    let start = file.strip_suffix(".list")?;
    if seg.len() != 16 || start.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(seg, 16).ok()?,
        u64::from_str_radix(start, 16).ok()?,
    ))
}

/// Encodes a list (entries in any order; they are sorted by offset).
pub fn encode(entries: &[ListedChunk]) -> Vec<u8> {
    let mut sorted = entries.to_vec();
    sorted.sort_by_key(|e| e.offset);
    let mut body = Vec::with_capacity(sorted.len() * ENTRY_LEN);
    for e in &sorted {
        body.extend_from_slice(e.id.as_bytes());
        body.extend_from_slice(&e.offset.to_le_bytes());
        body.extend_from_slice(&e.len.to_le_bytes());
        body.extend_from_slice(&e.plain_len.to_le_bytes());
    }
    envelope::encode(&CHUNK_LIST_MAGIC, CHUNK_LIST_VERSION, &body)
}

/// Decodes a list of a segment whose records start at `start` or later.
pub fn decode(bytes: &[u8], start: u64) -> Result<Vec<ListedChunk>, String> {
    let (_, body) = envelope::decode(&CHUNK_LIST_MAGIC, CHUNK_LIST_VERSION, MAX_LIST_BODY, bytes)
        .map_err(|e| e.to_string())?;
    if body.len() % ENTRY_LEN != 0 {
        return Err(format!(
            "body of {} bytes is not a whole number of entries",
            body.len()
        ));
    }
    let mut out = Vec::with_capacity(body.len() / ENTRY_LEN);
    let mut next_free = start;
    for (i, e) in body.chunks_exact(ENTRY_LEN).enumerate() {
        let field = |r: std::ops::Range<usize>| e.get(r).unwrap_or_default();
        let id: [u8; 32] = field(0..32).try_into().map_err(|_| "short entry")?;
        let offset = u64::from_le_bytes(field(32..40).try_into().map_err(|_| "short entry")?);
        let len = u32::from_le_bytes(field(40..44).try_into().map_err(|_| "short entry")?);
        let plain_len = u32::from_le_bytes(field(44..48).try_into().map_err(|_| "short entry")?);
        if offset < next_free {
            return Err(format!(
                "entry {i} at offset {offset} overlaps the one before (or the list start {start})"
            ));
        }
        if (len as usize) <= crate::format::record::HEADER_LEN
            || len as usize
                > crate::format::record::HEADER_LEN + crate::format::record::MAX_STORED_LEN
        {
            return Err(format!("entry {i}: record length {len} is out of bounds"));
        }
        next_free = offset
            .checked_add(u64::from(len))
            .ok_or_else(|| format!("entry {i}: offset {offset} + {len} overflows"))?;
        out.push(ListedChunk {
            id: ChunkId(id),
            offset,
            len,
            plain_len,
        });
    }
    Ok(out)
}

/// Fuzz entry point: decodes arbitrary bytes as a chunk list; never
/// panics.
pub fn fuzz_entry(data: &[u8]) -> bool {
    decode(data, 32).is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn entry(n: u8, offset: u64, len: u32) -> ListedChunk {
        ListedChunk {
            id: ChunkId::of(&[n]),
            offset,
            len,
            plain_len: 65536,
        }
    }

    #[test]
    fn lists_round_trip_sorted_and_bad_ones_are_refused() {
        let list = [entry(2, 500, 100), entry(1, 32, 400)];
        let bytes = encode(&list);
        let back = decode(&bytes, 32).unwrap();
        assert_eq!(back, vec![list[1], list[0]]);
        assert!(decode(&bytes, 100).is_err(), "an entry before the start");
        let overlapping = encode(&[entry(1, 32, 400), entry(2, 300, 10)]);
        assert!(decode(&overlapping, 32).is_err());
        let mut flipped = bytes.clone();
        if let Some(b) = flipped.get_mut(30) {
            *b ^= 1;
        }
        assert!(decode(&flipped, 32).is_err());
        assert!(decode(&bytes[..bytes.len() - 1], 32).is_err());
        assert_eq!(parse_list_name(&list_name(7, 32)), Some((7, 32)));
        assert_eq!(parse_list_name("chunks/x/y.list"), None);
    }
}

//! Reading a segment without the index: the scan `vault rebuild-index`
//! and the replication use.
//!
//! A segment is a header and back-to-back chunk records, so walking it
//! record header by record header finds every chunk with its id and
//! length. The walk trusts nothing: a header whose magic, version, limits
//! or checksum fail does not end the scan. The scan *resynchronises* on the
//! next `CFCK` magic whose header checks out, so a hole punched by GC (all
//! zeros) or a damaged header loses only what it covers. A record that
//! runs past the end of the file is a torn tail and ends the scan.

use crate::format::chunk_id::ChunkId;
use crate::format::record::{HEADER_LEN, RECORD_MAGIC, RecordHeader};
use crate::format::segment::{SEGMENT_HEADER_LEN, check_header, uncovered};

/// One record found by a scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// Offset of the record in the segment.
    pub offset: u64,
    /// Its chunk id.
    pub id: ChunkId,
    /// Record length (header and payload).
    pub len: u32,
    /// Plaintext length.
    pub plain_len: u32,
}

/// What a scan found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// The problem with the segment header, if any (the scan still runs).
    pub header_problem: Option<String>,
    /// The records, in file order.
    pub records: Vec<Found>,
    /// End of the last whole record (the segment's usable length).
    pub end: u64,
    /// Bytes between records that belong to none (holes, damage).
    pub skipped: u64,
}

/// How far a resync reads at a time.
const RESYNC_WINDOW: usize = 1 << 20;

/// Scans segment `id` of `size` bytes; `read(offset, buf)` fills `buf`
/// from the segment and returns false when it cannot.
pub fn scan_segment(id: u64, size: u64, read: &mut dyn FnMut(u64, &mut [u8]) -> bool) -> Scan {
    let mut scan = Scan::default();
    let mut head = [0u8; SEGMENT_HEADER_LEN as usize];
    if size < SEGMENT_HEADER_LEN || !read(0, &mut head) {
        scan.header_problem = Some(format!("segment is {size} bytes, shorter than its header"));
        return scan;
    }
    scan.header_problem = check_header(&head, id).err();
    let mut pos = SEGMENT_HEADER_LEN;
    scan.end = pos;
    let mut hbuf = [0u8; HEADER_LEN];
    while pos + HEADER_LEN as u64 <= size {
        if read(pos, &mut hbuf)
            && let Ok(h) = RecordHeader::parse(&hbuf)
        {
            let len = h.record_len();
            if pos + len > size {
                break;
            }
            scan.records.push(Found {
                offset: pos,
                id: h.id,
                len: len as u32,
                plain_len: h.plain_len,
            });
            pos += len;
            scan.end = pos;
            continue;
        }
        match resync(pos + 1, size, read) {
            Some(next) => {
                scan.skipped += next - pos;
                pos = next;
            }
            None => break,
        }
    }
    scan
}

/// The next offset at or after `from` where a valid record header starts.
fn resync(from: u64, size: u64, read: &mut dyn FnMut(u64, &mut [u8]) -> bool) -> Option<u64> {
    let mut at = from;
    let mut buf = vec![0u8; RESYNC_WINDOW];
    let mut hbuf = [0u8; HEADER_LEN];
    while at + HEADER_LEN as u64 <= size {
        let n = ((size - at) as usize).min(RESYNC_WINDOW);
        let window = buf.get_mut(..n)?;
        if !read(at, window) {
            return None;
        }
        let mut i = 0;
        while let Some(rel) = window
            .get(i..)
            .and_then(|w| w.windows(4).position(|m| m == RECORD_MAGIC))
        {
            let cand = at + (i + rel) as u64;
            if cand + HEADER_LEN as u64 <= size
                && read(cand, &mut hbuf)
                && RecordHeader::parse(&hbuf).is_ok()
            {
                return Some(cand);
            }
            i += rel + 1;
        }
        // Overlap by 3 bytes so a magic across two windows is found.
        at += (n as u64).saturating_sub(3).max(1);
    }
    None
}

/// The byte ranges of `from..to` that none of `records` covers, in order:
/// what a segment scan could not read as records.
pub fn gaps(records: &[Found], from: u64, to: u64) -> Vec<(u64, u64)> {
    let mut used: Vec<(u64, u64)> = records
        .iter()
        .map(|r| (r.offset, r.offset + u64::from(r.len)))
        .collect();
    uncovered(from, to, &mut used)
}

/// Fuzz entry: scans `data` as segment 1; never panics, and every record
/// found lies inside `data` in order.
pub fn fuzz_entry(data: &[u8]) -> usize {
    let mut read = |off: u64, buf: &mut [u8]| {
        let Ok(start) = usize::try_from(off) else {
            return false;
        };
        match data.get(start..start.saturating_add(buf.len())) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    };
    let scan = scan_segment(1, data.len() as u64, &mut read);
    let mut last = 0u64;
    for r in &scan.records {
        assert!(r.offset >= last && r.offset + u64::from(r.len) <= data.len() as u64);
        last = r.offset + u64::from(r.len);
    }
    scan.records.len()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::format::record::RecordEncoder;
    use crate::format::segment::encode_header;

    fn segment(blocks: &[Vec<u8>]) -> (Vec<u8>, Vec<u64>) {
        let mut seg = encode_header(1).to_vec();
        let mut enc = RecordEncoder::new(1);
        let mut offs = Vec::new();
        for b in blocks {
            offs.push(seg.len() as u64);
            let id = ChunkId::of(b);
            seg.extend(enc.encode(id, b).unwrap());
        }
        (seg, offs)
    }

    fn scan(data: &[u8]) -> Scan {
        let mut read = |off: u64, buf: &mut [u8]| {
            let s = off as usize;
            match data.get(s..s + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        };
        scan_segment(1, data.len() as u64, &mut read)
    }

    #[test]
    fn finds_every_record_then_resyncs_over_a_hole_and_stops_at_a_torn_tail() {
        let blocks: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 3000 + usize::from(i)]).collect();
        let (mut seg, offs) = segment(&blocks);
        let s = scan(&seg);
        assert_eq!(s.header_problem, None);
        assert_eq!(s.records.iter().map(|r| r.offset).collect::<Vec<_>>(), offs);
        assert_eq!(s.end, seg.len() as u64);
        // A punched (zeroed) second record: the scan skips exactly it.
        let (a, b) = (offs[1] as usize, offs[2] as usize);
        seg[a..b].fill(0);
        let s = scan(&seg);
        assert_eq!(s.records.len(), 4);
        assert_eq!(s.skipped, (b - a) as u64);
        // A torn last record ends the scan before it.
        seg.truncate(seg.len() - 10);
        let s = scan(&seg);
        assert_eq!(s.records.len(), 3);
        assert_eq!(s.end, offs[4]);
        assert_eq!(fuzz_entry(&seg), 3);
    }
}

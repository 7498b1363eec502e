//! Segment (pack) files: append-only files of chunk records.
//!
//! A segment starts with a 32-byte header (magic, version, segment id,
//! checksum) followed by back-to-back chunk records. Only the prefix up to
//! the *committed length* recorded in the index is meaningful; bytes past it
//! are the leftovers of an interrupted session and are cut off by the next
//! writer (see `FORMAT.md`, "Segment file" and "Crash invariants").

#![deny(clippy::indexing_slicing, clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::durable::{fsync_dir, fsync_file, start_writeback};
use crate::error::{Result, StoreError};

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

/// Appends records to one segment file.
pub struct SegmentWriter {
    id: u64,
    path: PathBuf,
    out: BufWriter<File>,
    len: u64,
    /// Bytes whose writeback has been started.
    written_back: u64,
}

impl SegmentWriter {
    /// Creates segment `id` in `dir` with its header (not yet synced).
    pub fn create(dir: &Path, id: u64) -> Result<Self> {
        let path = dir.join(segment_file_name(id));
        let file = crate::private::open_options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| StoreError::io("create segment", &path, e))?;
        let mut w = SegmentWriter {
            id,
            path,
            out: BufWriter::with_capacity(4 << 20, file),
            len: 0,
            written_back: 0,
        };
        w.append(&encode_header(id))?;
        Ok(w)
    }

    /// Opens segment `id` to append after its first `committed` bytes.
    pub fn append_to(dir: &Path, id: u64, committed: u64) -> Result<Self> {
        let path = dir.join(segment_file_name(id));
        let mut file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("open segment", &path, e))?;
        file.set_len(committed)
            .map_err(|e| StoreError::io("truncate segment", &path, e))?;
        file.seek(SeekFrom::Start(committed))
            .map_err(|e| StoreError::io("seek segment", &path, e))?;
        Ok(SegmentWriter {
            id,
            path,
            out: BufWriter::with_capacity(4 << 20, file),
            len: committed,
            written_back: committed,
        })
    }

    /// Appends bytes; returns the offset they start at.
    pub fn append(&mut self, bytes: &[u8]) -> Result<u64> {
        let at = self.len;
        self.out
            .write_all(bytes)
            .map_err(|e| StoreError::io("write segment", &self.path, e))?;
        self.len += bytes.len() as u64;
        Ok(at)
    }

    /// Hands what was appended to the kernel and starts its writeback, so
    /// the fsync at commit has less left to do.
    pub fn start_writeback(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| StoreError::io("write segment", &self.path, e))?;
        if self.len > self.written_back {
            start_writeback(
                self.out.get_ref(),
                self.written_back,
                self.len - self.written_back,
            );
            self.written_back = self.len;
        }
        Ok(())
    }

    /// Flushes and fsyncs the file (and, for a new file, its directory).
    pub fn sync(&mut self, new_file: bool) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| StoreError::io("write segment", &self.path, e))?;
        fsync_file(self.out.get_ref(), &self.path)?;
        if new_file && let Some(dir) = self.path.parent() {
            fsync_dir(dir)?;
        }
        Ok(())
    }

    /// Cuts the file back to `len` bytes, discarding unflushed data.
    pub fn truncate(self, len: u64) -> Result<()> {
        let path = self.path.clone();
        let (file, _) = self.out.into_parts();
        file.set_len(len)
            .map_err(|e| StoreError::io("truncate segment", &path, e))?;
        fsync_file(&file, &path)
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

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads records from segment files; open handles are shared between
/// threads.
#[derive(Debug)]
pub struct SegmentReader {
    dir: PathBuf,
    files: Mutex<HashMap<u64, Arc<File>>>,
}

impl SegmentReader {
    /// A reader for the segments in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        SegmentReader {
            dir,
            files: Mutex::new(HashMap::new()),
        }
    }

    /// Path of segment `id`.
    pub fn path(&self, id: u64) -> PathBuf {
        self.dir.join(segment_file_name(id))
    }

    fn file(&self, id: u64) -> Result<Arc<File>> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = files.get(&id) {
            return Ok(f.clone());
        }
        let path = self.path(id);
        let f = Arc::new(File::open(&path).map_err(|e| StoreError::io("open segment", &path, e))?);
        files.insert(id, f.clone());
        Ok(f)
    }

    /// Reads exactly `len` bytes at `offset` of segment `id`.
    pub fn read(&self, id: u64, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.read_into(id, offset, len, &mut buf)?;
        Ok(buf)
    }

    /// Like [`SegmentReader::read`], into a reused buffer.
    pub fn read_into(&self, id: u64, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
        let f = self.file(id)?;
        buf.clear();
        buf.resize(len, 0);
        f.read_exact_at(buf, offset)
            .map_err(|e| StoreError::io("read segment", self.path(id), e))
    }

    /// Forgets cached handles (after segments were truncated or removed).
    pub fn forget(&self) {
        self.files.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
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

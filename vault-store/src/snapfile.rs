//! Snapshot files (`VAULT/snapshots/ITEM/JOB.snap`): what a backup's
//! snapshot phase captured, the BLAKE3 id of every block at the point in
//! time (all zeros for a hole or an all-zero block). The transfer phase
//! reads it back in block order and stores only blocks the vault lacks,
//! checking that the image still holds exactly what the snapshot saw.
//!
//! Layout (`FORMAT.md`, "Snapshot file"): a 48-byte header, frames of at
//! most 1,024 entries each with its own CRC-32, a trailer with the entry
//! total. Written to a temporary name and renamed once complete, streamed
//! in both directions so memory stays flat for any image size.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::blockmap::Entry;
use crate::chunk_id::ChunkId;
use crate::durable::{fsync_dir, fsync_file};
use crate::error::{Result, StoreError};

/// Magic. Frozen.
pub const SNAP_MAGIC: [u8; 8] = *b"CFSNAP\0\0";
/// Trailer magic. Frozen.
pub const SNAP_END: [u8; 8] = *b"CFSNEND\0";
/// Format version.
pub const SNAP_VERSION: u32 = 1;
/// Header length.
pub const SNAP_HEADER_LEN: usize = 48;
/// Most entries per frame.
pub const FRAME_ENTRIES: usize = 1024;
/// Folder of snapshot files in a vault.
pub const SNAPSHOTS_DIR: &str = "snapshots";

/// What a snapshot file's header records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapHeader {
    /// Block size of the entries.
    pub block_size: u32,
    /// Image size in bytes.
    pub image_size: u64,
    /// Number of entries.
    pub blocks: u64,
    /// Capture time, Unix seconds.
    pub created: i64,
}

impl SnapHeader {
    fn encode(&self) -> [u8; SNAP_HEADER_LEN] {
        let mut h = [0u8; SNAP_HEADER_LEN];
        let parts: [&[u8]; 6] = [
            &SNAP_MAGIC,
            &SNAP_VERSION.to_le_bytes(),
            &self.block_size.to_le_bytes(),
            &self.image_size.to_le_bytes(),
            &self.blocks.to_le_bytes(),
            &self.created.to_le_bytes(),
        ];
        let mut at = 0;
        for p in parts {
            if let Some(d) = h.get_mut(at..at + p.len()) {
                d.copy_from_slice(p);
            }
            at += p.len();
        }
        let crc = crc32fast::hash(h.get(..40).unwrap_or_default());
        if let Some(d) = h.get_mut(40..44) {
            d.copy_from_slice(&crc.to_le_bytes());
        }
        h
    }

    fn decode(h: &[u8]) -> std::result::Result<Self, String> {
        let u = |at: usize, n: usize| h.get(at..at + n).ok_or("header truncated".to_string());
        if u(0, 8)? != SNAP_MAGIC {
            return Err("bad magic".into());
        }
        let version = u32::from_le_bytes(u(8, 4)?.try_into().map_err(|_| "header")?);
        if version != SNAP_VERSION {
            return Err(format!("unsupported version {version}"));
        }
        let crc = u32::from_le_bytes(u(40, 4)?.try_into().map_err(|_| "header")?);
        if crc32fast::hash(u(0, 40)?) != crc {
            return Err("header checksum mismatch".into());
        }
        Ok(SnapHeader {
            block_size: u32::from_le_bytes(u(12, 4)?.try_into().map_err(|_| "header")?),
            image_size: u64::from_le_bytes(u(16, 8)?.try_into().map_err(|_| "header")?),
            blocks: u64::from_le_bytes(u(24, 8)?.try_into().map_err(|_| "header")?),
            created: i64::from_le_bytes(u(32, 8)?.try_into().map_err(|_| "header")?),
        })
    }
}

/// Writes a snapshot file; it appears under its name only once finished.
pub struct SnapWriter {
    out: Option<BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    frame: Vec<u8>,
    in_frame: usize,
    total: u64,
}

impl SnapWriter {
    /// Starts `path` (its folder is created if needed).
    pub fn create(path: &Path, header: SnapHeader) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| StoreError::io("create directory", dir, e))?;
        let tmp = path.with_extension("snap.tmp");
        let f = File::create(&tmp).map_err(|e| StoreError::io("create", &tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.write_all(&header.encode())
            .map_err(|e| StoreError::io("write", &tmp, e))?;
        Ok(SnapWriter {
            out: Some(out),
            tmp,
            path: path.to_path_buf(),
            frame: Vec::with_capacity(FRAME_ENTRIES * 32),
            in_frame: 0,
            total: 0,
        })
    }

    /// Appends the next block's entry.
    pub fn push(&mut self, entry: Entry) -> Result<()> {
        self.frame
            .extend_from_slice(entry.as_ref().map_or(&[0u8; 32], |id| id.as_bytes()));
        self.in_frame += 1;
        self.total += 1;
        if self.in_frame == FRAME_ENTRIES {
            self.flush_frame()?;
        }
        Ok(())
    }

    fn flush_frame(&mut self) -> Result<()> {
        if self.in_frame == 0 {
            return Ok(());
        }
        let count = (self.in_frame as u32).to_le_bytes();
        let mut h = crc32fast::Hasher::new();
        h.update(&count);
        h.update(&self.frame);
        let crc = h.finalize().to_le_bytes();
        let frame = &self.frame;
        self.out
            .as_mut()
            .map_or(Ok(()), |out| -> std::io::Result<()> {
                out.write_all(&count)?;
                out.write_all(frame)?;
                out.write_all(&crc)
            })
            .map_err(|e| StoreError::io("write", &self.tmp, e))?;
        self.frame.clear();
        self.in_frame = 0;
        Ok(())
    }

    /// Writes the trailer, syncs and renames the file into place.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.flush_frame()?;
        let mut t = Vec::with_capacity(20);
        t.extend_from_slice(&SNAP_END);
        t.extend_from_slice(&self.total.to_le_bytes());
        let crc = crc32fast::hash(&t);
        t.extend_from_slice(&crc.to_le_bytes());
        let Some(mut out) = self.out.take() else {
            return Err(StoreError::io(
                "write",
                &self.tmp,
                std::io::ErrorKind::Other.into(),
            ));
        };
        out.write_all(&t)
            .map_err(|e| StoreError::io("write", &self.tmp, e))?;
        let f = out
            .into_inner()
            .map_err(|e| StoreError::io("write", &self.tmp, e.into_error()))?;
        fsync_file(&f, &self.tmp)?;
        fs::rename(&self.tmp, &self.path).map_err(|e| StoreError::io("rename", &self.path, e))?;
        if let Some(dir) = self.path.parent() {
            fsync_dir(dir)?;
        }
        Ok(self.path.clone())
    }
}

impl Drop for SnapWriter {
    fn drop(&mut self) {
        // A finished writer has renamed its file away; otherwise the
        // partial file goes.
        let _ = fs::remove_file(&self.tmp);
    }
}

/// Reads a snapshot file back in block order.
pub struct SnapReader<R: Read> {
    input: R,
    path: PathBuf,
    header: SnapHeader,
    frame: Vec<Entry>,
    pos: usize,
    read: u64,
}

impl SnapReader<BufReader<File>> {
    /// Opens `path` and checks its header.
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| StoreError::io("open", path, e))?;
        SnapReader::new(BufReader::with_capacity(1 << 20, f), path)
    }
}

impl<R: Read> SnapReader<R> {
    /// Reads the header from `input`; `path` is used in messages.
    pub fn new(mut input: R, path: &Path) -> Result<Self> {
        let mut h = [0u8; SNAP_HEADER_LEN];
        input
            .read_exact(&mut h)
            .map_err(|e| Self::corrupt_at(path, format!("header: {e}")))?;
        let header = SnapHeader::decode(&h).map_err(|r| Self::corrupt_at(path, r))?;
        Ok(SnapReader {
            input,
            path: path.to_path_buf(),
            header,
            frame: Vec::new(),
            pos: 0,
            read: 0,
        })
    }

    fn corrupt_at(path: &Path, reason: String) -> StoreError {
        StoreError::CorruptFile {
            path: path.to_path_buf(),
            what: "snapshot file",
            reason,
        }
    }

    fn corrupt(&self, reason: impl Into<String>) -> StoreError {
        Self::corrupt_at(&self.path, reason.into())
    }

    /// The header.
    pub fn header(&self) -> SnapHeader {
        self.header
    }

    fn read_frame(&mut self) -> Result<()> {
        let mut count = [0u8; 4];
        self.input
            .read_exact(&mut count)
            .map_err(|e| self.corrupt(format!("frame: {e}")))?;
        let n = u32::from_le_bytes(count) as usize;
        let left = self.header.blocks - self.read;
        if n == 0 || n > FRAME_ENTRIES || n as u64 > left {
            return Err(self.corrupt(format!("frame of {n} entries with {left} left")));
        }
        let mut body = vec![0u8; n * 32];
        let mut crc = [0u8; 4];
        self.input
            .read_exact(&mut body)
            .and_then(|()| self.input.read_exact(&mut crc))
            .map_err(|e| self.corrupt(format!("frame: {e}")))?;
        let mut h = crc32fast::Hasher::new();
        h.update(&count);
        h.update(&body);
        if h.finalize() != u32::from_le_bytes(crc) {
            return Err(self.corrupt(format!("frame checksum mismatch after entry {}", self.read)));
        }
        self.frame = body
            .chunks_exact(32)
            .map(|c| {
                if c.iter().all(|&b| b == 0) {
                    None
                } else {
                    ChunkId::from_slice(c)
                }
            })
            .collect();
        self.pos = 0;
        self.read += n as u64;
        Ok(())
    }

    /// The next `n` entries (fewer only at the end of the file).
    pub fn next_entries(&mut self, n: usize) -> Result<Vec<Entry>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.pos == self.frame.len() {
                if self.read == self.header.blocks {
                    break;
                }
                self.read_frame()?;
            }
            let take = (n - out.len()).min(self.frame.len() - self.pos);
            out.extend_from_slice(
                self.frame
                    .get(self.pos..self.pos + take)
                    .unwrap_or_default(),
            );
            self.pos += take;
        }
        Ok(out)
    }

    /// Checks the trailer once every entry was read.
    pub fn finish(mut self) -> Result<()> {
        if self.read != self.header.blocks || self.pos != self.frame.len() {
            return Err(self.corrupt("entries left unread"));
        }
        let mut t = [0u8; 20];
        self.input
            .read_exact(&mut t)
            .map_err(|e| self.corrupt(format!("trailer: {e}")))?;
        let le = |r: std::ops::Range<usize>| -> u64 {
            t.get(r).map_or(u64::MAX, |b| {
                b.iter().rev().fold(0u64, |a, &x| (a << 8) | u64::from(x))
            })
        };
        let ok = t.get(..8) == Some(&SNAP_END[..])
            && le(8..16) == self.read
            && le(16..20) == u64::from(crc32fast::hash(t.get(..16).unwrap_or_default()));
        let mut extra = [0u8; 1];
        if !ok
            || self
                .input
                .read(&mut extra)
                .map_err(|e| self.corrupt(e.to_string()))?
                != 0
        {
            return Err(self.corrupt("bad trailer"));
        }
        Ok(())
    }
}

/// Fuzz entry point: reads arbitrary bytes as a snapshot file; never
/// panics. Returns true when the whole file is valid.
pub fn fuzz_entry(data: &[u8]) -> bool {
    let Ok(mut r) = SnapReader::new(data, Path::new("fuzz")) else {
        return false;
    };
    let blocks = r.header().blocks;
    let mut seen = 0u64;
    loop {
        match r.next_entries(4096) {
            Ok(e) if e.is_empty() => break,
            Ok(e) => seen += e.len() as u64,
            Err(_) => return false,
        }
        if seen > blocks {
            return false;
        }
    }
    r.finish().is_ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]
mod tests {
    use super::*;

    fn sample(path: &Path, n: u64) -> Vec<Entry> {
        let entries: Vec<Entry> = (0..n)
            .map(|i| (i % 3 != 0).then(|| ChunkId::of(&i.to_le_bytes())))
            .collect();
        let mut w = SnapWriter::create(
            path,
            SnapHeader {
                block_size: 65536,
                image_size: n * 65536,
                blocks: n,
                created: 7,
            },
        )
        .unwrap();
        for e in &entries {
            w.push(*e).unwrap();
        }
        w.finish().unwrap();
        entries
    }

    #[test]
    fn round_trip_in_odd_windows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s/x.snap");
        let entries = sample(&path, 2500);
        let mut r = SnapReader::open(&path).unwrap();
        let mut got = Vec::new();
        for n in [1, 700, 1024, 1000, 5000] {
            got.extend(r.next_entries(n).unwrap());
        }
        assert_eq!(got, entries);
        r.finish().unwrap();
    }

    #[test]
    fn damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.snap");
        sample(&path, 1500);
        let bytes = fs::read(&path).unwrap();
        assert!(fuzz_entry(&bytes));
        for at in [3, 20, 41, 60, 2000, bytes.len() - 3] {
            let mut d = bytes.clone();
            d[at] ^= 1;
            assert!(!fuzz_entry(&d), "flip at {at}");
        }
        assert!(!fuzz_entry(&bytes[..bytes.len() - 1]));
    }
}

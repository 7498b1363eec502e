//! Snapshot manifests (`AREA/ITEM/JOB.snap`): what one capture holds.
//!
//! A manifest names its point, item, job, source image and consistency
//! level, and says how the point's bytes are kept:
//! - **chunks** (the fallback path): one entry per block, in block order:
//!   the block's BLAKE3 id (all zeros for a hole or an all-zero block) and
//!   where its record (the vault's chunk record format) lies in a pack of
//!   the same area (`pack.rs`);
//! - **clone** (the reflink path): no entries; the point is the clone file
//!   named in the metadata.
//!
//! Layout (`FORMAT.md`, "Snapshot manifest"): a 64-byte header, frames of
//! at most 1,024 entries of 48 bytes each with a CRC-32, a JSON metadata
//! block with its own CRC-32 (last, because the consistency level is known
//! only once the post-snapshot hook has run), and a 32-byte trailer with
//! the entry total, the bytes the capture added and the metadata length.
//! Written to a temporary name and renamed once complete; streamed both
//! ways so memory stays flat for any image. No length field is trusted:
//! each is bounded before it is used.

#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use coffre_vault_store::ChunkId;
use coffre_vault_store::durable::{fsync_dir, fsync_file};
use coffre_vault_store::private;
use serde::{Deserialize, Serialize};

use crate::error::{Result, SnapError};
use coffre_vault_store::level::Level;

/// Magic. Frozen.
pub const SNAP_MAGIC: [u8; 8] = *b"CFSNAP\0\0";
/// Trailer magic. Frozen.
pub const SNAP_END: [u8; 8] = *b"CFSNEND\0";
/// Format version (1 was the hash-only snapshot file of vault format 2).
pub const SNAP_VERSION: u32 = 2;
/// Header length.
pub const SNAP_HEADER_LEN: usize = 64;
/// Trailer length.
pub const SNAP_TRAILER_LEN: usize = 32;
/// Bytes per entry.
pub const ENTRY_LEN: usize = 48;
/// Most entries per frame.
pub const FRAME_ENTRIES: usize = 1024;
/// Largest metadata block.
pub const MAX_META_LEN: usize = 64 << 10;
/// Entry flag: the block's bytes decode as a block-map node.
pub const FLAG_NODE: u16 = 1;

/// How a snapshot keeps the point's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapKind {
    /// Records in packs of the area, one entry per block.
    Chunks,
    /// A reflink clone of the image.
    Clone,
}

impl SnapKind {
    fn code(self) -> u8 {
        match self {
            SnapKind::Chunks => 1,
            SnapKind::Clone => 2,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(SnapKind::Chunks),
            2 => Some(SnapKind::Clone),
            _ => None,
        }
    }
}

/// The fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapHeader {
    /// How the bytes are kept.
    pub kind: SnapKind,
    /// Block size of the entries.
    pub block_size: u32,
    /// Image size in bytes.
    pub image_size: u64,
    /// Number of entries in the file (0 for a clone).
    pub blocks: u64,
    /// Capture instant: Unix seconds.
    pub created_s: i64,
    /// Capture instant: nanoseconds within the second.
    pub created_ns: u32,
}

/// The metadata block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapMeta {
    /// Item name.
    pub item: String,
    /// Point id.
    pub point: String,
    /// Job that captured it.
    pub job: String,
    /// The image captured.
    pub source: PathBuf,
    /// Consistency level.
    pub level: Level,
    /// Packs the entries refer to (file names in the item's folder),
    /// indexed by an entry's `pack`.
    #[serde(default)]
    pub packs: Vec<String>,
    /// The clone file (clone snapshots).
    #[serde(default)]
    pub clone: Option<String>,
    /// What went less than perfectly (a failed hook, retries).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// How a changed-block source was used by this capture, and its
    /// generation (the next capture checks its source against it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cbt: Option<coffre_vault_store::CbtRecord>,
}

impl SnapMeta {
    /// Checks the names the metadata holds: the item, point and job, each
    /// pack and the clone ([`coffre_vault_store::name::check_name`]).
    pub fn check_names(&self) -> std::result::Result<(), coffre_vault_store::name::NameError> {
        use coffre_vault_store::name::check_name;
        check_name("item", &self.item)?;
        check_name("point", &self.point)?;
        check_name("job", &self.job)?;
        for p in &self.packs {
            check_name("pack", p)?;
        }
        if let Some(c) = &self.clone {
            check_name("clone", c)?;
        }
        Ok(())
    }
}

/// Where a block's record lies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackLoc {
    /// Index into [`SnapMeta::packs`].
    pub pack: u16,
    /// [`FLAG_NODE`] or 0.
    pub flags: u16,
    /// Record length.
    pub len: u32,
    /// Record offset in the pack.
    pub offset: u64,
}

impl PackLoc {
    /// Where the record ends (decoded entries never overflow; saturates
    /// for hand-made ones).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(u64::from(self.len))
    }
}

/// One block of a chunk snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapEntry {
    /// Block id; `None` for a zero block (no record).
    pub id: Option<ChunkId>,
    /// Its record.
    pub loc: PackLoc,
}

/// What the trailer records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapTrailer {
    /// Entries written.
    pub entries: u64,
    /// Bytes the capture added to the area (new records, or the clone).
    pub stored_bytes: u64,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(at..at + v.len()) {
        d.copy_from_slice(v);
    }
}

impl SnapHeader {
    fn encode(&self) -> [u8; SNAP_HEADER_LEN] {
        let mut h = [0u8; SNAP_HEADER_LEN];
        put(&mut h, 0, &SNAP_MAGIC);
        put(&mut h, 8, &SNAP_VERSION.to_le_bytes());
        put(&mut h, 12, &[self.kind.code()]);
        put(&mut h, 16, &self.block_size.to_le_bytes());
        put(&mut h, 24, &self.image_size.to_le_bytes());
        put(&mut h, 32, &self.blocks.to_le_bytes());
        put(&mut h, 40, &self.created_s.to_le_bytes());
        put(&mut h, 48, &self.created_ns.to_le_bytes());
        let crc = crc32fast::hash(h.get(..56).unwrap_or_default());
        put(&mut h, 56, &crc.to_le_bytes());
        h
    }

    fn decode(h: &[u8]) -> std::result::Result<Self, String> {
        if h.len() < SNAP_HEADER_LEN {
            return Err("header truncated".into());
        }
        if h.get(..8) != Some(&SNAP_MAGIC[..]) {
            return Err("bad magic (not a coffre snapshot)".into());
        }
        let version = le_u32(h, 8);
        if version != SNAP_VERSION {
            return Err(format!(
                "unsupported version {version} (this coffre reads version {SNAP_VERSION}{})",
                if version < SNAP_VERSION {
                    "; a snapshot of an older coffre holds no data and expires at the next prune"
                } else {
                    ""
                }
            ));
        }
        if crc32fast::hash(h.get(..56).unwrap_or_default()) != le_u32(h, 56) {
            return Err("header checksum mismatch".into());
        }
        if h.get(13..16) != Some(&[0u8; 3][..])
            || le_u32(h, 20) != 0
            || le_u32(h, 52) != 0
            || le_u32(h, 60) != 0
        {
            return Err("reserved header bytes are not zero".into());
        }
        let kind = h
            .get(12)
            .and_then(|&c| SnapKind::from_code(c))
            .ok_or("unknown snapshot kind")?;
        let header = SnapHeader {
            kind,
            block_size: le_u32(h, 16),
            image_size: le_u64(h, 24),
            blocks: le_u64(h, 32),
            created_s: le_u64(h, 40) as i64,
            created_ns: le_u32(h, 48),
        };
        if header.created_ns >= 1_000_000_000 {
            return Err("bad capture instant".into());
        }
        // The block size sizes buffers (`vec![0; block_size]`) and
        // divides: only the sizes a vault accepts.
        if coffre_vault_store::config::validate_block_size(header.block_size).is_err() {
            return Err(format!(
                "block size {} is not a power of two from 64 KiB to 4 MiB",
                header.block_size
            ));
        }
        if kind == SnapKind::Clone && header.blocks != 0 {
            return Err("a clone snapshot with entries".into());
        }
        Ok(header)
    }
}

impl SnapEntry {
    fn encode_into(&self, out: &mut Vec<u8>) {
        match self.id {
            None => out.extend_from_slice(&[0u8; ENTRY_LEN]),
            Some(id) => {
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(&self.loc.pack.to_le_bytes());
                out.extend_from_slice(&self.loc.flags.to_le_bytes());
                out.extend_from_slice(&self.loc.len.to_le_bytes());
                out.extend_from_slice(&self.loc.offset.to_le_bytes());
            }
        }
    }

    fn decode(b: &[u8], packs: usize) -> std::result::Result<Self, String> {
        let idb = b.get(..32).ok_or("entry truncated")?;
        if b.iter().all(|&x| x == 0) {
            return Ok(SnapEntry::default());
        }
        let id = ChunkId::from_slice(idb).ok_or("entry truncated")?;
        let pack = le_u32(b, 32) as u16;
        let loc = PackLoc {
            pack,
            flags: (le_u32(b, 32) >> 16) as u16,
            len: le_u32(b, 36),
            offset: le_u64(b, 40),
        };
        if usize::from(pack) >= packs {
            return Err(format!("entry names pack {pack} of {packs}"));
        }
        if loc.len == 0 {
            return Err("entry of a data block with no record".into());
        }
        if loc.offset.checked_add(u64::from(loc.len)).is_none() {
            return Err(format!(
                "entry's record at {} + {} runs past the largest offset",
                loc.offset, loc.len
            ));
        }
        Ok(SnapEntry { id: Some(id), loc })
    }
}

/// Writes a manifest; it appears under its name only once finished.
pub struct SnapWriter {
    out: Option<BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    frame: Vec<u8>,
    in_frame: usize,
    total: u64,
    expected: u64,
}

impl SnapWriter {
    /// Starts `path` (its folder is created if needed).
    pub fn create(path: &Path, header: SnapHeader) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        private::create_dir_all(dir).map_err(|e| SnapError::write(dir, e))?;
        let tmp = path.with_extension("snap.tmp");
        // Never through a symlink planted at the temporary name.
        use std::os::unix::fs::OpenOptionsExt;
        let f = private::open_options()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| SnapError::write(&tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.write_all(&header.encode())
            .map_err(|e| SnapError::write(&tmp, e))?;
        Ok(SnapWriter {
            out: Some(out),
            tmp,
            path: path.to_path_buf(),
            frame: Vec::with_capacity(FRAME_ENTRIES * ENTRY_LEN),
            in_frame: 0,
            total: 0,
            expected: header.blocks,
        })
    }

    /// Appends the next block's entry.
    pub fn push(&mut self, entry: &SnapEntry) -> Result<()> {
        entry.encode_into(&mut self.frame);
        self.in_frame += 1;
        self.total += 1;
        if self.in_frame == FRAME_ENTRIES {
            self.flush_frame()?;
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match self.out.as_mut() {
            Some(out) => out
                .write_all(bytes)
                .map_err(|e| SnapError::write(&self.tmp, e)),
            None => Err(SnapError::write(
                &self.tmp,
                std::io::ErrorKind::Other.into(),
            )),
        }
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
        let frame = std::mem::take(&mut self.frame);
        self.write(&count)?;
        self.write(&frame)?;
        self.write(&crc)?;
        self.frame = frame;
        self.frame.clear();
        self.in_frame = 0;
        Ok(())
    }

    /// Writes the metadata and trailer, syncs and renames the file into
    /// place.
    pub fn finish(mut self, meta: &SnapMeta, stored_bytes: u64) -> Result<PathBuf> {
        self.flush_frame()?;
        if self.total != self.expected {
            return Err(SnapError::damaged(
                &self.tmp,
                format!(
                    "{} entries written, {} announced",
                    self.total, self.expected
                ),
            ));
        }
        let meta = serde_json::to_vec(meta).unwrap_or_default();
        if meta.len() > MAX_META_LEN {
            return Err(SnapError::damaged(&self.tmp, "metadata too large"));
        }
        self.write(&meta)?;
        self.write(&crc32fast::hash(&meta).to_le_bytes())?;
        let mut t = [0u8; SNAP_TRAILER_LEN];
        put(&mut t, 0, &SNAP_END);
        put(&mut t, 8, &self.total.to_le_bytes());
        put(&mut t, 16, &stored_bytes.to_le_bytes());
        put(&mut t, 24, &(meta.len() as u32).to_le_bytes());
        let crc = crc32fast::hash(t.get(..28).unwrap_or_default());
        put(&mut t, 28, &crc.to_le_bytes());
        self.write(&t)?;
        let Some(out) = self.out.take() else {
            return Err(SnapError::write(
                &self.tmp,
                std::io::ErrorKind::Other.into(),
            ));
        };
        let f = out
            .into_inner()
            .map_err(|e| SnapError::write(&self.tmp, e.into_error()))?;
        fsync_file(&f, &self.tmp)?;
        fs::rename(&self.tmp, &self.path).map_err(|e| SnapError::write(&self.path, e))?;
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

/// Reads a manifest back: the header, then (from the end) the trailer and
/// the metadata, then the entries in block order.
pub struct SnapReader<R: Read + Seek> {
    input: R,
    path: PathBuf,
    header: SnapHeader,
    meta: SnapMeta,
    trailer: SnapTrailer,
    frame: Vec<SnapEntry>,
    pos: usize,
    read: u64,
    /// Where the metadata starts: the entries must end exactly there.
    entries_end: u64,
    at: u64,
}

impl SnapReader<BufReader<File>> {
    /// Opens `path` and checks its header, trailer and metadata.
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| SnapError::damaged(path, e.to_string()))?;
        SnapReader::new(BufReader::with_capacity(1 << 20, f), path)
    }
}

/// Header, metadata and trailer of a manifest, without reading its entries
/// (listing, expiry).
pub fn summary(path: &Path) -> Result<(SnapHeader, SnapMeta, SnapTrailer)> {
    let r = SnapReader::open(path)?;
    Ok((r.header, r.meta, r.trailer))
}

fn decode_trailer(t: &[u8]) -> std::result::Result<(SnapTrailer, usize), String> {
    if t.get(..8) != Some(&SNAP_END[..]) {
        return Err("bad trailer".into());
    }
    if crc32fast::hash(t.get(..28).unwrap_or_default()) != le_u32(t, 28) {
        return Err("trailer checksum mismatch".into());
    }
    let meta_len = le_u32(t, 24) as usize;
    if meta_len > MAX_META_LEN {
        return Err(format!("metadata of {meta_len} bytes is too large"));
    }
    Ok((
        SnapTrailer {
            entries: le_u64(t, 8),
            stored_bytes: le_u64(t, 16),
        },
        meta_len,
    ))
}

impl<R: Read + Seek> SnapReader<R> {
    /// Reads the header, trailer and metadata from `input`; `path` is for
    /// messages.
    pub fn new(mut input: R, path: &Path) -> Result<Self> {
        let bad = |r: String| SnapError::damaged(path, r);
        let mut h = [0u8; SNAP_HEADER_LEN];
        input
            .read_exact(&mut h)
            .map_err(|e| bad(format!("header: {e}")))?;
        let header = SnapHeader::decode(&h).map_err(bad)?;
        let len = input
            .seek(SeekFrom::End(0))
            .map_err(|e| bad(e.to_string()))?;
        let min = (SNAP_HEADER_LEN + SNAP_TRAILER_LEN + 4) as u64;
        if len < min {
            return Err(bad("truncated".into()));
        }
        let mut t = [0u8; SNAP_TRAILER_LEN];
        input
            .seek(SeekFrom::Start(len - SNAP_TRAILER_LEN as u64))
            .and_then(|_| input.read_exact(&mut t))
            .map_err(|e| bad(format!("trailer: {e}")))?;
        let (trailer, meta_len) = decode_trailer(&t).map_err(bad)?;
        if trailer.entries != header.blocks {
            return Err(bad("trailer disagrees with the header".into()));
        }
        let meta_at = len
            .checked_sub((SNAP_TRAILER_LEN + 4 + meta_len) as u64)
            .filter(|&m| m >= SNAP_HEADER_LEN as u64)
            .ok_or_else(|| bad("metadata length runs past the header".into()))?;
        let mut meta = vec![0u8; meta_len + 4];
        input
            .seek(SeekFrom::Start(meta_at))
            .and_then(|_| input.read_exact(&mut meta))
            .map_err(|e| bad(format!("metadata: {e}")))?;
        let body = meta.get(..meta_len).unwrap_or_default();
        if crc32fast::hash(body) != le_u32(&meta, meta_len) {
            return Err(bad("metadata checksum mismatch".into()));
        }
        let meta: SnapMeta =
            serde_json::from_slice(body).map_err(|e| bad(format!("metadata: {e}")))?;
        if meta.packs.len() > usize::from(u16::MAX) + 1 {
            return Err(bad("too many packs".into()));
        }
        // Every name that becomes a path must stay in the item's folder.
        meta.check_names()
            .map_err(|source| SnapError::RefusedName {
                path: path.to_path_buf(),
                source,
            })?;
        if (header.kind == SnapKind::Clone) != meta.clone.is_some() {
            return Err(bad("clone file and kind disagree".into()));
        }
        // The entries need at least their frames' bytes.
        let frames = header.blocks.div_ceil(FRAME_ENTRIES as u64);
        let need = header
            .blocks
            .saturating_mul(ENTRY_LEN as u64)
            .saturating_add(frames.saturating_mul(8));
        if meta_at - SNAP_HEADER_LEN as u64 != need {
            return Err(bad(format!(
                "{} bytes of entries where {} blocks need {need}",
                meta_at - SNAP_HEADER_LEN as u64,
                header.blocks
            )));
        }
        input
            .seek(SeekFrom::Start(SNAP_HEADER_LEN as u64))
            .map_err(|e| bad(e.to_string()))?;
        Ok(SnapReader {
            input,
            path: path.to_path_buf(),
            header,
            meta,
            trailer,
            frame: Vec::new(),
            pos: 0,
            read: 0,
            entries_end: meta_at,
            at: SNAP_HEADER_LEN as u64,
        })
    }

    fn corrupt(&self, reason: impl Into<String>) -> SnapError {
        SnapError::damaged(&self.path, reason)
    }

    /// The header.
    pub fn header(&self) -> SnapHeader {
        self.header
    }

    /// The metadata.
    pub fn meta(&self) -> &SnapMeta {
        &self.meta
    }

    /// The trailer.
    pub fn trailer(&self) -> SnapTrailer {
        self.trailer
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
        let mut body = vec![0u8; n * ENTRY_LEN];
        let mut crc = [0u8; 4];
        self.input
            .read_exact(&mut body)
            .and_then(|()| self.input.read_exact(&mut crc))
            .map_err(|e| self.corrupt(format!("frame: {e}")))?;
        self.at += (8 + n * ENTRY_LEN) as u64;
        if self.at > self.entries_end {
            return Err(self.corrupt("entries run into the metadata"));
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&count);
        h.update(&body);
        if h.finalize() != u32::from_le_bytes(crc) {
            return Err(self.corrupt(format!("frame checksum mismatch after entry {}", self.read)));
        }
        let packs = self.meta.packs.len();
        self.frame = body
            .chunks_exact(ENTRY_LEN)
            .map(|c| SnapEntry::decode(c, packs))
            .collect::<std::result::Result<_, _>>()
            .map_err(|r| self.corrupt(r))?;
        self.pos = 0;
        self.read += n as u64;
        Ok(())
    }

    /// The next `n` entries (fewer only at the end of the file).
    pub fn next_entries(&mut self, n: usize) -> Result<Vec<SnapEntry>> {
        let mut out = Vec::with_capacity(n.min(1 << 20));
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

    /// Checks that every entry was read and the entries end where the
    /// metadata starts.
    pub fn finish(self) -> Result<SnapTrailer> {
        if self.read != self.header.blocks || self.pos != self.frame.len() {
            return Err(self.corrupt("entries left unread"));
        }
        if self.at != self.entries_end {
            return Err(self.corrupt("bytes between the entries and the metadata"));
        }
        Ok(self.trailer)
    }
}

/// Fuzz entry point: reads arbitrary bytes as a manifest; never panics.
/// Returns true when the whole file is valid.
pub fn fuzz_entry(data: &[u8]) -> bool {
    let Ok(mut r) = SnapReader::new(std::io::Cursor::new(data), Path::new("fuzz")) else {
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

    pub(crate) fn meta() -> SnapMeta {
        SnapMeta {
            item: "vm".into(),
            point: "0123456789ab".into(),
            job: "j1".into(),
            source: "/img".into(),
            level: Level::CrashConsistent,
            packs: vec!["a.pack".into(), "b.pack".into()],
            clone: None,
            warnings: vec![],
            cbt: None,
        }
    }

    fn sample(path: &Path, n: u64) -> Vec<SnapEntry> {
        let entries: Vec<SnapEntry> = (0..n)
            .map(|i| {
                if i % 3 == 0 {
                    SnapEntry::default()
                } else {
                    SnapEntry {
                        id: Some(ChunkId::of(&i.to_le_bytes())),
                        loc: PackLoc {
                            pack: (i % 2) as u16,
                            flags: if i % 7 == 0 { FLAG_NODE } else { 0 },
                            len: 100 + i as u32,
                            offset: i * 1000,
                        },
                    }
                }
            })
            .collect();
        let header = SnapHeader {
            kind: SnapKind::Chunks,
            block_size: 65536,
            image_size: n * 65536,
            blocks: n,
            created_s: 1_700_000_000,
            created_ns: 5,
        };
        let mut w = SnapWriter::create(path, header).unwrap();
        for e in &entries {
            w.push(e).unwrap();
        }
        w.finish(&meta(), 12345).unwrap();
        entries
    }

    #[test]
    fn round_trip_in_odd_windows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s/x.snap");
        let entries = sample(&path, 2500);
        let mut r = SnapReader::open(&path).unwrap();
        assert_eq!(r.meta(), &meta());
        let mut got = Vec::new();
        for n in [1, 700, 1024, 1000, 5000] {
            got.extend(r.next_entries(n).unwrap());
        }
        assert_eq!(got, entries);
        assert_eq!(r.finish().unwrap().stored_bytes, 12345);
        let (h, m, t) = summary(&path).unwrap();
        assert_eq!(
            (h.blocks, m.item.as_str(), t.stored_bytes),
            (2500, "vm", 12345)
        );
    }

    #[test]
    fn damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.snap");
        sample(&path, 1500);
        let bytes = fs::read(&path).unwrap();
        assert!(fuzz_entry(&bytes));
        for at in [
            3,
            20,
            41,
            60,
            100,
            2000,
            bytes.len() - 40,
            bytes.len() - 10,
            bytes.len() - 3,
        ] {
            let mut d = bytes.clone();
            d[at] ^= 0x40;
            assert!(!fuzz_entry(&d), "flip at {at} not detected");
        }
        assert!(!fuzz_entry(&bytes[..bytes.len() - 1]));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(!fuzz_entry(&longer));
    }

    #[test]
    fn version_one_files_are_named_as_such() {
        let mut h = SnapHeader {
            kind: SnapKind::Chunks,
            block_size: 65536,
            image_size: 0,
            blocks: 0,
            created_s: 0,
            created_ns: 0,
        }
        .encode();
        h[8] = 1;
        let crc = crc32fast::hash(&h[..56]);
        h[56..60].copy_from_slice(&crc.to_le_bytes());
        let err = SnapHeader::decode(&h).unwrap_err();
        assert!(
            err.contains("version 1") && err.contains("older coffre"),
            "{err}"
        );
    }

    fn write_one(path: &Path, header: SnapHeader, entry: Option<SnapEntry>, meta: &SnapMeta) {
        let mut w = SnapWriter::create(path, header).unwrap();
        if let Some(e) = entry {
            w.push(&e).unwrap();
        }
        w.finish(meta, 0).unwrap();
    }

    fn one_block(block_size: u32) -> SnapHeader {
        SnapHeader {
            kind: SnapKind::Chunks,
            block_size,
            image_size: u64::from(block_size),
            blocks: 1,
            created_s: 1,
            created_ns: 0,
        }
    }

    #[test]
    fn names_that_leave_the_folder_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.snap");
        let entry = SnapEntry {
            id: Some(ChunkId::of(b"x")),
            loc: PackLoc {
                pack: 0,
                flags: 0,
                len: 100,
                offset: 64,
            },
        };
        let mut cases: Vec<(&str, SnapMeta)> = Vec::new();
        let mut m = meta();
        m.packs[0] = "../../etc/passwd".into();
        cases.push(("pack", m));
        let mut m = meta();
        m.item = "/tmp/x".into();
        cases.push(("item", m));
        let mut m = meta();
        m.job = "a/b".into();
        cases.push(("job", m));
        for (what, m) in cases {
            write_one(&path, one_block(65536), Some(entry), &m);
            let err = SnapReader::open(&path).err().unwrap();
            let msg = err.to_string();
            assert!(matches!(err, SnapError::RefusedName { .. }), "{msg}");
            assert!(msg.contains(&format!("{what} name")), "{msg}");
        }
        // A clone named outside the folder.
        let mut m = meta();
        m.packs.clear();
        m.clone = Some("../../etc/passwd".into());
        let clone = SnapHeader {
            kind: SnapKind::Clone,
            blocks: 0,
            ..one_block(65536)
        };
        write_one(&path, clone, None, &m);
        let msg = SnapReader::open(&path).err().unwrap().to_string();
        assert!(msg.contains("clone name"), "{msg}");
        m.clone = Some("j1.img".into());
        write_one(&path, clone, None, &m);
        SnapReader::open(&path).unwrap();
    }

    #[test]
    fn decoded_sizes_and_offsets_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.snap");
        // A block size that would size a 4 GiB buffer, or divide by 0.
        for bs in [0u32, 4096, 3 << 16, u32::MAX] {
            write_one(&path, one_block(bs), Some(SnapEntry::default()), &meta());
            let msg = SnapReader::open(&path).err().unwrap().to_string();
            assert!(msg.contains("block size"), "{bs}: {msg}");
        }
        // An entry whose record end passes u64::MAX.
        let entry = SnapEntry {
            id: Some(ChunkId::of(b"x")),
            loc: PackLoc {
                pack: 0,
                flags: 0,
                len: 100,
                offset: u64::MAX - 10,
            },
        };
        write_one(&path, one_block(65536), Some(entry), &meta());
        let mut r = SnapReader::open(&path).unwrap();
        let msg = r.next_entries(1).unwrap_err().to_string();
        assert!(msg.contains("largest offset"), "{msg}");
        assert_eq!(entry.loc.end(), u64::MAX);
    }
}

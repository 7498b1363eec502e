//! Reading a manifest back: header, trailer and metadata checked first,
//! then the entries streamed frame by frame; the fuzz entry point. A
//! sealed manifest's frames and metadata are opened with the vault's keys
//! ([`super::sealing`]).

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use coffre_vault_store::crypto::VaultKeys;
use coffre_vault_store::crypto::seal::OVERHEAD;

use super::codec::{decode_trailer, le_u32};
use super::{
    ENTRY_LEN, FRAME_ENTRIES, MAX_META_LEN, SNAP_HEADER_LEN, SNAP_TRAILER_LEN, SnapEntry,
    SnapHeader, SnapKind, SnapMeta, SnapTrailer,
};
use crate::error::{Result, SnapError};

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
    /// A sealed manifest's keys, header bytes and name (the additional
    /// data), and the index of the next frame.
    sealed: Option<(std::sync::Arc<VaultKeys>, [u8; SNAP_HEADER_LEN], String)>,
    frames: u64,
}

impl SnapReader<BufReader<File>> {
    /// Opens `path` and checks its header, trailer and metadata; `keys`:
    /// an encrypted vault's (its manifests are sealed).
    pub fn open(path: &Path, keys: Option<&std::sync::Arc<VaultKeys>>) -> Result<Self> {
        let f = File::open(path).map_err(|e| SnapError::damaged(path, e.to_string()))?;
        SnapReader::new(BufReader::with_capacity(1 << 20, f), path, keys)
    }
}

impl SnapReader<BufReader<File>> {
    /// Reads every frame once, checked as [`SnapReader::next_entries`]
    /// checks it, and keeps where each lies and a digest of it instead of
    /// its entries (40 bytes per 1,024 blocks): the manifest is then read
    /// at any block by the [`FrameSource`] returned. For a reader that has
    /// read no entry yet.
    pub fn into_frames(mut self) -> Result<FrameSource> {
        if self.read != 0 {
            return Err(self.corrupt("frames indexed after entries were read"));
        }
        let mut frames = Vec::new();
        while self.read < self.header.blocks {
            frames.push(self.read_frame()?);
        }
        self.frame = Vec::new();
        self.pos = 0;
        if self.at != self.entries_end {
            return Err(self.corrupt("bytes between the entries and the metadata"));
        }
        Ok(FrameSource {
            file: self.input.into_inner(),
            path: self.path,
            sealed: self.sealed,
            packs: self.meta.packs.len(),
            frames,
        })
    }
}

/// Where one frame of a manifest lies, as the whole read at open found
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRef {
    /// Byte offset of the frame's entry count.
    pub at: u64,
    /// Its first entry's block.
    pub first: u64,
    /// Its entries.
    pub count: u32,
    /// Its CRC-32 at open.
    pub crc: u32,
    /// BLAKE3 (128 bits) of its bytes at open (count, entries, CRC): read
    /// again, it must be the same frame, not merely one with the same
    /// CRC.
    pub digest: [u8; 16],
}

/// The digest [`FrameRef`] keeps of a frame's bytes.
fn frame_digest(count: &[u8], body: &[u8], crc: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(count);
    h.update(body);
    h.update(crc);
    let mut d = [0u8; 16];
    h.finalize_xof().fill(&mut d);
    d
}

/// A manifest read at any frame, after [`SnapReader::into_frames`] checked
/// all of it. A frame read again must be the very frame seen at open (the
/// same digest) and is checked again (CRC, the seal, every entry): a
/// manifest changed since reads as damaged, never as other entries.
pub struct FrameSource {
    file: File,
    path: PathBuf,
    sealed: Option<(std::sync::Arc<VaultKeys>, [u8; SNAP_HEADER_LEN], String)>,
    packs: usize,
    frames: Vec<FrameRef>,
}

impl FrameSource {
    /// The frame holding block `b`'s entry (its index), `None` past the
    /// last.
    pub fn frame_of(&self, b: u64) -> Option<usize> {
        let i = self
            .frames
            .partition_point(|f| f.first <= b)
            .checked_sub(1)?;
        let f = self.frames.get(i)?;
        (b < f.first + u64::from(f.count)).then_some(i)
    }

    /// Frame `i`: where it lies.
    pub fn frame(&self, i: usize) -> Option<FrameRef> {
        self.frames.get(i).copied()
    }

    /// Reads and checks frame `i`'s entries.
    pub fn read(&self, i: usize) -> Result<Vec<SnapEntry>> {
        use std::os::unix::fs::FileExt;
        let bad = |r: String| SnapError::damaged(&self.path, r);
        let f = self.frame(i).ok_or_else(|| bad(format!("no frame {i}")))?;
        let overhead = if self.sealed.is_some() { OVERHEAD } else { 0 };
        let n = f.count as usize;
        let mut raw = vec![0u8; 8 + n * ENTRY_LEN + overhead];
        self.file
            .read_exact_at(&mut raw, f.at)
            .map_err(|e| bad(format!("frame {i}: {e}")))?;
        let end = raw.len() - 4;
        let (count, body, crc) = (
            raw.get(..4).unwrap_or_default(),
            raw.get(4..end).unwrap_or_default(),
            raw.get(end..).unwrap_or_default(),
        );
        if frame_digest(count, body, crc) != f.digest {
            return Err(bad(format!("frame {i} changed since it was opened")));
        }
        raw.truncate(raw.len() - 4);
        raw.drain(..4);
        open_frame(&self.path, &self.sealed, self.packs, f, i as u64, raw)
    }
}

/// Checks one frame whose `body` (its entries, sealed or not) was read at
/// `frame`, the `index`th of the manifest at `path`: the CRC of its count
/// and body, the seal, then every entry; returns the entries.
fn open_frame(
    path: &Path,
    sealed: &Option<(std::sync::Arc<VaultKeys>, [u8; SNAP_HEADER_LEN], String)>,
    packs: usize,
    frame: FrameRef,
    index: u64,
    body: Vec<u8>,
) -> Result<Vec<SnapEntry>> {
    let bad = |r: String| SnapError::damaged(path, r);
    let mut h = crc32fast::Hasher::new();
    h.update(&frame.count.to_le_bytes());
    h.update(&body);
    if h.finalize() != frame.crc {
        return Err(bad(format!(
            "frame checksum mismatch after entry {}",
            frame.first
        )));
    }
    let body = match sealed {
        None => body,
        Some((k, head, name)) => {
            let ad = super::sealing::frame_ad(head, name, index, frame.count);
            k.catalog()
                .open(&ad, &body, &|| {
                    format!("frame {index} of {}", path.display())
                })
                .map_err(|e| bad(format!("refused: {e}")))?
        }
    };
    body.chunks_exact(ENTRY_LEN)
        .map(|c| SnapEntry::decode(c, packs))
        .collect::<std::result::Result<_, _>>()
        .map_err(bad)
}

/// Header, metadata and trailer of a manifest, without reading its entries
/// (listing, expiry); `keys`: an encrypted vault's.
pub fn summary(
    path: &Path,
    keys: Option<&std::sync::Arc<VaultKeys>>,
) -> Result<(SnapHeader, SnapMeta, SnapTrailer)> {
    let r = SnapReader::open(path, keys)?;
    Ok((r.header, r.meta, r.trailer))
}

impl<R: Read + Seek> SnapReader<R> {
    /// Reads the header, trailer and metadata from `input`; `path` names
    /// it in messages and binds a sealed one; `keys`: an encrypted
    /// vault's.
    pub fn new(
        mut input: R,
        path: &Path,
        keys: Option<&std::sync::Arc<VaultKeys>>,
    ) -> Result<Self> {
        let bad = |r: String| SnapError::damaged(path, r);
        let mut h = [0u8; SNAP_HEADER_LEN];
        input
            .read_exact(&mut h)
            .map_err(|e| bad(format!("header: {e}")))?;
        let (header, is_sealed) = SnapHeader::decode(&h).map_err(bad)?;
        let sealed = match (is_sealed, keys) {
            (true, Some(k)) => Some((k.clone(), h, super::sealing::manifest_name(path))),
            (false, None) => None,
            (true, None) => {
                return Err(bad(
                    "it is sealed (a snapshot of an encrypted vault), and this vault is not encrypted: refused"
                        .into(),
                ));
            }
            (false, Some(_)) => {
                return Err(bad(
                    "it is not sealed, and the vault is encrypted: refused (whoever can write the snapshot area could have planted it)"
                        .into(),
                ));
            }
        };
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
        if sealed.is_none() && meta_len > MAX_META_LEN {
            return Err(bad(format!("metadata of {meta_len} bytes is too large")));
        }
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
        let opened;
        let body = match &sealed {
            None => body,
            Some((k, head, name)) => {
                let ad = super::sealing::meta_ad(head, name, trailer.entries, trailer.stored_bytes);
                opened = k
                    .catalog()
                    .open(&ad, body, &|| format!("the metadata of {}", path.display()))
                    .map_err(|e| bad(format!("refused: {e}")))?;
                opened.as_slice()
            }
        };
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
        let per_frame = if sealed.is_some() { 8 + OVERHEAD } else { 8 } as u64;
        let need = header
            .blocks
            .saturating_mul(ENTRY_LEN as u64)
            .saturating_add(frames.saturating_mul(per_frame));
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
            sealed,
            frames: 0,
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

    fn read_frame(&mut self) -> Result<FrameRef> {
        let at = self.at;
        let mut count = [0u8; 4];
        self.input
            .read_exact(&mut count)
            .map_err(|e| self.corrupt(format!("frame: {e}")))?;
        let n = u32::from_le_bytes(count) as usize;
        let left = self.header.blocks - self.read;
        if n == 0 || n > FRAME_ENTRIES || n as u64 > left {
            return Err(self.corrupt(format!("frame of {n} entries with {left} left")));
        }
        let overhead = if self.sealed.is_some() { OVERHEAD } else { 0 };
        let mut body = vec![0u8; n * ENTRY_LEN + overhead];
        let mut crc = [0u8; 4];
        self.input
            .read_exact(&mut body)
            .and_then(|()| self.input.read_exact(&mut crc))
            .map_err(|e| self.corrupt(format!("frame: {e}")))?;
        self.at += (8 + n * ENTRY_LEN + overhead) as u64;
        if self.at > self.entries_end {
            return Err(self.corrupt("entries run into the metadata"));
        }
        let frame = FrameRef {
            at,
            first: self.read,
            count: n as u32,
            crc: u32::from_le_bytes(crc),
            digest: frame_digest(&count, &body, &crc),
        };
        self.frame = open_frame(
            &self.path,
            &self.sealed,
            self.meta.packs.len(),
            frame,
            self.frames,
            body,
        )?;
        self.frames += 1;
        self.pos = 0;
        self.read += n as u64;
        Ok(frame)
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

/// Reads the whole manifest at `path` (every frame opened and checked):
/// `Ok` when all of it is valid.
pub fn check(path: &Path, keys: Option<&std::sync::Arc<VaultKeys>>) -> Result<()> {
    let mut r = SnapReader::open(path, keys)?;
    while !r.next_entries(64 << 10)?.is_empty() {}
    r.finish().map(drop)
}

/// Fuzz entry point for a manifest read at any frame ([`FrameSource`]).
/// `data` is the manifest as it is opened, after its length (`u32`, little
/// endian); then what the file holds afterwards, written over it in place
/// at `path`: the manifest cut to a length (`u32`, modulo its length + 1),
/// then bytes changed, each an offset (`u32`, modulo the length) and a
/// byte to xor. It panics only where a property breaks (what the fuzzer
/// looks for): each frame of a manifest that opened must read, equal to
/// the stream reader's entries for it, and read after the rewrite must be
/// exactly those entries again or an error: never other entries. Returns
/// the frames and how many still read after the rewrite (`None` when the
/// manifest does not open, or `path` cannot be written).
pub fn fuzz_frames_entry(path: &Path, data: &[u8]) -> Option<(usize, usize)> {
    let (len, rest) = u32_at(data)?;
    let (open, rest) = rest.split_at_checked(len)?;
    let (cut, mut edits) = u32_at(rest).unwrap_or((usize::MAX, &[]));
    let mut later = open
        .get(..cut % (open.len() + 1))
        .unwrap_or_default()
        .to_vec();
    while let Some((at, tail)) = u32_at(edits) {
        let Some((&x, tail)) = tail.split_first() else {
            break;
        };
        let n = later.len();
        if let Some(b) = at.checked_rem(n).and_then(|i| later.get_mut(i)) {
            *b ^= x;
        }
        edits = tail;
    }
    std::fs::write(path, open).ok()?;
    let frames = SnapReader::open(path, None).ok()?.into_frames().ok()?;
    let mut stream = SnapReader::open(path, None).ok()?;
    let mut before = Vec::new();
    for i in 0..frames.frames.len() {
        let f = frames.frame(i)?;
        let entries = frames.read(i);
        assert!(
            entries.is_ok(),
            "frame {i} of a manifest that opened: {entries:?}"
        );
        let entries = entries.ok()?;
        assert_eq!(entries.len(), f.count as usize, "frame {i}: its count");
        assert_eq!(
            frames.frame_of(f.first),
            Some(i),
            "frame {i}: its first block"
        );
        let streamed = stream.next_entries(entries.len());
        assert!(streamed.is_ok(), "frame {i}, streamed: {streamed:?}");
        let streamed = streamed.ok()?;
        assert_eq!(streamed, entries, "frame {i}: the stream's entries");
        before.push(entries);
    }
    std::fs::write(path, later).ok()?;
    let mut same = 0;
    for (i, entries) in before.iter().enumerate() {
        if let Ok(again) = frames.read(i) {
            assert_eq!(
                &again, entries,
                "frame {i} read other entries after a rewrite"
            );
            same += 1;
        }
    }
    Some((before.len(), same))
}

/// A little-endian `u32` at the start of `b`, and the bytes after it.
fn u32_at(b: &[u8]) -> Option<(usize, &[u8])> {
    let (n, rest) = b.split_first_chunk::<4>()?;
    Some((u32::from_le_bytes(*n) as usize, rest))
}

/// Fuzz entry point: reads arbitrary bytes as a manifest; never panics.
/// Returns true when the whole file is valid.
pub fn fuzz_entry(data: &[u8]) -> bool {
    let Ok(mut r) = SnapReader::new(std::io::Cursor::new(data), Path::new("fuzz"), None) else {
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

//! A snapshot read at any block, in any order, from many threads: what
//! an export or a mount of the instant-restore tier needs (a restore
//! reads windows in order instead, [`crate::read`]).
//!
//! A chunk snapshot's manifest is read whole once, at open, and checked to
//! its end; what stays in memory is where each frame of 1,024 entries
//! lies (40 bytes: 640 KiB for 1 TiB in 64 KiB blocks, where the entries
//! themselves would take 768 MiB) and the last [`FRAMES_CACHED`] frames
//! read. A frame read again is checked again and must be the one seen at
//! open. Every record read is checked like a restore's: its place against
//! the manifest, its CRCs, its authentication, and the plaintext against
//! the block's id. A clone is read with `pread` (no mapping: any number of
//! readers at once, and a clone cut short is an error, not a SIGBUS), its
//! size checked after every read.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use coffre_vault_store::ChunkId;

use crate::error::{Result, SnapError};
use crate::manifest::{FrameSource, PackLoc, SnapEntry, SnapHeader};
use crate::pack::{PackReader, RecordBuf};
use crate::read::{Parts, SnapshotBlocks};
use crate::source::ImageSource;

/// What a block of the snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockAt {
    /// Zeros: nothing stored.
    Zero,
    /// A stored chunk with this id.
    Chunk(ChunkId),
    /// Bytes of the clone (not known to be zero).
    Clone,
}

/// An open snapshot, readable at any block.
pub struct SnapshotAt {
    manifest: std::path::PathBuf,
    header: SnapHeader,
    data: Data,
}

/// Frames of entries kept decoded (48 KiB each: 6 MiB, the entries of
/// 8 GiB of image in 64 KiB blocks).
pub const FRAMES_CACHED: usize = 128;

enum Data {
    Chunks {
        frames: FrameSource,
        /// The frames read last, newest at the back.
        cache: Mutex<VecDeque<(usize, Arc<Vec<SnapEntry>>)>>,
        packs: Vec<Option<PackReader>>,
    },
    Clone(std::fs::File, std::path::PathBuf),
}

impl SnapshotAt {
    /// Opens the snapshot whose manifest is `manifest` (`keys`: an
    /// encrypted vault's).
    pub fn open(
        manifest: &Path,
        keys: Option<&std::sync::Arc<coffre_vault_store::crypto::VaultKeys>>,
    ) -> Result<Self> {
        Ok(match SnapshotBlocks::open(manifest, keys)?.into_parts()? {
            Parts::Chunks {
                manifest,
                header,
                frames,
                packs,
            } => SnapshotAt {
                manifest,
                header,
                data: Data::Chunks {
                    frames,
                    cache: Mutex::new(VecDeque::with_capacity(FRAMES_CACHED)),
                    packs,
                },
            },
            Parts::Clone {
                manifest,
                header,
                clone,
            } => {
                let path = clone.path().to_path_buf();
                let file = std::fs::File::open(&path)
                    .map_err(|e| SnapError::damaged(&path, e.to_string()))?;
                SnapshotAt {
                    manifest,
                    header,
                    data: Data::Clone(file, path),
                }
            }
        })
    }

    /// The header (image size, block size).
    pub fn header(&self) -> SnapHeader {
        self.header
    }

    /// The manifest's path, for messages.
    pub fn manifest(&self) -> &Path {
        &self.manifest
    }

    fn bytes_of(&self, b: u64) -> Option<(u64, usize)> {
        let bs = u64::from(self.header.block_size);
        let start = b.checked_mul(bs)?;
        (start < self.header.image_size)
            .then(|| (start, bs.min(self.header.image_size - start) as usize))
    }

    /// What block `b` is; `None` past the end. An error when its frame of
    /// the manifest no longer reads as it did at open.
    pub fn block(&self, b: u64) -> Result<Option<BlockAt>> {
        if self.bytes_of(b).is_none() {
            return Ok(None);
        }
        Ok(Some(match &self.data {
            Data::Chunks { .. } => self.entry(b)?.id.map_or(BlockAt::Zero, BlockAt::Chunk),
            Data::Clone(..) => BlockAt::Clone,
        }))
    }

    /// Where block `b`'s record lies: its chunk and its place in a pack
    /// (numbered as [`SnapshotAt::pack_files`] lists them); `None` for a
    /// zero block, a block past the end, or a clone's. The place is the
    /// manifest's word, checked again by whoever reads the record.
    pub fn record_place(&self, b: u64) -> Result<Option<(ChunkId, PackLoc)>> {
        if self.bytes_of(b).is_none() || matches!(self.data, Data::Clone(..)) {
            return Ok(None);
        }
        let e = self.entry(b)?;
        Ok(e.id.map(|id| (id, e.loc)))
    }

    /// The open pack files, by pack number (`None`: a pack that is
    /// missing; empty for a clone).
    pub fn pack_files(&self) -> Vec<Option<&std::fs::File>> {
        match &self.data {
            Data::Chunks { packs, .. } => crate::pack::files_of(packs),
            Data::Clone(..) => Vec::new(),
        }
    }

    /// Block `b`'s entry, from its frame (cached, or read and checked).
    fn entry(&self, b: u64) -> Result<SnapEntry> {
        let Data::Chunks { frames, cache, .. } = &self.data else {
            return Err(SnapError::damaged(&self.manifest, "a clone has no entries"));
        };
        let none = || SnapError::damaged(&self.manifest, format!("no entry for block {b}"));
        let i = frames.frame_of(b).ok_or_else(none)?;
        let first = frames.frame(i).ok_or_else(none)?.first;
        let within = usize::try_from(b - first).map_err(|_| none())?;
        let lock = || cache.lock().unwrap_or_else(|p| p.into_inner());
        let cached = {
            let mut c = lock();
            let hit = c.iter().position(|(f, _)| *f == i);
            hit.and_then(|k| c.remove(k))
                .inspect(|e| c.push_back(e.clone()))
        };
        let entries = match cached {
            Some((_, e)) => e,
            None => {
                let e = Arc::new(frames.read(i)?);
                let mut c = lock();
                // Another reader may have read it meanwhile: one copy.
                if !c.iter().any(|(f, _)| *f == i) {
                    if c.len() >= FRAMES_CACHED {
                        c.pop_front();
                    }
                    c.push_back((i, e.clone()));
                }
                e
            }
        };
        entries.get(within).copied().ok_or_else(none)
    }

    /// Reads block `b` into `out` (its whole length, the last block maybe
    /// short); `buf` is a decoder's scratch space. Zero blocks are zeros.
    pub fn read_block(&self, b: u64, buf: &mut RecordBuf, out: &mut Vec<u8>) -> Result<()> {
        let (start, len) = self.bytes_of(b).ok_or_else(|| {
            SnapError::damaged(&self.manifest, format!("block {b} is past the image"))
        })?;
        out.clear();
        match &self.data {
            Data::Chunks { packs, .. } => {
                let e = self.entry(b)?;
                let Some(id) = e.id else {
                    out.resize(len, 0);
                    return Ok(());
                };
                let pack = packs
                    .get(usize::from(e.loc.pack))
                    .and_then(Option::as_ref)
                    .ok_or_else(|| {
                        SnapError::damaged(
                            &self.manifest,
                            format!("pack {} of block {b} is missing", e.loc.pack),
                        )
                    })?;
                pack.read_plain(&id, e.loc.offset, e.loc.len, buf)?;
                if buf.plain().len() != len {
                    return Err(SnapError::damaged(
                        &self.manifest,
                        format!(
                            "block {b} decodes to {} bytes, expected {len}",
                            buf.plain().len()
                        ),
                    ));
                }
                // The decoded bytes themselves: an export reads the whole
                // image through here, and a copy of each block cost more
                // than the allocation the next decode makes.
                *out = buf.take_plain();
            }
            Data::Clone(file, path) => {
                use std::os::unix::fs::FileExt;
                out.resize(len, 0);
                let cut = |e: std::io::Error| {
                    SnapError::damaged(path, format!("reading block {b} of the clone: {e}"))
                };
                file.read_exact_at(out, start).map_err(cut)?;
                let now = file.metadata().map_err(cut)?.len();
                if now != self.header.image_size {
                    return Err(SnapError::damaged(
                        path,
                        format!(
                            "the clone is {now} bytes, the snapshot says {}",
                            self.header.image_size
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{BS, area_in, noise, take_snapshot};
    use std::os::unix::fs::FileExt;

    /// Two frames of entries (1,100 blocks), data on both sides of the
    /// frames' boundary and at the very end, zeros elsewhere.
    fn two_frames(dir: &Path) -> (std::path::PathBuf, Vec<u8>, Vec<u64>) {
        let (vault, area) = area_in(dir);
        let blocks = 1100usize;
        let mut image = vec![0u8; blocks * BS];
        let data = vec![3u64, 1023, 1024, 1099];
        for (k, &b) in data.iter().enumerate() {
            let at = b as usize * BS;
            image[at..at + BS].copy_from_slice(&noise(k as u8 + 1, BS));
        }
        let manifest = take_snapshot(&area, &vault, "j1", &image, 1_700_000_000);
        (manifest, image, data)
    }

    #[test]
    fn every_block_reads_from_frames_read_on_demand() {
        let t = tempfile::tempdir().unwrap();
        let (manifest, image, data) = two_frames(t.path());
        let s = SnapshotAt::open(&manifest, None).unwrap();
        let mut buf = RecordBuf::default();
        let mut out = Vec::new();
        // Back and forth across the frames: the cache is not a window.
        for b in [1099u64, 0, 1024, 3, 1023, 500, 1050, 1099] {
            let want = if data.contains(&b) {
                BlockAt::Chunk(ChunkId::in_vault(None, &image[b as usize * BS..][..BS]))
            } else {
                BlockAt::Zero
            };
            assert_eq!(s.block(b).unwrap(), Some(want), "block {b}");
            s.read_block(b, &mut buf, &mut out).unwrap();
            assert_eq!(out, &image[b as usize * BS..][..BS], "block {b}");
        }
        assert_eq!(s.block(1100).unwrap(), None);
    }

    #[test]
    fn a_frame_changed_after_open_is_damage_never_other_entries() {
        let t = tempfile::tempdir().unwrap();
        let (manifest, image, _) = two_frames(t.path());
        let s = SnapshotAt::open(&manifest, None).unwrap();
        // Frame 1 rewritten with a valid checksum: block 1024's entry made
        // a hole's (as if the block were zeros).
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&manifest)
            .unwrap();
        let at = 64 + 8 + 1024 * 48;
        let mut frame = vec![0u8; 4 + 76 * 48];
        f.read_exact_at(&mut frame, at).unwrap();
        assert_eq!(u32::from_le_bytes(frame[..4].try_into().unwrap()), 76);
        frame[4..4 + 48].fill(0);
        f.write_all_at(&frame, at).unwrap();
        f.write_all_at(
            &crc32fast::hash(&frame).to_le_bytes(),
            at + frame.len() as u64,
        )
        .unwrap();
        let e = s.block(1024).unwrap_err().to_string();
        assert!(e.contains("changed since it was opened"), "{e}");
        let mut buf = RecordBuf::default();
        let mut out = Vec::new();
        assert!(s.read_block(1024, &mut buf, &mut out).is_err());
        // Frame 0 is as it was: its blocks still read.
        s.read_block(1023, &mut buf, &mut out).unwrap();
        assert_eq!(out, &image[1023 * BS..][..BS]);
        // Opened again, the changed manifest is read whole and checked,
        // and now says what it says (a hole, by its own valid checksum).
        let again = SnapshotAt::open(&manifest, None).unwrap();
        assert_eq!(again.block(1024).unwrap(), Some(BlockAt::Zero));
    }
}
